"""Splitting roles: a worker (a ``Server``) runs tasks; a producer (a ``Client``) only
enqueues jobs, waits for them and reads their results.

Both share one ``MemoryBroker`` and one ``MemoryResults`` inside one process here,
because the in-memory backends cannot be reached from another process. In a real
deployment the worker and the producer (a web app, say) are separate processes, each
building its own backends pointing at the same Redis or NATS server
(``RedisBroker(url)``/``RedisResults(url)``, or ``NatsBroker(url, prefix=P)``/
``NatsResults(url, prefix=P)``); the code of each role stays as it is here. To share one
backend between tasks of one process, open it in an ``async with`` around those tasks,
as ``main`` does: the task that opens a backend must be the last to leave it
(docs/backends.md).

- The worker's module defines the tasks (``app`` below) and calls ``server.run()``.
- The producer imports the task functions for their names and types, and enqueues
  them through its own ``Client``: ``await client.enqueue(count_words, text)``. It
  registers nothing and runs nothing; ``async with`` keeps it subscribed to the
  broker's events, which ``result()`` and ``wait()`` listen on.

Run it with ``python3 examples/producer_worker.py`` (asyncio) or
``python3 examples/producer_worker.py trio``. It finishes in well under a second and
prints each job's outcome and the success and failed listings.
"""

from __future__ import annotations

import sys

import anyio
from anyio.abc import TaskStatus

from tasqueue_anyio import Client, JobFailedError, Server
from tasqueue_anyio.abc import Broker, Results
from tasqueue_anyio.brokers.memory import MemoryBroker
from tasqueue_anyio.results.memory import MemoryResults

# -- the application's tasks module (what the worker runs, and producers import) --------

broker, results = MemoryBroker(), MemoryResults()
app = Server(broker=broker, results=results)


@app.task(queue="text", concurrency=2)
async def count_words(text: str) -> int:
    """The worker's task: the number of words in ``text``."""
    if not text.strip():
        raise ValueError("nothing to count")
    return len(text.split())


# -- the roles -----------------------------------------------------------------------------


async def worker(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """The worker role: consume the tasks' queues until cancelled."""
    async with app:
        print(f"worker tasks: {app.get_tasks()}")
        await app.run(task_status=task_status)


async def producer(broker: Broker, results: Results) -> None:
    """The producer role: enqueue, wait, read results. It runs no task itself."""
    async with Client(broker, results) as client:
        texts = {"words-1": "the quick brown fox", "words-2": "jumps over", "words-3": "   "}
        jobs = [
            await client.enqueue(count_words.options(id=job_id), text)
            for job_id, text in texts.items()
        ]
        for job in jobs:
            try:
                print(f"{job} successful words={await job.result(timeout=10)}")
            except JobFailedError as exc:
                print(f"{job} failed error={exc.error}")
        print(f"success: {sorted(await client.get_success())}")
        print(f"failed: {sorted(await client.get_failed())}")


async def main() -> None:
    async with broker, results, anyio.create_task_group() as tg:
        await tg.start(worker)
        await producer(broker, results)
        tg.cancel_scope.cancel()  # stop the worker


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
