"""What the NATS broker and results backends share: the client and its lifetime, names,
the encoding of ids into subject tokens and KV keys, pipelined JetStream publishes,
batched direct gets, and the translation of client errors.

Both backends run on the project's own AnyIO NATS client (:mod:`tasqueue_anyio._nats`),
so everything here works under Trio and asyncio alike.

Pipelining
----------
:meth:`NatsBackend.request_many` sends many requests back to back on the connection
(one socket write when they fit) and waits for every reply at once: ``n`` publishes cost
one round trip, not ``n``. The replies come to a short-lived wildcard inbox
(``_INBOX.<random>.*``), each request on its own reply subject, so they are matched by
subject, not by arrival order. Requests from one call reach the server in the order
given, so messages published to one stream are stored in that order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, AsyncExitStack
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup

from ._exceptions import BrokerError, InvalidInputError
from ._lifetime import CountedLifetime
from ._nats.client import (
    Client,
    NoRespondersError,
    PermissionViolationError,
    RequestTimeoutError,
)
from ._nats.jetstream import JetStream, JetStreamError, PubAck, StoredMsg, _api_reply
from ._nats.protocol import Msg, NatsError

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "MESSAGE_RESERVE",
    "NatsBackend",
    "decode_token",
    "encode_token",
    "translate_errors",
    "validate_name",
]

logger = logging.getLogger("tasqueue_anyio.nats")

#: The server used when neither a URL nor a client is given.
DEFAULT_URL = "nats://127.0.0.1:4222"
#: The prefix of subjects (broker) and the bucket name (results) used when none is given.
DEFAULT_PREFIX = "tasqueue"
#: Bytes of a NATS message the backends keep for their own headers and wrapping: the
#: server's ``max_payload`` covers a message's headers too, and the ids in them (a job id
#: of up to 255 characters, escaped up to three times that in a KV subject), the ETA and
#: schedule headers, the fields of a job's record and a dead letter's reason (cut to fit)
#: take up to about 1 KiB. What is left is a backend's ``max_message_size``.
MESSAGE_RESERVE = 2048

# Letters, digits, ``_`` and ``-``: a valid subject token, stream name, consumer name and
# KV bucket name alike (no ``.``, wildcard, space or path separator).
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Characters an encoded token keeps as they are; every other byte becomes ``=XX``.
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# A text made only of those (the common case: uuids, plain ids), checked in C.
_PLAIN_RE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPE_RE = re.compile(r"=([0-9A-F]{2})")

_B = TypeVar("_B", bound="NatsBackend")

Header = tuple[str, str]
#: One request of :meth:`NatsBackend.request_many`: subject, payload, headers.
Request = tuple[str, bytes, Sequence[Header]]


def validate_name(value: object, what: str) -> str:
    """Return ``value`` if it may be a subject token, stream or bucket name.

    :raises InvalidInputError: it is not 1-64 characters from ``A-Z a-z 0-9 _ -``
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidInputError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -"
        )
    return value


