"""Ending the child processes the tests start (servers, workers), by their own pid (not
a test module itself)."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tasqueue_anyio import Server

__all__ = ["end_process", "limit_from_env"]


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


def limit_from_env(server: Server, queue: str, value: str | None) -> None:
    """Limit ``queue`` as an app's environment says: ``runs,per,running`` (an empty part
    leaves that limit out; no value, no limits)."""
    if not value:
        return
    runs, per, running = value.split(",")
    server.limit_queue(
        queue,
        runs=int(runs) if runs else None,
        per=float(per or 1),
        running=int(running) if running else None,
    )
