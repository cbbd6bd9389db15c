"""The sans-io NATS protocol: parser, encoders, JetStream subject and timestamp parsing.

Ends with a seeded fuzz: random bytes and mutations of valid frames must only ever raise
the parser's own :class:`ProtocolError`, and always stop asking for more input.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest

from tasqueue_anyio import InvalidInputError
from tasqueue_anyio._nats.jetstream import (
    InvalidKeyError,
    JetStreamError,
    format_timestamp,
    parse_metadata,
    parse_timestamp,
    validate_key,
)
from tasqueue_anyio._nats.protocol import (
    Err,
    Headers,
    Info,
    InvalidSubjectError,
    Msg,
    Ok,
    Parser,
    Ping,
    Pong,
    ProtocolError,
    encode_connect,
    encode_headers,
    encode_pub,
    encode_sub,
    encode_unsub,
    parse_headers,
    parse_version,
    validate_publish_subject,
    validate_subscribe_subject,
)

pytestmark = pytest.mark.anyio

INFO = b'INFO {"server_id":"X","version":"2.12.1","max_payload":1048576,"headers":true}\r\n'


def parse_all(data: bytes, *, chunk: int | None = None) -> list[object]:
    parser = Parser()
    events: list[object] = []
    step = chunk or len(data) or 1
    for start in range(0, len(data), step):
        parser.feed(data[start : start + step])
        events.extend(parser)
    assert parser.buffered == 0
    return events


# ----------------------------------------------------------------------------- parser


def test_info_and_control_ops() -> None:
    events = parse_all(INFO + b"PING\r\nPONG\r\n+OK\r\n-ERR 'Stale Connection'\r\n")
    info = events[0]
    assert isinstance(info, Info)
    assert info.version == (2, 12, 1)
    assert info.max_payload == 1048576
    assert info.headers
    assert events[1:4] == [Ping(), Pong(), Ok()]
    assert events[4] == Err("Stale Connection")


def test_msg_forms() -> None:
    data = (
        b"MSG foo.bar 9 5\r\nhello\r\n"
        b"MSG foo 1 _INBOX.x.1 0\r\n\r\n"
        b"msg lower 2 4\r\na\r\nb\r\n"  # payload may hold CRLF; ops are case-insensitive
    )
    events = parse_all(data)
    assert events == [
        Msg(subject="foo.bar", sid=9, reply=None, payload=b"hello"),
        Msg(subject="foo", sid=1, reply="_INBOX.x.1", payload=b""),
        Msg(subject="lower", sid=2, reply=None, payload=b"a\r\nb"),
    ]


def test_hmsg_headers_and_status() -> None:
    block = b"NATS/1.0\r\nA: 1\r\nb: two\r\nA: 3\r\n\r\n"
    data = b"HMSG s 3 r %d %d\r\n%spayload\r\n" % (len(block), len(block) + 7, block)
    (msg,) = parse_all(data)
    assert isinstance(msg, Msg)
    assert msg.payload == b"payload"
    assert msg.reply == "r"
    assert msg.headers is not None
    assert msg.headers["a"] == "1"
    assert msg.headers["B"] == "two"
    assert msg.headers.get_all("A") == ["1", "3"]
    assert msg.status is None
    assert list(msg.headers) == ["A", "b"]


@pytest.mark.parametrize(
    ("line", "status", "description"),
    [
        (b"NATS/1.0 503", 503, ""),
        (b"NATS/1.0 404 No Messages", 404, "No Messages"),
        (b"NATS/1.0 408 Request Timeout", 408, "Request Timeout"),
        (b"NATS/1.0 409 Consumer Deleted", 409, "Consumer Deleted"),
        (b"NATS/1.0 100 Idle Heartbeat", 100, "Idle Heartbeat"),
    ],
)
def test_status_lines(line: bytes, status: int, description: str) -> None:
    block = line + b"\r\nNats-Pending-Messages: 3\r\n\r\n"
    data = b"HMSG _INBOX.a 1 %d %d\r\n%s\r\n" % (len(block), len(block), block)
    (msg,) = parse_all(data)
    assert isinstance(msg, Msg)
    assert msg.status == status
    assert msg.description == description
    assert msg.headers is not None
    assert msg.headers["Nats-Pending-Messages"] == "3"


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    block = b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"
    data = (
        INFO
        + b"MSG a 1 3\r\nabc\r\nPING\r\n"
        + b"HMSG b 2 %d %d\r\n%s\r\n" % (len(block), len(block), block)
    )
    assert parse_all(data, chunk=1) == parse_all(data)


@pytest.mark.parametrize(
    "data",
    [
        b"BOGUS\r\n",
        b"INFO not json\r\n",
        b"INFO [1,2]\r\n",
        b"MSG a\r\n",
        b"MSG a b 3\r\nabc\r\n",
        b"MSG a 1 -3\r\n",
        b"MSG a 1 3\r\nabcXY",
        b"HMSG a 1 20 10\r\n",
        b"HMSG a 1 3 3\r\nabc\r\n",
        b"HMSG a 1 14 14\r\nHTTP/1.1 200\r\n\r\n",
        b"HMSG a 1 16 16\r\nNATS/1.0\r\nnoval\r\n",
        b"\xff\xfe\r\n",
        b"PINGX\r\n",
    ],
)
def test_malformed_input_raises_protocol_error(data: bytes) -> None:
    parser = Parser()
    parser.feed(data + b"\r\n" * 12)
    with pytest.raises(ProtocolError):
        list(parser)
    with pytest.raises(ProtocolError):  # and stays broken
        parser.next_event()


def test_limits() -> None:
    parser = Parser(max_control_line=32)
    parser.feed(b"MSG " + b"a" * 40)
    with pytest.raises(ProtocolError, match="control line"):
        parser.next_event()
    parser = Parser(max_payload=10)
    parser.feed(b"MSG a 1 11\r\n")
    with pytest.raises(ProtocolError, match="over the limit"):
        parser.next_event()


def test_incomplete_input_waits() -> None:
    parser = Parser()
    parser.feed(b"MSG a 1 5\r\nab")
    assert parser.next_event() is None
    parser.feed(b"cde\r")
    assert parser.next_event() is None
    parser.feed(b"\n")
    assert parser.next_event() == Msg(subject="a", sid=1, reply=None, payload=b"abcde")


def test_err_fatality() -> None:
    assert not Err('Permissions Violation for Publish to "x"').fatal
    assert not Err("Invalid Subject").fatal
    assert Err("Authorization Violation").fatal
    assert Err("Maximum Payload Violation").fatal
    assert Err("Stale Connection").fatal


def test_parse_version() -> None:
    assert parse_version("2.12.0-beta.3") == (2, 12, 0)
    assert parse_version("v2.10.22") == (2, 10, 22)
    assert parse_version(None) == (0, 0, 0)
    assert parse_version("garbage") == (0, 0, 0)


# ----------------------------------------------------------------------------- encoders


def test_encode_pub_and_hpub_round_trip() -> None:
    assert encode_pub("a.b", b"xy") == b"PUB a.b 2\r\nxy\r\n"
    assert encode_pub("a", b"", reply="r.1") == b"PUB a r.1 0\r\n\r\n"
    wire = encode_pub("a", b"body", reply="r", headers={"K": "v", "Nats-Msg-Id": "1"})
    control, _, rest = wire.partition(b"\r\n")
    op, subject, reply, header_size, total = control.split()
    assert (op, subject, reply) == (b"HPUB", b"a", b"r")
    headers = parse_headers(rest[: int(header_size)])
    assert dict(headers) == {"K": "v", "Nats-Msg-Id": "1"}
    assert rest[int(header_size) : int(total)] == b"body"
    assert rest[int(total) :] == b"\r\n"


def test_encode_sub_unsub_connect() -> None:
    assert encode_sub("a.*", 7) == b"SUB a.* 7\r\n"
    assert encode_sub("a", 7, "workers") == b"SUB a workers 7\r\n"
    assert encode_unsub(7) == b"UNSUB 7\r\n"
    assert encode_unsub(7, 3) == b"UNSUB 7 3\r\n"
    connect = encode_connect({"verbose": False, "headers": True})
    assert connect.startswith(b"CONNECT ")
    assert connect.endswith(b"\r\n")
    assert json.loads(connect[8:]) == {"verbose": False, "headers": True}


@pytest.mark.parametrize(
    "headers",
    [{"Bad Name": "v"}, {"": "v"}, {"A:B": "v"}, {"A": "line\r\nPUB x 0"}, {"A": "x\ny"}],
)
def test_header_injection_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidSubjectError):
        encode_headers(headers)


def test_headers_mapping() -> None:
    headers = Headers([("A", "1"), ("a", "2")], status=404, description="No Messages")
    assert headers["A"] == "1"
    assert "a" in headers
    assert len(headers) == 1
    assert headers == Headers([("A", "1"), ("a", "2")], status=404, description="No Messages")
    assert "404" in repr(headers)


@pytest.mark.parametrize("subject", ["", "a..b", ".a", "a.", "a b", "a\r\n", "a.*", "a.>", ">"])
def test_invalid_publish_subjects(subject: str) -> None:
    with pytest.raises(InvalidSubjectError):
        validate_publish_subject(subject)


def test_subscribe_subjects() -> None:
    validate_subscribe_subject("a.*.c")
    validate_subscribe_subject("a.>")
    validate_publish_subject("a*b.c")  # a '*' inside a token is a literal
    with pytest.raises(InvalidSubjectError):
        validate_subscribe_subject("a.>.c")
    with pytest.raises(InvalidSubjectError):
        validate_subscribe_subject("a b")
    assert issubclass(InvalidSubjectError, InvalidInputError)


# ----------------------------------------------------------------------------- JetStream bits


def test_ack_metadata_v1() -> None:
    meta = parse_metadata("$JS.ACK.ORDERS.worker.3.1042.17.1700000000123456789.5")
    assert (meta.stream, meta.consumer) == ("ORDERS", "worker")
    assert (meta.num_delivered, meta.stream_seq, meta.consumer_seq) == (3, 1042, 17)
    assert meta.timestamp_ns == 1700000000123456789
    assert meta.num_pending == 5
    assert meta.domain is None
    assert meta.timestamp.year == 2023


def test_ack_metadata_v2_with_domain_and_account() -> None:
    meta = parse_metadata("$JS.ACK.hub.ACCHASH.ORDERS.worker.1.2.3.1700000000000000000.0.rand")
    assert (meta.domain, meta.account_hash) == ("hub", "ACCHASH")
    assert (meta.stream, meta.consumer, meta.num_delivered, meta.stream_seq) == (
        "ORDERS",
        "worker",
        1,
        2,
    )
    no_domain = parse_metadata("$JS.ACK._.ACC.S.C.1.2.3.4.5.r.extra")
    assert no_domain.domain is None
    assert no_domain.num_pending == 5


@pytest.mark.parametrize(
    "subject",
    ["_INBOX.abc", "$JS.ACK.S.C.1.2.3", "$JS.ACK.S.C.x.2.3.4.5", "$JS.NAK.S.C.1.2.3.4.5"],
)
def test_bad_ack_subjects(subject: str) -> None:
    with pytest.raises(JetStreamError):
        parse_metadata(subject)


def test_timestamps() -> None:
    parsed = parse_timestamp("2024-05-06T07:08:09.123456789Z")
    assert parsed == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    shifted = parse_timestamp("2024-05-06T09:08:09+02:00")
    assert shifted == datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_timestamp("yesterday")
    when = datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=timezone(timedelta(hours=1)))
    assert format_timestamp(when) == "2030-01-02T02:04:05.5Z"
    assert format_timestamp(datetime(2030, 1, 2, 3, 4, 5)) == "2030-01-02T03:04:05Z"


@pytest.mark.parametrize("key", ["a", "job.123", "A-b_c=d/e", "x.y.z"])
def test_valid_keys(key: str) -> None:
    validate_key(key)


@pytest.mark.parametrize("key", ["", "a b", "a:b", ".a", "a.", "a..b", "a*", "a>", "é"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


# ----------------------------------------------------------------------------- fuzz

VALID_FRAMES = [
    INFO,
    b"PING\r\n",
    b"PONG\r\n",
    b"+OK\r\n",
    b"-ERR 'Unknown Protocol Operation'\r\n",
    b"MSG foo.bar 1 5\r\nhello\r\n",
    b"MSG foo 22 _INBOX.abc.1 3\r\nabc\r\n",
    b"HMSG a 1 12 12\r\nNATS/1.0\r\n\r\n\r\n",
    b"HMSG _INBOX.x 2 r 28 32\r\nNATS/1.0 404 No Messages\r\n\r\nbody\r\n",
    b"HMSG s 3 37 39\r\nNATS/1.0\r\nKV-Operation: DEL\r\nX: y\r\n\r\nhi\r\n",
]


def _drain(parser: Parser) -> None:
    """Pull events until the parser wants more input; it must never loop forever."""
    for _ in range(100_000):
        if parser.next_event() is None:
            return
    raise AssertionError("parser produced events forever")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice < 0.5:
            buf.insert(rng.randrange(len(buf) + 1), rng.randrange(256))
        elif choice < 0.7 and buf:
            del buf[rng.randrange(len(buf))]
        elif choice < 0.85:
            digits = [i for i, b in enumerate(buf) if 0x30 <= b <= 0x39]
            if digits:
                buf[rng.choice(digits)] = rng.choice(b"0123456789")
        else:
            start = rng.randrange(len(buf) + 1)
            buf[start:start] = bytes(rng.choice(VALID_FRAMES))
    return bytes(buf)


def test_valid_frames_parse() -> None:
    for frame in VALID_FRAMES:
        events = parse_all(frame)
        assert len(events) == 1, frame


def test_fuzz_random_bytes_and_mutations() -> None:
    rng = random.Random(20240517)
    for round_ in range(4000):
        if round_ % 4 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            frames = b"".join(rng.choice(VALID_FRAMES) for _ in range(rng.randint(1, 4)))
            data = _mutate(rng, frames)
        parser = Parser(max_control_line=256, max_payload=4096)
        try:
            position = 0
            while position < len(data):
                step = rng.randint(1, 64)
                parser.feed(data[position : position + step])
                position += step
                _drain(parser)
        except ProtocolError:
            continue
