"""Redis-only behaviour of :mod:`tasqueue_anyio.brokers.redis` and
:mod:`tasqueue_anyio.results.redis`: URLs, prefixes, key validation, leases, fencing,
renewal, batching, ETA moves, poison messages.

The contract suites cover the rest (``conftest.BROKER_FACTORIES``, ``RESULTS_FACTORIES``).
"""

from __future__ import annotations

import gc
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import uuid4

import anyio
import coredis
import pytest
from broker_support import consuming, envelope, receive
from redis_server import RedisServer
from server_support import TIMEOUT, Counter, running
from timing_support import require, sleep_until, until_conclusive

from tasqueue_anyio import (
    BrokerError,
    InvalidInputError,
    Job,
    JobNotFoundError,
    NotFoundError,
    Server,
)
from tasqueue_anyio._redis import client_kwargs
from tasqueue_anyio.abc import Delivery, Envelope, JobRecord, ParentRecord
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

pytestmark = pytest.mark.anyio


def prefix() -> str:
    return f"t{uuid4().hex[:12]}"


# -- URLs and clients -------------------------------------------------------------------------


def test_url_parsing() -> None:
    kwargs = client_kwargs("redis://127.0.0.1")
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6379, 0)
    assert kwargs["username"] is None
    assert kwargs["password"] is None
    assert "ssl_context" not in kwargs

    kwargs = client_kwargs("redis://:s%40cret@redis.example:7000/5")
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.example", 7000, 5)
    assert (kwargs["username"], kwargs["password"]) == (None, "s@cret")

    kwargs = client_kwargs("redis://worker:pw@host?db=3")
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("worker", "pw", 3)


def test_rediss_checks_certificates() -> None:
    kwargs = client_kwargs("rediss://user:pw@redis.example:6380/2")
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert (kwargs["port"], kwargs["db"]) == (6380, 2)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost",
        "redis://",
        "redis://host/notanumber",
        "redis://host?unknown=1",
        "redis://host?ssl_ca_certs=/x",
        "redis://host:99999",
    ],
)
def test_bad_urls_refused(url: str) -> None:
    with pytest.raises(InvalidInputError):
        client_kwargs(url)


def test_bad_options_refused() -> None:
    with pytest.raises(InvalidInputError):
        RedisBroker("redis://localhost", prefix="has space")
    with pytest.raises(InvalidInputError):
        RedisBroker("redis://localhost", prefix="{tag}")
    with pytest.raises(InvalidInputError):
        RedisBroker("redis://localhost", lease=0)
    with pytest.raises(InvalidInputError):
        RedisBroker("redis://localhost", batch_size=0)
    with pytest.raises(InvalidInputError):
        RedisResults("redis://localhost", job_ttl=-1)
    with pytest.raises(InvalidInputError):
        RedisResults("redis://localhost", client=coredis.Redis())


async def test_acl_user_password_and_db(redis_server: RedisServer) -> None:
    user, password = f"u{uuid4().hex[:8]}", uuid4().hex
    async with coredis.Redis(host="127.0.0.1", port=redis_server.port) as admin:
        await admin.acl_setuser(user, "on", f">{password}", "~*", "&*", "+@all")
        url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/3"
        job_id = uuid4().hex
        async with RedisResults(url, prefix="acl") as results:
            await results.set_jobs({job_id: JobRecord(status="queued", data=b"x")})
            assert (await results.get_job(job_id)).data == b"x"
        # the state is in database 3, not 0
        assert not await admin.exists([f"acl:s:{{{job_id}}}"])
    async with coredis.Redis(host="127.0.0.1", port=redis_server.port, db=3) as db3:
        assert await db3.exists([f"acl:s:{{{job_id}}}"]) == 1

    bad = f"redis://{user}:wrong@127.0.0.1:{redis_server.port}/3"
    with pytest.raises(BrokerError):
        async with RedisResults(bad):
            pass


async def test_caller_client_is_not_closed(redis_server: RedisServer) -> None:
    client = coredis.Redis(host="127.0.0.1", port=redis_server.port)
    async with client:
        broker = RedisBroker(client=client, prefix=prefix())
        async with broker:
            await broker.enqueue(envelope("q", b"m"))
        # still usable after the broker closed
        assert await client.ping() == b"PONG"
        async with broker:  # and the broker opens again on it
            assert await broker.get_pending("q") == [b"m"]


