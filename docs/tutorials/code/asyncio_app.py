"""Tutorial 2: the workers inside an asyncio program (Python 3.11's ``asyncio.TaskGroup``).

Run it with ``python3 asyncio_app.py``.
"""

from __future__ import annotations

import asyncio

from tasqueue_anyio import Server

server = Server()


@server.task(concurrency=2)
async def fetch(url: str) -> int:
    await asyncio.sleep(0.05)  # an asyncio handler may use asyncio directly
    return len(url)


async def main() -> None:
    async with server, asyncio.TaskGroup() as tg:
        workers = tg.create_task(server.run())
        jobs = [await fetch.enqueue(url) for url in ("https://a.example", "https://bb.example")]
        for job in jobs:
            print("fetched:", await job.result(timeout=10))
        workers.cancel()  # stop the workers: the task group then ends


asyncio.run(main())
