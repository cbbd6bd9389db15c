"""The dashboard mounted in your own Starlette app, whose lifespan runs the workers (in-memory
backends here; Redis or NATS in production, with the workers in their own processes).

``python3 examples/dashboard.py`` serves it with Hypercorn on http://127.0.0.1:8080/tasks/
and enqueues a job every second, so there is something to watch (Ctrl-C stops it);
``python3 examples/dashboard.py --backend trio`` serves it on Trio. With ``--once`` it
asks its own pages in-process instead, prints what they answered and exits (the tests run
it that way).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tasqueue_anyio import Server
from tasqueue_anyio.dashboard import create_app, serve

server = Server()
#: enqueue a job every second while serving, so there is something to watch
FEED = False


@server.task(queue="images", concurrency=2, max_retries=1)
async def thumbnail(name: str) -> str:
    await anyio.sleep(random.uniform(0.1, 0.5))
    if name.endswith("7.png"):
        raise ValueError(f"{name} is not an image")
    return f"thumb-{name}"


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # a mounted app's own lifespan does not run: open the server (and here run its
    # workers) in the host app's lifespan
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)
        if FEED:
            tg.start_soon(feed)
        yield
        tg.cancel_scope.cancel()


async def feed() -> None:
    for n in range(1, 1_000_000):
        await thumbnail.enqueue(f"photo-{n}.png")
        await anyio.sleep(1)


def local_only(request: Request) -> bool:
    """Your app's own check (a session, a header your proxy sets): here, this machine only."""
    return request.client is not None and request.client.host in ("127.0.0.1", "::1")


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the app; its jobs are at /tasks/")


app = Starlette(
    lifespan=lifespan,
    routes=[Route("/", home), Mount("/tasks", create_app(server, authorize=local_only))],
)


async def once() -> None:
    async with lifespan(app):
        job = await thumbnail.enqueue("cat.png")
        await job.result(timeout=10)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            pages = [
                ("/tasks/", 'data-queue="images"'),
                (f"/tasks/jobs/{job}", "thumb-cat.png"),
                ("/tasks/jobs?status=successful", str(job)),
            ]
            for path, needle in pages:
                answer = await http.get(path)
                shown = "shows" if needle in answer.text else "lacks"
                print(path.replace(str(job), "JOB"), answer.status_code, shown, needle.replace(str(job), "JOB"))


async def serve_forever() -> None:
    global FEED
    FEED = True
    await serve(app, "127.0.0.1", 8080)  # Hypercorn runs the lifespan


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the dashboard, mounted in a Starlette app")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--once", action="store_true", help="ask the pages once, print, exit")
    args = parser.parse_args()
    anyio.run(once if args.once else serve_forever, backend=args.backend)
