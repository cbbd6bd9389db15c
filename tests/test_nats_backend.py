"""NATS-only behaviour of :mod:`tasqueue_anyio.brokers.nats` and
:mod:`tasqueue_anyio.results.nats`: names and key encoding, leases and fencing, renewal,
batching, ETAs, poison messages, compare-and-set, expiry, round trips, and interop with
``nats-py`` (asyncio only).

The contract suites cover the rest (``conftest.BROKER_FACTORIES``, ``RESULTS_FACTORIES``).
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import anyio
import attrs
import msgpack
import pytest
from broker_support import consuming, envelope, receive
from nats_server import NatsServer
from nats_support import broker_on, eventually, name, results_on, take_all
from server_support import TIMEOUT, Counter, running
from timing_support import require, sleep_until, until_conclusive

from tasqueue_anyio import (
    Chain,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    LeaseLostError,
    NotFoundError,
    PayloadTooLargeError,
    Server,
    Status,
)
from tasqueue_anyio._nats.client import Client
from tasqueue_anyio._nats.jetstream import JetStream
from tasqueue_anyio._nats_backend import decode_token, encode_token
from tasqueue_anyio.abc import Delivery, Envelope, JobRecord, ParentRecord, ScheduleRecord
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

pytestmark = pytest.mark.anyio

_KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


# -- names and encodings -------------------------------------------------------------------------

ODD_IDS = [
    "plain-id_1",
    "job:msg:42",
    "a@b+c/d=e",
    "dots.in.the.middle",
    ".leading",
    "trailing.",
    "x..y",
    "*",
    ">",
    "with space",
    "ünïcödé",
    "=3A",
]


@pytest.mark.parametrize("text", ODD_IDS)
def test_tokens_are_reversible_and_in_the_kv_charset(text: str) -> None:
    token = encode_token(text)
    assert decode_token(token) == text
    assert _KV_KEY.match(token)
    assert not {".", "*", ">", " "} & set(token)
    assert len({encode_token(t) for t in ODD_IDS}) == len(ODD_IDS)  # no two collide


def test_bad_options_refused() -> None:
    for prefix in ("has space", "a.b", "a*", ">", "", "x" * 65):
        with pytest.raises(InvalidInputError):
            NatsBroker("nats://127.0.0.1", prefix=prefix)
        with pytest.raises(InvalidInputError):
            NatsResults("nats://127.0.0.1", prefix=prefix)
    with pytest.raises(InvalidInputError):
        NatsBroker("nats://127.0.0.1", ack_wait=0)
    with pytest.raises(InvalidInputError):
        NatsBroker("nats://127.0.0.1", batch_size=0)
    with pytest.raises(InvalidInputError):
        NatsResults("nats://127.0.0.1", job_ttl=-1)
    with pytest.raises(InvalidInputError):
        NatsResults("nats://127.0.0.1", client=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        NatsResults(client=object())  # type: ignore[arg-type]


async def test_caller_client_is_not_closed(nats_server: NatsServer) -> None:
    async with Client(nats_server.url) as client:
        broker = NatsBroker(client=client, prefix=name())
        async with broker:
            await broker.enqueue(envelope("q", b"m"))
        await client.flush()  # still usable after the broker closed
        async with broker:  # and the broker opens again on it
            assert await broker.get_pending("q") == [b"m"]
            assert broker.is_open
            async with broker:  # entries are counted
                pass
            assert broker.is_open
            await broker.js.delete_stream(broker.stream)
        assert not broker.is_open


async def test_two_prefixes_never_see_each_other(nats_server: NatsServer) -> None:
    queue, job_id = "shared", uuid4().hex
    async with (
        broker_on(nats_server) as broker_a,
        broker_on(nats_server) as broker_b,
        results_on(nats_server) as results_a,
        results_on(nats_server) as results_b,
    ):
        await broker_a.enqueue(envelope(queue, b"a's message"))
        await broker_a.enqueue(envelope(queue, b"later", eta=time.time() + 60))
        await results_a.set_jobs({job_id: JobRecord(status="queued", data=b"a's job")})
        await results_a.set_result(job_id, b"a's result")
        assert await broker_a.get_pending(queue) == [b"a's message"]
        assert await broker_b.get_pending(queue) == []
        assert await broker_b.get_scheduled(queue) == []
        with pytest.raises(JobNotFoundError):
            await results_b.get_job(job_id)
        with pytest.raises(LookupError):
            await results_b.get_result(job_id)


@pytest.mark.parametrize("queue", ["a*", "a.b", ">", "a b", "", "q\n", "x" * 129])
async def test_bad_queue_names_refused(nats_server: NatsServer, queue: str) -> None:
    async with broker_on(nats_server) as broker:
        with pytest.raises(InvalidInputError):
            await broker.enqueue(Envelope(queue=queue, data=b"x", id="i"))
        with pytest.raises(InvalidInputError):
            await broker.get_pending(queue)
        with pytest.raises(InvalidInputError):
            await broker.get_dead_letters(queue)
        send, receive_stream = anyio.create_memory_object_stream[Delivery](0)
        with receive_stream, send, pytest.raises(InvalidInputError):
            await broker.consume(queue, send)


async def test_one_durable_consumer_per_queue_shared(nats_server: NatsServer) -> None:
    prefix, queue = name(), "shared-q"
    async with (
        broker_on(nats_server, prefix) as one,
        broker_on(nats_server, prefix, keep=True) as two,
    ):
        await one.enqueue_many([envelope(queue, f"m{i}".encode()) for i in range(20)])
        got = await take_all([one, two], queue, 20)
        assert sorted(got) == sorted(f"m{i}".encode() for i in range(20))  # each once
        names = await one.js.api(f"CONSUMER.NAMES.{one.stream}")
        assert names["consumers"] == [queue]


# -- leases and fencing ----------------------------------------------------------------------------


async def test_dead_worker_message_comes_back_after_ack_wait(nats_server: NatsServer) -> None:
    prefix, queue = name(), "lease"
    async with broker_on(nats_server, prefix, ack_wait=0.5, keep=True) as dead:
        await dead.enqueue(envelope(queue, b"job"))
        async with consuming(dead, queue) as stream:
            taken = await receive(stream)
            assert taken.attempt == 1
    # the broker is gone (its connection and renewals with it), the delivery unsettled
    async with broker_on(nats_server, prefix, ack_wait=0.5) as alive:
        assert await alive.get_pending(queue) == []  # held until the ack wait runs out
        start = anyio.current_time()
        async with consuming(alive, queue) as stream:
            again = await receive(stream)
            assert (again.data, again.attempt) == (b"job", 2)
            assert anyio.current_time() - start < 3
            # fencing: the first delivery's settle is refused, the new owner keeps it
            with pytest.raises(LeaseLostError, match="lease lost"):
                await taken.dead_letter("zombie")
            await taken.nack()  # settled by the refusal: does nothing now
            assert await alive.get_dead_letters(queue) == []
            await again.ack()
        assert await alive.get_pending(queue) == []
        info = await alive.js.stream_info(alive.stream)
        assert info.messages == 0


async def test_lost_lease_refuses_ack_with_enqueue(nats_server: NatsServer) -> None:
    prefix, queue = name(), "fence"
    async with broker_on(nats_server, prefix, ack_wait=0.4, keep=True) as zombie:
        await zombie.enqueue(envelope(queue, b"job"))
        async with consuming(zombie, queue) as stream:
            first = await receive(stream)
    async with (
        broker_on(nats_server, prefix, ack_wait=0.4) as owner,
        consuming(owner, queue) as stream,
    ):
        second = await receive(stream)
        assert second.attempt == 2
        with pytest.raises(LeaseLostError):
            await first.ack(enqueue=[envelope(queue, b"follow-up")])
        assert await owner.get_pending(queue) == []  # no follow-up was enqueued
        await second.ack(enqueue=[envelope(queue, b"follow-up")])
        follow = await receive(stream)
        assert follow.data == b"follow-up"
        await follow.ack()


async def test_paused_worker_cannot_ack_over_the_redelivery(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose renewals stopped (paused past the ack wait) finds its lease lost even
    though JetStream would accept its ack, so it cannot remove the message the new
    delivery owns."""
    prefix, queue = name(), "paused"
    async with (
        broker_on(nats_server, prefix, ack_wait=0.6) as paused,
        broker_on(nats_server, prefix, ack_wait=0.6, keep=True) as other,
    ):

        async def no_renewal() -> None:
            pass

        monkeypatch.setattr(paused, "renew_leases", no_renewal)
        await paused.enqueue(envelope(queue, b"job"))
        async with consuming(paused, queue) as stream:
            stale = await receive(stream)
        async with consuming(other, queue) as other_stream:
            owner = await receive(other_stream)
            assert owner.attempt == 2
            with pytest.raises(LeaseLostError):
                await stale.ack()
            info = await other.js.consumer_info(other.stream, queue)
            assert info.num_ack_pending == 1  # the owner still holds it
            await owner.ack()


