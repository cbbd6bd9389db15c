"""A TCP proxy on 127.0.0.1 that a test controls, to cut a client off its server (not a
test module itself).

:func:`tcp_proxy` runs one in the caller's task group (AnyIO: asyncio and Trio) and
forwards every connection made to ``127.0.0.1:proxy.port`` to the target port on
127.0.0.1. The test cuts the link in one of two ways, and restores it:

- :meth:`TcpProxy.pause`: a silent partition. Connections stay open, but no byte moves
  in either direction (what arrives is held, and a new connection gets no upstream until
  the link is back): a client's calls neither fail nor return.
- :meth:`TcpProxy.drop`: a loud one. Every connection is closed, and new connections are
  closed as soon as they are accepted: a client's calls fail, and its reconnection
  attempts fail too.
- :meth:`TcpProxy.resume`: bytes flow again (held ones first); new connections reach the
  server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskStatus

__all__ = ["TcpProxy", "tcp_proxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``; see the module."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        #: the port the proxy listens on (set when it serves)
        self.port = 0
        #: connections accepted so far (reconnections show here)
        self.accepted = 0
        self._flowing = anyio.Event()
        self._flowing.set()
        self._dropped = False
        self._connections: set[anyio.CancelScope] = set()

    @property
    def url_host(self) -> str:
        """``127.0.0.1:port``, for a URL."""
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Stop moving bytes, both ways, on every connection (they stay open)."""
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def drop(self) -> None:
        """Close every connection, and each new one at once, until :meth:`resume`."""
        self._dropped = True
        for scope in self._connections:
            scope.cancel()

    def resume(self) -> None:
        """Forward again (held bytes first); accept connections again."""
        self._dropped = False
        self._flowing.set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward connections until cancelled."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(SocketAttribute.local_port)
            task_status.started()
            await listener.serve(self._connection)

    async def _connection(self, client: SocketStream) -> None:
        self.accepted += 1
        async with client:
            if self._dropped:
                return
            with anyio.CancelScope() as scope:
                self._connections.add(scope)
                try:
                    await self._wait_flowing()
                    upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
                    async with upstream, anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, client, upstream, scope)
                        tg.start_soon(self._pump, upstream, client, scope)
                finally:
                    self._connections.discard(scope)

    async def _wait_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _pump(self, source: ByteStream, sink: ByteStream, scope: anyio.CancelScope) -> None:
        """Copy ``source`` to ``sink``, holding the bytes while paused; one side closing
        closes the whole connection."""
        try:
            while True:
                await self._wait_flowing()
                data = await source.receive()
                await self._wait_flowing()
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` to ``127.0.0.1:target_port``, serving inside the block."""
    proxy = TcpProxy(target_port)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
