"""JetStream on the AnyIO client: streams, durable pull consumers, fetch, acks, schedules, KV.

Everything goes through the JetStream JSON API (``$JS.API.*`` request subjects, see
https://docs.nats.io/reference/reference-protocols/nats_api_reference) over
:meth:`Client.request`, except:

* :meth:`JetStream.fetch` -- one ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` request
  answered by a stream of messages and status messages on a :class:`~.client.ReplyInbox`;
* acks -- plain publishes to the message's ``$JS.ACK...`` reply subject;
* the KV store's direct get -- ``$JS.API.DIRECT.GET.<stream>`` answered by the stored message
  itself (headers ``Nats-Sequence``, ``Nats-Time-Stamp``...), or a ``404`` status.

Creation is idempotent: :meth:`JetStream.ensure_stream` creates a stream or updates it to the
given configuration; :meth:`JetStream.ensure_consumer` creates or updates a durable consumer
(the server returns the existing one when the configuration is the same).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import anyio
import attrs

from .._exceptions import InvalidInputError
from .client import Client, ConnectionLostError, NoRespondersError, ReplyInbox
from .protocol import Headers, HeadersInput, Msg, NatsError, validate_publish_subject

__all__ = [
    "ConsumerConfig",
    "ConsumerDeletedError",
    "ConsumerInfo",
    "ConsumerNotFoundError",
    "Entry",
    "FetchError",
    "HeartbeatMissedError",
    "InvalidKeyError",
    "JetStream",
    "JetStreamAPIError",
    "JetStreamError",
    "JsMsg",
    "KeyDeletedError",
    "KeyExistsError",
    "KeyNotFoundError",
    "KeyValue",
    "KeyValueError",
    "MessageStream",
    "Metadata",
    "NotSupportedError",
    "PubAck",
    "StoredMsg",
    "StreamConfig",
    "StreamInfo",
    "StreamNotFoundError",
    "SubjectBusyError",
    "WrongLastSequenceError",
    "WrongRevisionError",
    "format_timestamp",
    "parse_metadata",
    "parse_timestamp",
    "validate_key",
]

API_PREFIX = "$JS.API"

# error codes of the JetStream API (nats-server errors.json)
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014
ERR_NO_MESSAGE_FOUND = 10037
ERR_WRONG_LAST_SEQUENCE = 10071
#: a clustered stream's leader refusing a conditional write while another conditional
#: write to the subject is in flight, without comparing (JSStreamWrongLastSequenceConstantErr)
ERR_WRONG_LAST_SEQUENCE_CONSTANT = 10164
ERR_STREAM_NAME_IN_USE = 10058
ERR_JETSTREAM_NOT_ENABLED = 10076

# ----------------------------------------------------------------------------- errors


class JetStreamError(NatsError):
    """Root of the JetStream errors."""


class NotSupportedError(JetStreamError):
    """The server is too old for the feature (message schedules, per-message TTL)."""


class JetStreamAPIError(JetStreamError):
    """The JetStream API answered with an error object.

    :ivar code: HTTP-like status (``404``, ``400``, ``503``...)
    :ivar err_code: JetStream's own error number (``10059`` stream not found...)
    :ivar description: the server's explanation
    """

    def __init__(self, code: int, err_code: int, description: str, *, subject: str = "") -> None:
        where = f" (on {subject})" if subject else ""
        super().__init__(f"JetStream error {code}/{err_code}: {description}{where}")
        self.code = code
        self.err_code = err_code
        self.description = description


class StreamNotFoundError(JetStreamAPIError, LookupError):
    """No stream of that name."""


class ConsumerNotFoundError(JetStreamAPIError, LookupError):
    """No consumer of that name on the stream."""


class WrongLastSequenceError(JetStreamAPIError):
    """A publish's ``Nats-Expected-Last-Subject-Sequence`` (or similar) did not hold."""


class SubjectBusyError(WrongLastSequenceError):
    """A clustered stream's leader refused a conditional publish without comparing: another
    conditional write to the same subject (or checked against it) is still being
    replicated (JetStream error 10164). Nothing was stored and nothing was decided: the
    write in flight may be the caller's own of a moment ago. Try again (after a re-read,
    as for any :class:`WrongLastSequenceError`)."""


class FetchError(JetStreamError):
    """A pull request ended with a status that is an error (``409`` and friends)."""

    def __init__(self, status: int, description: str, consumer: str) -> None:
        super().__init__(f"pull request to consumer {consumer!r} ended: {status} {description}")
        self.status = status
        self.description = description


class ConsumerDeletedError(FetchError, LookupError):
    """The consumer was deleted while a pull request waited (``409 Consumer Deleted``)."""


class HeartbeatMissedError(FetchError):
    """A pull request with ``idle_heartbeat`` heard nothing for two heartbeat intervals."""


class KeyValueError(JetStreamError):
    """Root of the key-value store errors."""


class InvalidKeyError(KeyValueError, InvalidInputError):
    """A key or bucket name is outside the KV character set."""


class KeyNotFoundError(KeyValueError, LookupError):
    """No value under the key."""


class KeyDeletedError(KeyNotFoundError):
    """The key's last entry is a delete or purge marker (:attr:`revision` is the marker's)."""

    def __init__(self, message: str, revision: int, operation: str) -> None:
        super().__init__(message)
        self.revision = revision
        self.operation = operation


class KeyExistsError(KeyValueError):
    """:meth:`KeyValue.create` found the key already set."""


class WrongRevisionError(KeyValueError):
    """:meth:`KeyValue.update` (or a guarded delete) found another revision of the key."""


_API_ERRORS: dict[int, type[JetStreamAPIError]] = {
    ERR_STREAM_NOT_FOUND: StreamNotFoundError,
    ERR_CONSUMER_NOT_FOUND: ConsumerNotFoundError,
    ERR_WRONG_LAST_SEQUENCE: WrongLastSequenceError,
    ERR_WRONG_LAST_SEQUENCE_CONSTANT: SubjectBusyError,
}


# ----------------------------------------------------------------------------- time helpers


def _ns(seconds: float | None) -> int:
    return 0 if seconds is None else round(seconds * 1_000_000_000)


