"""Helpers for testing your own tasks with pytest, on asyncio and Trio.

Run a server's workers for the length of a block with :func:`worker`, and run what was
enqueued to the end with :func:`drain` (no sleeping, no polling in your test)::

    from tasqueue_anyio.testing import drain, worker

    from myapp.tasks import add, server      # typed tasks on a Server

    @pytest.mark.anyio
    async def test_add() -> None:
        async with worker(server):
            job = await add.enqueue(40, 2)
            assert await job.result(timeout=5) == 42

    @pytest.mark.anyio
    async def test_a_batch() -> None:
        async with server:
            jobs = [await add.enqueue(i, i) for i in range(10)]
            await drain(server)                # runs them all, then returns
            assert [await j.result() for j in jobs] == [2 * i for i in range(10)]

They work with any backends; a test suite usually builds its ``Server`` on the in-memory
ones (the default), which need no server process and start empty in every test when the
server is built per test (a fixture). An application's module-level server built on Redis
or NATS is tested on in-memory backends with :func:`in_memory`::

    @pytest.fixture
    def server() -> Iterator[Server]:
        with in_memory(tasks.server):        # fresh, empty backends for this test
            yield tasks.server
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import TypeVar

import anyio

from ._client import Client
from ._server import Server

__all__ = ["drain", "in_memory", "worker"]

_C = TypeVar("_C", bound=Client)


@contextmanager
def in_memory(server: _C) -> Iterator[_C]:
    """Give ``server`` (a :class:`~tasqueue_anyio.Server` or
    :class:`~tasqueue_anyio.Client`) a fresh in-memory broker and results store for the
    block, and its own back after it: an application's tasks module, built on Redis or
    NATS, runs in tests with no server process, every block starting empty.

    Its tasks, queues, limits, codec and options stay as they are; only where jobs are
    kept changes. Nothing connects to the real backends (they are opened only by
    ``async with server``), and open the server inside the block, not around it.

    :return: the server
    :raises RuntimeError: the server is open (it would go on using the backends it
        opened), or was left open at the block's end
    """
    from .brokers.memory import MemoryBroker
    from .results.memory import MemoryResults

    if server._exit_stack is not None:
        raise RuntimeError(
            f"in_memory() needs a closed {type(server).__name__}: swap its backends "
            "before `async with server:`, not inside it"
        )
    saved = server.broker, server.results
    server.broker, server.results = MemoryBroker(), MemoryResults()
    try:
        yield server
    finally:
        server.broker, server.results = saved
    if server._exit_stack is not None:
        raise RuntimeError(
            f"the {type(server).__name__} was left open at the end of in_memory(): close "
            "it inside the block (its backends are now its own again)"
        )


@asynccontextmanager
async def worker(server: Server) -> AsyncIterator[Server]:
    """Run ``server``'s workers for the duration of the block (opening the server
    first if it is not open, and closing it after); the workers stop at the block's
    end, handing unfinished jobs back to the broker.

    :return: the server (``async with worker(server) as s:``)
    """
    async with AsyncExitStack() as stack:
        if server._exit_stack is None:
            await stack.enter_async_context(server)
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            try:
                yield server
            finally:
                tg.cancel_scope.cancel()


async def drain(
    server: Server | Client, *, queues: Iterable[str] | None = None, timeout: float = 10.0
) -> None:
    """Run every job on the queues to its end, then return: the queues are empty
    (nothing pending, scheduled or in flight; :meth:`~tasqueue_anyio.Client.counts`).

    Given a :class:`~tasqueue_anyio.Server` whose workers are not running, it runs them
    (``run(burst=True)``) until the queues are empty; when they are running already
    (inside :func:`worker`), or given a plain :class:`~tasqueue_anyio.Client` (another process runs the
    workers), it waits until the queues are empty, looking at their counts every few
    milliseconds. A job with an ETA is waited for; a cron schedule's future runs are
    not (they are not enqueued yet).

    :param queues: the queues to empty (default: the server's registered queues;
        required with a plain client)
    :param timeout: seconds before :class:`TimeoutError`
    :raises TimeoutError: the queues were not empty in time
    :raises ValueError: no queue to drain
    """
    names = list(queues) if queues is not None else list(getattr(server, "queues", {}))
    if not names:
        raise ValueError("no queue to drain: pass queues=[...]")
    with anyio.fail_after(timeout):
        if isinstance(server, Server) and server._worker is None:
            if server._exit_stack is None:
                async with server:
                    await server.run(burst=True)
            else:
                await server.run(burst=True)
            if queues is None:
                return
        empty_looks = 0
        while empty_looks < 2:  # twice in a row: a job's follow-ups are enqueued first
            counts = [await server.counts(name) for name in names]
            idle = all(c.empty for c in counts) and not server._active
            empty_looks = empty_looks + 1 if idle else 0
            await anyio.sleep(0.005)
