"""Shared fixtures: the AnyIO backends and the broker and results backends under test.

Every async test runs on asyncio and on Trio. The contract suites run against every
backend listed in :data:`BROKER_FACTORIES` and :data:`RESULTS_FACTORIES` (the server
suites too, except the :data:`CONTRACT_ONLY` ones): a new backend
only adds an entry (a callable returning an async context manager that yields a ready
backend, and cleans up on exit).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from uuid import uuid4

import anyio
import pytest
from redis_cluster import RedisCluster, shared_cluster, stop_shared_cluster
from redis_server import UNCLOSED_STREAM, RedisServer, shared_server, stop_shared_server

from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults


def redis_broker() -> AbstractAsyncContextManager[Broker]:
    """A broker on the session's Redis server, under a prefix of its own."""
    from tasqueue_anyio.brokers.redis import RedisBroker

    return RedisBroker(shared_server().url, prefix=f"t{uuid4().hex[:12]}")


def redis_results() -> AbstractAsyncContextManager[Results]:
    """A results store on the session's Redis server, under a prefix of its own."""
    from tasqueue_anyio.results.redis import RedisResults

    return RedisResults(shared_server().url, prefix=f"t{uuid4().hex[:12]}")


def redis_cluster_broker() -> AbstractAsyncContextManager[Broker]:
    """A broker on the session's Redis Cluster, under a prefix of its own."""
    from tasqueue_anyio.brokers.redis import RedisBroker

    return RedisBroker(shared_cluster().url, prefix=f"t{uuid4().hex[:12]}")


def redis_cluster_results() -> AbstractAsyncContextManager[Results]:
    """A results store on the session's Redis Cluster, under a prefix of its own."""
    from tasqueue_anyio.results.redis import RedisResults

    return RedisResults(shared_cluster().url, prefix=f"t{uuid4().hex[:12]}")


def _nats_url(old: bool) -> str:
    from nats_server import shared_nats_server, shared_old_nats_server

    return (shared_old_nats_server() if old else shared_nats_server()).url


@asynccontextmanager
async def nats_broker(*, old: bool = False) -> AsyncIterator[Broker]:
    """A broker on the session's NATS server (``old``: the old one), on a stream of its
    own (deleted after)."""
    from tasqueue_anyio.brokers.nats import NatsBroker

    async with NatsBroker(_nats_url(old), prefix=f"t{uuid4().hex[:12]}") as broker:
        try:
            yield broker
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await broker.js.delete_stream(broker.stream)


@asynccontextmanager
async def nats_results(*, old: bool = False) -> AsyncIterator[Results]:
    """A results store on the session's NATS server (``old``: the old one), in a bucket of
    its own (deleted after)."""
    from tasqueue_anyio.results.nats import NatsResults

    async with NatsResults(_nats_url(old), prefix=f"t{uuid4().hex[:12]}") as results:
        try:
            yield results
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await results.drop()


def nats_old_broker() -> AbstractAsyncContextManager[Broker]:
    """A broker on the session's old NATS server (:data:`nats_server.OLD_VERSION`)."""
    return nats_broker(old=True)


def nats_old_results() -> AbstractAsyncContextManager[Results]:
    """A results store on the session's old NATS server."""
    return nats_results(old=True)


#: backend name -> factory of an async context manager yielding an open broker
BROKER_FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[Broker]]] = {
    "memory": MemoryBroker,
    "redis": redis_broker,
    "redis-cluster": redis_cluster_broker,
    "nats": nats_broker,
    "nats-2.10": nats_old_broker,
}

#: backend name -> factory of an async context manager yielding an open results store
RESULTS_FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[Results]]] = {
    "memory": MemoryResults,
    "redis": redis_results,
    "redis-cluster": redis_cluster_results,
    "nats": nats_results,
    "nats-2.10": nats_old_results,
}


#: backends only the contract suites run (the server suites, which use the same
#: ``broker`` and ``results`` fixtures, skip them to keep the run short):
#: ``tests/test_redis_cluster.py`` runs a server on the cluster, and
#: ``tests/test_nats_old_server.py`` on the old NATS server (``nats-2.10``: nats-server
#: 2.10, without message schedules, per-key TTLs or batched direct gets)
CONTRACT_ONLY = {"redis-cluster", "nats-2.10"}
_CONTRACT_MODULES = {
    "test_contract_broker",
    "test_contract_claim",
    "test_contract_end_job",
    "test_contract_job_ttl",
    "test_contract_limits",
    "test_contract_priority",
    "test_contract_results",
    "test_contract_workers",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the :data:`CONTRACT_ONLY` backends outside the contract suites."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend_name") if callspec is not None else None
        module = item.module.__name__ if isinstance(item, pytest.Function) else ""
        if name in CONTRACT_ONLY and module not in _CONTRACT_MODULES:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def coredis_leaks() -> Iterator[None]:
    """Collects, after the test, what coredis leaked in it (see
    :data:`redis_server.COREDIS_LEAKS`), with their warnings ignored."""
    yield
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", UNCLOSED_STREAM, ResourceWarning)
        gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _redis_server_lifetime() -> Iterator[None]:
    """Stop the session's Redis server (started on first use, if any) at the end."""
    yield
    stop_shared_server()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """The session's Redis server (started now if not yet); skips without redis-server."""
    return shared_server()


@pytest.fixture(scope="session", autouse=True)
def _redis_cluster_lifetime() -> Iterator[None]:
    """Stop the session's Redis Cluster (started on first use, if any) at the end."""
    yield
    stop_shared_cluster()


@pytest.fixture(scope="session")
def redis_cluster() -> RedisCluster:
    """The session's three-master Redis Cluster (started now if not yet); skips without
    redis-server and redis-cli."""
    return shared_cluster()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on both AnyIO backends."""
    backend: str = request.param
    return backend


@pytest.fixture(params=sorted(BROKER_FACTORIES))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The backend under test; a test using both a broker and a results store gets the
    pair of one backend (not every combination of backends)."""
    name: str = request.param
    return name


@pytest.fixture
async def broker(backend_name: str, anyio_backend: str) -> AsyncIterator[Broker]:
    """An open broker of each registered backend."""
    async with BROKER_FACTORIES[backend_name]() as opened:
        yield opened


@pytest.fixture
async def results(backend_name: str, anyio_backend: str) -> AsyncIterator[Results]:
    """An open results store of each registered backend."""
    async with RESULTS_FACTORIES[backend_name]() as opened:
        yield opened


@pytest.fixture
def queue_name() -> str:
    """A queue name no other test uses (backends may be shared between tests)."""
    return f"q-{uuid4().hex[:12]}"


@pytest.fixture(scope="session", autouse=True)
def _nats_server_lifetime() -> Iterator[None]:
    """Stop the session's NATS servers (started on first use, if any) at the end."""
    yield
    from nats_server import stop_shared_nats_server

    stop_shared_nats_server()


from typing import TYPE_CHECKING  # noqa: E402  (appended with the NATS fixtures)


@pytest.fixture(scope="session")
def nats_server() -> NatsServer:
    """The session's ``nats-server -js`` (started now if not yet); skips without a binary."""
    from nats_server import shared_nats_server

    return shared_nats_server()


if TYPE_CHECKING:
    from nats_server import NatsServer
