"""The typed face: typed tasks, the codec, handles, a producer Client, current_job(),
progress and counts, on every backend (memory, Redis, NATS) and both AnyIO backends."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import attrs
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import (
    Chain,
    ChainHandle,
    Client,
    Group,
    GroupHandle,
    InvalidInputError,
    Job,
    JobCancelledError,
    JobContext,
    JobFailedError,
    JobHandle,
    JobTimeoutError,
    JsonCodec,
    PayloadTooLargeError,
    Server,
    Status,
    current_job,
)
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


def make_server(broker: Broker, results: Results, **kwargs: Any) -> Server:
    return Server(broker=broker, results=results, **kwargs)


async def test_typed_task_result_and_handle(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def add(a: int, b: int, *, scale: int = 1) -> int:
        return (a + b) * scale

    async with server, running(server):
        handle = await add.enqueue(40, 2)
        assert isinstance(handle, JobHandle)
        assert isinstance(handle, str)
        assert handle.id == str(handle)
        assert type(handle.id) is str
        assert await handle.result(timeout=TIMEOUT) == 42
        assert await handle.status() is Status.SUCCESSFUL
        assert (await handle.info()).job.task == "add"
        scaled = await add.enqueue(1, 2, scale=10)
        assert await scaled.result(timeout=TIMEOUT) == 30
        # id-passing code keeps working: a plain id gives the same job
        again = server.job(str(handle))
        assert await again.result(timeout=TIMEOUT) == 42
        assert (await server.wait(handle, timeout=TIMEOUT)).status is Status.SUCCESSFUL


async def test_values_round_trip_through_the_codec(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def echo(value: Any) -> Any:
        return value

    values: list[Any] = [
        None,
        True,
        -(2**63),
        2**64 - 1,
        1.5,
        "é",
        b"\x00\xff",
        [1, [2]],
        {"a": {1: 2}},
    ]
    async with server, running(server):
        handles = [await echo.enqueue(v) for v in values]
        assert [await h.result(timeout=TIMEOUT) for h in handles] == values


async def test_sync_task_runs_in_a_thread_with_current_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)
    seen: list[tuple[str, bool]] = []

    @server.task(queue=queue_name)
    def where(tag: str) -> str:
        ctx = current_job()
        seen.append((ctx.job_id, threading.current_thread() is threading.main_thread()))
        return f"{tag}:{ctx.meta.queue}"

    async with server, running(server):
        handle = await where.enqueue("x")
        assert await handle.result(timeout=TIMEOUT) == f"x:{queue_name}"
    assert seen == [(handle.id, False)]


async def test_current_job_in_async_task_and_outside(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def who() -> str:
        ctx = current_job()
        assert isinstance(ctx, JobContext)
        return ctx.job_id

    with pytest.raises(LookupError, match="outside a job"):
        current_job()
    async with server, running(server):
        handle = await who.enqueue()
        assert await handle.result(timeout=TIMEOUT) == handle.id
    with pytest.raises(LookupError):
        current_job()


async def test_failure_timeout_cancel_and_wait_timeout(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)
    started = anyio.Event()

    @server.task(queue=queue_name)
    async def boom(n: int) -> None:
        raise ValueError(f"bad {n}")

    @server.task(queue=queue_name, timeout=0.2)
    async def slow() -> None:
        await anyio.sleep(30)

    @server.task(queue=queue_name)
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    async with server, running(server):
        failed = await boom.enqueue(7)
        with pytest.raises(JobFailedError) as info:
            await failed.result(timeout=TIMEOUT)
        assert info.value.job_id == failed.id
        assert info.value.error == "ValueError: bad 7"
        assert info.value.job is not None
        assert info.value.job.status is Status.FAILED

        timed = await slow.enqueue()
        with pytest.raises(JobFailedError) as info:
            await timed.result(timeout=TIMEOUT)
        assert info.value.error.startswith("JobTimeoutError")

        running_job = await forever.enqueue()
        # the caller's wait runs out: the built-in TimeoutError, not the job's own
        with pytest.raises(TimeoutError) as waited:
            await running_job.result(timeout=0.1)
        assert not isinstance(waited.value, JobTimeoutError)
        with anyio.fail_after(TIMEOUT):
            await started.wait()
        assert await running_job.status() is Status.PROCESSING
        await running_job.cancel()
        with pytest.raises(JobCancelledError):
            await running_job.result(timeout=TIMEOUT)


async def test_options_are_kept_apart_from_the_function_arguments(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)
    runs: list[int] = []

    @server.task(queue=queue_name)
    async def flaky(delay: float, max_retries: int) -> list[float]:
        runs.append(1)
        if len(runs) < 2:
            raise RuntimeError("first run fails")
        return [delay, max_retries]

    async with server, running(server):
        # the function's own "delay" and "max_retries" are arguments; the job's go in options()
        handle = await flaky.options(max_retries=1, id=f"fixed-{queue_name}").enqueue(
            delay=0.5, max_retries=9
        )
        assert handle == f"fixed-{queue_name}"
        assert await handle.result(timeout=TIMEOUT) == [0.5, 9]
        assert len(runs) == 2
        job = flaky.options(delay=5, max_retries=3).job(1.0, 2)
        assert (job.task, job.queue, job.delay, job.max_retries) == ("flaky", queue_name, 5, 3)


async def test_task_defaults_and_bad_options(broker: Broker, results: Results) -> None:
    server = make_server(broker, results)

    @server.task(max_retries=4, timeout=30)
    async def t(x: int) -> int:
        return x

    assert (t.job(1).max_retries, t.job(1).timeout) == (4, 30)
    assert t.options(max_retries=0).job(1).max_retries == 0
    assert await t(5) == 5  # calling the task function calls the function
    assert await t.fn(5) == 5
    with pytest.raises(InvalidInputError):
        t.options(timeout=-1).job(1)
    with pytest.raises(InvalidInputError):
        server.register_task("r", t.fn, raw=True, max_retries=1)
    with pytest.raises(InvalidInputError, match="cannot encode"):
        t.job(object())  # type: ignore[arg-type]
    async with server:
        with pytest.raises(InvalidInputError, match="arguments go with a task function"):
            await server.enqueue(Job("t"), 1)  # type: ignore[call-overload]


async def test_group_results_and_chain_passing_values(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def add(a: int, b: int) -> int:
        return a + b

    @server.task(queue=queue_name)
    def fmt(total: int, label: str) -> str:
        return f"{label}={total}"

    async with server, running(server):
        group = await server.enqueue_group(Group([add.job(1, 2), add.job(3, 4), add.job(5, 6)]))
        assert isinstance(group, GroupHandle)
        assert await group.result(timeout=TIMEOUT) == [3, 7, 11]
        assert [await h.result(timeout=TIMEOUT) for h in group.jobs] == [3, 7, 11]
        assert await group.status() is Status.SUCCESSFUL
        # a link made with link() gets the previous link's result as its first argument
        chain = await server.enqueue_chain(Chain([add.job(1, 2), add.link(10), fmt.link("sum")]))
        assert isinstance(chain, ChainHandle)
        assert await chain.result(timeout=TIMEOUT) == "sum=13"
        assert (await chain.info()).status is Status.SUCCESSFUL


async def test_group_with_a_failed_member_raises_its_error(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def check(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    async with server, running(server):
        jobs = [check.job(1), check.job(-1)]
        group = await server.enqueue_group(Group(jobs))
        with pytest.raises(JobFailedError) as info:
            await group.result(timeout=TIMEOUT)
        assert info.value.job_id == jobs[1].id
        assert info.value.error == "ValueError: negative"
        chain = await server.enqueue_chain(Chain([check.job(-5), check.link()]))
        with pytest.raises(JobFailedError, match="negative"):
            await chain.result(timeout=TIMEOUT)


async def test_a_producer_client_enqueues_for_the_workers(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def add(a: int, b: int) -> int:
        return a + b

    client = Client(broker, results)
    assert not hasattr(client, "register_task")
    assert not hasattr(client, "run")
    async with server, running(server), client:
        handle = await client.enqueue(add, 20, 22)
        assert await handle.result(timeout=TIMEOUT) == 42
        raw = await client.enqueue(add.job(1, 1))
        assert await raw.result(timeout=TIMEOUT) == 2
        assert (await client.get_job(handle)).status is Status.SUCCESSFUL


@attrs.frozen
class Point:
    x: int
    y: int


class PointCodec(JsonCodec):
    """A user codec: a Point travels as {"$point": [x, y]}."""

    def encode(self, value: Any) -> bytes:
        return super().encode(_dump(value))

    def decode(self, data: bytes) -> Any:
        return _load(super().decode(data))


def _dump(value: Any) -> Any:
    if isinstance(value, Point):
        return {"$point": [value.x, value.y]}
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$point"}:
            return Point(*value["$point"])
        return {k: _load(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_load(v) for v in value]
    return value


async def test_json_and_a_user_codec(broker: Broker, results: Results, queue_name: str) -> None:
    server = make_server(broker, results, codec=PointCodec())

    @server.task(queue=queue_name)
    async def shift(p: Point, dx: int) -> Point:
        return Point(p.x + dx, p.y)

    async with server, running(server):
        handle = await shift.enqueue(Point(1, 2), dx=3)
        assert await handle.result(timeout=TIMEOUT) == Point(4, 2)
        # the payload is JSON that another language can write
        info = await handle.info()
        assert info.job.payload == b'[[{"$point":[1,2]}],{"dx":3}]'
    with pytest.raises(InvalidInputError, match="JsonCodec cannot encode"):
        shift.job(Point(1, 2), dx=b"bytes")  # type: ignore[arg-type]


async def test_a_result_over_the_limit_fails_the_job(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results, max_payload_size=1000)

    @server.task(queue=queue_name)
    async def big() -> bytes:
        return b"x" * 5000

    async with server, running(server):
        handle = await big.enqueue()
        with pytest.raises(JobFailedError) as info:
            await handle.result(timeout=TIMEOUT)
        assert info.value.error.startswith(PayloadTooLargeError.__name__)


async def test_an_undecodable_payload_fails_the_job_clearly(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task(queue=queue_name)
    async def add(a: int, b: int) -> int:
        return a + b

    async with server, running(server):
        # a producer that wrote bytes, not the codec's [args, kwargs]
        handle = await server.enqueue(Job("add", b"40+2", queue=queue_name))
        with pytest.raises(JobFailedError, match="DecodeError"):
            await handle.result(timeout=TIMEOUT)
        # wrong arguments: the call's TypeError is the recorded error
        wrong = await server.enqueue(add.job(1))  # type: ignore[call-arg]
        with pytest.raises(JobFailedError, match="TypeError"):
            await wrong.result(timeout=TIMEOUT)


async def test_raw_handlers_keep_the_bytes_level(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)

    @server.task("split", queue=queue_name, raw=True)
    async def split(payload: bytes, ctx: JobContext) -> None:
        a, b = payload.split(b"+")
        await ctx.save(str(int(a) + int(b)).encode())

    async with server, running(server):
        handle = await server.enqueue(Job("split", b"40+2", queue=queue_name))
        assert await handle.result_bytes(timeout=TIMEOUT) == b"42"
        assert await server.get_result(handle) == b"42"


async def test_progress_is_stored_rate_limited_and_seen_by_another_client(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)
    halfway = anyio.Event()
    finish = anyio.Event()
    writes: list[bytes] = []
    store = results.set_progress

    async def counting(job_id: str, data: bytes, *, run: str) -> bool:
        writes.append(data)
        return await store(job_id, data, run=run)

    results.set_progress = counting  # type: ignore[method-assign]

    @server.task(queue=queue_name)
    async def work(n: int) -> int:
        ctx = current_job()
        for i in range(n):  # a tight loop: the store is not flooded
            await ctx.set_progress((i + 1) / n, f"{i + 1} of {n}")
        halfway.set()
        await finish.wait()
        return n

    client = Client(broker, results)
    try:
        async with server, running(server), client:
            handle = await work.enqueue(200)
            with anyio.fail_after(TIMEOUT):
                await halfway.wait()
            # the last value is stored once the interval has passed or the run ends
            seen = client.job(handle)
            finish.set()
            assert await seen.result(timeout=TIMEOUT) == 200
            progress = await seen.progress()
            assert progress is not None
            assert (progress.fraction, progress.message) == (1.0, "200 of 200")
            assert progress.at > 0
            assert 1 <= len(writes) <= 3  # 200 calls, a handful of writes
            assert (await client.get_job(handle)).progress == progress
    finally:
        del results.set_progress


async def test_set_progress_refuses_bad_values(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = make_server(broker, results)
    errors: list[str] = []

    @server.task(queue=queue_name)
    async def bad() -> None:
        ctx = current_job()
        for fraction in (1.5, -0.1, "half", True):
            try:
                await ctx.set_progress(fraction)  # type: ignore[arg-type]
            except InvalidInputError as exc:
                errors.append(str(exc))
        await ctx.set_progress(None, "x" * 5000)  # a long message is cut, not refused

    async with server, running(server):
        handle = await bad.enqueue()
        assert (await handle.wait(timeout=TIMEOUT)).status is Status.SUCCESSFUL
        progress = await handle.progress()
        assert progress is not None
        assert progress.fraction is None
        assert len(progress.message) == 1000
    assert len(errors) == 4
