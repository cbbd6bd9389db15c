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
server is built per test (a fixture).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import anyio

from ._client import Client
from ._server import Server

__all__ = ["drain", "worker"]


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
