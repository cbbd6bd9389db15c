"""The results-store contract of the worker registry (:meth:`Results.put_worker`,
:meth:`Results.get_workers`, :meth:`Results.remove_worker`), on every store (the Redis
Cluster and nats-server 2.10 included) and both AnyIO backends, and the stored form of a
:class:`WorkerRecord`, decoded as untrusted bytes.

Worker ids are unique per test, and listings are checked only for the ids a test put, so
stores may be shared between tests.
"""

from __future__ import annotations

import math
import time
from typing import Any
from uuid import uuid4

import anyio
import msgpack
import pytest

from tasqueue_anyio import DecodeError, InvalidInputError
from tasqueue_anyio.abc import (
    MAX_WORKER_JOBS,
    MAX_WORKER_RECORD_SIZE,
    Results,
    WorkerRecord,
    check_worker_ttl,
)
from tasqueue_anyio.results.memory import MemoryResults
from tasqueue_anyio.results.nats import H_WORKER_TTL, NatsResults
from tasqueue_anyio.results.redis import RedisResults

#: The TTL of records that must stay for the test; the one of records that must go (NATS
#: per-message TTLs are whole seconds: 1 is the shortest the server itself removes).
LONG = 120.0
SHORT = 1.0
#: Upper bound on waiting for a short-lived record to go.
TIMEOUT = 8.0


def worker(
    worker_id: str | None = None,
    *,
    started_at: float = 1_700_000_000.0,
    seen_at: float = 1_700_000_001.5,
    jobs: tuple[str, ...] = (),
    queues: dict[str, int] | None = None,
) -> WorkerRecord:
    return WorkerRecord(
        id=worker_id or f"host:{uuid4().int % 100000}:{uuid4().hex[:6]}",
        hostname="host",
        pid=4242,
        queues={"default": 10, "emails": 2} if queues is None else queues,
        started_at=started_at,
        seen_at=seen_at,
        jobs=jobs,
        backend="trio",
        version="0.1.0",
    )


async def mine(results: Results, ids: set[str]) -> list[WorkerRecord]:
    """The live records of ``ids``, in the store's order."""
    return [record for record in await results.get_workers() if record.id in ids]


async def gone(results: Results, worker_id: str) -> None:
    """Wait until ``worker_id``'s record is no longer listed (its TTL running out: nothing
    announces it)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            if worker_id not in {record.id for record in await results.get_workers()}:
                return
            await anyio.sleep(0.1)


# -- the contract, on every store ---------------------------------------------------------------


@pytest.mark.anyio
async def test_put_get_replace_remove(results: Results) -> None:
    first = worker(started_at=100.0, jobs=("job-1", "job:2/x"))
    second = worker(started_at=50.0)
    ids = {first.id, second.id}
    assert await mine(results, ids) == []

    await results.put_worker(first, LONG)
    await results.put_worker(second, LONG)
    assert await mine(results, ids) == [second, first]  # by started_at

    # a put replaces the record: the latest heartbeat is what is read
    later = worker(first.id, started_at=100.0, seen_at=1_700_000_009.0, jobs=())
    await results.put_worker(later, LONG)
    assert await mine(results, ids) == [second, later]
    [read] = await mine(results, {first.id})
    assert read.jobs == ()
    assert read.seen_at == 1_700_000_009.0
    assert read.queues == {"default": 10, "emails": 2}

    await results.remove_worker(first.id)
    assert await mine(results, ids) == [second]
    # idempotent: removed, never put
    await results.remove_worker(first.id)
    await results.remove_worker(f"never-{uuid4().hex}")
    await results.remove_worker(second.id)
    assert await mine(results, ids) == []


@pytest.mark.anyio
async def test_equal_start_times_are_ordered_by_id(results: Results) -> None:
    tag = uuid4().hex[:8]
    records = [worker(f"{tag}-{name}", started_at=7.0) for name in ("c", "a", "b")]
    for record in records:
        await results.put_worker(record, LONG)
    listed = await mine(results, {record.id for record in records})
    assert [record.id for record in listed] == [f"{tag}-a", f"{tag}-b", f"{tag}-c"]


@pytest.mark.anyio
async def test_ids_that_need_encoding_stay_apart(results: Results) -> None:
    """Ids are free text: a backend that makes keys of them must encode them, and ids that
    look alike (a separator, its escape) must not reach each other's record."""
    tag = uuid4().hex[:8]
    ids = [
        f"{tag}.a",
        f"{tag}=2Ea",
        f"{tag}:a",
        f"{tag} a*>",
        f"{tag}/é/ü",
        f"{tag}{{w}}:workers",
    ]
    for index, worker_id in enumerate(ids):
        await results.put_worker(worker(worker_id, started_at=float(index)), LONG)
    assert [record.id for record in await mine(results, set(ids))] == ids
    await results.remove_worker(ids[0])
    assert [record.id for record in await mine(results, set(ids))] == ids[1:]
    for worker_id in ids[1:]:
        await results.remove_worker(worker_id)
    assert await mine(results, set(ids)) == []