_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp with up to nanoseconds (as the server writes them), to UTC.

    :raises ValueError: not such a timestamp
    """
    match = _TIMESTAMP.match(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    micros = int((match[7] or "0").ljust(9, "0")[:6])
    offset = match[8]
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = 1 if offset[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
    return datetime(year, month, day, hour, minute, second, micros, tzinfo=tz).astimezone(
        timezone.utc
    )


def format_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` (naive datetimes are taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    when = when.astimezone(timezone.utc)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond:06d}".rstrip("0")
    return text + "Z"


def _duration(seconds: float) -> str:
    """A Go duration string (``"1.5s"``), as headers like ``Nats-TTL`` take."""
    if seconds <= 0:
        raise InvalidInputError(f"a duration must be positive, got {seconds!r}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# ----------------------------------------------------------------------------- configs

_NAME = re.compile(r"^[^\s.*>/\\\x00-\x1f]+$")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 255 or not _NAME.match(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: no spaces, '.', '*', '>', '/' or '\\\\'"
        )


@attrs.frozen(kw_only=True)
class StreamConfig:
    """A stream's configuration (durations in seconds; ``None`` leaves the server default).

    ``extra`` is merged into the wire form last, for options not modelled here.
    """

    name: str
    subjects: Sequence[str] = ()
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    storage: Literal["file", "memory"] = "file"
    num_replicas: int = 1
    max_msgs: int = -1
    max_bytes: int = -1
    max_age: float | None = None
    max_msgs_per_subject: int = -1
    max_msg_size: int = -1
    discard: Literal["old", "new"] = "old"
    duplicate_window: float | None = None
    allow_rollup_hdrs: bool = False
    deny_delete: bool = False
    deny_purge: bool = False
    allow_direct: bool = False
    allow_msg_ttl: bool = False
    allow_msg_schedules: bool = False
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_wire(self) -> dict[str, Any]:
        _check_name(self.name, "stream")
        wire: dict[str, Any] = {
            "name": self.name,
            "subjects": list(self.subjects),
            "retention": self.retention,
            "storage": self.storage,
            "num_replicas": self.num_replicas,
            "max_msgs": self.max_msgs,
            "max_bytes": self.max_bytes,
            "max_age": _ns(self.max_age),
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "max_msg_size": self.max_msg_size,
            "discard": self.discard,
            "allow_rollup_hdrs": self.allow_rollup_hdrs,
            "deny_delete": self.deny_delete,
            "deny_purge": self.deny_purge,
            "allow_direct": self.allow_direct,
        }
        if self.duplicate_window is not None:
            wire["duplicate_window"] = _ns(self.duplicate_window)
        if self.allow_msg_ttl:
            wire["allow_msg_ttl"] = True
        if self.allow_msg_schedules:
            wire["allow_msg_schedules"] = True
        wire.update(self.extra)
        return wire


@attrs.frozen(kw_only=True)
class ConsumerConfig:
    """A consumer's configuration (durations in seconds).

    The defaults make a durable pull consumer with explicit acks. ``durable_name=None`` makes
    an ephemeral consumer (removed by the server after ``inactive_threshold``).
    """

    durable_name: str | None = None
    ack_policy: Literal["explicit", "none", "all"] = "explicit"
    ack_wait: float | None = None
    max_deliver: int = -1
    filter_subject: str | None = None
    filter_subjects: Sequence[str] = ()
    deliver_policy: Literal["all", "last", "new", "last_per_subject"] = "all"
    max_ack_pending: int | None = None
    max_waiting: int | None = None
    max_batch: int | None = None
    max_expires: float | None = None
    inactive_threshold: float | None = None
    headers_only: bool = False
    backoff: Sequence[float] = ()
    mem_storage: bool = False
    num_replicas: int = 0
    description: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "ack_policy": self.ack_policy,
            "deliver_policy": self.deliver_policy,
            "replay_policy": "instant",
            "max_deliver": self.max_deliver,
        }
        if self.durable_name is not None:
            _check_name(self.durable_name, "consumer")
            wire["durable_name"] = self.durable_name
            wire["name"] = self.durable_name
        optional: dict[str, Any] = {
            "ack_wait": _ns(self.ack_wait) if self.ack_wait is not None else None,
            "filter_subject": self.filter_subject,
            "filter_subjects": list(self.filter_subjects) or None,
            "max_ack_pending": self.max_ack_pending,
            "max_waiting": self.max_waiting,
            "max_batch": self.max_batch,
            "max_expires": _ns(self.max_expires) if self.max_expires is not None else None,
            "inactive_threshold": (
                _ns(self.inactive_threshold) if self.inactive_threshold is not None else None
            ),
            "headers_only": self.headers_only or None,
            "backoff": [_ns(b) for b in self.backoff] or None,
            "mem_storage": self.mem_storage or None,
            "num_replicas": self.num_replicas or None,
            "description": self.description,
        }
        wire.update({key: value for key, value in optional.items() if value is not None})
        wire.update(self.extra)
        return wire


@attrs.frozen
class StreamInfo:
    """A stream's configuration and state as the server reports them."""

    raw: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw["config"]["name"])

    @property
    def config(self) -> Mapping[str, Any]:
        config: Mapping[str, Any] = self.raw["config"]
        return config

    @property
    def state(self) -> Mapping[str, Any]:
        state: Mapping[str, Any] = self.raw.get("state", {})
        return state

    @property
    def messages(self) -> int:
        return int(self.state.get("messages", 0))

    @property
    def subjects(self) -> dict[str, int]:
        """Message count per subject (only when asked for with ``subjects_filter``)."""
        subjects = self.state.get("subjects") or {}
        return {str(k): int(v) for k, v in subjects.items()}


