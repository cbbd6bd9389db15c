"""Jobs, their metadata and their context: the value objects of the library."""

from __future__ import annotations

import enum
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import attrs
import msgpack
from croniter import CroniterBadDateError, croniter

from ._exceptions import InvalidInputError, JobCancelledError

__all__ = [
    "DEFAULT_QUEUE",
    "Backoff",
    "Job",
    "JobContext",
    "JobMessage",
    "Meta",
    "Progress",
    "Status",
    "current_job",
    "validate_id",
    "validate_queue",
]

#: The queue of a job or task that names none.
DEFAULT_QUEUE = "default"

#: The largest count a job carries: its ``max_retries``, and the retry and delivery counts
#: of its runs (a signed 32-bit int: every store, script and run token handles it exactly).
MAX_COUNT = 2**31 - 1
#: The longest span of seconds a job or its group or chain carries (a timeout, a delay, a
#: backoff step; about 317 years): a time that far ahead is still within :data:`MAX_TIME`.
MAX_SECONDS = 1e10
#: The range of the POSIX times a job carries: years 1 to 9999 (UTC), what a
#: :class:`~datetime.datetime` holds.
MIN_TIME = -62135596800.0
MAX_TIME = 253402300799.0
#: The longest cron expression.
MAX_SCHEDULE_LENGTH = 256
#: The most entries of a job's error history (:attr:`Meta.errors`), and their most UTF-8
#: bytes together.
MAX_ERROR_HISTORY = 8
MAX_ERROR_HISTORY_SIZE = 4096
#: The highest job priority (:attr:`Job.priority` runs from 0, the default, to this).
MAX_PRIORITY = 9

_QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_ID_RE = re.compile(r"[A-Za-z0-9_.:@+=/-]{1,255}")


def validate_channel(channel: object) -> str:
    """Return ``channel`` if it may name a broadcast channel (a non-empty str), else raise
    :class:`InvalidInputError`; each broker encodes it into its own names."""
    if not isinstance(channel, str) or not channel:
        raise InvalidInputError(f"a channel name must be a non-empty str, got {channel!r}")
    return channel


