"""A three-node NATS cluster with JetStream for the tests (not a test module itself).

:func:`start_nats_cluster` starts three ``nats-server`` processes on free loopback ports,
each with a store directory of its own and routes to the other two (cluster ``tq``,
servers ``n1``..``n3``), and returns once JetStream has a meta leader (a stream with three
replicas can be created); node ``nK`` has the server tag ``zone:nK``. Each node is a :class:`nats_server.NatsServer`, so a test can
``kill()`` one by its pid and ``start()`` it again on the same ports and store.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

from nats_server import NatsServer, _free_port, require_binary

__all__ = ["NatsCluster", "start_nats_cluster"]

#: Seconds the cluster may take to elect its JetStream meta leader.
FORM_TIMEOUT = 30.0


class NatsCluster:
    """Three nodes; ``urls`` are their client URLs (the seeds a client is given)."""

    def __init__(self, nodes: list[NatsServer], names: list[str], root: Path) -> None:
        self.nodes = nodes
        self.names = names
        self.root = root

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node(self, name: str) -> NatsServer:
        """The node whose ``server_name`` is ``name``."""
        return self.nodes[self.names.index(name)]

    def restart(self, name: str) -> None:
        """Start node ``name`` again (after :meth:`NatsServer.kill`) and wait until the
        cluster places a stream with three replicas again.

        :raises RuntimeError: it did not within :data:`FORM_TIMEOUT`
        """
        self.node(name).start()
        deadline = time.monotonic() + FORM_TIMEOUT
        while not _places_three(self.node(name).port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not rejoin the cluster")
            time.sleep(0.2)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _js_request(port: int, subject: str, payload: bytes = b"") -> dict[str, Any] | None:
    """One JetStream API request to the node on ``port`` over a raw socket; its JSON reply,
    or ``None`` when none came within 2 s."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.settimeout(2)
            sock.recv(4096)  # INFO
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                + b"SUB _INBOX.probe 1\r\n"
                + f"PUB {subject} _INBOX.probe {len(payload)}\r\n".encode()
                + payload
                + b"\r\nPING\r\n"
            )
            data = b""
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not _has_reply(data):
                data += sock.recv(65536)
            if not _has_reply(data):
                return None
            body = data.split(b"MSG _INBOX.probe", 1)[1].split(b"\r\n", 2)[1]
            reply: dict[str, Any] = json.loads(body)
            return reply
    except (OSError, ValueError, IndexError):
        return None


def _has_reply(data: bytes) -> bool:
    _, found, rest = data.partition(b"MSG _INBOX.probe")
    return bool(found) and rest.count(b"\r\n") >= 2


def _js_ready(port: int) -> bool:
    """Whether the node answers a JetStream account info request (a meta leader exists)."""
    reply = _js_request(port, "$JS.API.INFO")
    return reply is not None and "error" not in reply


def _places_three(port: int) -> bool:
    """Whether a stream with three replicas can be placed now (every peer is back): a
    probe stream is created and deleted."""
    name = f"probe{uuid4().hex[:12]}"
    config = {"name": name, "subjects": [f"{name}.x"], "num_replicas": 3, "storage": "memory"}
    reply = _js_request(port, f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode())
    if reply is None or "error" in reply:
        return False
    _js_request(port, f"$JS.API.STREAM.DELETE.{name}")
    return True


def start_nats_cluster() -> NatsCluster:
    """Start the three nodes and wait for JetStream; skips the test without a binary."""
    binary = require_binary()
    root = Path(tempfile.mkdtemp(prefix="tasqueue-nats-cluster-"))
    names = ["n1", "n2", "n3"]
    route_ports = [_free_port() for _ in names]
    nodes: list[NatsServer] = []
    try:
        for i, name in enumerate(names):
            routes = ", ".join(
                f"nats-route://127.0.0.1:{port}" for j, port in enumerate(route_ports) if j != i
            )
            config = (
                f"server_name: {name}\n"
                f"server_tags: [\"zone:{name}\"]\n"
                f"cluster {{\n  name: tq\n  listen: 127.0.0.1:{route_ports[i]}\n"
                f"  routes: [{routes}]\n}}\n"
            )
            node = NatsServer(binary, _free_port(), root / name, config)
            node.directory.mkdir(parents=True)
            node.start()
            nodes.append(node)
        deadline = time.monotonic() + FORM_TIMEOUT
        while not all(_js_ready(node.port) for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the NATS cluster elected no JetStream meta leader:\n"
                    + "\n".join(node.log for node in nodes)
                )
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return NatsCluster(nodes, names, root)
