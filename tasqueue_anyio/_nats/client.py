"""An AnyIO NATS client: one connection, its reader, writer and keepalive tasks, reconnects.

:class:`~tasqueue_anyio.Client` is an async context manager. Entering it connects (or raises); inside, a task
group owned by the client runs one *connection manager* task, which for each live connection
runs three tasks in a task group of the connection's own:

* the **reader** feeds the sans-io :class:`~.protocol.Parser` and dispatches: messages to
  their subscription's bounded buffer, replies to their waiting request, ``PING`` answered,
  ``PONG`` matched to the oldest outstanding ``PING``, ``-ERR`` raised where it belongs;
* the **writer** drains one bounded queue of encoded commands, coalescing whatever is queued
  into one socket write (so many publishes cost one system call);
* the **pinger** sends a keepalive ``PING`` every ``ping_interval`` seconds and declares the
  connection dead when ``max_outstanding_pings`` of them go unanswered.

Beside the manager, an **expiry** task times out the requests of a timeout of a second or
more (checking every 50 ms, and idle while none waits), so that such a request costs no
cancel scope of its own; shorter ones, and requests that find the write queue full, keep
a scope each.

When the connection fails, the manager fails every request and flush waiting on it
(:class:`ConnectionLostError`), then reconnects with bounded, jittered exponential backoff,
re-sends ``SUB`` for every live subscription and resumes the writer, so publishes queued
during the outage go out in order after the re-subscriptions. When it gives up (or the client
is closed), subscriptions end and every call raises :class:`ConnectionClosedError`.

**Slow consumers.** Each subscription buffers at most ``max_pending`` messages and
``max_pending_bytes`` bytes (payloads and headers; a message is always taken into an empty
buffer, so one larger than the byte bound still gets through). When a message arrives at a
full buffer it is *dropped* (the newest one, as the server itself does for a slow
client), :attr:`Subscription.dropped` counts it, and the subscriber's next receive raises
:class:`SlowConsumerError` once, before it goes on with the buffered messages. Nothing is
silently lost from the subscriber's point of view, and one slow subscriber never blocks the
reader (which would stall every other subscription and the keepalive). JetStream pull fetches
and batched direct gets never overflow: their buffer is sized to the batch they asked for, and
they ask the server for at most :meth:`Client.reply_budget` bytes (``max_bytes``), which it
holds.

**Limits from the server.** The server's ``INFO`` announces its ``max_payload``, the largest
message it accepts and so the largest it may deliver; the client's parser accepts messages of
up to twice that (JetStream adds headers to what it delivers), at least
:data:`~.protocol.DEFAULT_MAX_PAYLOAD`. The ``INFO`` is not trusted for more than
``max_payload_limit`` (64 MiB by default, the server's own ceiling): a server that announces
more is refused at connect (:class:`ConnectError`), and one that announces more later loses
the connection (:class:`ProtocolError`), so a server cannot make the client buffer messages of
any size it likes.
"""

from __future__ import annotations

import base64
import itertools
import logging
import random
import re
import secrets
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.tls import TLSStream

from .protocol import (
    DEFAULT_MAX_PAYLOAD,
    PING,
    PONG,
    Err,
    HeadersInput,
    Info,
    InvalidSubjectError,
    Msg,
    NatsError,
    Ok,
    Parser,
    Ping,
    Pong,
    ProtocolError,
    encode_connect,
    encode_headers,
    encode_pub_block,
    encode_sub,
    encode_unsub,
    validate_publish_subject,
    validate_subscribe_subject,
)

__all__ = [
    "AuthorizationError",
    "Client",
    "ConnectError",
    "ConnectionClosedError",
    "ConnectionLostError",
    "FlushTimeoutError",
    "MaxPayloadError",
    "NoRespondersError",
    "PermissionViolationError",
    "ReplyInbox",
    "RequestTimeoutError",
    "ServerError",
    "SlowConsumerError",
    "StaleConnectionError",
    "Subscription",
]

logger = logging.getLogger("tasqueue_anyio.nats")

LANG = "python-anyio"
CLIENT_VERSION = "0.1.0"
DEFAULT_URL = "nats://127.0.0.1:4222"
#: A subscription's default bound on buffered bytes (payloads and headers).
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024
#: Requests with a timeout of at least this many seconds are timed by the client's expiry
#: task, which looks every :data:`_EXPIRY_TICK` seconds, instead of a cancel scope each
#: (a scope costs a request 20-35 µs of CPU): they time out at most one tick late.
_EXPIRY_MIN_TIMEOUT = 1.0
_EXPIRY_TICK = 0.05

# --------------------------------------------------------------------------- errors


class ConnectError(NatsError):
    """No connection could be made (refused, timed out, not a NATS server, TLS failure)."""


class ServerError(NatsError):
    """The server sent ``-ERR``; :attr:`fatal` tells whether it closed the connection."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(f"NATS server error: {message}")
        self.server_message = message
        self.fatal = fatal


class AuthorizationError(ServerError):
    """The server refused the credentials (user/password, token or NKey)."""


class PermissionViolationError(ServerError):
    """The user may not publish to or subscribe to a subject (the connection stays open)."""


class ConnectionLostError(NatsError):
    """The connection dropped while a request, flush or fetch was waiting on it.

    The client reconnects by itself (unless told not to); the operation may be retried.
    """


class ConnectionClosedError(NatsError):
    """The client is closed (by :meth:`Client.aclose` or after giving up reconnecting)."""


class StaleConnectionError(ConnectionLostError):
    """The server did not answer ``max_outstanding_pings`` keepalive pings."""


class NoRespondersError(NatsError):
    """A request found no subscriber on its subject (status 503)."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders are listening on subject {subject!r}")
        self.subject = subject


class RequestTimeoutError(NatsError, TimeoutError):
    """No reply came within the request's timeout."""


class FlushTimeoutError(NatsError, TimeoutError):
    """The server did not answer a flush ``PING`` within the timeout."""


