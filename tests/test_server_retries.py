"""Retries, backoff, timeouts and scheduled (ETA / delay) jobs on a worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import anyio.from_thread
import pytest
from server_support import TIMEOUT, Counter, noop, running, wait_event
from shim_support import ShimBroker, ShimDelivery, run_with_a_failed_retry_ack

from tasqueue_anyio import (
    Backoff,
    InvalidInputError,
    Job,
    JobContext,
    JobMessage,
    JobTimeoutError,
    LeaseLostError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Delivery, Envelope, Results

pytestmark = pytest.mark.anyio


# -- retries ---------------------------------------------------------------------------------


async def test_retries_exhausted_runs_max_retries_plus_one_times(
    broker: Broker, results: Results, queue_name: str
) -> None:
    runs: list[int] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        raise ValueError(f"always fails (run {len(runs)})")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=2))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert job_id in await server.get_failed()

    assert runs == [0, 1, 2]
    assert done.status is Status.FAILED
    assert done.meta.retried == 2
    assert done.meta.max_retries == 2
    assert done.meta.prev_error == "ValueError: always fails (run 3)"


async def test_fail_once_then_succeed(broker: Broker, results: Results, queue_name: str) -> None:
    runs: list[int] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        if len(runs) == 1:
            raise ValueError("transient")
        await ctx.save(b"second time lucky")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=3))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert await server.get_result(job_id) == b"second time lucky"
        assert job_id in await server.get_success()
        assert job_id not in await server.get_failed()

    assert runs == [0, 1]
    assert done.status is Status.SUCCESSFUL
    assert done.meta.retried == 1


async def test_retries_exhausted_callback_counts(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counts = {"retrying": 0, "failed": 0, "success": 0}
    failed_called = anyio.Event()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        raise ValueError("nope")

    def on_retrying(ctx: JobContext, exc: BaseException) -> None:
        counts["retrying"] += 1

    def on_failed(ctx: JobContext, exc: BaseException) -> None:
        counts["failed"] += 1
        failed_called.set()

    def on_success(ctx: JobContext) -> None:
        counts["success"] += 1

    async with Server(broker=broker, results=results) as server:
        server.register_task(
            "t",
            handler,
            queue=queue_name,
            concurrency=1,
            on_retrying=on_retrying,
            on_failed=on_failed,
            on_success=on_success, raw=True,
        )
        server.register_task("marker", noop, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, max_retries=2))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(failed_called)
            # a marker job behind it on the same single processor: a stray extra run or
            # callback of the first job would have happened by the time the marker ends
            marker = await server.enqueue(Job("marker", queue=queue_name))
            assert (await server.wait(marker, timeout=TIMEOUT)).status is Status.SUCCESSFUL

    assert done.status is Status.FAILED
    assert counts == {"retrying": 2, "failed": 1, "success": 0}


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_delay_is_exponential_and_capped() -> None:
    backoff = Backoff(initial=0.5, factor=3.0, maximum=10.0, jitter=False)
    assert [backoff.delay(n) for n in range(5)] == [0.5, 1.5, 4.5, 10.0, 10.0]
    assert backoff.delay(10_000) == 10.0  # no OverflowError
    default = Backoff(jitter=False)
    assert [default.delay(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert default.delay(100) == 300.0


def test_backoff_jitter_stays_within_half_to_full() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, maximum=6.0, jitter=True)
    for retry in range(6):
        base = min(6.0, 2.0**retry)
        delays = [backoff.delay(retry) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays), (retry, min(delays), max(delays))
        # it really is random: not one fixed value
        assert len(set(delays)) > 1


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"factor": -1}, {"maximum": 0}])
def test_backoff_invalid_values_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        Backoff(**kwargs)


async def test_backoff_delays_the_retry(broker: Broker, results: Results, queue_name: str) -> None:
    failed_at: list[float] = []
    started_at: list[float] = []
    scheduled: list[JobMessage] = []
    retrying_seen = anyio.Event()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        started_at.append(anyio.current_time())
        if len(started_at) == 1:
            failed_at.append(anyio.current_time())
            raise ValueError("try again later")

    def on_retrying(ctx: JobContext, exc: BaseException) -> None:
        retrying_seen.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, on_retrying=on_retrying, raw=True)
        job = Job("t", queue=queue_name, max_retries=1, backoff=Backoff(initial=0.3, jitter=False))
        job_id = await server.enqueue(job)
        async with running(server):
            await wait_event(retrying_seen)
            scheduled = await server.get_scheduled(queue_name)
            waiting = await server.get_job(job_id)
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert [m.id for m in scheduled] == [job_id]
    assert scheduled[0].meta.retried == 1
    assert scheduled[0].meta.eta is not None
    assert waiting.status is Status.RETRYING
    assert done.status is Status.SUCCESSFUL
    assert len(started_at) == 2
    # the lower bound only (1 ms allowed for wall clock vs. monotonic clock)
    assert started_at[1] - failed_at[0] >= 0.3 - 0.001


async def test_a_message_of_a_failed_try_that_comes_back_is_dropped(
    broker: Broker, results: Results, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that enqueued a retry and then lost the ack of the failed try's message
    delivers that message again: it must not run beside the retry (the job runs once per
    try), and it is acknowledged, not left to come back."""
    caplog.set_level(logging.INFO, logger="tasqueue_anyio")
    runs: list[int] = []
    retrying_seen = anyio.Event()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        if ctx.meta.retried == 0:
            raise ValueError("try again later")

    def on_retrying(ctx: JobContext, exc: BaseException) -> None:
        retrying_seen.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, on_retrying=on_retrying, raw=True)
        job = Job("t", queue=queue_name, max_retries=1, backoff=Backoff(initial=1.0, jitter=False))
        job_id = await server.enqueue(job)
        first_try = (await results.get_job(job_id)).data  # the message as enqueued
        async with running(server):
            await wait_event(retrying_seen)
            # the failed try's message again, while its retry waits for its backoff
            await broker.enqueue_many([Envelope(queue=queue_name, data=first_try, id="again")])
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert await broker.get_pending(queue_name) == []

    assert done.status is Status.SUCCESSFUL
    assert runs == [0, 1]
    dropped = [r for r in caplog.records if "came back after the job moved on" in r.getMessage()]
    assert len(dropped) == 1


