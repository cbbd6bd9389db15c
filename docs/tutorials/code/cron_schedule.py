"""Tutorial 5: cron schedules. A schedule that fires every second runs three times and is
removed; a daily schedule in a time zone says when it fires next.
Run it with ``python3 cron_schedule.py`` (or ``... trio``); it takes about three seconds.
"""

from __future__ import annotations

import sys
from datetime import datetime
from itertools import pairwise
from zoneinfo import ZoneInfo

import anyio

from tasqueue_anyio import Server, current_job

server = Server()
runs: list[str] = []
three_runs = anyio.Event()


# [tasks]
@server.task()
async def heartbeat(source: str) -> None:
    runs.append(current_job().job_id)  # "<schedule id>@<fire time in ms>"
    if len(runs) == 3:
        three_runs.set()


@server.task(queue="reports")
async def daily_report(kind: str) -> str:
    return f"{kind} report sent"
# [tasks end]


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)  # the scheduler runs inside run(), with the workers

        # [every second]
        schedule_id = await heartbeat.options(id="heartbeat", schedule="* * * * * *").enqueue(
            "cron"
        )
        with anyio.fail_after(10):
            await three_runs.wait()
        await server.remove_schedule(schedule_id)
        print("schedule:", schedule_id)
        print("runs:", runs[:3])
        fire_times = [int(run.split("@")[1]) for run in runs[:3]]
        print("apart (ms):", [b - a for a, b in pairwise(fire_times)])
        # [every second end]

        # [time zone]
        await daily_report.options(
            id="daily-sales", schedule="0 6 * * 1-5", timezone="Europe/Paris"
        ).enqueue("sales")
        for schedule in await server.get_schedules():
            paris = datetime.fromtimestamp(schedule.next_fire, ZoneInfo("Europe/Paris"))
            print(f"{schedule.id}: {schedule.cron!r}, next at {paris:%H:%M} in Paris")
        # [time zone end]

        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
