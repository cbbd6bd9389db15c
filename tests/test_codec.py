"""The wire format: round trips, and refusal of anything that is not a valid message.

The malformed-message tests work on the decoded msgpack tree of a valid message and find
fields by their (distinctive) values, so they hold whether the schema lays a job out as a
map or as an array.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import attrs
import msgpack
import pytest
from broker_support import consuming, receive
from shim_support import ShimDelivery

from tasqueue_anyio import (
    Backoff,
    Chain,
    DecodeError,
    Group,
    InvalidInputError,
    Job,
    JobMessage,
    Meta,
    PayloadTooLargeError,
    Server,
    Status,
)
from tasqueue_anyio._codec import (
    MAX_RECORD_SIZE,
    Peek,
    decode_event,
    decode_message,
    encode_event,
    encode_message,
    job_from_wire,
    job_to_wire,
    peek_message,
)
from tasqueue_anyio._groups import CHAIN, GROUP, ParentInfo, decode_parent, encode_parent
from tasqueue_anyio._jobs import MAX_COUNT, MAX_SECONDS, MAX_TIME, MIN_TIME
from tasqueue_anyio._schedule import decode_template, encode_template
from tasqueue_anyio._worker import Worker
from tasqueue_anyio.abc import Delivery, Envelope, JobRecord
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

Path = tuple[int | str, ...]

ETA = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def full_message() -> JobMessage:
    """A message with every meta field set and follow-ups nested two deep."""
    grandchild = Job(
        "grandchild",
        b"\x00\xff",
        id="grandchild-1",
        queue="q-follow",
        timeout=1.5,
        delay=2.0,
    )
    child_ok = Job(
        "child-ok",
        b"ok",
        id="child-ok-1",
        queue="q-follow",
        max_retries=4,
        backoff=Backoff(initial=0.25, factor=3.0, maximum=9.0, jitter=False),
        eta=ETA + timedelta(hours=1),
        on_success=[grandchild],
    )
    child_err = Job("child-err", b"err", id="child-err-1", on_error=[Job("leaf", id="leaf-1")])
    job = Job(
        "the-task-name",
        b"payload \x00\x01 bytes",
        id="job:msg:main-1",
        queue="q-main",
        max_retries=7,
        backoff=Backoff(initial=0.5, factor=2.5, maximum=30.0, jitter=True),
        timeout=12.5,
        eta=ETA,
        schedule="0 3 * * 1",
        on_success=[child_ok],
        on_error=[child_err],
    )
    meta = Meta(
        id=job.id,
        status=Status.RETRYING,
        queue=job.queue,
        max_retries=7,
        retried=5,
        prev_error="ValueError: previous failure",
        created_at=1_700_000_000.25,
        processed_at=1_700_000_100.5,
        eta=ETA.timestamp(),
        timeout=12.5,
        schedule="0 3 * * 1",
        backoff=Backoff(initial=0.5, factor=2.5, maximum=30.0, jitter=True),
        prev_job_result=b"previous result",
        attempt=3,
        group_id="group-1",
        chain_id="chain-1",
        deadline=1_700_000_500.75,
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    return JobMessage(meta=meta, job=job)


def tree_of(msg: JobMessage) -> Any:
    return msgpack.unpackb(encode_message(msg), raw=False)


def pack(tree: Any) -> bytes:
    data: bytes = msgpack.packb(tree, use_bin_type=True)
    return data


def paths(tree: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every path in a decoded msgpack tree (the root excluded)."""
    if isinstance(tree, list):
        items: list[tuple[int | str, Any]] = list(enumerate(tree))
    elif isinstance(tree, dict):
        items = list(tree.items())
    else:
        return
    for key, value in items:
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


def get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_at(tree: Any, path: Path, value: Any) -> Any:
    tree = copy.deepcopy(tree)
    get(tree, path[:-1])[path[-1]] = value
    return tree


def delete_at(tree: Any, path: Path) -> Any:
    tree = copy.deepcopy(tree)
    del get(tree, path[:-1])[path[-1]]
    return tree


def find(tree: Any, value: Any, *, type_: type | None = None) -> list[Path]:
    """Paths whose value equals ``value`` (and has exactly ``type_``, if given)."""
    wanted = type(value) if type_ is None else type_
    return [p for p in paths(tree) if type(get(tree, p)) is wanted and get(tree, p) == value]


def find_one(tree: Any, value: Any) -> Path:
    found = find(tree, value)
    assert len(found) == 1, (value, found)
    return found[0]


def assert_refused(data: Any) -> None:
    with pytest.raises(DecodeError):
        decode_message(data)


# -- round trips -----------------------------------------------------------------------------


def test_round_trip_full_message() -> None:
    msg = full_message()
    decoded = decode_message(encode_message(msg))
    assert decoded == msg
    assert decoded.meta == msg.meta
    assert decoded.job == msg.job
    assert decoded.job.on_success[0].on_success[0] == msg.job.on_success[0].on_success[0]
    assert decoded.job.eta == ETA
    assert type(decoded.meta.status) is Status


def test_round_trip_minimal_message() -> None:
    job = Job("t")
    msg = JobMessage(meta=Meta(id=job.id, status=Status.QUEUED, queue=job.queue), job=job)
    assert decode_message(encode_message(msg)) == msg


@pytest.mark.parametrize("status", list(Status))
def test_round_trip_every_status(status: Status) -> None:
    msg = full_message()
    msg = JobMessage(meta=Meta(id=msg.id, status=status, queue=msg.meta.queue), job=msg.job)
    assert decode_message(encode_message(msg)).status is status


