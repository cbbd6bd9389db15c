"""The dashboard's ASGI app: pages, actions and live updates (see :func:`create_app`)."""

from __future__ import annotations

import contextlib
import hmac
import inspect
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from .._client import Client, Counts
from .._exceptions import (
    BrokerError,
    DecodeError,
    InvalidInputError,
    JobNotFoundError,
    NotFoundError,
)
from .._jobs import JobMessage, Status, validate_queue
from ..abc import FINAL_STATUSES
from ._hub import Activity, Hub

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
CSRF_COOKIE = "tasqueue_csrf"
TOKEN_COOKIE = "tasqueue_token"
#: Seconds any one page waits for the backend before it says it is unavailable.
BACKEND_TIMEOUT = 5.0
#: Job records a filtered listing reads at most for one page.
SCAN_LIMIT = 5000
#: Bytes of a result shown on a job's page.
PREVIEW_BYTES = 2048
#: The largest result a job's page decodes for its preview (a larger one shows raw bytes).
DECODE_LIMIT = 64 * 1024

Authorize = Callable[[Request], "bool | Awaitable[bool]"]


class Unavailable(Exception):
    """The backend did not answer (a page shows it instead of failing)."""


def create_app(
    client: Client,
    *,
    token: str | None = None,
    authorize: Authorize | None = None,
    queues: Iterable[str] = (),
    title: str = "tasqueue",
    page_size: int = 50,
    refresh: float = 2.0,
) -> Starlette:
    """The dashboard of ``client``'s backends, as an ASGI app (Starlette).

    Mount it in your Starlette or FastAPI app (``Mount("/tasks", create_app(client))``)
    with a client your app opens in its lifespan, or run it alone with ``tasqueue
    dashboard``. Its own lifespan opens the client if it is not open yet.

    :param client: a :class:`~tasqueue_anyio.Server` (its registered queues are listed)
        or a plain :class:`~tasqueue_anyio.Client`
    :param token: when given, nothing is shown or done without it: a request carries it
        as ``Authorization: Bearer TOKEN``, or once as ``?token=TOKEN``, which sets a
        cookie (HttpOnly, SameSite=Strict)
    :param authorize: your app's own check, ``authorize(request) -> bool`` (may be
        async), called for every request (after the token, if any); ``False`` answers 403
    :param queues: queues to show besides a server's registered ones
    :param title: the name in the page header
    :param page_size: rows of a listing page
    :param refresh: seconds between two count reads while a page is open (one reader
        per process, however many pages are open)
    """
    if page_size < 1:
        raise InvalidInputError(f"page_size must be at least 1, got {page_size}")
    if token is not None and not token:
        raise InvalidInputError("token must not be empty (pass None for no token)")
    extra_queues = list(queues)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["when"] = _when
    env.filters["ago"] = _ago
    env.globals["title"] = title

    def known_queues() -> list[str]:
        registered = getattr(client, "queues", None) or {}
        return sorted({*registered, *extra_queues})

    ended = _Ended(client)

    async def read_counts() -> list[Counts]:
        """Each queue's counts (the broker's counters) with the cached totals."""
        successful, failed = await ended.totals()
        counts = []
        for queue in known_queues():
            held = await client.broker.count(queue)
            counts.append(
                Counts(
                    queue=queue,
                    pending=held.pending,
                    scheduled=held.scheduled,
                    in_flight=held.in_flight,
                    dead=held.dead,
                    successful=successful,
                    failed=failed,
                )
            )
        return counts

    async def render_counts() -> str:
        counts = await read_counts()
        return env.get_template("_counts.html").render(
            counts=counts,
            concurrency=getattr(client, "queues", None) or {},
            totals=counts[0] if counts else None,
            spark=_spark(hub.sparkline()),
        )

    def render_activity(line: Activity) -> str:
        return env.get_template("_activity.html").render(lines=[line])

    def render_banner(error: str | None) -> str:
        return env.get_template("_banner.html").render(backend_error=error)

    hub = Hub(
        client,
        render_counts,
        render_activity,
        render_banner,
        interval=refresh,
        on_end=ended.saw_end,
    )

    # -- guards -----------------------------------------------------------------------------

    async def allowed(request: Request) -> Response | None:
        """``None`` when the request may go on, else the answer that refuses it."""
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.cookies.get(TOKEN_COOKIE, "")
            query = request.query_params.get("token")
            if query is not None and _same(query, token):
                # once in the URL, then a cookie: the token leaves the address bar
                url = request.url.remove_query_params("token")
                answer = RedirectResponse(str(url), status_code=303)
                answer.set_cookie(
                    TOKEN_COOKIE, token, httponly=True, samesite="strict", path=_root(request) or "/"
                )
                return answer
            if not _same(given, token):
                return HTMLResponse(
                    "<h1>401</h1><p>This dashboard needs its token: open it with "
                    "<code>?token=...</code> once.</p>",
                    status_code=401,
                )
        if authorize is not None:
            verdict = authorize(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if not verdict:
                return HTMLResponse("<h1>403</h1><p>Not allowed.</p>", status_code=403)
        return None

    def csrf_of(request: Request) -> str:
        """The browser's CSRF cookie, or a new one (set on the page's response)."""
        return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)

    async def csrf_ok(request: Request) -> bool:
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = request.headers.get("x-csrf-token", "")
        if not given:  # the forms post urlencoded fields (no multipart parser needed)
            body = await request.body()
            given = parse_qs(body[:4096].decode("latin-1")).get("csrf", [""])[0]
        return bool(cookie) and _same(given, cookie)

    def page(
        request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        csrf = csrf_of(request)
        response = templates.TemplateResponse(
            request,
            name,
            {
                "csrf": csrf,
                "root": _root(request),
                "backend_error": hub.backend_error,
                "queues": known_queues(),
                **context,
            },
            status_code=status_code,
        )
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(
                CSRF_COOKIE, csrf, httponly=True, samesite="strict", path=_root(request) or "/"
            )
        return response

    def view(
        fn: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """A page or action: guarded, and saying so when the backend does not answer."""

        async def guarded(request: Request) -> Response:
            refused = await allowed(request)
            if refused is not None:
                return refused
            if request.method == "POST" and not await csrf_ok(request):
                return HTMLResponse(
                    "<h1>403</h1><p>The form was stale or came from another site: reload "
                    "the page and try again.</p>",
                    status_code=403,
                )
            try:
                with anyio.fail_after(BACKEND_TIMEOUT):
                    return await fn(request)
            except (BrokerError, OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return page(request, "unavailable.html", {"error": error}, 503)
            except (JobNotFoundError, NotFoundError) as exc:
                return page(request, "missing.html", {"error": str(exc)}, 404)
            except InvalidInputError as exc:
                return page(request, "missing.html", {"error": str(exc)}, 400)

        guarded.__name__ = fn.__name__
        return guarded

    def back(request: Request, path: str, **params: str) -> RedirectResponse:
        query = f"?{urlencode(params)}" if params else ""
        return RedirectResponse(f"{_root(request)}{path}{query}", status_code=303)

    # -- pages ------------------------------------------------------------------------------

    @view
    async def overview(request: Request) -> Response:
        counts = await read_counts()
        totals_ended = await ended.totals()
        return page(
            request,
            "overview.html",
            {
                "counts": counts,
                "concurrency": getattr(client, "queues", None) or {},
                "totals_ended": totals_ended,
                "spark": _spark(hub.sparkline()),
                "activity": list(hub.activity),
            },
        )

    @view
    async def jobs(request: Request) -> Response:
        status = request.query_params.get("status", "failed")
        queue = request.query_params.get("queue") or None
        task = request.query_params.get("task") or None
        number = max(1, _int(request.query_params.get("page"), 1))
        rows, more, note = await _listing(
            client, ended, known_queues(), status, queue, task, number, page_size
        )
        return page(
            request,
            "jobs.html",
            {
                "rows": rows,
                "status": status,
                "queue": queue or "",
                "task": task or "",
                "number": number,
                "more": more,
                "note": note,
                "statuses": ["queued", "scheduled", "successful", "failed"],
            },
        )

    @view
    async def job(request: Request) -> Response:
        msg = await client.get_job(request.path_params["job_id"])
        return page(request, "job.html", await _job_context(client, msg))

    @view
    async def job_fragment(request: Request) -> Response:
        msg = await client.get_job(request.path_params["job_id"])
        return page(request, "_job_state.html", await _job_context(client, msg))

    def parent_page(kind: str) -> Callable[[Request], Awaitable[Response]]:
        @view
        async def parent(request: Request) -> Response:
            parent_id = request.path_params["parent_id"]
            get = client.get_group if kind == "group" else client.get_chain
            return page(request, "parent.html", {"kind": kind, "parent": await get(parent_id)})

        return parent

    @view
    async def schedules(request: Request) -> Response:
        items = sorted(await client.get_schedules(), key=lambda s: s.next_fire)
        return page(request, "schedules.html", {"schedules": items, "inf": math.inf})

    @view
    async def queue_page(request: Request) -> Response:
        name = request.path_params["queue"]
        counts = await client.broker.count(validate_queue(name))  # counters, not listings
        pending = (await client.get_pending(name))[:page_size]
        scheduled = (await client.get_scheduled(name))[:page_size]
        dead = await client.get_dead_letters(name)
        return page(
            request,
            "queue.html",
            {
                "name": name,
                "count": counts,
                "pending": pending,
                "scheduled": scheduled,
                "dead": dead[-page_size:][::-1],
                "dead_total": len(dead),
            },
        )

    @view
    async def workers(request: Request) -> Response:
        records = await client.get_workers()
        return page(request, "workers.html", {"workers": records, "now": time.time()})

    # -- actions ----------------------------------------------------------------------------

    @view
    async def cancel(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        await client.cancel(job_id)
        return back(request, f"/jobs/{job_id}")

    def cancel_parent(kind: str) -> Callable[[Request], Awaitable[Response]]:
        @view
        async def cancel_group_or_chain(request: Request) -> Response:
            parent_id = request.path_params["parent_id"]
            await client.cancel(parent_id)
            return back(request, f"/{kind}/{parent_id}")

        return cancel_group_or_chain

    @view
    async def retry(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        await client.retry(job_id)
        return back(request, f"/jobs/{job_id}")

    @view
    async def delete(request: Request) -> Response:
        await client.delete_job(request.path_params["job_id"])
        return back(request, "/jobs", status="failed", deleted=request.path_params["job_id"])

    @view
    async def remove_schedule(request: Request) -> Response:
        await client.remove_schedule(request.path_params["schedule_id"])
        return back(request, "/schedules")

    @view
    async def replay(request: Request) -> Response:
        name = request.path_params["queue"]
        letter = request.path_params.get("letter_id")
        await client.replay_dead_letters(name, None if letter is None else [letter])
        return back(request, f"/queues/{name}")

    @view
    async def forget_letter(request: Request) -> Response:
        name = request.path_params["queue"]
        await client.delete_dead_letters(name, [request.path_params["letter_id"]])
        return back(request, f"/queues/{name}")

    # -- live -------------------------------------------------------------------------------

    async def events(scope: Scope, receive: Receive, send: Send) -> None:
        """Server-sent events: counts, activity, job changes and the backend's state."""
        request = Request(scope, receive)
        refused = await allowed(request)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-store"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        async with anyio.create_task_group() as tg:

            async def until_closed() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(until_closed)
            async with hub.page() as updates:
                await _send_event(send, "backend", render_banner(hub.backend_error))
                while True:
                    with anyio.move_on_after(15):
                        name, data = await updates.receive()
                        await _send_event(send, name, data)
                        continue
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if client._exit_stack is None:
            async with client:
                yield
        else:
            yield

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", overview),
            Route("/jobs", jobs),
            Route("/jobs/{job_id:path}/state", job_fragment),
            Route("/jobs/{job_id:path}/cancel", cancel, methods=["POST"]),
            Route("/jobs/{job_id:path}/retry", retry, methods=["POST"]),
            Route("/jobs/{job_id:path}/delete", delete, methods=["POST"]),
            Route("/jobs/{job_id:path}", job),
            Route("/groups/{parent_id:path}/cancel", cancel_parent("groups"), methods=["POST"]),
            Route("/chains/{parent_id:path}/cancel", cancel_parent("chains"), methods=["POST"]),
            Route("/groups/{parent_id:path}", parent_page("group")),
            Route("/chains/{parent_id:path}", parent_page("chain")),
            Route("/schedules", schedules),
            Route("/schedules/{schedule_id:path}/remove", remove_schedule, methods=["POST"]),
            Route("/queues/{queue}", queue_page),
            Route("/queues/{queue}/replay", replay, methods=["POST"]),
            Route("/queues/{queue}/dead/{letter_id:path}/replay", replay, methods=["POST"]),
            Route("/queues/{queue}/dead/{letter_id:path}/delete", forget_letter, methods=["POST"]),
            Route("/workers", workers),
            Route("/events", _Asgi(events)),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ],
    )


class _Ended:
    """The successful and failed totals and listings, read from the store at most every
    so often: how often follows what a read costs (20 times its duration, at least a
    second), since on some stores they are a scan of every stored job (NATS) and on
    others a counter (Redis, memory). Between reads, the totals move with the job ends
    the dashboard hears of."""

    def __init__(self, client: Client, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock
        self._totals: tuple[int, int] | None = None
        self._totals_until = 0.0
        self._ids: dict[str, tuple[float, list[str]]] = {}
        self._lock: anyio.Lock | None = None

    def _ttl(self, took: float) -> float:
        return max(1.0, 20 * took)

    async def totals(self) -> tuple[int, int]:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # one read at a time, however many pages ask
            if self._totals is None or self.clock() >= self._totals_until:
                began = self.clock()
                ended = await self.client.results.count_ended()
                self._totals = (ended.successful, ended.failed)
                self._totals_until = self.clock() + self._ttl(self.clock() - began)
            return self._totals

    async def ids(self, status: str) -> list[str]:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # as for the totals: one read, however many pages ask
            cached = self._ids.get(status)
            if cached is not None and self.clock() < cached[0]:
                return cached[1]
            began = self.clock()
            get = self.client.get_success if status == "successful" else self.client.get_failed
            listed = await get()
            self._ids[status] = (self.clock() + self._ttl(self.clock() - began), listed)
            return listed

    def saw_end(self, status: str) -> None:
        if self._totals is not None:
            successful, failed = self._totals
            if status == "successful":
                self._totals = (successful + 1, failed)
            elif status == "failed":
                self._totals = (successful, failed + 1)


class _Asgi:
    """An ASGI callable Starlette routes as an app, not as a request handler."""

    def __init__(self, fn: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.fn = fn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.fn(scope, receive, send)


async def _send_event(send: Send, name: str, data: str) -> None:
    lines = "".join(f"data: {line}\n" for line in (data.splitlines() or [""]))
    chunk = f"event: {name}\n{lines}\n".encode()
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    if math.isinf(at):
        return "never"
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(at: float | None) -> str:
    if at is None or math.isinf(at):
        return ""
    seconds = at - time.time()
    future = seconds > 0
    seconds = abs(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size or unit == "s":
            text = f"{int(seconds // size)} {unit}"
            return f"in {text}" if future else f"{text} ago"
    return ""


def _spark(values: Sequence[int], width: int = 240, height: int = 32) -> dict[str, Any]:
    """The sparkline's polyline points and its peak."""
    peak = max(values, default=0)
    step = width / max(1, len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - (v / peak * (height - 2) if peak else 0) - 1:.1f}"
        for i, v in enumerate(values)
    )
    return {"points": points, "peak": peak, "width": width, "height": height, "total": sum(values)}


async def _job_context(client: Client, msg: JobMessage) -> dict[str, Any]:
    result: bytes | None = None
    preview = ""
    if msg.status is Status.SUCCESSFUL:
        try:
            result = await client.get_result(msg.id)
        except NotFoundError:
            result = None
    if result is not None:
        preview = repr(result[:PREVIEW_BYTES])  # raw bytes: too large, or not the codec's
        if len(result) <= DECODE_LIMIT:
            with contextlib.suppress(Exception):
                preview = repr(client.codec.decode(result))
        preview = preview[:PREVIEW_BYTES]
    trace = msg.meta.trace.get("traceparent", "")
    parts = trace.split("-")
    return {
        "msg": msg,
        "meta": msg.meta,
        "final": msg.status.value in FINAL_STATUSES,
        "result": result,
        "preview": preview,
        "trace_id": parts[1] if len(parts) == 4 else "",
    }


async def _listing(
    client: Client,
    ended: _Ended,
    queues: list[str],
    status: str,
    queue: str | None,
    task: str | None,
    number: int,
    size: int,
) -> tuple[list[JobMessage], bool, str]:
    """One page of jobs with ``status`` (and the queue and task asked), whether there is
    a next page, and a note when the listing was cut short."""
    start = (number - 1) * size
    if status in ("queued", "scheduled"):
        names = [queue] if queue else queues
        found: list[JobMessage] = []
        for name in names:
            listed = await (client.get_pending if status == "queued" else client.get_scheduled)(name)
            found.extend(m for m in listed if task is None or m.job.task == task)
            if len(found) > start + size:
                break
        return found[start : start + size], len(found) > start + size, ""
    if status not in ("successful", "failed"):
        raise InvalidInputError(f"unknown status {status!r}")
    ids = (await ended.ids(status))[::-1]  # newest first
    if queue is None and task is None:
        rows = [await _read(client, job_id) for job_id in ids[start : start + size]]
        return [r for r in rows if r is not None], len(ids) > start + size, ""
    matched: list[JobMessage] = []
    scanned = 0
    for job_id in ids:
        if scanned >= SCAN_LIMIT:
            note = f"looked at the newest {SCAN_LIMIT} of {len(ids)} jobs: narrow the filter"
            return matched[start : start + size], len(matched) > start + size, note
        scanned += 1
        msg = await _read(client, job_id)
        if msg is None or (queue and msg.meta.queue != queue) or (task and msg.job.task != task):
            continue
        matched.append(msg)
        if len(matched) > start + size:
            break
    return matched[start : start + size], len(matched) > start + size, ""


async def _read(client: Client, job_id: str) -> JobMessage | None:
    try:
        return await client.get_job(job_id)
    except (NotFoundError, DecodeError):
        return None  # expired or deleted since it was listed
