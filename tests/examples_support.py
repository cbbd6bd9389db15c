"""Running the example scripts (not a test module itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, backend: str, *, timeout: float = 60) -> list[str]:
    """Run ``examples/<name>`` on ``backend`` in a fresh interpreter; return its output lines."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), backend],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout.splitlines()


def user_environ() -> dict[str, str]:
    """This process's environment without pytest's own variables: a ``pytest`` started
    from a test (as a user would start it) must not think it is a worker of this run's
    pytest-xdist (``PYTEST_XDIST_WORKER``, ...)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
