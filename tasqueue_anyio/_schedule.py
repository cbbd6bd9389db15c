"""Cron schedules: the stored form and fire-time arithmetic (the scheduler task is in
``_scheduler``).

Fire times are on the cron grid of the expression, evaluated in UTC, and each next fire
time is computed from the previous *scheduled* time, never from when a run happened, so
schedules do not drift. A fire time's run has the same job id on every server and its state is created only if
absent (:meth:`Results.create_jobs`), so with many servers each fire time runs once.
"""

from __future__ import annotations

import attrs
import msgpack

from ._exceptions import DecodeError
from ._jobs import Job, cron_next_fire

__all__ = ["Schedule", "next_fire"]

#: How often a scheduler re-reads the schedules even when nothing woke it (seconds).
RESCAN_INTERVAL = 60.0

def next_fire(expression: str, after: float) -> float:
    """The first fire time of ``expression`` strictly after POSIX time ``after`` (UTC).

    :raises InvalidInputError: ``expression`` is not a cron expression or has no fire
        time after ``after`` (every croniter error is mapped to this)
    """
    return cron_next_fire(expression, after)


def run_id(schedule_id: str, fire: float) -> str:
    """The job id of a schedule's run at ``fire`` (the same on every server)."""
    return f"{schedule_id}@{round(fire * 1000)}"


@attrs.frozen(kw_only=True)
class Schedule:
    """A cron schedule, as :meth:`~tasqueue_anyio.Client.get_schedules` lists it.

    :ivar id: the schedule id (the id of the job given to ``enqueue``)
    :ivar cron: the cron expression (evaluated in UTC, or in the time zone of its
        ``CRON_TZ=Zone`` prefix)
    :ivar job: the job each run copies (each run gets the id ``"<id>@<fire time in ms>"``)
    :ivar next_fire: POSIX time of the next run not enqueued yet; ``math.inf`` when the
        schedule has no fire time left and the scheduler disabled it (remove it)
    """

    id: str
    cron: str
    job: Job
    next_fire: float


def encode_template(job: Job) -> bytes:
    """The stored form of a cron schedule's job.

    :raises PayloadTooLargeError: over :data:`~tasqueue_anyio._codec.MAX_RECORD_SIZE`
        (what :func:`decode_template` reads back)
    """
    from ._codec import check_record_size, job_to_wire

    return check_record_size(
        f"the schedule record of {job.id}",
        msgpack.packb([1, job_to_wire(job)], use_bin_type=True),
    )


def decode_template(data: bytes) -> Job:
    """Read a stored cron schedule's job, as untrusted as a message: bounded in size and
    depth, no extension types, every field checked.

    :raises DecodeError: not a schedule record
    """
    from ._codec import MAX_RECORD_SIZE, job_from_wire, unpack

    record = unpack(data, MAX_RECORD_SIZE, "schedule record")
    if type(record) is not list or len(record) != 2:
        raise DecodeError("malformed schedule record: not a [version, job] array")
    version, wire = record
    if type(version) is not int or version != 1:
        raise DecodeError(f"unknown schedule record version {version!r}")
    job = job_from_wire(wire)
    if job.schedule is None:
        raise DecodeError("schedule record without a cron expression")
    return job
