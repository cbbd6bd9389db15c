"""The results-store contract, written against :mod:`tasqueue_anyio.abc` only.

Runs unchanged against every backend in ``conftest.RESULTS_FACTORIES``. Job ids are
unique per test, so backends may be shared between tests; listings are checked only for
the ids a test created.
"""

from __future__ import annotations

import math
from uuid import uuid4

import anyio
import attrs
import pytest
from anyio.lowlevel import checkpoint

from tasqueue_anyio._exceptions import (
    InvalidInputError,
    JobNotFoundError,
    NotFoundError,
    ResultNotFoundError,
)
from tasqueue_anyio.abc import (
    FINAL_STATUSES,
    MAX_PROGRESS_SIZE,
    JobRecord,
    ParentRecord,
    Results,
    ScheduleRecord,
    may_start,
    run_retry,
    run_token,
)

pytestmark = pytest.mark.anyio

NOT_FINAL = ("queued", "processing", "retrying")


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid4().hex[:12]}"


@pytest.fixture
def parent_id() -> str:
    return f"parent-{uuid4().hex[:12]}"


@pytest.fixture
def schedule_id() -> str:
    return f"sched-{uuid4().hex[:12]}"


def record(status: str, data: bytes = b"job", *, cancel_requested: bool = False) -> JobRecord:
    return JobRecord(status=status, data=data, cancel_requested=cancel_requested)


def parent(
    members: dict[str, str],
    *,
    kind: str = "group",
    status: str = "queued",
    data: bytes = b"parent",
    error: str | None = None,
) -> ParentRecord:
    return ParentRecord(kind=kind, status=status, data=data, members=members, error=error)


def mine(listing: list[str], ids: list[str]) -> list[str]:
    """The part of ``listing`` made of ``ids``, in listing order."""
    wanted = set(ids)
    return [job_id for job_id in listing if job_id in wanted]


async def test_get_job_missing(results: Results, job_id: str) -> None:
    with pytest.raises(JobNotFoundError):
        await results.get_job(job_id)
    with pytest.raises(LookupError):
        await results.get_job(job_id)
    with pytest.raises(NotFoundError):
        await results.get_job(job_id)


async def test_set_jobs_then_get(results: Results, job_id: str) -> None:
    other = f"{job_id}-2"
    await results.set_jobs({job_id: record("queued", b"one"), other: record("queued", b"two")})
    assert await results.get_job(job_id) == record("queued", b"one")
    assert await results.get_job(other) == record("queued", b"two")
    await results.set_jobs({job_id: record("retrying", b"one-b")})  # unconditional
    assert await results.get_job(job_id) == record("retrying", b"one-b")


async def test_start_job_on_queued(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("queued")})
    assert await results.start_job(job_id, record("processing", b"run")) is None
    assert await results.get_job(job_id) == record("processing", b"run")


@pytest.mark.parametrize("status", NOT_FINAL)
async def test_start_job_on_not_final(results: Results, job_id: str, status: str) -> None:
    await results.set_jobs({job_id: record(status)})
    assert await results.start_job(job_id, record("processing", b"run")) is None
    assert (await results.get_job(job_id)).data == b"run"


async def test_start_job_without_state_writes(results: Results, job_id: str) -> None:
    assert await results.start_job(job_id, record("processing", b"run")) is None
    assert await results.get_job(job_id) == record("processing", b"run")


@pytest.mark.parametrize("status", sorted(FINAL_STATUSES))
async def test_start_job_refused_when_final(results: Results, job_id: str, status: str) -> None:
    current = record(status, b"done")
    await results.set_jobs({job_id: current})
    assert await results.start_job(job_id, record("processing", b"run")) == current
    assert await results.get_job(job_id) == current


async def test_start_job_refused_when_cancel_requested(results: Results, job_id: str) -> None:
    current = record("processing", b"running", cancel_requested=True)
    await results.set_jobs({job_id: current})
    assert await results.start_job(job_id, record("processing", b"again")) == current
    assert await results.get_job(job_id) == current


