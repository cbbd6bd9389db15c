"""tasqueue_anyio on Redis: one ``Server.enqueue_many`` call, and ``Server.run`` with the
task at ``concurrency``, on asyncio or Trio."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .common import Reporter, Resp

if TYPE_CHECKING:
    from tasqueue_anyio import Server

PREFIX = "bench"
QUEUE = "default"  # tasqueue_anyio.DEFAULT_QUEUE


def _server(url: str) -> Server:
    from tasqueue_anyio import Server
    from tasqueue_anyio.brokers.redis import RedisBroker
    from tasqueue_anyio.results.redis import RedisResults

    return Server(broker=RedisBroker(url, prefix=PREFIX), results=RedisResults(url, prefix=PREFIX))


def enqueue(url: str, jobs: int, backend: str) -> float:
    """One ``enqueue_many`` call of ``jobs`` no-op jobs; its duration (s)."""
    import anyio

    from tasqueue_anyio import Job

    async def main() -> float:
        async with _server(url) as server:
            start = time.perf_counter()
            await server.enqueue_many([Job("noop") for _ in range(jobs)])
            return time.perf_counter() - start

    return anyio.run(main, backend=backend)


def _combiner_stats(backend: Any) -> dict[str, int]:
    """Round trips (flushes) and calls of a backend's write-combiner (if it has one)."""
    cmds = getattr(backend, "_cmds", None)
    return {"flushes": getattr(cmds, "flushes", 0), "calls": getattr(cmds, "calls", 0)}


def work(url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter) -> None:
    """Run one worker (``Server.run``) until the process is stopped."""
    import anyio

    from tasqueue_anyio import JobContext

    async def noop(payload: bytes, ctx: JobContext) -> None:
        reporter.job_done()

    server = _server(url)
    server.register_task("noop", noop, concurrency=concurrency)
    reporter.extra = lambda: {
        "broker": _combiner_stats(server.broker),
        "results": _combiner_stats(server.results),
    }

    async def main() -> None:
        reporter.start()
        await server.run()

    anyio.run(main, backend=backend)


def queued(r: Resp) -> int:
    n: int = r.call("LLEN", f"{PREFIX}:{{q:{QUEUE}}}:ready")
    return n


def finished(r: Resp, jobs: int) -> int:
    # the results store lists every job that ended successful
    n: int = r.call("ZCARD", f"{PREFIX}:{{l}}:success")
    return n
