"""Every path that ends a member of a group or chain reaches the parent (issue 11, hole 5).

A member's end is recorded in its own job record first, then passed on to its parent. A
crash or a caller's timeout between the two must not leave the parent ``processing`` for
ever: a redelivered member whose record is already final passes its end on (whatever it
is), :meth:`Server.cancel` finishes what follows its first write under a shield, and
``wait_group``/``wait_chain`` repair on their periodic re-read a member end the parent
missed. Against every broker/results backend, on asyncio and Trio.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from server_support import TIMEOUT, Counter, running

from tasqueue_anyio import Chain, Group, Job, JobMessage, Server, Status
from tasqueue_anyio import _client as server_module
from tasqueue_anyio.abc import Broker, ParentRecord, Results

pytestmark = pytest.mark.anyio


def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the waits' periodic re-read (and repair) out of a test of another path."""
    monkeypatch.setattr(server_module, "RECHECK_FIRST", 3600.0, raising=False)


def quick_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the waits re-read (and repair) every few milliseconds."""
    monkeypatch.setattr(server_module, "RECHECK_FIRST", 0.02, raising=False)
    monkeypatch.setattr(server_module, "RECHECK_MAX", 0.05, raising=False)


async def record_end(server: Server, results: Results, job_id: str, end: Status) -> None:
    """Record ``job_id``'s end in its own record only, as a worker (or a canceller) that
    died before telling the parent (and before acking) leaves it."""
    if end is Status.CANCELLED:
        await results.request_cancel(job_id)  # a queued job: cancelled at once
        return
    msg = await server.get_job(job_id)
    failed = JobMessage(
        meta=attrs.evolve(msg.meta, status=end, prev_error="ValueError: boom"), job=msg.job
    )
    record = await results.get_job(job_id)
    await results.set_jobs(
        {job_id: attrs.evolve(record, status=end.value, data=server._encode(failed))}
    )


@pytest.mark.parametrize("end", [Status.FAILED, Status.CANCELLED])
async def test_redelivered_member_that_ended_ends_its_group(
    broker: Broker,
    results: Results,
    queue_name: str,
    end: Status,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_recheck(monkeypatch)
    handler = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("count", handler, queue=queue_name, concurrency=1, raw=True)
        jobs = [Job("count", queue=queue_name) for _ in range(2)]
        group = Group(jobs)
        await server.enqueue_group(group)
        ended = jobs[0].id
        # its end is recorded; its message is still on the queue, as after a crash
        # between the record and the ack: the worker gets it again
        await record_end(server, results, ended, end)
        async with running(server):
            state = await server.wait_group(group.id, timeout=TIMEOUT)

    assert state.status is end
    assert state.jobs[ended] is end
    assert state.error is not None
    assert ended in state.error
    if end is Status.FAILED:
        assert "boom" in state.error  # the member's own error
    assert handler.count <= 1  # the member that had ended did not run again


@pytest.mark.parametrize("end", [Status.FAILED, Status.CANCELLED])
async def test_redelivered_link_that_ended_ends_its_chain(
    broker: Broker,
    results: Results,
    queue_name: str,
    end: Status,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    no_recheck(monkeypatch)
    handler = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("count", handler, queue=queue_name, concurrency=1, raw=True)
        jobs = [Job("count", queue=queue_name) for _ in range(2)]
        chain = Chain(jobs)
        await server.enqueue_chain(chain)
        await record_end(server, results, jobs[0].id, end)
        async with running(server):
            state = await server.wait_chain(chain.id, timeout=TIMEOUT)

    assert state.status is end
    assert state.jobs == {jobs[0].id: end, jobs[1].id: Status.CANCELLED}
    assert handler.count == 0


@pytest.mark.parametrize("kind", ["group", "chain"])
async def test_cancel_of_a_member_interrupted_after_its_write_still_ends_the_parent(
    broker: Broker,
    results: Results,
    queue_name: str,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller of ``Server.cancel`` times out right after the cancel was written: the
    parent is still told, before ``cancel`` returns (no worker runs, nothing repairs)."""
    no_recheck(monkeypatch)
    async with Server(broker=broker, results=results) as server:
        jobs = [Job("t", queue=queue_name) for _ in range(2)]
        if kind == "group":
            parent_id: str = await server.enqueue_group(Group(jobs))
        else:
            parent_id = await server.enqueue_chain(Chain(jobs))
        victim = jobs[0].id

        request_cancel = results.request_cancel
        set_member_status = results.set_member_status
        with anyio.CancelScope() as caller:

            async def cancel_then_time_out(job_id: str) -> object:
                record = await request_cancel(job_id)
                caller.cancel()  # the caller's timeout fires right after the write
                return record

            async def slow_set_member_status(parent: str, job_id: str, status: str) -> object:
                await anyio.lowlevel.checkpoint()  # as any round trip would
                return await set_member_status(parent, job_id, status)

            monkeypatch.setattr(results, "request_cancel", cancel_then_time_out)
            monkeypatch.setattr(results, "set_member_status", slow_set_member_status)
            await server.cancel(victim)
        monkeypatch.undo()
        no_recheck(monkeypatch)

        assert (await server.get_job(victim)).status is Status.CANCELLED
        if kind == "group":
            state = await server.get_group(parent_id)
        else:
            state = await server.get_chain(parent_id)  # type: ignore[assignment]
        assert state.status is Status.CANCELLED
        assert state.jobs[victim] is Status.CANCELLED
        with anyio.fail_after(TIMEOUT):
            if kind == "group":
                assert (await server.wait_group(parent_id)).status is Status.CANCELLED
            else:
                assert (await server.wait_chain(parent_id)).status is Status.CANCELLED


