"""Redis Sentinel: ``redis+sentinel://`` URLs, and workers following a failover.

A primary, two replicas and three Sentinels on loopback (``tests/redis_sentinel.py``, one
group per module). The primary is killed (SIGKILL) while jobs are being enqueued and run:
the Sentinels promote the replica, and the broker, the results store and the workers
follow. Redis replicates asynchronously, so an enqueue acknowledged just before the kill
may not have reached the replica: the test counts those (it prints the count; run with
``-s``), and with ``wait_replicas=1`` requires none.
"""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import anyio
import pytest
from failover_support import Effects, enqueue_until_stored
from redis_sentinel import SentinelGroup, start_sentinel_group
from redis_server import COREDIS_LEAKS, SKIP_REASON

from tasqueue_anyio import (
    InvalidInputError,
    JobNotFoundError,
    NotReplicatedError,
    Server,
    Status,
)
from tasqueue_anyio._redis import sentinel_kwargs
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults
from tasqueue_anyio.testing import worker

# a failover makes coredis leak the streams of its failed connection attempts: collected
# after each test (COREDIS_LEAKS), not left to whichever test runs the collector next
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("redis-sentinel"), *COREDIS_LEAKS]

JOBS = 300
BATCH = 20
FINAL = {Status.SUCCESSFUL, Status.FAILED}


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    try:
        started = start_sentinel_group()
    except FileNotFoundError:
        pytest.skip(SKIP_REASON)
    try:
        yield started
    finally:
        started.close()


# -- URLs --------------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    found = sentinel_kwargs(
        "redis+sentinel://user:p%40ss@s1,s2:26380,[::1]:26381/orders/3"
        "?sentinel_password=sp&connect_timeout=2"
    )
    assert found["sentinels"] == [("s1", 26379), ("s2", 26380), ("::1", 26381)]
    assert found["service"] == "orders"
    primary = found["primary"]
    assert (primary["db"], primary["username"], primary["password"]) == (3, "user", "p@ss")
    assert primary["connect_timeout"] == 2.0
    assert "ssl_context" not in primary
    assert found["sentinel"]["password"] == "sp"
    tls = sentinel_kwargs("rediss+sentinel://s1/orders")
    assert tls["primary"]["db"] == 0
    assert "ssl_context" in tls["primary"]
    assert "ssl_context" in tls["sentinel"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1", "no service name"),
        ("redis+sentinel://s1/", "no service name"),
        ("redis+sentinel://s1/orders/1/2", "the path is /SERVICE"),
        ("redis+sentinel://s1/orders/x", "is not a number"),
        ("redis+sentinel://s1:port/orders", "invalid Redis Sentinel URL"),
        ("redis+sentinel://s1,/orders", "bad Sentinel address"),
        ("redis+sentinel://s1/orders?color=red", "sentinel_password"),
        ("redis+sentinel://s1/orders?ssl_ca_certs=ca.pem", "need rediss://"),
    ],
)
def test_a_bad_sentinel_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        sentinel_kwargs(url)
    with pytest.raises(InvalidInputError, match=message):
        RedisBroker(url)
    with pytest.raises(InvalidInputError, match=message):
        RedisResults(url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wait_replicas": -1}, "wait_replicas must be"),
        ({"wait_replicas": True}, "wait_replicas must be"),
        ({"wait_replicas": 1, "wait_timeout": 0}, "wait_timeout must be"),
    ],
)
def test_bad_wait_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        RedisBroker("redis://localhost", **options)  # type: ignore[arg-type]


def test_wait_replicas_is_refused_on_a_cluster_client() -> None:
    with pytest.raises(InvalidInputError, match="Redis Cluster client cannot route WAIT"):
        RedisBroker("redis+cluster://localhost:7000", wait_replicas=1)


# -- on the group ------------------------------------------------------------------------------


async def test_jobs_run_through_the_sentinels(group: SentinelGroup) -> None:
    prefix = f"s{uuid4().hex[:10]}"
    server = Server(
        broker=RedisBroker(group.url(), prefix=prefix, wait_replicas=1),
        results=RedisResults(group.url(), prefix=prefix),
    )

    @server.task()
    async def double(n: int) -> int:
        return 2 * n

    async with worker(server):
        handle = await double.enqueue(21)
        assert await handle.result(timeout=10) == 42
    assert server.broker.server_id == server.results.server_id  # type: ignore[attr-defined]


