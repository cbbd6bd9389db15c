"""A blocking client for callers without an event loop: Django views, Flask handlers,
scripts, code moving over from Celery.

It runs an event loop (asyncio or Trio) in a thread of its own, through AnyIO's blocking
portal, opens a :class:`~tasqueue_anyio.Client` there, and hands each call to it; calls
are safe from many threads at once.
"""

from __future__ import annotations

import functools
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

from anyio import TASK_STATUS_IGNORED, CancelScope
from anyio.abc import TaskStatus
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._client import (
    ChainHandle,
    Client,
    Counts,
    GroupHandle,
    JobHandle,
    TaskFunction,
    _ParentHandle,
)
from ._codecs import Codec
from ._exceptions import InvalidInputError
from ._groups import Chain, ChainMessage, Group, GroupMessage
from ._jobs import DEFAULT_QUEUE, Job, JobMessage, Progress, Status
from ._server import Server
from .abc import Broker, Results

__all__ = ["BlockingChainHandle", "BlockingClient", "BlockingGroupHandle", "BlockingJobHandle"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
T = TypeVar("T")
_H = TypeVar("_H", bound="_BlockingHandle")
_M = TypeVar("_M", GroupMessage, ChainMessage)


class BlockingClient:
    """A :class:`~tasqueue_anyio.Client` for synchronous code.

    ::

        from tasqueue_anyio import BlockingClient
        from tasqueue_anyio.brokers.redis import RedisBroker
        from tasqueue_anyio.results.redis import RedisResults
        from myapp.tasks import add

        with BlockingClient(RedisBroker(url), RedisResults(url)) as client:
            job = client.enqueue(add, 40, 2)       # typed like add.enqueue
            print(job.result(timeout=10))          # 42

    Open it once (at process start, say) and share it: every method may be called from
    any thread, concurrently. Each call runs in the client's own event loop thread and
    blocks the calling thread until it returns; a method called from that event loop's
    own thread (a task handler of the same loop, say) raises :class:`RuntimeError`
    instead of blocking it for ever.

    :param broker: the broker (default: in-memory, reachable from this process only)
    :param results: the results store (default: in-memory)
    :param codec: the codec of typed tasks' arguments and results (as the workers')
    :param client: a (not yet open) client to use instead of building one
    :param backend: the event loop to run: ``"asyncio"`` or ``"trio"``
    :param backend_options: options of ``anyio.run`` for that backend
    :param run_worker: with a :class:`~tasqueue_anyio.Server` as ``client``, also run
        its workers in the client's event loop while it is open (a script that enqueues
        and runs its jobs in one process, on the in-memory backends say)
    """

    def __init__(
        self,
        broker: Broker | None = None,
        results: Results | None = None,
        *,
        codec: Codec | None = None,
        client: Client | None = None,
        backend: str = "asyncio",
        backend_options: Mapping[str, Any] | None = None,
        run_worker: bool = False,
    ) -> None:
        if client is not None and (broker is not None or results is not None or codec):
            raise InvalidInputError("pass a client, or its broker, results and codec")
        if run_worker and not isinstance(client, Server):
            raise InvalidInputError("run_worker needs a Server as client")
        self.run_worker = run_worker
        self._worker: Future[None] | None = None
        self._worker_stop: CancelScope | None = None
        self.client = client if client is not None else Client(broker, results, codec=codec)
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._opened: AbstractContextManager[Client] | None = None

    def __repr__(self) -> str:
        state = "open" if self._portal is not None else "closed"
        return f"<BlockingClient {self.backend} {state}>"

    # -- lifetime -----------------------------------------------------------------------

    def open(self) -> None:
        """Start the event loop thread and open the client (what ``with`` does)."""
        if self._portal is not None:
            raise RuntimeError("this BlockingClient is already open")
        portal_cm = start_blocking_portal(self.backend, self.backend_options or None)
        portal = portal_cm.__enter__()
        try:
            opened = portal.wrap_async_context_manager(self.client)
            opened.__enter__()
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal_cm, self._portal, self._opened = portal_cm, portal, opened
        if self.run_worker:
            try:
                self._worker, self._worker_stop = portal.start_task(
                    self._run_worker, name="tasqueue worker"
                )
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Close the client and stop its event loop thread (what leaving ``with`` does);
        closing a closed client does nothing."""
        portal_cm, portal, opened = self._portal_cm, self._portal, self._opened
        worker = self._worker
        self._portal_cm = self._portal = self._opened = self._worker = None
        if portal_cm is None or opened is None:
            return
        try:
            stop, self._worker_stop = self._worker_stop, None
            if worker is not None and portal is not None and stop is not None:
                # stop the workers (running jobs go back to the broker) and wait for them
                portal.call(stop.cancel)
                worker.result()
            opened.__exit__(None, None, None)
        finally:
            portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingClient:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    async def _run_worker(
        self, *, task_status: TaskStatus[CancelScope] = TASK_STATUS_IGNORED
    ) -> None:
        assert isinstance(self.client, Server)
        with CancelScope() as scope:
            await self.client.run(task_status=_Started(task_status, scope))

    def _call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        portal = self._portal
        if portal is None:
            raise RuntimeError("this BlockingClient is not open: use `with BlockingClient(...)`")
        return portal.call(functools.partial(func, *args, **kwargs))

    # -- enqueue ------------------------------------------------------------------------

    @overload
    def enqueue(self, job: Job, /) -> BlockingJobHandle[Any]: ...

    @overload
    def enqueue(
        self, task: TaskFunction[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> BlockingJobHandle[R]: ...

    def enqueue(self, job: Any, /, *args: Any, **kwargs: Any) -> BlockingJobHandle[Any]:
        """Enqueue a typed task's job (``enqueue(add, 40, 2)``) or a :class:`Job`; see
        :meth:`Client.enqueue`.

        :return: the job's handle (a ``str``: the job id)
        """
        handle: JobHandle[Any] = self._call(self.client.enqueue, job, *args, **kwargs)
        return BlockingJobHandle(handle, self)

    def enqueue_many(self, jobs: Iterable[Job]) -> list[BlockingJobHandle[Any]]:
        """Enqueue many jobs in one call to each backend (:meth:`Client.enqueue_many`)."""
        handles: list[JobHandle[Any]] = self._call(self.client.enqueue_many, list(jobs))
        return [BlockingJobHandle(h, self) for h in handles]

    def enqueue_group(self, group: Group) -> BlockingGroupHandle:
        """Enqueue a group (:meth:`Client.enqueue_group`)."""
        handle: GroupHandle = self._call(self.client.enqueue_group, group)
        return BlockingGroupHandle(handle, self)

    def enqueue_chain(self, chain: Chain) -> BlockingChainHandle:
        """Enqueue a chain (:meth:`Client.enqueue_chain`)."""
        handle: ChainHandle = self._call(self.client.enqueue_chain, chain)
        return BlockingChainHandle(handle, self)

    def job(self, job_id: str) -> BlockingJobHandle[Any]:
        """A handle on the job ``job_id`` (no I/O)."""
        return BlockingJobHandle(self.client.job(job_id), self)

    # -- inspect and control -----------------------------------------------------------

    def get_job(self, job_id: str) -> JobMessage:
        """The job's message with its status and progress (:meth:`Client.get_job`)."""
        msg: JobMessage = self._call(self.client.get_job, job_id)
        return msg

    def get_result(self, job_id: str) -> bytes:
        """The bytes a job's result is stored as (:meth:`Client.get_result`)."""
        data: bytes = self._call(self.client.get_result, job_id)
        return data

    def wait(self, job_id: str, *, timeout: float | None = None) -> JobMessage:
        """Block until the job ends; see :meth:`Client.wait`.

        :raises TimeoutError: it did not end within ``timeout`` seconds
        """
        msg: JobMessage = self._call(self.client.wait, job_id, timeout=timeout)
        return msg

    def cancel(self, job_id: str) -> Status:
        """Cancel a job, group or chain (:meth:`Client.cancel`)."""
        status: Status = self._call(self.client.cancel, job_id)
        return status

    def counts(self, queue: str = DEFAULT_QUEUE) -> Counts:
        """A queue's counts (:meth:`~tasqueue_anyio.Client.counts`)."""
        counts: Counts = self._call(self.client.counts, queue)
        return counts


class _Started:
    """Reports a worker's start with its cancel scope (what stops it)."""

    def __init__(self, status: TaskStatus[CancelScope], scope: CancelScope) -> None:
        self._status, self._scope = status, scope

    def started(self, value: None = None) -> None:
        self._status.started(self._scope)


class _BlockingHandle(str):
    """A ``str`` (the id) bound to the blocking client that made it."""

    _client: BlockingClient

    def __new__(cls: type[_H], id: str, client: BlockingClient) -> _H:
        handle = super().__new__(cls, str.__str__(id))
        handle._client = client
        return handle

    @property
    def id(self) -> str:
        """The id, as a plain ``str``."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r}>"

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (and copies) as the plain id
        return (str, (self.id,))


class BlockingJobHandle(_BlockingHandle, Generic[R_co]):
    """:class:`~tasqueue_anyio.JobHandle`, blocking: the same methods, without ``await``."""

    def _async(self) -> JobHandle[R_co]:
        return self._client.client.job(self.id)

    def info(self) -> JobMessage:
        """The job's message with its current status and progress."""
        msg: JobMessage = self._client._call(self._async().info)
        return msg

    def status(self) -> Status:
        """The job's current status."""
        status: Status = self._client._call(self._async().status)
        return status

    def progress(self) -> Progress | None:
        """The job's last reported progress, if any."""
        progress: Progress | None = self._client._call(self._async().progress)
        return progress

    def wait(self, *, timeout: float | None = None) -> JobMessage:
        """Block until the job ends (``TimeoutError`` after ``timeout`` seconds)."""
        msg: JobMessage = self._client._call(self._async().wait, timeout=timeout)
        return msg

    def result(self, *, timeout: float | None = None) -> R_co:
        """Block until the job ends; its result. Raises as :meth:`JobHandle.result`
        (``JobFailedError``, ``JobCancelledError``, the built-in ``TimeoutError``)."""
        value: R_co = self._client._call(self._async().result, timeout=timeout)
        return value

    def result_bytes(self, *, timeout: float | None = None) -> bytes:
        """As :meth:`result`, the stored bytes undecoded."""
        data: bytes = self._client._call(self._async().result_bytes, timeout=timeout)
        return data

    def cancel(self) -> Status:
        """Cancel the job; its status right after."""
        status: Status = self._client._call(self._async().cancel)
        return status


class _BlockingParentHandle(_BlockingHandle, Generic[_M], metaclass=ABCMeta):
    """What blocking group and chain handles share."""

    @abstractmethod
    def _async(self) -> _ParentHandle[_M]:
        """The async handle this one calls."""

    def info(self) -> _M:
        """The state and the members'."""
        msg: _M = self._client._call(self._async().info)
        return msg

    def status(self) -> Status:
        """The current status."""
        return self.info().status

    def wait(self, *, timeout: float | None = None) -> _M:
        """Block until it ends (``TimeoutError`` after ``timeout`` seconds)."""
        msg: _M = self._client._call(self._async().wait, timeout=timeout)
        return msg

    def cancel(self) -> Status:
        """Cancel it and its unfinished members."""
        status: Status = self._client._call(self._async().cancel)
        return status


class BlockingGroupHandle(_BlockingParentHandle[GroupMessage]):
    """:class:`~tasqueue_anyio.GroupHandle`, blocking."""

    def _async(self) -> GroupHandle:
        return self._client.client.group(self.id)

    def result(self, *, timeout: float | None = None) -> list[Any]:
        """Block until the group ends; its members' results in order (raises as
        :meth:`GroupHandle.result`)."""
        values: list[Any] = self._client._call(self._async().result, timeout=timeout)
        return values


class BlockingChainHandle(_BlockingParentHandle[ChainMessage]):
    """:class:`~tasqueue_anyio.ChainHandle`, blocking."""

    def _async(self) -> ChainHandle:
        return self._client.client.chain(self.id)

    def result(self, *, timeout: float | None = None) -> Any:
        """Block until the chain ends; its last link's result (raises as
        :meth:`ChainHandle.result`)."""
        return self._client._call(self._async().result, timeout=timeout)
