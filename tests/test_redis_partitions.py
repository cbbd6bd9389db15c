"""Partitioned queues of the Redis broker (``RedisBroker(partitions={"hot": 3})``).

On the real three-master cluster (``tests/redis_cluster.py``): a queue of three
partitions whose hash tags live on three masters puts messages on all three, and a
whole run of 300 jobs through two servers runs each job once. On a single server:
priorities and FIFO within a partition, scheduled messages, counts, purge and dead
letters summed over the partitions, deduplication by id, acks with follow-ups,
draining partitions after their number was lowered, the keys of partition 0 (those of
an unpartitioned queue), bad options; and a subset of the broker contract suite
(``test_contract_broker``: the tests that do not rely on one FIFO order across the
whole queue) with every queue in three partitions.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import anyio
import anyio.lowlevel
import coredis
import pytest
import test_contract_broker as contract
from broker_support import consuming, envelope, receive
from coredis.typing import Key
from redis_cluster import Placement, RedisCluster
from redis_server import RedisServer
from server_support import TIMEOUT, running

from tasqueue_anyio import BrokerError, InvalidInputError, Job, JobContext, Server, Status
from tasqueue_anyio.abc import Broker, Delivery, Envelope
from tasqueue_anyio.brokers.redis import (
    MAX_PARTITIONS,
    RedisBroker,
    RedisDelivery,
    partition_of,
)
from tasqueue_anyio.cli import CLIError, broker_from_url, build_parser, main, server_for
from tasqueue_anyio.results.redis import RedisResults

pytestmark = pytest.mark.anyio

#: the contract tests run here again, every queue in three partitions (imported through
#: the module, so that this module does not collect them under their own names); left out
#: are those that expect one FIFO order across the whole queue (FIFO holds per partition)
CONTRACT_SUBSET = (
    contract.test_ack_enqueues_scheduled,
    contract.test_ack_removes,
    contract.test_cancelled_hand_over_loses_nothing,
    contract.test_consume_closes_stream_on_cancel_when_idle,
    contract.test_count_of_an_unknown_queue_and_a_bad_name,
    contract.test_dead_letter,
    contract.test_nack_redelivers_with_next_attempt,
    contract.test_nack_with_delay,
    contract.test_purge_leaves_held_messages,
    contract.test_reenqueue_of_an_existing_id_stores_nothing,
    contract.test_two_consumers_share_messages,
)


def prefix() -> str:
    return f"p{uuid4().hex[:12]}"


def ids_in(partition: int, partitions: int, count: int, stem: str = "m") -> list[str]:
    """``count`` message ids that go to ``partition`` of ``partitions``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        candidate = f"{stem}-{n}"
        n += 1
        if partition_of(candidate, partitions) == partition:
            found.append(candidate)
    return found


def spread(
    queue: str, per_partition: int, stem: str, *, eta: float | None = None
) -> list[Envelope]:
    """``per_partition`` messages for each of three partitions, interleaved."""
    columns = [ids_in(i, 3, per_partition, stem) for i in range(3)]
    return [
        Envelope(queue=queue, id=i, data=i.encode(), eta=eta)
        for row in zip(*columns, strict=True)
        for i in row
    ]


def mid(delivery: Delivery) -> str:
    """A Redis delivery's message id."""
    assert isinstance(delivery, RedisDelivery)
    return delivery.message_id


async def take_all(broker: Broker, queue: str, count: int, receivers: int = 1) -> list[str]:
    """Receive and ack ``count`` messages of ``queue``; their ids, in delivery order."""
    got = []
    async with consuming(broker, queue, receivers=receivers) as stream:
        for _ in range(count):
            delivery = await receive(stream)
            got.append(mid(delivery))
            await delivery.ack()
    return got


def tag(queue: str, index: int) -> str:
    return f"q:{queue}" if index == 0 else f"q:{queue}:{index}"


