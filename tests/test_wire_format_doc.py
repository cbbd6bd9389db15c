"""The page ``docs/explanation/wire-format.md`` against the code.

Its tables name the positions the codec reads, its worked example is built here by hand
with nothing but msgpack (following the tables) and equals both the library's encoding
and the bytes printed on the page, and a hand-built message put on a queue through the
bytes-level broker API, after the state the page tells a foreign producer to write, is run
by a worker to a ``successful`` end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest

from tasqueue_anyio import (
    Codec,
    Job,
    JobMessage,
    JsonCodec,
    Meta,
    MsgpackCodec,
    Server,
    Status,
    TaskFunction,
)
from tasqueue_anyio._codec import (
    _JOB_FIELDS,
    _JOB_OPTIONS,
    _META_FIELDS,
    decode_message,
    encode_event,
    encode_message,
)
from tasqueue_anyio.abc import Envelope, JobRecord
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

pytestmark = pytest.mark.anyio

PAGE = Path(__file__).resolve().parent.parent / "docs" / "explanation" / "wire-format.md"
TIMEOUT = 5.0

JOB_ID = "add-1"
CREATED_AT = 1700000000.0


def page() -> str:
    return PAGE.read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text of the page under ``heading`` (a whole heading line), up to the next
    heading of any level."""
    text = page()
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = re.compile(r"^#{1,6} ", re.MULTILINE).search(text, start)
    return text[start : end.start() if end else len(text)]


def table_names(text: str) -> list[tuple[int, str]]:
    """``(position, name)`` of each row ``| N | `name` ...`` of a table."""
    rows = re.findall(r"^\| (\d+) \| `(\w+)`", text, re.MULTILINE)
    return [(int(index), name) for index, name in rows]


def page_bytes() -> bytes:
    """The bytes of the worked example, as printed on the page."""
    match = re.search(
        r"```\{code-block\} text\n:name: worked-example-bytes\n\n(.*?)```", page(), re.DOTALL
    )
    assert match is not None, "the worked example's hex block is missing"
    return bytes.fromhex(match.group(1))


def hand_built() -> bytes:
    """The worked example, by hand from the page's tables: msgpack only."""
    payload = msgpack.packb([[40, 2], {}])  # MsgpackCodec's [args, kwargs]
    meta: list[Any] = [
        JOB_ID,  # 0 id
        "queued",  # 1 status
        "default",  # 2 queue
        0,  # 3 max_retries
        0,  # 4 retried
        None,  # 5 prev_error
        CREATED_AT,  # 6 created_at
        None,  # 7 processed_at
        None,  # 8 eta
        None,  # 9 timeout
        None,  # 10 schedule
        None,  # 11 backoff
        None,  # 12 prev_job_result
        0,  # 13 attempt
        None,  # 14 group_id
        None,  # 15 chain_id
        None,  # 16 deadline
        {},  # 17 trace
    ]
    job: list[Any] = [
        "add",  # 0 task
        payload,  # 1 payload
        JOB_ID,  # 2 id
        "default",  # 3 queue
        0,  # 4 max_retries
        None,  # 5 backoff
        None,  # 6 timeout
        None,  # 7 eta
        None,  # 8 delay
        None,  # 9 schedule
        [],  # 10 on_success
        [],  # 11 on_error
    ]
    data: bytes = msgpack.packb([1, meta, job], use_bin_type=True)
    return data


def make_server(
    broker: MemoryBroker, results: MemoryResults, codec: Codec | None = None
) -> tuple[Server, TaskFunction[[int, int], int], list[int]]:
    """A server with the typed task ``add`` of the page; ``ran`` gets each run's sum."""
    server = Server(broker=broker, results=results, codec=codec)
    ran: list[int] = []

    @server.task()
    async def add(a: int, b: int) -> int:
        ran.append(a + b)
        return a + b

    return server, add, ran


# -- the page's tables and bytes ----------------------------------------------------------


def test_the_tables_name_every_position_the_codec_reads() -> None:
    meta = table_names(section("## `meta`: 18 positions"))
    assert meta == list(enumerate([name for name, _, _ in _META_FIELDS] + ["errors"]))
    job = table_names(section("## `job`: 12 positions"))
    assert job == list(enumerate(name for name, _, _ in _JOB_FIELDS))
    options = re.findall(r"^\| `(\w+)` \|", section("### The options map"), re.MULTILINE)
    assert options == list(_JOB_OPTIONS)


