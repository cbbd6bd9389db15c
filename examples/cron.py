"""A cron schedule: a job that runs every second (a 6-field cron expression, seconds
last), three times, then the schedule is removed.

Run it with ``python3 examples/cron.py`` (asyncio) or ``python3 examples/cron.py trio``.
Five-field expressions (``"*/5 * * * *"``) work the same, minute by minute; fire times
are evaluated in UTC.
"""

from __future__ import annotations

import sys
from itertools import pairwise

import anyio

from tasqueue_anyio import Server, current_job

server = Server()
fired: list[float] = []
three = anyio.Event()


@server.task()
async def heartbeat(source: str) -> None:
    fired.append(current_job().meta.created_at)  # when this fire time's run was enqueued
    if len(fired) == 3:
        three.set()


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)
        # a schedule: every fire time enqueues heartbeat("cron") (a 6-field expression:
        # seconds last)
        schedule_id = await heartbeat.options(schedule="* * * * * *").enqueue("cron")
        [schedule] = await server.get_schedules()
        print(f"schedule {schedule.id == schedule_id} cron={schedule.cron!r}")
        with anyio.fail_after(10):
            await three.wait()
        await server.remove_schedule(schedule_id)
        gaps = [round(b - a) for a, b in pairwise(fired)]
        print(f"ran {len(fired[:3])} times, {gaps[:2]} seconds apart")
        print(f"schedules left: {len(await server.get_schedules())}")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
