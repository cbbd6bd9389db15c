"""What the Redis broker and results backends share: the client, its lifetime, key
prefixes, Lua script calls, and the translation of coredis errors.

Both backends run on `coredis <https://coredis.readthedocs.io>`_, whose client is
AnyIO-native: every call here works under Trio and asyncio alike. Importing this module
turns on ``coredis.Config.optimized`` (coredis's runtime argument checks off), because
every call made here is built by this library.

Lua scripts run with ``EVALSHA``: each backend loads its scripts once when it opens, and
a script the server forgot (a restart, ``SCRIPT FLUSH``) is loaded again and the call
repeated.

Redis Cluster: a ``redis+cluster://`` (or ``rediss+cluster://``) URL, or a caller's
:class:`coredis.RedisCluster`, makes the backend a cluster client (``cluster`` is
``True``). coredis routes each command, ``EVALSHA`` included, to the master of its keys'
slot (a script whose keys span slots is refused with ``ClusterCrossSlotError``: every
script here is called with keys of one slot), splits a pipeline into one batch per node
(sent one node after the other), and sends ``SCRIPT LOAD`` to every node. Pub/sub stays
classic ``PUBLISH``/``SUBSCRIBE``: the cluster broadcasts every message to every node,
so the one subscriber connection (to any node) hears every channel.
"""

from __future__ import annotations

import hashlib
import logging
import math
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
from coredis.connection import TCPLocation
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
    "Client",
    "Commands",
    "RedisBackend",
    "client_kwargs",
    "cluster_kwargs",
    "is_cluster_url",
    "is_sentinel_url",
    "renew_error_stream",
    "sentinel_kwargs",
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

#: A client the backends run on: one server, or a Redis Cluster.
Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]

