"""Tutorial 1: your first job, on the in-memory backends (no server to install).

Run it with ``python3 first_job.py`` (asyncio) or ``python3 first_job.py trio``.
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import JobFailedError, Server, current_job

# [server]
server = Server()  # in-memory broker and results store: nothing to install


@server.task()
async def add(a: int, b: int) -> int:
    return a + b


@server.task(queue="reports")
async def word_count(text: str) -> int:
    if not text:
        raise ValueError("nothing to count")
    words = text.split()
    await current_job().set_progress(1.0, f"counted {len(words)} words")
    return len(words)
# [server end]


# [main]
async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)  # the workers run in this task group

        job = await add.enqueue(40, 2)  # a handle: the job's id, typed JobHandle[int]
        print("result:", await job.result(timeout=10))
        print("status:", (await job.status()).value)

        counted = await word_count.enqueue("the quick brown fox")
        print("words:", await counted.result(timeout=10))
        progress = await counted.progress()
        print("progress:", progress.message if progress else None)

        empty = await word_count.enqueue("")
        try:
            await empty.result(timeout=10)
        except JobFailedError as exc:
            print("failed:", exc.error)

        tg.cancel_scope.cancel()  # stop the workers; the program ends


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
# [main end]
