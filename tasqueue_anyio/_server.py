"""The :class:`Server`: task registry, the enqueue and inspection API, and ``run()``."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

import anyio
import attrs
from anyio.abc import TaskStatus

from ._codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EVENT_CANCEL,
    EVENT_FINISHED,
    EVENT_PARENT,
    EVENT_SCHEDULE,
    FINISHED_CHANNEL,
    decode_event,
    decode_message,
    encode_event,
    encode_message,
    finished_event,
    job_from_wire,
    job_to_wire,
    with_status,
)
from ._exceptions import (
    DecodeError,
    InvalidInputError,
    JobNotFoundError,
    LeaseLostError,
    NotFoundError,
    PayloadTooLargeError,
    QueueConcurrencyError,
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
    Job,
    JobContext,
    JobMessage,
    Meta,
    Status,
    validate_id,
    validate_queue,
)
from ._schedule import Schedule, Scheduler, decode_template, encode_template, next_fire, run_id
from ._tracing import Metrics, Tracing
from ._worker import MAX_ERROR_LENGTH, ActiveJob, Worker
from .abc import (
    FINAL_STATUSES,
    Broker,
    DeadLetter,
    Envelope,
    JobRecord,
    ParentRecord,
    Results,
    ScheduleRecord,
)

__all__ = ["EVENTS_CHANNEL", "FINISHED_CHANNEL", "Server", "Task"]

#: The broadcast channel for cancel requests, group/chain ends and schedule changes:
#: every open server listens to it.
EVENTS_CHANNEL = "events"

#: Seconds a wait (:meth:`Server.wait`, ``wait_group``, ``wait_chain``) goes without an
#: event before it re-reads the state itself: events are best effort (a broker may drop
#: them; the NATS broker does on a slow consumer). Each re-read that finds nothing new
#: doubles the pause, up to :data:`RECHECK_MAX`.
RECHECK_FIRST = 2.0
#: The longest pause between two re-reads of a wait (seconds).
RECHECK_MAX = 30.0

Handler = Callable[[bytes, JobContext], Awaitable[None] | None]
Callback = Callable[[JobContext], Awaitable[None] | None]
ErrorCallback = Callable[[JobContext, BaseException], Awaitable[None] | None]
H = TypeVar("H", bound=Handler)

_log = logging.getLogger("tasqueue_anyio.server")

#: Bytes a job's encoded message may grow by over its runs (a retry's error text, at most
#: MAX_ERROR_LENGTH bytes; its status, start time, attempt and retry counts, ETA): kept free
#: when a message is checked against a backend's ``max_message_size`` at enqueue.
RUN_ROOM = MAX_ERROR_LENGTH + 256
#: Seconds a failed enqueue may take to delete the records it wrote.
_FORGET_TIMEOUT = 10.0


@attrs.frozen(kw_only=True)
class Task:
    """A registered task: a handler, its queue and its lifecycle callbacks.

    :ivar abandon_on_cancel: a sync handler's thread is left to finish on its own when
        its run is stopped, instead of being waited for (see :meth:`Server.register_task`)
    """

    name: str
    handler: Handler
    queue: str
    concurrency: int
    is_async: bool
    on_processing: Callback | None = None
    on_success: Callback | None = None
    on_retrying: ErrorCallback | None = None
    on_failed: ErrorCallback | None = None
    abandon_on_cancel: bool = False


class Server:
    """Enqueues jobs, runs the handlers of registered tasks and answers about jobs.

    Use it as an async context manager, which opens the broker and results backends and
    listens for job events; run the workers with ``await tg.start(server.run)``::

        async with Server() as server, anyio.create_task_group() as tg:
            server.register_task("add", add)
            await tg.start(server.run)
            job_id = await server.enqueue(Job("add", b"[1, 2]"))
            print(await server.wait(job_id, timeout=10))

    :param broker: moves messages (default: a new :class:`~tasqueue_anyio.brokers.memory.MemoryBroker`)
    :param results: stores job state (default: a new :class:`~tasqueue_anyio.results.memory.MemoryResults`)
    :param logger: where the server logs (default: the ``tasqueue_anyio.server`` logger)
    :param tracer_provider: an OpenTelemetry ``TracerProvider``: spans for enqueue and for
        each run of a job, the run continuing the producer's trace; no tracing without one
    :param meter_provider: an OpenTelemetry ``MeterProvider``: job counters and a duration
        histogram by task and queue; no metrics without one
    :param default_concurrency: processors of a queue whose first task names no concurrency
    :param max_payload_size: the largest job payload accepted by ``enqueue`` (bytes)
    :param max_message_size: the largest encoded message accepted or decoded (bytes)
    :param finalize_timeout: seconds a shutdown allows running jobs to be handed back
        (and their ends recorded) before the workers are cancelled outright
    :param clock: the wall clock (POSIX seconds) for ETAs, deadlines and cron fire times;
        inject a fake one in tests, with the same one given to the broker
    """

    def __init__(
        self,
        *,
        broker: Broker | None = None,
        results: Results | None = None,
        logger: logging.Logger | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        default_concurrency: int = 10,
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
        if not isinstance(default_concurrency, int) or default_concurrency < 1:
            raise InvalidInputError(
                f"default_concurrency must be an int >= 1, got {default_concurrency!r}"
            )
        self.broker = broker
        self.results = results
        self.log = logger if logger is not None else _log
        #: whether the caller gave the logger (then the worker logs through it too)
        self.custom_logger = logger is not None
        self.tracing = Tracing(tracer_provider)
        self.metrics = Metrics(meter_provider)
        self.default_concurrency = default_concurrency
        self.max_payload_size = max_payload_size
        self.max_message_size = max(max_message_size, max_payload_size + 64 * 1024)
        self.finalize_timeout = finalize_timeout
        self.clock = clock
        self._parent_waiters: dict[str, set[anyio.Event]] = {}
        self._scheduler: Scheduler | None = None
        self._tasks: dict[str, Task] = {}
        self._queues: dict[str, int] = {}
        self._waiters: dict[str, set[anyio.Event]] = {}
        #: jobs taken by this process's worker, by id (the control channel cancels them)
        self.active: dict[str, list[ActiveJob]] = {}
        self._exit_stack: AsyncExitStack | None = None
        self._worker: Worker | None = None
        #: the grace of a stop() made while no run() was going on (the next run() uses it)
        self._pending_stop: float | None = None
        #: set once this open server listens to FINISHED_CHANNEL
        self._finished_listening = False
        self._finished_lock: anyio.Lock | None = None

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Server:
        if self._exit_stack is not None:
            raise RuntimeError("this Server is already open")
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
            raise RuntimeError("this Server is not open: use `async with server:`")
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
            for active in self.active.get(job_id, ()):
                active.cancel()
        elif kind == EVENT_PARENT:
            for event in self._parent_waiters.get(job_id, ()):
                event.set()
        elif kind == EVENT_SCHEDULE and self._scheduler is not None:
            self._scheduler.wake()

    # -- tasks ------------------------------------------------------------------------------

    def register_task(
        self,
        name: str,
        handler: Handler,
        *,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> None:
        """Register ``handler`` as the task ``name`` on ``queue``.

        ``handler(payload, ctx)`` is an ``async def`` or a plain function, run in a worker
        thread; raising is failure. A thread cannot be interrupted: when its run is
        stopped (timeout, cancel request, shutdown) the worker sets ``ctx.cancelled`` and
        waits for the thread to return before it records the run's end, so a retry never
        starts while it runs, and :meth:`run` returns once it has (at most
        ``finalize_timeout`` after a shutdown began). A long sync handler should check
        ``ctx.cancelled`` (or call ``ctx.check_cancelled()``) now and then.
        Callbacks may be sync (called inline, keep them quick) or async; one that raises
        is logged and changes nothing about the job.

        :param concurrency: processors for ``queue``; the first task registered on a
            queue fixes it (default: the server's ``default_concurrency``)
        :param abandon_on_cancel: for a sync handler: stop waiting for its thread as soon
            as its run is stopped, and record the run's end at once. The thread runs on
            unseen (its ``ctx.save`` is refused with ``LeaseLostError`` once the end is
            recorded), possibly while a retry or redelivery of the job runs, and possibly
            after :meth:`run` returned
        :raises QueueConcurrencyError: ``queue`` already has another concurrency
        :raises InvalidInputError: bad name, queue or handler
        """
        if not isinstance(name, str) or not name or len(name) > 255:
            raise InvalidInputError(
                f"task name must be a non-empty str of <= 255 chars, got {name!r}"
            )
        validate_queue(queue)
        if not callable(handler):
            raise InvalidInputError(f"handler of task {name!r} is not callable: {handler!r}")
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise InvalidInputError(f"concurrency must be an int >= 1, got {concurrency!r}")
        existing = self._queues.get(queue)
        if existing is not None and concurrency is not None and concurrency != existing:
            raise QueueConcurrencyError(
                f"queue {queue!r} is already defined with concurrency {existing}; "
                f"register task {name!r} with concurrency={existing} or on another queue"
            )
        if self._worker is not None:
            raise RuntimeError("register tasks before Server.run() starts")
        conc = existing or concurrency or self.default_concurrency
        self._queues[queue] = conc
        self._tasks[name] = Task(
            name=name,
            handler=handler,
            queue=queue,
            concurrency=conc,
            is_async=_is_async_callable(handler),
            on_processing=on_processing,
            on_success=on_success,
            on_retrying=on_retrying,
            on_failed=on_failed,
            abandon_on_cancel=abandon_on_cancel,
        )

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`register_task` (the name defaults to the function's)."""

        def decorator(handler: H) -> H:
            self.register_task(
                name or handler.__name__,
                handler,
                queue=queue,
                concurrency=concurrency,
                on_processing=on_processing,
                on_success=on_success,
                on_retrying=on_retrying,
                on_failed=on_failed,
                abandon_on_cancel=abandon_on_cancel,
            )
            return handler

        return decorator

    def set_concurrency(self, queue: str, concurrency: int) -> None:
        """Change the number of processors of ``queue`` (a registered task's queue) before
        :meth:`run` starts: a deployment knob, as ``tasqueue worker -c QUEUE=N``.

        :raises InvalidInputError: no task is registered on ``queue``, or a bad number
        """
        if queue not in self._queues:
            raise InvalidInputError(
                f"no task is registered on queue {queue!r} "
                f"(queues: {', '.join(self._queues) or 'none'})"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidInputError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if self._worker is not None:
            raise RuntimeError("change concurrency before Server.run() starts")
        self._queues[queue] = concurrency
        for name, task in self._tasks.items():
            if task.queue == queue:
                self._tasks[name] = attrs.evolve(task, concurrency=concurrency)

    def get_tasks(self) -> list[str]:
        """Names of the registered tasks."""
        return list(self._tasks)

    def get_task(self, name: str) -> Task | None:
        """The registered task ``name``, or ``None``."""
        return self._tasks.get(name)

    @property
    def queues(self) -> dict[str, int]:
        """Queue name → concurrency, for the queues of registered tasks."""
        return dict(self._queues)

    # -- enqueue ----------------------------------------------------------------------------

    def new_message(
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
        data = self.encode(msg)
        self._check_fits(msg, data)
        return msg, data

    def encode(self, msg: JobMessage) -> bytes:
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
        for follow_up in (*job.on_success, *job.on_error):
            self._check_payloads(follow_up)

    async def enqueue(self, job: Job) -> str:
        """Record ``job`` as ``queued`` and put it on its queue.

        A job with a ``schedule`` is not run now: it becomes a cron schedule whose id is
        the job id, first firing at the job's ``eta``/``delay`` if it has one, else at the
        expression's next fire time (see :meth:`get_schedules`).

        :return: the job id (or schedule id)
        :raises PayloadTooLargeError: the payload is over ``max_payload_size`` (no I/O done)
        :raises InvalidInputError: a cron expression has no fire time after now (this
            server's clock) or after the job's ``eta`` (no I/O done)
        """
        return (await self.enqueue_many([job]))[0]

    async def enqueue_many(self, jobs: Iterable[Job]) -> list[str]:
        """Enqueue many jobs with one results call and one broker call.

        :return: the job ids, in order
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
            return ids
        if not jobs:
            return []
        ids = [job.id for job in jobs]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("two jobs of one enqueue_many call share an id")
        attributes = {"tasqueue.jobs": len(ids), "tasqueue.job.id": ids[0]}
        with self.tracing.producer_span("tasqueue.enqueue", attributes):
            # built inside the span: the messages carry its trace context
            prepared = [self.new_message(job) for job in jobs]
            await self.put_messages(prepared)
        return ids

    async def put_messages(self, prepared: Sequence[tuple[JobMessage, bytes]]) -> None:
        """Record the state of prepared messages, then put them on their queues.

        The records come first, so a worker never finds a message whose job has no state
        yet. When either step fails (or is cancelled), the batch's records are deleted
        again (shielded, within :data:`_FORGET_TIMEOUT` seconds) before the error goes
        on: no job is left ``queued`` with no message to run it. A message that did reach
        its queue still runs (a job with no state may start).
        """
        records = {
            msg.id: JobRecord(status=msg.meta.status.value, data=data) for msg, data in prepared
        }
        try:
            await self.results.set_jobs(records)
            await self.broker.enqueue_many([envelope(msg, data) for msg, data in prepared])
        except BaseException:
            await self._forget(records)
            raise

    async def _forget(self, job_ids: Collection[str]) -> None:
        """Delete the state of jobs whose enqueue failed (shielded, bounded; one at a time,
        stopping at the first failure: a store that refuses one refuses the rest too; the
        ones left are logged)."""
        ids = list(job_ids)
        done = 0
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FORGET_TIMEOUT):
            for job_id in ids:
                try:
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

    async def enqueue_group(self, group: Group) -> str:
        """Enqueue every job of ``group``: the group's record, then its jobs with one
        results call and one broker call.

        :return: the group id
        """
        if not isinstance(group, Group):
            raise InvalidInputError(f"expected a Group, got {group!r}")
        with self.tracing.producer_span("tasqueue.enqueue_group", {"tasqueue.group.id": group.id}):
            now = self.clock()
            deadline = None if group.timeout is None else now + group.timeout
            prepared = [
                self.new_message(job, now=now, group_id=group.id, deadline=deadline)
                for job in group.jobs
            ]
            await self._create_parent(GROUP, group.id, group.jobs, now, deadline, prepared)
        return group.id

    async def enqueue_chain(self, chain: Chain) -> str:
        """Enqueue the first link of ``chain``; each link's success enqueues the next.

        :return: the chain id
        """
        if not isinstance(chain, Chain):
            raise InvalidInputError(f"expected a Chain, got {chain!r}")
        with self.tracing.producer_span("tasqueue.enqueue_chain", {"tasqueue.chain.id": chain.id}):
            now = self.clock()
            deadline = None if chain.timeout is None else now + chain.timeout
            # every link is built (and refused if oversize) now, not when it is reached
            first, *_ = [
                self.new_message(job, now=now, chain_id=chain.id, deadline=deadline)
                for job in chain.jobs
            ]
            await self._create_parent(CHAIN, chain.id, chain.jobs, now, deadline, [first])
        return chain.id

    async def _create_parent(
        self,
        kind: str,
        parent_id: str,
        jobs: Sequence[Job],
        now: float,
        deadline: float | None,
        prepared: Sequence[tuple[JobMessage, bytes]],
    ) -> None:
        """Record a new group or chain (every member ``queued``), then enqueue ``prepared``."""
        info = ParentInfo(
            kind=kind,
            id=parent_id,
            created_at=now,
            deadline=deadline,
            job_ids=tuple(job.id for job in jobs),
            links=tuple(job_to_wire(job) for job in jobs) if kind == CHAIN else (),
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
            await self.put_messages(prepared)
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

    async def member_changed(
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
                await self.end_parent(
                    parent_id, Status.FAILED, f"its record does not decode: {exc}", ended=ended
                )
                return []
            if link is not None:
                try:
                    prev_result: bytes | None = await self.results.get_result(msg.id)
                except NotFoundError:
                    prev_result = None
                try:
                    prepared = self.new_message(
                        link,
                        chain_id=parent_id,
                        deadline=info.deadline,
                        prev_job_result=prev_result,
                        trace=msg.meta.trace if trace is None else trace,
                    )
                except PayloadTooLargeError as exc:
                    await self.end_parent(
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
            await self.end_parent(parent_id, new, reason, ended=ended)
        return []

    async def end_parent(
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
                await self.publish_parent(parent_id, status)
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
        if self._worker is not None:
            deadline = min(deadline, self._worker.hard_stop)
        return anyio.CancelScope(shield=True, deadline=deadline)

    async def publish_parent(self, parent_id: str, status: Status) -> None:
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
        return self.decode_record(record)

    def decode_record(self, record: JobRecord) -> JobMessage:
        msg = decode_message(record.data, max_size=self.max_message_size)
        return with_status(msg, Status(record.status))

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

    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``."""
        return await self.results.get_success()

    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``."""
        return await self.results.get_failed()

    async def delete_job(self, job_id: str) -> None:
        """Forget a job's state and result (a queued message still runs if not cancelled)."""
        await self.results.delete_job(validate_id(job_id))

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
            await self.end_parent(
                parent_id, Status.FAILED, f"timeout: the {kind}'s deadline passed", stop=_WAITING
            )
            record = await self.results.get_parent(parent_id)
        return record, info

    async def wait_group(self, group_id: str, *, timeout: float | None = None) -> GroupMessage:
        """Wait until the group is ``successful``, ``failed`` or ``cancelled``; return it.

        Woken by the group's end event; without one it re-reads the group as
        :meth:`wait` does, and then also passes on member ends the group missed (a
        process stopped between recording a member's end and telling the group; see
        :data:`RECHECK_FIRST`). :meth:`get_group` shows the group as stored.

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
                msg = self.decode_record(job)
            except (NotFoundError, DecodeError):
                continue
            if job.status not in FINAL_STATUSES or (
                record.kind == CHAIN and job.status == Status.SUCCESSFUL.value
            ):
                continue
            if parent_id not in (msg.meta.group_id, msg.meta.chain_id):
                continue
            await self.member_changed(msg, msg.status, msg.meta.prev_error)
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
            msg = self.decode_record(await self.results.get_job(member_id))
        except (NotFoundError, DecodeError):
            return
        await self.member_changed(msg, new, msg.meta.prev_error)

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

    async def remove_schedule(self, schedule_id: str) -> bool:
        """Remove a cron schedule (runs already enqueued still run: cancel them by id).

        :return: whether it existed
        """
        removed = await self.results.delete_schedule(validate_id(schedule_id, "schedule id"))
        if removed:
            await self.broker.publish(EVENTS_CHANNEL, encode_event(EVENT_SCHEDULE, schedule_id))
        return removed

    async def enqueue_run(self, schedule_id: str, template: Job, fire: float) -> str:
        """Enqueue the run of a schedule at ``fire`` (called by the scheduler that won it)."""
        run = attrs.evolve(
            template, id=run_id(schedule_id, fire), schedule=None, eta=None, delay=None
        )
        msg, _ = self.new_message(run)
        msg = JobMessage(meta=attrs.evolve(msg.meta, schedule=template.schedule), job=run)
        data = self.encode(msg)
        created = await self.results.create_jobs(
            {run.id: JobRecord(status=Status.QUEUED.value, data=data)}
        )
        if run.id in created:  # else another server (or an earlier pass) enqueued it
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
                msg = self.decode_record(record)
            except DecodeError:
                msg = None
            if msg is not None:
                await self.member_changed(msg, Status.CANCELLED, "cancelled")
            await self.publish_finished(job_id, Status.CANCELLED)
        elif record.status not in FINAL_STATUSES:
            for active in self.active.get(job_id, ()):
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
            await self.end_parent(parent_id, Status.CANCELLED, "cancelled", stop=_STOPPABLE)
        return Status((await self.results.get_parent(parent_id)).status)

    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobMessage:
        """Wait until the job is ``successful``, ``failed`` or ``cancelled``; return it.

        Woken by the job's end event; events are best effort, so it also re-reads the
        job after :data:`RECHECK_FIRST` seconds without one, then at doubling intervals up
        to :data:`RECHECK_MAX`. Needs an open server (``async with server:``).

        :raises TimeoutError: the job did not end within ``timeout`` seconds
        :raises JobNotFoundError: no job is stored under ``job_id``
        """
        if self._exit_stack is None:
            raise RuntimeError("Server.wait() needs an open server: use `async with server:`")
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

    async def save_result(self, job_id: str, result: bytes, *, run: str | None = None) -> None:
        """Store a job's result (what ``ctx.save`` calls), refusing one over
        ``max_payload_size``: a result may become the next chain link's input.

        :param run: the fencing token of the run saving it, if any
        :raises LeaseLostError: that run no longer owns the job (nothing is saved)
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
        if not await self.results.set_result(job_id, result, run=run):
            raise LeaseLostError(
                f"job {job_id}: this run no longer owns the job (its lease was lost and "
                f"another worker took it over, or it ended); the result was not saved"
            )

    async def publish_finished(self, job_id: str, status: Status) -> None:
        """Announce that a job ended (wakes :meth:`wait` callers, on any server)."""
        await self.broker.publish(*finished_event(job_id, status.value))

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume every queue of the registered tasks and run their jobs until cancelled.

        Start it with ``await tg.start(server.run)``: it reports started once every queue
        is being consumed. Cancelling it stops at once: jobs that were running go back to
        the broker and run again later (shutdown is not an outcome). :meth:`stop` ends it
        gracefully; after a :meth:`stop` made while no ``run()`` was going on, this
        ``run()`` reports started, takes no job and returns at once. Opens the server
        itself if it is not open yet.
        """
        if self._exit_stack is None:
            async with self:
                await self.run(task_status=task_status)
            return
        if self._worker is not None:
            raise RuntimeError("Server.run() is already running")
        worker = self._worker = Worker(self)
        grace, self._pending_stop = self._pending_stop, None
        if grace is not None:
            worker.stop(grace)  # stop() came before run(): it applies from the start
        try:
            await worker.run(task_status=task_status)
        finally:
            self._worker = None

    def stop(self, grace: float = 30.0) -> None:
        """Stop :meth:`run` gracefully: take no new jobs, give running ones ``grace``
        seconds to end, then cancel them (they go back to the broker); ``run()`` returns.

        Called while no ``run()`` is going on, it applies to the next ``run()``, which
        then takes no job and returns at once (the stop is used up by it).
        """
        if self._worker is not None:
            self._worker.stop(grace)
        else:
            self._pending_stop = grace


_NOT_FINAL = (Status.QUEUED.value, Status.PROCESSING.value)
#: members a cancel stops, and members a deadline stops (running ones meet the deadline
#: in their own cancel scope)
_STOPPABLE = (Status.QUEUED.value, Status.PROCESSING.value, Status.RETRYING.value)
_WAITING = (Status.QUEUED.value, Status.RETRYING.value)
_P = TypeVar("_P", GroupMessage, ChainMessage)


def envelope(msg: JobMessage, data: bytes) -> Envelope:
    """The queue envelope of an encoded job message (its id names the job and run)."""
    return Envelope(
        queue=msg.meta.queue, data=data, id=f"{msg.id}/{msg.meta.retried}", eta=msg.meta.eta
    )


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    # an object whose __call__ is ``async def`` (we need the method, not callability)
    call = getattr(fn, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)