def validate_queue(name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise :class:`InvalidInputError`.

    Queue names become Redis keys and NATS subjects, so they are limited to letters,
    digits, ``_`` and ``-`` (1 to 128 characters): no wildcards, separators or spaces.
    """
    if not isinstance(name, str) or not _QUEUE_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid queue name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ -"
        )
    return name


def validate_id(value: object, what: str = "job id") -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidInputError`.

    Ids are 1 to 255 characters from letters, digits and ``_ . : @ + = / -``.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidInputError(
            f"invalid {what} {value!r}: use 1-255 characters from A-Z a-z 0-9 _ . : @ + = / -"
        )
    return value if type(value) is str else str.__str__(value)  # a handle: its plain id


def new_id() -> str:
    """A new random job id (32 hex digits)."""
    return uuid.uuid4().hex


class Status(str, enum.Enum):
    """The status of a job (values are the Go original's strings, plus ``cancelled``)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    RETRYING = "retrying"
    SUCCESSFUL = "successful"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether a job in this status never runs again."""
        return self in (Status.SUCCESSFUL, Status.FAILED, Status.CANCELLED)

    def __str__(self) -> str:
        return self.value


# -- the value rules: one place for what a job's fields may hold ------------------------------
#
# The constructors (Job, Backoff, Group, Chain) and the decoder of untrusted messages
# (``_codec``) apply the same rules, so whatever a producer can build decodes, and a
# message a worker accepts holds only values its run can use.


def check_count(value: object, name: str) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is an int from 0 to ``MAX_COUNT``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise InvalidInputError(f"{name} must be an int from 0 to {MAX_COUNT}, got {value!r}")


def check_priority(value: object, name: str = "priority") -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is an int from 0 to
    ``MAX_PRIORITY``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise InvalidInputError(f"{name} must be an int from 0 to {MAX_PRIORITY}, got {value!r}")


def check_seconds(value: object, name: str) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is a number > 0 and at most
    ``MAX_SECONDS`` (so not NaN or infinite)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_SECONDS
    ):
        raise InvalidInputError(
            f"{name} must be a number > 0 and <= {MAX_SECONDS:.0e}, got {value!r}"
        )


def check_time(value: object, name: str) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is a POSIX time from
    :data:`MIN_TIME` to :data:`MAX_TIME` (years 1 to 9999; so not NaN or infinite)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not MIN_TIME <= value <= MAX_TIME
    ):
        raise InvalidInputError(
            f"{name} must be a POSIX time in years 1 to 9999 (UTC), got {value!r}"
        )


def check_cron(value: object, name: str = "schedule") -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is ``None`` or a valid cron
    expression of at most :data:`MAX_SCHEDULE_LENGTH` characters."""
    if isinstance(value, str) and len(value) > MAX_SCHEDULE_LENGTH:
        raise InvalidInputError(
            f"{name} is {len(value)} characters long: a cron expression has at most "
            f"{MAX_SCHEDULE_LENGTH}"
        )
    check_schedule(value)


def _check_non_negative_int(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_count(value, attribute.name)


def _check_priority(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_priority(value, attribute.name)


def _check_positive(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_seconds(value, attribute.name)


def _check_bool(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{attribute.name} must be True or False, got {value!r}")


def _check_positive_or_none(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        check_seconds(value, attribute.name)


@attrs.frozen(kw_only=True)
class Backoff:
    """Exponential retry backoff with jitter, capped.

    The n-th retry (``n`` from 0) waits ``min(maximum, initial * factor ** n)`` seconds;
    with ``jitter`` a random delay between half of that and all of it ("equal jitter"),
    so retries of many jobs that failed together spread out. ``initial``, ``factor`` and
    ``maximum`` are numbers > 0 and at most ``MAX_SECONDS`` (1e10).
    """

    initial: float = attrs.field(default=1.0, validator=_check_positive)
    factor: float = attrs.field(default=2.0, validator=_check_positive)
    maximum: float = attrs.field(default=300.0, validator=_check_positive)
    jitter: bool = attrs.field(default=True, validator=_check_bool)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first retry)."""
        try:
            base = min(self.maximum, self.initial * self.factor**retry)
        except OverflowError:
            base = self.maximum
        if self.jitter:
            return base / 2 + random.random() * base / 2
        return base


def check_task(value: object, name: str = "task") -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is a task name: a non-empty str
    of at most 255 characters."""
    if not isinstance(value, str) or not value or len(value) > 255:
        raise InvalidInputError(f"task name must be a non-empty str of <= 255 chars, got {value!r}")


def _check_task(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_task(value)


def _check_payload(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes):
        raise InvalidInputError(
            f"payload must be bytes (encode it yourself, e.g. json.dumps(x).encode()), "
            f"got {type(value).__name__}"
        )


def _check_eta(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, datetime):
        raise InvalidInputError(f"eta must be a datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(
            f"eta {value.isoformat()} is naive: pass a timezone-aware datetime, "
            f"e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    check_time(value.timestamp(), "eta")


#: What croniter raises for an expression it cannot read or evaluate: its ``CroniterError``
#: family (``ValueError`` subclasses: bad syntax, an unknown name, no fire time found),
#: ``KeyError`` and ``TypeError`` (older versions, odd fields), and ``OverflowError`` or
#: ``OSError`` for a start time out of ``datetime``'s range.
_CRON_ERRORS = (ValueError, KeyError, TypeError, OverflowError, OSError)


def check_schedule(value: object) -> None:
    """Raise :class:`InvalidInputError` unless ``value`` is ``None`` or a cron expression
    croniter reads.

    Syntax only: a stored schedule whose expression has no fire time left still decodes
    (the scheduler disables it); :class:`Job` and ``enqueue`` also require a fire time
    (``cron_next_fire``).
    """
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidInputError(f"schedule must be a cron expression string, got {value!r}")
    _, expression = split_time_zone(value)
    try:
        croniter(expression)
    except _CRON_ERRORS as exc:
        raise InvalidInputError(f"invalid cron schedule {value!r}: {exc}") from exc


#: The prefixes that give a cron expression its time zone: ``"CRON_TZ=Europe/Paris 0 6 * * *"``
#: (as cronie and Go's robfig/cron read it; ``TZ=`` is accepted too).
TIME_ZONE_PREFIXES = ("CRON_TZ=", "TZ=")


def split_time_zone(value: str) -> tuple[ZoneInfo | None, str]:
    """The time zone of a cron expression (``None``: UTC) and the expression without it.

    :raises InvalidInputError: the prefix names no IANA time zone this system knows
    """
    head, _, rest = value.lstrip().partition(" ")
    for prefix in TIME_ZONE_PREFIXES:
        if head.startswith(prefix):
            name = head[len(prefix) :]
            try:
                return ZoneInfo(name), rest.strip()
            except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
                raise InvalidInputError(
                    f"invalid cron schedule {value!r}: {name!r} is not an IANA time zone "
                    f"this system knows ({type(exc).__name__})"
                ) from None
    return None, value


def with_time_zone(expression: str, zone: str | None) -> str:
    """``expression`` in time zone ``zone`` (an IANA name; ``None``: as it is)."""
    if zone is None:
        return expression
    if split_time_zone(expression)[0] is not None:
        raise InvalidInputError(f"schedule {expression!r} already names a time zone")
    result = f"CRON_TZ={zone} {expression}"
    split_time_zone(result)  # the zone must exist
    return result


def cron_next_fire(expression: str, after: float) -> float:
    """The first fire time of ``expression`` strictly after POSIX time ``after``.

    The expression is evaluated in UTC, or in the IANA time zone of a ``CRON_TZ=Zone``
    prefix, with daylight saving time handled as cron does: a fire time in the hour the
    clocks skip (spring) fires once, at the first instant after the gap; a fire time in
    the hour the clocks repeat (autumn) fires once, at its first occurrence, unless the
    expression's hour field is a wildcard (``*``, ``*/2``): then it fires in both passes,
    as its fire times really recur.

    :raises InvalidInputError: ``expression`` is not a cron expression, it has no fire
        time after ``after`` (croniter looks up to 50 years ahead: the 31st of February,
        a year gone), ``after`` is out of range, or its time zone is unknown
    """
    zone, bare = split_time_zone(expression)
    try:
        start = datetime.fromtimestamp(after, zone or timezone.utc)
    except _CRON_ERRORS as exc:
        raise InvalidInputError(
            f"invalid cron schedule {expression!r}: no fire time after {after!r} ({exc})"
        ) from exc
    try:
        fires = croniter(bare, start)
        if zone is None:
            return float(fires.get_next(float))
        fields = bare.split()
        hourly = len(fields) < 2 or fields[1].startswith("*")
        while True:
            fire: datetime = fires.get_next(datetime)
            if hourly or not _repeated(fire):
                return fire.timestamp()
    except CroniterBadDateError as exc:
        raise InvalidInputError(
            f"invalid cron schedule {expression!r}: it has no fire time after "
            f"{start:%Y-%m-%d %H:%M:%S} {start.tzname()} in the 50 years croniter searches "
            f"({exc})"
        ) from exc
    except _CRON_ERRORS as exc:
        raise InvalidInputError(f"invalid cron schedule {expression!r}: {exc}") from exc


def _repeated(local: datetime) -> bool:
    """Whether ``local`` is the second occurrence of a wall-clock time the clocks repeat."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _check_schedule(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    check_cron(value)
    if value is not None:
        # a schedule must fire: refuse "0 0 31 2 *" here, not in the scheduler
        cron_next_fire(str(value), time.time())


def _to_jobs(value: Sequence[Job]) -> tuple[Job, ...]:
    jobs = tuple(value)
    for job in jobs:
        if not isinstance(job, Job):
            raise InvalidInputError(f"follow-up jobs must be Job instances, got {job!r}")
        if job.schedule is not None:
            raise InvalidInputError(
                f"follow-up job {job.id} has a schedule: enqueue cron jobs with Server.enqueue"
            )
    return jobs


@attrs.frozen
class Job:
    """A unit of work: a registered task's name and an opaque payload, plus options.

    This is the bytes-level form of a job (what travels on the wire, and what producers
    in other languages build). A typed task builds it for you: ``add.job(40, 2)``.
    ``Job`` is frozen: give follow-up jobs (``on_success``, ``on_error``) and every
    other option in its constructor (or derive a copy with ``attrs.evolve``).

    :param task: the name of a registered task
    :param payload: bytes handed to the task's handler (for a typed task: its codec's
        encoding of ``[args, kwargs]``)
    :param id: the job id (default: a random one); validated like ``validate_id``
    :param queue: the queue to put the job on
    :param max_retries: how many times to run the handler again after a failure (0 to
        ``MAX_COUNT``, 2**31 - 1)
    :param backoff: wait between retries (default: retry at once, as in the Go original)
    :param timeout: seconds the handler may run before it is stopped (a failure); > 0 and
        at most ``MAX_SECONDS`` (1e10)
    :param eta: a timezone-aware time before which the job does not run (in years 1 to
        9999 once converted to UTC)
    :param delay: seconds from enqueue before the job runs (instead of ``eta``); > 0 and
        at most ``MAX_SECONDS``
    :param schedule: a cron expression (at most 256 characters): the job runs again at
        each fire time. Evaluated in UTC, or in an IANA time zone given as a prefix:
        ``"CRON_TZ=Europe/Paris 0 6 * * *"`` (daylight saving time as cron handles it:
        see ``cron_next_fire``)
    :param on_success: jobs to enqueue once this job has succeeded
    :param on_error: jobs to enqueue once this job has finally failed
    :param priority: 0 (the default) to ``MAX_PRIORITY`` (9): among the due messages
        of its queue, one of a higher priority is always fetched before one of a lower
        priority; FIFO within a priority. Retries keep it; follow-up jobs carry their own
    :param unique_for: seconds after the job ended ``successful`` or ``failed`` during
        which its id stays taken: an enqueue of a job with this id stores nothing and
        returns the existing job's handle (while the job is queued, scheduled or running
        its id is taken anyway). > 0 and at most ``MAX_SECONDS``
    :param successful_ttl: seconds the job's state and result are kept once it ended
        ``successful``, instead of the results store's ``job_ttl`` and ``result_ttl``
        (> 0, at most ``MAX_SECONDS``)
    :param failed_ttl: the same for a job that ended ``failed``
    """

    task: str = attrs.field(validator=_check_task)
    payload: bytes = attrs.field(default=b"", validator=_check_payload)
    id: str = attrs.field(factory=new_id, kw_only=True, validator=lambda i, a, v: validate_id(v))
    queue: str = attrs.field(
        default=DEFAULT_QUEUE, kw_only=True, validator=lambda i, a, v: validate_queue(v)
    )
    max_retries: int = attrs.field(default=0, kw_only=True, validator=_check_non_negative_int)
    backoff: Backoff | None = attrs.field(default=None, kw_only=True)
    timeout: float | None = attrs.field(
        default=None, kw_only=True, validator=_check_positive_or_none
    )
    eta: datetime | None = attrs.field(default=None, kw_only=True, validator=_check_eta)
    delay: float | None = attrs.field(default=None, kw_only=True, validator=_check_positive_or_none)
    schedule: str | None = attrs.field(default=None, kw_only=True, validator=_check_schedule)
    on_success: tuple[Job, ...] = attrs.field(default=(), kw_only=True, converter=_to_jobs)
    on_error: tuple[Job, ...] = attrs.field(default=(), kw_only=True, converter=_to_jobs)
    # (checked in __attrs_post_init__: one test for a job that uses none of them)
    priority: int = attrs.field(default=0, kw_only=True)
    unique_for: float | None = attrs.field(default=None, kw_only=True)
    successful_ttl: float | None = attrs.field(default=None, kw_only=True)
    failed_ttl: float | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.eta is not None and self.delay is not None:
            raise InvalidInputError("pass eta or delay, not both")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise InvalidInputError(f"backoff must be a Backoff, got {self.backoff!r}")
        if (
            self.priority
            or type(self.priority) is not int
            or self.unique_for is not None
            or self.successful_ttl is not None
            or self.failed_ttl is not None
        ):
            check_priority(self.priority)
            for name in ("unique_for", "successful_ttl", "failed_ttl"):
                value = getattr(self, name)
                if value is not None:
                    check_seconds(value, name)

    def eta_timestamp(self, now: float | None = None) -> float | None:
        """The POSIX time the job is due, or ``None`` if it is due now."""
        if self.eta is not None:
            return self.eta.timestamp()
        if self.delay is not None:
            return (time.time() if now is None else now) + self.delay
        return None


@attrs.frozen(kw_only=True)
class Meta:
    """What the library records about a job besides the job itself.

    Times are POSIX timestamps (``time.time()``).
    """

    id: str
    status: Status
    queue: str
    max_retries: int = 0
    #: how many times the handler has been retried so far
    retried: int = 0
    #: the error of the last failed run, as ``"ExceptionType: message"``
    prev_error: str | None = None
    created_at: float = 0.0
    #: when the last run started
    processed_at: float | None = None
    eta: float | None = None
    timeout: float | None = None
    schedule: str | None = None
    backoff: Backoff | None = None
    #: the result the previous link of a chain saved (``None`` if it saved nothing)
    prev_job_result: bytes | None = None
    #: the delivery attempt of the last run (2 or more after a redelivery)
    attempt: int = 0
    group_id: str | None = None
    chain_id: str | None = None
    #: an absolute POSIX deadline inherited from a group or chain
    deadline: float | None = None
    #: W3C trace context of the producer
    trace: dict[str, str] = attrs.field(factory=dict)
    #: the errors the job ended with before each :meth:`Client.retry` of it, oldest first
    #: (at most :data:`MAX_ERROR_HISTORY` entries of :data:`MAX_ERROR_HISTORY_SIZE` bytes
    #: together: older ones give way)
    errors: tuple[str, ...] = ()


#: Seconds between two progress writes of one run: calls in between keep only the
#: latest value, written when the interval has passed or when the run ends.
PROGRESS_INTERVAL = 0.5
#: The longest progress message (characters; a longer one is cut).
MAX_PROGRESS_MESSAGE = 1000


@attrs.frozen(kw_only=True)
class Progress:
    """How far a running job says it is (:meth:`JobContext.set_progress`).

    :ivar fraction: from 0.0 to 1.0, or ``None`` when the job gave only a message
    :ivar message: free text (at most ``MAX_PROGRESS_MESSAGE`` characters)
    :ivar at: the POSIX time the job reported it
    """

    fraction: float | None
    message: str = ""
    at: float = 0.0


def encode_progress(progress: Progress) -> bytes:
    """A progress report's stored bytes (msgpack ``[fraction, message, at]``)."""
    return msgpack.packb([progress.fraction, progress.message, progress.at])


def decode_progress(data: bytes | None) -> Progress | None:
    """The progress stored as ``data`` (``None`` for none, or for bytes that do not decode:
    progress is informative, never a reason for a read to fail)."""
    if not data:
        return None
    try:
        fraction, message, at = msgpack.unpackb(data, raw=False)
        if fraction is not None:
            fraction = float(fraction)
        return Progress(fraction=fraction, message=str(message), at=float(at))
    except Exception:
        return None


@attrs.frozen(kw_only=True)
class JobMessage:
    """A job together with its :class:`Meta`: what travels on queues and is stored.

    :ivar progress: the job's last reported progress, when read from the store
        (:meth:`Client.get_job`); ``None`` when it reported none
    """

    meta: Meta
    job: Job
    progress: Progress | None = None

    @property
    def id(self) -> str:
        return self.meta.id

    @property
    def status(self) -> Status:
        return self.meta.status


@attrs.define(kw_only=True, eq=False)
class JobContext:
    """Handed to a task handler with its payload.

    :ivar meta: the job's :class:`Meta` for this run
    """

    meta: Meta
    _save: Callable[[str, bytes], Awaitable[None]] = attrs.field(alias="save_fn", repr=False)
    #: stores encoded progress for this run (``None``: progress is not stored)
    _store_progress: Callable[[bytes], Awaitable[None]] | None = attrs.field(
        default=None, alias="progress_fn", repr=False
    )
    #: the encoded result a typed handler returned: written with the run's final state
    result: bytes | None = attrs.field(default=None, init=False, repr=False)
    _progress: Progress | None = attrs.field(default=None, init=False, repr=False)
    _progress_written: float = attrs.field(default=-float("inf"), init=False, repr=False)
    _progress_pending: bool = attrs.field(default=False, init=False, repr=False)
    #: set once by the worker's task, read by a handler's thread (a plain attribute: one
    #: store and one load, atomic in CPython, and free for the jobs that never stop)
    _stopped: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def job_id(self) -> str:
        return self.meta.id

    @property
    def cancelled(self) -> bool:
        """Whether this run was told to stop: its timeout (or its group's or chain's
        deadline) passed, a cancel was requested, or the worker is shutting down.

        Set for a sync handler, whose thread Python cannot interrupt: the worker waits for
        the thread to return before it records the run's end (and before a retry can
        start), so a long-running sync handler should look at this now and then, from its
        thread, and return or raise once it is set. An async handler is cancelled at its
        next ``await`` instead.
        """
        return self._stopped

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelledError` if this run was told to stop (see
        :attr:`cancelled`); callable from a sync handler's thread. The run's outcome is
        the cause (``JobTimeoutError`` for a timeout), not this exception.

        :raises JobCancelledError: the run was told to stop
        """
        if self._stopped:
            raise JobCancelledError(
                f"job {self.meta.id} was told to stop (its timeout or deadline passed, "
                f"it was cancelled, or the worker is shutting down)"
            )

    def stop(self) -> None:
        """Tell the run to stop (sets :attr:`cancelled`; the worker calls it)."""
        self._stopped = True

    @property
    def progress(self) -> Progress | None:
        """The last progress this run reported (:meth:`set_progress`), if any."""
        return self._progress

    async def set_progress(self, fraction: float | None = None, message: str = "") -> None:
        """Report how far the job is: stored on the job's record (``get_job``, a handle's
        ``progress()``, ``tasqueue job``) and announced as an event.

        Rate-limited: at most one write per ``PROGRESS_INTERVAL`` seconds; a call in
        between keeps only its value, written once the interval has passed (by a later
        call) or when the run ends, so a tight loop may call it every iteration.
        From a sync handler's thread: ``anyio.from_thread.run(ctx.set_progress, 0.5)``.

        :param fraction: from 0.0 to 1.0 (or ``None`` for a message alone)
        :param message: free text; cut to ``MAX_PROGRESS_MESSAGE`` characters
        :raises InvalidInputError: a fraction outside 0..1, or not a number
        """
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
                raise InvalidInputError(f"fraction must be a number, got {fraction!r}")
            if not 0.0 <= fraction <= 1.0:
                raise InvalidInputError(f"fraction must be from 0.0 to 1.0, got {fraction!r}")
            fraction = float(fraction)
        if not isinstance(message, str):
            raise InvalidInputError(f"message must be a str, got {type(message).__name__}")
        self._progress = Progress(
            fraction=fraction, message=message[:MAX_PROGRESS_MESSAGE], at=time.time()
        )
        self._progress_pending = True
        if anyio.current_time() - self._progress_written >= PROGRESS_INTERVAL:
            await self.flush_progress()

    async def flush_progress(self) -> None:
        """Write the progress reported since the last write, if any (the worker calls it
        when the handler returns)."""
        if not self._progress_pending or self._progress is None:
            return
        self._progress_pending = False
        self._progress_written = anyio.current_time()
        if self._store_progress is not None:
            await self._store_progress(encode_progress(self._progress))

    async def save(self, result: bytes) -> None:
        """Store ``result`` as the job's result (:meth:`~tasqueue_anyio.Client.get_result` reads it).

        A sync handler running in a worker thread calls it as
        ``anyio.from_thread.run(ctx.save, result)``.
        """
        if not isinstance(result, bytes):
            raise InvalidInputError(f"result must be bytes, got {type(result).__name__}")
        await self._save(self.meta.id, result)


def error_history(errors: tuple[str, ...], error: str) -> tuple[str, ...]:
    """``errors`` with ``error`` added last, keeping the newest entries that fit
    :data:`MAX_ERROR_HISTORY` and :data:`MAX_ERROR_HISTORY_SIZE` (one too long alone is
    cut to fit)."""
    kept: list[str] = []
    room = MAX_ERROR_HISTORY_SIZE
    for entry in reversed((*errors, error)):
        size = len(entry.encode("utf-8", "surrogatepass"))
        if size > room:
            if not kept:  # the newest alone is too long: its start, cut to fit
                kept.append(entry.encode("utf-8", "surrogatepass")[: room - 16].decode(
                    "utf-8", "ignore") + " ...[truncated]")
            break
        kept.append(entry)
        room -= size
        if len(kept) == MAX_ERROR_HISTORY:
            break
    return tuple(reversed(kept))


#: Why a job's scope was cancelled.
CANCEL = "cancel"
SHUTDOWN = "shutdown"
#: Longest error description kept in a job's meta, in UTF-8 bytes (a longer one is cut).
MAX_ERROR_LENGTH = 4096


class ActiveJob:
    """A job taken by this process: its cancel scope once it runs, and why it was cancelled."""

    __slots__ = ("reason", "scope")

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.reason: str | None = None

    def cancel(self, reason: str = CANCEL) -> None:
        """Cancel the job's scope (now, or as soon as it is entered)."""
        if self.reason is None:
            self.reason = reason
        if self.scope is not None:
            self.scope.cancel()


_CURRENT: ContextVar[JobContext] = ContextVar("tasqueue_anyio.current_job")


def current_job() -> JobContext:
    """The context of the job whose handler is running (in its task, its child tasks and
    a sync handler's thread): its :class:`Meta`, ``set_progress``, ``cancelled``...

    :raises LookupError: called outside a job's handler
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise LookupError("current_job() is called outside a job's handler") from None