@attrs.frozen
class ConsumerInfo:
    """A consumer's configuration and state as the server reports them."""

    raw: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw["name"])

    @property
    def stream_name(self) -> str:
        return str(self.raw["stream_name"])

    @property
    def config(self) -> Mapping[str, Any]:
        config: Mapping[str, Any] = self.raw["config"]
        return config

    @property
    def num_pending(self) -> int:
        """Messages not yet delivered to this consumer."""
        return int(self.raw.get("num_pending", 0))

    @property
    def num_ack_pending(self) -> int:
        """Messages delivered and not yet acked."""
        return int(self.raw.get("num_ack_pending", 0))

    @property
    def num_redelivered(self) -> int:
        return int(self.raw.get("num_redelivered", 0))

    @property
    def num_waiting(self) -> int:
        """Pull requests waiting."""
        return int(self.raw.get("num_waiting", 0))


@attrs.frozen
class PubAck:
    """The stream's acknowledgement of a JetStream publish."""

    stream: str
    seq: int
    duplicate: bool = False
    domain: str | None = None


# ----------------------------------------------------------------------------- messages


@attrs.frozen
class Metadata:
    """What a ``$JS.ACK`` reply subject says about a delivered message."""

    stream: str
    consumer: str
    num_delivered: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    num_pending: int
    domain: str | None = None
    account_hash: str | None = None

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ns / 1e9, tz=timezone.utc)