@pytest.mark.parametrize(
    ("stored", "starting", "starts"),
    [
        # a retry was recorded by try 0: only try 1 (the retry) or later may start
        (("retrying", "0.1"), "0.2", False),  # the failed try's message came back
        (("retrying", "0.1"), "1.1", True),  # the retry
        # try 1 runs: its redelivery may start, a message of try 0 may not
        (("processing", "1.1"), "0.3", False),
        (("processing", "1.1"), "1.2", True),
        (("processing", "1.1"), "2.1", True),
        # no token on either side: no order to keep
        (("queued", ""), "0.1", True),
        (("retrying", "0.1"), "", True),
    ],
)
async def test_start_job_refuses_a_message_of_an_earlier_try(
    results: Results, job_id: str, stored: tuple[str, str], starting: str, starts: bool
) -> None:
    status, run = stored
    current = JobRecord(status=status, data=b"stored", run=run)
    await results.set_jobs({job_id: current})
    attempt = JobRecord(status="processing", data=b"run", run=starting)
    assert may_start(current, attempt) is starts
    if starts:
        assert await results.start_job(job_id, attempt) is None
        assert await results.get_job(job_id) == attempt
    else:
        assert await results.start_job(job_id, attempt) == current
        assert await results.get_job(job_id) == current


def test_run_retry_reads_worker_tokens_only() -> None:
    tokens = ("0.1", "12.3", "", "x.1", "3", ".2", "-1.2", "\u00b2.1", run_token(4, 2))
    assert [run_retry(t) for t in tokens] == [0, 12, None, None, None, None, None, None, 4]


def test_run_tokens_are_unique_per_run() -> None:
    """Two runs of one try can see the same delivery attempt (JetStream after a server
    crash): their tokens still differ, so one can fence the other."""
    tokens = {run_token(0, 1) for _ in range(1000)}
    assert len(tokens) == 1000
    assert {t.rsplit(".", 1)[0] for t in tokens} == {"0.1"}


async def test_update_job_respects_expect(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("queued")})
    assert not await results.update_job(job_id, record("successful", b"x"), expect={"processing"})
    assert await results.get_job(job_id) == record("queued")
    assert job_id not in await results.get_success()

    assert await results.update_job(job_id, record("processing", b"p"), expect={"queued"})
    assert await results.get_job(job_id) == record("processing", b"p")


async def test_update_job_missing(results: Results, job_id: str) -> None:
    assert not await results.update_job(job_id, record("processing"), expect=["queued"])
    with pytest.raises(JobNotFoundError):
        await results.get_job(job_id)


async def test_update_job_lists_success_and_failed(results: Results, job_id: str) -> None:
    ids = [f"{job_id}-{i}" for i in range(4)]
    await results.set_jobs({i: record("processing") for i in ids})
    # end in the order 2, 0, 3 (failed), 1 (failed)
    assert await results.update_job(ids[2], record("successful"), expect={"processing"})
    assert await results.update_job(ids[0], record("successful"), expect={"processing"})
    assert await results.update_job(ids[3], record("failed"), expect={"processing"})
    assert await results.update_job(ids[1], record("failed"), expect={"processing"})
    assert mine(await results.get_success(), ids) == [ids[2], ids[0]]
    assert mine(await results.get_failed(), ids) == [ids[3], ids[1]]

    # writing the same final status again lists the job once
    assert await results.update_job(ids[2], record("successful"), expect={"successful"})
    success = mine(await results.get_success(), ids)
    assert sorted(success) == sorted([ids[2], ids[0]])
    assert len(success) == 2


async def test_update_job_non_final_does_not_list(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("queued")})
    assert await results.update_job(job_id, record("processing"), expect={"queued"})
    assert await results.update_job(job_id, record("retrying"), expect={"processing"})
    assert job_id not in await results.get_success()
    assert job_id not in await results.get_failed()


