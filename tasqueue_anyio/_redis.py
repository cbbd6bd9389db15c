"""What the Redis broker and results backends share: the client, its lifetime, key
prefixes, Lua script calls, and the translation of coredis errors.

Both backends run on `coredis <https://coredis.readthedocs.io>`_, whose client is
AnyIO-native: every call here works under Trio and asyncio alike. Importing this module
turns on ``coredis.Config.optimized`` (coredis's runtime argument checks off), because
every call made here is built by this library.

Lua scripts run with ``EVALSHA``: each backend loads its scripts once when it opens, and
a script the server forgot (a restart, ``SCRIPT FLUSH``) is loaded again and the call
repeated.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, AsyncExitStack, contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import coredis
from anyio.abc import TaskGroup, TaskStatus
from coredis.exceptions import NoScriptError, RedisError
from coredis.patterns.pipeline import Pipeline
from coredis.response._callbacks import NoopCallback

from ._exceptions import BrokerError, InvalidInputError
from ._lifetime import CountedLifetime

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_URL",
    "Commands",
    "RedisBackend",
    "client_kwargs",
    "server_identity",
    "translate_errors",
    "validate_prefix",
]

coredis.Config.optimized = True

logger = logging.getLogger("tasqueue_anyio.redis")

#: The key prefix used when none is given.
DEFAULT_PREFIX = "tasqueue"
#: The server used when neither a URL nor a client is given.
DEFAULT_URL = "redis://localhost:6379/0"

# Letters, digits and a few separators: no hash-tag braces, glob characters or spaces,
# so that a prefix can never change which part of a key Redis Cluster hashes.
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

_B = TypeVar("_B", bound="RedisBackend")


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it may start every key, else raise :class:`InvalidInputError`."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidInputError(
            f"invalid key prefix {prefix!r}: use 1-64 characters from A-Z a-z 0-9 _ . : -"
        )
    return prefix


def client_kwargs(url: str) -> dict[str, Any]:
    """Arguments of :class:`coredis.Redis` for a ``redis://`` or ``rediss://`` URL.

    ``redis://[[username]:password@]host[:port][/db]`` connects in clear text;
    ``rediss://`` connects with TLS and checks the server's certificate and host name
    against the system's trusted certificates (or the ``ssl_ca_certs`` file of the query
    string; ``ssl_certfile`` and ``ssl_keyfile`` give a client certificate). The user
    name and password are percent-decoded. The database comes from the path or a ``db``
    query argument.

    :param url: the URL
    :return: keyword arguments for :class:`coredis.Redis`
    :raises InvalidInputError: the URL is not a Redis URL this library understands
    """
    if not isinstance(url, str):
        raise InvalidInputError(f"a Redis URL must be a str, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise InvalidInputError(f"invalid Redis URL {url!r}: {exc}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise InvalidInputError(
            f"invalid Redis URL {url!r}: the scheme must be redis:// or rediss:// (TLS)"
        )
    if not parts.hostname:
        raise InvalidInputError(f"invalid Redis URL {url!r}: no host")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    db_text = query.pop("db", None) or parts.path.strip("/") or "0"
    try:
        db = int(db_text)
    except ValueError:
        raise InvalidInputError(
            f"invalid Redis URL {url!r}: db {db_text!r} is not a number"
        ) from None
    if db < 0:
        raise InvalidInputError(f"invalid Redis URL {url!r}: db must be >= 0")
    kwargs: dict[str, Any] = {
        "host": parts.hostname,
        "port": port,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "decode_responses": False,
    }
    ca_certs = query.pop("ssl_ca_certs", None)
    certfile = query.pop("ssl_certfile", None)
    keyfile = query.pop("ssl_keyfile", None)
    if query:
        raise InvalidInputError(
            f"invalid Redis URL {url!r}: unknown option(s) {', '.join(sorted(query))} "
            f"(known: db, ssl_ca_certs, ssl_certfile, ssl_keyfile)"
        )
    if parts.scheme == "rediss":
        # create_default_context: CERT_REQUIRED and check_hostname, unlike coredis's own
        # rediss:// handling, which only asks for an optional certificate.
        context = ssl.create_default_context(cafile=ca_certs)
        if keyfile and not certfile:
            raise InvalidInputError(
                f"invalid Redis URL {url!r}: ssl_keyfile needs ssl_certfile (the certificate)"
            )
        if certfile:
            context.load_cert_chain(certfile, keyfile)
        kwargs["ssl_context"] = context
    elif ca_certs or certfile or keyfile:
        raise InvalidInputError(f"invalid Redis URL {url!r}: ssl_* options need rediss://")
    return kwargs


def server_identity(url: str) -> tuple[Any, ...]:
    """What names the server and database of a URL accepted by :func:`client_kwargs`:
    two URLs with the same identity reach the same keys."""
    kwargs = client_kwargs(url)
    return (kwargs["host"].lower(), kwargs["port"], kwargs["db"], kwargs["username"])


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn coredis errors raised inside the block into :class:`BrokerError`."""
    try:
        yield
    except RedisError as exc:
        raise BrokerError(f"Redis failed while {what}: {exc}") from exc
    except OSError as exc:
        raise BrokerError(f"Redis connection failed while {what}: {exc}") from exc


