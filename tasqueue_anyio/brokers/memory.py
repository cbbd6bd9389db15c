"""The in-process broker: zero set-up, for tests and single-process applications.

Every queue is a first-in-first-out :class:`~collections.deque` of due messages plus a
heap of scheduled ones ordered by ``(eta, enqueue sequence)``. Due messages of a priority
above 0 wait in a heap of their own ordered by ``(-priority, enqueue sequence)``, which a
consumer empties before it looks at the deque (a queue that never sees a priority never
touches it). Consumers of one queue
share it: each message goes to exactly one of them. Everything runs on one event loop,
so the code between two ``await`` points is atomic and needs no lock.

A message's id (``Envelope.id``) is remembered
while the message exists (due, scheduled or held by a worker): enqueueing the id again
meanwhile stores nothing, as on the other brokers.

Delivery is at least once *within the process*: a message is held by its
:class:`MemoryDelivery` until that is settled, and a delivery that is garbage-collected
unsettled gives its message back to the queue (see :class:`MemoryDelivery`). Nothing
survives the process: this broker has no lease, because a worker that dies takes the
broker with it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from operator import attrgetter

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .._exceptions import LeaseLostError
from .._jobs import check_priority, validate_queue
from .._limits import Permits, permit_wait
from ..abc import (
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    QueueCounts,
    QueueLimits,
    limit_channel,
)

__all__ = ["MemoryBroker", "MemoryDelivery"]

_PRIORITY = attrgetter("priority")

logger = logging.getLogger(__name__)

# States of a MemoryDelivery.
_HELD = 0  # handed to a worker, not settled
_SETTLED = 1  # acked, nacked or dead-lettered (or given back by the consumer)
_WITHDRAWN = 2  # consume() put the message back after a hand-over that may have failed


class _Message:
    """One message in a queue: its id, and how many times it has been delivered; a
    message of a priority above 0 also has its priority and its enqueue sequence."""

    __slots__ = ("data", "deliveries", "id", "priority", "seq")

    def __init__(self, id: str, data: bytes, priority: int = 0, seq: int = 0) -> None:
        self.id = id
        self.data = data
        self.deliveries = 0
        self.priority = priority
        self.seq = seq


class _Queue:
    """The plain data of one queue (touched by finalizers, so no event-loop objects but
    ``wakeup``, which only the event loop touches)."""

    __slots__ = (
        "abandoned",
        "dead",
        "held",
        "ids",
        "name",
        "ready",
        "scheduled",
        "urgent",
        "wakeup",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        #: due messages of priority 0, oldest first
        self.ready: deque[_Message] = deque()
        #: heap of (-priority, sequence number, message) of due messages of priority > 0
        self.urgent: list[tuple[int, int, _Message]] = []
        #: heap of (eta, sequence number, message)
        self.scheduled: list[tuple[float, int, _Message]] = []
        #: dead letters, oldest first
        self.dead: list[DeadLetter] = []
        #: messages of deliveries garbage-collected unsettled; filled by finalizers
        #: (possibly from another thread: deque.append is atomic), drained by the loop
        self.abandoned: deque[_Message] = deque()
        #: deliveries handed out and not settled (abandoned ones included until reclaimed)
        self.held = 0
        #: ids of the messages of this queue that exist (due, scheduled or held): an
        #: enqueue of one of them stores nothing
        self.ids: set[str] = set()
        #: set to wake idle consumers, then replaced; created lazily by a waiting consumer
        self.wakeup: anyio.Event | None = None


def _make_due(q: _Queue, message: _Message, *, front: bool = False) -> None:
    """Put a message with the due ones: at the back of the deque (the front with
    ``front``: it was the oldest when it was taken), or in the heap of its priority at
    its first place (a message of priority > 0 keeps its enqueue sequence)."""
    if message.priority:
        heapq.heappush(q.urgent, (-message.priority, message.seq, message))
    elif front:
        q.ready.appendleft(message)
    else:
        q.ready.append(message)


def _remove_due(q: _Queue, message: _Message) -> bool:
    """Take a message out of the due ones; whether it was there."""
    if not message.priority:
        try:
            q.ready.remove(message)
        except ValueError:
            return False
        return True
    for index, entry in enumerate(q.urgent):
        if entry[2] is message:
            q.urgent[index] = q.urgent[-1]
            q.urgent.pop()
            heapq.heapify(q.urgent)
            return True
    return False


def _due(q: _Queue) -> list[_Message]:
    """The due messages in delivery order."""
    return [*(m for _, _, m in sorted(q.urgent)), *q.ready]


def _abandon(queue: _Queue, message: _Message) -> None:
    """Finalizer of an unsettled :class:`MemoryDelivery`: give its message back.

    Runs wherever the garbage collector runs (any thread, any point of the event loop),
    so it only appends to a deque; consumers reclaim the message on their next wake-up.
    """
    queue.abandoned.append(message)


class MemoryDelivery(Delivery):
    """A message handed out by :meth:`MemoryBroker.consume`.

    Settle it with exactly one of :meth:`ack`, :meth:`nack` or :meth:`dead_letter`;
    settling again does nothing. If it is garbage-collected unsettled (a worker dropped
    it), its message goes back to the front of its queue and is delivered again with
    ``attempt`` one higher. Idle consumers notice such a message within the broker's
    ``reclaim_interval``; :meth:`MemoryBroker.get_pending` shows it at once.
    """

    __slots__ = ("__weakref__", "_attempt", "_broker", "_finalizer", "_message", "_q", "_state")

    def __init__(self, broker: MemoryBroker, queue: _Queue, message: _Message) -> None:
        self._broker = broker
        self._q = queue
        self._message = message
        self._attempt = message.deliveries
        self._state = _HELD
        self._finalizer = weakref.finalize(self, _abandon, queue, message)
        self._finalizer.atexit = False

    @property
    def data(self) -> bytes:
        """The message as it was enqueued."""
        return self._message.data

    @property
    def queue(self) -> str:
        """The queue the message was taken from."""
        return self._q.name

    @property
    def attempt(self) -> int:
        """How many times this message has been delivered, this time included (1 first)."""
        return self._attempt

    def __repr__(self) -> str:
        return f"<MemoryDelivery queue={self._q.name!r} attempt={self._attempt}>"

    def _release(self) -> bool:
        """Stop holding the message; return whether the caller now owns it.

        :raises BrokerError: the consumer took the message back and delivered it again
        """
        state = self._state
        if state == _SETTLED:
            return False
        self._state = _SETTLED
        if state == _HELD:
            self._finalizer.detach()
            self._q.held -= 1
            return True
        # _WITHDRAWN: the hand-over raised, yet the receiver got this delivery (a
        # cancellation racing a completed hand-over). The message went back to the front of
        # the queue; reclaim it if it is still there, else another delivery owns it now.
        if not _remove_due(self._q, self._message):
            raise LeaseLostError(
                f"the message on queue {self._q.name!r} was given back by its consumer and "
                f"delivered again; that delivery now owns it"
            ) from None
        return True

    def _withdraw(self) -> None:
        """Put the message back at the front of its queue (the hand-over did not happen)."""
        if self._state != _HELD:
            return
        self._state = _WITHDRAWN
        self._finalizer.detach()
        self._q.held -= 1
        self._message.deliveries -= 1
        _make_due(self._q, self._message, front=True)
        self._broker._wake(self._q)


    def abandon(self) -> None:
        """Give the delivery up unsettled (see :meth:`tasqueue_anyio.abc.Delivery.abandon`):
        its message comes back as if its worker had died."""
        if self._state == _HELD:
            self._state = _SETTLED
            self._finalizer()  # the garbage collector's path: given back, not renewed
        self._broker._wake(self._q)

    async def ack(
        self,
        *,
        enqueue: Sequence[Envelope] = (),
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Remove the message for good and, in the same step, enqueue ``enqueue``.

        :param enqueue: messages to enqueue atomically with the removal
        :param announce: ``(channel, message)`` pairs published once it is removed
        :raises BrokerError: the message was given back by the consumer (its hand-over
            was cancelled) and has been delivered again
        """
        if self._release():
            self._q.ids.discard(self._message.id)
            if enqueue:
                self._broker._put_many(enqueue)
            for channel, message in announce:
                await self._broker.publish(channel, message)

    async def nack(self, *, delay: float = 0) -> None:
        """Give the message back to its queue.

        With ``delay <= 0`` it goes to the *front* of the queue, ahead of every message
        still waiting (a consumer may already be handing over the next one): it was the
        oldest when taken, and a worker that stops gracefully keeps the queue's order this
        way. With a delay it is scheduled at ``clock() + delay``.

        :param delay: seconds before the message may be delivered again
        """
        if self._state == _WITHDRAWN:
            # already back in the queue
            self._state = _SETTLED
            return
        if not self._release():
            return
        broker = self._broker
        if delay > 0:
            heapq.heappush(
                self._q.scheduled, (broker._clock() + delay, next(broker._seq), self._message)
            )
        else:
            _make_due(self._q, self._message, front=True)
        broker._wake(self._q)

    async def dead_letter(self, reason: str) -> None:
        """Remove the message from its queue and keep it in the dead-letter listing.

        :param reason: why the message was set aside
        :raises BrokerError: as for :meth:`ack`
        """
        if self._release():
            self._q.ids.discard(self._message.id)
            self._q.dead.append(
                DeadLetter(
                    queue=self._q.name,
                    data=self._message.data,
                    reason=reason,
                    at=self._broker._clock(),
                    id=self._message.id,
                )
            )


