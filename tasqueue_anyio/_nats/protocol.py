"""The NATS client protocol, sans I/O: a byte parser for what the server sends and encoders
for what the client sends.

Nothing here touches a socket or a clock, so the parser can be driven (and fuzzed) with any
bytes: :meth:`Parser.feed` takes bytes as they arrive, :meth:`Parser.next_event` hands back
one complete server operation at a time (or ``None`` until more bytes come), and any malformed
input raises :class:`ProtocolError` -- never another exception type. After a
:class:`ProtocolError` the parser is spent: the connection it read from must be dropped.

Server operations (https://docs.nats.io/reference/reference-protocols/nats-protocol):
``INFO {json}``, ``MSG <subject> <sid> [reply] <#bytes>``,
``HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>``, ``PING``, ``PONG``,
``+OK`` and ``-ERR '<message>'``. Header blocks start with ``NATS/1.0`` and an optional
status code and description (``NATS/1.0 503``, ``NATS/1.0 408 Request Timeout``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from .._exceptions import BrokerError, InvalidInputError

__all__ = [
    "CRLF",
    "PING",
    "PONG",
    "Err",
    "Event",
    "Headers",
    "Info",
    "InvalidSubjectError",
    "Msg",
    "NatsError",
    "Ok",
    "Parser",
    "Ping",
    "Pong",
    "ProtocolError",
    "encode_connect",
    "encode_headers",
    "encode_pub",
    "encode_pub_block",
    "encode_sub",
    "encode_unsub",
    "parse_headers",
    "validate_publish_subject",
    "validate_subscribe_subject",
]

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
HEADER_VERSION = "NATS/1.0"

#: Longest control line (everything before a payload) the parser accepts.
DEFAULT_MAX_CONTROL_LINE = 64 * 1024
#: Largest message payload the parser accepts unless told otherwise (server limit is 64 MiB).
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024


class NatsError(BrokerError):
    """Root of the errors of the project's NATS client."""


class ProtocolError(NatsError):
    """The server sent bytes that are not valid NATS protocol; the connection is unusable."""


class InvalidSubjectError(NatsError, InvalidInputError):
    """A subject, queue group or header was refused before anything was sent."""


# --------------------------------------------------------------------------- headers