def test_round_trip_server_built_message_with_delay() -> None:
    """A job enqueued with ``delay=`` (the server sets ``meta.eta``) decodes to the same
    job, which, like every Job, has at most one of ``eta`` and ``delay``."""
    msg, data = Server()._new_message(Job("t", b"x", delay=5.0))
    assert msg.meta.eta is not None
    decoded = decode_message(data)
    assert decoded.meta == msg.meta
    assert not (decoded.job.eta is not None and decoded.job.delay is not None)
    assert decoded.job == msg.job


def test_round_trip_retry_message_keeps_the_job_as_enqueued() -> None:
    """A retry with backoff has ``meta.eta`` set; the job it carries was enqueued without
    an eta and must come back that way (else a later re-enqueue of it inherits a stale
    eta)."""
    job = Job("t", b"x", max_retries=2, backoff=Backoff(initial=5.0, jitter=False))
    meta = Meta(id=job.id, status=Status.RETRYING, queue=job.queue, retried=1, eta=2e9)
    msg = JobMessage(meta=meta, job=job)
    decoded = decode_message(encode_message(msg))
    assert decoded.meta == meta
    assert decoded.job == job


def test_encoding_is_deterministic() -> None:
    assert encode_message(full_message()) == encode_message(full_message())


# -- refused messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x00garbage", b"\x92\x01", b"\xdd\xff\xff\xff\xff", b"{not: msgpack}"],
    ids=["empty", "reserved-byte", "trailing-data", "truncated", "huge-array-header", "text"],
)
def test_not_msgpack_refused(data: bytes) -> None:
    assert_refused(data)


@pytest.mark.parametrize(
    "value", [None, 1, 1.5, "text", b"bytes", True, [], {}, [1, {}, []], {"v": 1}]
)
def test_wrong_top_level_shape_refused(value: Any) -> None:
    assert_refused(pack(value))


@pytest.mark.parametrize("data", ["a string", 123, None, [1, 2]])
def test_not_bytes_refused(data: Any) -> None:
    assert_refused(data)


@pytest.mark.parametrize("version", [0, 2, 99, -1, "1", 1.0, True, None])
def test_wrong_schema_version_refused(version: Any) -> None:
    tree = tree_of(full_message())
    # the version is the only top-level scalar equal to 1
    if isinstance(tree, dict):
        path: Path = ("v",)
    else:
        (path,) = [(i,) for i, v in enumerate(tree) if type(v) is int and v == 1]
    assert decode_message(pack(tree)) == full_message()  # the untouched tree decodes
    assert_refused(pack(set_at(tree, path, version)))


# Distinctive values of full_message() and a field of the same role.
_FIELDS = {
    "job.task": "the-task-name",
    "job.payload": b"payload \x00\x01 bytes",
    "meta.max_retries(=job.max_retries)": 7,
    "meta.retried": 5,
    "meta.attempt": 3,
    "meta.prev_error": "ValueError: previous failure",
    "meta.created_at": 1_700_000_000.25,
    "meta.processed_at": 1_700_000_100.5,
    "meta.deadline": 1_700_000_500.75,
    "meta.prev_job_result": b"previous result",
    "meta.group_id": "group-1",
    "meta.chain_id": "chain-1",
    "meta.status": "retrying",
    "job.timeout(=meta.timeout)": 12.5,
}


def _field_paths() -> list[tuple[str, Path]]:
    tree = tree_of(full_message())
    out = []
    for name, value in _FIELDS.items():
        for path in find(tree, value):
            out.append((f"{name}@{'/'.join(map(str, path))}", path))
    return out


_FIELD_PATHS = _field_paths()


def test_field_paths_found() -> None:
    """The distinctive values are where the tests below expect them."""
    names = {name.split("@")[0] for name, _ in _FIELD_PATHS}
    assert names == set(_FIELDS)


def _container_paths() -> list[Path]:
    """Paths of the required parts: meta, job, and every job's fields (not the trace)."""
    tree = tree_of(full_message())
    meta_path = find_one(tree, "retrying")[:-1]
    job_path = find_one(tree, "the-task-name")[:-1]
    return [meta_path, job_path]


@pytest.mark.parametrize("path", [p for _, p in _FIELD_PATHS], ids=[n for n, _ in _FIELD_PATHS])
def test_missing_field_refused(path: Path) -> None:
    tree = tree_of(full_message())
    assert_refused(pack(delete_at(tree, path)))


@pytest.mark.parametrize("which", ["meta", "job"])
def test_missing_part_refused(which: str) -> None:
    tree = tree_of(full_message())
    meta_path, job_path = _container_paths()
    path = meta_path if which == "meta" else job_path
    assert_refused(pack(delete_at(tree, path)))
    assert_refused(pack(set_at(tree, path, None)))


# a value of the wrong type for each kind of field
_WRONG: dict[type, list[Any]] = {
    str: [1, b"bytes", None, [], {}, 1.5],
    bytes: ["text", 1, [], {}],
    int: ["7", 7.0, [], {}, b"\x07"],
    float: ["1.5", b"1.5", [], {}],
}


def _wrong_type_cases() -> list[tuple[str, Path, Any]]:
    tree = tree_of(full_message())
    cases = []
    for name, path in _FIELD_PATHS:
        value = get(tree, path)
        for wrong in _WRONG[type(value)]:
            optional = name.split("@")[0] in {
                "meta.prev_error",
                "meta.processed_at",
                "meta.deadline",
                "meta.prev_job_result",
                "meta.group_id",
                "meta.chain_id",
                "job.timeout(=meta.timeout)",
            }
            if wrong is None and optional:
                continue
            cases.append((f"{name}={wrong!r}", path, wrong))
    return cases