async def test_update_job_keeps_cancel_requested(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("processing", cancel_requested=True)})
    assert await results.update_job(job_id, record("cancelled", b"end"), expect={"processing"})
    assert await results.get_job(job_id) == record("cancelled", b"end", cancel_requested=True)

    other = f"{job_id}-2"
    await results.set_jobs({other: record("processing")})
    written = record("successful", b"end", cancel_requested=True)
    assert await results.update_job(other, written, expect={"processing"})
    assert (await results.get_job(other)).cancel_requested is False


@pytest.mark.parametrize("status", ["queued", "retrying"])
async def test_request_cancel_waiting_job(results: Results, job_id: str, status: str) -> None:
    await results.set_jobs({job_id: record(status, b"payload")})
    after = await results.request_cancel(job_id)
    assert after.status == "cancelled"
    assert after.data == b"payload"
    assert await results.get_job(job_id) == after
    # a cancelled job never starts
    assert await results.start_job(job_id, record("processing")) == after


async def test_request_cancel_processing_job(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("processing", b"payload")})
    after = await results.request_cancel(job_id)
    assert after == record("processing", b"payload", cancel_requested=True)
    assert await results.get_job(job_id) == after
    assert await results.request_cancel(job_id) == after  # again: unchanged
    # a redelivery of it never starts
    assert await results.start_job(job_id, record("processing", b"again")) == after


@pytest.mark.parametrize("status", sorted(FINAL_STATUSES))
async def test_request_cancel_final_job(results: Results, job_id: str, status: str) -> None:
    current = record(status, b"done")
    await results.set_jobs({job_id: current})
    assert await results.request_cancel(job_id) == current
    assert await results.get_job(job_id) == current


async def test_request_cancel_missing(results: Results, job_id: str) -> None:
    with pytest.raises(JobNotFoundError):
        await results.request_cancel(job_id)
    with pytest.raises(JobNotFoundError):
        await results.get_job(job_id)


async def test_results_set_get(results: Results, job_id: str) -> None:
    with pytest.raises(ResultNotFoundError):
        await results.get_result(job_id)
    with pytest.raises(LookupError):
        await results.get_result(job_id)
    await results.set_result(job_id, b"r1")
    assert await results.get_result(job_id) == b"r1"
    await results.set_result(job_id, b"r2")
    assert await results.get_result(job_id) == b"r2"
    # a result is not job state
    with pytest.raises(JobNotFoundError):
        await results.get_job(job_id)


async def test_ids_never_collide(results: Results, job_id: str) -> None:
    ids = [f"job:msg:{job_id}", job_id, f"result:{job_id}", f"job:{job_id}", f"{job_id}:result"]
    await results.set_jobs({i: record("queued", f"state of {i}".encode()) for i in ids})
    for i in ids:
        await results.set_result(i, f"result of {i}".encode())
    for i in ids:
        assert (await results.get_job(i)).data == f"state of {i}".encode()
        assert await results.get_result(i) == f"result of {i}".encode()

    # results under ids that have no state do not create state, and the reverse
    lone = f"result:{job_id}-lone"
    await results.set_result(lone, b"lone result")
    with pytest.raises(JobNotFoundError):
        await results.get_job(lone)
    stateful = f"job:msg:{job_id}-lone"
    await results.set_jobs({stateful: record("queued")})
    with pytest.raises(ResultNotFoundError):
        await results.get_result(stateful)

    await results.delete_job(job_id)
    for i in ids:
        if i != job_id:
            assert (await results.get_job(i)).data == f"state of {i}".encode()
            assert await results.get_result(i) == f"result of {i}".encode()