@pytest.mark.parametrize("fault", ["connection", "lease"])
async def test_a_retry_whose_ack_failed_still_runs(
    broker: Broker, results: Results, queue_name: str, fault: str
) -> None:
    """The failed try's ack carries its retry; when that ack fails after the job was
    recorded ``retrying``, the message of the failed try comes back: it must enqueue
    the retry (which its ack did not), not just be dropped, or the job stays
    ``retrying`` with nothing queued."""
    failed, done, runs = await run_with_a_failed_retry_ack(broker, results, queue_name, fault)
    assert len(failed) == 1
    assert done.status is Status.SUCCESSFUL
    assert runs == [0, 1]


class _FirstAttempt(ShimDelivery):
    """A delivery that says it is the first, whatever the broker counted (as JetStream
    may after a server crash: a message delivered again with the same count); it sets
    its event in ``acked`` (one per delivery, in delivery order) once acked."""

    __slots__ = ("acked", "number")

    def __init__(self, inner: Delivery, acked: list[anyio.Event]) -> None:
        super().__init__(inner)
        self.acked = acked
        self.number = len(acked)
        acked.append(anyio.Event())

    @property
    def attempt(self) -> int:
        return 1

    async def ack(
        self, *, enqueue: Sequence[Envelope] = (), announce: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        await super().ack(enqueue=enqueue, announce=announce)
        self.acked[self.number].set()


async def test_two_runs_of_one_try_with_one_attempt_record_one_outcome(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A message handed out a second time with the same attempt while its first run
    still goes on: the second run fences the first (run tokens are unique per run), so
    the first run's save and end, made while the second runs, are refused, and the
    second run's outcome is the one recorded."""
    started = [anyio.Event(), anyio.Event()]
    release = [anyio.Event(), anyio.Event()]
    saves: list[tuple[int, BaseException | None]] = []
    acked: list[anyio.Event] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        run = sum(event.is_set() for event in started)
        assert ctx.meta.attempt == 1
        started[run].set()
        await release[run].wait()
        try:
            await ctx.save(f"run {run}".encode())
        except LeaseLostError as exc:
            saves.append((run, exc))
            raise
        saves.append((run, None))

    shim = ShimBroker(broker, lambda delivery: _FirstAttempt(delivery, acked))
    async with shim, Server(broker=shim, results=results) as server:
        server.register_task("t", handler, queue=queue_name, concurrency=2, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        message = (await results.get_job(job_id)).data
        async with running(server):
            await wait_event(started[0])
            # the same message again (a copy: the broker still holds the first one)
            await broker.enqueue(Envelope(queue=queue_name, data=message, id="again"))
            await wait_event(started[1])
            release[0].set()  # the first run ends while the second runs
            await wait_event(acked[0])  # (each delivery's event exists once it runs)
            release[1].set()
            done = await server.wait(job_id, timeout=TIMEOUT)
            await wait_event(acked[1])
        assert await server.get_result(job_id) == b"run 1"
        assert await server.get_success() == [job_id]
        assert await broker.get_pending(queue_name) == []

    assert done.status is Status.SUCCESSFUL
    assert [(run, type(exc)) for run, exc in saves] == [(0, LeaseLostError), (1, type(None))]


# -- timeouts --------------------------------------------------------------------------------


async def test_timeout_stops_the_handler(broker: Broker, results: Results, queue_name: str) -> None:
    started = anyio.Event()
    stopped = anyio.Event()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        started.set()
        try:
            await anyio.sleep(3600)
        finally:
            stopped.set()

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, timeout=0.2))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert started.is_set()
    assert stopped.is_set()
    assert done.status is Status.FAILED
    assert done.meta.prev_error is not None
    assert "JobTimeoutError" in done.meta.prev_error
    assert "0.2" in done.meta.prev_error


async def test_timeout_is_retried(broker: Broker, results: Results, queue_name: str) -> None:
    runs: list[int] = []
    stops: list[int] = []
    errors: list[BaseException] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        try:
            await anyio.sleep(3600)
        finally:
            stops.append(ctx.meta.retried)

    def on_retrying(ctx: JobContext, exc: BaseException) -> None:
        errors.append(exc)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, on_retrying=on_retrying, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, timeout=0.2, max_retries=1))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)

    assert runs == [0, 1]
    assert stops == [0, 1]
    assert len(errors) == 1
    assert isinstance(errors[0], JobTimeoutError)
    assert done.status is Status.FAILED
    assert done.meta.retried == 1
    assert done.meta.prev_error is not None
    assert "JobTimeoutError" in done.meta.prev_error


