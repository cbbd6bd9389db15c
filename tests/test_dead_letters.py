"""Messages a worker cannot decode, on every backend: they are dead-lettered once (never
redelivered for a decode reason), with a reason that says what was wrong, and the job
they name, when its id is readable and it has state, ends ``failed`` with that reason
(so ``wait``, ``wait_group`` and ``wait_chain`` return).

A corrupted message is made from a real one by replacing a distinctive value in its
msgpack tree (found by value, not by position), and is put straight on the queue with
``broker.enqueue``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from broker_support import consuming, receive
from server_support import TIMEOUT, Counter, running

from tasqueue_anyio import Chain, Group, Job, JobNotFoundError, Server, Status
from tasqueue_anyio.abc import Broker, Envelope, JobRecord, Results

pytestmark = pytest.mark.anyio

#: A timeout no other field of a test message has: the corruptions look for it.
TIMEOUT_MARK = 1.25


def replace(data: bytes, old: Any, new: Any, *, first: bool = False) -> bytes:
    """``data`` with every value equal to ``old`` (of the same type) replaced by ``new``;
    with ``first``, only the first one (depth first: the meta's, not the job's)."""
    left = [1 if first else -1]

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if type(node) is type(old) and node == old and left[0] != 0:
            left[0] -= 1
            return new
        return node

    tree = msgpack.unpackb(data, raw=False)
    packed: bytes = msgpack.packb(walk(tree), use_bin_type=True)
    assert packed != data, f"{old!r} not found"
    return packed


#: corruption name -> (make the bad message from a good one, a word the reason contains)
CORRUPTIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "meta-timeout-nan": (lambda d: replace(d, TIMEOUT_MARK, math.nan, first=True), "timeout"),
    "timeout-nan": (lambda d: replace(d, TIMEOUT_MARK, math.nan), "timeout"),
    "timeout-inf": (lambda d: replace(d, TIMEOUT_MARK, math.inf), "timeout"),
    "timeout-negative": (lambda d: replace(d, TIMEOUT_MARK, -1.0), "timeout"),
    "retries-too-big": (lambda d: replace(d, 3, 2**63), "max_retries"),
    "unknown-status": (lambda d: replace(d, "queued", "exploded"), "status"),
    "truncated": (lambda d: d[:-3], "msgpack"),
}


async def _replace_message(broker: Broker, queue: str, corrupt: Callable[[bytes], bytes]) -> bytes:
    """Take the one message of ``queue`` off it and put ``corrupt(message)`` there instead."""
    async with consuming(broker, queue) as stream:
        delivery = await receive(stream)
        bad = corrupt(delivery.data)
        await delivery.ack()
    await broker.enqueue(Envelope(queue=queue, data=bad, id="corrupted"))
    return bad


async def test_out_of_range_field_is_dead_lettered_not_redelivered(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """Hole 4: a message with ``timeout = NaN`` decoded, the worker's cancel scope raised,
    the message was nacked and came back every second, and its job stayed ``processing``."""
    counter = Counter()
    good = Server()._new_message(Job("t", b"bad", id="nan-job", queue=queue_name, timeout=1.25))
    bad = replace(good[1], TIMEOUT_MARK, math.nan, first=True)  # the meta's timeout
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        await broker.enqueue(Envelope(queue=queue_name, data=bad, id="nan-job/0"))
        good_id = await server.enqueue(Job("t", b"good", queue=queue_name))
        async with running(server):
            # one processor, first in first out: the bad message was handled first
            assert (await server.wait(good_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
        dead = await server.get_dead_letters(queue_name)
        pending = await broker.get_pending(queue_name)
        scheduled = await broker.get_scheduled(queue_name)
        with pytest.raises(JobNotFoundError):  # it never started
            await results.get_job("nan-job")

    assert counter.payloads == [b"good"]
    assert [d.data for d in dead] == [bad]
    assert "timeout" in dead[0].reason
    assert pending == []
    assert scheduled == []  # not given back to come again


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
async def test_corrupted_message_fails_its_job(
    broker: Broker, results: Results, queue_name: str, kind: str
) -> None:
    """Hole 8: a dead-lettered message whose job id is readable ends that job ``failed``
    with the dead-letter reason, and ``wait`` returns."""
    corrupt, word = CORRUPTIONS[kind]
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        job_id = await server.enqueue(
            Job("t", b"x", queue=queue_name, timeout=TIMEOUT_MARK, max_retries=3)
        )
        bad = await _replace_message(broker, queue_name, corrupt)
        async with running(server):
            ended = await server.wait(job_id, timeout=TIMEOUT)
        dead = await server.get_dead_letters(queue_name)
        failed = await server.get_failed()

    assert counter.count == 0
    assert [d.data for d in dead] == [bad]
    reason = dead[0].reason
    assert word in reason
    assert not reason.rstrip().endswith(":")
    assert ended.status is Status.FAILED
    assert ended.meta.prev_error == f"DecodeError: {reason}"
    assert ended.job.task == "t"  # the stored record kept the job
    assert job_id in failed


async def test_corrupted_message_leaves_an_ended_job_alone(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        job = Job("t", b"x", queue=queue_name, timeout=TIMEOUT_MARK)
        good = server._new_message(job)[1]
        async with running(server):
            await server.enqueue(job)
            assert (await server.wait(job.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            bad = replace(good, TIMEOUT_MARK, math.nan, first=True)
            await broker.enqueue(Envelope(queue=queue_name, data=bad, id="again"))
            marker = await server.enqueue(Job("t", b"marker", queue=queue_name))
            await server.wait(marker, timeout=TIMEOUT)
        dead = await server.get_dead_letters(queue_name)
        assert (await server.get_job(job.id)).status is Status.SUCCESSFUL
    assert [d.data for d in dead] == [bad]
    assert counter.payloads == [b"x", b"marker"]


async def test_stored_record_unreadable_too(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A job stuck ``processing`` by hole 4 (its stored record carries the NaN too): its
    message is dead-lettered and the job ends ``failed`` with a record that decodes."""
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        job = Job("t", b"x", queue=queue_name, timeout=TIMEOUT_MARK, id="stuck-1")
        bad = replace(server._new_message(job)[1], TIMEOUT_MARK, math.nan, first=True)
        await results.set_jobs({job.id: JobRecord(status="processing", data=bad, run="0.1")})
        await broker.enqueue(Envelope(queue=queue_name, data=bad, id="stuck-1/0"))
        marker = await server.enqueue(Job("t", b"marker", queue=queue_name))
        async with running(server):
            # (the stored record does not decode until the worker replaced it: wait once
            # the message was handled, one processor, first in first out)
            await server.wait(marker, timeout=TIMEOUT)
            ended = await server.wait(job.id, timeout=TIMEOUT)
        dead = await server.get_dead_letters(queue_name)
    assert counter.payloads == [b"marker"]
    assert ended.status is Status.FAILED
    assert ended.meta.prev_error == f"DecodeError: {dead[0].reason}"
    assert "timeout" in dead[0].reason
    assert ended.job.task == "t"
    assert ended.meta.queue == queue_name


