"""Cron schedules: the stored form, fire-time arithmetic and the scheduler task.

Fire times are on the cron grid of the expression, evaluated in UTC, and each next fire
time is computed from the previous *scheduled* time, never from when a run happened, so
schedules do not drift. A fire time's run has the same job id on every server and its state is created only if
absent (:meth:`Results.create_jobs`), so with many servers each fire time runs once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio
import attrs
import msgpack

from ._exceptions import BrokerError, DecodeError, InvalidInputError
from ._jobs import Job, cron_next_fire
from ._retry import RetryBackoff

if TYPE_CHECKING:
    from ._server import Server
    from .abc import ScheduleRecord

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
    """A cron schedule, as :meth:`Server.get_schedules` lists it.

    :ivar id: the schedule id (the id of the job given to ``enqueue``)
    :ivar cron: the cron expression (evaluated in UTC)
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


class Scheduler:
    """Enqueues the runs of due schedules; one per running :class:`Server`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._wakeup = anyio.Event()

    def wake(self) -> None:
        """Re-read the schedules now (one was added or removed, or a test moved its clock)."""
        self._wakeup.set()

    async def run(self) -> None:
        server = self.server
        retry = RetryBackoff(server.log, "the cron scheduler")
        while True:
            self._wakeup = anyio.Event()
            try:
                soonest = await self._pass()
            except BrokerError as exc:
                # The backends are away (a restart, a partition): a pass that failed
                # half-way is safe to repeat (each fire time's run is created once), and
                # the worker must outlive the outage rather than end with this error.
                await retry.failed(exc)
                continue
            except Exception as exc:
                # Nothing the scheduler meets ends run() (which would stop this worker's
                # queues too, on every server sharing the store): any other error is
                # logged with its traceback and the pass tried again, with the backoff.
                server.log.error("the cron scheduler failed: %r", exc, exc_info=exc)
                await retry.failed(exc)
                continue
            retry.succeeded()
            with anyio.move_on_after(max(0.0, soonest - server.clock())):
                await self._wakeup.wait()

    async def _pass(self) -> float:
        """Enqueue the runs of every due schedule; return when the next one is due."""
        server = self.server
        soonest = server.clock() + RESCAN_INTERVAL
        for record in await server.results.get_schedules():
            try:
                fire = await self._fire(record)
            except BrokerError:
                raise
            except Exception as exc:
                # One schedule's error leaves the others firing; this one is tried
                # again at the next pass (it was not moved on).
                server.log.error(
                    "the cron scheduler failed on schedule %s: %r", record.id, exc, exc_info=exc
                )
                continue
            soonest = min(soonest, fire)
        return soonest

    async def _fire(self, record: ScheduleRecord) -> float:
        """Enqueue ``record``'s run if it is due; return when it is due next."""
        server = self.server
        try:
            job = decode_template(record.data)
        except DecodeError as exc:
            server.log.error("schedule %s is unreadable: %s", record.id, exc)
            return math.inf
        assert job.schedule is not None
        fire = record.next_fire
        now = server.clock()
        if fire <= now:
            reason: InvalidInputError | None = None
            try:
                following = next_fire(job.schedule, max(fire, now))
            except InvalidInputError as exc:
                # No fire time left (a year-bounded expression past its last year, or a
                # record an older version stored or that was damaged): time only moves
                # on, so it never fires again. Its due run still runs; the schedule is
                # then disabled (next_fire = inf) and stays listed until removed.
                following, reason = math.inf, exc
            # The run's id is the same on every server and its state is created
            # only once, so racing schedulers (or a crash and a retry) enqueue
            # each fire time once; then whoever gets there first moves it on.
            await server.enqueue_run(record.id, job, fire)
            moved = await server.results.advance_schedule(record.id, fire, following)
            if moved and reason is not None:
                server.log.error(
                    "schedule %s (%r) is disabled: %s; its last run %s was enqueued. "
                    "Remove it (Server.remove_schedule) or enqueue it again with a cron "
                    "expression that fires",
                    record.id,
                    job.schedule,
                    reason,
                    run_id(record.id, fire),
                )
            fire = following
        return fire