def validate_replicas(replicas: object) -> int:
    """Return ``replicas`` if JetStream takes it (an int from 1 to 5), else raise
    :class:`InvalidInputError`."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
        raise InvalidInputError(f"replicas must be an int from 1 to 5, got {replicas!r}")
    return replicas


def validate_placement(placement: object) -> dict[str, Any] | None:
    """The wire form of a stream's ``placement`` (``{"cluster": name, "tags": [...]}``,
    either key optional), or ``None``; raise :class:`InvalidInputError` for anything else.
    """
    if placement is None:
        return None
    if not isinstance(placement, Mapping) or not placement:
        raise InvalidInputError(
            f"placement must be a mapping with 'cluster' and/or 'tags', got {placement!r}"
        )
    unknown = set(placement) - {"cluster", "tags"}
    if unknown:
        raise InvalidInputError(
            f"placement: unknown key(s) {', '.join(sorted(map(repr, unknown)))} "
            f"(known: 'cluster', 'tags')"
        )
    wire: dict[str, Any] = {}
    cluster = placement.get("cluster")
    if cluster is not None:
        if not isinstance(cluster, str) or not cluster or any(c in cluster for c in " .*>"):
            raise InvalidInputError(f"placement: cluster must be a cluster name, got {cluster!r}")
        wire["cluster"] = cluster
    tags = placement.get("tags")
    if tags is not None:
        if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
            raise InvalidInputError(
                f"placement: tags must be a sequence of non-empty str, got {tags!r}"
            )
        wire["tags"] = list(tags)
    return wire


def encode_token(text: str) -> str:
    """Encode ``text`` into one subject token and KV key token, reversibly.

    Letters, digits, ``_`` and ``-`` stay as they are; every other byte of the UTF-8
    encoding becomes ``=XX`` (upper-case hex), ``=`` itself included. The result has no
    ``.``, wildcard or space, is never empty for a non-empty ``text``, and stays readable
    (``job:1`` → ``job=3A1``).

    :raises InvalidInputError: ``text`` is empty or not a str
    """
    if not isinstance(text, str) or not text:
        raise InvalidInputError(f"an id must be a non-empty str, got {text!r}")
    if _PLAIN_RE.fullmatch(text):
        return text
    return "".join(chr(byte) if byte in _PLAIN else f"={byte:02X}" for byte in text.encode())


def decode_token(token: str) -> str:
    """Reverse :func:`encode_token`."""
    if "=" not in token:
        return token
    raw = bytearray()
    index = 0
    while index < len(token):
        match = _ESCAPE_RE.match(token, index)
        if match is not None:
            raw.append(int(match[1], 16))
            index = match.end()
        else:
            raw += token[index].encode()
            index += 1
    return raw.decode(errors="replace")


#: The stream a permission probe says it expects: none has this name (a stream name may
#: not contain ``.``), so JetStream stores nothing.
_PROBE_STREAM = "tasqueue.permission.probe"


@contextlib.contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn NATS client errors raised inside the block into :class:`~tasqueue_anyio.BrokerError` with
    context (invalid input and lost leases pass through unchanged)."""
    try:
        yield
    except InvalidInputError:
        raise
    except NatsError as exc:
        raise BrokerError(f"NATS failed while {what}: {exc}") from exc


def _pub_ack(msg: Msg, subject: str) -> PubAck:
    if msg.status == 503:
        raise JetStreamError(f"no stream is bound to subject {subject!r} (nothing was stored)")
    reply = _api_reply(msg, subject)
    try:
        return PubAck(
            stream=str(reply["stream"]),
            seq=int(reply["seq"]),
            duplicate=bool(reply.get("duplicate", False)),
            domain=reply.get("domain") or None,
        )
    except (KeyError, TypeError, ValueError):
        raise JetStreamError(f"unreadable PubAck on {subject!r}: {reply!r}") from None


