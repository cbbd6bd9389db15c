"""Shared fixtures: the AnyIO backends and the broker and results backends under test.

Every async test runs on asyncio and on Trio. The contract suites run against every
backend listed in :data:`BROKER_FACTORIES` and :data:`RESULTS_FACTORIES`: a new backend
only adds an entry (a callable returning an async context manager that yields a ready
backend, and cleans up on exit).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from uuid import uuid4

import pytest

from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

#: backend name -> factory of an async context manager yielding an open broker
BROKER_FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[Broker]]] = {
    "memory": MemoryBroker,
}

#: backend name -> factory of an async context manager yielding an open results store
RESULTS_FACTORIES: dict[str, Callable[[], AbstractAsyncContextManager[Results]]] = {
    "memory": MemoryResults,
}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on both AnyIO backends."""
    backend: str = request.param
    return backend


@pytest.fixture(params=sorted(BROKER_FACTORIES))
async def broker(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Broker]:
    """An open broker of each registered backend."""
    factory = BROKER_FACTORIES[request.param]
    async with factory() as opened:
        yield opened


@pytest.fixture(params=sorted(RESULTS_FACTORIES))
async def results(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Results]:
    """An open results store of each registered backend."""
    factory = RESULTS_FACTORIES[request.param]
    async with factory() as opened:
        yield opened


@pytest.fixture
def queue_name() -> str:
    """A queue name no other test uses (backends may be shared between tests)."""
    return f"q-{uuid4().hex[:12]}"
