"""Contract of :meth:`Results.end_job`: the end of a run recorded and its delivery acked,
its announcement published only if the record was written. Run on the broker and
results store of each backend (the Redis pair shares a server, so there the two are one
script)."""

from __future__ import annotations

from uuid import uuid4

import anyio
import pytest
from broker_support import consuming, envelope, receive
from server_support import TIMEOUT

from tasqueue_anyio.abc import Broker, JobRecord, Results, run_token

pytestmark = pytest.mark.anyio


class Heard:
    """What a subscriber of one channel received, in order."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.changed = anyio.Event()

    def __call__(self, data: bytes) -> None:
        self.messages.append(data)
        self.changed.set()

    async def wait_for(self, count: int) -> list[bytes]:
        with anyio.fail_after(TIMEOUT):
            while len(self.messages) < count:
                self.changed = anyio.Event()
                await self.changed.wait()
        return self.messages


async def test_end_job_records_acks_and_announces(
    broker: Broker, results: Results, queue_name: str
) -> None:
    job_id, channel = uuid4().hex, f"ch-{uuid4().hex[:8]}"
    heard = Heard()
    assert (
        await results.start_job(job_id, JobRecord(status="processing", data=b"m", run="0.1"))
        is None
    )
    await broker.enqueue(envelope(queue_name, b"payload"))
    async with broker.subscribe(channel, heard), consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        written = await results.end_job(
            job_id,
            JobRecord(status="successful", data=b"done", run="0.1"),
            expect=("processing",),
            run="0.1",
            delivery=delivery,
            announce=[(channel, b"ended")],
        )
        assert written
        assert await heard.wait_for(1) == [b"ended"]
        await delivery.nack()  # settled already: does nothing
    assert await broker.get_pending(queue_name) == []
    record = await results.get_job(job_id)
    assert (record.status, record.data) == ("successful", b"done")
    assert job_id in await results.get_success()


@pytest.mark.parametrize("same_attempt", [False, True], ids=["next-attempt", "same-attempt"])
async def test_end_job_not_written_still_acks_and_stays_quiet(
    broker: Broker, results: Results, queue_name: str, same_attempt: bool
) -> None:
    job_id, channel = uuid4().hex, f"ch-{uuid4().hex[:8]}"
    heard = Heard()
    # another run owns the job now (a redelivery: the next attempt, or the same attempt
    # handed out again after a server crash): this run's end is not recorded
    mine, owner = (run_token(0, 1), run_token(0, 1)) if same_attempt else ("0.1", "0.2")
    if same_attempt:
        assert (
            await results.start_job(job_id, JobRecord(status="processing", data=b"m", run=mine))
            is None
        )
    assert (
        await results.start_job(job_id, JobRecord(status="processing", data=b"m", run=owner))
        is None
    )
    await broker.enqueue(envelope(queue_name, b"payload"))
    async with broker.subscribe(channel, heard), consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        written = await results.end_job(
            job_id,
            JobRecord(status="successful", data=b"done", run=mine),
            expect=("processing",),
            run=mine,
            delivery=delivery,
            announce=[(channel, b"ended")],
        )
        assert not written
        await broker.publish(channel, b"sentinel")
        assert await heard.wait_for(1) == [b"sentinel"]
        await delivery.nack()  # settled already: does nothing
    assert await broker.get_pending(queue_name) == []
    record = await results.get_job(job_id)
    assert (record.status, record.run) == ("processing", owner)
    assert job_id not in await results.get_success()


async def test_end_job_ack_after_settle_is_a_no_op(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A delivery settled before (nacked) is not acked by ``end_job``: the record is
    written, the message stays in its queue."""
    job_id = uuid4().hex
    assert (
        await results.start_job(job_id, JobRecord(status="processing", data=b"m", run="0.1"))
        is None
    )
    await broker.enqueue(envelope(queue_name, b"payload"))
    async with consuming(broker, queue_name) as stream:
        delivery = await receive(stream)
        await delivery.nack(delay=60)
        assert await results.end_job(
            job_id,
            JobRecord(status="failed", data=b"x", run="0.1"),
            expect=("processing",),
            run="0.1",
            delivery=delivery,
        )
        assert await broker.get_pending(queue_name) == []  # scheduled again, in 60 s
        assert len(await broker.get_scheduled(queue_name)) == 1
    assert (await results.get_job(job_id)).status == "failed"
    assert job_id in await results.get_failed()
