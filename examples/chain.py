"""A chain: fetch → transform → store, one after another; a link made with ``.link()``
receives the previous link's result as its first argument.

Run it with ``python3 examples/chain.py`` (asyncio) or ``python3 examples/chain.py trio``.
It finishes in well under a second and prints the chain's status, each link's status,
and the last link's result::

    chain pipeline successful
    fetch successful
    transform successful
    store successful
    final result: stored 13 characters under 'greeting'
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Chain, Server

server = Server()
database: dict[str, str] = {}  # where the last link stores its input


@server.task()
async def fetch(name: str) -> str:
    return f"hello, {name}"  # pretend to download something


@server.task()
async def transform(text: str) -> str:
    return text.upper()


@server.task()
async def store(text: str, key: str) -> str:
    database[key] = text
    return f"stored {len(text)} characters under {key!r}"


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)

        links = [
            fetch.options(id="fetch").job("chains"),
            transform.options(id="transform").link(),  # gets fetch's result
            store.options(id="store").link(key="greeting"),  # gets transform's, then key
        ]
        chain = await server.enqueue_chain(Chain(links, id="pipeline"))
        final = await chain.result(timeout=10)  # the last link's result

        info = await chain.info()
        print(f"chain {info.id} {info.status}")
        for job_id, status in info.jobs.items():
            print(f"{job_id} {status}")
        print(f"final result: {final}")
        assert database == {"greeting": "HELLO, CHAINS"}
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
