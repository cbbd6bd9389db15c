"""The ``tasqueue`` command: run a worker, inspect and control jobs.

::

    tasqueue worker myapp.tasks:server [--backend trio] [-c emails=20] [--burst] [--grace 30]
    tasqueue job JOB_ID --app myapp.tasks:server [--json]
    tasqueue pending QUEUE --broker redis://localhost/0 [--results URL] [--prefix PREFIX]
    tasqueue job JOB_ID --broker nats://localhost:4222 --prefix PREFIX

Built on the standard library's :mod:`argparse`: the command is small, and a CLI
framework would be one more dependency for every user of the library.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import anyio
import attrs
from anyio.abc import TaskStatus

from ._exceptions import BrokerError, InvalidInputError, NotFoundError, TasqueueError
from ._groups import ChainMessage, GroupMessage
from ._jobs import JobMessage, validate_queue
from ._server import Server
from .abc import Broker, Results

__all__ = ["main"]


_log = logging.getLogger("tasqueue_anyio.cli")


class CLIError(Exception):
    """An error the command reports in one line (exit status 1 unless said otherwise)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# -- finding the server ---------------------------------------------------------------------


def load_server(spec: str) -> Server:
    """The :class:`~tasqueue_anyio.Server` named by ``MODULE:ATTR`` (or returned by calling it).

    :raises CLIError: the module or attribute is missing, or is not a server
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"{spec!r} is not MODULE:ATTR (for example myapp.tasks:server)", 2)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import module {module_name!r}: {exc}", 2) from exc
    try:
        value: Any = module
        for part in attr.split("."):
            value = getattr(value, part)
    except AttributeError:
        raise CLIError(f"module {module_name!r} has no attribute {attr!r}", 2) from None
    if not isinstance(value, Server) and callable(value) and not inspect.isclass(value):
        try:
            value = value()
        except Exception as exc:
            raise CLIError(f"calling {spec}() to get the server failed: {exc!r}", 2) from exc
    if not isinstance(value, Server):
        raise CLIError(
            f"{spec} is not a tasqueue_anyio.Server (or a function returning one): "
            f"it is of type {type(value).__name__}",
            2,
        )
    return value


_REDIS_SCHEMES = (
    "redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"
)  # fmt: skip


def _scheme(url: str) -> str:
    scheme = url.partition("://")[0].lower()
    if scheme not in ("memory", *_REDIS_SCHEMES, "nats", "tls"):
        raise CLIError(
            f"unknown URL scheme in {url!r} "
            f"(memory, redis, rediss, redis+cluster, rediss+cluster, redis+sentinel, "
            f"rediss+sentinel, nats, tls)",
            2,
        )
    return scheme


def _check_prefix(scheme: str, prefix: str | None) -> None:
    if prefix is not None and scheme == "memory":
        raise CLIError("--prefix is for Redis and NATS URLs, not memory://", 2)


def broker_from_url(
    url: str, prefix: str | None = None, partitions: Mapping[str, int] | None = None
) -> Broker:
    """A broker for ``url``: ``memory://`` (this process only), ``redis://`` /
    ``rediss://``, ``redis+cluster://`` / ``rediss+cluster://`` or
    ``redis+sentinel://`` / ``rediss+sentinel://`` (keys under
    ``prefix``; ``partitions`` as in ``RedisBroker(url, partitions=...)``), ``nats://`` /
    ``tls://`` (``prefix``: the stream and the first subject token,
    ``NatsBroker(url, prefix=prefix)``)."""
    scheme = _scheme(url)
    _check_prefix(scheme, prefix)
    if partitions and scheme not in _REDIS_SCHEMES:
        raise CLIError("--partitions is for Redis URLs", 2)
    try:
        if scheme == "memory":
            from .brokers.memory import MemoryBroker

            return MemoryBroker()
        if scheme in ("nats", "tls"):
            from .brokers import nats  # type: ignore[attr-defined,unused-ignore]

            if prefix is None:
                return nats.NatsBroker(url)  # type: ignore[no-any-return,unused-ignore]
            return nats.NatsBroker(url, prefix=prefix)  # type: ignore[no-any-return,unused-ignore]
        from .brokers.redis import RedisBroker

        if prefix is None:
            return RedisBroker(url, partitions=partitions)
        return RedisBroker(url, prefix=prefix, partitions=partitions)
    except ImportError as exc:
        raise CLIError(f"the backend for {url!r} is not installed: {exc}") from exc


def _partitions(items: Sequence[str]) -> dict[str, int]:
    """``--partitions QUEUE=N`` options as a mapping (the broker checks N's range)."""
    return dict(_queue_numbers(items, "--partitions"))


def _queue_numbers(items: Sequence[str], option: str) -> list[tuple[str, int]]:
    """``QUEUE=N`` option values (N >= 1) as pairs, the queue names checked."""
    out = []
    for item in items:
        queue, sep, number = item.partition("=")
        try:
            count = int(number) if sep and number.isascii() else 0
        except ValueError:
            count = 0
        if count < 1:
            raise CLIError(f"{option} wants QUEUE=N with N >= 1, got {item!r}", 2)
        out.append((validate_queue(queue), count))
    return out


def results_from_url(url: str, prefix: str | None = None) -> Results:
    """A results store for ``url`` (the schemes of :func:`broker_from_url`; on NATS
    ``prefix`` names the KV bucket, ``NatsResults(url, prefix=prefix)``)."""
    scheme = _scheme(url)
    _check_prefix(scheme, prefix)
    try:
        if scheme == "memory":
            from .results.memory import MemoryResults

            return MemoryResults()
        if scheme in ("nats", "tls"):
            from .results import nats  # type: ignore[attr-defined,unused-ignore]

            if prefix is None:
                return nats.NatsResults(url)  # type: ignore[no-any-return,unused-ignore]
            return nats.NatsResults(url, prefix=prefix)  # type: ignore[no-any-return,unused-ignore]
        from .results.redis import RedisResults

        return RedisResults(url) if prefix is None else RedisResults(url, prefix=prefix)
    except ImportError as exc:
        raise CLIError(f"the backend for {url!r} is not installed: {exc}") from exc


def server_for(args: argparse.Namespace) -> Server:
    if args.app and (args.broker or args.results or args.prefix or args.partitions):
        raise CLIError(
            "give --app MODULE:ATTR or --broker/--results/--prefix/--partitions, not both", 2
        )
    if args.app:
        return load_server(args.app)
    if args.broker:
        return Server(
            broker=broker_from_url(args.broker, args.prefix, _partitions(args.partitions)),
            results=results_from_url(args.results or args.broker, args.prefix),
        )
    raise CLIError("say where the jobs are: --app MODULE:ATTR, or --broker URL [--results URL]", 2)


# -- output ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    if hasattr(value, "value") and isinstance(getattr(value, "value", None), str):
        return value.value  # enums
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def job_to_dict(msg: JobMessage) -> dict[str, Any]:
    meta = _plain(msg.meta)
    return {
        "id": msg.id,
        "task": msg.job.task,
        "status": msg.status.value,
        "queue": msg.meta.queue,
        "priority": msg.job.priority,
        "payload": _plain(msg.job.payload),
        "progress": _plain(msg.progress),
        "meta": meta,
    }


class _StdoutClosed(Exception):
    """Whoever read the output went away (``tasqueue failed | head -1``)."""


def _print(obj: Any, as_json: bool) -> None:
    try:
        _write(obj, as_json)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutClosed from None


def _write(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_plain(obj), default=str))
        return
    data = _plain(obj)
    if isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for key, value in data.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{key:<{width}}  {value}")
    elif isinstance(data, list):
        for item in data:
            print(json.dumps(item, default=str) if isinstance(item, dict) else item)
    else:
        print(data)