async def test_delete_job(results: Results, job_id: str) -> None:
    failed = f"{job_id}-failed"
    await results.set_jobs({job_id: record("processing"), failed: record("processing")})
    assert await results.update_job(job_id, record("successful"), expect={"processing"})
    assert await results.update_job(failed, record("failed"), expect={"processing"})
    await results.set_result(job_id, b"result")
    await results.set_result(failed, b"partial")

    await results.delete_job(job_id)
    await results.delete_job(failed)
    await results.delete_job(f"{job_id}-never-existed")  # harmless

    for i in (job_id, failed):
        with pytest.raises(JobNotFoundError):
            await results.get_job(i)
        with pytest.raises(ResultNotFoundError):
            await results.get_result(i)
    assert job_id not in await results.get_success()
    assert failed not in await results.get_failed()

    # the id can be used again from scratch
    await results.set_jobs({job_id: record("queued")})
    assert await results.get_job(job_id) == record("queued")
    assert job_id not in await results.get_success()


# -- groups and chains ("parents") -------------------------------------------------------


async def test_parent_set_get(results: Results, parent_id: str) -> None:
    stored = parent({"a": "queued", "b": "queued"}, kind="chain", data=b"chain data")
    await results.set_parent(parent_id, stored)
    assert await results.get_parent(parent_id) == stored

    failed = parent({"a": "failed"}, status="failed", error="a failed")
    await results.set_parent(parent_id, failed)  # replaces
    assert await results.get_parent(parent_id) == failed


async def test_parent_members_are_copies(results: Results, parent_id: str) -> None:
    members = {"a": "queued"}
    await results.set_parent(parent_id, parent(members))
    members["b"] = "queued"  # the caller's dict is not the stored state
    got = await results.get_parent(parent_id)
    assert got.members == {"a": "queued"}
    got.members["c"] = "failed"  # nor is the returned one
    assert (await results.get_parent(parent_id)).members == {"a": "queued"}


async def test_get_parent_missing(results: Results, parent_id: str) -> None:
    with pytest.raises(NotFoundError):
        await results.get_parent(parent_id)
    with pytest.raises(LookupError):
        await results.get_parent(parent_id)


async def test_set_member_status_counts(results: Results, parent_id: str) -> None:
    await results.set_parent(parent_id, parent({"a": "queued", "b": "queued", "c": "queued"}))

    counts = await results.set_member_status(parent_id, "a", "successful")
    assert {s: n for s, n in counts.items() if n} == {"queued": 2, "successful": 1}

    # the same status twice does not count the member twice
    counts = await results.set_member_status(parent_id, "a", "successful")
    assert {s: n for s, n in counts.items() if n} == {"queued": 2, "successful": 1}

    counts = await results.set_member_status(parent_id, "b", "failed")
    assert {s: n for s, n in counts.items() if n} == {"queued": 1, "successful": 1, "failed": 1}

    # a member the record does not know is added
    counts = await results.set_member_status(parent_id, "d", "queued")
    assert {s: n for s, n in counts.items() if n} == {"queued": 2, "successful": 1, "failed": 1}

    got = await results.get_parent(parent_id)
    assert got.members == {"a": "successful", "b": "failed", "c": "queued", "d": "queued"}
    assert got.status == "queued"  # members do not move the parent's own status


async def test_set_parent_resets_counts(results: Results, parent_id: str) -> None:
    await results.set_parent(parent_id, parent({"a": "queued", "b": "queued"}))
    await results.set_member_status(parent_id, "a", "successful")
    await results.set_parent(parent_id, parent({"x": "failed"}))
    counts = await results.set_member_status(parent_id, "y", "queued")
    assert {s: n for s, n in counts.items() if n} == {"failed": 1, "queued": 1}


async def test_set_member_status_missing_parent(results: Results, parent_id: str) -> None:
    with pytest.raises(NotFoundError):
        await results.set_member_status(parent_id, "a", "queued")
    with pytest.raises(NotFoundError):  # it did not create the parent
        await results.get_parent(parent_id)


