"""What the peer benchmark's parent and its children share: a throwaway ``redis-server``,
a tiny synchronous Redis client for the parent's checks, and the report pipe.

The parent never uses a library's own client: its checks (``FLUSHALL``, counting a
library's finished jobs, ``INFO``) go through :class:`Resp`, a few dozen lines of RESP2
over a blocking socket, so it costs the same for every library and needs nothing
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "Reporter", "Resp", "RespError", "start_redis_server"]


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
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


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


class Reporter:
    """The child's side of the report pipe: one JSON line per event.

    A worker child calls :meth:`start` just before it enters the library's worker, and
    its no-op task calls :meth:`job_done`, which counts in memory (no I/O per job) and
    reports ``done`` when the count reaches the number of jobs. Each event carries the
    child's CPU time, so the parent gets the worker's CPU over the timed window.
    With ``BENCH_PROFILE`` set in the environment, the window runs under ``cProfile``
    (timed by CPU time), whose stats are written to
    ``$BENCH_PROFILE-<library>-<backend>.prof`` at ``done``.
    """

    def __init__(self, fd: int, jobs: int, tag: str = "") -> None:
        self._fd = fd
        self._jobs = jobs
        self._count = 0
        self._tag = tag
        self._profiler: Any = None
        #: called at ``done``; returns extra figures for the parent (the child's own)
        self.extra: Any = None

    def send(self, event: str, **fields: Any) -> None:
        os.write(self._fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    def start(self) -> None:
        prefix = os.environ.get("BENCH_PROFILE")
        if prefix:
            import cProfile

            # CPU time, not wall time: a task waiting for Redis costs nothing here
            self._profiler = cProfile.Profile(time.process_time)
        times = os.times()
        self.send("start", cpu=time.process_time(), user=times.user, sys=times.system)
        if self._profiler is not None:
            self._profiler.enable()

    def job_done(self) -> None:
        self._count += 1
        if self._count == self._jobs:
            cpu, times = time.process_time(), os.times()
            if self._profiler is not None:
                self._profiler.disable()
            extra = self.extra() if self.extra is not None else {}
            self.send("done", cpu=cpu, user=times.user, sys=times.system, extra=extra)
            if self._profiler is not None:
                self._profiler.dump_stats(f"{os.environ['BENCH_PROFILE']}-{self._tag}.prof")
