"""The libraries the Redis peer benchmark runs, one small module each.

Each module has the same four functions (``options`` are the extra keywords of its
:class:`Peer` entry)::

    enqueue(url, jobs, backend, **options) -> float      # seconds of the bulk enqueue
    work(url, jobs, concurrency, backend, reporter, **options) -> None   # runs forever
    queued(client, **options) -> int       # jobs waiting, by the library's own keys
    finished(client, jobs, **options) -> int   # jobs whose end the library recorded

``client`` is the parent's view of the peer's store: a :class:`~.common.Resp` on Redis,
a :class:`~.common.NatsMonitor` on NATS (``store="nats"``: tasqueue_anyio's NATS rows).

A module is imported only in a child process (and by the parent for ``queued`` and
``finished``, once its packages are known to be installed).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["PEERS", "Peer"]


@dataclass(frozen=True)
class Peer:
    """One library (one table row per backend)."""

    name: str
    module: str
    requires: tuple[str, ...]
    backends: tuple[str, ...] = ("asyncio",)
    options: dict[str, Any] = field(default_factory=dict)
    store: str = "redis"  # or "nats"
    #: several worker processes can share one queue (``--workers`` above 1); every peer
    #: here can: tasqueue_anyio (a Redis list; one durable pull consumer per queue on
    #: NATS), streaq and taskiq-stream (a stream's consumer group), SAQ, arq and taskiq
    #: (a list or a sorted set that every worker pops from)
    multi_worker: bool = True

    def missing(self) -> list[str]:
        """The required packages that are not installed."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module}")


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("tasqueue_anyio", "lib_tasqueue", ("tasqueue_anyio", "coredis"), ("asyncio", "trio")),
        Peer(
            "tasqueue_anyio-nats",
            "lib_tasqueue",
            ("tasqueue_anyio",),
            ("asyncio", "trio"),
            options={"nats": True},
            store="nats",
        ),
        Peer("streaq", "lib_streaq", ("streaq", "trio"), ("asyncio", "trio")),
        Peer("saq", "lib_saq", ("saq",)),
        Peer("arq", "lib_arq", ("arq",)),
        Peer("taskiq", "lib_taskiq", ("taskiq", "taskiq_redis"), options={"stream": False}),
        Peer("taskiq-stream", "lib_taskiq", ("taskiq", "taskiq_redis"), options={"stream": True}),
    )
}