_WRONG_TYPE_CASES = _wrong_type_cases()


@pytest.mark.parametrize(
    ("path", "wrong"),
    [(p, w) for _, p, w in _WRONG_TYPE_CASES],
    ids=[n for n, _, _ in _WRONG_TYPE_CASES],
)
def test_wrong_field_type_refused(path: Path, wrong: Any) -> None:
    tree = tree_of(full_message())
    assert_refused(pack(set_at(tree, path, wrong)))


@pytest.mark.parametrize("value", [7, 5, 3], ids=["max_retries", "retried", "attempt"])
def test_bool_where_int_expected_refused(value: int) -> None:
    tree = tree_of(full_message())
    for path in find(tree, value):
        assert_refused(pack(set_at(tree, path, True)))
        assert_refused(pack(set_at(tree, path, False)))


@pytest.mark.parametrize("value", [1_700_000_000.25, 12.5], ids=["created_at", "timeout"])
def test_bool_where_number_expected_refused(value: float) -> None:
    tree = tree_of(full_message())
    for path in find(tree, value):
        assert_refused(pack(set_at(tree, path, True)))


@pytest.mark.parametrize("value", [-1, -(2**40)])
def test_negative_counts_refused(value: int) -> None:
    tree = tree_of(full_message())
    for count in (7, 5, 3):
        for path in find(tree, count):
            assert_refused(pack(set_at(tree, path, value)))


@pytest.mark.parametrize(
    ("target", "bad"),
    [
        ("the-task-name", ""),
        ("the-task-name", "x" * 256),
        ("job:msg:main-1", "bad id with spaces"),
        ("job:msg:main-1", "a*b"),
        ("job:msg:main-1", ""),
        ("q-main", "a.b"),
        ("q-main", "x" * 200),
        ("retrying", "exploded"),
        ("group-1", "bad group"),
        ("chain-1", "a{b}"),
    ],
)
def test_invalid_field_values_refused(target: str, bad: str) -> None:
    tree = tree_of(full_message())
    found = find(tree, target)
    assert found
    for path in found:
        assert_refused(pack(set_at(tree, path, bad)))


@pytest.mark.parametrize("bad", ["not a cron", "", "* * * * * * * *", "61 * * * *"])
def test_invalid_job_schedule_refused(bad: str) -> None:
    tree = tree_of(full_message())
    _, job_path = _container_paths()
    (path,) = [p for p in find(tree, "0 3 * * 1") if p[: len(job_path)] == job_path]
    assert_refused(pack(set_at(tree, path, bad)))


def test_job_id_differing_from_meta_id_refused() -> None:
    tree = tree_of(full_message())
    # change only the job's id (the meta's id is the one next to the status)
    _, job_path = _container_paths()
    id_paths = [p for p in find(tree, "job:msg:main-1") if p[: len(job_path)] == job_path]
    assert len(id_paths) == 1
    assert_refused(pack(set_at(tree, id_paths[0], "other-id")))


@pytest.mark.parametrize(
    "bad_trace",
    [{"k": 1}, {"k": b"bytes"}, {"k": None}, ["k", "v"], "traceparent"],
)
def test_malformed_trace_refused(bad_trace: Any) -> None:
    tree = tree_of(full_message())
    (path,) = [p for p in paths(tree) if isinstance(get(tree, p), dict) and "traceparent" in get(tree, p)]
    assert_refused(pack(set_at(tree, path, bad_trace)))


def test_non_string_map_keys_refused() -> None:
    tree = tree_of(full_message())
    (path,) = [p for p in paths(tree) if isinstance(get(tree, p), dict) and "traceparent" in get(tree, p)]
    assert_refused(pack(set_at(tree, path, {1: "v"})))
    assert_refused(pack(set_at(tree, path, {b"k": "v"})))


@pytest.mark.parametrize(
    "bad_backoff",
    [[], [1.0, 2.0, 3.0], [0, 2.0, 3.0, True], [1.0, -2.0, 3.0, True], [1.0, 2.0, 3.0, 1],
     [1.0, 2.0, math.nan, False], ["1", 2.0, 3.0, True], [True, 2.0, 3.0, True], "backoff", 5],
)
def test_malformed_backoff_refused(bad_backoff: Any) -> None:
    tree = tree_of(full_message())
    # the backoffs of the meta and of the job are the containers of factor 2.5
    backoff_paths = [p[:-1] for p in find(tree, 2.5)]
    assert len(backoff_paths) == 2
    for path in backoff_paths:
        assert_refused(pack(set_at(tree, path, bad_backoff)))


@pytest.mark.parametrize(
    "ext",
    [msgpack.ExtType(1, b"x"), msgpack.Timestamp(1, 0), msgpack.ExtType(127, b"")],
    ids=["ext-1", "timestamp", "ext-127"],
)
def test_ext_types_refused(ext: Any) -> None:
    tree = tree_of(full_message())
    for _, path in _FIELD_PATHS[:6]:
        assert_refused(pack(set_at(tree, path, ext)))
    # anywhere, also in a place nobody reads: inside the trace
    (trace_path,) = [
        p for p in paths(tree) if isinstance(get(tree, p), dict) and "traceparent" in get(tree, p)
    ]
    assert_refused(pack(set_at(tree, (*trace_path, "extra"), ext)))
    # and as the whole message
    assert_refused(pack(ext))


