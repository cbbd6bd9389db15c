"""The application ``tests/test_redis_reliability.py`` runs as worker processes (not a test
module): ``python -m tasqueue_anyio.cli worker reliability_app:make_server``, or the same
entry point forked by the fork server of ``tests/worker_fleet.py``.

Configured by the environment, so that each process gets a short lease:

- ``RELIABILITY_REDIS_URL``: the Redis server (default ``redis://127.0.0.1:6379/0``)
- ``RELIABILITY_PREFIX``: the key prefix, one per test (default ``tasqueue-reliability``)
- ``RELIABILITY_LEASE``: the broker's lease in seconds (default 1.5)
- ``RELIABILITY_CONCURRENCY``: processors of :data:`QUEUE` (default 4)
- ``RELIABILITY_LIMITS``: ``runs,per,running`` limits of :data:`QUEUE` (empty parts: no
  such limit; unset: none)

The tasks leave their traces in Redis, under ``PREFIX:t:`` (a part of the key space the
library does not use), so the test process reads them whatever worker wrote them:

- ``hold`` (payload: comma-separated seconds, one per attempt, the last one repeating)
  pushes ``"<pid>:<attempt>"`` onto ``PREFIX:t:started:<job id>``, sleeps, saves its pid
  as the job's result, then pushes its pid onto ``PREFIX:t:saved:<job id>``. A rejected
  save (:class:`LeaseLostError`) is logged, with the pid, and raised.
- ``effect`` (payload: seconds to sleep, default none) sleeps, then in one script counts
  an execution in the hash ``PREFIX:t:executions`` and performs the idempotent effect:
  ``SET PREFIX:t:effect:<job id> NX``, and only when that set the key, ``HINCRBY
  PREFIX:t:effects <job id> 1``.
- ``nap`` (payload: seconds to sleep) only sleeps: it never touches Redis itself, so a
  Redis outage reaches nothing but the library.
- ``stamp`` (payload: seconds to sleep): counts itself running in ``PREFIX:t:running``
  (the most at once in ``PREFIX:t:most``) and pushes its start time (the Redis clock, in
  ms) onto ``PREFIX:t:starts``, sleeps, then counts itself out.
- ``flaky`` (payload: seconds): its first try pushes ``"<pid>:<attempt>"`` onto
  ``PREFIX:t:started:<job id>``, sleeps that long and fails; a retry does what ``effect``
  does (no sleep).

Importing this module has no side effects: the worker command names the factory
(``reliability_app:make_server``), which reads the environment when the worker starts.
"""

from __future__ import annotations

import logging
import os

import anyio
from process_support import limit_from_env

from tasqueue_anyio import JobContext, LeaseLostError, Server
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

__all__ = ["QUEUE", "Keys", "make_server"]

#: The queue of every task of this app.
QUEUE = "rel"

log = logging.getLogger("reliability_app")

# KEYS: effect marker, effects hash, executions hash. ARGV: job id.
_EFFECT = """
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if redis.call('SET', KEYS[1], '1', 'NX') then
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  return 1
end
return 0
"""


# KEYS: running counter, most, starts. Returns 1.
_STAMP_IN = """
local now = redis.call('TIME')
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], n)
end
redis.call('RPUSH', KEYS[3], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
return 1
"""


class Keys:
    """The keys of the tasks' traces under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.base = f"{prefix}:t:"
        self.executions = self.base + "executions"
        self.effects = self.base + "effects"

    def started(self, job_id: str) -> str:
        return f"{self.base}started:{job_id}"

    def saved(self, job_id: str) -> str:
        return f"{self.base}saved:{job_id}"

    def effect(self, job_id: str) -> str:
        return f"{self.base}effect:{job_id}"

    @property
    def stamps(self) -> list[str]:
        """The keys of ``stamp``: running counter, most at once, start times."""
        return [self.base + "running", self.base + "most", self.base + "starts"]


def make_server(
    url: str | None = None, prefix: str | None = None, lease: float | None = None
) -> Server:
    """A server with this app's tasks, on the Redis store the environment names."""
    url = url or os.environ.get("RELIABILITY_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = prefix or os.environ.get("RELIABILITY_PREFIX", "tasqueue-reliability")
    if lease is None:
        lease = float(os.environ.get("RELIABILITY_LEASE", "1.5"))
    concurrency = int(os.environ.get("RELIABILITY_CONCURRENCY", "4"))
    broker = RedisBroker(url, prefix=prefix, lease=lease)
    keys = Keys(prefix)
    pid = os.getpid()

    async def hold(payload: bytes, ctx: JobContext) -> None:
        durations = [float(part) for part in payload.decode().split(",")]
        attempt = ctx.meta.attempt
        job_id = ctx.job_id
        await broker.client.rpush(keys.started(job_id), [f"{pid}:{attempt}"])
        await anyio.sleep(durations[min(attempt, len(durations)) - 1])
        try:
            await ctx.save(str(pid).encode())
        except LeaseLostError as exc:
            log.error("pid %d: LeaseLostError saving the result of job %s: %s", pid, job_id, exc)
            raise
        await broker.client.rpush(keys.saved(job_id), [str(pid)])

    async def effect(payload: bytes, ctx: JobContext) -> None:
        job_id = ctx.job_id
        await anyio.sleep(float(payload or b"0"))
        await broker.client.eval(
            _EFFECT, [keys.effect(job_id), keys.effects, keys.executions], [job_id]
        )

    async def nap(payload: bytes, ctx: JobContext) -> None:
        await anyio.sleep(float(payload or b"0"))

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        if ctx.meta.retried > 0:
            await effect(b"", ctx)
            return
        await broker.client.rpush(keys.started(ctx.job_id), [f"{pid}:{ctx.meta.attempt}"])
        await anyio.sleep(float(payload))
        raise RuntimeError(f"pid {pid}: the first try of job {ctx.job_id} fails")

    server = Server(broker=broker, results=RedisResults(url, prefix=prefix))
    server.register_task("hold", hold, queue=QUEUE, concurrency=concurrency, raw=True)
    server.register_task("effect", effect, queue=QUEUE, raw=True)
    server.register_task("nap", nap, queue=QUEUE, raw=True)
    async def stamp(payload: bytes, ctx: JobContext) -> None:
        await broker.client.eval(_STAMP_IN, keys.stamps, [])
        try:
            await anyio.sleep(float(payload or b"0"))
        finally:
            with anyio.CancelScope(shield=True):
                await broker.client.decr(keys.stamps[0])

    server.register_task("flaky", flaky, queue=QUEUE, raw=True)
    server.register_task("stamp", stamp, queue=QUEUE, raw=True)
    limit_from_env(server, QUEUE, os.environ.get("RELIABILITY_LIMITS"))
    return server