class Headers(Mapping[str, str]):
    """An immutable NATS header block: ordered ``(name, value)`` pairs plus a status.

    As a mapping it looks names up case-insensitively and returns the *first* value of a
    name; :meth:`get_all` returns every value. ``status`` and ``description`` come from the
    version line (``NATS/1.0 404 No Messages``); ``status`` is ``None`` for plain headers.
    """

    __slots__ = ("_folded", "description", "items_", "status")

    def __init__(
        self,
        items: Iterable[tuple[str, str]] = (),
        *,
        status: int | None = None,
        description: str = "",
    ) -> None:
        self.items_: tuple[tuple[str, str], ...] = tuple(items)
        self.status = status
        self.description = description
        folded: dict[str, str] = {}
        for name, value in self.items_:
            folded.setdefault(name.lower(), value)
        self._folded = folded

    def __getitem__(self, name: str) -> str:
        return self._folded[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._folded

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name, _ in self.items_:
            if name.lower() not in seen:
                seen.add(name.lower())
                yield name

    def __len__(self) -> int:
        return len(self._folded)

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` (case-insensitive), in order."""
        folded = name.lower()
        return [value for key, value in self.items_ if key.lower() == folded]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return (self.items_, self.status, self.description) == (
                other.items_,
                other.status,
                other.description,
            )
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        status = f", status={self.status!r}" if self.status is not None else ""
        return f"Headers({list(self.items_)!r}{status})"


HeadersInput = Mapping[str, str] | Iterable[tuple[str, str]] | None

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII except ':' and space


def encode_headers(headers: HeadersInput) -> bytes:
    """The ``NATS/1.0`` header block for ``headers`` (a mapping or ``(name, value)`` pairs).

    :raises InvalidSubjectError: a name is empty or has a ``:``, space or control
        character, or a value has a CR or LF (either would let a caller inject protocol)
    """
    if headers is None:
        pairs: Iterable[tuple[str, str]] = ()
    elif isinstance(headers, Mapping):
        pairs = headers.items()
    else:
        pairs = headers
    out = [HEADER_VERSION, "\r\n"]
    for name, value in pairs:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InvalidSubjectError(f"invalid header name {name!r}")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise InvalidSubjectError(f"invalid value for header {name!r}: {value!r}")
        out += [name, ": ", value, "\r\n"]
    out.append("\r\n")
    try:
        return "".join(out).encode()
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidSubjectError(f"header is not encodable: {exc}") from None


def parse_headers(block: bytes) -> Headers:
    """Parse a header block as it arrives in ``HMSG``.

    :raises ProtocolError: not a ``NATS/1.0`` block
    """
    try:
        text = block.decode()
    except UnicodeDecodeError:
        raise ProtocolError("header block is not UTF-8") from None
    if not text.startswith(HEADER_VERSION) or not text.endswith("\r\n\r\n"):
        raise ProtocolError(f"bad header block {text[:64]!r}")
    lines = text[:-4].split("\r\n")
    status_line = lines[0][len(HEADER_VERSION) :]
    status: int | None = None
    description = ""
    if status_line:
        if not status_line.startswith(" "):
            raise ProtocolError(f"bad header version line {lines[0][:64]!r}")
        code, _, description = status_line.strip().partition(" ")
        if len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"bad status code in {lines[0][:64]!r}")
        status = int(code)
        description = description.strip()
    items: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ProtocolError(f"bad header line {line[:64]!r}")
        items.append((name, value.strip()))
    return Headers(items, status=status, description=description)


# --------------------------------------------------------------------------- events


@attrs.frozen(slots=True)
class Info:
    """The server's ``INFO``: its JSON object, and the few fields the client uses."""

    raw: Mapping[str, Any]

    @property
    def max_payload(self) -> int:
        value = self.raw.get("max_payload", 1024 * 1024)
        return value if isinstance(value, int) and value > 0 else 1024 * 1024

    @property
    def version(self) -> tuple[int, int, int]:
        """``(major, minor, patch)`` of the server (``(0, 0, 0)`` when unreadable)."""
        return parse_version(self.raw.get("version"))

    @property
    def tls_required(self) -> bool:
        return bool(self.raw.get("tls_required"))

    @property
    def tls_available(self) -> bool:
        return bool(self.raw.get("tls_available") or self.raw.get("tls_required"))

    @property
    def headers(self) -> bool:
        return bool(self.raw.get("headers"))

    @property
    def nonce(self) -> str | None:
        value = self.raw.get("nonce")
        return value if isinstance(value, str) else None

    @property
    def lame_duck_mode(self) -> bool:
        return bool(self.raw.get("ldm"))

    @property
    def connect_urls(self) -> list[str]:
        urls = self.raw.get("connect_urls")
        return [u for u in urls if isinstance(u, str)] if isinstance(urls, list) else []


def parse_version(value: object) -> tuple[int, int, int]:
    """``"2.12.1-beta"`` -> ``(2, 12, 1)``; anything unreadable -> ``(0, 0, 0)``."""
    if not isinstance(value, str):
        return (0, 0, 0)
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", value)
    if match is None:
        return (0, 0, 0)
    return (int(match[1]), int(match[2]), int(match[3]))


@attrs.frozen(slots=True)
class Msg:
    """A message delivered to a subscription (``MSG`` or ``HMSG``)."""

    subject: str
    sid: int
    reply: str | None
    payload: bytes
    headers: Headers | None = None

    @property
    def status(self) -> int | None:
        """The status code of a status message (``503``, ``404``...), else ``None``."""
        return self.headers.status if self.headers is not None else None

    @property
    def description(self) -> str:
        """The status description (``"No Messages"``), else ``""``."""
        return self.headers.description if self.headers is not None else ""


@attrs.frozen(slots=True)
class Ping:
    """The server's ``PING``: answer with ``PONG``."""


@attrs.frozen(slots=True)
class Pong:
    """The server's ``PONG``, answering the oldest unanswered client ``PING``."""


@attrs.frozen(slots=True)
class Ok:
    """``+OK`` (only sent in verbose mode)."""


@attrs.frozen(slots=True)
class Err:
    """``-ERR '<message>'``; :attr:`fatal` tells whether the server closes the connection."""

    message: str

    @property
    def fatal(self) -> bool:
        """Whether the server closes the connection after this error.

        Permission violations, invalid subjects and a few others leave the connection
        open; everything else is followed by the server closing it.
        """
        lowered = self.message.lower()
        return not (
            lowered.startswith("permissions violation")
            or lowered.startswith("invalid subject")
            or lowered.startswith("invalid publish subject")
            or lowered.startswith("invalid queue name")
            or lowered.startswith("maximum subscriptions exceeded")
        )


Event = Info | Msg | Ping | Pong | Ok | Err

# --------------------------------------------------------------------------- parser


class Parser:
    """Incremental parser of the server's byte stream.

    :param max_control_line: longest control line accepted
    :param max_payload: largest message accepted (total of headers and payload)
    """

    def __init__(
        self,
        *,
        max_control_line: int = DEFAULT_MAX_CONTROL_LINE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.max_control_line = max_control_line
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0
        # a MSG/HMSG whose control line is read and whose body is awaited
        self._pending: tuple[str, int, str | None, int, int] | None = None
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes read from the connection."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buf) - self._pos

    def __iter__(self) -> Iterator[Event]:
        """Every complete event buffered so far."""
        while (event := self.next_event()) is not None:
            yield event

    def next_event(self) -> Event | None:
        """The next complete server operation, or ``None`` until more bytes are fed.

        :raises ProtocolError: the bytes are not valid protocol (the parser stays broken)
        """
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"invalid data from the NATS server: {why}")

    def _next(self) -> Event | None:
        buf = self._buf
        if self._pending is not None:
            return self._body()
        end = buf.find(CRLF, self._pos)
        if end < 0:
            if len(buf) - self._pos > self.max_control_line:
                raise self._fail(f"control line longer than {self.max_control_line} bytes")
            return None
        if end - self._pos > self.max_control_line:
            raise self._fail(f"control line longer than {self.max_control_line} bytes")
        line = bytes(buf[self._pos : end])
        self._pos = end + 2
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise self._fail(f"control line is not UTF-8: {line[:64]!r}") from None
        op, _, rest = text.partition(" ")
        op = op.upper()
        if op == "MSG":
            self._pending = self._msg_args(rest, with_headers=False)
            return self._body()
        if op == "HMSG":
            self._pending = self._msg_args(rest, with_headers=True)
            return self._body()
        if op == "PING" and not rest.strip():
            return Ping()
        if op == "PONG" and not rest.strip():
            return Pong()
        if op == "+OK" and not rest.strip():
            return Ok()
        if op == "-ERR":
            return Err(rest.strip().strip("'").strip())
        if op == "INFO":
            try:
                info = json.loads(rest)
            except (ValueError, RecursionError):
                raise self._fail(f"INFO is not JSON: {rest[:64]!r}") from None
            if not isinstance(info, dict):
                raise self._fail("INFO is not a JSON object")
            return Info(info)
        raise self._fail(f"unknown operation {line[:64]!r}")

    def _msg_args(self, rest: str, *, with_headers: bool) -> tuple[str, int, str | None, int, int]:
        args = rest.split()
        want = (4, 5) if with_headers else (3, 4)
        if len(args) not in want:
            raise self._fail(
                f"wrong argument count in {'H' if with_headers else ''}MSG {rest[:64]!r}"
            )
        subject = args[0]
        reply = args[2] if len(args) == want[1] else None
        try:
            sid = int(args[1])
            if with_headers:
                header_size, total = int(args[-2]), int(args[-1])
            else:
                header_size, total = 0, int(args[-1])
        except ValueError:
            raise self._fail(f"bad number in MSG arguments {rest[:64]!r}") from None
        if sid < 0 or header_size < 0 or total < header_size:
            raise self._fail(f"bad sizes in MSG arguments {rest[:64]!r}")
        if with_headers and header_size < len(HEADER_VERSION) + 4:
            raise self._fail(f"header block too short in {rest[:64]!r}")
        if total > self.max_payload:
            raise self._fail(f"message of {total} bytes is over the limit of {self.max_payload}")
        return subject, sid, reply, header_size, total

    def _body(self) -> Msg | None:
        assert self._pending is not None
        subject, sid, reply, header_size, total = self._pending
        buf = self._buf
        if len(buf) - self._pos < total + 2:
            return None
        start = self._pos
        if buf[start + total : start + total + 2] != CRLF:
            raise self._fail("message payload not followed by CRLF")
        headers = parse_headers(bytes(buf[start : start + header_size])) if header_size else None
        payload = bytes(buf[start + header_size : start + total])
        self._pos = start + total + 2
        self._pending = None
        return Msg(subject=subject, sid=sid, reply=reply, payload=payload, headers=headers)


# --------------------------------------------------------------------------- encoders

_BAD_SUBJECT_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


def _check_subject(subject: str, *, wildcards: bool, what: str = "subject") -> None:
    if not isinstance(subject, str) or not subject:
        raise InvalidSubjectError(f"{what} must be a non-empty string, got {subject!r}")
    if _BAD_SUBJECT_CHARS.search(subject):
        raise InvalidSubjectError(f"{what} {subject!r} contains whitespace or control characters")
    tokens = subject.split(".")
    for index, token in enumerate(tokens):
        if not token:
            raise InvalidSubjectError(f"{what} {subject!r} has an empty token")
        if not wildcards and token in ("*", ">"):
            raise InvalidSubjectError(f"{what} {subject!r} contains a wildcard")
        if wildcards and token == ">" and index != len(tokens) - 1:
            raise InvalidSubjectError(f"{what} {subject!r}: '>' must be the last token")


def validate_publish_subject(subject: str) -> None:
    """Refuse a subject that could not be published to (empty tokens, spaces, wildcards).

    :raises InvalidSubjectError: the subject is not valid for publishing
    """
    _check_subject(subject, wildcards=False)


def validate_subscribe_subject(subject: str) -> None:
    """Refuse an invalid subscription subject (wildcards allowed).

    :raises InvalidSubjectError: the subject is not valid for subscribing
    """
    _check_subject(subject, wildcards=True)


def encode_connect(options: Mapping[str, Any]) -> bytes:
    """``CONNECT {json}\\r\\n``."""
    return b"CONNECT " + json.dumps(dict(options), separators=(",", ":")).encode() + CRLF


def encode_pub(
    subject: str,
    payload: bytes,
    *,
    reply: str | None = None,
    headers: HeadersInput = None,
) -> bytes:
    """``PUB`` (or ``HPUB`` when there are headers) with its payload.

    Subjects are assumed validated by the caller (:func:`validate_publish_subject`).
    """
    block = encode_headers(headers) if headers is not None else None
    return encode_pub_block(subject, payload, reply=reply, header_block=block)


def encode_pub_block(
    subject: str, payload: bytes, *, reply: str | None = None, header_block: bytes | None = None
) -> bytes:
    """Like :func:`encode_pub`, with the header block already encoded (or ``None``)."""
    reply_part = f" {reply}" if reply else ""
    if header_block is not None:
        block = header_block
        size = len(block) + len(payload)
        return b"".join(
            (
                f"HPUB {subject}{reply_part} {len(block)} {size}\r\n".encode(),
                block,
                payload,
                CRLF,
            )
        )
    return b"".join((f"PUB {subject}{reply_part} {len(payload)}\r\n".encode(), payload, CRLF))


def encode_sub(subject: str, sid: int, queue: str | None = None) -> bytes:
    """``SUB <subject> [queue] <sid>``."""
    queue_part = f" {queue}" if queue else ""
    return f"SUB {subject}{queue_part} {sid}\r\n".encode()


def encode_unsub(sid: int, max_msgs: int | None = None) -> bytes:
    """``UNSUB <sid> [max_msgs]``."""
    max_part = f" {max_msgs}" if max_msgs else ""
    return f"UNSUB {sid}{max_part}\r\n".encode()
