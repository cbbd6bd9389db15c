"""Ending the child processes the tests start (servers, workers), by their own pid (not
a test module itself)."""

from __future__ import annotations

import subprocess
from typing import Any, Literal

__all__ = ["end_process"]


def end_process(
    process: subprocess.Popen[Any],
    how: Literal["terminate", "kill", "wait"] = "terminate",
    timeout: float = 5.0,
) -> None:
    """End ``process`` and reap it: ``SIGTERM`` (``"terminate"``), ``SIGKILL``
    (``"kill"``), or nothing (``"wait"``: it is ending by itself); then, if it has not
    exited within ``timeout`` seconds, ``SIGKILL``. Does nothing to a process that has
    already exited but reap it."""
    if process.poll() is not None:
        return
    if how == "terminate":
        process.terminate()
    elif how == "kill":
        process.kill()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
