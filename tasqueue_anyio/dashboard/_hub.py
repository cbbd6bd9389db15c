"""Live updates for every open dashboard page of one process.

The hub listens to the events the client already subscribes to (job ends, cancels,
progress: one subscription per process, whatever the number of tabs) and fans them out to
one memory object stream per open page. Counts have no events of their own (an enqueue
announces nothing), so while at least one page is open, *one* of the open pages' tasks,
the leader, re-reads the queues' counts every few seconds, and at once after an event,
and broadcasts them when they changed: one reader per process, not one per tab. When
the leader's page closes, the next page's task takes over.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._client import Client
from .._codec import EVENT_CANCEL, EVENT_FINISHED, EVENT_PROGRESS

__all__ = ["Activity", "Hub"]

_log = logging.getLogger("tasqueue_anyio.dashboard")

#: Messages an open page may fall behind by before the oldest are dropped for it.
PAGE_BUFFER = 256
#: Seconds of one bar of the throughput sparkline, and how many bars it keeps.
BUCKET = 10.0
BUCKETS = 60


@attrs.frozen
class Activity:
    """One line of the activity feed: a job ended or was cancelled, as an event said."""

    at: float
    kind: str
    job_id: str
    status: str


class Hub:
    """Fans the client's events out to open pages, and keeps the counts fresh.

    :param render_counts: reads the counts and renders their fragment (the leader's
        work); raising means the backend is unavailable
    :param render_activity: renders one activity line
    :param render_banner: renders the banner for an error (``None``: no banner)
    :param interval: seconds between two count reads while pages are open
    :param on_end: told the status of every job end heard of
    """

    def __init__(
        self,
        client: Client,
        render_counts: Callable[[], Awaitable[str]],
        render_activity: Callable[[Activity], str],
        render_banner: Callable[[str | None], str],
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.render_counts = render_counts
        self.render_activity = render_activity
        self.render_banner = render_banner
        self.interval = interval
        self.clock = clock
        self.on_end = on_end
        self.activity: deque[Activity] = deque(maxlen=50)
        #: job ends per BUCKET seconds, newest last: (bucket start, count)
        self.throughput: deque[tuple[float, int]] = deque(maxlen=BUCKETS)
        self.backend_error: str | None = None
        self._pages: set[MemoryObjectSendStream[tuple[str, str]]] = set()
        self._leader: anyio.Lock | None = None
        self._wake: anyio.Event | None = None
        self._last_counts = ""
        self._listening = False

    # -- events ---------------------------------------------------------------------------

    def _on_event(self, kind: str, job_id: str, status: str) -> None:
        if kind not in (EVENT_FINISHED, EVENT_CANCEL, EVENT_PROGRESS):
            return
        if kind != EVENT_PROGRESS:
            now = self.clock()
            if kind == EVENT_FINISHED:
                self._count_end(now)
                if self.on_end is not None:
                    self.on_end(status)
            line = Activity(now, kind, job_id, status)
            self.activity.appendleft(line)
            self._broadcast("activity", self.render_activity(line))
            if self._wake is not None:
                self._wake.set()  # the counts changed: the leader reads them now
        self._broadcast(f"job-{job_id}", kind)

    def _count_end(self, now: float) -> None:
        start = math.floor(now / BUCKET) * BUCKET
        if self.throughput and self.throughput[-1][0] == start:
            self.throughput[-1] = (start, self.throughput[-1][1] + 1)
        else:
            self.throughput.append((start, 1))

    def sparkline(self) -> list[int]:
        """Job ends per bar over the last ``BUCKETS`` bars, oldest first (zeros included)."""
        now = math.floor(self.clock() / BUCKET) * BUCKET
        ends = dict(self.throughput)
        return [ends.get(now - BUCKET * (BUCKETS - 1 - i), 0) for i in range(BUCKETS)]

    def _broadcast(self, name: str, data: str) -> None:
        for page in tuple(self._pages):
            try:
                page.send_nowait((name, data))
            except anyio.WouldBlock:
                _log.debug("a dashboard page fell behind; an update was dropped for it")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._pages.discard(page)

    # -- pages ------------------------------------------------------------------------------

    async def _listen(self) -> None:
        if not self._listening:
            self.client._listeners.append(self._on_event)
            self._listening = True
        await self.client._listen_finished()  # job ends come on their own channel

    @asynccontextmanager
    async def page(self) -> AsyncIterator[MemoryObjectReceiveStream[tuple[str, str]]]:
        """One open page's updates, as ``(event name, data)``; while it is open, its task
        takes its turn reading the counts for every page."""
        if self._leader is None:
            self._leader = anyio.Lock()
        await self._listen()
        send, receive = anyio.create_memory_object_stream[tuple[str, str]](PAGE_BUFFER)
        self._pages.add(send)
        if self._last_counts:  # what changed since the page was rendered
            send.send_nowait(("counts", self._last_counts))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._lead)
                with receive:
                    yield receive
                tg.cancel_scope.cancel()
        finally:
            self._pages.discard(send)
            send.close()

    async def _lead(self) -> None:
        assert self._leader is not None
        async with self._leader:
            self._last_counts = ""  # a new leader sends the counts once, whatever they are
            while True:
                self._wake = anyio.Event()
                await self._refresh()
                with anyio.move_on_after(self.interval):
                    await self._wake.wait()
                await anyio.sleep(0.2)  # let a burst of events settle into one read

    async def _refresh(self) -> None:
        try:
            with anyio.fail_after(max(self.interval, 5.0)):
                html = await self.render_counts()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if error != self.backend_error:
                self.backend_error = error
                _log.warning("the dashboard cannot read the backend: %s", error)
                self._broadcast("backend", self.render_banner(error))
            return
        if self.backend_error is not None:
            self.backend_error = None
            self._broadcast("backend", self.render_banner(None))
        if html != self._last_counts:
            self._last_counts = html
            self._broadcast("counts", html)
