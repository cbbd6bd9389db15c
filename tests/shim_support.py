"""A broker that wraps another and hands out wrapped deliveries, to inject faults at the
delivery boundary (not a test module itself).

:class:`ShimBroker` forwards everything to the broker it wraps; the deliveries its
:meth:`~ShimBroker.consume` hands out are the inner ones passed through ``wrap`` (by
default a :class:`ShimDelivery`, which forwards everything). A test subclasses
:class:`ShimDelivery` to change one method: an ack that fails, an attempt number that
repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from server_support import TIMEOUT, running

from tasqueue_anyio import Backoff, BrokerError, Job, JobContext, JobMessage, LeaseLostError, Server
from tasqueue_anyio.abc import Broker, DeadLetter, Delivery, Envelope, QueueCounts, Results

__all__ = ["RetryAckFails", "ShimBroker", "ShimDelivery", "run_with_a_failed_retry_ack"]


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

    def abandon(self) -> None:
        self.inner.abandon()


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

    async def count(self, queue: str) -> QueueCounts:
        return await self.inner.count(queue)

    async def purge(self, queue: str) -> list[bytes]:
        return await self.inner.purge(queue)

    async def remove_dead_letters(
        self, queue: str, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        return await self.inner.remove_dead_letters(queue, ids)

    async def publish(self, channel: str, data: bytes) -> None:
        await self.inner.publish(channel, data)

    def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AbstractAsyncContextManager[None]:
        return self.inner.subscribe(channel, callback)


class RetryAckFails(ShimDelivery):
    """A delivery whose ack fails when it is the first ack to carry messages (a retry):
    as after a dropped connection (``BrokerError``, nothing done), or as after a lease
    lost to a pause (``LeaseLostError``, the message back on its queue)."""

    __slots__ = ("failed", "fault")

    def __init__(self, inner: Delivery, fault: str, failed: list[Delivery]) -> None:
        super().__init__(inner)
        self.fault = fault
        self.failed = failed

    async def ack(
        self, *, enqueue: Sequence[Envelope] = (), announce: Sequence[tuple[str, bytes]] = ()
    ) -> None:
        if enqueue and not self.failed:
            self.failed.append(self)
            if self.fault == "lease":
                await self.inner.nack()  # swept back to the queue, delivered again
                raise LeaseLostError("lease lost (injected)")
            raise BrokerError("connection lost (injected)")
        await super().ack(enqueue=enqueue, announce=announce)


async def run_with_a_failed_retry_ack(
    broker: Broker,
    results: Results,
    queue: str,
    fault: str,
    *,
    backoff: Backoff | None = None,
) -> tuple[list[Delivery], JobMessage, list[int]]:
    """Run a job whose first try fails and whose retry-carrying ack fails (see
    :class:`RetryAckFails`) on a server on ``broker`` (wrapped) and ``results``, until
    it ends; return the failed deliveries, the job as it ended, and the ``retried`` of
    each run."""
    failed: list[Delivery] = []
    runs: list[int] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        runs.append(ctx.meta.retried)
        if ctx.meta.retried == 0:
            raise ValueError("the first try fails")

    shim = ShimBroker(broker, lambda delivery: RetryAckFails(delivery, fault, failed))
    async with shim, Server(broker=shim, results=results) as server:
        server.register_task("t", handler, queue=queue, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue, max_retries=1, backoff=backoff))
        async with running(server):
            done = await server.wait(job_id, timeout=TIMEOUT)
        assert await broker.get_pending(queue) == []
    return failed, done, runs