# -- commands -------------------------------------------------------------------------------


async def run_worker(server: Server, *, burst: bool, grace: float) -> None:
    """Run ``server``'s workers until a signal (or, with ``burst``, empty queues)."""
    signalled = anyio.Event()
    # A second signal cancels this scope: running jobs go back to the broker at once. It
    # holds run() only, not the server: the hand-back needs the backends' connections.
    run_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        # Listen first: from here on a signal stops the worker gracefully, never kills it.
        await tg.start(_watch_signals, server, run_scope, grace, signalled)
        async with server:
            with run_scope:
                if not signalled.is_set():
                    async with anyio.create_task_group() as running:

                        async def run_then_end(
                            *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
                            await server.run(burst=burst, task_status=task_status)
                            running.cancel_scope.cancel()

                        await running.start(run_then_end)
                        if signalled.is_set():  # it came while run() was starting
                            server.stop(grace)
        tg.cancel_scope.cancel()


async def _watch_signals(
    server: Server,
    scope: anyio.CancelScope,
    grace: float,
    signalled: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not signalled.is_set():
                signalled.set()
                _log.warning(
                    "%s: finishing running jobs within %gs (again to stop at once)",
                    signal.Signals(signum).name,
                    grace,
                )
                server.stop(grace)
            else:
                _log.warning("%s: stopping now", signal.Signals(signum).name)
                scope.cancel()  # running jobs go back to the broker


async def inspect_command(args: argparse.Namespace) -> None:
    server = server_for(args)
    async with server:
        cmd = args.command
        if cmd == "job":
            _print(job_to_dict(await server.get_job(args.id)), args.json)
        elif cmd == "group":
            group: GroupMessage = await server.get_group(args.id)
            _print(group, args.json)
        elif cmd == "chain":
            chain: ChainMessage = await server.get_chain(args.id)
            _print(chain, args.json)
        elif cmd == "pending":
            jobs = await server.get_pending(validate_queue(args.queue))
            _print(
                [job_to_dict(m) if args.json else f"{m.id}  {m.job.task}" for m in jobs], args.json
            )
        elif cmd == "scheduled":
            jobs = await server.get_scheduled(validate_queue(args.queue))
            _print(
                [
                    job_to_dict(m) if args.json else f"{m.id}  {m.job.task}  eta={m.meta.eta}"
                    for m in jobs
                ],
                args.json,
            )
        elif cmd == "dead":
            letters = await server.get_dead_letters(validate_queue(args.queue))
            _print([_plain(d) if args.json else f"{d.at}  {d.reason}" for d in letters], args.json)
        elif cmd == "counts":
            _print(await server.counts(validate_queue(args.queue)), args.json)
        elif cmd == "failed":
            _print(await server.get_failed(), args.json)
        elif cmd == "successful":
            _print(await server.get_success(), args.json)
        elif cmd == "schedules":
            # a disabled schedule (no fire time left) has next_fire = inf: shown as
            # "disabled", and null in JSON (which has no infinity)
            lines: list[Any] = []
            for s in await server.get_schedules():
                disabled = not math.isfinite(s.next_fire)
                if args.json:
                    lines.append({**_plain(s), "next_fire": None} if disabled else _plain(s))
                else:
                    lines.append(
                        f"{s.id}  {s.cron}  next={'disabled' if disabled else s.next_fire}"
                    )
            _print(lines, args.json)
        elif cmd == "workers":
            # id, queues (name=concurrency), jobs in hand, start and last heartbeat (UTC)
            from datetime import datetime, timezone

            def utc(at: float) -> str:
                try:
                    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                except (OverflowError, OSError, ValueError):  # far out of range: as it is
                    return repr(at)

            now = server.clock()
            rows: list[Any] = []
            for w in await server.get_workers():
                if args.json:
                    rows.append(_plain(w))
                    continue
                queues = ",".join(f"{name}={n}" for name, n in w.queues.items()) or "-"
                in_hand = f"{len(w.jobs)}" + (f" ({','.join(w.jobs)})" if w.jobs else "")
                rows.append(
                    f"{w.id}  queues={queues}  jobs={in_hand}  started={utc(w.started_at)}  "
                    f"seen={utc(w.seen_at)} ({max(0.0, now - w.seen_at):.1f}s ago)"
                )
            _print(rows, args.json)
        elif cmd == "cancel":
            status = await server.cancel(args.id)
            _print({"id": args.id, "status": status.value}, args.json)
        elif cmd == "purge":
            purged = await server.purge(validate_queue(args.queue))
            _print({"queue": args.queue, "purged": purged}, args.json)
        elif cmd == "replay":
            replayed = await server.replay_dead_letters(
                validate_queue(args.queue), args.id or None
            )
            _print([str(h) for h in replayed], args.json)
        elif cmd == "retry":
            again = await server.retry(args.id)
            _print({"id": str(again), "status": (await again.status()).value}, args.json)
        elif cmd == "delete":
            await server.delete_job(args.id)
            _print({"id": args.id, "deleted": True}, args.json)
        else:  # pragma: no cover - argparse only allows the commands above
            raise CLIError(f"unknown command {cmd!r}", 2)


# -- the entry point --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tasqueue", description="Run tasqueue_anyio workers and inspect jobs."
    )
    debug_help = "show tracebacks and debug logs"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # also after the command; SUPPRESS keeps a subcommand from resetting one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser("worker", help="run the workers of a Server", parents=[common])
    worker.add_argument("app", metavar="MODULE:ATTR", help="a Server, or a function returning one")
    worker.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    worker.add_argument(
        "-c",
        "--concurrency",
        action="append",
        default=[],
        metavar="QUEUE=N",
        help="processors for QUEUE (repeatable), overriding the registration",
    )
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long running jobs may take before they are handed back",
    )

    def inspector(
        name: str, help: str, *positional: tuple[str, str]
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, parents=[common])
        for arg, arg_help in positional:
            sub.add_argument(arg, help=arg_help)
        sub.add_argument("--app", metavar="MODULE:ATTR", help="take the backends from this Server")
        sub.add_argument("--broker", metavar="URL", help="broker URL (instead of --app)")
        sub.add_argument("--results", metavar="URL", help="results URL (default: the broker URL)")
        sub.add_argument(
            "--prefix",
            metavar="PREFIX",
            help="of --broker/--results URLs: the Redis key prefix; on NATS the prefix of "
            "the broker (stream and subjects) and of the results store (default: tasqueue)",
        )
        sub.add_argument(
            "--partitions",
            action="append",
            default=[],
            metavar="QUEUE=N",
            help="of a --broker Redis URL: a partitioned queue's number of partitions, as "
            "the workers' RedisBroker(partitions=...) has it (repeatable)",
        )
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
        return sub

    dashboard = inspector("dashboard", "serve the web dashboard (Hypercorn; the dashboard extra)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (8080)")
    dashboard.add_argument(
        "--token",
        default=os.environ.get("TASQUEUE_DASHBOARD_TOKEN"),
        help="nothing is shown or done without it (default: $TASQUEUE_DASHBOARD_TOKEN); "
        "required to listen beyond loopback",
    )
    dashboard.add_argument("--root-path", default="", help="the path it is served under, behind a proxy")
    dashboard.add_argument(
        "--queue", action="append", default=[], metavar="QUEUE", help="a queue to show (repeatable)"
    )

    inspector("job", "show a job", ("id", "job id"))
    inspector("group", "show a group", ("id", "group id"))
    inspector("chain", "show a chain", ("id", "chain id"))
    inspector("pending", "list the jobs waiting on a queue", ("queue", "queue name"))
    inspector(
        "scheduled", "list the jobs of a queue waiting for their ETA", ("queue", "queue name")
    )
    inspector("dead", "list a queue's dead letters", ("queue", "queue name"))
    inspector(
        "counts",
        "count a queue's pending, scheduled, in-flight and dead jobs, and ended jobs",
        ("queue", "queue name"),
    )
    inspector("failed", "list the ids of failed jobs")
    inspector("successful", "list the ids of successful jobs")
    inspector("schedules", "list the cron schedules")
    inspector("workers", "list the running workers, from their heartbeats")
    inspector("cancel", "cancel a job, group or chain", ("id", "job, group or chain id"))
    inspector("delete", "forget a job's state and result", ("id", "job id"))
    inspector("retry", "run a failed or cancelled job again", ("id", "job id"))
    inspector(
        "purge",
        "remove the jobs waiting on a queue (they end cancelled)",
        ("queue", "queue name"),
    )
    replay = inspector(
        "replay",
        "put a queue's dead letters that decode now back on it (--id to choose)",
        ("queue", "queue name"),
    )
    replay.add_argument(
        "--id", action="append", metavar="ID", help="a dead letter's id (repeatable; default: all)"
    )
    return parser


