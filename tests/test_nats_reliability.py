"""Reliability of the NATS broker and results store with real worker processes.

Every worker is ``python -m tasqueue_anyio.cli worker nats_reliability_app:make_server``
(see ``tests/nats_reliability_app.py``) on the session's ``nats-server``, with an ack wait
of :data:`ACK_WAIT` seconds; the test process enqueues, inspects and runs the second
worker in-process, on the same stream and bucket. Every process a test starts is killed
by its own pid when the test ends.

- a worker ``SIGKILL``-ed mid-job: JetStream delivers the job again after the ack wait and
  it ends on the other worker, attempt 2;
- a zombie: the owner of a job ``SIGSTOP``-ped past the ack wait, another worker ends the
  job, the owner resumes: its late result, state write and ack are refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from uuid import uuid4

import anyio
import nats_reliability_app
import pytest
from nats_server import NatsServer

from tasqueue_anyio import Job, Server, Status

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
QUEUE = nats_reliability_app.QUEUE
#: The ack wait of every worker (seconds).
ACK_WAIT = 1.5
#: The bound of one step (a worker starting, a job ending).
STEP = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """The test side runs on asyncio; the worker processes run on both backends."""
    return "asyncio"


@contextmanager
def worker(url: str, name: str, backend: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process, killed (by its pid) and reaped when the block ends."""
    path = os.pathsep.join(filter(None, [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "NATS_RELIABILITY_URL": url,
        "NATS_RELIABILITY_NAME": name,
        "NATS_RELIABILITY_ACK_WAIT": repr(ACK_WAIT),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tasqueue_anyio.cli",
                "worker",
                "nats_reliability_app:make_server",
                "--backend",
                backend,
            ],
            cwd=TESTS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


@asynccontextmanager
async def local_server(url: str, name: str) -> AsyncIterator[Server]:
    """The test's own server on the test's stream and bucket (deleted afterwards)."""
    server = nats_reliability_app.make_server(url, name, ACK_WAIT)
    async with server:
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True):
                broker, results = server.broker, server.results
                await broker.js.delete_stream(broker.stream)  # type: ignore[attr-defined]
                await results.drop()  # type: ignore[attr-defined]


async def wait_status(server: Server, job_id: str, status: Status) -> None:
    with anyio.fail_after(STEP):
        while (await server.get_job(job_id)).status is not status:  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigkilled_worker_job_ends_on_another_after_the_ack_wait(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    name = f"rel{uuid4().hex[:10]}"
    async with local_server(nats_server.url, name) as server:
        job_id = await server.enqueue(Job("hold", b"60,0", queue=QUEUE))
        with worker(nats_server.url, name, backend, tmp_path / "worker.log") as process:
            await wait_status(server, job_id, Status.PROCESSING)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        killed_at = time.monotonic()
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            done = await server.wait(job_id, timeout=STEP)
            tg.cancel_scope.cancel()
        assert time.monotonic() - killed_at < ACK_WAIT + 5
        assert done.status is Status.SUCCESSFUL
        assert done.meta.attempt == 2
        assert await server.get_result(job_id) == f"{os.getpid()}:2".encode()
        assert await server.get_pending(QUEUE) == []
        info = await server.broker.js.stream_info(server.broker.stream)  # type: ignore[attr-defined]
        assert info.messages == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_zombie_owner_resumed_after_its_ack_wait_cannot_write(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    name = f"rel{uuid4().hex[:10]}"
    log_path = tmp_path / "zombie.log"
    async with local_server(nats_server.url, name) as server:
        # attempt 1 (the zombie) sleeps 1 s then saves; attempt 2 (here) saves at once
        job_id = await server.enqueue(Job("hold", b"1,0", queue=QUEUE))
        with worker(nats_server.url, name, backend, log_path) as process:
            await wait_status(server, job_id, Status.PROCESSING)
            os.kill(process.pid, signal.SIGSTOP)
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.run)
                    done = await server.wait(job_id, timeout=STEP)
                    tg.cancel_scope.cancel()
            finally:
                os.kill(process.pid, signal.SIGCONT)
            # the zombie resumes: its save, its state write and its ack are refused
            with anyio.fail_after(STEP):
                while "LeaseLostError" not in log_path.read_text(errors="replace"):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await anyio.sleep(ACK_WAIT)  # time for anything else it might do
            assert process.poll() is None  # it lives on, and takes no harm
        log = log_path.read_text(errors="replace")
        assert f"pid {process.pid}: LeaseLostError" in log
        final = await server.get_job(job_id)
        assert done.status is Status.SUCCESSFUL
        assert (final.status, final.meta.attempt) == (Status.SUCCESSFUL, 2)
        assert await server.get_result(job_id) == f"{os.getpid()}:2".encode()
        info = await server.broker.js.stream_info(server.broker.stream)  # type: ignore[attr-defined]
        assert info.messages == 0
