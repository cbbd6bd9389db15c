"""A web dashboard for tasqueue_anyio, as an ASGI app that runs on asyncio and Trio.

:func:`create_app` builds it (Starlette, Jinja2 templates, htmx with its server-sent
events extension, all served from the package: no CDN). Mount it in your own Starlette or
FastAPI app, serve it with ``tasqueue dashboard``, or with :func:`serve` (Hypercorn, on
the AnyIO backend that calls it). It needs the
``dashboard`` extra: ``pip install 'tasqueue_anyio[dashboard]'``.
"""

from __future__ import annotations

from ._app import create_app
from ._serve import serve

__all__ = ["create_app", "serve"]
