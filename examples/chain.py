"""A chain: fetch → transform → store, one after another, each link receiving the
result the previous one saved as ``ctx.meta.prev_job_result``.

Run it with ``python3 examples/chain.py`` (asyncio) or ``python3 examples/chain.py trio``.
It finishes in well under a second and prints the chain's status, each link with what it
received, and the final result::

    chain pipeline successful
    fetch successful received=None
    transform successful received=b'hello, chains'
    store successful received=b'HELLO, CHAINS'
    final result: stored 13 bytes under greeting
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Chain, Job, JobContext, Server


async def main() -> None:
    database: dict[str, bytes] = {}  # where the last link stores its input
    received: dict[str, bytes | None] = {}  # what each link got from the previous one

    async with Server() as server, anyio.create_task_group() as tg:

        @server.task("fetch", raw=True)
        async def fetch(payload: bytes, ctx: JobContext) -> None:
            received[ctx.job_id] = ctx.meta.prev_job_result  # None: the first link
            await ctx.save(b"hello, " + payload)  # pretend to download something

        @server.task("transform", raw=True)
        async def transform(payload: bytes, ctx: JobContext) -> None:
            received[ctx.job_id] = ctx.meta.prev_job_result
            await ctx.save((ctx.meta.prev_job_result or b"").upper())

        @server.task("store", raw=True)
        async def store(payload: bytes, ctx: JobContext) -> None:
            received[ctx.job_id] = data = ctx.meta.prev_job_result or b""
            key = payload.decode()
            database[key] = data
            await ctx.save(f"stored {len(data)} bytes under {key}".encode())

        await tg.start(server.run)

        links = [
            Job("fetch", b"chains", id="fetch"),
            Job("transform", id="transform"),
            Job("store", b"greeting", id="store"),
        ]
        chain_id = await server.enqueue_chain(Chain(links, id="pipeline"))
        chain = await server.wait_chain(chain_id, timeout=10)

        print(f"chain {chain.id} {chain.status}")
        for job_id, status in chain.jobs.items():
            print(f"{job_id} {status} received={received.get(job_id)!r}")
        print(f"final result: {(await server.get_result(chain.current_job)).decode()}")
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
