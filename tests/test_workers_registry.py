"""The worker registry as servers use it: ``Server.run()`` puts its record once started and
at every heartbeat (with the jobs in hand), removes it when it ends however it ends, and
never lets a failing registry end it; ``Client.get_workers()``; ``tasqueue workers``.

Heartbeats are called explicitly where a test needs one at a given moment
(``server._worker.heartbeat()``), and the interval is shortened where a test watches them
come by themselves, so no test waits the real 5 s.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import cli_app
import pytest
from redis_server import RedisServer
from server_support import TIMEOUT, noop, running, wait_event

import tasqueue_anyio
from tasqueue_anyio import BrokerError, Client, Job, JobContext, Server, Status
from tasqueue_anyio import _worker as worker_module
from tasqueue_anyio._worker import Worker
from tasqueue_anyio.abc import Broker, Results, WorkerRecord
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class Holder:
    """A handler that says it started, then holds its job until released."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, payload: bytes, ctx: JobContext) -> None:
        self.started.set()
        await self.release.wait()


def the_worker(server: Server) -> Worker:
    worker = server._worker
    assert worker is not None, "the server is not running"
    return worker


async def listed(results: Results, worker_id: str) -> WorkerRecord | None:
    for record in await results.get_workers():
        if record.id == worker_id:
            return record
    return None


