"""taskiq with taskiq-redis: ``ListQueueBroker`` (LPUSH/BRPOP, no acks) or
``RedisStreamBroker`` (consumer group, acked), each with ``RedisAsyncResultBackend``
(every job's result stored, as the other libraries store theirs). No bulk enqueue API,
so ``kiq()`` calls run concurrently, at most :data:`ENQUEUE_CONCURRENCY` at a time;
the worker is taskiq's receiver (``run_receiver_task``) with ``max_async_tasks`` =
concurrency. asyncio only."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .common import Reporter, Resp

QUEUE = "taskiq"
RESULT_PREFIX = "taskiq-result"
#: concurrent ``kiq()`` calls (5 to 200 were tried here: all within noise of each other
#: up to 50, slower beyond)
ENQUEUE_CONCURRENCY = 50


def _broker(url: str, stream: bool, on_run: Any = None) -> tuple[Any, Any]:
    from taskiq_redis import (  # type: ignore[import-not-found, unused-ignore]
        ListQueueBroker,
        RedisAsyncResultBackend,
        RedisStreamBroker,
    )

    broker: Any = (
        RedisStreamBroker(url, queue_name=QUEUE)
        if stream
        else ListQueueBroker(url, queue_name=QUEUE)
    )
    broker = broker.with_result_backend(RedisAsyncResultBackend(url, prefix_str=RESULT_PREFIX))

    async def noop() -> None:
        if on_run is not None:
            on_run()

    task: Any = broker.task(task_name="noop")
    return broker, task(noop)


def enqueue(url: str, jobs: int, backend: str, *, stream: bool = False) -> float:
    """``jobs`` ``kiq()`` calls, :data:`ENQUEUE_CONCURRENCY` at a time; their duration."""

    async def main() -> float:
        broker, noop = _broker(url, stream)
        await broker.startup()  # the stream broker creates its consumer group here
        try:
            limit = asyncio.Semaphore(ENQUEUE_CONCURRENCY)

            async def one() -> None:
                async with limit:
                    await noop.kiq()

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(jobs)))
            return time.perf_counter() - start
        finally:
            await broker.shutdown()

    return asyncio.run(main())


def work(
    url: str, jobs: int, concurrency: int, backend: str, reporter: Reporter, *, stream: bool = False
) -> None:
    """Run one receiver until the process is stopped."""
    from taskiq.api import run_receiver_task  # type: ignore[import-not-found, unused-ignore]

    broker, _ = _broker(url, stream, reporter.job_done)

    async def main() -> None:
        reporter.start()
        await run_receiver_task(broker, max_async_tasks=concurrency, run_startup=True)

    asyncio.run(main())


def queued(r: Resp, *, stream: bool = False) -> int:
    n: int = r.call("XLEN" if stream else "LLEN", QUEUE)
    return n


def finished(r: Resp, jobs: int, *, stream: bool = False) -> int:
    # One result key per finished job. DBSIZE (O(1)) less the broker's own keys counts
    # them while the worker runs; a SCAN (O(keys)) confirms the count at the end.
    others: int = r.call("EXISTS", QUEUE, f"autoclaim:taskiq:{QUEUE}")
    size: int = r.call("DBSIZE")
    if size - others < jobs:
        return size - others
    return r.count_keys(f"{RESULT_PREFIX}:*")
