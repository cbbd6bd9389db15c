"""The application that ``tests/test_cli.py`` runs with ``tasqueue worker`` (not a test module).

Its backends are Redis, on the URL and under the key prefix named by the environment:

- ``TASQUEUE_TEST_REDIS_URL``: the Redis server (default ``redis://127.0.0.1:6379/0``)
- ``TASQUEUE_TEST_PREFIX``: the key prefix, one per test (default ``tasqueue-cli-test``)
- ``TASQUEUE_TEST_EFFECTS``: a directory where ``slow`` records its runs (default: none)

``server`` is a ready :class:`Server`; ``make_server`` is the factory form (``tasqueue
worker cli_app:make_server``), and the test process calls it to get a server on the same
store. ``not_a_server`` is for the error tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from tasqueue_anyio import JobContext, Server, current_job
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

__all__ = ["FAST", "SLOW", "effects", "make_server", "not_a_server", "server"]

#: The queue of ``quick`` and ``failing``, and the queue of ``slow``.
FAST = "fast"
SLOW = "slow"

not_a_server = 42


def make_server(url: str | None = None, prefix: str | None = None) -> Server:
    """A server with this app's tasks, on the Redis store the environment names."""
    url = url or os.environ.get("TASQUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = prefix or os.environ.get("TASQUEUE_TEST_PREFIX", "tasqueue-cli-test")
    server = Server(
        broker=RedisBroker(url, prefix=prefix), results=RedisResults(url, prefix=prefix)
    )
    server.register_task("quick", quick, queue=FAST, concurrency=4, raw=True)
    server.register_task("failing", failing, queue=FAST, raw=True)
    server.register_task("slow", slow, queue=SLOW, concurrency=2, raw=True)
    server.register_task("halfway", halfway, queue=FAST)
    return server


async def halfway(note: str) -> str:
    """A typed task that reports progress, then returns ``note``."""
    await current_job().set_progress(0.5, f"half of {note}")
    return note


async def quick(payload: bytes, ctx: JobContext) -> None:
    """Save ``ok:`` and the payload as the result."""
    await ctx.save(b"ok:" + payload)


async def failing(payload: bytes, ctx: JobContext) -> None:
    """Always fail."""
    raise RuntimeError(f"failing on purpose: {payload!r}")


def effects(job_id: str, directory: str | Path | None = None) -> list[str]:
    """The lines ``slow`` wrote for ``job_id`` (``start`` per run, ``done`` per finished run)."""
    directory = directory or os.environ.get("TASQUEUE_TEST_EFFECTS")
    if not directory:
        return []
    path = Path(directory) / job_id
    return path.read_text().split() if path.exists() else []


async def slow(payload: bytes, ctx: JobContext) -> None:
    """Sleep, recording ``start`` and ``done`` in the effects directory.

    The payload is comma-separated seconds, one per run: ``b"30,0.1"`` sleeps 30 s on the
    first run and 0.1 s on the second (and later) runs, so that a job handed back by one
    worker ends quickly on the next.
    """
    durations = [float(part) for part in payload.decode().split(",")]
    runs = effects(ctx.job_id).count("start")
    _record(ctx.job_id, "start")
    await anyio.sleep(durations[min(runs, len(durations) - 1)])
    _record(ctx.job_id, "done")


def _record(job_id: str, word: str) -> None:
    directory = os.environ.get("TASQUEUE_TEST_EFFECTS")
    if directory:
        with (Path(directory) / job_id).open("a") as file:
            file.write(word + "\n")


server = make_server()