@pytest.mark.parametrize("eta", [1e18, -1e18, math.inf, math.nan])
def test_out_of_range_meta_eta_refused_or_survives_re_encoding(eta: float) -> None:
    """A message the decoder accepts is re-encoded by the worker when it records the job's
    state: that record must decode again (else get_job() of the job fails for good)."""
    tree = tree_of(full_message())
    meta_path, _ = _container_paths()
    (path,) = [p for p in find(tree, ETA.timestamp()) if p[: len(meta_path)] == meta_path]
    data = pack(set_at(tree, path, eta))
    msg = _decode_or_refuse(data)
    if msg is not None:
        again = encode_message(msg)
        assert encode_message(decode_message(again)) == again


# -- out-of-range values: the rules of the constructors, applied by the decoder ------------

#: Values no field of a kind may hold (and the kinds' fields, found by their values).
_NOT_A_SPAN = [math.nan, math.inf, -math.inf, 0, 0.0, -1, -1.5, MAX_SECONDS * 2, 2**63, 1e300]
_NOT_A_TIME = [math.nan, math.inf, -math.inf, MAX_TIME + 1, MIN_TIME - 1, 2**63, 2**64 - 1]
_NOT_A_COUNT = [-1, MAX_COUNT + 1, 2**63, 2**64 - 1, -(2**63)]
_OUT_OF_RANGE: dict[str, tuple[Any, list[Any]]] = {
    "timeout (meta and job)": (12.5, _NOT_A_SPAN),
    "delay (a follow-up's)": (2.0, _NOT_A_SPAN),
    "backoff factor": (2.5, _NOT_A_SPAN),
    "backoff maximum": (30.0, _NOT_A_SPAN),
    "eta (meta and job)": (ETA.timestamp(), _NOT_A_TIME),
    "created_at": (1_700_000_000.25, _NOT_A_TIME),
    "processed_at": (1_700_000_100.5, _NOT_A_TIME),
    "deadline": (1_700_000_500.75, _NOT_A_TIME),
    "max_retries": (7, _NOT_A_COUNT),
    "retried": (5, _NOT_A_COUNT),
    "attempt": (3, _NOT_A_COUNT),
}


@pytest.mark.parametrize("field", list(_OUT_OF_RANGE))
def test_out_of_range_values_refused(field: str) -> None:
    """Hole 4: ``meta.timeout = NaN`` (and inf, negative, huge; the same for times and
    counts) decoded, and the worker's cancel scope raised on it. Each is a DecodeError
    naming the field, at each place the field appears."""
    value, bad_values = _OUT_OF_RANGE[field]
    tree = tree_of(full_message())
    found = find(tree, value)
    assert found
    for path in found:
        for bad in bad_values:
            with pytest.raises(DecodeError) as info:
                decode_message(pack(set_at(tree, path, bad)))
            assert "invalid" in str(info.value) or "type" in str(info.value)


def test_meta_schedule_checked_like_the_jobs() -> None:
    tree = tree_of(full_message())
    meta_path, _ = _container_paths()
    (path,) = [p for p in find(tree, "0 3 * * 1") if p[: len(meta_path)] == meta_path]
    assert_refused(pack(set_at(tree, path, "not a cron")))
    assert_refused(pack(set_at(tree, path, "1," * 200 + "1 * * * *")))


def test_eta_and_delay_together_refused() -> None:
    tree = tree_of(full_message())
    _, job_path = _container_paths()
    delay_path = (*job_path, 8)  # the job's delay, next to its eta (a schema-1 layout)
    assert get(tree, (*job_path, 7)) == ETA.timestamp()
    assert_refused(pack(set_at(tree, delay_path, 1.0)))


def _at_the_limits() -> Job:
    return Job(
        "t",
        max_retries=MAX_COUNT,
        backoff=Backoff(initial=MAX_SECONDS, factor=MAX_SECONDS, maximum=MAX_SECONDS),
        timeout=MAX_SECONDS,
        eta=datetime.fromtimestamp(MAX_TIME, timezone.utc),
        on_success=[Job("f", delay=MAX_SECONDS)],
        on_error=[Job("g", eta=datetime.fromtimestamp(MIN_TIME, timezone.utc))],
    )


