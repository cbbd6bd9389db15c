"""The application ``tests/test_nats_reliability.py`` runs as worker processes (not a test
module): ``python -m tasqueue_anyio.cli worker nats_reliability_app:make_server``.

Configured by the environment:

- ``NATS_RELIABILITY_URL``: the NATS server (default ``nats://127.0.0.1:4222``)
- ``NATS_RELIABILITY_NAME``: the broker prefix and results bucket, one per test
- ``NATS_RELIABILITY_ACK_WAIT``: the broker's ack wait in seconds (default 1.5)

The one task, ``hold`` (payload: comma-separated seconds, one per attempt, the last one
repeating), sleeps for its attempt's duration, then saves ``"<pid>:<attempt>"`` as the
job's result. A save refused because the run lost the job is logged (with the pid) and
raised.
"""

from __future__ import annotations

import logging
import os

import anyio

from tasqueue_anyio import JobContext, LeaseLostError, Server
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

__all__ = ["QUEUE", "make_server"]

#: The queue of the task.
QUEUE = "rel"

log = logging.getLogger("nats_reliability_app")


def make_server(
    url: str | None = None, name: str | None = None, ack_wait: float | None = None
) -> Server:
    """A server with this app's task, on the NATS server the environment names."""
    url = url or os.environ.get("NATS_RELIABILITY_URL", "nats://127.0.0.1:4222")
    name = name or os.environ.get("NATS_RELIABILITY_NAME", "tasqueue-reliability")
    if ack_wait is None:
        ack_wait = float(os.environ.get("NATS_RELIABILITY_ACK_WAIT", "1.5"))
    pid = os.getpid()

    async def hold(payload: bytes, ctx: JobContext) -> None:
        durations = [float(part) for part in payload.decode().split(",")]
        attempt = ctx.meta.attempt
        await anyio.sleep(durations[min(attempt, len(durations)) - 1])
        try:
            await ctx.save(f"{pid}:{attempt}".encode())
        except LeaseLostError as exc:
            log.error(
                "pid %d: LeaseLostError saving the result of job %s: %s", pid, ctx.job_id, exc
            )
            raise

    server = Server(
        broker=NatsBroker(url, prefix=name, ack_wait=ack_wait),
        results=NatsResults(url, bucket=name),
    )
    server.register_task("hold", hold, queue=QUEUE, concurrency=2)
    return server
