"""Tutorial 2: call ``webapp.app`` as an ASGI server would: its lifespan starts, two requests
are served, the lifespan ends. Run it with ``python3 webapp_demo.py`` (or ``... trio``).
"""

from __future__ import annotations

import sys

import anyio
import httpx
from webapp import app, lifespan


async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        posted = await http.post("/count", content="the quick brown fox")
        print(posted.status_code, sorted(posted.json()))
        job_id = posted.json()["job"]
        done = await http.get(f"/jobs/{job_id}", params={"wait": 10})
        print(done.status_code, done.json())
        missing = await http.get("/jobs/no-such-job")
        print(missing.status_code, missing.json())


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