async def test_entries_are_counted(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, prefix=prefix())
    async with broker:
        async with broker:
            await broker.enqueue(envelope("q", b"m"))
        assert broker.is_open
        assert await broker.get_pending("q") == [b"m"]
    assert not broker.is_open


# -- keys --------------------------------------------------------------------------------------


async def test_two_prefixes_never_see_each_other(redis_server: RedisServer) -> None:
    queue, job_id = "shared", uuid4().hex
    async with (
        RedisBroker(redis_server.url, prefix="tenant-a") as broker_a,
        RedisBroker(redis_server.url, prefix="tenant-b") as broker_b,
        RedisResults(redis_server.url, prefix="tenant-a") as results_a,
        RedisResults(redis_server.url, prefix="tenant-b") as results_b,
    ):
        await broker_a.enqueue(envelope(queue, b"a's message"))
        await broker_a.enqueue(envelope(queue, b"later", eta=time.time() + 60))
        await results_a.set_jobs({job_id: JobRecord(status="queued", data=b"a's job")})
        await results_a.set_result(job_id, b"a's result")
        assert b"a's message" in await broker_a.get_pending(queue)
        assert b"a's message" not in await broker_b.get_pending(queue)
        assert await broker_b.get_scheduled(queue) == []
        with pytest.raises(JobNotFoundError):
            await results_b.get_job(job_id)
        with pytest.raises(LookupError):
            await results_b.get_result(job_id)


@pytest.mark.parametrize("queue", ["a*", "a{b}", "{x", "y}", "a:b", "a b", "", "q\n"])
async def test_bad_queue_names_refused(redis_server: RedisServer, queue: str) -> None:
    async with RedisBroker(redis_server.url, prefix=prefix()) as broker:
        with pytest.raises(InvalidInputError):
            await broker.enqueue(Envelope(queue=queue, data=b"x", id="i"))
        with pytest.raises(InvalidInputError):
            await broker.get_pending(queue)
        with pytest.raises(InvalidInputError):
            await broker.get_dead_letters(queue)
        send, receive_stream = anyio.create_memory_object_stream[Delivery](0)
        with receive_stream, send, pytest.raises(InvalidInputError):
            await broker.consume(queue, send)


# -- leases and fencing -----------------------------------------------------------------------


async def test_expired_lease_comes_back_with_next_attempt(redis_server: RedisServer) -> None:
    name, queue = prefix(), "lease"
    client = coredis.Redis(host="127.0.0.1", port=redis_server.port)
    async with client:
        dead = RedisBroker(client=client, prefix=name, lease=0.3)
        async with dead:
            await dead.enqueue(envelope(queue, b"job"))
            async with consuming(dead, queue) as stream:
                taken = await receive(stream)
                assert taken.attempt == 1
        # the broker is gone (its renewal with it) and the delivery was never settled
        async with RedisBroker(client=client, prefix=name, lease=0.3) as alive:
            assert await alive.get_pending(queue) == []  # still held
            async with consuming(alive, queue) as stream:
                again = await receive(stream)
                assert (again.data, again.attempt) == (b"job", 2)
                # fencing: the first delivery's settle is refused, the new owner keeps it
                with pytest.raises(BrokerError, match="lease lost"):
                    await taken.dead_letter("zombie")
                await taken.nack()  # settled by the refusal: does nothing now
                assert await alive.get_pending(queue) == []
                assert await alive.get_dead_letters(queue) == []
                await again.ack()
            assert await alive.get_pending(queue) == []


async def test_lost_lease_refuses_ack_with_enqueue(
    redis_server: RedisServer,
) -> None:
    name, queue = prefix(), "fence"
    client = coredis.Redis(host="127.0.0.1", port=redis_server.port)
    async with client:
        zombie = RedisBroker(client=client, prefix=name, lease=0.2)
        async with zombie:
            await zombie.enqueue(envelope(queue, b"job"))
            async with consuming(zombie, queue) as stream:
                first = await receive(stream)
        async with RedisBroker(client=client, prefix=name, lease=5) as owner:
            async with consuming(owner, queue) as stream:
                second = await receive(stream)
                assert second.attempt == 2
                with pytest.raises(BrokerError, match="lease lost"):
                    await first.ack(enqueue=[envelope(queue, b"follow-up")])
                assert await owner.get_pending(queue) == []  # no follow-up was enqueued
                await second.ack(enqueue=[envelope(queue, b"follow-up")])
            assert await owner.get_pending(queue) == [b"follow-up"]


