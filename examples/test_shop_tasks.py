"""Testing your own tasks: the example test that docs/testing.md explains. Run it with
``python3 -m pytest examples/test_shop_tasks.py`` (the project's suite runs it on
asyncio and Trio)."""

from __future__ import annotations

import pytest
from shop_tasks import Shop, make_shop

from tasqueue_anyio import Chain, JobFailedError
from tasqueue_anyio.testing import drain, worker

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def shop() -> Shop:
    return make_shop()  # a fresh server on empty in-memory backends per test


async def test_a_task_returns_its_result(shop: Shop) -> None:
    async with worker(shop.server):
        job = await shop.add_to_cart.enqueue("alice", 2)
        assert await job.result(timeout=5) == 2
        progress = await job.progress()
        assert progress is not None
        assert progress.message == "alice has 2 items"


async def test_a_failing_task(shop: Shop) -> None:
    async with worker(shop.server):
        job = await shop.add_to_cart.enqueue("bob", 0)
        with pytest.raises(JobFailedError, match="cannot add 0 items"):
            await job.result(timeout=5)


async def test_drain_runs_everything_enqueued(shop: Shop) -> None:
    async with shop.server:
        jobs = [await shop.add_to_cart.enqueue("carol", 1) for _ in range(5)]
        await drain(shop.server)  # runs the workers until the queues are empty
        assert sorted([await job.result() for job in jobs]) == [1, 2, 3, 4, 5]
        counts = await shop.server.counts("shop")
        assert counts.empty
        assert counts.successful == 5


async def test_a_chain(shop: Shop) -> None:
    async with worker(shop.server):
        links = [shop.add_to_cart.job("dave", 3), shop.checkout.job("dave")]
        chain = await shop.server.enqueue_chain(Chain(links))
        assert await chain.result(timeout=5) == "dave: 3 items paid"
