"""Job priorities through the server, on the memory, Redis and NATS backends and both AnyIO
backends (the contract suite ``test_contract_priority`` covers the brokers alone, the
Redis Cluster and nats-server 2.10 included)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import InvalidInputError, Job, Server
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


def make_server(broker: Broker, results: Results, queue: str) -> tuple[Server, list[str]]:
    server = Server(broker=broker, results=results)
    ran: list[str] = []

    @server.task(queue=queue, concurrency=1)
    async def work(label: str) -> str:
        ran.append(label)
        return label

    @server.task(queue=queue, priority=8)
    async def urgent(label: str) -> str:
        ran.append(label)
        return label

    server.work, server.urgent = work, urgent  # type: ignore[attr-defined]
    return server, ran


async def test_jobs_run_by_priority_then_in_order(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, ran = make_server(broker, results, queue_name)
    work, urgent = server.work, server.urgent  # type: ignore[attr-defined]
    async with server:
        handles = [
            await work.enqueue("low-1"),
            await work.options(priority=5).enqueue("mid-1"),
            await urgent.enqueue("task-default-8"),
            await work.enqueue("low-2"),
            await work.options(priority=9).enqueue("top"),
            await work.options(priority=5).enqueue("mid-2"),
        ]
        handles.append(
            await server.enqueue(
                Job("work", work.job("raw-job-7").payload, queue=queue_name, priority=7)
            )
        )
        async with running(server):
            for handle in handles:
                await handle.result(timeout=TIMEOUT)
    assert ran == ["top", "task-default-8", "raw-job-7", "mid-1", "mid-2", "low-1", "low-2"]


async def test_a_burst_does_not_starve_a_later_urgent_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[str] = []
    release, busy = anyio.Event(), anyio.Event()

    @server.task(queue=queue_name, concurrency=2)
    async def step(label: str) -> None:
        ran.append(label)
        if len(ran) == 2:
            busy.set()
        await release.wait()

    async with server, running(server):
        burst = await server.enqueue_many([step.job(f"low-{i}") for i in range(100)])
        with anyio.fail_after(TIMEOUT):
            await busy.wait()  # both processors hold a job of the burst
        handle = await step.options(priority=9).enqueue("urgent")
        release.set()
        await handle.result(timeout=TIMEOUT)
        with anyio.fail_after(TIMEOUT * 4):
            for job in burst:
                await server.job(job).wait(timeout=TIMEOUT * 4)
    position = ran.index("urgent")
    # enqueued after 100 jobs, it runs after what the workers had in hand (at most a
    # fetch batch), not after the burst
    assert position < 40, ran[: position + 1]
    assert len(ran) == 101


async def test_a_retry_keeps_its_priority(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[str] = []

    @server.task(queue=queue_name, concurrency=1)
    async def flaky(label: str) -> None:
        ran.append(label)
        if label == "urgent" and ran.count("urgent") == 1:
            raise RuntimeError("first run fails")

    async with server:
        handles = [
            await flaky.options(priority=6, max_retries=1).enqueue("urgent"),
            await flaky.enqueue("a"),
            await flaky.enqueue("b"),
        ]
        async with running(server):
            for handle in handles:
                await handle.result(timeout=TIMEOUT)
    # the retry is a new message with the job's priority: ahead of the plain jobs but
    # the one the worker had fetched while the first run ran
    assert ran[0] == "urgent"
    assert ran.index("urgent", 1) <= 2, ran
    assert sorted(ran) == ["a", "b", "urgent", "urgent"]


async def test_bad_priorities_are_refused(broker: Broker, results: Results, queue_name: str) -> None:
    server, _ = make_server(broker, results, queue_name)
    work = server.work  # type: ignore[attr-defined]
    bad: Any
    for bad in (-1, 10, 1.5, True, "9"):
        with pytest.raises(InvalidInputError, match="priority"):
            work.options(priority=bad).job("x")
        with pytest.raises(InvalidInputError, match="priority"):
            Job("work", b"", priority=bad)
    with pytest.raises(InvalidInputError, match="priority"):
        server.register_task("other", lambda: None, queue=queue_name, priority=11)
    with pytest.raises(InvalidInputError, match="priority"):
        server.register_task("raw", lambda p, c: None, raw=True, queue=queue_name, priority=3)
