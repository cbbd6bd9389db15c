"""The wire format: msgpack maps with a schema version, decoded defensively.

Everything read from a broker or a store is untrusted: decoding is bounded in size and
depth, refuses extension types and checks every field's type, and a failure is always a
:class:`~tasqueue_anyio.DecodeError`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import attrs
import msgpack

from ._exceptions import DecodeError, InvalidInputError
from ._jobs import Backoff, Job, JobMessage, Meta, Status, validate_id, validate_queue

__all__ = ["SCHEMA_VERSION", "decode_event", "decode_message", "encode_event", "encode_message"]

#: Version of the job message schema; decoders refuse versions they do not know.
SCHEMA_VERSION = 1
#: Follow-up jobs nest; deeper than this is refused.
MAX_DEPTH = 32
#: Default upper bound on one encoded message.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024

T = TypeVar("T")


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


def _field(d: dict[str, Any], key: str, typ: type[T] | tuple[type, ...], optional: bool = False) -> Any:
    try:
        value = d[key]
    except KeyError:
        if optional:
            return None
        raise DecodeError(f"field {key!r} is missing") from None
    if value is None and optional:
        return None
    if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, float, (int, float))):
        raise DecodeError(f"field {key!r} has type {type(value).__name__}")
    return value


# -- jobs -------------------------------------------------------------------------------


def _backoff_to_wire(b: Backoff | None) -> list[Any] | None:
    return None if b is None else [b.initial, b.factor, b.maximum, b.jitter]


def _backoff_from_wire(v: Any) -> Backoff | None:
    if v is None:
        return None
    if (
        not isinstance(v, list)
        or len(v) != 4
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v[:3])
        or not isinstance(v[3], bool)
    ):
        raise DecodeError("field 'backoff' is malformed")
    return Backoff(initial=v[0], factor=v[1], maximum=v[2], jitter=v[3])


def _job_to_wire(job: Job, eta: float | None) -> dict[str, Any]:
    return {
        "task": job.task,
        "payload": job.payload,
        "id": job.id,
        "queue": job.queue,
        "max_retries": job.max_retries,
        "backoff": _backoff_to_wire(job.backoff),
        "timeout": job.timeout,
        "eta": eta,
        "delay": job.delay,
        "schedule": job.schedule,
        "on_success": [_job_to_wire(j, j.eta.timestamp() if j.eta else None) for j in job.on_success],
        "on_error": [_job_to_wire(j, j.eta.timestamp() if j.eta else None) for j in job.on_error],
    }


def _job_from_wire(d: Any, depth: int = 0) -> Job:
    if depth > MAX_DEPTH:
        raise DecodeError(f"follow-up jobs nested deeper than {MAX_DEPTH}")
    if not isinstance(d, dict):
        raise DecodeError("job is not a map")
    from datetime import datetime, timezone

    eta = _field(d, "eta", (int, float), optional=True)
    on_success = _field(d, "on_success", list)
    on_error = _field(d, "on_error", list)
    try:
        return Job(
            _field(d, "task", str),
            _field(d, "payload", bytes),
            id=_field(d, "id", str),
            queue=_field(d, "queue", str),
            max_retries=_field(d, "max_retries", int),
            backoff=_backoff_from_wire(d.get("backoff")),
            timeout=_field(d, "timeout", (int, float), optional=True),
            eta=None if eta is None else datetime.fromtimestamp(eta, timezone.utc),
            delay=_field(d, "delay", (int, float), optional=True),
            schedule=_field(d, "schedule", str, optional=True),
            on_success=[_job_from_wire(j, depth + 1) for j in on_success],
            on_error=[_job_from_wire(j, depth + 1) for j in on_error],
        )
    except InvalidInputError as exc:
        raise DecodeError(f"invalid job: {exc}") from exc
    except (OverflowError, OSError, ValueError) as exc:
        raise DecodeError(f"invalid job: {exc}") from exc


def _meta_to_wire(m: Meta) -> dict[str, Any]:
    return {
        "id": m.id,
        "status": m.status.value,
        "queue": m.queue,
        "max_retries": m.max_retries,
        "retried": m.retried,
        "prev_error": m.prev_error,
        "created_at": m.created_at,
        "processed_at": m.processed_at,
        "eta": m.eta,
        "timeout": m.timeout,
        "schedule": m.schedule,
        "backoff": _backoff_to_wire(m.backoff),
        "prev_job_result": m.prev_job_result,
        "attempt": m.attempt,
        "group_id": m.group_id,
        "chain_id": m.chain_id,
        "deadline": m.deadline,
        "trace": m.trace,
    }


_NUM = (int, float)


def _meta_from_wire(d: Any) -> Meta:
    if not isinstance(d, dict):
        raise DecodeError("meta is not a map")
    try:
        status = Status(_field(d, "status", str))
    except ValueError as exc:
        raise DecodeError(f"unknown status {d.get('status')!r}") from exc
    trace = _field(d, "trace", dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in trace.items()):
        raise DecodeError("field 'trace' is malformed")
    group_id = _field(d, "group_id", str, optional=True)
    chain_id = _field(d, "chain_id", str, optional=True)
    try:
        return Meta(
            id=validate_id(_field(d, "id", str)),
            status=status,
            queue=validate_queue(_field(d, "queue", str)),
            max_retries=_field(d, "max_retries", int),
            retried=_field(d, "retried", int),
            prev_error=_field(d, "prev_error", str, optional=True),
            created_at=_field(d, "created_at", _NUM),
            processed_at=_field(d, "processed_at", _NUM, optional=True),
            eta=_field(d, "eta", _NUM, optional=True),
            timeout=_field(d, "timeout", _NUM, optional=True),
            schedule=_field(d, "schedule", str, optional=True),
            backoff=_backoff_from_wire(d.get("backoff")),
            prev_job_result=_field(d, "prev_job_result", bytes, optional=True),
            attempt=_field(d, "attempt", int),
            group_id=None if group_id is None else validate_id(group_id, "group id"),
            chain_id=None if chain_id is None else validate_id(chain_id, "chain id"),
            deadline=_field(d, "deadline", _NUM, optional=True),
            trace=trace,
        )
    except InvalidInputError as exc:
        raise DecodeError(f"invalid meta: {exc}") from exc


def encode_message(msg: JobMessage) -> bytes:
    """Encode a job message for a queue or the results store."""
    return msgpack.packb(  # type: ignore[no-any-return]
        {"v": SCHEMA_VERSION, "meta": _meta_to_wire(msg.meta), "job": _job_to_wire(msg.job, msg.meta.eta)},
        use_bin_type=True,
    )


def decode_message(data: bytes, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> JobMessage:
    """Decode bytes made by :func:`encode_message`.

    :raises DecodeError: the bytes are not a job message of a known schema version
    """
    d = _unpack(data, max_size)
    if not isinstance(d, dict):
        raise DecodeError("message is not a map")
    version = d.get("v")
    if version != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema version {version!r} (this library reads {SCHEMA_VERSION})")
    meta = _meta_from_wire(d.get("meta"))
    job = _job_from_wire(d.get("job"))
    if job.id != meta.id:
        raise DecodeError("job id and meta id differ")
    return JobMessage(meta=meta, job=job)


def with_status(msg: JobMessage, status: Status) -> JobMessage:
    """``msg`` with its meta's status replaced."""
    if msg.meta.status is status:
        return msg
    return attrs.evolve(msg, meta=attrs.evolve(msg.meta, status=status))


# -- events on the broadcast channel ---------------------------------------------------------

#: Event kinds on the broadcast channel.
EVENT_FINISHED = "finished"
EVENT_CANCEL = "cancel"


def encode_event(kind: str, job_id: str, status: str = "") -> bytes:
    """Encode an event of the broadcast channel."""
    return msgpack.packb([SCHEMA_VERSION, kind, job_id, status], use_bin_type=True)  # type: ignore[no-any-return]


def decode_event(data: bytes) -> tuple[str, str, str]:
    """Decode an event made by :func:`encode_event` into ``(kind, job_id, status)``."""
    d = _unpack(data, 4096)
    if (
        not isinstance(d, list)
        or len(d) != 4
        or d[0] != SCHEMA_VERSION
        or not all(isinstance(x, str) for x in d[1:])
    ):
        raise DecodeError("malformed event")
    return d[1], d[2], d[3]
