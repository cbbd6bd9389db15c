"""``wait`` does not depend on best-effort events, and ``get_pending`` shows each listed
job's stored status (issue 11, hole 9). Against every broker/results backend, on asyncio
and Trio."""

from __future__ import annotations

import anyio
import pytest
from server_support import TIMEOUT, running

from tasqueue_anyio import Job, JobContext, Server, Status
from tasqueue_anyio import _client as server_module
from tasqueue_anyio._codec import EVENT_FINISHED, decode_event
from tasqueue_anyio.abc import Broker, JobRecord, Results

pytestmark = pytest.mark.anyio


class DeafServer(Server):
    """A server that never hears a job's end event, as when the broker drops it (the NATS
    broker does on a slow consumer)."""

    def _on_event(self, data: bytes) -> None:
        if decode_event(data)[0] == EVENT_FINISHED:
            return
        super()._on_event(data)


async def test_wait_returns_when_the_end_event_is_lost(
    broker: Broker, results: Results, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "RECHECK_FIRST", 0.02, raising=False)
    monkeypatch.setattr(server_module, "RECHECK_MAX", 0.05, raising=False)
    release = anyio.Event()

    async def handler(payload: bytes, ctx: JobContext) -> None:
        await release.wait()

    async with DeafServer(broker=broker, results=results) as server:
        server.register_task("t", handler, queue=queue_name, raw=True)
        job_id = await server.enqueue(Job("t", queue=queue_name))
        read = anyio.Event()
        get_job = results.get_job

        async def get_job_then_signal(job_id: str) -> JobRecord:
            record = await get_job(job_id)
            read.set()
            return record

        monkeypatch.setattr(results, "get_job", get_job_then_signal)
        done: list[Status] = []

        async def waiter() -> None:
            done.append((await server.wait(job_id, timeout=TIMEOUT)).status)

        async with running(server), anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            with anyio.fail_after(TIMEOUT):
                await read.wait()  # the waiter saw the job not ended: the end comes after
            release.set()

    assert done == [Status.SUCCESSFUL]


async def test_get_pending_shows_a_job_cancelled_while_queued_as_cancelled(
    broker: Broker, results: Results, queue_name: str
) -> None:
    async with Server(broker=broker, results=results) as server:
        cancelled = await server.enqueue(Job("t", queue=queue_name))
        queued = await server.enqueue(Job("t", queue=queue_name))
        assert await server.cancel(cancelled) is Status.CANCELLED

        pending = await server.get_pending(queue_name)

    # its message is still on the queue (a worker drops it): listed with its stored status
    assert [(m.id, m.status) for m in pending] == [
        (cancelled, Status.CANCELLED),
        (queued, Status.QUEUED),
    ]
