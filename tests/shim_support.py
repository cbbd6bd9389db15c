"""A broker that wraps another and hands out wrapped deliveries, to inject faults at the
delivery boundary (not a test module itself).

:class:`ShimBroker` forwards everything to the broker it wraps; the deliveries its
:meth:`~ShimBroker.consume` hands out are the inner ones passed through ``wrap`` (by
default a :class:`ShimDelivery`, which forwards everything). A test subclasses
:class:`ShimDelivery` to change one method: an ack that fails, an attempt number that
repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from tasqueue_anyio.abc import Broker, DeadLetter, Delivery, Envelope

__all__ = ["ShimBroker", "ShimDelivery"]


class ShimDelivery(Delivery):
    """A delivery that forwards everything to ``inner``."""

    __slots__ = ("inner",)

    def __init__(self, inner: Delivery) -> None:
        self.inner = inner

    @property
    def data(self) -> bytes:
        return self.inner.data

    @property
    def queue(self) -> str:
        return self.inner.queue

    @property
    def attempt(self) -> int:
        return self.inner.attempt

    async def ack(
        self, *, enqueue: Sequence[Envelope] = (), announce: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        await self.inner.ack(enqueue=enqueue, announce=announce)

    async def nack(self, *, delay: float = 0) -> None:
        await self.inner.nack(delay=delay)

    async def dead_letter(self, reason: str) -> None:
        await self.inner.dead_letter(reason)


class ShimBroker(Broker):
    """``inner`` with its deliveries passed through ``wrap``. Entering it enters
    ``inner``."""

    def __init__(self, inner: Broker, wrap: Callable[[Delivery], Delivery] = ShimDelivery) -> None:
        self.inner = inner
        self.wrap = wrap

    async def __aenter__(self) -> ShimBroker:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc_val, exc_tb)

    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        await self.inner.enqueue_many(messages)

    async def consume(self, queue: str, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        inner_send, inner_receive = anyio.create_memory_object_stream[Delivery](0)
        with send_stream, inner_receive:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.inner.consume, queue, inner_send)
                async for delivery in inner_receive:
                    try:
                        await send_stream.send(self.wrap(delivery))
                    except anyio.BrokenResourceError:
                        await self._give_back(delivery)
                        break
                    except BaseException:
                        await self._give_back(delivery)
                        raise
                tg.cancel_scope.cancel()

    @staticmethod
    async def _give_back(delivery: Delivery) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await delivery.nack()

    async def get_pending(self, queue: str) -> list[bytes]:
        return await self.inner.get_pending(queue)

    async def get_scheduled(self, queue: str) -> list[tuple[float, bytes]]:
        return await self.inner.get_scheduled(queue)

    async def get_dead_letters(self, queue: str) -> list[DeadLetter]:
        return await self.inner.get_dead_letters(queue)

    async def publish(self, channel: str, data: bytes) -> None:
        await self.inner.publish(channel, data)

    def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AbstractAsyncContextManager[None]:
        return self.inner.subscribe(channel, callback)
