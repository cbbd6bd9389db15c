"""The NATS JetStream broker: at-least-once delivery on a work-queue stream.

Runs on Trio and asyncio, on the project's own AnyIO NATS client. Needs a nats-server
with JetStream (tested on 2.10 and later); 2.11 or later for batched inspection, 2.12 or
later for native message schedules (older servers get ETAs from a schedule relay).

Layout
------
One stream per broker prefix ``P`` (default ``tasqueue``), named ``P``, with work-queue
retention (a message leaves the stream when it is acknowledged), direct gets allowed and,
on nats-server 2.12+, message schedules allowed::

    P.q.Q            due messages of queue Q, oldest first
    P.s.Q.<token>    a message of queue Q waiting for its ETA (see ETA below)
    P.d.Q            dead letters of queue Q, msgpack ``[data, reason, at]``
    P.e.<channel>    events (core NATS, not stored: the stream does not bind it)

Queue names are validated (letters, digits, ``_``, ``-``) and so is the prefix, so neither
can inject ``.``, ``*`` or ``>``; message ids and channel names are escaped into one
subject token (:func:`~tasqueue_anyio._nats_backend.encode_token`).

Each queue has ONE durable pull consumer, named after the queue and filtered on
``P.q.Q``, shared by every worker of every process: JetStream hands each message to one
of them at a time. Delivery is at least once: a worker acknowledges (``+ACK``) only after
it recorded the job's state. (On a server without message schedules each queue has a
second consumer, ``Q~eta``, the schedule relay's: see ETA.)

Leases
------
A delivered message is held for the consumer's ``ack_wait``. The broker renews every
message it holds (handed to a worker, or fetched and not handed over yet) with ``+WPI``
every ``ack_wait / 3`` seconds, from a task in its own task group, then confirms the
renewals with one flush. A worker that dies stops renewing, and JetStream delivers the
message again after ``ack_wait``.

:attr:`NatsDelivery.attempt` is JetStream's delivered count (plus the deliveries of the
earlier copies of a message put back with :meth:`~NatsDelivery.nack`, carried in the
``Tasqueue-Delivered`` header), so a redelivery usually has a higher attempt; not always:
after a server crash JetStream can deliver a message again with the same count. The
server's run token (``retried.attempt.nonce``, :func:`~tasqueue_anyio.abc.run_token`) is
unique per run either way, and fences the results store: a stale run's writes are
refused. JetStream itself accepts an ack from any delivery of a message, so the
broker also fences its own settles: a delivery whose lease was not renewed within
``ack_wait`` (its process was paused, its renewals could not reach the server) is
considered lost, and settling it raises :class:`~tasqueue_anyio.LeaseLostError` without
touching the message, which belongs to its redelivery.

Putting a message back
----------------------
:meth:`NatsDelivery.nack` does not use ``-NAK``: a NAK'd message stays in the consumer's
delivered range, where no API can list it, so :meth:`NatsBroker.get_pending` could not
show it. It publishes a copy (to the *back* of the queue, or as a schedule after
``delay``) and then acknowledges the original: two round trips, and a crash in between
leaves both, which at-least-once allows. Fetched messages not handed over when
:meth:`~NatsBroker.consume` is cancelled go back the same way.

ETA
---
A message with a future ETA (an enqueued one, or a copy put back with a delay) waits on
``P.s.Q.<token>`` with its ETA in a ``Tasqueue-Eta`` header (``repr`` of POSIX seconds),
which :meth:`~NatsBroker.get_scheduled` lists exactly.

On nats-server 2.12+ it is a native message schedule (``Nats-Schedule: @at <time>``,
``Nats-Schedule-Target: P.q.Q``): at the ETA the server stores it on the queue, where the
consumer delivers it like any other message, and removes the schedule. The server's
scheduler fires at or after the ETA, never before, but runs at most every 250 ms, and
stores the schedules that came due in one run in *publishing* order, not ETA order
(measured: up to about 0.25 s late). So a consumer that fetches a message fired by the
scheduler (it has a ``Nats-Scheduler`` header) waits 25 ms for the rest of the run to
land, fetches it too, and hands the run's messages out in ETA order. Across consumers
(processes) each run is ordered per consumer only, as any concurrent processing is.

The schedule relay (servers before 2.12)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Without message schedules the waiting message is stored without the ``Nats-Schedule``
headers, and each :meth:`~NatsBroker.consume` of the queue also runs a *relay*, a task of
a task group inside the call (it lives exactly as long as the call). The relays of a
queue share a second durable pull consumer, ``Q~eta``, filtered on ``P.s.Q.*`` (a
work-queue stream needs consumer filters that do not overlap, and ``P.q.Q`` and
``P.s.Q.*`` do not); ``~`` is outside the queue-name alphabet, so it is never a queue's
consumer. JetStream hands each waiting message to one relay at a time: no leader is
needed. A relay waits in a pull request (``poll_interval``) and, for the messages it gets:

* not due yet: ``-NAK`` with the time left as its delay (at most an hour, then it looks
  again). The server hands the message out again at its ETA, to whichever relay waits;
  the consumer has no limit on such messages (``max_ack_pending`` -1).
* due (its ETA within 1 ms): a copy on ``P.q.Q`` (its headers but the server's
  ``Nats-*``, with ``Nats-Msg-Id: relay:<stream sequence>``), then a confirmed ``+ACK``
  of the waiting message. The messages due in one fetch are copied in ETA order, in one
  pipelined publish. A relay that dies between the copy and the ack is followed by one
  whose copy is a duplicate: the relay consumer's ack wait is ``min(ack_wait,
  duplicate_window / 2)``, so the copy's id is still remembered.

The copy is a new message of the queue: its first delivery is attempt 1, or the next
attempt of a message put back with a delay (its ``Tasqueue-Delivered`` header is copied);
the relay consumer's delivered count plays no part. The server's redelivery timer is
precise to a millisecond or two, so a message comes due that late at most. Server errors
are logged and retried with a bounded backoff, and a relay consumer deleted under a relay
is made again. As with due messages, nothing moves while no process consumes the queue.

Upgrading to 2.12 with messages waiting: the relays stop (a broker on 2.12+ runs none).
Instead, the first :meth:`~NatsBroker.consume` of a queue by a broker on 2.12+ looks for
the relay consumer ``Q~eta`` (one round trip). If it exists, the messages on ``P.s.Q.*``
without a ``Nats-Schedule`` header are republished, due ones on ``P.q.Q`` and the others
as message schedules on ``P.s.Q.r<sequence>``, each with the ``Nats-Msg-Id`` a relay
would give its copy; then they are deleted, and then the relay consumer. Interrupted, it
is done again by the next such call (the republished ones are duplicates within the
duplicate window).

Inspection costs
----------------
:meth:`~NatsBroker.get_pending` reads the consumer's info (one round trip), then the
queue's messages past its delivered sequence with batched direct gets (one round trip per
256 messages): messages not delivered yet. A message whose worker died is held until its
``ack_wait`` runs out and is not listed meanwhile. :meth:`~NatsBroker.get_scheduled` and
:meth:`~NatsBroker.get_dead_letters` read their subjects the same way from the start of
the stream (the server finds the matching messages; nothing is consumed).

A pull request cancelled at the moment the server delivers a message to it (a consumer
stopped) strands that message until its ``ack_wait`` runs out; then it is delivered
again. (A relay's pull request strands a waiting message the same way, for the relay
consumer's ack wait.)

Round trips
-----------
Per job: its share of a fetch (one no-wait pull request per batch of up to
``batch_size`` messages, no more than the consumer's receivers), and an ack (not
confirmed unless ``confirm_acks``: no round trip).
An ack that enqueues (follow-ups, retries) adds one pipelined publish round trip for all
its messages; :meth:`~NatsBroker.enqueue_many` is one round trip for any number of
messages. Renewals cost one flush per ``ack_wait / 3`` for every held message together.
Concurrent calls share socket writes (the client coalesces them).

Through the schedule relay, a waiting message costs its share of the relay's fetches and
of a confirmed ``-NAK`` when it arrives (and every hour it waits), then of one pipelined
publish and one confirmed ack when it comes due; an idle relay holds one pull request,
renewed every ``poll_interval``.

Events
------
:meth:`~NatsBroker.publish` is a core NATS publish on ``P.e.<channel>`` (best effort).
:meth:`~NatsBroker.subscribe` shares one subscription per channel among its callbacks,
read by one task in the broker's task group, which calls them in publishing order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from functools import partial
from typing import Any, Literal

import anyio
import msgpack
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from .._exceptions import BrokerError, InvalidInputError, LeaseLostError
from .._jobs import check_priority, validate_channel, validate_queue
from .._limits import Permits, permit_wait
from .._nats.client import Client, ConnectionClosedError, SlowConsumerError, Subscription
from .._nats.jetstream import (
    ERR_NO_MESSAGE_FOUND,
    ERR_STREAM_NOT_FOUND,
    ConsumerConfig,
    ConsumerNotFoundError,
    FetchError,
    JetStreamAPIError,
    JsMsg,
    KeyExistsError,
    KeyNotFoundError,
    KeyValue,
    StoredMsg,
    StreamConfig,
    StreamNotFoundError,
    WrongRevisionError,
    _api_reply,
    format_timestamp,
    parse_timestamp,
)
from .._nats.protocol import Headers, NatsError
from .._nats_backend import (
    DEFAULT_PREFIX,
    NatsBackend,
    Request,
    encode_token,
    header_value,
    translate_errors,
    validate_name,
    validate_placement,
    validate_replicas,
)
from .._retry import RetryBackoff
from ..abc import (
    Broker,
    DeadLetter,
    Delivery,
    Envelope,
    QueueCounts,
    QueueLimits,
    limit_channel,
)

__all__ = ["NatsBroker", "NatsDelivery"]

logger = logging.getLogger(__name__)

#: The default ``ack_wait`` (seconds): how long a delivered message is held unrenewed.
DEFAULT_ACK_WAIT = 30.0
#: The default and the largest number of messages one fetch takes.
DEFAULT_BATCH_SIZE = 32
_MAX_BATCH_SIZE = 1000

#: Deliveries of the earlier copies of a message (see :meth:`NatsDelivery.nack`).
H_DELIVERED = "Tasqueue-Delivered"
#: The ETA of a scheduled message, ``repr(float)`` of POSIX seconds.
H_ETA = "Tasqueue-Eta"
#: The priority (1 to 9) of a message of priority above 0: it names the subject the
#: message is due on, wherever it goes (a schedule's target, a copy put back).
H_PRIORITY = "Tasqueue-Priority"
#: How often (seconds) a consumer looks for due messages of priorities above 0 on its
#: queue that it was not told of (see NatsBroker.consume).
_LEVEL_CHECK = 1.0

# Within this many seconds before an ETA a message is published as due, not scheduled
# (and the schedule relay takes a message as due).
_ETA_SLACK = 0.001
# The schedule relay (servers without message schedules): the most messages one fetch of
# the relay consumer takes, and the longest it puts a waiting message aside (``-NAK``
# with a delay) before it looks at it again.
_RELAY_BATCH = 256
_RELAY_MAX_DELAY = 3600.0
# The character that makes a relay consumer's name (``<queue>~eta``) one no queue can
# have: queue names are ``[A-Za-z0-9_-]``, and NATS allows ``~`` in consumer names.
_RELAY_MARK = "~"
# Seconds a consumer that fetched a message fired by the scheduler waits for the rest of
# the scheduler's run to be stored before it takes it (see _fetch).
_RUN_SETTLE = 0.025

# States of a NatsDelivery.
_HELD = 0  # handed out (or fetched), not settled
_SETTLED = 1  # acked, put back, dead-lettered, or its lease found lost
_WITHDRAWN = 2  # consume() gave it back after a hand-over that may have happened
_SETTLING = 3  # a settle is in flight


class _Lease:
    """The renewal state of one held message (shared by its delivery and the broker's
    registry, so the registry does not keep the delivery alive)."""

    __slots__ = ("base", "lost", "reply")

    def __init__(self, reply: str, base: float) -> None:
        self.reply = reply
        #: the clock (``anyio.current_time()``) at or before the server last started
        #: this message's ack timer: the fetch request, then each confirmed renewal
        self.base = base
        self.lost = False


class _Queue:
    """The subjects and consumers of one queue."""

    __slots__ = (
        "adopted",
        "checked",
        "consumer",
        "dead",
        "level_ready",
        "levels",
        "look_at",
        "name",
        "poll",
        "prefix",
        "ready",
        "relay",
        "relay_ready",
        "scheduled",
        "seen",
        "subject",
    )

    def __init__(self, prefix: str, name: str) -> None:
        self.name = name
        self.consumer = name
        #: the schedule relay's consumer (servers without message schedules)
        self.relay = f"{name}{_RELAY_MARK}eta"
        self.subject = f"{prefix}.q.{name}"
        self.scheduled = f"{prefix}.s.{name}"
        self.dead = f"{prefix}.d.{name}"
        self.ready = False  # the consumer was ensured since the broker opened
        self.relay_ready = False  # the relay consumer was ensured since the broker opened
        self.adopted = False  # relay-style schedules were adopted since the broker opened
        self.prefix = prefix
        #: priorities above 0 that may have due messages (fetched first, highest first)
        self.levels: set[int] = set()
        #: the priorities whose consumer was ensured since the broker opened
        self.level_ready: set[int] = set()
        #: whether a priority above 0 was ever seen on this queue
        self.seen = False
        #: when (anyio clock) the consumer last looked for priorities it was not told of
        self.checked = -math.inf
        #: the earliest ETA (POSIX time) of a message of priority above 0 that this broker
        #: scheduled: its consumer looks for priorities then, not a _LEVEL_CHECK later
        self.look_at = math.inf
        #: the scope of a waiting pull request, cancelled when a priority message comes
        self.poll: anyio.CancelScope | None = None

    def subject_of(self, priority: int) -> str:
        """The subject of the due messages of ``priority``."""
        return self.subject if not priority else f"{self.prefix}.p.{self.name}.{priority}"

    def consumer_of(self, priority: int) -> str:
        """The durable consumer of the due messages of ``priority`` (above 0)."""
        return f"{self.name}{_RELAY_MARK}p{priority}"

    @property
    def levels_filter(self) -> str:
        """The subjects of the due messages of priorities above 0."""
        return f"{self.prefix}.p.{self.name}.*"

    @property
    def channel(self) -> str:
        """The event channel that tells consumers of a message of priority above 0."""
        return f"{_RELAY_MARK}prio:{self.name}"


def _level(value: str) -> int:
    """The priority a ``Tasqueue-Priority`` header's value gives (0 unless 1 to 9)."""
    return int(value) if len(value) == 1 and value in "123456789" else 0


