"""Tutorial 3: retries with backoff, a timeout that stops the handler, and cancelling a
running job. Run it with ``python3 retries_timeouts.py`` (or ``... trio``).
"""

from __future__ import annotations

import sys

import anyio

from tasqueue_anyio import Backoff, JobCancelledError, JobFailedError, Server, current_job

server = Server()
log: list[str] = []


# [retries]
@server.task(max_retries=3, backoff=Backoff(initial=0.1, factor=2, jitter=False))
async def flaky(url: str) -> str:
    attempt = current_job().meta.retried + 1  # 1, then 2 after the first retry, ...
    if attempt < 3:
        raise ConnectionError(f"{url} did not answer (attempt {attempt})")
    return f"{url} answered on attempt {attempt}"
# [retries end]


# [timeout]
@server.task(timeout=0.2, max_retries=1)
async def slow_report() -> None:
    try:
        await anyio.sleep(60)  # stopped when the job's deadline passes
    finally:
        with anyio.CancelScope(shield=True):  # cleanup that awaits must be shielded
            await anyio.sleep(0.01)
            log.append(f"slow_report cleaned up (attempt {current_job().meta.retried + 1})")
# [timeout end]


started = anyio.Event()


# [cancel]
@server.task()
async def long_export() -> None:
    started.set()
    try:
        await anyio.sleep(60)
    except anyio.get_cancelled_exc_class():
        log.append("long_export was cancelled")
        raise  # always let cancellation go on
# [cancel end]


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)

        # [run retries]
        job = await flaky.enqueue("https://example.com")
        print(await job.result(timeout=10))
        print("retried:", (await job.info()).meta.retried)
        # [run retries end]

        # [run timeout]
        report = await slow_report.enqueue()
        try:
            await report.result(timeout=10)
        except JobFailedError as exc:
            print("failed:", exc.error)
        print(*log, sep="\n")
        # [run timeout end]

        # [run cancel]
        log.clear()
        export = await long_export.enqueue()
        await started.wait()  # the handler is running
        await export.cancel()
        try:
            await export.result(timeout=10)
        except JobCancelledError:
            print("status:", (await export.status()).value)
        print(*log, sep="\n")
        # [run cancel end]

        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
