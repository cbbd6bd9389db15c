"""Helpers shared by the ``test_server_*`` suites (not a test module itself)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskGroup

from tasqueue_anyio import JobContext, Server

#: Upper bound for anything a test waits on; every job in these tests ends in far less.
TIMEOUT = 5.0


async def wait_event(event: anyio.Event, timeout: float = TIMEOUT) -> None:
    """Wait for ``event``, failing the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        await event.wait()


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[TaskGroup]:
    """Run ``server``'s workers in a task group for the duration of the block."""
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield tg
        tg.cancel_scope.cancel()


async def noop(payload: bytes, ctx: JobContext) -> None:
    """A handler that does nothing."""


class Counter:
    """Counts handler runs and records the payloads, as a handler of its own."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.event = anyio.Event()

    @property
    def count(self) -> int:
        return len(self.payloads)

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.payloads.append(payload)
        self.event.set()
