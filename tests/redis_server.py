"""A throwaway ``redis-server`` for the tests (not a test module itself).

:func:`start_redis_server` runs one on a free loopback port (127.0.0.1 only), without
persistence (``--save '' --appendonly no``), in a temporary directory, and returns once it
answers ``PING``. :meth:`RedisServer.stop` terminates it, then kills it, by its own pid.

:func:`shared_server` is the one server of a test session, started on first use (so a
run that selects no Redis test starts none); ``conftest.py`` stops it when the session
ends. Without a ``redis-server`` binary, the tests that need it are skipped.

With ``tls=(ca, cert, key)`` (PEM files, e.g. from :func:`tls_support.write_certificates`),
:func:`start_redis_server` also listens with TLS on a second loopback port
(:attr:`RedisServer.tls_port`; clients need no certificate of their own); with
``password``, the default user needs it (``requirepass``).

For crash tests, :meth:`RedisServer.kill` kills a server with ``SIGKILL`` (by its pid) and
:func:`restart_redis_server` starts it again with the same command line: the same port,
directory and options (so an append-only file is loaded again).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from process_support import end_process

__all__ = [
    "COREDIS_LEAKS",
    "UNCLOSED_STREAM",
    "RedisServer",
    "restart_redis_server",
    "shared_server",
    "start_redis_server",
    "stop_shared_server",
]

#: The ResourceWarning of a memory object stream garbage-collected unclosed.
UNCLOSED_STREAM = r"Unclosed <MemoryObject(Send|Receive)Stream"

#: The marks of a test whose Redis connection attempts fail (a wrong password, a dropped
#: link). coredis 6.9 leaks the memory object streams of every connection attempt that
#: fails (``BaseConnection.__init__`` creates them, ``run()`` closes them only once
#: connected): their warnings are ignored during the test, and the ``coredis_leaks``
#: fixture collects them after it, so they do not fail whichever later test runs the
#: garbage collector.
COREDIS_LEAKS = [
    pytest.mark.filterwarnings(f"ignore:{UNCLOSED_STREAM}:ResourceWarning"),
    pytest.mark.usefixtures("coredis_leaks"),
]

#: Seconds a starting server may take to answer PING.
START_TIMEOUT = 10.0

SKIP_REASON = (
    "redis-server is not installed (apt-get install redis-server; .ci/run installs it): "
    "skipping the Redis backend tests"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password is not None:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A running ``redis-server`` process on 127.0.0.1."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        directory: Path,
        password: str | None,
        tls_port: int | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self.directory = directory
        self.password = password
        #: the TLS port, if the server was started with ``tls``
        self.tls_port = tls_port

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0 (with the password, if any)."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit within 5 s); remove its dir."""
        end_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """Kill the server with ``SIGKILL`` (a crash: no shutdown, no last save); keep its
        directory for :func:`restart_redis_server`."""
        end_process(self.process, "kill")


def start_redis_server(
    *,
    password: str | None = None,
    tls: tuple[Path, Path, Path] | None = None,
    extra_args: Sequence[str] = (),
    pick_port: Callable[[], int] = _free_port,
) -> RedisServer:
    """Start a ``redis-server`` on a free loopback port and wait until it answers.

    :param password: ``requirepass`` for the default user, if any
    :param tls: ``(ca, cert, key)``: listen with TLS too, on a second free port, with
        this certificate (client certificates are not asked for)
    :param extra_args: more ``redis-server`` options (``--name value`` pairs)
    :param pick_port: returns a free port to try (called again if it was taken)
    :raises RuntimeError: it did not answer within :data:`START_TIMEOUT`
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server")
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = pick_port()
        directory = Path(tempfile.mkdtemp(prefix="tasqueue-redis-"))
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
        if password is not None:
            args += ["--requirepass", password]
        tls_port = None
        if tls is not None:
            tls_port = pick_port()
            ca, cert, key = tls
            args += [
                "--tls-port", str(tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args += list(extra_args)
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(process, port, directory, password, tls_port)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _ping(port, password):
                return server
            time.sleep(0.02)
        log = (directory / "redis.log").read_text(errors="replace")[-2000:]
        server.stop()
        if "Address already in use" not in log:
            raise RuntimeError(f"redis-server did not start on port {port}: {log}")
    raise RuntimeError("redis-server did not start (no free port)")


def restart_redis_server(server: RedisServer) -> None:
    """Start the stopped (or killed) ``server`` again, with the command line it was started
    with (same port, directory and options), and wait until it answers ``PING`` (Redis
    answers ``LOADING`` while it reads its data back).

    :raises RuntimeError: it is still running, or did not answer within
        :data:`START_TIMEOUT` (it is killed then)
    """
    if server.process.poll() is None:
        raise RuntimeError(f"redis-server on port {server.port} is still running")
    process = subprocess.Popen(
        server.process.args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server.process = process
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        if _ping(server.port, server.password):
            return
        time.sleep(0.02)
    server.kill()
    log = (server.directory / "redis.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not restart on port {server.port}: {log}")


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """The test session's Redis server, started on first use; skips without one."""
    global _shared
    if _shared is None:
        if shutil.which("redis-server") is None:
            pytest.skip(SKIP_REASON)
        _shared = start_redis_server()
    return _shared


def stop_shared_server() -> None:
    """Stop the session's server, if one was started."""
    global _shared
    server, _shared = _shared, None
    if server is not None:
        server.stop()
