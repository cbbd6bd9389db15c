"""The Redis backends on a server that asks for credentials and speaks TLS (S3).

One ``redis-server`` of this module's own (see :func:`redis_server.start_redis_server`):
the default user needs a password (``requirepass``), and a TLS port serves a certificate
made here (for ``localhost`` only) by a CA made here. Users are made with ``ACL SETUSER``.

- With the right credentials the backends work: a job runs end to end over
  ``rediss://`` as a user restricted by :data:`ACL_RULE` (the rule docs/redis.md gives).
- Every wrong setting fails to open, once, at once, with a :class:`BrokerError` that says
  what is wrong: a wrong or missing password, a user without a command the backends need,
  without the prefix's keys or channels, an untrusted certificate, a certificate for
  another host name, and a ``rediss://`` URL naming the clear-text port.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import anyio
import coredis
import pytest
from redis_server import COREDIS_LEAKS, RedisServer, start_redis_server
from server_support import TIMEOUT, running
from tls_support import write_certificates

from tasqueue_anyio import BrokerError, Job, JobContext, Server, Status
from tasqueue_anyio._redis import Client
from tasqueue_anyio.brokers.redis import RedisBroker
from tasqueue_anyio.results.redis import RedisResults

# failed connection attempts leak coredis's streams (see the fixture)
pytestmark = [pytest.mark.anyio, *COREDIS_LEAKS]

ADMIN_PASSWORD = "admin-secret"
#: The commands the backends need (docs/redis.md), besides the keys and channels of the
#: prefix: those of their Lua scripts, and those they send themselves.
COMMANDS = [
    *("+evalsha", "+script|load", "+get", "+set", "+exists", "+hmget", "+lrange", "+zrange"),
    *("+zrem", "+publish", "+subscribe", "+unsubscribe", "+ping", "+del", "+hdel", "+hget"),
    *("+hgetall", "+hincrby", "+hset", "+hsetnx", "+incr", "+incrby", "+llen", "+lpop"),
    *("+lpush", "+pexpire", "+rpush", "+time", "+zadd", "+zcard", "+zrangebyscore", "+zscore"),
    "+zpopmin",
]


def acl_rule(prefix: str, commands: list[str] = COMMANDS) -> list[str]:
    """The ``ACL SETUSER`` rule (after the user's name, state and password) of a user who
    may run the backends under ``prefix`` and nothing else."""
    return ["resetkeys", f"~{prefix}:*", "resetchannels", f"&{prefix}:*", "-@all", *commands]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    """A server with a password on its default user and a TLS port; the CA's file."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    ca, cert, key = write_certificates(tmp_path_factory.mktemp("redis-tls"), ["localhost"])
    try:
        server = start_redis_server(password=ADMIN_PASSWORD, tls=(ca, cert, key))
    except RuntimeError as exc:
        if "tls" not in str(exc).lower():
            raise
        pytest.skip(f"this redis-server has no TLS (BUILD_TLS=no): {exc}")
    yield server, ca
    server.stop()


def admin(server: RedisServer) -> Client:
    return coredis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD)


async def add_user(server: RedisServer, rule: list[str]) -> tuple[str, str]:
    """A new user with ``rule``; its name and password."""
    user, password = f"u{uuid4().hex[:8]}", uuid4().hex
    async with admin(server) as client:
        await client.acl_setuser(user, "on", f">{password}", *rule)
    return user, password