class NatsBackend(CountedLifetime):
    """The lifetime shared by the NATS backends: a client (made from a URL, or the
    caller's), a task group for background tasks, counted entries.

    A client given by the caller is used as it is: the caller enters it (``async with
    client:``) before opening the backend and leaves it afterwards. A client made from a
    URL is owned: a new one connects on the first entry and closes on the last exit.

    :param url: ``nats://[user:password@]host:port`` (``tls://`` for TLS with certificate
        checks), or several of them for reconnects
    :param client: an open :class:`~tasqueue_anyio._nats.client.Client` instead
    :param timeout: seconds to wait for any one reply from the server
    """

    _what = "NATS backend"

    def __init__(
        self,
        url: str | Sequence[str] | None,
        client: Client | None,
        *,
        timeout: float = 5.0,
    ) -> None:
        if url is not None and client is not None:
            raise InvalidInputError("give a NATS URL or a client, not both")
        if client is not None and not isinstance(client, Client):
            raise InvalidInputError(f"expected a tasqueue_anyio._nats Client, got {client!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidInputError(f"timeout must be seconds > 0, got {timeout!r}")
        if client is None:
            self.url: str | Sequence[str] | None = url if url is not None else DEFAULT_URL
        else:
            self.url = None
        self.timeout = float(timeout)
        self._given_client = client
        self._client: Client | None = client
        self._js: JetStream | None = None
        self._init_lifetime()

    def __repr__(self) -> str:
        where = self.url if self.url is not None else repr(self._given_client)
        return f"<{type(self).__name__} {where}>"

    # -- lifetime ----------------------------------------------------------------------------

    def _opening_errors(self) -> AbstractContextManager[object]:
        return translate_errors(f"opening the {self._what}")

    async def _connect(self, stack: AsyncExitStack) -> None:
        if self._given_client is None:
            assert self.url is not None
            client = Client(self.url, name=f"tasqueue {self._what}")
            await stack.enter_async_context(client)
            self._client = client
        else:
            client = self._given_client
        self._js = JetStream(client, timeout=self.timeout)

    def _closed(self) -> None:
        if self._given_client is None:
            self._client = None
        self._js = None

    @property
    def client(self) -> Client:
        """The NATS client (while the backend is open)."""
        client = self._client
        if client is None or self._js is None:
            raise RuntimeError(f"this {self._what} is not open: use `async with` first")
        return client

    @property
    def js(self) -> JetStream:
        """The JetStream API of the client (while the backend is open)."""
        js = self._js
        if js is None:
            raise RuntimeError(f"this {self._what} is not open: use `async with` first")
        return js

    def _require_open(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError(f"this {self._what} is not open: use `async with` first")
        return self._tg

    async def _open(self) -> None:
        """The first entry, the client connected: create streams (subclasses)."""

    async def _start(self, tg: TaskGroup) -> None:
        """Start background tasks in ``tg`` (subclasses)."""

    def _closing(self) -> None:
        """Subclass hook: the last exit, before the task group and client close."""

    @property
    def max_message_size(self) -> int | None:
        """The largest job message (or result) the backend stores: the connected server's
        ``max_payload`` less :data:`MESSAGE_RESERVE` (``None`` before it first connects)."""
        client = self._client
        if client is None or client._info is None:
            return None
        return max(0, client.max_payload - MESSAGE_RESERVE)

    @property
    def message_limit_cause(self) -> str:
        """The nats-server's ``max_payload`` and how to raise it."""
        client = self._client
        max_payload = client.max_payload if client is not None and client._info else "?"
        return (
            f"the nats-server's max_payload is {max_payload} bytes (a message's headers "
            f"included), of which the {self._what} keeps {MESSAGE_RESERVE} for its headers; "
            f"raise max_payload in the nats-server configuration (e.g. `max_payload: 8MB`; "
            f"the server allows up to 64MB), or store large data elsewhere and pass a "
            f"reference"
        )

    async def _check_permissions(
        self, *, stored: Sequence[str] = (), core: Sequence[str] = ()
    ) -> None:
        """Fail now, naming the subject, if the server refuses this user a subject the
        backend needs (its JetStream API requests were checked as they were made).

        Each subject of ``stored`` (captured by a stream) gets a request that JetStream
        refuses to store (``Nats-Expected-Stream`` names no stream), so nothing is
        written; each subject of ``core`` is subscribed to and published on (empty);
        then one flush: the server sends its ``-ERR`` for a refused one before the
        flush's ``PONG`` (raised by the flush, or recorded as the client's
        :attr:`~Client.last_error` when it came before the flush's ``PING`` went out).

        :raises PermissionViolationError: a subject was refused (the opening error
            translation makes it a :class:`~tasqueue_anyio.BrokerError` with the server's message)
        """
        client = self.client
        before = client.last_error
        subs = [await client.subscribe(subject) for subject in core]
        try:
            for subject in stored:
                with contextlib.suppress(NoRespondersError):
                    await client.request(
                        subject,
                        b"",
                        headers=[("Nats-Expected-Stream", _PROBE_STREAM)],
                        timeout=self.timeout,
                    )
            for subject in core:
                await client.publish(subject, b"")
            await client.flush(self.timeout)
            error = client.last_error
            if error is not before and isinstance(error, PermissionViolationError):
                raise error
        finally:
            for sub in subs:
                with contextlib.suppress(NatsError):
                    await sub.unsubscribe()

    def server_at_least(self, version: tuple[int, int, int]) -> bool:
        """Whether the connected server is ``version`` or newer."""
        return self.client.server_version >= version

    # -- pipelining ----------------------------------------------------------------------------

    async def request_many(self, requests: Sequence[Request]) -> list[Msg | NatsError]:
        """Send ``requests`` back to back and wait for all their replies (one round trip,
        on the client's muxed inbox).

        :return: per request, in order, its reply or the error that stands for it
            (:class:`NoRespondersError` for a ``503``, :class:`RequestTimeoutError` when
            no reply came within the backend's timeout)
        """
        replies = await self.client.request_batch(
            [(subject, payload, list(headers) or None) for subject, payload, headers in requests],
            timeout=self.timeout,
        )
        for reply in replies:
            if isinstance(reply, NatsError) and not isinstance(
                reply, (NoRespondersError, RequestTimeoutError)
            ):
                raise reply
        return replies

    async def publish_many(self, requests: Sequence[Request]) -> list[PubAck | NatsError]:
        """JetStream-publish many messages in one round trip, stored in the given order.

        :return: per message, its :class:`PubAck` or the error that refused it (say
            :class:`~tasqueue_anyio._nats.jetstream.WrongLastSequenceError`)
        """
        out: list[PubAck | NatsError] = []
        for request, reply in zip(requests, await self.request_many(requests), strict=True):
            if isinstance(reply, NatsError):
                if isinstance(reply, NoRespondersError):
                    reply = JetStreamError(
                        f"no stream is bound to subject {request[0]!r} (nothing was stored)"
                    )
                out.append(reply)
                continue
            try:
                out.append(_pub_ack(reply, request[0]))
            except NatsError as exc:
                out.append(exc)
        return out

    async def publish_all(self, requests: Sequence[Request], what: str) -> list[PubAck]:
        """:meth:`publish_many`, raising the first error (after every reply is in)."""
        acks = await self.publish_many(requests)
        for ack in acks:
            if isinstance(ack, NatsError):
                raise BrokerError(f"NATS failed while {what}: {ack}") from ack
        return acks  # type: ignore[return-value]

    # -- reading streams -------------------------------------------------------------------------

    async def read_range(
        self, stream: str, subject: str, start: int = 1, *, batch: int = 256
    ) -> list[StoredMsg]:
        """Every message of ``stream`` on ``subject`` (wildcards allowed) from sequence
        ``start`` on, oldest first, without consuming anything.

        Uses batched direct gets (``DIRECT.GET`` with ``next_by_subj`` and ``batch``,
        nats-server 2.11+; the stream needs ``allow_direct``): ``ceil(n / batch)`` round
        trips for ``n`` messages. Older servers get one direct get per message.
        """
        out: list[StoredMsg] = []
        seq = max(1, start)
        batched = self.server_at_least((2, 11, 0))
        while True:
            if batched:
                chunk, more = await self._direct_batch(stream, subject, seq, batch)
            else:
                single = await self._direct_one(stream, subject, seq)
                chunk, more = ([single], True) if single is not None else ([], False)
            out += chunk
            if not chunk or not more:
                return out
            seq = chunk[-1].seq + 1

    async def _direct_one(self, stream: str, subject: str, seq: int) -> StoredMsg | None:
        body = json.dumps({"seq": seq, "next_by_subj": subject}).encode()
        msg = await self.client.request(
            f"{self.js.prefix}.DIRECT.GET.{stream}", body, timeout=self.timeout
        )
        if msg.status == 404:
            return None
        if msg.status is not None:
            raise JetStreamError(f"direct get on {stream}: {msg.status} {msg.description}")
        return StoredMsg.from_direct(msg)

    async def _direct_batch(
        self, stream: str, subject: str, seq: int, batch: int
    ) -> tuple[list[StoredMsg], bool]:
        client = self.client
        # bounded in bytes too: the server stops after max_bytes (the inbox holds that and
        # the one message it may send past it), and the call goes on from there
        budget = client.reply_budget()
        body = json.dumps(
            {"seq": seq, "next_by_subj": subject, "batch": batch, "max_bytes": budget}
        ).encode()
        out: list[StoredMsg] = []
        pending = 0
        async with client.reply_inbox(batch + 8) as inbox:
            await client.publish(f"{self.js.prefix}.DIRECT.GET.{stream}", body, reply=inbox.subject)
            while True:
                received: Msg | None = None
                with anyio.move_on_after(self.timeout):
                    received = await inbox.receive()
                if received is None:
                    raise RequestTimeoutError(
                        f"no reply to a direct get on {stream} within {self.timeout} s"
                    )
                msg = received
                status = msg.status
                if status is None:
                    stored = StoredMsg.from_direct(msg)
                    out.append(stored)
                    pending = _int_header(msg, "Nats-Num-Pending")
                    continue
                if status == 204:  # end of batch
                    return out, pending > 0 or _int_header(msg, "Nats-Num-Pending") > 0
                if status == 404:
                    return out, False
                if status == 503:
                    raise JetStreamError(f"no stream {stream!r} answers direct gets")
                raise JetStreamError(f"direct get on {stream}: {status} {msg.description}")


def _int_header(msg: Msg, name: str) -> int:
    headers = msg.headers
    if headers is None:
        return 0
    try:
        return int(headers.get(name, "0"))
    except ValueError:
        return 0


def header_value(headers: Any, name: str, default: str = "") -> str:
    """A header of a message or stored message (``default`` when absent)."""
    if headers is None:
        return default
    value = headers.get(name)
    return default if value is None else str(value)
