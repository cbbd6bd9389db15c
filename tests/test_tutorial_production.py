"""Tutorials 6 and 7 as a reader plays them: ``tasqueue worker`` processes (one on asyncio,
one on Trio) on a real server, the pages' console commands run beside them in the pages'
order and print what the pages show, a worker killed mid-job (its job runs again on the
other), and a worker stopped by SIGTERM that logs what the page shows and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nats_server import NatsServer
from process_support import end_process
from redis_server import RedisServer
from tutorial_support import (
    CODE,
    TUTORIAL_DB,
    TUTORIALS,
    ConsoleRun,
    blocks,
    console_runs,
    flush_tutorial_db,
    run_command,
)

#: Seconds to wait for a worker's log line, or a command.
PATIENCE = 60.0


class Worker:
    """A ``tasqueue worker`` process, its stderr read line by line into ``log``; every
    worker of a test shares one condition, notified at each line and at exit."""

    def __init__(
        self, app: str, backend: str, env: dict[str, str], changed: threading.Condition
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tasqueue_anyio.cli", "worker", app, "--backend", backend],
            cwd=CODE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.changed = changed
        self.log: list[str] = []
        self.exited = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def stop(self) -> None:
        """End the process (if it still runs) and close its pipe."""
        end_process(self.process)
        self.reader.join(PATIENCE)
        assert self.process.stderr is not None
        self.process.stderr.close()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.log.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.exited = True
            self.changed.notify_all()


def wait_for_log(workers: list[Worker], pattern: re.Pattern[str]) -> tuple[Worker, re.Match[str]]:
    """The first worker whose log has a line matching ``pattern``, and the match."""
    changed = workers[0].changed
    deadline = time.monotonic() + PATIENCE
    with changed:
        while True:
            for worker in workers:
                for line in worker.log:
                    if match := pattern.fullmatch(line):
                        return worker, match
            if all(worker.exited for worker in workers):
                break
            if not changed.wait(deadline - time.monotonic()):
                break
    logs = "\n\n".join("\n".join(worker.log) for worker in workers)
    pytest.fail(f"no worker logged {pattern.pattern!r}:\n{logs}")


def _log_pattern(page: Path, marker: str, pid_shown: str | None = None) -> re.Pattern[str]:
    """The log line a page's ``text`` block shows (containing ``marker``) as a pattern:
    ``...`` is any text, and ``pid_shown`` (a pid the page made up) is a number."""
    for _, body in blocks(page.read_text(), "text"):
        for line in body:
            if marker in line:
                parts = [re.escape(part) for part in line.split("...")]
                pattern = ".*".join(parts)
                if pid_shown is not None:
                    pattern = pattern.replace(pid_shown, r"(?P<pid>\d+)")
                return re.compile(pattern)
    raise AssertionError(f"{page.name} shows no log line with {marker!r}")


def _play(run: ConsoleRun, env: dict[str, str]) -> None:
    done = run_command(run.argv, env, timeout=PATIENCE)
    assert done.returncode == 0, f"{run.argv}: {done.stdout}\n{done.stderr}"
    problem = run.matches(done.stdout)
    assert problem is None, f"{run.page}:{run.line}: {problem}\n--- printed:\n{done.stdout}"


def test_production_with_redis(redis_server: RedisServer) -> None:
    page = TUTORIALS / "06-production-redis.md"
    runs = {" ".join(run.argv[1:]): run for run in console_runs(page)}
    assert set(runs) == {"producer.py", "report.py start", "report.py wait", "traced.py"}
    port = redis_server.port
    flush_tutorial_db(port)
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/{TUTORIAL_DB}"}
    changed = threading.Condition()
    workers = [Worker("tasks:server", "asyncio", env, changed)]
    try:
        _play(runs["producer.py"], env)  # one worker, as the page has it by then
        workers.append(Worker("tasks:server", "trio", env, changed))
        _play(runs["report.py start"], env)
        started = _log_pattern(page, "started in worker", pid_shown="4242")
        victim, match = wait_for_log(workers, started)
        assert int(match["pid"]) == victim.process.pid
        end_process(victim.process, "kill")  # kill -9
        _play(runs["report.py wait"], env)  # the other worker ran it, as attempt 2
        (survivor,) = [worker for worker in workers if worker is not victim]
        survivor.process.send_signal(signal.SIGTERM)
        wait_for_log([survivor], _log_pattern(page, "SIGTERM: finishing running jobs"))
        assert survivor.process.wait(PATIENCE) == 0
    finally:
        for worker in workers:
            worker.stop()


def test_production_with_nats(nats_server: NatsServer) -> None:
    page = TUTORIALS / "07-nats.md"
    runs = {" ".join(run.argv[1:]): run for run in console_runs(page)}
    assert set(runs) == {"nats_producer.py"}
    env = {**os.environ, "NATS_URL": nats_server.url}
    worker = Worker("nats_tasks:server", "trio", env, threading.Condition())
    try:
        _play(runs["nats_producer.py"], env)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(PATIENCE) == 0
    finally:
        worker.stop()
