"""The broker contract, written against :mod:`tasqueue_anyio.abc` only.

Runs unchanged against every backend in ``conftest.BROKER_FACTORIES``. Time-based checks
use short real delays and assert lower bounds only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import attrs
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from broker_support import consuming, envelope, receive

from tasqueue_anyio._exceptions import InvalidInputError
from tasqueue_anyio.abc import Broker, Delivery, Envelope

pytestmark = pytest.mark.anyio

#: how long any single wait in these tests may take before the test fails
TIMEOUT = 5.0
#: slack for clock granularity when checking that a delay was respected
EPSILON = 0.01


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait (polling) until ``predicate()`` holds, failing after :data:`TIMEOUT`.

    For states no event announces (a stream's statistics); polling, unlike
    ``anyio.wait_all_tasks_blocked``, also works while a backend waits on a socket.
    """
    with anyio.fail_after(TIMEOUT):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_enqueue_consume_fifo(broker: Broker, queue_name: str) -> None:
    expected = [f"m{i}".encode() for i in range(5)]
    for data in expected:
        await broker.enqueue(envelope(queue_name, data))
    async with consuming(broker, queue_name) as stream:
        got = []
        for _ in expected:
            delivery = await receive(stream)
            assert delivery.queue == queue_name
            assert delivery.attempt == 1
            got.append(delivery.data)
            await delivery.ack()
    assert got == expected


async def test_enqueue_many_order_and_count(broker: Broker, queue_name: str) -> None:
    expected = [f"m{i}".encode() for i in range(50)]
    await broker.enqueue_many([envelope(queue_name, data) for data in expected])
    assert await broker.get_pending(queue_name) == expected
    async with consuming(broker, queue_name) as stream:
        got = []
        for _ in expected:
            delivery = await receive(stream)
            got.append(delivery.data)
            await delivery.ack()
    assert got == expected
    assert await broker.get_pending(queue_name) == []


async def test_enqueue_many_spans_queues(broker: Broker, queue_name: str) -> None:
    other = f"{queue_name}-other"
    await broker.enqueue_many(
        [envelope(queue_name, b"a1"), envelope(other, b"b1"), envelope(queue_name, b"a2")]
    )
    assert await broker.get_pending(queue_name) == [b"a1", b"a2"]
    assert await broker.get_pending(other) == [b"b1"]


