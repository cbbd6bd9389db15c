"""A group: three jobs computing squares run in parallel; the group succeeds once all do.

Run it with ``python3 examples/group.py`` (asyncio) or ``python3 examples/group.py trio``.
It finishes in well under a second and prints the group's status, then one line per
member, in the group's order, with its status and saved result::

    group squares successful
    square-2 successful result=4
    square-3 successful result=9
    square-4 successful result=16
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Group, Job, JobContext, Server


async def main() -> None:
    async with Server() as server, anyio.create_task_group() as tg:

        @server.task("square", concurrency=3, raw=True)
        async def square(payload: bytes, ctx: JobContext) -> None:
            n = int(payload)
            await ctx.save(str(n * n).encode())

        await tg.start(server.run)

        jobs = [Job("square", str(n).encode(), id=f"square-{n}") for n in (2, 3, 4)]
        group_id = await server.enqueue_group(Group(jobs, id="squares"))
        group = await server.wait_group(group_id, timeout=10)

        print(f"group {group.id} {group.status}")
        for job_id, status in group.jobs.items():
            result = (await server.get_result(job_id)).decode()
            print(f"{job_id} {status} result={result}")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
