"""The counted lifetime shared by the networked backends.

A backend is an async context manager that owns its connections and background tasks;
entering an open backend again only counts, and it closes when the last entry exits
(several servers of one process may share a backend).
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

    @property
    def is_open(self) -> bool:
        """Whether the backend is entered."""
        return self._entries > 0

    async def __aenter__(self: _L) -> _L:
        if self._entries:
            self._entries += 1
            return self
        async with AsyncExitStack() as stack:
            with self._opening_errors():
                await self._connect(stack)
                await self._open()
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self._start(self._tg)
            self._stack = stack.pop_all()
        self._entries = 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._entries == 0:
            return
        self._entries -= 1
        if self._entries:
            return
        stack, self._stack = self._stack, None
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
        self._closing()
        if stack is not None:
            await stack.__aexit__(exc_type, exc_val, exc_tb)
        self._closed()

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
