"""Splitting roles: a worker server that runs tasks and a producer server that only
enqueues jobs, waits for them and reads their results.

Both servers here share one ``MemoryBroker`` and one ``MemoryResults`` inside one
process, because the in-memory backends cannot be reached from another process. In a
real deployment the worker and the producer are separate processes, each building its
own broker and results objects that point at the same Redis or NATS server; the code of
each role stays as it is here. To share one Redis or NATS backend between tasks of one
process, open it in an ``async with`` around those tasks, as ``main`` does: the task that
opens a backend must be the last to leave it (docs/backends.md).

- The worker registers the tasks and calls ``run()``.
- The producer registers nothing and never calls ``run()``: it enqueues jobs by task
  name, and ``async with`` keeps it subscribed to the broker's event channel, which is
  what ``wait()`` listens on.

Run it with ``python3 examples/producer_worker.py`` (asyncio) or
``python3 examples/producer_worker.py trio``. It finishes in about a second and prints
what each server knows about tasks, one line per job, and the success and failed
listings.
"""

from __future__ import annotations

import sys

import anyio
from anyio.abc import TaskStatus

from tasqueue_anyio import Job, JobContext, Server, Status
from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults


async def count_words(payload: bytes, ctx: JobContext) -> None:
    """The worker's task: save the number of words in the payload."""
    text = payload.decode()
    if not text.strip():
        raise ValueError("nothing to count")
    await ctx.save(str(len(text.split())).encode())


async def worker(
    broker: Broker,
    results: Results,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The worker role: register tasks, then consume their queues until cancelled."""
    async with Server(broker=broker, results=results) as server:
        server.register_task("count_words", count_words, queue="text", concurrency=2, raw=True)
        print(f"worker tasks: {server.get_tasks()}")
        await server.run(task_status=task_status)


async def producer(broker: Broker, results: Results) -> None:
    """The producer role: enqueue, wait, read results. It runs no task itself."""
    async with Server(broker=broker, results=results) as server:
        print(f"producer tasks: {server.get_tasks()}")
        texts = {
            "words-1": b"the quick brown fox",
            "words-2": b"jumps over",
            "words-3": b"   ",
        }
        # The task only has to be registered on the worker that runs it.
        ids = await server.enqueue_many(
            [Job("count_words", text, id=job_id, queue="text") for job_id, text in texts.items()]
        )
        for job_id in ids:
            msg = await server.wait(job_id, timeout=10)
            if msg.status is Status.SUCCESSFUL:
                outcome = f"words={(await server.get_result(job_id)).decode()}"
            else:
                outcome = f"error={msg.meta.prev_error}"
            print(f"{job_id} {msg.status.value} {outcome}")
        print(f"success: {sorted(await server.get_success())}")
        print(f"failed: {sorted(await server.get_failed())}")


async def main() -> None:
    broker = MemoryBroker()
    results = MemoryResults()
    async with broker, results, anyio.create_task_group() as tg:
        await tg.start(worker, broker, results)
        await producer(broker, results)
        tg.cancel_scope.cancel()  # stop the worker


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
