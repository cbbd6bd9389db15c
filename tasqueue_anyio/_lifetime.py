"""The counted lifetime shared by the networked backends.

A backend is an async context manager that owns its connections and background tasks;
entering an open backend again only counts, and it closes when the last entry exits
(several servers of one process may share a backend).

Its connections and task group are opened in the task of the first entry, and cancel
scopes (so task groups) must be left in the task that entered them, in order: that task
must be the last to leave. Other tasks may enter and leave it while it is inside (so
open a backend shared by several tasks once, in an ``async with`` around them). When the
opening task leaves first, the backend is closed at once and its exit raises
``RuntimeError``; the other tasks' exits then do nothing (see docs/backends.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, AsyncExitStack, nullcontext
from types import TracebackType
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup

__all__ = ["CountedLifetime"]

_L = TypeVar("_L", bound="CountedLifetime")


class CountedLifetime:
    """Open on the first ``async with`` entry, close on the last exit.

    Subclasses connect in :meth:`_connect` (entering what they own on the stack), then
    :meth:`_open` and :meth:`_start` (background tasks in the backend's task group), and
    forget per-connection state in :meth:`_closing` and :meth:`_closed`.
    """

    def _init_lifetime(self) -> None:
        self._entries = 0
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        #: the task that opened the backend (the one that must leave it last)
        self._opener: int | None = None
        #: entries per task, of the current opening
        self._holders: dict[int, int] = {}
        #: set when an opening in progress ends (opened or failed)
        self._opening: anyio.Event | None = None

    @property
    def is_open(self) -> bool:
        """Whether the backend is entered."""
        return self._entries > 0

    async def __aenter__(self: _L) -> _L:
        task = anyio.get_current_task().id
        while self._opening is not None:  # another task is opening it: count on its result
            await self._opening.wait()
        if self._entries:
            self._entries += 1
            self._holders[task] = self._holders.get(task, 0) + 1
            return self
        self._opening = opening = anyio.Event()
        try:
            async with AsyncExitStack() as stack:
                with self._opening_errors():
                    await self._connect(stack)
                    await self._open()
                self._tg = await stack.enter_async_context(anyio.create_task_group())
                await self._start(self._tg)
                self._stack = stack.pop_all()
            self._entries = 1
            self._opener = task
            self._holders = {task: 1}
        finally:
            self._opening = None
            opening.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        task = anyio.get_current_task().id
        held = self._holders.get(task, 0)
        if held == 0:
            # not entered (or its opener closed it already, and said so)
            return
        self._entries -= 1
        if held > 1:
            self._holders[task] = held - 1
            return
        del self._holders[task]
        if task != self._opener:
            return
        # The opener's last exit: its task group and connections were entered in this
        # task, so they close here and now, whoever else is still inside.
        others = self._entries
        self._entries, self._opener, self._holders = 0, None, {}
        stack, self._stack = self._stack, None
        tg, self._tg = self._tg, None
        self._opening = closing = anyio.Event()  # a new entry waits until it is closed
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
            self._closing()
            if stack is not None:
                await stack.__aexit__(exc_type, exc_val, exc_tb)
            self._closed()
        finally:
            self._opening = None
            closing.set()
        if others:
            raise RuntimeError(
                f"{self!r} was closed by the task that opened it while other tasks were "
                f"still inside it ({others} entries): its connections and tasks belong to "
                f"the task that opens it, which must leave it last. Open it once in an "
                f"outer `async with` around the tasks (or servers) that share it"
            )

    def _opening_errors(self) -> AbstractContextManager[object]:
        """Translates the client library's errors while connecting and opening."""
        return nullcontext()

    async def _connect(self, stack: AsyncExitStack) -> None:
        """Open the connections this backend owns, entering them on ``stack``."""

    async def _open(self) -> None:
        """Prepare the server side (scripts, streams, buckets)."""

    async def _start(self, tg: TaskGroup) -> None:
        """Start background tasks in the backend's task group."""

    def _closing(self) -> None:
        """Forget per-connection state, before the connections close."""

    def _closed(self) -> None:
        """Forget the connections, after they closed."""