async def test_corrupted_member_fails_its_group(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        bad_member = Job("t", b"bad", queue=queue_name, timeout=TIMEOUT_MARK)
        group = Group([bad_member, Job("t", b"good", queue=queue_name)])
        await server.enqueue_group(group)
        async with consuming(broker, queue_name) as stream:
            first, second = await receive(stream), await receive(stream)
            messages = [first.data, second.data]
            await first.ack()
            await second.ack()
        bad = replace(messages[0], TIMEOUT_MARK, math.nan, first=True)
        await broker.enqueue(Envelope(queue=queue_name, data=bad, id="bad"))
        await broker.enqueue(Envelope(queue=queue_name, data=messages[1], id="good"))
        async with running(server):
            ended = await server.wait_group(group.id, timeout=TIMEOUT)
            await server.wait(group.jobs[1].id, timeout=TIMEOUT)
    assert ended.status is Status.FAILED
    assert ended.jobs[bad_member.id] is Status.FAILED
    assert ended.error is not None
    assert bad_member.id in ended.error
    assert "timeout" in ended.error
    assert counter.payloads == [b"good"]


async def test_corrupted_link_fails_its_chain(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        chain = Chain(
            [
                Job("t", b"1", queue=queue_name, timeout=TIMEOUT_MARK),
                Job("t", b"2", queue=queue_name),
            ]
        )
        await server.enqueue_chain(chain)
        await _replace_message(
            broker, queue_name, lambda d: replace(d, TIMEOUT_MARK, math.nan, first=True)
        )
        async with running(server):
            ended = await server.wait_chain(chain.id, timeout=TIMEOUT)
    assert ended.status is Status.FAILED
    assert ended.jobs[chain.jobs[0].id] is Status.FAILED
    assert ended.jobs[chain.jobs[1].id] is Status.CANCELLED
    assert counter.count == 0


async def test_message_without_readable_id_is_only_dead_lettered(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """Nothing to fail: the reason still says what was wrong (the msgpack error's type
    when its text is empty)."""
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, concurrency=1, raw=True)
        await broker.enqueue(Envelope(queue=queue_name, data=b"\xc1", id="garbage"))
        marker = await server.enqueue(Job("t", b"marker", queue=queue_name))
        async with running(server):
            await server.wait(marker, timeout=TIMEOUT)
        dead = await server.get_dead_letters(queue_name)
    assert [d.data for d in dead] == [b"\xc1"]
    assert dead[0].reason == "not a msgpack message: FormatError"
    assert await server.get_failed() == []
