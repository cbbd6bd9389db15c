"""tasqueue_anyio.testing: worker() and drain(), on every backend and both AnyIO backends."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT

from tasqueue_anyio import Client, JobNotFoundError, Server
from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.testing import drain, in_memory, worker

pytestmark = pytest.mark.anyio


async def test_worker_opens_runs_and_closes(broker: Broker, results: Results, queue_name: str) -> None:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue_name)
    async def double(x: int) -> int:
        return 2 * x

    async with worker(server) as running:
        assert running is server
        assert await (await double.enqueue(21)).result(timeout=TIMEOUT) == 42
    assert server._exit_stack is None  # closed: it opened it
    async with server:  # an open server stays open
        async with worker(server):
            assert await (await double.enqueue(1)).result(timeout=TIMEOUT) == 2
        assert server._exit_stack is not None


async def test_drain_runs_the_jobs_and_their_follow_ups(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[int] = []

    @server.task(queue=queue_name)
    async def step(x: int) -> int:
        ran.append(x)
        if x < 3:
            await step.enqueue(x + 1)  # enqueued by a job while draining
        return x

    async with server:
        first = await step.enqueue(0)
        later = await step.options(delay=0.2).enqueue(10)
        await drain(server, timeout=TIMEOUT)
        assert sorted(ran) == [0, 1, 2, 3, 10]
        assert (await server.counts(queue_name)).empty
        assert await first.result(timeout=0.5) == 0
        assert await later.result(timeout=0.5) == 10


async def test_drain_while_the_workers_run_and_from_a_client(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    release = anyio.Event()

    @server.task(queue=queue_name, concurrency=2)
    async def wait_then(x: int) -> int:
        await release.wait()
        return x

    async with worker(server), Client(broker, results) as client:
        jobs = [await client.enqueue(wait_then, i) for i in range(4)]
        with pytest.raises(TimeoutError):
            await drain(client, queues=[queue_name], timeout=0.3)  # held: not empty
        release.set()
        await drain(client, queues=[queue_name], timeout=TIMEOUT)
        assert [await job.result(timeout=0.5) for job in jobs] == [0, 1, 2, 3]
        await drain(server, timeout=TIMEOUT)  # its workers run: it waits as a client does


async def test_drain_needs_a_queue(broker: Broker, results: Results) -> None:
    with pytest.raises(ValueError, match="no queue"):
        await drain(Client(broker, results))


async def test_in_memory_swaps_the_backends_of_an_app_server() -> None:
    """An app's server built on NATS (nothing listens at its URL) runs its jobs on fresh
    in-memory backends inside ``in_memory()``, and has its own back after each block."""
    from tasqueue_anyio.brokers.nats import NatsBroker
    from tasqueue_anyio.results.nats import NatsResults

    broker, results = NatsBroker("nats://127.0.0.1:1"), NatsResults("nats://127.0.0.1:1")
    server = Server(broker=broker, results=results)

    @server.task()
    async def double(x: int) -> int:
        return 2 * x

    with in_memory(server) as swapped:
        assert swapped is server
        assert server.broker is not broker
        async with worker(server):
            job = await double.enqueue(21)
            assert await job.result(timeout=TIMEOUT) == 42
    assert (server.broker, server.results) == (broker, results)
    with in_memory(server):  # every block starts empty
        async with server:
            with pytest.raises(JobNotFoundError):
                await job.status()
            counts = await server.counts("default")
            assert counts.empty
            assert counts.successful == 0


async def test_in_memory_refuses_an_open_server() -> None:
    server = Server()
    broker = server.broker
    async with server:
        with pytest.raises(RuntimeError, match="needs a closed Server"), in_memory(server):
            pass
    assert server.broker is broker
    with pytest.raises(RuntimeError, match="left open"), in_memory(server):
        await server.__aenter__()
    assert server.broker is broker  # restored, though the block failed
    await server.__aexit__(None, None, None)
