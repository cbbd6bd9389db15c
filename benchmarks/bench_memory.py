"""In-memory throughput: 20,000 no-op jobs through one Server at concurrency 32.

Prints jobs/s for asyncio and Trio next to a baseline measured in the same run: the
same number of msgpack-encoded messages handed through a bare memory object stream to
32 receivers (each receiver decodes the message, the least a worker does with one).

Beside the bytes-level path (a ``raw=True`` handler of ``Job``s), the same jobs through a
typed task (``@server.task()`` taking an int and returning it: arguments decoded and the
result encoded by the codec, stored with the final state), and the typed path's extra
CPU time per job over the bytes path ("typed +%", CPU seconds of the processing phase).

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


async def server_run(
    n: int, concurrency: int, tracing: bool = False, typed: bool = False
) -> tuple[float, float, float]:
    """(enqueue jobs/s, processing jobs/s, processing CPU seconds per job)."""
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

    async def echo(i: int) -> int:
        return i

    async with Server(tracer_provider=provider) as server, anyio.create_task_group() as tg:
        if typed:
            task = server.register_task(
                "noop", echo, concurrency=concurrency, on_success=on_success
            )
            jobs = [task.job(i) for i in range(n)]
        else:
            server.register_task(
                "noop", noop, concurrency=concurrency, on_success=on_success, raw=True
            )
            jobs = [Job("noop", b"%d" % i) for i in range(n)]
        start = time.perf_counter()
        await server.enqueue_many(jobs)
        enqueue_rate = n / (time.perf_counter() - start)
        start, cpu = time.perf_counter(), time.process_time()
        await tg.start(server.run)
        await done.wait()
        rate = n / (time.perf_counter() - start)
        cpu_per_job = (time.process_time() - cpu) / n
        tg.cancel_scope.cancel()
    return enqueue_rate, rate, cpu_per_job


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
        f" {'enqueue':>9} {'+tracing':>9} {'typed':>8} {'typed +%':>9}"
    )
    for backend in ("asyncio", "trio"):
        bare, bare_decode, served, enqueued, traced = [], [], [], [], []
        typed, cpu_bytes, cpu_typed = [], [], []
        for _ in range(args.repeat):  # alternate, so drift hits both alike
            bare.append(anyio.run(bare_stream, n, c, False, backend=backend))
            bare_decode.append(anyio.run(bare_stream, n, c, True, backend=backend))
            e, s, cpu = anyio.run(server_run, n, c, backend=backend)
            enqueued.append(e)
            served.append(s)
            cpu_bytes.append(cpu)
            _, s, cpu = anyio.run(server_run, n, c, False, True, backend=backend)
            typed.append(s)
            cpu_typed.append(cpu)
            traced.append(anyio.run(server_run, n, c, True, backend=backend)[1])
        b, bd, s, e, t, ty, cb, ct = (
            statistics.median(x)
            for x in (bare, bare_decode, served, enqueued, traced, typed, cpu_bytes, cpu_typed)
        )
        print(
            f"{backend:<8} {b:>12,.0f} {bd:>9,.0f} {s:>8,.0f} {s / b:>6.2f} {e:>9,.0f} {t:>9,.0f}"
            f" {ty:>8,.0f} {100 * (ct / cb - 1):>+8.1f}%"
        )
    print("ratio = server / bare stream (the plain hand-off, the stricter baseline)")
    print("server: no tracer provider; +tracing: an SDK TracerProvider (spans made, not exported)")
    print("typed: a typed task (codec-decoded argument, codec-encoded result stored with the")
    print("  final state); typed +% = its processing CPU time per job over the bytes path's")


if __name__ == "__main__":
    main()
