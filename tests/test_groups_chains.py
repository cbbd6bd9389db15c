"""Groups, chains, nested follow-up jobs and ETAs, against every broker/results backend.

Everything is synchronised on events, ``wait``/``wait_group``/``wait_chain`` and
``anyio.fail_after``; nothing sleeps to wait for something to happen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import anyio
import attrs
import pytest
from server_support import TIMEOUT, Counter, noop, running, wait_event

from tasqueue_anyio import (
    Chain,
    Group,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    NotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Envelope, Results

pytestmark = pytest.mark.anyio

#: Slack allowed between the clock a broker decides "due" with and the server's clock.
CLOCK_MARGIN = 0.05

#: A group's or chain's timeout in the deadline tests (seconds).
DEADLINE = 0.3


class Gate:
    """A handler that records, per job id, its runs and whether its ``finally`` ran, and
    blocks until :attr:`release` is set (or until it is cancelled)."""

    def __init__(self, *, expect: int = 1) -> None:
        self.release = anyio.Event()
        #: set once ``expect`` handler runs have started
        self.all_started = anyio.Event()
        self.expect = expect
        self.runs: dict[str, int] = {}
        self.stopped: list[str] = []
        self._started: dict[str, anyio.Event] = {}

    def started(self, job_id: str) -> anyio.Event:
        """The event set when the handler of ``job_id`` starts."""
        return self._started.setdefault(job_id, anyio.Event())

    def count(self, job_id: str) -> int:
        return self.runs.get(job_id, 0)

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.runs[ctx.job_id] = self.count(ctx.job_id) + 1
        self.started(ctx.job_id).set()
        if sum(self.runs.values()) >= self.expect:
            self.all_started.set()
        try:
            await self.release.wait()
        finally:
            self.stopped.append(ctx.job_id)


class PerId:
    """A handler counting runs per job id, with an event per job id."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self._done: dict[str, anyio.Event] = {}

    def ran(self, job_id: str) -> anyio.Event:
        return self._done.setdefault(job_id, anyio.Event())

    def count(self, job_id: str) -> int:
        return self.runs.get(job_id, 0)

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.runs[ctx.job_id] = self.count(ctx.job_id) + 1
        self.ran(ctx.job_id).set()


async def drain(server: Server, queue: str) -> None:
    """Run a ``sentinel`` job on ``queue`` and wait for it to end: on a queue with one
    processor, every message enqueued before it has been handled by then."""
    sentinel = await server.enqueue(Job("sentinel", queue=queue))
    assert (await server.wait(sentinel, timeout=TIMEOUT)).status is Status.SUCCESSFUL


async def assert_no_job(server: Server, job_id: str) -> None:
    """No state was ever recorded for ``job_id`` (it was never enqueued)."""
    with pytest.raises(JobNotFoundError):
        await server.get_job(job_id)


def unknown_id() -> str:
    return f"unknown-{uuid4().hex}"


async def square(payload: bytes, ctx: JobContext) -> None:
    n = int(payload)
    await ctx.save(str(n * n).encode())


# -- groups ---------------------------------------------------------------------------------


async def test_group_all_successful(broker: Broker, results: Results, queue_name: str) -> None:
    seen_groups: list[str | None] = []

    async def handler(payload: bytes, ctx: JobContext) -> None:
        seen_groups.append(ctx.meta.group_id)
        await square(payload, ctx)

    async with Server(broker=broker, results=results) as server:
        server.register_task("square", handler, queue=queue_name, raw=True)
        jobs = [Job("square", str(n).encode(), queue=queue_name) for n in (3, 1, 4, 2)]
        group = Group(jobs)
        ids = [job.id for job in jobs]

        assert await server.enqueue_group(group) == group.id
        queued = await server.get_group(group.id)
        assert queued.status is Status.QUEUED
        assert list(queued.jobs.items()) == [(i, Status.QUEUED) for i in ids]
        assert queued.deadline is None
        assert queued.error is None

        async with running(server):
            done = await server.wait_group(group.id, timeout=TIMEOUT)

        assert done.id == group.id
        assert done.status is Status.SUCCESSFUL
        assert done.error is None
        # every member, in group order
        assert list(done.jobs.items()) == [(i, Status.SUCCESSFUL) for i in ids]
        assert done.created_at == queued.created_at
        assert [await server.get_result(i) for i in ids] == [b"9", b"1", b"16", b"4"]
        for job_id in ids:
            msg = await server.get_job(job_id)
            assert msg.status is Status.SUCCESSFUL
            assert msg.meta.group_id == group.id
        # get_group agrees with what wait_group returned
        assert await server.get_group(group.id) == done

    assert seen_groups == [group.id] * 4


