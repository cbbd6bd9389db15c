"""Tutorial 7: a producer on NATS JetStream; ``tasqueue worker nats_tasks:server`` runs the
jobs. Run it with ``python3 nats_producer.py`` (or ``... trio``)."""

from __future__ import annotations

import sys

import anyio
from nats_tasks import NATS_URL, thumbnail

from tasqueue_anyio import Client
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults


async def main() -> None:
    async with Client(NatsBroker(NATS_URL), NatsResults(NATS_URL)) as client:
        jobs = [await client.enqueue(thumbnail, f"photo-{n}.png", 200) for n in (1, 2, 3)]
        for job in jobs:
            print(await job.result(timeout=30))
        later = await client.enqueue(thumbnail.options(delay=1), "later.png", 100)
        print(await later.result(timeout=30), "(after its delay)")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
