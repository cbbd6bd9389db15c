"""An enqueue that failed after recording its jobs' state, and could not delete the state
again (the backend was down for both), left jobs ``queued`` with no message. Retrying the
enqueue with the same jobs must not skip them as "already live": their messages are sent
again (the broker keeps one message per id), and they run once."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from shim_support import ShimBroker

from tasqueue_anyio import BrokerError, Server, Status
from tasqueue_anyio.abc import Envelope
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults
from tasqueue_anyio.testing import worker

pytestmark = pytest.mark.anyio


class DownOnce(ShimBroker):
    """Refuses its first enqueue, as a broker whose server just went down."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker())
        self.refusals = 1

    async def enqueue_many(self, messages: Sequence[Envelope]) -> None:
        if self.refusals:
            self.refusals -= 1
            raise BrokerError("the server is down")
        await super().enqueue_many(messages)


async def test_a_retried_enqueue_sends_what_a_failed_one_left_out() -> None:
    results = MemoryResults()
    server = Server(broker=DownOnce(), results=results)
    runs: list[int] = []

    @server.task()
    async def double(n: int) -> int:
        runs.append(n)
        return 2 * n

    async def refuse(job_id: str) -> None:
        raise BrokerError("the store is down too")

    async with server:  # open, with no worker yet
        deleting = results.delete_job
        results.delete_job = refuse  # type: ignore[method-assign]
        job = double.job(21)
        with pytest.raises(BrokerError, match="the server is down"):
            await server.enqueue(job)
        # left behind: recorded queued, and no message anywhere
        assert (await server.get_job(job.id)).status is Status.QUEUED
        assert (await server.counts("default")).pending == 0
        results.delete_job = deleting  # type: ignore[method-assign]
        handle = await server.enqueue(job)  # the retry
        await server.enqueue(job)  # and once more: the broker keeps one message
        assert (await server.counts("default")).pending == 1
    async with worker(server):
        assert await handle.result(timeout=5) == 42
    assert runs == [21]