async def test_group_fails_as_soon_as_a_member_fails(
    broker: Broker, results: Results, queue_name: str
) -> None:
    gate = Gate()
    blocked = Job("block", queue=queue_name)
    failing = Job("fail", queue=queue_name)

    async def fail(payload: bytes, ctx: JobContext) -> None:
        # fail only once the other member is surely running
        await gate.started(blocked.id).wait()
        raise ValueError("boom")

    async with Server(broker=broker, results=results) as server:
        server.register_task("block", gate, queue=queue_name, concurrency=2, raw=True)
        server.register_task("fail", fail, queue=queue_name, raw=True)
        group = Group([blocked, failing])
        await server.enqueue_group(group)
        async with running(server):
            state = await server.wait_group(group.id, timeout=TIMEOUT)
            # ended while the other member is still blocked in its handler
            assert not gate.stopped
            assert gate.count(blocked.id) == 1
            assert (await server.get_job(blocked.id)).status is Status.PROCESSING

            assert state.status is Status.FAILED
            assert state.jobs == {blocked.id: Status.PROCESSING, failing.id: Status.FAILED}
            assert state.error is not None
            assert failing.id in state.error
            assert "ValueError: boom" in state.error

            # the other member still runs to its end; the group stays failed
            gate.release.set()
            assert (await server.wait(blocked.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            # wait() returns once the job's own state is final; the worker records the
            # group's member status right after (a step later, on another key)
            with anyio.fail_after(TIMEOUT):
                while (later := await server.get_group(group.id)).jobs[  # noqa: ASYNC110
                    blocked.id
                ] is not Status.SUCCESSFUL:
                    await anyio.sleep(0.01)

    assert later.status is Status.FAILED
    assert later.error == state.error
    assert later.jobs == {blocked.id: Status.SUCCESSFUL, failing.id: Status.FAILED}


async def test_get_group_is_kept_up_to_date(
    broker: Broker, results: Results, queue_name: str
) -> None:
    gate = Gate()
    async with Server(broker=broker, results=results) as server:
        server.register_task("block", gate, queue=queue_name, concurrency=2, raw=True)
        server.register_task("quick", noop, queue=queue_name, raw=True)
        slow = Job("block", queue=queue_name)
        quick = Job("quick", queue=queue_name)
        group = Group([slow, quick])
        await server.enqueue_group(group)
        assert (await server.get_group(group.id)).status is Status.QUEUED

        async with running(server):
            await wait_event(gate.started(slow.id))
            state = await server.get_group(group.id)
            assert state.status is Status.PROCESSING
            assert state.jobs[slow.id] is Status.PROCESSING

            assert (await server.wait(quick.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            # the group's record follows a member's own end a step later
            with anyio.fail_after(TIMEOUT):
                while (state := await server.get_group(group.id)).jobs[quick.id] is not (  # noqa: ASYNC110
                    Status.SUCCESSFUL
                ):
                    await anyio.sleep(0.01)
            assert state.status is Status.PROCESSING
            assert state.jobs == {slow.id: Status.PROCESSING, quick.id: Status.SUCCESSFUL}

            gate.release.set()
            done = await server.wait_group(group.id, timeout=TIMEOUT)

    assert done.status is Status.SUCCESSFUL
    assert done.jobs == {slow.id: Status.SUCCESSFUL, quick.id: Status.SUCCESSFUL}


async def test_enqueue_group_is_one_broker_call(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[Envelope]] = []
    single: list[Envelope] = []
    enqueue_many = broker.enqueue_many

    async def counting_enqueue_many(messages: Sequence[Envelope]) -> None:
        batches.append(list(messages))
        await enqueue_many(messages)

    async def counting_enqueue(message: Envelope) -> None:
        single.append(message)
        await enqueue_many([message])

    async with Server(broker=broker, results=results) as server:
        server.register_task("square", square, queue=queue_name, raw=True)
        jobs = [Job("square", str(n).encode(), queue=queue_name) for n in range(5)]
        group = Group(jobs)
        monkeypatch.setattr(broker, "enqueue_many", counting_enqueue_many)
        monkeypatch.setattr(broker, "enqueue", counting_enqueue)
        await server.enqueue_group(group)
        monkeypatch.undo()

        assert single == []
        assert len(batches) == 1
        assert [env.queue for env in batches[0]] == [queue_name] * 5
        assert [m.id for m in await server.get_pending(queue_name)] == [j.id for j in jobs]
        async with running(server):
            done = await server.wait_group(group.id, timeout=TIMEOUT)
    assert done.status is Status.SUCCESSFUL


@pytest.mark.parametrize("timeout", [0, -1, True, "5", math.nan])
async def test_group_and_chain_refuse_a_bad_timeout(timeout: Any) -> None:
    jobs = [Job("t"), Job("t")]
    with pytest.raises(InvalidInputError, match="timeout"):
        Group(jobs, timeout=timeout)
    with pytest.raises(InvalidInputError, match="timeout"):
        Chain(jobs, timeout=timeout)


async def test_group_validation() -> None:
    with pytest.raises(InvalidInputError, match="at least one"):
        Group([])
    with pytest.raises(InvalidInputError, match="share an id"):
        Group([Job("t", id="same"), Job("t", id="same")])
    with pytest.raises(InvalidInputError, match="cron"):
        Group([Job("t"), Job("t", schedule="* * * * *")])
    with pytest.raises(InvalidInputError):
        Group([Job("t"), "not a job"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        Group([Job("t")], id="bad id with spaces")
    # a valid one keeps its jobs in order
    jobs = [Job("t"), Job("t")]
    assert Group(jobs, timeout=1.5).jobs == tuple(jobs)

    async with Server() as server:
        with pytest.raises(InvalidInputError):
            await server.enqueue_group(jobs)  # type: ignore[arg-type]


async def test_chain_validation() -> None:
    with pytest.raises(InvalidInputError, match="at least 2"):
        Chain([Job("t")])
    with pytest.raises(InvalidInputError, match="share an id"):
        Chain([Job("t", id="same"), Job("t", id="same")])
    with pytest.raises(InvalidInputError, match="cron"):
        Chain([Job("t"), Job("t", schedule="* * * * *")])
    async with Server() as server:
        with pytest.raises(InvalidInputError):
            await server.enqueue_chain([Job("t"), Job("t")])  # type: ignore[arg-type]


async def test_cancel_group(broker: Broker, results: Results, queue_name: str) -> None:
    gate = Gate(expect=2)
    async with Server(broker=broker, results=results) as server:
        server.register_task("block", gate, queue=queue_name, concurrency=2, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        jobs = [Job("block", queue=queue_name, max_retries=2) for _ in range(3)]
        group = Group(jobs)
        await server.enqueue_group(group)
        async with running(server):
            await wait_event(gate.all_started)
            running_ids = sorted(gate.runs)
            (queued_id,) = [j.id for j in jobs if j.id not in gate.runs]

            assert await server.cancel(group.id) is Status.CANCELLED
            # the queued member is cancelled at once, and never starts
            assert (await server.wait(queued_id, timeout=TIMEOUT)).status is Status.CANCELLED
            for job_id in running_ids:
                done = await server.wait(job_id, timeout=TIMEOUT)
                assert done.status is Status.CANCELLED
                assert done.meta.retried == 0  # a cancel is not retried
            state = await server.wait_group(group.id, timeout=TIMEOUT)
            await drain(server, queue_name)

        assert gate.count(queued_id) == 0
        assert sorted(gate.stopped) == running_ids  # their finally blocks ran
        assert state.status is Status.CANCELLED
        assert state.jobs == {j.id: Status.CANCELLED for j in jobs}
        assert state.error is not None
        assert "cancel" in state.error
        # cancelling again changes nothing
        assert await server.cancel(group.id) is Status.CANCELLED
        assert await server.get_group(group.id) == state


async def test_group_deadline(broker: Broker, results: Results, queue_name: str) -> None:
    gate = Gate()  # never released: members block until stopped
    async with Server(broker=broker, results=results) as server:
        server.register_task("block", gate, queue=queue_name, concurrency=1, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        jobs = [Job("block", queue=queue_name, max_retries=3) for _ in range(2)]
        group = Group(jobs, timeout=DEADLINE)
        before = server.clock()
        await server.enqueue_group(group)
        async with running(server):
            await wait_event(gate.all_started)
            (running_id,) = gate.runs
            (queued_id,) = [j.id for j in jobs if j.id != running_id]

            state = await server.wait_group(group.id, timeout=TIMEOUT)
            assert server.clock() >= before + DEADLINE - CLOCK_MARGIN

            stopped = await server.wait(running_id, timeout=TIMEOUT)
            never_started = await server.wait(queued_id, timeout=TIMEOUT)
            await drain(server, queue_name)
            final = await server.get_group(group.id)

    assert state.status is Status.FAILED
    assert state.error is not None
    assert "deadline" in state.error or "timeout" in state.error.lower()
    assert state.deadline is not None
    assert state.deadline == pytest.approx(state.created_at + DEADLINE)

    # the running member was stopped at the deadline, and not retried past it
    assert gate.stopped == [running_id]
    assert stopped.status is Status.FAILED
    assert stopped.meta.retried == 0
    assert stopped.meta.prev_error is not None
    assert stopped.meta.prev_error.startswith("JobTimeoutError")

    # the member still queued at the deadline never started
    assert gate.count(queued_id) == 0
    assert never_started.status is Status.CANCELLED

    assert final.status is Status.FAILED
    assert final.jobs == {running_id: Status.FAILED, queued_id: Status.CANCELLED}


async def test_group_deadline_passes_with_no_worker(
    broker: Broker, results: Results, queue_name: str
) -> None:
    handler = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("count", handler, queue=queue_name, raw=True)
        jobs = [Job("count", queue=queue_name) for _ in range(2)]
        group = Group(jobs, timeout=DEADLINE)
        await server.enqueue_group(group)
        # no worker runs: the waiter itself notices the deadline
        state = await server.wait_group(group.id, timeout=TIMEOUT)
        assert state.status is Status.FAILED
        assert state.error is not None
        assert "deadline" in state.error

        # a worker started later never runs its members
        async with running(server):
            for job in jobs:
                assert (await server.wait(job.id, timeout=TIMEOUT)).status is Status.CANCELLED
        assert handler.count == 0
        assert (await server.get_group(group.id)).status is Status.FAILED


# -- chains ---------------------------------------------------------------------------------


async def test_chain_passes_results(broker: Broker, results: Results, queue_name: str) -> None:
    received: list[tuple[str, bytes | None, str | None]] = []
    middle_started = anyio.Event()
    release_middle = anyio.Event()
    links = [Job("link", name, queue=queue_name) for name in (b"a", b"b", b"c")]

    async def link(payload: bytes, ctx: JobContext) -> None:
        received.append((ctx.job_id, ctx.meta.prev_job_result, ctx.meta.chain_id))
        if ctx.job_id == links[1].id:
            middle_started.set()
            await release_middle.wait()
        await ctx.save((ctx.meta.prev_job_result or b"") + payload)

    async with Server(broker=broker, results=results) as server:
        server.register_task("link", link, queue=queue_name, raw=True)
        chain = Chain(links)
        ids = [j.id for j in links]
        assert await server.enqueue_chain(chain) == chain.id

        queued = await server.get_chain(chain.id)
        assert queued.status is Status.QUEUED
        assert queued.current_job == ids[0]
        assert queued.prev_jobs == []
        assert list(queued.jobs.items()) == [(i, Status.QUEUED) for i in ids]
        # only the first link is enqueued; the others exist once they are reached
        assert [m.id for m in await server.get_pending(queue_name)] == [ids[0]]
        await assert_no_job(server, ids[1])

        async with running(server):
            await wait_event(middle_started)
            state = await server.get_chain(chain.id)
            assert state.status is Status.PROCESSING
            assert state.current_job == ids[1]
            assert state.prev_jobs == [ids[0]]
            assert list(state.jobs.items()) == [
                (ids[0], Status.SUCCESSFUL),
                (ids[1], Status.PROCESSING),
                (ids[2], Status.QUEUED),
            ]
            release_middle.set()
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)

        assert done.status is Status.SUCCESSFUL
        assert done.error is None
        assert done.current_job == ids[2]
        assert done.prev_jobs == ids[:2]
        assert list(done.jobs.items()) == [(i, Status.SUCCESSFUL) for i in ids]
        assert await server.get_result(ids[2]) == b"abc"
        last = await server.get_job(ids[2])
        assert last.meta.prev_job_result == b"ab"

    assert received == [
        (ids[0], None, chain.id),
        (ids[1], b"a", chain.id),
        (ids[2], b"ab", chain.id),
    ]


async def test_chain_link_saving_nothing_passes_none(
    broker: Broker, results: Results, queue_name: str
) -> None:
    received: dict[str, bytes | None] = {}

    async def link(payload: bytes, ctx: JobContext) -> None:
        received[ctx.job_id] = ctx.meta.prev_job_result
        if payload:
            await ctx.save(payload)

    async with Server(broker=broker, results=results) as server:
        server.register_task("link", link, queue=queue_name, raw=True)
        links = [Job("link", p, queue=queue_name) for p in (b"first", b"", b"third")]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)

    # the link that saved nothing does not break the chain (the Go original stops here)
    assert done.status is Status.SUCCESSFUL
    assert received == {links[0].id: None, links[1].id: b"first", links[2].id: None}


async def test_failing_link_stops_the_chain(
    broker: Broker, results: Results, queue_name: str
) -> None:
    later = Counter()
    recovered = PerId()
    recover = Job("recover", b"cleanup", queue=queue_name)

    async def fail(payload: bytes, ctx: JobContext) -> None:
        raise RuntimeError("link broke")

    async with Server(broker=broker, results=results) as server:
        server.register_task("ok", noop, queue=queue_name, concurrency=1, raw=True)
        server.register_task("fail", fail, queue=queue_name, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        server.register_task("recover", recovered, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        links = [
            Job("ok", queue=queue_name),
            Job("fail", queue=queue_name, on_error=[recover]),
            Job("later", queue=queue_name),
            Job("later", queue=queue_name),
        ]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
            # the failing link's on_error job runs
            assert (await server.wait(recover.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            await drain(server, queue_name)
            assert (await server.get_job(links[1].id)).status is Status.FAILED

        assert done.status is Status.FAILED
        assert done.error is not None
        assert links[1].id in done.error
        assert "link broke" in done.error
        assert done.current_job == links[1].id
        assert done.prev_jobs == [links[0].id]
        assert list(done.jobs.items()) == [
            (links[0].id, Status.SUCCESSFUL),
            (links[1].id, Status.FAILED),
            (links[2].id, Status.CANCELLED),
            (links[3].id, Status.CANCELLED),
        ]
        # later links never ran and were never enqueued
        assert later.count == 0
        for link in links[2:]:
            await assert_no_job(server, link.id)
        assert recovered.count(recover.id) == 1
        assert await server.get_chain(chain.id) == done


async def test_retried_link_does_not_break_the_chain(
    broker: Broker, results: Results, queue_name: str
) -> None:
    attempts: list[int] = []
    received: list[bytes | None] = []

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        attempts.append(ctx.meta.retried)
        if ctx.meta.retried == 0:
            raise ConnectionError("first try fails")
        await ctx.save(b"second try")

    async def after(payload: bytes, ctx: JobContext) -> None:
        received.append(ctx.meta.prev_job_result)

    async with Server(broker=broker, results=results) as server:
        server.register_task("flaky", flaky, queue=queue_name, raw=True)
        server.register_task("after", after, queue=queue_name, raw=True)
        links = [Job("flaky", queue=queue_name, max_retries=1), Job("after", queue=queue_name)]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
        flaky_msg = await server.get_job(links[0].id)

    assert done.status is Status.SUCCESSFUL
    assert list(done.jobs.values()) == [Status.SUCCESSFUL, Status.SUCCESSFUL]
    assert attempts == [0, 1]
    assert flaky_msg.meta.retried == 1
    assert received == [b"second try"]


@pytest.mark.parametrize("target", ["chain", "link"])
async def test_cancel_mid_chain(
    broker: Broker, results: Results, queue_name: str, target: str
) -> None:
    gate = Gate()
    later = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("ok", noop, queue=queue_name, concurrency=1, raw=True)
        server.register_task("block", gate, queue=queue_name, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        links = [
            Job("ok", queue=queue_name),
            Job("block", queue=queue_name, max_retries=2),
            Job("later", queue=queue_name),
        ]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            await wait_event(gate.started(links[1].id))
            if target == "chain":
                assert await server.cancel(chain.id) is Status.CANCELLED
            else:  # the running link's own id
                assert await server.cancel(links[1].id) is Status.PROCESSING
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
            link = await server.wait(links[1].id, timeout=TIMEOUT)
            await drain(server, queue_name)
            final = await server.get_chain(chain.id)

        assert done.status is Status.CANCELLED
        assert link.status is Status.CANCELLED
        assert link.meta.retried == 0
        assert gate.stopped == [links[1].id]  # its finally ran
        assert later.count == 0
        await assert_no_job(server, links[2].id)
        assert final.status is Status.CANCELLED
        assert list(final.jobs.items()) == [
            (links[0].id, Status.SUCCESSFUL),
            (links[1].id, Status.CANCELLED),
            (links[2].id, Status.CANCELLED),
        ]
        assert final.current_job == links[1].id
        assert final.prev_jobs == [links[0].id]


async def test_link_ending_after_its_chain_was_cancelled_starts_no_next_link(
    broker: Broker, results: Results, queue_name: str
) -> None:
    started = anyio.Event()
    release = anyio.Event()
    later = Counter()

    async def shielded(payload: bytes, ctx: JobContext) -> None:
        started.set()
        with anyio.CancelScope(shield=True):  # the cancel cannot reach it in here
            await release.wait()
        await ctx.save(b"done anyway")

    async with Server(broker=broker, results=results) as server:
        server.register_task("shielded", shielded, queue=queue_name, concurrency=1, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        links = [Job("shielded", queue=queue_name), Job("later", queue=queue_name)]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            await wait_event(started)
            assert await server.cancel(chain.id) is Status.CANCELLED
            release.set()
            link = await server.wait(links[0].id, timeout=TIMEOUT)
            await drain(server, queue_name)
            await drain(server, queue_name)
            final = await server.get_chain(chain.id)

        assert link.status.is_final
        assert later.count == 0
        await assert_no_job(server, links[1].id)
        assert final.status is Status.CANCELLED
        assert final.jobs[links[1].id] is Status.CANCELLED


async def test_cancel_chain_while_the_next_link_is_being_enqueued(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the chain is cancelled after a link's success was checked against the
    chain's status but before the next link was enqueued; that next link must not run."""
    later = Counter()
    in_window = anyio.Event()
    proceed = anyio.Event()
    links = [Job("ok", queue=queue_name), Job("later", queue=queue_name)]
    get_result = results.get_result

    async def paused_get_result(job_id: str) -> bytes:
        # member_changed reads the finished link's result after checking that the chain
        # is still running, before the next link is enqueued: hold it there
        if job_id == links[0].id:
            in_window.set()
            await proceed.wait()
        return await get_result(job_id)

    monkeypatch.setattr(results, "get_result", paused_get_result)
    async with Server(broker=broker, results=results) as server:
        server.register_task("ok", noop, queue=queue_name, concurrency=1, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            await wait_event(in_window)
            assert await server.cancel(chain.id) is Status.CANCELLED
            proceed.set()
            # the first sentinel runs once the first link's processor is done (one
            # processor); the second one behind anything that link enqueued
            await drain(server, queue_name)
            await drain(server, queue_name)
            final = await server.get_chain(chain.id)

    assert later.count == 0
    assert final.status is Status.CANCELLED
    assert final.jobs == {links[0].id: Status.SUCCESSFUL, links[1].id: Status.CANCELLED}
    # if the link's state was recorded before the cancel was seen, it ended cancelled
    try:
        skipped = await server.get_job(links[1].id)
    except JobNotFoundError:
        pass
    else:
        assert skipped.status is Status.CANCELLED


async def test_link_result_over_the_payload_limit_fails_the_chain(
    broker: Broker, results: Results, queue_name: str
) -> None:
    later = Counter()

    async def big(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"x" * 2000)  # a result may become the next link's input

    async with Server(broker=broker, results=results, max_payload_size=1000) as server:
        server.register_task("big", big, queue=queue_name, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        links = [Job("big", queue=queue_name), Job("later", queue=queue_name)]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
            link = await server.wait(links[0].id, timeout=TIMEOUT)

        assert link.status is Status.FAILED
        assert link.meta.prev_error is not None
        assert link.meta.prev_error.startswith("PayloadTooLargeError")
        assert done.status is Status.FAILED
        assert done.error is not None
        assert links[0].id in done.error
        assert done.jobs == {links[0].id: Status.FAILED, links[1].id: Status.CANCELLED}
        assert later.count == 0
        await assert_no_job(server, links[1].id)


async def test_next_link_too_large_to_enqueue_fails_the_chain(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """Regression: the next link's message (its payload plus the previous result) over
    ``max_message_size`` once wedged the chain, its last link redelivered forever."""
    later = Counter()
    limit = 100_000

    async def big(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"r" * (limit - 100))  # within the payload limit

    # max_message_size is raised to max_payload_size + 64 KiB
    server = Server(broker=broker, results=results, max_payload_size=limit, max_message_size=1)
    assert server.max_message_size == limit + 64 * 1024
    async with server:
        server.register_task("big", big, queue=queue_name, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        links = [Job("big", queue=queue_name), Job("later", b"p" * (limit - 100), queue=queue_name)]
        chain = Chain(links)
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
            first = await server.wait(links[0].id, timeout=TIMEOUT)

        assert first.status is Status.SUCCESSFUL
        assert done.status is Status.FAILED
        assert done.error is not None
        assert links[1].id in done.error
        assert "over the limit" in done.error  # the PayloadTooLargeError text
        assert done.jobs == {links[0].id: Status.SUCCESSFUL, links[1].id: Status.CANCELLED}
        assert later.count == 0
        await assert_no_job(server, links[1].id)


async def test_chain_deadline(broker: Broker, results: Results, queue_name: str) -> None:
    gate = Gate()  # never released
    later = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("ok", noop, queue=queue_name, concurrency=1, raw=True)
        server.register_task("block", gate, queue=queue_name, raw=True)
        server.register_task("later", later, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        links = [
            Job("ok", queue=queue_name),
            Job("block", queue=queue_name, max_retries=2),
            Job("later", queue=queue_name),
        ]
        chain = Chain(links, timeout=DEADLINE)
        before = server.clock()
        await server.enqueue_chain(chain)
        async with running(server):
            done = await server.wait_chain(chain.id, timeout=TIMEOUT)
            assert server.clock() >= before + DEADLINE - CLOCK_MARGIN
            stopped = await server.wait(links[1].id, timeout=TIMEOUT)
            await drain(server, queue_name)
            final = await server.get_chain(chain.id)

        assert done.status is Status.FAILED
        assert done.error is not None
        assert "deadline" in done.error or "timeout" in done.error.lower()
        assert done.deadline == pytest.approx(done.created_at + DEADLINE)

        assert gate.stopped == [links[1].id]
        assert stopped.status is Status.FAILED
        assert stopped.meta.retried == 0
        assert stopped.meta.prev_error is not None
        assert stopped.meta.prev_error.startswith("JobTimeoutError")

        assert later.count == 0
        await assert_no_job(server, links[2].id)
        assert final.status is Status.FAILED
        assert list(final.jobs.values()) == [
            Status.SUCCESSFUL,
            Status.FAILED,
            Status.CANCELLED,
        ]


# -- follow-up jobs -------------------------------------------------------------------------


async def test_nested_follow_ups_run_once_each(
    broker: Broker, results: Results, queue_name: str
) -> None:
    handler = PerId()

    async def fail(payload: bytes, ctx: JobContext) -> None:
        handler.runs[ctx.job_id] = handler.count(ctx.job_id) + 1
        raise ValueError("root fails")

    async with Server(broker=broker, results=results) as server:
        server.register_task("fail", fail, queue=queue_name, concurrency=1, raw=True)
        server.register_task("step", handler, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        third = Job("step", b"3", queue=queue_name)
        second = Job("step", b"2", queue=queue_name, on_success=[third])
        first = Job("step", b"1", queue=queue_name, on_success=[second])
        unused = Job("step", b"never", queue=queue_name)
        root = Job("fail", queue=queue_name, on_error=[first], on_success=[unused])
        await server.enqueue(root)
        async with running(server):
            await wait_event(handler.ran(third.id))
            assert (await server.wait(third.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            await drain(server, queue_name)

        assert (await server.get_job(root.id)).status is Status.FAILED
        for job in (first, second, third):
            assert (await server.get_job(job.id)).status is Status.SUCCESSFUL
        await assert_no_job(server, unused.id)

    assert handler.runs == {root.id: 1, first.id: 1, second.id: 1, third.id: 1}


async def test_retried_job_enqueues_its_follow_ups_once(
    broker: Broker, results: Results, queue_name: str
) -> None:
    handler = PerId()
    attempts: list[int] = []

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        attempts.append(ctx.meta.retried)
        if ctx.meta.retried == 0:
            raise ConnectionError("first try fails")

    async with Server(broker=broker, results=results) as server:
        server.register_task("flaky", flaky, queue=queue_name, concurrency=1, raw=True)
        server.register_task("step", handler, queue=queue_name, raw=True)
        server.register_task("sentinel", noop, queue=queue_name, raw=True)
        on_success = Job("step", b"success", queue=queue_name)
        on_error = Job("step", b"error", queue=queue_name)
        job = Job(
            "flaky", queue=queue_name, max_retries=1, on_success=[on_success], on_error=[on_error]
        )
        await server.enqueue(job)
        async with running(server):
            assert (await server.wait(job.id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
            await wait_event(handler.ran(on_success.id))
            await drain(server, queue_name)
        await assert_no_job(server, on_error.id)

    assert attempts == [0, 1]
    assert handler.runs == {on_success.id: 1}


# -- waiting and lookups --------------------------------------------------------------------


async def test_wait_group_and_wait_chain_time_out(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        # no worker runs: nothing ends
        group = Group([Job("t", queue=queue_name)])
        chain = Chain([Job("t", queue=queue_name), Job("t", queue=queue_name)])
        await server.enqueue_group(group)
        await server.enqueue_chain(chain)
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(TimeoutError):
                await server.wait_group(group.id, timeout=0.1)
            with pytest.raises(TimeoutError):
                await server.wait_chain(chain.id, timeout=0.1)
        assert (await server.get_group(group.id)).status is Status.QUEUED
        assert (await server.get_chain(chain.id)).status is Status.QUEUED


async def test_unknown_groups_and_chains(broker: Broker, results: Results, queue_name: str) -> None:
    async with Server(broker=broker, results=results) as server:
        missing = unknown_id()
        with pytest.raises(NotFoundError):
            await server.get_group(missing)
        with pytest.raises(NotFoundError):
            await server.get_chain(missing)
        with pytest.raises(NotFoundError):
            await server.wait_group(missing, timeout=TIMEOUT)
        with pytest.raises(NotFoundError):
            await server.wait_chain(missing, timeout=TIMEOUT)
        with pytest.raises(JobNotFoundError):
            await server.cancel(missing)

        group = Group([Job("t", queue=queue_name)])
        chain = Chain([Job("t", queue=queue_name), Job("t", queue=queue_name)])
        await server.enqueue_group(group)
        await server.enqueue_chain(chain)
        # a group is not a chain and a chain is not a group
        with pytest.raises(NotFoundError):
            await server.get_group(chain.id)
        with pytest.raises(NotFoundError):
            await server.get_chain(group.id)
        # and neither is a job
        with pytest.raises(JobNotFoundError):
            await server.get_job(group.id)
        with pytest.raises(NotFoundError):
            await server.get_group(group.jobs[0].id)


# -- ETA ------------------------------------------------------------------------------------


async def test_jobs_run_in_eta_order(broker: Broker, results: Results, queue_name: str) -> None:
    starts: list[tuple[str, float, float | None]] = []
    all_ran = anyio.Event()

    async with Server(broker=broker, results=results) as server:

        async def record(payload: bytes, ctx: JobContext) -> None:
            starts.append((ctx.job_id, server.clock(), ctx.meta.eta))
            if len(starts) == 3:
                all_ran.set()

        server.register_task("record", record, queue=queue_name, concurrency=1, raw=True)
        now = datetime.now(timezone.utc)
        late = Job("record", b"late", queue=queue_name, delay=0.6)
        middle = Job("record", b"middle", queue=queue_name, eta=now + timedelta(seconds=0.4))
        early = Job("record", b"early", queue=queue_name, delay=0.2)
        enqueued_at: dict[str, float] = {}
        for job in (late, middle, early):  # enqueued latest first
            enqueued_at[job.id] = server.clock()
            await server.enqueue(job)

        scheduled = await server.get_scheduled(queue_name)
        assert [m.id for m in scheduled] == [early.id, middle.id, late.id]
        etas = [m.meta.eta for m in scheduled]
        assert None not in etas
        assert etas == sorted(eta for eta in etas if eta is not None)
        assert scheduled[1].meta.eta == (now + timedelta(seconds=0.4)).timestamp()
        assert await server.get_pending(queue_name) == []

        async with running(server):
            await wait_event(all_ran)

    assert [job_id for job_id, _, _ in starts] == [early.id, middle.id, late.id]
    delays = {early.id: 0.2, late.id: 0.6}
    for job_id, started_at, eta in starts:
        assert eta is not None
        # none runs before its ETA
        assert started_at >= eta - CLOCK_MARGIN, (job_id, started_at, eta)
        if job_id in delays:
            assert started_at >= enqueued_at[job_id] + delays[job_id] - CLOCK_MARGIN


async def test_eta_precision(broker: Broker, results: Results, queue_name: str) -> None:
    started: list[float] = []
    ran = anyio.Event()

    async with Server(broker=broker, results=results) as server:

        async def record(payload: bytes, ctx: JobContext) -> None:
            started.append(server.clock())
            ran.set()

        server.register_task("record", record, queue=queue_name, raw=True)
        enqueued_at = server.clock()
        job_id = await server.enqueue(Job("record", queue=queue_name, delay=0.3))
        eta = (await server.get_job(job_id)).meta.eta
        assert eta is not None
        assert eta == pytest.approx(enqueued_at + 0.3, abs=CLOCK_MARGIN)
        async with running(server):
            await wait_event(ran)
            assert (await server.wait(job_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL

    (started_at,) = started
    assert started_at >= eta - CLOCK_MARGIN  # not before its ETA
    assert started_at - eta < 2.0  # a loose sanity bound, not a latency promise


async def test_naive_eta_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="naive"):
        Job("t", eta=datetime.now())  # naive: the point of the test
    with pytest.raises(InvalidInputError):
        Job("t", eta=datetime.now(timezone.utc), delay=1.0)


async def test_chain_whose_record_does_not_decode_ends_failed(
    broker: Broker, results: Results, queue_name: str
) -> None:
    """A chain record damaged (or written by an older version) after the chain began:
    its next link cannot be known, so the chain ends ``failed`` saying why when the
    current link succeeds, and that link's message is settled, not sent back for ever."""
    links = [Job("link", name, queue=queue_name) for name in (b"a", b"b")]
    async with Server(broker=broker, results=results) as server:
        server.register_task("link", noop, queue=queue_name, raw=True)
        chain_id = await server.enqueue_chain(Chain(links))
        record = await results.get_parent(chain_id)
        await results.set_parent(chain_id, attrs.evolve(record, data=b"\xc1 not a record"))
        async with running(server):
            done = await server.wait(links[0].id, timeout=TIMEOUT)
        ended = await results.get_parent(chain_id)
        assert await broker.get_pending(queue_name) == []
        await assert_no_job(server, links[1].id)
    assert done.status is Status.SUCCESSFUL
    assert ended.status == Status.FAILED.value
    assert ended.error is not None
    assert "does not decode" in ended.error
