"""Tutorial 8: tests of tutorial 6's tasks module, which is built on Redis, run on in-memory
backends (no Redis needed), on asyncio and on Trio. Run them with
``python3 -m pytest -q test_tasks.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tasks

from tasqueue_anyio import JobFailedError, Server
from tasqueue_anyio.testing import drain, in_memory, worker

pytestmark = pytest.mark.anyio  # every async test runs with AnyIO's pytest plugin


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param  # each test runs twice: on asyncio, then on Trio
    return backend


@pytest.fixture
def server() -> Iterator[Server]:
    with in_memory(tasks.server):  # fresh, empty in-memory backends for each test
        yield tasks.server


async def test_a_thumbnail(server: Server) -> None:
    async with worker(server):  # the workers run for the block
        job = await tasks.thumbnail.enqueue("cat.png", 200)
        assert await job.result(timeout=5) == "cat-200.png"


async def test_a_bad_size_fails(server: Server) -> None:
    async with worker(server):
        job = await tasks.thumbnail.options(max_retries=0).enqueue("cat.png", 0)
        with pytest.raises(JobFailedError, match="size must be positive"):
            await job.result(timeout=5)


async def test_a_batch(server: Server) -> None:
    async with server:
        jobs = [await tasks.thumbnail.enqueue(f"p{n}.png", 100) for n in range(5)]
        await drain(server)  # runs the workers until the queues are empty
        assert [await job.result() for job in jobs] == [f"p{n}-100.png" for n in range(5)]
        counts = await server.counts("images")
        assert (counts.successful, counts.failed) == (5, 0)


async def test_the_function_itself() -> None:
    assert await tasks.thumbnail("dog.png", 50) == "dog-50.png"  # a plain call: no queue
