"""A job's own TTL (``successful_ttl``, ``failed_ttl``) through the server: with the
memory store's injectable clock, and on the memory, Redis and NATS backends with real
time, on both AnyIO backends (the contract suite ``test_contract_job_ttl`` covers the
stores alone, the Redis Cluster and nats-server 2.10 included)."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import (
    Job,
    JobContext,
    JobFailedError,
    JobNotFoundError,
    ResultNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

pytestmark = pytest.mark.anyio


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_server(broker: Broker, results: Results, queue: str) -> Server:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue)
    async def double(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return 2 * n

    async def raw(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(b"saved:" + payload)

    server.register_task("raw", raw, queue=queue, raw=True)
    server.double = double  # type: ignore[attr-defined]
    return server


async def test_own_ttls_with_an_injected_clock() -> None:
    clock = Clock()
    results = MemoryResults(job_ttl=100, result_ttl=100, clock=clock)
    server = make_server(MemoryBroker(), results, "q")
    double = server.double  # type: ignore[attr-defined]
    async with server, running(server):
        short = await double.options(successful_ttl=10, failed_ttl=30).enqueue(1)
        failing = await double.options(successful_ttl=10, failed_ttl=30).enqueue(-1)
        plain = await double.enqueue(2)
        saved = await server.enqueue(Job("raw", b"x", queue="q", successful_ttl=10))
        assert await short.result(timeout=TIMEOUT) == 2
        with pytest.raises(JobFailedError):
            await failing.result(timeout=TIMEOUT)
        assert await plain.result(timeout=TIMEOUT) == 4
        assert (await server.wait(saved, timeout=TIMEOUT)).status is Status.SUCCESSFUL
        clock.now += 11  # past the successful jobs' own TTL
        for job_id in (short, saved):
            with pytest.raises(JobNotFoundError):
                await server.get_job(job_id)
            with pytest.raises(ResultNotFoundError):
                await server.get_result(job_id)
        assert await failing.status() is Status.FAILED  # failed_ttl is 30
        assert await plain.result() == 4  # the store's 100
        clock.now += 20
        with pytest.raises(JobNotFoundError):
            await server.get_job(failing)
        assert await plain.result() == 4
        clock.now += 70
        with pytest.raises(JobNotFoundError):
            await server.get_job(plain)
        assert short not in await server.get_success()
        assert failing not in await server.get_failed()


async def test_own_ttl_on_every_backend(broker: Broker, results: Results, queue_name: str) -> None:
    server = make_server(broker, results, queue_name)
    double = server.double  # type: ignore[attr-defined]
    async with server, running(server):
        short = await double.options(successful_ttl=1).enqueue(21)
        plain = await double.enqueue(1)
        assert await short.result(timeout=TIMEOUT) == 42
        assert await plain.result(timeout=TIMEOUT) == 2
        with anyio.fail_after(TIMEOUT + 3):
            while True:  # a TTL running out: nothing announces it
                try:
                    await server.get_job(short)
                except JobNotFoundError:
                    break
                await anyio.sleep(0.1)
        assert await plain.result() == 2