async def test_a_job_runs_over_tls_as_a_user_restricted_to_its_prefix(
    secured: tuple[RedisServer, Path],
) -> None:
    server, ca = secured
    prefix = f"app{uuid4().hex[:8]}"
    user, password = await add_user(server, acl_rule(prefix))
    url = f"rediss://{user}:{password}@localhost:{server.tls_port}/0?ssl_ca_certs={ca}"
    worker = Server(
        broker=RedisBroker(url, prefix=prefix), results=RedisResults(url, prefix=prefix)
    )

    @worker.task("double", raw=True)
    async def double(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(payload * 2)

    with anyio.fail_after(TIMEOUT * 2):
        async with worker, running(worker):
            job_id = await worker.enqueue(Job("double", b"ab"))
            done = await worker.wait(job_id)
            assert done.status is Status.SUCCESSFUL
            assert await worker.get_result(job_id) == b"abab"
            assert await worker.get_success() == [job_id]
    async with admin(server) as client:
        # everything it wrote is under its prefix (the probe keys are gone)
        keys = await client.keys("*")
        assert keys
        assert all(key.startswith(f"{prefix}:".encode()) for key in keys)
        assert not [key for key in keys if b"{probe}" in key]
        await client.delete(list(keys))


async def connections(client: Client) -> int:
    """How many connections the server accepted so far."""
    return int(str((await client.info("stats"))["total_connections_received"]))


#: name -> (how to make the URL from the server, the CA and a user's prefix; what the
#: error must say). ``{user}``/``{password}`` name a user made with the case's rule.
BAD = {
    "wrong password": ("redis://:wrong@127.0.0.1:{port}", None, "user name and password"),
    "no password": ("redis://127.0.0.1:{port}", None, "requires authentication"),
    "no rights": ("redis://{user}:{password}@127.0.0.1:{port}", ["+ping"], "permission"),
    "a command missing": (
        "redis://{user}:{password}@127.0.0.1:{port}",
        [c for c in COMMANDS if c != "+hset"],
        "HSET",
    ),
    "other keys": ("redis://{user}:{password}@127.0.0.1:{port}", "other-keys", "keys"),
    "other channels": ("redis://{user}:{password}@127.0.0.1:{port}", "other-channels", "PUBLISH"),
    "untrusted certificate": ("rediss://:{admin}@localhost:{tls_port}", None, "certificate"),
    "another host name": (
        "rediss://:{admin}@127.0.0.1:{tls_port}?ssl_ca_certs={ca}",
        None,
        "certificate is not valid for '127.0.0.1'",
    ),
    "TLS to the clear-text port": (
        "rediss://:{admin}@localhost:{port}?ssl_ca_certs={ca}&connect_timeout=1",
        None,
        "timed out",
    ),
}


@pytest.mark.parametrize("backend", ["broker", "results"])
@pytest.mark.parametrize("case", sorted(BAD))
async def test_a_wrong_setting_fails_to_open_once_and_says_what_is_wrong(
    secured: tuple[RedisServer, Path], case: str, backend: str
) -> None:
    server, ca = secured
    template, rule_spec, expected = BAD[case]
    prefix = f"app{uuid4().hex[:8]}"
    user = password = ""
    if rule_spec is not None:
        if rule_spec == "other-keys":
            rule = ["resetkeys", "~other:*", "resetchannels", f"&{prefix}:*", "-@all", *COMMANDS]
        elif rule_spec == "other-channels":
            rule = ["resetkeys", f"~{prefix}:*", "resetchannels", "&other:*", "-@all", *COMMANDS]
        else:
            rule = acl_rule(prefix, list(rule_spec))
        user, password = await add_user(server, rule)
    url = template.format(
        port=server.port,
        tls_port=server.tls_port,
        ca=ca,
        user=user,
        password=password,
        admin=ADMIN_PASSWORD,
    )
    opened = (
        RedisBroker(url, prefix=prefix) if backend == "broker" else RedisResults(url, prefix=prefix)
    )
    async with admin(server) as client:
        before = await connections(client)
        with anyio.fail_after(TIMEOUT), pytest.raises(BrokerError, match=expected) as info:
            async with opened:
                pass
        after = await connections(client)
    assert not opened.is_open
    assert "opening" in str(info.value) or "may not run" in str(info.value)
    # one attempt, not a retry loop: the client's connection (and the info call's own)
    assert after - before <= 2, f"{after - before} connections for one failed opening"
