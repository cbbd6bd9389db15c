"""Cron schedules in an IANA time zone (a ``CRON_TZ=Zone`` prefix, or ``timezone=``),
with daylight saving time handled as cron does; a simulated clock, no waiting."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import InvalidInputError, Job, Server
from tasqueue_anyio._jobs import cron_next_fire
from tasqueue_anyio._schedule import run_id
from tasqueue_anyio.abc import Broker, Results

PARIS = ZoneInfo("Europe/Paris")
UTC = timezone.utc


def fires(expression: str, start: datetime, n: int) -> list[str]:
    """The next ``n`` fire times after ``start``, as Paris wall-clock times with offsets."""
    out, t = [], start.timestamp()
    for _ in range(n):
        t = cron_next_fire(expression, t)
        out.append(datetime.fromtimestamp(t, PARIS).isoformat())
    return out


def test_a_time_zone_moves_the_fire_times() -> None:
    winter = datetime(2026, 1, 10, tzinfo=UTC)
    assert fires("CRON_TZ=Europe/Paris 0 6 * * *", winter, 1) == ["2026-01-10T06:00:00+01:00"]
    assert fires("TZ=Europe/Paris 0 6 * * *", winter, 1) == ["2026-01-10T06:00:00+01:00"]
    assert fires("0 6 * * *", winter, 1) == ["2026-01-10T07:00:00+01:00"]  # UTC
    summer = datetime(2026, 7, 10, tzinfo=UTC)
    assert fires("CRON_TZ=Europe/Paris 0 6 * * *", summer, 1) == ["2026-07-10T06:00:00+02:00"]


def test_the_skipped_hour_fires_once_just_after_the_gap() -> None:
    # 2026-03-29: Paris clocks jump from 02:00 to 03:00; 02:30 does not exist that day
    assert fires("CRON_TZ=Europe/Paris 30 2 * * *", datetime(2026, 3, 28, 12, tzinfo=PARIS), 3) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_the_repeated_hour_fires_a_fixed_time_once() -> None:
    # 2026-10-25: Paris clocks go back from 03:00 to 02:00; 02:30 happens twice
    assert fires("CRON_TZ=Europe/Paris 30 2 * * *", datetime(2026, 10, 24, 12, tzinfo=PARIS), 3) == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]
    # started during the repeated hour, after the first 02:30: not again that night
    second_pass = datetime(2026, 10, 25, 2, 45, tzinfo=PARIS, fold=1)
    assert fires("CRON_TZ=Europe/Paris 30 2 * * *", second_pass, 1) == [
        "2026-10-26T02:30:00+01:00"
    ]


def test_the_repeated_hour_fires_a_wildcard_hour_in_both_passes() -> None:
    start = datetime(2026, 10, 25, 1, 50, tzinfo=PARIS)
    assert fires("CRON_TZ=Europe/Paris */30 * * * *", start, 5) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


@pytest.mark.parametrize(
    "schedule", ["CRON_TZ=Mars/Olympus 0 6 * * *", "TZ= 0 6 * * *", "CRON_TZ=../etc 0 6 * * *"]
)
def test_an_unknown_time_zone_is_refused(schedule: str) -> None:
    with pytest.raises(InvalidInputError, match="not an IANA time zone"):
        Job("report", schedule=schedule)


def test_timezone_option_of_a_task_function() -> None:
    server = Server()

    @server.task()
    async def report(kind: str) -> None:
        pass

    job = report.options(schedule="0 6 * * *", timezone="Europe/Paris").job("daily")
    assert job.schedule == "CRON_TZ=Europe/Paris 0 6 * * *"
    with pytest.raises(InvalidInputError, match="goes with schedule"):
        report.options(timezone="Europe/Paris")
    with pytest.raises(InvalidInputError, match="not an IANA time zone"):
        report.options(schedule="0 6 * * *", timezone="Nowhere/Town")
    with pytest.raises(InvalidInputError, match="already names a time zone"):
        report.options(schedule="CRON_TZ=UTC 0 6 * * *", timezone="Europe/Paris")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_a_server_runs_a_zoned_schedule_across_both_changes(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """Night by night through both changes of 2026: one run a night, at the times
    above, on every backend."""
    spring = datetime(2026, 3, 28, 12, tzinfo=PARIS).timestamp()
    clock = FakeClock(spring)
    server = Server(broker=broker, results=results, clock=clock)
    ran: list[str] = []
    changed = anyio.Event()

    @server.task(queue=queue_name)
    async def nightly(kind: str) -> None:
        nonlocal changed
        ran.append(kind)
        changed.set()
        changed = anyio.Event()

    expected = [
        datetime(2026, 3, 29, 3, 0, tzinfo=PARIS),  # 02:30 is skipped: just after the gap
        datetime(2026, 3, 30, 2, 30, tzinfo=PARIS),
        datetime(2026, 10, 25, 2, 30, tzinfo=PARIS),  # the first 02:30 only
        datetime(2026, 10, 26, 2, 30, tzinfo=PARIS),
    ]
    async with server, running(server):
        schedule_id = await nightly.options(
            schedule="30 2 * * *", timezone="Europe/Paris", queue=queue_name
        ).enqueue("backup")
        for n, fire in enumerate(expected, 1):
            if n == 3:  # skip to the autumn: the schedule is due at its next fire time
                [schedule] = await server.get_schedules()
                assert schedule.next_fire == datetime(2026, 3, 31, 2, 30, tzinfo=PARIS).timestamp()
                await server.remove_schedule(schedule_id)
                clock.now = datetime(2026, 10, 24, 12, tzinfo=PARIS).timestamp()
                schedule_id = await nightly.options(
                    schedule="30 2 * * *", timezone="Europe/Paris", queue=queue_name
                ).enqueue("backup")
            clock.now = fire.timestamp()
            server.wake_scheduler()
            with anyio.fail_after(TIMEOUT):
                while len(ran) < n:
                    await changed.wait()
            msg = await server.wait(run_id(schedule_id, fire.timestamp()), timeout=TIMEOUT)
            assert msg.status.value == "successful"
            # the second 02:30 of 2026-10-25 is not a fire time
            [schedule] = await server.get_schedules()
            assert schedule.next_fire > fire.timestamp() + 3600
    assert ran == ["backup"] * 4
