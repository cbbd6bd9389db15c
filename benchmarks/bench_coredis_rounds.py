"""What one pipelined round trip to Redis costs the client's CPU, on coredis.

The Redis worker's CPU per job (docs/benchmarks.md) is made of the library's own work,
the event loop, and coredis: a job's two ``EVALSHA`` calls (start and end) travel in
pipelines that the results store's write-combiner sends, about one round trip per six
jobs at concurrency 32. This script measures, against a local ``redis-server`` started
for the run, the CPU (``time.process_time``) of ``N`` no-op ``EVALSHA`` calls sent as one
pipeline, for ``N`` = 1, 10, 50 and with 0 or 25 arguments (the end script's size):

    python3 benchmarks/bench_coredis_rounds.py [--rounds 2000] [--backend asyncio|trio]

The figure for ``N=1`` is the fixed cost of a round trip; the slope is the cost per call
and per argument. The baseline printed on the same run is the same round trip made with
a bare AnyIO socket (one ``send`` and one ``receive`` of the pre-encoded RESP bytes, no
parsing): what any Python client pays before its own work.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import anyio
import coredis
from coredis.response._callbacks import NoopCallback
from peers.common import start_redis_server


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


async def measure(port: int, rounds: int) -> list[tuple[int, int, float, float]]:
    """Per (calls, arguments): the CPU µs of one coredis pipeline and of one bare round trip."""
    rows: list[tuple[int, int, float, float]] = []
    client = coredis.Redis(port=port, decode_responses=False)
    args = [b"a%d" % i for i in range(25)]
    async with client:
        sha = await client.script_load("return 1")
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            for calls in (1, 10, 50):
                for nargs in (0, 25):
                    n = max(200, rounds * 10 // (calls * 5))
                    start = time.process_time()
                    for _ in range(n):
                        async with client.pipeline(transaction=False) as pipe:
                            for _ in range(calls):
                                pipe.create_request(
                                    b"EVALSHA", sha, 0, *args[:nargs], callback=NoopCallback()
                                )
                    pipelined = (time.process_time() - start) / n
                    payload = _resp(b"EVALSHA", sha, b"0", *args[:nargs]) * calls
                    expected = b":1\r\n" * calls
                    start = time.process_time()
                    for _ in range(n):
                        await stream.send(payload)
                        got = b""
                        while len(got) < len(expected):
                            got += await stream.receive()
                    bare = (time.process_time() - start) / n
                    rows.append((calls, nargs, pipelined * 1e6, bare * 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    options = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    server = start_redis_server(binary)
    try:
        rows = anyio.run(measure, server.port, options.rounds, backend=options.backend)
    finally:
        server.stop()
    print(f"coredis {coredis.__version__}, {options.backend}: CPU per pipelined round trip")
    print("calls  args   coredis us  per call   bare socket us  per call")
    for calls, nargs, pipelined, bare in rows:
        print(
            f"{calls:5}  {nargs:4}  {pipelined:11.1f}  {pipelined / calls:8.1f}  "
            f"{bare:15.1f}  {bare / calls:8.1f}"
        )


if __name__ == "__main__":
    main()
