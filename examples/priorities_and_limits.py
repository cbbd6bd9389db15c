"""Priorities, unique jobs and a queue limit, on the in-memory backend.

Run it with ``python3 examples/priorities_and_limits.py`` (asyncio) or with ``trio`` as
its argument. It finishes in about a second and prints::

    order: urgent, normal-1, normal-2, bulk-1, bulk-2
    same handle: True, runs of report:monday: 1
    6 pings, at most 3 in any half second: True

1. Jobs enqueued before the worker starts run by priority, then in enqueue order.
2. A job id names one live job: enqueueing ``report:monday`` again while it is queued
   (and for ``unique_for`` seconds after it ended) returns the same job.
3. ``limit_queue`` lets at most 3 ``ping`` jobs start per half second, over every worker
   of the backend: the others wait, they are not failed or retried.
"""

from __future__ import annotations

import sys
import time

import anyio

from tasqueue_anyio import Server

server = Server()
order: list[str] = []
reports: list[str] = []
pings: list[float] = []


@server.task(queue="work", concurrency=1)
async def step(name: str) -> None:
    order.append(name)


@server.task(queue="reports")
async def report(day: str) -> str:
    reports.append(day)
    return f"report for {day}"


@server.task(queue="pings", concurrency=6)
async def ping() -> None:
    pings.append(time.monotonic())


server.limit_queue("pings", runs=3, per=0.5)


def most_in_window(times: list[float], window: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


async def main() -> None:
    async with server:
        steps = [
            await step.options(priority=priority).enqueue(name)
            for name, priority in [
                ("bulk-1", 0),
                ("normal-1", 5),
                ("bulk-2", 0),
                ("urgent", 9),
                ("normal-2", 5),
            ]
        ]

        first = await report.options(id="report:monday", unique_for=3600).enqueue("monday")
        again = await report.options(id="report:monday", unique_for=3600).enqueue("monday")

        handles = [await ping.enqueue() for _ in range(6)]

        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            for handle in [*steps, first, *handles]:
                await handle.result(timeout=10)
            tg.cancel_scope.cancel()

    print("order:", ", ".join(order))
    print(f"same handle: {first == again}, runs of report:monday: {len(reports)}")
    print(f"{len(pings)} pings, at most 3 in any half second: {most_in_window(pings, 0.45) <= 3}")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