@pytest.fixture
async def broker(
    redis_server: RedisServer, queue_name: str, anyio_backend: str
) -> AsyncIterator[Broker]:
    """Overrides conftest's: a broker on the single server whose test queues (the
    contract tests' ``queue_name`` and ``queue_name-other``) have three partitions."""
    partitions = {queue_name: 3, f"{queue_name}-other": 3}
    async with RedisBroker(redis_server.url, prefix=prefix(), partitions=partitions) as opened:
        yield opened


@pytest.mark.parametrize("contract_test", CONTRACT_SUBSET, ids=lambda f: f.__name__[5:])
async def test_broker_contract_on_three_partitions(
    contract_test: Any, broker: Broker, queue_name: str
) -> None:
    await contract_test(broker, queue_name)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"hot": 0},
        {"hot": -1},
        {"hot": "3"},
        {"hot": 2.0},
        {"hot": True},
        {"hot": None},
        {"hot": MAX_PARTITIONS + 1},
        {"hot": 10**9},
        {"bad name": 2},
        {"a:b": 2},
        {3: 2},
        0,
        3,
        ["hot"],
    ],
)
def test_bad_partitions_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match=r"partitions|queue name"):
        RedisBroker("redis://127.0.0.1:1", partitions=bad)
    with pytest.raises(InvalidInputError, match=r"drain_partitions|queue name"):
        RedisBroker("redis://127.0.0.1:1", drain_partitions=bad)


def test_partition_choice_is_stable() -> None:
    broker = RedisBroker("redis://127.0.0.1:1", partitions={"hot": 3, "one": 1})
    assert broker.partitions == {"hot": 3, "one": 1}
    assert broker.drain_partitions == {}
    with pytest.raises(TypeError):
        broker.partitions["hot"] = 2  # type: ignore[index]
    assert RedisBroker("redis://127.0.0.1:1", partitions={"hot": MAX_PARTITIONS})
    # CRC-32 of the id's UTF-8 bytes, modulo the number of partitions
    assert [partition_of(f"job-{i}/0", 3) for i in range(6)] == [
        zlib.crc32(f"job-{i}/0".encode()) % 3 for i in range(6)
    ]
    assert {broker.partition("hot", f"job-{i}/0") for i in range(30)} == {0, 1, 2}
    assert {broker.partition("one", f"job-{i}/0") for i in range(30)} == {0}
    assert {broker.partition("other", f"job-{i}/0") for i in range(30)} == {0}
    assert partition_of("é-☃", 7) == partition_of("é-☃", 7)
    with pytest.raises(InvalidInputError):
        broker.partition("hot", "")
    with pytest.raises(InvalidInputError):
        broker.partition("bad name", "x")