class MemoryBroker(Broker):
    """An in-process :class:`~tasqueue_anyio.abc.Broker`.

    Messages live in this object: they are lost when the process ends. Usable with or
    without ``async with``. Its operations complete without waiting (and without a
    checkpoint), except :meth:`consume`.

    :param clock: the wall clock ETAs are measured with (POSIX seconds); ``nack(delay)``
        and dead-letter times use it too. Inject a fake one in tests and call
        :meth:`wake_consumers` after moving it.
    :param reclaim_interval: how often (seconds) an idle consumer looks for messages of
        deliveries that were garbage-collected unsettled, while any delivery of its queue
        is unsettled
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        reclaim_interval: float = 1.0,
    ) -> None:
        self._clock = clock
        self._reclaim_interval = reclaim_interval
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._subscribers: dict[str, list[Callable[[bytes], None]]] = {}
        self._limits: dict[str, Permits] = {}

    def __repr__(self) -> str:
        return f"<MemoryBroker queues={len(self._queues)}>"

    # -- internals (event-loop side) --------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name)
        return q

    @staticmethod
    def _wake(q: _Queue) -> None:
        event = q.wakeup
        if event is not None:
            q.wakeup = None
            event.set()

    def _put_many(self, messages: Iterable[Envelope]) -> None:
        """Store the messages, but those whose id a message of their queue has (due,
        scheduled or held): an enqueue repeated while the first copy exists stores nothing."""
        if any(map(_PRIORITY, messages)):  # all or nothing
            for env in messages:
                if env.priority:
                    check_priority(env.priority)
        now = self._clock()
        touched: dict[str, _Queue] = {}
        for env in messages:
            q = touched.get(env.queue)
            if q is None:
                q = touched[env.queue] = self._queue(env.queue)
            if env.id in q.ids:
                continue
            q.ids.add(env.id)
            if env.priority:
                message = _Message(env.id, env.data, env.priority, next(self._seq))
            else:
                message = _Message(env.id, env.data)
            if env.eta is None or env.eta <= now:
                _make_due(q, message)
            else:
                heapq.heappush(q.scheduled, (env.eta, next(self._seq), message))
        for q in touched.values():
            self._wake(q)

    def _refresh(self, q: _Queue) -> None:
        """Reclaim abandoned messages and move due scheduled messages to the ready deque."""
        abandoned = q.abandoned
        if abandoned:
            reclaimed: list[_Message] = []
            while abandoned:
                reclaimed.append(abandoned.popleft())
            q.held -= len(reclaimed)
            for message in reversed(reclaimed):
                _make_due(q, message, front=True)
        scheduled = q.scheduled
        if scheduled:
            now = self._clock()
            while scheduled and scheduled[0][0] <= now:
                _make_due(q, heapq.heappop(scheduled)[2])

    async def _wait_for_work(self, q: _Queue) -> None:
        timeout = math.inf
        if q.scheduled:
            timeout = q.scheduled[0][0] - self._clock()
        if q.held:
            timeout = min(timeout, self._reclaim_interval)
        event = q.wakeup
        if event is None:
            event = q.wakeup = anyio.Event()
        with anyio.move_on_after(timeout):
            await event.wait()

    # -- Broker -------------------------------------------------------------------------

    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        """Put messages on their queues; those due now become deliverable in order.

        A message whose id a message of its queue still has (due, scheduled or held by a
        worker: not acked nor dead-lettered) is not stored again.

        :param messages: the messages; one whose ``eta`` is in the past is due at once
        """
        self._put_many(messages)

    async def consume(self, queue: str, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        """Feed ``queue``'s due messages into ``send_stream`` until cancelled.

        Closes ``send_stream`` when it returns. A message whose hand-over is cancelled goes
        back to the front of the queue. Returns (instead of raising) when every receiving
        end of ``send_stream`` is closed, giving back the message it was handing over.

        :param queue: the queue to consume
        :param send_stream: where to hand the deliveries, one at a time
        """
        q = self._queue(queue)
        with send_stream:
            try:
                await self._feed(q, send_stream)
            finally:
                # Retire the wake-up event: it belongs to this event loop, and a consumer
                # of a later event loop must not wait on it. Other consumers waiting on it
                # wake up once for nothing and create a fresh one.
                self._wake(q)

    async def _feed(self, q: _Queue, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        ready = q.ready
        urgent = q.urgent
        while True:
            if q.abandoned or q.scheduled:
                self._refresh(q)
            if urgent:
                message = heapq.heappop(urgent)[2]
            elif ready:
                message = ready.popleft()
            else:
                await self._wait_for_work(q)
                continue
            message.deliveries += 1
            q.held += 1
            delivery = MemoryDelivery(self, q, message)
            try:
                await send_stream.send(delivery)
            except anyio.BrokenResourceError:
                delivery._withdraw()
                return
            except BaseException:
                delivery._withdraw()
                raise
            # drop our reference, or an idle consumer would keep the delivery alive and
            # its garbage collection could never give the message back
            del delivery

    async def get_pending(self, queue: str) -> list[bytes]:
        """Messages on ``queue`` that are due and not held by a worker, in delivery order
        (higher priorities first, oldest first within a priority).

        :param queue: the queue
        :return: the messages' data
        """
        q = self._queues.get(queue)
        if q is None:
            return []
        self._refresh(q)
        return [m.data for m in _due(q)]

    async def get_scheduled(self, queue: str) -> list[tuple[float, bytes]]:
        """Messages on ``queue`` waiting for their ETA, as ``(eta, data)`` in ETA order.

        :param queue: the queue
        :return: ``(eta, data)`` pairs, earliest first (ties in enqueue order)
        """
        q = self._queues.get(queue)
        if q is None:
            return []
        self._refresh(q)
        return [(eta, m.data) for eta, _, m in sorted(q.scheduled)]

    async def purge(self, queue: str) -> list[bytes]:
        """Remove the messages of ``queue`` no worker holds; return their data.

        :param queue: the queue
        :return: the due messages' data (oldest first), then the waiting ones' (ETA order)
        """
        q = self._queues.get(validate_queue(queue))
        if q is None:
            return []
        self._refresh(q)
        removed = [*_due(q), *(m for _, _, m in sorted(q.scheduled))]
        q.ready.clear()
        q.urgent.clear()
        q.scheduled.clear()
        for message in removed:
            q.ids.discard(message.id)
        return [message.data for message in removed]

    async def remove_dead_letters(
        self, queue: str, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        """Remove dead letters of ``queue`` (those of ``ids``, or all); return them.

        :param queue: the queue
        :param ids: the dead letters' ids (``None``: all)
        :return: the removed dead letters, oldest first
        """
        q = self._queues.get(validate_queue(queue))
        if q is None:
            return []
        if ids is None:
            removed, q.dead = q.dead, []
            return removed
        wanted = set(ids)
        removed = [d for d in q.dead if d.id in wanted]
        q.dead = [d for d in q.dead if d.id not in wanted]
        return removed

    async def count(self, queue: str) -> QueueCounts:
        """How many messages ``queue`` holds: lengths, no copies.

        :param queue: the queue
        :return: the counts (zeros for an unknown queue)
        :raises InvalidInputError: ``queue`` is not a valid queue name
        """
        q = self._queues.get(validate_queue(queue))
        if q is None:
            return QueueCounts(pending=0, scheduled=0, in_flight=0, dead=0)
        self._refresh(q)
        return QueueCounts(
            pending=len(q.ready) + len(q.urgent),
            scheduled=len(q.scheduled),
            in_flight=max(0, q.held - len(q.abandoned)),
            dead=len(q.dead),
        )

    async def get_dead_letters(self, queue: str) -> list[DeadLetter]:
        """Messages of ``queue`` set aside with :meth:`MemoryDelivery.dead_letter`.

        :param queue: the queue
        :return: the dead letters, oldest first
        """
        q = self._queues.get(queue)
        return [] if q is None else list(q.dead)

    def wake_consumers(self, queue: str | None = None) -> None:
        """Make idle consumers look at their queue again now.

        Only needed after moving an injected clock: consumers otherwise sleep until the
        next ETA as the clock read when they went idle.

        :param queue: the queue whose consumers to wake, or ``None`` for every queue
        """
        queues = self._queues.values() if queue is None else [self._queue(queue)]
        for q in queues:
            self._wake(q)

    async def acquire_permit(
        self, queue: str, limits: QueueLimits, token: str, lease: float
    ) -> float:
        """Take a permit to start a job of ``queue`` under ``limits`` (see
        :meth:`~tasqueue_anyio.abc.Broker.acquire_permit`); this broker's clock.

        :return: 0 when taken, else the seconds until one may be free
        """
        state = self._limits.get(validate_queue(queue))
        if state is None:
            state = self._limits[queue] = Permits()
        return permit_wait(state, limits, token, lease, self._clock())

    async def release_permit(self, queue: str, token: str) -> None:
        """Free the running slot ``token`` holds and announce it."""
        state = self._limits.get(queue)
        if state is not None and state.running.pop(token, None) is not None:
            await self.publish(limit_channel(queue), b"")

    async def renew_permits(self, queue: str, tokens: Collection[str], lease: float) -> None:
        """Extend the leases of the running slots ``tokens`` hold."""
        state = self._limits.get(queue)
        if state is None:
            return
        until = self._clock() + lease
        for token in tokens:
            if token in state.running:
                state.running[token] = until

    async def publish(self, channel: str, data: bytes) -> None:
        """Call every current subscriber of ``channel`` with ``data``, inline; never waits.

        A subscriber callback that raises is logged; the others are still called.

        :param channel: the channel name
        :param data: the message
        """
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        for callback in tuple(subscribers):
            try:
                callback(data)
            except Exception:
                logger.exception(
                    "subscriber %r of channel %r raised",
                    callback,
                    channel,
                    extra={"channel": channel},
                )

    @asynccontextmanager
    async def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AsyncIterator[None]:
        """Call ``callback`` with every message published on ``channel`` inside the block.

        :param channel: the channel name
        :param callback: a quick, non-blocking function of the message
        """
        subscribers = self._subscribers.setdefault(channel, [])
        subscribers.append(callback)
        try:
            yield
        finally:
            subscribers.remove(callback)
            if not subscribers and self._subscribers.get(channel) is subscribers:
                del self._subscribers[channel]