async def test_renewal_keeps_a_long_job(nats_server: NatsServer) -> None:
    prefix, queue = name(), "long"
    async with (
        broker_on(nats_server, prefix, ack_wait=0.6) as worker,
        broker_on(nats_server, prefix, ack_wait=0.6, keep=True) as other,
    ):
        await worker.enqueue(envelope(queue, b"long job"))
        async with consuming(worker, queue) as stream:
            delivery = await receive(stream)
            async with consuming(other, queue) as other_stream:
                with anyio.move_on_after(2.0) as scope:
                    await other_stream.receive()  # must not get the held message
                assert scope.cancelled_caught
            await delivery.ack()  # still ours after three ack waits
        assert await worker.get_pending(queue) == []


async def test_abandoned_delivery_is_given_back(nats_server: NatsServer) -> None:
    queue = "abandoned"
    async with broker_on(nats_server, ack_wait=5) as broker:
        await broker.enqueue(envelope(queue, b"job"))
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            del delivery
            await anyio.sleep(0.05)  # the consumer's hand-over frame lets go of it too
            gc.collect()
            assert broker._abandoned
            start = anyio.current_time()
            await broker.renew_leases()
            again = await receive(stream)
            assert anyio.current_time() - start < 1  # given back, not left to the ack wait
            assert (again.data, again.attempt) == (b"job", 2)
            await again.ack()


# -- order, batches, ETAs, put-backs -------------------------------------------------------------


