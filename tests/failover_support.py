"""What the tests that kill a server under load share (not a test module itself): a
task that records its effect per job id, and an enqueue retried while the servers fail
over."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import anyio

from tasqueue_anyio import BrokerError, Job, JobHandle, Server, TaskFunction, current_job

__all__ = ["Effects", "enqueue_until_stored"]


class Effects:
    """Registers task ``effect(n) -> n`` on ``server`` (queue ``q``, concurrency 8): it
    counts its runs by job id in :attr:`runs` and sets :attr:`enough` once ``enough``
    jobs ran."""

    def __init__(self, server: Server, enough: int) -> None:
        self.runs: Counter[str] = Counter()
        self.enough = anyio.Event()

        @server.task(queue="q", concurrency=8)
        async def effect(n: int) -> int:
            self.runs[current_job().job_id] += 1
            if len(self.runs) >= enough:
                self.enough.set()
            await anyio.sleep(0.005)
            return n

        self.task: TaskFunction[[int], int] = effect

    def jobs(self, start: int, count: int) -> list[Job]:
        return [self.task.job(n) for n in range(start, start + count)]

    @property
    def twice(self) -> int:
        """How many jobs ran more than once (at-least-once delivery)."""
        return sum(1 for n in self.runs.values() if n > 1)


async def enqueue_until_stored(
    server: Server, jobs: Sequence[Job], timeout: float = 30
) -> tuple[list[JobHandle[Any]], int]:
    """Enqueue ``jobs``, the same batch again after each :class:`BrokerError` (an election
    or a failover going on) until it is stored; return the handles and the retries."""
    retries = 0
    with anyio.fail_after(timeout):
        while True:
            try:
                return await server.enqueue_many(jobs), retries
            except BrokerError:
                retries += 1
                await anyio.sleep(0.2)
