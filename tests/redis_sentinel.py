"""A Redis primary, two replicas and three Sentinels on loopback, for the tests (not a
test module itself).

:func:`start_sentinel_group` starts a primary and two replicas (``--replicaof``) with
:func:`redis_server.start_redis_server`, then three ``redis-server --sentinel``
processes monitoring the service ``tq`` (quorum 2, a node down after 1 s without an
answer, failover timeout 5 s), and returns once every Sentinel knows the primary and its
replicas. A test kills the primary (:meth:`SentinelGroup.kill_primary`), waits for the
failover (:meth:`SentinelGroup.wait_failover`), and :meth:`SentinelGroup.heal` starts the
dead node again, which the Sentinels make a replica of the new primary: the group is
ready for the next test.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from process_support import end_process
from redis_server import RedisServer, _free_port, start_redis_server

__all__ = ["SERVICE", "SentinelGroup", "start_sentinel_group"]

#: The name the Sentinels monitor.
SERVICE = "tq"
#: Seconds the group may take to form, fail over or heal.
FORM_TIMEOUT = 30.0


def command(port: int, *args: str, timeout: float = 1.0) -> object:
    """One command to the server on ``port``; its decoded RESP reply (``None`` when the
    server does not answer)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(payload)
            reader = sock.makefile("rb")
            return _read(reader)
    except OSError:
        return None


def _read(reader: object) -> object:
    line: bytes = reader.readline()  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        return rest.decode()
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)  # type: ignore[attr-defined]
        return data[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read(reader) for _ in range(size)]
    raise OSError(f"unexpected reply {line!r}")


class Sentinel:
    """One ``redis-server --sentinel`` process."""

    def __init__(self, port: int, directory: Path, primary_port: int) -> None:
        self.port = port
        self.directory = directory
        directory.mkdir(parents=True)
        config = directory / "sentinel.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {directory}\n"
            f"logfile {directory / 'sentinel.log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def primary(self) -> int | None:
        """The port of the primary this Sentinel names, if it answers."""
        reply = command(self.port, "SENTINEL", "get-master-addr-by-name", SERVICE)
        if isinstance(reply, list) and len(reply) == 2:
            return int(str(reply[1]))
        return None

    def replicas_ok(self) -> int:
        """How many replicas this Sentinel sees up."""
        reply = command(self.port, "SENTINEL", "replicas", SERVICE)
        if not isinstance(reply, list):
            return 0
        count = 0
        for fields in reply:
            if isinstance(fields, list):
                info = dict(zip(fields[::2], fields[1::2], strict=False))
                flags = str(info.get("flags", ""))
                if "s_down" not in flags and "disconnected" not in flags:
                    count += 1
        return count

    def stop(self) -> None:
        end_process(self.process)


class SentinelGroup:
    """The three data nodes and the three Sentinels; ``url`` names them all."""

    def __init__(self, nodes: list[RedisServer], sentinels: list[Sentinel], root: Path) -> None:
        self.nodes = nodes
        self.sentinels = sentinels
        self.root = root

    def url(self, db: int = 0) -> str:
        """The ``redis+sentinel://`` URL of the service, database ``db``."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/{db}"

    def primary(self) -> RedisServer:
        """The node the Sentinels name the primary now."""
        port = self._agreed_primary()
        assert port is not None, "the Sentinels name no primary"
        return next(node for node in self.nodes if node.port == port)

    def _agreed_primary(self) -> int | None:
        ports = {s.primary() for s in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def kill_primary(self) -> RedisServer:
        """SIGKILL the primary; return it (dead)."""
        node = self.primary()
        node.kill()
        return node

    def pause_replicas(self) -> list[RedisServer]:
        """Make the replicas fall behind: SIGSTOP each, then drop their links on the
        primary (``CLIENT KILL TYPE replica``), so that writes acknowledged from now on
        are on the primary only. Return the paused nodes (:meth:`resume` them)."""
        primary = self.primary()
        paused = [node for node in self.nodes if node is not primary]
        for node in paused:
            node.process.send_signal(signal.SIGSTOP)
        command(primary.port, "CLIENT", "KILL", "TYPE", "replica")
        return paused

    @staticmethod
    def resume(paused: list[RedisServer]) -> None:
        for node in paused:
            node.process.send_signal(signal.SIGCONT)

    def wait_failover(self, old: RedisServer) -> RedisServer:
        """Wait until every Sentinel names another primary than ``old``; return it."""
        deadline = time.monotonic() + FORM_TIMEOUT
        while time.monotonic() < deadline:
            port = self._agreed_primary()
            if port is not None and port != old.port:
                return next(node for node in self.nodes if node.port == port)
            time.sleep(0.1)
        raise RuntimeError(f"no failover within {FORM_TIMEOUT} s:\n{self.logs()}")

    def heal(self) -> None:
        """Start every dead node again, as a replica of the current primary (the
        Sentinels would make it one, after a while), and wait until the Sentinels see one
        primary with both replicas up."""
        primary = self.primary()
        for node in self.nodes:
            if node.process.poll() is not None:
                args = [str(arg) for arg in node.process.args]  # type: ignore[union-attr]
                if "--replicaof" in args:
                    at = args.index("--replicaof")
                    del args[at : at + 3]
                args += ["--replicaof", "127.0.0.1", str(primary.port)]
                node.process = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        self.wait_formed()

    def wait_formed(self) -> None:
        deadline = time.monotonic() + FORM_TIMEOUT
        while time.monotonic() < deadline:
            port = self._agreed_primary()
            if port is not None and all(s.replicas_ok() >= 2 for s in self.sentinels):
                info = command(port, "INFO", "replication")
                if isinstance(info, str) and info.count("state=online") == 2:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the Sentinel group did not form:\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for sentinel in self.sentinels:
            log = sentinel.directory / "sentinel.log"
            if log.exists():
                out.append(f"sentinel {sentinel.port}:\n{log.read_text()[-1500:]}")
        return "\n".join(out)

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_sentinel_group() -> SentinelGroup:
    """Start the group and wait until it has formed.

    :raises FileNotFoundError: no ``redis-server``
    :raises RuntimeError: it did not form within :data:`FORM_TIMEOUT`
    """
    root = Path(tempfile.mkdtemp(prefix="tasqueue-sentinel-"))
    nodes: list[RedisServer] = []
    sentinels: list[Sentinel] = []
    try:
        primary = start_redis_server()
        nodes.append(primary)
        for _ in range(2):
            nodes.append(
                start_redis_server(extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
            )
        for index in range(3):
            sentinels.append(Sentinel(_free_port(), root / f"s{index}", primary.port))
        group = SentinelGroup(nodes, sentinels, root)
        group.wait_formed()
    except BaseException:
        for sentinel in sentinels:
            sentinel.stop()
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return group