async def test_fifo_under_backlog(nats_server: NatsServer) -> None:
    queue = "backlog"
    expected = [f"m{i:03d}".encode() for i in range(300)]
    async with broker_on(nats_server, batch_size=16) as broker:
        for start in range(0, 300, 50):  # several enqueue calls
            await broker.enqueue_many(
                [envelope(queue, data) for data in expected[start : start + 50]]
            )
        assert await broker.get_pending(queue) == expected
        got = []
        async with consuming(broker, queue, receivers=4) as stream:
            for _ in expected:
                delivery = await receive(stream)
                got.append(delivery.data)
                await delivery.ack()
    assert got == expected


async def test_batch_fetch_gives_back_unhanded_messages(nats_server: NatsServer) -> None:
    queue = "batch"
    expected = [f"m{i}".encode() for i in range(12)]
    async with broker_on(nats_server, batch_size=8) as broker:
        await broker.enqueue_many([envelope(queue, data) for data in expected])
        async with consuming(broker, queue, receivers=5) as stream:
            first = await receive(stream)  # the consumer fetched 5 (its receivers) at once
            assert first.data == b"m0"
            assert await broker.get_pending(queue) == expected[5:]
        # cancelled: the four fetched and never handed over went back, to the back
        assert await broker.get_pending(queue) == expected[5:] + expected[1:5]
        async with consuming(broker, queue) as stream:
            second = await receive(stream)
            assert (second.data, second.attempt) == (b"m5", 1)
        await first.ack()


async def test_nack_copies_carry_the_attempt(nats_server: NatsServer) -> None:
    queue = "nack"
    async with broker_on(nats_server) as broker:
        await broker.enqueue(envelope(queue, b"job"))
        async with consuming(broker, queue) as stream:
            for attempt in (1, 2, 3):
                delivery = await receive(stream)
                assert (delivery.data, delivery.attempt) == (b"job", attempt)
                await delivery.nack()
            delivery = await receive(stream)
            assert delivery.attempt == 4
            before = time.time()
            await delivery.nack(delay=30)
            ((eta, data),) = await broker.get_scheduled(queue)
            assert data == b"job"
            assert before + 30 <= eta <= time.time() + 30
            assert await broker.get_pending(queue) == []
        info = await broker.js.stream_info(broker.stream)
        assert info.messages == 1  # only the schedule: every original was acknowledged


async def test_due_etas_are_handed_out_in_eta_order(nats_server: NatsServer) -> None:
    """The server's scheduler fires the schedules due in one run in publishing order; the
    consumer hands each run out in ETA order."""
    offsets = [0.40, 0.10, 0.35, 0.20, 0.15, 0.30, 0.25, 0.05]
    async with broker_on(nats_server) as broker:

        async def etas_in_order() -> None:
            queue = f"etas{uuid4().hex[:8]}"
            now = time.time()  # the broker is open: the ETAs count from here
            await broker.enqueue_many(
                [envelope(queue, f"{offset:.2f}".encode(), eta=now + offset) for offset in offsets]
            )
            scheduled = await broker.get_scheduled(queue)
            require(time.time() < now + min(offsets), "an ETA passed before the listing")
            assert [data for _, data in scheduled] == [f"{o:.2f}".encode() for o in sorted(offsets)]
            await anyio.sleep(max(0.0, now + 1.0 - time.time()))  # let them all fire
            assert await broker.get_scheduled(queue) == []
            got = []
            async with consuming(broker, queue) as stream:
                for _ in offsets:
                    delivery = await receive(stream)
                    got.append(delivery.data)
                    assert time.time() >= now + float(delivery.data) - 0.001
                    await delivery.ack()
            assert got == [f"{o:.2f}".encode() for o in sorted(offsets)]

        await until_conclusive(etas_in_order)


async def test_idle_consumer_gets_a_scheduled_message_promptly(nats_server: NatsServer) -> None:
    queue = "wake"
    async with broker_on(nats_server) as broker:
        await broker.enqueue(envelope(queue, b"late", eta=time.time() + 60))
        async with consuming(broker, queue) as stream:
            await anyio.sleep(0.1)  # the consumer is idle in a pull request
            eta = time.time() + 0.3
            await broker.enqueue(envelope(queue, b"soon", eta=eta))
            delivery = await receive(stream)
            assert delivery.data == b"soon"
            assert eta <= time.time() < eta + 1.0
            await delivery.ack()


async def test_eta_without_message_schedules_goes_through_the_relay(
    nats_server: NatsServer,
) -> None:
    """As on a server older than 2.12 (``tests/test_nats_old_server.py`` runs one): the
    message waits without a schedule, and the consumer's relay moves it at its ETA."""
    queue = "old"
    async with broker_on(nats_server) as broker:
        broker._schedules = False
        eta = time.time() + 0.2
        await broker.enqueue(envelope(queue, b"later", eta=eta))
        [stored] = await broker.read_range(broker.stream, f"{broker.prefix}.s.{queue}.*")
        assert stored.headers is not None
        assert "Nats-Schedule" not in stored.headers
        assert await broker.get_scheduled(queue) == [(eta, b"later")]
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            assert time.time() >= eta - 0.002
            assert (delivery.data, delivery.attempt) == (b"later", 1)
            await delivery.ack()


