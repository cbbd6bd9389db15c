"""Fleets of real worker processes for the reliability tests (not a test module).

Shared by ``tests/test_redis_reliability.py`` and ``tests/test_nats_reliability.py``,
each with its own app (``tests/reliability_app.py``, ``tests/nats_reliability_app.py``)
configured through the environment (:func:`worker_env`):

- a worker is ``python -m tasqueue_anyio.cli worker APP:make_server --backend BACKEND``
  (:func:`spawn_worker`), or the same entry point forked by a :class:`ForkServer`
  (:func:`fork_server`), which skips the cold start of an interpreter;
- a :class:`WorkerProcess` is killed and reaped by its own pid, and reads its state and
  CPU time from ``/proc``;
- a :class:`WorkerFleet` is one test's workers: a backend's fleet adds its store and its
  checks (queue drained, workers consuming) to it;
- :func:`wait_until` polls a condition and fails with the workers' logs, :func:`get_jobs`
  reads many jobs' states, :func:`ran_since` finds a cron schedule's late runs, and
  :func:`unwrapped_groups` shows what a block raised through the backends' task groups as
  it was.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import pytest
from process_support import end_process

from tasqueue_anyio import JobMessage, Server

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "CLI",
    "ForkServer",
    "WorkerFleet",
    "WorkerProcess",
    "enqueue_from_processes",
    "fork_server",
    "get_jobs",
    "ran_since",
    "spawn_worker",
    "unwrapped_groups",
    "wait_until",
    "worker_env",
]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: ``python -m tasqueue_anyio.cli``: the worker command.
CLI = [sys.executable, "-m", "tasqueue_anyio.cli"]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_Fleet = TypeVar("_Fleet", bound="WorkerFleet")


def worker_env(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``variables`` (an app's configuration), and the
    tests and the project on ``PYTHONPATH``."""
    path = os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **variables}