async def evalsha_calls(client: coredis.Redis[bytes]) -> int:
    entry = (await client.info("commandstats")).get("cmdstat_evalsha")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


async def test_end_job_on_one_server_is_one_script(redis_server: RedisServer) -> None:
    """The record, the ack and the announcement of a run's end: one script call."""
    name, queue = prefix(), "fused"
    heard: list[bytes] = []
    client = coredis.Redis(host="127.0.0.1", port=redis_server.port)
    async with (
        client,
        RedisBroker(client=client, prefix=name, lease=30) as broker,
        RedisResults(client=client, prefix=name) as results,
    ):
        await broker.enqueue(envelope(queue, b"job"))
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
        assert (
            await results.start_job("j", JobRecord(status="processing", data=b"m", run="0.1"))
            is None
        )
        async with broker.subscribe("ends", heard.append):
            before = await evalsha_calls(client)
            assert await results.end_job(
                "j",
                JobRecord(status="successful", data=b"m", run="0.1"),
                expect=("processing",),
                run="0.1",
                delivery=delivery,
                announce=[("ends", b"j ended")],
            )
            assert await evalsha_calls(client) == before + 1
            with anyio.fail_after(TIMEOUT):
                while not heard:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert heard == [b"j ended"]
        assert (await results.get_job("j")).status == "successful"
        assert await results.get_success() == ["j"]
        await delivery.nack()  # settled: does nothing
        assert await broker.get_pending(queue) == []


@asynccontextmanager
async def taken_over(
    redis_server: RedisServer, queue: str
) -> AsyncIterator[tuple[RedisResults, RedisBroker, Delivery, Delivery]]:
    """A job whose first delivery (its run ``0.1`` started) lost its lease: the results
    store, the new owner's broker, the first delivery and the owner's (attempt 2)."""
    name = prefix()
    client = coredis.Redis(host="127.0.0.1", port=redis_server.port)
    async with client, RedisResults(client=client, prefix=name) as results:
        zombie = RedisBroker(client=client, prefix=name, lease=0.2)
        async with zombie:
            await zombie.enqueue(envelope(queue, b"job"))
            async with consuming(zombie, queue) as stream:
                first = await receive(stream)
        record = JobRecord(status="processing", data=b"m", run="0.1")
        assert await results.start_job("j", record) is None
        async with (
            RedisBroker(client=client, prefix=name, lease=5) as owner,
            consuming(owner, queue) as stream,
        ):
            second = await receive(stream)
            assert second.attempt == 2
            yield results, owner, first, second


def ending(status: str, run: str) -> JobRecord:
    return JobRecord(status=status, data=b"m", run=run)


async def test_end_job_of_a_run_that_lost_its_lease_changes_nothing(
    redis_server: RedisServer,
) -> None:
    heard: list[bytes] = []
    async with taken_over(redis_server, "fused-fence") as (results, owner, first, second):
        new_run = JobRecord(status="processing", data=b"m", run="0.2")
        assert await results.start_job("j", new_run) is None
        async with owner.subscribe("ends", heard.append):
            with pytest.raises(BrokerError, match="end was not recorded either"):
                await results.end_job(
                    "j",
                    ending("successful", "0.1"),
                    expect=("processing",),
                    run="0.1",
                    delivery=first,
                    announce=[("ends", b"zombie")],
                )
            record = await results.get_job("j")
            assert (record.status, record.run) == ("processing", "0.2")
            assert await results.get_success() == []
            # the owner's end goes through; only its announcement is heard
            assert await results.end_job(
                "j",
                ending("successful", "0.2"),
                expect=("processing",),
                run="0.2",
                delivery=second,
                announce=[("ends", b"owner")],
            )
            with anyio.fail_after(TIMEOUT):
                while not heard:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        assert heard == [b"owner"]
        assert await owner.get_pending("fused-fence") == []
        assert (await results.get_job("j")).status == "successful"


