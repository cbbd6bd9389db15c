"""Queue limits (``Server.limit_queue``): at most N starts per window and at most M jobs
running at once, shared by every worker of a backend; jobs over a limit wait (they are not
failed, retried or put back). On the memory, Redis and NATS backends and both AnyIO
backends, with two servers sharing one backend; the contract suite
``test_contract_limits`` covers the brokers alone (Redis Cluster and nats-server 2.10
included), and the reliability suites run several worker processes."""

from __future__ import annotations

import time

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import InvalidInputError, Server, Status
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


def max_in_window(starts: list[float], window: float) -> int:
    """The most start times within any ``window`` seconds (a little under it: the
    broker's clock and this process's can differ by scheduling)."""
    starts = sorted(starts)
    best = 0
    j = 0
    for i, start in enumerate(starts):
        while start - starts[j] >= window * 0.9:
            j += 1
        best = max(best, i - j + 1)
    return best


def make_servers(
    broker: Broker, results: Results, queue: str, **limits: float
) -> tuple[list[Server], list[float], list[int]]:
    starts: list[float] = []
    now_running = [0, 0]  # current, most

    servers = []
    for _ in range(2):  # two workers sharing the backend's limits
        server = Server(broker=broker, results=results)

        @server.task(queue=queue, concurrency=4)
        async def work(seconds: float) -> None:
            starts.append(time.monotonic())
            now_running[0] += 1
            now_running[1] = max(now_running[1], now_running[0])
            try:
                await anyio.sleep(seconds)
            finally:
                now_running[0] -= 1

        server.limit_queue(queue, **limits)  # type: ignore[arg-type]
        server.work = work  # type: ignore[attr-defined]
        servers.append(server)
    return servers, starts, now_running


async def test_runs_per_window_over_two_workers(
    broker: Broker, results: Results, queue_name: str
) -> None:
    servers, starts, _ = make_servers(broker, results, queue_name, runs=4, per=0.5)
    first, second = servers
    async with first, second:
        handles = [await first.work.enqueue(0) for _ in range(12)]  # type: ignore[attr-defined]
        began = time.monotonic()
        async with running(first), running(second):
            for handle in handles:
                assert (await handle.wait(timeout=TIMEOUT)).status is Status.SUCCESSFUL
        took = time.monotonic() - began
    assert len(starts) == 12
    assert max_in_window(starts, 0.5) <= 4, starts
    # 12 starts, 4 per half second: the last window opens a second after the first
    assert took >= 1.0 * 0.9


async def test_running_at_once_over_two_workers(
    broker: Broker, results: Results, queue_name: str
) -> None:
    servers, starts, now_running = make_servers(broker, results, queue_name, running=3)
    first, second = servers
    async with first, second:
        handles = [await first.work.enqueue(0.1) for _ in range(12)]  # type: ignore[attr-defined]
        async with running(first), running(second):
            for handle in handles:
                assert (await handle.wait(timeout=TIMEOUT)).status is Status.SUCCESSFUL
    assert len(starts) == 12
    assert now_running[1] == 3  # reached, never passed (8 processors could run them)


async def test_limits_are_checked(broker: Broker, results: Results) -> None:
    server = Server(broker=broker, results=results)
    for bad in ({"runs": 0}, {"running": -1}, {"runs": 2, "per": 0}, {"running": True}):
        with pytest.raises(InvalidInputError):
            server.limit_queue("q", **bad)
    with pytest.raises(InvalidInputError):
        server.limit_queue("bad queue!", runs=1)
    server.limit_queue("q", runs=3, per=2)
    assert server.limits["q"].runs == 3
    server.limit_queue("q")
    assert "q" not in server.limits
