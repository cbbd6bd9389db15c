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

from tasqueue_anyio import Job, JobContext, Server


async def main() -> None:
    runs: dict[str, int] = {}  # handler runs, by job id
    stopped: dict[str, int] = {}  # handler runs that were stopped from outside
    started = anyio.Event()

    async with Server() as server, anyio.create_task_group() as tg:

        @server.task("block", queue="single", concurrency=1, raw=True)
        async def block(payload: bytes, ctx: JobContext) -> None:
            runs[ctx.job_id] = runs.get(ctx.job_id, 0) + 1
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                stopped[ctx.job_id] = stopped.get(ctx.job_id, 0) + 1
                raise

        @server.task("slow", raw=True)
        async def slow(payload: bytes, ctx: JobContext) -> None:
            runs[ctx.job_id] = runs.get(ctx.job_id, 0) + 1
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                stopped[ctx.job_id] = stopped.get(ctx.job_id, 0) + 1
                raise

        jobs = [
            Job("block", queue="single", id="cancelled-while-running", max_retries=3),
            Job("block", queue="single", id="cancelled-while-queued"),
            Job("slow", id="timed-out", timeout=0.2, max_retries=1),
        ]
        await server.enqueue_many(jobs)
        await tg.start(server.run)

        # The first job runs on the queue's only processor; the second waits behind it.
        await started.wait()
        for job_id in ("cancelled-while-queued", "cancelled-while-running"):
            # queued: cancelled at once; running: still processing until its worker ends it
            print(f"cancel({job_id}) -> {await server.cancel(job_id)}")

        for job in jobs:
            msg = await server.wait(job.id, timeout=10)
            print(
                f"{job.id:<24} {msg.status.value:<10} runs={runs.get(job.id, 0)} "
                f"stopped={stopped.get(job.id, 0)} retried={msg.meta.retried} "
                f"prev_error={msg.meta.prev_error}"
            )
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
