"""The worker pipeline: per queue a consumer feeding a memory object stream and N
processors; each job runs in its own cancel scope.

Shape of :meth:`Worker.run`::

    outer task group            (run()'s caller cancels this)
    ├── watcher                 turns a cancellation of run() into an orderly shutdown
    └── shielded scope          outer cancellation does not reach the processors ...
        └── control group       ... (grace timer of a graceful stop)
            └── processors      N per queue, each job in its own CancelScope
                └── consumers   one per queue: broker.consume → memory object stream

Only a job's own scope is ever cancelled (timeout, cancel request, or shutdown), so
recording its end needs no shield of its own: the processor running it is never
cancelled while it writes, except past ``finalize_timeout`` after a shutdown began.

The worker registry: once its consumers are started, a run puts its
:class:`~tasqueue_anyio.abc.WorkerRecord` (before reporting started), then again every
``HEARTBEAT_INTERVAL`` seconds from a task of the outer group (so heartbeats go on
during a graceful stop's grace, with the jobs still in hand), each put living
``WORKER_TTL`` seconds. When ``run()`` ends, however it ends, it removes its record,
shielded, within ``HEARTBEAT_TIMEOUT``. A heartbeat or removal that fails (the store is
down) is logged, never raised: the registry is for people, not for the jobs.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from ._client import envelope
from ._codec import decode_message, encode_message, finished_event, peek_message
from ._exceptions import (
    DecodeError,
    JobCancelledError,
    JobTimeoutError,
    LeaseLostError,
    NotFoundError,
    PayloadTooLargeError,
    UnknownTaskError,
)
from ._jobs import (
    _CURRENT,
    CANCEL,
    MAX_ERROR_LENGTH,
    SHUTDOWN,
    ActiveJob,
    Job,
    JobContext,
    JobMessage,
    Meta,
    Status,
)
from ._limits import Limiter
from ._scheduler import Scheduler
from .abc import (
    _MAX_WORKER_QUEUES,
    FINAL_STATUSES,
    MAX_WORKER_JOBS,
    Delivery,
    Envelope,
    JobRecord,
    QueueLimits,
    WorkerRecord,
    run_token,
)

if TYPE_CHECKING:
    from ._client import Client
    from ._tasks import Task

__all__ = ["BURST_INTERVAL", "HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT", "WORKER_TTL", "Worker"]

_log = logging.getLogger("tasqueue_anyio.worker")

_RUNNABLE = ("queued", "retrying", "processing")
_PROCESSING = ("processing",)
_META_FIELDS = tuple(a.name for a in attrs.fields(Meta))
_new = object.__new__
_set = object.__setattr__

_CANCEL = CANCEL
_SHUTDOWN = SHUTDOWN

#: Seconds between two looks at the queues' counts of a burst run (``run(burst=True)``).
BURST_INTERVAL = 0.1
#: Seconds a running worker's record (:meth:`~tasqueue_anyio.abc.Results.put_worker`)
#: lives after its last heartbeat: how long a worker that died stays listed at most.
WORKER_TTL = 15.0
#: Seconds between two heartbeats of a running worker (a third of ``WORKER_TTL``, so one
#: or two lost heartbeats do not unlist it). Read at each pause (tests shorten it).
HEARTBEAT_INTERVAL = WORKER_TTL / 3
#: Seconds one heartbeat, or the removal of the record as ``run()`` ends, may take.
HEARTBEAT_TIMEOUT = 2.0
#: The task name of a job whose message and stored record are both unreadable, once it
#: is recorded ``failed``.
UNREADABLE_TASK = "<unreadable>"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if (
        len(described) > MAX_ERROR_LENGTH // 4
        and len(encoded := described.encode(errors="replace")) > MAX_ERROR_LENGTH
    ):
        # bounded in bytes: a job's message keeps room for this much (see _client.RUN_ROOM)
        cut = encoded[: MAX_ERROR_LENGTH - 15].decode(errors="ignore")
        described = cut + " ...[truncated]"
    return described


def _async_backend() -> str:
    """The AnyIO backend running now: ``"trio"`` or ``"asyncio"`` (told by its
    cancellation exception, AnyIO's public way to tell them apart)."""
    module = anyio.get_cancelled_exc_class().__module__
    return "trio" if module.partition(".")[0] == "trio" else "asyncio"


def _run_meta(meta: Meta, processed_at: float, attempt: int) -> Meta:
    """``meta`` as a run starts (a hand-written ``attrs.evolve``: this is the hot path)."""
    new = _new(Meta)
    for name in _META_FIELDS:
        _set(new, name, getattr(meta, name))
    _set(new, "status", Status.PROCESSING)
    _set(new, "processed_at", processed_at)
    _set(new, "attempt", attempt)
    return new


class _RunInfo:
    """What the end of a run needs to know about it: its fencing token, trace context
    and duration."""

    __slots__ = ("duration", "token", "trace")

    def __init__(self, token: str) -> None:
        #: this run's fencing token: retries so far, the delivery attempt and a nonce
        #: (see ``abc.run_token``)
        self.token = token
        self.trace: dict[str, str] | None = None
        self.duration: float | None = None



class Worker:
    """Runs the queues of a server's registered tasks (made by ``Server.run``).

    :param client: the server (its backends, codec, events and job-ending methods)
    :param tasks: the registered tasks by name
    :param queues: queue name -> concurrency
    :param burst: return once the queues are empty (see ``Server.run``)
    """

    def __init__(
        self,
        client: Client,
        tasks: Mapping[str, Task],
        queues: Mapping[str, int],
        *,
        burst: bool = False,
        limits: Mapping[str, QueueLimits] | None = None,
    ) -> None:
        self.server = client
        self.tasks = tasks
        self.queues = dict(queues)
        self.burst = burst
        self.results = client.results
        self.broker = client.broker
        self.log = client.log if getattr(client, "custom_logger", False) else _log
        self.shutting_down = False
        self._consumers_scope: anyio.CancelScope | None = None
        self._shield: anyio.CancelScope | None = None
        self._control: TaskGroup | None = None
        self._pending_stop: float | None = None
        #: when the shutdown's writes and waits for sync handlers' threads are cut short
        #: (``finalize_timeout`` after it began; never before a shutdown)
        self.hard_stop = math.inf
        self._thread_waits: set[anyio.CancelScope] = set()
        #: the limited queues' permits (queue -> limiter)
        self.limiters = {
            queue: Limiter(self.broker, queue, queue_limits, self.log)
            for queue, queue_limits in (limits or {}).items()
            if queue in self.queues
        }
        hostname = socket.gethostname()[:200]
        #: this run's id in the worker registry (unique per run)
        self.worker_id = f"{hostname}:{os.getpid()}:{os.urandom(3).hex()}"
        self._hostname = hostname
        self._started_at = 0.0
        self._backend = ""
        self._version = ""
        self._heartbeat_failing = False

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        from . import __version__

        self._started_at = self.server.clock()
        self._backend = _async_backend()
        self._version = __version__
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._watch, name="tasqueue shutdown watcher")
                with anyio.CancelScope(shield=True) as self._shield:
                    async with anyio.create_task_group() as self._control:
                        for limiter in self.limiters.values():
                            await self._control.start(limiter.run)
                        # consumers end first (stop/shutdown), then processors drain
                        async with (
                            anyio.create_task_group() as processors,
                            anyio.create_task_group() as consumers,
                        ):
                            self._consumers_scope = consumers.cancel_scope
                            self._start(consumers, processors)
                            scheduler = self.server._scheduler = Scheduler(self.server)
                            consumers.start_soon(scheduler.run, name="tasqueue scheduler")
                            if self._pending_stop is not None:  # stop() came first
                                self.stop(self._pending_stop)
                            elif self.burst:
                                consumers.start_soon(self._watch_empty, name="tasqueue burst")
                            # listed once started; shielded from the consumers' scope,
                            # which a stop (even one made before run()) cancels here
                            with anyio.CancelScope(shield=True):
                                await self.heartbeat()
                            outer.start_soon(self._heartbeats, name="tasqueue heartbeats")
                            task_status.started()
                        self._control.cancel_scope.cancel()  # a pending grace timer
                self.server._scheduler = None
                self.server._hard_stop = math.inf
                outer.cancel_scope.cancel()  # the watcher, the heartbeats
        finally:
            await self._unregister()
        # If run() itself was cancelled, say so (the shield kept the cancellation from
        # surfacing inside; asyncio would otherwise let run() return normally).
        await anyio.lowlevel.checkpoint_if_cancelled()

    # -- the worker registry ----------------------------------------------------------------------

    def worker_record(self) -> WorkerRecord:
        """This run's record as of now: its queues and the jobs in hand (the first
        ``MAX_WORKER_JOBS`` of them)."""
        queues = self.queues
        if len(queues) > _MAX_WORKER_QUEUES:
            queues = dict(itertools.islice(queues.items(), _MAX_WORKER_QUEUES))
        return WorkerRecord(
            id=self.worker_id,
            hostname=self._hostname,
            pid=os.getpid(),
            queues=queues,
            started_at=self._started_at,
            seen_at=self.server.clock(),
            jobs=tuple(itertools.islice(self.server._active, MAX_WORKER_JOBS)),
            backend=self._backend,
            version=self._version,
        )

    async def heartbeat(self) -> None:
        """Put this run's record now (:meth:`worker_record`, living ``WORKER_TTL``
        seconds), within ``HEARTBEAT_TIMEOUT``. A failure is logged (a warning the first
        time in a row), never raised."""
        try:
            with anyio.fail_after(HEARTBEAT_TIMEOUT):
                await self.results.put_worker(self.worker_record(), WORKER_TTL)
        except Exception as exc:
            level = logging.DEBUG if self._heartbeat_failing else logging.WARNING
            self._heartbeat_failing = True
            self.log.log(
                level,
                "worker %s: a heartbeat failed (it is retried every %gs): %s: %s",
                self.worker_id,
                HEARTBEAT_INTERVAL,
                type(exc).__name__,
                exc,
                extra={"worker_id": self.worker_id},
            )
        else:
            if self._heartbeat_failing:
                self._heartbeat_failing = False
                self.log.info(
                    "worker %s: heartbeats work again",
                    self.worker_id,
                    extra={"worker_id": self.worker_id},
                )

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(HEARTBEAT_INTERVAL)
            await self.heartbeat()

    async def _unregister(self) -> None:
        """Remove this run's record, shielded, within ``HEARTBEAT_TIMEOUT`` (a failure is
        logged: the record then expires ``WORKER_TTL`` after its last heartbeat)."""
        with anyio.move_on_after(HEARTBEAT_TIMEOUT, shield=True) as scope:
            try:
                await self.results.remove_worker(self.worker_id)
            except Exception as exc:
                self.log.warning(
                    "worker %s: removing its record failed (it expires by itself): %s: %s",
                    self.worker_id,
                    type(exc).__name__,
                    exc,
                    extra={"worker_id": self.worker_id},
                )
        if scope.cancelled_caught:
            self.log.warning(
                "worker %s: removing its record took over %gs (it expires by itself)",
                self.worker_id,
                HEARTBEAT_TIMEOUT,
                extra={"worker_id": self.worker_id},
            )

    def _start(self, consumers: TaskGroup, processors: TaskGroup) -> None:
        for queue, concurrency in self.queues.items():
            send, receive = anyio.create_memory_object_stream[Delivery](0)
            consumers.start_soon(self.broker.consume, queue, send, name=f"consume {queue}")
            with receive:
                for i in range(concurrency):
                    processors.start_soon(self._processor, receive.clone(), name=f"{queue}#{i}")

    async def _watch_empty(self) -> None:
        """Stop (gracefully: nothing is running then) once every queue has been empty
        (nothing pending, scheduled or in flight; no job running here) on two looks in a
        row."""
        empty_looks = 0
        while empty_looks < 2:
            await anyio.sleep(BURST_INTERVAL)
            empty = not self.server._active
            for queue in self.queues:
                if not empty:
                    break
                held = await self.broker.count(queue)
                empty = held.pending == 0 and held.scheduled == 0 and held.in_flight == 0
            empty_looks = empty_looks + 1 if empty else 0
        self.stop(0)

    async def _watch(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self.shutdown()

    def stop(self, grace: float) -> None:
        """Take no more jobs; after ``grace`` seconds hand running ones back."""
        if self._consumers_scope is None or self._control is None:
            self._pending_stop = grace
            return
        self._consumers_scope.cancel()
        self._control.start_soon(self._grace_timer, grace, name="tasqueue grace timer")

    async def _grace_timer(self, grace: float) -> None:
        await anyio.sleep(grace)
        self.shutdown()

    def shutdown(self) -> None:
        """Stop now: take no more jobs, hand running ones back to the broker."""
        if self.shutting_down:
            return
        self.shutting_down = True
        if self._consumers_scope is not None:
            self._consumers_scope.cancel()
        for jobs in list(self.server._active.values()):
            for job in jobs:
                job.cancel(_SHUTDOWN)
        if self._shield is not None:  # bound the hand-back writes, and the thread waits
            self.hard_stop = anyio.current_time() + self.server.finalize_timeout
            self.server._hard_stop = self.hard_stop
            self._shield.deadline = self.hard_stop
            for wait in self._thread_waits:
                wait.deadline = self.hard_stop

    async def _processor(self, receive: MemoryObjectReceiveStream[Delivery]) -> None:
        with receive:
            async for delivery in receive:
                try:
                    await self.process(delivery)
                except anyio.get_cancelled_exc_class():
                    # Past finalize_timeout in a shutdown: the lease brings it back if this fails.
                    with anyio.move_on_after(1, shield=True):
                        try:
                            await delivery.nack()
                        finally:
                            delivery.abandon()  # no-op once given back
                    raise
                except LeaseLostError as exc:
                    # Another delivery of the message owns the job now: nothing to give back.
                    self.log.warning(
                        "a run on queue %r lost its lease; another worker owns the job now: %s: %s",
                        delivery.queue,
                        type(exc).__name__,
                        str(exc),  # the text only: a record keeps no traceback alive
                        extra={"queue": delivery.queue},
                    )
                except Exception:
                    # A backend failure while recording: leave the message to come back.
                    self.log.exception(
                        "processing a delivery of queue %r failed; it will come back",
                        delivery.queue,
                        extra={"queue": delivery.queue},
                    )
                    with anyio.move_on_after(self.server.finalize_timeout):
                        try:
                            await delivery.nack(delay=1.0)
                        except Exception:
                            self.log.exception(
                                "nack failed; the broker's lease returns the message"
                            )
                    # Held still if the nack failed (or timed out): stop renewing it, so
                    # that it comes back even while the log record keeps it referenced.
                    delivery.abandon()

    # -- one delivery ---------------------------------------------------------------------------

    async def process(self, delivery: Delivery) -> None:
        """Run one delivery to its end: decode, record, run, record, ack."""
        server = self.server
        try:
            msg = decode_message(delivery.data, max_size=server.max_message_size)
        except DecodeError as exc:
            await self._undecodable(delivery, exc)
            return

        job_id = msg.id
        active = ActiveJob()
        registry = server._active
        registry.setdefault(job_id, []).append(active)
        try:
            if self.shutting_down:
                await delivery.nack()
                return
            now = server.clock()
            if msg.meta.deadline is not None and now >= msg.meta.deadline:
                await self._expired(delivery, msg)
                return
            if msg.meta.chain_id is not None and await self._chain_ended(msg.meta.chain_id):
                # the chain was cancelled (or failed) while this link was being enqueued
                await self._skip(delivery, msg, "its chain ended before it started")
                return
            limiter = self.limiters.get(delivery.queue)
            if limiter is None:
                await self._start_run(delivery, msg, active)
            else:
                async with limiter.permit():
                    await self._start_run(delivery, msg, active)
        finally:
            jobs = registry[job_id]
            jobs.remove(active)
            if not jobs:
                del registry[job_id]

    async def _start_run(self, delivery: Delivery, msg: JobMessage, active: ActiveJob) -> None:
        """Record the run's start (if the job may start) and run it."""
        server = self.server
        msg = JobMessage(
            meta=_run_meta(msg.meta, server.clock(), delivery.attempt), job=msg.job
        )
        data = server._encode(msg)
        run = _RunInfo(run_token(msg.meta.retried, delivery.attempt))
        refused = await self.results.start_job(
            msg.id, JobRecord(status="processing", data=data, run=run.token)
        )
        if refused is not None:
            await self._not_started(delivery, msg, refused)
            return
        if msg.meta.group_id is not None or msg.meta.chain_id is not None:
            await server._member_changed(msg, Status.PROCESSING)
        await self._run(delivery, msg, data, active, run)

    async def _undecodable(self, delivery: Delivery, error: DecodeError) -> None:
        """Dead-letter a message that does not decode, first ending its job ``failed``
        with the reason when the message's job id is readable (:func:`peek_message`) and
        that job has a state that is not final (see :meth:`_fail_undecodable`)."""
        reason = str(error)
        job_id = peek_message(delivery.data, self.server.max_message_size).id
        self.log.warning(
            "dead-lettering an undecodable message on queue %r (job %s): %s",
            delivery.queue,
            job_id or "unreadable",
            reason,
            extra={"queue": delivery.queue, "job_id": job_id},
        )
        ended = job_id is not None and await self._fail_undecodable(
            job_id, delivery.queue, _describe(error)
        )
        await delivery.dead_letter(reason)
        if ended and job_id is not None:
            await self.server._publish_finished(job_id, Status.FAILED)

    async def _fail_undecodable(self, job_id: str, queue: str, error: str) -> bool:
        """End the job ``failed`` with ``error`` unless it has no state or already ended:
        one conditional write over exactly the record read (so a job that moved on
        meanwhile is left alone), then its group or chain is told.

        The failed record is the stored one with its status and ``prev_error`` replaced;
        a stored record that does not decode either is replaced by a minimal one (the
        job's id, queue, task name and group or chain id, as far as they are readable).

        :return: whether the job was ended
        """
        server = self.server
        try:
            current = await self.results.get_job(job_id)
        except NotFoundError:
            return False
        if current.status in FINAL_STATUSES:
            return False
        try:
            failed = self._evolve(server._decode_record(current), Status.FAILED, prev_error=error)
            data = server._encode(failed)
        except (DecodeError, PayloadTooLargeError):
            seen = peek_message(current.data, server.max_message_size)
            job = Job(seen.task or UNREADABLE_TASK, id=job_id, queue=seen.queue or queue)
            meta = Meta(
                id=job_id,
                status=Status.FAILED,
                queue=job.queue,
                prev_error=error,
                created_at=server.clock(),
                group_id=seen.group_id,
                chain_id=seen.chain_id,
            )
            failed = JobMessage(meta=meta, job=job)
            data = encode_message(failed)
        record = JobRecord(status=Status.FAILED.value, data=data, run=current.run)
        if not await self.results.update_job(
            job_id, record, expect=(current.status,), run=current.run
        ):
            return False
        self.log.info(
            "job %s failed: its message does not decode: %s",
            job_id,
            error,
            extra={"job_id": job_id, "task": failed.job.task, "queue": failed.meta.queue},
        )
        await server._member_changed(failed, Status.FAILED, error)
        return True

    async def _expired(self, delivery: Delivery, msg: JobMessage) -> None:
        """The job's group or chain deadline passed before it started: it never starts."""
        meta = msg.meta
        kind = "group" if meta.group_id is not None else "chain"
        parent_id = meta.group_id or meta.chain_id
        if parent_id is not None:
            await self.server._end_parent(
                parent_id,
                Status.FAILED,
                f"timeout: the {kind}'s deadline passed",
                stop=("queued", "retrying"),
            )
        await self._skip(delivery, msg, f"the {kind}'s deadline passed before it started")

    async def _chain_ended(self, chain_id: str) -> bool:
        try:
            return (await self.results.get_parent(chain_id)).status in FINAL_STATUSES
        except NotFoundError:
            return False

    async def _skip(self, delivery: Delivery, msg: JobMessage, reason: str) -> None:
        """Record a job that will not start as ``cancelled`` (unless it already ended)."""
        cancelled = self._evolve(msg, Status.CANCELLED, prev_error=reason)
        if await self.results.update_job(msg.id, self._record(cancelled), expect=_RUNNABLE):
            await self.server._member_changed(msg, Status.CANCELLED, reason)
            await delivery.ack()
            await self.server._publish_finished(msg.id, Status.CANCELLED)
        else:
            await delivery.ack()

    async def _not_started(self, delivery: Delivery, msg: JobMessage, current: JobRecord) -> None:
        """The job may not start: cancelled, ended before (a redelivery after a crash), or
        this message is of a try the job has moved past (see ``abc.may_start``)."""
        status = current.status
        if status not in FINAL_STATUSES and not current.cancel_requested:
            # The message of a failed try came back after the job moved on: the retry
            # runs, not this. A ``retrying`` record holds the retry's message, which the
            # ack of the failed try carried: that ack may have failed (a dropped
            # connection, a lease lost to a pause) or not happened (a crash), so the retry
            # is enqueued again with this ack; its id is fixed, so a retry that exists is
            # not stored twice (see ``Broker.enqueue_many``).
            retry = self._stored_retry(msg, current) if status == "retrying" else None
            self.log.info(
                "job %s: a message of try %d came back after the job moved on (its run "
                "%s); dropped%s",
                msg.id,
                msg.meta.retried,
                current.run or "-",
                "" if retry is None else f", its retry {retry[0].meta.retried} ensured",
                extra={"job_id": msg.id, "task": msg.job.task, "queue": msg.meta.queue},
            )
            await delivery.ack(enqueue=() if retry is None else [_envelope(*retry)])
            return
        if status not in FINAL_STATUSES:  # cancel requested while it was held
            reason = _describe(JobCancelledError(f"job {msg.id} was cancelled before it started"))
            cancelled = self._evolve(msg, Status.CANCELLED, prev_error=reason)
            if await self.results.update_job(msg.id, self._record(cancelled), expect=_RUNNABLE):
                await self.server._member_changed(msg, Status.CANCELLED, reason)
                await delivery.ack()
                await self.server._publish_finished(msg.id, Status.CANCELLED)
                return
            status = (await self.results.get_job(msg.id)).status
        # A crash between recording the end and acking left the follow-ups unsent, and
        # maybe the group or chain untold: pass the end on again, whatever it is (a
        # member's status is set idempotently, and a parent ends once).
        follow_ups: Sequence[Job] = ()
        links: list[tuple[JobMessage, bytes]] = []
        ended: list[tuple[str, Status]] = []
        if status == "successful":
            follow_ups = msg.job.on_success
            links = await self.server._member_changed(msg, Status.SUCCESSFUL, ended=ended)
        else:
            if status == "failed":
                follow_ups = msg.job.on_error
            if msg.meta.group_id is not None or msg.meta.chain_id is not None:
                record = current if current.status == status else await self.results.get_job(msg.id)
                error = None
                with contextlib.suppress(DecodeError):
                    error = self.server._decode_record(record).meta.prev_error
                await self.server._member_changed(msg, Status(status), error, ended=ended)
        await self._ack(delivery, follow_ups, links, redelivered=True)
        for parent_id, parent_status in ended:  # once the follow-ups exist
            await self.server._publish_parent(parent_id, parent_status)
        if status in FINAL_STATUSES:
            # ... and may have lost the end's announcement with its ack (a crash, or an
            # ack refused as lease lost after a partition): announce it again for waiters
            await self.server._publish_finished(msg.id, Status(status))

    async def _run(
        self, delivery: Delivery, msg: JobMessage, data: bytes, active: ActiveJob, run: _RunInfo
    ) -> None:
        server = self.server
        task = self.tasks.get(msg.job.task)
        meta = msg.meta
        token = run.token

        async def save(job_id: str, result: bytes) -> None:
            await server._save_result(job_id, result, run=token)

        async def progress(data: bytes) -> None:
            await server._save_progress(meta.id, data, run=token)

        ctx = JobContext(meta=meta, save_fn=save, progress_fn=progress)
        error: BaseException | None = None

        deadline = math.inf
        if meta.timeout is not None:
            deadline = anyio.current_time() + meta.timeout
        if meta.deadline is not None:
            deadline = min(deadline, anyio.current_time() + (meta.deadline - server.clock()))

        trace: dict[str, str] | None = None  # follow-ups continue this run's span
        started = anyio.current_time()
        with server.tracing.consumer_span(msg, delivery.attempt) as span:
            if span is not None:
                trace = server.tracing.carrier()
            if task is None:
                error = UnknownTaskError(
                    f"task {msg.job.task!r} is not registered on this worker "
                    f"(registered: {', '.join(self.tasks) or 'none'})"
                )
            else:
                with anyio.CancelScope(deadline=deadline) as scope:
                    active.scope = scope
                    if active.reason is not None:
                        scope.cancel()
                    current = _CURRENT.set(ctx)
                    try:
                        if task.on_processing is not None:
                            await self._callback(task.on_processing, ctx)
                        if task.is_async:
                            await task.handler(msg.job.payload, ctx)  # type: ignore[misc]
                        else:
                            await self._in_thread(task, msg.job.payload, ctx)
                        await ctx.flush_progress()
                    except Exception as exc:
                        error = exc
                    finally:
                        _CURRENT.reset(current)
                active.scope = None
                if scope.cancelled_caught or (error is not None and scope.cancel_called):
                    if active.reason == _SHUTDOWN:
                        # Shutdown is not an outcome: the job goes back to the broker.
                        requeued = self._evolve(msg, Status.QUEUED)
                        await self.results.update_job(
                            msg.id, self._record(requeued), expect=_PROCESSING, run=token
                        )
                        await delivery.nack()
                        return
                    if active.reason == _CANCEL:
                        error = JobCancelledError(f"job {msg.id} was cancelled")
                    elif meta.deadline is not None and server.clock() >= meta.deadline:
                        error = JobTimeoutError(f"job {msg.id} ran past its parent's deadline")
                    elif meta.timeout is not None:
                        error = JobTimeoutError(
                            f"job {msg.id} ran past its timeout of {meta.timeout:g}s and was stopped"
                        )
                    else:  # pragma: no cover - a deadline is the only other cause
                        error = JobTimeoutError(f"job {msg.id} ran past its deadline")

            if span is not None:
                self._end_span(span, error)

        run.trace = trace
        run.duration = anyio.current_time() - started
        if error is None:
            await self._finish_success(delivery, msg, data, ctx, task, run)
        elif isinstance(error, JobCancelledError):
            await self._finish_cancelled(delivery, msg, run)
        else:
            await self._finish_error(delivery, msg, ctx, task, error, run)

    async def _in_thread(self, task: Task, payload: bytes, ctx: JobContext) -> None:
        """Run a sync handler in a worker thread, in the job's scope.

        A thread cannot be interrupted: when the job's scope is cancelled (timeout,
        cancel request, shutdown), ``ctx``'s cancel token is set and the thread is waited
        for, shielded, before the cancellation goes on, so the run's end is recorded (and
        a retry enqueued) only once the thread has returned. The wait ends anyway
        ``finalize_timeout`` after a shutdown began (the thread is then abandoned); a
        task registered with ``abandon_on_cancel`` stops waiting at once.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()  # stopped before it started
        returned = False
        error: Exception | None = None

        async def watch() -> None:  # sets the token once the job's scope is cancelled
            try:
                await anyio.sleep_forever()
            finally:
                if not returned:
                    ctx.stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, name=f"stop token of job {ctx.job_id}")
            # waited for: shielded until the shutdown's end; abandoned: not shielded
            waited = not task.abandon_on_cancel
            with anyio.CancelScope(shield=waited, deadline=self.hard_stop) as wait:
                if waited:
                    self._thread_waits.add(wait)
                try:
                    await anyio.to_thread.run_sync(
                        task.handler, payload, ctx, abandon_on_cancel=True
                    )
                except Exception as exc:
                    error = exc
                finally:
                    self._thread_waits.discard(wait)
            if wait.cancelled_caught:
                self.log.warning(
                    "job %s: its sync handler's thread did not return within the "
                    "shutdown's finalize_timeout; it is abandoned, running on",
                    ctx.job_id,
                    extra={"job_id": ctx.job_id, "task": task.name},
                )
            returned = True
            tg.cancel_scope.cancel()
        # a run whose scope was cancelled ends by its cause, however the thread returned
        await anyio.lowlevel.checkpoint_if_cancelled()
        if error is not None:
            raise error

    @staticmethod
    def _end_span(span: Any, error: BaseException | None) -> None:
        from opentelemetry.trace import Status as SpanStatus
        from opentelemetry.trace import StatusCode

        if error is None:
            span.set_attribute("tasqueue.status", "successful")
        elif isinstance(error, JobCancelledError):
            span.set_attribute("tasqueue.status", "cancelled")
        else:
            span.set_attribute("tasqueue.status", "failed")
            span.record_exception(error)
            span.set_status(SpanStatus(StatusCode.ERROR, _describe(error)))

    # -- endings --------------------------------------------------------------------------------

    async def _finish_success(
        self,
        delivery: Delivery,
        msg: JobMessage,
        data: bytes,
        ctx: JobContext,
        task: Task | None,
        run: _RunInfo,
    ) -> None:
        # The stored status is authoritative over the one inside ``data``, so the
        # processing message's bytes serve the final record as they are.
        record = JobRecord(
            status="successful",
            data=data,
            run=run.token,
            result=ctx.result,
            hold_for=msg.job.unique_for or 0.0,
            ttl=msg.job.successful_ttl,
        )
        meta = msg.meta
        if _alone(msg, task.on_success if task else None, msg.job.on_success):
            await self._end_alone(delivery, msg, record, Status.SUCCESSFUL, run)
            return
        if not await self.results.update_job(msg.id, record, expect=_PROCESSING, run=run.token):
            self._ended_elsewhere(msg)
            await delivery.ack()
            return
        await self._callback(task.on_success if task else None, ctx)
        ended: list[tuple[str, Status]] = []
        links = await self.server._member_changed(
            msg, Status.SUCCESSFUL, trace=run.trace, ended=ended
        )
        await self._ack(delivery, msg.job.on_success, links, trace=run.trace)
        for parent_id, status in ended:  # once the follow-ups exist
            await self.server._publish_parent(parent_id, status)
        await self.server._publish_finished(msg.id, Status.SUCCESSFUL)
        self.server.metrics.record("successful", msg.job.task, meta.queue, run.duration)

    async def _finish_error(
        self,
        delivery: Delivery,
        msg: JobMessage,
        ctx: JobContext,
        task: Task | None,
        error: BaseException,
        run: _RunInfo,
    ) -> None:
        meta = msg.meta
        description = _describe(error)
        now = self.server.clock()
        past_deadline = meta.deadline is not None and now >= meta.deadline
        if meta.retried < meta.max_retries and not past_deadline:
            delay = meta.backoff.delay(meta.retried) if meta.backoff is not None else 0.0
            retry = self._evolve(
                msg,
                Status.RETRYING,
                retried=meta.retried + 1,
                prev_error=description,
                eta=now + delay if delay > 0 else None,
            )
            data = self.server._encode(retry)
            if not await self.results.update_job(
                msg.id,
                JobRecord(status="retrying", data=data, run=run.token),
                expect=_PROCESSING,
                run=run.token,
            ):
                self._ended_elsewhere(msg)
                await delivery.ack()
                return
            # The retry is a new message, on the queue before the old one is gone.
            await delivery.ack(enqueue=[_envelope(retry, data)])
            if meta.group_id is not None or meta.chain_id is not None:
                await self.server._member_changed(msg, Status.RETRYING)
            self.log.info(
                "job %s failed (%s); retry %d of %d",
                msg.id,
                description,
                meta.retried + 1,
                meta.max_retries,
                extra={"job_id": msg.id, "task": msg.job.task, "queue": meta.queue},
            )
            self.server.metrics.record("retried", msg.job.task, meta.queue, run.duration)
            await self._callback(task.on_retrying if task else None, ctx, error)
            return

        failed = self._evolve(msg, Status.FAILED, prev_error=description)
        self.log.info(
            "job %s failed: %s",
            msg.id,
            description,
            extra={"job_id": msg.id, "task": msg.job.task, "queue": meta.queue},
        )
        record = self._record(
            failed, run.token, hold_for=failed.job.unique_for or 0.0, ttl=failed.job.failed_ttl
        )
        if _alone(msg, task.on_failed if task else None, msg.job.on_error):
            await self._end_alone(delivery, msg, record, Status.FAILED, run)
            return
        if not await self.results.update_job(msg.id, record, expect=_PROCESSING, run=run.token):
            self._ended_elsewhere(msg)
            await delivery.ack()
            return
        await self._callback(task.on_failed if task else None, ctx, error)
        ended: list[tuple[str, Status]] = []
        await self.server._member_changed(msg, Status.FAILED, description, ended=ended)
        await self._ack(delivery, msg.job.on_error, trace=run.trace)
        for parent_id, status in ended:  # once the follow-ups exist
            await self.server._publish_parent(parent_id, status)
        await self.server._publish_finished(msg.id, Status.FAILED)
        self.server.metrics.record("failed", msg.job.task, meta.queue, run.duration)

    async def _finish_cancelled(self, delivery: Delivery, msg: JobMessage, run: _RunInfo) -> None:
        reason = _describe(JobCancelledError(f"job {msg.id} was cancelled while running"))
        cancelled = self._evolve(msg, Status.CANCELLED, prev_error=reason)
        if await self.results.update_job(
            msg.id, self._record(cancelled, run.token), expect=_PROCESSING, run=run.token
        ):
            await self.server._member_changed(msg, Status.CANCELLED, reason)
        await delivery.ack()
        await self.server._publish_finished(msg.id, Status.CANCELLED)
        self.server.metrics.record("cancelled", msg.job.task, msg.meta.queue, run.duration)

    async def _end_alone(
        self, delivery: Delivery, msg: JobMessage, record: JobRecord, status: Status, run: _RunInfo
    ) -> None:
        """End a run with nothing to do between its record and its ack (see
        :func:`_alone`): one :meth:`Results.end_job` step, which the results store and the
        broker may make one write."""
        if await self.results.end_job(
            msg.id,
            record,
            expect=_PROCESSING,
            run=run.token,
            delivery=delivery,
            announce=[finished_event(msg.id, status.value)],
        ):
            self.server.metrics.record(status.value, msg.job.task, msg.meta.queue, run.duration)
        else:
            self._ended_elsewhere(msg)

    def _ended_elsewhere(self, msg: JobMessage) -> None:
        self.log.warning(
            "job %s was ended by another run; this run's outcome is not recorded",
            msg.id,
            extra={"job_id": msg.id, "task": msg.job.task, "queue": msg.meta.queue},
        )

    async def _ack(
        self,
        delivery: Delivery,
        follow_ups: Sequence[Job],
        prepared: list[tuple[JobMessage, bytes]] | None = None,
        *,
        trace: dict[str, str] | None = None,
        redelivered: bool = False,
    ) -> None:
        """Ack, enqueueing follow-up jobs (and a chain's next link) in the same step,
        their state recorded first.

        :param redelivered: the job had ended in an earlier delivery, whose ack may have
            failed after the follow-ups' state was created: enqueue those still ``queued``
            too (at least once: a follow-up may then run twice, never zero times)
        """
        if not follow_ups and not prepared:
            await delivery.ack()
            return
        prepared = [
            *(prepared or ()),
            *(self.server._new_message(job, trace=trace) for job in follow_ups),
        ]
        # Follow-up ids are fixed in this job's message: a redelivery of it must not
        # reset (and rerun) follow-ups an earlier delivery already enqueued.
        created = await self.results.create_jobs(
            {m.id: JobRecord(status=m.meta.status.value, data=data) for m, data in prepared}
        )
        if redelivered:
            for m, _ in prepared:
                if m.id not in created:
                    with contextlib.suppress(NotFoundError):
                        if (await self.results.get_job(m.id)).status == Status.QUEUED.value:
                            created.add(m.id)
        await delivery.ack(enqueue=[_envelope(m, data) for m, data in prepared if m.id in created])

    def _evolve(self, msg: JobMessage, status: Status, **changes: Any) -> JobMessage:
        return JobMessage(meta=attrs.evolve(msg.meta, status=status, **changes), job=msg.job)

    def _record(
        self, msg: JobMessage, run: str = "", hold_for: float = 0.0, ttl: float | None = None
    ) -> JobRecord:
        return JobRecord(
            status=msg.meta.status.value,
            data=self.server._encode(msg),
            run=run,
            hold_for=hold_for,
            ttl=ttl,
        )

    async def _callback(self, callback: Any, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            job_id = args[0].meta.id
            self.log.exception(
                "callback %r of job %s raised; the job's state is unaffected",
                getattr(callback, "__name__", callback),
                job_id,
                extra={"job_id": job_id},
            )

    def _stored_retry(self, msg: JobMessage, current: JobRecord) -> tuple[JobMessage, bytes] | None:
        """The retry message a ``retrying`` record holds, with its bytes (``None``, and a
        warning, when it does not decode: nothing can be enqueued then)."""
        try:
            return decode_message(current.data, max_size=self.server.max_message_size), current.data
        except DecodeError as exc:
            self.log.warning(
                "job %s is retrying but its stored retry does not decode; not enqueued: %s",
                msg.id,
                exc,
                extra={"job_id": msg.id, "task": msg.job.task, "queue": msg.meta.queue},
            )
            return None


def _alone(msg: JobMessage, callback: object, follow_ups: Sequence[Job]) -> bool:
    """Whether nothing happens between a run's end record and its ack: no callback, no
    follow-ups, not in a group or chain."""
    meta = msg.meta
    return callback is None and not follow_ups and meta.group_id is None and meta.chain_id is None


def _envelope(msg: JobMessage, data: bytes) -> Envelope:
    return envelope(msg, data)