async def test_set_parent_status_cas(results: Results, parent_id: str) -> None:
    await results.set_parent(parent_id, parent({"a": "queued"}))

    assert not await results.set_parent_status(parent_id, "successful", expect={"processing"})
    assert (await results.get_parent(parent_id)).status == "queued"

    assert await results.set_parent_status(parent_id, "processing", expect={"queued"})
    got = await results.get_parent(parent_id)
    assert (got.status, got.error) == ("processing", None)

    # refused with an error: nothing is written, the error included
    assert not await results.set_parent_status(parent_id, "failed", expect={"queued"}, error="nope")
    got = await results.get_parent(parent_id)
    assert (got.status, got.error) == ("processing", None)

    assert await results.set_parent_status(
        parent_id, "failed", expect={"processing", "queued"}, error="member a failed"
    )
    got = await results.get_parent(parent_id)
    assert (got.status, got.error) == ("failed", "member a failed")
    assert got.members == {"a": "queued"}  # members are left as they are

    # error=None keeps the stored error
    assert await results.set_parent_status(parent_id, "cancelled", expect={"failed"})
    got = await results.get_parent(parent_id)
    assert (got.status, got.error) == ("cancelled", "member a failed")


async def test_set_parent_status_missing(results: Results, parent_id: str) -> None:
    assert not await results.set_parent_status(parent_id, "processing", expect={"queued"})
    assert not await results.set_parent_status(parent_id, "failed", expect={"queued"}, error="x")
    with pytest.raises(NotFoundError):  # it did not create the parent
        await results.get_parent(parent_id)


async def test_parent_ids_do_not_collide_with_jobs(results: Results, job_id: str) -> None:
    await results.set_jobs({job_id: record("processing", b"job state")})
    await results.set_result(job_id, b"job result")
    await results.set_parent(job_id, parent({job_id: "queued"}, data=b"parent state"))

    assert await results.get_job(job_id) == record("processing", b"job state")
    assert await results.get_result(job_id) == b"job result"
    assert (await results.get_parent(job_id)).data == b"parent state"

    await results.set_member_status(job_id, job_id, "successful")
    assert await results.set_parent_status(job_id, "successful", expect={"queued"})
    assert await results.get_job(job_id) == record("processing", b"job state")
    assert job_id not in await results.get_success()

    await results.delete_job(job_id)
    assert (await results.get_parent(job_id)).members == {job_id: "successful"}

    # and the reverse: a parent id reaches no job state
    lone = f"{job_id}-lone-parent"
    await results.set_parent(lone, parent({}))
    with pytest.raises(JobNotFoundError):
        await results.get_job(lone)
    with pytest.raises(ResultNotFoundError):
        await results.get_result(lone)
    assert not await results.update_job(lone, record("processing"), expect={"queued"})


async def test_set_member_status_concurrently(results: Results, parent_id: str) -> None:
    members = [f"m{i:02d}" for i in range(50)]
    await results.set_parent(parent_id, parent(dict.fromkeys(members, "queued")))
    returned: list[dict[str, int]] = []

    async def finish(index: int, member: str) -> None:
        await checkpoint()  # let every task start before any writes
        status = "failed" if index % 5 == 0 else "successful"
        returned.append(await results.set_member_status(parent_id, member, status))

    async with anyio.create_task_group() as tg:
        for index, member in enumerate(members):
            tg.start_soon(finish, index, member)

    # every answer covers every member, once
    assert len(returned) == 50
    assert all(sum(counts.values()) == 50 for counts in returned)
    assert sorted(sum(c.get(s, 0) for s in ("successful", "failed")) for c in returned) == list(
        range(1, 51)
    )
    final = await results.set_member_status(parent_id, members[1], "successful")  # no change
    assert {s: n for s, n in final.items() if n} == {"successful": 40, "failed": 10}
    got = await results.get_parent(parent_id)
    assert got.members == {
        member: "failed" if index % 5 == 0 else "successful" for index, member in enumerate(members)
    }


# -- cron schedules ------------------------------------------------------------------------


def schedule(schedule_id: str, next_fire: float, data: bytes = b"job") -> ScheduleRecord:
    return ScheduleRecord(id=schedule_id, data=data, next_fire=next_fire)


def my_schedules(listing: list[ScheduleRecord], prefix: str) -> list[ScheduleRecord]:
    """The schedules of ``listing`` whose id starts with ``prefix``, in listing order."""
    return [s for s in listing if s.id.startswith(prefix)]


