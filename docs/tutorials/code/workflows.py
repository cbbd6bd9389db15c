"""Tutorial 4: workflows. A group runs jobs in parallel, a chain runs them in turn (each link
gets the previous result), fan-in runs a job with every result of a group, and follow-up jobs
run after a job succeeds or fails. Run it with ``python3 workflows.py`` (or ``... trio``).
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Chain, Group, Server

server = Server()
sent, inbox = anyio.create_memory_object_stream[str](10)  # stands for an email service


# [tasks]
@server.task(concurrency=3)
async def thumbnail(image: str, size: int) -> str:
    await anyio.sleep(0.05)  # the three run at once: the group takes ~0.05 s, not 0.15 s
    return f"{image.removesuffix('.png')}-{size}.png"


@server.task()
async def download(url: str) -> str:
    return "alice,30\nbob,25\n"


@server.task()
async def parse(text: str, *, separator: str) -> list[list[str]]:  # text: the previous result
    return [line.split(separator) for line in text.splitlines()]


@server.task()
async def count_rows(rows: list[list[str]]) -> int:
    return len(rows)


@server.task()
async def summarise(paths: list[str]) -> str:  # fan-in: gets every member's result
    return f"{len(paths)} thumbnails: {' '.join(paths)}"


@server.task()
async def charge(order: str, cents: int) -> str:
    if cents <= 0:
        raise ValueError(f"cannot charge {cents} cents")
    return f"{order} charged"


@server.task()
async def notify(message: str) -> None:
    await sent.send(message)
# [tasks end]


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)

        # [group]
        images = ["cat.png", "dog.png", "owl.png"]
        group = await server.enqueue_group(Group([thumbnail.job(i, 200) for i in images]))
        print("group:", await group.result(timeout=10))  # the results, in the group's order
        # [group end]

        # [chain]
        chain = await server.enqueue_chain(
            Chain([download.job("https://example.com/people.csv"),
                   parse.link(separator=","),  # parse(<download's result>, separator=",")
                   count_rows.link()])
        )
        print("chain:", await chain.result(timeout=10))  # the last link's result
        # [chain end]

        # [fan-in]
        small = Group([thumbnail.job(i, 100) for i in images], then=summarise.link())
        handle = await server.enqueue_group(small)
        print("fan-in:", await handle.then_result(timeout=10))  # waits for the group, then it
        # [fan-in end]

        # [follow-ups]
        paid, refused = notify.job("order 1 paid"), notify.job("order 2 refused")
        await charge.options(on_success=[paid]).enqueue("order 1", 500)
        await charge.options(on_error=[refused], max_retries=0).enqueue("order 2", 0)
        with anyio.fail_after(10):
            print("notified:", sorted([await inbox.receive(), await inbox.receive()]))
        # [follow-ups end]

        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
