"""A group: three jobs computing squares run in parallel; the group succeeds once all do.

Run it with ``python3 examples/group.py`` (asyncio) or ``python3 examples/group.py trio``.
It finishes in well under a second and prints the group's status, then one line per
member, in the group's order, then the members' results as one list::

    group squares successful
    square-2 successful
    square-3 successful
    square-4 successful
    results: [4, 9, 16]
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Group, Server

server = Server()


@server.task(concurrency=3)
async def square(n: int) -> int:
    return n * n


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)

        # square.job(n) builds the Job of a call; options() sets its id (and any option)
        jobs = [square.options(id=f"square-{n}").job(n) for n in (2, 3, 4)]
        group = await server.enqueue_group(Group(jobs, id="squares"))
        results = await group.result(timeout=10)  # the members' results, in order

        info = await group.info()
        print(f"group {info.id} {info.status}")
        for job_id, status in info.jobs.items():
            print(f"{job_id} {status}")
        print(f"results: {results}")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
