"""Client.retry: a failed or cancelled job runs again, on every backend and both AnyIO
backends; anything else is refused, nothing changed."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import (
    Group,
    InvalidInputError,
    JobFailedError,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


async def test_a_failed_job_retried_ends_successful(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    runs: list[int] = []

    @server.task(queue=queue_name)
    async def flaky(x: int) -> int:
        runs.append(x)
        if len(runs) <= 2:
            raise RuntimeError(f"run {len(runs)} fails")
        return x * 10

    async with server, running(server):
        job = await flaky.enqueue(4)
        with pytest.raises(JobFailedError, match="run 1 fails"):
            await job.result(timeout=TIMEOUT)
        assert (await job.info()).meta.errors == ()
        again = await server.retry(job)
        assert again == job
        with pytest.raises(JobFailedError, match="run 2 fails"):
            await again.result(timeout=TIMEOUT)
        # each retry keeps the error the job ended with in its history
        assert (await job.info()).meta.errors == ("RuntimeError: run 1 fails",)
        await server.retry(job)
        assert await again.result(timeout=TIMEOUT) == 40
        info = await again.info()
        assert info.meta.retried == 2
        assert info.status is Status.SUCCESSFUL
        assert info.meta.errors == ("RuntimeError: run 1 fails", "RuntimeError: run 2 fails")
        assert job.id in await server.get_success()
        assert job.id not in await server.get_failed()
    assert runs == [4, 4, 4]


def test_the_error_history_keeps_the_newest_that_fit() -> None:
    from tasqueue_anyio._jobs import MAX_ERROR_HISTORY, MAX_ERROR_HISTORY_SIZE, error_history

    history: tuple[str, ...] = ()
    for n in range(12):
        history = error_history(history, f"E{n}")
    assert history == tuple(f"E{n}" for n in range(12 - MAX_ERROR_HISTORY, 12))
    big = "x" * 3000
    assert error_history(("a", big), big) == (big,)  # two would not fit together
    huge = error_history((), "é" * 5000)  # one too long alone: cut to fit
    assert len(huge) == 1
    assert len(huge[0].encode()) <= MAX_ERROR_HISTORY_SIZE
    assert huge[0].endswith("...[truncated]")


async def test_cancelled_jobs_retried_run(broker: Broker, results: Results, queue_name: str) -> None:
    server = Server(broker=broker, results=results)
    started = anyio.Event()
    hold = anyio.Event()
    runs: list[str] = []

    @server.task(queue=queue_name, concurrency=1)
    async def work(name: str) -> str:
        runs.append(name)
        if name == "running" and len(runs) == 1:
            started.set()
            await anyio.sleep_forever()
        await hold.wait()
        return name

    async with server:
        queued = await work.enqueue("queued")
        assert await queued.cancel() is Status.CANCELLED  # never started
        async with running(server):
            running_job = await work.enqueue("running")
            with anyio.fail_after(TIMEOUT):
                await started.wait()
            await running_job.cancel()  # cancel requested while it runs
            assert (await running_job.wait(timeout=TIMEOUT)).status is Status.CANCELLED
            hold.set()
            for job in (queued, running_job):
                again = await server.retry(job)
                assert await again.result(timeout=TIMEOUT) == job_name(job, queued)
    assert sorted(runs) == ["queued", "running", "running"]


def job_name(job: str, queued: str) -> str:
    return "queued" if job == queued else "running"


async def test_retry_refuses_what_it_cannot_retry(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue_name)
    async def check(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    async with server, running(server):
        done = await check.enqueue(1)
        await done.result(timeout=TIMEOUT)
        with pytest.raises(InvalidInputError, match="only a failed or cancelled job"):
            await server.retry(done)
        assert (await done.info()).meta.retried == 0  # nothing changed
        with pytest.raises(JobNotFoundError):
            await server.retry(f"{queue_name}-missing")
        group = await server.enqueue_group(Group([check.job(-1)]))
        assert (await group.wait(timeout=TIMEOUT)).status is Status.FAILED
        member = group.jobs[0]
        with pytest.raises(InvalidInputError, match="member of"):
            await server.retry(member)
        assert await member.status() is Status.FAILED
