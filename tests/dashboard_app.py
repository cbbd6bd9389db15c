"""The app of the dashboard's browser test (not a test module itself): tasks on Redis, run by
a ``tasqueue worker`` process and shown by a ``tasqueue dashboard`` process. ``REDIS_URL``
and ``PREFIX`` say where; ``MARKS`` is a directory where the tasks leave files the test
waits on (a file appears when a handler starts, stops, or has failed once)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from tasqueue_anyio import Server
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("PREFIX", "tasqueue")
MARKS = Path(os.environ.get("MARKS", "."))

server = Server(broker=RedisBroker(URL, prefix=PREFIX), results=RedisResults(URL, prefix=PREFIX))


@server.task(queue="web", concurrency=4)
async def add(a: int, b: int) -> int:
    await anyio.sleep(0.5)  # long enough to be seen in flight
    return a + b


@server.task(queue="web")
async def sleeper(name: str) -> None:
    (MARKS / f"{name}.started").touch()
    try:
        await anyio.sleep(120)
    except anyio.get_cancelled_exc_class():
        (MARKS / f"{name}.stopped").touch()
        raise


@server.task(queue="web", max_retries=0)
async def flaky(name: str) -> str:
    mark = MARKS / f"{name}.failed-once"
    if not mark.exists():
        mark.touch()
        raise ConnectionError("the first run fails")
    return "the retry worked"
