"""The scheduler task: enqueues the runs of due cron schedules (one per running worker).

Fire times are on the cron grid of the expression, evaluated in UTC, and each next fire
time is computed from the previous *scheduled* time, never from when a run happened, so
schedules do not drift. A fire time's run has the same job id on every server and its
state is created only if absent (:meth:`Results.create_jobs`), so with many servers each
fire time runs once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from ._exceptions import BrokerError, DecodeError, InvalidInputError
from ._retry import RetryBackoff
from ._schedule import RESCAN_INTERVAL, decode_template, next_fire, run_id

if TYPE_CHECKING:
    from ._client import Client
    from .abc import ScheduleRecord

__all__ = ["Scheduler"]


class Scheduler:
    """Enqueues the runs of due schedules; one per running worker."""

    def __init__(self, server: Client) -> None:
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
            await server._enqueue_run(record.id, job, fire)
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
