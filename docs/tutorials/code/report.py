"""Tutorial 6: ``python3 report.py start`` enqueues this month's report under a fixed id;
``python3 report.py wait`` waits for it, from any process, at any later time."""

from __future__ import annotations

import sys

import anyio
from tasks import REDIS_URL, monthly_report

from tasqueue_anyio import Client
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

REPORT_ID = "report-2026-11"  # a job id names one live job: enqueueing it twice runs it once


async def main(command: str) -> None:
    async with Client(RedisBroker(REDIS_URL), RedisResults(REDIS_URL)) as client:
        if command == "start":
            job = await client.enqueue(monthly_report.options(id=REPORT_ID), "2026-11")
            print("enqueued", job)
        else:
            print(await client.job(REPORT_ID).result(timeout=60))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
