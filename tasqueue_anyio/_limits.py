"""Queue limits on a worker's side: the permit a job of a limited queue waits for before it
starts, taken from the broker so that every worker of the backend shares the limits."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from ._retry import RetryBackoff
from .abc import Broker, QueueLimits, limit_channel

__all__ = ["PERMIT_LEASE", "Limiter", "Permits", "permit_wait"]

#: Seconds a running slot stays held without renewal (its worker renews it every third):
#: how long a worker that died keeps a slot.
PERMIT_LEASE = 15.0


class Permits:
    """The permits of one limited queue: start times in the window, running slots (the
    memory broker keeps them as they are, the NATS broker stores them in a KV value)."""

    __slots__ = ("running", "starts")

    def __init__(self) -> None:
        self.starts: deque[float] = deque()
        #: token -> lease expiry
        self.running: dict[str, float] = {}


def permit_wait(
    state: Permits, limits: QueueLimits, token: str, lease: float, now: float
) -> float:
    """Take a permit in ``state`` at ``now`` (0.0), or the seconds until one may be free
    (see :meth:`~tasqueue_anyio.abc.Broker.acquire_permit`)."""
    wait = 0.0
    if limits.runs is not None:
        starts = state.starts
        while starts and starts[0] <= now - limits.per:
            starts.popleft()
        if len(starts) >= limits.runs:
            wait = starts[0] + limits.per - now
    running = state.running
    if limits.running is not None:
        for held, expiry in list(running.items()):
            if expiry <= now:
                del running[held]
        if token not in running and len(running) >= limits.running:
            wait = max(wait, min(min(running.values()) - now, 1.0))
    if wait > 0:
        return wait
    if limits.runs is not None:
        state.starts.append(now)
    if limits.running is not None:
        running[token] = now + lease
    return 0.0


class Limiter:
    """The permits of one limited queue for one worker.

    A processor that received a delivery of the queue waits in :meth:`permit` until the
    broker gives it one: no spinning, it sleeps until the time the broker names (the
    window's next free start) or until a release of a running slot is announced
    (:func:`~tasqueue_anyio.abc.limit_channel`), whichever comes first. :meth:`run`
    renews the running slots this worker holds.
    """

    def __init__(self, broker: Broker, queue: str, limits: QueueLimits, log: logging.Logger):
        self.broker = broker
        self.queue = queue
        self.limits = limits
        self.log = log
        #: tokens of the running slots held by this worker's jobs
        self.held: set[str] = set()
        self._released = anyio.Event()

    def _on_release(self, data: bytes) -> None:
        released, self._released = self._released, anyio.Event()
        released.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen for releases and renew this worker's running slots, until cancelled."""
        async with self.broker.subscribe(limit_channel(self.queue), self._on_release):
            task_status.started()
            if self.limits.running is None:
                await anyio.sleep_forever()
            retry = RetryBackoff(self.log, f"renewing the permits of queue {self.queue!r}", {})
            while True:
                await anyio.sleep(PERMIT_LEASE / 3)
                if not self.held:
                    continue
                try:
                    await self.broker.renew_permits(self.queue, set(self.held), PERMIT_LEASE)
                except Exception as exc:
                    await retry.failed(exc)
                else:
                    retry.succeeded()

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        """Wait for a permit, hold it for the block (a running slot; a start is counted
        when taken), release it after (shielded)."""
        token = os.urandom(8).hex()
        while True:
            released = self._released
            wait = await self.broker.acquire_permit(self.queue, self.limits, token, PERMIT_LEASE)
            if wait <= 0:
                break
            with anyio.move_on_after(wait):
                await released.wait()
        if self.limits.running is None:
            yield
            return
        self.held.add(token)
        try:
            yield
        finally:
            self.held.discard(token)
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                try:
                    await self.broker.release_permit(self.queue, token)
                except Exception as exc:  # its lease frees it
                    self.log.warning(
                        "could not release a running slot of queue %r (its lease frees it "
                        "within %s s): %s",
                        self.queue,
                        PERMIT_LEASE,
                        exc,
                        extra={"queue": self.queue},
                    )