def test_whatever_a_producer_builds_decodes() -> None:
    """The constructors and the decoder apply the same rules: values at the limits are
    accepted by both, and what a server builds from them (its eta, a retry's eta, a
    group's deadline) decodes."""
    server = Server(clock=lambda: 1_700_000_000.0)
    job = _at_the_limits()
    msg, data = server._new_message(job, deadline=1_700_000_000.0 + MAX_SECONDS)
    assert decode_message(data) == msg
    follow_up, data = server._new_message(job.on_success[0])
    assert follow_up.meta.eta == 1_700_000_000.0 + MAX_SECONDS
    assert decode_message(data) == follow_up
    retry = JobMessage(
        meta=Meta(
            id=job.id,
            status=Status.RETRYING,
            queue=job.queue,
            max_retries=MAX_COUNT,
            retried=MAX_COUNT,
            attempt=MAX_COUNT,
            eta=1_700_000_000.0 + job.backoff.delay(MAX_COUNT),  # type: ignore[union-attr]
        ),
        job=job,
    )
    assert decode_message(encode_message(retry)) == retry
    Group([Job("t")], timeout=MAX_SECONDS)
    Chain([Job("t"), Job("t")], timeout=MAX_SECONDS)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Job("t", timeout=math.nan),
        lambda: Job("t", timeout=math.inf),
        lambda: Job("t", timeout=MAX_SECONDS * 2),
        lambda: Job("t", delay=math.inf),
        lambda: Job("t", max_retries=MAX_COUNT + 1),
        lambda: Job("t", max_retries=2**64),
        lambda: Job("t", eta=datetime.max.replace(tzinfo=timezone.utc)),
        lambda: Job("t", eta=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
        lambda: Job("t", schedule="1," * 200 + "1 * * * *"),
        lambda: Backoff(initial=math.nan),
        lambda: Backoff(maximum=math.inf),
        lambda: Group([Job("t")], timeout=math.inf),
        lambda: Chain([Job("t"), Job("t")], timeout=math.nan),
    ],
    ids=[
        "timeout-nan",
        "timeout-inf",
        "timeout-huge",
        "delay-inf",
        "max_retries-over",
        "max_retries-2**64",
        "eta-year-10000-utc",
        "eta-year-0-utc",
        "schedule-too-long",
        "backoff-nan",
        "backoff-inf",
        "group-timeout-inf",
        "chain-timeout-nan",
    ],
)
def test_producer_refuses_what_would_not_decode(build: Any) -> None:
    with pytest.raises(InvalidInputError):
        build()


# -- the reasons of refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"\xc1", b"\x91" * 100_000 + b"\xc0", b"", b"\x00garbage"],
    ids=["reserved-byte", "too-deep", "empty", "trailing-data"],
)
def test_refusal_reasons_say_what_was_wrong(data: bytes) -> None:
    """Hole 8: a dead letter's reason read ``not a msgpack message: `` (an exception with
    no text): the exception's type name stands in for its text."""
    with pytest.raises(DecodeError) as info:
        decode_message(data)
    reason = str(info.value)
    assert not reason.rstrip().endswith(":"), reason
    assert reason.split(": ", 1)[1]


def test_refusal_reason_of_a_huge_value_is_cut() -> None:
    tree = tree_of(full_message())
    with pytest.raises(DecodeError) as info:
        decode_message(pack(set_at(tree, find_one(tree, "group-1"), "x y" * 100_000)))
    assert len(str(info.value)) < 1000


# -- peeking at a message that does not decode ------------------------------------------------


def test_peek_reads_the_ids_of_a_message_that_does_not_decode() -> None:
    tree = tree_of(full_message())
    bad = pack(set_at(tree, find(tree, 12.5)[0], math.nan))
    assert_refused(bad)
    assert peek_message(bad) == Peek(
        id="job:msg:main-1",
        queue="q-main",
        task="the-task-name",
        group_id="group-1",
        chain_id="chain-1",
    )
    # cut anywhere after the id: the id is still read, the rest as far as it goes
    data = encode_message(full_message())
    for end in range(20, len(data), 7):
        assert peek_message(data[:end]).id == "job:msg:main-1"
    # a prefix of max_size bytes at most is read
    assert peek_message(data, max_size=30) == Peek(id="job:msg:main-1")


@pytest.mark.parametrize(
    "tree",
    [
        [2, ["job-1"], []],  # another schema version: the positions are not known
        ["1", ["job-1"], []],
        [1, "job-1", []],
        [1, [], []],
        [1, ["bad id with spaces"], []],
        [1, [5], []],
        [1, [msgpack.ExtType(1, b"x")], []],
        {"v": 1, "meta": ["job-1"]},
        [1, ["job-1"]],
    ],
)
def test_peek_trusts_nothing(tree: Any) -> None:
    assert peek_message(pack(tree)).id is None


def test_peek_fields_need_the_full_layout() -> None:
    """In a meta of another length the positions are not known: only the id is read."""
    tree = tree_of(full_message())
    meta_path, _ = _container_paths()
    short = delete_at(tree, (*meta_path, 1))  # the status gone: every later field moves
    assert peek_message(pack(short)) == Peek(id="job:msg:main-1")


def test_peek_of_random_bytes_never_raises() -> None:
    rng = random.Random(77)
    valid = encode_message(full_message())
    for _ in range(500):
        data = bytearray(valid)
        data[rng.randrange(len(data))] = rng.randrange(256)
        for sample in (bytes(data), rng.randbytes(rng.randrange(0, 60))):
            peeked = peek_message(sample)
            assert peeked.id is None or isinstance(peeked.id, str)


# -- stored group/chain and cron records: the same bounded decoder ---------------------------


def _parent(kind: str = CHAIN) -> ParentInfo:
    jobs = [Job("t", id="a"), Job("t", id="b")]
    return ParentInfo(
        kind=kind,
        id="p-1",
        created_at=1_700_000_000.0,
        deadline=None,
        job_ids=("a", "b"),
        links=tuple(job_to_wire(j) for j in jobs) if kind == CHAIN else (),
    )


def test_parent_and_template_round_trip() -> None:
    for kind in (GROUP, CHAIN):
        assert decode_parent(encode_parent(_parent(kind))) == _parent(kind)
    job = Job("t", b"x", schedule="*/5 * * * *")
    assert decode_template(encode_template(job)) == job


