"""Tutorial 6: the application's tasks module, on Redis. Workers run it with
``tasqueue worker tasks:server``; producers import its task functions for their names and
types, and enqueue them through a ``Client`` of their own."""

from __future__ import annotations

import logging
import os

import anyio

from tasqueue_anyio import Server, current_job
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
log = logging.getLogger("tasks")

server = Server(
    # lease: how long a job held by a worker that died waits before another worker takes
    # it (live workers renew their leases); the default is 15 s, shorter for this tutorial
    broker=RedisBroker(REDIS_URL, lease=5),
    results=RedisResults(REDIS_URL),
)


@server.task(queue="images", concurrency=8, max_retries=3, timeout=60)
async def thumbnail(image: str, size: int) -> str:
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    await anyio.sleep(0.01)  # stands for the real work
    return f"{image.removesuffix('.png')}-{size}.png"


@server.task(queue="reports", timeout=300)
async def monthly_report(month: str) -> str:
    job = current_job()
    log.info("%s started in worker %d (attempt %d)", job.job_id, os.getpid(), job.meta.attempt)
    for page in range(1, 11):
        await job.set_progress(page / 10, f"page {page} of 10")
        await anyio.sleep(0.3)  # stands for the real work
    return f"report for {month}: 10 pages, done on attempt {job.meta.attempt}"