async def test_schedules_set_get_ordered(results: Results, schedule_id: str) -> None:
    ids = [f"{schedule_id}-c", f"{schedule_id}-a", f"{schedule_id}-b"]
    for n, i in enumerate(ids):
        await results.set_schedule(schedule(i, 1_000.5 + n, f"job {i}".encode()))
    listing = my_schedules(await results.get_schedules(), schedule_id)
    assert listing == [
        schedule(f"{schedule_id}-a", 1_001.5, f"job {schedule_id}-a".encode()),
        schedule(f"{schedule_id}-b", 1_002.5, f"job {schedule_id}-b".encode()),
        schedule(f"{schedule_id}-c", 1_000.5, f"job {schedule_id}-c".encode()),
    ]
    everything = [s.id for s in await results.get_schedules()]
    assert everything == sorted(everything)


async def test_schedule_set_replaces(results: Results, schedule_id: str) -> None:
    await results.set_schedule(schedule(schedule_id, 10.0, b"old"))
    await results.set_schedule(schedule(schedule_id, 20.0, b"new"))
    assert my_schedules(await results.get_schedules(), schedule_id) == [
        schedule(schedule_id, 20.0, b"new")
    ]


async def test_advance_schedule_cas(results: Results, schedule_id: str) -> None:
    fire = 1_700_000_000.123456
    await results.set_schedule(schedule(schedule_id, fire, b"job"))
    (stored,) = my_schedules(await results.get_schedules(), schedule_id)

    assert not await results.advance_schedule(schedule_id, fire + 1, fire + 60)
    assert my_schedules(await results.get_schedules(), schedule_id) == [stored]

    # two servers racing from the same fire time: exactly one wins
    won = [
        await results.advance_schedule(schedule_id, stored.next_fire, fire + 60),
        await results.advance_schedule(schedule_id, stored.next_fire, fire + 60),
    ]
    assert won == [True, False]
    assert my_schedules(await results.get_schedules(), schedule_id) == [
        schedule(schedule_id, fire + 60, b"job")
    ]


async def test_advance_schedule_concurrently(results: Results, schedule_id: str) -> None:
    await results.set_schedule(schedule(schedule_id, 100.25))
    won: list[bool] = []

    async def advance() -> None:
        await checkpoint()
        won.append(await results.advance_schedule(schedule_id, 100.25, 160.25))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(advance)
    assert sorted(won) == [False] * 9 + [True]
    assert my_schedules(await results.get_schedules(), schedule_id) == [
        schedule(schedule_id, 160.25)
    ]


async def test_advance_schedule_to_infinity_disables(results: Results, schedule_id: str) -> None:
    # The scheduler disables a schedule with no fire time left by moving it to +inf: a
    # store keeps +inf exactly and compares it like any other fire time.
    await results.set_schedule(schedule(schedule_id, 1_000.5))
    assert await results.advance_schedule(schedule_id, 1_000.5, math.inf)
    assert my_schedules(await results.get_schedules(), schedule_id) == [
        schedule(schedule_id, math.inf)
    ]
    assert not await results.advance_schedule(schedule_id, 1_000.5, 2_000.5)
    assert await results.advance_schedule(schedule_id, math.inf, 2_000.5)
    assert my_schedules(await results.get_schedules(), schedule_id) == [
        schedule(schedule_id, 2_000.5)
    ]


async def test_advance_schedule_missing(results: Results, schedule_id: str) -> None:
    assert not await results.advance_schedule(schedule_id, 1.0, 2.0)
    assert my_schedules(await results.get_schedules(), schedule_id) == []


async def test_delete_schedule(results: Results, schedule_id: str) -> None:
    other = f"{schedule_id}-other"
    await results.set_schedule(schedule(schedule_id, 5.0))
    await results.set_schedule(schedule(other, 6.0))
    assert await results.delete_schedule(schedule_id)
    assert not await results.delete_schedule(schedule_id)
    assert my_schedules(await results.get_schedules(), schedule_id) == [schedule(other, 6.0)]
    assert not await results.advance_schedule(schedule_id, 5.0, 6.0)
    assert my_schedules(await results.get_schedules(), schedule_id) == [schedule(other, 6.0)]