async def test_repeated_message_id_is_stored_once(nats_server: NatsServer) -> None:
    queue = "dedupe"
    async with broker_on(nats_server) as broker:
        message = envelope(queue, b"once")
        await broker.enqueue(message)
        await broker.enqueue_many([message, message])
        assert await broker.get_pending(queue) == [b"once"]
        async with consuming(broker, queue) as stream:
            await (await receive(stream)).ack()
        # the first copy is gone: the same message enqueued again is stored again
        await broker.enqueue(message)
        assert await broker.get_pending(queue) == [b"once"]


async def test_finished_job_enqueued_again_with_its_id_runs_again(nats_server: NatsServer) -> None:
    queue, counter = "again", Counter()
    async with (
        broker_on(nats_server) as broker,
        results_on(nats_server) as results,
        Server(broker=broker, results=results) as server,
    ):
        server.register_task("count", counter, queue=queue, raw=True)
        async with running(server):
            for _ in range(2):
                job_id = await server.enqueue(Job("count", b"x", id="fixed-id", queue=queue))
                done = await server.wait(job_id, timeout=TIMEOUT)
                assert done.status is Status.SUCCESSFUL
    assert counter.payloads == [b"x", b"x"]


async def test_payload_at_the_servers_effective_limit_runs_one_byte_over_is_refused(
    nats_server: NatsServer,
) -> None:
    """The nats-server's max_payload (1 MiB) covers a whole message: a payload of the
    documented max_payload_size (1 MiB) cannot fit. It is refused before any I/O, naming
    the payload's size and the largest that fits; a payload of exactly that size runs, a
    retry (its message carries a long error) included."""
    queue, tries = "limit", []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        tries.append(len(payload))
        if len(tries) == 1:
            raise RuntimeError("é" * 10_000)

    def job(size: int) -> Job:  # the same envelope for every size
        return Job("big", b"x" * size, id="big-job", queue=queue, max_retries=1)

    async with (
        broker_on(nats_server) as broker,
        results_on(nats_server) as results,
        Server(broker=broker, results=results) as server,
    ):
        server.register_task("big", handler, queue=queue, raw=True)
        max_payload = broker.client.max_payload
        with pytest.raises(PayloadTooLargeError, match="max_payload") as refused:
            await server.enqueue(job(server.max_payload_size))
        limit = refused.value.limit
        assert refused.value.size == server.max_payload_size
        assert max_payload - 8 * 1024 < limit < max_payload
        for number in (server.max_payload_size, limit, max_payload):
            assert f"{number} bytes" in str(refused.value)

        # one byte over, beside a small job: nothing of the batch is stored
        small = Job("big", b"s", queue=queue)
        with pytest.raises(PayloadTooLargeError) as refused:
            await server.enqueue_many([small, job(limit + 1)])
        assert (refused.value.size, refused.value.limit) == (limit + 1, limit)
        assert f"{limit + 1} bytes, over the limit of {limit} bytes" in str(refused.value)
        for job_id in (small.id, "big-job"):
            with pytest.raises(JobNotFoundError):
                await server.get_job(job_id)
        assert await broker.get_pending(queue) == []
        chain = Chain([Job("big", b"s", queue=queue), job(limit + 1)])  # checked link by link
        with pytest.raises(PayloadTooLargeError, match="max_payload"):
            await server.enqueue_chain(chain)
        with pytest.raises(NotFoundError):
            await server.get_chain(chain.id)

        job_id = await server.enqueue(job(limit))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.SUCCESSFUL
        assert tries == [limit, limit]
        assert done.meta.prev_error is not None
        assert done.meta.prev_error.startswith("RuntimeError: éé")


async def test_a_message_of_max_message_size_with_the_longest_names_is_stored(
    nats_server: NatsServer,
) -> None:
    """MESSAGE_RESERVE covers the worst case: the longest prefix, bucket, queue name and
    job id (every character escaped in KV subjects), ETA and schedule headers, a put-back
    copy, a dead letter with a long reason, TTLs and the fencing headers of a result."""
    queue, job_id = "q" * 128, "." * 255
    async with (
        broker_on(nats_server, prefix="p" * 56 + name()[:8]) as broker,
        results_on(nats_server, "b" * 56 + name()[:8], job_ttl=3600, result_ttl=3600) as results,
    ):
        size = broker.max_message_size
        assert size is not None
        assert size == results.max_message_size
        data = b"x" * size
        await broker.enqueue(Envelope(queue=queue, data=data, id=f"{job_id}/0", eta=time.time()))
        await broker.enqueue(
            Envelope(queue=queue, data=data, id=f"{job_id}/1", eta=time.time() + 0.2)
        )
        async with consuming(broker, queue) as stream:
            first = await receive(stream)
            await first.nack(delay=0.1)  # a scheduled copy with its delivery count
            later = [await receive(stream) for _ in range(2)]
            assert [len(d.data) for d in later] == [size, size]
            await later[0].dead_letter("é" * 5000)
            await later[1].ack()
        (dead,) = await broker.get_dead_letters(queue)
        assert len(dead.data) == size

        record = JobRecord(status="processing", data=data, run="999999.999999")
        await results.set_jobs({job_id: JobRecord(status="queued", data=data)})
        assert await results.start_job(job_id, record) is None
        assert await results.set_result(job_id, data, run=record.run)
        assert await results.update_job(
            job_id, attrs.evolve(record, status="successful"), expect={"processing"}
        )
        assert (await results.get_job(job_id)).status == "successful"
        assert await results.get_result(job_id) == data


