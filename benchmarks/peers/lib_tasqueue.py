"""tasqueue_anyio on Redis or on NATS JetStream: one ``Server.enqueue_many`` call, and
``Server.run`` with the task at ``concurrency``, on asyncio or Trio.

On NATS (``nats=True``) the parent checks the broker's stream over the server's HTTP
monitoring: it is a work-queue stream, so a message leaves it when its worker acks it,
and the worker acks only after recording the job's end in the results bucket. The
stream empty means every job ended and was recorded."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .common import NatsMonitor, Reporter, Resp

if TYPE_CHECKING:
    from tasqueue_anyio import Server

PREFIX = "bench"  # the Redis key prefix; on NATS the broker's stream and the results bucket
QUEUE = "default"  # tasqueue_anyio.DEFAULT_QUEUE


def _server(url: str, nats: bool) -> Server:
    from tasqueue_anyio import Server

    if nats:
        from tasqueue_anyio.brokers.nats import NatsBroker
        from tasqueue_anyio.results.nats import NatsResults

        return Server(
            broker=NatsBroker(url, prefix=PREFIX), results=NatsResults(url, prefix=PREFIX)
        )
    from tasqueue_anyio.brokers.redis import RedisBroker
    from tasqueue_anyio.results.redis import RedisResults

    return Server(broker=RedisBroker(url, prefix=PREFIX), results=RedisResults(url, prefix=PREFIX))


def enqueue(url: str, jobs: int, backend: str, *, nats: bool = False) -> float:
    """One ``enqueue_many`` call of ``jobs`` no-op jobs; its duration (s)."""
    import anyio

    from tasqueue_anyio import Job

    async def main() -> float:
        async with _server(url, nats) as server:
            start = time.perf_counter()
            await server.enqueue_many([Job("noop") for _ in range(jobs)])
            return time.perf_counter() - start

    return anyio.run(main, backend=backend)


def _combiner_stats(backend: Any) -> dict[str, int]:
    """Round trips (flushes) and calls of a backend's write-combiner (if it has one)."""
    cmds = getattr(backend, "_cmds", None)
    return {"flushes": getattr(cmds, "flushes", 0), "calls": getattr(cmds, "calls", 0)}


def work(
    url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter, *, nats: bool = False
) -> None:
    """Run one worker (``Server.run``) until the process is stopped."""
    import anyio

    from tasqueue_anyio import JobContext

    async def noop(payload: bytes, ctx: JobContext) -> None:
        reporter.job_done()

    server = _server(url, nats)
    server.register_task("noop", noop, concurrency=concurrency, raw=True)
    reporter.extra = lambda: {
        "broker": _combiner_stats(server.broker),
        "results": _combiner_stats(server.results),
    }

    async def main() -> None:
        reporter.start()
        await server.run()

    anyio.run(main, backend=backend)


def queued(client: Resp | NatsMonitor, *, nats: bool = False) -> int:
    if isinstance(client, NatsMonitor):
        return client.stream_messages(PREFIX)
    n: int = client.call("LLEN", f"{PREFIX}:{{q:{QUEUE}}}:ready")
    return n


def finished(client: Resp | NatsMonitor, jobs: int, *, nats: bool = False) -> int:
    if isinstance(client, NatsMonitor):
        # acked (after the end was recorded) = gone from the work-queue stream
        left = client.stream_messages(PREFIX)
        return jobs - left if left >= 0 else 0
    # the results store lists every job that ended successful
    n: int = client.call("ZCARD", f"{PREFIX}:{{l}}:success")
    return n
