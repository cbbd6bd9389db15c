"""A job's life on a worker: statuses, callbacks, results, unknown tasks, id collisions,
follow-up jobs."""

from __future__ import annotations

import logging
import threading
from typing import Any
from uuid import uuid4

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from server_support import TIMEOUT, noop, running, wait_event

from tasqueue_anyio import (
    BrokerError,
    Chain,
    ChainMessage,
    Group,
    GroupMessage,
    InvalidInputError,
    Job,
    JobContext,
    JobMessage,
    JobNotFoundError,
    Meta,
    ResultNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


# -- statuses --------------------------------------------------------------------------------


async def test_status_queued_then_processing_then_successful(
    broker: Broker, results: Results, queue_name: str
) -> None:
    seen: list[JobMessage] = []

    async with Server(broker=broker, results=results) as server:

        async def handler(payload: bytes, ctx: JobContext) -> None:
            seen.append(await server.get_job(ctx.job_id))

        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", b"x", queue=queue_name))
        queued = await server.get_job(job_id)
        assert queued.status is Status.QUEUED
        assert queued.meta.processed_at is None
        assert (queued.job.task, queued.job.payload, queued.meta.queue) == ("t", b"x", queue_name)

        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert len(seen) == 1
    assert seen[0].status is Status.PROCESSING
    assert seen[0].meta.processed_at is not None
    assert seen[0].meta.attempt == 1
    assert done.status is Status.SUCCESSFUL
    assert done.meta.retried == 0
    assert done.meta.prev_error is None


async def test_status_failed(broker: Broker, results: Results, queue_name: str) -> None:
    async def handler(payload: bytes, ctx: JobContext) -> None:
        raise ValueError("it went wrong")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.FAILED
        assert done.meta.prev_error == "ValueError: it went wrong"
        assert done.meta.retried == 0
        assert job_id in await server.get_failed()
        assert job_id not in await server.get_success()


async def test_status_retrying_is_visible(
    broker: Broker, results: Results, queue_name: str
) -> None:
    during_retry: list[JobMessage] = []
    second_run: list[Meta] = []

    async with Server(broker=broker, results=results) as server:

        async def handler(payload: bytes, ctx: JobContext) -> None:
            if ctx.meta.retried == 0:
                raise RuntimeError("first failure")
            second_run.append(ctx.meta)

        async def on_retrying(ctx: JobContext, exc: BaseException) -> None:
            # concurrency 1: the retry cannot start while this callback runs
            during_retry.append(await server.get_job(ctx.job_id))

        server.register_task("t", handler, queue=queue_name, concurrency=1, on_retrying=on_retrying, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=1))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert len(during_retry) == 1
    assert during_retry[0].status is Status.RETRYING
    assert during_retry[0].meta.retried == 1
    assert during_retry[0].meta.prev_error == "RuntimeError: first failure"
    # the second run sees the retry count and the previous error
    assert len(second_run) == 1
    assert second_run[0].status is Status.PROCESSING
    assert second_run[0].retried == 1
    assert second_run[0].prev_error == "RuntimeError: first failure"
    assert done.status is Status.SUCCESSFUL
    assert done.meta.retried == 1


# -- callbacks -------------------------------------------------------------------------------

Call = tuple[str, str, "BaseException | None"]


