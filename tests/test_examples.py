"""The examples run and print what they promise (each on asyncio and Trio)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from examples_support import EXAMPLES, run_example


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo(backend: str) -> None:
    lines = run_example("demo.py", backend)
    assert len(lines) == 7, lines
    statuses = [line[:12].strip() + " " + line[13:].split()[0] for line in lines]
    assert statuses == [
        "add successful",
        "add again successful",
        "shout successful",
        "flaky successful",
        "slow failed",
        "crunch successful",
        "missing-task failed",
    ]
    assert "result=6" in lines[0]
    assert "result=42" in lines[1]
    assert "result='HELLO FROM A THREAD'" in lines[2]
    assert "retried=2 result='worked on attempt 3'" in lines[3]
    assert "result=-  error=JobTimeoutError: " in lines[4]
    assert lines[5].endswith("result=100 progress='step 100 of 100'")
    assert "error=UnknownTaskError: task 'missing-task'" in lines[6]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cron(backend: str) -> None:
    assert run_example("cron.py", backend) == [
        "schedule True cron='* * * * * *'",
        "ran 3 times, [1, 1] seconds apart",
        "schedules left: 0",
    ]


def test_memory_benchmark_runs() -> None:
    """The benchmark still runs (a smoke run: its figures are not judged here)."""
    bench = EXAMPLES.parent / "benchmarks" / "bench_memory.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--jobs", "200", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [line.split()[0] for line in out.splitlines()[2:4]]
    assert rows == ["asyncio", "trio"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_priorities_and_limits(backend: str) -> None:
    assert run_example("priorities_and_limits.py", backend) == [
        "order: urgent, normal-1, normal-2, bulk-1, bulk-2",
        "same handle: True, runs of report:monday: 1",
        "6 pings, at most 3 in any half second: True",
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_dashboard_mounted(backend: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "dashboard.py"), "--once", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == [
        '/tasks/ 200 shows data-queue="images"',
        "/tasks/jobs/JOB 200 shows thumb-cat.png",
        "/tasks/jobs?status=successful 200 shows JOB",
    ]
