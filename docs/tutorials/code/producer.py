"""Tutorial 6: a producer (a web app, a script) enqueues jobs on Redis and waits for their
results; ``tasqueue worker tasks:server`` runs them. Run it with ``python3 producer.py``
(or ``... trio``)."""

from __future__ import annotations

import sys

import anyio
from tasks import REDIS_URL, thumbnail

from tasqueue_anyio import Client
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults


async def main() -> None:
    async with Client(RedisBroker(REDIS_URL), RedisResults(REDIS_URL)) as client:
        jobs = [await client.enqueue(thumbnail, f"photo-{n}.png", 200) for n in (1, 2, 3)]
        for job in jobs:
            print(await job.result(timeout=30))


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