def spawn_worker(
    app: str, backend: str, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """``python -m tasqueue_anyio.cli worker APP:make_server --backend BACKEND`` in the
    tests folder, with ``env``, its stdout and stderr written to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*CLI, "worker", f"{app}:make_server", "--backend", backend],
            cwd=TESTS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


# -- worker processes -----------------------------------------------------------------------


class WorkerProcess:
    """A worker process: a child of this process, or of the fleet's fork server. Its stdout
    and stderr go to a log file. Until :meth:`kill` reaps it, it stays at least a zombie,
    so its pid names no other process."""

    def __init__(self, pid: int, log_path: Path, backend: str, reap: Callable[[], object]) -> None:
        self.pid = pid
        self.log_path = log_path
        self.backend = backend
        self._reap = reap
        self.reaped = False

    def __repr__(self) -> str:
        return f"<worker pid={self.pid} {self.backend}>"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _stat(self) -> list[str] | None:
        if self.reaped:
            return None
        try:
            text = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return None
        return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on

    @property
    def alive(self) -> bool:
        fields = self._stat()
        return fields is not None and fields[0] not in ("Z", "X")

    def state(self) -> str:
        """The kernel's process state letter (``T``: stopped, ``Z``: ended, not reaped)."""
        fields = self._stat()
        return "gone" if fields is None else fields[0]

    def cpu_seconds(self) -> float:
        """User and system CPU time this process has used so far, every thread included."""
        fields = self._stat()
        assert fields is not None, f"{self!r} is gone"
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime

    def send(self, signum: signal.Signals) -> None:
        """Send ``signum`` to this process (by its pid), if it still runs."""
        if self.alive:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """``SIGKILL`` it (which also ends a stopped process) by its pid, and reap it."""
        if self.reaped:
            return
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.alive and time.monotonic() < deadline:
            time.sleep(0.005)
        self._reap()
        self.reaped = True


# -- the fork server ------------------------------------------------------------------------


def fork_server(app: str) -> None:
    """Fork worker processes of ``app`` on request, from an interpreter that imported the
    library and the app once.

    A cold ``python -m tasqueue_anyio.cli worker ...`` spends half a second to a second of
    CPU on its imports (seconds of wall time on a busy two-core machine), about the two
    seconds between kills of a kill storm or more. This server imports everything first,
    then reads commands on stdin, one a line, answering each on stdout:

    - ``fork BACKEND LOG``: fork a child that runs the worker command's own entry point,
      ``tasqueue_anyio.cli.main(["worker", "APP:make_server", "--backend", BACKEND])``,
      its stdout and stderr appended to the file ``LOG``; answers its pid.
    - ``reap PID``: wait for that child to end (it stays a zombie until then, so its pid
      cannot be reused by another process before the test has killed it); answers ``ok``.

    It ends at the end of its input. :class:`ForkServer` runs it with the app's worker
    environment (see :func:`worker_env`).
    """
    # everything a worker imports, once (Trio is a test dependency; importing an app has
    # no side effects: its make_server reads the environment when the worker starts)
    import anyio._backends._asyncio
    import anyio._backends._trio  # noqa: F401

    import tasqueue_anyio.cli as cli

    importlib.import_module(app)

    for line in sys.stdin:
        command, *args = line.rstrip("\n").split(" ", 2)
        if command == "fork":
            backend, log_path = args
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    os.close(fd)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.close(null)
                    code = cli.main(["worker", f"{app}:make_server", "--backend", backend])
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            print(pid, flush=True)
        elif command == "reap":
            os.waitpid(int(args[0]), 0)
            print("ok", flush=True)
        else:
            print(f"unknown command {command!r}", flush=True)


class ForkServer:
    """:func:`fork_server` of ``app`` in a child process, with the worker environment
    ``env``, its stderr written to ``log_path``."""

    def __init__(self, app: str, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"import worker_fleet; worker_fleet.fork_server({app!r})"],
                cwd=TESTS,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    def ask(self, command: str) -> str:
        """Send one command; its answer (blocks until the server has imported everything)."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(command + "\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            log = self.log_path.read_text(errors="replace")
            raise RuntimeError(f"the fork server ended: {log[-3000:]}")
        return answer.strip()

    def close(self) -> None:
        """End it (at the end of its input; killed by its pid after 5 s)."""
        process = self.process
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        end_process(process, "wait")


# -- fleets ---------------------------------------------------------------------------------


class WorkerFleet:
    """One test's worker processes of ``app``, all with the environment ``env``:
    ``python -m tasqueue_anyio.cli worker APP:make_server`` processes, or, with ``forked``,
    children of a :class:`ForkServer` running the same entry point
    (``tasqueue_anyio.cli.main``) without the cold start. Their logs go to ``directory``;
    ``step`` is how long :func:`wait_until` waits by default.

    A context manager: every worker it started is killed (by its pid) on exit.
    """

    def __init__(
        self, app: str, directory: Path, env: Mapping[str, str], *, forked: bool, step: float
    ) -> None:
        self.app = app
        self.directory = directory
        self.env = env
        self.step = step
        self.workers: list[WorkerProcess] = []
        self.fork_server = ForkServer(app, env, directory / "fork-server.log") if forked else None

    def __enter__(self: _Fleet) -> _Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def start(self, backend: str) -> WorkerProcess:
        """Start a worker process on ``backend``."""
        log = self.directory / f"worker{len(self.workers) + 1}-{backend}.log"
        fork_server = self.fork_server
        if fork_server is not None:
            pid = int(await anyio.to_thread.run_sync(fork_server.ask, f"fork {backend} {log}"))
            worker = WorkerProcess(pid, log, backend, lambda: fork_server.ask(f"reap {pid}"))
        else:
            process = spawn_worker(self.app, backend, self.env, log)
            worker = WorkerProcess(process.pid, log, backend, lambda: process.wait(5))
        self.workers.append(worker)
        return worker

    async def restart(self, worker: WorkerProcess) -> WorkerProcess:
        """Kill ``worker`` (by its pid, reaped) and start another on its backend."""
        worker.kill()
        return await self.start(worker.backend)

    def close(self) -> None:
        """Kill every worker this fleet started, each by its pid; end the fork server.
        Idempotent."""
        for worker in self.workers:
            with contextlib.suppress(Exception):  # keep killing the others
                worker.kill()
        if self.fork_server is not None:
            self.fork_server.close()

    def logs(self) -> str:
        return "\n".join(f"--- {w!r}\n{w.log[-3000:]}" for w in self.workers)


# -- polling and reading --------------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    what: str,
    f: WorkerFleet,
    *,
    timeout: float | None = None,
    interval: float = 0.05,
) -> None:
    """Poll ``predicate`` until it is true; fail (with the workers' logs) after ``timeout``
    (by default the fleet's ``step``)."""
    if timeout is None:
        timeout = f.step
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{f.logs()}")
        await anyio.sleep(interval)


async def get_jobs(server: Server, ids: Sequence[str]) -> dict[str, JobMessage]:
    """Every job's stored state (concurrent reads, 100 at a time per task)."""
    out: dict[str, JobMessage] = {}

    async def read(chunk: Sequence[str]) -> None:
        for job_id in chunk:
            out[job_id] = await server.get_job(job_id)

    async with anyio.create_task_group() as tg:
        for start in range(0, len(ids), 100):
            tg.start_soon(read, ids[start : start + 100])
    return out


async def ran_since(server: Server, schedule_id: str, wall: float) -> bool:
    """Whether a run of the cron schedule ``schedule_id`` fired after ``wall`` (a
    :func:`time.time`) ended successfully (run ids: ``"<id>@<fire ms>"``)."""
    return any(
        job_id.startswith(f"{schedule_id}@") and int(job_id[len(schedule_id) + 1 :]) > wall * 1000
        for job_id in await server.get_success()
    )


@contextlib.contextmanager
def unwrapped_groups() -> Iterator[None]:
    """Re-raise what the block raised as it was, when the backends' task groups wrapped it
    in exception groups of one exception each."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None


#: A program that enqueues ``effect`` jobs under the ids ``same-0`` .. ``same-<count-1>``,
#: in an order of its own, each held for a minute after its job ended. argv: the app's
#: module (its ``make_server(url, name, lease)`` and ``QUEUE``), url, name, count.
_PRODUCER = """
import importlib, random, sys, anyio
from tasqueue_anyio import Job

async def main() -> None:
    app = importlib.import_module(sys.argv[1])
    url, name, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
    order = list(range(count))
    random.shuffle(order)
    async with app.make_server(url, name, 1.5) as server:
        for n in order:
            await server.enqueue(
                Job("effect", b"0", id=f"same-{n}", queue=app.QUEUE, unique_for=60)
            )

anyio.run(main)
"""


async def enqueue_from_processes(app: str, url: str, name: str, count: int, processes: int) -> None:
    """Run ``processes`` producer processes at once, each enqueueing the same ``count``
    ids (see ``_PRODUCER``), and wait until all exited (each with status 0)."""
    producers = [
        await anyio.open_process(
            [sys.executable, "-c", _PRODUCER, app, url, name, str(count)],
            env=worker_env({}),
            cwd=str(TESTS),
        )
        for _ in range(processes)
    ]
    for process in producers:
        assert await process.wait() == 0