_EVALSHA = b"EVALSHA"
_RAW: NoopCallback[Any] = NoopCallback()


def evalsha(client: Any, sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """``EVALSHA``, built without coredis's per-command wrappers inside a pipeline (they
    cost more than the command itself); through the client's own method otherwise."""
    if isinstance(client, Pipeline):
        return client.create_request(_EVALSHA, sha, len(keys), *keys, *args, callback=_RAW)
    return client.evalsha(sha, keys, args)


class _Call:
    """One command waiting for the next flush of a :class:`Commands` combiner."""

    __slots__ = ("done", "error", "make", "reply", "taken")

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self.make = make
        self.done = anyio.Event()
        self.reply: Any = None
        self.error: BaseException | None = None
        self.taken = False


class Commands:
    """Lua scripts by name (run with ``EVALSHA``) and a write-combiner for every call.

    While :meth:`run` runs (in the backend's task group), concurrent calls do not each
    make a round trip of their own: they queue, and one flusher sends whatever is queued
    as one pipeline each time the previous one returned (a lone call goes out as it is).
    A coredis call costs far more Python CPU than a pipelined command, so under load this
    is what makes the per-job cost small. Calls made by one task stay in order; a call
    cancelled before it was sent is not sent. Without :meth:`run` (before the backend
    opened), calls go straight to the client.

    A script the server does not know (a restart, ``SCRIPT FLUSH``) is loaded again and
    its call repeated.
    """

    def __init__(self, client: coredis.Redis[bytes], sources: dict[str, str]) -> None:
        self._client = client
        self._sources = sources
        self.shas: dict[str, bytes] = {
            name: hashlib.sha1(source.encode()).hexdigest().encode()
            for name, source in sources.items()
        }
        self._pending: list[_Call] = []
        self._wakeup: anyio.Event | None = None
        self._running = False
        #: how many round trips the flusher made, and how many calls they carried
        self.flushes = 0
        self.calls = 0

    async def load(self) -> None:
        """Load every script into the server's script cache (one round trip)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for source in self._sources.values():
                pipe.script_load(source)

    def script(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Awaitable[Any]:
        """Run script ``name`` (through the combiner)."""
        sha = self.shas[name]
        return self.submit(lambda client: evalsha(client, sha, keys, args))

    async def submit(self, make: Callable[[Any], Any]) -> Any:
        """Run the command ``make(client)`` builds (``make`` is called with the client or
        a pipeline and returns the coredis request), through the combiner."""
        if not self._running:
            return await self._direct(make)
        call = _Call(make)
        self._pending.append(call)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
        try:
            await call.done.wait()
        except BaseException:
            if not call.taken:
                self._pending.remove(call)
            raise
        if call.error is not None:
            raise call.error
        return call.reply

    async def gather(self, makes: Sequence[Callable[[Any], Any]]) -> list[Any]:
        """Run several commands in one flush; return each reply, or the exception it
        raised, in order."""
        if not self._running:
            out: list[Any] = []
            for make in makes:
                try:
                    out.append(await self._direct(make))
                except Exception as exc:
                    out.append(exc)
            return out
        calls = [_Call(make) for make in makes]
        self._pending.extend(calls)
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
        try:
            for call in calls:
                await call.done.wait()
        except BaseException:
            for call in calls:
                if not call.taken and call in self._pending:
                    self._pending.remove(call)
            raise
        return [call.reply if call.error is None else call.error for call in calls]

    async def _direct(self, make: Callable[[Any], Any]) -> Any:
        try:
            return await make(self._client)
        except NoScriptError:
            await self.load()
            return await make(self._client)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The flusher: send queued calls, one pipeline at a time, until cancelled."""
        self._running = True
        batch: list[_Call] = []
        try:
            task_status.started()
            while True:
                if not self._pending:
                    wakeup = self._wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                batch, self._pending = self._pending, []
                for call in batch:
                    call.taken = True
                await self._flush(batch)
                batch = []
        finally:
            self._running = False
            closed = BrokerError("the Redis backend closed before the call was sent")
            for call in (*batch, *self._pending):
                if not call.done.is_set():
                    call.error = closed
                    call.done.set()
            self._pending = []

    async def _flush(self, batch: list[_Call]) -> None:
        """Send ``batch``; answer each call (its reply or its error) and wake its caller.

        If the flusher is cancelled meanwhile (the backend closes), the calls not
        answered yet are left to :meth:`run`, which fails them.
        """
        self.flushes += 1
        self.calls += len(batch)
        if len(batch) == 1:
            call = batch[0]
            try:
                call.reply = await self._direct(call.make)
            except Exception as exc:
                call.error = exc
            call.done.set()
            return
        try:
            async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
                for call in batch:
                    call.make(pipe)
            results = list(pipe.results or ())
            if len(results) != len(batch):
                raise BrokerError(f"a pipeline of {len(batch)} got {len(results)} replies")
        except Exception as exc:
            for call in batch:
                call.error = exc
                call.done.set()
            return
        unknown = []
        for call, reply in zip(batch, results, strict=True):
            if isinstance(reply, NoScriptError):
                unknown.append(call)
                continue
            if isinstance(reply, BaseException):
                call.error = reply
            else:
                call.reply = reply
            call.done.set()
        if unknown:
            try:
                await self.load()
            except Exception as exc:
                for call in unknown:
                    call.error = exc
                    call.done.set()
                return
            await self._flush(unknown)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, or the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class RedisBackend(CountedLifetime):
    """The lifetime shared by the Redis backends: a client (made from a URL, or the
    caller's), a task group for background tasks, counted entries.

    A client given by the caller is used as it is: the caller opens it (``async with
    client:``) before opening the backend and closes it afterwards; the backend never
    enters or closes it. A client made from a URL is owned: opened on the first entry,
    closed when the last entry exits.
    """

    _what = "Redis backend"

    def __init__(
        self,
        url: str | None,
        client: coredis.Redis[bytes] | None,
        prefix: str,
        scripts: dict[str, str],
    ) -> None:
        if url is not None and client is not None:
            raise InvalidInputError("give a Redis URL or a client, not both")
        self.prefix = validate_prefix(prefix)
        if client is None:
            self.url: str | None = url if url is not None else DEFAULT_URL
            self.client: coredis.Redis[bytes] = coredis.Redis(**client_kwargs(self.url))
            self._owns_client = True
            #: the server and db the URL names (None for a caller's client)
            self.server_id: tuple[Any, ...] | None = server_identity(self.url)
        else:
            if not isinstance(client, coredis.Redis):
                raise InvalidInputError(f"expected a coredis.Redis client, got {client!r}")
            self.url = None
            self.client = client
            self._owns_client = False
            self.server_id = None
        self._cmds = Commands(self.client, scripts)
        self._init_lifetime()

    def __repr__(self) -> str:
        where = self.url if self.url is not None else repr(self.client)
        return f"<{type(self).__name__} {where} prefix={self.prefix!r}>"

    async def __aenter__(self: _B) -> _B:
        try:
            return await super().__aenter__()
        except BaseExceptionGroup as group:
            # coredis's pool task group wraps a failure to open (say, a wrong password)
            raise _single(group) from None

    def _opening_errors(self) -> AbstractContextManager[object]:
        return translate_errors(f"opening the {self._what}")

    async def _connect(self, stack: AsyncExitStack) -> None:
        if self._owns_client:
            await stack.enter_async_context(self.client)

    def _require_open(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError(f"this {self._what} is not open: use `async with` first")
        return self._tg

    async def _open(self) -> None:
        """The first entry, the client open: load the scripts (subclasses extend it)."""
        await self._cmds.load()

    async def _start(self, tg: TaskGroup) -> None:
        """Start background tasks in ``tg``: the write-combiner (subclasses extend it)."""
        await tg.start(self._cmds.run, name=f"{self!r} write-combiner")

    def _closing(self) -> None:
        """Subclass hook: the last exit, before the task group and client close."""
