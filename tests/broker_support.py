"""What the broker tests share: an envelope, a consumer for the length of a block, and a
bounded receive (not a test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import uuid4

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from server_support import TIMEOUT

from tasqueue_anyio.abc import Broker, Delivery, Envelope

__all__ = ["consuming", "envelope", "receive"]


def envelope(queue: str, data: bytes, *, eta: float | None = None) -> Envelope:
    """A message for ``queue`` with a fresh id."""
    return Envelope(queue=queue, data=data, id=uuid4().hex, eta=eta)


@asynccontextmanager
async def consuming(
    broker: Broker, queue: str, *, buffer: int = 0, receivers: int = 1
) -> AsyncIterator[MemoryObjectReceiveStream[Delivery]]:
    """Run ``broker.consume(queue, ...)`` for the duration of the block, into a stream of
    ``buffer`` slots with ``receivers`` open receiving ends (the one yielded included)."""
    send, receive_stream = anyio.create_memory_object_stream[Delivery](buffer)
    clones = [receive_stream.clone() for _ in range(receivers - 1)]
    try:
        with receive_stream:
            async with anyio.create_task_group() as tg:
                tg.start_soon(broker.consume, queue, send)
                try:
                    yield receive_stream
                finally:
                    tg.cancel_scope.cancel()
    finally:
        for clone in clones:
            clone.close()


async def receive(stream: MemoryObjectReceiveStream[Delivery]) -> Delivery:
    """The next delivery, failing the test after ``TIMEOUT`` seconds."""
    with anyio.fail_after(TIMEOUT):
        return await stream.receive()
