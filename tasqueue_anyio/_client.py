"""The :class:`~tasqueue_anyio.Client`: enqueue jobs, wait for them, inspect and cancel them.

A client registers no handlers and runs no workers (a web app that only produces jobs
uses one); :class:`~tasqueue_anyio.Server` is a client that also runs workers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from abc import ABCMeta, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

import anyio
import attrs

from ._codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EVENT_CANCEL,
    EVENT_FINISHED,
    EVENT_PARENT,
    EVENT_PROGRESS,
    EVENT_SCHEDULE,
    FINISHED_CHANNEL,
    decode_event,
    decode_message,
    encode_event,
    encode_message,
    finished_event,
    job_from_wire,
    job_to_wire,
    peek_message,
    with_status,
)
from ._codecs import Codec, MsgpackCodec, encode_args
from ._exceptions import (
    DecodeError,
    DuplicateJobError,
    InvalidInputError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    LeaseLostError,
    NotFoundError,
    NotReplicatedError,
    PayloadTooLargeError,
)
from ._groups import (
    CHAIN,
    GROUP,
    Chain,
    ChainMessage,
    Group,
    GroupMessage,
    ParentInfo,
    decode_parent,
    encode_parent,
    parent_status,
)
from ._jobs import (
    DEFAULT_QUEUE,
    MAX_ERROR_LENGTH,
    ActiveJob,
    Backoff,
    Job,
    JobMessage,
    Meta,
    Progress,
    Status,
    decode_progress,
    error_history,
    validate_id,
    validate_queue,
    with_time_zone,
)
from ._schedule import Schedule, decode_template, encode_template, next_fire, run_id
from ._tracing import Metrics, Tracing
from .abc import (
    FINAL_STATUSES,
    Broker,
    DeadLetter,
    Envelope,
    JobRecord,
    ParentRecord,
    Results,
    ScheduleRecord,
    WorkerRecord,
)

__all__ = [
    "EVENTS_CHANNEL",
    "FINISHED_CHANNEL",
    "RUN_ROOM",
    "ChainHandle",
    "Client",
    "Counts",
    "GroupHandle",
    "JobHandle",
    "TaskFunction",
    "envelope",
]

#: The broadcast channel for cancel requests, group/chain ends and schedule changes:
#: every open server listens to it.
EVENTS_CHANNEL = "events"

#: Seconds a wait (:meth:`Client.wait`, ``wait_group``, ``wait_chain``) goes without an
#: event before it re-reads the state itself: events are best effort (a broker may drop
#: them; the NATS broker does on a slow consumer). Each re-read that finds nothing new
#: doubles the pause, up to ``RECHECK_MAX``.
RECHECK_FIRST = 2.0
#: The longest pause between two re-reads of a wait (seconds).
RECHECK_MAX = 30.0


_log = logging.getLogger("tasqueue_anyio.client")

#: Bytes a job's encoded message may grow by over its runs (a retry's error text, at most
#: MAX_ERROR_LENGTH bytes; its status, start time, attempt and retry counts, ETA): kept free
#: when a message is checked against a backend's ``max_message_size`` at enqueue.
RUN_ROOM = MAX_ERROR_LENGTH + 256
#: Seconds a failed enqueue may take to delete the records it wrote.
_FORGET_TIMEOUT = 10.0


_C = TypeVar("_C", bound="Client")
_HT = TypeVar("_HT", bound="_Handle")


class _Wakeable(Protocol):
    def wake(self) -> None: ...


class Client:
    """Enqueues jobs, waits for them, and answers about them: the producer's side.

    A client registers no handlers and runs no workers; a web app that only enqueues,
    waits and inspects uses one, with the same backends (and codec) as the workers'
    :class:`~tasqueue_anyio.Server` (which is a client too). Use it as an async context
    manager, which opens the backends and listens for job events::

        async with Client(RedisBroker(url), RedisResults(url)) as client:
            job = await client.enqueue(add, 40, 2)   # a typed task of the workers' app
            print(await job.result(timeout=10))

    :param broker: moves messages (default: a new :class:`~tasqueue_anyio.brokers.memory.MemoryBroker`)
    :param results: stores job state (default: a new :class:`~tasqueue_anyio.results.memory.MemoryResults`)
    :param codec: encodes typed tasks' arguments and results (default:
        :class:`~tasqueue_anyio.MsgpackCodec`); the same on producers and workers
    :param logger: where the client logs (default: the ``tasqueue_anyio.client`` logger)
    :param tracer_provider: an OpenTelemetry ``TracerProvider``: spans for enqueue (and,
        on a server, for each run of a job, continuing the producer's trace)
    :param meter_provider: an OpenTelemetry ``MeterProvider``: job counters and a duration
        histogram by task and queue (on a server); no metrics without one
    :param max_payload_size: the largest job payload (and result) accepted (bytes)
    :param max_message_size: the largest encoded message accepted or decoded (bytes)
    :param finalize_timeout: seconds the writes that end a job or a group may take when
        the caller is cancelled (and, on a server, a shutdown allows running jobs to be
        handed back before the workers are cancelled outright)
    :param clock: the wall clock (POSIX seconds) for ETAs, deadlines and cron fire times;
        inject a fake one in tests, with the same one given to the broker
    """

    def __init__(
        self,
        broker: Broker | None = None,
        results: Results | None = None,
        *,
        codec: Codec | None = None,
        logger: logging.Logger | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        max_payload_size: int = 1024 * 1024,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        finalize_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if broker is None:
            from .brokers.memory import MemoryBroker

            broker = MemoryBroker()
        if results is None:
            from .results.memory import MemoryResults

            results = MemoryResults()
        if codec is None:
            codec = MsgpackCodec()
        elif not isinstance(codec, Codec):
            raise InvalidInputError(f"codec must have encode() and decode(), got {codec!r}")
        self.broker = broker
        self.results = results
        self.log = logger if logger is not None else _log
        #: whether the caller gave the logger (then the worker logs through it too)
        self.custom_logger = logger is not None
        self.tracing = Tracing(tracer_provider)
        self.metrics = Metrics(meter_provider)
        self.codec: Codec = codec
        self.max_payload_size = max_payload_size
        self.max_message_size = max(max_message_size, max_payload_size + 64 * 1024)
        self.finalize_timeout = finalize_timeout
        self.clock = clock
        self._parent_waiters: dict[str, set[anyio.Event]] = {}
        #: the scheduler of this process's running worker, if any (woken by events)
        self._scheduler: _Wakeable | None = None
        self._waiters: dict[str, set[anyio.Event]] = {}
        #: jobs taken by this process's worker, by id (the control channel cancels them)
        self._active: dict[str, list[ActiveJob]] = {}
        self._exit_stack: AsyncExitStack | None = None
        #: when a running worker's shutdown cuts its writes short (``inf`` when none)
        self._hard_stop = math.inf
        #: set once this open server listens to FINISHED_CHANNEL
        self._finished_listening = False
        self._finished_lock: anyio.Lock | None = None
        #: callables told of every event this client hears, as ``(kind, job_id, status)``
        #: (the dashboard's live updates share the client's subscriptions this way)
        self._listeners: list[Callable[[str, str, str], None]] = []

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self: _C) -> _C:
        if self._exit_stack is not None:
            raise RuntimeError(f"this {type(self).__name__} is already open")
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.broker)
            await stack.enter_async_context(self.results)
            await stack.enter_async_context(self.broker.subscribe(EVENTS_CHANNEL, self._on_event))
            self._finished_listening = False
            self._finished_lock = anyio.Lock()
            self._exit_stack = stack.pop_all()
        return self

    async def _listen_finished(self) -> None:
        """Listen to the job-end channel from now until the server closes (the first
        :meth:`wait` subscribes; entering returns once the broker has the subscription)."""
        if self._finished_listening:
            return
        stack, lock = self._exit_stack, self._finished_lock
        if stack is None or lock is None:
            raise RuntimeError(f"this {type(self).__name__} is not open: use `async with`")
        async with lock:
            if not self._finished_listening:
                await stack.enter_async_context(
                    self.broker.subscribe(FINISHED_CHANNEL, self._on_event)
                )
                self._finished_listening = True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        stack, self._exit_stack = self._exit_stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc_val, exc_tb)

    def _on_event(self, data: bytes) -> None:
        """The events channel's subscriber: wake waiters, cancel jobs running here."""
        try:
            kind, job_id, _status = decode_event(data)
        except DecodeError as exc:
            self.log.warning("ignoring a malformed event: %s", exc)
            return
        if kind == EVENT_FINISHED:
            for event in self._waiters.get(job_id, ()):
                event.set()
        elif kind == EVENT_CANCEL:
            for active in self._active.get(job_id, ()):
                active.cancel()
        elif kind == EVENT_PARENT:
            for event in self._parent_waiters.get(job_id, ()):
                event.set()
        elif kind == EVENT_SCHEDULE and self._scheduler is not None:
            self._scheduler.wake()
        for listener in tuple(self._listeners) if self._listeners else ():
            try:
                listener(kind, job_id, _status)
            except Exception:
                self.log.exception("an event listener raised; the event goes on")

    # -- enqueue ----------------------------------------------------------------------------

    def _new_message(
        self,
        job: Job,
        *,
        status: Status = Status.QUEUED,
        now: float | None = None,
        prev_job_result: bytes | None = None,
        group_id: str | None = None,
        chain_id: str | None = None,
        deadline: float | None = None,
        trace: dict[str, str] | None = None,
    ) -> tuple[JobMessage, bytes]:
        """Build a job's first message and its encoding, checking sizes (no I/O).

        :param trace: the trace context to carry (default: the current one)
        """
        if not isinstance(job, Job):
            raise InvalidInputError(f"expected a Job, got {job!r}")
        self._check_payloads(job)
        now = self.clock() if now is None else now
        meta = Meta(
            id=job.id,
            status=status,
            queue=job.queue,
            max_retries=job.max_retries,
            created_at=now,
            eta=job.eta_timestamp(now),
            timeout=job.timeout,
            schedule=job.schedule,
            backoff=job.backoff,
            prev_job_result=prev_job_result,
            group_id=group_id,
            chain_id=chain_id,
            deadline=deadline,
            trace=self.tracing.carrier() if trace is None else trace,
        )
        msg = JobMessage(meta=meta, job=job)
        data = self._encode(msg)
        self._check_fits(msg, data)
        return msg, data

    def _encode(self, msg: JobMessage) -> bytes:
        """Encode ``msg``, refusing it when over ``max_message_size``."""
        data = encode_message(msg)
        if len(data) > self.max_message_size:
            raise PayloadTooLargeError(
                f"job {msg.id}'s encoded message", len(data), self.max_message_size
            )
        return data

    def _check_fits(self, msg: JobMessage, data: bytes) -> None:
        """Refuse a message that the broker or results store could not hold through the
        job's runs (:attr:`~tasqueue_anyio.abc.Broker.max_message_size`, less
        :data:`RUN_ROOM`), naming its payload's size and the largest that fits."""
        for backend in (self.broker, self.results):
            limit = backend.max_message_size
            if limit is None or len(data) + RUN_ROOM <= limit:
                continue
            payload = len(msg.job.payload)
            room = max(0, limit - RUN_ROOM - (len(data) - payload))
            raise PayloadTooLargeError(
                f"job {msg.id}'s payload",
                payload,
                room,
                cause=(
                    f"with its envelope the job's message is {len(data)} bytes, and "
                    f"{backend!r} stores messages of at most {limit} bytes, of which "
                    f"{RUN_ROOM} are kept for what the job's runs add: "
                    f"{backend.message_limit_cause}"
                ),
            )

    def _check_payloads(self, job: Job) -> None:
        size = len(job.payload)
        if size > self.max_payload_size:
            raise PayloadTooLargeError(f"job {job.id}'s payload", size, self.max_payload_size)
        if job.successful_ttl is not None or job.failed_ttl is not None:
            self.results.check_job_ttl()
        for follow_up in (*job.on_success, *job.on_error):
            self._check_payloads(follow_up)

    @overload
    async def enqueue(self, job: Job, /) -> JobHandle[Any]: ...

    @overload
    async def enqueue(
        self, task: TaskFunction[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle[R]: ...

    async def enqueue(self, job: Any, /, *args: Any, **kwargs: Any) -> JobHandle[Any]:
        """Enqueue a typed task's job, ``enqueue(add, 40, 2)`` (``add``'s arguments, encoded
        by this client's codec), or a :class:`Job`: record it ``queued`` and put it on its
        queue.

        A job with a ``schedule`` is not run now: it becomes a cron schedule whose id is
        the job id, first firing at the job's ``eta``/``delay`` if it has one, else at the
        expression's next fire time (see :meth:`get_schedules`).

        A job id names one live job: when a job with this id is queued, waiting, running
        or held by its ``unique_for``, nothing is stored and its handle is returned (see
        :meth:`~tasqueue_anyio.abc.Results.claim_jobs`).

        :return: the job's handle, a ``str`` holding the job id (or schedule id)
        :raises PayloadTooLargeError: the payload is over ``max_payload_size`` (no I/O done)
        :raises InvalidInputError: a cron expression has no fire time after now (this
            client's clock) or after the job's ``eta`` (no I/O done)
        """
        if isinstance(job, TaskFunction):
            job = job._job(self.codec, args, kwargs)
        elif args or kwargs:
            raise InvalidInputError("arguments go with a task function, not with a Job")
        return (await self.enqueue_many([job]))[0]

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on the job ``job_id`` (no I/O: the job need not exist yet)."""
        return JobHandle(validate_id(job_id), self)

    def group(self, group_id: str) -> GroupHandle:
        """A handle on the group ``group_id`` (no I/O)."""
        return GroupHandle(validate_id(group_id, "group id"), self)

    def chain(self, chain_id: str) -> ChainHandle:
        """A handle on the chain ``chain_id`` (no I/O)."""
        return ChainHandle(validate_id(chain_id, "chain id"), self)

    async def enqueue_many(self, jobs: Iterable[Job]) -> list[JobHandle[Any]]:
        """Enqueue many jobs with one results call and one broker call.

        A job whose id names a live job is not stored (that job's handle is returned for
        it), as in :meth:`enqueue`.

        :return: the jobs' handles (``str`` subclasses: the job ids), in order
        :raises InvalidInputError: a job is invalid or two jobs share an id (no I/O done)
        """
        jobs = list(jobs)
        for job in jobs:
            if not isinstance(job, Job):
                raise InvalidInputError(f"expected a Job, got {job!r}")
        if any(job.schedule is not None for job in jobs):
            # cron jobs become schedules; the rest go on their queues together
            ids = [job.id for job in jobs]
            if len(set(ids)) != len(ids):
                raise InvalidInputError("two jobs of one enqueue_many call share an id")
            for job in jobs:
                self._check_payloads(job)
            schedules = [self._schedule_record(job) for job in jobs if job.schedule is not None]
            await self.enqueue_many([job for job in jobs if job.schedule is None])
            for record in schedules:
                await self._add_schedule(record)
            return [JobHandle(job_id, self) for job_id in ids]
        if not jobs:
            return []
        ids = [job.id for job in jobs]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("two jobs of one enqueue_many call share an id")
        attributes = {"tasqueue.jobs": len(ids), "tasqueue.job.id": ids[0]}
        with self.tracing.producer_span("tasqueue.enqueue", attributes):
            # built inside the span: the messages carry its trace context
            prepared = [self._new_message(job) for job in jobs]
            await self._put_messages(prepared)
        return [JobHandle(job_id, self) for job_id in ids]

    async def _put_messages(
        self, prepared: Sequence[tuple[JobMessage, bytes]], *, strict: bool = False
    ) -> set[str]:
        """Record the state of prepared messages whose job id is free, then put those on
        their queues; return their ids.

        An id is free unless a live job has it (queued, scheduled, running, or ended and
        held by its ``unique_for``: :meth:`~tasqueue_anyio.abc.Results.claim_jobs`): the
        message of a taken id is dropped, and the live job stays as it is. With
        ``strict`` (a group's or chain's members) a taken id raises
        :class:`DuplicateJobError` instead, once the others' records are deleted again.

        The records come first, so a worker never finds a message whose job has no state
        yet. When either step fails (or is cancelled), the records this call stored are
        deleted again (shielded, within :data:`_FORGET_TIMEOUT` seconds) before the error
        goes on: no job is left ``queued`` with no message to run it. A message that did
        reach its queue still runs (a job with no state may start). If the deletion
        failed too (the backend was down), retrying the enqueue with the same job ids
        sends the messages of those still ``queued`` again (the broker
        keeps one message per id), so the retry does not skip them.
        """
        records = {
            msg.id: JobRecord(status=msg.meta.status.value, data=data) for msg, data in prepared
        }
        claimed: set[str] | None = None
        try:
            claimed = await self.results.claim_jobs(records)
            if len(claimed) < len(records):
                taken = [job_id for job_id in records if job_id not in claimed]
                if strict:
                    raise DuplicateJobError(taken)
                waiting = await self._still_waiting(taken)
                self.log.debug(
                    "%d jobs not enqueued: their ids name live jobs (%d of them queued: "
                    "their messages sent again, kept once): %s",
                    len(taken),
                    len(waiting),
                    ", ".join(taken[:20]),
                )
                prepared = [
                    (msg, data)
                    for msg, data in prepared
                    if msg.id in claimed or msg.id in waiting
                ]
            if prepared:
                await self.broker.enqueue_many([envelope(msg, data) for msg, data in prepared])
        except NotReplicatedError:
            raise  # the messages are stored (on the primary): their jobs' state stays
        except BaseException:
            if claimed is None:  # the claim failed: which ids it stored is unknown
                await self._forget(records, ours=records)
            else:
                await self._forget(claimed)
            raise
        return claimed

    async def _still_waiting(self, job_ids: Collection[str]) -> set[str]:
        """Of the ids of live jobs an enqueue found, those whose state is ``queued`` (due
        or waiting for its ETA): their message is sent again, because an enqueue that
        failed after recording the state, and could not delete it again (the backend was
        down), left a job waiting with no message; retrying that enqueue must not skip
        it. When the message is there, the broker keeps one (brokers store a message id
        once), and a worker runs a job once its state moved on. The reads run
        concurrently (one round trip where the store combines calls), only for taken
        ids."""
        waiting: set[str] = set()

        async def check(job_id: str) -> None:
            try:
                record = await self.results.get_job(job_id)
            except JobNotFoundError:
                return
            if record.status == Status.QUEUED.value:
                waiting.add(job_id)

        async with anyio.create_task_group() as tg:
            for job_id in job_ids:
                tg.start_soon(check, job_id)
        return waiting

    async def _forget(
        self, job_ids: Collection[str], *, ours: Mapping[str, JobRecord] | None = None
    ) -> None:
        """Delete the state of jobs whose enqueue failed (shielded, bounded; one at a time,
        stopping at the first failure: a store that refuses one refuses the rest too; the
        ones left are logged). With ``ours``, only a state that is still the one given
        there (the same message bytes) is deleted: another job's is left."""
        ids = list(job_ids)
        done = 0
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FORGET_TIMEOUT):
            for job_id in ids:
                try:
                    if ours is not None:
                        try:
                            current = await self.results.get_job(job_id)
                        except NotFoundError:
                            done += 1
                            continue
                        if current.data != ours[job_id].data:
                            done += 1
                            continue
                    await self.results.delete_job(job_id)
                except Exception as exc:
                    self.log.warning(  # the text only: a record keeps no traceback alive
                        "could not delete job %s after a failed enqueue: %s",
                        job_id,
                        f"{type(exc).__name__}: {exc}",
                        extra={"job_id": job_id},
                    )
                    break
                done += 1
        left = ids[done:]
        if left:
            self.log.warning(
                "an enqueue failed and %d of its jobs may stay queued with no message: %s",
                len(left),
                ", ".join(sorted(left)[:20]),
            )

    async def enqueue_group(self, group: Group) -> GroupHandle:
        """Enqueue every job of ``group``: the group's record, then its jobs with one
        results call and one broker call.

        :return: the group's handle (a ``str``: the group id); ``await
            handle.result()`` gives the members' results as a list
        :raises DuplicateJobError: a member's id names a live job (the group is recorded
            ``failed``, none of its jobs is left queued, the live job goes on)
        """
        if not isinstance(group, Group):
            raise InvalidInputError(f"expected a Group, got {group!r}")
        with self.tracing.producer_span("tasqueue.enqueue_group", {"tasqueue.group.id": group.id}):
            now = self.clock()
            deadline = None if group.timeout is None else now + group.timeout
            prepared = [
                self._new_message(job, now=now, group_id=group.id, deadline=deadline)
                for job in group.jobs
            ]
            if group.then is not None:
                self._new_message(group.then, now=now)  # checked now: sizes, not when due
            await self._create_parent(
                GROUP, group.id, group.jobs, now, deadline, prepared, group.then
            )
        handle = GroupHandle(group.id, self)
        handle._then = None if group.then is None else JobHandle(group.then.id, self)
        handle._members = tuple(JobHandle(job.id, self) for job in group.jobs)
        return handle

    async def enqueue_chain(self, chain: Chain) -> ChainHandle:
        """Enqueue the first link of ``chain``; each link's success enqueues the next.

        :return: the chain's handle (a ``str``: the chain id); ``await handle.result()``
            gives the last link's result
        :raises DuplicateJobError: the first link's id names a live job (the chain is
            recorded ``failed``; the live job goes on)
        """
        if not isinstance(chain, Chain):
            raise InvalidInputError(f"expected a Chain, got {chain!r}")
        with self.tracing.producer_span("tasqueue.enqueue_chain", {"tasqueue.chain.id": chain.id}):
            now = self.clock()
            deadline = None if chain.timeout is None else now + chain.timeout
            # every link is built (and refused if oversize) now, not when it is reached
            first, *_ = [
                self._new_message(job, now=now, chain_id=chain.id, deadline=deadline)
                for job in chain.jobs
            ]
            await self._create_parent(CHAIN, chain.id, chain.jobs, now, deadline, [first])
        return ChainHandle(chain.id, self)

    async def _create_parent(
        self,
        kind: str,
        parent_id: str,
        jobs: Sequence[Job],
        now: float,
        deadline: float | None,
        prepared: Sequence[tuple[JobMessage, bytes]],
        then: Job | None = None,
    ) -> None:
        """Record a new group or chain (every member ``queued``), then enqueue ``prepared``."""
        info = ParentInfo(
            kind=kind,
            id=parent_id,
            created_at=now,
            deadline=deadline,
            job_ids=tuple(job.id for job in jobs),
            links=(
                tuple(job_to_wire(job) for job in jobs)
                if kind == CHAIN
                else tuple(job_to_wire(job) for job in (then,) if job is not None)
            ),
        )
        await self.results.set_parent(
            parent_id,
            ParentRecord(
                kind=kind,
                status=Status.QUEUED.value,
                data=encode_parent(info),
                members={job.id: Status.QUEUED.value for job in jobs},
            ),
        )
        try:
            await self._put_messages(prepared, strict=True)
        except BaseException as exc:
            # put_messages forgot the members' records again: the group or chain must not
            # wait for them for ever, so it ends failed, saying why
            with self._finishing():
                try:
                    await self.results.set_parent_status(
                        parent_id,
                        Status.FAILED.value,
                        expect=_NOT_FINAL,
                        error=f"its enqueue failed: {type(exc).__name__}: {exc}",
                    )
                except Exception as inner:
                    self.log.warning(
                        "%s %s: its enqueue failed and it could not be marked failed: %s",
                        kind,
                        parent_id,
                        inner,
                        extra={"parent_id": parent_id},
                    )
            raise

    # -- groups and chains: keeping their state ---------------------------------------------

    async def _member_changed(
        self,
        msg: JobMessage,
        status: Status,
        error: str | None = None,
        *,
        trace: dict[str, str] | None = None,
        ended: list[tuple[str, Status]] | None = None,
    ) -> list[tuple[JobMessage, bytes]]:
        """Record that a member of a group or chain reached ``status``.

        Updates the parent's status (and publishes its end, or, given ``ended``, appends
        ``(parent id, status)`` to it for the caller to publish once the member's own
        follow-ups exist); for a chain link that succeeded, returns the next link's
        prepared message, to be enqueued with the ack.
        """
        meta = msg.meta
        parent_id = meta.group_id or meta.chain_id
        if parent_id is None:
            return []
        kind = GROUP if meta.group_id is not None else CHAIN
        try:
            counts = await self.results.set_member_status(parent_id, msg.id, status.value)
        except NotFoundError:
            return []  # the parent was deleted or expired
        total = sum(counts.values())
        if kind == CHAIN and status is Status.SUCCESSFUL:
            record = await self.results.get_parent(parent_id)
            if record.status in FINAL_STATUSES:
                return []  # cancelled or past its deadline: no further links
            try:
                info = decode_parent(record.data)
                index = info.job_ids.index(msg.id) if msg.id in info.job_ids else len(info.job_ids)
                link = job_from_wire(info.links[index + 1]) if index + 1 < len(info.links) else None
            except DecodeError as exc:
                # a damaged record (or one an older version wrote): the next link is not
                # known, so the chain ends here rather than send its message back for ever
                self.log.error("chain %s: its record does not decode: %s", parent_id, exc)
                await self._end_parent(
                    parent_id, Status.FAILED, f"its record does not decode: {exc}", ended=ended
                )
                return []
            if link is not None:
                try:
                    prev_result: bytes | None = await self.results.get_result(msg.id)
                except NotFoundError:
                    prev_result = None
                try:
                    prepared = self._new_message(
                        link,
                        chain_id=parent_id,
                        deadline=info.deadline,
                        prev_job_result=prev_result,
                        trace=msg.meta.trace if trace is None else trace,
                    )
                except PayloadTooLargeError as exc:
                    await self._end_parent(
                        parent_id,
                        Status.FAILED,
                        f"link {link.id} cannot be enqueued: {exc}",
                        ended=ended,
                    )
                    return []
                await self.results.set_parent_status(
                    parent_id, Status.PROCESSING.value, expect=(Status.QUEUED.value,)
                )
                return [prepared]
        new = parent_status(kind, counts, total)
        if new is Status.PROCESSING:
            await self.results.set_parent_status(
                parent_id, new.value, expect=(Status.QUEUED.value,)
            )
        elif new is not None:
            reason = None if new is Status.SUCCESSFUL else f"job {msg.id} {status.value}: {error}"
            await self._end_parent(parent_id, new, reason, ended=ended)
            if kind == GROUP and new is Status.SUCCESSFUL:
                # also when the group had ended already (a redelivery of its last member):
                # the then job is created once (create_jobs), enqueued at least once
                return await self._then_message(parent_id, msg, trace)
        return []

    async def _then_message(
        self, group_id: str, msg: JobMessage, trace: dict[str, str] | None
    ) -> list[tuple[JobMessage, bytes]]:
        """The message of a succeeded group's ``then`` job (none when it has none), with
        the members' results as its previous result, to be enqueued with the ack of the
        member that ended the group."""
        record = await self.results.get_parent(group_id)
        if record.status != Status.SUCCESSFUL.value:
            return []
        try:
            info = decode_parent(record.data)
            then = job_from_wire(info.links[0]) if info.links else None
        except DecodeError as exc:
            self.log.error("group %s: its record does not decode: %s", group_id, exc)
            return []
        if then is None:
            return []
        codec = self.codec
        values: list[Any] = []
        for member_id in info.job_ids:
            try:
                data = await self.results.get_result(member_id)
            except NotFoundError:
                values.append(None)
                continue
            try:
                values.append(codec.decode(data))
            except DecodeError:
                values.append(data)  # a bytes-level member's result, as it is
        trace = msg.meta.trace if trace is None else trace
        try:
            return [self._new_message(then, prev_job_result=codec.encode(values), trace=trace)]
        except (PayloadTooLargeError, InvalidInputError) as exc:
            # it cannot carry the results: it fails, saying why (its state is created
            # failed; nothing runs)
            failed, data = self._new_message(then, trace=trace)
            failed = JobMessage(
                meta=attrs.evolve(
                    failed.meta,
                    status=Status.FAILED,
                    prev_error=f"{type(exc).__name__}: its group's results: {exc}",
                ),
                job=then,
            )
            data = self._encode(failed)
            if await self.results.create_jobs(
                {then.id: JobRecord(status=Status.FAILED.value, data=data)}
            ):
                await self._publish_finished(then.id, Status.FAILED)
            return []

    async def _end_parent(
        self,
        parent_id: str,
        status: Status,
        error: str | None,
        *,
        stop: Collection[str] = (),
        ended: list[tuple[str, Status]] | None = None,
    ) -> bool:
        """Move a group or chain to a final status (once) and publish its end.

        Members whose status is in ``stop`` are cancelled (queued ones never start,
        running ones are stopped); a chain that did not succeed marks the links it never
        reached ``cancelled``.

        :return: whether this call ended it
        """
        if not await self.results.set_parent_status(
            parent_id, status.value, expect=_NOT_FINAL, error=error
        ):
            return False
        with self._finishing():  # it ended: stop its members and announce it, come what may
            record = await self.results.get_parent(parent_id)
            for member_id, member_status in record.members.items():
                if member_status in FINAL_STATUSES:
                    continue
                if member_status in stop:
                    try:
                        member = await self.results.request_cancel(member_id)
                    except JobNotFoundError:  # a chain link not reached
                        await self.results.set_member_status(
                            parent_id, member_id, Status.CANCELLED.value
                        )
                        continue
                    await self._cancelled(member_id, member)
                elif record.kind == CHAIN and status is not Status.SUCCESSFUL:
                    try:
                        await self.results.get_job(member_id)
                    except NotFoundError:  # a link never reached will not run
                        await self.results.set_member_status(
                            parent_id, member_id, Status.CANCELLED.value
                        )
            if ended is None:
                await self._publish_parent(parent_id, status)
            else:
                ended.append((parent_id, status))
        return True

    def _finishing(self) -> anyio.CancelScope:
        """A shield for the steps that must follow a first write (a cancelled job's
        parent told, a parent's members stopped, ends announced): a cancellation of the
        caller waits for them, for at most ``finalize_timeout`` seconds (a backend that
        hangs is not waited on for ever; ``wait_group``/``wait_chain`` then repair the
        parent on their next re-read), and never past the end of a shutdown of
        :meth:`run` (which the shield would otherwise hold up)."""
        deadline = anyio.current_time() + self.finalize_timeout
        deadline = min(deadline, self._hard_stop)
        return anyio.CancelScope(shield=True, deadline=deadline)

    async def _publish_parent(self, parent_id: str, status: Status) -> None:
        """Announce that a group or chain ended (wakes :meth:`wait_group`/:meth:`wait_chain`)."""
        await self.broker.publish(
            EVENTS_CHANNEL, encode_event(EVENT_PARENT, parent_id, status.value)
        )

    # -- inspection -------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobMessage:
        """The job's message with its current status.

        :raises JobNotFoundError: no job is stored under ``job_id``
        """
        record = await self.results.get_job(validate_id(job_id))
        return self._decode_record(record)

    def _decode_record(self, record: JobRecord) -> JobMessage:
        msg = decode_message(record.data, max_size=self.max_message_size)
        msg = with_status(msg, Status(record.status))
        if record.progress:
            msg = attrs.evolve(msg, progress=decode_progress(record.progress))
        return msg

    async def get_result(self, job_id: str) -> bytes:
        """The result the job saved with ``ctx.save``.

        :raises ResultNotFoundError: the job saved nothing (yet)
        """
        return await self.results.get_result(validate_id(job_id))

    async def get_pending(self, queue: str = DEFAULT_QUEUE) -> list[JobMessage]:
        """Jobs whose messages wait on ``queue`` (due, not taken by a worker), oldest
        first, each with its job's stored status: a job cancelled while queued is listed
        ``cancelled`` until a worker takes its message and drops it.

        One results read per listed job. Messages that do not decode are skipped here (a
        worker dead-letters them); a job whose state is gone keeps its message's status.
        """
        return await self._with_stored_status(
            self._decode_many(await self.broker.get_pending(validate_queue(queue)))
        )

    async def get_scheduled(self, queue: str = DEFAULT_QUEUE) -> list[JobMessage]:
        """Jobs on ``queue`` waiting for their ETA (retries with backoff included), with
        their stored status as :meth:`get_pending` shows it."""
        return await self._with_stored_status(
            self._decode_many(
                [d for _, d in await self.broker.get_scheduled(validate_queue(queue))]
            )
        )

    async def _with_stored_status(self, messages: list[JobMessage]) -> list[JobMessage]:
        out = []
        for msg in messages:
            try:
                record = await self.results.get_job(msg.id)
            except NotFoundError:
                out.append(msg)
                continue
            out.append(with_status(msg, Status(record.status)))
        return out

    def _decode_many(self, items: Iterable[bytes]) -> list[JobMessage]:
        out = []
        for data in items:
            try:
                out.append(decode_message(data, max_size=self.max_message_size))
            except DecodeError:
                continue
        return out

    async def get_dead_letters(self, queue: str = DEFAULT_QUEUE) -> list[DeadLetter]:
        """Messages of ``queue`` that could not be decoded and were set aside."""
        return await self.broker.get_dead_letters(validate_queue(queue))

    async def replay_dead_letters(
        self, queue: str = DEFAULT_QUEUE, ids: Collection[str] | None = None
    ) -> list[JobHandle[Any]]:
        """Put dead letters of ``queue`` back on it (those of ``ids``, or all): after a
        fix that makes them decode (a newer version, say).

        Each dead letter whose message decodes now is recorded ``queued`` again (the
        job its dead-lettering failed runs anew) and enqueued, then removed from the dead
        letters; one that still does not decode stays a dead letter (as does one an
        older version stored without an id: remove those with
        ``broker.remove_dead_letters(queue)``). Enqueueing comes
        first, with a message id made of the job and the dead letter's ids, so a replay
        repeated (or run twice at once) enqueues each once while it waits, and a crash in
        between leaves the dead letter to replay again.

        :return: the handles of the jobs put back
        """
        queue = validate_queue(queue)
        wanted = None if ids is None else set(ids)
        prepared: list[tuple[DeadLetter, JobMessage, bytes]] = []
        for letter in await self.broker.get_dead_letters(queue):
            if not letter.id or (wanted is not None and letter.id not in wanted):
                continue  # one stored without an id cannot be removed alone: left
            try:
                msg = decode_message(letter.data, max_size=self.max_message_size)
            except DecodeError:
                continue  # still undecodable: it stays where it is
            again = with_status(msg, Status.QUEUED)
            prepared.append((letter, again, self._encode(again)))
        if not prepared:
            return []
        await self.results.set_jobs(
            {msg.id: JobRecord(status=Status.QUEUED.value, data=data) for _, msg, data in prepared}
        )
        await self.broker.enqueue_many(
            [
                Envelope(
                    queue=queue,
                    data=data,
                    id=f"{msg.id}/replay:{letter.id}",
                    priority=msg.job.priority,
                )
                for letter, msg, data in prepared
            ]
        )
        await self.broker.remove_dead_letters(queue, [letter.id for letter, _, _ in prepared])
        return [JobHandle(msg.id, self) for _, msg, _ in prepared]

    async def delete_dead_letters(
        self, queue: str = DEFAULT_QUEUE, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        """Remove dead letters of ``queue`` (those of ``ids``, or all) without replaying
        them: messages nobody will fix. Their jobs' states stay as the dead-lettering left
        them (``failed``, with the reason).

        :return: the dead letters removed, oldest first
        """
        return await self.broker.remove_dead_letters(validate_queue(queue), ids)

    async def purge(self, queue: str = DEFAULT_QUEUE) -> int:
        """Remove every job waiting on ``queue`` (due, or waiting for an ETA or a retry's
        backoff; running jobs go on) and record each ``cancelled``, as :meth:`cancel`
        does (its group or chain hears of it; waiters wake).

        :return: how many messages were removed
        """
        removed = await self.broker.purge(validate_queue(queue))
        for data in removed:
            job_id = peek_message(data, self.max_message_size).id
            if job_id is None:
                continue  # not readable: nothing to record
            with contextlib.suppress(JobNotFoundError):
                await self.cancel(job_id)
        return len(removed)

    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``."""
        return await self.results.get_success()

    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``."""
        return await self.results.get_failed()

    async def delete_job(self, job_id: str) -> None:
        """Forget a job's state and result (a queued message still runs if not cancelled)."""
        await self.results.delete_job(validate_id(job_id))

    async def retry(self, job_id: str) -> JobHandle[Any]:
        """Run a ``failed`` or ``cancelled`` job again: a new attempt, queued at once.

        The job keeps its id, payload and options; its ``meta.retried`` counts one more
        (so a failure of this attempt is retried only if ``max_retries`` still allows
        it) and its ``meta.prev_error`` keeps the error it ended with until this attempt
        ends; that error is also added to ``meta.errors``, the job's history of the
        errors it ended with before each retry (the last
        ``MAX_ERROR_HISTORY`` (8), 4096 bytes at most together). Its follow-ups run again according to how this attempt ends. It stays in
        the failed listing until this attempt ends (then it is listed by its new end).

        :return: the job's handle
        :raises JobNotFoundError: no job is stored under ``job_id``
        :raises InvalidInputError: the job is not ``failed`` or ``cancelled``, or it is a
            member of a group or chain (retry the group's jobs by enqueueing a new group)
        """
        record = await self.results.get_job(validate_id(job_id))
        if record.status not in (Status.FAILED.value, Status.CANCELLED.value):
            raise InvalidInputError(
                f"job {job_id} is {record.status}: only a failed or cancelled job can be retried"
            )
        msg = self._decode_record(record)
        meta = msg.meta
        parent = meta.group_id or meta.chain_id
        if parent is not None:
            raise InvalidInputError(
                f"job {job_id} is a member of {parent}: a member cannot be retried alone"
            )
        ended_with = meta.prev_error or f"{record.status} (no error recorded)"
        again = JobMessage(
            meta=attrs.evolve(
                meta,
                status=Status.QUEUED,
                retried=meta.retried + 1,
                eta=None,
                attempt=0,
                processed_at=None,
                trace=self.tracing.carrier(),
                errors=error_history(meta.errors, ended_with),
            ),
            job=msg.job,
        )
        data = self._encode(again)
        self._check_fits(again, data)
        # a new state (cancel_requested cleared: a cancelled job may have one), then its
        # message; a retry repeated concurrently enqueues the same message id (deduplicated)
        await self.results.set_jobs({job_id: JobRecord(status=Status.QUEUED.value, data=data)})
        try:
            await self.broker.enqueue_many([envelope(again, data)])
        except BaseException:
            with self._finishing():  # the job is as it was: not queued with no message
                await self.results.set_jobs(
                    {job_id: JobRecord(status=record.status, data=record.data)}
                )
            raise
        return JobHandle(job_id, self)

    async def get_group(self, group_id: str) -> GroupMessage:
        """The state of a group: its status and each member's, kept up to date as members
        end (one read, however large the group).

        :raises NotFoundError: no group is stored under ``group_id``
        """
        record, info = await self._get_parent(group_id, GROUP)
        return GroupMessage(
            id=group_id,
            status=Status(record.status),
            jobs={job_id: Status(record.members.get(job_id, "queued")) for job_id in info.job_ids},
            created_at=info.created_at,
            deadline=info.deadline,
            error=record.error,
        )

    async def get_chain(self, chain_id: str) -> ChainMessage:
        """The state of a chain: its status, current link and previous links.

        :raises NotFoundError: no chain is stored under ``chain_id``
        """
        record, info = await self._get_parent(chain_id, CHAIN)
        jobs = {job_id: Status(record.members.get(job_id, "queued")) for job_id in info.job_ids}
        current = 0
        for index, job_id in enumerate(info.job_ids):
            current = index
            if jobs[job_id] is not Status.SUCCESSFUL:
                break
        return ChainMessage(
            id=chain_id,
            status=Status(record.status),
            current_job=info.job_ids[current],
            prev_jobs=list(info.job_ids[:current]),
            jobs=jobs,
            created_at=info.created_at,
            deadline=info.deadline,
            error=record.error,
        )

    async def _get_parent(self, parent_id: str, kind: str) -> tuple[ParentRecord, ParentInfo]:
        try:
            record = await self.results.get_parent(validate_id(parent_id, f"{kind} id"))
        except NotFoundError:
            raise NotFoundError(f"no {kind} is stored under {parent_id!r}") from None
        if record.kind != kind:
            raise NotFoundError(f"{parent_id!r} is a {record.kind}, not a {kind}")
        info = decode_parent(record.data)
        if (
            record.status not in FINAL_STATUSES
            and info.deadline is not None
            and self.clock() >= info.deadline
        ):
            # Nothing may run past the deadline: end it now, even if no worker noticed.
            await self._end_parent(
                parent_id, Status.FAILED, f"timeout: the {kind}'s deadline passed", stop=_WAITING
            )
            record = await self.results.get_parent(parent_id)
        return record, info

    async def wait_group(self, group_id: str, *, timeout: float | None = None) -> GroupMessage:
        """Wait until the group is ``successful``, ``failed`` or ``cancelled``; return it.

        Woken by the group's end event; without one it re-reads the group as
        :meth:`wait` does, and then also passes on member ends the group missed (a
        process stopped between recording a member's end and telling the group; see
        ``RECHECK_FIRST``). :meth:`get_group` shows the group as stored.

        :raises TimeoutError: it did not end within ``timeout`` seconds
        :raises NotFoundError: no group is stored under ``group_id``
        """
        return await self._wait_parent(group_id, timeout, self.get_group)

    async def wait_chain(self, chain_id: str, *, timeout: float | None = None) -> ChainMessage:
        """Wait until the chain is ``successful``, ``failed`` or ``cancelled``; return it.

        Re-reads and repairs as :meth:`wait_group` does.

        :raises TimeoutError: it did not end within ``timeout`` seconds
        :raises NotFoundError: no chain is stored under ``chain_id``
        """
        return await self._wait_parent(chain_id, timeout, self.get_chain)

    async def _wait_parent(
        self,
        parent_id: str,
        timeout: float | None,
        get: Callable[[str], Awaitable[_P]],
    ) -> _P:
        if self._exit_stack is None:
            raise RuntimeError("waiting needs an open server: use `async with server:`")
        waiters = self._parent_waiters.setdefault(parent_id, set())
        event = anyio.Event()
        waiters.add(event)
        try:
            with anyio.fail_after(timeout):
                recheck = RECHECK_FIRST
                while True:
                    state = await get(parent_id)
                    if state.status.is_final:
                        return state
                    sleep = recheck
                    if state.deadline is not None:
                        sleep = min(sleep, max(0.0, state.deadline - self.clock()) + 0.01)
                    with anyio.move_on_after(sleep) as idle:
                        await event.wait()
                    waiters.discard(event)
                    event = anyio.Event()
                    waiters.add(event)
                    if idle.cancelled_caught:  # no event: also pass on ends it missed
                        recheck = min(RECHECK_MAX, recheck * 2)
                        await self._repair_parent(parent_id)
        finally:
            waiters.discard(event)
            if not waiters:
                self._parent_waiters.pop(parent_id, None)

    async def _repair_parent(self, parent_id: str) -> None:
        """Pass on to a group or chain that has not ended the member ends it missed: a
        member whose own record is final while the parent still has it running or
        queued (a process stopped between the two writes, and no redelivery of the
        member's message will come, as after an interrupted :meth:`cancel`), and end it
        if its members' statuses say it ended.

        Cost: one read of the parent, one per member it has as not ended, and one more
        of the parent when any was passed on. A chain's link that succeeded is left to
        the redelivery of its message, which enqueues the next link too.
        """
        try:
            record = await self.results.get_parent(parent_id)
        except NotFoundError:
            return
        if record.status in FINAL_STATUSES:
            return
        repaired = False
        for member_id, member_status in record.members.items():
            if member_status in FINAL_STATUSES:
                continue
            try:
                job = await self.results.get_job(member_id)
                msg = self._decode_record(job)
            except (NotFoundError, DecodeError):
                continue
            if job.status not in FINAL_STATUSES or (
                record.kind == CHAIN and job.status == Status.SUCCESSFUL.value
            ):
                continue
            if parent_id not in (msg.meta.group_id, msg.meta.chain_id):
                continue
            await self._member_changed(msg, msg.status, msg.meta.prev_error)
            repaired = True
        if repaired:
            record = await self.results.get_parent(parent_id)
        counts: dict[str, int] = {}
        for member_status in record.members.values():
            counts[member_status] = counts.get(member_status, 0) + 1
        new = parent_status(record.kind, counts, len(record.members))
        if record.status in FINAL_STATUSES or new is None or not new.is_final:
            return
        # every member end is recorded, yet the parent did not end: end it as the last
        # member's end would have
        member_id = next(m for m, st in record.members.items() if st == new.value)
        try:
            msg = self._decode_record(await self.results.get_job(member_id))
        except (NotFoundError, DecodeError):
            return
        await self._member_changed(msg, new, msg.meta.prev_error)

    # -- cron schedules -----------------------------------------------------------------------

    def _schedule_record(self, job: Job) -> ScheduleRecord:
        """The stored form of cron job ``job`` (no I/O).

        :raises InvalidInputError: the expression has no fire time after now (this
            server's clock) or after the job's ``eta``
        """
        assert job.schedule is not None
        now = self.clock()
        first = job.eta_timestamp(now)
        following = next_fire(job.schedule, now if first is None else max(first, now))
        return ScheduleRecord(
            id=job.id, data=encode_template(job), next_fire=following if first is None else first
        )

    async def _add_schedule(self, record: ScheduleRecord) -> None:
        await self.results.set_schedule(record)
        await self.broker.publish(EVENTS_CHANNEL, encode_event(EVENT_SCHEDULE, record.id))

    async def get_schedules(self) -> list[Schedule]:
        """The stored cron schedules, by id."""
        schedules = []
        for record in await self.results.get_schedules():
            try:
                job = decode_template(record.data)
            except DecodeError as exc:
                self.log.error("schedule %s is unreadable: %s", record.id, exc)
                continue
            assert job.schedule is not None
            schedules.append(
                Schedule(id=record.id, cron=job.schedule, job=job, next_fire=record.next_fire)
            )
        return schedules

    async def get_workers(self) -> list[WorkerRecord]:
        """The running workers (each ``Server.run()`` of every process on these backends),
        as their last heartbeats, ordered by start time: their queues, the jobs in hand
        (at most :data:`~tasqueue_anyio.abc.MAX_WORKER_JOBS`) and when they were last
        seen. A worker that died leaves the list ``WORKER_TTL`` (15) seconds after its
        last heartbeat; one that stopped leaves it at once."""
        return await self.results.get_workers()

    async def remove_schedule(self, schedule_id: str) -> bool:
        """Remove a cron schedule (runs already enqueued still run: cancel them by id).

        :return: whether it existed
        """
        removed = await self.results.delete_schedule(validate_id(schedule_id, "schedule id"))
        if removed:
            await self.broker.publish(EVENTS_CHANNEL, encode_event(EVENT_SCHEDULE, schedule_id))
        return removed

    async def _enqueue_run(self, schedule_id: str, template: Job, fire: float) -> str:
        """Enqueue the run of a schedule at ``fire`` (called by the scheduler that won it)."""
        run = attrs.evolve(
            template, id=run_id(schedule_id, fire), schedule=None, eta=None, delay=None
        )
        msg, _ = self._new_message(run)
        msg = JobMessage(meta=attrs.evolve(msg.meta, schedule=template.schedule), job=run)
        data = self._encode(msg)
        created = await self.results.create_jobs(
            {run.id: JobRecord(status=Status.QUEUED.value, data=data)}
        )
        if run.id not in created:
            # Another scheduler enqueued it (or is about to), or an earlier pass recorded
            # it and then failed to enqueue it (a broker error, a crash). While the run is
            # still queued, enqueue it again: a message the broker still has is not stored
            # twice (Broker.enqueue_many), and one it never got would leave the fire time
            # recorded queued and never run.
            try:
                current = await self.results.get_job(run.id)
            except NotFoundError:
                return run.id
            if current.status != Status.QUEUED.value:
                return run.id
        await self.broker.enqueue_many([envelope(msg, data)])
        return run.id

    def wake_scheduler(self) -> None:
        """Make this server's scheduler look at the schedules now (after moving a test clock)."""
        if self._scheduler is not None:
            self._scheduler.wake()

    # -- control ----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> Status:
        """Cancel a job, group or chain wherever it is.

        A queued (or retry-waiting) job becomes ``cancelled`` at once and never starts, on
        any worker, also one started later. A running job's cancel scope is cancelled on
        the worker running it, which records ``cancelled``. Cancelled jobs get no success
        callback and no follow-up jobs. A finished job is left as it is.

        Given a group or chain id (and no job has that id), the group or chain ends
        ``cancelled`` and every member still queued or running is cancelled as above.

        :return: the status right after the request (``processing`` for a running job:
            use :meth:`wait` for its end)
        :raises JobNotFoundError: no job, group or chain is stored under ``job_id``
        """
        try:
            record = await self.results.request_cancel(validate_id(job_id))
        except JobNotFoundError:
            return await self._cancel_parent(job_id)
        with self._finishing():  # the cancel is written: its parent must hear of it
            await self._cancelled(job_id, record)
        return Status(record.status)

    async def _cancelled(self, job_id: str, record: JobRecord) -> None:
        """Pass on a cancel request written as ``record``: to the job's group or chain
        (before its end is announced) if it ended ``cancelled``, else to its running
        run."""
        if record.status == Status.CANCELLED.value:
            try:
                msg = self._decode_record(record)
            except DecodeError:
                msg = None
            if msg is not None:
                await self._member_changed(msg, Status.CANCELLED, "cancelled")
            await self._publish_finished(job_id, Status.CANCELLED)
        elif record.status not in FINAL_STATUSES:
            for active in self._active.get(job_id, ()):
                active.cancel()
            await self.broker.publish(EVENTS_CHANNEL, encode_event(EVENT_CANCEL, job_id))

    async def _cancel_parent(self, parent_id: str) -> Status:
        try:
            record = await self.results.get_parent(parent_id)
        except NotFoundError:
            raise JobNotFoundError(
                f"no job, group or chain is stored under {parent_id!r}"
            ) from None
        if record.status not in FINAL_STATUSES:
            await self._end_parent(parent_id, Status.CANCELLED, "cancelled", stop=_STOPPABLE)
        return Status((await self.results.get_parent(parent_id)).status)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobMessage:
        """Wait until the job is ``successful``, ``failed`` or ``cancelled``; return it.

        Woken by the job's end event; events are best effort, so it also re-reads the
        job after ``RECHECK_FIRST`` seconds without one, then at doubling intervals up
        to ``RECHECK_MAX``. Needs an open server (``async with server:``).

        :raises TimeoutError: the job did not end within ``timeout`` seconds: the
            built-in error, about this *wait* (the job goes on, nothing about it
            changed). Not :class:`~tasqueue_anyio.JobTimeoutError`, which is a job's
            own ``timeout`` passing: the run is stopped and fails with it (the job is
            retried if retries remain), and the final message's ``meta.prev_error``
            says so
        :raises JobNotFoundError: no job is stored under ``job_id``
        """
        if self._exit_stack is None:
            raise RuntimeError("Client.wait() needs an open server: use `async with server:`")
        validate_id(job_id)
        await self._listen_finished()  # before reading the state: no end goes unseen
        event = anyio.Event()
        waiters = self._waiters.setdefault(job_id, set())
        waiters.add(event)
        try:
            with anyio.fail_after(timeout):
                recheck = RECHECK_FIRST
                while True:
                    msg = await self.get_job(job_id)
                    if msg.status.is_final:
                        return msg
                    with anyio.move_on_after(recheck) as idle:
                        await event.wait()
                    if idle.cancelled_caught:
                        recheck = min(RECHECK_MAX, recheck * 2)
                    waiters.discard(event)
                    event = anyio.Event()
                    waiters.add(event)
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)

    def _check_result(self, job_id: str, result: bytes) -> None:
        """Refuse a result over ``max_payload_size`` (a result may become the next chain
        link's input) or over what the store holds.

        :raises PayloadTooLargeError: it is too large
        """
        if len(result) > self.max_payload_size:
            raise PayloadTooLargeError(f"job {job_id}'s result", len(result), self.max_payload_size)
        limit = self.results.max_message_size
        if limit is not None and len(result) > limit:
            raise PayloadTooLargeError(
                f"job {job_id}'s result",
                len(result),
                limit,
                cause=f"{self.results!r} stores at most that: {self.results.message_limit_cause}",
            )

    async def _save_result(self, job_id: str, result: bytes, *, run: str | None = None) -> None:
        """Store a job's result (what ``ctx.save`` calls), checked by :meth:`_check_result`.

        :param run: the fencing token of the run saving it, if any
        :raises LeaseLostError: that run no longer owns the job (nothing is saved)
        """
        self._check_result(job_id, result)
        if not await self.results.set_result(job_id, result, run=run):
            raise LeaseLostError(
                f"job {job_id}: this run no longer owns the job (its lease was lost and "
                f"another worker took it over, or it ended); the result was not saved"
            )

    async def _save_progress(self, job_id: str, progress: bytes, *, run: str) -> None:
        """Store a running job's progress and announce it (``EVENT_PROGRESS``); a run
        that no longer owns the job stores nothing (its progress is moot)."""
        if await self.results.set_progress(job_id, progress, run=run):
            await self.broker.publish(FINISHED_CHANNEL, encode_event(EVENT_PROGRESS, job_id))

    async def counts(self, queue: str = DEFAULT_QUEUE) -> Counts:
        """How many jobs ``queue`` holds (pending, scheduled, in flight, dead) and how many
        jobs ended (successful, failed), without listing them: one count call to each
        backend (see each backend's ``count`` for its cost).
        """
        queue = validate_queue(queue)
        held = await self.broker.count(queue)
        ended = await self.results.count_ended()
        return Counts(
            queue=queue,
            pending=held.pending,
            scheduled=held.scheduled,
            in_flight=held.in_flight,
            dead=held.dead,
            successful=ended.successful,
            failed=ended.failed,
        )

    async def _publish_finished(self, job_id: str, status: Status) -> None:
        """Announce that a job ended (wakes :meth:`wait` callers, on any server)."""
        await self.broker.publish(*finished_event(job_id, status.value))

_NOT_FINAL = (Status.QUEUED.value, Status.PROCESSING.value)
#: members a cancel stops, and members a deadline stops (running ones meet the deadline
#: in their own cancel scope)
_STOPPABLE = (Status.QUEUED.value, Status.PROCESSING.value, Status.RETRYING.value)
_WAITING = (Status.QUEUED.value, Status.RETRYING.value)
_P = TypeVar("_P", GroupMessage, ChainMessage)


def envelope(msg: JobMessage, data: bytes) -> Envelope:
    """The queue envelope of an encoded job message (its id names the job and run)."""
    meta = msg.meta
    priority = msg.job.priority
    if priority:
        return Envelope(
            queue=meta.queue,
            data=data,
            id=f"{msg.id}/{meta.retried}",
            eta=meta.eta,
            priority=priority,
        )
    return Envelope(queue=meta.queue, data=data, id=f"{msg.id}/{meta.retried}", eta=meta.eta)



# -- the typed face: task functions, handles, counts ------------------------------------------

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
R_co = TypeVar("R_co", covariant=True)
_M = TypeVar("_M", GroupMessage, ChainMessage)


@attrs.frozen(kw_only=True)
class Counts:
    """How many jobs a queue holds, and how many jobs ended (:meth:`~tasqueue_anyio.Client.counts`).

    :ivar pending: due and waiting for a worker
    :ivar scheduled: waiting for their ETA (a delay, or a retry's backoff)
    :ivar in_flight: taken by a worker and not settled yet (running, or fetched ahead of
        the worker's processors, which brokers with a network round trip do)
    :ivar dead: messages set aside as undecodable (dead letters)
    :ivar successful: jobs that ended ``successful`` (every queue; the store's listing)
    :ivar failed: jobs that ended ``failed`` (every queue; the store's listing)
    """

    queue: str
    pending: int
    scheduled: int
    in_flight: int
    dead: int
    successful: int
    failed: int

    @property
    def empty(self) -> bool:
        """Whether nothing on the queue is left to run (none pending, scheduled or in
        flight; dead letters do not count)."""
        return self.pending == 0 and self.scheduled == 0 and self.in_flight == 0


@attrs.frozen(kw_only=True)
class _Options:
    """The job options of a task function (``None``: the task's default)."""

    id: str | None = None
    queue: str | None = None
    max_retries: int | None = None
    backoff: Backoff | None = None
    timeout: float | None = None
    eta: datetime | None = None
    delay: float | None = None
    schedule: str | None = None
    on_success: tuple[Job, ...] = ()
    on_error: tuple[Job, ...] = ()
    priority: int | None = None
    unique_for: float | None = None
    successful_ttl: float | None = None
    failed_ttl: float | None = None


class TaskFunction(Generic[P, R_co]):
    """A typed task: what ``@server.task()`` returns.

    It keeps the function's signature for type checkers: ``await add.enqueue(40, 2)``
    takes exactly ``add``'s arguments and gives a :class:`JobHandle` of its return type.
    Job options never mix with the function's own arguments: they go through
    :meth:`options`, which returns a copy carrying them::

        job = await add.options(delay=5, max_retries=3).enqueue(40, 2)

    Calling the task function calls the function itself, here and now (handy in unit
    tests); ``fn`` is the function.

    :ivar name: the registered task name
    :ivar queue: the task's queue
    """

    def __init__(
        self,
        client: Client,
        name: str,
        queue: str,
        fn: Callable[..., Any],
        options: _Options,
    ) -> None:
        self._client = client
        self.name = name
        self.queue = queue
        self.fn = fn
        self._options = options
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<TaskFunction {self.name!r} on queue {self.queue!r}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the function itself (no job: for a unit test)."""
        return self.fn(*args, **kwargs)

    def options(
        self,
        *,
        id: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        eta: datetime | None = None,
        delay: float | None = None,
        schedule: str | None = None,
        timezone: str | None = None,
        on_success: Sequence[Job] = (),
        on_error: Sequence[Job] = (),
        priority: int | None = None,
        unique_for: float | None = None,
        successful_ttl: float | None = None,
        failed_ttl: float | None = None,
    ) -> TaskFunction[P, R_co]:
        """A copy of this task function whose jobs carry these options (see :class:`Job`
        for each; ``None`` keeps the task's default). Checked when a job is built.

        ``schedule`` (a cron expression) makes :meth:`enqueue` create a cron schedule
        whose runs call the function with the given arguments; ``timezone`` (an IANA
        name) is the time zone it is evaluated in (default UTC), the same as a
        ``"CRON_TZ=Europe/Paris ..."`` prefix.

        ``id`` is also the job's dedupe key: while a job with that id is queued,
        scheduled or running (and for ``unique_for`` seconds after it ended), enqueueing
        it again stores nothing and returns the live job's handle::

            await report.options(id=f"report:{day}", unique_for=3600).enqueue(day)

        :raises InvalidInputError: ``timezone`` without ``schedule``, or an unknown zone
        """
        if timezone is not None:
            if schedule is None:
                raise InvalidInputError("timezone= goes with schedule=")
            schedule = with_time_zone(schedule, timezone)
        o = self._options
        options = _Options(
            id=o.id if id is None else id,
            queue=o.queue if queue is None else queue,
            max_retries=o.max_retries if max_retries is None else max_retries,
            backoff=o.backoff if backoff is None else backoff,
            timeout=o.timeout if timeout is None else timeout,
            eta=o.eta if eta is None else eta,
            delay=o.delay if delay is None else delay,
            schedule=o.schedule if schedule is None else schedule,
            on_success=tuple(on_success) or o.on_success,
            on_error=tuple(on_error) or o.on_error,
            priority=o.priority if priority is None else priority,
            unique_for=o.unique_for if unique_for is None else unique_for,
            successful_ttl=o.successful_ttl if successful_ttl is None else successful_ttl,
            failed_ttl=o.failed_ttl if failed_ttl is None else failed_ttl,
        )
        return TaskFunction(self._client, self.name, self.queue, self.fn, options)

    def _job(
        self,
        codec: Codec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        previous: bool = False,
    ) -> Job:
        o = self._options
        extra: dict[str, Any] = {}
        if o.id is not None:
            extra["id"] = o.id
        return Job(
            self.name,
            encode_args(codec, args, kwargs, previous=previous),
            queue=o.queue if o.queue is not None else self.queue,
            max_retries=o.max_retries if o.max_retries is not None else 0,
            backoff=o.backoff,
            timeout=o.timeout,
            eta=o.eta,
            delay=o.delay,
            schedule=o.schedule,
            on_success=o.on_success,
            on_error=o.on_error,
            priority=o.priority or 0,
            unique_for=o.unique_for,
            successful_ttl=o.successful_ttl,
            failed_ttl=o.failed_ttl,
            **extra,
        )

    def job(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """The :class:`Job` that calls the function with these arguments: for groups,
        chains and follow-ups (its payload is the codec's ``[args, kwargs]``).

        :raises InvalidInputError: an argument the codec cannot carry, or a bad option
        """
        return self._job(self._client.codec, args, kwargs)

    def link(
        self: TaskFunction[Concatenate[Any, P2], R2], *args: P2.args, **kwargs: P2.kwargs
    ) -> Job:
        """The :class:`Job` of a chain link that takes the previous link's result as its
        first argument, followed by these (type checkers check them against the
        function's parameters after the first)::

            Chain([fetch.job(url), parse.link(strict=True), store.link()])

        The previous link's result is decoded by the codec (``None`` when it stored
        none). A link made with :meth:`job` gets only its own arguments.
        """
        return self._job(self._client.codec, args, kwargs, previous=True)

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R_co]:
        """Enqueue a job that calls the function with these arguments.

        :return: the job's handle (a ``str``: the job id)
        """
        return await self._client.enqueue(self, *args, **kwargs)


class _Handle(str):
    """A ``str`` (the id) bound to the client that made it."""

    _client: Client

    def __new__(cls: type[_HT], id: str, client: Client) -> _HT:
        handle = super().__new__(cls, id)
        handle._client = client
        return handle

    @property
    def id(self) -> str:
        """The id, as a plain ``str``."""
        return str(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self)!r}>"

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (and copies) as the plain id
        return (str, (str(self),))


def _failed(msg: JobMessage) -> Exception:
    if msg.status is Status.CANCELLED:
        return JobCancelledError(f"job {msg.id} was cancelled")
    return JobFailedError(msg.id, msg.meta.prev_error or "failed", msg)


class JobHandle(_Handle, Generic[R_co]):
    """A job enqueued by a client: its id (this is a ``str``) and the ways to follow it.

    ``R_co`` is the task function's return type: :meth:`result` gives a value of it.
    Rebuild one from an id with :meth:`Client.job`.
    """

    async def info(self) -> JobMessage:
        """The job's message with its current status and progress (``Client.get_job``)."""
        return await self._client.get_job(self)

    async def status(self) -> Status:
        """The job's current status."""
        return (await self._client.get_job(self)).status

    async def progress(self) -> Progress | None:
        """The job's last reported progress (``ctx.set_progress``), if any."""
        return (await self._client.get_job(self)).progress

    async def wait(self, *, timeout: float | None = None) -> JobMessage:
        """Wait for the job's end (``successful``, ``failed`` or ``cancelled``); see
        :meth:`Client.wait`.

        :raises TimeoutError: the job did not end within ``timeout`` seconds (the
            built-in error: this wait ran out, the job goes on; a job stopped by its own
            ``timeout`` ends ``failed`` with ``JobTimeoutError`` as its error)
        """
        return await self._client.wait(self, timeout=timeout)

    async def result(self, *, timeout: float | None = None) -> R_co:
        """Wait for the job's end and return its result, decoded by the client's codec.

        :raises JobFailedError: the job ended ``failed`` (its ``error`` is the recorded
            error, ``"JobTimeoutError: ..."`` for a job stopped by its own timeout)
        :raises JobCancelledError: the job was cancelled
        :raises TimeoutError: the job did not end within ``timeout`` seconds (the wait
            ran out; the job goes on)
        :raises ResultNotFoundError: it succeeded without a result (a bytes-level
            handler that saved none) or its result expired
        :raises DecodeError: the result is not in the codec's format (a bytes-level
            handler's result: use :meth:`result_bytes`)
        """
        value: R_co = self._client.codec.decode(await self.result_bytes(timeout=timeout))
        return value

    async def result_bytes(self, *, timeout: float | None = None) -> bytes:
        """As :meth:`result`, but the stored bytes, undecoded (a bytes-level job's result)."""
        msg = await self._client.wait(self, timeout=timeout)
        if msg.status is not Status.SUCCESSFUL:
            raise _failed(msg)
        return await self._client.get_result(self)

    async def cancel(self) -> Status:
        """Cancel the job (:meth:`Client.cancel`); return its status right after."""
        return await self._client.cancel(self)


class _ParentHandle(_Handle, Generic[_M], metaclass=ABCMeta):
    """What group and chain handles share: their record is a ``_M``."""

    @abstractmethod
    async def _read(self) -> _M:
        """The record (each kind reads its own)."""

    @abstractmethod
    async def _wait(self, timeout: float | None) -> _M:
        """Wait for the end; the final record."""

    async def info(self) -> _M:
        """The state and the members' (``Client.get_group`` / ``get_chain``)."""
        return await self._read()

    async def status(self) -> Status:
        """The current status."""
        return (await self._read()).status

    async def wait(self, *, timeout: float | None = None) -> _M:
        """Wait for the end; see :meth:`Client.wait_group` / :meth:`Client.wait_chain`.

        :raises TimeoutError: it did not end within ``timeout`` seconds
        """
        return await self._wait(timeout)

    async def _succeeded(self, timeout: float | None) -> _M:
        """Wait for the end; raise the failure of a failed member (the first, in order),
        else of the group or chain itself, unless it succeeded."""
        info = await self._wait(timeout)
        if info.status is not Status.SUCCESSFUL:
            await _raise_member_failure(self._client, info.jobs, info.status, info.id, info.error)
        return info

    async def cancel(self) -> Status:
        """Cancel it and its unfinished members; return its status after."""
        return await self._client.cancel(self)


class GroupHandle(_ParentHandle[GroupMessage]):
    """A group enqueued by a client: its id (a ``str``) and the ways to follow it."""

    _members: tuple[JobHandle[Any], ...] = ()
    _then: JobHandle[Any] | None = None

    @property
    def then(self) -> JobHandle[Any] | None:
        """The handle of the group's ``then`` job (known from the enqueue), if it has
        one. Its state exists once the group succeeded: use :meth:`then_result`."""
        return self._then

    async def then_result(self, *, timeout: float | None = None) -> Any:
        """Wait for the group's end, then for its ``then`` job's; return that job's
        result (decoded by the codec).

        :raises JobFailedError: a member failed (the group's ``then`` does not run), or
            the ``then`` job failed
        :raises JobCancelledError: the group, or the ``then`` job, was cancelled
        :raises TimeoutError: not all of it ended within ``timeout`` seconds
        :raises InvalidInputError: the group has no ``then`` job (this handle does not
            know one: a handle rebuilt from an id)
        """
        then = self._then
        if then is None:
            raise InvalidInputError(f"group {self.id} has no then job (that this handle knows)")
        with anyio.fail_after(timeout):
            await self._succeeded(None)
            while True:  # created with the last member's ack, just after the group's end
                try:
                    return await then.result()
                except JobNotFoundError:
                    await anyio.sleep(0.01)

    async def _read(self) -> GroupMessage:
        return await self._client.get_group(self)

    async def _wait(self, timeout: float | None) -> GroupMessage:
        return await self._client.wait_group(self, timeout=timeout)

    @property
    def jobs(self) -> list[JobHandle[Any]]:
        """Handles of the members, in the group's order (known from the enqueue)."""
        return list(self._members)

    async def result(self, *, timeout: float | None = None) -> list[Any]:
        """Wait for the group's end; return its members' results (decoded by the codec),
        in the group's order.

        :raises JobFailedError: a member failed (the first, in the group's order; its
            ``error`` says why), or the group failed (its timeout) with no failed member
        :raises JobCancelledError: the group was cancelled
        :raises TimeoutError: it did not end within ``timeout`` seconds
        """
        info = await self._succeeded(timeout)
        codec = self._client.codec
        return [codec.decode(await self._client.get_result(job_id)) for job_id in info.jobs]


class ChainHandle(_ParentHandle[ChainMessage]):
    """A chain enqueued by a client: its id (a ``str``) and the ways to follow it."""

    async def _read(self) -> ChainMessage:
        return await self._client.get_chain(self)

    async def _wait(self, timeout: float | None) -> ChainMessage:
        return await self._client.wait_chain(self, timeout=timeout)

    async def result(self, *, timeout: float | None = None) -> Any:
        """Wait for the chain's end; return its last link's result (decoded by the codec).

        :raises JobFailedError: a link failed (its ``error`` says why), or the chain
            failed (its timeout)
        :raises JobCancelledError: the chain was cancelled
        :raises TimeoutError: it did not end within ``timeout`` seconds
        """
        info = await self._succeeded(timeout)
        return self._client.codec.decode(await self._client.get_result(info.current_job))


async def _raise_member_failure(
    client: Client, members: dict[str, Status], status: Status, parent_id: str, error: str | None
) -> None:
    for job_id, member_status in members.items():
        if member_status is Status.FAILED:
            raise _failed(await client.get_job(job_id))
    if status is Status.CANCELLED:
        raise JobCancelledError(f"{parent_id} was cancelled" + (f": {error}" if error else ""))
    raise JobFailedError(parent_id, error or str(status), None, kind="group or chain")