class MaxPayloadError(NatsError, ValueError):
    """A message is larger than the server's ``max_payload``; nothing was sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes (payload and headers) is over the server's "
            f"max_payload of {limit} bytes; nothing was sent"
        )
        self.size = size
        self.limit = limit


class SlowConsumerError(NatsError):
    """A subscription's buffer was full and messages were dropped (see :attr:`dropped`)."""

    def __init__(self, subject: str, dropped: int) -> None:
        super().__init__(
            f"subscription on {subject!r} is a slow consumer: {dropped} message(s) dropped "
            f"because its buffer was full (raise max_pending or max_pending_bytes, or "
            f"receive faster)"
        )
        self.dropped = dropped


_PUBLISH_VIOLATION = re.compile(r'Publish to "([^"]+)"', re.IGNORECASE)


def _server_error(message: str) -> ServerError:
    lowered = message.lower()
    fatal = Err(message).fatal
    if (
        "authorization" in lowered
        or "authentication" in lowered
        or "user authentication" in lowered
    ):
        return AuthorizationError(message, fatal=True)
    if lowered.startswith("permissions violation"):
        return PermissionViolationError(message, fatal=False)
    return ServerError(message, fatal=fatal)


# --------------------------------------------------------------------------- helpers


def _describe(exc: BaseException) -> str:
    """A readable reason for a socket failure (anyio wraps the OSError)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError)) and cause:
        return str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__


class _Address:
    """One server from the ``servers`` list."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = "nats://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls"):
            raise InvalidSubjectError(f"unsupported URL scheme in {url!r} (use nats:// or tls://)")
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        try:
            self.port = parts.port or 4222
        except ValueError:
            raise InvalidSubjectError(f"invalid port in {url!r}") from None
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class _PingWaiter:
    """A flush waiting for the ``PONG`` of its ``PING``."""

    __slots__ = ("error", "event", "server_errors")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: NatsError | None = None
        self.server_errors: list[ServerError] = []


class _ReplyWaiter:
    """A request waiting for its one reply."""

    __slots__ = ("deadline", "error", "event", "msg", "subject")

    def __init__(self, subject: str, deadline: float = float("inf")) -> None:
        self.event = anyio.Event()
        self.msg: Msg | None = None
        self.error: NatsError | None = None
        #: the request's subject (a permission violation on it fails the request)
        self.subject = subject
        #: when the expiry task wakes it without a reply (``inf``: never, it times itself)
        self.deadline = deadline

    def expire(self) -> None:
        """Wake the request with neither a reply nor an error: it timed out."""
        if self.msg is None and self.error is None:
            self.event.set()

    def deliver(self, msg: Msg) -> None:
        if self.msg is None and self.error is None:
            self.msg = msg
            self.event.set()

    def fail(self, error: NatsError) -> None:
        if self.msg is None and self.error is None:
            self.error = error
            self.event.set()


class _Batch:
    """Requests of one :meth:`Client.request_batch` call, woken together by one event."""

    __slots__ = ("event", "missing", "replies")

    def __init__(self, size: int) -> None:
        self.event = anyio.Event()
        self.replies: list[Msg | NatsError | None] = [None] * size
        self.missing = size


class _BatchSlot:
    """One request of a :class:`_Batch` (in the client's reply table, like a
    :class:`_ReplyWaiter`)."""

    __slots__ = ("batch", "deadline", "index", "subject")

    def __init__(self, batch: _Batch, index: int, deadline: float, subject: str) -> None:
        self.batch = batch
        self.index = index
        self.deadline = deadline
        self.subject = subject

    def _settle(self, reply: Msg | NatsError) -> None:
        batch = self.batch
        if batch.replies[self.index] is None:
            batch.replies[self.index] = reply
            batch.missing -= 1
            if not batch.missing:
                batch.event.set()

    def expire(self) -> None:
        self._settle(RequestTimeoutError("no reply to a request of a batch in time"))

    def deliver(self, msg: Msg) -> None:
        self._settle(msg)

    def fail(self, error: NatsError) -> None:
        self._settle(error)


def _msg_size(msg: Msg) -> int:
    """The bytes a buffered message stands for: its payload and its header lines."""
    headers = msg.headers
    if headers is None:
        return len(msg.payload)
    return len(msg.payload) + sum(len(name) + len(value) + 4 for name, value in headers.items_)


