"""The results-store contract of :meth:`Results.claim_jobs` (a job id names one live
job), on every store (the Redis Cluster and nats-server 2.10 included) and both AnyIO
backends."""

from __future__ import annotations

import time
from uuid import uuid4

import anyio
import pytest

from tasqueue_anyio.abc import JobRecord, Results

pytestmark = pytest.mark.anyio

TIMEOUT = 5.0


def new_id() -> str:
    return f"claim-{uuid4().hex[:12]}"


def queued(tag: bytes) -> JobRecord:
    return JobRecord(status="queued", data=tag)


async def test_a_free_id_is_claimed_a_live_one_is_not(results: Results) -> None:
    live = new_id()
    assert await results.claim_jobs({live: queued(b"first")}) == {live}
    for status in ("queued", "processing", "retrying"):
        await results.set_jobs({live: JobRecord(status=status, data=b"first", run="0.1.x")})
        fresh = new_id()
        assert await results.claim_jobs({fresh: queued(b"new"), live: queued(b"second")}) == {
            fresh
        }
        assert (await results.get_job(live)).data == b"first"  # left as it was
        assert (await results.get_job(fresh)).data == b"new"


@pytest.mark.parametrize("final", ["successful", "failed", "cancelled"])
async def test_an_ended_job_without_hold_frees_its_id(results: Results, final: str) -> None:
    job_id = new_id()
    await results.set_jobs({job_id: JobRecord(status="processing", data=b"run1", run="0.1.a")})
    assert await results.update_job(
        job_id,
        JobRecord(status=final, data=b"run1", run="0.1.a"),
        expect=("processing",),
        run="0.1.a",
    )
    assert await results.claim_jobs({job_id: queued(b"run2")}) == {job_id}
    stored = await results.get_job(job_id)
    assert (stored.status, stored.data, stored.progress) == ("queued", b"run2", None)


async def test_a_hold_keeps_an_ended_id_taken_until_it_passes(results: Results) -> None:
    job_id = new_id()
    await results.set_jobs({job_id: JobRecord(status="processing", data=b"run1", run="0.1.a")})
    ended = time.monotonic()
    assert await results.update_job(
        job_id,
        JobRecord(status="successful", data=b"run1", run="0.1.a", result=b"r", hold_for=0.6),
        expect=("processing",),
        run="0.1.a",
    )
    assert (await results.get_job(job_id)).hold_for == 0.0  # write-only
    assert await results.claim_jobs({job_id: queued(b"run2")}) == set()
    assert (await results.get_job(job_id)).status == "successful"
    with anyio.fail_after(TIMEOUT):
        while not await results.claim_jobs({job_id: queued(b"run2")}):  # noqa: ASYNC110
            await anyio.sleep(0.05)  # (a hold passing: nothing announces it)
    assert time.monotonic() - ended >= 0.6 - 0.05  # (clock granularity)
    assert (await results.get_job(job_id)).data == b"run2"
    # the new run's record holds nothing: once it ends without a hold, the id is free
    assert await results.update_job(
        job_id, JobRecord(status="failed", data=b"run2"), expect=("queued",)
    )
    assert await results.claim_jobs({job_id: queued(b"run3")}) == {job_id}


async def test_a_cancelled_job_is_not_held(results: Results) -> None:
    job_id = new_id()
    await results.set_jobs({job_id: queued(b"run1")})
    assert (await results.request_cancel(job_id)).status == "cancelled"
    assert await results.claim_jobs({job_id: queued(b"run2")}) == {job_id}


async def test_concurrent_claims_of_one_id_store_one(results: Results) -> None:
    ids = [new_id() for _ in range(5)]
    wins: list[tuple[str, bytes]] = []

    async def claimer(tag: bytes) -> None:
        got = await results.claim_jobs({job_id: queued(tag) for job_id in ids})
        wins.extend((job_id, tag) for job_id in got)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(claimer, f"claimer{n}".encode())
    assert sorted(job_id for job_id, _ in wins) == sorted(ids)  # each id exactly once
    for job_id, tag in wins:
        assert (await results.get_job(job_id)).data == tag
