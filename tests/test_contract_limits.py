"""The broker contract of queue limits (:meth:`Broker.acquire_permit`), on every broker
(the Redis Cluster and nats-server 2.10 included) and both AnyIO backends: starts per
sliding window, running slots held until released or until their lease runs out, and a
release announced on the limit channel."""

from __future__ import annotations

import time

import anyio
import pytest

from tasqueue_anyio.abc import Broker, QueueLimits, limit_channel

pytestmark = pytest.mark.anyio

LEASE = 30.0


async def test_starts_per_window(broker: Broker, queue_name: str) -> None:
    limits = QueueLimits(runs=3, per=0.6)
    began = time.monotonic()
    for n in range(3):
        assert await broker.acquire_permit(queue_name, limits, f"t{n}", LEASE) == 0
    wait = await broker.acquire_permit(queue_name, limits, "t3", LEASE)
    assert 0 < wait <= 0.6 + 0.05
    assert await broker.acquire_permit(queue_name, limits, "t4", LEASE) > 0  # nothing taken
    await anyio.sleep(wait + 0.02)
    assert await broker.acquire_permit(queue_name, limits, "t3", LEASE) == 0
    assert time.monotonic() - began >= 0.6 * 0.9
    # other queues have their own window
    assert await broker.acquire_permit(queue_name + "-other", limits, "t0", LEASE) == 0


async def test_running_slots_are_released_and_announced(
    broker: Broker, queue_name: str
) -> None:
    limits = QueueLimits(running=2)
    announced = anyio.Event()
    async with broker.subscribe(limit_channel(queue_name), lambda data: announced.set()):
        assert await broker.acquire_permit(queue_name, limits, "a", LEASE) == 0
        assert await broker.acquire_permit(queue_name, limits, "b", LEASE) == 0
        wait = await broker.acquire_permit(queue_name, limits, "c", LEASE)
        assert 0 < wait <= 1.0  # a release is announced; look again within a second
        await broker.release_permit(queue_name, "a")
        with anyio.fail_after(5):
            await announced.wait()
        assert await broker.acquire_permit(queue_name, limits, "c", LEASE) == 0
        assert await broker.acquire_permit(queue_name, limits, "d", LEASE) > 0
        await broker.release_permit(queue_name, "never-held")  # nothing happens


async def test_a_slot_not_renewed_expires(broker: Broker, queue_name: str) -> None:
    limits = QueueLimits(running=1)
    assert await broker.acquire_permit(queue_name, limits, "kept", 0.6) == 0
    await anyio.sleep(0.3)
    await broker.renew_permits(queue_name, ["kept"], 0.6)
    await anyio.sleep(0.4)  # 0.7 s after the take, 0.4 s after the renewal: held
    assert await broker.acquire_permit(queue_name, limits, "next", LEASE) > 0
    await anyio.sleep(0.4)  # not renewed again: its worker died
    with anyio.fail_after(5):
        while await broker.acquire_permit(queue_name, limits, "next", LEASE) > 0:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    await broker.renew_permits(queue_name, ["kept"], LEASE)  # gone: stays gone
    assert await broker.acquire_permit(queue_name, limits, "third", LEASE) > 0
