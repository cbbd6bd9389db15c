"""A worker cut off from its store for longer than its lease, then reconnected (R7).

Two workers run in the test process on one store (Redis, or NATS JetStream), under one
prefix: the *stale* one reaches the server through a :class:`tcp_proxy.TcpProxy` on
127.0.0.1 that the test controls, the *fresh* one connects directly. Leases (Redis) and
ack waits (NATS) are :data:`LEASE` seconds.

The stale worker starts the job (attempt 1, its handler then waits), the test cuts its
link (a silent pause: no byte moves; or a drop: every connection closed, new ones
refused) for longer than the lease, and the fresh worker takes the job over
(attempt 2) and ends it. Then the link comes back and the stale handler goes on: its
``ctx.save`` is refused with :class:`LeaseLostError`, and so are its end-of-job write and
its ack. The job ends once, successful, with the fresh worker's result; the handler's
effect (counted only after a save went through) happened once; nothing is left queued or
held; and the stale worker lives on, reconnected: it runs the next job by itself.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from uuid import uuid4

import anyio
import coredis
import pytest
from nats_server import NatsServer
from redis_server import COREDIS_LEAKS, RedisServer
from tcp_proxy import TcpProxy, tcp_proxy

from tasqueue_anyio import BrokerError, Job, JobContext, JobMessage, LeaseLostError, Server, Status
from tasqueue_anyio.abc import Broker, Results

# reconnection attempts refused by a dropped link leak coredis's streams (see the fixture)
pytestmark = [pytest.mark.anyio, *COREDIS_LEAKS]

#: The lease (Redis) or ack wait (NATS) of both workers, seconds.
LEASE = 1.0
#: The queue of the tests' jobs.
QUEUE = "partition"
#: The bound of one test's steps (a takeover, a reconnection).
STEP = 20.0


@dataclass
class Trace:
    """What the handlers of both workers did."""

    runs: list[tuple[str, int]] = field(default_factory=list)
    #: job id -> effects performed (after a save that went through)
    effects: Counter[str] = field(default_factory=Counter)
    #: the exceptions the stale worker's saves raised
    refused: list[BaseException] = field(default_factory=list)
    stale_started: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    stale_done: anyio.Event = field(default_factory=anyio.Event)


def make_server(name: str, broker: Broker, results: Results, trace: Trace) -> Server:
    """A worker whose ``work`` task saves ``name`` as the result; the stale worker's
    first run of a ``hold`` job waits for ``trace.release`` first."""

    async def work(payload: bytes, ctx: JobContext) -> None:
        trace.runs.append((name, ctx.meta.attempt))
        stale_hold = name == "stale" and payload == b"hold"
        try:
            if stale_hold:
                trace.stale_started.set()
                await trace.release.wait()
            try:
                await ctx.save(name.encode())
            except Exception as exc:
                if stale_hold:
                    trace.refused.append(exc)
                raise
            trace.effects[ctx.job_id] += 1
        finally:
            if stale_hold:
                trace.stale_done.set()

    server = Server(broker=broker, results=results)
    server.register_task("work", work, queue=QUEUE, concurrency=2, raw=True)
    return server


# -- the two stores: backends through the proxy or direct ---------------------------------


BackendsFactory = Callable[[int, str], tuple[Broker, Results]]


def redis_backends(port: int, prefix: str) -> tuple[Broker, Results]:
    from tasqueue_anyio.brokers.redis import RedisBroker
    from tasqueue_anyio.results.redis import RedisResults

    url = f"redis://127.0.0.1:{port}/0"
    return RedisBroker(url, prefix=prefix, lease=LEASE), RedisResults(url, prefix=prefix)


def nats_backends(port: int, prefix: str) -> tuple[Broker, Results]:
    from tasqueue_anyio.brokers.nats import NatsBroker
    from tasqueue_anyio.results.nats import NatsResults

    url = f"nats://127.0.0.1:{port}"
    return (
        NatsBroker(url, prefix=prefix, ack_wait=LEASE),
        NatsResults(url, prefix=prefix),
    )


async def nothing_held_redis(server: Server, port: int, prefix: str) -> bool:
    """No message of :data:`QUEUE` stored, due, leased or held."""
    async with coredis.Redis(host="127.0.0.1", port=port) as client:
        keys = [f"{prefix}:{{q:{QUEUE}}}:{suffix}" for suffix in ("msg", "ready", "held")]
        return not await client.exists(keys) and not await client.zcard(
            f"{prefix}:{{q:{QUEUE}}}:lease"
        )


async def nothing_held_nats(server: Server, port: int, prefix: str) -> bool:
    """The stream holds no message (an acked one is removed)."""
    from tasqueue_anyio.brokers.nats import NatsBroker

    broker = server.broker
    assert isinstance(broker, NatsBroker)
    return (await broker.js.stream_info(broker.stream)).messages == 0


@dataclass
class Store:
    port: int
    backends: BackendsFactory
    nothing_held: Callable[[Server, int, str], Awaitable[bool]]


@pytest.fixture(params=["redis", "nats"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return Store(redis.port, redis_backends, nothing_held_redis)
    nats: NatsServer = request.getfixturevalue("nats_server")
    return Store(nats.port, nats_backends, nothing_held_nats)


@asynccontextmanager
async def workers(store: Store, trace: Trace) -> AsyncIterator[tuple[Server, Server, TcpProxy]]:
    """The stale worker (through a proxy) and the fresh one (direct), both open; the
    NATS stream and bucket are deleted afterwards."""
    prefix = f"p{uuid4().hex[:10]}"
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(tcp_proxy(store.port))
        stale = make_server("stale", *store.backends(proxy.port, prefix), trace)
        fresh = make_server("fresh", *store.backends(store.port, prefix), trace)
        await stack.enter_async_context(fresh)

        @stack.push_async_callback
        async def cleanup() -> None:
            from tasqueue_anyio.brokers.nats import NatsBroker
            from tasqueue_anyio.results.nats import NatsResults

            broker, results = fresh.broker, fresh.results
            if isinstance(broker, NatsBroker) and isinstance(results, NatsResults):
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await broker.js.delete_stream(broker.stream)
                    await results.drop()

        await stack.enter_async_context(stale)
        yield stale, fresh, proxy


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.fail_after(STEP):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def wait_reconnected(server: Server, job_id: str) -> JobMessage:
    """``server.wait(job_id)``, once the server's event subscription is back (a wait
    that cannot subscribe while the subscriber connection reconnects raises
    :class:`BrokerError`)."""
    with anyio.fail_after(STEP):
        while True:
            try:
                return await server.wait(job_id)
            except BrokerError:
                await anyio.sleep(0.05)


@pytest.mark.parametrize("cut", ["pause", "drop"])
async def test_worker_cut_off_past_its_lease_cannot_write_and_reconnects(
    store: Store, cut: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tasqueue_anyio.worker")
    trace = Trace()
    async with workers(store, trace) as (stale, fresh, proxy):
        prefix = fresh.broker.prefix  # type: ignore[attr-defined]
        async with anyio.create_task_group() as tg:
            stale_scope = anyio.CancelScope()

            async def run_stale() -> None:
                with stale_scope:
                    await stale.run()

            tg.start_soon(run_stale)
            job_id = await fresh.enqueue(Job("work", b"hold", queue=QUEUE))
            with anyio.fail_after(STEP):
                await trace.stale_started.wait()

            # the link goes down for longer than the lease; the fresh worker takes over
            connections = proxy.accepted
            getattr(proxy, cut)()
            fresh_scope = anyio.CancelScope()

            async def run_fresh() -> None:
                with fresh_scope:
                    await fresh.run()

            tg.start_soon(run_fresh)
            done = await fresh.wait(job_id, timeout=STEP)
            assert (done.status, done.meta.attempt) == (Status.SUCCESSFUL, 2)
            assert trace.runs == [("stale", 1), ("fresh", 2)]

            if cut == "pause":
                # the stale save goes out while the link is down: held in flight
                trace.release.set()
                await anyio.sleep(0.1)
                assert not trace.stale_done.is_set()
                proxy.resume()
            else:
                # the stale save goes out once the link is back: after a reconnection
                proxy.resume()
                trace.release.set()
            with anyio.fail_after(STEP):
                await trace.stale_done.wait()
            assert len(trace.refused) == 1
            assert isinstance(trace.refused[0], LeaseLostError), trace.refused

            # the job ended once, with the fresh worker's result, its effect once
            final = await fresh.get_job(job_id)
            assert (final.status, final.meta.attempt) == (Status.SUCCESSFUL, 2)
            assert await fresh.get_result(job_id) == b"fresh"
            assert trace.effects == {job_id: 1}
            assert await fresh.get_success() == [job_id]
            assert await fresh.get_failed() == []

            # the stale worker's refused end and ack leave nothing behind
            async def nothing_held() -> bool:
                return await store.nothing_held(fresh, store.port, prefix)

            await eventually(nothing_held)
            assert await fresh.get_pending(QUEUE) == []

            async def stale_end_refused() -> bool:
                # "job <id> was ended by another run" (its end record refused), or "a run
                # ... lost its lease" (its ack refused; on Redis, with its end record)
                return any(
                    record.levelno == logging.WARNING
                    and (job_id in record.getMessage() or "lost its lease" in record.getMessage())
                    for record in caplog.records
                )

            await eventually(stale_end_refused)

            # the stale worker lives on, reconnected: alone, it runs the next job
            fresh_scope.cancel()
            second = await fresh.enqueue(Job("work", b"next", queue=QUEUE))
            # its event subscriptions come back too: its own wait() hears the end
            done = await wait_reconnected(stale, second)
            assert (done.status, done.meta.attempt) == (Status.SUCCESSFUL, 1)
            assert await fresh.get_result(second) == b"stale"
            assert trace.effects == {job_id: 1, second: 1}
            await eventually(nothing_held)
            if cut == "drop":  # the stale worker did connect again
                assert proxy.accepted > connections
            stale_scope.cancel()
