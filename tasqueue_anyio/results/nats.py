"""The NATS results store, on a JetStream key-value bucket. Runs on Trio and asyncio.

Keys
----
One bucket (default ``tasqueue``: stream ``KV_tasqueue``, history 1). The kind of a key
comes first, so no id can reach a key of another kind; the id is escaped into the KV
character set by :func:`~tasqueue_anyio._nats_backend.encode_token` (letters, digits,
``_`` and ``-`` kept, every other byte as ``=XX``: ``job:1`` → ``job=3A1``), so ids with
``:``, ``@``, ``+``, ``/``, ``.`` or any other character are safe::

    j.<id>    job state: msgpack {s: status, d: message, c: cancel requested, r: run,
              p: progress (when reported)};
              header ``Tasqueue-Status`` (the status again, for the listings)
    r.<id>    the job's saved result (the bytes as they are)
    g.<id>    the job's gate: empty, written before its state first becomes final,
              cancel-requested or retrying (see "Starting without a read")
    p.<id>    group or chain: msgpack {k, s, d, e, m: members, n: member counts}
    c.<id>    cron schedule: msgpack {d: data, f: next fire time (float64, exact)}
    w.<id>    a running worker's record (``WorkerRecord.encode``); header
              ``Tasqueue-Worker-TTL`` (the seconds it lives after its put)

Values are plain KV entries: any KV client (``nats-py``, the ``nats`` CLI) reads them.

Compare-and-set
---------------
Every conditional write (``start_job``, ``update_job``, ``request_cancel``,
``create_jobs``, ``set_member_status``, ``set_parent_status``, ``advance_schedule``) is a
publish with ``Nats-Expected-Last-Subject-Sequence``: it is stored only if the key is
still at the revision the decision was made on; on a conflict the key is read again and
the decision made again (at most ``max_conflicts`` times, with a short random backoff,
then :class:`~tasqueue_anyio.BrokerError`). ``set_result(run=...)`` publishes the result
with ``Nats-Expected-Last-Subject-Sequence-Subject`` pointing at the job's *state* key, so
the result is stored only while the state is still the ``processing`` record of that run:
one atomic write across two keys (nats-server 2.11+; older servers check, then write).

Starting without a read
-----------------------
A job may start while it is not final, no cancel was requested and the message is not of
a try the job moved past (:func:`~tasqueue_anyio.abc.may_start`), and the worker's store
has usually not seen the job it starts. On nats-server 2.11+ :meth:`NatsResults.start_job`
then publishes the ``processing`` record at once, with
``Nats-Expected-Last-Subject-Sequence: 0`` checked on the job's gate key (one round trip,
no read): it is stored only while the gate does not exist. Every write that makes a job
final, cancel-requested or ``retrying`` publishes the gate first, on the same connection
(the server stores one connection's publishes to a stream in order), unconfirmed for the
single-key transitions, confirmed in the pipelined batches. A gate that exists sends the start to
the read-and-decide path. A gate is not removed when a job is set back to ``queued``
(those starts just read first), only by ``delete_job`` or expiry (its TTL is one second
longer than the state's).

Round trips: the store remembers the last revision and value it wrote or read of each
key (a bounded cache), and writes within one process are serialised per key, so a
transition following one made here (``update_job`` after ``start_job``) is one round
trip. A decision *refused* on a remembered value is always confirmed on a fresh read.
Batches (``set_jobs``, ``create_jobs``) are pipelined: one round trip.

Listings
--------
The success and failed listings are not kept apart: a job is listed while the last
write of its state has status ``successful`` (or ``failed``), in the order of those
writes (the KV revision is the stream sequence, a monotonic counter). So listing is
atomic with the state write and costs no extra write, and a deleted or expired job
leaves the listings with its state. Reading one lists the last header of every job key
through a short-lived ephemeral consumer (headers only): a few round trips plus the
transfer of ~100 bytes per stored job.

Expiry
------
On nats-server 2.11+ every write of job state and group or chain state carries a
per-message TTL (``Nats-TTL``) of ``job_ttl``, and a result one of ``result_ttl``: an entry
expires that long after its last write (TTLs are whole seconds, at least 1). On an older
server (or with ``per_key_ttl=False``) the bucket's ``max_age`` is the longer of the two
instead, for every entry: the shorter one is not honoured, and cron schedules, which never
expire, move to a second bucket ``<bucket>_cron`` without a ``max_age``.

Worker records (``w.<id>``) live in the bucket of the schedules (so a ``max_age`` never
cuts one short). Each put carries its TTL in a header, and on nats-server 2.11+ a
``Nats-TTL`` too (whole seconds, rounded up), so the server removes the record of a worker
that stopped putting it. ``get_workers`` leaves out every record whose stored time (the
server's clock) plus its TTL has passed by this process's clock, and purges those (only
up to the revision it read, so a newer put stays): on an older server that is how they go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import attrs
import msgpack

from .._exceptions import (
    BrokerError,
    DecodeError,
    InvalidInputError,
    JobNotFoundError,
    NotFoundError,
    ResultNotFoundError,
)
from .._nats.client import Client
from .._nats.jetstream import (
    ConsumerConfig,
    JsMsg,
    KeyDeletedError,
    KeyNotFoundError,
    KeyValue,
    PubAck,
    SubjectBusyError,
    WrongLastSequenceError,
    _api_reply,
)
from .._nats.protocol import NatsError
from .._nats_backend import (
    DEFAULT_PREFIX,
    NatsBackend,
    Request,
    decode_token,
    encode_token,
    header_value,
    translate_errors,
    validate_name,
    validate_placement,
    validate_replicas,
)
from ..abc import (
    FINAL_STATUSES,
    JobRecord,
    ParentRecord,
    ResultCounts,
    Results,
    ScheduleRecord,
    WorkerRecord,
    check_progress,
    check_worker_ttl,
    may_start,
    refuse_result,
)

__all__ = ["NatsResults"]

_log = logging.getLogger("tasqueue_anyio.nats")

_T = TypeVar("_T")

#: The header repeating a job state's status (read by the listings).
H_STATUS = "Tasqueue-Status"
#: The header of a worker record: the seconds it lives after its put (``repr(float)``).
H_WORKER_TTL = "Tasqueue-Worker-TTL"

_CANCELLABLE_AT_ONCE = frozenset({"queued", "retrying"})


class _NoWrite:
    """What a compare-and-set step returns when it writes nothing."""


_NO_WRITE = _NoWrite()


def _ttl(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{what} must be seconds > 0 or None, got {value!r}")
    return max(1.0, float(value))


def _duration(seconds: float) -> str:
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"a {what} must be a non-empty str, got {value!r}")
    return value


# -- value codecs -------------------------------------------------------------------------------


def _pack(value: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _encode_job(record: JobRecord) -> bytes:
    value = {"s": record.status, "d": record.data, "c": record.cancel_requested, "r": record.run}
    if record.progress is not None:
        value["p"] = record.progress
    if record.hold_for and record.status in _ENDED:
        # until when (POSIX time, this client's clock) the ended job's id stays taken
        value["u"] = time.time() + record.hold_for
    return _pack(value)


#: the final statuses after which a job's id may stay held (JobRecord.hold_for)
_ENDED = frozenset({"successful", "failed"})


def _ttl_of(record: JobRecord, default: float | None) -> float | None:
    """The TTL a write of ``record`` carries: its own (a final one), else ``default``."""
    if record.ttl is not None and record.status in FINAL_STATUSES:
        return record.ttl
    return default


def _free(raw: bytes) -> bool:
    """Whether the stored job state ``raw`` leaves its id free for a new job: it ended
    and its hold (if any) passed."""
    try:
        value = msgpack.unpackb(raw, raw=False)
        if str(value["s"]) not in FINAL_STATUSES:
            return False
        until = value.get("u")
        return until is None or float(until) <= time.time()
    except Exception:
        return False  # unreadable: not ours to overwrite


def _decode_job(data: bytes) -> JobRecord:
    try:
        value = msgpack.unpackb(data, raw=False)
        return JobRecord(
            status=str(value["s"]),
            data=bytes(value.get("d") or b""),
            cancel_requested=bool(value.get("c", False)),
            run=str(value.get("r") or ""),
            progress=None if value.get("p") is None else bytes(value["p"]),
        )
    except Exception as exc:
        raise BrokerError(f"unreadable job state in the results bucket: {exc}") from None


def _encode_parent(record: ParentRecord, counts: dict[str, int]) -> bytes:
    return _pack(
        {
            "k": record.kind,
            "s": record.status,
            "d": record.data,
            "e": record.error,
            "m": dict(record.members),
            "n": counts,
        }
    )


def _decode_parent(data: bytes) -> tuple[ParentRecord, dict[str, int]]:
    try:
        value = msgpack.unpackb(data, raw=False)
        record = ParentRecord(
            kind=str(value["k"]),
            status=str(value["s"]),
            data=bytes(value.get("d") or b""),
            members={str(k): str(v) for k, v in (value.get("m") or {}).items()},
            error=None if value.get("e") is None else str(value["e"]),
        )
        counts = {str(k): int(v) for k, v in (value.get("n") or {}).items()}
        return record, counts
    except Exception as exc:
        raise BrokerError(f"unreadable group or chain state in the results bucket: {exc}") from None


def _count(members: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in members.values():
        counts[status] = counts.get(status, 0) + 1
    return counts


def _encode_schedule(record: ScheduleRecord) -> bytes:
    return _pack({"d": record.data, "f": float(record.next_fire)})


def _decode_schedule(schedule_id: str, data: bytes) -> ScheduleRecord:
    """A schedule entry as a record; a damaged entry becomes a record (due since 0) whose
    ``data`` is the entry itself, which the server reads as an unreadable template (it
    logs that and leaves it until ``remove_schedule``), so one damaged entry never
    keeps the other schedules from firing."""
    try:
        value = msgpack.unpackb(data, raw=False)
        return ScheduleRecord(id=schedule_id, data=bytes(value["d"]), next_fire=float(value["f"]))
    except Exception:
        return ScheduleRecord(id=schedule_id, data=bytes(data), next_fire=0.0)


class _KeyLocks:
    """One FIFO lock per key while anyone holds or waits for it (so concurrent transitions
    of one key in one process do not race each other into conflicts).

    Taking a key nobody holds costs no checkpoint and no cancel scope (every holder goes
    on to a round trip of its own); only contended keys park their takers on an event."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        #: key -> the takers waiting for it, in order; a key is held while it is here
        self._waiters: dict[str, deque[anyio.Event]] = {}

    def hold(self, key: str) -> _KeyHold:
        """``async with locks.hold(key):`` holds ``key`` for the block."""
        return _KeyHold(self, key)

    async def _acquire(self, key: str) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = deque()
            return
        event = anyio.Event()
        waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():  # handed over as we were cancelled: hand it on
                self._release(key)
            else:
                waiters.remove(event)
            raise

    def _release(self, key: str) -> None:
        waiters = self._waiters[key]
        if waiters:
            waiters.popleft().set()  # the next taker holds it now
        else:
            del self._waiters[key]


