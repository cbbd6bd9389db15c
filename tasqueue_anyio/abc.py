"""The backend contracts: :class:`Broker` (moves messages) and :class:`Results` (keeps state).

A backend is an async context manager that owns its connections and any background task
it needs; ``async with backend:`` opens it and leaving the block closes it. Entering an
open backend again is allowed and counted: it closes when the last entry exits (several
servers of one process may share a backend, each entering it). Every method
may raise :class:`~tasqueue_anyio.BrokerError` when the server behind the backend fails.

Messages are opaque ``bytes`` to a backend: the server encodes and decodes them.
Timestamps (``eta``) are POSIX seconds (``time.time()``), because they cross processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

import attrs
import msgpack
from anyio.streams.memory import MemoryObjectSendStream

__all__ = [
    "FINAL_STATUSES",
    "MAX_PROGRESS_SIZE",
    "MAX_WORKER_JOBS",
    "MAX_WORKER_RECORD_SIZE",
    "Broker",
    "DeadLetter",
    "Delivery",
    "Envelope",
    "JobRecord",
    "ParentRecord",
    "QueueCounts",
    "QueueLimits",
    "ResultCounts",
    "Results",
    "ScheduleRecord",
    "WorkerRecord",
    "check_progress",
    "check_worker_ttl",
    "limit_channel",
    "may_start",
    "refuse_result",
    "run_retry",
    "run_token",
]

_B = TypeVar("_B", bound="Broker")
_R = TypeVar("_R", bound="Results")

#: The largest progress a job stores (bytes; :meth:`Results.set_progress`).
MAX_PROGRESS_SIZE = 4096

#: Statuses after which a job never runs again (string values of :class:`~tasqueue_anyio.Status`).
FINAL_STATUSES: frozenset[str] = frozenset({"successful", "failed", "cancelled"})


@attrs.frozen(kw_only=True)
class Envelope:
    """A message to put on a queue.

    :param queue: the (validated) queue name
    :param data: the encoded message
    :param id: a unique id of this message (job id and try number): enqueueing a
        message whose id a message still on the broker has (due, waiting for its ETA,
        held by a worker or put back; not acked nor dead-lettered) stores nothing, so a
        repeated enqueue of the same message is harmless (see
        :meth:`Broker.enqueue_many`)
    :param eta: POSIX time before which the message must not be delivered, or ``None``
    :param priority: 0 to 9: a due message of a higher priority is delivered before every
        due message of a lower one on its queue; FIFO within a priority. It stays with
        the message when it is put back or comes back after a lost lease. Brokers check
        a priority other than 0 (:class:`~tasqueue_anyio.InvalidInputError`)
    """

    queue: str
    data: bytes
    id: str
    eta: float | None = None
    priority: int = 0


@attrs.frozen(kw_only=True)
class DeadLetter:
    """A message a worker could not process (it did not decode) and set aside.

    :ivar id: identifies it among its queue's dead letters (for
        :meth:`Broker.remove_dead_letters`): the message's id, or the broker's own
        (NATS: the stream sequence); empty for one a version without ids stored
    """

    queue: str
    data: bytes
    reason: str
    at: float
    id: str = ""


@attrs.frozen(kw_only=True)
class QueueCounts:
    """How many messages a queue holds (:meth:`Broker.count`).

    :ivar pending: due and not held by a worker
    :ivar scheduled: waiting for their ETA
    :ivar in_flight: held by a worker, not settled yet
    :ivar dead: set aside as dead letters
    """

    pending: int
    scheduled: int
    in_flight: int
    dead: int


def _check_limit(inst: object, attribute: attrs.Attribute[int | None], value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000
    ):
        from ._exceptions import InvalidInputError

        raise InvalidInputError(
            f"{attribute.name} must be None or an int from 1 to 1000000, got {value!r}"
        )


def _check_per(inst: object, attribute: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.001 <= value <= 86400 * 366
    ):
        from ._exceptions import InvalidInputError

        raise InvalidInputError(f"per must be seconds from 0.001 to a year, got {value!r}")


@attrs.frozen(kw_only=True)
class QueueLimits:
    """Limits on the jobs of one queue, shared by every worker of a backend
    (:meth:`Broker.acquire_permit`).

    :param runs: at most this many jobs start in any ``per`` seconds (a sliding window)
    :param per: the window of ``runs``, in seconds
    :param running: at most this many jobs run at once
    """

    runs: int | None = attrs.field(default=None, validator=_check_limit)
    per: float = attrs.field(default=1.0, validator=_check_per)
    running: int | None = attrs.field(default=None, validator=_check_limit)


@attrs.frozen(kw_only=True)
class ResultCounts:
    """How many jobs ended each way (:meth:`Results.count_ended`): the lengths of the
    success and failed listings."""

    successful: int
    failed: int


@attrs.frozen(kw_only=True)
class JobRecord:
    """The stored state of one job.

    :param status: the job's status (the string value of a ``Status``); authoritative
        over any status encoded inside ``data``
    :param data: the encoded job message
    :param cancel_requested: set by :meth:`Results.request_cancel` on a running job, so
        that a redelivery of it never starts again
    :param run: the fencing token of the run that wrote the record (empty when none;
        :func:`run_token` makes one per run): a run whose broker lease was lost cannot
        write over the run that took the job over, because :meth:`Results.update_job`
        and :meth:`Results.set_result` given a ``run`` only write while it is still the
        stored one
    :param result: write-only: a result that :meth:`Results.update_job` (and
        :meth:`Results.end_job`) store as the job's result in the same atomic step as the
        record, only if the record is written; never stored inside the record, and
        ``None`` in what :meth:`Results.get_job` returns. ``set_jobs``, ``create_jobs``
        and ``start_job`` refuse a record carrying one
    :param hold_for: write-only: seconds, after :meth:`Results.update_job` (or
        :meth:`Results.end_job`) wrote this record with a final status, during which the
        job's id stays taken (:meth:`Results.claim_jobs` does not give it to a new job;
        ``Job.unique_for``). 0: free at once. Never read back (0 in what
        :meth:`Results.get_job` returns)
    :param ttl: write-only: with a final status written by :meth:`Results.update_job` (or
        :meth:`Results.end_job`), the seconds the job's state and its result (one
        written in the same step included) are kept, instead of the store's defaults
        (``Job.successful_ttl``, ``Job.failed_ttl``); ``None`` in what
        :meth:`Results.get_job` returns. A store that cannot keep a TTL per job refuses
        such jobs when they are enqueued (:meth:`Results.check_job_ttl`)
    :param progress: the job's last progress (:meth:`Results.set_progress`; opaque
        bytes), as read. ``update_job``, ``end_job`` and ``request_cancel`` keep the
        stored one (so a job's last progress stays after it ended); ``set_jobs`` (a new
        enqueue) and ``start_job`` (a new run reports its own) clear it
    """

    status: str
    data: bytes
    cancel_requested: bool = False
    run: str = ""
    result: bytes | None = None
    progress: bytes | None = None
    hold_for: float = 0.0
    ttl: float | None = None


def limit_channel(queue: str) -> str:
    """The broadcast channel on which a broker announces that a ``running`` slot of
    ``queue`` was released (:meth:`Broker.release_permit`)."""
    return f"~limit:{queue}"


def refuse_result(records: Iterable[JobRecord], method: str) -> None:
    """Raise :class:`~tasqueue_anyio.InvalidInputError` if a record carries a result
    (only ``update_job`` and ``end_job`` write results)."""
    for record in records:
        if record.result is not None:
            from ._exceptions import InvalidInputError

            raise InvalidInputError(
                f"Results.{method} does not store results: a record's result is written "
                f"by update_job or end_job"
            )


def check_progress(data: bytes) -> None:
    """Raise :class:`~tasqueue_anyio.InvalidInputError` unless ``data`` is bytes of at
    most :data:`MAX_PROGRESS_SIZE`."""
    if not isinstance(data, bytes) or len(data) > MAX_PROGRESS_SIZE:
        from ._exceptions import InvalidInputError

        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise InvalidInputError(
            f"progress must be bytes of at most {MAX_PROGRESS_SIZE}, got {size}"
        )


def run_token(retried: int, attempt: int) -> str:
    """A new run's fencing token: ``"<retried>.<attempt>.<nonce>"``, with a random nonce.

    The nonce makes each run's token its own even when a broker hands the same message
    out twice with the same delivery count (JetStream can, after a server crash): the
    second run's :meth:`Results.start_job` then fences the first, whose writes with its
    token are refused.
    """
    return f"{retried}.{attempt}.{os.urandom(6).hex()}"


def run_retry(run: str) -> int | None:
    """The retry a run token belongs to: ``retried`` of a token
    ``"<retried>.<attempt>.<nonce>"`` (:func:`run_token`; also of the ``"<retried>.<attempt>"``
    tokens of earlier versions); ``None`` for an empty or other token."""
    if not run:
        return None
    head, dot, _ = run.partition(".")
    return int(head) if dot and head.isascii() and head.isdigit() else None


def may_start(current: JobRecord | None, record: JobRecord) -> bool:
    """Whether a job stored as ``current`` may start as ``record``: the rule of
    :meth:`Results.start_job`.

    It may when it has no state; never when it is final or a cancel was requested; and
    not from a message of an earlier try than the stored run's (compared by
    :func:`run_retry`): a ``retrying`` record written by try ``r`` lets only try ``r + 1``
    or later start, any other by try ``r`` lets try ``r`` (a redelivery) or later start.
    So the message of a failed run that comes back after its retry was enqueued (its
    broker enqueued the retry, then lost the ack) does not run beside the retry.
    """
    if current is None:
        return True
    if current.status in FINAL_STATUSES or current.cancel_requested:
        return False
    new, stored = run_retry(record.run), run_retry(current.run)
    if new is None or stored is None:
        return True
    return new > stored if current.status == "retrying" else new >= stored


@attrs.frozen(kw_only=True)
class ParentRecord:
    """The stored state of a group or a chain.

    :param kind: ``"group"`` or ``"chain"``
    :param status: the parent's status (a ``Status`` value)
    :param data: the encoded group or chain (opaque to the backend)
    :param members: member job id → that member's last known status
    :param error: why the parent failed or was cancelled, if it did
    """

    kind: str
    status: str
    data: bytes
    members: dict[str, str]
    error: str | None = None


@attrs.frozen(kw_only=True)
class ScheduleRecord:
    """A stored cron schedule.

    :param id: the schedule id
    :param data: the encoded job that runs at each fire time (opaque to the backend)
    :param next_fire: the POSIX time of the next fire time that has not been enqueued yet
    """

    id: str
    data: bytes
    next_fire: float


#: The most job ids a :class:`WorkerRecord` lists in ``jobs`` (a worker running more
#: lists the first of them).
MAX_WORKER_JOBS = 100
#: The largest encoded :class:`WorkerRecord`, in bytes: :meth:`WorkerRecord.decode`
#: refuses a longer one. Every record that can be built encodes within it.
MAX_WORKER_RECORD_SIZE = 512 * 1024
#: The most queues a :class:`WorkerRecord` lists.
_MAX_WORKER_QUEUES = 1024
#: The longest id, host name, backend, version, queue name or job id of a
#: :class:`WorkerRecord`, in UTF-8 bytes.
_MAX_WORKER_TEXT = 255
#: The longest TTL of a worker record (:func:`check_worker_ttl`): a day.
_MAX_WORKER_TTL = 86400.0
#: The version of the encoded form of a :class:`WorkerRecord`.
_WORKER_SCHEMA = 1
_WORKER_FIELDS = (
    "id",
    "hostname",
    "pid",
    "queues",
    "started_at",
    "seen_at",
    "jobs",
    "backend",
    "version",
)


def _worker_text(value: object, name: str, *, empty: bool = False) -> str:
    size = -1
    if isinstance(value, str):
        # lone surrogates are not UTF-8: msgpack could not store them
        with contextlib.suppress(UnicodeEncodeError):
            size = len(value.encode())
        if 0 < size <= _MAX_WORKER_TEXT or (empty and size == 0):
            return value
    raise ValueError(
        f"{name} must be a {'' if empty else 'non-empty '}str of at most "
        f"{_MAX_WORKER_TEXT} UTF-8 bytes, got {value!r:.300}"
    )


def _worker_time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of POSIX seconds, got {value!r}")
    return float(value)


def _worker_count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value < 2**63:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r:.100}")
    return value


def _sized(value: object) -> str:
    """``value``'s type, and its length if it has one (for error messages)."""
    if isinstance(value, (dict, list, tuple, str, bytes)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _check_worker(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a :class:`WorkerRecord`, checked (types, sizes, ranges) and
    normalised (floats, a new dict of queues, a tuple of jobs).

    :raises ValueError: what is wrong
    """
    queues = values["queues"]
    if not isinstance(queues, dict) or len(queues) > _MAX_WORKER_QUEUES:
        raise ValueError(
            f"queues must be a dict of at most {_MAX_WORKER_QUEUES} queue names to "
            f"concurrencies, got {_sized(queues)}"
        )
    jobs = values["jobs"]
    if not isinstance(jobs, (tuple, list)) or len(jobs) > MAX_WORKER_JOBS:
        raise ValueError(
            f"jobs must be a tuple of at most {MAX_WORKER_JOBS} job ids, got {_sized(jobs)}"
        )
    return {
        "id": _worker_text(values["id"], "id"),
        "hostname": _worker_text(values["hostname"], "hostname", empty=True),
        "pid": _worker_count(values["pid"], "pid", 0),
        "queues": {
            _worker_text(queue, "a queue name"): _worker_count(concurrency, "a concurrency", 1)
            for queue, concurrency in queues.items()
        },
        "started_at": _worker_time(values["started_at"], "started_at"),
        "seen_at": _worker_time(values["seen_at"], "seen_at"),
        "jobs": tuple(_worker_text(job_id, "a job id") for job_id in jobs),
        "backend": _worker_text(values["backend"], "backend", empty=True),
        "version": _worker_text(values["version"], "version", empty=True),
    }


def _refuse_extension(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


@attrs.frozen(kw_only=True)
class WorkerRecord:
    """The heartbeat of one running :meth:`Server.run() <tasqueue_anyio.Server.run>`: what
    the worker registry (:meth:`Results.put_worker`, :meth:`Results.get_workers`) keeps,
    for dashboards and ``tasqueue workers``.

    Checked when built (:class:`~tasqueue_anyio.InvalidInputError`): texts are at most 255
    UTF-8 bytes, at most 1024 queues and :data:`MAX_WORKER_JOBS` jobs, times finite.
    :meth:`encode` and :meth:`decode` are its stored form, a msgpack map (the field names
    below and ``v``: 1), the same on every backend.

    :param id: unique per run: ``"<hostname>:<pid>:<6 random hex digits>"``
    :param hostname: the host the worker runs on
    :param pid: its process id
    :param queues: queue name → concurrency, the queues it consumes
    :param started_at: POSIX time the run started
    :param seen_at: POSIX time of this heartbeat
    :param jobs: ids of the jobs it has in hand now (at most :data:`MAX_WORKER_JOBS`)
    :param backend: the AnyIO backend it runs on, ``"asyncio"`` or ``"trio"``
    :param version: the version of tasqueue_anyio it runs
    """

    id: str
    hostname: str
    pid: int
    queues: dict[str, int]
    started_at: float
    seen_at: float
    jobs: tuple[str, ...] = ()
    backend: str = ""
    version: str = ""

    def __attrs_post_init__(self) -> None:
        try:
            checked = _check_worker({name: getattr(self, name) for name in _WORKER_FIELDS})
        except ValueError as exc:
            from ._exceptions import InvalidInputError

            raise InvalidInputError(f"invalid worker record: {exc}") from None
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def encode(self) -> bytes:
        """The stored form: a msgpack map of the fields and ``v`` (the schema, 1)."""
        value: dict[str, Any] = {"v": _WORKER_SCHEMA}
        for name in _WORKER_FIELDS:
            value[name] = getattr(self, name)
        value["jobs"] = list(self.jobs)
        packed: bytes = msgpack.packb(value, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> WorkerRecord:
        """Read a stored record, as untrusted bytes: at most
        :data:`MAX_WORKER_RECORD_SIZE` of them, a msgpack map of schema 1 with every field
        of the right type and size, no extension types (fields it does not know are
        ignored).

        :raises DecodeError: what is wrong
        """
        from ._exceptions import DecodeError

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"a worker record must be bytes, got {type(data).__name__}")
        if len(data) > MAX_WORKER_RECORD_SIZE:
            raise DecodeError(
                f"a worker record is {len(data)} bytes, over the limit of {MAX_WORKER_RECORD_SIZE}"
            )
        try:
            value = msgpack.unpackb(
                data, raw=False, strict_map_key=True, ext_hook=_refuse_extension
            )
        except Exception as exc:  # msgpack raises several unrelated types
            raise DecodeError(f"not a msgpack worker record: {exc or type(exc).__name__}") from None
        if not isinstance(value, dict):
            raise DecodeError(f"a worker record must be a map, got {type(value).__name__}")
        if value.get("v") != _WORKER_SCHEMA:
            raise DecodeError(f"unknown worker record schema {value.get('v')!r:.50}")
        missing = [name for name in _WORKER_FIELDS if name not in value]
        if missing:
            raise DecodeError(f"a worker record lacks {', '.join(missing)}")
        try:
            checked = _check_worker(value)
        except ValueError as exc:
            raise DecodeError(f"invalid worker record: {exc}") from None
        return cls(**checked)


def check_worker_ttl(ttl: object) -> float:
    """Return ``ttl`` as a float if it is seconds a worker record may live
    (:meth:`Results.put_worker`): finite, over 0, at most a day.

    :raises InvalidInputError: it is not
    """
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not 0 < ttl <= _MAX_WORKER_TTL
    ):
        from ._exceptions import InvalidInputError

        raise InvalidInputError(f"a worker ttl must be seconds > 0 and <= 86400, got {ttl!r}")
    return float(ttl)


class Delivery(metaclass=ABCMeta):
    """One message handed to a worker by :meth:`Broker.consume`.

    The broker keeps the message recorded as held until it is settled with exactly one of
    :meth:`ack`, :meth:`nack` or :meth:`dead_letter`; a held message whose worker dies
    comes back after the broker's lease. Settling an already settled delivery does nothing.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def data(self) -> bytes:
        """The message as it was enqueued."""

    @property
    @abstractmethod
    def queue(self) -> str:
        """The queue the message was taken from."""

    @property
    @abstractmethod
    def attempt(self) -> int:
        """How many times this message has been delivered, this time included (1 first)."""

    @abstractmethod
    async def ack(
        self,
        *,
        enqueue: Sequence[Envelope] = (),
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Remove the message for good and, in the same step, enqueue ``enqueue``.

        Brokers that can make the two one atomic write (or one round trip) do so; the
        others enqueue first, then remove, so a crash in between repeats, never loses.

        ``announce`` is ``(channel, message)`` pairs to publish (as
        :meth:`Broker.publish` would, best effort) once the message is removed, in the
        same step where the broker can; nothing is published when the lease was lost.

        :raises LeaseLostError: the lease was lost to another delivery of the message,
            whose run now owns the job (nothing was changed)
        :raises BrokerError: the message could not be removed
        """

    @abstractmethod
    async def nack(self, *, delay: float = 0) -> None:
        """Give the message back to its queue, deliverable again after ``delay`` seconds.

        With no delay the message goes to the front of the queue where the broker can do
        that (so a shutdown keeps the queue's order), else to the back.
        """

    @abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Remove the message from its queue and keep it in the dead-letter listing."""

    def abandon(self) -> None:
        """Give the delivery up unsettled, as if its worker had died: the broker stops
        renewing its lease and delivers the message again (given back at the broker's next
        renewal where it can, else once the lease runs out). For a worker whose settle
        failed: a failed :meth:`nack` leaves the delivery held, and a held delivery that
        stays referenced (by a logged traceback, say) would be renewed for as long.
        Settling it afterwards does nothing. No I/O; the default does nothing.
        """
        return None


class _MessageLimit:
    """The message size limit a broker or results store may have of its own."""

    __slots__ = ()

    @property
    def max_message_size(self) -> int | None:
        """The largest encoded job message (:attr:`Envelope.data`, :attr:`JobRecord.data`)
        or saved result (bytes) this backend can store, when it has a limit of its own: a
        server's limit less the backend's own headers and wrapping. Known once the backend
        is open; ``None`` (the default): no limit of its own.

        The :class:`~tasqueue_anyio.Server` refuses, before any I/O, a job whose message
        would not fit (with room for what its runs add), with
        :class:`~tasqueue_anyio.PayloadTooLargeError` saying :attr:`message_limit_cause`.
        """
        return None

    @property
    def message_limit_cause(self) -> str:
        """Why :attr:`max_message_size` is what it is and how to raise it (for error
        messages)."""
        return f"{self!r} stores messages of at most {self.max_message_size} bytes"


class Broker(_MessageLimit, metaclass=ABCMeta):
    """Moves messages between producers and workers, at least once.

    A message is delivered to one consumer at a time. A message held by a worker that
    dies is delivered again after the broker's lease; a live worker keeps its leases.
    Order within a queue is first in, first out for messages that are due.
    """

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        return None

    async def enqueue(self, message: Envelope) -> None:
        """Put one message on its queue (at ``message.eta`` if set)."""
        await self.enqueue_many([message])

    @abstractmethod
    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        """Put messages on their queues in one call (one round trip where possible).

        Either all messages are stored or the call raises; messages due now are
        delivered in the given order. A message whose ``Envelope.id`` a message on
        the broker still has (it was enqueued and is not acked nor dead-lettered yet,
        whether due, waiting for its ETA, held or put back) is not stored again: the
        worker relies on it to re-enqueue a retry that it cannot tell exists. (A broker
        may also remember ids for a while after their message is gone, as JetStream's
        duplicate window does, as long as a message whose id is gone can be enqueued
        again.)
        """

    @abstractmethod
    async def consume(self, queue: str, send_stream: MemoryObjectSendStream[Delivery]) -> None:
        """Feed ``queue``'s due messages into ``send_stream`` until cancelled.

        Closes ``send_stream`` when it returns (also when every receiving end is closed).
        A message taken from the queue but not handed over when the call is cancelled goes
        back to the queue; nothing is dropped. A hand-over cancelled at the very moment
        the receiver took the message may leave it both given back and received: the
        receiver's later settle then raises :class:`~tasqueue_anyio.BrokerError` (as for a lost lease) or
        the message is delivered twice, which at-least-once delivery allows.
        """

    @abstractmethod
    async def get_pending(self, queue: str) -> list[bytes]:
        """Messages on ``queue`` that are due and not held by a worker, oldest first.

        A broker knows nothing of job state: the message of a job cancelled while queued
        is listed until a worker drops it (:meth:`~tasqueue_anyio.Client.get_pending` adds each job's
        stored status).
        """

    @abstractmethod
    async def get_scheduled(self, queue: str) -> list[tuple[float, bytes]]:
        """Messages on ``queue`` waiting for their ETA, as ``(eta, data)`` in ETA order."""

    @abstractmethod
    async def get_dead_letters(self, queue: str) -> list[DeadLetter]:
        """Messages of ``queue`` set aside with :meth:`Delivery.dead_letter`, oldest first."""

    @abstractmethod
    async def purge(self, queue: str) -> list[bytes]:
        """Remove every message of ``queue`` that no worker holds (due ones and ones
        waiting for their ETA) and return their data (due ones first, then waiting ones
        in ETA order). Messages held by workers stay: their workers settle them.
        ``Client.purge`` records the purged messages' jobs ``cancelled``.
        """

    @abstractmethod
    async def remove_dead_letters(
        self, queue: str, ids: Collection[str] | None = None
    ) -> list[DeadLetter]:
        """Remove the dead letters of ``queue`` whose ``DeadLetter.id`` is in ``ids``
        (all of them when ``ids`` is ``None``) and return them, oldest first. Ids not
        found are ignored (another caller removed them). ``Client.replay_dead_letters``
        puts them back on their queue.
        """

    @abstractmethod
    async def count(self, queue: str) -> QueueCounts:
        """How many messages ``queue`` holds, by kind, without listing them (a few
        counters read in one round trip where the backend allows; each backend says its
        cost). The numbers agree with :meth:`get_pending`, :meth:`get_scheduled` and
        :meth:`get_dead_letters` at a quiet moment; an unknown queue counts zeros.
        """

    async def acquire_permit(
        self, queue: str, limits: QueueLimits, token: str, lease: float
    ) -> float:
        """Take a permit to start one job of ``queue`` under ``limits``, counted over every
        worker of this backend, all or nothing: one of the ``runs`` starts of the sliding
        window of ``per`` seconds (kept for ever), and one of the ``running`` slots, held
        by ``token`` until :meth:`release_permit`, or until ``lease`` seconds pass
        without :meth:`renew_permits` (a worker that died frees its slots).

        :return: 0 when the permit was taken; else how many seconds until one may be
            free (exact for ``runs``; for ``running`` the earliest lease expiry, at most
            1 s: a release is announced on :func:`limit_channel` before then)
        :raises InvalidInputError: the broker keeps no limits (the library's all do)
        """
        from ._exceptions import InvalidInputError

        raise InvalidInputError(f"{type(self).__name__} does not keep queue limits")

    async def release_permit(self, queue: str, token: str) -> None:
        """Free the ``running`` slot ``token`` holds (nothing if it holds none) and
        announce it on :func:`limit_channel`."""

    async def renew_permits(self, queue: str, tokens: Collection[str], lease: float) -> None:
        """Extend the leases of the ``running`` slots held by ``tokens`` to ``lease``
        seconds from now (a token whose slot expired stays free)."""

    @abstractmethod
    async def publish(self, channel: str, data: bytes) -> None:
        """Broadcast ``data`` to every current subscriber of ``channel`` (best effort)."""

    @abstractmethod
    def subscribe(
        self, channel: str, callback: Callable[[bytes], None]
    ) -> AbstractAsyncContextManager[None]:
        """Call ``callback(data)`` for every message published on ``channel`` while the
        returned async context manager is entered, in publishing order.

        The callback is sync and must return quickly (it only sets events or cancels
        scopes); the broker calls it from its own reader task, or inline from
        :meth:`publish` for an in-process broker. An exception it raises is logged and
        does not end the subscription.
        """


class Results(_MessageLimit, metaclass=ABCMeta):
    """Stores job state, saved results and the success and failed listings.

    Job state and saved results live in separate key spaces: no job id can reach
    another job's state or result. The conditional writes (``start_job``,
    ``update_job``, ``request_cancel``) are atomic.
    """

    async def __aenter__(self: _R) -> _R:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        return None

    @abstractmethod
    async def get_job(self, job_id: str) -> JobRecord:
        """The stored state of a job.

        :raises JobNotFoundError: nothing is stored under ``job_id``
        """

    @abstractmethod
    async def set_jobs(self, records: Mapping[str, JobRecord]) -> None:
        """Store the state of many jobs in one call, unconditionally (used on enqueue)."""

    async def create_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs that have none yet; leave the others as they are.

        Used for follow-up jobs and chain links, whose ids are fixed in advance, so a
        redelivered message cannot reset (and rerun) a follow-up that already ran.
        The default reads then writes; backends make it atomic.

        :return: the ids whose state this call created
        """
        created: dict[str, JobRecord] = {}
        for job_id, record in records.items():
            try:
                await self.get_job(job_id)
            except LookupError:
                created[job_id] = record
        if created:
            await self.set_jobs(created)
        return set(created)

    def check_job_ttl(self) -> None:
        """Raise :class:`~tasqueue_anyio.InvalidInputError` (saying why) if this store
        cannot keep a TTL per job (``JobRecord.ttl``). Called when a job that carries
        one is enqueued, so it is refused then rather than failing at its end."""

    async def claim_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs whose id is free; leave the others as they are.

        An id is free when it has no state, or its job ended (a final status) and the
        ``hold_for`` of the record that ended it has passed (by the store's clock). Used
        on enqueue, so a job id names one live job: enqueueing the id of a job that is
        queued, scheduled, running or held stores nothing. Atomic per id. The default
        reads then writes and keeps no holds; the library's stores are atomic and keep
        them.

        :return: the ids whose state this call stored
        """
        refuse_result(records.values(), "claim_jobs")
        free: dict[str, JobRecord] = {}
        for job_id, record in records.items():
            try:
                current = await self.get_job(job_id)
            except LookupError:
                free[job_id] = record
                continue
            if current.status in FINAL_STATUSES:
                free[job_id] = record
        if free:
            await self.set_jobs(free)
        return set(free)

    @abstractmethod
    async def start_job(self, job_id: str, record: JobRecord) -> JobRecord | None:
        """Atomically move a job to ``record`` if it may start.

        A job may start when it has no state, or when its status is not final, no cancel
        was requested for it, and ``record.run`` is not of an earlier try than the stored
        run (:func:`may_start` is the rule). Starting clears the stored progress.

        :return: ``None`` when ``record`` was written, else the current (unchanged) record
        """

    @abstractmethod
    async def update_job(
        self, job_id: str, record: JobRecord, *, expect: Collection[str], run: str | None = None
    ) -> bool:
        """Atomically write ``record`` if the job's current status is one of ``expect``
        (and, given ``run``, the stored ``run`` token equals it).

        When ``record.status`` is ``successful`` or ``failed`` the job id is added to the
        matching listing in the same step. ``cancel_requested`` and ``progress`` are kept
        as stored. A ``record.result`` is stored as the job's result in the same step
        (replacing any), only if the record is written.

        :return: whether ``record`` was written
        """

    async def end_job(
        self,
        job_id: str,
        record: JobRecord,
        *,
        expect: Collection[str],
        run: str | None,
        delivery: Delivery,
        announce: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        """Record the end of a run and settle its delivery: :meth:`update_job`, then
        ``delivery.ack()`` whether or not the record was written (a run whose job ended
        elsewhere has nothing left to do either), publishing ``announce`` only if it was.

        A store that shares a server with the broker may do both in one atomic step (the
        Redis store does, for a Redis broker on the same server); this default makes
        two calls, the record first, so a crash in between only repeats the delivery.

        :return: whether ``record`` was written
        :raises LeaseLostError: the ack found the lease lost (the record may be written)
        """
        written = await self.update_job(job_id, record, expect=expect, run=run)
        await delivery.ack(announce=announce if written else ())
        return written

    @abstractmethod
    async def request_cancel(self, job_id: str) -> JobRecord:
        """Atomically ask a job to stop.

        A ``queued`` or ``retrying`` job becomes ``cancelled`` at once; a ``processing``
        job is marked ``cancel_requested`` (its worker finishes it as ``cancelled``); a
        job in a final status is left as it is.

        :return: the record as it is after the call
        :raises JobNotFoundError: nothing is stored under ``job_id``
        """

    @abstractmethod
    async def get_result(self, job_id: str) -> bytes:
        """The result a job saved.

        :raises ResultNotFoundError: the job saved no result (or it expired)
        """

    @abstractmethod
    async def set_result(self, job_id: str, data: bytes, *, run: str | None = None) -> bool:
        """Store (replace) the result of a job; given ``run``, only while the job is
        ``processing`` under that run token (atomically).

        :return: whether it was stored
        """

    @abstractmethod
    async def set_progress(self, job_id: str, data: bytes, *, run: str) -> bool:
        """Atomically store ``data`` as the job's progress (``JobRecord.progress``)
        while the job is ``processing`` under ``run``; one round trip.

        :return: whether it was stored
        :raises InvalidInputError: ``data`` is over :data:`MAX_PROGRESS_SIZE` bytes
        """

    @abstractmethod
    async def count_ended(self) -> ResultCounts:
        """The lengths of the success and failed listings (what :meth:`get_success` and
        :meth:`get_failed` would return), without listing them."""

    @abstractmethod
    async def delete_job(self, job_id: str) -> None:
        """Forget a job: its state, its result and its place in the listings."""

    @abstractmethod
    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``, in the order they ended."""

    @abstractmethod
    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``, in the order they ended."""

    # -- groups and chains ("parents") ---------------------------------------------------

    @abstractmethod
    async def set_parent(self, parent_id: str, record: ParentRecord) -> None:
        """Store (replace) the state of a group or chain. Groups and chains share one key
        space, separate from jobs."""

    @abstractmethod
    async def get_parent(self, parent_id: str) -> ParentRecord:
        """The stored state of a group or chain.

        :raises NotFoundError: nothing is stored under ``parent_id``
        """

    @abstractmethod
    async def set_member_status(self, parent_id: str, job_id: str, status: str) -> dict[str, int]:
        """Atomically record a member's status; return how many members are in each status.

        Members not in the record are added. The returned counts cover every member
        (statuses with no member may be left out) and are cheap to compute: backends
        keep them as counters rather than recounting the members.

        :raises NotFoundError: nothing is stored under ``parent_id``
        """

    @abstractmethod
    async def set_parent_status(
        self, parent_id: str, status: str, *, expect: Collection[str], error: str | None = None
    ) -> bool:
        """Atomically set the parent's status (and ``error``, if given) if its current
        status is one of ``expect``.

        :return: whether it was written (``False`` also when nothing is stored)
        """

    # -- cron schedules --------------------------------------------------------------------

    @abstractmethod
    async def set_schedule(self, record: ScheduleRecord) -> None:
        """Store (replace) a schedule."""

    @abstractmethod
    async def get_schedules(self) -> list[ScheduleRecord]:
        """Every stored schedule, ordered by id."""

    @abstractmethod
    async def advance_schedule(
        self, schedule_id: str, expect_fire: float, next_fire: float
    ) -> bool:
        """Atomically move a schedule's ``next_fire`` from ``expect_fire`` to ``next_fire``.

        Only one of several servers racing to enqueue the same fire time wins.

        :return: whether it was moved (``False`` when it was not at ``expect_fire`` or
            the schedule does not exist)
        """

    @abstractmethod
    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule; return whether it existed."""

    # -- the worker registry (heartbeats) --------------------------------------------------

    @abstractmethod
    async def put_worker(self, record: WorkerRecord, ttl: float) -> None:
        """Store a running worker's record under ``record.id``, creating or replacing it.

        The record is gone ``ttl`` seconds after its last put unless it is put again: a
        running ``Server.run()`` puts its record every ``ttl / 3`` seconds (a heartbeat),
        so the record of a worker that died goes away by itself. Worker ids are free text:
        a backend that turns them into keys must encode them.

        :param record: the worker's record (its ``jobs`` are the ids in hand now)
        :param ttl: seconds (:func:`check_worker_ttl`: over 0, at most a day)
        :raises InvalidInputError: a bad ``ttl``
        """

    @abstractmethod
    async def get_workers(self) -> list[WorkerRecord]:
        """The records of the live workers, ordered by ``started_at`` (then ``id``).

        Never one whose ``ttl`` passed since its last :meth:`put_worker`, even if the
        backend has not deleted it yet (a backend may delete such records as it reads).
        A stored record that does not decode (:meth:`WorkerRecord.decode`) is left out and
        logged.
        """

    @abstractmethod
    async def remove_worker(self, worker_id: str) -> None:
        """Remove a worker's record (``Server.run()`` does as it ends). Idempotent: an
        unknown id (removed before, expired, never put) is not an error."""