class Recorder:
    """Records callback calls as ``(callback, job id, exception)``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.contexts: list[JobContext] = []
        self.finished = anyio.Event()

    def _record(self, name: str, ctx: JobContext, exc: BaseException | None = None) -> None:
        self.calls.append((name, ctx.job_id, exc))
        self.contexts.append(ctx)
        if name in ("success", "failed"):
            self.finished.set()

    def callbacks(self, use_async: bool) -> dict[str, Any]:
        if use_async:

            async def a_processing(ctx: JobContext) -> None:
                await anyio.lowlevel.checkpoint()
                self._record("processing", ctx)

            async def a_success(ctx: JobContext) -> None:
                await anyio.lowlevel.checkpoint()
                self._record("success", ctx)

            async def a_retrying(ctx: JobContext, exc: BaseException) -> None:
                await anyio.lowlevel.checkpoint()
                self._record("retrying", ctx, exc)

            async def a_failed(ctx: JobContext, exc: BaseException) -> None:
                await anyio.lowlevel.checkpoint()
                self._record("failed", ctx, exc)

            return {
                "on_processing": a_processing,
                "on_success": a_success,
                "on_retrying": a_retrying,
                "on_failed": a_failed,
            }

        def s_processing(ctx: JobContext) -> None:
            self._record("processing", ctx)

        def s_success(ctx: JobContext) -> None:
            self._record("success", ctx)

        def s_retrying(ctx: JobContext, exc: BaseException) -> None:
            self._record("retrying", ctx, exc)

        def s_failed(ctx: JobContext, exc: BaseException) -> None:
            self._record("failed", ctx, exc)

        return {
            "on_processing": s_processing,
            "on_success": s_success,
            "on_retrying": s_retrying,
            "on_failed": s_failed,
        }


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_callbacks_on_success_path(
    broker: Broker, results: Results, queue_name: str, use_async: bool
) -> None:
    recorder = Recorder()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        recorder.calls.append(("handler", ctx.job_id, None))

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, **recorder.callbacks(use_async), raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(recorder.finished)

    assert done.status is Status.SUCCESSFUL
    assert recorder.calls == [
        ("processing", job_id, None),
        ("handler", job_id, None),
        ("success", job_id, None),
    ]
    assert all(ctx.meta.queue == queue_name for ctx in recorder.contexts)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_callbacks_on_retrying_and_failed_get_the_exception(
    broker: Broker, results: Results, queue_name: str, use_async: bool
) -> None:
    recorder = Recorder()
    raised: list[Exception] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        exc = ValueError(f"boom {len(raised)}")
        raised.append(exc)
        raise exc

    async with Server(broker=broker, results=results) as server:
        server.register_task(
            "t", handler, queue=queue_name, concurrency=1, **recorder.callbacks(use_async), raw=True
        )
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=1))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(recorder.finished)

    assert done.status is Status.FAILED
    assert len(raised) == 2
    assert [name for name, _, _ in recorder.calls] == [
        "processing",
        "retrying",
        "processing",
        "failed",
    ]
    assert all(call_id == job_id for _, call_id, _ in recorder.calls)
    # the very exceptions the handler raised, each to the callback of its run
    assert recorder.calls[1][2] is raised[0]
    assert recorder.calls[3][2] is raised[1]
    # each callback's context is its run's
    assert recorder.contexts[1].meta.retried == 0
    assert recorder.contexts[3].meta.retried == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("which", ["on_processing", "on_success", "on_retrying", "on_failed"])
async def test_raising_callback_is_logged_and_job_state_is_right(
    broker: Broker,
    results: Results,
    queue_name: str,
    caplog: pytest.LogCaptureFixture,
    which: str,
    use_async: bool,
) -> None:
    runs: list[int] = []
    called = anyio.Event()
    error = RuntimeError("callback exploded")

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        if which == "on_failed" or (which == "on_retrying" and ctx.meta.retried == 0):
            raise ValueError("handler failure")

    def sync_callback(*args: Any) -> None:
        called.set()
        raise error

    async def async_callback(*args: Any) -> None:
        await anyio.lowlevel.checkpoint()
        called.set()
        raise error

    callback = async_callback if use_async else sync_callback
    kwargs: dict[str, Any] = {which: callback}
    max_retries = 1 if which == "on_retrying" else 0
    expected = Status.FAILED if which == "on_failed" else Status.SUCCESSFUL

    caplog.set_level(logging.ERROR)
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, **kwargs, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=max_retries))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(called)

    assert done.status is expected
    assert runs == ([0, 1] if which == "on_retrying" else [0])
    assert done.meta.retried == max_retries
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is error]
    assert len(logged) == 1
    assert job_id in logged[0].getMessage()
    assert callback.__name__ in logged[0].getMessage()
    assert logged[0].levelno >= logging.ERROR


# -- results ---------------------------------------------------------------------------------


async def test_ctx_save_then_get_result(broker: Broker, results: Results, queue_name: str) -> None:
    async with Server(broker=broker, results=results) as server:

        @server.task("t", queue=queue_name, raw=True)
        async def handler(payload: bytes, ctx: JobContext) -> None:
            await ctx.save(b"draft")
            await ctx.save(payload[::-1])  # the last save wins

        job_id = await server.enqueue(Job("t", b"abc", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.SUCCESSFUL
        assert await server.get_result(job_id) == b"cba"


async def test_get_result_of_job_that_saved_nothing(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", noop, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        with pytest.raises(ResultNotFoundError):
            await server.get_result(job_id)  # queued, nothing saved yet
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.SUCCESSFUL
        with pytest.raises(ResultNotFoundError):
            await server.get_result(job_id)


async def test_ctx_save_refuses_non_bytes(
    broker: Broker, results: Results, queue_name: str
) -> None:
    refused: list[BaseException] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        try:
            await ctx.save("text")  # type: ignore[arg-type]
        except InvalidInputError as exc:
            refused.append(exc)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            await server.wait(job_id, timeout=TIMEOUT)
        assert len(refused) == 1
        with pytest.raises(ResultNotFoundError):
            await server.get_result(job_id)


async def test_sync_handler_runs_in_a_thread_and_can_save(
    broker: Broker, results: Results, queue_name: str
) -> None:
    loop_thread = threading.get_ident()
    handler_threads: list[int] = []

    def handler(payload: bytes, ctx: JobContext) -> None:
        handler_threads.append(threading.get_ident())
        anyio.from_thread.run(ctx.save, b"saved from a thread: " + payload)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", b"p", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.SUCCESSFUL
        assert await server.get_result(job_id) == b"saved from a thread: p"
    assert len(handler_threads) == 1
    assert handler_threads[0] != loop_thread


async def test_sync_handler_failure_is_a_failure(
    broker: Broker, results: Results, queue_name: str
) -> None:
    def handler(payload: bytes, ctx: JobContext) -> None:
        raise KeyError("missing thing")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
    assert done.status is Status.FAILED
    assert done.meta.prev_error is not None
    assert done.meta.prev_error.startswith("KeyError")


# -- unknown task, id collisions ---------------------------------------------------------------


async def test_unknown_task_fails_the_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        server.register_task("known", noop, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("unknown", queue=queue_name))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
    assert done.status is Status.FAILED
    assert done.meta.prev_error is not None
    assert "UnknownTaskError" in done.meta.prev_error
    assert "'unknown'" in done.meta.prev_error


async def test_ids_that_look_like_keys_do_not_collide(
    broker: Broker, results: Results, queue_name: str
) -> None:
    base = f"x{uuid4().hex}"
    ids = [base, f"job:msg:{base}", f"result:{base}", f"job:{base}", f"{base}:result"]

    async def handler(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"result of " + payload)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        for job_id in ids:
            await server.enqueue(Job("t", job_id.encode(), id=job_id, queue=queue_name))
        async with running(server):
            done = [await server.wait(job_id, timeout=TIMEOUT) for job_id in ids]
        for job_id, msg in zip(ids, done, strict=True):
            assert msg.status is Status.SUCCESSFUL
            assert msg.id == job_id
            assert msg.job.payload == job_id.encode()
            assert await server.get_result(job_id) == b"result of " + job_id.encode()
            assert (await server.get_job(job_id)).job.payload == job_id.encode()


# -- follow-up jobs ----------------------------------------------------------------------------


async def test_on_success_follow_up_runs_after_success(
    broker: Broker, results: Results, queue_name: str
) -> None:
    order: list[str] = []
    follow_up_ran = anyio.Event()

    async def main(payload: bytes, ctx: JobContext) -> None:
        order.append("main")

    async def follow(payload: bytes, ctx: JobContext) -> None:
        order.append("follow:" + payload.decode())
        follow_up_ran.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("main", main, queue=queue_name, raw=True)
        server.register_task("follow", follow, queue=queue_name, raw=True)
        on_success = Job("follow", b"ok", queue=queue_name)
        on_error = Job("follow", b"err", queue=queue_name)
        job_id = await server.enqueue(
            Job("main", queue=queue_name, on_success=[on_success], on_error=[on_error])
        )
        # follow-ups are not stored until their parent ends
        with pytest.raises(JobNotFoundError):
            await server.get_job(on_success.id)
        async with running(server):
            await wait_event(follow_up_ran)
            follow_done = await server.wait(on_success.id, timeout=TIMEOUT)
            assert (await server.get_job(job_id)).status is Status.SUCCESSFUL
            with pytest.raises(JobNotFoundError):
                await server.get_job(on_error.id)

    assert follow_done.status is Status.SUCCESSFUL
    assert order == ["main", "follow:ok"]


async def test_on_error_follow_up_runs_after_final_failure(
    broker: Broker, results: Results, queue_name: str
) -> None:
    order: list[str] = []
    follow_up_ran = anyio.Event()

    async def main(payload: bytes, ctx: JobContext) -> None:
        order.append(f"main:{ctx.meta.retried}")
        raise ValueError("main fails")

    async def follow(payload: bytes, ctx: JobContext) -> None:
        order.append("follow:" + payload.decode())
        follow_up_ran.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("main", main, queue=queue_name, concurrency=1, raw=True)
        server.register_task("follow", follow, queue=queue_name, raw=True)
        on_success = Job("follow", b"ok", queue=queue_name)
        on_error = Job("follow", b"err", queue=queue_name)
        job_id = await server.enqueue(
            Job(
                "main",
                queue=queue_name,
                max_retries=1,
                on_success=[on_success],
                on_error=[on_error],
            )
        )
        async with running(server):
            await wait_event(follow_up_ran)
            follow_done = await server.wait(on_error.id, timeout=TIMEOUT)
            assert (await server.get_job(job_id)).status is Status.FAILED
            with pytest.raises(JobNotFoundError):
                await server.get_job(on_success.id)

    assert follow_done.status is Status.SUCCESSFUL
    # only after the final failure, not after the retried one
    assert order == ["main:0", "main:1", "follow:err"]


async def test_retried_failures_enqueue_no_on_error(
    broker: Broker, results: Results, queue_name: str
) -> None:
    follow_ups: list[bytes] = []
    follow_up_ran = anyio.Event()
    runs: list[int] = []

    async def main(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        if len(runs) <= 2:
            raise ValueError(f"failure {len(runs)}")

    async def follow(payload: bytes, ctx: JobContext) -> None:
        follow_ups.append(payload)
        follow_up_ran.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("main", main, queue=queue_name, concurrency=1, raw=True)
        server.register_task("follow", follow, queue=queue_name, raw=True)
        on_success = Job("follow", b"ok", queue=queue_name)
        on_error = Job("follow", b"err", queue=queue_name)
        job_id = await server.enqueue(
            Job(
                "main",
                queue=queue_name,
                max_retries=2,
                on_success=[on_success],
                on_error=[on_error],
            )
        )
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(follow_up_ran)
            await server.wait(on_success.id, timeout=TIMEOUT)
            with pytest.raises(JobNotFoundError):
                await server.get_job(on_error.id)

    assert done.status is Status.SUCCESSFUL
    assert runs == [0, 1, 2]
    assert follow_ups == [b"ok"]


# -- a failed enqueue -------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["broker", "results"])
async def test_enqueue_many_that_raises_leaves_no_queued_job_behind(
    broker: Broker,
    results: Results,
    queue_name: str,
    failing: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch whose broker (or results) call fails half-way: each of its jobs has no
    state, or runs; none stays ``queued`` with no message to run it."""
    ran = anyio.Event()
    jobs = [Job("t", b"first", queue=queue_name), Job("t", b"second", queue=queue_name)]

    async def half_enqueue(messages: Any) -> None:  # stores the first message, then fails
        await type(broker).enqueue_many(broker, messages[:1])
        raise BrokerError("injected: the broker failed after one message")

    async def half_claim(records: Any) -> None:  # stores the first record, then fails
        first = next(iter(records))
        await type(results).claim_jobs(results, {first: records[first]})
        raise BrokerError("injected: the store failed after one record")

    async with Server(broker=broker, results=results) as server:

        async def handler(payload: bytes, ctx: JobContext) -> None:
            assert ctx.job_id == jobs[0].id
            ran.set()

        server.register_task("t", handler, queue=queue_name, raw=True)
        if failing == "broker":
            monkeypatch.setattr(broker, "enqueue_many", half_enqueue)
        else:
            monkeypatch.setattr(results, "claim_jobs", half_claim)
        with pytest.raises(BrokerError, match="injected"):
            await server.enqueue_many(jobs)
        monkeypatch.undo()

        for job in jobs:
            with pytest.raises(JobNotFoundError):
                await server.get_job(job.id)
        if failing == "broker":  # the first message got through: it runs
            async with running(server):
                await wait_event(ran)
                done = await server.wait(jobs[0].id, timeout=TIMEOUT)
            assert done.status is Status.SUCCESSFUL
        assert await broker.get_pending(queue_name) == []
        with pytest.raises(JobNotFoundError):
            await server.get_job(jobs[1].id)