async def test_timeout_of_a_sync_handler_fails_the_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A thread cannot be interrupted: with ``abandon_on_cancel=True`` the job still ends
    at its timeout (the thread is abandoned and finishes on its own, told to stop)."""
    release = threading.Event()
    started = anyio.Event()
    told: list[bool] = []

    def handler(payload: bytes, ctx: JobContext) -> None:
        anyio.from_thread.run_sync(started.set)
        release.wait(TIMEOUT)
        told.append(ctx.cancelled)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, abandon_on_cancel=True, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name, timeout=0.2))
        try:
            async with running(server):
                done = await server.wait(job_id, timeout=TIMEOUT)
                assert told == []  # the job ended while its thread still runs
        finally:
            release.set()
    assert started.is_set()
    assert done.status is Status.FAILED
    assert done.meta.prev_error is not None
    assert "JobTimeoutError" in done.meta.prev_error


# -- ETA and delay ---------------------------------------------------------------------------


async def test_eta_job_runs_no_earlier_than_its_eta(
    broker: Broker, results: Results, queue_name: str
) -> None:
    ran_at: list[datetime] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        ran_at.append(datetime.now(timezone.utc))

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        eta = datetime.now(timezone.utc) + timedelta(seconds=0.2)
        job_id = await server.enqueue(Job("t", queue=queue_name, eta=eta))
        assert [m.id for m in await server.get_scheduled(queue_name)] == [job_id]
        assert await server.get_pending(queue_name) == []
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
    assert done.status is Status.SUCCESSFUL
    assert len(ran_at) == 1
    assert ran_at[0] >= eta - timedelta(milliseconds=1)


async def test_delayed_job_runs_after_its_delay(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, raw=True)
        start = anyio.current_time()
        job_id = await server.enqueue(Job("t", b"later", queue=queue_name, delay=0.2))
        async with running(server):
            done = await server.wait(job_id, timeout=2)
        assert await server.get_dead_letters(queue_name) == []
    assert done.status is Status.SUCCESSFUL
    assert counter.payloads == [b"later"]
    assert anyio.current_time() - start >= 0.2 - 0.001