def _bad_records() -> dict[str, tuple[bytes, bytes]]:
    """name -> (bad group/chain record, bad cron record)"""
    parent = msgpack.unpackb(encode_parent(_parent()), raw=False)
    template = msgpack.unpackb(encode_template(Job("t", schedule="* * * * *")), raw=False)
    ext = msgpack.ExtType(1, b"x")
    big = b"x" * MAX_RECORD_SIZE
    deep = b"\x91" * 100_000 + b"\xc0"
    return {
        "oversized": (  # valid records, but over the limit
            pack(set_at(parent, (6, 0, 1), big)),
            pack(set_at(template, (1, 1), big)),
        ),
        "deeply-nested": (deep, deep),
        "ext-in-a-link-or-job": (
            pack(set_at(parent, (6, 0, 1), ext)),
            pack(set_at(template, (1, 1), ext)),
        ),
        "ext-anywhere": (
            pack([*parent[:6], [*parent[6], ext]]),
            pack([1, template[1], ext]),
        ),
        "timestamp-ext": (
            pack(set_at(parent, (3,), msgpack.Timestamp(1, 0))),
            pack(set_at(template, (0,), msgpack.Timestamp(1, 0))),
        ),
        "nan-times": (
            pack(set_at(parent, (4,), math.nan)),
            pack(set_at(template, (1, 6), math.nan)),
        ),
        "bad-ids": (
            pack(set_at(parent, (5, 0), "bad id")),
            pack(set_at(template, (1, 2), "bad id")),
        ),
        "not-msgpack": (b"\xc1", b"\xc1"),
    }


_BAD_RECORDS = _bad_records()


@pytest.mark.parametrize("kind", list(_BAD_RECORDS))
def test_bad_stored_records_refused(kind: str) -> None:
    """Hole 9: group/chain and cron records were decoded with a bare ``msgpack.unpackb``
    (no size limit, extension types let through, a chain's links unchecked until used)."""
    parent, template = _BAD_RECORDS[kind]
    with pytest.raises(DecodeError) as info:
        decode_parent(parent)
    assert not str(info.value).rstrip().endswith(":")
    with pytest.raises(DecodeError) as info:
        decode_template(template)
    assert not str(info.value).rstrip().endswith(":")


