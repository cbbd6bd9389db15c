"""The NATS backends on a real old nats-server (:data:`nats_server.OLD_VERSION`, 2.10):
without message schedules, ETAs go through the broker's schedule relay; the contract
suites run there too (the ``nats-2.10`` backend of ``conftest.py``).

Also the upgrade: messages a relay left waiting on a 2.10 server are adopted as message
schedules once the same store runs on the current server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from broker_support import consuming, envelope, receive
from nats_server import (
    NatsServer,
    require_binary,
    require_old_binary,
    shared_old_nats_server,
    start_nats_server,
)
from nats_support import broker_on, drained, eventually, name, results_on, take_all
from server_support import TIMEOUT, running
from shim_support import run_with_a_failed_retry_ack

from tasqueue_anyio import (
    Backoff,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio._jobs import validate_queue
from tasqueue_anyio._nats.jetstream import ConsumerNotFoundError
from tasqueue_anyio.brokers.nats import NatsBroker, _Queue, _relayed_copy
from tasqueue_anyio.results.nats import NatsResults

pytestmark = pytest.mark.anyio

#: slack for the wall clock when checking that nothing ran before its ETA (the relay
#: takes a message as due 1 ms before its ETA)
EPSILON = 0.002


@pytest.fixture(scope="session")
def old_nats_server() -> NatsServer:
    """The session's old ``nats-server -js`` (started now if not yet); skips when its
    binary cannot be had."""
    return shared_old_nats_server()


@asynccontextmanager
async def server_on(nats: NatsServer) -> AsyncIterator[Server]:
    """An open :class:`Server` with a broker and a results store on ``nats``."""
    async with (
        broker_on(nats) as broker,
        NatsResults(nats.url, prefix=name()) as results,
        Server(broker=broker, results=results) as server,
    ):
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await results.drop()


async def wait_until_scheduled_empty(broker: NatsBroker, queue: str) -> None:
    """Wait until ``queue`` lists no waiting message (the relay acknowledged them all)."""

    async def empty() -> bool:
        return not await broker.get_scheduled(queue)

    await eventually(empty, TIMEOUT)


def test_relay_consumer_name_is_no_queue_name() -> None:
    relay = _Queue("p", "q" * 128).relay
    assert relay == "q" * 128 + "~eta"
    with pytest.raises(InvalidInputError):
        validate_queue(relay)


async def test_server_is_old(old_nats_server: NatsServer) -> None:
    async with broker_on(old_nats_server) as broker:
        assert broker.client.server_version < (2, 11, 0)
        assert not broker._schedules


# -- jobs ------------------------------------------------------------------------------------


async def test_job_with_eta_runs_after_it_as_attempt_1(old_nats_server: NatsServer) -> None:
    runs: list[tuple[datetime, int]] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append((datetime.now(timezone.utc), ctx.meta.attempt))

    async with server_on(old_nats_server) as server:
        server.register_task("t", handler, queue="eta", raw=True)
        eta = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        job_id = await server.enqueue(Job("t", queue="eta", eta=eta))
        assert [m.id for m in await server.get_scheduled("eta")] == [job_id]
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
    assert done.status is Status.SUCCESSFUL
    assert len(runs) == 1
    assert runs[0][0] >= eta - timedelta(seconds=EPSILON)
    assert runs[0][1] == 1
    assert done.meta.attempt == 1


async def test_backoff_retries_count_up_to_the_final_status(old_nats_server: NatsServer) -> None:
    """The defect this relay fixes: without it a retry with a backoff could not be
    enqueued, so the run came back every second with ``retried`` stuck at 0."""
    runs: list[tuple[float, int, int]] = []
    backoff = Backoff(initial=0.1, factor=2.0, jitter=False)

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append((time.time(), ctx.meta.retried, ctx.meta.attempt))
        raise ValueError(f"fails (run {len(runs)})")

    async with server_on(old_nats_server) as server:
        server.register_task("t", handler, queue="retries", raw=True)
        job_id = await server.enqueue(Job("t", queue="retries", max_retries=2, backoff=backoff))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert job_id in await server.get_failed()
        assert await server.get_scheduled("retries") == []
    assert [retried for _, retried, _ in runs] == [0, 1, 2]
    assert [attempt for *_, attempt in runs] == [1, 1, 1]  # each retry is a new message
    assert done.status is Status.FAILED
    assert done.meta.retried == 2
    assert done.meta.prev_error == "ValueError: fails (run 3)"
    for retry in (0, 1):  # each retry waited its backoff
        assert runs[retry + 1][0] - runs[retry][0] >= backoff.delay(retry) - EPSILON


# -- the broker ------------------------------------------------------------------------------


async def test_get_scheduled_lists_the_exact_eta_until_relayed(
    old_nats_server: NatsServer,
) -> None:
    queue = "listed"
    async with broker_on(old_nats_server) as broker:
        eta = time.time() + 0.3
        await broker.enqueue(envelope(queue, b"later", eta=eta))
        assert await broker.get_scheduled(queue) == [(eta, b"later")]
        assert await broker.get_pending(queue) == []
        async with consuming(broker, queue) as stream:
            assert await broker.get_scheduled(queue) == [(eta, b"later")]  # not due yet
            delivery = await receive(stream)
            assert time.time() >= eta - EPSILON
            assert (delivery.data, delivery.attempt) == (b"later", 1)
            await wait_until_scheduled_empty(broker, queue)
            await delivery.ack()
        await drained(broker)


async def test_nack_with_delay_comes_back_with_the_next_attempt(
    old_nats_server: NatsServer,
) -> None:
    queue = "nacked"
    async with broker_on(old_nats_server) as broker:
        await broker.enqueue(envelope(queue, b"job"))
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            for attempt, delay in ((1, 0.3), (2, 0.2)):
                assert delivery.attempt == attempt
                eta = time.time() + delay
                await delivery.nack(delay=delay)
                assert await broker.get_pending(queue) == []
                [(listed, data)] = await broker.get_scheduled(queue)
                assert data == b"job"
                assert listed == pytest.approx(eta, abs=0.05)
                delivery = await receive(stream)
                assert time.time() >= listed - EPSILON
            assert (delivery.data, delivery.attempt) == (b"job", 3)
            await delivery.ack()
            await wait_until_scheduled_empty(broker, queue)
        await drained(broker)


async def test_messages_due_together_come_in_eta_order(old_nats_server: NatsServer) -> None:
    queue = "order"
    now = time.time()
    offsets = [0.40, 0.10, 0.35, 0.20, 0.15, 0.30, 0.25, 0.05]
    async with broker_on(old_nats_server) as broker:
        await broker.enqueue_many(
            [envelope(queue, f"{offset:.2f}".encode(), eta=now + offset) for offset in offsets]
        )
        await anyio.sleep(max(0.0, now + max(offsets) - time.time()))  # all due now
        got = []
        async with consuming(broker, queue) as stream:
            for _ in offsets:
                delivery = await receive(stream)
                got.append(delivery.data)
                await delivery.ack()
        assert got == [f"{offset:.2f}".encode() for offset in sorted(offsets)]


async def test_two_brokers_relay_each_message_once(old_nats_server: NatsServer) -> None:
    prefix, queue, count = name(), "two", 30
    async with (
        broker_on(old_nats_server, prefix) as one,
        broker_on(old_nats_server, prefix, keep=True) as two,
    ):
        now = time.time()
        await one.enqueue_many(
            [envelope(queue, b"%d" % i, eta=now + 0.1 + 0.01 * i) for i in range(count)]
        )
        got = await take_all([one, two], queue, count)
        await wait_until_scheduled_empty(one, queue)
        # every copy was acknowledged: a second copy of any would still be stored
        await drained(one)
        assert sorted(got) == sorted(b"%d" % i for i in range(count))
        names = await one.js.api(f"CONSUMER.NAMES.{one.stream}")
        assert sorted(names["consumers"]) == [queue, f"{queue}~eta"]


async def test_relay_that_died_before_its_ack_leaves_no_duplicate(
    old_nats_server: NatsServer,
) -> None:
    """A relay published the copy of a due message and died before acknowledging it: the
    message comes back to the relay after the ack wait, and its copy is a duplicate."""
    queue = "crash"
    async with broker_on(old_nats_server, ack_wait=0.6) as broker:
        q = broker._queue(queue)
        eta = time.time() + 0.1
        await broker.enqueue(envelope(queue, b"once", eta=eta))
        await broker._ensure_relay(q)
        await anyio.sleep(max(0.0, eta - time.time()))
        # the relay that dies: it takes the message, publishes its copy, and stops there
        [held] = await broker.js.fetch(broker.stream, q.relay, 1, expires=TIMEOUT)
        await broker.publish_all([_relayed_copy(q, held)], "relaying")
        async with consuming(broker, queue) as stream:
            delivery = await receive(stream)
            assert (delivery.data, delivery.attempt) == (b"once", 1)
            # the live relay gets it after the ack wait, and only acknowledges it
            await wait_until_scheduled_empty(broker, queue)
            await delivery.ack()
            await drained(broker)
        delivered = (await broker.js.consumer_info(broker.stream, q.relay)).raw["delivered"]
        assert delivered["consumer_seq"] == 2  # the message went to a relay twice


# -- upgrading the server --------------------------------------------------------------------


async def test_upgrade_adopts_the_waiting_messages(tmp_path: Path) -> None:
    """Messages waiting for their ETA on 2.10 (put aside by its relay) become due messages
    or message schedules when the store runs on the current server, and the relay's
    consumer goes."""
    old, current = require_old_binary(), require_binary()
    nats = start_nats_server(directory=tmp_path, binary=old)
    prefix, queue = name(), "upgraded"
    try:
        async with broker_on(nats, prefix, keep=True) as broker:
            now = time.time()
            soon, later = now + 0.5, now + 0.9
            await broker.enqueue_many(
                [envelope(queue, b"later", eta=later), envelope(queue, b"soon", eta=soon)]
            )
            q = broker._queue(queue)
            await broker._ensure_relay(q)
            waiting = await broker._fetch_waiting(q)
            assert len(waiting) == 2
            await broker._relay_batch(q, waiting)  # neither is due: both put aside
        nats.stop()
        nats.binary = current
        nats.start()
        async with broker_on(nats, prefix) as broker:
            assert broker._schedules
            assert [data for _, data in await broker.get_scheduled(queue)] == [b"soon", b"later"]
            await anyio.sleep(max(0.0, soon - time.time()))  # adopted as due, "later" not
            async with consuming(broker, queue) as stream:
                for data, eta in ((b"soon", soon), (b"later", later)):
                    delivery = await receive(stream)
                    assert (delivery.data, delivery.attempt) == (data, 1)
                    assert time.time() >= eta - EPSILON
                    await delivery.ack()
            assert await broker.get_scheduled(queue) == []
            await drained(broker)
            with pytest.raises(ConsumerNotFoundError):
                await broker.js.consumer_info(broker.stream, q.relay)
    finally:
        nats.close()


@pytest.mark.parametrize("fault", ["connection", "lease"])
async def test_a_retry_whose_ack_failed_still_runs_through_the_relay(
    old_nats_server: NatsServer, fault: str
) -> None:
    """As ``test_server_retries.test_a_retry_whose_ack_failed_still_runs``, with a
    backoff: the retry waits for its ETA in the schedule relay."""
    async with broker_on(old_nats_server) as broker, results_on(old_nats_server) as results:
        failed, done, runs = await run_with_a_failed_retry_ack(
            broker, results, "q", fault, backoff=Backoff(initial=0.2, jitter=False)
        )
    assert len(failed) == 1
    assert done.status is Status.SUCCESSFUL
    assert runs == [0, 1]


async def test_a_job_ttl_is_refused_before_anything_is_stored(
    old_nats_server: NatsServer,
) -> None:
    """Per-job TTLs need per-key TTLs (nats-server 2.11+): on 2.10 the enqueue says so."""
    async with server_on(old_nats_server) as server:
        server.register_task("t", lambda payload, ctx: None, queue="ttl", raw=True)
        job = Job("t", queue="ttl", successful_ttl=60)
        with pytest.raises(InvalidInputError, match=r"2\.11"):
            await server.enqueue(job)
        with pytest.raises(JobNotFoundError):
            await server.get_job(job.id)
        assert await server.get_pending("ttl") == []
        follow_up = Job("t", queue="ttl", on_success=[Job("t", failed_ttl=5)])
        with pytest.raises(InvalidInputError, match="failed_ttl"):
            await server.enqueue(follow_up)