@pytest.mark.parametrize("kind", ["group", "chain"])
async def test_group_or_chain_whose_enqueue_raises_ends_failed(
    broker: Broker, results: Results, queue_name: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The members of a group (or a chain's first link) cannot be enqueued: their records
    are forgotten, so the group or chain ends ``failed`` saying why, and waiting on it
    returns instead of waiting for members that will never run."""
    jobs = [Job("t", b"a", queue=queue_name), Job("t", b"b", queue=queue_name)]

    async def failing(messages: Any) -> None:
        raise BrokerError("injected: the broker is away")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", noop, queue=queue_name, raw=True)
        monkeypatch.setattr(broker, "enqueue_many", failing)
        enqueue = (
            server.enqueue_group(Group(jobs, id="g-" + queue_name))
            if kind == "group"
            else server.enqueue_chain(Chain(jobs, id="c-" + queue_name))
        )
        with pytest.raises(BrokerError, match="injected"):
            await enqueue
        monkeypatch.undo()
        if kind == "group":
            state: GroupMessage | ChainMessage = await server.wait_group(
                "g-" + queue_name, timeout=TIMEOUT
            )
        else:
            state = await server.wait_chain("c-" + queue_name, timeout=TIMEOUT)
    assert state.status is Status.FAILED
    assert state.error is not None
    assert "enqueue failed" in state.error
    assert "injected" in state.error
