"""Helpers shared by the NATS backend test modules (not a test module itself): throwaway
brokers and results stores on a given server, and polling for server-side effects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from broker_support import consuming
from nats_server import NatsServer
from server_support import TIMEOUT

from tasqueue_anyio.abc import Delivery
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

__all__ = [
    "broker_on",
    "drained",
    "eventually",
    "name",
    "results_on",
    "stream_messages",
    "take_all",
]


def name() -> str:
    """A fresh stream prefix or bucket name."""
    return f"t{uuid4().hex[:12]}"


@asynccontextmanager
async def broker_on(
    server: NatsServer, prefix: str | None = None, **kwargs: Any
) -> AsyncIterator[NatsBroker]:
    """An open broker; its stream is deleted afterwards (unless ``keep``)."""
    keep = kwargs.pop("keep", False)
    async with NatsBroker(server.url, prefix=prefix or name(), **kwargs) as broker:
        try:
            yield broker
        finally:
            if not keep:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await broker.js.delete_stream(broker.stream)


@asynccontextmanager
async def results_on(
    server: NatsServer, bucket: str | None = None, **kwargs: Any
) -> AsyncIterator[NatsResults]:
    """An open results store; its bucket is deleted afterwards (unless ``keep``)."""
    keep = kwargs.pop("keep", False)
    async with NatsResults(server.url, prefix=bucket or name(), **kwargs) as results:
        try:
            yield results
        finally:
            if not keep:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await results.drop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll ``check`` until it is true, failing after ``timeout`` seconds (for server-side
    effects that nothing announces, such as an unconfirmed ack being applied)."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def stream_messages(broker: NatsBroker) -> int:
    """How many messages the broker's stream holds."""
    return (await broker.js.stream_info(broker.stream)).messages


async def drained(broker: NatsBroker) -> None:
    """Wait until the broker's stream holds no message (acks are not confirmed by
    default: the server removes an acked message when it reads the ack)."""

    async def empty() -> bool:
        return not await stream_messages(broker)

    await eventually(empty)


async def take_all(brokers: Sequence[NatsBroker], queue: str, count: int) -> list[bytes]:
    """Consume ``queue`` with all of ``brokers`` at once, acking each delivery, until
    ``count`` deliveries came (failing after ``TIMEOUT``); their data, in arrival order."""
    got: list[bytes] = []
    all_in = anyio.Event()

    async def take(stream: MemoryObjectReceiveStream[Delivery]) -> None:
        async for delivery in stream:
            got.append(delivery.data)
            await delivery.ack()
            if len(got) == count:
                all_in.set()

    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(consuming(b, queue)) for b in brokers]
        async with anyio.create_task_group() as tg:
            for stream in streams:  # whichever broker's fetch is served takes the next one
                tg.start_soon(take, stream)
            with anyio.fail_after(TIMEOUT):
                await all_in.wait()
            tg.cancel_scope.cancel()
    return got
