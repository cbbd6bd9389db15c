"""Tutorial 7: tutorial 6's tasks module on NATS JetStream instead of Redis. Workers run it
with ``tasqueue worker nats_tasks:server``."""

from __future__ import annotations

import os

import anyio

from tasqueue_anyio import Server
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

NATS_URL = os.environ.get("NATS_URL", "nats://localhost:4222")

server = Server(
    # ack_wait: how long a job held by a worker that died waits before it is delivered
    # again (live workers renew it), as the Redis broker's lease
    broker=NatsBroker(NATS_URL, ack_wait=30),
    results=NatsResults(NATS_URL),
)


@server.task(queue="images", concurrency=8, max_retries=3, timeout=60)
async def thumbnail(image: str, size: int) -> str:
    await anyio.sleep(0.01)  # stands for the real work
    return f"{image.removesuffix('.png')}-{size}.png"