def test_the_worked_example_is_the_librarys_encoding_and_the_pages_bytes() -> None:
    by_hand = hand_built()
    job = Job("add", msgpack.packb([[40, 2], {}]), id=JOB_ID)
    meta = Meta(id=JOB_ID, status=Status.QUEUED, queue="default", created_at=CREATED_AT)
    assert encode_message(JobMessage(meta=meta, job=job)) == by_hand
    assert page_bytes() == by_hand
    assert len(by_hand) == 83  # "Its 83 bytes"
    decoded = decode_message(by_hand)
    assert decoded.job == job
    assert decoded.meta == meta


@pytest.mark.parametrize(
    ("codec", "payload", "result"),
    [
        (MsgpackCodec(), bytes.fromhex("92 92 28 02 80"), bytes.fromhex("2a")),
        (JsonCodec(), b"[[40,2],{}]", b"42"),
    ],
)
def test_the_typed_face_encodes_arguments_as_the_page_says(
    codec: Codec, payload: bytes, result: bytes
) -> None:
    _, add, _ = make_server(MemoryBroker(), MemoryResults(), codec)
    job = add.job(40, 2)  # what add.enqueue(40, 2) enqueues
    assert (job.task, job.payload) == ("add", payload)
    assert codec.encode(42) == result


def test_an_event_is_nul_separated_text() -> None:
    assert encode_event("finished", JOB_ID, "successful") == b"1\0finished\0add-1\0successful"


# -- a foreign producer's message, run by a worker -----------------------------------------


async def test_a_hand_built_message_runs_to_a_successful_end(anyio_backend: str) -> None:
    message = page_bytes()
    async with MemoryBroker() as broker, MemoryResults() as results:
        server, _, ran = make_server(broker, results)
        # what the page tells a foreign producer to do: the state first, only if the id
        # has none, then the message under the id "<job id>/0"
        record = JobRecord(status=Status.QUEUED.value, data=message)
        assert await results.claim_jobs({JOB_ID: record}) == {JOB_ID}
        assert await results.claim_jobs({JOB_ID: record}) == set()  # the id is taken now
        await broker.enqueue(Envelope(queue="default", data=message, id=f"{JOB_ID}/0"))
        async with server:
            assert (await server.get_job(JOB_ID)).status is Status.QUEUED
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
                ended = await server.wait(JOB_ID, timeout=TIMEOUT)
                tg.cancel_scope.cancel()
            assert ended.status is Status.SUCCESSFUL
            assert ended.meta.attempt == 1
            assert ran == [42]
            assert await server.get_result(JOB_ID) == b"*"  # MsgpackCodec's 42
            assert await server.job(JOB_ID).result(timeout=TIMEOUT) == 42


async def test_without_a_state_it_runs_but_is_unknown_until_it_starts(anyio_backend: str) -> None:
    message = page_bytes()
    async with MemoryBroker() as broker, MemoryResults() as results:
        server, _, ran = make_server(broker, results)
        await broker.enqueue(Envelope(queue="default", data=message, id=f"{JOB_ID}/0"))
        async with server:
            with pytest.raises(LookupError):  # JobNotFoundError: wait() cannot either
                await server.get_job(JOB_ID)
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
                await settled(broker)
                tg.cancel_scope.cancel()
            assert ran == [42]
            assert (await server.get_job(JOB_ID)).status is Status.SUCCESSFUL


async def test_a_message_for_an_id_that_ended_never_runs(anyio_backend: str) -> None:
    message = page_bytes()
    async with MemoryBroker() as broker, MemoryResults() as results:
        server, _, ran = make_server(broker, results)
        await results.set_jobs({JOB_ID: JobRecord(status=Status.SUCCESSFUL.value, data=message)})
        await broker.enqueue(Envelope(queue="default", data=message, id=f"{JOB_ID}/0"))
        async with server, anyio.create_task_group() as tg:
            await tg.start(server.run)
            await settled(broker)
            tg.cancel_scope.cancel()
        assert ran == []


async def settled(broker: MemoryBroker) -> None:
    """Wait until the queue ``default`` holds no message (due or in flight)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            counts = await broker.count("default")
            if counts.pending == 0 and counts.in_flight == 0 and counts.scheduled == 0:
                return
            await anyio.sleep(0.01)