async def test_end_job_written_but_lease_lost_raises(redis_server: RedisServer) -> None:
    """The new delivery has not started its run yet: the old run's end is recorded (its
    run token still matches), but its ack is refused, and that is an error."""
    async with taken_over(redis_server, "fused-late") as (results, owner, first, second):
        with pytest.raises(BrokerError, match="end was recorded"):
            await results.end_job(
                "j", ending("failed", "0.1"), expect=("processing",), run="0.1", delivery=first
            )
        assert (await results.get_job("j")).status == "failed"
        await second.ack()
        assert await owner.get_pending("fused-late") == []


async def test_renewal_keeps_a_long_job(redis_server: RedisServer) -> None:
    name, queue = prefix(), "long"
    async with (
        RedisBroker(redis_server.url, prefix=name, lease=1.0) as worker,
        RedisBroker(redis_server.url, prefix=name, lease=1.0) as other,
    ):
        await worker.enqueue(envelope(queue, b"long job"))
        async with consuming(worker, queue) as stream:
            delivery = await receive(stream)
            async with consuming(other, queue) as other_stream:
                with anyio.move_on_after(3.0) as scope:
                    await other_stream.receive()  # must not get the held message
                assert scope.cancelled_caught
            await delivery.ack()  # still ours after three leases
        assert await worker.get_pending(queue) == []


async def test_abandoned_delivery_is_given_back(redis_server: RedisServer) -> None:
    queue = "abandoned"
    async with RedisBroker(redis_server.url, prefix=prefix(), lease=0.3) as broker:
        await broker.enqueue(envelope(queue, b"job"))
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            del delivery
            gc.collect()
            await broker.renew_leases()
            again = await receive(stream)
            assert (again.data, again.attempt) == (b"job", 2)
            await again.ack()


# -- order, batches, ETAs ------------------------------------------------------------------------


async def test_fifo_under_backlog(redis_server: RedisServer) -> None:
    queue = "backlog"
    expected = [f"m{i:03d}".encode() for i in range(300)]
    async with RedisBroker(redis_server.url, prefix=prefix(), batch_size=16) as broker:
        for start in range(0, 300, 50):  # several enqueue calls
            await broker.enqueue_many(
                [envelope(queue, data) for data in expected[start : start + 50]]
            )
        got = []
        async with consuming(broker, queue, receivers=4) as stream:
            for _ in expected:
                delivery = await receive(stream)
                got.append(delivery.data)
                await delivery.ack()
    assert got == expected


async def test_batch_fetch_gives_back_unhanded_messages(redis_server: RedisServer) -> None:
    queue = "batch"
    expected = [f"m{i}".encode() for i in range(12)]
    async with RedisBroker(redis_server.url, prefix=prefix(), batch_size=8) as broker:
        await broker.enqueue_many([envelope(queue, data) for data in expected])
        async with consuming(broker, queue, receivers=5) as stream:
            first = await receive(stream)  # the consumer fetched 5 (its receivers) at once
            assert first.data == b"m0"
            assert await broker.get_pending(queue) == expected[5:]
        # cancelled: the four fetched and never handed over are back at the front
        assert await broker.get_pending(queue) == expected[1:]
        async with consuming(broker, queue) as stream:
            second = await receive(stream)
            assert (second.data, second.attempt) == (b"m1", 1)  # given back: not counted
            await second.ack()
        await first.ack()


async def test_due_etas_move_all_at_once_in_eta_order(redis_server: RedisServer) -> None:
    offsets = [0.40, 0.10, 0.35, 0.20, 0.15, 0.30, 0.25, 0.05]
    async with RedisBroker(redis_server.url, prefix=prefix()) as broker:

        async def etas_move_at_once() -> None:
            queue = f"etas{uuid4().hex[:8]}"
            now = time.time()  # the broker is open: the ETAs count from here
            await broker.enqueue_many(
                [envelope(queue, f"{offset:.2f}".encode(), eta=now + offset) for offset in offsets]
            )
            await broker.enqueue(envelope(queue, b"now"))
            scheduled = await broker.get_scheduled(queue)
            require(time.time() < now + min(offsets), "an ETA passed before the listing")
            assert [data for _, data in scheduled] == [f"{o:.2f}".encode() for o in sorted(offsets)]
            await anyio.sleep(max(0.0, now + 0.45 - time.time()))
            # one pass moved every due message, in ETA order, behind the one already due
            assert await broker.get_pending(queue) == [b"now"] + [
                f"{o:.2f}".encode() for o in sorted(offsets)
            ]
            assert await broker.get_scheduled(queue) == []

        await until_conclusive(etas_move_at_once)


