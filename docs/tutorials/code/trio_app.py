"""Tutorial 2: the workers inside a Trio program, beside the program's own tasks.

Run it with ``python3 trio_app.py``.
"""

from __future__ import annotations

import trio

from tasqueue_anyio import Server

server = Server()


@server.task(concurrency=2)
async def fetch(url: str) -> int:
    await trio.sleep(0.05)  # a Trio handler may use Trio directly: it runs on Trio here
    return len(url)


async def main() -> None:
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.run)  # returns once the workers consume their queues
        jobs = [await fetch.enqueue(url) for url in ("https://a.example", "https://bb.example")]
        for job in jobs:
            print("fetched:", await job.result(timeout=10))
        nursery.cancel_scope.cancel()  # stop the workers with the rest of the program


trio.run(main)