async def test_inspection_of_large_messages_reads_in_byte_bounded_batches(
    nats_server: NatsServer,
) -> None:
    queue, count, size = "large", 30, 100_000  # 3 MB: over one batch's byte budget
    async with (
        Client(nats_server.url, max_pending_bytes=100_000) as client,
        NatsBroker(client=client, prefix=name()) as broker,
    ):
        try:
            await broker.enqueue_many(
                [envelope(queue, bytes([index]) * size) for index in range(count)]
            )
            pending = await broker.get_pending(queue)
            assert [data[0] for data in pending] == list(range(count))
            assert all(len(data) == size for data in pending)
        finally:
            await broker.js.delete_stream(broker.stream)


async def test_a_result_over_what_the_store_holds_is_refused_clearly(
    nats_server: NatsServer,
) -> None:
    queue = "bigresult"
    async with (
        broker_on(nats_server) as broker,
        results_on(nats_server) as results,
        Server(broker=broker, results=results) as server,
    ):
        limit = results.max_message_size
        assert limit is not None
        assert limit < server.max_payload_size  # within the documented limit, over the server's

        async def handler(payload: bytes, ctx: JobContext) -> None:
            await ctx.save(b"r" * server.max_payload_size)

        server.register_task("save", handler, queue=queue, raw=True)
        job_id = await server.enqueue(Job("save", queue=queue))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert done.status is Status.FAILED
        assert done.meta.prev_error is not None
        assert done.meta.prev_error.startswith("PayloadTooLargeError")
        assert f"{server.max_payload_size} bytes, over the limit of {limit} bytes" in (
            done.meta.prev_error
        )
        assert "max_payload" in done.meta.prev_error


async def test_events_on_odd_channel_names(nats_server: NatsServer) -> None:
    async with broker_on(nats_server) as broker:
        got: list[bytes] = []
        for channel in ("a.b", "*", "job:1/x"):
            async with broker.subscribe(channel, got.append):
                await broker.publish(channel, channel.encode())
                await broker.publish("other", b"not this")
                with anyio.fail_after(TIMEOUT):
                    while channel.encode() not in got:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
        assert got == [b"a.b", b"*", b"job:1/x"]


# -- with a server ------------------------------------------------------------------------------


async def test_poison_message_is_dead_lettered_and_the_queue_flows(
    nats_server: NatsServer,
) -> None:
    queue = "poison"
    counter = Counter()
    async with (
        broker_on(nats_server) as broker,
        results_on(nats_server) as results,
        Server(broker=broker, results=results) as server,
    ):
        server.register_task("count", counter, queue=queue, raw=True)
        # undecodable bytes published straight to the queue's subject
        await broker.js.publish(f"{broker.prefix}.q.{queue}", b"\xc1garbage")
        async with running(server):
            job_id = await server.enqueue(Job("count", b"after", queue=queue))
            await server.wait(job_id, timeout=TIMEOUT)
        dead = await broker.get_dead_letters(queue)
        assert [d.data for d in dead] == [b"\xc1garbage"]
        assert dead[0].reason
        assert (await broker.js.stream_info(broker.stream, subjects_filter=">")).subjects == {
            f"{broker.prefix}.d.{queue}": 1
        }
    assert counter.payloads == [b"after"]