@pytest.mark.parametrize("left", ["member", "parent"])
async def test_wait_group_repairs_a_member_end_its_group_missed(
    broker: Broker,
    results: Results,
    queue_name: str,
    left: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process died after writing a member's end (``member``: before telling the group;
    ``parent``: after recording the member in the group, before ending the group), and no
    worker ever sees the member's message again: the waiter's re-read repairs the group."""
    quick_recheck(monkeypatch)
    async with Server(broker=broker, results=results) as server:
        jobs = [Job("t", queue=queue_name) for _ in range(3)]
        group_id = await server.enqueue_group(Group(jobs))
        victim = jobs[1].id
        await results.request_cancel(victim)
        if left == "parent":
            await results.set_member_status(group_id, victim, Status.CANCELLED.value)
        assert (await server.get_group(group_id)).status is not Status.CANCELLED

        state = await server.wait_group(group_id, timeout=TIMEOUT)

    assert state.status is Status.CANCELLED
    assert state.jobs[victim] is Status.CANCELLED
    assert state.error is not None
    assert victim in state.error


async def test_wait_chain_repairs_a_failed_link_its_chain_missed(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick_recheck(monkeypatch)
    async with Server(broker=broker, results=results) as server:
        jobs = [Job("t", queue=queue_name) for _ in range(3)]
        chain_id = await server.enqueue_chain(Chain(jobs))
        await record_end(server, results, jobs[0].id, Status.FAILED)

        state = await server.wait_chain(chain_id, timeout=TIMEOUT)

    assert state.status is Status.FAILED
    assert state.error is not None
    assert "boom" in state.error
    assert state.jobs == {
        jobs[0].id: Status.FAILED,
        jobs[1].id: Status.CANCELLED,
        jobs[2].id: Status.CANCELLED,
    }


async def test_cancel_of_a_group_interrupted_after_its_write_still_stops_its_members(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller of ``Server.cancel(group_id)`` times out right after the group was
    recorded ``cancelled``: its members are still cancelled and its end announced."""
    no_recheck(monkeypatch)
    async with Server(broker=broker, results=results) as server:
        jobs = [Job("t", queue=queue_name) for _ in range(2)]
        group_id = await server.enqueue_group(Group(jobs))

        set_parent_status = results.set_parent_status
        get_parent = results.get_parent
        with anyio.CancelScope() as caller:

            async def set_then_time_out(*args: Any, **kwargs: Any) -> bool:
                written = await set_parent_status(*args, **kwargs)
                caller.cancel()  # the caller's timeout fires right after the write
                return written

            async def slow_get_parent(parent: str) -> ParentRecord:
                await anyio.lowlevel.checkpoint()  # as any round trip would
                return await get_parent(parent)

            monkeypatch.setattr(results, "set_parent_status", set_then_time_out)
            monkeypatch.setattr(results, "get_parent", slow_get_parent)
            await server.cancel(group_id)
        monkeypatch.undo()
        no_recheck(monkeypatch)

        state = await server.get_group(group_id)
        assert state.status is Status.CANCELLED
        assert state.jobs == {job.id: Status.CANCELLED for job in jobs}
        for job in jobs:
            assert (await server.get_job(job.id)).status is Status.CANCELLED
