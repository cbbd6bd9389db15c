"""The peer benchmark still runs (a smoke run of tasqueue_anyio alone, on Redis and on NATS,
with one worker process and with two on one queue: its figures are not judged here, and no
peer library is needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nats_server import find_binary

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_redis_peers.py"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
@pytest.mark.skipif(find_binary() is None, reason="nats-server is not installed")
@pytest.mark.parametrize("workers", [1, 2])
def test_peer_benchmark_runs(workers: int) -> None:
    """One worker process per measurement (the default), and two on one queue."""
    args = [
        "--jobs", "50", "--repeat", "1",
        "--libraries", "tasqueue_anyio,tasqueue_anyio-nats",
        "--nats-server", str(find_binary()),
        "--workers", str(workers),
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("tasqueue_anyio")]
    assert [row[:2] for row in rows] == [
        ["tasqueue_anyio", "asyncio"],
        ["tasqueue_anyio", "trio"],
        ["tasqueue_anyio-nats", "asyncio"],
        ["tasqueue_anyio-nats", "trio"],
    ], out
    assert all(row[2] != "failed" for row in rows), out
    assert "nats-server" in out.splitlines()[0], out
    expected = "one worker process at" if workers == 1 else "2 worker processes on one queue"
    assert expected in out.splitlines()[0], out


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_coredis_round_trip_benchmark_runs() -> None:
    bench = BENCH.parent / "bench_coredis_rounds.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--rounds", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [
        ["1", "0"], ["1", "25"], ["10", "0"], ["10", "25"], ["50", "0"], ["50", "25"]
    ], out
    assert all(float(value) > 0 for row in rows for value in row[2:]), out
