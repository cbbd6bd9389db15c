"""A throwaway three-master Redis Cluster for the tests (not a test module itself).

:func:`start_redis_cluster` starts three ``redis-server --cluster-enabled yes`` processes
on free loopback ports (127.0.0.1 only), without persistence, each in a temporary
directory of its own (with its ``nodes.conf``), joins them with ``redis-cli --cluster
create ... --cluster-replicas 0`` and returns once every node reports
``cluster_state:ok``. :meth:`RedisCluster.stop` stops the nodes by their pids.

:func:`shared_cluster` is the one cluster of a test session, started on first use (a run
that selects no cluster test starts none); ``conftest.py`` stops it when the session
ends. Without ``redis-server`` or ``redis-cli``, the tests that need it are skipped.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import pytest
from coredis.typing import Key
from redis_server import START_TIMEOUT, RedisServer, start_redis_server

__all__ = [
    "Placement",
    "RedisCluster",
    "shared_cluster",
    "start_redis_cluster",
    "stop_shared_cluster",
]

SKIP_REASON = (
    "redis-server or redis-cli is not installed (apt-get install redis-server; .ci/run "
    "installs it): skipping the Redis Cluster tests"
)


class RedisCluster:
    """Three running master nodes of one Redis Cluster, on 127.0.0.1."""

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, master port)`` of every slot range (``CLUSTER NODES``)."""
        ranges = []
        for line in _cli(self.nodes[0].port, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2].split(","):
                continue
            port = int(fields[1].split("@")[0].rpartition(":")[2])
            for spec in fields[8:]:
                first, _, last = spec.partition("-")
                ranges.append((int(first), int(last or first), port))
        return ranges

    def stop(self) -> None:
        """Stop every node (by its pid) and remove its directory."""
        for node in self.nodes:
            node.stop()


# nodes.conf lands in the server's --dir, its own temporary directory
_NODE_ARGS = [
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "5000",
]  # fmt: skip
_CREATE_ARGS = ["--cluster-replicas", "0", "--cluster-yes"]

# A cluster node also listens on its port + 10000 (the cluster bus), so its port must
# be at most 55535 and both ports free.
_BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_cluster_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 30000)
        if _bindable(port) and _bindable(port + _BUS_OFFSET):
            return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


def _cli(port: int, *args: str) -> str:
    result = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=True,
    )
    return result.stdout


def _ready(port: int, masters: int) -> bool:
    info = _cli(port, "cluster", "info")
    if "cluster_state:ok" not in info or f"cluster_known_nodes:{masters}" not in info:
        return False
    lines = _cli(port, "cluster", "nodes").splitlines()
    return len(lines) == masters and all(
        line.rstrip().split(" ")[7] == "connected" for line in lines
    )


def start_redis_cluster(masters: int = 3) -> RedisCluster:
    """Start ``masters`` cluster nodes, create the cluster, wait until it is ``ok``.

    :raises RuntimeError: the cluster did not become ``ok`` within :data:`START_TIMEOUT`
    """
    nodes: list[RedisServer] = []
    try:
        for _ in range(masters):
            nodes.append(start_redis_server(pick_port=_free_cluster_port, extra_args=_NODE_ARGS))
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, *_CREATE_ARGS],
            capture_output=True,
            timeout=START_TIMEOUT * 3,
            check=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # every node must agree the cluster is ok, and be linked to every other node
            # (a PUBLISH reaches the subscribers on other nodes over those links)
            if all(_ready(node.port, masters) for node in nodes):
                return RedisCluster(nodes)
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        raise


_shared: RedisCluster | None = None


def shared_cluster() -> RedisCluster:
    """The test session's Redis Cluster, started on first use; skips without binaries."""
    global _shared
    if _shared is None:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            pytest.skip(SKIP_REASON)
        _shared = start_redis_cluster()
    return _shared


def stop_shared_cluster() -> None:
    """Stop the session's cluster, if one was started."""
    global _shared
    cluster, _shared = _shared, None
    if cluster is not None:
        cluster.stop()


class Placement:
    """Which master serves which slot (read once from ``CLUSTER NODES``)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self.ranges = cluster.slot_ranges()

    def port(self, key: str) -> int:
        slot = Key(key).slot
        return next(port for first, last, port in self.ranges if first <= slot <= last)
