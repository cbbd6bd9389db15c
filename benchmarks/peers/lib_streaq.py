"""streaq (on coredis and AnyIO): ``Worker.enqueue_many`` (one pipeline) and
``Worker.run_async``. Trio is chosen with ``Worker(anyio_backend="trio")``, which
``run_sync`` passes to ``anyio.run``; here ``anyio.run`` is called with the backend."""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import anyio

from .common import Reporter, Resp

QUEUE = "default"


def _worker(url: str, concurrency: int, backend: str, on_run: Any = None) -> tuple[Any, Any]:
    from streaq import Worker  # type: ignore[import-not-found, unused-ignore]

    worker = Worker(
        redis_url=url,
        concurrency=concurrency,
        queue_name=QUEUE,
        anyio_backend=cast(Literal["asyncio", "trio"], backend),
    )

    async def noop() -> None:
        if on_run is not None:
            on_run()

    # silent: no log line per task (the parent configures no logging anyway)
    task: Any = worker.task(name="noop", silent=True)
    return worker, task(noop)


def enqueue(url: str, jobs: int, backend: str) -> float:
    """``Worker.enqueue_many`` of ``jobs`` no-op tasks; its duration (s)."""
    worker, noop = _worker(url, 32, backend)

    async def main() -> float:
        async with worker:
            start = time.perf_counter()
            await worker.enqueue_many([noop.enqueue() for _ in range(jobs)])
            return time.perf_counter() - start

    elapsed: float = anyio.run(main, backend=backend)
    return elapsed


def work(url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter) -> None:
    """Run one worker until the process is stopped."""
    worker, _ = _worker(url, concurrency, backend, reporter.job_done)
    reporter.start()
    anyio.run(worker.run_async, backend=backend)


def queued(r: Resp) -> int:
    n: int = r.call("XLEN", f"streaq:{QUEUE}:queues:normal")
    return n


def finished(r: Resp, jobs: int) -> int:
    n: int = r.call("ZCARD", f"streaq:{QUEUE}:index:results")
    return n