@pytest.mark.anyio
async def test_records_expire_after_their_ttl(results: Results) -> None:
    short = worker(started_at=1.0)
    kept = worker(started_at=2.0)
    renewed = worker(started_at=3.0)
    ids = {short.id, kept.id, renewed.id}
    await results.put_worker(short, SHORT)
    await results.put_worker(renewed, SHORT)
    await results.put_worker(kept, LONG)
    assert await mine(results, ids) == [short, kept, renewed]
    # a heartbeat: the record lives its new TTL from this put on
    await results.put_worker(renewed, LONG)

    await gone(results, short.id)
    assert await mine(results, ids) == [kept, renewed]
    # a record put again after it expired is listed again
    await results.put_worker(short, LONG)
    assert await mine(results, ids) == [short, kept, renewed]
    for worker_id in ids:
        await results.remove_worker(worker_id)


@pytest.mark.anyio
async def test_many_workers(results: Results) -> None:
    tag = uuid4().hex[:8]
    records = [
        worker(
            f"{tag}-{i:03d}",
            started_at=1000.0 - i,
            jobs=tuple(f"job-{i}-{j}" for j in range(i % 5)),
            queues={f"q{k}": k + 1 for k in range(i % 4)},
        )
        for i in range(150)
    ]
    ids = {record.id for record in records}
    async with anyio.create_task_group() as tg:
        for record in records:
            tg.start_soon(results.put_worker, record, LONG)
    assert await mine(results, ids) == records[::-1]

    # one full record: every job id it may list, and its queues
    full = worker(
        f"{tag}-full",
        started_at=2000.0,
        jobs=tuple(f"{tag}-job-{j:03d}-" + "x" * 200 for j in range(MAX_WORKER_JOBS)),
        queues={f"queue-{k:04d}": k + 1 for k in range(500)},
    )
    await results.put_worker(full, LONG)
    assert await mine(results, {full.id}) == [full]

    async with anyio.create_task_group() as tg:
        for record in [*records, full]:
            tg.start_soon(results.remove_worker, record.id)
    assert await mine(results, {*ids, full.id}) == []


@pytest.mark.anyio
@pytest.mark.parametrize("ttl", [0, -1.0, math.nan, math.inf, 86400.5, True, "15"])
async def test_a_bad_ttl_is_refused(results: Results, ttl: Any) -> None:
    record = worker()
    with pytest.raises(InvalidInputError, match="ttl"):
        await results.put_worker(record, ttl)
    assert await mine(results, {record.id}) == []


