"""Unique jobs: a job id names one live job. Enqueueing the id of a job that is queued,
scheduled or running (or ended and held by its ``unique_for``) stores nothing and returns
the live job's handle; on the memory, Redis and NATS backends and both AnyIO backends.
(The killed-worker and several-process cases are in the reliability suites.)"""

from __future__ import annotations

import time

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import DuplicateJobError, Group, Job, JobNotFoundError, Server, Status
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


def make_server(broker: Broker, results: Results, queue: str) -> tuple[Server, list[str]]:
    server = Server(broker=broker, results=results)
    runs: list[str] = []
    server.gate = anyio.Event()  # type: ignore[attr-defined]

    @server.task(queue=queue, concurrency=4)
    async def report(day: str, *, wait: bool = False) -> str:
        runs.append(day)
        if wait:
            await server.gate.wait()  # type: ignore[attr-defined]
        return f"report {day}"

    server.report = report  # type: ignore[attr-defined]
    return server, runs


async def test_an_id_enqueued_again_while_live_is_one_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, runs = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    key = f"report:{queue_name}"
    async with server:
        first = await report.options(id=key).enqueue("monday", wait=True)
        again = await report.options(id=key).enqueue("tuesday")  # queued: the same job
        assert again == first == key
        assert (await again.info()).job.payload == (await first.info()).job.payload
        assert (await server.counts(queue_name)).pending == 1
        async with running(server):
            with anyio.fail_after(TIMEOUT):
                while not runs:  # noqa: ASYNC110 (the run's own list)
                    await anyio.sleep(0.01)
            assert await first.status() is Status.PROCESSING
            third = await report.options(id=key).enqueue("wednesday")  # running: the same
            assert third == key
            server.gate.set()  # type: ignore[attr-defined]
            assert await first.result(timeout=TIMEOUT) == "report monday"
            # ended (no unique_for): the id is free, a new run of it
            fourth = await report.options(id=key).enqueue("thursday")
            assert await fourth.result(timeout=TIMEOUT) == "report thursday"
    assert runs == ["monday", "thursday"]


async def test_unique_for_holds_the_id_after_the_end(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, runs = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    key = f"hourly:{queue_name}"
    hourly = report.options(id=key, unique_for=0.8)
    async with server, running(server):
        assert await (await hourly.enqueue("a")).result(timeout=TIMEOUT) == "report a"
        ended = time.monotonic()
        held = await hourly.enqueue("b")  # within the hold: nothing new
        assert await held.status() is Status.SUCCESSFUL
        assert await held.result(timeout=TIMEOUT) == "report a"
        with anyio.fail_after(TIMEOUT):
            while True:
                handle = await hourly.enqueue("c")
                if await handle.status() is not Status.SUCCESSFUL:
                    break
                await anyio.sleep(0.05)
        assert time.monotonic() - ended >= 0.8 - 0.1
        assert await handle.result(timeout=TIMEOUT) == "report c"
    assert runs == ["a", "c"]


async def test_concurrent_enqueues_of_one_id_make_one_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, runs = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    keys = [f"k{n}-{queue_name}" for n in range(10)]
    async with server:

        async def producer(name: str) -> None:
            for key in keys:
                await report.options(id=key).enqueue(name)

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(producer, f"p{n}")
        assert (await server.counts(queue_name)).pending == len(keys)
        async with running(server):
            for key in keys:
                await server.job(key).result(timeout=TIMEOUT)
    assert len(runs) == len(keys)


async def test_a_retrying_job_keeps_its_id(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    tries: list[int] = []

    @server.task(queue=queue_name)
    async def flaky() -> None:
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("first try")

    key = f"flaky:{queue_name}"
    async with server, running(server):
        handle = await flaky.options(id=key, max_retries=1, delay=0.3).enqueue()
        assert await flaky.options(id=key).enqueue() == handle  # scheduled: the same
        await handle.wait(timeout=TIMEOUT)
    assert len(tries) == 2


async def test_a_group_with_a_live_member_id_is_refused(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, runs = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    key = f"member:{queue_name}"
    async with server:
        live = await report.options(id=key).enqueue("live")
        other = report.job("other")
        group = Group([report.options(id=key).job("dup"), other], id=f"g-{queue_name}")
        with pytest.raises(DuplicateJobError) as info:
            await server.enqueue_group(group)
        assert info.value.job_ids == [key]
        assert key in str(info.value)
        # the group ended failed, saying why; its other member was not left queued
        failed = await server.get_group(group.id)
        assert failed.status is Status.FAILED
        with pytest.raises(JobNotFoundError):
            await server.get_job(other.id)
        async with running(server):
            assert await live.result(timeout=TIMEOUT) == "report live"
    assert runs == ["live"]


async def test_unique_for_is_checked(broker: Broker, results: Results, queue_name: str) -> None:
    from tasqueue_anyio import InvalidInputError

    server, _ = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    for bad in (0, -1, float("nan"), 1e11):
        with pytest.raises(InvalidInputError, match="unique_for"):
            report.options(id="x", unique_for=bad).job("d")
        with pytest.raises(InvalidInputError, match="unique_for"):
            Job("report", unique_for=bad)


async def test_a_failed_enqueue_never_deletes_a_live_jobs_state(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store fails mid-claim, the client deletes only the states it wrote (it
    cannot tell which ids it claimed): a live job named in the batch keeps its state."""
    from typing import Any

    from tasqueue_anyio import BrokerError

    server, runs = make_server(broker, results, queue_name)
    report = server.report  # type: ignore[attr-defined]
    key = f"live:{queue_name}"
    async with server:
        live = await report.options(id=key).enqueue("live")

        async def half_claim(records: Any) -> None:  # claims what is free, then fails
            await type(results).claim_jobs(results, records)
            raise BrokerError("injected: the store failed")

        monkeypatch.setattr(results, "claim_jobs", half_claim)
        fresh = report.job("fresh")
        with pytest.raises(BrokerError, match="injected"):
            await server.enqueue_many([report.options(id=key).job("dup"), fresh])
        monkeypatch.undo()
        assert (await live.info()).status is Status.QUEUED  # still there, still its own
        with pytest.raises(JobNotFoundError):
            await server.get_job(fresh.id)  # the one this call wrote: deleted again
        async with running(server):
            assert await live.result(timeout=TIMEOUT) == "report live"
    assert runs == ["live"]
