"""The broker contract for message priorities, on every broker (the Redis Cluster and
nats-server 2.10 included) and both AnyIO backends: a due message of a higher priority is
delivered before every due message of a lower one, FIFO within a priority, and a message
keeps its priority when it waits for an ETA, is put back, or is given back."""

from __future__ import annotations

import time
from uuid import uuid4

import anyio
import pytest
from broker_support import consuming, receive

from tasqueue_anyio import InvalidInputError
from tasqueue_anyio.abc import Broker, Envelope

pytestmark = pytest.mark.anyio

TIMEOUT = 5.0


def message(queue: str, name: str, priority: int = 0, eta: float | None = None) -> Envelope:
    return Envelope(queue=queue, data=name.encode(), id=uuid4().hex, eta=eta, priority=priority)


def in_delivery_order(messages: list[Envelope]) -> list[bytes]:
    """Higher priority first, then enqueue order."""
    order = sorted(range(len(messages)), key=lambda i: (-messages[i].priority, i))
    return [messages[i].data for i in order]


async def wait_for_due(broker: Broker, queue: str) -> None:
    """Give a message whose ETA passed the time to become due: a server's scheduler may
    be late (NATS: up to ~0.25 s); on nats-server 2.10 a waiting message moves only when
    a consumer starts (its first thing), so the wait ends after a second there."""
    with anyio.move_on_after(1.0):
        while await broker.get_scheduled(queue):  # noqa: ASYNC110 (a broker's state)
            await anyio.sleep(0.05)


async def test_higher_priorities_first_fifo_within(broker: Broker, queue_name: str) -> None:
    priorities = [0, 3, 9, 3, 0, 9, 5, 1, 0, 5]
    messages = [message(queue_name, f"m{i}", p) for i, p in enumerate(priorities)]
    await broker.enqueue_many(messages[:5])
    for env in messages[5:]:
        await broker.enqueue(env)
    expected = in_delivery_order(messages)
    assert await broker.get_pending(queue_name) == expected
    counts = await broker.count(queue_name)
    assert counts.pending == len(messages)
    got = []
    async with consuming(broker, queue_name) as stream:
        for _ in messages:
            delivery = await receive(stream)
            got.append(delivery.data)
            await delivery.ack()
    assert got == expected
    assert await broker.get_pending(queue_name) == []
    assert (await broker.count(queue_name)).pending == 0


async def test_priority_is_checked(broker: Broker, queue_name: str) -> None:
    for bad in (-1, 10, True, 2.5):
        env = Envelope(queue=queue_name, data=b"x", id="a", priority=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="priority"):
            await broker.enqueue(env)
    assert await broker.get_pending(queue_name) == []  # nothing stored


async def test_a_late_high_priority_message_is_not_starved(
    broker: Broker, queue_name: str
) -> None:
    """A burst of priority-0 messages is being consumed; a priority-9 message enqueued
    after them comes within a few deliveries (what a consumer fetched ahead), not last."""
    burst = [message(queue_name, f"low{i}") for i in range(60)]
    await broker.enqueue_many(burst)
    got: list[bytes] = []
    async with consuming(broker, queue_name) as stream:
        for _ in range(3):
            delivery = await receive(stream)
            got.append(delivery.data)
            await delivery.ack()
        await broker.enqueue(message(queue_name, "urgent", 9))
        with anyio.fail_after(TIMEOUT):
            while b"urgent" not in got:
                delivery = await receive(stream)
                got.append(delivery.data)
                await delivery.ack()
    # the consumer may have had the next message or two in hand, no more
    assert got.index(b"urgent") <= 3 + 3, got


async def test_priority_kept_through_eta_and_put_back(broker: Broker, queue_name: str) -> None:
    eta = time.time() + 0.4
    await broker.enqueue_many(
        [
            message(queue_name, "plain-a"),
            message(queue_name, "later-high", 7, eta=eta),
            message(queue_name, "plain-b"),
        ]
    )
    assert [data for _, data in await broker.get_scheduled(queue_name)] == [b"later-high"]
    await anyio.sleep(max(0.0, eta - time.time()))
    await wait_for_due(broker, queue_name)

    async def pending_is_high_first() -> bool:
        # (a NATS consumer gives a message it fetched ahead to the back of its queue)
        pending = await broker.get_pending(queue_name)
        return pending[:1] == [b"later-high"] and sorted(pending[1:]) == [b"plain-a", b"plain-b"]

    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        assert first.data == b"later-high"
        await first.nack()  # back to the front of its priority
    with anyio.fail_after(TIMEOUT):
        while not await pending_is_high_first():  # noqa: ASYNC110 (a broker's state)
            await anyio.sleep(0.05)
    async with consuming(broker, queue_name) as stream:
        again = await receive(stream)
        assert again.data == b"later-high"
        assert again.attempt == 2
        await again.nack(delay=0.2)  # waits, then comes back with its priority
    await anyio.sleep(0.2)
    await wait_for_due(broker, queue_name)
    got = {}
    async with consuming(broker, queue_name) as stream:
        for _ in range(3):
            delivery = await receive(stream)
            got[delivery.data] = delivery.attempt
            await delivery.ack()
    # (its order after a delayed put-back is the first test's; on nats-server 2.10 a
    # relay stopped while it held the message gives it back only after its ack wait)
    assert got[b"later-high"] == 3
    assert sorted(got) == [b"later-high", b"plain-a", b"plain-b"]


async def test_purge_takes_priority_messages_too(broker: Broker, queue_name: str) -> None:
    await broker.enqueue_many(
        [message(queue_name, "p0"), message(queue_name, "p4", 4), message(queue_name, "p8", 8)]
    )
    assert await broker.purge(queue_name) == [b"p8", b"p4", b"p0"]
    assert await broker.get_pending(queue_name) == []
    assert (await broker.count(queue_name)).pending == 0
