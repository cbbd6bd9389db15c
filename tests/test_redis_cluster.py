"""The Redis backends on a real three-master Redis Cluster (``tests/redis_cluster.py``).

Cluster URLs and clients, queues spread over the masters, acks that enqueue on another
master, lease expiry, the results store's two-step listings, script reloading, pub/sub
order, and a whole :class:`~tasqueue_anyio.Server` run. The contract suites also run on
the cluster (the ``redis-cluster`` backend of ``conftest.py``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import anyio
import coredis
import pytest
from broker_support import consuming, envelope, receive
from redis_cluster import Placement, RedisCluster
from server_support import TIMEOUT, running, wait_event
from shim_support import run_with_a_failed_retry_ack

from tasqueue_anyio import (
    Backoff,
    BrokerError,
    Chain,
    Group,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio._redis import cluster_kwargs, is_cluster_url, renew_error_stream
from tasqueue_anyio.abc import JobRecord
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.cli import broker_from_url, results_from_url
from tasqueue_anyio.results.redis import RedisResults

pytestmark = pytest.mark.anyio


def prefix() -> str:
    return f"c{uuid4().hex[:12]}"


@asynccontextmanager
async def cluster_client(
    cluster: RedisCluster, *, decode: bool = False
) -> AsyncIterator[coredis.RedisCluster[Any]]:
    """A caller's own open cluster client (with coredis 6.9's error stream closed after)."""
    client: coredis.RedisCluster[Any] = coredis.RedisCluster(
        host="127.0.0.1", port=cluster.nodes[0].port, decode_responses=decode
    )
    close = renew_error_stream(client)
    try:
        async with client:
            yield client
    finally:
        close()


@pytest.fixture
def placement(redis_cluster: RedisCluster) -> Placement:
    return Placement(redis_cluster)


@pytest.fixture
def spread_queues(placement: Placement) -> dict[int, str]:
    """Three queue names whose keys live on three different masters: port -> name."""
    found: dict[int, str] = {}
    while len(found) < 3:
        name = f"q-{uuid4().hex[:10]}"
        found.setdefault(placement.port(f"x:{{q:{name}}}:ready"), name)
    return found


# -- URLs and clients -------------------------------------------------------------------------


def test_cluster_url_parsing() -> None:
    kwargs = cluster_kwargs("redis+cluster://us%3Aer:p%40ss@h1:7000,h2,[::1]:7002")
    assert kwargs["startup_nodes"] == [
        {"host": "h1", "port": 7000},
        {"host": "h2", "port": 6379},
        {"host": "::1", "port": 7002},
    ]
    assert (kwargs["username"], kwargs["password"]) == ("us:er", "p@ss")
    assert kwargs["decode_responses"] is False
    assert "ssl_context" not in kwargs
    assert cluster_kwargs("redis+cluster://h/0?db=0")["password"] is None
    assert cluster_kwargs("redis+cluster://:secret@h")["password"] == "secret"

    context = cluster_kwargs("rediss+cluster://h:7000")["ssl_context"]
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname

    assert is_cluster_url("REDIS+CLUSTER://h")
    assert not is_cluster_url("redis://h")
    assert RedisBroker("redis+cluster://127.0.0.1:7000").cluster
    assert not RedisBroker("redis://127.0.0.1:7000").cluster
    broker = broker_from_url("rediss+cluster://127.0.0.1:7000", prefix="p")
    assert isinstance(broker, RedisBroker)
    assert (broker.cluster, broker.split_slots, broker.prefix) == (True, True, "p")
    assert not RedisBroker("redis+cluster://127.0.0.1", split_slots=False).split_slots
    results = results_from_url("redis+cluster://127.0.0.1:7000")
    assert isinstance(results, RedisResults)
    assert results.cluster


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://h:7000/1",
        "redis+cluster://h?db=2",
        "redis+cluster://h:port",
        "redis+cluster://h,,h2",
        "redis+cluster://h?timeout=3",
        "redis+cluster://h?ssl_ca_certs=/ca.pem",
        "redis+sentinel://h",
    ],
)
def test_bad_cluster_urls_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        RedisBroker(url)
    with pytest.raises(InvalidInputError):
        RedisResults(url)


async def test_caller_cluster_client(
    redis_cluster: RedisCluster, spread_queues: dict[int, str]
) -> None:
    queue = next(iter(spread_queues.values()))
    name, job_id = prefix(), uuid4().hex
    async with cluster_client(redis_cluster, decode=True) as decoding:
        with pytest.raises(InvalidInputError, match="decode"):
            RedisBroker(client=decoding)
    async with cluster_client(redis_cluster) as client:
        broker = RedisBroker(client=client, prefix=name)
        assert (broker.cluster, broker.split_slots) == (True, True)
        async with broker, RedisResults(client=client, prefix=name) as results:
            await broker.enqueue(envelope(queue, b"m"))
            async with consuming(broker, queue) as stream:
                delivery = await receive(stream)
                assert delivery.data == b"m"
                await delivery.ack()
            await results.set_jobs({job_id: JobRecord(status="queued", data=b"x")})
            assert (await results.get_job(job_id)).data == b"x"
        # the caller's client is not closed, and the broker opens again on it
        assert await client.exists([f"{name}:s:{{{job_id}}}"]) == 1
        async with broker:
            assert await broker.get_pending(queue) == []


# -- the broker on the cluster ----------------------------------------------------------------


async def test_queues_spread_over_the_masters(
    redis_cluster: RedisCluster, spread_queues: dict[int, str]
) -> None:
    name = prefix()
    queues = list(spread_queues.values())
    batches = [[envelope(q, f"{q}-{i}".encode()) for i in range(3)] for q in queues]
    later = envelope(queues[0], b"later", eta=time.time() + 60)
    async with RedisBroker(redis_cluster.url, prefix=name) as broker:
        # one call, interleaved across three masters: one script per queue
        interleaved = [m for trio in zip(*batches, strict=True) for m in trio]
        await broker.enqueue_many([*interleaved, later])
        for port, queue in spread_queues.items():
            async with coredis.Redis(host="127.0.0.1", port=port) as node:
                assert await node.llen(f"{name}:{{q:{queue}}}:ready") == 3
        assert [data for _, data in await broker.get_scheduled(queues[0])] == [b"later"]

        # each queue's first message acks with a follow-up for the next queue's master
        for i, queue in enumerate(queues):
            expected = [f"{queue}-{n}".encode() for n in range(3)]
            if i > 0:
                expected.append(f"after {queues[i - 1]}".encode())
            got = []
            async with consuming(broker, queue) as stream:
                for _ in expected:
                    delivery = await receive(stream)
                    got.append(delivery.data)
                    follow_up = envelope(queues[(i + 1) % 3], f"after {queue}".encode())
                    first = delivery.data == expected[0]
                    await delivery.ack(enqueue=[follow_up] if first else [])
            assert got == expected
            if i > 0:
                assert await broker.get_pending(queue) == []
        assert await broker.get_pending(queues[0]) == [f"after {queues[2]}".encode()]


async def test_expired_lease_comes_back_on_the_cluster(redis_cluster: RedisCluster) -> None:
    name, queue = prefix(), "lease"
    async with cluster_client(redis_cluster) as client:
        async with RedisBroker(client=client, prefix=name, lease=0.3) as dead:
            await dead.enqueue(envelope(queue, b"job"))
            async with consuming(dead, queue) as stream:
                taken = await receive(stream)
                assert taken.attempt == 1
        # that broker is gone, its renewal with it, and the delivery was never settled
        async with RedisBroker(client=client, prefix=name, lease=0.3) as alive:
            assert await alive.get_pending(queue) == []  # still held
            async with consuming(alive, queue) as stream:
                again = await receive(stream)
                assert (again.data, again.attempt) == (b"job", 2)
                # fencing: the first delivery's settle is refused, the new owner keeps it
                with pytest.raises(BrokerError, match="lease lost"):
                    await taken.ack()
                await again.ack()
            assert await alive.get_pending(queue) == []


async def test_publish_keeps_order_on_the_cluster(redis_cluster: RedisCluster) -> None:
    # coredis would send each PUBLISH to a random node, and the cluster keeps the order
    # of one node's messages only: the broker sends a channel's through one node
    messages = [f"m{i}".encode() for i in range(50)]
    got: list[bytes] = []
    done = anyio.Event()

    def collect(data: bytes) -> None:
        got.append(data)
        if len(got) == len(messages):
            done.set()

    async with (
        RedisBroker(redis_cluster.url, prefix=prefix()) as broker,
        broker.subscribe("events", collect),
    ):
        for data in messages:
            await broker.publish("events", data)
        await wait_event(done)
    assert got == messages


async def test_scripts_reload_after_script_flush_on_every_node(
    redis_cluster: RedisCluster, spread_queues: dict[int, str]
) -> None:
    queues = list(spread_queues.values())
    job_id = uuid4().hex
    name = prefix()
    async with (
        RedisBroker(redis_cluster.url, prefix=name) as broker,
        RedisResults(redis_cluster.url, prefix=name) as results,
    ):
        assert await broker.client.script_flush()  # coredis sends it to every node
        # one pipeline over three masters, every script unknown: loaded again, repeated
        await broker.enqueue_many([envelope(q, b"m") for q in queues])
        for queue in queues:
            assert await broker.get_pending(queue) == [b"m"]
        await results.set_jobs({job_id: JobRecord(status="queued", data=b"x")})
        assert (await results.get_job(job_id)).status == "queued"


# -- the results store on the cluster ---------------------------------------------------------


async def test_results_spread_and_listings(
    redis_cluster: RedisCluster, placement: Placement
) -> None:
    name = prefix()
    ids = [f"job-{i}-{uuid4().hex[:6]}" for i in range(40)]
    # 40 random ids miss one of three masters with probability 3 * (2/3)**40 (3e-7)
    assert {placement.port(f"{name}:s:{{{job_id}}}") for job_id in ids} == {
        node.port for node in redis_cluster.nodes
    }
    queued = JobRecord(status="queued", data=b"x")
    async with RedisResults(redis_cluster.url, prefix=name) as results:
        assert await results.create_jobs(dict.fromkeys(ids, queued)) == set(ids)
        extra = f"job-extra-{uuid4().hex[:6]}"
        assert await results.create_jobs(dict.fromkeys([*ids, extra], queued)) == {extra}
        await results.set_jobs(dict.fromkeys(ids, JobRecord(status="processing", data=b"p")))

        ok, bad = ids[:5], ids[5:8]
        for job_id in ok:
            assert await results.update_job(
                job_id, JobRecord(status="successful", data=b"s"), expect=["processing"]
            )
        for job_id in bad:
            assert await results.update_job(
                job_id, JobRecord(status="failed", data=b"f"), expect=["processing"]
            )
        # refused: nothing listed
        assert not await results.update_job(
            ids[9], JobRecord(status="successful", data=b"s"), expect=["queued"]
        )
        # a start_job that writes a final status lists the job too
        assert await results.start_job(extra, JobRecord(status="failed", data=b"f")) is None
        # ending again moves the job to the end of its new listing
        assert await results.update_job(
            ok[0], JobRecord(status="failed", data=b"f"), expect=["successful"]
        )
        assert await results.get_success() == ok[1:]
        assert await results.get_failed() == [*bad, extra, ok[0]]

        await results.set_result(ok[1], b"result")
        await results.delete_job(ok[1])
        with pytest.raises(JobNotFoundError):
            await results.get_job(ok[1])
        with pytest.raises(LookupError):
            await results.get_result(ok[1])
        assert await results.get_success() == ok[2:]

        # a delete cut in half (state gone, still listed) is never shown, and is cleaned
        success_key = f"{name}:{{l}}:success"
        await results.client.delete([f"{name}:s:{{{ok[2]}}}"])
        assert await results.client.zscore(success_key, ok[2]) is not None
        assert await results.get_success() == ok[3:]
        assert await results.client.zscore(success_key, ok[2]) is None


# -- a server on the cluster ------------------------------------------------------------------


async def test_a_server_on_the_cluster(
    redis_cluster: RedisCluster, spread_queues: dict[int, str]
) -> None:
    q1, q2, q3 = spread_queues.values()
    flaky_runs: list[int] = []
    blocked = anyio.Event()
    ran_at: dict[str, float] = {}

    async def echo(payload: bytes, ctx: JobContext) -> None:
        ran_at[ctx.job_id] = time.time()
        await ctx.save(payload + (ctx.meta.prev_job_result or b""))

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        flaky_runs.append(ctx.meta.retried)
        if len(flaky_runs) == 1:
            raise ValueError("the first run fails")

    async def boom(payload: bytes, ctx: JobContext) -> None:
        raise RuntimeError("always fails")

    async def block(payload: bytes, ctx: JobContext) -> None:
        blocked.set()
        await anyio.sleep_forever()

    name = prefix()
    async with (
        RedisBroker(redis_cluster.url, prefix=name) as broker,
        RedisResults(redis_cluster.url, prefix=name) as results,
        Server(broker=broker, results=results) as server,
    ):
        server.register_task("echo", echo, queue=q1, raw=True)
        server.register_task("echo2", echo, queue=q2, raw=True)
        server.register_task("flaky", flaky, queue=q2, raw=True)
        server.register_task("boom", boom, queue=q3, raw=True)
        server.register_task("block", block, queue=q3, raw=True)

        early = await server.enqueue(Job("echo", b"early", queue=q1))
        eta = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        later = await server.enqueue(Job("echo", b"later", queue=q1, eta=eta))
        assert [msg.id for msg in await server.get_pending(q1)] == [early]
        assert [msg.id for msg in await server.get_scheduled(q1)] == [later]
        group = Group(
            [
                Job("echo", b"g1", queue=q1),
                Job("echo2", b"g2", queue=q2),
                Job("echo", b"g3", queue=q1),
            ]
        )
        chain = Chain([Job("echo", b"a", queue=q1), Job("echo2", b"b", queue=q2)])

        async with running(server):
            done = await server.wait(early, timeout=TIMEOUT)
            assert done.status is Status.SUCCESSFUL
            assert await server.get_result(early) == b"early"

            retried = await server.enqueue(Job("flaky", queue=q2, max_retries=1))
            failing = await server.enqueue(Job("boom", queue=q3))
            blocking = await server.enqueue(Job("block", queue=q3))
            await server.enqueue_group(group)
            await server.enqueue_chain(chain)

            assert (await server.wait_group(group.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            assert (await server.wait_chain(chain.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            assert await server.get_result(chain.jobs[1].id) == b"ba"

            retry_msg = await server.wait(retried, timeout=TIMEOUT)
            assert (retry_msg.status, retry_msg.meta.retried) == (Status.SUCCESSFUL, 1)
            assert flaky_runs == [0, 1]
            assert (await server.wait(failing, timeout=TIMEOUT)).status is Status.FAILED

            await wait_event(blocked)
            assert await server.cancel(blocking) is Status.PROCESSING
            assert (await server.wait(blocking, timeout=TIMEOUT)).status is Status.CANCELLED

            assert (await server.wait(later, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            assert ran_at[later] >= eta.timestamp() - 0.05

        success = await server.get_success()
        for job_id in (early, later, retried, *(job.id for job in (*group.jobs, *chain.jobs))):
            assert job_id in success
        assert failing in await server.get_failed()
        assert blocking not in success
        assert blocking not in await server.get_failed()

        await server.delete_job(early)
        assert early not in await server.get_success()
        with pytest.raises(JobNotFoundError):
            await server.get_job(early)


@pytest.mark.parametrize("fault", ["connection", "lease"])
async def test_a_retry_whose_ack_failed_still_runs_on_the_cluster(
    redis_cluster: RedisCluster, fault: str
) -> None:
    """As ``test_server_retries.test_a_retry_whose_ack_failed_still_runs``, on the
    cluster (``split_slots``), with a backoff: the retry waits for its ETA."""
    name = prefix()
    async with (
        RedisBroker(redis_cluster.url, prefix=name) as broker,
        RedisResults(redis_cluster.url, prefix=name) as results,
    ):
        failed, done, runs = await run_with_a_failed_retry_ack(
            broker, results, "q", fault, backoff=Backoff(initial=0.2, jitter=False)
        )
    assert len(failed) == 1
    assert done.status is Status.SUCCESSFUL
    assert runs == [0, 1]
