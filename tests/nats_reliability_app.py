"""The application ``tests/test_nats_reliability.py`` runs as worker processes (not a test
module): ``python -m tasqueue_anyio.cli worker nats_reliability_app:make_server``, or the
same entry point forked by the fork server of ``tests/worker_fleet.py``.

Configured by the environment:

- ``NATS_RELIABILITY_URL``: the NATS server (default ``nats://127.0.0.1:4222``)
- ``NATS_RELIABILITY_NAME``: the broker prefix and results bucket, one per test
- ``NATS_RELIABILITY_ACK_WAIT``: the broker's ack wait in seconds (default 1.5)
- ``NATS_RELIABILITY_CONCURRENCY``: processors of :data:`QUEUE` (default 2)
- ``NATS_RELIABILITY_LIMITS``: ``runs,per,running`` limits of :data:`QUEUE` (empty parts:
  no such limit; unset: none)

The tasks:

- ``hold`` (payload: comma-separated seconds, one per attempt, the last one repeating)
  sleeps for its attempt's duration, then saves ``"<pid>:<attempt>"`` as the job's result.
  A save refused because the run lost the job is logged (with the pid) and raised.
- ``effect`` (payload: seconds to sleep, default none) sleeps, then leaves its traces in
  the stream :attr:`Effects.stream` (``<NAME>_fx``, which the test creates), in one
  pipelined round trip: it counts an execution (a message on ``<NAME>_fx.x.<job id>``,
  every time) and performs the idempotent effect, a message on ``<NAME>_fx.e.<job id>``
  published with ``Nats-Expected-Last-Subject-Sequence: 0``, which the stream stores
  only while that subject is empty (a later run's copy is refused, and ignored).
- ``nap`` (payload: seconds to sleep) only sleeps: it never touches NATS itself, so a
  server outage reaches nothing but the library.
- ``stamp`` (payload: seconds to sleep): publishes ``in`` on ``<NAME>_fx.s.<job id>``,
  sleeps, then publishes ``out`` there (the stream's order and times tell how many ran
  at once and when each started).
- ``flaky`` (payload: seconds): its first try sleeps that long and fails; a retry does
  what ``effect`` does (no sleep).

Importing this module has no side effects: the worker command names the factory
(``nats_reliability_app:make_server``), which reads the environment when the worker starts.
"""

from __future__ import annotations

import logging
import os

import anyio
from process_support import limit_from_env

from tasqueue_anyio import JobContext, LeaseLostError, Server
from tasqueue_anyio._nats.jetstream import WrongLastSequenceError
from tasqueue_anyio._nats.protocol import NatsError
from tasqueue_anyio._nats_backend import decode_token, encode_token
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

__all__ = ["QUEUE", "Effects", "make_server"]

#: The queue of every task of this app.
QUEUE = "rel"

log = logging.getLogger("nats_reliability_app")


class Effects:
    """The stream and subjects of the ``effect`` task's traces under one name."""

    def __init__(self, name: str) -> None:
        self.stream = f"{name}_fx"
        self.executions = f"{self.stream}.x.*"
        self.effects = f"{self.stream}.e.*"

    def executed(self, job_id: str) -> str:
        return f"{self.stream}.x.{encode_token(job_id)}"

    def effect(self, job_id: str) -> str:
        return f"{self.stream}.e.{encode_token(job_id)}"

    @property
    def stamps(self) -> str:
        return f"{self.stream}.s.*"

    def stamp(self, job_id: str) -> str:
        return f"{self.stream}.s.{encode_token(job_id)}"

    def job_id(self, subject: str) -> str:
        """The job id of a trace's subject (the reverse of :meth:`executed`, :meth:`effect`)."""
        return decode_token(subject.rsplit(".", 1)[1])


def make_server(
    url: str | None = None, name: str | None = None, ack_wait: float | None = None
) -> Server:
    """A server with this app's tasks, on the NATS server the environment names."""
    url = url or os.environ.get("NATS_RELIABILITY_URL", "nats://127.0.0.1:4222")
    name = name or os.environ.get("NATS_RELIABILITY_NAME", "tasqueue-reliability")
    if ack_wait is None:
        ack_wait = float(os.environ.get("NATS_RELIABILITY_ACK_WAIT", "1.5"))
    concurrency = int(os.environ.get("NATS_RELIABILITY_CONCURRENCY", "2"))
    broker = NatsBroker(url, prefix=name, ack_wait=ack_wait)
    effects = Effects(name)
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

    async def effect(payload: bytes, ctx: JobContext) -> None:
        job_id = ctx.job_id
        await anyio.sleep(float(payload or b"0"))
        trace = f"{pid}:{ctx.meta.attempt}".encode()
        executed, performed = await broker.publish_many(
            [
                (effects.executed(job_id), trace, ()),
                (effects.effect(job_id), trace, [("Nats-Expected-Last-Subject-Sequence", "0")]),
            ]
        )
        if isinstance(executed, NatsError):
            raise executed
        # refused as a second copy: an earlier run of the job performed it, done
        if isinstance(performed, NatsError) and not isinstance(performed, WrongLastSequenceError):
            raise performed

    async def nap(payload: bytes, ctx: JobContext) -> None:
        await anyio.sleep(float(payload or b"0"))

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        if ctx.meta.retried > 0:
            await effect(b"", ctx)
            return
        await anyio.sleep(float(payload))
        raise RuntimeError(f"pid {pid}: the first try of job {ctx.job_id} fails")

    server = Server(broker=broker, results=NatsResults(url, prefix=name))
    server.register_task("hold", hold, queue=QUEUE, concurrency=concurrency, raw=True)
    server.register_task("effect", effect, queue=QUEUE, raw=True)
    server.register_task("nap", nap, queue=QUEUE, raw=True)
    async def stamp(payload: bytes, ctx: JobContext) -> None:
        await broker.js.publish(effects.stamp(ctx.job_id), b"in")
        try:
            await anyio.sleep(float(payload or b"0"))
        finally:
            with anyio.CancelScope(shield=True):
                await broker.js.publish(effects.stamp(ctx.job_id), b"out")

    server.register_task("flaky", flaky, queue=QUEUE, raw=True)
    server.register_task("stamp", stamp, queue=QUEUE, raw=True)
    limit_from_env(server, QUEUE, os.environ.get("NATS_RELIABILITY_LIMITS"))
    return server