async def wait_until(check: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Poll the async ``check`` until it returns something true (bounded)."""
    with anyio.fail_after(timeout):
        while True:
            if await check():
                return
            await anyio.sleep(0.02)


# -- on the in-memory pair ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_two_running_servers_are_listed_with_their_queues(anyio_backend: str) -> None:
    broker, results = MemoryBroker(), MemoryResults()
    one = Server(broker=broker, results=results)
    two = Server(broker=broker, results=results)
    one.register_task("a", noop, queue="alpha", concurrency=3, raw=True)
    two.register_task("b", noop, queue="beta", concurrency=2, raw=True)
    two.register_task("c", noop, queue="gamma", raw=True)
    async with Client(broker=broker, results=results) as client:
        assert await client.get_workers() == []
        async with anyio.create_task_group() as second:
            await second.start(two.run)
            async with anyio.create_task_group() as first:
                await first.start(one.run)
                # listed once started: the first heartbeat comes before run() reports so
                workers = await client.get_workers()
                assert {w.id for w in workers} == {
                    the_worker(one).worker_id,
                    the_worker(two).worker_id,
                }
                assert workers == sorted(workers, key=lambda w: (w.started_at, w.id))
                by_id = {w.id: w for w in workers}
                mine = by_id[the_worker(one).worker_id]
                theirs = by_id[the_worker(two).worker_id]
                assert mine.queues == {"alpha": 3}
                assert theirs.queues == {"beta": 2, "gamma": 10}
                for record in workers:
                    assert record.hostname == socket.gethostname()[:200]
                    assert record.pid == os.getpid()
                    assert record.id.startswith(f"{record.hostname}:{record.pid}:")
                    assert record.backend == anyio_backend
                    assert record.version == tasqueue_anyio.__version__
                    assert record.jobs == ()
                    assert record.started_at <= record.seen_at
                assert theirs.started_at <= mine.started_at
                first.cancel_scope.cancel()
            # gone as soon as its run() ended, not a TTL later
            assert [w.id for w in await client.get_workers()] == [theirs.id]
            second.cancel_scope.cancel()
        assert await client.get_workers() == []


@pytest.mark.anyio
async def test_a_run_has_an_id_of_its_own() -> None:
    server = Server()
    server.register_task("t", noop, queue="q", raw=True)
    ids = []
    async with server:
        for _ in range(2):
            async with running(server):
                ids.append(the_worker(server).worker_id)
                assert [w.id for w in await server.get_workers()] == ids[-1:]
    assert len(set(ids)) == 2


@pytest.mark.anyio
async def test_the_jobs_in_hand_are_in_the_heartbeat() -> None:
    server = Server()
    holder = Holder()
    server.register_task("hold", holder, queue="q", raw=True)
    async with server, running(server):
        worker = the_worker(server)
        job_id = await server.enqueue(Job("hold", queue="q"))
        await wait_event(holder.started)
        [before] = await server.get_workers()
        assert before.jobs == ()  # the first heartbeat came before the job
        await worker.heartbeat()
        [during] = await server.get_workers()
        assert during.jobs == (job_id,)
        assert during.seen_at >= before.seen_at
        assert during.started_at == before.started_at
        holder.release.set()
        assert (await server.wait(job_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
        await worker.heartbeat()
        [after] = await server.get_workers()
        assert after.jobs == ()


@pytest.mark.anyio
async def test_at_most_max_worker_jobs_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "MAX_WORKER_JOBS", 3)
    server = Server()
    holder = Holder()
    server.register_task("hold", holder, queue="q", concurrency=5, raw=True)
    async with server, running(server):
        jobs = [await server.enqueue(Job("hold", queue="q")) for _ in range(5)]
        await wait_until(lambda: _running(server, len(jobs)))
        await the_worker(server).heartbeat()
        [record] = await server.get_workers()
        assert len(record.jobs) == 3
        assert set(record.jobs) <= set(jobs)
        holder.release.set()
        for job_id in jobs:
            await server.wait(job_id, timeout=TIMEOUT)


async def _running(server: Server, count: int) -> bool:
    return len(server._active) == count


@pytest.mark.anyio
async def test_heartbeats_come_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "HEARTBEAT_INTERVAL", 0.02)
    now = [1000.0]
    server = Server(clock=lambda: now[0])
    holder = Holder()
    server.register_task("hold", holder, queue="q", raw=True)
    async with server, running(server):
        [first] = await server.get_workers()
        assert (first.started_at, first.seen_at) == (1000.0, 1000.0)
        now[0] = 1010.0
        job_id = await server.enqueue(Job("hold", queue="q"))
        await wait_event(holder.started)

        async def beat_with_the_job() -> bool:
            [record] = await server.get_workers()
            return record.seen_at == 1010.0 and record.jobs == (job_id,)

        await wait_until(beat_with_the_job)
        holder.release.set()
        await server.wait(job_id, timeout=TIMEOUT)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["cancel", "stop", "burst"])
async def test_the_record_goes_when_run_ends(how: str) -> None:
    results = MemoryResults()
    server = Server(results=results)
    server.register_task("t", noop, queue="q", raw=True)
    seen: list[WorkerRecord] = []

    async def look() -> None:
        seen.extend(await results.get_workers())

    async with server:
        if how == "burst":
            await server.enqueue(Job("t", queue="q"))
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    await tg.start(partial(server.run, burst=True))
                    await look()
        else:
            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as tg:
                    await tg.start(server.run)
                    await look()
                    if how == "cancel":
                        tg.cancel_scope.cancel()
                    else:
                        server.stop(grace=1.0)
        assert len(seen) == 1
        assert await results.get_workers() == []


@pytest.mark.anyio
async def test_a_stop_made_before_run_lets_it_start_and_unlist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop made before run() cancels the consumers as run() starts: the first
    heartbeat, which waits for the store (as Redis and NATS do), still completes, run()
    still reports started, and the record is gone when it returns."""
    results = MemoryResults()
    put = results.put_worker
    puts: list[WorkerRecord] = []

    async def slow_put(record: WorkerRecord, ttl: float) -> None:
        await anyio.sleep(0.01)
        puts.append(record)
        await put(record, ttl)

    monkeypatch.setattr(results, "put_worker", slow_put)
    server = Server(results=results)
    server.register_task("t", noop, queue="q", raw=True)
    async with server:
        server.stop(grace=1)
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
        assert len(puts) == 1
        assert await results.get_workers() == []


@pytest.mark.anyio
async def test_a_failing_registry_never_ends_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses every put and removal: run() starts, runs jobs and ends as
    ever; a warning says so once (then debug lines while it keeps failing), and an info
    line when heartbeats work again."""
    monkeypatch.setattr(worker_module, "HEARTBEAT_INTERVAL", 0.01)
    caplog.set_level(logging.DEBUG, logger="tasqueue_anyio.worker")
    results = MemoryResults()
    healthy_put = results.put_worker
    calls = [0]

    async def down(*args: Any) -> None:
        calls[0] += 1
        raise BrokerError("the store is down")

    monkeypatch.setattr(results, "put_worker", down)
    monkeypatch.setattr(results, "remove_worker", down)
    async with _one_job_run(results) as (server, job_id):
        assert (await server.wait(job_id, timeout=TIMEOUT)).status is Status.SUCCESSFUL
        await wait_until(lambda: _at_least(calls, 4))
        assert await results.get_workers() == []
        monkeypatch.setattr(results, "put_worker", healthy_put)
        await wait_until(lambda: _listed_any(results))
    failed = [r for r in caplog.records if "a heartbeat failed" in r.getMessage()]
    assert [r.levelno for r in failed[:2]] == [logging.WARNING, logging.DEBUG]
    assert "BrokerError: the store is down" in failed[0].getMessage()
    assert any("heartbeats work again" in r.getMessage() for r in caplog.records)
    removal = [r for r in caplog.records if "removing its record failed" in r.getMessage()]
    assert [r.levelno for r in removal] == [logging.WARNING]
    # the record the removal could not remove expires by itself
    assert len(await results.get_workers()) == 1


@asynccontextmanager
async def _one_job_run(results: MemoryResults) -> AsyncIterator[tuple[Server, str]]:
    """A server on ``results`` running its workers, with one no-op job enqueued."""
    server = Server(results=results)
    server.register_task("t", noop, queue="q", raw=True)
    async with server:
        with anyio.fail_after(TIMEOUT):
            async with running(server):
                yield server, await server.enqueue(Job("t", queue="q"))


async def _at_least(calls: list[int], n: int) -> bool:
    return calls[0] >= n


async def _listed_any(results: Results) -> bool:
    return bool(await results.get_workers())


@pytest.mark.anyio
async def test_a_hanging_registry_holds_run_up_only_briefly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "HEARTBEAT_TIMEOUT", 0.05)
    results = MemoryResults()

    async def hang(*args: Any) -> None:
        await anyio.sleep_forever()

    monkeypatch.setattr(results, "put_worker", hang)
    monkeypatch.setattr(results, "remove_worker", hang)
    async with _one_job_run(results) as (server, job_id):
        await server.wait(job_id, timeout=TIMEOUT)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("a heartbeat failed" in m and "TimeoutError" in m for m in messages)
    assert any("removing its record took over" in m for m in messages)


# -- on every backend pair --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_running_server_is_listed_then_removed(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    holder = Holder()
    server.register_task("hold", holder, queue=queue_name, concurrency=4, raw=True)
    async with server:
        async with running(server):
            worker = the_worker(server)
            record = await listed(results, worker.worker_id)
            assert record is not None
            assert record.queues == {queue_name: 4}
            job_id = await server.enqueue(Job("hold", queue=queue_name))
            await wait_event(holder.started)
            await worker.heartbeat()
            record = await listed(results, worker.worker_id)
            assert record is not None
            assert record.jobs == (job_id,)
            holder.release.set()
            await server.wait(job_id, timeout=TIMEOUT)
        assert await listed(results, worker.worker_id) is None


# -- tasqueue workers -----------------------------------------------------------------------------


@asynccontextmanager
async def redis_app(redis_server: RedisServer) -> AsyncIterator[tuple[Server, dict[str, str]]]:
    """``cli_app``'s server on the session's Redis under a prefix of its own, open, and
    the environment in which ``cli_app:server`` is the same store."""
    prefix = f"wk{uuid4().hex[:10]}"
    server = cli_app.make_server(redis_server.url, prefix)
    path = os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "TASQUEUE_TEST_REDIS_URL": redis_server.url,
        "TASQUEUE_TEST_PREFIX": prefix,
    }
    async with server:
        yield server, env


async def tasqueue(env: dict[str, str], *args: str) -> str:
    """Run ``tasqueue ARGS`` to its end; its stdout (it must succeed)."""
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "tasqueue_anyio.cli", *args], cwd=TESTS, env=env, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_tasqueue_workers(redis_server: RedisServer) -> None:
    async with redis_app(redis_server) as (server, env):
        holder = Holder()
        server.register_task("hold", holder, queue="held", concurrency=3, raw=True)
        prefix = env["TASQUEUE_TEST_PREFIX"]
        urls = ["--broker", redis_server.url, "--prefix", prefix]
        async with running(server):
            worker = the_worker(server)
            job_id = await server.enqueue(Job("hold", queue="held"))
            await wait_event(holder.started)
            await worker.heartbeat()
            as_json, human = [
                await tasqueue(env, "workers", "--app", "cli_app:server", "--json"),
                await tasqueue(env, "workers", *urls),
            ]
            holder.release.set()
            await server.wait(job_id, timeout=TIMEOUT)
        after = await tasqueue(env, "workers", *urls, "--json")

    [data] = json.loads(as_json)
    assert data["id"] == worker.worker_id
    assert data["queues"] == {cli_app.FAST: 4, cli_app.SLOW: 2, "held": 3}
    assert data["jobs"] == [job_id]
    assert data["pid"] == os.getpid()
    assert data["backend"] == "asyncio"
    assert data["version"] == tasqueue_anyio.__version__
    assert isinstance(data["started_at"], float)
    assert data["started_at"] <= data["seen_at"]
    assert set(data) == {
        "id",
        "hostname",
        "pid",
        "queues",
        "started_at",
        "seen_at",
        "jobs",
        "backend",
        "version",
    }
    [line] = human.splitlines()
    assert line.startswith(f"{worker.worker_id}  queues=fast=4,slow=2,held=3  jobs=1 ({job_id})  ")
    assert " started=" in line
    assert " seen=" in line
    assert line.endswith("s ago)")
    assert json.loads(after) == []
