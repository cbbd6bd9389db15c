"""Interop of the project's NATS client with the official ``nats-py`` (asyncio only).

Messages published by one are consumed by the other's JetStream pull consumer, KV entries
written by one are read by the other, and acks from our client remove messages as ``nats-py``
sees them. ``nats-py`` runs on asyncio only, so this module pins the AnyIO backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import pytest
from nats_server import NatsServer

from tasqueue_anyio._nats.client import Client
from tasqueue_anyio._nats.jetstream import (
    ConsumerConfig,
    JetStream,
    KeyDeletedError,
    StreamConfig,
)

nats = pytest.importorskip("nats", reason="nats-py (a test dependency) is not installed")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """nats-py is asyncio-only."""
    return "asyncio"


@pytest.fixture
async def ours(nats_server: NatsServer) -> AsyncIterator[JetStream]:
    async with Client(nats_server.url) as client:
        yield JetStream(client)


@pytest.fixture
async def theirs(nats_server: NatsServer) -> AsyncIterator[Any]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


async def work_queue(js: JetStream) -> tuple[str, str]:
    name = f"I{uuid4().hex[:10]}"
    await js.ensure_stream(StreamConfig(name=name, subjects=[f"{name}.>"], retention="workqueue"))
    await js.ensure_consumer(
        name, ConsumerConfig(durable_name="worker", ack_wait=5, filter_subject=f"{name}.q.>")
    )
    return name, "worker"


async def test_ours_publishes_nats_py_consumes(ours: JetStream, theirs: Any) -> None:
    stream, consumer = await work_queue(ours)
    ack = await ours.publish(f"{stream}.q.a", b"job-1", msg_id="m1", headers={"Trace": "t1"})
    assert (await ours.publish(f"{stream}.q.a", b"job-1", msg_id="m1")).duplicate
    their_js = theirs.jetstream()
    psub = await their_js.pull_subscribe(f"{stream}.q.>", durable=consumer, stream=stream)
    (msg,) = await psub.fetch(1, timeout=5)
    assert msg.data == b"job-1"
    assert msg.headers["Trace"] == "t1"
    assert msg.headers["Nats-Msg-Id"] == "m1"
    assert msg.metadata.sequence.stream == ack.seq
    await msg.ack_sync()
    assert (await ours.stream_info(stream)).messages == 0


async def test_nats_py_publishes_ours_consumes_and_acks(ours: JetStream, theirs: Any) -> None:
    stream, consumer = await work_queue(ours)
    their_js = theirs.jetstream()
    for index in range(3):
        await their_js.publish(f"{stream}.q.x", f"p{index}".encode(), headers={"N": str(index)})
    batch = await ours.fetch(stream, consumer, 3, expires=5)
    assert [msg.payload for msg in batch] == [b"p0", b"p1", b"p2"]
    assert [msg.headers["N"] if msg.headers else None for msg in batch] == ["0", "1", "2"]
    await batch[0].ack()
    await batch[1].ack_sync()
    await batch[2].term()
    await ours.client.flush()
    info = await their_js.stream_info(stream)
    assert info.state.messages == 0  # acked (and terminated) messages left the work queue
    consumer_info = await their_js.consumer_info(stream, consumer)
    assert consumer_info.num_ack_pending == 0
    assert consumer_info.num_pending == 0


async def test_kv_written_by_one_read_by_the_other(ours: JetStream, theirs: Any) -> None:
    bucket = f"kv{uuid4().hex[:10]}"
    kv = await ours.create_key_value(bucket)
    revision = await kv.put("job.1", b"from ours")

    their_kv = await theirs.jetstream().key_value(bucket)
    entry = await their_kv.get("job.1")
    assert (entry.value, entry.revision) == (b"from ours", revision)

    their_revision = await their_kv.put("job.2", b"from nats-py")
    mine = await kv.get("job.2")
    assert (mine.value, mine.revision) == (b"from nats-py", their_revision)
    await kv.update("job.2", b"updated by ours", their_revision)
    assert (await their_kv.get("job.2")).value == b"updated by ours"

    await their_kv.delete("job.1")
    with pytest.raises(KeyDeletedError):
        await kv.get("job.1")
    assert sorted(await kv.keys()) == sorted(await their_kv.keys()) == ["job.2"]

    # and a bucket created by nats-py is usable by ours
    other = f"kv{uuid4().hex[:10]}"
    created = await theirs.jetstream().create_key_value(bucket=other)
    await created.put("k", b"v")
    bound = await ours.key_value(other)
    assert (await bound.get("k")).value == b"v"
    assert (await ours.create_key_value(other)).bucket == other
