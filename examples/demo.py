"""The demo: a server on the in-memory backend runs a few jobs and prints how they ended.

Run it with ``python3 examples/demo.py`` (asyncio) or ``python3 examples/demo.py trio``.
"""

from __future__ import annotations

import json
import sys

import anyio

from tasqueue_anyio import Backoff, Job, JobContext, Server


async def main() -> None:
    attempts: dict[str, int] = {}

    async with Server() as server, anyio.create_task_group() as tg:

        @server.task("add", concurrency=4, raw=True)
        async def add(payload: bytes, ctx: JobContext) -> None:
            numbers = json.loads(payload)
            await ctx.save(json.dumps(sum(numbers)).encode())

        @server.task("flaky", raw=True)
        async def flaky(payload: bytes, ctx: JobContext) -> None:
            attempts[ctx.job_id] = attempts.get(ctx.job_id, 0) + 1
            if attempts[ctx.job_id] < 3:
                raise ConnectionError("the remote end is having a bad day")
            await ctx.save(b"worked on attempt %d" % attempts[ctx.job_id])

        @server.task("slow", raw=True)
        async def slow(payload: bytes, ctx: JobContext) -> None:
            await anyio.sleep(60)

        def blocking_upper(
            payload: bytes, ctx: JobContext
        ) -> None:  # a sync handler: runs in a thread
            anyio.from_thread.run(ctx.save, payload.upper())

        server.register_task("upper", blocking_upper, raw=True)

        await tg.start(server.run)
        jobs = [
            Job("add", b"[1, 2, 3]"),
            Job("add", b"[40, 2]"),
            Job("upper", b"hello from a thread"),
            Job("flaky", max_retries=3, backoff=Backoff(initial=0.05, jitter=False)),
            Job("slow", timeout=0.2),
            Job("missing-task"),
        ]
        ids = await server.enqueue_many(jobs)
        for job, job_id in zip(jobs, ids, strict=True):
            msg = await server.wait(job_id, timeout=10)
            try:
                result = (await server.get_result(job_id)).decode()
            except LookupError:
                result = "-"
            line = (
                f"{job.task:<13} {msg.status.value:<11} retried={msg.meta.retried} result={result}"
            )
            if msg.meta.prev_error:
                line += f"  error={msg.meta.prev_error}"
            print(line)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
