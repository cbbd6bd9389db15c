"""The ``tasqueue`` command, run as real processes against a real ``redis-server`` (and,
for the NATS URLs, a real ``nats-server``).

Workers run ``tests/cli_app.py`` (``cli_app:server`` or the factory ``cli_app:make_server``)
on the session's Redis server under a key prefix of their own; the test process enqueues,
waits and sets up state with its own :class:`Server` on the same store. Every step is
bounded by :data:`STEP` seconds, and a worker still running when its test ends is killed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import uuid4

import anyio
import cli_app
import pytest
from anyio.abc import Process
from nats_server import NatsServer
from redis_server import RedisServer

from tasqueue_anyio import Chain, Group, Job, JobNotFoundError, Server, Status
from tasqueue_anyio.abc import Envelope, ScheduleRecord

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: ``python -m tasqueue_anyio.cli``: the command, without relying on the console script.
CLI = [sys.executable, "-m", "tasqueue_anyio.cli"]
#: The ``tasqueue`` console script (``pip install -e .``), else the module.
_SCRIPT = shutil.which("tasqueue")
SCRIPT = [_SCRIPT] if _SCRIPT else CLI
#: The command in a Python where Trio cannot be imported.
WITHOUT_TRIO = [
    sys.executable,
    "-c",
    "import sys; sys.modules['trio'] = None; from tasqueue_anyio.cli import main; sys.exit(main())",
]
#: Upper bound of one step: a process starting and exiting, a job ending. Generous: it
#: guards against hangs, on a loaded machine too, and is not a measure of speed.
STEP = 30.0
#: Commands :meth:`App.run_all` runs at once (more only compete for the same cores, and
#: each one's STEP bound would then measure the others' work).
PARALLEL = 3


@pytest.fixture
def anyio_backend() -> str:
    """The test side runs on asyncio only: the worker processes cover both backends."""
    return "asyncio"


class Done:
    """A finished command: its exit status and output."""

    def __init__(self, status: int, stdout: str, stderr: str) -> None:
        self.status = status
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"<Done {self.status} stdout={self.stdout!r} stderr={self.stderr!r}>"

    def json(self) -> object:
        return json.loads(self.stdout)

    def assert_one_error_line(self) -> str:
        """The error line, checking it is all of stderr (no traceback) and the exit status."""
        assert self.status != 0, self
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, self
        assert lines[0].startswith("tasqueue: error: "), self
        return lines[0]


class Command:
    """Arguments of ``tasqueue``, the environment to run them in, and the command itself."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, command: Sequence[str] = CLI
    ) -> None:
        self.args = args
        self.env = env
        self.command = command


class Worker:
    """A ``tasqueue worker`` process, its stdout and stderr going to a log file."""

    def __init__(self, process: Process, log: Path) -> None:
        self.process = process
        self.log_path = log

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exit_status(self, timeout: float = STEP) -> int:
        with anyio.fail_after(timeout):
            return await self.process.wait()

    async def wait_for_log(self, text: str) -> None:
        await wait_until(lambda: text in self.log)