# -- fencing by run token ---------------------------------------------------------------


async def test_update_job_fenced_by_run_token(results: Results) -> None:
    job_id = f"fence-{uuid4().hex}"
    await results.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
    assert (
        await results.start_job(job_id, JobRecord(status="processing", data=b"p", run="0.2"))
        is None
    )
    assert (await results.get_job(job_id)).run == "0.2"
    # a run that lost the job (attempt 1) cannot write over attempt 2's run
    stale = JobRecord(status="successful", data=b"stale", run="0.1")
    assert not await results.update_job(job_id, stale, expect=["processing"], run="0.1")
    current = await results.get_job(job_id)
    assert (current.status, current.data, current.run) == ("processing", b"p", "0.2")
    assert job_id not in await results.get_success()
    done = JobRecord(status="successful", data=b"done", run="0.2")
    assert await results.update_job(job_id, done, expect=["processing"], run="0.2")
    assert (await results.get_job(job_id)).data == b"done"
    assert job_id in await results.get_success()


async def test_a_second_run_of_one_try_fences_the_first(results: Results) -> None:
    """Two runs of the same try with the same delivery attempt (a message handed out
    twice with one delivery count): the second's start takes the job over, the first's
    writes are refused."""
    job_id = f"fence-{uuid4().hex}"
    first, second = run_token(0, 1), run_token(0, 1)
    await results.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
    assert (
        await results.start_job(job_id, JobRecord(status="processing", data=b"1", run=first))
        is None
    )
    started = JobRecord(status="processing", data=b"2", run=second)
    assert await results.start_job(job_id, started) is None
    assert not await results.set_result(job_id, b"first", run=first)
    stale = JobRecord(status="successful", data=b"first", run=first)
    assert not await results.update_job(job_id, stale, expect=["processing"], run=first)
    assert await results.get_job(job_id) == started
    assert job_id not in await results.get_success()
    assert await results.set_result(job_id, b"second", run=second)
    done = JobRecord(status="successful", data=b"2", run=second)
    assert await results.update_job(job_id, done, expect=["processing"], run=second)
    assert await results.get_result(job_id) == b"second"
    assert job_id in await results.get_success()


async def test_set_result_fenced_by_run_token(results: Results) -> None:
    job_id = f"fence-{uuid4().hex}"
    await results.set_jobs({job_id: JobRecord(status="queued", data=b"q")})
    # not processing yet: a fenced save is refused, an unfenced one is not
    assert not await results.set_result(job_id, b"early", run="0.1")
    with pytest.raises(ResultNotFoundError):
        await results.get_result(job_id)
    await results.start_job(job_id, JobRecord(status="processing", data=b"p", run="0.2"))
    assert not await results.set_result(job_id, b"zombie", run="0.1")
    assert await results.set_result(job_id, b"owner", run="0.2")
    assert await results.get_result(job_id) == b"owner"
    await results.update_job(
        job_id, JobRecord(status="successful", data=b"p", run="0.2"), expect=["processing"]
    )
    assert not await results.set_result(job_id, b"late", run="0.2")  # the run ended
    assert await results.get_result(job_id) == b"owner"
    assert await results.set_result(job_id, b"admin") is True  # unfenced
    assert await results.get_result(job_id) == b"admin"


# -- a result written with the final record; progress; counts of the listings -------------


async def test_update_job_writes_its_result_with_the_record(results: Results, job_id: str) -> None:
    run = run_token(0, 1)
    await results.set_jobs({job_id: record("queued")})
    assert await results.start_job(job_id, JobRecord(status="processing", data=b"p", run=run)) is None
    ended = JobRecord(status="successful", data=b"s", run=run, result=b"the result")
    assert await results.update_job(job_id, ended, expect=["processing"], run=run)
    assert await results.get_result(job_id) == b"the result"
    stored = await results.get_job(job_id)
    assert stored.status == "successful"
    assert stored.result is None  # never read back from the record
    assert stored.data == b"s"


