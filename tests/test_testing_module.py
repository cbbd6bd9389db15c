"""tasqueue_anyio.testing: worker() and drain(), on every backend and both AnyIO backends."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT

from tasqueue_anyio import Client, Server
from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.testing import drain, worker

pytestmark = pytest.mark.anyio


async def test_worker_opens_runs_and_closes(broker: Broker, results: Results, queue_name: str) -> None:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue_name)
    async def double(x: int) -> int:
        return 2 * x

    async with worker(server) as running:
        assert running is server
        assert await (await double.enqueue(21)).result(timeout=TIMEOUT) == 42
    assert server._exit_stack is None  # closed: it opened it
    async with server:  # an open server stays open
        async with worker(server):
            assert await (await double.enqueue(1)).result(timeout=TIMEOUT) == 2
        assert server._exit_stack is not None


async def test_drain_runs_the_jobs_and_their_follow_ups(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[int] = []

    @server.task(queue=queue_name)
    async def step(x: int) -> int:
        ran.append(x)
        if x < 3:
            await step.enqueue(x + 1)  # enqueued by a job while draining
        return x

    async with server:
        first = await step.enqueue(0)
        later = await step.options(delay=0.2).enqueue(10)
        await drain(server, timeout=TIMEOUT)
        assert sorted(ran) == [0, 1, 2, 3, 10]
        assert (await server.counts(queue_name)).empty
        assert await first.result(timeout=0.5) == 0
        assert await later.result(timeout=0.5) == 10


async def test_drain_while_the_workers_run_and_from_a_client(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    release = anyio.Event()

    @server.task(queue=queue_name, concurrency=2)
    async def wait_then(x: int) -> int:
        await release.wait()
        return x

    async with worker(server), Client(broker, results) as client:
        jobs = [await client.enqueue(wait_then, i) for i in range(4)]
        with pytest.raises(TimeoutError):
            await drain(client, queues=[queue_name], timeout=0.3)  # held: not empty
        release.set()
        await drain(client, queues=[queue_name], timeout=TIMEOUT)
        assert [await job.result(timeout=0.5) for job in jobs] == [0, 1, 2, 3]
        await drain(server, timeout=TIMEOUT)  # its workers run: it waits as a client does


async def test_drain_needs_a_queue(broker: Broker, results: Results) -> None:
    with pytest.raises(ValueError, match="no queue"):
        await drain(Client(broker, results))
