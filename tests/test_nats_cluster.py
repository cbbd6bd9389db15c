"""A clustered JetStream (three nats-servers with routes, on loopback): the stream and the
bucket with three replicas; the stream leader killed (SIGKILL) mid-load. Every
acknowledged enqueue ends successful, every job's effect is recorded (by job id), and
nothing is left pending, with the workers going on through the leader election."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import anyio
import pytest
from failover_support import Effects, enqueue_until_stored
from nats_cluster import NatsCluster, start_nats_cluster

from tasqueue_anyio import BrokerError, InvalidInputError, Server, Status
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults
from tasqueue_anyio.testing import worker

# one cluster per module: with pytest-xdist, the module's tests share one process
pytestmark = [pytest.mark.anyio, pytest.mark.xdist_group("nats-cluster")]

JOBS = 300
BATCH = 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    started = start_nats_cluster()
    try:
        yield started
    finally:
        started.close()


async def test_the_stream_leader_killed_mid_load(cluster: NatsCluster) -> None:
    prefix = f"c{uuid4().hex[:10]}"
    broker = NatsBroker(cluster.urls, prefix=prefix, replicas=3, ack_wait=3)
    results = NatsResults(cluster.urls, prefix=prefix, replicas=3)
    server = Server(broker=broker, results=results)
    effects = Effects(server, enough=JOBS // 3)
    acknowledged: list[str] = []
    refused = 0
    async with worker(server):
        killed = ""
        killed_at = outage = 0.0
        for start in range(0, JOBS, BATCH):
            if start >= JOBS // 2 and not killed:
                with anyio.fail_after(30):
                    await effects.enough.wait()
                info = await broker.js.stream_info(broker.stream)
                killed = info.raw["cluster"]["leader"]
                await anyio.to_thread.run_sync(cluster.node(killed).kill)
                killed_at = anyio.current_time()
            handles, retries = await enqueue_until_stored(server, effects.jobs(start, BATCH))
            refused += retries
            if killed and not outage:
                outage = anyio.current_time() - killed_at
            acknowledged += [str(h) for h in handles]
        unfinished: dict[str, str] = {}
        for job_id in acknowledged:
            try:
                msg = await server.wait(job_id, timeout=45)
            except TimeoutError:
                unfinished[job_id] = str((await server.get_job(job_id)).status)
                continue
            assert msg.status is Status.SUCCESSFUL, (job_id, msg.meta.prev_error)
        if unfinished:
            consumer = await broker.js.consumer_info(broker.stream, "q")
            raise AssertionError(
                f"{len(unfinished)} jobs unfinished: {Counter(unfinished.values())}; "
                f"{await server.counts('q')}; consumer: {consumer.raw}"
            )
        for _ in range(3):
            # the count of the ended listings scans the bucket through a temporary
            # consumer, which JetStream may place on the server that is down: the
            # request then times out, and is asked again
            try:
                counts = await server.counts("q")
            except BrokerError:
                continue
            break
        assert (counts.pending, counts.scheduled, counts.in_flight) == (0, 0, 0)
    assert killed
    assert set(acknowledged) <= set(effects.runs)  # every acknowledged job's effect happened
    print(f"killed stream leader {killed}; enqueues refused for {outage:.1f} s "
          f"({refused} batches retried); "
          f"{effects.twice} of {len(effects.runs)} jobs ran twice (at-least-once)")
    await anyio.to_thread.run_sync(cluster.restart, killed)


async def test_placement_by_tag_and_by_cluster(cluster: NatsCluster) -> None:
    prefix = f"c{uuid4().hex[:10]}"
    broker = NatsBroker(cluster.urls, prefix=prefix, placement={"tags": ["zone:n2"]})
    results = NatsResults(
        cluster.urls, prefix=prefix, replicas=3, placement={"cluster": "tq"}
    )
    async with broker, results:
        info = await broker.js.stream_info(broker.stream)
        assert info.raw["cluster"]["leader"] == "n2"  # the one server with the tag
        assert info.raw["config"]["placement"] == {"tags": ["zone:n2"]}
        kv = await results.js.stream_info(f"KV_{prefix}")
        assert kv.raw["config"]["placement"] == {"cluster": "tq"}
        assert len(kv.raw["cluster"]["replicas"]) == 2  # and the leader: three copies
    nowhere = NatsBroker(cluster.urls, prefix=f"{prefix}x", placement={"cluster": "elsewhere"})
    with pytest.raises(BrokerError, match="no suitable peers"):
        async with nowhere:
            pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "replicas must be an int from 1 to 5"),
        ({"replicas": 6}, "replicas must be an int from 1 to 5"),
        ({"replicas": True}, "replicas must be an int from 1 to 5"),
        ({"placement": {}}, "placement must be a mapping"),
        ({"placement": "east"}, "placement must be a mapping"),
        ({"placement": {"zone": "a"}}, "unknown key"),
        ({"placement": {"cluster": "a.b"}}, "cluster must be a cluster name"),
        ({"placement": {"tags": "ssd"}}, "tags must be a sequence"),
        ({"placement": {"tags": ["ssd", ""]}}, "tags must be a sequence"),
    ],
)
def test_bad_replicas_and_placement_are_refused(options: dict[str, Any], message: str) -> None:
    for backend in (NatsBroker, NatsResults):
        with pytest.raises(InvalidInputError, match=message):
            backend("nats://127.0.0.1:4222", **options)