class App:
    """Where one test's jobs live: the Redis URL, a key prefix, an effects directory."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.prefix = f"cli{uuid4().hex[:10]}"
        self.directory = directory
        self.effects_dir = directory / "effects"
        self.effects_dir.mkdir()
        path = os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")]))
        self.env = {
            **os.environ,
            "PYTHONPATH": path,
            "TASQUEUE_TEST_REDIS_URL": url,
            "TASQUEUE_TEST_PREFIX": self.prefix,
            "TASQUEUE_TEST_EFFECTS": str(self.effects_dir),
        }
        self._workers = 0

    def server(self) -> Server:
        """A server on this test's store (open it with ``async with``; it runs nothing)."""
        return cli_app.make_server(self.url, self.prefix)

    def effects(self, job_id: str) -> list[str]:
        return cli_app.effects(job_id, self.effects_dir)

    async def run(
        self, *args: str, env: dict[str, str] | None = None, command: Sequence[str] = CLI
    ) -> Done:
        """Run ``tasqueue ARGS`` to its end (at most :data:`STEP` seconds)."""
        with anyio.fail_after(STEP):
            done = await anyio.run_process(
                [*command, *args], cwd=TESTS, env=env or self.env, check=False
            )
        return Done(done.returncode, done.stdout.decode(), done.stderr.decode())

    async def run_all(self, *commands: Sequence[str] | Command) -> list[Done]:
        """Run several commands at once (:data:`PARALLEL` at a time; they only read);
        their results, in order.

        A command is its arguments, or a :class:`Command` with an environment of its own.
        """
        results: list[Done | None] = [None] * len(commands)
        limiter = anyio.CapacityLimiter(PARALLEL)

        async def one(index: int, command: Sequence[str] | Command) -> None:
            if not isinstance(command, Command):
                command = Command(command)
            async with limiter:
                results[index] = await self.run(
                    *command.args, env=command.env, command=command.command
                )

        async with anyio.create_task_group() as tg:
            for index, args in enumerate(commands):
                tg.start_soon(one, index, args)
        return [done for done in results if done is not None]

    @asynccontextmanager
    async def worker(self, *args: str) -> AsyncIterator[Worker]:
        """A running ``tasqueue worker ARGS``; killed on exit if it is still running."""
        self._workers += 1
        log = self.directory / f"worker{self._workers}.log"
        with log.open("wb") as out:
            process = await anyio.open_process(
                [*CLI, "worker", *args], cwd=TESTS, env=self.env, stdout=out, stderr=out
            )
        try:
            yield Worker(process, log)
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(5, shield=True):
                await process.wait()


@pytest.fixture
def app(redis_server: RedisServer, tmp_path: Path) -> App:
    return App(redis_server.url, tmp_path)


async def wait_until(predicate: Callable[[], bool], timeout: float = STEP) -> None:
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.05)


@asynccontextmanager
async def running(server: Server) -> AsyncIterator[None]:
    """Run ``server``'s workers in this process for the block (to set up state quickly)."""
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        yield
        tg.cancel_scope.cancel()