async def test_idle_consumer_wakes_for_an_earlier_eta(redis_server: RedisServer) -> None:
    queue = "wake"
    async with RedisBroker(redis_server.url, prefix=prefix(), lease=30) as broker:
        await broker.enqueue(envelope(queue, b"late", eta=time.time() + 60))
        async with consuming(broker, queue) as stream:
            await anyio.sleep(0.1)  # the consumer is idle, waiting for the 60 s ETA
            start = anyio.current_time()
            await broker.enqueue(envelope(queue, b"soon", eta=time.time() + 0.2))
            delivery = await receive(stream)
            assert delivery.data == b"soon"
            assert anyio.current_time() - start < 2
            await delivery.ack()


async def test_ack_enqueue_with_split_slots(redis_server: RedisServer) -> None:
    """The Redis Cluster path: other queues' messages are enqueued first, then the ack."""
    queue, other = "split-a", "split-b"
    async with RedisBroker(redis_server.url, prefix=prefix(), split_slots=True) as broker:
        await broker.enqueue_many([envelope(queue, b"first"), envelope(other, b"o1")])
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            await delivery.ack(
                enqueue=[envelope(queue, b"same"), envelope(other, b"o2"), envelope(queue, b"s2")]
            )
            assert await broker.get_pending(other) == [b"o1", b"o2"]
            got = [(await receive(stream)).data, (await receive(stream)).data]
        assert got == [b"same", b"s2"]


async def test_repeated_message_id_is_stored_once(redis_server: RedisServer) -> None:
    queue = "dedupe"
    async with RedisBroker(redis_server.url, prefix=prefix()) as broker:
        message = envelope(queue, b"once")
        await broker.enqueue(message)
        await broker.enqueue(message)
        assert await broker.get_pending(queue) == [b"once"]


# -- with a server ------------------------------------------------------------------------------


async def test_poison_message_is_dead_lettered_and_the_queue_flows(
    redis_server: RedisServer,
) -> None:
    name, queue = prefix(), "poison"
    counter = Counter()
    async with (
        RedisBroker(redis_server.url, prefix=name) as broker,
        RedisResults(redis_server.url, prefix=name) as results,
        Server(broker=broker, results=results) as server,
    ):
        server.register_task("count", counter, queue=queue, raw=True)
        # undecodable bytes pushed straight into the queue's ready list
        await broker.client.rpush(f"{name}:{{q:{queue}}}:ready".encode(), [b"\xc1garbage"])
        async with running(server):
            job_id = await server.enqueue(Job("count", b"after", queue=queue))
            await server.wait(job_id, timeout=TIMEOUT)
        dead = await broker.get_dead_letters(queue)
        assert [d.data for d in dead] == [b"\xc1garbage"]
        assert dead[0].reason
    assert counter.payloads == [b"after"]


async def test_job_and_result_expiry(redis_server: RedisServer) -> None:
    ttl = 0.2
    async with RedisResults(redis_server.url, prefix=prefix(), job_ttl=ttl, result_ttl=ttl) as r:

        async def job_and_result_expire() -> None:
            job_id = uuid4().hex
            start = anyio.current_time()  # no TTL runs out before start + ttl
            await r.set_jobs({job_id: JobRecord(status="processing", data=b"x")})
            assert await r.update_job(
                job_id, JobRecord(status="successful", data=b"y"), expect=["processing"]
            )
            await r.set_result(job_id, b"result")
            written = anyio.current_time()  # every TTL runs out by written + ttl
            success = await r.get_success()
            require(anyio.current_time() < start + ttl, "the writes took the whole TTL")
            assert job_id in success
            await sleep_until(written + ttl + 0.1)
            with pytest.raises(JobNotFoundError):
                await r.get_job(job_id)
            with pytest.raises(LookupError):
                await r.get_result(job_id)
            assert job_id not in await r.get_success()

        async def parent_expiry_restarts_with_each_write() -> None:
            # group and chain state follows job_ttl, restarted by each write
            parent_id = uuid4().hex
            start = anyio.current_time()
            await r.set_parent(
                parent_id,
                ParentRecord(kind="group", status="queued", data=b"", members={"a": "queued"}),
            )
            created = anyio.current_time()  # the first TTL runs out by created + ttl
            await sleep_until(start + 0.12)
            updating = anyio.current_time()  # the restarted TTL runs until updating + ttl
            counts = await r.set_member_status(parent_id, "a", "successful")
            updated = anyio.current_time()
            require(updated < start + ttl, "the first TTL may have run out before the update")
            assert counts == {"successful": 1}
            await sleep_until(created + ttl + 0.04)  # past the first TTL
            members = (await r.get_parent(parent_id)).members
            require(anyio.current_time() < updating + ttl, "the restarted TTL may have run out")
            assert members == {"a": "successful"}
            await sleep_until(updated + ttl + 0.1)
            with pytest.raises(NotFoundError):
                await r.get_parent(parent_id)

        await until_conclusive(job_and_result_expire)
        await until_conclusive(parent_expiry_restarts_with_each_write)


