"""The wire format: msgpack maps with a schema version, decoded defensively.

Everything read from a broker or a store is untrusted: decoding is bounded in size and
depth, refuses extension types, checks every field's type and value (with the rules the
constructors of ``_jobs`` apply, so whatever a producer builds decodes and whatever
decodes can run), and a failure is always a :class:`~tasqueue_anyio.DecodeError` whose
text says what was wrong. :func:`peek_message` reads the ids of a message that does not
decode, trusting nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import attrs
import msgpack

from ._exceptions import DecodeError, InvalidInputError, PayloadTooLargeError
from ._jobs import (
    MAX_ERROR_HISTORY,
    MAX_ERROR_HISTORY_SIZE,
    Backoff,
    Job,
    JobMessage,
    Meta,
    Status,
    check_count,
    check_cron,
    check_priority,
    check_seconds,
    check_task,
    check_time,
    validate_id,
    validate_queue,
)

__all__ = [
    "SCHEMA_VERSION",
    "Peek",
    "decode_event",
    "decode_message",
    "encode_event",
    "encode_message",
    "job_from_wire",
    "job_to_wire",
    "peek_message",
    "unpack",
]

#: Version of the job message schema; decoders refuse versions they do not know.
SCHEMA_VERSION = 1
#: Follow-up jobs nest; deeper than this is refused.
MAX_DEPTH = 32
#: Default upper bound on one encoded message.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024
#: Upper bound on a stored group or chain record and on a cron schedule's record: what
#: the producer may write (:func:`check_record_size`) and what is decoded.
MAX_RECORD_SIZE = 64 * 1024 * 1024


def why(exc: BaseException) -> str:
    """An exception's text for a decode error's reason: its type name too when the text
    says little (msgpack raises some errors with no text at all)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ext_refused(code: int, data: bytes) -> object:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def unpack(
    data: bytes, max_size: int, what: str = "message", *, strict_map_key: bool = True
) -> Any:
    """Decode untrusted msgpack bytes: at most ``max_size`` of them, no extension types,
    string map keys only (unless ``strict_map_key`` is false: then ints, floats, bools
    and bytes may be keys too), nesting bounded by msgpack's own limit.

    :param what: what the bytes should be, for the error's text
    :raises DecodeError: anything else
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"{what} is {len(data)} bytes, over the limit of {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=strict_map_key,
            ext_hook=_ext_refused,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"not a msgpack {what}: {why(exc)}") from exc


def check_record_size(what: str, data: bytes) -> bytes:
    """Return ``data`` if it is at most :data:`MAX_RECORD_SIZE` long, else raise
    :class:`PayloadTooLargeError` (so that nothing is stored that cannot be decoded)."""
    if len(data) > MAX_RECORD_SIZE:
        raise PayloadTooLargeError(what, len(data), MAX_RECORD_SIZE)
    return data


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

#: A field's rule: ``rule(value, name)`` raises InvalidInputError for a value it refuses
#: (never called with ``None``). The rules are the ones the constructors apply.
_Rule = Callable[[Any, str], None]


def _id(value: Any, name: str) -> None:
    validate_id(value, name.replace("_", " "))


def _queue(value: Any, name: str) -> None:
    validate_queue(value)


def _backoff(value: Any, name: str) -> None:
    if len(value) != 4 or type(value[3]) is not bool:
        raise InvalidInputError(f"{name} must be [initial, factor, maximum, jitter]")
    for part, part_name in zip(value[:3], ("initial", "factor", "maximum"), strict=True):
        if type(part) not in _NUM:  # exact types: a bool is not a number here
            raise InvalidInputError(f"{name} {part_name} has type {type(part).__name__}")
        check_seconds(part, f"{name} {part_name}")


_STATUSES = {s.value: s for s in Status}


def _status(value: Any, name: str) -> None:
    if value not in _STATUSES:
        raise InvalidInputError(f"unknown status {value!r}")


def _trace(value: Any, name: str) -> None:
    if not all(type(k) is str and type(v) is str for k, v in value.items()):
        raise InvalidInputError(f"{name} must map str to str")


_Fields = tuple[tuple[str, tuple[type, ...], "_Rule | None"], ...]

#: (name, allowed types, rule) of each position of a job's array.
_JOB_FIELDS: _Fields = (
    ("task", (str,), check_task),
    ("payload", (bytes,), None),
    ("id", (str,), _id),
    ("queue", (str,), _queue),
    ("max_retries", _INT, check_count),
    ("backoff", _OPT_LIST, _backoff),
    ("timeout", _OPT_NUM, check_seconds),
    ("eta", _OPT_NUM, check_time),
    ("delay", _OPT_NUM, check_seconds),
    ("schedule", _OPT_STR, check_cron),
    ("on_success", (list,), None),
    ("on_error", (list,), None),
)
_N_JOB_FIELDS = len(_JOB_FIELDS)
#: (name, allowed types, rule) of each position of a meta's array.
_META_FIELDS: _Fields = (
    ("id", (str,), _id),
    ("status", (str,), _status),
    ("queue", (str,), _queue),
    ("max_retries", _INT, check_count),
    ("retried", _INT, check_count),
    ("prev_error", _OPT_STR, None),
    ("created_at", _NUM, check_time),
    ("processed_at", _OPT_NUM, check_time),
    ("eta", _OPT_NUM, check_time),
    ("timeout", _OPT_NUM, check_seconds),
    ("schedule", _OPT_STR, check_cron),
    ("backoff", _OPT_LIST, _backoff),
    ("prev_job_result", _OPT_BYTES, None),
    ("attempt", _INT, check_count),
    ("group_id", _OPT_STR, _id),
    ("chain_id", _OPT_STR, _id),
    ("deadline", _OPT_NUM, check_time),
    ("trace", (dict,), _trace),
)
_N_META_FIELDS = len(_META_FIELDS)


#: A job's optional options, in a map after its fixed fields (present only when one of
#: them is not its default, so a plain job's message is what it was before they came):
#: key -> (allowed types, rule).
_JOB_OPTIONS: dict[str, tuple[tuple[type, ...], _Rule]] = {
    "priority": (_INT, check_priority),
    "unique_for": (_NUM, check_seconds),
    "successful_ttl": (_NUM, check_seconds),
    "failed_ttl": (_NUM, check_seconds),
}


def _check_options(value: Any) -> dict[str, Any]:
    """A job's options map, checked key by key (an unknown key is refused: it is an option
    of a newer version that this worker cannot honour)."""
    if type(value) is not dict:
        raise DecodeError(f"job options are a {type(value).__name__}, not a map")
    for key, option in value.items():
        known = _JOB_OPTIONS.get(key)
        if known is None:
            raise DecodeError(f"job option {str(key)[:64]!r} is unknown to this version")
        types, rule = known
        if type(option) not in types:
            raise DecodeError(f"job option {key!r} has type {type(option).__name__}")
        try:
            rule(option, key)
        except InvalidInputError as exc:
            raise DecodeError(f"job option {key!r} is invalid: {exc}") from None
    return value


def _check(values: Any, fields: _Fields, what: str, *, extra: bool = False) -> list[Any]:
    """``values`` if it is an array of ``fields``, each of an allowed type (exactly: a
    bool is not an int here) and passing its rule; else raise :class:`DecodeError`.
    With ``extra``, one more value may follow the fields (it is not checked here)."""
    if type(values) is not list or (
        len(values) != len(fields) and not (extra and len(values) == len(fields) + 1)
    ):
        raise DecodeError(f"{what} is not an array of {len(fields)} fields")
    for value, (name, types, rule) in zip(values, fields, strict=False):
        if type(value) not in types:
            raise DecodeError(f"{what} field {name!r} has type {type(value).__name__}")
        if rule is not None and value is not None:
            try:
                rule(value, name)
            except InvalidInputError as exc:
                text = str(exc)
                if len(text) > _MAX_REASON:  # it may quote a huge value
                    text = text[: _MAX_REASON - 15] + " ...[truncated]"
                raise DecodeError(f"{what} field {name!r} is invalid: {text}") from None
    return values


#: Longest text of a field's refusal in a decode error.
_MAX_REASON = 512


def _backoff_to_wire(b: Backoff | None) -> list[Any] | None:
    return None if b is None else [b.initial, b.factor, b.maximum, b.jitter]


def _backoff_from_wire(v: Any) -> Backoff | None:
    # checked by _check's rule: build it without running the validators again
    if v is None:
        return None
    backoff = _new_backoff(Backoff)
    _set(backoff, "initial", v[0])
    _set(backoff, "factor", v[1])
    _set(backoff, "maximum", v[2])
    _set(backoff, "jitter", v[3])
    return backoff


def _job_to_wire(job: Job) -> list[Any]:
    eta = None if job.eta is None else job.eta.timestamp()
    wire = [
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
    if (
        job.priority
        or job.unique_for is not None
        or job.successful_ttl is not None
        or job.failed_ttl is not None
    ):
        options: dict[str, Any] = {}
        if job.priority:
            options["priority"] = job.priority
        for name in _OPTIONAL_SECONDS:
            value = getattr(job, name)
            if value is not None:
                options[name] = value
        wire.append(options)
    return wire


#: the job options that are seconds or ``None``
_OPTIONAL_SECONDS = ("unique_for", "successful_ttl", "failed_ttl")


_new_job = Job.__new__
_new_backoff = Backoff.__new__
_set = object.__setattr__


def _job_from_wire(d: Any, depth: int = 0) -> Job:
    if depth > MAX_DEPTH:
        raise DecodeError(f"follow-up jobs nested deeper than {MAX_DEPTH}")
    fields = _check(d, _JOB_FIELDS, "job", extra=True)
    options = None
    if len(fields) > _N_JOB_FIELDS:
        options = _check_options(fields[_N_JOB_FIELDS])
        fields = fields[:_N_JOB_FIELDS]
    task, payload, job_id, queue, max_retries, backoff, timeout, eta, delay, schedule, ok, err = (
        fields
    )
    # the rules of Job() that span fields
    if eta is not None and delay is not None:
        raise DecodeError("invalid job: both eta and delay")
    if depth > 0 and schedule is not None:
        raise DecodeError("invalid job: a follow-up job has a schedule")
    try:
        eta_dt = None if eta is None else datetime.fromtimestamp(eta, timezone.utc)
    except (OverflowError, OSError, ValueError) as exc:
        raise DecodeError(f"invalid job: eta {eta!r}: {why(exc)}") from exc
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
    if options is None:
        _set(job, "priority", 0)
        _set(job, "unique_for", None)
        _set(job, "successful_ttl", None)
        _set(job, "failed_ttl", None)
    else:
        _set(job, "priority", options.get("priority", 0))
        for name in _OPTIONAL_SECONDS:
            _set(job, name, options.get(name))
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
    wire = [
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
    if m.errors:
        wire.append(list(m.errors))
    return wire


def _check_errors(value: Any) -> tuple[str, ...]:
    """A meta's error history, checked (a list of at most MAX_ERROR_HISTORY str of at most
    MAX_ERROR_HISTORY_SIZE UTF-8 bytes together)."""
    if type(value) is not list or not value or len(value) > MAX_ERROR_HISTORY:
        raise DecodeError(f"meta errors must be a list of 1 to {MAX_ERROR_HISTORY} str")
    if not all(type(e) is str for e in value):
        raise DecodeError("meta errors must be str")
    if sum(len(e.encode("utf-8", "surrogatepass")) for e in value) > MAX_ERROR_HISTORY_SIZE:
        raise DecodeError(f"meta errors are over {MAX_ERROR_HISTORY_SIZE} bytes together")
    return tuple(value)


def _meta_from_wire(d: Any) -> Meta:
    values = _check(d, _META_FIELDS, "meta", extra=True)
    errors = _check_errors(values[_N_META_FIELDS]) if len(values) > _N_META_FIELDS else ()
    return Meta(
        id=values[0],
        status=_STATUSES[values[1]],
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
        trace=values[17],
        errors=errors,
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
    d = unpack(data, max_size)
    if type(d) is not list or len(d) != 3:
        raise DecodeError("message is not a [version, meta, job] array")
    if d[0] != SCHEMA_VERSION or type(d[0]) is not int:
        raise DecodeError(f"unknown schema version {d[0]!r} (this library reads {SCHEMA_VERSION})")
    meta = _meta_from_wire(d[1])
    job = _job_from_wire(d[2])
    if job.id != meta.id:
        raise DecodeError("job id and meta id differ")
    return JobMessage(meta=meta, job=job)


@attrs.frozen(kw_only=True)
class Peek:
    """What :func:`peek_message` could read of a message: each field is ``None`` unless
    it was there and valid on its own."""

    id: str | None = None
    queue: str | None = None
    task: str | None = None
    group_id: str | None = None
    chain_id: str | None = None


#: Meta positions :func:`peek_message` reads (the others it skips), with their rules.
_PEEKED_META = {0: "id", 2: "queue", 14: "group_id", 15: "chain_id"}


def peek_message(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Peek:
    """Read what can be read of a job message that may not decode: its job id, and its
    queue, task name and group and chain ids, each where schema version 1 puts it.

    Tolerant and bounded: it reads the first ``max_size`` bytes at most, one value at a
    time, stops at the first one that does not parse, skips the values it does not need
    without building them, and trusts nothing: each value is checked alone (an id as an
    id, ...). The id needs the version to be this library's and the meta to be an array;
    the other fields need the meta (and the job) to have their full length.
    """
    found: dict[str, str] = {}
    try:
        unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_refused,
            max_buffer_size=max(1, min(len(data), max_size)),
        )
        unpacker.feed(bytes(memoryview(data)[:max_size]))
        if unpacker.read_array_header() != 3:
            return Peek()
        version = unpacker.unpack()
        if type(version) is not int or version != SCHEMA_VERSION:
            return Peek()
        length = unpacker.read_array_header()
        full = length in (_N_META_FIELDS, _N_META_FIELDS + 1)
        for index in range(length if full else min(length, 1)):
            name = _PEEKED_META.get(index)
            if name is None:
                unpacker.skip()
                continue
            value = unpacker.unpack()
            if type(value) is str:
                _peeked(found, name, value, _META_FIELDS[index][2])
        if full and unpacker.read_array_header() in (
            _N_JOB_FIELDS,
            _N_JOB_FIELDS + 1,
        ):
            value = unpacker.unpack()
            if type(value) is str:
                _peeked(found, "task", value, check_task)
    except Exception:  # whatever did not parse is not there
        pass
    return Peek(**found)


def _peeked(found: dict[str, str], name: str, value: str, rule: _Rule | None) -> None:
    try:
        if rule is not None:
            rule(value, name)
    except InvalidInputError:
        return
    found[name] = value


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
#: a running job stored new progress (on FINISHED_CHANNEL)
EVENT_PROGRESS = "progress"


def encode_event(kind: str, job_id: str, status: str = "") -> bytes:
    """Encode an event of the broadcast channel: ``version NUL kind NUL id NUL status``.

    Plain bytes, not msgpack: every worker reads every event, so decoding must be cheap.
    """
    return f"{SCHEMA_VERSION}\0{kind}\0{job_id}\0{status}".encode()


def finished_event(job_id: str, status: str) -> tuple[str, bytes]:
    """The announcement that a job ended: its channel and its event."""
    return FINISHED_CHANNEL, encode_event(EVENT_FINISHED, job_id, status)


_EVENT_KINDS = frozenset(
    {EVENT_FINISHED, EVENT_CANCEL, EVENT_PARENT, EVENT_SCHEDULE, EVENT_PROGRESS}
)


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
