"""The wire format: msgpack maps with a schema version, decoded defensively.

Everything read from a broker or a store is untrusted: decoding is bounded in size and
depth, refuses extension types and checks every field's type, and a failure is always a
:class:`~tasqueue_anyio.DecodeError`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
import msgpack

from ._exceptions import DecodeError, InvalidInputError
from ._jobs import (
    Backoff,
    Job,
    JobMessage,
    Meta,
    Status,
    check_schedule,
    validate_id,
    validate_queue,
)

__all__ = [
    "SCHEMA_VERSION",
    "decode_event",
    "decode_message",
    "encode_event",
    "encode_message",
    "job_from_wire",
    "job_to_wire",
]

#: Version of the job message schema; decoders refuse versions they do not know.
SCHEMA_VERSION = 1
#: Follow-up jobs nest; deeper than this is refused.
MAX_DEPTH = 32
#: Default upper bound on one encoded message.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024


def _ext_refused(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes, max_size: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"message is {len(data)} bytes, over the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_refused,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not a msgpack message: {exc}") from exc


# -- jobs -------------------------------------------------------------------------------
#
# Jobs and metas travel as positional arrays (schema version 1): smaller than maps and
# checked position by position against a table of allowed types, so decoding untrusted
# bytes stays cheap on the hot path.

_N = type(None)
_INT = (int,)
_NUM = (int, float)
_OPT_NUM = (int, float, _N)
_OPT_STR = (str, _N)
_OPT_BYTES = (bytes, _N)
_OPT_LIST = (list, _N)

_JOB_FIELDS = (
    ("task", (str,)),
    ("payload", (bytes,)),
    ("id", (str,)),
    ("queue", (str,)),
    ("max_retries", _INT),
    ("backoff", _OPT_LIST),
    ("timeout", _OPT_NUM),
    ("eta", _OPT_NUM),
    ("delay", _OPT_NUM),
    ("schedule", _OPT_STR),
    ("on_success", (list,)),
    ("on_error", (list,)),
)
_META_FIELDS = (
    ("id", (str,)),
    ("status", (str,)),
    ("queue", (str,)),
    ("max_retries", _INT),
    ("retried", _INT),
    ("prev_error", _OPT_STR),
    ("created_at", _NUM),
    ("processed_at", _OPT_NUM),
    ("eta", _OPT_NUM),
    ("timeout", _OPT_NUM),
    ("schedule", _OPT_STR),
    ("backoff", _OPT_LIST),
    ("prev_job_result", _OPT_BYTES),
    ("attempt", _INT),
    ("group_id", _OPT_STR),
    ("chain_id", _OPT_STR),
    ("deadline", _OPT_NUM),
    ("trace", (dict,)),
)
_STATUSES = {s.value: s for s in Status}


def _check(values: Any, fields: tuple[tuple[str, tuple[type, ...]], ...], what: str) -> list[Any]:
    if type(values) is not list or len(values) != len(fields):
        raise DecodeError(f"{what} is not an array of {len(fields)} fields")
    for value, (name, types) in zip(values, fields, strict=True):
        if type(value) not in types:  # exact types: a bool is not an int here
            raise DecodeError(f"{what} field {name!r} has type {type(value).__name__}")
    return values


def _backoff_to_wire(b: Backoff | None) -> list[Any] | None:
    return None if b is None else [b.initial, b.factor, b.maximum, b.jitter]


def _backoff_from_wire(v: Any) -> Backoff | None:
    if v is None:
        return None
    if len(v) != 4 or not all(type(x) in _NUM and x > 0 for x in v[:3]) or type(v[3]) is not bool:
        raise DecodeError("field 'backoff' is malformed")
    try:
        return Backoff(initial=v[0], factor=v[1], maximum=v[2], jitter=v[3])
    except InvalidInputError as exc:
        raise DecodeError(f"field 'backoff' is malformed: {exc}") from exc


def _job_to_wire(job: Job) -> list[Any]:
    eta = None if job.eta is None else job.eta.timestamp()
    return [
        job.task,
        job.payload,
        job.id,
        job.queue,
        job.max_retries,
        _backoff_to_wire(job.backoff),
        job.timeout,
        eta,
        job.delay,
        job.schedule,
        [_job_to_wire(j) for j in job.on_success],
        [_job_to_wire(j) for j in job.on_error],
    ]


_new_job = Job.__new__
_set = object.__setattr__


def _job_from_wire(d: Any, depth: int = 0) -> Job:
    if depth > MAX_DEPTH:
        raise DecodeError(f"follow-up jobs nested deeper than {MAX_DEPTH}")
    task, payload, job_id, queue, max_retries, backoff, timeout, eta, delay, schedule, ok, err = (
        _check(d, _JOB_FIELDS, "job")
    )
    if not task or len(task) > 255:
        raise DecodeError("invalid job: bad task name")
    if (
        max_retries < 0
        or (timeout is not None and not timeout > 0)
        or (delay is not None and not delay > 0)
    ):
        raise DecodeError("invalid job: negative retries, timeout or delay")
    try:
        validate_id(job_id)
        validate_queue(queue)
        eta_dt = None if eta is None else datetime.fromtimestamp(eta, timezone.utc)
        if schedule is not None:
            check_schedule(schedule)
    except InvalidInputError as exc:
        raise DecodeError(f"invalid job: {exc}") from exc
    except (OverflowError, OSError, ValueError) as exc:
        raise DecodeError(f"invalid job: {exc}") from exc
    # Every field is checked above: build the frozen Job without running its validators again.
    job = _new_job(Job)
    _set(job, "task", task)
    _set(job, "payload", payload)
    _set(job, "id", job_id)
    _set(job, "queue", queue)
    _set(job, "max_retries", max_retries)
    _set(job, "backoff", _backoff_from_wire(backoff))
    _set(job, "timeout", timeout)
    _set(job, "eta", eta_dt)
    _set(job, "delay", delay)
    _set(job, "schedule", schedule)
    _set(job, "on_success", tuple([_job_from_wire(j, depth + 1) for j in ok]))
    _set(job, "on_error", tuple([_job_from_wire(j, depth + 1) for j in err]))
    return job


def job_to_wire(job: Job) -> list[Any]:
    """A job in its wire form (a msgpack-ready array)."""
    return _job_to_wire(job)


def job_from_wire(value: Any) -> Job:
    """A job from its wire form, checked like a decoded message.

    :raises DecodeError: ``value`` is not a valid job
    """
    return _job_from_wire(value)


def _meta_to_wire(m: Meta) -> list[Any]:
    return [
        m.id,
        m.status.value,
        m.queue,
        m.max_retries,
        m.retried,
        m.prev_error,
        m.created_at,
        m.processed_at,
        m.eta,
        m.timeout,
        m.schedule,
        _backoff_to_wire(m.backoff),
        m.prev_job_result,
        m.attempt,
        m.group_id,
        m.chain_id,
        m.deadline,
        m.trace,
    ]


def _meta_from_wire(d: Any) -> Meta:
    values = _check(d, _META_FIELDS, "meta")
    status = _STATUSES.get(values[1])
    if status is None:
        raise DecodeError(f"unknown status {values[1]!r}")
    trace = values[17]
    if not all(type(k) is str and type(v) is str for k, v in trace.items()):
        raise DecodeError("field 'trace' is malformed")
    try:
        validate_id(values[0])
        validate_queue(values[2])
        if values[14] is not None:
            validate_id(values[14], "group id")
        if values[15] is not None:
            validate_id(values[15], "chain id")
    except InvalidInputError as exc:
        raise DecodeError(f"invalid meta: {exc}") from exc
    if values[3] < 0 or values[4] < 0 or values[13] < 0:
        raise DecodeError("invalid meta: negative count")
    return Meta(
        id=values[0],
        status=status,
        queue=values[2],
        max_retries=values[3],
        retried=values[4],
        prev_error=values[5],
        created_at=values[6],
        processed_at=values[7],
        eta=values[8],
        timeout=values[9],
        schedule=values[10],
        backoff=_backoff_from_wire(values[11]),
        prev_job_result=values[12],
        attempt=values[13],
        group_id=values[14],
        chain_id=values[15],
        deadline=values[16],
        trace=trace,
    )


def encode_message(msg: JobMessage) -> bytes:
    """Encode a job message for a queue or the results store."""
    return msgpack.packb(
        [SCHEMA_VERSION, _meta_to_wire(msg.meta), _job_to_wire(msg.job)],
        use_bin_type=True,
    )


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> JobMessage:
    """Decode bytes made by :func:`encode_message`.

    :raises DecodeError: the bytes are not a job message of a known schema version
    """
    d = _unpack(data, max_size)
    if type(d) is not list or len(d) != 3:
        raise DecodeError("message is not a [version, meta, job] array")
    if d[0] != SCHEMA_VERSION or type(d[0]) is not int:
        raise DecodeError(f"unknown schema version {d[0]!r} (this library reads {SCHEMA_VERSION})")
    meta = _meta_from_wire(d[1])
    job = _job_from_wire(d[2])
    if job.id != meta.id:
        raise DecodeError("job id and meta id differ")
    return JobMessage(meta=meta, job=job)


def with_status(msg: JobMessage, status: Status) -> JobMessage:
    """``msg`` with its meta's status replaced."""
    if msg.meta.status is status:
        return msg
    return attrs.evolve(msg, meta=attrs.evolve(msg.meta, status=status))


