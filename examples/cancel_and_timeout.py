"""Cancellation and timeouts: how each one ends a job, on the in-memory backend.

Three jobs:

- ``cancelled-while-running``: its handler is running when ``server.cancel`` is called;
  the handler is stopped and the job ends ``cancelled``, not retried although it allows
  retries;
- ``cancelled-while-queued``: waits behind it on a queue with one processor and is
  cancelled before it starts; its handler never runs;
- ``timed-out``: runs past its ``timeout`` of 0.2 s twice (the first run and one retry)
  and ends ``failed`` with a ``JobTimeoutError``.

Run it with ``python3 examples/cancel_and_timeout.py`` (asyncio) or
``python3 examples/cancel_and_timeout.py trio``. It finishes in about a second and
prints what the two ``cancel`` calls returned, then one line per job.
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Server, current_job

server = Server()
runs: dict[str, int] = {}  # handler runs, by job id
stopped: dict[str, int] = {}  # handler runs that were stopped from outside
started = anyio.Event()


@server.task(queue="single", concurrency=1)
async def block() -> None:
    job_id = current_job().job_id
    runs[job_id] = runs.get(job_id, 0) + 1
    started.set()
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():  # the job's cancel scope was cancelled
        stopped[job_id] = stopped.get(job_id, 0) + 1
        raise


@server.task()
async def slow() -> None:
    job_id = current_job().job_id
    runs[job_id] = runs.get(job_id, 0) + 1
    try:
        await anyio.sleep(10)
    except anyio.get_cancelled_exc_class():
        stopped[job_id] = stopped.get(job_id, 0) + 1
        raise


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        jobs = [
            await block.options(id="cancelled-while-running", max_retries=3).enqueue(),
            await block.options(id="cancelled-while-queued").enqueue(),
            await slow.options(id="timed-out", timeout=0.2, max_retries=1).enqueue(),
        ]
        await tg.start(server.run)

        # The first job runs on the queue's only processor; the second waits behind it.
        await started.wait()
        for job in (jobs[1], jobs[0]):
            # queued: cancelled at once; running: still processing until its worker ends it
            print(f"cancel({job}) -> {await job.cancel()}")

        for job in jobs:
            msg = await job.wait(timeout=10)
            print(
                f"{job:<24} {msg.status.value:<10} runs={runs.get(job, 0)} "
                f"stopped={stopped.get(job, 0)} retried={msg.meta.retried} "
                f"prev_error={msg.meta.prev_error}"
            )
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
