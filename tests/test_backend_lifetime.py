"""A networked backend shared by several tasks: its connections and task group belong to
the task that opened it, which must leave it last (tasqueue_anyio/_lifetime.py).

Both orders of exit, for the Redis and NATS brokers and results stores, on asyncio and
Trio. (The memory backends own no connections or tasks: entering them does nothing.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import uuid4

import anyio
import pytest
from nats_server import NatsServer
from redis_server import RedisServer
from server_support import TIMEOUT, wait_event

from tasqueue_anyio._lifetime import CountedLifetime
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.nats import NatsResults
from tasqueue_anyio.results.redis import RedisResults

pytestmark = pytest.mark.anyio

Use = Callable[[CountedLifetime], Awaitable[object]]


async def use_broker(backend: CountedLifetime) -> object:
    assert isinstance(backend, (RedisBroker, NatsBroker))
    return await backend.get_pending("default")


async def use_results(backend: CountedLifetime) -> object:
    assert isinstance(backend, (RedisResults, NatsResults))
    return await backend.get_schedules()


@pytest.fixture(params=["redis-broker", "redis-results", "nats-broker", "nats-results"])
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def make(kind: str, request: pytest.FixtureRequest) -> tuple[CountedLifetime, Use]:
    """A closed backend of ``kind`` under a name of its own, and a call that uses it."""
    prefix = f"t{uuid4().hex[:12]}"
    if kind.startswith("redis"):
        url = request.getfixturevalue("redis_server")
        assert isinstance(url, RedisServer)
        if kind == "redis-broker":
            return RedisBroker(url.url, prefix=prefix), use_broker
        return RedisResults(url.url, prefix=prefix), use_results
    nats = request.getfixturevalue("nats_server")
    assert isinstance(nats, NatsServer)
    if kind == "nats-broker":
        return NatsBroker(nats.url, prefix=prefix), use_broker
    return NatsResults(nats.url, prefix=prefix), use_results


async def drop(backend: CountedLifetime) -> None:
    """Delete what a NATS backend created on the server (Redis keys are per prefix)."""
    if isinstance(backend, NatsBroker):
        await backend.js.delete_stream(backend.stream)
    elif isinstance(backend, NatsResults):
        await backend.drop()


@pytest.mark.parametrize("opener_leaves", ["last", "first"])
async def test_backend_shared_between_tasks(
    kind: str, opener_leaves: str, request: pytest.FixtureRequest
) -> None:
    backend, use = make(kind, request)
    tasks_before = len(anyio.get_running_tasks())
    opener_inside, other_inside = anyio.Event(), anyio.Event()
    opener_may_leave, other_may_leave = anyio.Event(), anyio.Event()
    opener_left, other_left = anyio.Event(), anyio.Event()
    errors: dict[str, BaseException] = {}

    async def opener() -> None:
        try:
            async with backend:
                await use(backend)
                opener_inside.set()
                await opener_may_leave.wait()
        except RuntimeError as exc:
            errors["opener"] = exc
        finally:
            opener_left.set()

    async def other() -> None:
        await opener_inside.wait()
        try:
            async with backend:  # only counts: the opener's connections, in another task
                await use(backend)
                other_inside.set()
                await other_may_leave.wait()
        finally:
            other_left.set()

    with anyio.fail_after(TIMEOUT * 2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(opener)
            tg.start_soon(other)
            await wait_event(other_inside)
            if opener_leaves == "last":
                other_may_leave.set()
                await wait_event(other_left)
                assert backend.is_open  # the opener is still inside
                opener_may_leave.set()
            else:
                opener_may_leave.set()
                await wait_event(opener_left)
                # refused at once, with what to do, and closed there: nothing leaks
                assert "opener" in errors
                message = str(errors["opener"])
                assert "closed by the task that opened it while other tasks" in message
                assert "Open it once in an outer `async with`" in message
                assert not backend.is_open
                other_may_leave.set()  # its exit does nothing (and raises nothing)
    if opener_leaves == "last":
        assert errors == {}
    assert not backend.is_open
    # every connection and background task ended, in both orders
    assert len(anyio.get_running_tasks()) == tasks_before
    # and it opens again, from any task
    async with backend:
        await use(backend)
        await drop(backend)
    assert len(anyio.get_running_tasks()) == tasks_before


async def test_backend_entered_by_two_tasks_at_once_opens_once(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # The second entry, made while the first is still connecting, waits for that opening
    # and counts on it instead of opening a second set of connections over the first.
    backend, use = make(kind, request)
    tasks_before = len(anyio.get_running_tasks())
    async with backend:
        tasks_of_one_opening = len(anyio.get_running_tasks()) - tasks_before
    task_ids = [0, 0]
    inside = [anyio.Event(), anyio.Event()]
    may_leave = [anyio.Event(), anyio.Event()]
    left = [anyio.Event(), anyio.Event()]

    async def enter(i: int) -> None:
        task_ids[i] = anyio.get_current_task().id
        try:
            async with backend:
                await use(backend)
                inside[i].set()
                await may_leave[i].wait()
        finally:
            left[i].set()

    with anyio.fail_after(TIMEOUT * 2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter, 0)
            tg.start_soon(enter, 1)
            for event in inside:
                await wait_event(event)
            assert len(anyio.get_running_tasks()) == tasks_before + 2 + tasks_of_one_opening
            opener = task_ids.index(backend._opener)  # type: ignore[arg-type]
            may_leave[1 - opener].set()  # the other one leaves first, then the opener
            await wait_event(left[1 - opener])
            assert backend.is_open
            may_leave[opener].set()
    assert not backend.is_open
    assert len(anyio.get_running_tasks()) == tasks_before
    async with backend:
        await drop(backend)
