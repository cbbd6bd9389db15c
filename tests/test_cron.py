"""Cron schedules over a simulated hour: an injected wall clock, no real waiting."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import anyio
import anyio.lowlevel
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import InvalidInputError, Job, JobContext, Server
from tasqueue_anyio._schedule import next_fire, run_id
from tasqueue_anyio.abc import Broker, Results, ScheduleRecord

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone.utc).timestamp()


class FakeClock:
    """A wall clock that moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Runs:
    """A handler recording which schedule runs happened, and waiting for a count."""

    def __init__(self, fail: bool = False) -> None:
        self.ids: list[str] = []
        self.fail = fail
        self._changed = anyio.Event()

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.ids.append(ctx.job_id)
        self._changed.set()
        self._changed = anyio.Event()
        if self.fail:
            raise RuntimeError("this run fails")

    async def wait_for(self, n: int) -> None:
        with anyio.fail_after(TIMEOUT):
            while len(self.ids) < n:
                await self._changed.wait()


def test_next_fire_is_on_the_grid_and_does_not_drift() -> None:
    fire = T0
    fires = []
    for _ in range(12):
        fire = next_fire("*/5 * * * *", fire)
        fires.append(fire)
    start = datetime(2026, 1, 1, 0, 5, tzinfo=timezone.utc).timestamp()
    assert fires == [start + 300 * i for i in range(12)]
    # computed from a late run time instead, the next fire is still on the grid
    assert next_fire("*/5 * * * *", start + 299.9) == start + 300


def test_invalid_cron_expression_refused_with_the_parser_message() -> None:
    with pytest.raises(InvalidInputError, match="invalid cron schedule 'not a cron'"):
        Job("t", schedule="not a cron")
    with pytest.raises(InvalidInputError, match="61"):
        Job("t", schedule="61 * * * *")


async def simulate_hour(
    servers: list[Server], clock: FakeClock, runs: Runs, expected_per_step: int = 1
) -> None:
    """Move the clock a minute at a time for an hour, waking the schedulers."""
    fired = 0
    for minute in range(1, 61):
        clock.now = T0 + 60 * minute
        for server in servers:
            server.wake_scheduler()
        if int(clock.now - 30) % 300 == 0:  # a fire time passed (T0 is 30 s past the grid)
            fired += 1
            await runs.wait_for(fired * expected_per_step)


async def test_cron_runs_each_fire_time_over_an_hour(
    broker: Broker, results: Results, queue_name: str
) -> None:
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name)
    async with server, running(server):
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
        assert schedule.cron == "*/5 * * * *"
        assert schedule.next_fire == T0 + 270  # 00:05:00
        await simulate_hour([server], clock, runs)
        expected = [run_id(schedule_id, T0 + 270 + 300 * i) for i in range(12)]
        assert runs.ids == expected
        for job_id in expected:
            msg = await server.wait(job_id, timeout=TIMEOUT)
            assert msg.status.value == "successful"
            assert msg.meta.schedule == "*/5 * * * *"
        [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
        assert schedule.next_fire == T0 + 270 + 300 * 12


async def test_failing_cron_run_still_schedules_the_next(
    broker: Broker, results: Results, queue_name: str
) -> None:
    clock = FakeClock(T0)
    runs = Runs(fail=True)
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name)
    async with server, running(server):
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        for step in range(3):
            clock.now = T0 + 270 + 300 * step
            server.wake_scheduler()
            await runs.wait_for(step + 1)
            msg = await server.wait(run_id(schedule_id, clock.now), timeout=TIMEOUT)
            assert msg.status.value == "failed"
        assert len(runs.ids) == 3


async def test_two_servers_fire_each_cron_time_once(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Let the two schedulers interleave between reading the schedules and advancing
    # them, as they would against a networked store: only the atomic advance keeps a
    # fire time from running twice then.
    read_schedules = results.get_schedules

    async def get_schedules_then_yield() -> list[ScheduleRecord]:
        records = await read_schedules()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        return records

    monkeypatch.setattr(results, "get_schedules", get_schedules_then_yield)
    clock = FakeClock(T0)
    runs = Runs()
    first = Server(broker=broker, results=results, clock=clock)
    second = Server(broker=broker, results=results, clock=clock)
    for server in (first, second):
        server.register_task("tick", runs, queue=queue_name)
    async with first, second, running(first), running(second):
        schedule_id = await first.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        await simulate_hour([first, second], clock, runs)
        # both schedulers were woken at every step; a last pass must not add runs
        for server in (first, second):
            server.wake_scheduler()
        marker = await first.enqueue(Job("tick", queue=queue_name))
        await first.wait(marker, timeout=TIMEOUT)
        counts = Counter(runs.ids)
        del counts[marker]
        assert sorted(counts) == sorted(run_id(schedule_id, T0 + 270 + 300 * i) for i in range(12))
        assert set(counts.values()) == {1}


async def test_schedule_removed_stops_firing(
    broker: Broker, results: Results, queue_name: str
) -> None:
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name)
    async with server, running(server):
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 270
        server.wake_scheduler()
        await runs.wait_for(1)
        assert await server.remove_schedule(schedule_id) is True
        assert await server.remove_schedule(schedule_id) is False
        assert schedule_id not in [s.id for s in await server.get_schedules()]
        clock.now = T0 + 270 + 3600
        server.wake_scheduler()
        marker = await server.enqueue(Job("tick", queue=queue_name))
        await server.wait(marker, timeout=TIMEOUT)
        assert runs.ids == [run_id(schedule_id, T0 + 270), marker]


async def test_schedule_with_eta_fires_first_at_the_eta(
    broker: Broker, results: Results, queue_name: str
) -> None:
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name)
    async with server, running(server):
        eta = datetime(2026, 1, 1, 0, 1, 0, tzinfo=timezone.utc)
        schedule_id = await server.enqueue(
            Job("tick", schedule="0 * * * *", eta=eta, queue=queue_name)
        )
        clock.now = eta.timestamp()
        server.wake_scheduler()
        await runs.wait_for(1)
        [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
        assert schedule.next_fire == datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc).timestamp()
        assert runs.ids == [run_id(schedule_id, eta.timestamp())]


async def test_missed_fire_times_run_once_then_stay_on_the_grid(
    broker: Broker, results: Results, queue_name: str
) -> None:
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name)
    async with server:
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 3 * 3600 + 10  # no worker ran for three hours
        async with running(server):
            await runs.wait_for(1)
            [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
            assert runs.ids == [run_id(schedule_id, T0 + 270)]
            assert schedule.next_fire == next_fire("*/5 * * * *", clock.now)
            assert (schedule.next_fire - (T0 - 30)) % 300 == 0
