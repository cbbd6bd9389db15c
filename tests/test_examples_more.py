"""The cancel/timeout and producer/worker examples run and print what they promise
(each on asyncio and Trio)."""

from __future__ import annotations

import pytest
from examples_support import run_example


def fields(line: str) -> dict[str, str]:
    """The ``key=value`` words of a line (``prev_error`` takes the rest of the line)."""
    head, sep, prev_error = line.partition(" prev_error=")
    found = dict(word.split("=", 1) for word in head.split() if "=" in word)
    if sep:
        found["prev_error"] = prev_error
    return found


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancel_and_timeout(backend: str) -> None:
    lines = run_example("cancel_and_timeout.py", backend)
    assert len(lines) == 5, lines
    assert lines[0] == "cancel(cancelled-while-queued) -> cancelled"
    assert lines[1] == "cancel(cancelled-while-running) -> processing"

    jobs = {line.split()[0]: line for line in lines[2:]}
    assert list(jobs) == ["cancelled-while-running", "cancelled-while-queued", "timed-out"]
    assert {job_id: line.split()[1] for job_id, line in jobs.items()} == {
        "cancelled-while-running": "cancelled",
        "cancelled-while-queued": "cancelled",
        "timed-out": "failed",
    }

    running = fields(jobs["cancelled-while-running"])
    assert running == {
        "runs": "1",
        "stopped": "1",
        "retried": "0",  # a cancel is not a failure: not retried despite max_retries=3
        "prev_error": "JobCancelledError: job cancelled-while-running was cancelled while running",
    }

    queued = fields(jobs["cancelled-while-queued"])
    assert queued == {"runs": "0", "stopped": "0", "retried": "0", "prev_error": "None"}

    timed_out = fields(jobs["timed-out"])
    assert timed_out["runs"] == "2"  # the first run and one retry
    assert timed_out["stopped"] == "2"  # each run's handler was stopped by the timeout
    assert timed_out["retried"] == "1"
    assert timed_out["prev_error"].startswith("JobTimeoutError: ")
    assert "0.2s" in timed_out["prev_error"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_producer_worker(backend: str) -> None:
    lines = run_example("producer_worker.py", backend)
    assert lines == [
        "worker tasks: ['count_words']",
        "words-1 successful words=4",
        "words-2 successful words=2",
        "words-3 failed error=ValueError: nothing to count",
        "success: ['words-1', 'words-2']",
        "failed: ['words-3']",
    ]
