"""Cancellation, shutdown, graceful stop and dead letters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgpack
import pytest
from anyio.abc import TaskStatus
from server_support import TIMEOUT, Counter, noop, running, wait_event

from tasqueue_anyio import (
    Backoff,
    Job,
    JobContext,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Envelope, Results

pytestmark = pytest.mark.anyio


class Blocker:
    """A handler that signals it started and then blocks until released (or cancelled),
    recording whether its ``finally`` ran."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.stopped = anyio.Event()
        self.attempts: list[int] = []
        self.finished = 0

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.attempts.append(ctx.meta.attempt)
        self.started.set()
        try:
            await self.release.wait()
            self.finished += 1
        finally:
            self.stopped.set()


# -- cancel a queued job -----------------------------------------------------------------------


async def test_cancel_queued_job_never_runs(
    broker: Broker, results: Results, queue_name: str
) -> None:
    cancelled_handler = Counter()
    marker = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("victim", cancelled_handler, queue=queue_name, concurrency=1, raw=True)
        server.register_task("marker", marker, queue=queue_name, raw=True)
        victim_id = await server.enqueue(Job("victim", queue=queue_name))
        marker_id = await server.enqueue(Job("marker", queue=queue_name))

        assert await server.cancel(victim_id) is Status.CANCELLED
        assert (await server.get_job(victim_id)).status is Status.CANCELLED
        # cancelling again changes nothing
        assert await server.cancel(victim_id) is Status.CANCELLED
        # wait() on it returns at once
        with anyio.fail_after(1):
            assert (await server.wait(victim_id)).status is Status.CANCELLED

        async with running(server):
            # one processor, first in first out: the victim's message is handled first
            assert (await server.wait(marker_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL

        assert cancelled_handler.count == 0
        assert marker.count == 1
        assert (await server.get_job(victim_id)).status is Status.CANCELLED
        assert victim_id not in await server.get_success()
        assert victim_id not in await server.get_failed()
        # its message was settled, not left on the queue
        assert await server.get_pending(queue_name) == []


async def test_cancel_queued_job_before_another_worker_starts(
    broker: Broker, results: Results, queue_name: str
) -> None:
    cancelled_handler = Counter()
    marker = Counter()
    async with Server(broker=broker, results=results) as producer:
        victim_id = await producer.enqueue(Job("victim", queue=queue_name))
        marker_id = await producer.enqueue(Job("marker", queue=queue_name))
        assert await producer.cancel(victim_id) is Status.CANCELLED

        async with Server(broker=broker, results=results) as worker:
            worker.register_task("victim", cancelled_handler, queue=queue_name, concurrency=1, raw=True)
            worker.register_task("marker", marker, queue=queue_name, raw=True)
            async with running(worker):
                done = await producer.wait(marker_id, timeout=TIMEOUT)
                assert done.status is Status.SUCCESSFUL
            assert (await worker.get_job(victim_id)).status is Status.CANCELLED

    assert cancelled_handler.count == 0
    assert marker.count == 1


# -- cancel a running job ----------------------------------------------------------------------


async def test_cancel_running_job(broker: Broker, results: Results, queue_name: str) -> None:
    blocker = Blocker()
    follow_up = Counter()
    success_calls: list[str] = []
    failed_calls: list[str] = []

    def on_success(ctx: JobContext) -> None:
        success_calls.append(ctx.job_id)

    def on_failed(ctx: JobContext, exc: BaseException) -> None:
        failed_calls.append(ctx.job_id)

    async with Server(broker=broker, results=results) as server:
        server.register_task(
            "block",
            blocker,
            queue=queue_name,
            concurrency=1,
            on_success=on_success,
            on_failed=on_failed, raw=True,
        )
        server.register_task("follow", follow_up, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        on_success_job = Job("follow", b"after success", queue=queue_name)
        on_error_job = Job("follow", b"after error", queue=queue_name)
        job_id = await server.enqueue(
            Job(
                "block",
                queue=queue_name,
                max_retries=3,  # a cancel is not a failure: no retry either
                on_success=[on_success_job],
                on_error=[on_error_job],
            )
        )
        async with running(server):
            await wait_event(blocker.started)
            assert await server.cancel(job_id) is Status.PROCESSING
            done = await server.wait(job_id, timeout=TIMEOUT)
            assert blocker.stopped.is_set()
            # a sentinel behind it on the single processor: anything the cancelled job
            # would still enqueue or run has had its chance by the time it ends
            sentinel = await server.enqueue(Job("sentinel", queue=queue_name))
            await server.wait(sentinel, timeout=TIMEOUT)

        for follow_up_id in (on_success_job.id, on_error_job.id):
            with pytest.raises(JobNotFoundError):
                await server.get_job(follow_up_id)
        assert job_id not in await server.get_success()
        assert job_id not in await server.get_failed()

    assert done.status is Status.CANCELLED
    assert done.meta.retried == 0
    assert blocker.finished == 0
    assert blocker.attempts == [1]
    assert success_calls == []
    assert failed_calls == []
    assert follow_up.count == 0


async def test_cancel_running_job_from_another_server(
    broker: Broker, results: Results, queue_name: str
) -> None:
    blocker = Blocker()
    async with Server(broker=broker, results=results) as worker:
        worker.register_task("block", blocker, queue=queue_name, raw=True)
        async with running(worker):
            async with Server(broker=broker, results=results) as producer:
                job_id = await producer.enqueue(Job("block", queue=queue_name))
                await wait_event(blocker.started)
                # the producer runs nothing itself: only the broadcast reaches the worker
                assert producer.get_tasks() == []
                assert await producer.cancel(job_id) is Status.PROCESSING
                done = await producer.wait(job_id, timeout=TIMEOUT)
            assert blocker.stopped.is_set()

    assert done.status is Status.CANCELLED
    assert blocker.finished == 0


async def test_cancel_job_waiting_for_its_retry(
    broker: Broker, results: Results, queue_name: str
) -> None:
    runs: list[int] = []
    retrying = anyio.Event()
    marker = Counter()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        raise ValueError("fails, to be retried in 0.2 s")

    def on_retrying(ctx: JobContext, exc: BaseException) -> None:
        retrying.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task(
            "t", handler, queue=queue_name, concurrency=1, on_retrying=on_retrying, raw=True
        )
        server.register_task("marker", marker, queue=queue_name, raw=True)
        job = Job(
            "t", queue=queue_name, max_retries=3, backoff=Backoff(initial=0.2, jitter=False)
        )
        async with running(server):
            job_id = await server.enqueue(job)
            await wait_event(retrying)
            assert (await server.get_job(job_id)).status is Status.RETRYING
            assert await server.cancel(job_id) is Status.CANCELLED
            # due after the retry: one processor handles the retry's message first
            marker_id = await server.enqueue(Job("marker", queue=queue_name, delay=0.4))
            assert (await server.wait(marker_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            done = await server.get_job(job_id)
            assert await server.get_scheduled(queue_name) == []

    assert runs == [0]
    assert done.status is Status.CANCELLED
    assert marker.count == 1


async def test_cancel_finished_job_leaves_it(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async def handler(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"kept")
        if payload == b"fail":
            raise ValueError("failed on purpose")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        ok_id = await server.enqueue(Job("t", b"ok", queue=queue_name))
        bad_id = await server.enqueue(Job("t", b"fail", queue=queue_name))
        async with running(server):
            ok = await server.wait(ok_id, timeout=TIMEOUT)
            bad = await server.wait(bad_id, timeout=TIMEOUT)

        assert await server.cancel(ok_id) is Status.SUCCESSFUL
        assert await server.cancel(bad_id) is Status.FAILED
        assert await server.get_job(ok_id) == ok
        assert await server.get_job(bad_id) == bad
        assert await server.get_result(ok_id) == b"kept"
        assert ok_id in await server.get_success()
        assert bad_id in await server.get_failed()


async def test_cancel_unknown_job_raises(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        with pytest.raises(JobNotFoundError):
            await server.cancel("no-such-job-id")


# -- shutdown and graceful stop ----------------------------------------------------------------


async def test_shutdown_gives_the_running_job_back(
    broker: Broker, results: Results, queue_name: str
) -> None:
    first = Blocker()
    async with Server(broker=broker, results=results) as worker_a:
        worker_a.register_task("t", first, queue=queue_name, raw=True)
        async with anyio.create_task_group() as tg:
            await tg.start(worker_a.run)
            job_id = await worker_a.enqueue(Job("t", b"work", queue=queue_name))
            await wait_event(first.started)
            tg.cancel_scope.cancel()  # shutdown: not an outcome for the job
        assert first.stopped.is_set()
        assert first.finished == 0
        state = await worker_a.get_job(job_id)
        assert state.status is Status.QUEUED
        assert not state.status.is_final

    second = Counter()
    async with Server(broker=broker, results=results) as worker_b:
        worker_b.register_task("t", second, queue=queue_name, raw=True)
        async with running(worker_b):
            done = await worker_b.wait(job_id, timeout=TIMEOUT)

    assert done.status is Status.SUCCESSFUL
    assert second.payloads == [b"work"]
    assert done.meta.attempt == 2
    assert done.meta.retried == 0  # a redelivery is not a retry


async def test_graceful_stop_lets_the_running_job_finish(
    broker: Broker, results: Results, queue_name: str
) -> None:
    blocker = Blocker()
    run_returned = anyio.Event()

    async with Server(broker=broker, results=results) as server:

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            await server.run(task_status=task_status)
            run_returned.set()

        server.register_task("t", blocker, queue=queue_name, raw=True)
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            job_id = await server.enqueue(Job("t", queue=queue_name))
            await wait_event(blocker.started)
            server.stop(grace=5)
            later_id = await server.enqueue(Job("t", b"later", queue=queue_name))
            # within the grace period the job keeps running (this sleep checks that
            # nothing happens; it does not wait for anything to happen)
            await anyio.sleep(0.1)
            assert not blocker.stopped.is_set()
            assert (await server.get_job(job_id)).status is Status.PROCESSING
            assert not run_returned.is_set()
            blocker.release.set()
            await wait_event(run_returned)
        done = await server.get_job(job_id)
        later = await server.get_job(later_id)
        pending = await server.get_pending(queue_name)

    assert done.status is Status.SUCCESSFUL
    assert blocker.finished == 1
    # a stopped worker takes no new job
    assert blocker.attempts == [1]
    assert later.status is Status.QUEUED
    assert [m.id for m in pending] == [later_id]


async def test_graceful_stop_grace_expired_gives_the_job_back(
    broker: Broker, results: Results, queue_name: str
) -> None:
    blocker = Blocker()
    run_returned = anyio.Event()

    async with Server(broker=broker, results=results) as server:

        async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            await server.run(task_status=task_status)
            run_returned.set()

        server.register_task("t", blocker, queue=queue_name, raw=True)
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            job_id = await server.enqueue(Job("t", b"slow", queue=queue_name))
            await wait_event(blocker.started)
            start = anyio.current_time()
            server.stop(grace=0.1)
            await wait_event(run_returned)
            stopped_after = anyio.current_time() - start
        assert blocker.stopped.is_set()
        assert blocker.finished == 0
        assert (await server.get_job(job_id)).status is Status.QUEUED
        assert [m.id for m in await server.get_pending(queue_name)] == [job_id]

        # and it is not lost: the next run completes it
        blocker.release.set()
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert stopped_after >= 0.1 - 0.001
    assert done.status is Status.SUCCESSFUL
    assert blocker.attempts == [1, 2]


async def test_stop_before_run_takes_effect_when_run_starts(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        server.stop(grace=1)  # not running yet: the next run() stops as it starts
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)  # reports started, takes no job, returns
        assert counter.count == 0
        assert (await server.get_job(job_id)).status is Status.QUEUED
        # that stop was used up by that run(): the next one runs the job
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.SUCCESSFUL
        assert counter.count == 1


# -- undecodable messages ------------------------------------------------------------------------


def _garbage() -> bytes:
    return b"\x00garbage"


def _wrong_version() -> bytes:
    data = msgpack.unpackb(
        Server()._new_message(Job("t", b"x"))[1], raw=False
    )
    if isinstance(data, dict):
        data["v"] = 99
    else:
        data[0] = 99
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def _wrong_schema_map() -> bytes:
    packed: bytes = msgpack.packb({"v": 99, "meta": {}, "job": {}}, use_bin_type=True)
    return packed


def _oversize() -> bytes:
    # valid for a server with default limits, too big for the worker below
    return Server()._new_message(Job("t", b"x" * 70_000))[1]


BAD_MESSAGES: dict[str, tuple[Callable[[], bytes], str]] = {
    "garbage": (_garbage, ""),
    "wrong-version": (_wrong_version, "version"),
    "wrong-schema-map": (_wrong_schema_map, ""),
    "oversize": (_oversize, "limit"),
}


@pytest.mark.parametrize("kind", list(BAD_MESSAGES))
async def test_undecodable_message_dead_lettered_and_queue_keeps_going(
    broker: Broker, results: Results, queue_name: str, kind: str
) -> None:
    make, reason_word = BAD_MESSAGES[kind]
    bad = make()
    counter = Counter()
    kwargs: dict[str, Any] = {}
    if kind == "oversize":
        kwargs = {"max_payload_size": 1024, "max_message_size": 1}
    async with Server(broker=broker, results=results, **kwargs) as server:
        assert len(bad) > server.max_message_size or kind != "oversize"
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        await broker.enqueue(Envelope(queue=queue_name, data=bad, id=f"bad-{kind}"))
        good_id = await server.enqueue(Job("t", b"good", queue=queue_name))
        async with running(server):
            done = await server.wait(good_id, timeout=TIMEOUT)
        dead = await server.get_dead_letters(queue_name)
        pending = await server.get_pending(queue_name)

    assert done.status is Status.SUCCESSFUL
    assert counter.payloads == [b"good"]
    assert len(dead) == 1
    assert dead[0].data == bad
    assert dead[0].queue == queue_name
    assert dead[0].reason
    assert reason_word in dead[0].reason
    assert pending == []


# -- job-end events --------------------------------------------------------------------------


async def test_job_end_events_reach_only_servers_that_wait(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A worker that never waits does not read the end event of every job; the first
    ``wait()`` subscribes it, and ends reach it from then on."""
    from tasqueue_anyio._codec import EVENT_FINISHED, decode_event

    seen: list[tuple[str, str]] = []
    fourth_seen = anyio.Event()
    async with Server(broker=broker, results=results) as producer:
        worker = Server(broker=broker, results=results)
        forward = worker._on_event

        def record(data: bytes) -> None:
            kind, job_id, _ = decode_event(data)
            seen.append((kind, job_id))
            if (kind, job_id) == (EVENT_FINISHED, "fourth"):
                fourth_seen.set()
            forward(data)

        worker._on_event = record  # type: ignore[method-assign]
        worker.register_task("noop", noop, queue=queue_name, concurrency=1, raw=True)
        async with worker, running(worker):
            ids = [await producer.enqueue(Job("noop", queue=queue_name)) for _ in range(3)]
            for job_id in ids:
                assert (await producer.wait(job_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            assert [e for e in seen if e[0] == EVENT_FINISHED] == []
            # the worker's own first wait subscribes it
            assert (await worker.wait(ids[-1], timeout=TIMEOUT)).status is Status.SUCCESSFUL
            await producer.enqueue(Job("noop", queue=queue_name, id="fourth"))
            await wait_event(fourth_seen)
            assert (await worker.wait("fourth", timeout=TIMEOUT)).status is Status.SUCCESSFUL
