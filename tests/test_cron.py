"""Cron schedules over a simulated hour: an injected wall clock, no real waiting."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import (
    BrokerError,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    Server,
)
from tasqueue_anyio._schedule import encode_template, next_fire, run_id
from tasqueue_anyio.abc import Broker, Envelope, Results, ScheduleRecord

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


#: expressions croniter parses that have no fire time: the 31st or 30th of February, the
#: 31st of the 30-day months, a year gone, a year past croniter's 50-year search
NEVER_FIRING = [
    "0 0 31 2 *",
    "0 0 30 2 *",
    "0 0 31 4,6,9,11 *",
    "0 0 1 1 * 0 2020",
    "0 0 1 1 * 0 2099",
]


@pytest.mark.parametrize("expression", NEVER_FIRING)
@pytest.mark.parametrize("when", ["now", "delay", "eta"])
def test_cron_expression_that_never_fires_refused(expression: str, when: str) -> None:
    eta = datetime.now(timezone.utc) + timedelta(hours=1) if when == "eta" else None
    delay = 1 if when == "delay" else None
    message = f"invalid cron schedule {re.escape(repr(expression))}: it has no fire time"
    with pytest.raises(InvalidInputError, match=message):
        Job("t", schedule=expression, eta=eta, delay=delay)
    with pytest.raises(InvalidInputError, match=message):
        next_fire(expression, T0)


def test_next_fire_out_of_range_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError, match="invalid cron schedule"):
        next_fire("* * * * *", 1e20)


async def test_enqueue_refuses_cron_with_no_fire_time_after_the_server_clock(
    broker: Broker, results: Results, queue_name: str
) -> None:
    # An expression that fires only next year is a valid Job today; a server whose clock
    # is past that year refuses it before any I/O, with or without a first fire time.
    year = datetime.now(timezone.utc).year + 1
    expression = f"0 0 1 1 * 0 {year}"
    later = datetime(year + 1, 6, 1, tzinfo=timezone.utc)
    server = Server(broker=broker, results=results, clock=FakeClock(later.timestamp()))
    async with server:
        for options in ({}, {"delay": 1}, {"eta": later + timedelta(hours=1)}):
            cron = Job("t", schedule=expression, queue=queue_name, **options)
            plain = Job("t", queue=queue_name)
            with pytest.raises(InvalidInputError, match="it has no fire time after"):
                await server.enqueue(cron)
            with pytest.raises(InvalidInputError, match="it has no fire time after"):
                await server.enqueue_many([plain, cron])
            with pytest.raises(JobNotFoundError):
                await server.get_job(plain.id)
            assert cron.id not in [s.id for s in await server.get_schedules()]


async def test_schedule_with_no_fire_time_left_is_disabled_and_run_goes_on(
    broker: Broker, results: Results, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A stored schedule whose expression has no next fire time (stored by an older
    # version, damaged, or a year-bounded expression past its last year): its due run is
    # enqueued, then it is disabled (next_fire = inf, logged once); the scheduler, the
    # other schedules and the workers go on.
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name, raw=True)
    template = Job("tick", id=f"never-{queue_name}", queue=queue_name, schedule="*/5 * * * *")
    object.__setattr__(template, "schedule", "0 0 31 2 *")  # as an older version stored it
    bad_id = template.id
    await results.set_schedule(
        ScheduleRecord(id=bad_id, data=encode_template(template), next_fire=T0 + 270)
    )
    caplog.set_level(logging.ERROR, logger="tasqueue_anyio")
    async with server, running(server):
        good_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 270
        server.wake_scheduler()
        await runs.wait_for(2)
        assert sorted(runs.ids) == sorted([run_id(bad_id, T0 + 270), run_id(good_id, T0 + 270)])
        schedules = {s.id: s for s in await server.get_schedules()}
        assert schedules[bad_id].next_fire == math.inf
        assert schedules[good_id].next_fire == T0 + 570
        marker = await server.enqueue(Job("tick", queue=queue_name))
        assert (await server.wait(marker, timeout=TIMEOUT)).status.value == "successful"
        clock.now = T0 + 570
        server.wake_scheduler()
        await runs.wait_for(4)
        assert runs.ids[3:] == [run_id(good_id, T0 + 570)]
        assert await server.remove_schedule(bad_id)
    disabled = [r for r in caplog.records if bad_id in r.getMessage()]
    assert len(disabled) == 1
    assert "'0 0 31 2 *') is disabled" in disabled[0].getMessage()


async def test_scheduler_errors_do_not_end_run(
    broker: Broker,
    results: Results,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Any error in a pass (not only a BrokerError) is logged; a pass that failed is
    # tried again, and an error on one schedule leaves the others firing.
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name, raw=True)
    read_schedules = results.get_schedules
    failures = [RuntimeError("a bug reading the schedules")]

    async def get_schedules_failing_once() -> list[ScheduleRecord]:
        if failures:
            raise failures.pop()
        return await read_schedules()

    monkeypatch.setattr(results, "get_schedules", get_schedules_failing_once)
    enqueue_run = server._enqueue_run
    broken_id = f"broken-{queue_name}"

    async def enqueue_run_failing_for_one(schedule_id: str, template: Job, fire: float) -> str:
        if schedule_id == broken_id:
            raise ValueError("a bug on one schedule")
        return await enqueue_run(schedule_id, template, fire)

    monkeypatch.setattr(server, "_enqueue_run", enqueue_run_failing_for_one)
    caplog.set_level(logging.WARNING, logger="tasqueue_anyio")
    async with server, running(server):
        await server.enqueue(Job("tick", id=broken_id, schedule="*/5 * * * *", queue=queue_name))
        good_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 270
        server.wake_scheduler()
        await runs.wait_for(1)
        marker = await server.enqueue(Job("tick", queue=queue_name))
        assert (await server.wait(marker, timeout=TIMEOUT)).status.value == "successful"
        assert runs.ids == [run_id(good_id, T0 + 270), marker]
        schedules = {s.id: s.next_fire for s in await server.get_schedules()}
        assert schedules[broken_id] == T0 + 270  # not moved on: tried again next pass
        await server.remove_schedule(broken_id)
    messages = [r.getMessage() for r in caplog.records]
    assert not failures
    assert any("a bug reading the schedules" in m for m in messages)
    assert any(broken_id in m and "a bug on one schedule" in m for m in messages)


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
    server.register_task("tick", runs, queue=queue_name, raw=True)
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
    server.register_task("tick", runs, queue=queue_name, raw=True)
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
        server.register_task("tick", runs, queue=queue_name, raw=True)
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
    server.register_task("tick", runs, queue=queue_name, raw=True)
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
    server.register_task("tick", runs, queue=queue_name, raw=True)
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
    server.register_task("tick", runs, queue=queue_name, raw=True)
    async with server:
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 3 * 3600 + 10  # no worker ran for three hours
        async with running(server):
            await runs.wait_for(1)
            [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
            assert runs.ids == [run_id(schedule_id, T0 + 270)]
            assert schedule.next_fire == next_fire("*/5 * * * *", clock.now)
            assert (schedule.next_fire - (T0 - 30)) % 300 == 0


async def test_a_run_whose_enqueue_failed_is_enqueued_by_the_next_pass(
    broker: Broker,
    results: Results,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The scheduler records a run's state, then enqueues its message. When the enqueue
    # fails (a broker error, or the process dying there), the schedule is not moved on,
    # and the next pass must still enqueue the run it finds recorded `queued`: the fire
    # time runs, once, instead of staying `queued` for ever.
    clock = FakeClock(T0)
    runs = Runs()
    server = Server(broker=broker, results=results, clock=clock)
    server.register_task("tick", runs, queue=queue_name, raw=True)
    enqueue_many = broker.enqueue_many
    failures = [BrokerError("the connection dropped")]

    async def enqueue_failing_once(messages: Sequence[Envelope]) -> None:
        if failures and any("@" in m.id for m in messages):
            raise failures.pop()
        await enqueue_many(messages)

    monkeypatch.setattr(broker, "enqueue_many", enqueue_failing_once)
    caplog.set_level(logging.WARNING, logger="tasqueue_anyio")
    async with server, running(server):
        schedule_id = await server.enqueue(Job("tick", schedule="*/5 * * * *", queue=queue_name))
        clock.now = T0 + 270
        server.wake_scheduler()
        await runs.wait_for(1)
        fired = run_id(schedule_id, T0 + 270)
        assert (await server.wait(fired, timeout=TIMEOUT)).status.value == "successful"
        marker = await server.enqueue(Job("tick", queue=queue_name))
        assert (await server.wait(marker, timeout=TIMEOUT)).status.value == "successful"
        assert runs.ids == [fired, marker]  # the fire time ran once
        [schedule] = [s for s in await server.get_schedules() if s.id == schedule_id]
        assert schedule.next_fire == T0 + 570
    assert not failures
    assert any("the connection dropped" in r.getMessage() for r in caplog.records)
