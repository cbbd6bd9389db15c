"""The Redis peer benchmark still runs (a smoke run of tasqueue_anyio alone: its figures
are not judged here, and no peer library is needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_redis_peers.py"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_peer_benchmark_runs() -> None:
    args = ["--jobs", "50", "--repeat", "1", "--libraries", "tasqueue_anyio"]
    out = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("tasqueue_anyio ")]
    assert [row[1] for row in rows] == ["asyncio", "trio"], out
    assert all(row[2] != "failed" for row in rows), out
