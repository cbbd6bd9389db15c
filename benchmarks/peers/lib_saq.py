"""SAQ (on redis-py's asyncio client): no bulk enqueue API, so ``Queue.enqueue`` calls
run concurrently, SAQ itself capping them at ``max_concurrent_ops`` (raised from its
default 20 to :data:`ENQUEUE_OPS`, which enqueued 10-40% faster here); ``Worker.start``
at ``concurrency``. asyncio only."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .common import Reporter, Resp

QUEUE = "default"
#: ``max_concurrent_ops`` of the enqueueing queue (20, 50, 100, 200 and 500 were tried)
ENQUEUE_OPS = 100


def enqueue(url: str, jobs: int, backend: str) -> float:
    """``jobs`` concurrent ``Queue.enqueue`` calls; their duration (s)."""
    from saq import Queue  # type: ignore[import-not-found, unused-ignore]

    async def main() -> float:
        queue = Queue.from_url(url, name=QUEUE, max_concurrent_ops=ENQUEUE_OPS)
        await queue.connect()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(queue.enqueue("noop") for _ in range(jobs)))
            return time.perf_counter() - start
        finally:
            await queue.disconnect()

    return asyncio.run(main())


def work(url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter) -> None:
    """Run one worker until the process is stopped."""
    from saq import Queue, Worker  # type: ignore[import-not-found, unused-ignore]

    async def noop(ctx: Any) -> None:
        reporter.job_done()

    async def main() -> None:
        queue = Queue.from_url(url, name=QUEUE)
        worker = Worker(queue, functions=[("noop", noop)], concurrency=concurrency)
        reporter.start()
        await queue.connect()  # as SAQ's own `saq` command does
        await worker.start()

    asyncio.run(main())


def queued(r: Resp) -> int:
    n: int = r.call("ZCARD", f"saq:{QUEUE}:incomplete")
    return n


def finished(r: Resp, jobs: int) -> int:
    # a job stays in `incomplete` from its enqueue until SAQ records its end
    n: int = r.call("ZCARD", f"saq:{QUEUE}:incomplete")
    return jobs - n
