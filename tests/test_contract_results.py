"""The results-store contract, written against :mod:`tasqueue_anyio.abc` only.

Runs unchanged against every backend in ``conftest.RESULTS_FACTORIES``. Job ids are
unique per test, so backends may be shared between tests; listings are checked only for
the ids a test created.
"""

from __future__ import annotations

from uuid import uuid4

import pytest

from tasqueue_anyio._exceptions import JobNotFoundError, NotFoundError, ResultNotFoundError
from tasqueue_anyio.abc import FINAL_STATUSES, JobRecord, Results

pytestmark = pytest.mark.anyio

NOT_FINAL = ("queued", "processing", "retrying")


@pytest.fixture
def job_id() -> str:
    return f"job-{uuid4().hex[:12]}"


def record(status: str, data: bytes = b"job", *, cancel_requested: bool = False) -> JobRecord:
    return JobRecord(status=status, data=data, cancel_requested=cancel_requested)


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
