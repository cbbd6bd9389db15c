"""Counts without listing (``Client.counts``), ``Server.run(burst=True)``, and the
progress event, on every backend and both AnyIO backends."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import Counts, Server, current_job
from tasqueue_anyio._codec import EVENT_PROGRESS, FINISHED_CHANNEL, decode_event
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


async def test_counts_after_a_known_mix(broker: Broker, results: Results, queue_name: str) -> None:
    server = Server(broker=broker, results=results)
    hold = anyio.Event()
    started = anyio.Event()

    @server.task(queue=queue_name, concurrency=1)
    async def work(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        if x == 99:
            started.set()
            await hold.wait()
        return x

    async with server:
        before = await server.counts(queue_name)
        assert (before.pending, before.scheduled, before.in_flight, before.dead) == (0, 0, 0, 0)
        assert before.empty
        # 2 that succeed, 1 that fails
        done = [await work.enqueue(1), await work.enqueue(2), await work.enqueue(-1)]
        async with running(server) as tg:
            for handle in done:
                await handle.wait(timeout=TIMEOUT)
            # one running (held), two due behind it, one waiting for its ETA
            held = await work.enqueue(99)
            with anyio.fail_after(TIMEOUT):
                await started.wait()
            await work.enqueue(3)
            await work.enqueue(4)
            await work.options(delay=3600).enqueue(5)
            counts = await server.counts(queue_name)
            tg.cancel_scope.cancel()
        assert isinstance(counts, Counts)
        # a worker may have fetched a due one ahead of its processor: in flight too
        assert counts.pending + counts.in_flight == 3
        assert counts.in_flight >= 1
        assert (counts.scheduled, counts.dead) == (1, 0)
        assert not counts.empty
        # the ended totals are the store's (every queue): at least this test's
        assert counts.successful - before.successful == 2
        assert counts.failed - before.failed == 1
        hold.set()
        assert held == held.id


async def test_burst_returns_once_the_queues_are_empty(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[int] = []

    @server.task(queue=queue_name, concurrency=4)
    async def work(x: int) -> int:
        ran.append(x)
        await anyio.sleep(0.01)
        if x == 0:
            # a follow-up enqueued while the burst runs is run too
            await follow.enqueue(100)
        return x

    @server.task(queue=queue_name)
    async def follow(x: int) -> int:
        ran.append(x)
        return x

    async with server:
        handles = [await work.enqueue(i) for i in range(20)]
        retried = await work.options(delay=0.3).enqueue(50)
        with anyio.fail_after(TIMEOUT * 2):
            await server.run(burst=True)
        counts = await server.counts(queue_name)
        assert counts.empty
        assert sorted(ran) == [*range(20), 50, 100]
        assert [await h.result(timeout=0.5) for h in handles] == list(range(20))
        assert await retried.result(timeout=0.5) == 50


async def test_burst_on_empty_queues_returns_at_once(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue_name)
    async def work() -> None:
        pass

    async with server:
        with anyio.fail_after(TIMEOUT):
            await server.run(burst=True)


async def test_progress_is_announced_as_an_event(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    heard: list[str] = []
    announced = anyio.Event()

    def on_event(data: bytes) -> None:
        kind, job_id, _ = decode_event(data)
        if kind == EVENT_PROGRESS:
            heard.append(job_id)
            announced.set()

    @server.task(queue=queue_name)
    async def work() -> None:
        await current_job().set_progress(0.5, "half")
        with anyio.fail_after(TIMEOUT):
            await announced.wait()

    async with server, broker.subscribe(FINISHED_CHANNEL, on_event), running(server):
        handle = await work.enqueue()
        await handle.result(timeout=TIMEOUT)
    assert heard[0] == handle.id


async def test_counts_refuses_a_bad_queue_name(broker: Broker, results: Results) -> None:
    from tasqueue_anyio import InvalidInputError

    async with Server(broker=broker, results=results) as server:
        with pytest.raises(InvalidInputError):
            await server.counts("bad queue")