def _priority(headers: Headers | None) -> int:
    """The priority a message's headers give (0 when none or not 1 to 9)."""
    return _level(header_value(headers, H_PRIORITY, ""))


class _Channel:
    """One event subscription and the callbacks sharing it."""

    __slots__ = ("callbacks", "sub")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.callbacks: list[Callable[[bytes], None]] = []


def _abandon(abandoned: deque[_Lease], lease: _Lease) -> None:
    """Finalizer of an unsettled :class:`NatsDelivery` (runs wherever the GC runs)."""
    abandoned.append(lease)


def _kept_headers(headers: Headers | None, drop: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The headers a copy of a message keeps: none of the server's (``Nats-*``), nor those
    named in ``drop`` (lower case: ours that the copy sets again)."""
    if headers is None:
        return []
    return [
        (name, value)
        for name, value in headers.items_
        if not name.lower().startswith("nats-") and name.lower() not in drop
    ]


def _copy_headers(msg: JsMsg) -> list[tuple[str, str]]:
    """The headers a copy of ``msg`` put back keeps: not its deliveries nor its ETA (set
    again: a message that was scheduled before must not keep its old one)."""
    return _kept_headers(msg.headers, ("tasqueue-delivered", "tasqueue-eta"))


def _relayed_copy(q: _Queue, msg: JsMsg) -> Request:
    """What the schedule relay publishes for a waiting message that came due: its data and
    headers on the queue, with an id made of its stream sequence, so that a relay that
    died between this publish and its ack is followed by one whose copy is a duplicate
    (within the stream's duplicate window)."""
    # all but the server's headers, so its Tasqueue-Delivered carries on
    headers = [*_kept_headers(msg.headers), ("Nats-Msg-Id", f"relay:{msg.metadata.stream_seq}")]
    priority = _priority(msg.headers)
    if priority:  # this process's consumer fetches it first; others look for it
        q.levels.add(priority)
    return (q.subject_of(priority), msg.payload, headers)


#: Compare-and-set attempts of one change of a queue's permits.
_LIMIT_CONFLICTS = 200


def _pack_limits(state: Permits) -> bytes:
    packed: bytes = msgpack.packb({"w": list(state.starts), "r": state.running})
    return packed


def _unpack_limits(data: bytes) -> Permits:
    state = Permits()
    try:
        value = msgpack.unpackb(data, raw=False)
        state.starts.extend(float(t) for t in value.get("w", ()))
        state.running.update({str(k): float(v) for k, v in value.get("r", {}).items()})
    except Exception:  # unreadable: start over (a permit or two may be given twice)
        logger.warning("the stored permits of a queue were unreadable; they start over")
        return Permits()
    return state


def _priority_of(headers: Sequence[tuple[str, str]]) -> int:
    """The priority in a list of headers being built (0 when none)."""
    return next((_level(value) for name, value in headers if name == H_PRIORITY), 0)


def _fired(msg: JsMsg) -> bool:
    """Whether ``msg`` was stored by the server's scheduler (an ETA that came due)."""
    headers = msg.headers
    return headers is not None and "Nats-Scheduler" in headers


def _msg_eta(msg: JsMsg) -> float:
    try:
        return float(header_value(msg.headers, H_ETA, "0"))
    except ValueError:
        return 0.0


def _prior_deliveries(msg: JsMsg) -> int:
    try:
        return max(0, int(header_value(msg.headers, H_DELIVERED, "0")))
    except ValueError:
        return 0


class NatsDelivery(Delivery):
    """A message handed out by :meth:`NatsBroker.consume`, held under JetStream's ack wait.

    Settle it with exactly one of :meth:`ack`, :meth:`nack` or :meth:`dead_letter`;
    settling again does nothing. Settling a delivery whose lease was lost raises
    :class:`~tasqueue_anyio.LeaseLostError` and changes nothing. A delivery that is
    garbage-collected unsettled is given back (``-NAK``) at the broker's next renewal.
    """

    __slots__ = (
        "__weakref__",
        "_attempt",
        "_broker",
        "_finalizer",
        "_lease",
        "_msg",
        "_q",
        "_state",
    )

    def __init__(self, broker: NatsBroker, queue: _Queue, msg: JsMsg, base: float) -> None:
        self._broker = broker
        self._q = queue
        self._msg = msg
        self._attempt = _prior_deliveries(msg) + msg.metadata.num_delivered
        self._state = _HELD
        lease = self._lease = _Lease(msg.reply, base)
        broker._leases[msg.reply] = lease
        self._finalizer = weakref.finalize(self, _abandon, broker._abandoned, lease)
        self._finalizer.atexit = False

    @property
    def data(self) -> bytes:
        """The message as it was enqueued."""
        return self._msg.payload

    @property
    def queue(self) -> str:
        """The queue the message was taken from."""
        return self._q.name

    @property
    def attempt(self) -> int:
        """How many times this message has been delivered, this time included (1 first):
        JetStream's delivered count, plus the deliveries of the copies it was put back as."""
        return self._attempt

    @property
    def stream_sequence(self) -> int:
        """The message's sequence in the stream."""
        return self._msg.metadata.stream_seq

    def __repr__(self) -> str:
        return (
            f"<NatsDelivery queue={self._q.name!r} seq={self.stream_sequence} "
            f"attempt={self._attempt}>"
        )

    def _stop_renewing(self) -> None:
        self._finalizer.detach()
        leases = self._broker._leases
        if leases.get(self._lease.reply) is self._lease:
            del leases[self._lease.reply]

    def _lost(self, action: str) -> LeaseLostError:
        self._state = _SETTLED
        self._stop_renewing()
        return LeaseLostError(
            f"lease lost: cannot {action} message {self.stream_sequence} of queue "
            f"{self._q.name!r} (attempt {self._attempt}); it was not renewed within the "
            f"ack wait of {self._broker.ack_wait:g} s (or its consumer gave it back), "
            f"and another delivery of it owns it now"
        )

    def _begin(self, action: str) -> bool:
        """Start settling: ``False`` when already settled (nothing to do).

        :raises LeaseLostError: the lease is lost (the delivery is settled now)
        """
        state = self._state
        if state == _WITHDRAWN:
            if action == "nack":  # already back in its queue
                self._state = _SETTLED
                return False
            raise self._lost(action)
        if state != _HELD:
            return False
        if not self._broker._lease_held(self._lease):
            raise self._lost(action)
        self._state = _SETTLING
        return True

    def _end(self, done: bool) -> None:
        if done:
            self._state = _SETTLED
            self._stop_renewing()
        else:
            self._state = _HELD


    def abandon(self) -> None:
        """Give the delivery up unsettled (see :meth:`tasqueue_anyio.abc.Delivery.abandon`):
        its message comes back as if its worker had died."""
        if self._state == _HELD:
            self._state = _SETTLED
            self._finalizer()  # the garbage collector's path: given back, not renewed

    async def ack(
        self,
        *,
        enqueue: Sequence[Envelope] = (),
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Remove the message for good, after enqueueing ``enqueue``.

        The messages to enqueue are stored first (one round trip), then ``+ACK`` is sent:
        a crash in between enqueues them again on the redelivery (deduplicated by message
        id within the stream's duplicate window), never loses them. By default the ack
        is not confirmed (no round trip): it is written to the connection and the server
        removes the message when it reads it. An ack lost with its connection leaves the
        message to be delivered again after ``ack_wait``, as a crash would (a confirmed
        ack lost that way would only raise); a worker does not run a redelivered job
        again whose recorded state is final. With ``confirm_acks=True`` the broker waits for the server's confirmation
        (one round trip) and reports a failure. ``announce`` is published after the ack
        (core NATS publishes: no round trip of their own).

        :param enqueue: messages to enqueue before the removal
        :param announce: ``(channel, message)`` pairs published once it is removed
        :raises LeaseLostError: the lease was lost; nothing was enqueued or removed
        :raises BrokerError: the server failed (the message comes back after its lease)
        """
        if not self._begin("ack"):
            return
        done = False
        try:
            broker = self._broker
            if enqueue:
                await broker.enqueue_many(enqueue)
            if broker.confirm_acks:
                await broker._settle([self._msg.reply], b"+ACK", "acking a message")
            else:
                with translate_errors("acking a message"):
                    await broker.client.publish(self._msg.reply, b"+ACK")
            done = True
        finally:
            self._end(done)
        for channel, message in announce:
            await self._broker.publish(channel, message)

    async def nack(self, *, delay: float = 0) -> None:
        """Give the message back: a copy to the back of its queue, or scheduled after
        ``delay`` seconds, then the original acknowledged (two round trips).

        The copy carries the delivery count, so its next delivery has the next
        ``attempt``.

        :param delay: seconds before the message may be delivered again
        :raises LeaseLostError: the lease was lost; nothing changed
        """
        if not self._begin("nack"):
            return
        done = False
        try:
            await self._broker._put_back([(self, True)], delay=max(0.0, float(delay)))
            done = True
        finally:
            self._end(done)

    async def dead_letter(self, reason: str) -> None:
        """Publish the message, with ``reason`` and the time, on its queue's dead-letter
        subject, then terminate it (``+TERM``, confirmed): two round trips.

        :param reason: why the message was set aside
        :raises LeaseLostError: the lease was lost; nothing changed
        """
        if not self._begin("dead-letter"):
            return
        done = False
        broker = self._broker
        try:
            reason = str(reason)
            entry = msgpack.packb([self.data, reason, time.time()], use_bin_type=True)
            if len(entry) + 256 > broker.client.max_payload:
                # a message near the server's max_payload: its reason is cut to fit
                reason = reason.encode(errors="replace")[:1024].decode(errors="ignore")
                entry = msgpack.packb([self.data, reason, time.time()], use_bin_type=True)
            metadata = self._msg.metadata
            headers = [("Nats-Msg-Id", f"dead:{metadata.stream_seq}:{metadata.num_delivered}")]
            await broker.publish_all(
                [(self._q.dead, entry, headers)], f"dead-lettering on queue {self._q.name!r}"
            )
            body = b"+TERM " + str(reason).encode(errors="replace")[:1024]
            await broker._settle([self._msg.reply], body, "terminating a message")
            done = True
        finally:
            self._end(done)


class NatsBroker(NatsBackend, Broker):
    """A :class:`~tasqueue_anyio.abc.Broker` on NATS JetStream.

    Open it with ``async with``: it connects (unless given a ``client``), creates or
    updates its stream, and runs its lease renewal and event readers in a task group of
    its own. Entering it again is counted.

    :param url: ``nats://[user:password@]host:port`` (``tls://`` for TLS, certificate
        checked), or a list of servers; default ``nats://127.0.0.1:4222``
    :param client: an open :class:`tasqueue_anyio._nats.client.Client` to use instead;
        the caller enters and leaves it
    :param prefix: the stream name and the first token of every subject
        (letters, digits, ``_``, ``-``)
    :param ack_wait: seconds a delivered message stays held without renewal; the broker
        renews every ``ack_wait / 3`` seconds, so a message comes back about ``ack_wait``
        seconds after its worker died. Each queue's consumer is created (or updated)
        with this value: give every process the same.
    :param batch_size: the most messages one fetch takes (a consumer takes at most as
        many as its stream has receivers)
    :param poll_interval: the longest a pull request waits on the server for a message
        (default ``min(5, ack_wait / 3)``; at most ``ack_wait / 3``)
    :param duplicate_window: seconds the stream remembers message ids: enqueueing a
        message with the id of one enqueued within this window stores nothing
    :param storage: ``"file"`` (survives a server restart) or ``"memory"``
    :param replicas: stream replicas (1 to 5; more than 1 needs a JetStream cluster):
        with 3, the queues survive the loss of any one server
    :param placement: where a cluster puts the stream (and the limits bucket):
        ``{"cluster": name}`` and/or ``{"tags": [...]}`` (servers' ``server_tags``);
        ``None`` lets JetStream choose
    :param timeout: seconds to wait for any one reply from the server
    :param confirm_acks: wait for the server to confirm each :meth:`NatsDelivery.ack`
        (one round trip each) instead of sending it and going on (see there)
    """

    _what = "NATS broker"

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        client: Client | None = None,
        prefix: str = DEFAULT_PREFIX,
        ack_wait: float = DEFAULT_ACK_WAIT,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float | None = None,
        duplicate_window: float = 120.0,
        storage: Literal["file", "memory"] = "file",
        replicas: int = 1,
        placement: Mapping[str, Any] | None = None,
        timeout: float = 5.0,
        confirm_acks: bool = False,
    ) -> None:
        super().__init__(url, client, timeout=timeout)
        self.prefix = validate_name(prefix, "prefix")
        #: whether :meth:`NatsDelivery.ack` waits for the server's confirmation
        self.confirm_acks = bool(confirm_acks)
        if (
            not isinstance(ack_wait, (int, float))
            or isinstance(ack_wait, bool)
            or not 0.3 <= ack_wait <= 86400
        ):
            raise InvalidInputError(f"ack_wait must be seconds in [0.3, 86400], got {ack_wait!r}")
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not 1 <= batch_size <= _MAX_BATCH_SIZE
        ):
            raise InvalidInputError(
                f"batch_size must be an int in [1, {_MAX_BATCH_SIZE}], got {batch_size!r}"
            )
        self.ack_wait = float(ack_wait)
        if poll_interval is None:
            poll_interval = min(5.0, self.ack_wait / 3)
        if not isinstance(poll_interval, (int, float)) or poll_interval < 0.05:
            raise InvalidInputError(f"poll_interval must be seconds >= 0.05, got {poll_interval!r}")
        self.poll_interval = min(float(poll_interval), self.ack_wait / 3)
        if not isinstance(duplicate_window, (int, float)) or duplicate_window <= 0:
            raise InvalidInputError(
                f"duplicate_window must be seconds > 0, got {duplicate_window!r}"
            )
        if storage not in ("file", "memory"):
            raise InvalidInputError(f"storage must be 'file' or 'memory', got {storage!r}")
        self.batch_size = batch_size
        self.duplicate_window = float(duplicate_window)
        self.storage: Literal["file", "memory"] = storage
        self.replicas = validate_replicas(replicas)
        self.placement = validate_placement(placement)
        #: the stream's name
        self.stream = self.prefix
        # a lease is lost when unrenewed this long (a margin below ack_wait for latency)
        self._lease_limit = self.ack_wait - min(1.0, self.ack_wait * 0.1)
        self._queues: dict[str, _Queue] = {}
        self._leases: dict[str, _Lease] = {}
        self._abandoned: deque[_Lease] = deque()
        self._channels: dict[str, _Channel] = {}
        self._channel_lock: anyio.Lock | None = None
        self._schedules = False
        self._limits_kv: KeyValue | None = None

    def __repr__(self) -> str:
        where = self.url if self.url is not None else "client"
        return f"<NatsBroker {where} prefix={self.prefix!r}>"

    # -- lifetime -------------------------------------------------------------------------

    async def _open(self) -> None:
        self._channel_lock = anyio.Lock()
        for q in self._queues.values():
            q.ready = q.relay_ready = q.adopted = False
            q.level_ready.clear()
        self._schedules = self.server_at_least((2, 12, 0))
        await self._ensure_stream()
        p = self.prefix  # the subjects of queues and of events
        await self._check_permissions(stored=[f"{p}.q._probe"], core=[f"{p}.e._probe"])

    async def _ensure_stream(self) -> None:
        p = self.prefix
        await self.js.ensure_stream(
            StreamConfig(
                name=self.stream,
                subjects=[f"{p}.q.*", f"{p}.p.*.*", f"{p}.s.*.*", f"{p}.d.*"],
                retention="workqueue",
                storage=self.storage,
                num_replicas=self.replicas,
                duplicate_window=self.duplicate_window,
                allow_direct=True,
                allow_msg_schedules=self._schedules,
                extra={"placement": self.placement} if self.placement else {},
            )
        )

    async def _start(self, tg: TaskGroup) -> None:
        tg.start_soon(self._renew_forever, name=f"{self!r} lease renewal")

    def _closing(self) -> None:
        self._limits_kv = None
        self._channels.clear()
        self._leases.clear()
        self._abandoned.clear()

    # -- names ----------------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            validate_queue(name)
            q = self._queues[name] = _Queue(self.prefix, name)
        return q

    def _event_subject(self, channel: str) -> str:
        return f"{self.prefix}.e.{encode_token(validate_channel(channel))}"

    async def _ensure_consumer(self, q: _Queue) -> None:
        if q.ready:
            return
        await self._create_consumer(
            ConsumerConfig(
                durable_name=q.consumer,
                ack_policy="explicit",
                ack_wait=self.ack_wait,
                max_deliver=-1,
                filter_subject=q.subject,
                deliver_policy="all",
                description=f"tasqueue queue {q.name}",
            )
        )
        q.ready = True

    async def _ensure_level(self, q: _Queue, priority: int) -> None:
        if priority in q.level_ready:
            return
        await self._create_consumer(
            ConsumerConfig(
                durable_name=q.consumer_of(priority),
                ack_policy="explicit",
                ack_wait=self.ack_wait,
                max_deliver=-1,
                filter_subject=q.subject_of(priority),
                deliver_policy="all",
                description=f"tasqueue queue {q.name}, priority {priority}",
            )
        )
        q.level_ready.add(priority)

    async def _ensure_relay(self, q: _Queue) -> None:
        if q.relay_ready:
            return
        await self._create_consumer(
            ConsumerConfig(
                durable_name=q.relay,
                ack_policy="explicit",
                # a relay holds a message for a moment; one that died holding it must be
                # replaced within the duplicate window (its copy's id is remembered there)
                ack_wait=max(0.3, min(self.ack_wait, self.duplicate_window / 2)),
                max_deliver=-1,
                filter_subject=f"{q.scheduled}.*",
                deliver_policy="all",
                # every waiting message is put aside (-NAK with a delay) at once
                max_ack_pending=-1,
                description=f"tasqueue ETA relay of queue {q.name}",
            )
        )
        q.relay_ready = True

    async def _create_consumer(self, config: ConsumerConfig) -> None:
        try:
            await self.js.ensure_consumer(self.stream, config)
        except JetStreamAPIError as exc:
            if exc.err_code != ERR_STREAM_NOT_FOUND:  # create the stream, then try again
                raise
            await self._ensure_stream()
            await self.js.ensure_consumer(self.stream, config)

    # -- enqueue ----------------------------------------------------------------------------

    def _publication(self, env: Envelope, now: float) -> Request:
        q = self._queue(env.queue)
        if not isinstance(env.id, str) or not env.id:
            raise InvalidInputError(f"a message id must be a non-empty str, got {env.id!r}")
        headers: list[tuple[str, str]] = [("Nats-Msg-Id", env.id)]
        if env.priority:
            check_priority(env.priority)
            headers.append((H_PRIORITY, str(env.priority)))
        eta = env.eta
        if eta is None or eta <= now + _ETA_SLACK:
            return (q.subject_of(env.priority), env.data, headers)
        return self._schedule(q, "i" + encode_token(env.id), env.data, float(eta), headers)

    def _schedule(
        self, q: _Queue, token: str, data: bytes, eta: float, headers: list[tuple[str, str]]
    ) -> Request:
        """The publication of a message waiting for ``eta`` on ``P.s.Q.<token>``: a native
        message schedule, or (server without message schedules) a message the schedule
        relay moves to the queue at its ETA. Its target is the subject of its priority
        (its ``Tasqueue-Priority`` header)."""
        priority = _priority_of(headers)
        if priority:
            q.look_at = min(q.look_at, eta)
            q.seen = True
        target = q.subject_of(priority)
        headers = [*headers, (H_ETA, repr(eta))]
        if self._schedules:
            at = datetime.fromtimestamp(eta, tz=timezone.utc)
            headers += [
                ("Nats-Schedule", f"@at {format_timestamp(at)}"),
                ("Nats-Schedule-Target", target),
            ]
        return (f"{q.scheduled}.{token}", data, headers)

    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        """Publish messages to the stream in one round trip (pipelined publishes, each
        confirmed), stored in the given order.

        A message due now goes to its queue's subject; one with a later ETA becomes a
        message schedule (on a server without them, a message the schedule relay of a
        consumer of its queue moves there at its ETA: see the module's documentation).
        Each carries its id as ``Nats-Msg-Id``, so the same message
        enqueued again while its first copy is still in the stream is not stored twice.
        (JetStream remembers ids for the stream's duplicate window, also after the first
        copy was acknowledged: a message the server reports as a duplicate of one that is
        gone is published again without its id, one more round trip, so that
        re-enqueueing a finished job runs it again. Unless a copy of it is still there:
        the first copy may be gone because its ETA came due, or it was put back, and
        such a copy does not carry the id; see :meth:`_copied`.)

        :param messages: the messages
        :raises InvalidInputError: a queue name or message id is invalid (nothing sent)
        :raises BrokerError: a message was refused (the others may be stored)
        """
        if not messages:
            return
        now = time.time()
        requests = [self._publication(env, now) for env in messages]
        with translate_errors("enqueueing"):
            acks = await self.publish_all(requests, "enqueueing")
            again: list[Request] = []
            for request, ack, env in zip(requests, acks, messages, strict=True):
                if (
                    ack.duplicate
                    and not await self._stored(ack.seq)
                    and not await self._copied(env, ack.seq)
                ):
                    subject, data, headers = request
                    again.append((subject, data, [h for h in headers if h[0] != "Nats-Msg-Id"]))
            if again:
                await self.publish_all(again, "enqueueing")
            # tell the consumers of a priority above 0 at once (best effort: they look
            # for such messages every _LEVEL_CHECK seconds too)
            told: set[tuple[str, int]] = set()
            for env in messages:
                if env.priority and (env.queue, env.priority) not in told:
                    told.add((env.queue, env.priority))
                    q = self._queue(env.queue)
                    self._told(q, str(env.priority).encode())  # this process's at once
                    await self.client.publish(
                        self._event_subject(q.channel), str(env.priority).encode()
                    )

    async def _copied(self, env: Envelope, seq: int) -> bool:
        """Whether a copy of ``env``'s message stored after ``seq`` (its first copy) is
        still in the stream: the copy on the queue that a message schedule or the schedule
        relay made when its ETA came due, or one put back (:meth:`NatsDelivery.nack`, a
        consumer that stopped). These copies do not carry the message's id (the relay's
        carry ``relay:<sequence>``), so they are found by their data on the queue's
        subjects past ``seq``: batched direct gets (one round trip per 256 messages; one
        per message before nats-server 2.11). Only an enqueue the server reports as a
        duplicate of a message that is gone pays it.
        """
        q = self._queue(env.queue)
        for subject in (q.subject_of(env.priority), f"{q.scheduled}.*"):
            for message in await self.read_range(self.stream, subject, seq + 1):
                if message.payload != env.data:
                    continue
                copy_id = header_value(message.headers, "Nats-Msg-Id")
                if not copy_id or copy_id == env.id or copy_id.startswith("relay:"):
                    return True  # (same data under another message's id is not a copy)
        return False

    async def _stored(self, seq: int) -> bool:
        """Whether the stream still has the message at ``seq``."""
        try:
            await self.js.get_msg(self.stream, seq=seq)
        except JetStreamAPIError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return False
            raise
        return True

    # -- consume ----------------------------------------------------------------------------

    async def consume(self, queue: str, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        """Feed ``queue``'s due messages into ``send_stream`` until cancelled.

        Fetches up to ``min(batch_size, number of receivers)`` messages per round trip
        (a no-wait pull request), and when the queue is empty waits in a pull request of
        one message that expires after ``poll_interval``. Hands them over one at a time.
        On cancellation (or when every receiver is gone) the messages fetched and not
        handed over go back to the queue (see :meth:`NatsDelivery.nack`), their delivery
        not counted; the one whose hand-over was interrupted goes back too, its delivery
        counted, and a receiver that did get it finds its lease lost when it settles.
        Server errors are logged and retried with a bounded backoff.

        On a server without message schedules it also runs the queue's schedule relay
        (see the module's documentation) for as long as it runs; on a server with them it
        first adopts the messages such a relay left waiting (a server upgraded under them).

        :param queue: the queue
        :param send_stream: where to hand the deliveries; closed on return
        """
        q = self._queue(queue)
        self._require_open()
        q.checked = -math.inf  # look for priorities above 0 at the first fetch
        local: deque[NatsDelivery] = deque()
        with send_stream:
            try:
                async with anyio.create_task_group() as tg:
                    if not self._schedules:
                        await tg.start(self._relay, q, name=f"{self!r} ETA relay of {q.name!r}")
                    elif not q.adopted:
                        tg.start_soon(self._adopt, q, name=f"{self!r} ETA adoption {q.name!r}")
                    async with self.subscribe(q.channel, partial(self._told, q)):
                        await self._feed(q, send_stream, local)
                    tg.cancel_scope.cancel()
            finally:
                if local:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
                        await self._give_back(q, local)

    async def _feed(
        self,
        q: _Queue,
        send_stream: MemoryObjectSendStream[Delivery],
        local: deque[NatsDelivery],
    ) -> None:
        retry = RetryBackoff(logger, f"consuming queue {q.name!r}", {"queue": q.name})
        while True:
            if not local:
                receivers = send_stream.statistics().open_receive_streams
                want = min(self.batch_size, max(1, receivers))
                try:
                    with translate_errors(f"fetching from queue {q.name!r}"):
                        await self._ensure_consumer(q)
                        await self._fetch(q, want, local)
                except BrokerError as exc:
                    if isinstance(exc.__cause__, (ConsumerNotFoundError, FetchError)):
                        q.ready = False  # deleted under us: create it again
                        q.level_ready.clear()
                    await retry.failed(exc)
                    continue
                retry.succeeded()
                if not local:
                    continue
            delivery = local[0]
            try:
                await send_stream.send(delivery)
            except anyio.BrokenResourceError:
                return
            except BaseException:
                delivery._state = _WITHDRAWN
                raise
            local.popleft()
            del delivery

    @staticmethod
    def _told(q: _Queue, data: bytes) -> None:
        """A producer enqueued a message of a priority above 0 on ``q``: fetch it first,
        and stop waiting on the queue's pull request (the one waiting for priority 0)."""
        if len(data) == 1 and data in b"123456789":
            q.levels.add(int(data))
            q.seen = True
            if q.poll is not None:
                q.poll.cancel()

    async def _look_for_levels(self, q: _Queue) -> None:
        """Find the priorities above 0 with messages on ``q`` (one stream info; its reply
        names each such subject): those a consumer was not told of (fired schedules, the
        relay's copies, another process's put-backs, a lost notice)."""
        found = await self._levels(q)
        if found:
            q.levels.update(found)
            q.seen = True
        q.checked = anyio.current_time()

    async def _fetch(self, q: _Queue, want: int, local: deque[NatsDelivery]) -> None:
        """Fetch up to ``want`` messages of ``q`` into ``local``: from the consumers of the
        priorities above 0 that may have some, highest first, then from the queue's; when
        none came, wait for one in a pull request.

        The no-wait pull requests are shielded (one round trip each) and their messages
        go into ``local`` before the next checkpoint, so a consumer cancelled meanwhile
        gives them back instead of stranding them until their ack wait.
        """
        js = self.js
        start = len(local)

        async def take(consumer: str, n: int) -> int:
            base = anyio.current_time()
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
                msgs = await js.fetch(self.stream, consumer, n, no_wait=True)
                local.extend([NatsDelivery(self, q, msg, base) for msg in msgs])
                return len(msgs)
            return 0

        if anyio.current_time() - q.checked >= _LEVEL_CHECK or time.time() >= q.look_at:
            q.look_at = math.inf
            await self._look_for_levels(q)
        # higher priorities first; a priority found empty is dropped until told again
        for level in sorted(q.levels, reverse=True):
            await self._ensure_level(q, level)
            if not await take(q.consumer_of(level), want - (len(local) - start)):
                q.levels.discard(level)
            if len(local) - start >= want:
                break
        if len(local) - start < want:
            await take(q.consumer, want - (len(local) - start))
        if len(local) == start:
            base = anyio.current_time()
            # a notice of a priority message cancels the wait (a message the server was
            # delivering at that moment comes back after its ack wait, as for a stopped
            # consumer); a queue that has priorities waits at most _LEVEL_CHECK
            expires = min(self.poll_interval, _LEVEL_CHECK) if q.seen else self.poll_interval
            expires = max(0.05, min(expires, q.look_at - time.time()))
            with anyio.CancelScope() as q.poll:
                msgs = await js.fetch(self.stream, q.consumer, 1, expires=expires)
                local.extend([NatsDelivery(self, q, msg, base) for msg in msgs])
            q.poll = None
        if any(_fired(local[index]._msg) for index in range(start, len(local))):
            # A scheduler run stores its messages in publishing order: let the run land,
            # take the rest of it, and hand its messages out in ETA order.
            await anyio.sleep(_RUN_SETTLE)
            if len(local) - start < self.batch_size:
                await take(q.consumer, self.batch_size - (len(local) - start))
            slots = [index for index in range(start, len(local)) if _fired(local[index]._msg)]
            fired = sorted(
                (local[index] for index in slots),
                key=lambda d: (
                    -_priority(d._msg.headers),
                    _msg_eta(d._msg),
                    d._msg.metadata.stream_seq,
                ),
            )
            for index, delivery in zip(slots, fired, strict=True):
                local[index] = delivery

    async def _give_back(self, q: _Queue, deliveries: Iterable[NatsDelivery]) -> None:
        back: list[tuple[NatsDelivery, bool]] = []
        for delivery in deliveries:
            if delivery._state == _HELD:
                delivery._state = _SETTLED
                back.append((delivery, False))  # never handed over: not counted
            elif delivery._state == _WITHDRAWN:
                back.append((delivery, True))  # its receiver may have it: counted
            else:
                continue
            delivery._stop_renewing()
        if not back:
            return
        try:
            await self._put_back(back, delay=0.0)
        except BrokerError:
            logger.exception(
                "could not give %d fetched messages back to queue %r; they come back "
                "when their ack wait runs out",
                len(back),
                q.name,
                extra={"queue": q.name},
            )

    async def _put_back(
        self, deliveries: Sequence[tuple[NatsDelivery, bool]], *, delay: float
    ) -> None:
        """Copy the deliveries, in order, to the back of their queue (or as schedules
        after ``delay``), then acknowledge the originals. With each delivery comes
        whether its delivery counts (the copy's next ``attempt`` follows it)."""
        eta = time.time() + delay
        requests: list[Request] = []
        for delivery, counted in deliveries:
            msg = delivery._msg
            attempts = delivery._attempt if counted else delivery._attempt - 1
            headers = [*_copy_headers(msg), (H_DELIVERED, str(max(0, attempts)))]
            if delay > 0:
                meta = msg.metadata
                token = f"n{meta.stream_seq}-{meta.num_delivered}"
                requests.append(self._schedule(delivery._q, token, msg.payload, eta, headers))
            else:
                priority = _priority(msg.headers)
                if priority:
                    delivery._q.levels.add(priority)
                requests.append((delivery._q.subject_of(priority), msg.payload, headers))
        await self.publish_all(requests, "giving messages back")
        await self._settle(
            [d._msg.reply for d, _ in deliveries], b"+ACK", "acking given-back messages"
        )

    async def _settle(self, replies: Sequence[str], body: bytes, what: str) -> None:
        """Send ``body`` (``+ACK``, ``+TERM``...) to each ack subject and wait for the
        server to confirm them (one round trip)."""
        await self._settle_each([(reply, body) for reply in replies], what)

    async def _settle_each(self, settles: Sequence[tuple[str, bytes]], what: str) -> None:
        """Send each ``(ack subject, body)`` and wait for the server to confirm them all
        (one round trip)."""
        with translate_errors(what):
            answers = await self.request_many([(reply, body, ()) for reply, body in settles])
        for answer in answers:
            if isinstance(answer, NatsError):
                raise BrokerError(f"NATS failed while {what}: {answer}") from answer

    # -- the schedule relay (servers without message schedules) -----------------------------

    async def _relay(
        self, q: _Queue, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Move ``q``'s waiting messages to the queue at their ETAs, until cancelled.

        Reports itself started after a first pass over the messages waiting now (or its
        failure), so that the consumer's first fetch finds the ones that came due while
        nothing relayed, each under its priority. Server errors are logged and retried
        with a bounded backoff; a relay consumer deleted under it is created again.
        """
        retry = RetryBackoff(logger, f"relaying the ETAs of queue {q.name!r}", {"queue": q.name})
        first = True
        while True:
            try:
                with translate_errors(f"relaying the ETAs of queue {q.name!r}"):
                    await self._ensure_relay(q)
                    msgs = await self._fetch_waiting(q, wait=not first)
                    if msgs:
                        # settle what was fetched even if consume() is being cancelled:
                        # a message left held comes back only after the ack wait
                        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
                            await self._relay_batch(q, msgs)
            except BrokerError as exc:
                if isinstance(exc.__cause__, (ConsumerNotFoundError, FetchError)):
                    q.relay_ready = False  # deleted under us: create it again
                if first:
                    first = False
                    task_status.started()
                await retry.failed(exc)
                continue
            if first:
                first = False
                task_status.started()
            retry.succeeded()

    async def _fetch_waiting(self, q: _Queue, *, wait: bool = True) -> list[JsMsg]:
        """Messages of ``q`` waiting for an ETA that the relay consumer has now: new ones,
        and ones put aside whose delay ran out. Waits up to ``poll_interval`` for one
        (unless not ``wait``)."""
        js = self.js
        # the no-wait pull requests are shielded (one round trip), and the caller relays
        # what they return shielded too: a relay stopped meanwhile strands nothing
        msgs: list[JsMsg] = []
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
            msgs = await js.fetch(self.stream, q.relay, _RELAY_BATCH, no_wait=True)
        if not msgs and wait:
            msgs = await js.fetch(self.stream, q.relay, 1, expires=self.poll_interval)
            if msgs:  # and whatever came due with it
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout * 2):
                    msgs += await js.fetch(self.stream, q.relay, _RELAY_BATCH - 1, no_wait=True)
        return msgs

    async def _relay_batch(self, q: _Queue, msgs: Sequence[JsMsg]) -> None:
        """Copy the due messages to the queue in ETA order and acknowledge them; put the
        others aside until their ETA (at most :data:`_RELAY_MAX_DELAY`)."""
        now = time.time()
        due: list[tuple[float, int, JsMsg]] = []
        later: list[tuple[str, bytes]] = []
        for msg in msgs:
            eta = _msg_eta(msg)
            if eta <= now + _ETA_SLACK:
                due.append((eta, msg.metadata.stream_seq, msg))
            else:
                delay = round(min(eta - now, _RELAY_MAX_DELAY) * 1e9)
                later.append((msg.reply, b"-NAK " + json.dumps({"delay": delay}).encode()))
        if due:
            due.sort(key=lambda entry: (entry[0], entry[1]))
            copies = [_relayed_copy(q, msg) for *_, msg in due]
            await self.publish_all(copies, f"relaying due messages to queue {q.name!r}")
            await self._settle([msg.reply for *_, msg in due], b"+ACK", "acking relayed messages")
        if later:
            await self._settle_each(later, "putting waiting messages aside")

    async def _adopt(self, q: _Queue) -> None:
        """On a server with message schedules: once per broker lifetime, turn the messages
        a schedule relay left waiting on ``q`` (the server was upgraded under them) into
        message schedules (or due messages), then delete the relay's consumer. Retried
        with a bounded backoff until done."""
        what = f"adopting the relayed ETAs of queue {q.name!r}"
        retry = RetryBackoff(logger, what, {"queue": q.name})
        while True:
            try:
                with translate_errors(what):
                    await self._adopt_once(q)
            except BrokerError as exc:
                await retry.failed(exc)
                continue
            q.adopted = True
            return

    async def _adopt_once(self, q: _Queue) -> None:
        js = self.js
        try:
            await js.consumer_info(self.stream, q.relay)
        except (ConsumerNotFoundError, StreamNotFoundError):
            return  # no relay ever ran on this queue: nothing to adopt
        stored = await self.read_range(self.stream, f"{q.scheduled}.*")
        waiting = sorted(
            (
                (_eta(message), message.seq, message)
                for message in stored
                if not header_value(message.headers, "Nats-Schedule")
            ),
            key=lambda entry: (entry[0], entry[1]),
        )
        now = time.time()
        requests: list[Request] = []
        for eta, seq, message in waiting:
            # the id a relay gives its copy: one relayed before the upgrade is a duplicate
            headers = [
                *_kept_headers(message.headers, ("tasqueue-eta",)),
                ("Nats-Msg-Id", f"relay:{seq}"),
            ]
            if eta <= now + _ETA_SLACK:
                target = q.subject_of(_priority(message.headers))
                requests.append((target, message.payload, [*headers, (H_ETA, repr(eta))]))
            else:
                requests.append(self._schedule(q, f"r{seq}", message.payload, eta, headers))
        if requests:
            await self.publish_all(requests, f"adopting the relayed ETAs of queue {q.name!r}")
        for _, seq, _ in waiting:
            await js.delete_msg(self.stream, seq)
        with contextlib.suppress(ConsumerNotFoundError):
            await js.delete_consumer(self.stream, q.relay)
        if waiting:
            logger.info(
                "queue %r: %d messages waiting for their ETA from before the server had "
                "message schedules are message schedules now",
                q.name,
                len(waiting),
                extra={"queue": q.name},
            )

    # -- leases -----------------------------------------------------------------------------

    def _lease_held(self, lease: _Lease) -> bool:
        return not lease.lost and anyio.current_time() - lease.base < self._lease_limit

    async def _renew_forever(self) -> None:
        interval = self.ack_wait / 3
        while True:
            await anyio.sleep(interval)
            try:
                await self.renew_leases()
            except BrokerError:
                logger.exception("renewing leases failed; trying again in %.2fs", interval)

    async def renew_leases(self) -> None:
        """Renew every message this broker holds, now: a ``+WPI`` each, then one flush
        (one round trip). Runs every ``ack_wait / 3`` seconds by itself.

        A message not renewed within its ack wait is marked lost instead (its process
        was paused or cut off: JetStream has delivered it again). Messages of deliveries
        garbage-collected unsettled are given back with ``-NAK``.
        """
        client = self.client
        with translate_errors("renewing leases"):
            while self._abandoned:
                lease = self._abandoned.popleft()
                if self._leases.get(lease.reply) is lease:
                    del self._leases[lease.reply]
                    await client.publish(lease.reply, b"-NAK")
            now = anyio.current_time()
            alive: list[_Lease] = []
            for reply, lease in list(self._leases.items()):
                if now - lease.base >= self._lease_limit:
                    lease.lost = True
                    del self._leases[reply]
                    logger.warning(
                        "lost the lease of a message (not renewed within %.3g s); "
                        "JetStream delivers it again",
                        self.ack_wait,
                    )
                    continue
                alive.append(lease)
            for lease in alive:
                await client.publish(lease.reply, b"+WPI")
            await client.flush(self.timeout)
        for lease in alive:
            lease.base = max(lease.base, now)

    # -- inspection -------------------------------------------------------------------------

    async def get_pending(self, queue: str) -> list[bytes]:
        """Messages on ``queue`` not delivered yet, in delivery order (higher priorities
        first, oldest first within a priority).

        One round trip for the priorities in use, one for each consumer's delivered
        sequence, then one per 256 messages (batched direct gets past it). A message held by a worker that died is not
        listed until JetStream delivers it again.

        :param queue: the queue
        :return: the messages' data
        """
        return [m.payload for m in await self._undelivered(self._queue(queue))]

    async def _levels(self, q: _Queue) -> dict[int, int]:
        """The priorities above 0 with messages on ``q`` (due, held or not), and how many
        each has: one stream info, highest priority first."""
        info = await self.js.stream_info(self.stream, subjects_filter=q.levels_filter)
        found = {}
        for subject, n in info.subjects.items():
            level = subject.rpartition(".")[2]
            if n and len(level) == 1 and level in "123456789":
                found[int(level)] = n
        return dict(sorted(found.items(), reverse=True))

    async def _undelivered(self, q: _Queue) -> list[StoredMsg]:
        """The due messages of ``q`` its consumers have not delivered yet, in delivery
        order: higher priorities first, oldest first within a priority."""
        with translate_errors(f"reading queue {q.name!r}"):
            out: list[StoredMsg] = []
            for level in [*await self._levels(q), 0]:
                start = 1
                try:
                    info = await self.js.consumer_info(
                        self.stream, q.consumer_of(level) if level else q.consumer
                    )
                    start = int(info.raw.get("delivered", {}).get("stream_seq", 0)) + 1
                except ConsumerNotFoundError:
                    pass
                out += await self.read_range(self.stream, q.subject_of(level), start)
            return out

    # -- queue limits -------------------------------------------------------------------------

    async def _change_limits(
        self, queue: str, change: Callable[[Permits], tuple[float, bool]]
    ) -> float:
        """Apply ``change`` to ``queue``'s permits, stored in the KV bucket
        ``<prefix>_limits`` (created on first use) under the queue's name, by
        compare-and-set on the key's revision, again on a conflict. ``change`` returns
        its answer and whether it changed the permits."""
        validate_queue(queue)
        if self._limits_kv is None:
            self._limits_kv = await self.js.create_key_value(
                f"{self.prefix}_limits",
                storage=self.storage,
                replicas=self.replicas,
                placement=self.placement,
            )
        kv = self._limits_kv
        for _ in range(_LIMIT_CONFLICTS):
            revision = 0
            state = Permits()
            try:
                entry = await kv.get(queue)
            except KeyNotFoundError:
                pass
            else:
                revision = entry.revision
                state = _unpack_limits(entry.value)
            answer, changed = change(state)
            if not changed:
                return answer
            try:
                if revision:
                    await kv.update(queue, _pack_limits(state), revision)
                else:
                    await kv.create(queue, _pack_limits(state))
            except (WrongRevisionError, KeyExistsError):
                await anyio.sleep(random.uniform(0, 0.005))  # another worker got there first
                continue
            return answer
        raise BrokerError(f"the permits of queue {queue!r} kept changing under this broker")

    async def acquire_permit(
        self, queue: str, limits: QueueLimits, token: str, lease: float
    ) -> float:
        """Take a permit to start a job of ``queue`` under ``limits`` (see
        :meth:`~tasqueue_anyio.abc.Broker.acquire_permit`): the permits are one value of
        the KV bucket ``<prefix>_limits``, changed by compare-and-set (two round trips;
        more when workers race); this client's clock.

        :return: 0 when taken, else the seconds until one may be free
        """

        def take(state: Permits) -> tuple[float, bool]:
            # written only when taken: a refusal costs no write (what it pruned from the
            # window and the slots is pruned again by the next take)
            wait = permit_wait(state, limits, token, lease, time.time())
            return wait, wait <= 0

        with translate_errors(f"taking a permit of queue {queue!r}"):
            return await self._change_limits(queue, take)

    async def release_permit(self, queue: str, token: str) -> None:
        """Free the running slot ``token`` holds, and announce it."""

        def release(state: Permits) -> tuple[float, bool]:
            released = state.running.pop(token, None) is not None
            return float(released), released

        with translate_errors(f"releasing a permit of queue {queue!r}"):
            released = await self._change_limits(queue, release)
        if released:  # as the other brokers: only a slot freed is announced
            await self.publish(limit_channel(queue), b"")

    async def renew_permits(self, queue: str, tokens: Collection[str], lease: float) -> None:
        """Extend the leases of the running slots ``tokens`` hold."""

        def renew(state: Permits) -> tuple[float, bool]:
            until = time.time() + lease
            held = [token for token in tokens if token in state.running]
            for token in held:
                state.running[token] = until
            return 0.0, bool(held)

        with translate_errors(f"renewing the permits of queue {queue!r}"):
            await self._change_limits(queue, renew)

    async def count(self, queue: str) -> QueueCounts:
        """How many messages ``queue`` holds, from the server's counters, no message
        read: the queue consumer's info (``num_pending``: pending; ``num_ack_pending``: in
        flight, fetched by a worker and not acked), and the same of each priority above 0
        that has messages (found by a third stream info), and two stream infos with a subject
        filter (dead letters, ``P.*.Q``; waiting messages, ``P.s.Q.*``, whose reply names
        each waiting message's subject, about 40 bytes each: the one part that grows with
        the queue). Three requests, one round trip each. On a server without message
        schedules, a message the relay is moving to the queue at that moment may be
        counted in neither.

        :param queue: the queue
        :return: the counts (zeros for an unknown queue)
        """
        q = self._queue(queue)
        js = self.js
        with translate_errors(f"counting queue {q.name!r}"):
            held = await js.stream_info(self.stream, subjects_filter=f"{self.prefix}.*.{q.name}")
            due = held.subjects.get(q.subject, 0)
            dead = held.subjects.get(q.dead, 0)
            waiting = await js.stream_info(self.stream, subjects_filter=f"{q.scheduled}.*")
            scheduled = sum(waiting.subjects.values())
            try:
                info = await js.consumer_info(self.stream, q.consumer)
            except ConsumerNotFoundError:
                pending, in_flight = due, 0
            else:
                pending, in_flight = info.num_pending, info.num_ack_pending
            for level, n in (await self._levels(q)).items():
                try:
                    info = await js.consumer_info(self.stream, q.consumer_of(level))
                except ConsumerNotFoundError:
                    pending += n
                else:
                    pending += info.num_pending
                    in_flight += info.num_ack_pending
        return QueueCounts(pending=pending, scheduled=scheduled, in_flight=in_flight, dead=dead)

    async def get_scheduled(self, queue: str) -> list[tuple[float, bytes]]:
        """Messages on ``queue`` waiting for their ETA, as ``(eta, data)`` in ETA order.

        :param queue: the queue
        :return: ``(eta, data)`` pairs, earliest first (equal ETAs in publishing order)
        """
        q = self._queue(queue)
        with translate_errors(f"reading the schedules of queue {q.name!r}"):
            messages = await self.read_range(self.stream, f"{q.scheduled}.*")
        entries = [(_eta(m), m.seq, m.payload) for m in messages]
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        return [(eta, data) for eta, _, data in entries]

    async def get_dead_letters(self, queue: str) -> list[DeadLetter]:
        """Messages of ``queue`` set aside with :meth:`NatsDelivery.dead_letter`; each one's
        id is its stream sequence.

        :param queue: the queue
        :return: the dead letters, oldest first
        """
        return [letter for letter, _ in await self._dead_entries(queue)]

    async def _dead_entries(self, queue: str) -> list[tuple[DeadLetter, int]]:
        q = self._queue(queue)
        with translate_errors(f"reading the dead letters of queue {q.name!r}"):
            messages = await self.read_range(self.stream, q.dead)
        out = []
        for message in messages:
            try:
                data, reason, at = msgpack.unpackb(message.payload, raw=False, use_list=True)
                if not isinstance(data, bytes):
                    raise TypeError("data is not bytes")
                letter = DeadLetter(
                    queue=q.name, data=data, reason=str(reason), at=float(at), id=str(message.seq)
                )
            except Exception:
                letter = DeadLetter(
                    queue=q.name,
                    data=message.payload,
                    reason="unreadable entry",
                    at=message.time.timestamp(),
                    id=str(message.seq),
                )
            out.append((letter, message.seq))
        return out

    async def _delete(self, sequences: Sequence[int], what: str) -> list[bool]:
        """Delete stream messages by sequence, pipelined (one round trip); per message,
        whether this call deleted it (``False``: it was gone already)."""
        subject = f"{self.js.prefix}.STREAM.MSG.DELETE.{self.stream}"
        requests: list[Request] = [
            (subject, json.dumps({"seq": seq, "no_erase": True}).encode(), ())
            for seq in sequences
        ]
        deleted = []
        with translate_errors(what):
            for reply in await self.request_many(requests):
                if isinstance(reply, NatsError):
                    raise reply
                try:
                    deleted.append(bool(_api_reply(reply, subject).get("success")))
                except JetStreamAPIError:
                    deleted.append(False)  # not found: another caller deleted it
        return deleted

    async def remove_dead_letters(
        self, queue: str, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        """Remove dead letters of ``queue`` (those of ``ids``, stream sequences, or all);
        return those this call removed. Reads them, then deletes them by sequence,
        pipelined.

        :param queue: the queue
        :param ids: the dead letters' ids (``None``: all)
        :return: the removed dead letters, oldest first
        """
        wanted = None if ids is None else set(ids)
        chosen = [
            (letter, seq)
            for letter, seq in await self._dead_entries(queue)
            if wanted is None or letter.id in wanted
        ]
        if not chosen:
            return []
        deleted = await self._delete([seq for _, seq in chosen], "removing dead letters")
        return [letter for (letter, _), ok in zip(chosen, deleted, strict=True) if ok]

    async def purge(self, queue: str) -> list[bytes]:
        """Remove the messages of ``queue`` not delivered to a worker (due ones after the
        queue consumer's delivered sequence, and waiting ones) and return their data:
        read as :meth:`get_pending` and :meth:`get_scheduled` read them, then deleted by
        stream sequence, pipelined. Messages delivered and not acked stay. A message
        deleted by someone else meanwhile is not returned.

        :param queue: the queue
        :return: the due messages' data (oldest first), then the waiting ones' (ETA order)
        """
        q = self._queue(queue)
        due = await self._undelivered(q)
        with translate_errors(f"reading the schedules of queue {q.name!r}"):
            waiting = await self.read_range(self.stream, f"{q.scheduled}.*")
        waiting.sort(key=lambda m: (_eta(m), m.seq))
        messages = [*due, *waiting]
        if not messages:
            return []
        deleted = await self._delete([m.seq for m in messages], f"purging queue {q.name!r}")
        return [m.payload for m, ok in zip(messages, deleted, strict=True) if ok]

    # -- events -----------------------------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> None:
        """Publish ``data`` on ``channel`` (core NATS: best effort, no history).

        :param channel: the channel name
        :param data: the message
        """
        subject = self._event_subject(channel)
        with translate_errors("publishing an event"):
            await self.client.publish(subject, data)

    @asynccontextmanager
    async def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AsyncIterator[None]:
        """Call ``callback`` with every message published on ``channel`` inside the block.

        One subscription per channel, read by a task in the broker's task group, which
        calls the callbacks in publishing order. Entering returns once the server has
        the subscription, so every message published after that is seen.

        :param channel: the channel name
        :param callback: a quick, non-blocking function of the message
        """
        tg = self._require_open()
        subject = self._event_subject(channel)
        lock = self._channel_lock
        assert lock is not None
        async with lock:
            entry = self._channels.get(subject)
            if entry is None:
                with translate_errors(f"subscribing to channel {channel!r}"):
                    sub = await self.client.subscribe(subject)
                    try:
                        await self.client.flush(self.timeout)
                    except BaseException:
                        with anyio.CancelScope(shield=True):
                            await sub.unsubscribe()
                        raise
                entry = self._channels[subject] = _Channel(sub)
                tg.start_soon(self._read_channel, subject, entry, name=f"{self!r} {subject}")
            entry.callbacks.append(callback)
        try:
            yield
        finally:
            entry.callbacks.remove(callback)
            if not entry.callbacks and self._channels.get(subject) is entry:
                del self._channels[subject]
                with anyio.CancelScope(shield=True):
                    try:
                        await entry.sub.unsubscribe()
                    except NatsError:
                        logger.debug("unsubscribing from %r failed", subject, exc_info=True)

    async def _read_channel(self, subject: str, entry: _Channel) -> None:
        while True:
            try:
                msg = await entry.sub.next_msg()
            except SlowConsumerError as exc:
                logger.warning("events on %r were dropped: %s", subject, exc)
                continue
            except ConnectionClosedError:
                return  # unsubscribed, or the client closed
            for callback in tuple(entry.callbacks):
                try:
                    callback(msg.payload)
                except Exception:
                    logger.exception(
                        "subscriber %r of %r raised",
                        callback,
                        subject,
                        extra={"channel": subject},
                    )


def _eta(message: StoredMsg) -> float:
    """The ETA of a scheduled message: our header, else the schedule's own time."""
    value = header_value(message.headers, H_ETA)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    schedule = header_value(message.headers, "Nats-Schedule")
    if schedule.startswith("@at "):
        try:
            return parse_timestamp(schedule[4:].strip()).timestamp()
        except ValueError:
            pass
    return message.time.timestamp()
