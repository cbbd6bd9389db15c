"""The in-process results store: zero set-up, for tests and single-process applications.

Job state, saved results, group and chain ("parent") state, cron schedules and worker
records are kept in separate dictionaries, so no id of one kind can reach an entry of another kind.
Everything runs on one event loop and no method awaits anything, so every operation, the
conditional ones included, is atomic.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Generic, TypeVar

import attrs

from .._exceptions import JobNotFoundError, NotFoundError, ResultNotFoundError
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

__all__ = ["MemoryResults"]

_T = TypeVar("_T")

_CANCELLABLE_AT_ONCE = frozenset({"queued", "retrying"})
#: the final statuses after which a job's id may stay held (JobRecord.hold_for)
_ENDED = frozenset({"successful", "failed"})


def _new_state(record: JobRecord) -> JobRecord:
    """A new job state as stored: no progress of an earlier one, no hold, no own TTL."""
    if record.progress is None and not record.hold_for and record.ttl is None:
        return record
    return attrs.evolve(record, progress=None, hold_for=0.0, ttl=None)


class _ExpiringDict(Generic[_T]):
    """A dictionary whose entries expire ``ttl`` seconds after their last write, or after
    the TTL given with that write.

    Expired entries read as missing. Because the default time to live is fixed and the
    clock only moves forward, the default expiry times are in write order: a FIFO of
    ``(expires_at, key)`` lets every operation purge what expired in amortised constant
    time, so entries nobody reads again do not accumulate. Entries written with a TTL of
    their own go into a heap instead (a write costs O(log n) there, only for them).
    """

    __slots__ = ("_clock", "_data", "_expiries", "_own", "_ttl")

    def __init__(self, ttl: float | None, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        #: key -> (value, expires_at or inf)
        self._data: dict[str, tuple[_T, float]] = {}
        self._expiries: deque[tuple[float, str]] = deque()
        self._own: list[tuple[float, str]] = []

    def purge(self) -> None:
        """Drop every expired entry."""
        expiries, own = self._expiries, self._own
        if not expiries and not own:
            return
        now = self._clock()
        data = self._data
        while expiries and expiries[0][0] <= now:
            _, key = expiries.popleft()
            entry = data.get(key)
            # the key may have been rewritten (later expiry) or deleted since
            if entry is not None and entry[1] <= now:
                del data[key]
        while own and own[0][0] <= now:
            _, key = heapq.heappop(own)
            entry = data.get(key)
            if entry is not None and entry[1] <= now:
                del data[key]

    def get(self, key: str) -> _T | None:
        self.purge()
        entry = self._data.get(key)
        return None if entry is None else entry[0]

    def peek(self, key: str) -> _T | None:
        """The value of ``key`` as :meth:`get`, without purging first: an entry that
        expired since the last purge still reads as missing."""
        entry = self._data.get(key)
        if entry is None or (entry[1] != math.inf and entry[1] <= self._clock()):
            return None
        return entry[0]

    def __contains__(self, key: str) -> bool:
        self.purge()
        return key in self._data

    def set(self, key: str, value: _T, ttl: float | None = None) -> None:
        """Store ``value``; it expires after ``ttl`` seconds (default: the dict's)."""
        if ttl is not None:
            self.purge()
            expires_at = self._clock() + ttl
            self._data[key] = (value, expires_at)
            heapq.heappush(self._own, (expires_at, key))
            return
        if self._ttl is None:
            self._data[key] = (value, math.inf)
            return
        self.purge()
        expires_at = self._clock() + self._ttl
        self._data[key] = (value, expires_at)
        self._expiries.append((expires_at, key))

    def discard(self, key: str) -> None:
        self._data.pop(key, None)


class _Parent:
    """The mutable stored state of a group or chain, with its per-status member counts.

    ``counts`` is kept in step with ``members`` on every change (no status maps to zero),
    so :meth:`MemoryResults.set_member_status` never recounts.
    """

    __slots__ = ("counts", "data", "error", "kind", "members", "status")

    def __init__(self, record: ParentRecord) -> None:
        self.kind = record.kind
        self.status = record.status
        self.data = record.data
        self.error = record.error
        self.members = dict(record.members)  # a copy: the caller keeps its dict
        self.counts: dict[str, int] = {}
        for member_status in self.members.values():
            self.counts[member_status] = self.counts.get(member_status, 0) + 1

    def set_member(self, job_id: str, status: str) -> None:
        members = self.members
        counts = self.counts
        old = members.get(job_id)
        if old == status:
            return
        if old is not None:
            remaining = counts[old] - 1
            if remaining:
                counts[old] = remaining
            else:
                del counts[old]
        members[job_id] = status
        counts[status] = counts.get(status, 0) + 1

    def to_record(self) -> ParentRecord:
        return ParentRecord(
            kind=self.kind,
            status=self.status,
            data=self.data,
            members=dict(self.members),
            error=self.error,
        )


class MemoryResults(Results):
    """An in-process :class:`~tasqueue_anyio.abc.Results` store.

    The success and failed listings hold each job id at most once, in the order the jobs
    ended: a job that ends again (written ``successful`` or ``failed`` once more) moves to
    the end of the listing of its new status and leaves the other listing. A listing only
    shows jobs whose state is still stored (not deleted, not expired).

    Optional expiry: an entry expires ``ttl`` seconds after its *last write* (as a Redis
    key with ``EX`` would); expired entries behave as missing. Usable with or without
    ``async with``.

    Group and chain state follows ``job_ttl``: every write to a parent
    (:meth:`set_parent`, :meth:`set_member_status`, and a :meth:`set_parent_status` that
    wrote) restarts its time to live, and an expired parent reads as missing. Cron
    schedules never expire. Worker records expire after the ``ttl`` of their last
    :meth:`put_worker`, by ``clock``.

    :param job_ttl: seconds job state, and group and chain state, is kept after its last
        write (``None``: forever); a job leaves the listings when its state expires
    :param result_ttl: seconds a saved result is kept after it was written (``None``:
        forever)
    :param clock: a monotonic clock in seconds, for the expiry times
    """

    def __init__(
        self,
        *,
        job_ttl: float | None = None,
        result_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jobs: _ExpiringDict[JobRecord] = _ExpiringDict(job_ttl, clock)
        self._results: _ExpiringDict[bytes] = _ExpiringDict(result_ttl, clock)
        self._parents: _ExpiringDict[_Parent] = _ExpiringDict(job_ttl, clock)
        self._schedules: dict[str, ScheduleRecord] = {}
        #: worker id -> (its record, when it expires by ``clock``)
        self._workers: dict[str, tuple[WorkerRecord, float]] = {}
        self._clock = clock
        #: job id -> until when (clock) the id of its ended job stays taken
        self._holds: dict[str, float] = {}
        # insertion-ordered sets of job ids
        self._success: dict[str, None] = {}
        self._failed: dict[str, None] = {}

    def __repr__(self) -> str:
        return "<MemoryResults>"

    def _write(self, job_id: str, record: JobRecord, current: JobRecord | None = None) -> None:
        """Store ``record`` (keeping ``current``'s progress, storing its result apart)."""
        progress = record.progress if current is None else current.progress
        if record.hold_for and record.status in _ENDED:
            self._holds[job_id] = self._clock() + record.hold_for
        elif self._holds:
            self._holds.pop(job_id, None)
        ttl = record.ttl if record.status in FINAL_STATUSES else None
        if (
            record.result is not None
            or record.progress is not progress
            or record.hold_for
            or record.ttl is not None
        ):
            if record.result is not None:
                self._results.set(job_id, record.result, ttl)
            elif ttl is not None:
                result = self._results.get(job_id)  # saved earlier: it takes the TTL too
                if result is not None:
                    self._results.set(job_id, result, ttl)
            record = JobRecord(  # not attrs.evolve: this is every job's end
                status=record.status,
                data=record.data,
                cancel_requested=record.cancel_requested,
                run=record.run,
                progress=progress,
            )
        self._jobs.set(job_id, record, ttl)
        self._write_listing(job_id, record.status)

    def _write_listing(self, job_id: str, status: str) -> None:
        if status == "successful":
            self._failed.pop(job_id, None)
            self._success.pop(job_id, None)
            self._success[job_id] = None
        elif status == "failed":
            self._success.pop(job_id, None)
            self._failed.pop(job_id, None)
            self._failed[job_id] = None

    def _listing(self, listing: dict[str, None]) -> list[str]:
        jobs = self._jobs
        jobs.purge()
        gone = [job_id for job_id in listing if job_id not in jobs]
        for job_id in gone:
            del listing[job_id]
        return list(listing)

    async def get_job(self, job_id: str) -> JobRecord:
        """The stored state of a job.

        :param job_id: the job id
        :return: the record
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """
        record = self._jobs.get(job_id)
        if record is None:
            raise JobNotFoundError(f"no job state is stored under id {job_id!r}")
        return record

    async def set_jobs(self, records: Mapping[str, JobRecord]) -> None:
        """Store the state of many jobs, unconditionally (the listings are not touched).

        :param records: records by job id
        """
        refuse_result(records.values(), "set_jobs")
        jobs = self._jobs
        holds = self._holds
        for job_id, record in records.items():
            jobs.set(job_id, _new_state(record))
            if holds:
                holds.pop(job_id, None)

    async def claim_jobs(self, records: Mapping[str, JobRecord]) -> set[str]:
        """Store the state of the jobs whose id is free (no state, or ended and not held:
        see :meth:`~tasqueue_anyio.abc.Results.claim_jobs`); leave the others.

        :param records: records by job id
        :return: the ids stored
        """
        refuse_result(records.values(), "claim_jobs")
        jobs = self._jobs
        jobs.purge()  # once: peek() below reads without purging
        stored = jobs._data
        holds = self._holds
        taken: list[str] = []
        for job_id, record in records.items():
            if job_id in stored:  # (a new id, the usual case, costs this test)
                current = jobs.peek(job_id)
                if current is not None:
                    if current.status not in FINAL_STATUSES:
                        taken.append(job_id)
                        continue
                    until = holds.get(job_id)
                    if until is not None:
                        if until > self._clock():
                            taken.append(job_id)
                            continue
                        del holds[job_id]
            if record.progress is not None or record.hold_for or record.ttl is not None:
                record = _new_state(record)
            jobs.set(job_id, record)
        claimed = set(records)
        claimed.difference_update(taken)
        return claimed

    async def start_job(self, job_id: str, record: JobRecord) -> JobRecord | None:
        """Move a job to ``record`` if it may start (:func:`~tasqueue_anyio.abc.may_start`).

        :param job_id: the job id
        :param record: the new state
        :return: ``None`` when ``record`` was written, else the current (unchanged) record
        """
        refuse_result((record,), "start_job")
        current = self._jobs.get(job_id)
        if not may_start(current, record):
            return current
        # a new run reports its own progress
        self._jobs.set(job_id, record if record.progress is None else attrs.evolve(record, progress=None))
        self._write_listing(job_id, record.status)
        return None

    async def update_job(
        self, job_id: str, record: JobRecord, *, expect: Collection[str], run: str | None = None
    ) -> bool:
        """Write ``record`` if the job's current status is one of ``expect``.

        ``cancel_requested`` is kept as stored; a ``successful`` or ``failed`` record lists
        the job.

        :param job_id: the job id
        :param record: the new state
        :param expect: the statuses the job may currently have
        :param run: if given, the run token the job must still have
        :return: whether ``record`` was written (never when the job has no state)
        """
        current = self._jobs.get(job_id)
        if current is None or current.status not in expect:
            return False
        if run is not None and current.run != run:
            return False
        if record.cancel_requested != current.cancel_requested:
            record = attrs.evolve(record, cancel_requested=current.cancel_requested)
        self._write(job_id, record, current)
        return True

    async def request_cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop.

        A ``queued`` or ``retrying`` job becomes ``cancelled``; a job in a final status is
        left as it is; any other (a ``processing`` job) is marked ``cancel_requested``.

        :param job_id: the job id
        :return: the record as it is after the call
        :raises JobNotFoundError: nothing is stored under ``job_id`` (or it expired)
        """
        current = await self.get_job(job_id)
        if current.status in FINAL_STATUSES:
            return current
        if current.status in _CANCELLABLE_AT_ONCE:
            updated = attrs.evolve(current, status="cancelled")
        elif current.cancel_requested:
            return current
        else:
            updated = attrs.evolve(current, cancel_requested=True)
        self._write(job_id, updated)
        return updated

    async def get_result(self, job_id: str) -> bytes:
        """The result a job saved.

        :param job_id: the job id
        :return: the saved bytes
        :raises ResultNotFoundError: the job saved no result (or it expired)
        """
        data = self._results.get(job_id)
        if data is None:
            raise ResultNotFoundError(f"no result is stored for job id {job_id!r}")
        return data

    async def set_result(self, job_id: str, data: bytes, *, run: str | None = None) -> bool:
        """Store (replace) the result of a job.

        :param job_id: the job id
        :param data: the result
        :param run: if given, store only while the job is ``processing`` under this run
        :return: whether it was stored
        """
        if run is not None:
            current = self._jobs.get(job_id)
            if current is None or current.status != "processing" or current.run != run:
                return False
        self._results.set(job_id, data)
        return True

    async def set_progress(self, job_id: str, data: bytes, *, run: str) -> bool:
        """Store a running job's progress.

        :param job_id: the job id
        :param data: the progress (at most :data:`~tasqueue_anyio.abc.MAX_PROGRESS_SIZE`)
        :param run: store only while the job is ``processing`` under this run
        :return: whether it was stored
        """
        check_progress(data)
        current = self._jobs.get(job_id)
        if current is None or current.status != "processing" or current.run != run:
            return False
        self._jobs.set(job_id, attrs.evolve(current, progress=data))
        return True

    async def count_ended(self) -> ResultCounts:
        """The lengths of the success and failed listings (with a ``job_ttl``, the
        expired jobs are dropped first: a pass over the listings, in process)."""
        if self._jobs._ttl is None:
            return ResultCounts(successful=len(self._success), failed=len(self._failed))
        return ResultCounts(
            successful=len(self._listing(self._success)), failed=len(self._listing(self._failed))
        )

    async def delete_job(self, job_id: str) -> None:
        """Forget a job: its state, its result and its place in the listings.

        :param job_id: the job id; an unknown one is ignored
        """
        self._jobs.discard(job_id)
        self._results.discard(job_id)
        self._holds.pop(job_id, None)
        self._success.pop(job_id, None)
        self._failed.pop(job_id, None)

    async def get_success(self) -> list[str]:
        """Ids of jobs that ended ``successful``, in the order they ended.

        :return: the ids, each once
        """
        return self._listing(self._success)

    async def get_failed(self) -> list[str]:
        """Ids of jobs that ended ``failed``, in the order they ended.

        :return: the ids, each once
        """
        return self._listing(self._failed)

    # -- groups and chains ("parents") ---------------------------------------------------

    async def set_parent(self, parent_id: str, record: ParentRecord) -> None:
        """Store (replace) the state of a group or chain.

        The member counts are rebuilt from ``record.members``, which is copied: changing
        that dictionary afterwards does not change the stored state.

        :param parent_id: the group or chain id (its own key space, apart from job ids)
        :param record: the new state
        """
        self._parents.set(parent_id, _Parent(record))

    async def get_parent(self, parent_id: str) -> ParentRecord:
        """The stored state of a group or chain.

        :param parent_id: the group or chain id
        :return: a snapshot; its ``members`` is a copy, so changing it does not change the
            stored state
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        return self._get_parent(parent_id).to_record()

    async def set_member_status(self, parent_id: str, job_id: str, status: str) -> dict[str, int]:
        """Record a member's status; return how many members are in each status.

        A member not in the record is added. The counts are kept as counters, updated in
        constant time; setting a member to the status it has changes nothing (but still
        restarts the parent's time to live).

        :param parent_id: the group or chain id
        :param job_id: the member job id
        :param status: the member's new status
        :return: a new dictionary of status → number of members, without zero counts
        :raises NotFoundError: nothing is stored under ``parent_id`` (or it expired)
        """
        parent = self._get_parent(parent_id)
        parent.set_member(job_id, status)
        self._parents.set(parent_id, parent)  # restart the time to live
        return dict(parent.counts)

    async def set_parent_status(
        self, parent_id: str, status: str, *, expect: Collection[str], error: str | None = None
    ) -> bool:
        """Set the parent's status (and ``error``, if given) if its status is in ``expect``.

        :param parent_id: the group or chain id
        :param status: the new status
        :param expect: the statuses the parent may currently have
        :param error: the new error; ``None`` keeps the stored one
        :return: whether it was written (never when nothing is stored or it expired)
        """
        parent = self._parents.get(parent_id)
        if parent is None or parent.status not in expect:
            return False
        parent.status = status
        if error is not None:
            parent.error = error
        self._parents.set(parent_id, parent)  # restart the time to live
        return True

    def _get_parent(self, parent_id: str) -> _Parent:
        parent = self._parents.get(parent_id)
        if parent is None:
            raise NotFoundError(f"no group or chain is stored under id {parent_id!r}")
        return parent

    # -- cron schedules --------------------------------------------------------------------

    async def set_schedule(self, record: ScheduleRecord) -> None:
        """Store (replace) a schedule, under ``record.id``.

        :param record: the schedule
        """
        self._schedules[record.id] = record

    async def get_schedules(self) -> list[ScheduleRecord]:
        """Every stored schedule, ordered by id.

        :return: the schedules, in ascending order of id (code point order)
        """
        schedules = self._schedules
        return [schedules[schedule_id] for schedule_id in sorted(schedules)]

    async def advance_schedule(
        self, schedule_id: str, expect_fire: float, next_fire: float
    ) -> bool:
        """Move a schedule's ``next_fire`` from ``expect_fire`` to ``next_fire``.

        The comparison is exact: ``expect_fire`` is the value read from
        :meth:`get_schedules`, passed back unchanged.

        :param schedule_id: the schedule id
        :param expect_fire: the ``next_fire`` the schedule must have now
        :param next_fire: the new ``next_fire``
        :return: whether it was moved (``False`` when it was not at ``expect_fire`` or the
            schedule does not exist)
        """
        current = self._schedules.get(schedule_id)
        if current is None or current.next_fire != expect_fire:
            return False
        self._schedules[schedule_id] = attrs.evolve(current, next_fire=next_fire)
        return True

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Remove a schedule.

        :param schedule_id: the schedule id
        :return: whether it existed
        """
        return self._schedules.pop(schedule_id, None) is not None

    # -- the worker registry (heartbeats) --------------------------------------------------

    async def put_worker(self, record: WorkerRecord, ttl: float) -> None:
        """Store (replace) a worker's record; it expires ``ttl`` seconds after this put,
        by the store's ``clock``.

        :param record: the record
        :param ttl: seconds (over 0, at most a day)
        """
        expires_at = self._clock() + check_worker_ttl(ttl)
        self._purge_workers()
        self._workers[record.id] = (record, expires_at)

    async def get_workers(self) -> list[WorkerRecord]:
        """The live workers' records (the expired ones are dropped first), ordered by
        ``started_at``, then id.

        :return: the records
        """
        self._purge_workers()
        records = [record for record, _ in self._workers.values()]
        records.sort(key=lambda record: (record.started_at, record.id))
        return records

    async def remove_worker(self, worker_id: str) -> None:
        """Remove a worker's record (an unknown id is ignored).

        :param worker_id: the worker id
        """
        self._workers.pop(worker_id, None)

    def _purge_workers(self) -> None:
        workers = self._workers
        if not workers:
            return
        now = self._clock()
        for worker_id in [w for w, (_, expires_at) in workers.items() if expires_at <= now]:
            del workers[worker_id]
