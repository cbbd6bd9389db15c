"""Fan-in: a group's ``then`` job runs once every member succeeded, with their results;
it does not run when a member fails. On every backend and both AnyIO backends."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import (
    Group,
    InvalidInputError,
    Job,
    JobContext,
    JobFailedError,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


def make_server(broker: Broker, results: Results, queue: str) -> tuple[Server, list[str]]:
    server = Server(broker=broker, results=results)
    ran: list[str] = []

    @server.task(queue=queue, concurrency=4)
    async def square(n: int) -> int:
        if n < 0:
            raise ValueError(f"negative: {n}")
        return n * n

    @server.task(queue=queue)
    async def total(squares: list[int], label: str) -> str:
        ran.append(label)
        return f"{label}={sum(squares)}"

    server.square, server.total = square, total  # type: ignore[attr-defined]
    return server, ran


async def test_then_gets_the_results_in_order(broker: Broker, results: Results, queue_name: str) -> None:
    server, ran = make_server(broker, results, queue_name)
    square, total = server.square, server.total  # type: ignore[attr-defined]
    async with server, running(server):
        group = await server.enqueue_group(
            Group([square.job(n) for n in (1, 2, 3, 4)], then=total.link("sum"))
        )
        assert await group.result(timeout=TIMEOUT) == [1, 4, 9, 16]
        assert await group.then_result(timeout=TIMEOUT) == "sum=30"
        assert group.then is not None
        assert await group.then.status() is Status.SUCCESSFUL
    assert ran == ["sum"]


async def test_then_does_not_run_when_a_member_fails(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, ran = make_server(broker, results, queue_name)
    square, total = server.square, server.total  # type: ignore[attr-defined]
    async with server, running(server):
        group = await server.enqueue_group(
            Group([square.job(2), square.job(-1)], then=total.link("sum"))
        )
        with pytest.raises(JobFailedError, match="negative: -1"):
            await group.then_result(timeout=TIMEOUT)
        assert (await group.wait(timeout=TIMEOUT)).status is Status.FAILED
        assert group.then is not None
        with pytest.raises(JobNotFoundError):
            await group.then.status()  # it never got state
    assert ran == []


async def test_a_bytes_level_then_reads_the_encoded_list(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server, _ = make_server(broker, results, queue_name)
    square = server.square  # type: ignore[attr-defined]
    seen: list[object] = []

    @server.task("collect", queue=queue_name, raw=True)
    async def collect(payload: bytes, ctx: JobContext) -> None:
        assert ctx.meta.prev_job_result is not None
        seen.append(server.codec.decode(ctx.meta.prev_job_result))
        await ctx.save(payload)

    async with server, running(server):
        group = await server.enqueue_group(
            Group([square.job(3), square.job(5)], then=Job("collect", b"done", queue=queue_name))
        )
        assert group.then is not None
        assert (await group.wait(timeout=TIMEOUT)).status is Status.SUCCESSFUL
        # its state exists once the last member's ack is done
        with anyio.fail_after(TIMEOUT):
            while True:
                try:
                    assert await group.then.result_bytes(timeout=TIMEOUT) == b"done"
                    break
                except JobNotFoundError:
                    await anyio.sleep(0.01)
    assert seen == [[9, 25]]


def test_a_bad_then_is_refused() -> None:
    member = Job("t", id="m1")
    with pytest.raises(InvalidInputError, match="member's id"):
        Group([member], then=Job("t", id="m1"))
    with pytest.raises(InvalidInputError, match="cron job"):
        Group([member], then=Job("t", schedule="* * * * *"))
    with pytest.raises(InvalidInputError, match="then must be a Job"):
        Group([member], then="job")  # type: ignore[arg-type]