def test_records_over_the_limit_are_refused_when_written() -> None:
    big = Job("t", b"x" * (MAX_RECORD_SIZE // 2 + 1), id="big")
    links = (job_to_wire(big), job_to_wire(attrs.evolve(big, id="big-2")))
    info = ParentInfo(
        kind=CHAIN,
        id="p",
        created_at=1.0,
        deadline=None,
        job_ids=("big", "big-2"),
        links=links,
    )
    with pytest.raises(PayloadTooLargeError):
        encode_parent(info)
    with pytest.raises(PayloadTooLargeError):
        encode_template(Job("t", b"x" * (MAX_RECORD_SIZE + 1), schedule="* * * * *"))


def _nested(depth: int) -> JobMessage:
    job = Job("leaf", id="d0")
    for i in range(1, depth + 1):
        job = Job("t", id=f"d{i}", on_success=[job])
    return JobMessage(meta=Meta(id=job.id, status=Status.QUEUED, queue=job.queue), job=job)


def test_moderate_nesting_accepted() -> None:
    msg = _nested(5)
    assert decode_message(encode_message(msg)) == msg


def test_follow_ups_nested_deeper_than_the_limit_refused() -> None:
    assert_refused(encode_message(_nested(200)))


def test_deeply_nested_msgpack_refused() -> None:
    # 100 000 nested one-element arrays: must not blow the stack or hang
    assert_refused(b"\x91" * 100_000 + b"\xc0")
    assert_refused(b"\x81\xa1k" * 100_000 + b"\xc0")


def test_over_the_size_limit_refused() -> None:
    data = encode_message(full_message())
    assert decode_message(data, max_size=len(data)) == full_message()
    with pytest.raises(DecodeError, match="limit"):
        decode_message(data, max_size=len(data) - 1)
    big = Job("t", b"x" * 100_000)
    big_data = encode_message(
        JobMessage(meta=Meta(id=big.id, status=Status.QUEUED, queue=big.queue), job=big)
    )
    with pytest.raises(DecodeError):
        decode_message(big_data, max_size=50_000)


def test_decode_error_is_a_value_error_and_tasqueue_error() -> None:
    from tasqueue_anyio import TasqueueError

    with pytest.raises(DecodeError) as info:
        decode_message(b"\xc1")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TasqueueError)


# -- fuzz ------------------------------------------------------------------------------------


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(13 if depth < 2 else 10)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 2**64 - 1])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, -1.5, 1e300, -1e300, math.inf, -math.inf, math.nan])
    if kind == 4:
        return rng.choice(["", "t", "x" * 300, "a b", "queued", "processing", "*/5 * * * *", "é"])
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 20))
    if kind == 6:
        if rng.randrange(4) == 0:
            return msgpack.Timestamp(rng.randrange(2**34), rng.randrange(10**9))
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(0, 9)))
    if kind == 7:
        return rng.choice([1e18, -1e18, 1e10, 253402300800.0, -62135596800.0])
    if kind == 8:
        return rng.choice(["0 3 * * 1", "R * * * *", "0 0 31 2 *", "@hourly", "* * * * * *"])
    if kind == 9:
        return "q-" + rng.choice(["main", "follow"])
    if kind == 10:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 11:
        return {str(rng.randrange(5)): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [0.5, 2.5, 30.0, rng.choice([True, False, 1, None])]


def _decode_or_refuse(data: bytes) -> JobMessage | None:
    """Decode ``data``; a refusal must be a DecodeError and nothing else."""
    try:
        return decode_message(data)
    except DecodeError:
        return None


def test_fuzz_random_bytes() -> None:
    rng = random.Random(20240601)
    for _ in range(700):
        _decode_or_refuse(rng.randbytes(rng.randrange(0, 200)))


def _byte_mutations(rng: random.Random, valid: bytes, count: int) -> Iterator[bytes]:
    for _ in range(count):
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                data.insert(pos, rng.randrange(256))
            elif op == 2 and len(data) > 1:
                del data[pos]
            else:
                data = data[:pos]
                if not data:
                    break
        yield bytes(data)


def _structural_mutations(rng: random.Random, tree: Any, count: int) -> Iterator[bytes]:
    all_paths = list(paths(tree))
    produced = 0
    while produced < count:
        mutated = tree
        for _ in range(rng.randrange(1, 3)):
            path = rng.choice(list(paths(mutated)) or all_paths)
            try:
                if rng.randrange(5) == 0:
                    mutated = delete_at(mutated, path)
                else:
                    mutated = set_at(mutated, path, _random_value(rng))
            except (KeyError, IndexError, TypeError):
                continue
        try:
            data = pack(mutated)
        except (ValueError, TypeError, OverflowError):
            continue  # not representable in msgpack (e.g. an int over 64 bits)
        produced += 1
        yield data


def test_fuzz_byte_mutations_of_a_valid_message() -> None:
    rng = random.Random(1234)
    for data in _byte_mutations(rng, encode_message(full_message()), 700):
        _decode_or_refuse(data)


def test_fuzz_structural_mutations_of_a_valid_message() -> None:
    rng = random.Random(987654)
    for data in _structural_mutations(rng, tree_of(full_message()), 1000):
        _decode_or_refuse(data)


def test_fuzz_whatever_decodes_survives_re_encoding() -> None:
    """A worker re-encodes every message it accepted (to record its state): whatever
    decodes must encode again into bytes that decode to the same message."""
    rng = random.Random(987654)
    tree = tree_of(full_message())
    failures: list[str] = []
    for data in _structural_mutations(rng, tree, 1000):
        msg = _decode_or_refuse(data)
        if msg is None:
            continue
        again = encode_message(msg)
        try:
            if encode_message(decode_message(again)) != again:
                failures.append(f"changed on re-encoding: {msgpack.unpackb(data)!r}")
        except DecodeError as exc:
            failures.append(f"{exc}: {msgpack.unpackb(data, raw=False)!r}")
    assert not failures, f"{len(failures)} accepted messages broke on re-encoding: {failures[0]}"


# -- the fuzzers' oracle: a real worker settles every input --------------------------------
#
# Each input is put on a queue of a memory broker and handed to a real worker's processor
# (the loop that runs ``Worker.process`` and turns a failure into a redelivery). Whatever
# the input, the delivery must be settled exactly once and never given back: dead-lettered
# when it does not decode (and then the job its readable id names, stored as enqueued,
# ends ``failed`` with the reason), acked when it does (after running, or being refused,
# with its job left in no running state).

#: The server's clock: before full_message()'s group/chain deadline, so its runs start.
_CLOCK = 1_700_000_000.0
_QUEUE = "fuzz"
_TASKS = {"the-task-name": "q-main", "child-ok": "q-follow", "leaf": "default"}


class _Recorded(ShimDelivery):
    """A memory broker's delivery, recording how the worker settled it."""

    __slots__ = ("reason", "settled")

    def __init__(self, inner: Delivery) -> None:
        super().__init__(inner)
        self.settled: list[str] = []
        self.reason = ""

    async def ack(self, *, enqueue: Any = (), announce: Any = ()) -> None:
        self.settled.append("ack")
        await super().ack(enqueue=enqueue, announce=announce)

    async def nack(self, *, delay: float = 0) -> None:
        self.settled.append("nack")
        await super().nack(delay=delay)

    async def dead_letter(self, reason: str) -> None:
        self.settled.append("dead_letter")
        self.reason = reason
        await super().dead_letter(reason)


async def _no_checkpoint(payload: bytes, ctx: Any) -> None:
    """A handler that ends without a checkpoint (so even a tiny timeout lets it end)."""


async def _assert_settled(data: bytes) -> str:
    """Run ``data`` through a real worker; check the oracle; return its outcome."""
    broker, results = MemoryBroker(clock=lambda: _CLOCK), MemoryResults()
    server = Server(broker=broker, results=results, clock=lambda: _CLOCK)
    for task, queue in _TASKS.items():
        server.register_task(task, _no_checkpoint, queue=queue, raw=True)
    original = full_message()
    stored = JobRecord(status="retrying", data=encode_message(original), run="4.1")
    await results.set_jobs({original.id: stored})
    await broker.enqueue(Envelope(queue=_QUEUE, data=data, id="input"))
    async with consuming(broker, _QUEUE) as stream:
        delivery = _Recorded(await receive(stream))
    send, receive_stream = anyio.create_memory_object_stream[Delivery](1)
    with send:
        send.send_nowait(delivery)
    with anyio.fail_after(5):
        await Worker(server, server._tasks, server._queues)._processor(receive_stream)

    try:
        msg: JobMessage | None = decode_message(data, max_size=server.max_message_size)
    except DecodeError:
        msg = None
    if msg is None:
        assert delivery.settled == ["dead_letter"], (delivery.settled, data)
        assert delivery.reason.split(": ", 1)[-1].strip(), delivery.reason
        state = await results.get_job(original.id)
        if peek_message(data).id == original.id:
            assert state.status == "failed", data
            ended = server._decode_record(state)
            assert ended.meta.prev_error == f"DecodeError: {delivery.reason}"
            assert ended.job == original.job
        else:
            assert state == stored
        return "dead-lettered"
    assert delivery.settled == ["ack"], (delivery.settled, msg)
    state = await results.get_job(msg.id)
    assert state.status != "processing", msg
    server._decode_record(state)  # what the worker recorded decodes
    return state.status


def _targeted_mutations() -> Iterator[bytes]:
    """Every part of a valid message replaced by each of the values that broke workers:
    NaN, infinities, negative, past 64 bits (not representable: skipped), wrong types,
    huge strings and bytes."""
    tree = tree_of(full_message())
    values: list[Any] = [
        math.nan,
        math.inf,
        -math.inf,
        -1,
        -1.0,
        0,
        2**31,
        2**63,
        2**64 - 1,
        2**64,
        1e300,
        None,
        True,
        "",
        "x" * 100_000,
        b"\x00" * 100_000,
        [],
        {},
    ]
    for path in paths(tree):
        for value in values:
            try:
                yield pack(set_at(tree, path, value))
            except (OverflowError, TypeError, ValueError):
                continue  # not representable in msgpack (an int over 64 bits)


async def _fuzz_through_a_worker(inputs: Iterator[bytes]) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for data in inputs:
        outcome = await _assert_settled(data)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


@pytest.mark.anyio
async def test_fuzz_oracle_targeted_mutations_are_settled() -> None:
    """Hole 4: each field of a valid message replaced by an out-of-range value or a wrong
    type either does not decode (dead-lettered once, its job failed) or runs and is
    settled; none is given back to come again."""
    outcomes = await _fuzz_through_a_worker(_targeted_mutations())
    assert outcomes["dead-lettered"] > 0
    assert outcomes.get("successful", 0) > 0  # some mutations are harmless and run


@pytest.mark.anyio
async def test_fuzz_oracle_random_and_mutated_bytes_are_settled() -> None:
    rng = random.Random(4242)
    valid = encode_message(full_message())
    inputs = [
        *_byte_mutations(rng, valid, 150),
        *_structural_mutations(rng, tree_of(full_message()), 250),
        *(rng.randbytes(rng.randrange(0, 200)) for _ in range(50)),
        valid,
    ]
    outcomes = await _fuzz_through_a_worker(iter(inputs))
    assert outcomes["dead-lettered"] > 0
    assert outcomes.get("successful", 0) > 0


# -- events ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "job_id", "status"),
    [("finished", "job-1", "successful"), ("cancel", "job:msg:2", ""), ("finished", "x", "failed")],
)
def test_event_round_trip(kind: str, job_id: str, status: str) -> None:
    assert decode_event(encode_event(kind, job_id, status)) == (kind, job_id, status)