# -- events on the broadcast channel ---------------------------------------------------------

#: Event kinds on the broadcast channel: a job ended, a job should stop, a group or
#: chain ended, the schedules changed.
#: The broadcast channel for job ends (one event per job): a server listens to it only
#: once something waited for a job (:meth:`Server.wait`), so a worker that only runs
#: jobs does not read an event for every job any worker ends.
FINISHED_CHANNEL = "finished"

EVENT_FINISHED = "finished"
EVENT_CANCEL = "cancel"
EVENT_PARENT = "parent"
EVENT_SCHEDULE = "schedule"


def encode_event(kind: str, job_id: str, status: str = "") -> bytes:
    """Encode an event of the broadcast channel: ``version NUL kind NUL id NUL status``.

    Plain bytes, not msgpack: every worker reads every event, so decoding must be cheap.
    """
    return f"{SCHEMA_VERSION}\0{kind}\0{job_id}\0{status}".encode()


def finished_event(job_id: str, status: str) -> tuple[str, bytes]:
    """The announcement that a job ended: its channel and its event."""
    return FINISHED_CHANNEL, encode_event(EVENT_FINISHED, job_id, status)


_EVENT_KINDS = frozenset({EVENT_FINISHED, EVENT_CANCEL, EVENT_PARENT, EVENT_SCHEDULE})


def decode_event(data: bytes) -> tuple[str, str, str]:
    """Decode an event made by :func:`encode_event` into ``(kind, job_id, status)``.

    :raises DecodeError: not an event of this schema version
    """
    if not isinstance(data, bytes) or len(data) > 1024:
        raise DecodeError("malformed event")
    try:
        version, kind, job_id, status = data.decode().split("\0")
    except (UnicodeDecodeError, ValueError):
        raise DecodeError("malformed event") from None
    if version != _VERSION_TEXT or kind not in _EVENT_KINDS or not job_id:
        raise DecodeError("malformed event")
    return kind, job_id, status


_VERSION_TEXT = str(SCHEMA_VERSION)
