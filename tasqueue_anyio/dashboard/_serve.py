"""Serving the dashboard with Hypercorn, on the AnyIO backend the caller runs on."""

from __future__ import annotations

import ipaddress
import logging
import signal

import anyio
from starlette.types import ASGIApp

from .._worker import _async_backend

__all__ = ["check_bind", "serve"]

_log = logging.getLogger("tasqueue_anyio.dashboard")


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve the dashboard beyond this machine without a token.

    :raises ValueError: ``host`` is not a loopback address and there is no token
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        raise ValueError(
            f"--host {host} would let anyone who reaches it cancel, retry and delete jobs: "
            "give --token (or TASQUEUE_DASHBOARD_TOKEN), or keep the default 127.0.0.1"
        )


async def serve(app: ASGIApp, host: str, port: int, *, root_path: str = "") -> None:
    """Serve ``app`` on ``host:port`` with Hypercorn until SIGINT or SIGTERM (or until
    cancelled), on asyncio or Trio, whichever runs this."""
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.root_path = root_path
    config.accesslog = None
    config.graceful_timeout = 2.0

    async def until_signalled() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                _log.info("%s: stopping the dashboard", signal.Signals(signum).name)
                return

    async def run_hypercorn() -> None:
        if _async_backend() == "trio":
            from hypercorn.trio import serve as serve_trio

            await serve_trio(app, config, shutdown_trigger=until_signalled)  # type: ignore[arg-type]
        else:
            from hypercorn.asyncio import serve as serve_asyncio

            await serve_asyncio(app, config, shutdown_trigger=until_signalled)  # type: ignore[arg-type]

    _log.info("the dashboard is at http://%s:%d%s/", host, port, root_path)
    # In a task of its own: Hypercorn's shutdown may leave a cancellation request on the
    # task that ran it (asyncio), which must not reach the caller's backends' exit.
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_hypercorn)
