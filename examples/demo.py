"""The demo: typed tasks on the in-memory backends run a few jobs and say how they ended.

Run it with ``python3 examples/demo.py`` (asyncio) or ``python3 examples/demo.py trio``.
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Backoff, Job, JobFailedError, JobHandle, Server, current_job

server = Server()  # the in-memory broker and results store


@server.task(concurrency=4)
async def add(*numbers: int) -> int:
    return sum(numbers)


@server.task()
def shout(text: str) -> str:  # a plain def runs in a worker thread
    return text.upper()


attempts: dict[str, int] = {}


@server.task(max_retries=3, backoff=Backoff(initial=0.05, jitter=False))
async def flaky() -> str:
    job_id = current_job().job_id  # the running job's context, no parameter needed
    attempts[job_id] = attempts.get(job_id, 0) + 1
    if attempts[job_id] < 3:
        raise ConnectionError("the remote end is having a bad day")
    return f"worked on attempt {attempts[job_id]}"


@server.task(timeout=0.2)
async def slow() -> None:
    await anyio.sleep(60)  # stopped by its timeout: the job fails with JobTimeoutError


@server.task()
async def crunch(steps: int) -> int:
    job = current_job()
    for step in range(1, steps + 1):
        await job.set_progress(step / steps, f"step {step} of {steps}")  # rate-limited
        await anyio.sleep(0.002)  # some work
    return steps


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)  # the workers, in this task group
        jobs: dict[str, JobHandle[object]] = {
            "add": await add.enqueue(1, 2, 3),
            "add again": await add.enqueue(40, 2),
            "shout": await shout.enqueue("hello from a thread"),
            "flaky": await flaky.enqueue(),
            "slow": await slow.enqueue(),
            "crunch": await crunch.enqueue(100),
            # the bytes-level API: a Job naming a task no worker has
            "missing-task": await server.enqueue(Job("missing-task")),
        }
        for name, job in jobs.items():
            try:
                result = repr(await job.result(timeout=10))
                error = ""
            except JobFailedError as exc:
                result, error = "-", f"  error={exc.error}"
            info = await job.info()
            line = f"{name:<12} {info.status.value:<10} retried={info.meta.retried} result={result}"
            if info.progress is not None:
                line += f" progress={info.progress.message!r}"
            print(line + error)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