class _KeyHold:
    """The async context manager of :meth:`_KeyLocks.hold`."""

    __slots__ = ("_key", "_locks")

    def __init__(self, locks: _KeyLocks, key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        await self._locks._acquire(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        self._locks._release(self._key)


class NatsResults(NatsBackend, Results):
    """A :class:`~tasqueue_anyio.abc.Results` store on a NATS JetStream key-value bucket.

    Open it with ``async with``: it connects (unless given a ``client``) and creates or
    updates its bucket. Entering it again is counted.

    The success and failed listings hold each job id at most once, in the order the jobs
    ended; a job that ends again moves to the end. A job is listed while its stored
    state has that status (see the module documentation).

    :param url: ``nats://[user:password@]host:port`` (``tls://`` for TLS), or a list of
        servers; default ``nats://127.0.0.1:4222``
    :param client: an open :class:`tasqueue_anyio._nats.client.Client` to use instead;
        the caller enters and leaves it
    :param prefix: the name of the store's KV bucket (letters, digits, ``_``, ``-``); the
        same word as ``NatsBroker(prefix=)``, so one prefix names an application's broker
        stream and its results bucket
    :param job_ttl: seconds job state, and group and chain state, is kept after its last
        write (``None``: forever); at least 1
    :param result_ttl: seconds a saved result is kept after it was written (``None``:
        forever); at least 1
    :param per_key_ttl: use per-message TTLs (``None``: when the server has them,
        nats-server 2.11+); ``False`` uses the bucket's ``max_age`` (see the module
        documentation)
    :param storage: ``"file"`` or ``"memory"``
    :param replicas: bucket replicas (1 to 5; more than 1 needs a JetStream cluster):
        with 3, job states and results survive the loss of any one server
    :param placement: where a cluster puts the bucket(s): ``{"cluster": name}`` and/or
        ``{"tags": [...]}`` (servers' ``server_tags``); ``None`` lets JetStream choose
    :param max_conflicts: revision conflicts one conditional write retries before it
        gives up
    :param cache_size: keys whose last revision is remembered
    :param timeout: seconds to wait for any one reply from the server
    """

    _what = "NATS results store"

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        client: Client | None = None,
        prefix: str = DEFAULT_PREFIX,
        job_ttl: float | None = None,
        result_ttl: float | None = None,
        per_key_ttl: bool | None = None,
        storage: Literal["file", "memory"] = "file",
        replicas: int = 1,
        placement: Mapping[str, Any] | None = None,
        max_conflicts: int = 100,
        cache_size: int = 4096,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(url, client, timeout=timeout)
        self.prefix = validate_name(prefix, "prefix")
        self.job_ttl = _ttl(job_ttl, "job_ttl")
        self.result_ttl = _ttl(result_ttl, "result_ttl")
        if storage not in ("file", "memory"):
            raise InvalidInputError(f"storage must be 'file' or 'memory', got {storage!r}")
        if (
            isinstance(max_conflicts, bool)
            or not isinstance(max_conflicts, int)
            or max_conflicts < 1
        ):
            raise InvalidInputError(f"max_conflicts must be an int >= 1, got {max_conflicts!r}")
        self.per_key_ttl = per_key_ttl
        self.storage: Literal["file", "memory"] = storage
        self.replicas = validate_replicas(replicas)
        self.placement = validate_placement(placement)
        self.max_conflicts = max_conflicts
        self._cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._locks = _KeyLocks()
        self._kv: KeyValue | None = None
        self._cron: KeyValue | None = None
        self._ttls = False  # per-message TTLs in use
        self._fenced_results = False  # Nats-Expected-Last-Subject-Sequence-Subject works
        self._gated_starts = False  # start_job may write without reading (job gates)

    def __repr__(self) -> str:
        where = self.url if self.url is not None else "client"
        return f"<NatsResults {where} prefix={self.prefix!r}>"

    # -- lifetime -------------------------------------------------------------------------

    async def _open(self) -> None:
        self._locks = _KeyLocks()
        self._cache.clear()
        js = self.js
        has_ttls = self.server_at_least((2, 11, 0))
        if self.per_key_ttl and not has_ttls:
            raise BrokerError(
                "per-key TTLs need nats-server 2.11 or newer; the server is "
                + ".".join(map(str, self.client.server_version))
            )
        self._ttls = has_ttls if self.per_key_ttl is None else self.per_key_ttl
        self._fenced_results = has_ttls
        self._gated_starts = has_ttls
        ttls = [t for t in (self.job_ttl, self.result_ttl) if t is not None]
        max_age = max(ttls) if ttls and not self._ttls else None
        self._kv = await js.create_key_value(
            self.prefix,
            storage=self.storage,
            replicas=self.replicas,
            per_key_ttl=self._ttls,
            ttl=max_age,
            placement=self.placement,
        )
        if max_age is not None:
            self._cron = await js.create_key_value(
                f"{self.prefix}_cron",
                storage=self.storage,
                replicas=self.replicas,
                placement=self.placement,
            )
        else:
            self._cron = self._kv
        await self._check_permissions(stored=[f"$KV.{self.prefix}._probe"])

    def _closing(self) -> None:
        self._kv = None
        self._cron = None
        self._cache.clear()

    @property
    def kv(self) -> KeyValue:
        """The bucket (while the store is open)."""
        if self._kv is None:
            raise RuntimeError("this NATS results store is not open: use `async with` first")
        return self._kv

    @property
    def cron(self) -> KeyValue:
        """The bucket of the cron schedules (the main one unless ``max_age`` is in use)."""
        if self._cron is None:
            raise RuntimeError("this NATS results store is not open: use `async with` first")
        return self._cron

    async def drop(self) -> None:
        """Delete the bucket (and the cron bucket, if separate) with everything in it."""
        with translate_errors("deleting the results bucket"):
            if self._cron is not None and self._cron is not self._kv:
                await self.js.delete_stream(self._cron.stream)
            await self.js.delete_stream(self.kv.stream)

    # -- plumbing ------------------------------------------------------------------------------

    def _subject(self, key: str, kv: KeyValue | None = None) -> str:
        return f"$KV.{(kv or self.kv).bucket}.{key}"

    def _cache_get(self, key: str) -> tuple[int, Any] | None:
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
        return entry

    def _cache_put(self, key: str, revision: int, value: Any) -> None:
        if not self._cache_size:
            return
        cache = self._cache
        cache[key] = (revision, value)
        cache.move_to_end(key)
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    async def _read(self, key: str, kv: KeyValue | None = None) -> tuple[int, bytes | None]:
        """The key's revision and value; ``(0 or the delete marker's revision, None)``
        when it has none."""
        try:
            entry = await (kv or self.kv).get(key)
        except KeyDeletedError as deleted:
            return deleted.revision, None
        except KeyNotFoundError:
            return 0, None
        return entry.revision, entry.value

    def _headers(
        self, ttl: float | None, extra: Sequence[tuple[str, str]] = ()
    ) -> list[tuple[str, str]]:
        headers = list(extra)
        if ttl is not None and self._ttls:
            headers.append(("Nats-TTL", _duration(ttl)))
        return headers

    async def _write(
        self,
        key: str,
        payload: bytes,
        headers: list[tuple[str, str]],
        *,
        expect: int | None,
        kv: KeyValue | None = None,
    ) -> int:
        """Publish ``payload`` under ``key`` (if its last revision is ``expect``, when
        given); return the new revision.

        :raises WrongLastSequenceError: the key is at another revision
        """
        if expect is not None:
            headers = [*headers, ("Nats-Expected-Last-Subject-Sequence", str(expect))]
        ack = await self.js.publish(self._subject(key, kv), payload, headers=headers)
        return ack.seq

    def _gate_request(self, key: str) -> Request:
        """The write of the gate of job state key ``key`` (``j.<id>`` -> ``g.<id>``).

        A job's gate is written (empty) before its state first becomes final,
        cancel-requested or ``retrying``, and stays until the job is deleted or expires
        (its TTL is one second longer than the state's). So "no gate" means the job may
        start, and
        :meth:`start_job` can write its ``processing`` record without reading the state
        first: one publish that the server stores only while the gate does not exist.
        """
        ttl = None if self.job_ttl is None else self.job_ttl + 1
        return (self._subject("g" + key[1:]), b"", self._headers(ttl))

    async def _write_gated(
        self, key: str, payload: bytes, headers: list[tuple[str, str]], expect: int
    ) -> int:
        """:meth:`_write` of job state ``key`` at revision ``expect``, its gate published
        just before on the same connection, unconfirmed (no round trip of its own).

        The server reads and stores a connection's publishes to one stream in order, so
        a stored state had its gate stored first (only a store error between two
        consecutive writes could tell them apart, and then a redelivered message of the
        job may run it again, as at-least-once delivery allows).
        """
        subject, gate, gate_headers = self._gate_request(key)
        await self.client.publish(subject, gate, headers=gate_headers or None)
        return await self._write(key, payload, headers, expect=expect)

    async def _cas(
        self,
        key: str,
        decode: Callable[[bytes], Any],
        step: Callable[[Any | None], tuple[Any, _T]],
        encode: Callable[[Any], tuple[bytes, list[tuple[str, str]]]],
        what: str,
        kv: KeyValue | None = None,
        gate: Callable[[Any], bool] | None = None,
    ) -> _T:
        """Run ``step`` on the key's current value and write what it returns, atomically.

        ``step(value or None)`` returns ``(new value, result)``, or ``(_NO_WRITE, result)``
        to write nothing. A remembered value is used first; a step that writes nothing on
        a remembered value runs again on a fresh read (a refusal is always confirmed).
        When ``gate(new value)`` is true the key's gate (see :meth:`_gate_request`) is
        written just before the value, in the same round trip.
        """
        async with self._locks.hold(key):
            cached = self._cache_get(key)
            fresh = cached is None
            if cached is None:
                revision, raw = await self._read(key, kv)
                value = None if raw is None else decode(raw)
            else:
                revision, value = cached
            for attempt in range(self.max_conflicts):
                new, result = step(value)
                if new is _NO_WRITE:
                    if fresh:
                        if value is not None:
                            self._cache_put(key, revision, value)
                        return result
                else:
                    payload, headers = encode(new)
                    try:
                        if gate is not None and gate(new):
                            written = await self._write_gated(key, payload, headers, revision)
                        else:
                            written = await self._write(
                                key, payload, headers, expect=revision, kv=kv
                            )
                    except WrongLastSequenceError:
                        self._cache.pop(key, None)
                        if attempt:
                            await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                    else:
                        self._cache_put(key, written, new)
                        return result
                revision, raw = await self._read(key, kv)
                value = None if raw is None else decode(raw)
                fresh = True
        raise BrokerError(
            f"gave up {what} after {self.max_conflicts} conflicting writes (another "
            f"process keeps changing it)"
        )

    # -- keys ------------------------------------------------------------------------------

    @staticmethod
    def _job_key(job_id: str) -> str:
        return "j." + encode_token(_check_id(job_id, "job id"))

    @staticmethod
    def _result_key(job_id: str) -> str:
        return "r." + encode_token(_check_id(job_id, "job id"))

    @staticmethod
    def _parent_key(parent_id: str) -> str:
        return "p." + encode_token(_check_id(parent_id, "group or chain id"))

    @staticmethod
    def _schedule_key(schedule_id: str) -> str:
        return "c." + encode_token(_check_id(schedule_id, "schedule id"))

    @staticmethod
    def _worker_key(worker_id: str) -> str:
        return "w." + encode_token(_check_id(worker_id, "worker id"))

    def _job_value(self, record: JobRecord) -> tuple[bytes, list[tuple[str, str]]]:
        return _encode_job(record), self._headers(_ttl_of(record, self.job_ttl), [(H_STATUS, record.status)])

    def check_job_ttl(self) -> None:
        """Refuse per-job TTLs unless this store keeps per-key TTLs (nats-server 2.11+,
        ``per_key_ttl`` not ``False``): a bucket's ``max_age`` is one for all.

        :raises InvalidInputError: it does not
        """
        self._require_open()
        if not self._ttls:
            raise InvalidInputError(
                "a job's successful_ttl or failed_ttl needs per-key TTLs in the NATS results "
                "store: nats-server 2.11 or newer, and per_key_ttl not False (this server is "
                + ".".join(map(str, self.client.server_version))
                + "); set the store's job_ttl and result_ttl instead"
            )

    @staticmethod
    def _closes(record: JobRecord) -> bool:
        """Whether ``record`` keeps some start of the job from happening (so needs its
        gate): a final or cancel-requested one, or a ``retrying`` one, which refuses the
        messages of the try that failed (see :func:`~tasqueue_anyio.abc.may_start`)."""
        return (
            record.status in FINAL_STATUSES
            or record.cancel_requested
            or record.status == "retrying"
        )

    # -- jobs -------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord:
        """The stored state of a job (one direct get).

        :param job_id: the job id
        :return: the record
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """
        key = self._job_key(job_id)
        with translate_errors("reading job state"):
            revision, raw = await self._read(key)
        if raw is None:
            self._cache.pop(key, None)
            raise JobNotFoundError(f"no job state is stored under id {job_id!r}")
        record = _decode_job(raw)
        self._cache_put(key, revision, record)
        return record

    async def set_jobs(self, records: Mapping[str, JobRecord]) -> None:
        """Store the state of many jobs, unconditionally, in one round trip (pipelined
        publishes).

        :param records: records by job id
        """
        refuse_result(records.values(), "set_jobs")
        if not records:
            return
        records = {
            job_id: r if r.progress is None else attrs.evolve(r, progress=None)
            for job_id, r in records.items()
        }
        keys = [self._job_key(job_id) for job_id in records]
        requests: list[Request] = []
        states: list[tuple[int, str, JobRecord]] = []  # (index in requests, key, record)
        for key, record in zip(keys, records.values(), strict=True):
            if self._closes(record):
                requests.append(self._gate_request(key))
            payload, headers = self._job_value(record)
            states.append((len(requests), key, record))
            requests.append((self._subject(key), payload, headers))
        with translate_errors("storing job state"):
            acks = await self.publish_all(requests, "storing job state")
        for index, key, record in states:
            self._cache_put(key, acks[index].seq, record)

    async def create_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs that have none yet (each a create-if-absent
        publish, all pipelined: one round trip); leave the others as they are.

        Each key is created atomically; the batch as a whole is not one transaction.

        :param records: records by job id
        :return: the ids whose state this call created
        """
        refuse_result(records.values(), "create_jobs")
        return await self._create(records, replace_ended=False)

    async def claim_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs whose id is free (no state, or ended and its hold
        passed: :meth:`~tasqueue_anyio.abc.Results.claim_jobs`): a create-if-absent
        publish each, all pipelined (one round trip); an id whose state exists is read
        and, if free, replaced by compare-and-set on its revision. Leaves the others.

        :param records: records by job id
        :return: the ids stored
        """
        refuse_result(records.values(), "claim_jobs")
        return await self._create(records, replace_ended=True)

    async def _create(self, records: Mapping[str, JobRecord], *, replace_ended: bool) -> set[str]:
        if not records:
            return set()
        ids = list(records)
        keys = [self._job_key(job_id) for job_id in ids]
        requests: list[Request] = []
        slots: list[int] = []  # each state's index in requests
        for key, record in zip(keys, records.values(), strict=True):
            if self._closes(record):
                requests.append(self._gate_request(key))
            payload, headers = self._job_value(record)
            headers.append(("Nats-Expected-Last-Subject-Sequence", "0"))
            slots.append(len(requests))
            requests.append((self._subject(key), payload, headers))
        created: set[str] = set()
        with translate_errors("creating job state"):
            replies = await self.publish_many(requests)
            for reply in replies:
                if isinstance(reply, NatsError) and not isinstance(reply, WrongLastSequenceError):
                    raise reply
            acks = [replies[index] for index in slots]
            for job_id, key, ack in zip(ids, keys, acks, strict=True):
                record = records[job_id]
                if isinstance(ack, WrongLastSequenceError):
                    # set, or a delete marker left by another KV client: create on top
                    # (claim: also on top of an ended job's state whose hold passed)
                    revision, raw = await self._read(key)
                    if not revision or (raw is not None and not (replace_ended and _free(raw))):
                        continue
                    payload, headers = self._job_value(record)
                    try:
                        if self._closes(record):
                            written = await self._write_gated(key, payload, headers, revision)
                        else:
                            written = await self._write(key, payload, headers, expect=revision)
                    except WrongLastSequenceError:
                        continue
                    self._cache_put(key, written, record)
                    created.add(job_id)
                    continue
                if isinstance(ack, NatsError):
                    raise ack
                self._cache_put(key, ack.seq, record)
                created.add(job_id)
        return created

    async def start_job(self, job_id: str, record: JobRecord) -> JobRecord | None:
        """Move a job to ``record`` if it has no state, or is not final and not cancelled
        (compare-and-set; one round trip when the job's revision is remembered, else two).

        :param job_id: the job id
        :param record: the new state
        :return: ``None`` when ``record`` was written, else the current (unchanged) record
        """

        refuse_result((record,), "start_job")
        if record.progress is not None:
            record = attrs.evolve(record, progress=None)

        def step(current: JobRecord | None) -> tuple[Any, JobRecord | None]:
            if not may_start(current, record):
                return _NO_WRITE, current
            return record, None

        key = self._job_key(job_id)
        with translate_errors("starting a job"):
            if self._gated_starts and key not in self._cache and not self._closes(record):
                # The state is not at hand: write it unless the job's gate exists (no read).
                async with self._locks.hold(key):
                    payload, headers = self._job_value(record)
                    headers += [
                        ("Nats-Expected-Last-Subject-Sequence", "0"),
                        ("Nats-Expected-Last-Subject-Sequence-Subject", self._gate_request(key)[0]),
                    ]
                    try:
                        written = await self._write(key, payload, headers, expect=None)
                    except WrongLastSequenceError:
                        pass  # the gate exists: decide on the stored state
                    else:
                        self._cache_put(key, written, record)
                        return None
            return await self._cas(
                key, _decode_job, step, self._job_value, "starting a job", gate=self._closes
            )

    async def update_job(
        self, job_id: str, record: JobRecord, *, expect: Collection[str], run: str | None = None
    ) -> bool:
        """Write ``record`` if the job's status is one of ``expect`` (and its run token is
        ``run``, if given), by compare-and-set; ``cancel_requested`` is kept as stored.
        A ``successful`` or ``failed`` record lists the job in the same write.

        :param job_id: the job id
        :param record: the new state
        :param expect: the statuses the job may currently have
        :param run: if given, the run token the job must still have
        :return: whether ``record`` was written (never when the job has no state)
        """
        if not expect:
            return False
        expected = frozenset(expect)

        result = record.result
        stored = record if result is None else attrs.evolve(record, result=None)

        def step(current: JobRecord | None) -> tuple[Any, bool]:
            if current is None or current.status not in expected:
                return _NO_WRITE, False
            if run is not None and current.run != run:
                return _NO_WRITE, False
            if (
                stored.cancel_requested != current.cancel_requested
                or stored.progress != current.progress
            ):
                changed = attrs.evolve(
                    stored, cancel_requested=current.cancel_requested, progress=current.progress
                )
                return changed, True
            return stored, True

        if result is not None:
            with translate_errors("ending a job"):
                return await self._update_with_result(
                    job_id, step, result, _ttl_of(record, self.result_ttl)
                )
        with translate_errors("updating a job"):
            written = await self._cas(
                self._job_key(job_id),
                _decode_job,
                step,
                self._job_value,
                "updating a job",
                gate=self._closes,
            )
            if written and record.ttl is not None and record.status in FINAL_STATUSES:
                # a result saved earlier (ctx.save) takes the job's own TTL too: written
                # again with it (two round trips, only for jobs that have one)
                revision, raw = await self._read(self._result_key(job_id))
                if raw is not None:
                    with contextlib.suppress(WrongLastSequenceError):
                        await self._write(
                            self._result_key(job_id),
                            raw,
                            self._headers(record.ttl),
                            expect=revision,
                        )
            return written

    async def _update_with_result(
        self,
        job_id: str,
        step: Callable[[Any | None], tuple[Any, bool]],
        result: bytes,
        result_ttl: float | None,
    ) -> bool:
        """:meth:`update_job` of a record carrying a result: the result and the record in
        one round trip, pipelined on one connection: the result first, published with an
        expectation on the state key's revision (``Nats-Expected-Last-Subject-Sequence``
        on the state's subject; nats-server 2.11+), then the record with the same
        expectation. The server stores them in that order, so a final record never
        exists without its result: both are stored, or (the state moved meanwhile)
        neither, and the decision is made again on a fresh read. On an older server the
        result is stored unconditionally first (a run fenced out meanwhile may leave its
        result, which the run that owns the job replaces when it ends).
        """
        key = self._job_key(job_id)
        result_subject = self._subject(self._result_key(job_id))
        result_headers = self._headers(result_ttl)
        async with self._locks.hold(key):
            cached = self._cache_get(key)
            fresh = cached is None
            if cached is None:
                revision, raw = await self._read(key)
                value = None if raw is None else _decode_job(raw)
            else:
                revision, value = cached
            for attempt in range(self.max_conflicts):
                new, written = step(value)
                if new is _NO_WRITE:
                    if fresh:
                        return written
                else:
                    payload, headers = self._job_value(new)
                    requests: list[Request] = []
                    if self._closes(new):
                        requests.append(self._gate_request(key))
                    fence = [("Nats-Expected-Last-Subject-Sequence", str(revision))]
                    if self._fenced_results:
                        fence.append(
                            ("Nats-Expected-Last-Subject-Sequence-Subject", self._subject(key))
                        )
                        requests.append((result_subject, result, [*result_headers, *fence]))
                    else:
                        requests.append((result_subject, result, result_headers))
                    requests.append(
                        (
                            self._subject(key),
                            payload,
                            [*headers, ("Nats-Expected-Last-Subject-Sequence", str(revision))],
                        )
                    )
                    replies = await self.publish_many(requests)
                    state_reply, result_reply = replies[-1], replies[-2]
                    if isinstance(state_reply, SubjectBusyError) and not isinstance(
                        result_reply, NatsError
                    ):
                        # A clustered leader holds the state's subject while the result,
                        # checked against it, is replicated: the state was refused
                        # without a comparison. Send it again alone.
                        state_reply = await self._publish_while_busy(requests[-1])
                    if isinstance(state_reply, WrongLastSequenceError):
                        self._cache.pop(key, None)
                        if attempt:
                            await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                    elif isinstance(state_reply, NatsError):
                        raise state_reply
                    else:
                        self._cache_put(key, state_reply.seq, new)
                        if isinstance(result_reply, NatsError):
                            raise BrokerError(
                                f"job {job_id!r}: its final state was stored but its result "
                                f"was refused: {result_reply}"
                            )
                        return True
                revision, raw = await self._read(key)
                value = None if raw is None else _decode_job(raw)
                fresh = True
        raise BrokerError(
            f"gave up ending job {job_id!r} after {self.max_conflicts} conflicting writes"
        )

    async def _publish_while_busy(self, request: Request) -> PubAck | NatsError:
        """Publish ``request`` (a conditional write) again while a clustered stream's leader
        answers :class:`SubjectBusyError`, up to :attr:`max_conflicts` times with short
        random pauses; return the last answer (an error is returned, not raised)."""
        attempt = 0
        while True:
            (reply,) = await self.publish_many([request])
            attempt += 1
            if not isinstance(reply, SubjectBusyError) or attempt >= self.max_conflicts:
                return reply
            await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))

    async def set_progress(self, job_id: str, data: bytes, *, run: str) -> bool:
        """Store a running job's progress in its state (compare-and-set: one round trip
        when the state's revision is remembered, as it is by the worker that started it).

        :param job_id: the job id
        :param data: the progress (at most :data:`~tasqueue_anyio.abc.MAX_PROGRESS_SIZE`)
        :param run: store only while the job is ``processing`` under this run
        :return: whether it was stored
        """
        check_progress(data)

        def step(current: JobRecord | None) -> tuple[Any, bool]:
            if current is None or current.status != "processing" or current.run != run:
                return _NO_WRITE, False
            return attrs.evolve(current, progress=data), True

        with translate_errors("storing progress"):
            return await self._cas(
                self._job_key(job_id), _decode_job, step, self._job_value, "storing progress"
            )

    async def count_ended(self) -> ResultCounts:
        """The lengths of the success and failed listings. The listings are the status
        headers of the job keys (see the module's Listings), so this reads the last
        header of every stored job, as ``get_success`` does: a few round trips and about
        100 bytes per stored job, not a counter. Bound it with ``job_ttl``.
        """
        with translate_errors("counting the listings"):
            entries = await self._scan(self.kv, "j.>", headers_only=True)
        statuses = [header_value(msg.headers, H_STATUS) for msg in entries]
        return ResultCounts(
            successful=statuses.count("successful"), failed=statuses.count("failed")
        )

    async def request_cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop (compare-and-set).

        A ``queued`` or ``retrying`` job becomes ``cancelled``; a job in a final status is
        left as it is; any other is marked ``cancel_requested``.

        :param job_id: the job id
        :return: the record as it is after the call
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """

        def step(current: JobRecord | None) -> tuple[Any, JobRecord | None]:
            if current is None:
                return _NO_WRITE, None
            if current.status in FINAL_STATUSES:
                return _NO_WRITE, current
            if current.status in _CANCELLABLE_AT_ONCE:
                updated = attrs.evolve(current, status="cancelled")
            elif current.cancel_requested:
                return _NO_WRITE, current
            else:
                updated = attrs.evolve(current, cancel_requested=True)
            return updated, updated

        with translate_errors("cancelling a job"):
            result = await self._cas(
                self._job_key(job_id),
                _decode_job,
                step,
                self._job_value,
                "cancelling a job",
                gate=self._closes,
            )
        if result is None:
            raise JobNotFoundError(f"no job state is stored under id {job_id!r}")
        return result

    async def get_result(self, job_id: str) -> bytes:
        """The result a job saved (one direct get).

        :param job_id: the job id
        :return: the saved bytes
        :raises ResultNotFoundError: the job saved no result (or it expired)
        """
        key = self._result_key(job_id)
        with translate_errors("reading a result"):
            _, raw = await self._read(key)
        if raw is None:
            raise ResultNotFoundError(f"no result is stored for job id {job_id!r}")
        return raw

    async def set_result(self, job_id: str, data: bytes, *, run: str | None = None) -> bool:
        """Store (replace) the result of a job, with ``result_ttl`` if set.

        Given ``run``, the result is published with an expectation on the job's *state*
        key (``Nats-Expected-Last-Subject-Sequence-Subject``): it is stored only if the
        state is still the revision read as ``processing`` under that run, atomically
        (one round trip when that revision is remembered).

        :param job_id: the job id
        :param data: the result
        :param run: if given, store only while the job is ``processing`` under this run
        :return: whether it was stored
        """
        key = self._result_key(job_id)
        headers = self._headers(self.result_ttl)
        if run is None:
            with translate_errors("storing a result"):
                await self._write(key, bytes(data), headers, expect=None)
            return True
        state_key = self._job_key(job_id)
        with translate_errors("storing a result"):
            cached = self._cache_get(state_key)
            fresh = cached is None
            if cached is None:
                revision, raw = await self._read(state_key)
                state = None if raw is None else _decode_job(raw)
            else:
                revision, state = cached
            for attempt in range(self.max_conflicts):
                if state is None or state.status != "processing" or state.run != run:
                    if fresh:
                        return False
                else:
                    if not self._fenced_results:  # an old server: check, then write
                        await self._write(key, bytes(data), headers, expect=None)
                        return True
                    fence = [
                        ("Nats-Expected-Last-Subject-Sequence", str(revision)),
                        ("Nats-Expected-Last-Subject-Sequence-Subject", self._subject(state_key)),
                    ]
                    try:
                        await self._write(key, bytes(data), [*headers, *fence], expect=None)
                    except WrongLastSequenceError:
                        self._cache.pop(state_key, None)
                        if attempt:
                            await anyio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
                    else:
                        return True
                revision, raw = await self._read(state_key)
                state = None if raw is None else _decode_job(raw)
                if state is not None:
                    self._cache_put(state_key, revision, state)
                fresh = True
        raise BrokerError(
            f"gave up storing the result of job {job_id!r} after {self.max_conflicts} "
            f"conflicting writes of its state"
        )

    async def delete_job(self, job_id: str) -> None:
        """Forget a job: its state (and so its place in the listings), its result and its
        gate, purged from the bucket's stream (three purge requests, pipelined: one round
        trip; no delete marker is left).

        :param job_id: the job id; an unknown one is ignored
        """
        state = self._job_key(job_id)
        keys = [state, self._result_key(job_id), "g" + state[1:]]
        with translate_errors("deleting a job"):
            await self._purge(keys)
        for key in keys:
            self._cache.pop(key, None)

    async def _purge(self, keys: Sequence[str], kv: KeyValue | None = None) -> int:
        """Purge every message of ``keys``; return how many were purged."""
        bucket = kv or self.kv
        subject = f"{self.js.prefix}.STREAM.PURGE.{bucket.stream}"
        requests: list[Request] = [
            (subject, json.dumps({"filter": self._subject(key, bucket)}).encode(), ())
            for key in keys
        ]
        purged = 0
        for reply in await self.request_many(requests):
            if isinstance(reply, NatsError):
                raise reply
            purged += int(_api_reply(reply, subject).get("purged", 0))
        return purged

    async def _scan(self, kv: KeyValue, filter: str, *, headers_only: bool) -> list[JsMsg]:
        """The last entry of every key matching ``filter``, in revision order, read by a
        short-lived ephemeral consumer (deleted after)."""
        js = self.js
        config = ConsumerConfig(
            ack_policy="none",
            deliver_policy="last_per_subject",
            filter_subject=self._subject(filter, kv),
            headers_only=headers_only,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        info = await js.ensure_consumer(kv.stream, config)
        out: list[JsMsg] = []
        try:
            pending = info.num_pending
            while pending > 0:
                batch = await js.fetch(kv.stream, info.name, min(pending, 512), no_wait=True)
                if not batch:
                    break
                out += batch
                pending = batch[-1].metadata.num_pending
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.timeout),
                contextlib.suppress(NatsError),
            ):
                await js.delete_consumer(kv.stream, info.name)
        return [msg for msg in out if header_value(msg.headers, "KV-Operation", "PUT") == "PUT"]

    async def _listing(self, status: str) -> list[str]:
        with translate_errors("reading a listing"):
            entries = await self._scan(self.kv, "j.>", headers_only=True)
        start = len(self._subject("j."))
        return [
            decode_token(msg.subject[start:])
            for msg in entries
            if header_value(msg.headers, H_STATUS) == status
        ]

    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``, in the order they ended.

        :return: the ids, each once
        """
        return await self._listing("successful")

    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``, in the order they ended.

        :return: the ids, each once
        """
        return await self._listing("failed")

    # -- groups and chains ("parents") ---------------------------------------------------

    def _parent_value(
        self, value: tuple[ParentRecord, dict[str, int]]
    ) -> tuple[bytes, list[tuple[str, str]]]:
        record, counts = value
        return _encode_parent(record, counts), self._headers(self.job_ttl)

    async def set_parent(self, parent_id: str, record: ParentRecord) -> None:
        """Store (replace) the state of a group or chain, its member counts rebuilt.

        :param parent_id: the group or chain id
        :param record: the new state
        """
        key = self._parent_key(parent_id)
        value = (attrs.evolve(record, members=dict(record.members)), _count(record.members))
        payload, headers = self._parent_value(value)
        with translate_errors("storing a group or chain"):
            async with self._locks.hold(key):
                revision = await self._write(key, payload, headers, expect=None)
                self._cache_put(key, revision, value)

    async def get_parent(self, parent_id: str) -> ParentRecord:
        """The stored state of a group or chain (one direct get).

        :param parent_id: the group or chain id
        :return: the record (its ``members`` a fresh dictionary)
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        key = self._parent_key(parent_id)
        with translate_errors("reading a group or chain"):
            revision, raw = await self._read(key)
        if raw is None:
            raise NotFoundError(f"no group or chain is stored under id {parent_id!r}")
        record, counts = _decode_parent(raw)
        self._cache_put(key, revision, (record, counts))
        return attrs.evolve(record, members=dict(record.members))

    async def set_member_status(self, parent_id: str, job_id: str, status: str) -> dict[str, int]:
        """Record a member's status; return how many members are in each status
        (compare-and-set; the counts are kept in the record, not recounted).

        :param parent_id: the group or chain id
        :param job_id: the member job id
        :param status: the member's new status
        :return: status → number of members, without zero counts
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        _check_id(job_id, "job id")

        def step(
            current: tuple[ParentRecord, dict[str, int]] | None,
        ) -> tuple[Any, dict[str, int] | None]:
            if current is None:
                return _NO_WRITE, None
            record, counts = current
            old = record.members.get(job_id)
            members = dict(record.members)
            counts = dict(counts)
            if old is not None:
                remaining = counts.get(old, 0) - 1
                if remaining > 0:
                    counts[old] = remaining
                else:
                    counts.pop(old, None)
            members[job_id] = status
            counts[status] = counts.get(status, 0) + 1
            # written even when unchanged: a write restarts the time to live
            return (attrs.evolve(record, members=members), counts), dict(counts)

        with translate_errors("recording a member's status"):
            result = await self._cas(
                self._parent_key(parent_id),
                _decode_parent,
                step,
                self._parent_value,
                "recording a member's status",
            )
        if result is None:
            raise NotFoundError(f"no group or chain is stored under id {parent_id!r}")
        return result

    async def set_parent_status(
        self, parent_id: str, status: str, *, expect: Collection[str], error: str | None = None
    ) -> bool:
        """Set the parent's status (and ``error``, if given) if its status is in ``expect``
        (compare-and-set).

        :param parent_id: the group or chain id
        :param status: the new status
        :param expect: the statuses the parent may currently have
        :param error: the new error; ``None`` keeps the stored one
        :return: whether it was written (never when nothing is stored or it expired)
        """
        if not expect:
            return False
        expected = frozenset(expect)

        def step(current: tuple[ParentRecord, dict[str, int]] | None) -> tuple[Any, bool]:
            if current is None or current[0].status not in expected:
                return _NO_WRITE, False
            record, counts = current
            changes: dict[str, Any] = {"status": status}
            if error is not None:
                changes["error"] = error
            return (attrs.evolve(record, **changes), counts), True

        with translate_errors("setting a group's or chain's status"):
            return await self._cas(
                self._parent_key(parent_id),
                _decode_parent,
                step,
                self._parent_value,
                "setting a group's or chain's status",
            )

    # -- cron schedules --------------------------------------------------------------------

    async def set_schedule(self, record: ScheduleRecord) -> None:
        """Store (replace) a schedule (never expires).

        :param record: the schedule
        """
        key = self._schedule_key(record.id)
        with translate_errors("storing a schedule"):
            async with self._locks.hold(key):
                revision = await self._write(
                    key, _encode_schedule(record), [], expect=None, kv=self.cron
                )
                self._cache_put(key, revision, record)

    async def get_schedules(self) -> list[ScheduleRecord]:
        """Every stored schedule, ordered by id (code point order).

        :return: the schedules
        """
        kv = self.cron
        with translate_errors("reading schedules"):
            entries = await self._scan(kv, "c.>", headers_only=False)
        start = len(self._subject("c.", kv))
        records = [
            _decode_schedule(decode_token(msg.subject[start:]), msg.payload) for msg in entries
        ]
        records.sort(key=lambda record: record.id)
        return records

    async def advance_schedule(
        self, schedule_id: str, expect_fire: float, next_fire: float
    ) -> bool:
        """Move a schedule's ``next_fire`` from ``expect_fire`` to ``next_fire``
        (compare-and-set; fire times are stored as exact float64).

        :param schedule_id: the schedule id
        :param expect_fire: the ``next_fire`` the schedule must have now
        :param next_fire: the new ``next_fire``
        :return: whether it was moved
        """
        expect_value = float(expect_fire)

        def decode(raw: bytes) -> ScheduleRecord:
            return _decode_schedule(schedule_id, raw)

        def step(current: ScheduleRecord | None) -> tuple[Any, bool]:
            if current is None or current.next_fire != expect_value:
                return _NO_WRITE, False
            return attrs.evolve(current, next_fire=float(next_fire)), True

        def encode(record: ScheduleRecord) -> tuple[bytes, list[tuple[str, str]]]:
            return _encode_schedule(record), []

        with translate_errors("advancing a schedule"):
            return await self._cas(
                self._schedule_key(schedule_id),
                decode,
                step,
                encode,
                "advancing a schedule",
                kv=self.cron,
            )

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule (a purge of its key: of two racing deletes, one purges it).

        :param schedule_id: the schedule id
        :return: whether it existed
        """
        key = self._schedule_key(schedule_id)
        with translate_errors("deleting a schedule"):
            async with self._locks.hold(key):
                self._cache.pop(key, None)
                _, raw = await self._read(key, self.cron)
                purged = await self._purge([key], self.cron)
        return purged > 0 and raw is not None

    # -- the worker registry (heartbeats) --------------------------------------------------

    async def put_worker(self, record: WorkerRecord, ttl: float) -> None:
        """Store (replace) a worker's record under ``w.<id>``, with its TTL in a header
        (and as ``Nats-TTL`` on nats-server 2.11+, rounded up to whole seconds).

        :param record: the record
        :param ttl: seconds (over 0, at most a day)
        """
        seconds = check_worker_ttl(ttl)
        key = self._worker_key(record.id)
        headers = [(H_WORKER_TTL, repr(seconds))]
        if self._ttls:
            headers.append(("Nats-TTL", f"{max(1, math.ceil(seconds))}s"))
        with translate_errors("storing a worker's record"):
            await self._write(key, record.encode(), headers, expect=None, kv=self.cron)

    async def get_workers(self) -> list[WorkerRecord]:
        """The live workers' records, ordered by ``started_at``, then id: every ``w.``
        entry read through a short-lived consumer, less those whose stored time (server
        clock) plus their TTL has passed by this process's clock, which are purged (best
        effort, each only up to the revision read).

        :return: the records; one that does not decode is left out (logged)
        """
        kv = self.cron
        with translate_errors("reading the workers"):
            entries = await self._scan(kv, "w.>", headers_only=False)
        now = time.time()
        start = len(self._subject("w.", kv))
        records: list[WorkerRecord] = []
        expired: list[JsMsg] = []
        for msg in entries:
            try:
                ttl = check_worker_ttl(float(header_value(msg.headers, H_WORKER_TTL)))
            except ValueError:  # InvalidInputError too: no entry of a put_worker
                expired.append(msg)
                continue
            if msg.metadata.timestamp_ns / 1e9 + ttl <= now:
                expired.append(msg)
                continue
            try:
                record = WorkerRecord.decode(msg.payload)
            except DecodeError as exc:
                _log.warning("%r: left out an unreadable worker record: %s", self, exc)
                continue
            if record.id != decode_token(msg.subject[start:]):
                _log.warning(
                    "%r: left out a worker record stored under another id (%r)", self, record.id
                )
                continue
            records.append(record)
        if expired:
            await self._purge_expired(kv, expired)
        records.sort(key=lambda record: (record.started_at, record.id))
        return records

    async def _purge_expired(self, kv: KeyValue, entries: Sequence[JsMsg]) -> None:
        """Purge each entry's key up to and including the entry's revision (a put made
        since stays), best effort: a failure only leaves them for a later read."""
        subject = f"{self.js.prefix}.STREAM.PURGE.{kv.stream}"
        requests: list[Request] = [
            (
                subject,
                json.dumps({"filter": msg.subject, "seq": msg.metadata.stream_seq + 1}).encode(),
                (),
            )
            for msg in entries
        ]
        try:
            await self.request_many(requests)
        except NatsError as exc:
            _log.debug("%r: purging expired worker records failed: %s", self, exc)

    async def remove_worker(self, worker_id: str) -> None:
        """Remove a worker's record (a purge of its key; an unknown id is ignored).

        :param worker_id: the worker id
        """
        key = self._worker_key(worker_id)
        with translate_errors("removing a worker's record"):
            await self._purge([key], self.cron)
