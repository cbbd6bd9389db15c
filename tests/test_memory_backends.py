"""Behaviour of the memory backends beyond the shared contract."""

from __future__ import annotations

import gc
import weakref

import anyio
import pytest
from broker_support import consuming, envelope, receive

from tasqueue_anyio._exceptions import BrokerError, JobNotFoundError, ResultNotFoundError
from tasqueue_anyio.abc import Delivery, JobRecord
from tasqueue_anyio.brokers.memory import MemoryBroker, MemoryDelivery
from tasqueue_anyio.results.memory import MemoryResults

pytestmark = pytest.mark.anyio

TIMEOUT = 5.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- broker ---------------------------------------------------------------------------


async def test_abandoned_delivery_comes_back(queue_name: str) -> None:
    broker = MemoryBroker(reclaim_interval=0.05)
    await broker.enqueue(envelope(queue_name, b"job"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert delivery.attempt == 1
        ref = weakref.ref(delivery)
        del delivery
        gc.collect()
        assert ref() is None
        # the idle consumer reclaims it within reclaim_interval, without any other wake-up
        again = await receive(stream)
        assert again.data == b"job"
        assert again.attempt == 2
        await again.ack()
    assert await broker.get_pending(queue_name) == []


async def test_abandoned_delivery_pending_at_once(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue_many([envelope(queue_name, b"a"), envelope(queue_name, b"b")])
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert delivery.data == b"a"
        await anyio.wait_all_tasks_blocked()  # the consumer now holds b for hand-over
    # the consumer gave b back to the front; a is held by `delivery`
    assert await broker.get_pending(queue_name) == [b"b"]
    del delivery
    gc.collect()
    # an abandoned message goes back to the front, before b
    assert await broker.get_pending(queue_name) == [b"a", b"b"]


async def test_settled_delivery_does_not_come_back(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue(envelope(queue_name, b"job"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        await delivery.ack()
        del delivery
        gc.collect()
    assert await broker.get_pending(queue_name) == []


async def test_nack_without_delay_goes_to_front(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue_many([envelope(queue_name, m) for m in (b"a", b"b", b"c")])
    async with consuming(broker, queue_name) as stream:
        first = await receive(stream)
        await anyio.wait_all_tasks_blocked()  # the consumer is handing over b already
        await first.nack()
        assert await broker.get_pending(queue_name) == [b"a", b"c"]
        got = []
        for _ in range(3):
            delivery = await receive(stream)
            got.append((delivery.data, delivery.attempt))
            await delivery.ack()
    assert got == [(b"b", 1), (b"a", 2), (b"c", 1)]


async def test_cancelled_hand_over_goes_back_to_front(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue_many([envelope(queue_name, b"m1"), envelope(queue_name, b"m2")])
    async with consuming(broker, queue_name):
        await anyio.wait_all_tasks_blocked()
        assert await broker.get_pending(queue_name) == [b"m2"]
    assert await broker.get_pending(queue_name) == [b"m1", b"m2"]
    # a hand-over that did not happen is not counted as a delivery
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert (delivery.data, delivery.attempt) == (b"m1", 1)
        await delivery.ack()


async def test_consume_returns_when_receivers_close(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue(envelope(queue_name, b"job"))
    send_stream, receive_stream = anyio.create_memory_object_stream[Delivery](0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.consume, queue_name, send_stream)
        await anyio.wait_all_tasks_blocked()
        receive_stream.close()
    assert await broker.get_pending(queue_name) == [b"job"]


async def test_withdrawn_delivery_settles_if_not_redelivered(queue_name: str) -> None:
    # a hand-over that raised although the receiver got the delivery (a cancellation
    # racing the hand-over on asyncio) is simulated by withdrawing a received delivery
    broker = MemoryBroker()
    await broker.enqueue_many([envelope(queue_name, b"a"), envelope(queue_name, b"b")])
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert isinstance(delivery, MemoryDelivery)
        await anyio.wait_all_tasks_blocked()  # the consumer is handing over b
        delivery._withdraw()
        assert await broker.get_pending(queue_name) == [b"a"]
        await delivery.ack()  # a is still waiting: taken back and removed
        assert await broker.get_pending(queue_name) == []
        after = await receive(stream)
        assert after.data == b"b"
        await after.ack()
    assert await broker.get_pending(queue_name) == []


async def test_withdrawn_delivery_redelivered_refuses_ack(queue_name: str) -> None:
    broker = MemoryBroker()
    await broker.enqueue(envelope(queue_name, b"a"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        assert isinstance(delivery, MemoryDelivery)
        delivery._withdraw()
        again = await receive(stream)
        assert (again.data, again.attempt) == (b"a", 1)
        with pytest.raises(BrokerError):
            await delivery.ack()
        await delivery.nack()  # settled by the failed ack: nothing happens
        await again.ack()
    assert await broker.get_pending(queue_name) == []


def test_broker_outlives_event_loops(queue_name: str) -> None:
    broker = MemoryBroker()

    async def consume_one(data: bytes) -> None:
        async with consuming(broker, queue_name) as stream:
            await anyio.wait_all_tasks_blocked()  # the consumer waits for work first
            await broker.enqueue(envelope(queue_name, data))
            delivery = await receive(stream)
            assert delivery.data == data
            await delivery.ack()
            await anyio.wait_all_tasks_blocked()  # the consumer waits for work, idle

    anyio.run(consume_one, b"first", backend="asyncio")
    anyio.run(consume_one, b"second", backend="asyncio")
    anyio.run(consume_one, b"third", backend="trio")
    anyio.run(consume_one, b"fourth", backend="trio")
    anyio.run(consume_one, b"fifth", backend="asyncio")


async def test_injected_wall_clock(queue_name: str) -> None:
    clock = FakeClock(1_000.0)
    broker = MemoryBroker(clock=clock)
    await broker.enqueue(envelope(queue_name, b"job", eta=1_060.0))
    await broker.enqueue(envelope(queue_name, b"due", eta=999.0))
    assert await broker.get_scheduled(queue_name) == [(1_060.0, b"job")]
    assert await broker.get_pending(queue_name) == [b"due"]
    async with consuming(broker, queue_name) as stream:
        due = await receive(stream)
        assert due.data == b"due"
        await due.ack()
        await anyio.wait_all_tasks_blocked()  # the consumer sleeps until the ETA...
        clock.now = 1_060.0
        broker.wake_consumers(queue_name)  # ...as read before the clock moved
        delivery = await receive(stream)
        assert delivery.data == b"job"

        await delivery.nack(delay=30)
        assert await broker.get_scheduled(queue_name) == [(1_090.0, b"job")]
        clock.now = 1_090.0
        broker.wake_consumers()
        delivery = await receive(stream)
        assert delivery.attempt == 2
        clock.now = 1_100.0
        await delivery.dead_letter("testing")
    [dead] = await broker.get_dead_letters(queue_name)
    assert dead.at == 1_100.0
    assert dead.reason == "testing"


async def test_scheduled_ties_keep_enqueue_order(queue_name: str) -> None:
    clock = FakeClock(0.0)
    broker = MemoryBroker(clock=clock)
    await broker.enqueue_many([envelope(queue_name, f"m{i}".encode(), eta=5.0) for i in range(5)])
    expected = [f"m{i}".encode() for i in range(5)]
    assert [data for _, data in await broker.get_scheduled(queue_name)] == expected
    clock.now = 5.0
    assert await broker.get_pending(queue_name) == expected
    assert await broker.get_scheduled(queue_name) == []


async def test_publish_calls_subscribers_inline(queue_name: str) -> None:
    broker = MemoryBroker()
    got: list[bytes] = []
    async with broker.subscribe(queue_name, got.append):
        await broker.publish(queue_name, b"x")
        assert got == [b"x"]  # before any checkpoint: delivered inline
    await broker.publish(queue_name, b"y")
    assert got == [b"x"]


# -- results --------------------------------------------------------------------------


def record(status: str) -> JobRecord:
    return JobRecord(status=status, data=b"job")


async def test_results_expiry_with_injected_clock() -> None:
    clock = FakeClock(0.0)
    results = MemoryResults(job_ttl=10, result_ttl=5, clock=clock)
    await results.set_jobs({"a": record("processing"), "b": record("processing")})
    await results.set_result("a", b"r")
    assert await results.update_job("b", record("failed"), expect={"processing"})

    clock.now = 4.9
    assert await results.get_result("a") == b"r"
    clock.now = 5.0
    with pytest.raises(ResultNotFoundError):
        await results.get_result("a")
    assert await results.get_job("a") == record("processing")

    # a write restarts the time to live
    assert await results.update_job("a", record("successful"), expect={"processing"})
    assert await results.get_success() == ["a"]
    assert await results.get_failed() == ["b"]

    clock.now = 10.0  # b expires, a (written at 5) lives until 15
    with pytest.raises(JobNotFoundError):
        await results.get_job("b")
    assert await results.get_failed() == []
    assert not await results.update_job("b", record("failed"), expect={"failed"})
    with pytest.raises(JobNotFoundError):
        await results.request_cancel("b")
    assert await results.get_success() == ["a"]

    clock.now = 15.0
    with pytest.raises(JobNotFoundError):
        await results.get_job("a")
    assert await results.get_success() == []
    # expired state counts as missing: the job may start afresh
    assert await results.start_job("a", record("processing")) is None
    assert await results.get_job("a") == record("processing")


async def test_results_expiry_frees_memory() -> None:
    clock = FakeClock(0.0)
    results = MemoryResults(job_ttl=1, result_ttl=1, clock=clock)
    await results.set_jobs({f"j{i}": record("queued") for i in range(100)})
    for i in range(100):
        await results.set_result(f"j{i}", b"r")
    clock.now = 2.0
    await results.set_jobs({"fresh": record("queued")})  # any operation purges
    await results.set_result("fresh", b"r")
    assert len(results._jobs._data) == 1
    assert len(results._results._data) == 1


async def test_results_without_ttl_keep_everything() -> None:
    clock = FakeClock(0.0)
    results = MemoryResults(clock=clock)
    await results.set_jobs({"a": record("queued")})
    await results.set_result("a", b"r")
    clock.now = 1e12
    assert await results.get_job("a") == record("queued")
    assert await results.get_result("a") == b"r"


async def test_refinished_job_moves_to_end_of_listing() -> None:
    results = MemoryResults()
    await results.set_jobs({i: record("processing") for i in "abc"})
    for i in "abc":
        assert await results.update_job(i, record("successful"), expect={"processing"})
    assert await results.update_job("a", record("successful"), expect={"successful"})
    assert await results.get_success() == ["b", "c", "a"]
    assert await results.update_job("b", record("failed"), expect={"successful"})
    assert await results.get_success() == ["c", "a"]
    assert await results.get_failed() == ["b"]