async def test_an_enqueue_short_of_replicas_says_so(group: SentinelGroup) -> None:
    prefix = f"s{uuid4().hex[:10]}"
    broker = RedisBroker(group.url(), prefix=prefix, wait_replicas=3, wait_timeout=0.1)
    server = Server(broker=broker, results=RedisResults(group.url(), prefix=prefix))

    @server.task()
    async def noop() -> None:
        pass

    async with server:
        job = noop.job()
        with pytest.raises(
            NotReplicatedError, match=r"only [0-2] of 3 replica\(s\) acknowledged"
        ) as caught:
            await server.enqueue(job)
        # two replicas: at most two acknowledge (under load, maybe fewer within 0.1 s)
        assert caught.value.acknowledged <= 2
        assert caught.value.wanted == 3
        # stored on the primary all the same, its job's state kept: it is queued
        assert (await broker.count("default")).pending == 1
        assert (await server.get_job(job.id)).status is Status.QUEUED


@pytest.mark.parametrize("lagging", [False, True], ids=["in-sync", "lagging"])
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_the_primary_killed_mid_load(
    group: SentinelGroup, wait_replicas: int, lagging: bool
) -> None:
    """With ``lagging``, the replicas are paused and cut off before the kill, and two
    batches are enqueued meanwhile: acknowledged by the primary alone unless
    ``wait_replicas`` refuses them, so without it they are lost in the failover. (On
    loopback a live replica is never far enough behind for the in-sync case to lose
    anything: that case shows the failover itself loses nothing.)"""
    prefix = f"s{uuid4().hex[:10]}"
    url = group.url()
    broker = RedisBroker(url, prefix=prefix, lease=3, wait_replicas=wait_replicas)
    server = Server(broker=broker, results=RedisResults(url, prefix=prefix))
    effects = Effects(server, enough=JOBS // 3)

    acknowledged: list[str] = []
    refused = refused_unreplicated = 0
    on_primary_only: list[str] = []
    killed_at = outage = 0.0
    try:
        async with worker(server):
            for start in range(0, JOBS, BATCH):
                if start >= JOBS // 2 and not killed_at:
                    with anyio.fail_after(30):
                        await effects.enough.wait()
                    if lagging:
                        paused = await anyio.to_thread.run_sync(group.pause_replicas)
                        for _ in range(2):  # one try each: refused, or on the primary only
                            jobs = effects.jobs(start, BATCH)
                            start += BATCH
                            try:
                                handles = await server.enqueue_many(jobs)
                            except NotReplicatedError:
                                refused_unreplicated += 1
                            else:
                                acknowledged += [str(h) for h in handles]
                                on_primary_only += [str(h) for h in handles]
                    await anyio.to_thread.run_sync(group.kill_primary)
                    killed_at = anyio.current_time()
                    if lagging:
                        group.resume(paused)
                handles, retries = await enqueue_until_stored(server, effects.jobs(start, BATCH))
                refused += retries
                if killed_at and not outage:
                    outage = anyio.current_time() - killed_at
                acknowledged += [str(h) for h in handles]
            lost = await _unfinished(server, acknowledged)
            for job_id in set(acknowledged) - lost:
                assert (await server.get_job(job_id)).status is Status.SUCCESSFUL
    finally:
        await anyio.to_thread.run_sync(group.heal)
    print(
        f"wait_replicas={wait_replicas}, {'lagging' if lagging else 'in-sync'}: "
        f"{refused_unreplicated} batches refused as not replicated; "
        f"enqueues refused for {outage:.1f} s "
        f"({refused} batches retried); {len(lost)} of {len(acknowledged)} acknowledged "
        f"jobs lost; {effects.twice} ran twice"
    )
    assert killed_at
    assert set(acknowledged) - lost <= set(effects.runs)
    if wait_replicas:
        assert not lost
    if lagging and wait_replicas:
        assert refused_unreplicated == 2
    # what was lost is what the primary alone acknowledged
    assert lost <= set(on_primary_only)


async def _unfinished(server: Server, job_ids: list[str]) -> set[str]:
    """The jobs that do not reach a final state: the ones lost in the failover. Waits
    until every job is final, or none became final for 8 s (more than two leases: a
    message held when the primary died comes back within one)."""
    pending = set(job_ids)
    quiet = anyio.current_time()
    while pending and anyio.current_time() - quiet < 8:
        for job_id in list(pending):
            try:
                status = (await server.get_job(job_id)).status
            except JobNotFoundError:
                continue  # its state was lost with the primary (its message may come)
            if status in FINAL:
                pending.discard(job_id)
                quiet = anyio.current_time()
        await anyio.sleep(0.2)  # measuring an absence: nothing announces it
    return pending


def test_the_command_line_takes_a_sentinel_url() -> None:
    from tasqueue_anyio.cli import broker_from_url, results_from_url

    url = "redis+sentinel://127.0.0.1:26379/orders/2"
    broker = broker_from_url(url, prefix="p")
    results = results_from_url(url, prefix="p")
    assert isinstance(broker, RedisBroker)
    assert isinstance(results, RedisResults)
    assert broker.server_id == results.server_id == (
        "sentinel", (("127.0.0.1", 26379),), "orders", 2, None
    )
