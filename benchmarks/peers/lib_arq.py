"""arq (on redis-py's asyncio client): no bulk enqueue API, so ``enqueue_job`` calls run
concurrently, at most :data:`ENQUEUE_CONCURRENCY` at a time (each is a WATCH/MULTI
transaction on a connection of its own); ``Worker`` with ``max_jobs`` = concurrency and
its default 0.5 s poll delay. asyncio only."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from .common import Reporter, Resp

QUEUE = "arq:queue"
#: concurrent ``enqueue_job`` calls (of 10, 50, 100 and 200 tried here, 50 was fastest)
ENQUEUE_CONCURRENCY = 50


def _settings(url: str) -> Any:
    from arq.connections import RedisSettings  # type: ignore[import-not-found, unused-ignore]

    parts = urlsplit(url)
    return RedisSettings(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)


def enqueue(url: str, jobs: int, backend: str) -> float:
    """``jobs`` ``enqueue_job`` calls, :data:`ENQUEUE_CONCURRENCY` at a time; their
    duration (s)."""
    from arq import create_pool  # type: ignore[import-not-found, unused-ignore]

    async def main() -> float:
        pool = await create_pool(_settings(url))
        try:
            limit = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

            async def one() -> None:
                async with limit:
                    await pool.enqueue_job("noop")

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(jobs)))
            return time.perf_counter() - start
        finally:
            await pool.aclose()

    return asyncio.run(main())


def work(url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter) -> None:
    """Run one worker until the process is stopped."""
    from arq import Worker  # type: ignore[import-not-found, unused-ignore]
    from arq.worker import func  # type: ignore[import-not-found, unused-ignore]

    async def noop(ctx: Any) -> None:
        reporter.job_done()

    async def main() -> None:
        worker = Worker(
            functions=[func(noop, name="noop")],
            redis_settings=_settings(url),
            max_jobs=concurrency,
        )
        reporter.start()
        await worker.async_run()

    asyncio.run(main())


def queued(r: Resp) -> int:
    n: int = r.call("ZCARD", QUEUE)
    return n


def finished(r: Resp, jobs: int) -> int:
    # a job leaves the queue's sorted set when arq records its result
    n: int = r.call("ZCARD", QUEUE)
    return jobs - n