def closed_port_url() -> str:
    """A Redis URL on a loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def quick(payload: bytes = b"") -> Job:
    return Job("quick", payload, queue=cli_app.FAST)


def slow(seconds: str) -> Job:
    return Job("slow", seconds.encode(), queue=cli_app.SLOW)


# -- running workers ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_worker_processes_jobs(app: App, backend: str) -> None:
    async with app.server() as server, app.worker("cli_app:server", "--backend", backend) as w:
        ids = [await server.enqueue(quick(b"%d" % i)) for i in range(3)]
        failing = await server.enqueue(Job("failing", queue=cli_app.FAST))
        slow_id = await server.enqueue(slow("0.1"))
        for job_id in ids:
            assert (await server.wait(job_id, timeout=STEP)).status is Status.SUCCESSFUL
        assert [await server.get_result(job_id) for job_id in ids] == [b"ok:0", b"ok:1", b"ok:2"]
        assert (await server.wait(failing, timeout=STEP)).status is Status.FAILED
        assert (await server.wait(slow_id, timeout=STEP)).status is Status.SUCCESSFUL
        assert app.effects(slow_id) == ["start", "done"]
        w.send(signal.SIGTERM)
        assert await w.exit_status() == 0, w.log
    assert "Traceback" not in w.log


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigterm_with_a_short_grace_hands_the_job_back(app: App, backend: str) -> None:
    async with app.server() as server:
        # 30 s on the first run, 0.1 s on the next
        job_id = await server.enqueue(slow("30,0.1"))
        async with app.worker("cli_app:server", "--backend", backend, "--grace", "0.3") as w:
            await wait_until(lambda: app.effects(job_id) == ["start"])
            w.send(signal.SIGTERM)
            assert await w.exit_status() == 0, w.log
        msg = await server.get_job(job_id)
        assert msg.status is Status.QUEUED  # handed back: not an outcome
        assert [m.id for m in await server.get_pending(cli_app.SLOW)] == [job_id]
        assert app.effects(job_id) == ["start"]

        # --burst: it waits for the job it took, then exits once the queues are empty
        done = await app.run("worker", "cli_app:server", "--backend", backend, "--burst")
        assert done.status == 0, done
        msg = await server.get_job(job_id)
        assert msg.status is Status.SUCCESSFUL
        assert msg.meta.attempt >= 2
        assert app.effects(job_id) == ["start", "start", "done"]


async def test_sigterm_with_enough_grace_lets_the_job_finish(app: App) -> None:
    async with app.server() as server:
        job_id = await server.enqueue(slow("2"))
        async with app.worker("cli_app:server", "--grace", "20") as w:
            await wait_until(lambda: app.effects(job_id) == ["start"])
            w.send(signal.SIGTERM)
            await w.wait_for_log("SIGTERM: finishing running jobs within 20s")
            later = await server.enqueue(quick())  # the worker takes no new job
            assert await w.exit_status() == 0, w.log
        assert (await server.get_job(job_id)).status is Status.SUCCESSFUL
        assert app.effects(job_id) == ["start", "done"]
        assert (await server.get_job(later)).status is Status.QUEUED
        assert [m.id for m in await server.get_pending(cli_app.FAST)] == [later]


async def test_a_second_signal_stops_at_once(app: App) -> None:
    async with app.server() as server:
        job_id = await server.enqueue(slow("30,0.1"))
        async with app.worker("cli_app:server", "--backend", "trio", "--grace", "30") as w:
            await wait_until(lambda: app.effects(job_id) == ["start"])
            w.send(signal.SIGTERM)
            await w.wait_for_log("SIGTERM: finishing running jobs")
            w.send(signal.SIGINT)
            assert await w.exit_status(timeout=15) == 0, w.log  # well before the grace
        assert (await server.get_job(job_id)).status is Status.QUEUED
        assert [m.id for m in await server.get_pending(cli_app.SLOW)] == [job_id]
        assert app.effects(job_id) == ["start"]


async def test_burst_exits_once_the_queues_are_empty(app: App) -> None:
    async with app.server() as server:
        ids = [await server.enqueue(quick(b"%d" % i)) for i in range(5)]
        # the factory form, and a concurrency override
        done = await app.run("worker", "cli_app:make_server", "--burst", "-c", "fast=2")
        assert done.status == 0, done
        for job_id in ids:
            assert (await server.get_job(job_id)).status is Status.SUCCESSFUL
        assert sorted(await server.get_success()) == sorted(ids)
        assert await server.get_pending(cli_app.FAST) == []


# -- inspection ---------------------------------------------------------------------------------


async def test_job_human_and_json(app: App) -> None:
    async with app.server() as server:
        ok = await server.enqueue(quick(b"1"))
        bad = await server.enqueue(Job("failing", queue=cli_app.FAST))
        halfway = await server.enqueue(
            Job("halfway", server.codec.encode([["x"], {}]), queue=cli_app.FAST)
        )
        async with running(server):
            await server.wait(ok, timeout=STEP)
            await server.wait(bad, timeout=STEP)
            await server.wait(halfway, timeout=STEP)
    human, as_json, missing, progress = await app.run_all(
        ["job", ok, "--app", "cli_app:server"],
        # the factory form, on Trio
        ["job", bad, "--app", "cli_app:make_server", "--json", "--backend", "trio"],
        ["job", "nosuchjob", "--app", "cli_app:server"],
        ["job", halfway, "--app", "cli_app:server", "--json"],
    )
    assert progress.status == 0, progress
    reported = progress.json()
    assert isinstance(reported, dict)
    assert reported["status"] == "successful"
    assert reported["progress"]["fraction"] == 0.5
    assert reported["progress"]["message"] == "half of x"
    assert human.status == 0, human
    assert re.search(r"^status\s+successful$", human.stdout, re.MULTILINE), human
    assert re.search(rf"^id\s+{ok}$", human.stdout, re.MULTILINE), human
    assert re.search(r"^payload\s+1$", human.stdout, re.MULTILINE), human
    assert re.search(r"^  attempt: 1$", human.stdout, re.MULTILINE), human
    assert as_json.status == 0, as_json
    data = as_json.json()
    assert isinstance(data, dict)
    assert (data["id"], data["status"], data["task"], data["queue"]) == (
        bad,
        "failed",
        "failing",
        cli_app.FAST,
    )
    assert data["meta"]["attempt"] == 1
    assert "failing on purpose" in data["meta"]["prev_error"]
    assert data["progress"] is None
    assert "nosuchjob" in missing.assert_one_error_line()


async def test_lists(app: App) -> None:
    garbage = Envelope(queue=cli_app.FAST, data=b"not a job", id=uuid4().hex)
    async with app.server() as server:
        ok = await server.enqueue(quick())
        bad = await server.enqueue(Job("failing", queue=cli_app.FAST))
        await server.broker.enqueue_many([garbage])
        async with running(server):
            await server.wait(ok, timeout=STEP)
            await server.wait(bad, timeout=STEP)
            with anyio.fail_after(STEP):
                while True:
                    if await server.get_dead_letters(cli_app.FAST):
                        break
                    await anyio.sleep(0.05)
        # nothing runs from here on
        pending = [await server.enqueue(quick(b"%d" % i)) for i in range(2)]
        later = await server.enqueue(Job("quick", queue=cli_app.FAST, delay=3600))
        cron = await server.enqueue(Job("quick", queue=cli_app.FAST, schedule="*/5 * * * *"))
        # a schedule the scheduler disabled (no fire time left): next_fire is inf
        [template] = await server.results.get_schedules()
        disabled = f"{cron}-off"
        await server.results.set_schedule(
            ScheduleRecord(id=disabled, data=template.data, next_fire=math.inf)
        )

    app_args = ["--app", "cli_app:server"]
    # and one whose reader went away (`tasqueue pending fast | head -0`)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        no_reader = await anyio.open_process(
            [*CLI, "pending", cli_app.FAST, *app_args],
            cwd=TESTS,
            env=app.env,
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    async with no_reader:
        results = await app.run_all(
            ["pending", cli_app.FAST, *app_args],
            ["scheduled", cli_app.FAST, *app_args, "--json"],
            ["failed", *app_args],
            ["successful", *app_args, "--json"],
            ["dead", cli_app.FAST, *app_args, "--json"],
            ["schedules", *app_args],
            ["schedules", *app_args, "--json"],
            ["counts", cli_app.FAST, *app_args, "--json"],
            ["counts", cli_app.FAST, *app_args],
        )
        assert no_reader.stderr is not None
        with anyio.fail_after(STEP):
            stderr = b"".join([chunk async for chunk in no_reader.stderr])
            assert await no_reader.wait() == 141, stderr  # quietly, as if killed by SIGPIPE
        assert stderr == b""
    for done in results:
        assert done.status == 0, done
    (pending_h, scheduled, failed, successful, dead, schedules, schedules_json, *counts) = results
    counts_json, counts_human = counts
    assert counts_json.json() == {
        "queue": cli_app.FAST,
        "pending": 2,
        "scheduled": 1,
        "in_flight": 0,
        "dead": 1,
        "successful": 1,
        "failed": 1,
    }
    assert "pending     2" in counts_human.stdout.splitlines()
    assert pending_h.stdout.splitlines() == [f"{job_id}  quick" for job_id in pending]
    scheduled_data = scheduled.json()
    assert isinstance(scheduled_data, list)
    assert [(m["id"], m["status"]) for m in scheduled_data] == [(later, "queued")]
    assert scheduled_data[0]["meta"]["eta"] > time.time() + 3000
    assert failed.stdout.split() == [bad]
    assert successful.json() == [ok]
    dead_data = dead.json()
    assert isinstance(dead_data, list)
    assert [(d["queue"], d["data"]) for d in dead_data] == [(cli_app.FAST, "not a job")]
    lines = schedules.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [[cron, "*/5"], [disabled, "*/5"]]
    assert lines[1].endswith("next=disabled")

    def not_json(constant: str) -> object:
        raise AssertionError(f"{constant} is not JSON")

    schedules_data = json.loads(schedules_json.stdout, parse_constant=not_json)
    assert isinstance(schedules_data, list)
    assert [s["next_fire"] is None for s in schedules_data] == [False, True]


async def test_group_and_chain(app: App) -> None:
    async with app.server() as server:
        group = Group([quick(b"a"), quick(b"b")])
        chain = Chain([quick(b"1"), quick(b"2"), quick(b"3")])
        await server.enqueue_group(group)
        await server.enqueue_chain(chain)
    group_j, chain_j = await app.run_all(
        ["group", group.id, "--app", "cli_app:server", "--json"],
        ["chain", chain.id, "--app", "cli_app:server", "--json"],
    )
    group_data = group_j.json()
    assert isinstance(group_data, dict)
    assert group_data["id"] == group.id
    assert group_data["status"] == "queued"
    assert group_data["jobs"] == {job.id: "queued" for job in group.jobs}
    chain_data = chain_j.json()
    assert isinstance(chain_data, dict)
    assert (chain_data["id"], chain_data["status"]) == (chain.id, "queued")
    assert chain_data["current_job"] == chain.jobs[0].id
    assert list(chain_data["jobs"]) == [job.id for job in chain.jobs]  # in order


async def test_cancel_and_delete(app: App) -> None:
    async with app.server() as server:
        queued = await server.enqueue(quick())
        ok = await server.enqueue(quick(b"x"))  # no worker runs: both stay queued
        cancel, delete = await app.run_all(
            ["cancel", queued, "--app", "cli_app:server", "--json"],
            ["delete", ok, "--app", "cli_app:server"],
        )
        assert cancel.status == 0, cancel
        assert cancel.json() == {"id": queued, "status": "cancelled"}
        assert (await server.get_job(queued)).status is Status.CANCELLED
        assert delete.status == 0, delete
        assert re.search(r"^deleted\s+True$", delete.stdout, re.MULTILINE), delete
        with pytest.raises(JobNotFoundError):
            await server.get_job(ok)
        # the cancelled job runs again once retried
        retry = await app.run("retry", queued, "--app", "cli_app:server", "--json")
        refused = await app.run("retry", queued, "--app", "cli_app:server")  # queued now
        assert retry.status == 0, retry
        assert retry.json() == {"id": queued, "status": "queued"}
        assert "only a failed or cancelled job" in refused.assert_one_error_line()
        async with running(server):
            assert (await server.wait(queued, timeout=STEP)).status is Status.SUCCESSFUL


async def test_broker_and_results_urls(app: App) -> None:
    """``--broker URL [--results URL] --prefix P``: a Redis URL cannot carry the prefix."""
    async with app.server() as server:
        job_id = await server.enqueue(quick())
    url = app.url
    pending, job = await app.run_all(
        ["pending", cli_app.FAST, "--broker", url, "--prefix", app.prefix, "--json"],
        ["job", job_id, "--broker", url, "--results", url, "--prefix", app.prefix],
    )
    assert pending.status == 0, pending
    data = pending.json()
    assert isinstance(data, list)
    assert [m["id"] for m in data] == [job_id]
    assert job.status == 0, job
    assert re.search(r"^status\s+queued$", job.stdout, re.MULTILINE), job


async def test_nats_urls_with_prefix(nats_server: NatsServer, tmp_path: Path) -> None:
    """``--broker nats://... --prefix P``: P is the broker's prefix (its stream and
    subjects) and the results bucket, as in ``NatsBroker(url, prefix=P)`` and
    ``NatsResults(url, prefix=P)``."""
    from tasqueue_anyio.brokers.nats import NatsBroker
    from tasqueue_anyio.results.nats import NatsResults

    app = App(nats_server.url, tmp_path)
    url = nats_server.url
    broker = NatsBroker(url, prefix=app.prefix)
    results = NatsResults(url, prefix=app.prefix)
    server = Server(broker=broker, results=results)
    server.register_task("quick", cli_app.quick, queue=cli_app.FAST, raw=True)
    async with server:
        try:
            waiting = await server.enqueue(slow("1"))  # no worker takes the slow queue
            done = await server.enqueue(quick(b"1"))
            async with running(server):
                await server.wait(done, timeout=STEP)
            pending, job, successful, memory = await app.run_all(
                ["pending", cli_app.SLOW, "--broker", url, "--prefix", app.prefix, "--json"],
                ["job", done, "--broker", url, "--results", url, "--prefix", app.prefix],
                ["successful", "--broker", url, "--prefix", app.prefix, "--json"],
                ["failed", "--broker", "memory://", "--prefix", app.prefix],
            )
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await broker.js.delete_stream(broker.stream)
                await results.drop()
    assert pending.status == 0, pending
    data = pending.json()
    assert isinstance(data, list)
    assert [m["id"] for m in data] == [waiting]
    assert job.status == 0, job
    assert re.search(r"^status\s+successful$", job.stdout, re.MULTILINE), job
    assert successful.status == 0, successful
    assert successful.json() == [done]
    assert "--prefix is for Redis and NATS URLs" in memory.assert_one_error_line()
    assert memory.status == 2, memory


# -- errors ---------------------------------------------------------------------------------------


async def test_errors_are_one_line(app: App) -> None:
    closed = closed_port_url()
    unreachable = {**app.env, "TASQUEUE_TEST_REDIS_URL": closed}
    cases: list[tuple[Sequence[str] | Command, int, str]] = [
        # through the console script, if it is installed
        (Command(["worker", "nope:server"], command=SCRIPT), 2, "cannot import module 'nope'"),
        (["worker", "json:nothing"], 2, "module 'json' has no attribute 'nothing'"),
        (["worker", "cli_app:not_a_server"], 2, "not a tasqueue_anyio.Server"),
        (["worker", "json:dumps"], 2, "calling json:dumps() to get the server failed"),
        (["worker", "cli_app"], 2, "is not MODULE:ATTR"),
        (["worker", "cli_app:server", "-c", "fast=zero"], 2, "QUEUE=N with N >= 1"),
        (["worker", "cli_app:server", "-c", "nosuch=2"], 2, "no task is registered on queue"),
        (Command(["worker", "cli_app:server"], unreachable), 1, "cannot reach the backend"),
        (["failed", "--broker", closed], 1, "cannot reach the backend"),
        (
            Command(["worker", "cli_app:server", "--backend", "trio"], command=WITHOUT_TRIO),
            2,
            "--backend trio needs Trio",
        ),
    ]
    debug, *results = await app.run_all(
        ["worker", "nope:server", "--debug"], *(command for command, _, _ in cases)
    )
    for (command, status, expected), done in zip(cases, results, strict=True):
        assert expected in done.assert_one_error_line(), (command, done)
        assert done.status == status, (command, done)
        assert done.stdout == "", (command, done)

    # --debug: the traceback, with its cause, then the same one line
    assert debug.status == 2, debug
    assert "Traceback (most recent call last)" in debug.stderr, debug
    assert "ModuleNotFoundError: No module named 'nope'" in debug.stderr, debug
    assert debug.stderr.strip().splitlines()[-1].startswith("tasqueue: error: "), debug


async def test_purge_and_replay(app: App) -> None:
    async with app.server() as server:
        waiting = [await server.enqueue(quick(b"%d" % i)) for i in range(2)]
        purge, replay = await app.run_all(
            ["purge", cli_app.FAST, "--app", "cli_app:server", "--json"],
            ["replay", cli_app.SLOW, "--app", "cli_app:server", "--json", "--id", "x"],
        )
        assert purge.status == 0, purge
        assert purge.json() == {"queue": cli_app.FAST, "purged": 2}
        for job_id in waiting:
            assert (await server.get_job(job_id)).status is Status.CANCELLED
        assert replay.status == 0, replay
        assert replay.json() == []