async def test_two_consumers_share_messages(broker: Broker, queue_name: str) -> None:
    expected = {f"m{i}".encode() for i in range(100)}
    received: list[bytes] = []
    all_received = anyio.Event()

    async def collect(stream: MemoryObjectReceiveStream[Delivery]) -> None:
        async for delivery in stream:
            received.append(delivery.data)
            await delivery.ack()
            if len(received) == len(expected):
                all_received.set()
            await anyio.lowlevel.checkpoint()

    async with (
        consuming(broker, queue_name) as stream1,
        consuming(broker, queue_name) as stream2,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(collect, stream1)
        tg.start_soon(collect, stream2)
        await broker.enqueue_many([envelope(queue_name, data) for data in sorted(expected)])
        with anyio.fail_after(TIMEOUT):
            await all_received.wait()
        tg.cancel_scope.cancel()
    assert len(received) == len(expected)
    assert set(received) == expected
    assert await broker.get_pending(queue_name) == []


async def test_ack_removes(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(envelope(queue_name, b"first"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert delivery.data == b"first"
        await delivery.ack()
        await delivery.ack()  # settling twice does nothing
        assert await broker.get_pending(queue_name) == []
        # the next delivery is the marker, not the acked message again
        await broker.enqueue(envelope(queue_name, b"marker"))
        delivery = await receive(stream)
        assert delivery.data == b"marker"
        await delivery.ack()
    assert await broker.get_pending(queue_name) == []


async def test_held_message_not_pending(broker: Broker, queue_name: str) -> None:
    await broker.enqueue_many([envelope(queue_name, b"a"), envelope(queue_name, b"b")])
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert delivery.data == b"a"
        await wait_until(lambda: stream.statistics().tasks_waiting_send > 0)
        assert b"a" not in await broker.get_pending(queue_name)
        await delivery.ack()
        delivery = await receive(stream)
        await delivery.ack()


async def test_nack_redelivers_with_next_attempt(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(envelope(queue_name, b"job"))
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        assert first.attempt == 1
        await first.nack()
        await first.nack()  # settling twice does nothing
        second = await receive(stream)
        assert second.data == b"job"
        assert second.attempt == 2
        await second.nack()
        third = await receive(stream)
        assert third.attempt == 3
        await third.ack()
    assert await broker.get_pending(queue_name) == []


async def test_an_abandoned_delivery_comes_back(broker: Broker, queue_name: str) -> None:
    # What a worker does when its nack failed: the delivery stays referenced (by a logged
    # traceback), yet it is not renewed any more, and its message comes back.
    await broker.enqueue(envelope(queue_name, b"job"))
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        first.abandon()
        first.abandon()  # twice does nothing
        renew = getattr(broker, "renew_leases", None)
        if renew is not None:
            await renew()  # the next renewal gives it back
        second = await receive(stream)
        assert (second.data, second.attempt) == (b"job", 2)
        await first.ack()  # settling the abandoned delivery does nothing
        assert (await broker.count(queue_name)).in_flight == 1
        await second.ack()
    assert await broker.get_pending(queue_name) == []
    assert (await broker.count(queue_name)).in_flight == 0


async def test_nack_with_delay(broker: Broker, queue_name: str) -> None:
    delay = 0.2
    await broker.enqueue(envelope(queue_name, b"job"))
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        start = anyio.current_time()
        await first.nack(delay=delay)
        assert await broker.get_pending(queue_name) == []
        second = await receive(stream)
        assert anyio.current_time() - start >= delay - EPSILON
        assert second.data == b"job"
        assert second.attempt == 2
        await second.ack()


async def test_ack_enqueues(broker: Broker, queue_name: str) -> None:
    other = f"{queue_name}-other"
    await broker.enqueue(envelope(queue_name, b"first"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        await delivery.ack(
            enqueue=[
                envelope(queue_name, b"next1"),
                envelope(other, b"x"),
                envelope(queue_name, b"next2"),
            ]
        )
        assert await broker.get_pending(other) == [b"x"]
        got = [(await receive(stream)).data, (await receive(stream)).data]
    assert got == [b"next1", b"next2"]


async def test_ack_enqueues_scheduled(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(envelope(queue_name, b"first"))
    eta = time.time() + 60
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        await delivery.ack(enqueue=[envelope(queue_name, b"retry", eta=eta)])
    scheduled = await broker.get_scheduled(queue_name)
    assert [data for _, data in scheduled] == [b"retry"]
    assert scheduled[0][0] == pytest.approx(eta, abs=1e-3)
    assert await broker.get_pending(queue_name) == []


async def test_dead_letter(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(envelope(queue_name, b"bad"))
    before = time.time()
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        await delivery.dead_letter("does not decode")
        await delivery.ack()  # already settled: does nothing
        assert await broker.get_pending(queue_name) == []
        await broker.enqueue(envelope(queue_name, b"marker"))
        marker = await receive(stream)
        assert marker.data == b"marker"
        await marker.ack()
    dead = await broker.get_dead_letters(queue_name)
    assert len(dead) == 1
    assert dead[0].queue == queue_name
    assert dead[0].data == b"bad"
    assert dead[0].reason == "does not decode"
    assert dead[0].at >= before - 1
    assert await broker.get_dead_letters(f"{queue_name}-other") == []


async def test_eta_scheduling(broker: Broker, queue_name: str) -> None:
    start = anyio.current_time()
    now = time.time()
    delays = {b"c": 0.5, b"a": 0.3, b"b": 0.4}
    etas = {data: now + delay for data, delay in delays.items()}
    await broker.enqueue_many([envelope(queue_name, data, eta=eta) for data, eta in etas.items()])
    await broker.enqueue(envelope(queue_name, b"late", eta=now - 10))  # in the past: due now

    scheduled = await broker.get_scheduled(queue_name)
    assert [data for _, data in scheduled] == [b"a", b"b", b"c"]
    assert [eta for eta, _ in scheduled] == pytest.approx([etas[b"a"], etas[b"b"], etas[b"c"]])
    assert await broker.get_pending(queue_name) == [b"late"]

    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert delivery.data == b"late"
        await delivery.ack()
        for expected in (b"a", b"b", b"c"):
            delivery = await receive(stream)
            assert delivery.data == expected
            assert anyio.current_time() - start >= delays[expected] - EPSILON
            assert time.time() >= etas[expected] - EPSILON
            await delivery.ack()
    assert await broker.get_scheduled(queue_name) == []
    assert await broker.get_pending(queue_name) == []


async def test_due_messages_fifo_before_later_eta(broker: Broker, queue_name: str) -> None:
    now = time.time()
    await broker.enqueue_many(
        [
            envelope(queue_name, b"later", eta=now + 60),
            envelope(queue_name, b"m1"),
            envelope(queue_name, b"m2"),
        ]
    )
    assert await broker.get_pending(queue_name) == [b"m1", b"m2"]
    assert [data for _, data in await broker.get_scheduled(queue_name)] == [b"later"]


async def test_cancelled_hand_over_loses_nothing(broker: Broker, queue_name: str) -> None:
    await broker.enqueue_many([envelope(queue_name, b"m1"), envelope(queue_name, b"m2")])
    send_stream, receive_stream = anyio.create_memory_object_stream[Delivery](0)
    with receive_stream:
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.consume, queue_name, send_stream)
            # consume took a message and waits for someone to receive it
            await wait_until(lambda: receive_stream.statistics().tasks_waiting_send > 0)
            tg.cancel_scope.cancel()
        # consume closed its send stream when it returned
        with pytest.raises(anyio.EndOfStream):
            receive_stream.receive_nowait()

    assert sorted(await broker.get_pending(queue_name)) == [b"m1", b"m2"]
    async with consuming(broker, queue_name) as stream:
        got = []
        for _ in range(2):
            delivery = await receive(stream)
            # (whether the withdrawn hand-over counts as a delivery is the backend's call)
            got.append(delivery.data)
            await delivery.ack()
    assert sorted(got) == [b"m1", b"m2"]
    assert await broker.get_pending(queue_name) == []


async def test_consume_closes_stream_on_cancel_when_idle(broker: Broker, queue_name: str) -> None:
    send_stream, receive_stream = anyio.create_memory_object_stream[Delivery](0)
    with receive_stream:
        async with anyio.create_task_group() as tg:
            tg.start_soon(broker.consume, queue_name, send_stream)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        with pytest.raises(anyio.EndOfStream):
            receive_stream.receive_nowait()


class Collector:
    """A subscriber callback that records messages and signals when it has ``n``."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._want = 0
        self._event: anyio.Event | None = None

    def __call__(self, data: bytes) -> None:
        self.messages.append(data)
        if self._event is not None and len(self.messages) >= self._want:
            self._event.set()

    async def wait_for(self, n: int) -> list[bytes]:
        if len(self.messages) < n:
            self._want, self._event = n, anyio.Event()
            with anyio.fail_after(TIMEOUT):
                await self._event.wait()
        return self.messages[:n]


async def test_publish_subscribe(broker: Broker, queue_name: str) -> None:
    channel = f"events-{queue_name}"
    messages = [f"e{i}".encode() for i in range(10)]
    sub1, sub2 = Collector(), Collector()
    async with broker.subscribe(channel, sub1), broker.subscribe(channel, sub2):
        await broker.publish(f"{channel}-other", b"elsewhere")
        for data in messages:
            await broker.publish(channel, data)
        assert await sub1.wait_for(len(messages)) == messages
        assert await sub2.wait_for(len(messages)) == messages

    sub1, sub2 = Collector(), Collector()
    async with broker.subscribe(channel, sub1):
        async with broker.subscribe(channel, sub2):
            await broker.publish(channel, b"both")
            assert await sub2.wait_for(1) == [b"both"]
        await broker.publish(channel, b"after")  # sub2 has left
        assert await sub1.wait_for(2) == [b"both", b"after"]
        # a marker sent after "after" reaches sub1, so "after" had its chance to reach sub2
        await broker.publish(channel, b"marker")
        assert await sub1.wait_for(3) == [b"both", b"after", b"marker"]
        assert sub2.messages == [b"both"]

    # publishing with no subscriber is fine; a later subscriber sees only later messages
    await broker.publish(channel, b"nobody")
    sub3 = Collector()
    async with broker.subscribe(channel, sub3):
        await broker.publish(channel, b"fresh")
        assert await sub3.wait_for(1) == [b"fresh"]
    assert sub3.messages == [b"fresh"]


async def test_raising_subscriber_does_not_end_the_subscription(
    broker: Broker, queue_name: str
) -> None:
    channel = f"events-{queue_name}"
    calls: list[bytes] = []

    def bad(data: bytes) -> None:
        calls.append(data)
        raise RuntimeError("subscriber bug")

    good = Collector()
    async with broker.subscribe(channel, bad), broker.subscribe(channel, good):
        await broker.publish(channel, b"1")
        await broker.publish(channel, b"2")
        assert await good.wait_for(2) == [b"1", b"2"]
    assert calls == [b"1", b"2"]


async def test_reenqueue_of_an_existing_id_stores_nothing(broker: Broker, queue_name: str) -> None:
    """Enqueueing a message whose id has a copy on the broker (due, waiting for its ETA,
    held by a worker, or put back) stores nothing: a worker re-enqueues a retry it cannot
    tell was enqueued (its broker may have lost the ack that carried it) by its fixed id.
    Once the copy is gone (acked), the id may be enqueued again."""
    due = Envelope(queue=queue_name, id="job-a/1", data=b"a1")
    later = Envelope(queue=queue_name, id="job-b/1", data=b"b1", eta=time.time() + 60)
    await broker.enqueue_many([due, later])
    await broker.enqueue_many([due, later])
    assert await broker.get_pending(queue_name) == [b"a1"]
    assert [data for _, data in await broker.get_scheduled(queue_name)] == [b"b1"]
    # an ETA that came due: the copy moved to the queue, still the same message
    soon = Envelope(queue=queue_name, id="job-c/1", data=b"c1", eta=time.time() + 0.3)
    await broker.enqueue(soon)
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        assert first.data == b"a1"
        await broker.enqueue(due)  # held by a worker
        fired = await receive(stream)
        assert fired.data == b"c1"
        await broker.enqueue(soon)  # fired, held
        await broker.enqueue(attrs.evolve(soon, eta=None))
        assert await broker.get_pending(queue_name) == []
        await first.ack()
        await fired.ack()
        # an unconfirmed ack (NATS's default) takes effect when the server reads it:
        # the copy is gone once nothing is in flight
        with anyio.fail_after(10):
            while (await broker.count(queue_name)).in_flight:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        await broker.enqueue(due)  # acked: a new message
        again = await receive(stream)
        assert again.data == b"a1"
        assert again.attempt == 1
        await again.nack()  # put back (on some brokers as a copy): the same message
        await broker.enqueue(due)
        back = await receive(stream)
        assert back.data == b"a1"
        assert back.attempt == 2
        await back.ack()
    assert await broker.get_pending(queue_name) == []
    assert [data for _, data in await broker.get_scheduled(queue_name)] == [b"b1"]


async def test_count_after_a_known_mix(broker: Broker, queue_name: str) -> None:
    empty = await broker.count(queue_name)
    assert (empty.pending, empty.scheduled, empty.in_flight, empty.dead) == (0, 0, 0, 0)
    later = time.time() + 3600
    await broker.enqueue_many(
        [envelope(queue_name, b"dead"), *(envelope(queue_name, b"due%d" % i) for i in range(3))]
    )
    await broker.enqueue_many([envelope(queue_name, b"eta%d" % i, eta=later) for i in range(2)])
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        assert first.data == b"dead"
        await first.dead_letter("does not decode")
        held = await receive(stream)
        counts = await broker.count(queue_name)
        # a consumer may hold more than it handed over (fetched ahead): in flight too
        assert counts.in_flight >= 1
        assert counts.pending + counts.in_flight == 3
        assert (counts.scheduled, counts.dead) == (2, 1)
        await held.ack()
    # what the consumer held and did not hand over went back (a message given back is
    # counted again a moment after it left the in-flight count: on a loaded machine,
    # nats-server 2.10 showed it in neither for one read)
    with anyio.fail_after(10):
        while (counts := await broker.count(queue_name)).in_flight or counts.pending < 2:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (2, 2, 0, 1)
    assert counts.pending == len(await broker.get_pending(queue_name))
    assert counts.scheduled == len(await broker.get_scheduled(queue_name))
    assert counts.dead == len(await broker.get_dead_letters(queue_name))


async def test_count_of_an_unknown_queue_and_a_bad_name(broker: Broker, queue_name: str) -> None:
    counts = await broker.count(f"{queue_name}-never-used")
    assert (counts.pending, counts.scheduled, counts.in_flight, counts.dead) == (0, 0, 0, 0)
    with pytest.raises(InvalidInputError):
        await broker.count("bad queue name")


async def test_purge_removes_what_no_worker_holds(broker: Broker, queue_name: str) -> None:
    assert await broker.purge(queue_name) == []
    await broker.enqueue(envelope(queue_name, b"done"))
    async with consuming(broker, queue_name) as stream:
        await (await receive(stream)).ack()  # a consumed message is not purged
    later = time.time() + 3600
    await broker.enqueue_many([envelope(queue_name, b"due1"), envelope(queue_name, b"due2")])
    await broker.enqueue_many(
        [
            envelope(queue_name, b"eta2", eta=later + 2),
            envelope(queue_name, b"eta1", eta=later + 1),
        ]
    )
    purged = await broker.purge(queue_name)
    assert purged == [b"due1", b"due2", b"eta1", b"eta2"]
    counts = await broker.count(queue_name)
    assert (counts.pending, counts.scheduled, counts.in_flight) == (0, 0, 0)
    assert await broker.get_pending(queue_name) == []
    assert await broker.get_scheduled(queue_name) == []
    assert await broker.purge(queue_name) == []
    # the queue works on: a purged message's id may be enqueued again
    await broker.enqueue(envelope(queue_name, b"after"))
    assert await broker.get_pending(queue_name) == [b"after"]


async def test_purge_leaves_held_messages(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(envelope(queue_name, b"held"))
    async with consuming(broker, queue_name) as stream:
        held = await receive(stream)
        assert await broker.purge(queue_name) == []
        await held.ack()  # its worker settles it: no error
    assert await broker.get_pending(queue_name) == []


async def test_remove_dead_letters_by_id_and_all(broker: Broker, queue_name: str) -> None:
    await broker.enqueue_many([envelope(queue_name, b"bad%d" % i) for i in range(3)])
    async with consuming(broker, queue_name) as stream:
        for _ in range(3):
            delivery = await receive(stream)
            await delivery.dead_letter("does not decode")
    letters = await broker.get_dead_letters(queue_name)
    assert [d.data for d in letters] == [b"bad0", b"bad1", b"bad2"]
    assert all(d.id for d in letters)
    assert len({d.id for d in letters}) == 3
    removed = await broker.remove_dead_letters(queue_name, [letters[1].id, "no-such-id"])
    assert [d.data for d in removed] == [b"bad1"]
    assert [d.data for d in await broker.get_dead_letters(queue_name)] == [b"bad0", b"bad2"]
    assert await broker.remove_dead_letters(queue_name, [letters[1].id]) == []  # gone
    rest = await broker.remove_dead_letters(queue_name)
    assert [d.data for d in rest] == [b"bad0", b"bad2"]
    assert await broker.get_dead_letters(queue_name) == []
    assert (await broker.count(queue_name)).dead == 0