async def test_create_jobs_only_creates_missing_state(redis_server: RedisServer) -> None:
    async with RedisResults(redis_server.url, prefix=prefix()) as r:
        old, new = uuid4().hex, uuid4().hex
        await r.set_jobs({old: JobRecord(status="successful", data=b"ran")})
        created = await r.create_jobs(
            {
                old: JobRecord(status="queued", data=b"again"),
                new: JobRecord(status="queued", data=b"n"),
            }
        )
        assert created == {new}
        assert await r.get_job(old) == JobRecord(status="successful", data=b"ran")
        assert await r.get_job(new) == JobRecord(status="queued", data=b"n")


async def test_scripts_reload_after_script_flush(redis_server: RedisServer) -> None:
    queue = "flushed"
    async with RedisBroker(redis_server.url, prefix=prefix()) as broker:
        await broker.enqueue(envelope(queue, b"m"))
        await broker.client.script_flush()
        assert await broker.get_pending(queue) == [b"m"]  # one call: loaded again
        await broker.client.script_flush()
        pending: list[list[bytes]] = []

        async def read() -> None:
            pending.append(await broker.get_pending(queue))

        async with anyio.create_task_group() as tg:  # concurrent calls: one pipeline
            for _ in range(5):
                tg.start_soon(read)
        assert pending == [[b"m"]] * 5


async def test_concurrent_calls_share_round_trips(redis_server: RedisServer) -> None:
    async with RedisResults(redis_server.url, prefix=prefix()) as results:
        ids = [uuid4().hex for _ in range(50)]
        await results.set_jobs({i: JobRecord(status="queued", data=i.encode()) for i in ids})
        flushes = results._cmds.flushes
        got: dict[str, bytes] = {}

        async def read(job_id: str) -> None:
            got[job_id] = (await results.get_job(job_id)).data

        async with anyio.create_task_group() as tg:
            for job_id in ids:
                tg.start_soon(read, job_id)
        assert got == {i: i.encode() for i in ids}
        assert results._cmds.flushes - flushes < 10  # 50 calls, a few round trips


async def test_combiner_empty_gather_and_cancelled_calls(redis_server: RedisServer) -> None:
    """An empty gather returns at once; a call cancelled while it waits for the next
    flush is not sent, and the calls sharing its batch still get their replies."""
    name = prefix()
    async with RedisResults(redis_server.url, prefix=name) as results:
        cmds = results._cmds
        with anyio.fail_after(TIMEOUT):
            assert await cmds.gather([]) == []
        key, empty = f"{name}:probe".encode(), f"{name}:empty".encode()
        replies: list[object] = []
        doomed = anyio.CancelScope()

        async def incr(scope: anyio.CancelScope | None = None) -> None:
            with scope or anyio.CancelScope():
                replies.append(await cmds.submit(lambda client: client.incr(key)))

        def waiting() -> int:
            return len(cmds._open.calls) if cmds._open is not None else 0

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                # keep the flusher busy: the next calls wait together for the next flush
                tg.start_soon(cmds.submit, lambda client: client.blpop([empty], timeout=1))
                while cmds._open is not None or cmds.calls == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                tg.start_soon(incr)
                tg.start_soon(incr, doomed)
                tg.start_soon(incr)
                while waiting() < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                doomed.cancel()
                while waiting() > 2:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            assert sorted(replies) == [1, 2]  # type: ignore[type-var]
            # the cancelled caller's INCR was never sent
            assert await cmds.submit(lambda client: client.get(key)) == b"2"
