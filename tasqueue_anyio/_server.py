"""The :class:`~tasqueue_anyio.Server`: a :class:`~tasqueue_anyio.Client` that registers tasks and
runs workers (``run()``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, ParamSpec, Protocol, TypeVar, overload

import anyio
import attrs
from anyio.abc import TaskStatus

from ._client import Client, TaskFunction, _Options
from ._codec import DEFAULT_MAX_MESSAGE_SIZE
from ._codecs import Codec
from ._exceptions import InvalidInputError, QueueConcurrencyError
from ._jobs import (
    DEFAULT_QUEUE,
    Backoff,
    check_count,
    check_priority,
    check_seconds,
    validate_queue,
)
from ._tasks import Callback, ErrorCallback, Handler, Task, is_async_callable, typed_handler
from ._worker import BURST_INTERVAL, Worker
from .abc import Broker, QueueLimits, Results

__all__ = ["BURST_INTERVAL", "Server", "Task"]

P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=Handler)


class _TaskDecorator(Protocol):
    """What ``server.task()`` returns: a decorator keeping the function's signature."""

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> TaskFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> TaskFunction[P, R]: ...


class Server(Client):
    """Registers tasks and runs workers for them; enqueues and answers about jobs like a
    :class:`~tasqueue_anyio.Client` (it is one).

    Use it as an async context manager, which opens the broker and results backends and
    listens for job events; run the workers with ``await tg.start(server.run)``::

        server = Server()                      # in-memory backends

        @server.task(queue="math")
        async def add(a: int, b: int) -> int:
            return a + b

        async with server, anyio.create_task_group() as tg:
            await tg.start(server.run)
            job = await add.enqueue(40, 2)
            print(await job.result(timeout=10))   # 42
            tg.cancel_scope.cancel()

    Takes :class:`~tasqueue_anyio.Client`'s parameters (``broker``, ``results``,
    ``codec``, ``logger``, ``tracer_provider``, ``meter_provider``, ``max_payload_size``,
    ``max_message_size``, ``finalize_timeout``, ``clock``), and:

    :param default_concurrency: processors of a queue whose first task names no concurrency
    """

    def __init__(
        self,
        *,
        broker: Broker | None = None,
        results: Results | None = None,
        codec: Codec | None = None,
        logger: logging.Logger | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        default_concurrency: int = 10,
        max_payload_size: int = 1024 * 1024,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        finalize_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            isinstance(default_concurrency, bool)
            or not isinstance(default_concurrency, int)
            or default_concurrency < 1
        ):
            raise InvalidInputError(
                f"default_concurrency must be an int >= 1, got {default_concurrency!r}"
            )
        super().__init__(
            broker,
            results,
            codec=codec,
            logger=logger if logger is not None else logging.getLogger("tasqueue_anyio.server"),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            max_payload_size=max_payload_size,
            max_message_size=max_message_size,
            finalize_timeout=finalize_timeout,
            clock=clock,
        )
        #: whether the caller gave the logger (then the worker logs through it too)
        self.custom_logger = logger is not None
        self.default_concurrency = default_concurrency
        self._tasks: dict[str, Task] = {}
        self._queues: dict[str, int] = {}
        self._limits: dict[str, QueueLimits] = {}
        self._worker: Worker | None = None
        #: the grace of a stop() made while no run() was going on (the next run() uses it)
        self._pending_stop: float | None = None

    # -- tasks ------------------------------------------------------------------------------

    @overload
    def register_task(
        self,
        name: str,
        handler: Callable[P, Coroutine[Any, Any, R]],
        *,
        raw: Literal[False] = False,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> TaskFunction[P, R]: ...

    @overload
    def register_task(
        self,
        name: str,
        handler: Callable[P, R],
        *,
        raw: Literal[False] = False,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> TaskFunction[P, R]: ...

    @overload
    def register_task(
        self,
        name: str,
        handler: Handler,
        *,
        raw: Literal[True],
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> None: ...

    def register_task(
        self, name: str, handler: Callable[..., Any], **options: Any
    ) -> TaskFunction[Any, Any] | None:
        """Register ``handler`` as the task ``name`` on ``queue``.

        **Typed** (the default): ``handler`` takes any arguments and returns a value,
        ``async def f(a: int, b: int) -> int`` or a plain ``def``. A job's payload is the
        codec's ``[args, kwargs]``; the return value, encoded by the codec, is the job's
        result, written in the same step as its final state. The job's context is
        :func:`~tasqueue_anyio.current_job`. A chain link made with ``.link()`` receives
        the previous link's result as its first positional argument. Returns a
        :class:`~tasqueue_anyio.TaskFunction` that keeps the signature for type checkers.

        **Bytes-level** (``raw=True``): ``handler(payload: bytes, ctx: JobContext)``
        gets the job's payload as it is (the wire format other languages produce) and
        saves a result with ``await ctx.save(data)``; returns ``None``.

        A plain ``def`` handler runs in a worker thread. A thread cannot be interrupted:
        when its run is stopped (timeout, cancel request, shutdown) the worker sets
        ``ctx.cancelled`` and waits for the thread to return before it records the run's
        end, so a retry never starts while it runs, and :meth:`run` returns once it has
        (at most ``finalize_timeout`` after a shutdown began). A long sync handler should
        check ``current_job().cancelled`` (or call ``check_cancelled()``) now and then.
        Callbacks may be sync (called inline, keep them quick) or async; one that raises
        is logged and changes nothing about the job.

        :param concurrency: processors for ``queue``; the first task registered on a
            queue fixes it (default: the server's ``default_concurrency``)
        :param max_retries: a typed task's jobs' default ``max_retries`` (see
            :class:`~tasqueue_anyio.Job`); likewise ``backoff``, ``timeout`` and
            ``priority``
        :param abandon_on_cancel: for a sync handler: stop waiting for its thread as soon
            as its run is stopped, and record the run's end at once. The thread runs on
            unseen (its ``ctx.save`` is refused with ``LeaseLostError`` once the end is
            recorded), possibly while a retry or redelivery of the job runs, and possibly
            after :meth:`run` returned
        :raises QueueConcurrencyError: ``queue`` already has another concurrency
        :raises InvalidInputError: bad name, queue, handler or option
        """
        return self._register(name, handler, **options)

    def _register(
        self,
        name: str,
        handler: Callable[..., Any],
        *,
        raw: bool = False,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> TaskFunction[Any, Any] | None:
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
        if max_retries is not None:
            check_count(max_retries, "max_retries")
        if timeout is not None:
            check_seconds(timeout, "timeout")
        if priority is not None:
            check_priority(priority)
        if backoff is not None and not isinstance(backoff, Backoff):
            raise InvalidInputError(f"backoff must be a Backoff, got {backoff!r}")
        if raw and (
            max_retries is not None
            or backoff is not None
            or timeout is not None
            or priority is not None
        ):
            raise InvalidInputError(
                "max_retries, backoff, timeout and priority are job defaults of a typed task; "
                "a bytes-level task's jobs carry them in their Job"
            )
        existing = self._queues.get(queue)
        if existing is not None and concurrency is not None and concurrency != existing:
            raise QueueConcurrencyError(
                f"queue {queue!r} is already defined with concurrency {existing}; "
                f"register task {name!r} with concurrency={existing} or on another queue"
            )
        if self._worker is not None:
            raise RuntimeError("register tasks before Server.run() starts")
        conc = existing or concurrency or self.default_concurrency
        function = None if raw else handler
        call: Handler = handler if raw else typed_handler(handler, self.codec, self._check_result)
        self._queues[queue] = conc
        self._tasks[name] = Task(
            name=name,
            handler=call,
            queue=queue,
            concurrency=conc,
            is_async=is_async_callable(handler),
            on_processing=on_processing,
            on_success=on_success,
            on_retrying=on_retrying,
            on_failed=on_failed,
            abandon_on_cancel=abandon_on_cancel,
            function=function,
        )
        if raw:
            return None
        options = _Options(
            max_retries=max_retries, backoff=backoff, timeout=timeout, priority=priority
        )
        return TaskFunction(self, name, queue, handler, options)

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        raw: Literal[False] = False,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> _TaskDecorator: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        raw: Literal[True],
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> Callable[[H], H]: ...

    def task(
        self,
        name: str | None = None,
        *,
        raw: bool = False,
        queue: str = DEFAULT_QUEUE,
        concurrency: int | None = None,
        max_retries: int | None = None,
        backoff: Backoff | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        on_processing: Callback | None = None,
        on_success: Callback | None = None,
        on_retrying: ErrorCallback | None = None,
        on_failed: ErrorCallback | None = None,
        abandon_on_cancel: bool = False,
    ) -> Any:
        """Decorator form of :meth:`register_task` (the name defaults to the function's).

        Typed (the default), it returns a :class:`~tasqueue_anyio.TaskFunction`::

            @server.task(queue="math")
            async def add(a: int, b: int) -> int:
                return a + b

        With ``raw=True`` it registers a bytes-level handler and returns it unchanged.
        """

        def decorator(handler: Callable[..., Any]) -> Any:
            registered = self._register(
                name or handler.__name__,
                handler,
                raw=raw,
                queue=queue,
                concurrency=concurrency,
                max_retries=max_retries,
                backoff=backoff,
                timeout=timeout,
                priority=priority,
                on_processing=on_processing,
                on_success=on_success,
                on_retrying=on_retrying,
                on_failed=on_failed,
                abandon_on_cancel=abandon_on_cancel,
            )
            return handler if raw else registered

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

    def limit_queue(
        self,
        queue: str,
        *,
        runs: int | None = None,
        per: float = 1.0,
        running: int | None = None,
    ) -> None:
        """Limit the jobs of ``queue`` over every worker of this broker's backend: at
        most ``runs`` start in any ``per`` seconds (a sliding window), at most
        ``running`` run at once. Every worker process must set the same limits (a
        deployment setting, like concurrency); ``None`` leaves a limit out, and both
        ``None`` removes the queue's limits.

        A job over a limit is not failed, retried or put back: the processor that took
        it waits, asleep, for the time the broker names (the window's next free start)
        or for a running slot's release, announced on the broadcast channel, then starts
        it. So a worker holds at most its processors' jobs (plus what its consumer
        fetched ahead) of a limited queue while they wait. A worker that dies frees its
        running slots after ``PERMIT_LEASE`` (15 s) seconds.

        :raises InvalidInputError: a bad number
        """
        limits = QueueLimits(runs=runs, per=per, running=running)
        validate_queue(queue)
        if self._worker is not None:
            raise RuntimeError("limit queues before Server.run() starts")
        if runs is None and running is None:
            self._limits.pop(queue, None)
        else:
            self._limits[queue] = limits

    @property
    def limits(self) -> dict[str, QueueLimits]:
        """Queue name → its limits (:meth:`limit_queue`)."""
        return dict(self._limits)

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

    # -- running ----------------------------------------------------------------------------

    async def run(
        self, *, burst: bool = False, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume every queue of the registered tasks and run their jobs until cancelled
        (or, with ``burst``, until they are empty).

        Start it with ``await tg.start(server.run)``: it reports started once every queue
        is being consumed. Cancelling it stops at once: jobs that were running go back to
        the broker and run again later (shutdown is not an outcome). :meth:`stop` ends it
        gracefully; after a :meth:`stop` made while no ``run()`` was going on, this
        ``run()`` reports started, takes no job and returns at once. Opens the server
        itself if it is not open yet.

        While it runs it is listed by :meth:`~tasqueue_anyio.Client.get_workers` (and
        ``tasqueue workers``): it puts its :class:`~tasqueue_anyio.abc.WorkerRecord` in
        the results store before it reports started, then every 5 s with the jobs in
        hand, and removes it when it ends (a worker that dies is unlisted 15 s after its
        last heartbeat). A store that fails these writes is logged, never fatal.

        :param burst: return once every queue of this server is empty: nothing pending,
            scheduled (waiting for an ETA or a retry's backoff) or in flight on it, as
            the broker's ``count`` says (checked every ``BURST_INTERVAL`` seconds,
            twice in a row), and no job running here. For scripts, batch jobs and tests;
            a job with an ETA far ahead keeps it running until then.
        """
        if self._exit_stack is None:
            async with self:
                await self.run(task_status=task_status)
            return
        if self._worker is not None:
            raise RuntimeError("Server.run() is already running")
        worker = self._worker = Worker(
            self, self._tasks, self._queues, burst=burst, limits=self._limits
        )
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