async def _store_raw(results: Results, worker_id: str, data: bytes) -> None:
    """Write ``data`` where the store keeps ``worker_id``'s record, live for a while
    (backend-specific: what a damaged or foreign entry looks like)."""
    if isinstance(results, RedisResults):
        workers, alive = (key.decode() for key in results._worker_keys)
        now_ms = int(time.time() * 1000)  # (the test's Redis runs on this machine)
        await results.client.hset(workers, {worker_id: data})
        await results.client.zadd(alive, {worker_id: now_ms + 120_000})
    elif isinstance(results, NatsResults):
        key = results._worker_key(worker_id)
        await results._write(key, data, [(H_WORKER_TTL, "120.0")], expect=None, kv=results.cron)
    else:
        raise AssertionError(f"no raw access to {results!r}")


@pytest.mark.anyio
async def test_an_unreadable_record_is_left_out(
    results: Results, caplog: pytest.LogCaptureFixture
) -> None:
    if isinstance(results, MemoryResults):
        pytest.skip("the memory store keeps records, not bytes")
    good = worker(started_at=5.0)
    bad_id = f"bad-{uuid4().hex[:8]}"
    await results.put_worker(good, LONG)
    await _store_raw(results, bad_id, b"\xc1 not msgpack")
    assert await mine(results, {good.id, bad_id}) == [good]
    assert "unreadable worker record" in caplog.text
    await results.remove_worker(bad_id)
    await results.remove_worker(good.id)
    assert await mine(results, {good.id, bad_id}) == []


@pytest.mark.anyio
async def test_expired_records_are_deleted(results: Results) -> None:
    """Backend-specific: what expired is gone from the store itself, not only from the
    listing (Redis: both keys, at the next put or read; NATS: the server's TTL, or the
    reader's purge), and a reader's purge spares a record put after it read."""
    if isinstance(results, MemoryResults):
        pytest.skip("the memory store's expiry is tested with its clock")
    old = worker(started_at=1.0)
    await results.put_worker(old, SHORT)
    await gone(results, old.id)
    if isinstance(results, RedisResults):
        workers, alive = results._worker_keys
        assert await results.client.hget(workers, old.id) is None
        assert await results.client.zscore(alive, old.id) is None
        return
    assert isinstance(results, NatsResults)
    key = results._worker_key(old.id)
    assert (await results._read(key, results.cron))[1] is None
    # a purge of what a reader saw expired keeps a put made after the read
    await results.put_worker(old, LONG)
    [seen] = await results._scan(results.cron, key, headers_only=True)
    renewed = worker(old.id, started_at=1.0, seen_at=1_800_000_000.0)
    await results.put_worker(renewed, LONG)
    await results._purge_expired(results.cron, [seen])
    assert await mine(results, {old.id}) == [renewed]
    await results.remove_worker(old.id)
    assert (await results._read(key, results.cron))[1] is None


# -- the in-memory store's injected clock ---------------------------------------------------------


@pytest.mark.anyio
async def test_memory_expiry_follows_the_injected_clock() -> None:
    now = [1000.0]
    results = MemoryResults(clock=lambda: now[0])
    a, b = worker("a", started_at=1.0), worker("b", started_at=2.0)
    await results.put_worker(a, 10)
    await results.put_worker(b, 30)
    now[0] += 9.999
    assert await results.get_workers() == [a, b]
    await results.put_worker(b, 5)  # a heartbeat: 5 s from now on, whatever before
    now[0] += 0.001  # a's 10 s have passed: gone, though nobody deleted it
    assert await results.get_workers() == [b]
    now[0] += 4.998
    assert await results.get_workers() == [b]
    now[0] += 0.002
    assert await results.get_workers() == []
    await results.put_worker(a, 1)
    assert await results.get_workers() == [a]
    await results.remove_worker("a")
    assert await results.get_workers() == []


# -- the stored form --------------------------------------------------------------------------------


def packed(**changes: Any) -> bytes:
    value: dict[str, Any] = msgpack.unpackb(worker("w-1", jobs=("j",)).encode(), raw=False)
    for name, new in changes.items():
        if new is _DROP:
            del value[name]
        else:
            value[name] = new
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


_DROP = object()