async def test_zombie_run_cannot_overwrite_the_new_run(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker paused past the ack wait: the job runs again elsewhere (attempt 2), and
    the paused run's result, state and ack are all refused when it resumes."""
    prefix, bucket, queue = name(), name(), "zombie"
    release = anyio.Event()
    attempts: list[int] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        attempts.append(ctx.meta.attempt)
        if len(attempts) == 1:
            await release.wait()  # the zombie: paused until the other run is done
            await ctx.save(b"zombie result")
        else:
            await ctx.save(b"owner result")

    async with (
        broker_on(nats_server, prefix, ack_wait=0.6) as zombie_broker,
        broker_on(nats_server, prefix, ack_wait=0.6, keep=True) as owner_broker,
        results_on(nats_server, bucket) as results,
        results_on(nats_server, bucket, keep=True) as owner_results,
    ):

        async def no_renewal() -> None:
            pass

        monkeypatch.setattr(zombie_broker, "renew_leases", no_renewal)
        zombie = Server(broker=zombie_broker, results=results)
        owner = Server(broker=owner_broker, results=owner_results)
        async with zombie, owner:
            zombie.register_task("t", handler, queue=queue, raw=True)
            owner.register_task("t", handler, queue=queue, raw=True)
            async with running(zombie):
                job_id = await zombie.enqueue(Job("t", queue=queue))
                with anyio.fail_after(TIMEOUT):
                    while not attempts:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                async with running(owner):
                    done = await owner.wait(job_id, timeout=TIMEOUT)
                release.set()
                with anyio.fail_after(TIMEOUT):
                    while zombie._active:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
            final = await owner.get_job(job_id)
            assert await owner.get_result(job_id) == b"owner result"
    assert attempts == [1, 2]
    assert done.status is Status.SUCCESSFUL
    assert final.status is Status.SUCCESSFUL
    assert final.meta.attempt == 2


# -- results: compare-and-set, round trips, expiry ---------------------------------------------------


async def test_odd_ids_stored_and_listed_exactly(nats_server: NatsServer) -> None:
    async with results_on(nats_server) as results:
        records = {i: JobRecord(status="processing", data=i.encode()) for i in ODD_IDS}
        await results.set_jobs(records)
        for job_id in ODD_IDS:
            assert await results.update_job(
                job_id, JobRecord(status="successful", data=b"done"), expect=["processing"]
            )
            await results.set_result(job_id, job_id.encode())
        assert await results.get_success() == ODD_IDS
        for job_id in ODD_IDS:
            assert await results.get_result(job_id) == job_id.encode()
        keys = await results.kv.keys()
        assert all(_KV_KEY.match(key) for key in keys)
        assert "j.job=3Amsg=3A42" in keys


async def test_transition_after_a_local_write_is_one_round_trip(nats_server: NatsServer) -> None:
    async with results_on(nats_server) as results:
        job_id = uuid4().hex
        await results.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
        reads = 0
        read = results._read

        async def counting_read(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await read(*args, **kwargs)

        results._read = counting_read  # type: ignore[method-assign]
        assert (
            await results.start_job(job_id, JobRecord(status="processing", data=b"p", run="0.1"))
            is None
        )
        assert await results.set_result(job_id, b"r", run="0.1")
        assert await results.update_job(
            job_id,
            JobRecord(status="successful", data=b"s", run="0.1"),
            expect=["processing"],
            run="0.1",
        )
        assert reads == 0  # every decision made on the remembered revision
        # a refusal is confirmed on a fresh read
        assert not await results.update_job(
            job_id, JobRecord(status="failed", data=b"f"), expect=["processing"]
        )
        assert reads == 1


def count_reads(results: NatsResults) -> list[int]:
    """Count ``results``' state reads (a one-element list, updated in place)."""
    reads = [0]
    read = results._read

    async def counting_read(*args: Any, **kwargs: Any) -> Any:
        reads[0] += 1
        return await read(*args, **kwargs)

    results._read = counting_read  # type: ignore[method-assign]
    return reads


def processing(run: str) -> JobRecord:
    return JobRecord(status="processing", data=b"p", run=run)


async def test_start_without_a_read_unless_the_job_is_closed(nats_server: NatsServer) -> None:
    """A store that has not seen a job starts it with one gated write, no read; another
    store (another process) that ended, cancelled or closed the job by ``set_jobs`` left
    the job's gate, so the start is refused there and confirmed on a read."""
    bucket = name()
    async with (
        results_on(nats_server, bucket) as one,
        results_on(nats_server, bucket, keep=True) as two,
    ):
        reads = count_reads(two)
        ended, cancelled, closed, plain = (uuid4().hex for _ in range(4))
        queued = JobRecord(status="queued", data=b"q")
        await one.set_jobs({ended: queued, cancelled: queued, plain: queued})
        await one.set_jobs({closed: JobRecord(status="failed", data=b"f")})
        # ended here: started and finished by `one`
        assert await one.start_job(ended, processing("0.1")) is None
        done = JobRecord(status="successful", data=b"s", run="0.1")
        assert await one.update_job(ended, done, expect=["processing"], run="0.1")
        # cancel requested while it ran
        assert await one.start_job(cancelled, processing("0.1")) is None
        assert (await one.request_cancel(cancelled)).cancel_requested

        assert await two.start_job(plain, processing("0.2")) is None
        assert reads[0] == 0  # one write, no read
        assert (await one.get_job(plain)).run == "0.2"

        assert await two.start_job(ended, processing("0.2")) == done
        refused = [await two.start_job(job_id, processing("0.2")) for job_id in (cancelled, closed)]
        assert [(r.status, r.cancel_requested) if r else None for r in refused] == [
            ("processing", True),
            ("failed", False),
        ]
        assert reads[0] == 3  # each refusal confirmed on a read
        for job_id, status in ((ended, "successful"), (cancelled, "processing")):
            assert (await one.get_job(job_id)).status == status  # nothing overwritten

        # a deleted job has no gate any more: it may start again, without a read
        await one.delete_job(ended)
        async with results_on(nats_server, bucket, keep=True) as three:
            fresh_reads = count_reads(three)
            assert await three.start_job(ended, processing("0.3")) is None
            assert fresh_reads[0] == 0


async def test_a_queued_job_cancelled_elsewhere_is_not_started(nats_server: NatsServer) -> None:
    """Cancelling a queued job (``cancelled`` at once) closes its gate: a store that has
    not seen the job refuses to start it."""
    bucket, job_id = name(), uuid4().hex
    async with (
        results_on(nats_server, bucket) as one,
        results_on(nats_server, bucket, keep=True) as two,
    ):
        await one.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
        assert (await one.request_cancel(job_id)).status == "cancelled"
        current = await two.start_job(job_id, processing("0.1"))
        assert current is not None
        assert current.status == "cancelled"
        assert (await one.get_job(job_id)).status == "cancelled"


async def test_conflicting_writers_in_two_processes(nats_server: NatsServer) -> None:
    """Two stores (two connections, as two processes would have) racing on one parent:
    every update lands once, through revision conflicts and retries."""
    bucket, parent_id = name(), uuid4().hex
    members = [f"m{i:02d}" for i in range(40)]
    async with (
        results_on(nats_server, bucket) as one,
        results_on(nats_server, bucket, keep=True) as two,
    ):
        await one.set_parent(
            parent_id,
            ParentRecord(
                kind="group", status="queued", data=b"", members=dict.fromkeys(members, "queued")
            ),
        )
        await two.get_parent(parent_id)  # both remember the same revision
        returned: list[dict[str, int]] = []

        async def finish(store: NatsResults, member: str) -> None:
            returned.append(await store.set_member_status(parent_id, member, "successful"))

        async with anyio.create_task_group() as tg:
            for index, member in enumerate(members):
                tg.start_soon(finish, (one, two)[index % 2], member)
        assert sorted(counts.get("successful", 0) for counts in returned) == list(range(1, 41))
        assert (await one.get_parent(parent_id)).members == dict.fromkeys(members, "successful")

        # advance_schedule from both: exactly one wins
        await one.set_schedule(ScheduleRecord(id="s", data=b"j", next_fire=10.5))
        await two.get_schedules()
        won = []

        async def advance(store: NatsResults) -> None:
            won.append(await store.advance_schedule("s", 10.5, 70.5))

        async with anyio.create_task_group() as tg:
            for store in (one, two, one, two):
                tg.start_soon(advance, store)
        assert sorted(won) == [False, False, False, True]


async def test_set_result_is_fenced_by_the_state_key(nats_server: NatsServer) -> None:
    bucket = name()
    async with (
        results_on(nats_server, bucket) as zombie,
        results_on(nats_server, bucket, keep=True) as owner,
    ):
        job_id = uuid4().hex
        await zombie.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
        await zombie.start_job(job_id, JobRecord(status="processing", data=b"p", run="0.1"))
        # another process takes the job over: the zombie's remembered revision is stale
        await owner.start_job(job_id, JobRecord(status="processing", data=b"p", run="0.2"))
        assert not await zombie.set_result(job_id, b"zombie", run="0.1")
        assert await owner.set_result(job_id, b"owner", run="0.2")
        assert await zombie.get_result(job_id) == b"owner"


async def test_create_jobs_over_missing_present_and_deleted_keys(nats_server: NatsServer) -> None:
    async with results_on(nats_server) as results:
        old, new, deleted = uuid4().hex, uuid4().hex, uuid4().hex
        await results.set_jobs(
            {
                old: JobRecord(status="successful", data=b"ran"),
                deleted: JobRecord(status="queued", data=b"x"),
            }
        )
        await results.kv.delete(f"j.{deleted}")  # a delete marker, as another KV client leaves
        with pytest.raises(JobNotFoundError):
            await results.get_job(deleted)
        created = await results.create_jobs(
            {
                old: JobRecord(status="queued", data=b"again"),
                new: JobRecord(status="queued", data=b"n"),
                deleted: JobRecord(status="queued", data=b"d"),
            }
        )
        assert created == {new, deleted}
        assert await results.get_job(old) == JobRecord(status="successful", data=b"ran")
        assert (await results.get_job(deleted)).data == b"d"


async def test_job_and_result_expiry(nats_server: NatsServer) -> None:
    ttl = 1.0
    async with results_on(nats_server, job_ttl=ttl, result_ttl=ttl) as r:
        await r.set_schedule(ScheduleRecord(id="cron", data=b"j", next_fire=1.0))

        async def states_expire() -> None:
            job_id = uuid4().hex
            start = anyio.current_time()  # no TTL runs out before start + ttl
            await r.set_jobs({job_id: JobRecord(status="processing", data=b"x")})
            assert await r.update_job(
                job_id, JobRecord(status="successful", data=b"y"), expect=["processing"]
            )
            await r.set_result(job_id, b"result")
            success = await r.get_success()
            parent_id = uuid4().hex
            await r.set_parent(
                parent_id,
                ParentRecord(kind="group", status="queued", data=b"", members={"a": "queued"}),
            )
            written = anyio.current_time()  # the job's TTLs run out by written + ttl
            require(written < start + ttl, "the writes took the whole TTL")
            assert job_id in success
            await sleep_until(written + 0.6)
            updating = anyio.current_time()  # the parent's restarted TTL runs till + ttl
            counts = await r.set_member_status(parent_id, "a", "successful")
            updated = anyio.current_time()
            require(updated < start + ttl, "the parent's first TTL may have run out")
            assert counts == {"successful": 1}
            await sleep_until(written + 1.3)
            with pytest.raises(JobNotFoundError):
                await r.get_job(job_id)
            with pytest.raises(LookupError):
                await r.get_result(job_id)
            assert job_id not in await r.get_success()
            members = (await r.get_parent(parent_id)).members  # restarted
            require(anyio.current_time() < updating + ttl, "the restarted TTL may have run out")
            assert members == {"a": "successful"}
            await sleep_until(updated + 1.3)
            with pytest.raises(NotFoundError):
                await r.get_parent(parent_id)

        await until_conclusive(states_expire)
        assert [s.id for s in await r.get_schedules()] == ["cron"]  # never expires


async def test_bucket_max_age_fallback_keeps_schedules(nats_server: NatsServer) -> None:
    async with results_on(nats_server, job_ttl=1, per_key_ttl=False) as r:
        assert r.cron is not r.kv
        assert (await r.js.stream_info(r.kv.stream)).config["max_age"] == 1_000_000_000
        job_id = uuid4().hex
        await r.set_jobs({job_id: JobRecord(status="queued", data=b"x")})
        await r.set_schedule(ScheduleRecord(id="cron", data=b"j", next_fire=1.0))
        await anyio.sleep(1.5)
        with pytest.raises(JobNotFoundError):
            await r.get_job(job_id)
        assert [s.id for s in await r.get_schedules()] == ["cron"]
        assert await r.advance_schedule("cron", 1.0, 2.0)
        assert await r.delete_schedule("cron")


# -- interop with nats-py (asyncio only) ----------------------------------------------------------


@pytest.fixture
async def nats_py(nats_server: NatsServer) -> AsyncIterator[Any]:
    nats = pytest.importorskip("nats", reason="nats-py (a test dependency) is not installed")
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_interop_nats_py_consumes_our_job_message(
    nats_server: NatsServer, nats_py: Any
) -> None:
    queue = "interop-out"
    async with broker_on(nats_server) as broker:
        async with consuming(broker, queue):  # creates the queue's durable consumer
            await anyio.sleep(0.05)
        message = envelope(queue, b"job for nats-py")
        await broker.enqueue(message)
        js = nats_py.jetstream()
        psub = await js.pull_subscribe(
            f"{broker.prefix}.q.{queue}", durable=queue, stream=broker.stream
        )
        (msg,) = await psub.fetch(1, timeout=5)
        assert msg.data == b"job for nats-py"
        assert msg.headers["Nats-Msg-Id"] == message.id
        assert msg.metadata.num_delivered == 1
        await msg.ack_sync()
        assert await broker.get_pending(queue) == []
        assert (await broker.js.stream_info(broker.stream)).messages == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("confirm_acks", [False, True])
async def test_interop_we_consume_a_nats_py_message(
    nats_server: NatsServer, nats_py: Any, confirm_acks: bool
) -> None:
    queue = "interop-in"
    async with broker_on(nats_server, confirm_acks=confirm_acks) as broker:
        js = nats_py.jetstream()
        await js.publish(f"{broker.prefix}.q.{queue}", b"from nats-py", headers={"X-Trace": "t1"})
        assert await broker.get_pending(queue) == [b"from nats-py"]
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            assert (delivery.data, delivery.attempt) == (b"from nats-py", 1)
            await delivery.ack()

        async def removed() -> bool:
            return bool((await js.stream_info(broker.stream)).state.messages == 0)

        if confirm_acks:
            assert await removed()  # our confirmed ack removed it, as nats-py sees it
        else:
            await eventually(removed)  # the server removes it when it reads the ack


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_interop_nats_py_reads_our_kv_entries(nats_server: NatsServer, nats_py: Any) -> None:
    async with results_on(nats_server) as results:
        job_id = "job:msg:1/x"
        await results.set_jobs({job_id: JobRecord(status="queued", data=b"message")})
        await results.set_result(job_id, b"the result")
        kv = await nats_py.jetstream().key_value(results.prefix)
        entry = await kv.get(f"j.{encode_token(job_id)}")
        state = msgpack.unpackb(entry.value, raw=False)
        assert (state["s"], state["d"]) == ("queued", b"message")
        assert (await kv.get(f"r.{encode_token(job_id)}")).value == b"the result"
        assert sorted(await kv.keys()) == sorted(await results.kv.keys())
        # and a delete by nats-py is seen by ours
        await kv.delete(f"j.{encode_token(job_id)}")
        with pytest.raises(JobNotFoundError):
            await results.get_job(job_id)


async def test_interop_our_client_reads_the_broker_stream(nats_server: NatsServer) -> None:
    """The broker's stream is a plain work-queue stream: our client's JetStream API sees
    the job where the broker put it."""
    queue = "plain"
    async with broker_on(nats_server) as broker, Client(nats_server.url) as client:
        await broker.enqueue(envelope(queue, b"visible"))
        js = JetStream(client)
        info = await js.stream_info(broker.stream, subjects_filter=">")
        assert info.config["retention"] == "workqueue"
        assert info.subjects == {f"{broker.prefix}.q.{queue}": 1}


async def test_damaged_schedule_entry_leaves_the_other_schedules_firing(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A cron entry of the bucket that does not decode (damaged, or written by something
    else) is read as an unreadable schedule: logged and skipped, while the other
    schedules are listed and fire; ``remove_schedule`` removes it."""
    fired = anyio.Event()

    async def tick(payload: bytes, ctx: JobContext) -> None:
        fired.set()

    async with broker_on(nats_server) as broker, results_on(nats_server) as results:
        await results._write(
            results._schedule_key("damaged"), b"\xc1 not msgpack", [], expect=None, kv=results.cron
        )
        server = Server(broker=broker, results=results)
        server.register_task("tick", tick, queue=name(), raw=True)
        queue = next(iter(server.queues))
        async with server, running(server):
            await server.enqueue(Job("tick", queue=queue, schedule="* * * * * *", id="good"))
            with anyio.fail_after(TIMEOUT):
                await fired.wait()
            assert [s.id for s in await server.get_schedules()] == ["good"]
            assert await server.remove_schedule("damaged")
            assert await server.remove_schedule("good")
        assert [r.id for r in await results.get_schedules()] == []
    assert any("schedule damaged is unreadable" in r.getMessage() for r in caplog.records)
