"""The :class:`Server`: task registry, the enqueue and inspection API, and ``run()``."""

from __future__ import annotations

import functools
import inspect
import logging
import math
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
from ._worker import ActiveJob, Worker
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

Handler = Callable[[bytes, JobContext], Awaitable[None] | None]
Callback = Callable[[JobContext], Awaitable[None] | None]
ErrorCallback = Callable[[JobContext, BaseException], Awaitable[None] | None]
H = TypeVar("H", bound=Handler)

_log = logging.getLogger("tasqueue_anyio.server")


@attrs.frozen(kw_only=True)
class Task:
    """A registered task: a handler, its queue and its lifecycle callbacks."""

    name: str
    handler: Handler
    queue: str
    concurrency: int
    is_async: bool
    on_processing: Callback | None = None
    on_success: Callback | None = None
    on_retrying: ErrorCallback | None = None
    on_failed: ErrorCallback | None = None


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
    ) -> None:
        """Register ``handler`` as the task ``name`` on ``queue``.

        ``handler(payload, ctx)`` is an ``async def`` or a plain function (run in a worker
        thread, which a timeout or cancel cannot interrupt mid-call); raising is failure.
        Callbacks may be sync (called inline, keep them quick) or async; one that raises
        is logged and changes nothing about the job.

        :param concurrency: processors for ``queue``; the first task registered on a
            queue fixes it (default: the server's ``default_concurrency``)
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
        return msg, self.encode(msg)

    def encode(self, msg: JobMessage) -> bytes:
        """Encode ``msg``, refusing it when over ``max_message_size``."""
        data = encode_message(msg)
        if len(data) > self.max_message_size:
            raise PayloadTooLargeError(
                f"job {msg.id}'s encoded message", len(data), self.max_message_size
            )
        return data

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
        """Record the state of prepared messages, then put them on their queues."""
        await self.results.set_jobs(
            {msg.id: JobRecord(status=msg.meta.status.value, data=data) for msg, data in prepared}
        )
        await self.broker.enqueue_many([envelope(msg, data) for msg, data in prepared])

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
            for job in chain.jobs:  # refuse oversize links now, not when they are reached
                self._check_payloads(job)
            first = self.new_message(chain.jobs[0], now=now, chain_id=chain.id, deadline=deadline)
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
        await self.put_messages(prepared)

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
            info = decode_parent(record.data)
            index = info.job_ids.index(msg.id) if msg.id in info.job_ids else len(info.job_ids)
            if index + 1 < len(info.job_ids):
                try:
                    prev_result: bytes | None = await self.results.get_result(msg.id)
                except NotFoundError:
                    prev_result = None
                link = job_from_wire(info.links[index + 1])
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
        """Jobs waiting on ``queue`` (due, not taken by a worker), oldest first.

        Messages that do not decode are skipped here (a worker dead-letters them).
        """
        return self._decode_many(await self.broker.get_pending(validate_queue(queue)))

    async def get_scheduled(self, queue: str = DEFAULT_QUEUE) -> list[JobMessage]:
        """Jobs on ``queue`` waiting for their ETA (retries with backoff included)."""
        return self._decode_many(
            [d for _, d in await self.broker.get_scheduled(validate_queue(queue))]
        )

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

        :raises TimeoutError: it did not end within ``timeout`` seconds
        :raises NotFoundError: no group is stored under ``group_id``
        """
        return await self._wait_parent(group_id, timeout, self.get_group)

    async def wait_chain(self, chain_id: str, *, timeout: float | None = None) -> ChainMessage:
        """Wait until the chain is ``successful``, ``failed`` or ``cancelled``; return it.

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
                while True:
                    state = await get(parent_id)
                    if state.status.is_final:
                        return state
                    sleep = math.inf
                    if state.deadline is not None:
                        sleep = max(0.0, state.deadline - self.clock()) + 0.01
                    with anyio.move_on_after(sleep):
                        await event.wait()
                    waiters.discard(event)
                    event = anyio.Event()
                    waiters.add(event)
        finally:
            waiters.discard(event)
            if not waiters:
                self._parent_waiters.pop(parent_id, None)

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
        await self._cancelled(job_id, record)
        return Status(record.status)

    async def _cancelled(self, job_id: str, record: JobRecord) -> None:
        if record.status == Status.CANCELLED.value:
            await self.publish_finished(job_id, Status.CANCELLED)
            try:
                msg = self.decode_record(record)
            except DecodeError:
                return
            await self.member_changed(msg, Status.CANCELLED, "cancelled")
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

        Woken by the job's end event, not by polling. Needs an open server
        (``async with server:``).

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
                while True:
                    msg = await self.get_job(job_id)
                    if msg.status.is_final:
                        return msg
                    await event.wait()
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