async def test_a_refused_update_writes_no_result(results: Results, job_id: str) -> None:
    run = run_token(0, 1)
    await results.set_jobs({job_id: record("queued")})
    await results.start_job(job_id, JobRecord(status="processing", data=b"p", run=run))
    stale = JobRecord(status="successful", data=b"s", run="0.1.other", result=b"stale")
    assert not await results.update_job(job_id, stale, expect=["processing"], run="0.1.other")
    wrong_status = JobRecord(status="successful", data=b"s", run=run, result=b"x")
    assert not await results.update_job(job_id, wrong_status, expect=["queued"], run=run)
    with pytest.raises(ResultNotFoundError):
        await results.get_result(job_id)
    assert (await results.get_job(job_id)).status == "processing"


async def test_writes_that_carry_no_result_refuse_one(results: Results, job_id: str) -> None:
    with_result = JobRecord(status="queued", data=b"q", result=b"r")
    with pytest.raises(InvalidInputError):
        await results.set_jobs({job_id: with_result})
    with pytest.raises(InvalidInputError):
        await results.create_jobs({job_id: with_result})
    with pytest.raises(InvalidInputError):
        await results.start_job(job_id, attrs.evolve(with_result, status="processing"))
    with pytest.raises(JobNotFoundError):
        await results.get_job(job_id)


async def test_progress_is_stored_for_the_running_run_and_kept(
    results: Results, job_id: str
) -> None:
    run = run_token(0, 1)
    await results.set_jobs({job_id: record("queued")})
    assert not await results.set_progress(job_id, b"early", run=run)  # not processing
    await results.start_job(job_id, JobRecord(status="processing", data=b"p", run=run))
    assert not await results.set_progress(job_id, b"stale", run="0.1.other")
    assert await results.set_progress(job_id, b"half", run=run)
    assert (await results.get_job(job_id)).progress == b"half"
    # kept by the writes that are not a new enqueue or a new run
    await results.request_cancel(job_id)
    assert (await results.get_job(job_id)).progress == b"half"
    ended = JobRecord(status="cancelled", data=b"c", run=run)
    assert await results.update_job(job_id, ended, expect=["processing"], run=run)
    assert (await results.get_job(job_id)).progress == b"half"
    # a new enqueue clears it
    await results.set_jobs({job_id: record("queued")})
    assert (await results.get_job(job_id)).progress is None
    with pytest.raises(InvalidInputError):
        await results.set_progress(job_id, b"x" * (MAX_PROGRESS_SIZE + 1), run=run)
    assert not await results.set_progress(f"{job_id}-missing", b"x", run=run)


async def test_a_new_run_clears_the_progress(results: Results, job_id: str) -> None:
    first, second = run_token(0, 1), run_token(0, 2)
    await results.set_jobs({job_id: record("queued")})
    await results.start_job(job_id, JobRecord(status="processing", data=b"p", run=first))
    assert await results.set_progress(job_id, b"first run", run=first)
    # a redelivery of the job starts again
    await results.start_job(job_id, JobRecord(status="processing", data=b"p", run=second))
    assert (await results.get_job(job_id)).progress is None


async def test_count_ended_after_a_known_mix(results: Results, job_id: str) -> None:
    before = await results.count_ended()
    ids = [f"{job_id}-{i}" for i in range(5)]
    await results.set_jobs({i: record("processing") for i in ids})
    for i, status in zip(ids, ["successful", "successful", "failed", "cancelled", "failed"], strict=True):
        assert await results.update_job(i, record(status), expect=["processing"])
    after = await results.count_ended()
    assert after.successful - before.successful == 2
    assert after.failed - before.failed == 2
    await results.delete_job(ids[0])
    assert (await results.count_ended()).successful - before.successful == 1
