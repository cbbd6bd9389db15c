"""Server behaviour before and around the worker: task registry, input validation,
enqueue, inspection and ``wait()``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from server_support import TIMEOUT, Counter, noop, running

from tasqueue_anyio import (
    DEFAULT_QUEUE,
    Backoff,
    InvalidInputError,
    Job,
    JobContext,
    JobNotFoundError,
    PayloadTooLargeError,
    QueueConcurrencyError,
    ResultNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


# -- register_task ---------------------------------------------------------------------------


def test_register_task_concurrency_conflict_raises() -> None:
    server = Server()
    server.register_task("first", noop, queue="q1", concurrency=3, raw=True)
    with pytest.raises(QueueConcurrencyError) as info:
        server.register_task("second", noop, queue="q1", concurrency=4, raw=True)
    message = str(info.value)
    # says which queue, which concurrency it has, and which task was refused
    assert "'q1'" in message
    assert "3" in message
    assert "'second'" in message
    # the refused task is not half-registered and the queue keeps its concurrency
    assert server.get_tasks() == ["first"]
    assert server.get_task("second") is None
    assert server.queues == {"q1": 3}


def test_register_task_conflict_with_default_concurrency() -> None:
    server = Server(default_concurrency=2)
    server.register_task("first", noop, queue="q1", raw=True)
    with pytest.raises(QueueConcurrencyError, match="'q1'"):
        server.register_task("second", noop, queue="q1", concurrency=5, raw=True)
    assert server.queues == {"q1": 2}


def test_register_task_same_or_unspecified_concurrency_is_fine() -> None:
    server = Server(default_concurrency=7)
    server.register_task("a", noop, queue="q1", concurrency=3, raw=True)
    server.register_task("b", noop, queue="q1", concurrency=3, raw=True)
    server.register_task("c", noop, queue="q1", raw=True)
    server.register_task("d", noop, queue="q2", raw=True)
    assert server.queues == {"q1": 3, "q2": 7}
    concurrencies = {}
    for name in "abcd":
        task = server.get_task(name)
        assert task is not None
        concurrencies[name] = (task.queue, task.concurrency)
    assert concurrencies == {"a": ("q1", 3), "b": ("q1", 3), "c": ("q1", 3), "d": ("q2", 7)}


def test_task_decorator_registers_and_returns_the_function() -> None:
    server = Server()

    @server.task(queue="q1", concurrency=2, raw=True)
    async def add(payload: bytes, ctx: JobContext) -> None:
        """An async handler."""

    @server.task("named-sync", raw=True)
    def blocking(payload: bytes, ctx: JobContext) -> None:
        """A sync handler."""

    assert server.get_tasks() == ["add", "named-sync"]
    add_task = server.get_task("add")
    assert add_task is not None
    assert add_task.handler is add
    assert (add_task.queue, add_task.concurrency, add_task.is_async) == ("q1", 2, True)
    sync_task = server.get_task("named-sync")
    assert sync_task is not None
    assert sync_task.handler is blocking
    assert (sync_task.queue, sync_task.is_async) == (DEFAULT_QUEUE, False)
    # the decorator hands the function back unchanged
    assert add.__name__ == "add"
    assert blocking.__name__ == "blocking"


def test_get_tasks_lists_names_in_registration_order() -> None:
    server = Server()
    assert server.get_tasks() == []
    for name in ["zeta", "alpha", "mid"]:
        server.register_task(name, noop, raw=True)
    assert server.get_tasks() == ["zeta", "alpha", "mid"]
    assert server.get_task("missing") is None


@pytest.mark.parametrize("name", ["", "x" * 256, 42, None])
def test_register_task_invalid_name(name: Any) -> None:
    server = Server()
    with pytest.raises(InvalidInputError, match="task name"):
        server.register_task(name, noop, raw=True)
    assert server.get_tasks() == []
    assert server.queues == {}


@pytest.mark.parametrize("queue", ["", "a b", "a*b", "a.b", "a:b", "x" * 129, None])
def test_register_task_invalid_queue(queue: Any) -> None:
    server = Server()
    with pytest.raises(InvalidInputError, match="queue"):
        server.register_task("t", noop, queue=queue, raw=True)
    assert server.get_tasks() == []
    assert server.queues == {}


@pytest.mark.parametrize("handler", ["not callable", None, 3])
def test_register_task_non_callable_handler(handler: Any) -> None:
    server = Server()
    with pytest.raises(InvalidInputError, match="not callable"):
        server.register_task("t", handler, raw=True)
    assert server.get_tasks() == []


@pytest.mark.parametrize("concurrency", [0, -1, True, 1.5])
def test_register_task_invalid_concurrency(concurrency: Any) -> None:
    server = Server()
    with pytest.raises(InvalidInputError, match="concurrency"):
        server.register_task("t", noop, concurrency=concurrency, raw=True)
    assert server.get_tasks() == []
    assert server.queues == {}


async def test_register_task_while_running_is_refused(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", noop, queue=queue_name, raw=True)
        async with running(server):
            with pytest.raises(RuntimeError, match=r"before Server\.run"):
                server.register_task("late", noop, queue=queue_name, raw=True)
        assert server.get_tasks() == ["t"]


# -- job validation --------------------------------------------------------------------------


@pytest.mark.parametrize("queue", ["a*b", "a{b}", "a:b", "a b", "a.b", "", "x" * 200, "a\nb"])
def test_job_invalid_queue_refused(queue: str) -> None:
    with pytest.raises(InvalidInputError, match="queue"):
        Job("t", queue=queue)


@pytest.mark.parametrize("job_id", ["", "a b", "a*b", "a{b}", "x" * 256, "a\nb", "é"])
def test_job_invalid_id_refused(job_id: str) -> None:
    with pytest.raises(InvalidInputError, match="job id"):
        Job("t", id=job_id)


def test_job_naive_eta_refused() -> None:
    with pytest.raises(InvalidInputError, match="naive"):
        Job("t", eta=datetime.now() + timedelta(seconds=5))
    # an aware one is fine
    Job("t", eta=datetime.now(timezone.utc) + timedelta(seconds=5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": True},
        {"timeout": 0},
        {"timeout": -1.0},
        {"delay": 0},
        {"schedule": "not a cron"},
        {"eta": datetime.now(timezone.utc), "delay": 1.0},
    ],
)
def test_job_invalid_options_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        Job("t", **kwargs)


def test_job_payload_must_be_bytes() -> None:
    with pytest.raises(InvalidInputError, match="bytes"):
        Job("t", "text")  # type: ignore[arg-type]


async def test_enqueue_refuses_a_non_job(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        with pytest.raises(InvalidInputError, match="Job"):
            await server.enqueue("t")  # type: ignore[call-overload]


# -- payload size ----------------------------------------------------------------------------


async def test_oversize_payload_refused_and_nothing_stored(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results, max_payload_size=1024) as server:
        job = Job("t", b"x" * 2000, queue=queue_name)
        with pytest.raises(PayloadTooLargeError, match="1024") as info:
            await server.enqueue(job)
        assert (info.value.size, info.value.limit) == (2000, 1024)
        assert "2000" in str(info.value)
        assert await server.get_pending(queue_name) == []
        with pytest.raises(JobNotFoundError):
            await server.get_job(job.id)
        # exactly at the limit is accepted
        ok = await server.enqueue(Job("t", b"x" * 1024, queue=queue_name))
        assert [m.id for m in await server.get_pending(queue_name)] == [ok]


@pytest.mark.parametrize("which", ["on_success", "on_error"])
async def test_oversize_follow_up_payload_refused(
    broker: Broker, results: Results, queue_name: str, which: str
) -> None:
    async with Server(broker=broker, results=results, max_payload_size=1024) as server:
        follow_up = Job("t", b"y" * 2000, queue=queue_name)
        kwargs: dict[str, Any] = {which: [follow_up]}
        parent = Job("t", b"small", queue=queue_name, **kwargs)
        with pytest.raises(PayloadTooLargeError, match="1024"):
            await server.enqueue(parent)
        assert await server.get_pending(queue_name) == []
        for job_id in (parent.id, follow_up.id):
            with pytest.raises(JobNotFoundError):
                await server.get_job(job_id)


# -- enqueue_many ----------------------------------------------------------------------------


async def test_enqueue_many_returns_ids_in_order_and_all_run(
    broker: Broker, results: Results, queue_name: str
) -> None:
    counter = Counter()
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", counter, queue=queue_name, raw=True)
        jobs = [Job("t", str(i).encode(), queue=queue_name) for i in range(5)]
        ids = await server.enqueue_many(jobs)
        assert ids == [job.id for job in jobs]
        assert [m.id for m in await server.get_pending(queue_name)] == ids
        async with running(server):
            for job_id in ids:
                msg = await server.wait(job_id, timeout=TIMEOUT)
                assert msg.status is Status.SUCCESSFUL
    assert sorted(counter.payloads) == [str(i).encode() for i in range(5)]


async def test_enqueue_many_empty(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        assert await server.enqueue_many([]) == []


async def test_enqueue_many_duplicate_ids_refused_before_io(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        first = Job("t", b"1", queue=queue_name)
        duplicate = Job("t", b"2", id=first.id, queue=queue_name)
        with pytest.raises(InvalidInputError, match="share an id"):
            await server.enqueue_many([first, Job("t", queue=queue_name), duplicate])
        assert await server.get_pending(queue_name) == []
        with pytest.raises(JobNotFoundError):
            await server.get_job(first.id)


async def test_enqueue_many_invalid_member_refused_before_io(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results, max_payload_size=10) as server:
        good = Job("t", b"ok", queue=queue_name)
        with pytest.raises(PayloadTooLargeError):
            await server.enqueue_many([good, Job("t", b"z" * 11, queue=queue_name)])
        assert await server.get_pending(queue_name) == []
        with pytest.raises(JobNotFoundError):
            await server.get_job(good.id)


# -- inspection ------------------------------------------------------------------------------


async def test_get_pending_lists_queued_jobs_in_order(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        ids = [await server.enqueue(Job("t", bytes([i]), queue=queue_name)) for i in range(4)]
        pending = await server.get_pending(queue_name)
        assert [m.id for m in pending] == ids
        assert [m.job.payload for m in pending] == [bytes([i]) for i in range(4)]
        assert all(m.status is Status.QUEUED for m in pending)
        # other queues are not mixed in
        assert await server.get_pending(queue_name + "-other") == []


async def test_get_success_and_get_failed_list_ids(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async def handler(payload: bytes, ctx: JobContext) -> None:
        if payload == b"fail":
            raise ValueError("asked to fail")

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        ok_ids = [await server.enqueue(Job("t", b"ok", queue=queue_name)) for _ in range(2)]
        bad_id = await server.enqueue(Job("t", b"fail", queue=queue_name))
        async with running(server):
            for job_id in [*ok_ids, bad_id]:
                await server.wait(job_id, timeout=TIMEOUT)
        success = await server.get_success()
        failed = await server.get_failed()
    assert set(ok_ids) <= set(success)
    assert bad_id in failed
    assert bad_id not in success
    assert not set(ok_ids) & set(failed)


async def test_delete_job_removes_state_and_result(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async def handler(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"result:" + payload)

    async with Server(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", b"p", queue=queue_name))
        keep_id = await server.enqueue(Job("t", b"k", queue=queue_name))
        async with running(server):
            await server.wait(job_id, timeout=TIMEOUT)
            await server.wait(keep_id, timeout=TIMEOUT)
        assert await server.get_result(job_id) == b"result:p"
        assert job_id in await server.get_success()

        await server.delete_job(job_id)

        with pytest.raises(JobNotFoundError):
            await server.get_job(job_id)
        with pytest.raises(ResultNotFoundError):
            await server.get_result(job_id)
        assert job_id not in await server.get_success()
        # the other job is untouched
        assert (await server.get_job(keep_id)).status is Status.SUCCESSFUL
        assert await server.get_result(keep_id) == b"result:k"


async def test_get_job_unknown_id_raises(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        with pytest.raises(JobNotFoundError):
            await server.get_job("no-such-job")


# -- wait ------------------------------------------------------------------------------------


async def test_wait_timeout_raises_timeout_error(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        # no worker: the job stays queued
        job_id = await server.enqueue(Job("t", queue=queue_name))
        start = anyio.current_time()
        with pytest.raises(TimeoutError):
            await server.wait(job_id, timeout=0.1)
        assert anyio.current_time() - start < TIMEOUT
        assert (await server.get_job(job_id)).status is Status.QUEUED


async def test_wait_on_finished_job_returns_at_once(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        server.register_task("t", noop, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        async with running(server):
            first = await server.wait(job_id, timeout=TIMEOUT)
        assert first.status is Status.SUCCESSFUL
        # no worker runs now and no event will come: the stored state must answer
        with anyio.fail_after(1):
            again = await server.wait(job_id)
        assert again.status is Status.SUCCESSFUL
        assert again.id == job_id


async def test_wait_unknown_job_raises(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        with pytest.raises(JobNotFoundError):
            await server.wait("never-enqueued", timeout=1)


async def test_wait_needs_an_open_server(broker: Broker, results: Results) -> None:
    server = Server(broker=broker, results=results)
    with pytest.raises(RuntimeError, match="open server"):
        await server.wait("whatever", timeout=1)
    async with server:
        pass
    with pytest.raises(RuntimeError, match="open server"):
        await server.wait("whatever", timeout=1)


async def test_enter_a_server_twice_is_refused(broker: Broker, results: Results) -> None:
    async with Server(broker=broker, results=results) as server:
        with pytest.raises(RuntimeError, match="already open"):
            await server.__aenter__()


def test_follow_up_with_a_schedule_refused() -> None:
    with pytest.raises(InvalidInputError, match="has a schedule"):
        Job("t", on_success=[Job("u", schedule="* * * * *")])
    with pytest.raises(InvalidInputError, match="has a schedule"):
        Job("t", on_error=[Job("u", schedule="* * * * *")])


def test_backoff_refuses_values_the_wire_would_refuse() -> None:
    for bad in ({"initial": None}, {"factor": 0}, {"maximum": -1.0}, {"initial": True}):
        with pytest.raises(InvalidInputError):
            Backoff(**bad)
    with pytest.raises(InvalidInputError):
        Backoff(jitter=1)  # type: ignore[arg-type]
