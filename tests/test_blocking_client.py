"""BlockingClient: typed enqueue and handles from plain threads (8 at once), on an
asyncio or Trio loop of its own, with workers on memory, Redis and NATS."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

import anyio
import attrs
import pytest

from tasqueue_anyio import (
    BlockingClient,
    BlockingJobHandle,
    Chain,
    Group,
    InvalidInputError,
    JobCancelledError,
    JobFailedError,
    Server,
    Status,
    TaskFunction,
)
from tasqueue_anyio.abc import Broker, Results

TIMEOUT = 10.0


@attrs.frozen
class App:
    server: Server
    add: TaskFunction[[int, int], int]
    fail: TaskFunction[[str], None]
    hang: TaskFunction[[], None]
    hanging: threading.Event


def make_app(broker: Broker | None = None, results: Results | None = None) -> App:
    server = Server(broker=broker, results=results)
    hanging = threading.Event()

    @server.task(queue="blocking", concurrency=8)
    async def add(a: int, b: int) -> int:
        return a + b

    @server.task(queue="blocking")
    def fail(why: str) -> None:
        raise ValueError(why)

    @server.task(queue="blocking")
    async def hang() -> None:
        hanging.set()
        await anyio.sleep_forever()

    return App(server, add, fail, hang, hanging)


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def eight_threads(client: BlockingClient, app: App) -> None:
    def work(n: int) -> list[int]:
        jobs = [client.enqueue(app.add, n, i) for i in range(10)]
        return [job.result(timeout=TIMEOUT) for job in jobs]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(work, range(8)))
    assert outcomes == [[n + i for i in range(10)] for n in range(8)]


def test_eight_threads_at_once_with_the_worker_in_the_client(loop: str) -> None:
    app = make_app()
    with BlockingClient(client=app.server, run_worker=True, backend=loop) as client:
        eight_threads(client, app)
        counts = client.counts("blocking")
        assert counts.successful == 80
        assert counts.empty


def test_handles_errors_groups_and_chains(loop: str) -> None:
    app = make_app()
    with BlockingClient(client=app.server, run_worker=True, backend=loop) as client:
        job = client.enqueue(app.add, 1, 2)
        assert isinstance(job, BlockingJobHandle)
        assert isinstance(job, str)
        assert job.result(timeout=TIMEOUT) == 3
        assert job.status() is Status.SUCCESSFUL
        assert job.info().job.task == "add"
        assert client.job(job).wait(timeout=TIMEOUT).status is Status.SUCCESSFUL
        assert client.get_job(job).status is Status.SUCCESSFUL

        failed = client.enqueue(app.fail, "no luck")
        with pytest.raises(JobFailedError) as info:
            failed.result(timeout=TIMEOUT)
        assert info.value.error == "ValueError: no luck"

        hanging = client.enqueue(app.hang)
        with pytest.raises(TimeoutError):
            hanging.result(timeout=0.1)
        assert app.hanging.wait(TIMEOUT)
        assert hanging.cancel() is Status.PROCESSING
        with pytest.raises(JobCancelledError):
            hanging.result(timeout=TIMEOUT)

        group = client.enqueue_group(Group([app.add.job(1, 1), app.add.job(2, 2)]))
        assert group.result(timeout=TIMEOUT) == [2, 4]
        assert group.status() is Status.SUCCESSFUL
        chain = client.enqueue_chain(Chain([app.add.job(1, 1), app.add.link(10)]))
        assert chain.result(timeout=TIMEOUT) == 12
        many = client.enqueue_many([app.add.job(5, 5), app.add.job(6, 6)])
        assert [j.result(timeout=TIMEOUT) for j in many] == [10, 12]


def test_closed_client_and_bad_arguments(loop: str) -> None:
    app = make_app()
    client = BlockingClient(client=app.server, backend=loop)
    with pytest.raises(RuntimeError, match="not open"):
        client.enqueue(app.add, 1, 2)
    with client, pytest.raises(RuntimeError, match="already open"):
        client.open()
    with pytest.raises(RuntimeError, match="not open"):
        client.counts("blocking")
    client.close()  # closing again does nothing
    with pytest.raises(InvalidInputError):
        BlockingClient(client=app.server, broker=app.server.broker)
    with pytest.raises(InvalidInputError, match="run_worker"):
        BlockingClient(run_worker=True)


def test_called_from_its_own_loop_it_refuses_instead_of_hanging(loop: str) -> None:
    app = make_app()
    with BlockingClient(client=app.server, backend=loop) as client:
        portal = client._portal
        assert portal is not None

        async def inside() -> None:
            client.counts("blocking")

        with pytest.raises(RuntimeError, match="event loop thread"):
            portal.call(inside)


@pytest.fixture
def redis_backends() -> tuple[Broker, Results, Broker, Results]:
    """Two broker/store pairs on the session's Redis server under one prefix: the
    worker's and the blocking client's (each loop opens its own)."""
    from redis_server import shared_server

    from tasqueue_anyio.brokers.redis import RedisBroker
    from tasqueue_anyio.results.redis import RedisResults

    url, prefix = shared_server().url, f"t{uuid4().hex[:12]}"
    return (
        RedisBroker(url, prefix=prefix),
        RedisResults(url, prefix=prefix),
        RedisBroker(url, prefix=prefix),
        RedisResults(url, prefix=prefix),
    )


@pytest.fixture
def nats_backends() -> tuple[Broker, Results, Broker, Results]:
    from nats_server import shared_nats_server

    from tasqueue_anyio.brokers.nats import NatsBroker
    from tasqueue_anyio.results.nats import NatsResults

    url, prefix = shared_nats_server().url, f"t{uuid4().hex[:12]}"
    return (
        NatsBroker(url, prefix=prefix),
        NatsResults(url, prefix=prefix),
        NatsBroker(url, prefix=prefix),
        NatsResults(url, prefix=prefix),
    )


@pytest.mark.parametrize("backends", ["redis_backends", "nats_backends"])
def test_eight_threads_with_a_worker_in_another_loop(
    loop: str, backends: str, request: pytest.FixtureRequest
) -> None:
    """The worker runs in its own event loop (as in another process); the client's
    calls come from eight threads."""
    worker_broker, worker_results, broker, results = request.getfixturevalue(backends)
    app = make_app(worker_broker, worker_results)
    other = "trio" if loop == "asyncio" else "asyncio"
    with (
        BlockingClient(client=app.server, run_worker=True, backend=other),
        BlockingClient(broker, results, backend=loop) as client,
    ):
        eight_threads(client, app)
        assert client.counts("blocking").successful == 80