#: Seconds one connection attempt (TCP, then TLS) may take by default: a ``rediss://``
#: URL that names a clear-text port never completes its TLS handshake.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: URL schemes of a Redis Cluster (clear text, TLS).
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: The query options every Redis URL takes (besides ``db``).
_CONNECTION_OPTIONS = ("connect_timeout", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
#: The port of a Sentinel when a ``redis+sentinel://`` URL gives none.
DEFAULT_SENTINEL_PORT = 26379


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
    query argument. ``connect_timeout`` (seconds, default
    :data:`DEFAULT_CONNECT_TIMEOUT`) bounds each connection attempt, TLS handshake
    included.

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
            f"invalid Redis URL {url!r}: the scheme must be redis:// or rediss:// (TLS), "
            f"redis+cluster:// or rediss+cluster:// for a Redis Cluster, or redis+sentinel:// "
            f"or rediss+sentinel:// for a primary found through Redis Sentinel"
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
    _tls_kwargs(url, parts.scheme == "rediss", query, kwargs)
    return kwargs


def is_cluster_url(url: object) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return isinstance(url, str) and url.partition("://")[0].lower() in _CLUSTER_SCHEMES


def cluster_kwargs(url: str) -> dict[str, Any]:
    """Arguments of :class:`coredis.RedisCluster` for a ``redis+cluster://`` URL.

    ``redis+cluster://[[username]:password@]host[:port][,host[:port]...]`` names one or
    more nodes of the cluster (the client discovers the others from them; the port
    defaults to 6379); ``rediss+cluster://`` connects to every node with TLS, checked as
    for ``rediss://`` (and with the same ``ssl_*`` and ``connect_timeout`` query
    arguments). A cluster has only database 0, so a path other than ``/`` or ``/0`` is
    refused.

    :param url: the URL
    :return: keyword arguments for :class:`coredis.RedisCluster`
    :raises InvalidInputError: the URL is not a Redis Cluster URL this library understands
    """
    if not is_cluster_url(url):
        raise InvalidInputError(
            f"invalid Redis Cluster URL {url!r}: the scheme must be redis+cluster:// or "
            f"rediss+cluster:// (TLS)"
        )
    scheme, auth, hosts, path, query_text = _split_hosts_url(url)
    nodes = [
        {"host": host, "port": port}
        for host, port in _hosts(url, "Redis Cluster URL", hosts, 6379, "node")
    ]
    if path.strip("/") not in ("", "0"):
        raise InvalidInputError(
            f"invalid Redis Cluster URL {url!r}: a cluster has only database 0"
        )
    query = {name: values[-1] for name, values in parse_qs(query_text).items()}
    if query.pop("db", "0") != "0":
        raise InvalidInputError(
            f"invalid Redis Cluster URL {url!r}: a cluster has only database 0"
        )
    username, has_password, password = auth.partition(":")
    kwargs: dict[str, Any] = {
        "startup_nodes": nodes,
        "username": unquote(username) if username else None,
        "password": unquote(password) if has_password else None,
        "decode_responses": False,
    }
    _tls_kwargs(url, scheme.lower() == "rediss+cluster", query, kwargs)
    return kwargs


def _split_hosts_url(url: str) -> tuple[str, str, str, str, str]:
    """``scheme://[auth@]host[:port][,host[:port]...][/path][?query]`` split into its
    scheme, auth, hosts, path and query (a URL of several hosts, which
    :func:`urllib.parse.urlsplit` does not take as a whole)."""
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    path, _, query_text = tail.partition("?")
    if "?" in netloc:
        netloc, _, query_text = netloc.partition("?")
    auth, _, hosts = netloc.rpartition("@")
    return scheme, auth, hosts, path, query_text


def _hosts(
    url: str, what: str, hosts: str, default_port: int, kind: str
) -> list[tuple[str, int]]:
    """The ``host[:port]`` items of a comma-separated list (IPv6 in brackets)."""
    out = []
    for host in hosts.split(","):
        try:
            # urlsplit parses host, port and IPv6 brackets as for any other URL
            node = urlsplit(f"//{host}")
            port = node.port or default_port
        except ValueError as exc:
            raise InvalidInputError(f"invalid {what} {url!r}: {exc}") from None
        if not node.hostname or node.username is not None:
            raise InvalidInputError(f"invalid {what} {url!r}: bad {kind} {host!r}")
        out.append((node.hostname, port))
    return out


def is_sentinel_url(url: object) -> bool:
    """Whether ``url`` names a primary found through Redis Sentinel
    (``redis+sentinel://``, ``rediss+sentinel://``)."""
    return isinstance(url, str) and url.partition("://")[0].lower() in _SENTINEL_SCHEMES


def sentinel_kwargs(url: str) -> dict[str, Any]:
    """What a ``redis+sentinel://`` URL says, as arguments for :class:`coredis.Sentinel`
    and its ``primary_for``.

    ``redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/SERVICE[/db]``
    names the Sentinels (port 26379 by default; any of them will do, the client asks
    them in turn) and the service (the ``sentinel monitor`` name) whose primary the
    client connects to, and reconnects to after a failover. The user name and password
    are the data nodes' (percent-decoded). ``sentinel_username`` and
    ``sentinel_password`` in the query authenticate to the Sentinels themselves, when
    they require it. ``rediss+sentinel://`` uses TLS, checked as for ``rediss://``
    (with the same ``ssl_*`` and ``connect_timeout`` query arguments), to the Sentinels
    and to the data nodes.

    :param url: the URL
    :return: ``{"sentinels": [(host, port), ...], "service": str, "primary": {...},
        "sentinel": {...}}``: the Sentinels, the service, the primary's connection
        arguments and the Sentinels' connection arguments
    :raises InvalidInputError: the URL is not a Sentinel URL this library understands
    """
    if not is_sentinel_url(url):
        raise InvalidInputError(
            f"invalid Redis Sentinel URL {url!r}: the scheme must be redis+sentinel:// or "
            f"rediss+sentinel:// (TLS)"
        )
    scheme, auth, hosts, path, query_text = _split_hosts_url(url)
    sentinels = _hosts(
        url, "Redis Sentinel URL", hosts, DEFAULT_SENTINEL_PORT, "Sentinel address"
    )
    parts = [unquote(part) for part in path.strip("/").split("/")] if path.strip("/") else []
    if not parts or not parts[0]:
        raise InvalidInputError(
            f"invalid Redis Sentinel URL {url!r}: no service name (the path is "
            f"/SERVICE[/db], SERVICE being the name the Sentinels monitor)"
        )
    if len(parts) > 2:
        raise InvalidInputError(
            f"invalid Redis Sentinel URL {url!r}: the path is /SERVICE[/db], got /{path}"
        )
    query = {name: values[-1] for name, values in parse_qs(query_text).items()}
    db_text = query.pop("db", None) or (parts[1] if len(parts) > 1 else "0")
    try:
        db = int(db_text)
    except ValueError:
        raise InvalidInputError(
            f"invalid Redis Sentinel URL {url!r}: db {db_text!r} is not a number"
        ) from None
    if db < 0:
        raise InvalidInputError(f"invalid Redis Sentinel URL {url!r}: db must be >= 0")
    sentinel_username = query.pop("sentinel_username", None)
    sentinel_password = query.pop("sentinel_password", None)
    username, has_password, password = auth.partition(":")
    primary: dict[str, Any] = {
        "db": db,
        "username": unquote(username) if username else None,
        "password": unquote(password) if has_password else None,
    }
    _tls_kwargs(
        url,
        scheme.lower() == "rediss+sentinel",
        query,
        primary,
        also=("sentinel_username", "sentinel_password"),
    )
    sentinel: dict[str, Any] = {
        "username": sentinel_username,
        "password": sentinel_password,
        "connect_timeout": primary["connect_timeout"],
    }
    if "ssl_context" in primary:
        sentinel["ssl_context"] = primary["ssl_context"]
    return {
        "sentinels": sentinels,
        "service": parts[0],
        "primary": primary,
        "sentinel": sentinel,
    }


def _tls_kwargs(
    url: str,
    tls: bool,
    query: dict[str, str],
    kwargs: dict[str, Any],
    also: Sequence[str] = (),
) -> None:
    """Add the TLS context of a ``rediss`` URL's query (``ssl_*``) and the connection
    timeout (``connect_timeout``) to ``kwargs``; refuse any other option (``also``: the
    caller's own, already taken, named in the refusal)."""
    ca_certs = query.pop("ssl_ca_certs", None)
    certfile = query.pop("ssl_certfile", None)
    keyfile = query.pop("ssl_keyfile", None)
    timeout_text = query.pop("connect_timeout", None)
    if query:
        raise InvalidInputError(
            f"invalid Redis URL {url!r}: unknown option(s) {', '.join(sorted(query))} "
            f"(known: {', '.join(['db', *also, *_CONNECTION_OPTIONS])})"
        )
    timeout = DEFAULT_CONNECT_TIMEOUT
    if timeout_text is not None:
        try:
            timeout = float(timeout_text)
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= 3600:
            raise InvalidInputError(
                f"invalid Redis URL {url!r}: connect_timeout must be seconds in (0, 3600]"
            )
    kwargs["connect_timeout"] = timeout
    if tls:
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


def server_identity(url: str) -> tuple[Any, ...]:
    """What names the server and database of a URL accepted by :func:`client_kwargs`:
    two URLs with the same identity reach the same keys."""
    kwargs = client_kwargs(url)
    return (kwargs["host"].lower(), kwargs["port"], kwargs["db"], kwargs["username"])


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn coredis errors raised inside the block into :class:`~tasqueue_anyio.BrokerError` (see
    :func:`describe_error` for the message)."""
    try:
        yield
    except RedisError as exc:
        raise BrokerError(f"Redis failed while {what}: {describe_error(exc)}") from exc
    except OSError as exc:
        raise BrokerError(f"Redis connection failed while {what}: {exc}") from exc


# coredis's text of a failed command of a pipeline: the command (with all its arguments,
# a whole Lua script for SCRIPT LOAD) and the error
_PIPELINE_ERROR = re.compile(
    r"Command # \d+ \(([A-Za-z]+(?: [A-Z]+\b)?).*\) of pipeline caused error: (.*)", re.DOTALL
)


def describe_error(exc: BaseException) -> str:
    """What went wrong, in words a user can act on: the server's error (for a pipeline,
    with the failed command's name instead of its arguments), what a connection attempt
    failed on (a certificate, a host name, a timeout), and for an authentication or
    permission error, what to check."""
    text = str(exc)
    match = _PIPELINE_ERROR.fullmatch(text)
    if match is not None:
        text = f"{match[1].upper()}: {match[2]}"
    if "already authenticated" in text or text.startswith("NOAUTH"):
        return (
            "the server requires authentication: give a user name and password in the URL "
            "(redis://user:password@host)"
        )
    if "WRONGPASS" in text or "invalid username-password pair" in text:
        return f"{text} (check the user name and password in the URL)"
    if "no permissions" in text.lower() or "NOPERM" in text:
        return (
            f"{text} (the Redis user lacks a permission the backend needs: see the ACL "
            f"rule in docs/redis.md)"
        )
    cause = _connect_cause(exc)
    if cause is not None:
        text = f"{text}: {cause}"
    return text


def _connect_cause(exc: BaseException) -> str | None:
    """Why a connection attempt failed, from the exceptions it was raised from."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate check failed: {current.verify_message or current}"
        if isinstance(current, ssl.SSLError):
            return f"TLS failed: {current}"
        if isinstance(current, TimeoutError):
            return (
                "the connection attempt timed out (an unreachable server, or a rediss:// "
                "URL that names a clear-text port?)"
            )
        if current is not exc and isinstance(current, OSError):
            return str(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


# Every command the backends' Lua scripts run, each called once with harmless arguments
# on probe keys of the prefix (KEYS: a string, a hash, a list, a sorted set, of one slot)
# and a probe channel (ARGV[1]); returns the commands the server refused for permission
# (an ACL without the command, the prefix's keys or its channels), with the reason.
_LUA_PROBE = r"""
local s, h, l, z = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local calls = {
  {'PING'}, {'TIME'}, {'EXISTS', s}, {'SET', s, '0', 'PX', '60000'}, {'INCR', s}, {'INCRBY', s, '1'},
  {'PEXPIRE', s, '60000'},
  {'HSET', h, 'f', '0'}, {'HSETNX', h, 'f', '0'}, {'HINCRBY', h, 'f', '1'}, {'HGET', h, 'f'},
  {'HMGET', h, 'f'}, {'HGETALL', h}, {'HDEL', h, 'f'},
  {'RPUSH', l, '0'}, {'LPUSH', l, '0'}, {'LLEN', l}, {'LRANGE', l, '0', '0'}, {'LPOP', l},
  {'ZADD', z, '0', 'm'}, {'ZSCORE', z, 'm'}, {'ZCARD', z}, {'ZRANGE', z, '0', '0'},
  {'ZRANGEBYSCORE', z, '0', '0'}, {'ZREM', z, 'm'},
  {'PUBLISH', ARGV[1], ''},
  {'DEL', s, h, l, z},
}
local refused = {}
for _, call in ipairs(calls) do
  local reply = redis.pcall(unpack(call))
  if type(reply) == 'table' and reply.err then
    local err = tostring(reply.err)
    local low = string.lower(err)
    -- Redis 7.2+: NOPERM ... no permissions ...; 7.0: The user executing the script can't
    if string.find(err, 'NOPERM', 1, true) or string.find(low, 'permission', 1, true)
        or string.find(low, 'the user executing the script', 1, true) then
      table.insert(refused, call[1] .. ': ' .. err)
    end
  end
end
return refused
"""


_EVALSHA = b"EVALSHA"
_RAW: NoopCallback[Any] = NoopCallback()


def evalsha(client: Any, sha: bytes, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """``EVALSHA``, built without coredis's per-command wrappers inside a pipeline (they
    cost more than the command itself); through the client's own method otherwise."""
    if isinstance(client, Pipeline):
        return client.create_request(_EVALSHA, sha, len(keys), *keys, *args, callback=_RAW)
    return client.evalsha(sha, keys, args)


_UNSET: Any = object()


class _Call:
    """One command waiting in a :class:`_Batch` of a :class:`Commands` combiner."""

    __slots__ = ("error", "make", "reply")

    def __init__(self, make: Callable[[Any], Any]) -> None:
        self.make = make
        self.reply: Any = _UNSET
        self.error: BaseException | None = None

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.reply


class _Batch:
    """The calls that go out in one flush: one event wakes all their callers."""

    __slots__ = ("calls", "done", "taken")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.done = anyio.Event()
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

    def __init__(self, client: Client, sources: dict[str, str]) -> None:
        self._client = client
        self._sources = sources
        self.shas: dict[str, bytes] = {
            name: hashlib.sha1(source.encode()).hexdigest().encode()
            for name, source in sources.items()
        }
        #: the calls of the next flush
        self._open: _Batch | None = None
        self._wakeup: anyio.Event | None = None
        self._running = False
        #: how many round trips the flusher made, and how many calls they carried
        self.flushes = 0
        self.calls = 0

    async def load(self) -> None:
        """Load every script into the server's script cache (one round trip; on a
        cluster, one ``SCRIPT LOAD`` per script, which coredis sends to every node)."""
        if isinstance(self._client, coredis.RedisCluster):
            # a cluster pipeline cannot route a command without keys
            for source in self._sources.values():
                await self._client.script_load(source)
            return
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
        batch = self._enter([call])
        try:
            await batch.done.wait()
        except BaseException:
            if not batch.taken:
                batch.calls.remove(call)
            raise
        return call.result()

    async def gather(self, makes: Sequence[Callable[[Any], Any]]) -> list[Any]:
        """Run several commands in one flush; return each reply, or the exception it
        raised, in order."""
        if not makes:
            return []
        if not self._running:
            out: list[Any] = []
            for make in makes:
                try:
                    out.append(await self._direct(make))
                except Exception as exc:
                    out.append(exc)
            return out
        calls = [_Call(make) for make in makes]
        batch = self._enter(calls)
        try:
            await batch.done.wait()
        except BaseException:
            if not batch.taken:
                for call in calls:
                    batch.calls.remove(call)
            raise
        return [call.reply if call.error is None else call.error for call in calls]

    def _enter(self, calls: list[_Call]) -> _Batch:
        """Add ``calls`` to the batch of the next flush (and wake the flusher)."""
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
        batch.calls += calls
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
        return batch

    async def _direct(self, make: Callable[[Any], Any]) -> Any:
        try:
            return await make(self._client)
        except NoScriptError:
            await self.load()
            return await make(self._client)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The flusher: send queued calls, one pipeline at a time, until cancelled."""
        self._running = True
        batch: _Batch | None = None
        try:
            task_status.started()
            while True:
                batch = self._open
                if batch is None or not batch.calls:
                    batch = None
                    wakeup = self._wakeup = anyio.Event()
                    await wakeup.wait()
                    continue
                self._open = None
                batch.taken = True
                await self._flush(batch.calls)
                batch.done.set()
                batch = None
        finally:
            self._running = False
            closed = BrokerError("the Redis backend closed before the call was sent")
            for left in (batch, self._open):
                if left is not None:
                    for call in left.calls:
                        if call.reply is _UNSET and call.error is None:
                            call.error = closed
                    left.done.set()
            self._open = None

    async def _flush(self, calls: list[_Call]) -> None:
        """Send ``calls``; give each its reply or its error (the caller wakes them).

        If the flusher is cancelled meanwhile (the backend closes), the calls not
        answered yet are left to :meth:`run`, which fails them.
        """
        self.flushes += 1
        self.calls += len(calls)
        if len(calls) == 1:
            call = calls[0]
            try:
                call.reply = await self._direct(call.make)
            except Exception as exc:
                call.error = exc
            return
        try:
            async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
                for call in calls:
                    call.make(pipe)
            results = list(pipe.results or ())
            if len(results) != len(calls):
                raise BrokerError(f"a pipeline of {len(calls)} got {len(results)} replies")
        except Exception as exc:
            for call in calls:
                call.error = exc
            return
        unknown = []
        for call, reply in zip(calls, results, strict=True):
            if isinstance(reply, NoScriptError):
                unknown.append(call)
            elif isinstance(reply, BaseException):
                call.error = reply
            else:
                call.reply = reply
        if unknown:
            try:
                await self.load()
            except Exception as exc:
                for call in unknown:
                    call.error = exc
                return
            await self._flush(unknown)


def renew_error_stream(client: coredis.RedisCluster[Any]) -> Callable[[], None]:
    """Give a cluster client's layout a fresh error stream; return what closes it.

    A workaround for coredis 6.9, which never closes the memory stream its cluster layout
    reports node errors on: garbage collection then warns (``ResourceWarning``) about
    every cluster client. Call this before each opening of the client, and the returned
    function after it closed. Does nothing on a coredis without that stream.
    """
    layout = getattr(client.connection_pool, "cluster_layout", None)
    old = getattr(layout, "_error_stream", None)
    if not (isinstance(old, tuple) and len(old) == 2):
        return lambda: None
    send, receive = old
    size = send.statistics().max_buffer_size
    send.close()
    receive.close()
    new = anyio.create_memory_object_stream[Any](size)
    layout._error_stream = new  # type: ignore[union-attr]

    def close() -> None:
        for stream in new:
            stream.close()

    return close


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
    closed when the last entry exits. Either may be a :class:`coredis.RedisCluster`
    (a ``redis+cluster://`` URL makes one); ``cluster`` tells. A client must not decode
    responses (``decode_responses=False``, coredis's default): the backends read bytes.
    """

    _what = "Redis backend"

    def __init__(
        self,
        url: str | None,
        client: Client | None,
        prefix: str,
        scripts: dict[str, str],
    ) -> None:
        if url is not None and client is not None:
            raise InvalidInputError("give a Redis URL or a client, not both")
        self.prefix = validate_prefix(prefix)
        if client is None:
            self.url: str | None = url if url is not None else DEFAULT_URL
            self.client: Client
            #: the server and db the URL names (None for a caller's client or a cluster)
            self.server_id: tuple[Any, ...] | None = None
            #: the Sentinel client of a ``redis+sentinel://`` URL (opened before the client)
            self._sentinel: coredis.Sentinel[Any] | None = None
            if is_cluster_url(self.url):
                self.client = coredis.RedisCluster(**cluster_kwargs(self.url))
                renew_error_stream(self.client)()  # each opening gets one of its own
            elif is_sentinel_url(self.url):
                found = sentinel_kwargs(self.url)
                self._sentinel = coredis.Sentinel(
                    [TCPLocation(host, port) for host, port in found["sentinels"]],
                    sentinel_kwargs={**found["sentinel"], "decode_responses": False},
                )
                self.client = self._sentinel.primary_for(found["service"], **found["primary"])
                primary = found["primary"]
                self.server_id = (
                    "sentinel",
                    tuple(sorted(found["sentinels"])),
                    found["service"],
                    primary["db"],
                    primary["username"],
                )
            else:
                self.client = coredis.Redis(**client_kwargs(self.url))
                self.server_id = server_identity(self.url)
            self._owns_client = True
        else:
            if not isinstance(client, (coredis.Redis, coredis.RedisCluster)):
                raise InvalidInputError(
                    f"expected a coredis.Redis or coredis.RedisCluster client, got {client!r}"
                )
            if client.decode_responses:
                raise InvalidInputError(
                    f"the client {client!r} decodes responses: make it with "
                    f"decode_responses=False (the backends read bytes)"
                )
            self.url = None
            self.client = client
            self._owns_client = False
            self.server_id = None
            self._sentinel = None
        #: whether the client is a Redis Cluster client
        self.cluster = isinstance(self.client, coredis.RedisCluster)
        self._cmds = Commands(self.client, {**scripts, "probe": _LUA_PROBE})
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
            if isinstance(self.client, coredis.RedisCluster):
                stack.callback(renew_error_stream(self.client))
            if self._sentinel is not None:
                await stack.enter_async_context(self._sentinel)
            await stack.enter_async_context(self.client)

    def _require_open(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError(f"this {self._what} is not open: use `async with` first")
        return self._tg

    async def _open(self) -> None:
        """The first entry, the client open: load the scripts, check the permissions
        (subclasses extend it)."""
        await self._cmds.load()
        await self._check_access()

    async def _check_access(self) -> None:
        """Run every command of the Lua scripts once on probe keys under the prefix, so
        that a Redis user without a permission the backend needs (a command, the
        prefix's keys or channels) fails to open, rather than each call later.

        :raises BrokerError: the server refused some of them (all are named)
        """
        keys = [f"{self.prefix}:{{probe}}:{kind}" for kind in ("s", "h", "l", "z")]
        refused = await self._cmds.script("probe", keys, [f"{self.prefix}:ch:probe"])
        if refused:
            reasons = "; ".join(
                item.decode(errors="replace") if isinstance(item, bytes) else str(item)
                for item in refused
            )
            raise BrokerError(
                f"the Redis user may not run what the {self._what} needs under the prefix "
                f"{self.prefix!r}: {reasons} (see the ACL rule in docs/redis.md)"
            )

    async def _start(self, tg: TaskGroup) -> None:
        """Start background tasks in ``tg``: the write-combiner (subclasses extend it)."""
        await tg.start(self._cmds.run, name=f"{self!r} write-combiner")

    def _closing(self) -> None:
        """Subclass hook: the last exit, before the task group and client close."""