def test_the_stored_form_round_trips() -> None:
    record = worker("h:1:abcdef", jobs=("a", "b"), queues={"q": 3})
    data = record.encode()
    assert WorkerRecord.decode(data) == record
    assert WorkerRecord.decode(bytearray(data)) == record
    value = msgpack.unpackb(data, raw=False)
    assert value["v"] == 1
    assert value["queues"] == {"q": 3}
    assert value["jobs"] == ["a", "b"]
    # fields it does not know are ignored (a later version may add some)
    assert WorkerRecord.decode(packed(extra={"x": 1})) == worker("w-1", jobs=("j",))
    # ints where floats are meant read as floats
    assert WorkerRecord.decode(packed(started_at=5)).started_at == 5.0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not a msgpack"),
        (b"\xc1", "not a msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({1: 2}), "not a msgpack"),  # non-str map keys
        (packed(v=2), "schema"),
        (packed(v=_DROP), "schema"),
        (packed(id=_DROP), "lacks id"),
        (packed(jobs=_DROP, queues=_DROP), "lacks queues, jobs"),
        (packed(id=""), "id must be"),
        (packed(id=b"bytes"), "id must be"),
        (packed(id="x" * 256), "id must be"),
        (packed(hostname=7), "hostname must be"),
        (packed(pid="1"), "pid must be"),
        (packed(pid=True), "pid must be"),
        (packed(pid=-1), "pid must be"),
        (packed(queues=["q"]), "queues must be"),
        (packed(queues={"q": 0}), "concurrency must be"),
        (packed(queues={"q": 1.5}), "concurrency must be"),
        (packed(queues={"": 1}), "queue name must be"),
        (packed(queues={f"q{i}": 1 for i in range(1025)}), "queues must be"),
        (packed(started_at="now"), "started_at must be"),
        (packed(seen_at=math.nan), "seen_at must be"),
        (packed(seen_at=math.inf), "seen_at must be"),
        (packed(jobs="abc"), "jobs must be"),
        (packed(jobs=[1]), "job id must be"),
        (packed(jobs=["j"] * (MAX_WORKER_JOBS + 1)), "jobs must be"),
        (packed(backend=None), "backend must be"),
        (packed(version=["1"]), "version must be"),
        (msgpack.packb({"v": 1, "id": msgpack.ExtType(5, b"x")}), "extension type"),
        (b"\x80" + b"\x00" * MAX_WORKER_RECORD_SIZE, "over the limit"),
    ],
)
def test_bad_data_is_refused_on_decode(data: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        WorkerRecord.decode(data)


def test_decode_wants_bytes() -> None:
    with pytest.raises(DecodeError, match="bytes"):
        WorkerRecord.decode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"id": ""},
        {"pid": -1},
        {"queues": {"q": 0}},
        {"jobs": ("j",) * (MAX_WORKER_JOBS + 1)},
        {"seen_at": math.nan},
        {"hostname": "\udc80"},  # not UTF-8
    ],
)
def test_an_invalid_record_cannot_be_built(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "id": "w",
        "hostname": "h",
        "pid": 1,
        "queues": {"q": 1},
        "started_at": 1.0,
        "seen_at": 2.0,
        "jobs": (),
        "backend": "asyncio",
        "version": "0.1.0",
        **changes,
    }
    with pytest.raises(InvalidInputError, match="invalid worker record"):
        WorkerRecord(**fields)


def test_a_record_keeps_no_alias_of_its_queues() -> None:
    queues = {"q": 1}
    record = worker("w", queues=queues)
    queues["r"] = 2
    assert record.queues == {"q": 1}


def test_check_worker_ttl() -> None:
    assert check_worker_ttl(15) == 15.0
    assert check_worker_ttl(0.25) == 0.25
    assert check_worker_ttl(86400) == 86400.0
    for bad in (0, -1, math.nan, math.inf, 86401, None, True):
        with pytest.raises(InvalidInputError):
            check_worker_ttl(bad)
