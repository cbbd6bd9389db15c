"""The peer benchmark still runs (a smoke run of tasqueue_anyio alone, on Redis and on NATS:
its figures are not judged here, and no peer library is needed)."""

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
def test_peer_benchmark_runs() -> None:
    args = [
        "--jobs", "50", "--repeat", "1",
        "--libraries", "tasqueue_anyio,tasqueue_anyio-nats",
        "--nats-server", str(find_binary()),
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
