"""A sync handler's thread does not outlive its run, nor ``run()`` (issue 11, hole 6).

A thread cannot be interrupted: a timeout, cancel request or shutdown sets the job's
cancel token (``ctx.cancelled``, ``ctx.check_cancelled()``) and waits for the thread; the
run's end is recorded, and its retry enqueued, once the thread has returned. ``run()``
returns once its threads have ended, or after the shutdown's ``finalize_timeout``. A task
registered with ``abandon_on_cancel=True`` keeps the old way (the thread is left to
finish on its own). On asyncio and Trio; memory backends, one test on Redis too.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import anyio
import anyio.from_thread
import pytest
from server_support import TIMEOUT, running, wait_event

from tasqueue_anyio import Job, JobCancelledError, JobContext, Server, Status
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio

#: most tests here need no networked backend
memory_only = pytest.mark.parametrize("backend_name", ["memory"])


class Overlap:
    """Counts a handler's runs and the most of them that ran at once (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs = 0
        self.running = 0
        self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.runs += 1
            self.running += 1
            self.most = max(self.most, self.running)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        with self.lock:
            self.running -= 1


@pytest.mark.parametrize("backend_name", ["memory", "redis"])
async def test_timed_out_sync_handler_is_waited_for_before_its_retry(
    broker: Broker, results: Results, queue_name: str
) -> None:
    overlap = Overlap()

    def handler(payload: bytes, ctx: JobContext) -> None:
        with overlap:
            time.sleep(0.5)  # ignores its cancel token: runs on past its 0.2 s timeout

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, timeout=0.2, max_retries=2))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            assert overlap.running == 0  # its end was recorded after its thread returned

    assert overlap.runs == 3
    assert overlap.most == 1  # a retry never started while the thread of a try ran
    assert done.status is Status.FAILED
    assert done.meta.retried == 2
    assert done.meta.prev_error is not None
    assert done.meta.prev_error.startswith("JobTimeoutError")


@memory_only
async def test_sync_handler_stops_on_its_cancel_token_at_its_timeout(
    broker: Broker, results: Results, queue_name: str
) -> None:
    overlap = Overlap()
    stopped: list[bool] = []

    def handler(payload: bytes, ctx: JobContext) -> None:
        with overlap:
            assert not ctx.cancelled
            ctx.check_cancelled()  # not cancelled: returns
            while not ctx.cancelled:
                time.sleep(0.01)
            try:
                ctx.check_cancelled()
            except JobCancelledError:
                stopped.append(True)
                raise

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, timeout=0.2, max_retries=2))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert overlap.runs == 3
    assert overlap.most == 1
    assert stopped == [True, True, True]
    assert done.status is Status.FAILED
    assert done.meta.prev_error is not None
    assert done.meta.prev_error.startswith("JobTimeoutError")  # the cause, not the unwinding


@memory_only
async def test_cancel_request_sets_a_sync_handlers_cancel_token(
    broker: Broker, results: Results, queue_name: str
) -> None:
    overlap = Overlap()
    started = anyio.Event()

    def handler(payload: bytes, ctx: JobContext) -> None:
        with overlap:
            anyio.from_thread.run_sync(started.set)
            while not ctx.cancelled:
                time.sleep(0.01)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=2))
        async with running(server):
            await wait_event(started)
            assert await server.cancel(job_id) is Status.PROCESSING
            done = await server.wait(job_id, timeout=TIMEOUT)
            assert overlap.running == 0

    assert done.status is Status.CANCELLED
    assert overlap.runs == 1


@memory_only
async def test_run_returns_after_its_sync_handler_threads_end(
    broker: Broker, results: Results, queue_name: str
) -> None:
    started = anyio.Event()
    ended = threading.Event()

    def handler(payload: bytes, ctx: JobContext) -> None:
        anyio.from_thread.run_sync(started.set)
        while not ctx.cancelled:  # the shutdown sets it
            time.sleep(0.01)
        time.sleep(0.1)  # a slow clean-up
        ended.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            await wait_event(started)
        # run() was cancelled and has returned
        assert ended.is_set()
        # shutdown is not an outcome: the job was handed back
        assert (await server.get_job(job_id)).status is Status.QUEUED


@memory_only
async def test_run_waits_for_a_thread_at_most_finalize_timeout(
    broker: Broker, results: Results, queue_name: str
) -> None:
    started = anyio.Event()
    release = threading.Event()
    ended = threading.Event()

    def handler(payload: bytes, ctx: JobContext) -> None:
        anyio.from_thread.run_sync(started.set)
        release.wait(TIMEOUT)  # ignores its cancel token
        ended.set()

    async with Server(broker=broker, results=results, finalize_timeout=0.2) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        await server.enqueue(Job("t", queue=queue_name))
        try:
            with anyio.fail_after(TIMEOUT):
                async with running(server):
                    await wait_event(started)
            assert not ended.is_set()  # run() returned without it, past finalize_timeout
        finally:
            release.set()