def _apply_concurrency(server: Server, overrides: Sequence[str]) -> None:
    for queue, count in _queue_numbers(overrides, "--concurrency"):
        server.set_concurrency(queue, count)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.backend == "trio" and importlib.util.find_spec("trio") is None:
            raise CLIError("--backend trio needs Trio: pip install 'tasqueue_anyio[trio]'", 2)
        if args.command == "dashboard":
            anyio.run(_dashboard_main, args, backend=args.backend)
        elif args.command == "worker":
            server = load_server(args.app)
            _apply_concurrency(server, args.concurrency)
            anyio.run(_worker_main, server, args.burst, args.grace, backend=args.backend)
        else:
            anyio.run(inspect_command, args, backend=args.backend)
    except BaseException as exc:
        return _report(_unwrap(exc), args.debug)
    return 0


async def _dashboard_main(args: argparse.Namespace) -> None:
    try:
        from .dashboard import create_app
        from .dashboard._serve import check_bind, serve
    except ImportError as exc:
        raise CLIError(
            f"the dashboard needs its extra: pip install 'tasqueue_anyio[dashboard]' ({exc})", 2
        ) from None
    try:
        check_bind(args.host, args.token)
    except ValueError as exc:
        raise CLIError(str(exc), 2) from None
    server = server_for(args)
    app = create_app(server, token=args.token or None, queues=args.queue)
    async with server:
        await serve(app, args.host, args.port, root_path=args.root_path.rstrip("/"))


async def _worker_main(server: Server, burst: bool, grace: float) -> None:
    await run_worker(server, burst=burst, grace=grace)


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group from a task group, or ``exc``."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


def _report(exc: BaseException, debug: bool) -> int:
    """Report a failure in one line (with the traceback if ``debug``); the exit status.

    An exception nobody expected (a bug) is raised again, for Python to show in full.
    """
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, _StdoutClosed):  # stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as if killed by SIGPIPE
    if isinstance(exc, CLIError):
        message, status = str(exc), exc.status
    elif isinstance(exc, NotFoundError):
        message, status = f"not found: {exc}", 1
    elif isinstance(exc, InvalidInputError):
        message, status = str(exc), 2
    elif isinstance(exc, (BrokerError, OSError)):
        message, status = f"cannot reach the backend: {exc}", 1
    elif isinstance(exc, TasqueueError):
        message, status = str(exc), 1
    else:
        raise exc
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    print(f"tasqueue: error: {message}", file=sys.stderr)
    return status


def entry_point() -> NoReturn:
    """The ``tasqueue`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