def parse_metadata(reply: str) -> Metadata:
    """Parse a JetStream ack subject.

    Two forms exist: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
    <timestamp>.<pending>`` (9 tokens) and the newer ``$JS.ACK.<domain>.<account hash>.
    <stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>.
    <random>`` (12 or more tokens; domain ``_`` means none).

    :raises JetStreamError: not an ack subject
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        tokens = [*tokens[:2], "", "", *tokens[2:]]
    if len(tokens) < 11 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise JetStreamError(f"not a JetStream ack subject: {reply!r}")
    try:
        numbers = [int(token) for token in tokens[6:11]]
    except ValueError:
        raise JetStreamError(f"bad number in JetStream ack subject: {reply!r}") from None
    domain = tokens[2] if tokens[2] not in ("", "_") else None
    return Metadata(
        stream=tokens[4],
        consumer=tokens[5],
        num_delivered=numbers[0],
        stream_seq=numbers[1],
        consumer_seq=numbers[2],
        timestamp_ns=numbers[3],
        num_pending=numbers[4],
        domain=domain,
        account_hash=tokens[3] or None,
    )


class JsMsg:
    """A message fetched from a pull consumer, with its acks.

    Acks are publishes to the message's reply subject (``+ACK``, ``-NAK``, ``+WPI``,
    ``+TERM``); :meth:`ack_sync` asks the server to confirm the ack.
    """

    __slots__ = ("_acked", "_client", "headers", "metadata", "payload", "reply", "subject")

    def __init__(self, client: Client, msg: Msg) -> None:
        assert msg.reply is not None
        self._client = client
        self.subject = msg.subject
        self.payload = msg.payload
        self.headers = msg.headers
        self.reply = msg.reply
        self.metadata = parse_metadata(msg.reply)
        self._acked = False

    def __repr__(self) -> str:
        return f"JsMsg(subject={self.subject!r}, metadata={self.metadata!r})"

    @property
    def is_acked(self) -> bool:
        """Whether this process sent a final ack (``+ACK``, ``-NAK`` or ``+TERM``)."""
        return self._acked

    async def ack(self) -> None:
        """Acknowledge: the message is done (removed from a work-queue stream)."""
        await self._client.publish(self.reply, b"+ACK")
        self._acked = True

    async def ack_sync(self, timeout: float = 5.0) -> None:
        """Acknowledge and wait for the server to confirm it (double ack)."""
        await self._client.request(self.reply, b"+ACK", timeout=timeout)
        self._acked = True

    async def nak(self, delay: float | None = None) -> None:
        """Negative ack: redeliver, after ``delay`` seconds if given (not before)."""
        if delay is None:
            await self._client.publish(self.reply, b"-NAK")
        else:
            body = json.dumps({"delay": _ns(delay)}, separators=(",", ":")).encode()
            await self._client.publish(self.reply, b"-NAK " + body)
        self._acked = True

    async def in_progress(self) -> None:
        """Work in progress: restart the ack wait timer (``+WPI``); may be sent many times."""
        await self._client.publish(self.reply, b"+WPI")

    async def term(self, reason: str | None = None) -> None:
        """Terminate: never redeliver this message (``+TERM``)."""
        body = b"+TERM" if not reason else b"+TERM " + reason.encode()
        await self._client.publish(self.reply, body)
        self._acked = True


# ----------------------------------------------------------------------------- JetStream


class JetStream:
    """The JetStream API of one client.

    :param client: an open :class:`~.client.Client`
    :param timeout: seconds to wait for an API reply
    :param domain: a JetStream domain (API prefix ``$JS.<domain>.API``)
    :param api_prefix: an explicit API prefix (overrides ``domain``)
    """

    def __init__(
        self,
        client: Client,
        *,
        timeout: float = 5.0,
        domain: str | None = None,
        api_prefix: str | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        if api_prefix is not None:
            self.prefix = api_prefix.rstrip(".")
        elif domain:
            self.prefix = f"$JS.{domain}.API"
        else:
            self.prefix = API_PREFIX

    # ------------------------------------------------------------------ API plumbing

    async def api(self, subject: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One JetStream API call: ``<prefix>.<subject>`` with a JSON body; the JSON reply.

        :raises JetStreamAPIError: the reply is an error object (or a subclass of it)
        :raises JetStreamError: JetStream is not enabled, or the reply is not JSON
        """
        full = f"{self.prefix}.{subject}"
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        try:
            msg = await self.client.request(full, payload, timeout=self.timeout)
        except NoRespondersError:
            raise JetStreamError(
                f"no JetStream responder on {full} (is JetStream enabled on the server?)"
            ) from None
        return _api_reply(msg, full)

    async def account_info(self) -> dict[str, Any]:
        return await self.api("INFO")

    # ------------------------------------------------------------------ streams

    async def add_stream(self, config: StreamConfig) -> StreamInfo:
        """Create a stream; an existing stream with the same configuration is returned as is.

        :raises JetStreamAPIError: err_code 10058 when a stream of that name has another
            configuration (use :meth:`ensure_stream` to update it)
        """
        wire = config.to_wire()
        self._check_stream_features(config)
        return StreamInfo(await self.api(f"STREAM.CREATE.{config.name}", wire))

    async def update_stream(self, config: StreamConfig) -> StreamInfo:
        self._check_stream_features(config)
        return StreamInfo(await self.api(f"STREAM.UPDATE.{config.name}", config.to_wire()))

    async def ensure_stream(self, config: StreamConfig) -> StreamInfo:
        """Create the stream, or update it when it exists with another configuration.

        The update starts from the existing configuration, so options this class does not
        model survive, and settings the server cannot turn off once on (``allow_msg_ttl``)
        stay on.
        """
        try:
            return await self.add_stream(config)
        except JetStreamAPIError as exc:
            if exc.err_code != ERR_STREAM_NAME_IN_USE:
                raise
        existing = await self.stream_info(config.name)
        merged = {**existing.config, **config.to_wire()}
        for sticky in ("allow_msg_ttl",):
            if existing.config.get(sticky):
                merged[sticky] = True
        return StreamInfo(await self.api(f"STREAM.UPDATE.{config.name}", merged))

    def _check_stream_features(self, config: StreamConfig) -> None:
        if config.allow_msg_schedules:
            self.require_version((2, 12, 0), "message schedules (allow_msg_schedules)")
        if config.allow_msg_ttl:
            self.require_version((2, 11, 0), "per-message TTL (allow_msg_ttl)")

    def require_version(self, version: tuple[int, int, int], feature: str) -> None:
        """:raises NotSupportedError: the server is older than ``version``"""
        have = self.client.server_version
        if have < version:
            raise NotSupportedError(
                f"{feature} needs nats-server {'.'.join(map(str, version))} or newer; "
                f"the server is {'.'.join(map(str, have))}"
            )

    async def stream_info(self, name: str, *, subjects_filter: str | None = None) -> StreamInfo:
        """:raises StreamNotFoundError: no such stream"""
        _check_name(name, "stream")
        body = {"subjects_filter": subjects_filter} if subjects_filter else None
        return StreamInfo(await self.api(f"STREAM.INFO.{name}", body))

    async def delete_stream(self, name: str) -> None:
        _check_name(name, "stream")
        await self.api(f"STREAM.DELETE.{name}")

    async def purge_stream(
        self, name: str, *, subject: str | None = None, keep: int | None = None
    ) -> int:
        """Remove messages (of ``subject`` only, if given; keeping the last ``keep``).

        :return: the number of messages purged
        """
        _check_name(name, "stream")
        body: dict[str, Any] = {}
        if subject is not None:
            body["filter"] = subject
        if keep is not None:
            body["keep"] = keep
        reply = await self.api(f"STREAM.PURGE.{name}", body or None)
        return int(reply.get("purged", 0))

    async def delete_msg(self, stream: str, seq: int) -> bool:
        """Delete one message by sequence; ``False`` when it was not there."""
        _check_name(stream, "stream")
        try:
            reply = await self.api(f"STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True})
        except JetStreamAPIError as exc:
            if exc.err_code in (ERR_NO_MESSAGE_FOUND, 10057):
                return False
            raise
        return bool(reply.get("success"))

    async def get_msg(
        self, stream: str, *, seq: int | None = None, last_by_subject: str | None = None
    ) -> StoredMsg:
        """Read one stored message (``STREAM.MSG.GET``, works without ``allow_direct``).

        :raises JetStreamAPIError: err_code 10037 when there is no such message
        """
        _check_name(stream, "stream")
        body: dict[str, Any] = (
            {"seq": seq} if seq is not None else {"last_by_subj": last_by_subject}
        )
        reply = await self.api(f"STREAM.MSG.GET.{stream}", body)
        return StoredMsg.from_api(reply.get("message") or {})

    # ------------------------------------------------------------------ consumers

    async def ensure_consumer(self, stream: str, config: ConsumerConfig) -> ConsumerInfo:
        """Create a durable consumer, or update it to ``config``; idempotent.

        With ``durable_name=None`` an ephemeral consumer is created.
        """
        _check_name(stream, "stream")
        body = {"stream_name": stream, "config": config.to_wire()}
        if config.durable_name is None:
            return ConsumerInfo(await self.api(f"CONSUMER.CREATE.{stream}", body))
        return ConsumerInfo(await self.api(f"CONSUMER.CREATE.{stream}.{config.durable_name}", body))

    async def consumer_info(self, stream: str, name: str) -> ConsumerInfo:
        """:raises ConsumerNotFoundError: no such consumer"""
        _check_name(stream, "stream")
        _check_name(name, "consumer")
        return ConsumerInfo(await self.api(f"CONSUMER.INFO.{stream}.{name}"))

    async def delete_consumer(self, stream: str, name: str) -> None:
        _check_name(stream, "stream")
        _check_name(name, "consumer")
        await self.api(f"CONSUMER.DELETE.{stream}.{name}")

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: HeadersInput = None,
        msg_id: str | None = None,
        expected_stream: str | None = None,
        expected_last_subject_sequence: int | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Publish to a stream and wait for its acknowledgement.

        :param msg_id: ``Nats-Msg-Id``: a second publish with the same id within the
            stream's duplicate window is not stored again (:attr:`PubAck.duplicate`)
        :param expected_last_subject_sequence: store only if the subject's last sequence
            is this (``0``: the subject has no message)
        :param ttl: per-message TTL in seconds (``Nats-TTL``; stream needs ``allow_msg_ttl``)
        :raises WrongLastSequenceError: an expectation did not hold
        :raises JetStreamError: no stream listens on ``subject``
        """
        hdrs = _header_list(headers)
        if msg_id is not None:
            hdrs.append(("Nats-Msg-Id", msg_id))
        if expected_stream is not None:
            hdrs.append(("Nats-Expected-Stream", expected_stream))
        if expected_last_subject_sequence is not None:
            hdrs.append(
                ("Nats-Expected-Last-Subject-Sequence", str(expected_last_subject_sequence))
            )
        if ttl is not None:
            self.require_version((2, 11, 0), "per-message TTL (Nats-TTL)")
            hdrs.append(("Nats-TTL", _duration(ttl)))
        return await self._publish(subject, payload, hdrs, timeout)

    async def _publish(
        self,
        subject: str,
        payload: bytes,
        headers: list[tuple[str, str]],
        timeout: float | None,
    ) -> PubAck:
        try:
            msg = await self.client.request(
                subject,
                payload,
                headers=headers or None,
                timeout=self.timeout if timeout is None else timeout,
            )
        except NoRespondersError:
            raise JetStreamError(
                f"no stream is bound to subject {subject!r} (publish was not stored)"
            ) from None
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

    async def publish_at(
        self,
        schedule_subject: str,
        target_subject: str,
        payload: bytes = b"",
        *,
        at: datetime,
        headers: HeadersInput = None,
        msg_id: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> PubAck:
        """Schedule a message: the stream publishes ``payload`` to ``target_subject`` at ``at``.

        Server-side message scheduling (ADR-51, nats-server 2.12+): the message is stored on
        ``schedule_subject`` with ``Nats-Schedule: @at <RFC 3339>`` and
        ``Nats-Schedule-Target``; near ``at`` the server stores a copy (body and headers) on
        ``target_subject`` -- a subject of the same stream -- and removes the schedule.
        One schedule per ``schedule_subject``: use a unique subject per scheduled message.
        The stream needs ``allow_msg_schedules=True``.

        :param ttl: ``Nats-Schedule-TTL`` of the produced message, in seconds
        :raises NotSupportedError: the server is older than 2.12
        """
        self.require_version((2, 12, 0), "message schedules (Nats-Schedule)")
        validate_publish_subject(target_subject)
        hdrs = _header_list(headers)
        hdrs.append(("Nats-Schedule", f"@at {format_timestamp(at)}"))
        hdrs.append(("Nats-Schedule-Target", target_subject))
        if ttl is not None:
            hdrs.append(("Nats-Schedule-TTL", _duration(ttl)))
        if msg_id is not None:
            hdrs.append(("Nats-Msg-Id", msg_id))
        return await self._publish(schedule_subject, payload, hdrs, timeout)

    # ------------------------------------------------------------------ pull fetch

    async def fetch(
        self,
        stream: str,
        consumer: str,
        batch: int = 1,
        *,
        expires: float | None = 5.0,
        no_wait: bool = False,
        idle_heartbeat: float | None = None,
        max_bytes: int | None = None,
    ) -> list[JsMsg]:
        """Pull up to ``batch`` messages from a pull consumer.

        Returns as soon as ``batch`` messages came, or when the server ends the request:
        ``408 Request Timeout`` (``expires`` passed), ``404 No Messages`` (``no_wait``), or
        ``409`` with a non-fatal reason (max bytes reached, max waiting exceeded, leadership
        change); the messages received so far are returned (possibly none).

        :param expires: seconds the server keeps the request open (``None``: forever)
        :param no_wait: return at once with what is available (``404`` when nothing is)
        :param idle_heartbeat: seconds between the server's ``100 Idle Heartbeat`` while the
            request waits; two missed heartbeats raise :class:`HeartbeatMissedError`
        :param max_bytes: the most bytes of messages the server sends (default: the
            client's :meth:`~.client.Client.reply_budget`, which the reply buffer holds)
        :raises ConsumerNotFoundError: no such consumer
        :raises ConsumerDeletedError: the consumer was deleted while waiting
        :raises FetchError: another ``409`` with no message received
        :raises ConnectionLostError: the connection dropped (unacked messages come back
            after their ack wait)
        """
        _check_name(stream, "stream")
        _check_name(consumer, "consumer")
        if batch < 1:
            raise InvalidInputError(f"batch must be >= 1, got {batch}")
        body: dict[str, Any] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
            expires = None
            idle_heartbeat = None
        if expires is not None:
            body["expires"] = _ns(expires)
        if idle_heartbeat is not None:
            if expires is None or idle_heartbeat * 2 > expires:
                raise InvalidInputError("idle_heartbeat needs expires of at least twice its value")
            body["idle_heartbeat"] = _ns(idle_heartbeat)
        client = self.client
        if max_bytes is None:
            max_bytes = client.reply_budget()
        body["max_bytes"] = max_bytes
        subject = f"{self.prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        payload = json.dumps(body, separators=(",", ":")).encode()
        messages: list[JsMsg] = []
        if expires is not None:
            deadline = anyio.current_time() + expires + max(1.0, expires * 0.1)
        elif no_wait:
            deadline = anyio.current_time() + self.timeout
        else:
            deadline = float("inf")
        inbox_bytes = max_bytes + 2 * client.max_payload  # a server may send one more
        async with client.reply_inbox(batch + 8, inbox_bytes) as inbox:
            await client.publish(subject, payload, reply=inbox.subject)
            while len(messages) < batch:
                wait = deadline - anyio.current_time()
                if idle_heartbeat is not None:
                    wait = min(wait, idle_heartbeat * 2)
                # one timeout for the whole batch (a cancel scope per message costs more
                # than the message), re-armed after anything heard when heartbeats are on
                with anyio.move_on_after(max(wait, 0)) as scope:
                    while len(messages) < batch:
                        msg = await inbox.receive()
                        if msg.status is None:
                            messages.append(JsMsg(client, msg))
                        elif self._fetch_status(msg, consumer, messages):
                            return messages
                        if idle_heartbeat is not None:
                            break
                if not scope.cancelled_caught:
                    continue
                # nothing arrived in time
                if anyio.current_time() >= deadline:
                    return messages
                raise HeartbeatMissedError(0, "idle heartbeats missed", consumer)
        return messages

    def _fetch_status(self, msg: Msg, consumer: str, messages: list[JsMsg]) -> bool:
        """Handle a status message of a pull request; ``True`` when the request is over."""
        status, description = msg.status, msg.description
        if status == 100:  # idle heartbeat (or flow control): the request is alive
            return False
        if status in (404, 408):
            return True
        if status == 503:
            raise ConsumerNotFoundError(
                404,
                ERR_CONSUMER_NOT_FOUND,
                f"no consumer {consumer!r} answers pull requests (no responders)",
            )
        if status == 409:
            lowered = description.lower()
            if "consumer deleted" in lowered:
                raise ConsumerDeletedError(409, description, consumer)
            if "batch completed" in lowered:
                # The server sent the whole batch. A replicated consumer sends a message
                # only once its delivery has quorum, which may be after this status: the
                # caller reads on until the batch is in (or its deadline passes) rather
                # than drop messages that would then wait out their ack wait.
                return False
            if messages or "message size exceeds maxbytes" in lowered:
                return True
            raise FetchError(409, description, consumer)
        raise FetchError(status or 0, description, consumer)

    def consume(
        self,
        stream: str,
        consumer: str,
        *,
        batch: int = 100,
        expires: float = 30.0,
        idle_heartbeat: float | None = None,
    ) -> MessageStream:
        """Pull messages continuously: ``async with js.consume(s, c) as messages:``.

        Keeps pull requests open so that up to ``batch`` messages are on their way at any
        time, topping up when half of them arrived; see :class:`MessageStream`.

        :param idle_heartbeat: seconds between the server's heartbeats while a request
            waits (default: ``min(5, expires / 2)``; ``0`` turns them off)
        """
        if idle_heartbeat is None:
            idle_heartbeat = min(5.0, expires / 2)
        elif idle_heartbeat <= 0:
            idle_heartbeat = None
        return MessageStream(
            self, stream, consumer, batch=batch, expires=expires, idle_heartbeat=idle_heartbeat
        )

    # ------------------------------------------------------------------ key-value

    async def create_key_value(
        self,
        bucket: str,
        *,
        history: int = 1,
        ttl: float | None = None,
        max_value_size: int = -1,
        max_bytes: int = -1,
        storage: Literal["file", "memory"] = "file",
        replicas: int = 1,
        per_key_ttl: bool = False,
        placement: Mapping[str, Any] | None = None,
    ) -> KeyValue:
        """Create (or update to this configuration) a KV bucket; idempotent.

        :param ttl: bucket-wide expiry of values, in seconds (stream ``max_age``)
        :param per_key_ttl: allow :meth:`KeyValue.put` with ``ttl=`` (stream
            ``allow_msg_ttl``; nats-server 2.11+, :class:`NotSupportedError` otherwise)
        :param placement: the stream's ``placement`` (``cluster``, ``tags``), on a cluster
        """
        _check_bucket(bucket)
        if not 1 <= history <= 64:
            raise InvalidInputError(f"history must be 1..64, got {history}")
        config = StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            retention="limits",
            storage=storage,
            num_replicas=replicas,
            max_bytes=max_bytes,
            max_age=ttl,
            max_msgs_per_subject=history,
            max_msg_size=max_value_size,
            discard="new",
            duplicate_window=min(ttl, 120.0) if ttl else 120.0,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            allow_msg_ttl=per_key_ttl,
            extra={"placement": dict(placement)} if placement else {},
        )
        info = await self.ensure_stream(config)
        return KeyValue(self, bucket, info)

    async def key_value(self, bucket: str) -> KeyValue:
        """Bind to an existing bucket.

        :raises KeyValueError: no such bucket
        """
        _check_bucket(bucket)
        try:
            info = await self.stream_info(f"KV_{bucket}")
        except StreamNotFoundError:
            raise KeyValueError(f"no key-value bucket {bucket!r}") from None
        return KeyValue(self, bucket, info)

    async def delete_key_value(self, bucket: str) -> None:
        _check_bucket(bucket)
        await self.delete_stream(f"KV_{bucket}")


class MessageStream:
    """A continuous pull from a durable consumer (what a worker loop wants).

    Iterate it for :class:`JsMsg` one at a time. Behind the iteration, pull requests of
    ``batch`` messages with ``expires`` are kept open on one inbox and topped up when
    fewer than half of the requested messages are still to come, so messages flow without a
    round trip per batch. Recovers by itself from request expiry (``408``), leadership
    changes, a server shutting down, missed idle heartbeats (re-pull) and a lost connection
    (waits for the reconnect, then pulls on a new inbox); messages delivered and lost on the
    way come back after the consumer's ack wait.

    :raises ConsumerNotFoundError: the consumer does not exist
    :raises ConsumerDeletedError: it was deleted while pulling
    :raises FetchError: the server refused the pull request (``409`` such as
        ``Exceeded MaxRequestBatch``: lower ``batch``)
    """

    def __init__(
        self,
        js: JetStream,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires: float,
        idle_heartbeat: float | None,
    ) -> None:
        _check_name(stream, "stream")
        _check_name(consumer, "consumer")
        if batch < 1:
            raise InvalidInputError(f"batch must be >= 1, got {batch}")
        if idle_heartbeat is not None and idle_heartbeat * 2 > expires:
            raise InvalidInputError("idle_heartbeat needs expires of at least twice its value")
        self._js = js
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.expires = expires
        self.idle_heartbeat = idle_heartbeat
        self._subject = f"{js.prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox: ReplyInbox | None = None
        self._outstanding = 0

    async def __aenter__(self) -> MessageStream:
        await self._open_inbox()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close_inbox()

    async def _open_inbox(self) -> None:
        client = self._js.client
        # two pull requests may be out at once, each of at most the client's reply budget
        inbox = client.reply_inbox(
            self.batch * 2 + 32, 2 * client.reply_budget() + 2 * client.max_payload
        )
        await inbox.__aenter__()
        self._inbox = inbox
        self._outstanding = 0

    async def _close_inbox(self) -> None:
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(NatsError):
                await inbox.__aexit__(None, None, None)

    async def _pull(self, inbox: ReplyInbox) -> None:
        want = self.batch - self._outstanding
        body: dict[str, Any] = {
            "batch": want,
            "expires": _ns(self.expires),
            "max_bytes": self._js.client.reply_budget(),
        }
        if self.idle_heartbeat is not None:
            body["idle_heartbeat"] = _ns(self.idle_heartbeat)
        payload = json.dumps(body, separators=(",", ":")).encode()
        await self._js.client.publish(self._subject, payload, reply=inbox.subject)
        self._outstanding += want

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> JsMsg:
        while True:
            inbox = self._inbox
            if inbox is None:
                raise JetStreamError("MessageStream used outside its async with block")
            if self._outstanding <= self.batch // 2:
                await self._pull(inbox)
            wait = self.expires + max(1.0, self.expires * 0.1)
            if self.idle_heartbeat is not None:
                wait = self.idle_heartbeat * 2
            msg: Msg | None = None
            with anyio.move_on_after(wait):
                try:
                    msg = await inbox.receive()
                except ConnectionLostError:
                    await self._close_inbox()
                    await self._js.client.wait_connected()
                    await self._open_inbox()
                    continue
            if msg is None:  # heartbeats missed or requests lost: start over
                self._outstanding = 0
                continue
            if msg.status is None:
                self._outstanding = max(self._outstanding - 1, 0)
                return JsMsg(self._js.client, msg)
            self._status(msg)

    def _status(self, msg: Msg) -> None:
        status, description = msg.status, msg.description
        headers = msg.headers
        pending = 0
        if headers is not None:
            with contextlib.suppress(ValueError):
                pending = int(headers.get("Nats-Pending-Messages", "0"))
        if status == 100:
            return
        if status in (404, 408):
            self._outstanding = max(self._outstanding - pending, 0) if pending else 0
            return
        if status == 503:
            raise ConsumerNotFoundError(
                404,
                ERR_CONSUMER_NOT_FOUND,
                f"no consumer {self.consumer!r} on stream {self.stream!r} (no responders)",
            )
        lowered = description.lower()
        if status == 409:
            if "consumer deleted" in lowered:
                raise ConsumerDeletedError(409, description, self.consumer)
            if (
                "leadership change" in lowered
                or "message size exceeds maxbytes" in lowered
                or "batch completed" in lowered  # a request with max_bytes got its batch
                or "server shutdown" in lowered  # the reconnect re-pulls
            ):
                self._outstanding = max(self._outstanding - pending, 0) if pending else 0
                return
        raise FetchError(status or 0, description, self.consumer)


class StoredMsg:
    """A message read back from a stream (direct get or ``STREAM.MSG.GET``)."""

    __slots__ = ("headers", "payload", "seq", "subject", "time")

    def __init__(
        self, subject: str, seq: int, payload: bytes, headers: Headers | None, time: datetime
    ) -> None:
        self.subject = subject
        self.seq = seq
        self.payload = payload
        self.headers = headers
        self.time = time

    @classmethod
    def from_api(cls, message: Mapping[str, Any]) -> StoredMsg:
        from .protocol import ProtocolError, parse_headers

        try:
            data = base64.b64decode(message.get("data") or "")
            raw_headers = message.get("hdrs")
            headers = parse_headers(base64.b64decode(raw_headers)) if raw_headers else None
            return cls(
                subject=str(message["subject"]),
                seq=int(message["seq"]),
                payload=data,
                headers=headers,
                time=parse_timestamp(str(message["time"])),
            )
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            raise JetStreamError(f"unreadable stored message: {exc}") from None

    @classmethod
    def from_direct(cls, msg: Msg) -> StoredMsg:
        headers = msg.headers
        try:
            assert headers is not None
            return cls(
                subject=headers["Nats-Subject"],
                seq=int(headers["Nats-Sequence"]),
                payload=msg.payload,
                headers=headers,
                time=parse_timestamp(headers["Nats-Time-Stamp"]),
            )
        except (AssertionError, KeyError, ValueError):
            raise JetStreamError(f"unreadable direct get reply: {msg!r}") from None


def _header_list(headers: HeadersInput) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _api_reply(msg: Msg, subject: str) -> dict[str, Any]:
    if msg.status is not None and msg.status >= 300:
        raise JetStreamError(f"JetStream status {msg.status} {msg.description} on {subject}")
    try:
        reply = json.loads(msg.payload)
    except ValueError:
        raise JetStreamError(
            f"JetStream reply on {subject} is not JSON: {msg.payload[:80]!r}"
        ) from None
    if not isinstance(reply, dict):
        raise JetStreamError(f"JetStream reply on {subject} is not an object")
    error = reply.get("error")
    if isinstance(error, dict):
        code = int(error.get("code", 0) or 0)
        err_code = int(error.get("err_code", 0) or 0)
        description = str(error.get("description", ""))
        if err_code == ERR_JETSTREAM_NOT_ENABLED:
            raise JetStreamError(f"JetStream is not enabled for this account: {description}")
        raise _API_ERRORS.get(err_code, JetStreamAPIError)(
            code, err_code, description, subject=subject
        )
    return reply


# ----------------------------------------------------------------------------- key-value

_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
_BUCKET = re.compile(r"^[a-zA-Z0-9_-]+$")

KV_OPERATION = "KV-Operation"


def _check_bucket(bucket: str) -> None:
    if not isinstance(bucket, str) or not _BUCKET.match(bucket):
        raise InvalidKeyError(f"invalid bucket name {bucket!r}: use letters, digits, '_' and '-'")


def validate_key(key: str) -> None:
    """Refuse a key outside ``[-/_=.a-zA-Z0-9]+`` (no leading, trailing or double dot).

    :raises InvalidKeyError: the key is not valid
    """
    if (
        not isinstance(key, str)
        or not _KEY.match(key)
        or key.startswith(".")
        or key.endswith(".")
        or ".." in key
    ):
        raise InvalidKeyError(
            f"invalid key {key!r}: keys use letters, digits and '-/_=.', "
            f"with no leading, trailing or double '.'"
        )


@attrs.frozen
class Entry:
    """A value read from a bucket."""

    bucket: str
    key: str
    value: bytes
    revision: int
    created: datetime
    operation: Literal["PUT", "DEL", "PURGE"] = "PUT"


class KeyValue:
    """A JetStream key-value bucket (stream ``KV_<bucket>``, subjects ``$KV.<bucket>.<key>``).

    Get from :meth:`JetStream.create_key_value` or :meth:`JetStream.key_value`.
    Revisions are stream sequences; :meth:`update` is a compare-and-set on them.
    """

    def __init__(self, js: JetStream, bucket: str, info: StreamInfo) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._direct = bool(info.config.get("allow_direct"))
        self.per_key_ttl = bool(info.config.get("allow_msg_ttl"))

    def _subject(self, key: str) -> str:
        validate_key(key)
        return self._prefix + key

    async def get(self, key: str, *, revision: int | None = None) -> Entry:
        """The current value of ``key`` (or the value at ``revision``).

        :raises KeyNotFoundError: no value (:class:`KeyDeletedError` when deleted/purged)
        """
        subject = self._subject(key)
        stored = await self._get_stored(subject, revision)
        if stored is None or (revision is not None and stored.subject != subject):
            raise KeyNotFoundError(f"no key {key!r} in bucket {self.bucket!r}")
        operation = _operation(stored.headers)
        if operation != "PUT":
            raise KeyDeletedError(
                f"key {key!r} in bucket {self.bucket!r} was "
                f"{'deleted' if operation == 'DEL' else 'purged'}",
                stored.seq,
                operation,
            )
        return Entry(self.bucket, key, stored.payload, stored.seq, stored.time, operation)

    async def _get_stored(self, subject: str, revision: int | None) -> StoredMsg | None:
        body: dict[str, Any] = (
            {"seq": revision} if revision is not None else {"last_by_subj": subject}
        )
        if self._direct:
            full = f"{self.js.prefix}.DIRECT.GET.{self.stream}"
            try:
                msg = await self.js.client.request(
                    full, json.dumps(body).encode(), timeout=self.js.timeout
                )
            except NoRespondersError:
                raise KeyValueError(f"no key-value bucket {self.bucket!r}") from None
            if msg.status == 404:
                return None
            if msg.status is not None:
                raise KeyValueError(
                    f"direct get on {self.bucket!r}: {msg.status} {msg.description}"
                )
            return StoredMsg.from_direct(msg)
        try:
            return await self.js.get_msg(
                self.stream, seq=revision, last_by_subject=subject if revision is None else None
            )
        except JetStreamAPIError as exc:
            if exc.err_code == ERR_NO_MESSAGE_FOUND:
                return None
            raise

    async def put(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Set ``key``; return the new revision.

        :param ttl: seconds this value lives (needs a bucket made with ``per_key_ttl``)
        """
        return await self._put(key, value, None, ttl)

    async def _put(self, key: str, value: bytes, last: int | None, ttl: float | None) -> int:
        subject = self._subject(key)
        if ttl is not None and not self.per_key_ttl:
            raise InvalidInputError(
                f"bucket {self.bucket!r} has no per-key TTL (create it with per_key_ttl=True)"
            )
        ack = await self.js.publish(subject, value, expected_last_subject_sequence=last, ttl=ttl)
        return ack.seq

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Set ``key`` only if it has no value (a deleted key counts as none).

        :raises KeyExistsError: the key has a value
        """
        try:
            return await self._put(key, value, 0, ttl)
        except WrongLastSequenceError:
            pass
        # the last entry may be a delete marker: then create on top of it
        try:
            await self.get(key)
        except KeyDeletedError as deleted:
            try:
                return await self._put(key, value, deleted.revision, ttl)
            except WrongLastSequenceError:
                pass
        except KeyNotFoundError:
            pass
        raise KeyExistsError(f"key {key!r} already exists in bucket {self.bucket!r}")

    async def update(self, key: str, value: bytes, last: int, *, ttl: float | None = None) -> int:
        """Set ``key`` only if its current revision is ``last`` (compare-and-set).

        :raises WrongRevisionError: the key is at another revision
        """
        try:
            return await self._put(key, value, last, ttl)
        except WrongLastSequenceError as exc:
            raise WrongRevisionError(
                f"key {key!r} in bucket {self.bucket!r} is not at revision {last}: {exc.description}"
            ) from None

    async def delete(self, key: str, *, last: int | None = None) -> int:
        """Delete ``key`` (a ``DEL`` marker; history is kept); return the marker's revision.

        :param last: delete only if the key is at this revision
        :raises WrongRevisionError: it is not
        """
        return await self._marker(key, "DEL", last)

    async def purge(self, key: str, *, last: int | None = None) -> int:
        """Delete ``key`` and its history (a ``PURGE`` marker with ``Nats-Rollup: sub``)."""
        return await self._marker(key, "PURGE", last)

    async def _marker(self, key: str, operation: str, last: int | None) -> int:
        subject = self._subject(key)
        headers = [(KV_OPERATION, operation)]
        if operation == "PURGE":
            headers.append(("Nats-Rollup", "sub"))
        try:
            ack = await self.js.publish(
                subject, b"", headers=headers, expected_last_subject_sequence=last
            )
        except WrongLastSequenceError as exc:
            raise WrongRevisionError(
                f"key {key!r} in bucket {self.bucket!r} is not at revision {last}: {exc.description}"
            ) from None
        return ack.seq

    async def keys(self, *, filter: str = ">") -> list[str]:
        """Every key with a current value (deleted and purged keys are left out).

        Reads the last entry of every subject through a short-lived ephemeral consumer
        (headers only), so it costs one consumer creation and a few fetches.

        :param filter: a subject filter on the keys (``"jobs.>"``); default all
        """
        js = self.js
        config = ConsumerConfig(
            ack_policy="none",
            deliver_policy="last_per_subject",
            filter_subject=self._prefix + filter,
            headers_only=True,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        info = await js.ensure_consumer(self.stream, config)
        keys: list[str] = []
        try:
            pending = info.num_pending
            while pending > 0:
                batch = await js.fetch(self.stream, info.name, min(pending, 256), no_wait=True)
                if not batch:
                    break
                for msg in batch:
                    if _operation(msg.headers) == "PUT":
                        keys.append(msg.subject[len(self._prefix) :])
                pending = batch[-1].metadata.num_pending
        finally:
            # on failure, the inactive threshold removes it anyway
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self.js.timeout),
                contextlib.suppress(NatsError),
            ):
                await js.delete_consumer(self.stream, info.name)
        return keys


def _operation(headers: Headers | None) -> Literal["PUT", "DEL", "PURGE"]:
    if headers is None:
        return "PUT"
    value = headers.get(KV_OPERATION, "PUT").upper()
    if value == "DEL":
        return "DEL"
    if value == "PURGE":
        return "PURGE"
    return "PUT"
