"""In-memory throughput: 20,000 no-op jobs through one Server at concurrency 32.

Prints jobs/s for asyncio and Trio next to a baseline measured in the same run: the
same number of msgpack-encoded messages handed through a bare memory object stream to
32 receivers (each receiver decodes the message, the least a worker does with one).

    python3 benchmarks/bench_memory.py [--jobs 20000] [--concurrency 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import msgpack

from tasqueue_anyio import Job, JobContext, Server


async def bare_stream(n: int, concurrency: int, decode: bool) -> float:
    messages = [
        msgpack.packb(
            {"v": 1, "meta": {"id": f"{i:032x}", "status": "queued"}, "job": {"task": "noop"}}
        )
        for i in range(n)
    ]
    send, receive = anyio.create_memory_object_stream[bytes](0)

    async def receiver(stream: anyio.abc.ObjectReceiveStream[bytes]) -> None:
        async with stream:
            async for message in stream:
                if decode:
                    msgpack.unpackb(message)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(receiver, receive.clone())
        receive.close()
        async with send:
            for message in messages:
                await send.send(message)
    return n / (time.perf_counter() - start)


async def server_run(n: int, concurrency: int, tracing: bool = False) -> tuple[float, float]:
    provider = None
    if tracing:
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider()
    done = anyio.Event()
    finished = 0

    async def noop(payload: bytes, ctx: JobContext) -> None:
        pass

    def on_success(ctx: JobContext) -> None:
        nonlocal finished
        finished += 1
        if finished == n:
            done.set()

    async with Server(tracer_provider=provider) as server, anyio.create_task_group() as tg:
        server.register_task("noop", noop, concurrency=concurrency, on_success=on_success, raw=True)
        jobs = [Job("noop") for _ in range(n)]
        start = time.perf_counter()
        await server.enqueue_many(jobs)
        enqueue_rate = n / (time.perf_counter() - start)
        start = time.perf_counter()
        await tg.start(server.run)
        await done.wait()
        rate = n / (time.perf_counter() - start)
        tg.cancel_scope.cancel()
    return enqueue_rate, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, c = args.jobs, args.concurrency
    print(f"{n} no-op jobs, concurrency {c}, median of {args.repeat} runs (jobs/s)")
    print(
        f"{'backend':<8} {'bare stream':>12} {'+decode':>9} {'server':>8} {'ratio':>6}"
        f" {'enqueue':>9} {'+tracing':>9}"
    )
    for backend in ("asyncio", "trio"):
        bare, bare_decode, served, enqueued, traced = [], [], [], [], []
        for _ in range(args.repeat):  # alternate, so drift hits both alike
            bare.append(anyio.run(bare_stream, n, c, False, backend=backend))
            bare_decode.append(anyio.run(bare_stream, n, c, True, backend=backend))
            e, s = anyio.run(server_run, n, c, backend=backend)
            enqueued.append(e)
            served.append(s)
            traced.append(anyio.run(server_run, n, c, True, backend=backend)[1])
        b, bd, s, e, t = (
            statistics.median(x) for x in (bare, bare_decode, served, enqueued, traced)
        )
        print(
            f"{backend:<8} {b:>12,.0f} {bd:>9,.0f} {s:>8,.0f} {s / b:>6.2f} {e:>9,.0f} {t:>9,.0f}"
        )
    print("ratio = server / bare stream (the plain hand-off, the stricter baseline)")
    print("server: no tracer provider; +tracing: an SDK TracerProvider (spans made, not exported)")


if __name__ == "__main__":
    main()