def test_cli_partitions_option(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tasqueue ... --broker URL --partitions QUEUE=N``: the inspection commands read
    every partition; without the option, partition 0 only."""
    name, queue = prefix(), "clihot"
    messages = spread(queue, 2, "cli")

    async def fill() -> None:
        async with RedisBroker(redis_server.url, prefix=name, partitions={queue: 3}) as broker:
            await broker.enqueue_many(messages)

    anyio.run(fill)
    base = ["counts", queue, "--broker", redis_server.url, "--prefix", name, "--json"]
    assert main([*base, "--partitions", f"{queue}=3", "--partitions", "other=2"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 6
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 2

    args = build_parser().parse_args([*base, "--partitions", f"{queue}=3"])
    broker = server_for(args).broker
    assert isinstance(broker, RedisBroker)
    assert broker.partitions == {queue: 3}
    for bad, error in [
        (f"{queue}=0", "--partitions wants QUEUE=N"),
        (queue, "--partitions wants QUEUE=N"),
        (f"{queue}=x", "--partitions wants QUEUE=N"),
        (f"{queue}=-2", "--partitions wants QUEUE=N"),
        ("bad name=2", "invalid queue name"),
        (f"{queue}={MAX_PARTITIONS + 1}", f"must be in [1, {MAX_PARTITIONS}]"),
    ]:
        assert main([*base, "--partitions", bad]) == 2
        assert error in capsys.readouterr().err
    with pytest.raises(CLIError, match="for Redis URLs"):
        broker_from_url("nats://127.0.0.1:1", partitions={queue: 3})
    with pytest.raises(CLIError, match="not both"):
        server_for(
            build_parser().parse_args(["counts", queue, "--app", "x:y", "--partitions", "a=2"])
        )


# -- on one server ----------------------------------------------------------------------------


async def test_partition_zero_keeps_the_unpartitioned_keys(redis_server: RedisServer) -> None:
    """Partition 0 is ``{q:Q}``, the others ``{q:Q:i}``; a broker with partitions reads
    what an unpartitioned broker wrote (partition 0), so growing a queue loses nothing."""
    name, queue = prefix(), "hot"
    zero, one, two = (ids_in(i, 3, 2, stem="k") for i in range(3))
    async with RedisBroker(redis_server.url, prefix=name) as plain:
        await plain.enqueue_many([Envelope(queue=queue, id=i, data=i.encode()) for i in zero])
        assert await plain.client.hlen(f"{name}:{{q:{queue}}}:msg") == 2
    async with RedisBroker(redis_server.url, prefix=name, partitions={queue: 3}) as broker:
        await broker.enqueue_many(
            [Envelope(queue=queue, id=i, data=i.encode()) for i in (*one, *two)]
        )
        client = broker.client
        for index, ids in enumerate((zero, one, two)):
            key = f"{name}:{{{tag(queue, index)}}}:msg"
            assert sorted(await client.hkeys(key)) == sorted(i.encode() for i in ids)
        assert [c.pending for c in await broker.partition_counts(queue)] == [2, 2, 2]
        got = await take_all(broker, queue, 6, receivers=4)
        assert sorted(got) == sorted([*zero, *one, *two])
        # FIFO within each partition
        for ids in (zero, one, two):
            assert [i for i in got if i in ids] == ids
        assert await broker.count(queue) == await broker.count("never-used")


async def test_priorities_within_a_partition(redis_server: RedisServer) -> None:
    queue = "prio"
    ids = ids_in(1, 3, 6, stem="p")
    priorities = [0, 5, 9, 0, 5, 9]
    elsewhere = ids_in(0, 3, 3, stem="e") + ids_in(2, 3, 3, stem="e")
    messages = [
        Envelope(queue=queue, id=i, data=i.encode(), priority=p)
        for i, p in zip(ids, priorities, strict=True)
    ] + [Envelope(queue=queue, id=i, data=i.encode()) for i in elsewhere]
    async with RedisBroker(redis_server.url, prefix=prefix(), partitions={queue: 3}) as broker:
        await broker.enqueue_many(messages)
        assert [c.pending for c in await broker.partition_counts(queue)] == [3, 6, 3]
        got = await take_all(broker, queue, len(messages))
    assert sorted(got) == sorted(m.id for m in messages)
    # in partition 1: priority 9 first, then 5, then 0, each in enqueue order
    assert [i for i in got if i in ids] == [ids[2], ids[5], ids[1], ids[4], ids[0], ids[3]]


async def test_scheduled_messages_over_partitions(redis_server: RedisServer) -> None:
    queue = "later"
    now = time.time()
    delays = [0.6, 0.2, 0.4, 0.3, 0.5, 0.1, 0.25, 0.45, 0.35]
    messages = [
        Envelope(queue=queue, id=f"s-{i}", data=b"%d" % i, eta=now + delay)
        for i, delay in enumerate(delays)
    ]
    assert {partition_of(m.id, 3) for m in messages} == {0, 1, 2}
    by_eta = [m.data for m in sorted(messages, key=lambda m: m.eta or 0)]
    async with RedisBroker(redis_server.url, prefix=prefix(), partitions={queue: 3}) as broker:
        await broker.enqueue_many(messages)
        scheduled = await broker.get_scheduled(queue)
        assert [data for _, data in scheduled] == by_eta
        assert [eta for eta, _ in scheduled] == sorted(m.eta or 0 for m in messages)
        assert (await broker.count(queue)).scheduled == len(messages)
        got = []
        async with consuming(broker, queue) as stream:
            for _ in messages:
                delivery = await receive(stream)
                eta = next(m.eta for m in messages if m.id == mid(delivery))
                assert eta is not None
                assert time.time() >= eta - 0.01
                # an idle consumer wakes for the earliest ETA of every partition, not
                # at its next sweep (lease / 3 = 5 s)
                assert time.time() - eta < 2
                got.append(delivery.data)
                await delivery.ack()
        assert sorted(got) == sorted(by_eta)
        assert await broker.get_scheduled(queue) == []


async def test_counts_purge_and_dead_letters_summed(redis_server: RedisServer) -> None:
    queue = "sums"
    later = time.time() + 3600
    due = spread(queue, 4, "due")
    waiting = [envelope(queue, b"eta%d" % i, eta=later + i) for i in range(6)]
    bad = spread(queue, 2, "bad")
    async with RedisBroker(redis_server.url, prefix=prefix(), partitions={queue: 3}) as broker:
        await broker.enqueue_many(bad)
        dead_ids = []
        async with consuming(broker, queue) as stream:
            for _ in bad:
                delivery = await receive(stream)
                dead_ids.append(mid(delivery))
                await delivery.dead_letter("does not decode")
        assert {partition_of(i, 3) for i in dead_ids} == {0, 1, 2}
        await broker.enqueue_many([*due, *waiting])
        per_partition = await broker.partition_counts(queue)
        assert len(per_partition) == 3
        assert all(c.pending > 0 and c.dead > 0 for c in per_partition)
        counts = await broker.count(queue)
        assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (12, 6, 0, 6)
        assert sum(c.pending for c in per_partition) == 12
        assert sorted(await broker.get_pending(queue)) == sorted(m.data for m in due)

        # dead letters of every partition, merged in the order they were set aside
        letters = await broker.get_dead_letters(queue)
        assert [d.id for d in letters] == dead_ids
        assert [d.at for d in letters] == sorted(d.at for d in letters)
        removed = await broker.remove_dead_letters(queue, [dead_ids[0], dead_ids[3], "nope"])
        assert [d.id for d in removed] == [dead_ids[0], dead_ids[3]]
        rest = await broker.remove_dead_letters(queue)
        assert [d.id for d in rest] == [i for i in dead_ids if i not in (dead_ids[0], dead_ids[3])]
        assert (await broker.count(queue)).dead == 0

        # the due ones come first, then the waiting ones in ETA order
        purged = await broker.purge(queue)
        assert sorted(purged[:12]) == sorted(m.data for m in due)
        assert purged[12:] == [m.data for m in waiting]
        counts = await broker.count(queue)
        assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (0, 0, 0, 0)


async def test_duplicate_ids_are_deduplicated_on_their_partition(
    redis_server: RedisServer,
) -> None:
    queue = "dedupe"
    ids = [f"job-{i}/0" for i in range(9)]
    assert {partition_of(i, 3) for i in ids} == {0, 1, 2}
    messages = [Envelope(queue=queue, id=i, data=i.encode()) for i in ids]
    async with RedisBroker(redis_server.url, prefix=prefix(), partitions={queue: 3}) as broker:
        await broker.enqueue_many(messages)
        await broker.enqueue_many([*messages, *messages])
        assert (await broker.count(queue)).pending == 9
        async with consuming(broker, queue) as stream:
            first = await receive(stream)
            # an ack's follow-ups: the other ids again (stored already), and new ones
            fresh = [Envelope(queue=queue, id=f"next-{i}/0", data=b"n") for i in range(6)]
            again = [m for m in messages if m.id != mid(first)]
            await first.ack(enqueue=[*again, *fresh])
            counts = await broker.count(queue)
            assert counts.pending + counts.in_flight == 8 + 6  # one may be fetched ahead
            seen = [mid(first)]
            for _ in range(8 + 6):
                delivery = await receive(stream)
                seen.append(mid(delivery))
                await delivery.ack()
        assert Counter(seen) == Counter([*ids, *(m.id for m in fresh)])
        assert await broker.count(queue) == await broker.count("never-used")


async def test_split_slots_on_one_server(redis_server: RedisServer) -> None:
    """``split_slots`` (as on a cluster) runs one script per partition; an ack's
    follow-ups for other partitions of its own queue go first."""
    queue, other = "split", "split-other"
    async with RedisBroker(
        redis_server.url, prefix=prefix(), partitions={queue: 3, other: 2}, split_slots=True
    ) as broker:
        await broker.enqueue(Envelope(queue=queue, id="first", data=b"first"))
        follow = [envelope(queue, b"f%d" % i) for i in range(9)] + [envelope(other, b"o")]
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            await delivery.ack(enqueue=follow)
            got = []
            for _ in range(9):
                again = await receive(stream)
                got.append(again.data)
                await again.ack()
        assert sorted(got) == sorted(m.data for m in follow[:9])
        assert await broker.get_pending(other) == [b"o"]


async def test_draining_partitions_after_lowering_their_number(
    redis_server: RedisServer,
) -> None:
    name, queue = prefix(), "shrink"
    messages = spread(queue, 4, "m")
    async with RedisBroker(redis_server.url, prefix=name, partitions={queue: 3}) as old:
        await old.enqueue_many(messages)
        assert all(c.pending for c in await old.partition_counts(queue))
    # a broker of one partition does not see partitions 1 and 2
    async with RedisBroker(redis_server.url, prefix=name) as lowered:
        stranded = await lowered.count(queue)
        assert stranded.pending == 4
    # draining: consumers read partitions 1 and 2 too, enqueues go to partition 0 only
    async with RedisBroker(redis_server.url, prefix=name, drain_partitions={queue: 3}) as draining:
        assert (await draining.count(queue)).pending == 12
        assert len(await draining.partition_counts(queue)) == 3
        assert {draining.partition(queue, f"x{i}") for i in range(20)} == {0}
        got = []
        async with consuming(draining, queue, receivers=3) as stream:
            for _ in messages:
                delivery = await receive(stream)
                got.append(delivery.data)
                await delivery.ack()
        assert sorted(got) == sorted(m.data for m in messages)
        assert [c.pending for c in await draining.partition_counts(queue)] == [0, 0, 0]


async def test_a_failing_partition_does_not_stop_the_others(redis_server: RedisServer) -> None:
    """A partition whose fetch fails (here its ready list is a string: WRONGTYPE; on a
    cluster, a master that is down) is passed over while the others have messages."""
    name, queue = prefix(), "broken"
    fine = [*ids_in(0, 3, 3, "ok"), *ids_in(2, 3, 3, "ok")]
    async with RedisBroker(redis_server.url, prefix=name, partitions={queue: 3}) as broker:
        await broker.client.set(f"{name}:{{{tag(queue, 1)}}}:ready", "not a list")
        await broker.enqueue_many([Envelope(queue=queue, id=i, data=b"x") for i in fine])
        got = await take_all(broker, queue, len(fine))
        assert sorted(got) == sorted(fine)
        with pytest.raises(BrokerError, match="wrong kind of value"):
            await broker.count(queue)


# -- on the cluster ---------------------------------------------------------------------------


def spread_queue(placement: Placement) -> str:
    """A queue name whose three partitions' hash tags live on three different masters."""
    while True:
        name = f"hot-{uuid4().hex[:8]}"
        if len({placement.port(f"x:{{{tag(name, i)}}}:msg") for i in range(3)}) == 3:
            return name


async def test_three_partitions_on_three_masters(redis_cluster: RedisCluster) -> None:
    placement = Placement(redis_cluster)
    queue, name = spread_queue(placement), prefix()
    jobs = 300
    runs: Counter[str] = Counter()
    held_on: dict[int, int] = {}

    async def work(payload: bytes, ctx: JobContext) -> None:
        runs[ctx.job_id] += 1
        await anyio.lowlevel.checkpoint()

    async with (
        RedisBroker(redis_cluster.url, prefix=name, partitions={queue: 3}) as broker,
        RedisResults(redis_cluster.url, prefix=name) as results,
    ):
        assert broker.split_slots
        producer = Server(broker=broker, results=results)
        producer.register_task("work", work, queue=queue, concurrency=4, raw=True)
        async with producer:
            handles = await producer.enqueue_many(
                [Job("work", b"%d" % i, queue=queue) for i in range(jobs)]
            )
            # every master holds a third or so, each partition's keys on its own master
            for index in range(3):
                key = f"{name}:{{{tag(queue, index)}}}:msg"
                port = placement.port(key)
                async with coredis.Redis(host="127.0.0.1", port=port) as node:
                    assert await node.cluster_keyslot(key) == Key(key).slot
                    held_on[port] = await node.hlen(key)
            assert set(held_on) == {node.port for node in redis_cluster.nodes}
            assert all(count > 50 for count in held_on.values()), held_on
            assert sum(held_on.values()) == jobs
            assert (await broker.count(queue)).pending == jobs

            # two workers of their own brokers, consuming every partition
            async with (
                RedisBroker(redis_cluster.url, prefix=name, partitions={queue: 3}) as b1,
                RedisBroker(redis_cluster.url, prefix=name, partitions={queue: 3}) as b2,
            ):
                workers = [Server(broker=b, results=results) for b in (b1, b2)]
                for worker in workers:
                    worker.register_task("work", work, queue=queue, concurrency=4, raw=True)
                async with workers[0], workers[1], running(workers[0]), running(workers[1]):
                    with anyio.fail_after(TIMEOUT * 6):
                        for handle in handles:
                            done = await producer.wait(handle, timeout=TIMEOUT * 6)
                            assert done.status is Status.SUCCESSFUL
        counts = await broker.count(queue)
        assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (0, 0, 0, 0)
    assert set(runs) == set(handles)
    assert set(runs.values()) == {1}


async def test_partitions_on_the_cluster(redis_cluster: RedisCluster) -> None:
    """Counts, scheduled messages, dead letters, purge and follow-ups across three
    masters (``split_slots``)."""
    placement = Placement(redis_cluster)
    queue, name = spread_queue(placement), prefix()
    later = time.time() + 3600
    async with RedisBroker(redis_cluster.url, prefix=name, partitions={queue: 3}) as broker:
        first = Envelope(queue=queue, id=ids_in(0, 3, 1)[0], data=b"first")
        await broker.enqueue(first)
        await broker.enqueue(first)  # deduplicated
        follow = [envelope(queue, b"f%d" % i) for i in range(9)]
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            assert delivery.data == b"first"
            await delivery.ack(enqueue=follow)  # to all three masters
            for _ in follow:
                again = await receive(stream)
                await again.dead_letter("bad")
        assert [c.dead for c in await broker.partition_counts(queue)] == [
            sum(1 for m in follow if partition_of(m.id, 3) == i) for i in range(3)
        ]
        letters = await broker.get_dead_letters(queue)
        assert sorted(d.data for d in letters) == sorted(m.data for m in follow)
        assert len(await broker.remove_dead_letters(queue)) == 9

        waiting = [envelope(queue, b"eta%d" % i, eta=later - i) for i in range(6)]
        due = [envelope(queue, b"due%d" % i) for i in range(6)]
        await broker.enqueue_many([*waiting, *due])
        assert [d for _, d in await broker.get_scheduled(queue)] == [
            m.data for m in reversed(waiting)
        ]
        counts = await broker.count(queue)
        assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (6, 6, 0, 0)
        purged = await broker.purge(queue)
        assert sorted(purged[:6]) == sorted(m.data for m in due)
        assert purged[6:] == [m.data for m in reversed(waiting)]
        assert await broker.count(queue) == await broker.count(f"{queue}-none")
