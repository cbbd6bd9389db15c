"""Tutorial 2: a Starlette web app whose lifespan runs the workers (in-memory backends), with
one route that enqueues a job and one that reports on it.

Serve it with any ASGI server (``hypercorn webapp:app``, ``uvicorn webapp:app``); the
tutorial's ``webapp_demo.py`` calls it in-process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tasqueue_anyio import JobCancelledError, JobFailedError, JobNotFoundError, Server

server = Server()  # in-memory: the workers must run in this process (tutorial 6: Redis)


@server.task(queue="text", concurrency=4)
async def word_count(text: str) -> int:
    return len(text.split())


# [lifespan]
@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)  # the workers, for as long as the app serves
        yield
        tg.cancel_scope.cancel()  # the app is shutting down: stop them
# [lifespan end]


# [routes]
async def count_words(request: Request) -> JSONResponse:
    text = (await request.body()).decode()
    job = await word_count.enqueue(text)
    return JSONResponse({"job": job}, status_code=202)  # a handle is the job's id, a str


async def job_status(request: Request) -> JSONResponse:
    job = server.job(request.path_params["job_id"])
    wait = float(request.query_params.get("wait", 0))
    try:
        with anyio.move_on_after(wait):  # wait up to ?wait= seconds for the job to end
            return JSONResponse({"status": "successful", "result": await job.result()})
        return JSONResponse({"status": (await job.status()).value})  # not ended yet
    except JobFailedError as exc:
        return JSONResponse({"status": "failed", "error": exc.error})
    except JobCancelledError:
        return JSONResponse({"status": "cancelled"})
    except JobNotFoundError:
        return JSONResponse({"error": "no such job"}, status_code=404)


app = Starlette(
    lifespan=lifespan,
    routes=[
        Route("/count", count_words, methods=["POST"]),
        Route("/jobs/{job_id}", job_status),
    ],
)
# [routes end]