class _MsgQueue:
    """A FIFO of messages between the reader and one subscriber, bounded in messages and in
    bytes (a message is always taken into an empty queue, whatever its size).

    (Not a memory object stream: those must be closed by their receiver, and a subscription
    object may simply be dropped by its user.)
    """

    __slots__ = ("_event", "_items", "_sizes", "bytes", "closed", "max_bytes", "maxsize")

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        self._items: deque[Msg] = deque()
        self._sizes: deque[int] = deque()
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        #: bytes buffered (see :func:`_msg_size`)
        self.bytes = 0
        self.closed = False
        self._event: anyio.Event | None = None

    def put(self, msg: Msg) -> bool:
        """Append ``msg``; ``False`` (and nothing appended) when full."""
        items = self._items
        size = _msg_size(msg)
        if items and (len(items) >= self.maxsize or self.bytes + size > self.max_bytes):
            return False
        items.append(msg)
        self._sizes.append(size)
        self.bytes += size
        self._wake()
        return True

    def close(self) -> None:
        """No more messages: a getter gets the buffered ones, then :class:`anyio.EndOfStream`."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def get(self) -> Msg:
        await anyio.lowlevel.checkpoint()
        while not self._items:
            if self.closed:
                raise anyio.EndOfStream
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        self.bytes -= self._sizes.popleft()
        return self._items.popleft()


class _Connection:
    """One live connection: its byte stream, parser and ping bookkeeping."""

    def __init__(
        self, stream: anyio.abc.ByteStream, parser: Parser, info: Info, address: _Address
    ) -> None:
        self.stream = stream
        self.parser = parser
        self.info = info
        self.address = address
        self.pongs: deque[_PingWaiter | None] = deque()
        self.keepalive_outstanding = 0


# --------------------------------------------------------------------------- subscription


class Subscription:
    """A subscription: iterate it (``async for msg in sub``) or call :meth:`next_msg`.

    Also an async context manager that unsubscribes on exit. Its buffer is bounded; see the
    module documentation for what happens when it is full.
    """

    def __init__(
        self,
        client: Client,
        sid: int,
        subject: str,
        queue: str | None,
        max_pending: int,
        max_pending_bytes: int | None = None,
    ) -> None:
        self._client = client
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self._queue = _MsgQueue(
            max_pending,
            client.max_pending_bytes if max_pending_bytes is None else max_pending_bytes,
        )
        #: messages dropped because the buffer was full
        self.dropped = 0
        self._slow_reported = 0
        self.delivered = 0
        self.max_msgs: int | None = None
        self._error: NatsError | None = None

    def _deliver(self, msg: Msg) -> bool:
        """Buffer ``msg``; return ``False`` when the auto-unsubscribe limit is reached."""
        self.delivered += 1
        if self._queue.closed:
            return False
        if not self._queue.put(msg):
            self.dropped += 1
            self._client._report(SlowConsumerError(self.subject, self.dropped))
        return self.max_msgs is None or self.delivered < self.max_msgs

    def _end(self, error: NatsError | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._queue.close()

    async def next_msg(self, timeout: float | None = None) -> Msg:
        """The next message.

        :param timeout: seconds to wait (``None``: forever)
        :raises TimeoutError: nothing arrived in time
        :raises SlowConsumerError: messages were dropped since the last receive
        :raises ConnectionClosedError: the subscription ended (unsubscribed, client closed);
            the error that closed the client, if any, is its cause
        """
        if self.dropped > self._slow_reported:
            self._slow_reported = self.dropped
            raise SlowConsumerError(self.subject, self.dropped)
        try:
            with anyio.fail_after(timeout):
                return await self._queue.get()
        except anyio.EndOfStream:
            if self._error is not None:
                raise self._error from None
            raise ConnectionClosedError(f"subscription on {self.subject!r} has ended") from None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        if self.dropped > self._slow_reported:
            self._slow_reported = self.dropped
            raise SlowConsumerError(self.subject, self.dropped)
        try:
            return await self._queue.get()
        except anyio.EndOfStream:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    async def unsubscribe(self, max_msgs: int | None = None) -> None:
        """Stop the subscription now, or after ``max_msgs`` messages in all."""
        await self._client._unsubscribe(self, max_msgs)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._client.is_closed:
            await self.unsubscribe()
        self._end()


class ReplyInbox(Subscription):
    """A private inbox subject for a request answered by many messages (a pull fetch).

    Its own subscription (JetStream delivers fetched messages with their stream subject, so
    they cannot be routed through the muxed request inbox by subject). Use it as
    ``async with client.reply_inbox(n) as inbox:`` and publish with ``reply=inbox.subject``.
    Unlike plain subscriptions it is *not* re-subscribed after a reconnect: the server
    forgets the request with the connection, so :meth:`receive` raises
    :class:`ConnectionLostError` instead.
    """

    async def receive(self) -> Msg:
        """The next message on the inbox.

        :raises ConnectionLostError: the connection dropped (messages may have been lost)
        :raises ConnectionClosedError: the client closed
        """
        return await self.next_msg()

    async def __aenter__(self) -> ReplyInbox:
        await self._client._subscribe_inbox(self)
        return self


# --------------------------------------------------------------------------- client


class Client:
    """A NATS connection (with reconnects), as an async context manager.

    :param servers: one URL or several (``nats://[user:password@]host:port``, or ``tls://``
        to require TLS); reconnects try them in turn
    :param name: connection name shown by the server's monitoring
    :param user: user name (overrides one in the URL)
    :param password: password for ``user``
    :param token: authentication token
    :param nkey: an NKey public key (``U...``) for NKey authentication, with ``signature_cb``
    :param signature_cb: signs the server's nonce for NKey or JWT authentication
    :param user_jwt: a user JWT (``creds`` authentication), with ``signature_cb``
    :param tls: an :class:`ssl.SSLContext`; it makes TLS required, and is used when the
        server requires TLS (``tls://`` URLs get ``ssl.create_default_context()``)
    :param tls_hostname: the name to check the server's certificate against (default: host)
    :param tls_handshake_first: start TLS before the server's ``INFO`` (the server must be
        configured with ``handshake_first``); the default upgrades after ``INFO``
    :param connect_timeout: seconds for one connection attempt, handshake included
    :param ping_interval: seconds between keepalive pings
    :param max_outstanding_pings: unanswered keepalive pings after which the connection is
        declared dead (and reconnected)
    :param reconnect: reconnect after losing the connection
    :param max_reconnect_attempts: attempts before giving up (``-1``: forever)
    :param reconnect_wait: first backoff delay in seconds, doubled each attempt
    :param reconnect_max_wait: bound of the backoff delay
    :param reconnect_jitter: fraction of each delay drawn at random (0 to 1)
    :param max_pending: default buffer of a subscription, in messages
    :param max_pending_bytes: default buffer of a subscription, in bytes of payload and
        headers (a message is always taken into an empty buffer)
    :param max_payload_limit: the largest ``max_payload`` a server may announce: the client
        accepts messages of up to twice the announced one, so a server announcing more is
        refused (:class:`ConnectError` at connect, the connection dropped later)
    :param write_queue_size: commands queued for the writer before publishers wait
    :param error_callback: called (synchronously) with asynchronous errors nobody awaits:
        a ``-ERR`` not claimed by a flush, a slow consumer, a lost connection
    """

    def __init__(
        self,
        servers: str | Sequence[str] = DEFAULT_URL,
        *,
        name: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        nkey: str | None = None,
        signature_cb: Callable[[bytes], bytes] | None = None,
        user_jwt: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        tls_handshake_first: bool = False,
        connect_timeout: float = 2.0,
        ping_interval: float = 60.0,
        max_outstanding_pings: int = 2,
        reconnect: bool = True,
        max_reconnect_attempts: int = 60,
        reconnect_wait: float = 0.1,
        reconnect_max_wait: float = 4.0,
        reconnect_jitter: float = 0.5,
        max_pending: int = 65536,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_payload_limit: int = DEFAULT_MAX_PAYLOAD,
        write_queue_size: int = 4096,
        error_callback: Callable[[NatsError], None] | None = None,
    ) -> None:
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise InvalidSubjectError("no server URL given")
        self._addresses = [_Address(url) for url in urls]
        self.name = name
        self._user = user
        self._password = password
        self._token = token
        self._nkey = nkey
        self._signature_cb = signature_cb
        self._user_jwt = user_jwt
        self._tls = tls
        self._tls_hostname = tls_hostname
        self._tls_handshake_first = tls_handshake_first
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.max_outstanding_pings = max_outstanding_pings
        self.reconnect = reconnect
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_wait = reconnect_wait
        self.reconnect_max_wait = reconnect_max_wait
        self.reconnect_jitter = min(max(reconnect_jitter, 0.0), 1.0)
        self.max_pending = max_pending
        for value, what in (
            (max_pending_bytes, "max_pending_bytes"),
            (max_payload_limit, "max_payload_limit"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidSubjectError(f"{what} must be an int >= 1, got {value!r}")
        self.max_pending_bytes = max_pending_bytes
        self.max_payload_limit = max_payload_limit
        self._error_callback = error_callback

        self._write_send, self._write_recv = anyio.create_memory_object_stream[
            tuple[bytes, _PingWaiter | None]
        ](write_queue_size)
        self._subs: dict[int, Subscription] = {}
        self._sids = itertools.count(1)
        self._replies: dict[str, _ReplyWaiter | _BatchSlot] = {}
        self._inboxes: set[ReplyInbox] = set()
        self._tokens = itertools.count(1)
        self._inbox_prefix = f"_INBOX.{secrets.token_hex(11)}"
        self._inbox_sid: int | None = None
        self._conn: _Connection | None = None
        self._info: Info | None = None
        self._connected = anyio.Event()
        self._closing = False
        self._closed = False
        self._final_error: NatsError | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._run_scope = anyio.CancelScope()
        self._expiry_scope = anyio.CancelScope()
        self._expiry_wake: anyio.Event | None = None
        self._timed = 0  # requests waiting that the expiry task times
        self._done = anyio.Event()
        #: completed reconnects
        self.reconnects = 0
        #: the last asynchronous error (also passed to ``error_callback``)
        self.last_error: NatsError | None = None

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> Client:
        if self._tg is not None or self._closed:
            raise ConnectionClosedError("a Client can be entered only once")
        try:
            conn = await self._connect_first()
        except BaseException:
            self._closed = True
            self._write_send.close()
            self._write_recv.close()
            raise
        self._conn = conn
        self._connected.set()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._run, conn)
        tg.start_soon(self._expire_requests)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._closed:
            try:
                with anyio.move_on_after(1):
                    await self.flush()
            except NatsError:
                pass
        self._closing = True
        self._run_scope.cancel()
        assert self._tg is not None
        # the body's own exception is not handed to the task group, which would wrap it in
        # an exception group: the background task is cancelled above, and the body's
        # exception propagates unchanged once the group has exited
        await self._tg.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the connection; subscriptions end, waiting calls raise. Idempotent."""
        self._closing = True
        self._run_scope.cancel()
        if self._tg is not None:
            await self._done.wait()

    @property
    def is_closed(self) -> bool:
        return self._closed or self._closing

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and not self.is_closed

    @property
    def server_info(self) -> Info:
        """The ``INFO`` of the current (or last) server."""
        assert self._info is not None, "not connected yet"
        return self._info

    @property
    def server_version(self) -> tuple[int, int, int]:
        return self.server_info.version

    @property
    def max_payload(self) -> int:
        return self.server_info.max_payload

    @property
    def connected_url(self) -> str | None:
        return str(self._conn.address) if self._conn is not None else None

    async def wait_connected(self) -> None:
        """Wait until the client is connected (now, or after a reconnect).

        :raises ConnectionClosedError: the client is closed (or gave up reconnecting)
        """
        while True:
            self._check_open()
            if self._conn is not None:
                return
            event = self._connected
            await event.wait()

    def _check_open(self) -> None:
        if self._closed or self._closing:
            if self._final_error is not None:
                raise ConnectionClosedError(
                    f"the NATS client is closed: {self._final_error}"
                ) from self._final_error
            raise ConnectionClosedError("the NATS client is closed")

    def _report(self, error: NatsError) -> None:
        self.last_error = error
        if self._error_callback is not None:
            try:
                self._error_callback(error)
            except Exception:  # a callback's bug must not kill the reader
                logger.exception("NATS error_callback raised")

    # ------------------------------------------------------------------ connecting

    async def _connect_first(self) -> _Connection:
        errors: list[str] = []
        for address in self._addresses:
            try:
                return await self._connect_to(address)
            except AuthorizationError:
                raise
            except NatsError as exc:
                errors.append(f"{address}: {exc}")
        raise ConnectError("could not connect to any NATS server: " + "; ".join(errors))

    def _ssl_context(self, address: _Address) -> ssl.SSLContext:
        if self._tls is not None:
            return self._tls
        return ssl.create_default_context()

    async def _tls_wrap(
        self, stream: anyio.abc.ByteStream, address: _Address
    ) -> anyio.abc.ByteStream:
        try:
            return await TLSStream.wrap(
                stream,
                hostname=self._tls_hostname or address.host,
                ssl_context=self._ssl_context(address),
                standard_compatible=False,
            )
        except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise ConnectError(f"TLS handshake with {address} failed: {exc}") from exc

    async def _read_event(self, stream: anyio.abc.ByteStream, parser: Parser) -> Any:
        while True:
            event = parser.next_event()
            if event is not None:
                return event
            try:
                data = await stream.receive(65536)
            except anyio.EndOfStream:
                raise ConnectError(
                    "the server closed the connection during the handshake"
                ) from None
            parser.feed(data)

    def _connect_options(self, info: Info, address: _Address, tls: bool) -> dict[str, Any]:
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": tls,
            "lang": LANG,
            "version": CLIENT_VERSION,
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "echo": True,
        }
        if self.name:
            options["name"] = self.name
        user = self._user or address.user
        password = self._password if self._password is not None else address.password
        if user and password is not None:
            options["user"] = user
            options["pass"] = password
        elif self._token is not None:
            options["auth_token"] = self._token
        elif user and password is None:
            options["auth_token"] = user  # nats://token@host
        if self._signature_cb is not None and info.nonce is not None:
            signature = self._signature_cb(info.nonce.encode())
            options["sig"] = base64.urlsafe_b64encode(signature).decode().rstrip("=")
            if self._nkey is not None:
                options["nkey"] = self._nkey
            if self._user_jwt is not None:
                options["jwt"] = self._user_jwt
        return options

    async def _connect_to(self, address: _Address) -> _Connection:
        """Open one connection: TCP, ``INFO``, TLS if needed, ``CONNECT``, ``PING``/``PONG``."""
        want_tls = self._tls is not None or address.scheme == "tls"
        try:
            with anyio.fail_after(self.connect_timeout):
                try:
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        address.host, address.port
                    )
                except OSError as exc:
                    raise ConnectError(f"could not connect to {address}: {exc}") from exc
                try:
                    return await self._handshake(stream, address, want_tls)
                except BaseException:
                    await anyio.aclose_forcefully(stream)
                    raise
        except TimeoutError:
            raise ConnectError(
                f"connecting to {address} timed out after {self.connect_timeout} s "
                f"(no INFO/PONG: is it a NATS server, does it expect TLS first?)"
            ) from None

    async def _handshake(
        self, stream: anyio.abc.ByteStream, address: _Address, want_tls: bool
    ) -> _Connection:
        parser = Parser()
        tls = False
        if self._tls_handshake_first:
            stream = await self._tls_wrap(stream, address)
            tls = True
        try:
            event = await self._read_event(stream, parser)
            if not isinstance(event, Info):
                raise ProtocolError(f"expected INFO from the server, got {event!r}")
            info = event
            if not tls and (info.tls_required or want_tls):
                if not info.tls_available:
                    raise ConnectError(f"{address} does not offer TLS, and TLS is required")
                if parser.buffered:
                    raise ProtocolError("unexpected data before the TLS handshake")
                stream = await self._tls_wrap(stream, address)
                tls = True
            options = self._connect_options(info, address, tls)
            await stream.send(encode_connect(options) + PING)
            while True:
                event = await self._read_event(stream, parser)
                if isinstance(event, Pong):
                    break
                if isinstance(event, Err):
                    raise _server_error(event.message)
                if isinstance(event, Info):
                    info = event
                elif isinstance(event, Ping):
                    await stream.send(PONG)
                elif not isinstance(event, Ok):
                    raise ProtocolError(f"unexpected {type(event).__name__} during the handshake")
        except (OSError, anyio.BrokenResourceError) as exc:
            raise ConnectError(
                f"connection to {address} failed during the handshake: {exc}"
            ) from exc
        self._accept_info(parser, info, address)
        return _Connection(stream, parser, info, address)

    def _accept_info(self, parser: Parser, info: Info, address: _Address) -> None:
        """Take the server's ``INFO``: its ``max_payload`` sets the parser's limit (twice
        it: JetStream adds headers to what it delivers), within ``max_payload_limit``.

        :raises ConnectError: the server announces a ``max_payload`` over the limit
        """
        if info.max_payload > self.max_payload_limit:
            raise ConnectError(
                f"{address} announces a max_payload of {info.max_payload} bytes, over this "
                f"client's max_payload_limit of {self.max_payload_limit} bytes: lower the "
                f"server's max_payload, or raise Client(max_payload_limit=...) if messages "
                f"that large are meant"
            )
        parser.max_payload = max(info.max_payload * 2, DEFAULT_MAX_PAYLOAD)
        self._info = info

    # ------------------------------------------------------------------ connection manager

    async def _run(self, conn: _Connection | None) -> None:
        try:
            with self._run_scope:
                while conn is not None:
                    error = await self._serve(conn)
                    self._disconnected(conn, error)
                    if self._closing:
                        break
                    if not self.reconnect:
                        self._final_error = error
                        break
                    conn = await self._reconnect(error)
        finally:
            self._shutdown()

    async def _serve(self, conn: _Connection) -> NatsError:
        failure: list[NatsError] = []
        try:
            resubscribe = [
                encode_sub(sub.subject, sub.sid, sub.queue)
                + (
                    encode_unsub(sub.sid, sub.max_msgs - sub.delivered)
                    if sub.max_msgs is not None
                    else b""
                )
                for sub in self._subs.values()
            ]
            if resubscribe:
                await conn.stream.send(b"".join(resubscribe))
            self._conn = conn
            self._connected.set()
            async with anyio.create_task_group() as tg:

                def fail(error: NatsError) -> None:
                    if not failure:
                        failure.append(error)
                    tg.cancel_scope.cancel()

                tg.start_soon(self._reader, conn, fail)
                tg.start_soon(self._writer, conn, fail)
                tg.start_soon(self._pinger, conn, fail)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            failure.append(ConnectionLostError(f"connection to {conn.address} lost: {exc}"))
        finally:
            self._conn = None
            self._connected = anyio.Event()
            error = (
                failure[0] if failure else ConnectionLostError(f"connection to {conn.address} lost")
            )
            self._fail_pongs(conn, error)
            await anyio.aclose_forcefully(conn.stream)
        return error

    def _fail_pongs(self, conn: _Connection, error: NatsError) -> None:
        if self._closing:
            error = ConnectionClosedError("the NATS client was closed")
        elif not isinstance(error, ConnectionLostError):
            lost = ConnectionLostError(f"connection to {conn.address} lost: {error}")
            lost.__cause__ = error
            error = lost
        while conn.pongs:
            waiter = conn.pongs.popleft()
            if waiter is not None:
                waiter.error = error
                waiter.event.set()

    def _disconnected(self, conn: _Connection, error: NatsError) -> None:
        """Fail everything that waited on ``conn``."""
        lost = (
            error
            if isinstance(error, ConnectionLostError)
            else ConnectionLostError(f"connection to {conn.address} lost: {error}")
        )
        if lost is not error:
            lost.__cause__ = error
        for waiter in list(self._replies.values()):
            waiter.fail(lost)
        self._replies.clear()
        for inbox in list(self._inboxes):
            self._subs.pop(inbox.sid, None)
            inbox._end(lost)
        self._inboxes.clear()
        if not self._closing:
            logger.warning(
                "NATS connection lost: %s", error, extra={"nats_server": str(conn.address)}
            )
            self._report(lost)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.reconnect_max_wait, self.reconnect_wait * (2.0 ** min(attempt, 30)))
        return delay * (1 - self.reconnect_jitter * random.random())

    async def _reconnect(self, error: NatsError) -> _Connection | None:
        attempt = 0
        last: NatsError = error
        auth_failures = 0
        while self.max_reconnect_attempts < 0 or attempt < self.max_reconnect_attempts:
            address = self._addresses[attempt % len(self._addresses)]
            await anyio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                conn = await self._connect_to(address)
            except AuthorizationError as exc:
                last = exc
                auth_failures += 1
                if auth_failures >= 2:
                    break
                continue
            except NatsError as exc:
                last = exc
                continue
            self.reconnects += 1
            logger.info("NATS reconnected to %s", address, extra={"nats_server": str(address)})
            return conn
        self._final_error = ConnectionClosedError(
            f"gave up reconnecting after {attempt} attempt(s); last error: {last}"
        )
        self._final_error.__cause__ = last
        return None

    def _shutdown(self) -> None:
        self._closed = True
        self._expiry_scope.cancel()
        closed = self._final_error or ConnectionClosedError("the NATS client is closed")
        self._write_send.close()
        while True:
            try:
                _, ping_waiter = self._write_recv.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            if ping_waiter is not None:
                ping_waiter.error = ConnectionClosedError(f"the NATS client is closed: {closed}")
                ping_waiter.event.set()
        self._write_recv.close()
        for waiter in list(self._replies.values()):
            waiter.fail(
                closed
                if isinstance(closed, ConnectionClosedError)
                else ConnectionClosedError(f"the NATS client is closed: {closed}")
            )
        self._replies.clear()
        for sub in list(self._subs.values()):
            sub._end(self._final_error)
        self._subs.clear()
        self._connected.set()  # wake wait_connected(), which then raises
        self._done.set()

    # ------------------------------------------------------------------ per-connection tasks

    async def _reader(self, conn: _Connection, fail: Callable[[NatsError], None]) -> None:
        parser = conn.parser
        receive = conn.stream.receive
        try:
            while True:
                while (event := parser.next_event()) is not None:
                    if isinstance(event, Msg):
                        self._dispatch_msg(event)
                    elif isinstance(event, Ping):
                        await self._write_send.send((PONG, None))
                    elif isinstance(event, Pong):
                        conn.keepalive_outstanding = 0
                        if conn.pongs:
                            waiter = conn.pongs.popleft()
                            if waiter is not None:
                                waiter.event.set()
                    elif isinstance(event, Err):
                        error = _server_error(event.message)
                        if error.fatal:
                            fail(error)
                            return
                        self._non_fatal_error(conn, error)
                    elif isinstance(event, Info):
                        try:
                            self._accept_info(parser, event, conn.address)
                        except ConnectError as exc:
                            raise ProtocolError(str(exc)) from None
                        conn.info = event
                try:
                    data = await receive(65536)
                except anyio.EndOfStream:
                    fail(
                        ConnectionLostError(
                            f"connection to {conn.address} lost: the server closed it"
                        )
                    )
                    return
                parser.feed(data)
        except ProtocolError as exc:
            fail(exc)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            fail(ConnectionLostError(f"connection to {conn.address} lost: {_describe(exc)}"))

    def _non_fatal_error(self, conn: _Connection, error: ServerError) -> None:
        claimed = False
        for waiter in conn.pongs:
            if waiter is not None:
                waiter.server_errors.append(error)
                claimed = True
        if (
            isinstance(error, PermissionViolationError)
            and "subscription" in error.server_message.lower()
        ):
            for sub in list(self._subs.values()):
                if f'"{sub.subject}"' in error.server_message:
                    self._subs.pop(sub.sid, None)
                    sub._end(error)
                    claimed = True
                    if sub.sid == self._inbox_sid:  # no reply can come to any request
                        self._fail_requests(error, None)
        elif isinstance(error, PermissionViolationError):
            # "Permissions Violation for Publish to "<subject>"": the requests on it
            # get no reply; fail them now rather than at their timeout
            match = _PUBLISH_VIOLATION.search(error.server_message)
            if match is not None and self._fail_requests(error, match[1]):
                claimed = True
        if not claimed:
            logger.warning("NATS server error: %s", error.server_message)
        self._report(error)

    def _fail_requests(self, error: NatsError, subject: str | None) -> bool:
        """Fail the waiting requests on ``subject`` (all of them for ``None``); whether
        there were any."""
        failed = False
        for waiter in list(self._replies.values()):
            if subject is None or waiter.subject == subject:
                waiter.fail(error)
                failed = True
        return failed

    def _dispatch_msg(self, msg: Msg) -> None:
        if msg.sid == self._inbox_sid:
            token = msg.subject[len(self._inbox_prefix) + 1 :]
            waiter = self._replies.get(token)
            if waiter is not None:
                waiter.deliver(msg)
            return
        sub = self._subs.get(msg.sid)
        if sub is not None and not sub._deliver(msg):
            self._subs.pop(msg.sid, None)
            sub._end()

    async def _writer(self, conn: _Connection, fail: Callable[[NatsError], None]) -> None:
        receive = self._write_recv.receive
        receive_nowait = self._write_recv.receive_nowait
        send = conn.stream.send
        try:
            while True:
                data, waiter = await receive()
                chunks = [data]
                size = len(data)
                pings = [waiter] if data is PING else []
                while size < 256 * 1024:
                    try:
                        data, waiter = receive_nowait()
                    except anyio.WouldBlock:
                        break
                    chunks.append(data)
                    size += len(data)
                    if data is PING:
                        pings.append(waiter)
                conn.pongs.extend(pings)
                await send(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return  # client closing
        except (OSError, anyio.BrokenResourceError) as exc:
            fail(ConnectionLostError(f"connection to {conn.address} lost: {_describe(exc)}"))

    async def _pinger(self, conn: _Connection, fail: Callable[[NatsError], None]) -> None:
        while True:
            await anyio.sleep(self.ping_interval)
            if conn.keepalive_outstanding >= self.max_outstanding_pings:
                fail(
                    StaleConnectionError(
                        f"{conn.address} did not answer {conn.keepalive_outstanding} "
                        f"keepalive pings (ping_interval={self.ping_interval} s)"
                    )
                )
                return
            conn.keepalive_outstanding += 1
            await self._write_send.send((PING, None))

    # ------------------------------------------------------------------ writing

    async def _send(self, data: bytes, waiter: _PingWaiter | None = None) -> None:
        self._check_open()
        try:
            await self._write_send.send((data, waiter))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._check_open()
            raise ConnectionClosedError("the NATS client is closed") from None

    async def _queue(self, data: bytes) -> None:
        """Queue ``data`` for the writer without a checkpoint while its queue has room;
        wait for room otherwise."""
        try:
            self._write_send.send_nowait((data, None))
        except anyio.WouldBlock:
            await self._send(data)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._check_open()
            raise ConnectionClosedError("the NATS client is closed") from None

    async def _wait_timed(self, event: anyio.Event) -> None:
        """Wait for ``event`` as a request the expiry task times (see
        :data:`_EXPIRY_MIN_TIMEOUT`)."""
        self._timed += 1
        if self._timed == 1 and self._expiry_wake is not None:
            self._expiry_wake.set()
        try:
            await event.wait()
        finally:
            self._timed -= 1

    def _encode_pub(
        self, subject: str, payload: bytes, reply: str | None, headers: HeadersInput
    ) -> bytes:
        validate_publish_subject(subject)
        if reply is not None:
            validate_publish_subject(reply)
        block = encode_headers(headers) if headers is not None else None
        size = len(payload) + (len(block) if block is not None else 0)
        info = self._info
        if info is not None:
            if size > info.max_payload:
                raise MaxPayloadError(size, info.max_payload)
            if block is not None and not info.headers:
                raise NatsError("the server does not support headers (NATS 2.2+ needed)")
        return encode_pub_block(subject, payload, reply=reply, header_block=block)

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        reply: str | None = None,
        headers: HeadersInput = None,
    ) -> None:
        """Queue a message for sending (it goes out with the writer's next write).

        Core NATS is at-most-once: a message queued when the connection drops may be lost.
        Call :meth:`flush` to know the server has received what was published so far.
        Returns at once, without a checkpoint, while the writer's queue has room (a
        publish per job should not cost a trip through the event loop); waits for room
        otherwise.

        :param subject: a subject without wildcards
        :param payload: the message body
        :param reply: reply subject, if any
        :param headers: header names and values (a mapping or pairs)
        :raises InvalidSubjectError: invalid subject or header
        :raises MaxPayloadError: larger than the server's ``max_payload``
        :raises ConnectionClosedError: the client is closed
        """
        self._check_open()
        await self._queue(self._encode_pub(subject, bytes(payload), reply, headers))

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed everything published before this call.

        :raises ServerError: the server sent a non-fatal ``-ERR`` (a permission violation)
            while the flush waited: something published before it was refused
        :raises FlushTimeoutError: no ``PONG`` within ``timeout`` seconds
        :raises ConnectionLostError: the connection dropped meanwhile
        """
        waiter = _PingWaiter()
        with anyio.move_on_after(timeout):
            await self._send(PING, waiter)
            await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        if waiter.server_errors:
            raise waiter.server_errors[0]
        if not waiter.event.is_set():
            self._check_open()
            raise FlushTimeoutError(f"the server did not answer a flush within {timeout} s")

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        max_msgs: int | None = None,
    ) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed), optionally in a queue group.

        :param max_pending: buffer size in messages (default: the client's ``max_pending``)
        :param max_pending_bytes: buffer size in bytes of payload and headers (default: the
            client's ``max_pending_bytes``)
        :param max_msgs: unsubscribe automatically after this many messages
        :raises InvalidSubjectError: invalid subject or queue name
        """
        self._check_open()
        validate_subscribe_subject(subject)
        if queue is not None:
            validate_publish_subject(queue)
        sid = next(self._sids)
        sub = Subscription(
            self, sid, subject, queue, max_pending or self.max_pending, max_pending_bytes
        )
        sub.max_msgs = max_msgs
        self._subs[sid] = sub
        data = encode_sub(subject, sid, queue)
        if max_msgs:
            data += encode_unsub(sid, max_msgs)
        try:
            await self._send(data)
        except BaseException:
            self._subs.pop(sid, None)
            raise
        return sub

    async def _unsubscribe(self, sub: Subscription, max_msgs: int | None) -> None:
        if self._subs.get(sub.sid) is not sub:
            return
        if isinstance(sub, ReplyInbox):
            self._inboxes.discard(sub)
        if max_msgs and max_msgs > sub.delivered:
            sub.max_msgs = max_msgs
            await self._send(encode_unsub(sub.sid, max_msgs))
            return
        del self._subs[sub.sid]
        sub._end()
        if not self.is_closed:
            try:  # without a checkpoint when possible, so a cancelled caller still sends it
                self._write_send.send_nowait((encode_unsub(sub.sid), None))
            except anyio.WouldBlock:
                await self._send(encode_unsub(sub.sid))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    # ------------------------------------------------------------------ request / reply

    async def _ensure_inbox(self) -> None:
        if self._inbox_sid is None:
            sid = next(self._sids)
            self._inbox_sid = sid
            # registered as a subscription so reconnects re-subscribe it; its messages are
            # routed by _dispatch_msg before reaching the (unused) buffer
            self._subs[sid] = Subscription(self, sid, f"{self._inbox_prefix}.*", None, 1)
            await self._send(encode_sub(f"{self._inbox_prefix}.*", sid))

    def _new_token(self) -> str:
        return format(next(self._tokens), "x")

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: HeadersInput = None,
        timeout: float = 5.0,
    ) -> Msg:
        """Publish a request and wait for its first reply (on the one muxed inbox).

        :raises NoRespondersError: nobody listens on ``subject``
        :raises RequestTimeoutError: no reply within ``timeout`` seconds
        :raises ConnectionLostError: the connection dropped before the reply came
        """
        self._check_open()
        await self._ensure_inbox()
        token = self._new_token()
        data = self._encode_pub(subject, bytes(payload), f"{self._inbox_prefix}.{token}", headers)
        if timeout >= _EXPIRY_MIN_TIMEOUT and self._tg is not None:
            # The common case: queued at once, timed by the expiry task (no cancel scope).
            waiter = _ReplyWaiter(subject, anyio.current_time() + timeout)
            try:
                self._write_send.send_nowait((data, None))
            except anyio.WouldBlock:
                waiter.deadline = float("inf")  # the writer is behind: time it below
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._check_open()
                raise ConnectionClosedError("the NATS client is closed") from None
        else:
            waiter = _ReplyWaiter(subject)
        self._replies[token] = waiter
        try:
            if waiter.deadline != float("inf"):
                await self._wait_timed(waiter.event)
            else:
                with anyio.move_on_after(timeout):
                    await self._send(data)
                    await waiter.event.wait()
        finally:
            self._replies.pop(token, None)
        if waiter.error is not None:
            raise waiter.error
        msg = waiter.msg
        if msg is None:
            raise RequestTimeoutError(f"no reply to the request on {subject!r} within {timeout} s")
        if msg.status == 503:
            raise NoRespondersError(subject)
        return msg

    async def request_batch(
        self, requests: Sequence[tuple[str, bytes, HeadersInput]], *, timeout: float = 5.0
    ) -> list[Msg | NatsError]:
        """Publish many requests back to back on the one muxed inbox and wait for every
        reply (one round trip, one wake-up).

        :return: per request, in order, its first reply, or the error that stands for it:
            :class:`NoRespondersError` (``503``), :class:`RequestTimeoutError` (no reply
            within ``timeout`` seconds), :class:`ConnectionLostError`
        :raises MaxPayloadError: a request is over the server's ``max_payload`` (nothing of
            the batch was sent)
        :raises InvalidSubjectError: a subject or header is invalid (nothing was sent)
        """
        self._check_open()
        if not requests:
            return []
        await self._ensure_inbox()
        batch = _Batch(len(requests))
        timed = timeout >= _EXPIRY_MIN_TIMEOUT and self._tg is not None
        deadline = anyio.current_time() + timeout if timed else float("inf")
        # every request is encoded (and refused: a bad subject, over max_payload) before
        # any is queued, so a refused batch sends nothing
        tokens = [self._new_token() for _ in requests]
        encoded = [
            self._encode_pub(subject, bytes(payload), f"{self._inbox_prefix}.{token}", headers)
            for token, (subject, payload, headers) in zip(tokens, requests, strict=True)
        ]
        queued: list[str] = []
        try:
            with anyio.move_on_after(float("inf") if timed else timeout):
                for index, (token, data) in enumerate(zip(tokens, encoded, strict=True)):
                    self._replies[token] = _BatchSlot(batch, index, deadline, requests[index][0])
                    queued.append(token)
                    await self._queue(data)
                if timed:
                    await self._wait_timed(batch.event)
                else:
                    await batch.event.wait()
        finally:
            replies = self._replies
            for token in queued:
                replies.pop(token, None)
        out: list[Msg | NatsError] = []
        for index, reply in enumerate(batch.replies):
            if reply is None:
                reply = RequestTimeoutError(
                    f"no reply to the request on {requests[index][0]!r} within {timeout} s"
                )
            elif isinstance(reply, Msg) and reply.status == 503:
                reply = NoRespondersError(requests[index][0])
            elif isinstance(reply, RequestTimeoutError):
                reply = RequestTimeoutError(
                    f"no reply to the request on {requests[index][0]!r} within {timeout} s"
                )
            out.append(reply)
        return out

    async def _expire_requests(self) -> None:
        """Wake the requests whose timeout has passed (see :data:`_EXPIRY_MIN_TIMEOUT`);
        idle while none waits. Runs until the client shuts down."""
        with self._expiry_scope:
            while True:
                if not self._timed:
                    wake = self._expiry_wake = anyio.Event()
                    await wake.wait()
                await anyio.sleep(_EXPIRY_TICK)
                now = anyio.current_time()
                for waiter in list(self._replies.values()):
                    if waiter.deadline <= now:
                        waiter.expire()

    def reply_budget(self) -> int:
        """The most bytes a request answered by many messages (a pull fetch, a batched
        direct get) should ask the server for (its ``max_bytes``): ``max_pending_bytes``,
        and at least twice the server's ``max_payload``, so that any one message fits."""
        return max(self.max_pending_bytes, 2 * self.max_payload)

    def reply_inbox(self, max_buffer: int, max_bytes: int | None = None) -> ReplyInbox:
        """A fresh inbox with its own subscription, for ``async with``.

        :param max_buffer: messages buffered unread; more are dropped and counted
            (:attr:`Subscription.dropped`), and the next receive raises
            :class:`SlowConsumerError`
        :param max_bytes: bytes buffered unread, the same way (default: :meth:`reply_budget`
            and one message more, which a server may send past a request's ``max_bytes``)
        """
        self._check_open()
        if max_bytes is None:
            max_bytes = self.reply_budget() + 2 * self.max_payload
        return ReplyInbox(self, next(self._sids), self.new_inbox(), None, max_buffer, max_bytes)

    async def _subscribe_inbox(self, inbox: ReplyInbox) -> None:
        self._check_open()
        self._subs[inbox.sid] = inbox
        self._inboxes.add(inbox)
        try:
            await self._send(encode_sub(inbox.subject, inbox.sid))
        except BaseException:
            self._subs.pop(inbox.sid, None)
            self._inboxes.discard(inbox)
            raise

    def new_inbox(self) -> str:
        """A fresh unique inbox subject (not on the muxed subscription)."""
        return f"_INBOX.{secrets.token_hex(11)}"