def test_event_default_status_is_empty() -> None:
    assert decode_event(encode_event("cancel", "job-1")) == ("cancel", "job-1", "")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        pack({"kind": "cancel"}),
        pack([1, "cancel", "job"]),
        pack([99, "cancel", "job", ""]),
        pack([1, "cancel", 5, ""]),
        pack([1, b"cancel", "job", ""]),
        pack([1, "cancel", "job", None]),
        pack([1, "finished", "x" * 5000, "successful"]),
        pack(msgpack.ExtType(3, b"")),
    ],
)
def test_malformed_event_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_event(data)


def test_fuzz_events() -> None:
    rng = random.Random(42)
    valid = encode_event("finished", "job-1", "successful")
    for _ in range(300):
        data = bytearray(valid)
        data[rng.randrange(len(data))] = rng.randrange(256)
        for data_ in (bytes(data), rng.randbytes(rng.randrange(0, 40))):
            with contextlib.suppress(DecodeError):
                decode_event(data_)


# -- job options (a map after the fixed fields) ------------------------------------------------


def test_a_plain_job_has_no_options_map_and_a_priority_round_trips() -> None:
    plain = job_to_wire(Job("t", b"x", id="j1"))
    assert len(plain) == 12  # byte for byte what a job was before options existed
    urgent = Job("t", b"x", id="j2", priority=7, on_success=[Job("f", priority=2)])
    wire = job_to_wire(urgent)
    assert wire[12] == {"priority": 7}
    back = job_from_wire(wire)
    assert back == urgent
    assert back.on_success[0].priority == 2


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 1.0}, "priority"),
        ({"rate": 3}, "unknown"),
        ([7], "not a map"),
    ],
)
def test_bad_job_options_are_refused(options: Any, reason: str) -> None:
    wire = [*job_to_wire(Job("t", b"x", id="j")), options]
    with pytest.raises(DecodeError, match=reason):
        job_from_wire(wire)
    with pytest.raises(DecodeError):
        job_from_wire([*wire, {}])  # 14 fields


def test_an_error_history_round_trips_and_bad_ones_are_refused() -> None:
    msg = full_message()
    plain = tree_of(msg)
    assert len(plain[1]) == 18  # no history: the meta as it was before histories existed
    with_history = JobMessage(meta=attrs.evolve(msg.meta, errors=("E1", "E2")), job=msg.job)
    tree = tree_of(with_history)
    assert tree[1][18] == ["E1", "E2"]
    assert decode_message(pack(tree)) == with_history
    assert peek_message(pack(tree)).task == msg.job.task  # a peek reads past it
    for bad in ([], ["x"] * 9, [1], "E1", ["x" * 4097]):
        assert_refused(pack([tree[0], [*plain[1], bad], tree[2]]))
