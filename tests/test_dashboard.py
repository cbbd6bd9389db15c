"""The dashboard's routes and actions, through httpx's ASGI transport, on every backend
(memory, Redis, NATS) and both AnyIO backends; its live updates through the ASGI protocol
itself (an endless event stream, which httpx's transport would wait out)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from redis_server import UNCLOSED_STREAM, restart_redis_server, start_redis_server
from server_support import TIMEOUT
from starlette.applications import Starlette
from starlette.routing import Mount

from tasqueue_anyio import (
    BrokerError,
    Chain,
    Client,
    Group,
    Job,
    JobNotFoundError,
    Server,
    Status,
)
from tasqueue_anyio.abc import Broker, Envelope, Results
from tasqueue_anyio.dashboard import create_app
from tasqueue_anyio.testing import drain, worker

pytestmark = pytest.mark.anyio


class App:
    """A server with a few tasks on its own queue, and handles on what they do."""

    def __init__(self, broker: Broker, results: Results, queue: str) -> None:
        self.server = Server(broker=broker, results=results)
        self.queue = queue
        self.idle = f"{queue}-idle"  # a queue no worker consumes
        self.started = anyio.Event()
        self.stopped: list[str] = []
        self.flaky_runs = 0
        server = self.server

        @server.task(queue=queue, concurrency=4)
        async def add(a: int, b: int) -> int:
            return a + b

        @server.task(queue=queue, max_retries=0)
        async def boom() -> None:
            raise ValueError("boom")

        @server.task(queue=queue, max_retries=0)
        async def flaky() -> str:
            self.flaky_runs += 1
            if self.flaky_runs == 1:
                raise ConnectionError("first run fails")
            return "second run works"

        @server.task(queue=queue)
        async def slow() -> None:
            self.started.set()
            try:
                await anyio.sleep(60)
            except anyio.get_cancelled_exc_class():
                self.stopped.append("slow")
                raise

        self.add, self.boom, self.flaky, self.slow = add, boom, flaky, slow


@pytest.fixture
def app(broker: Broker, results: Results, queue_name: str) -> App:
    return App(broker, results, queue_name)


@asynccontextmanager
async def browse(asgi: Any, base: str = "http://dash") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=asgi)
    async with httpx.AsyncClient(transport=transport, base_url=base) as http:
        yield http


async def csrf_of(http: httpx.AsyncClient) -> str:
    if "tasqueue_csrf" not in http.cookies:
        (await http.get("/")).raise_for_status()
    token: str = http.cookies["tasqueue_csrf"]
    return token


async def post(http: httpx.AsyncClient, path: str) -> httpx.Response:
    return await http.post(path, data={"csrf": await csrf_of(http)})


async def test_pages_show_the_queues_and_jobs(app: App) -> None:
    dashboard = create_app(app.server, queues=[app.idle], page_size=2)
    async with worker(app.server), browse(dashboard) as http:
        done = [await app.add.enqueue(n, n) for n in (1, 2, 3)]
        for job in done:
            await job.result(timeout=TIMEOUT)
        failed = await app.boom.enqueue()
        assert (await failed.wait(timeout=TIMEOUT)).status is Status.FAILED
        waiting = await app.server.enqueue(Job("nobody", queue=app.idle))

        overview = await http.get("/")
        assert overview.status_code == 200
        assert f'data-queue="{app.queue}"' in overview.text
        row = _row(overview.text, app.idle)
        assert re.search(r'class="pending"><a [^>]*>1</a>', row), row  # the waiting job
        assert "htmx.min.js" in overview.text
        assert 'sse-connect="/events"' in overview.text

        page1 = await http.get("/jobs", params={"status": "successful"})
        page2 = await http.get("/jobs", params={"status": "successful", "page": "2"})
        shown = _job_links(page1.text) + _job_links(page2.text)
        assert set(done) <= set(shown)  # newest first, two a page
        assert len(_job_links(page1.text)) == 2
        assert 'rel="next"' in page1.text
        assert str(failed) in _job_links((await http.get("/jobs?status=failed")).text)
        by_task = await http.get("/jobs", params={"status": "failed", "task": "add"})
        assert str(failed) not in by_task.text
        queued = await http.get("/jobs", params={"status": "queued", "queue": app.idle})
        assert _job_links(queued.text) == [waiting]

        one = await http.get(f"/jobs/{done[0]}")
        assert one.status_code == 200
        assert 'id="status">successful<' in one.text
        assert ">2</pre>" in one.text
        bad = await http.get(f"/jobs/{failed}")
        assert "ValueError: boom" in bad.text
        assert "/retry" in bad.text

        assert (await http.get("/jobs/no-such-job")).status_code == 404
        assert (await http.get("/jobs", params={"status": "bogus"})).status_code == 400
        workers = await http.get("/workers")
        [record] = await app.server.get_workers()
        assert record.id in workers.text
        assert f"{app.queue}\N{MULTIPLICATION SIGN}4" in workers.text  # its queue and concurrency
        queue_page = await http.get(f"/queues/{app.idle}")
        assert str(waiting) in queue_page.text
        assert (await http.get("/static/htmx.min.js")).status_code == 200


async def test_actions_cancel_retry_delete(app: App) -> None:
    async with worker(app.server), browse(create_app(app.server)) as http:
        running = await app.slow.enqueue()
        with anyio.fail_after(TIMEOUT):
            await app.started.wait()
        answer = await post(http, f"/jobs/{running}/cancel")
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/jobs/{running}"
        assert (await running.wait(timeout=TIMEOUT)).status is Status.CANCELLED
        assert app.stopped == ["slow"]  # the handler was stopped

        flaky = await app.flaky.enqueue()
        assert (await flaky.wait(timeout=TIMEOUT)).status is Status.FAILED
        assert (await post(http, f"/jobs/{flaky}/retry")).status_code == 303
        assert await flaky.result(timeout=TIMEOUT) == "second run works"

        assert (await post(http, f"/jobs/{flaky}/delete")).status_code == 303
        with pytest.raises(JobNotFoundError):
            await flaky.status()

        # a stale form, or one posted from another site, does nothing
        other = await app.slow.enqueue()
        assert (await http.post(f"/jobs/{other}/cancel", data={"csrf": "x"})).status_code == 403
        cross = await http.post(
            f"/jobs/{other}/cancel",
            data={"csrf": await csrf_of(http)},
            headers={"sec-fetch-site": "cross-site"},
        )
        assert cross.status_code == 403
        assert (await other.status()) in (Status.QUEUED, Status.PROCESSING)
        await other.cancel()


async def test_groups_chains_schedules_and_dead_letters(app: App, broker: Broker) -> None:
    async with worker(app.server), browse(create_app(app.server)) as http:
        group = await app.server.enqueue_group(Group([app.add.job(1, 1), app.slow.job()]))
        with anyio.fail_after(TIMEOUT):
            await app.started.wait()
        shown = await http.get(f"/groups/{group}")
        assert shown.status_code == 200
        assert "Members" in shown.text
        assert all(str(member) in shown.text for member in group.jobs)
        assert (await post(http, f"/groups/{group}/cancel")).status_code == 303
        assert (await group.wait(timeout=TIMEOUT)).status is Status.CANCELLED

        chain = await app.server.enqueue_chain(Chain([app.add.job(1, 2), app.add.link(3)]))
        await chain.wait(timeout=TIMEOUT)
        chain_page = await http.get(f"/chains/{chain}")
        assert "Links, in order" in chain_page.text
        assert "successful" in chain_page.text

        schedule = await app.add.options(id=f"{app.queue}-cron", schedule="0 6 * * *").enqueue(1, 1)
        assert str(schedule) in (await http.get("/schedules")).text
        assert (await post(http, f"/schedules/{schedule}/remove")).status_code == 303
        assert str(schedule) not in (await http.get("/schedules")).text

        await broker.enqueue_many([Envelope(queue=app.queue, data=b"junk", id="junk-1")])
        await drain(app.server, queues=[app.queue])  # the worker set it aside
        letters = await app.server.get_dead_letters(app.queue)
        assert len(letters) == 1
        queue_page = await http.get(f"/queues/{app.queue}")
        assert "4 bytes" in queue_page.text
        assert letters[0].reason[:20] in queue_page.text
        replayed = await post(http, f"/queues/{app.queue}/dead/{letters[0].id}/replay")
        assert replayed.status_code == 303  # it still does not decode: it stays
        assert len(await app.server.get_dead_letters(app.queue)) == 1
        assert (await post(http, f"/queues/{app.queue}/dead/{letters[0].id}/delete")).status_code == 303
        assert await app.server.get_dead_letters(app.queue) == []


async def test_a_token_guards_everything(app: App) -> None:
    async with app.server:
        async with browse(create_app(app.server, token="s3cret")) as http:
            assert (await http.get("/")).status_code == 401
            assert (await http.get("/events")).status_code == 401
            login = await http.get("/?token=s3cret", follow_redirects=False)
            assert login.status_code == 303
            assert login.headers["location"] == "http://dash/"
            assert (await http.get("/")).status_code == 200  # the cookie now
        async with browse(create_app(app.server, token="s3cret")) as http:
            bearer = {"authorization": "Bearer s3cret"}
            assert (await http.get("/", headers=bearer)).status_code == 200
            assert (await http.get("/?token=wrong")).status_code == 401

        def only_admins(request: Any) -> bool:
            return bool(request.headers.get("x-admin"))

        async with browse(create_app(app.server, authorize=only_admins)) as http:
            assert (await http.get("/")).status_code == 403
            assert (await http.get("/", headers={"x-admin": "1"})).status_code == 200


async def test_mounted_under_a_prefix(app: App) -> None:
    host = Starlette(routes=[Mount("/tasks", create_app(app.server))])
    async with app.server, browse(host) as http:
        page = await http.get("/tasks/")
        assert page.status_code == 200
        assert 'href="/tasks/schedules"' in page.text
        assert 'src="/tasks/static/htmx.min.js"' in page.text
        csrf = http.cookies["tasqueue_csrf"]
        job = await app.add.enqueue(1, 1)
        answer = await http.post(f"/tasks/jobs/{job}/cancel", data={"csrf": csrf})
        assert answer.headers["location"] == f"/tasks/jobs/{job}"


async def test_live_updates_and_a_backend_outage(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = create_app(app.server, refresh=0.2)
    async with worker(app.server), EventStream(dashboard).open() as events:
        assert await events.next("backend") == ""  # no banner
        first = await events.next("counts")
        assert f'data-queue="{app.queue}"' in first
        job = await app.add.enqueue(2, 2)
        activity = await events.next("activity")
        assert str(job) in activity
        assert "successful" in activity
        assert await events.next(f"job-{job}") == "finished"
        counts = await events.next("counts")
        assert re.search(r'successful-total">\d+<', counts)

        async def down(queue: str) -> None:
            raise BrokerError("connection refused")

        monkeypatch.setattr(app.server.broker, "count", down)  # the broker stops answering
        banner = await events.next("backend")
        assert "The backend is unavailable: BrokerError: connection refused" in banner
        async with browse(dashboard) as http:
            page = await http.get("/")
            assert page.status_code == 503
            assert "connection refused" in page.text
        monkeypatch.undo()
        assert await events.next("backend") == ""  # recovered: the banner goes


class EventStream:
    """The dashboard's ``/events`` stream, read as a browser's EventSource would."""

    def __init__(self, asgi: Any) -> None:
        self.asgi = asgi
        self.send, self.receive = anyio.create_memory_object_stream[tuple[str, str]](1000)
        self.disconnect = anyio.Event()
        self.buffer = ""

    @asynccontextmanager
    async def open(self) -> AsyncIterator[EventStream]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._run)
            try:
                yield self
            finally:
                self.disconnect.set()
        self.receive.close()

    async def _run(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/events",
            "raw_path": b"/events",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"dash")],
            "client": ("127.0.0.1", 1),
            "server": ("dash", 80),
        }

        async def receive() -> dict[str, Any]:
            await self.disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                self.buffer += message.get("body", b"").decode()
                while "\n\n" in self.buffer:
                    block, self.buffer = self.buffer.split("\n\n", 1)
                    name, data = "", []
                    for line in block.splitlines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: "):
                            data.append(line[6:])
                    if name:
                        await self.send.send((name, "\n".join(data)))

        with self.send:
            await self.asgi(scope, receive, send)

    async def next(self, name: str) -> str:
        """The data of the next event called ``name`` (others are passed over)."""
        with anyio.fail_after(TIMEOUT):
            while True:
                got, data = await self.receive.receive()
                if got == name:
                    return data


def _row(html: str, queue: str) -> str:
    match = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', html, re.S)
    assert match, html
    return match.group(1)


def _job_links(html: str) -> list[str]:
    return re.findall(r'<tr><td><a href="/jobs/([^"]+)">', html)


@pytest.mark.filterwarnings(f"ignore:{UNCLOSED_STREAM}:ResourceWarning")
@pytest.mark.usefixtures("coredis_leaks")
async def test_a_redis_that_dies_and_comes_back(anyio_backend: str) -> None:
    """A real outage: the dashboard's Redis is killed, the page and the live stream say so;
    it comes back (same port), and both recover without a restart of the dashboard."""
    from tasqueue_anyio.brokers.redis import RedisBroker
    from tasqueue_anyio.results.redis import RedisResults

    redis = await anyio.to_thread.run_sync(start_redis_server)
    try:
        client = Client(RedisBroker(redis.url), RedisResults(redis.url))
        dashboard = create_app(client, queues=["q"], refresh=0.2)
        async with client, browse(dashboard) as http, EventStream(dashboard).open() as events:
            assert (await http.get("/")).status_code == 200
            assert await events.next("backend") == ""
            redis.kill()
            banner = await events.next("backend")
            assert "The backend is unavailable" in banner
            down = await http.get("/")
            assert down.status_code == 503
            assert "The backend is unavailable" in down.text
            await anyio.to_thread.run_sync(restart_redis_server, redis)
            assert await events.next("backend") == ""  # the banner goes
            assert (await http.get("/")).status_code == 200  # coredis reconnected
    finally:
        await anyio.to_thread.run_sync(redis.stop)
