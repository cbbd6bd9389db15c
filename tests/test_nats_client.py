"""The AnyIO NATS client against a real ``nats-server`` and against fake servers.

Real servers: pub/sub, headers, request/reply, no responders, max_payload, ``-ERR`` from
permissions, keepalive, reconnect after a restart, TLS and auth, JetStream and KV.
Fake servers (a loopback listener speaking just enough protocol): a socket closed mid-message,
garbage bytes, ``-ERR``, no ``INFO``, unanswered keepalives -- each must end in a clear error
within a timeout, never a hang.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import anyio.abc
import pytest
from nats_server import NatsServer, start_nats_server
from tls_support import write_certificates

from tasqueue_anyio import InvalidInputError
from tasqueue_anyio._nats.client import (
    AuthorizationError,
    Client,
    ConnectError,
    ConnectionClosedError,
    ConnectionLostError,
    MaxPayloadError,
    NoRespondersError,
    PermissionViolationError,
    RequestTimeoutError,
    ServerError,
    SlowConsumerError,
    StaleConnectionError,
)
from tasqueue_anyio._nats.jetstream import (
    ConsumerConfig,
    ConsumerNotFoundError,
    InvalidKeyError,
    JetStream,
    JetStreamAPIError,
    KeyDeletedError,
    KeyExistsError,
    KeyNotFoundError,
    NotSupportedError,
    StreamConfig,
    StreamNotFoundError,
    WrongRevisionError,
)
from tasqueue_anyio._nats.protocol import Info, Msg, NatsError, ProtocolError

pytestmark = pytest.mark.anyio

#: Upper bound on anything a test waits for.
TIMEOUT = 5.0


def unique(prefix: str) -> str:
    return f"{prefix}{uuid4().hex[:10]}"


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    async with Client(nats_server.url) as client:
        yield client


@pytest.fixture
async def js(nc: Client) -> JetStream:
    return JetStream(nc)


# ============================================================================= core, real server


async def test_pub_sub_headers_and_wildcards(nc: Client) -> None:
    base = unique("t.")
    async with await nc.subscribe(f"{base}.*") as sub:
        await nc.publish(f"{base}.a", b"one")
        await nc.publish(f"{base}.b", b"two", headers={"X-Id": "7", "Other": "v v"})
        first = await sub.next_msg(TIMEOUT)
        second = await sub.next_msg(TIMEOUT)
    assert (first.subject, first.payload, first.headers) == (f"{base}.a", b"one", None)
    assert second.payload == b"two"
    assert second.headers is not None
    assert dict(second.headers) == {"X-Id": "7", "Other": "v v"}
    with pytest.raises(ConnectionClosedError, match="ended"):
        await sub.next_msg(0.1)


async def test_queue_group_and_auto_unsubscribe(nc: Client) -> None:
    subject = unique("q.")
    sub = await nc.subscribe(subject, max_msgs=2)
    grouped = [await nc.subscribe(subject, queue="workers") for _ in range(2)]
    for index in range(4):
        await nc.publish(subject, str(index).encode())
    await nc.flush()
    received = [msg.payload async for msg in sub]  # ends after two messages
    assert received == [b"0", b"1"]
    counts = [0, 0]
    for number, member in enumerate(grouped):
        with anyio.move_on_after(0.2):
            async for _ in member:
                counts[number] += 1
    assert sum(counts) == 4


async def test_request_reply_no_responders_and_timeout(nc: Client) -> None:
    subject = unique("svc.")
    silent = unique("silent.")

    async def respond(sub_ready: anyio.Event) -> None:
        async with await nc.subscribe(subject) as sub:
            sub_ready.set()
            async for msg in sub:
                assert msg.reply is not None
                await nc.publish(msg.reply, b"re:" + msg.payload, headers=msg.headers)

    async with anyio.create_task_group() as tg:
        ready = anyio.Event()
        tg.start_soon(respond, ready)
        await ready.wait()
        await nc.flush()
        replies = []
        async with anyio.create_task_group() as requests:

            async def ask(number: int) -> None:
                reply = await nc.request(subject, str(number).encode(), headers={"N": str(number)})
                replies.append((reply.payload, reply.headers["N"] if reply.headers else None))

            for number in range(20):
                requests.start_soon(ask, number)
        assert sorted(replies) == sorted((f"re:{n}".encode(), str(n)) for n in range(20))
        tg.cancel_scope.cancel()

    with pytest.raises(NoRespondersError, match="no responders"):
        await nc.request(unique("nobody."), b"x")
    await nc.subscribe(silent)
    await nc.flush()
    start = anyio.current_time()
    with pytest.raises(RequestTimeoutError):
        await nc.request(silent, b"x", timeout=0.2)
    assert anyio.current_time() - start < 2


async def test_longer_request_timeouts_are_kept_by_the_expiry_task(nc: Client) -> None:
    """Requests of a timeout >= 1 s have no cancel scope of their own: the client's expiry
    task times them out (never early, at most a tick late), and each still times out,
    is answered or is cancelled on its own."""
    silent, answered = unique("silent."), unique("answered.")
    await nc.subscribe(silent)
    answers = await nc.subscribe(answered)
    await nc.flush()
    outcomes: dict[str, object] = {}

    async def ask(name: str, subject: str, timeout: float) -> None:
        start = anyio.current_time()
        try:
            await nc.request(subject, b"x", timeout=timeout)
        except RequestTimeoutError:
            outcomes[name] = anyio.current_time() - start
        else:
            outcomes[name] = "answered"

    async def given_up() -> None:
        with anyio.move_on_after(0.1):
            await nc.request(silent, b"x", timeout=30.0)
        outcomes["given up"] = "cancelled"

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "short", silent, 1.0)
        tg.start_soon(ask, "long", silent, 1.5)
        tg.start_soon(ask, "answered", answered, 1.0)
        tg.start_soon(given_up)
        msg = await answers.next_msg(5)
        assert msg.reply is not None
        await nc.publish(msg.reply, b"ok")
    assert outcomes["answered"] == "answered"
    assert outcomes["given up"] == "cancelled"
    for name, timeout in (("short", 1.0), ("long", 1.5)):
        elapsed = outcomes[name]
        assert isinstance(elapsed, float)
        assert timeout <= elapsed < timeout + 1.0, (name, elapsed)
    assert nc._timed == 0
    assert not nc._replies


@pytest.mark.parametrize("timeout", [0.3, 1.0])  # a cancel scope; the expiry task
async def test_request_batch_replies_in_order_with_errors_in_place(
    nc: Client, timeout: float
) -> None:
    """One batch: every reply lands in its request's place; a request nobody serves is a
    NoRespondersError there and an unanswered one a RequestTimeoutError, without holding
    up the others' replies or leaving anything in the reply table."""
    echo, silent, nobody = unique("echo."), unique("silent."), unique("nobody.")

    async def respond(ready: anyio.Event) -> None:
        async with await nc.subscribe(echo) as sub:
            ready.set()
            async for msg in sub:
                assert msg.reply is not None
                await nc.publish(msg.reply, b"re:" + msg.payload)

    await nc.subscribe(silent)
    async with anyio.create_task_group() as tg:
        ready = anyio.Event()
        tg.start_soon(respond, ready)
        await ready.wait()
        await nc.flush()
        requests: list[tuple[str, bytes, Any]] = [(echo, str(n).encode(), None) for n in range(50)]
        requests[7] = (nobody, b"x", None)
        requests[30] = (silent, b"x", {"X-Why": "no answer"})
        start = anyio.current_time()
        with anyio.fail_after(TIMEOUT):
            replies = await nc.request_batch(requests, timeout=timeout)
        assert timeout <= anyio.current_time() - start < timeout + 1.0
        tg.cancel_scope.cancel()
    assert isinstance(replies[7], NoRespondersError)
    assert isinstance(replies[30], RequestTimeoutError)
    for n, reply in enumerate(replies):
        if n not in (7, 30):
            assert isinstance(reply, Msg)
            assert reply.payload == f"re:{n}".encode()
    assert not nc._replies
    assert nc._timed == 0
    assert await nc.request_batch([]) == []


async def test_request_batch_fails_in_place_when_the_connection_drops() -> None:
    server = await anyio.to_thread.run_sync(start_nats_server)
    try:
        async with Client(server.url, reconnect_wait=0.02, max_reconnect_attempts=200) as client:
            silent = unique("silent.")
            await client.subscribe(silent)
            await client.flush()
            outcome: list[list[Msg | NatsError]] = []
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    outcome.append(await client.request_batch([(silent, b"a", None)] * 3))

                tg.start_soon(ask)
                with anyio.fail_after(TIMEOUT):
                    while len(client._replies) < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                server.kill()
            (replies,) = outcome
            assert [type(reply) for reply in replies] == [ConnectionLostError] * 3
            assert not client._replies
    finally:
        server.close()


async def test_max_payload_refused_before_sending(nc: Client) -> None:
    limit = nc.max_payload
    with pytest.raises(MaxPayloadError, match="max_payload") as info:
        await nc.publish("big", b"x" * (limit + 1))
    assert info.value.limit == limit
    with pytest.raises(MaxPayloadError):  # headers count too
        await nc.publish("big", b"x" * limit, headers={"A": "b"})
    subject = unique("ok.")
    async with await nc.subscribe(subject) as sub:  # the connection is still fine
        await nc.publish(subject, b"x" * limit)
        assert len((await sub.next_msg(TIMEOUT)).payload) == limit


async def test_request_batch_with_one_over_max_payload_sends_nothing(nc: Client) -> None:
    subject = unique("batch.")
    async with await nc.subscribe(subject) as sub:
        with pytest.raises(MaxPayloadError):
            await nc.request_batch(
                [(subject, b"first", None), (subject, b"x" * (nc.max_payload + 1), None)]
            )
        await nc.publish(subject, b"marker")
        await nc.flush()
        assert (await sub.next_msg(TIMEOUT)).payload == b"marker"
        assert not nc._replies


async def test_invalid_subjects_refused(nc: Client) -> None:
    with pytest.raises(InvalidInputError):
        await nc.publish("a b", b"")
    with pytest.raises(InvalidInputError):
        await nc.publish("a.*", b"")
    with pytest.raises(InvalidInputError):
        await nc.subscribe("a..b")
    with pytest.raises(InvalidInputError):
        await nc.publish("a", b"", headers={"A": "b\r\nPUB c 0"})


async def test_slow_consumer_drops_newest_and_says_so(nc: Client) -> None:
    subject = unique("slow.")
    errors: list[NatsError] = []
    nc._error_callback = errors.append
    sub = await nc.subscribe(subject, max_pending=2)
    for index in range(5):
        await nc.publish(subject, str(index).encode())
    await nc.flush()
    with pytest.raises(SlowConsumerError, match="3 message") as info:
        await sub.next_msg(TIMEOUT)
    assert info.value.dropped == 3
    assert [(await sub.next_msg(TIMEOUT)).payload for _ in range(2)] == [b"0", b"1"]
    assert any(isinstance(error, SlowConsumerError) for error in errors)


async def test_slow_consumer_by_bytes_drops_newest_and_says_so(nats_server: NatsServer) -> None:
    subject = unique("slowbytes.")
    async with Client(nats_server.url, max_pending_bytes=2500) as client:
        sub = await client.subscribe(subject)  # the client's default bound
        big = await client.subscribe(subject, max_pending_bytes=1 << 20)
        for index in range(5):
            await client.publish(subject, str(index).encode() * 1000)
        await client.flush()
        with pytest.raises(SlowConsumerError, match="3 message") as info:
            await sub.next_msg(TIMEOUT)
        assert info.value.dropped == 3
        assert [(await sub.next_msg(TIMEOUT)).payload[:1] for _ in range(2)] == [b"0", b"1"]
        # drained, the buffer takes messages again; one over the bound gets into an empty one
        await client.publish(subject, b"x" * 4000)
        assert len((await sub.next_msg(TIMEOUT)).payload) == 4000
        assert big.dropped == 0
        assert [len((await big.next_msg(TIMEOUT)).payload) for _ in range(6)] == [1000] * 5 + [4000]


async def test_closed_client_raises(nats_server: NatsServer) -> None:
    async with Client(nats_server.url) as client:
        sub = await client.subscribe("closing")
    with pytest.raises(ConnectionClosedError, match="closed"):
        await client.publish("x", b"")
    with pytest.raises(ConnectionClosedError):
        await client.request("x", b"")
    assert [msg async for msg in sub] == []
    with pytest.raises(ConnectionClosedError):
        await client.__aenter__()


async def test_aclose_inside_the_block(nats_server: NatsServer) -> None:
    async with Client(nats_server.url) as client:
        assert client.is_connected
        await client.aclose()
        assert client.is_closed
        with pytest.raises(ConnectionClosedError):
            await client.flush()


async def test_body_exception_is_not_wrapped(nats_server: NatsServer) -> None:
    with pytest.raises(KeyError):
        async with Client(nats_server.url):
            raise KeyError("mine")


async def test_keepalive_with_real_server(nats_server: NatsServer) -> None:
    async with Client(nats_server.url, ping_interval=0.05, max_outstanding_pings=2) as client:
        for _ in range(6):  # several keepalive rounds; each flush is a round trip too
            await anyio.sleep(0.05)
            await client.flush()
        assert client.is_connected
        assert client.reconnects == 0


# ============================================================================= permissions, auth

AUTH_CONFIG = """
authorization {
  users = [
    {user: "alice", password: "wonderland"}
    {user: "limited", password: "pw", permissions: {
        publish: {deny: ["secret.>"]}
        subscribe: {deny: ["secret.>"]}
    }}
  ]
}
"""


@pytest.fixture(scope="module")
def auth_server() -> Iterator[NatsServer]:
    server = start_nats_server(AUTH_CONFIG)
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServer]:
    server = start_nats_server('authorization { token: "s3cret-token" }\n')
    yield server
    server.close()


async def test_user_password_auth(auth_server: NatsServer) -> None:
    async with Client(auth_server.url, user="alice", password="wonderland") as client:
        await client.flush()
    url = f"nats://alice:wonderland@127.0.0.1:{auth_server.port}"
    async with Client(url) as client:
        await client.flush()
    with pytest.raises(AuthorizationError, match="Authorization Violation"):
        async with Client(auth_server.url, user="alice", password="wrong"):
            pass
    with pytest.raises(AuthorizationError):
        async with Client(auth_server.url):
            pass


async def test_token_auth(token_server: NatsServer) -> None:
    async with Client(token_server.url, token="s3cret-token") as client:
        await client.flush()
    with pytest.raises(AuthorizationError):
        async with Client(token_server.url, token="nope"):
            pass


def _nkey_user() -> tuple[str, Callable[[bytes], bytes]]:
    """A user NKey made with ``cryptography``: its public key (``U...``) and a signer."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    payload = bytes([20 << 3]) + raw  # prefix byte of user keys ('U')
    checksum = binascii.crc_hqx(payload, 0).to_bytes(2, "little")
    public = base64.b32encode(payload + checksum).decode().rstrip("=")
    return public, key.sign


async def test_nkey_auth_through_the_signature_hook(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    public, sign = _nkey_user()
    config = f'authorization {{\n  users = [ {{ nkey: "{public}" }} ]\n}}\n'
    server = await anyio.to_thread.run_sync(start_nats_server, config)
    try:
        async with Client(server.url, nkey=public, signature_cb=sign) as client:
            assert client.server_info.nonce
            await client.flush()
        _, wrong_sign = _nkey_user()
        with pytest.raises(AuthorizationError):
            async with Client(server.url, nkey=public, signature_cb=wrong_sign):
                pass
    finally:
        await anyio.to_thread.run_sync(server.close)


async def test_permission_violation_surfaces(auth_server: NatsServer) -> None:
    errors: list[NatsError] = []
    async with Client(
        auth_server.url, user="limited", password="pw", error_callback=errors.append
    ) as client:
        await client.publish("secret.plans", b"x")
        with pytest.raises(PermissionViolationError, match="Publish") as info:
            await client.flush()
        assert not info.value.fatal
        denied = await client.subscribe("secret.>")
        with pytest.raises(PermissionViolationError, match="Subscription"):
            await denied.next_msg(TIMEOUT)
        # the connection stays open and usable
        async with await client.subscribe("open.x") as sub:
            await client.publish("open.x", b"fine")
            assert (await sub.next_msg(TIMEOUT)).payload == b"fine"
        assert client.reconnects == 0
    assert any(isinstance(error, PermissionViolationError) for error in errors)


# ============================================================================= TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    ca, cert, key = write_certificates(directory)
    server = start_nats_server(f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n')
    yield server, ca
    server.close()


async def test_tls_with_certificate_checks(tls_server: tuple[NatsServer, Path]) -> None:
    server, ca = tls_server
    context = ssl.create_default_context(cafile=str(ca))
    # the server says tls_required in its INFO; the client upgrades after it
    async with Client(server.url, tls=context) as client:
        assert client.server_info.tls_required
        subject = unique("tls.")
        async with await client.subscribe(subject) as sub:
            await client.publish(subject, b"secret")
            assert (await sub.next_msg(TIMEOUT)).payload == b"secret"
    async with Client(f"tls://localhost:{server.port}", tls=context) as client:
        await client.flush()
    # an untrusted certificate is refused
    with pytest.raises(ConnectError, match=r"(?i)certificate verify failed"):
        async with Client(server.url, tls=ssl.create_default_context()):
            pass
    # a name the certificate does not cover is refused
    with pytest.raises(ConnectError, match=r"(?i)certificate"):
        async with Client(server.url, tls=context, tls_hostname="not-this-host"):
            pass
    # no TLS context given: the default (system CAs) is used, and refuses the test CA
    with pytest.raises(ConnectError):
        async with Client(server.url):
            pass


async def test_tls_handshake_first(tmp_path: Path) -> None:
    ca, cert, key = write_certificates(tmp_path)
    config = f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n  handshake_first: true\n}}\n'
    server = await anyio.to_thread.run_sync(start_nats_server, config)
    try:
        context = ssl.create_default_context(cafile=str(ca))
        async with Client(server.url, tls=context, tls_handshake_first=True) as client:
            await client.flush()
            assert client.server_info.tls_required
        # a client waiting for a plain-text INFO gets nothing: a clear timeout
        with pytest.raises(ConnectError, match="timed out"):
            async with Client(server.url, tls=context, connect_timeout=0.3):
                pass
    finally:
        await anyio.to_thread.run_sync(server.close)


async def test_tls_required_by_client_on_plain_server(nats_server: NatsServer) -> None:
    with pytest.raises(ConnectError, match="does not offer TLS"):
        async with Client(f"tls://127.0.0.1:{nats_server.port}"):
            pass


# ============================================================================= reconnect


async def test_reconnect_after_restart_resubscribes(nats_server: NatsServer) -> None:
    server = await anyio.to_thread.run_sync(start_nats_server)
    lost_events: list[NatsError] = []
    try:
        async with Client(
            server.url,
            reconnect_wait=0.02,
            reconnect_max_wait=0.2,
            max_reconnect_attempts=200,
            error_callback=lost_events.append,
        ) as client:
            sub = await client.subscribe("r.x")
            await client.publish("r.x", b"before")
            assert (await sub.next_msg(TIMEOUT)).payload == b"before"

            hang = await client.subscribe("r.hang")  # receives requests, never replies
            failed = anyio.Event()
            errors: list[Exception] = []

            async def stuck_request() -> None:
                try:
                    await client.request("r.hang", b"?", timeout=60)
                except ConnectionLostError as exc:
                    errors.append(exc)
                    failed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(stuck_request)
                await hang.next_msg(TIMEOUT)  # the request reached the server
                await anyio.to_thread.run_sync(server.stop)
                with anyio.fail_after(TIMEOUT):
                    await failed.wait()
            assert "lost" in str(errors[0])
            assert not client.is_connected

            await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(10):
                await client.wait_connected()
            assert client.reconnects == 1
            await client.publish("r.x", b"after")
            assert (await sub.next_msg(TIMEOUT)).payload == b"after"
            reply_sub = await client.subscribe("r.svc")
            await client.flush()
            assert any(isinstance(error, ConnectionLostError) for error in lost_events)
            await reply_sub.unsubscribe()
    finally:
        await anyio.to_thread.run_sync(server.close)


# ============================================================================= fake servers

FAKE_INFO = b'INFO {"server_id":"FAKE","version":"2.12.0","max_payload":1048576,"headers":true}\r\n'

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback listener running ``handler`` for each connection; yields its URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def guarded(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                await handler(stream)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, guarded)
        try:
            yield f"nats://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def read_until(stream: anyio.abc.SocketStream, marker: bytes, buffer: bytearray) -> None:
    while marker not in buffer:
        buffer += await stream.receive()
    del buffer[: buffer.index(marker) + len(marker)]


async def handshake(stream: anyio.abc.SocketStream, buffer: bytearray) -> None:
    await stream.send(FAKE_INFO)
    await read_until(stream, b"PING\r\n", buffer)
    await stream.send(b"PONG\r\n")


async def test_fake_server_closes_mid_message() -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await handshake(stream, buffer)
        await read_until(stream, b"SUB ", buffer)
        await stream.send(b"MSG foo 1 100\r\nonly part of it")
        await stream.aclose()

    async with fake_server(handler) as url, Client(url, reconnect=False) as client:
        sub = await client.subscribe("foo")
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionLostError, match=r"closed|lost"):
            await sub.next_msg()
        with pytest.raises(ConnectionClosedError):
            await client.publish("foo", b"")


async def test_fake_server_sends_garbage() -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await handshake(stream, buffer)
        await stream.send(b"\x00\xffGARBAGE \x13\x37\r\n")
        await anyio.sleep_forever()

    async with fake_server(handler) as url, Client(url, reconnect=False) as client:
        with anyio.fail_after(TIMEOUT):
            await client._done.wait()
        with pytest.raises(ConnectionClosedError) as info:
            await client.publish("x", b"")
        assert isinstance(info.value.__cause__, ProtocolError)
        assert "invalid data" in str(info.value)


async def test_fake_server_garbage_instead_of_info() -> None:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await anyio.sleep_forever()

    async with fake_server(handler) as url:
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="invalid data"):
            async with Client(url):
                pass


async def test_fake_server_err_at_connect_and_later() -> None:
    async def refuse(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await stream.send(FAKE_INFO)
        await read_until(stream, b"PING\r\n", buffer)
        await stream.send(b"-ERR 'Authorization Violation'\r\n")

    async with fake_server(refuse) as url:
        with anyio.fail_after(TIMEOUT), pytest.raises(AuthorizationError):
            async with Client(url):
                pass

    async def later(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await handshake(stream, buffer)
        await read_until(stream, b"PUB ", buffer)
        await stream.send(b"-ERR 'Unknown Protocol Operation'\r\n")
        await anyio.sleep_forever()  # a fatal error closes even if the server does not

    async with fake_server(later) as url, Client(url, reconnect=False) as client:
        await client.publish("x", b"")
        with anyio.fail_after(TIMEOUT):
            await client._done.wait()
        with pytest.raises(ConnectionClosedError, match="Unknown Protocol Operation") as info:
            await client.flush()
        assert isinstance(info.value.__cause__, ServerError)
        assert info.value.__cause__.fatal


async def test_fake_server_never_sends_info() -> None:
    async def silent(stream: anyio.abc.SocketStream) -> None:
        await anyio.sleep_forever()

    async with fake_server(silent) as url:
        start = anyio.current_time()
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="timed out"):
            async with Client(url, connect_timeout=0.3):
                pass
        assert anyio.current_time() - start < 2


async def test_fake_server_keepalive_answered_then_stale() -> None:
    server_ping_answered = anyio.Event()

    async def handler(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await handshake(stream, buffer)
        await stream.send(b"PING\r\n")
        await read_until(stream, b"PONG\r\n", buffer)
        server_ping_answered.set()
        await anyio.sleep_forever()  # never answers the client's keepalive pings

    stale = anyio.Event()
    errors: list[NatsError] = []

    def on_error(error: NatsError) -> None:
        errors.append(error)
        if isinstance(error, StaleConnectionError):
            stale.set()

    async with (
        fake_server(handler) as url,
        Client(
            url,
            ping_interval=0.05,
            max_outstanding_pings=2,
            reconnect=False,
            error_callback=on_error,
        ) as client,
    ):
        with anyio.fail_after(TIMEOUT):
            await server_ping_answered.wait()
            await stale.wait()
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionClosedError):
            await client.wait_connected()


async def test_fake_server_announcing_a_huge_max_payload_is_refused() -> None:
    def info(max_payload: int) -> bytes:
        return (
            b'INFO {"server_id":"FAKE","version":"2.12.0","headers":true,"max_payload":%d}\r\n'
            % max_payload
        )

    async def huge(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await stream.send(info(1 << 40))
        await read_until(stream, b"PING\r\n", buffer)
        await stream.send(b"PONG\r\n")
        await anyio.sleep_forever()

    async with fake_server(huge) as url:
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="max_payload") as exc:
            async with Client(url, reconnect=False):
                pass
        assert str(1 << 40) in str(exc.value)
        assert "max_payload_limit" in str(exc.value)

    async def two_mib(stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        await stream.send(info(2 << 20))
        await read_until(stream, b"PING\r\n", buffer)
        await stream.send(b"PONG\r\n")
        await read_until(stream, b"SUB ", buffer)
        await stream.send(info(1 << 30))  # raised later: the connection is dropped
        await anyio.sleep_forever()

    async with fake_server(two_mib) as url:
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectError, match="max_payload_limit"):
            async with Client(url, reconnect=False, max_payload_limit=1 << 20):
                pass
        async with Client(url, reconnect=False, max_payload_limit=4 << 20) as client:
            assert client.max_payload == 2 << 20
            sub = await client.subscribe("x")
            with anyio.fail_after(TIMEOUT), pytest.raises(ProtocolError, match="max_payload"):
                await sub.next_msg()


async def test_gives_up_reconnecting() -> None:
    accepted = 0

    async def once(stream: anyio.abc.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        if accepted > 1:
            return  # later connections are closed at once, before INFO
        buffer = bytearray()
        await handshake(stream, buffer)
        await read_until(stream, b"SUB ", buffer)

    async with (
        fake_server(once) as url,
        Client(url, reconnect_wait=0.01, max_reconnect_attempts=3) as client,
    ):
        sub = await client.subscribe("x")
        with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionClosedError):
            await sub.next_msg()
        with pytest.raises(ConnectionClosedError, match="gave up reconnecting after 3"):
            await client.publish("x", b"")


# ============================================================================= JetStream


async def work_queue(js: JetStream, *, ack_wait: float = 2.0, **stream: object) -> tuple[str, str]:
    """A fresh work-queue stream with one durable pull consumer; (stream, consumer)."""
    name = unique("S")
    await js.ensure_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], retention="workqueue", **stream)  # type: ignore[arg-type]
    )
    await js.ensure_consumer(
        name,
        ConsumerConfig(
            durable_name="worker", ack_wait=ack_wait, max_deliver=5, filter_subject=f"{name}.q.>"
        ),
    )
    return name, "worker"


async def test_stream_and_consumer_creation_is_idempotent(js: JetStream) -> None:
    name = unique("S")
    config = StreamConfig(name=name, subjects=[f"{name}.>"], retention="workqueue")
    first = await js.ensure_stream(config)
    again = await js.ensure_stream(config)
    assert first.config["subjects"] == again.config["subjects"] == [f"{name}.>"]
    assert (await js.add_stream(config)).name == name  # same config: no error
    changed = StreamConfig(name=name, subjects=[f"{name}.>"], retention="workqueue", max_msgs=10)
    with pytest.raises(JetStreamAPIError) as info:
        await js.add_stream(changed)
    assert info.value.err_code == 10058
    assert (await js.ensure_stream(changed)).config["max_msgs"] == 10

    consumer = ConsumerConfig(
        durable_name="c", ack_wait=3, max_deliver=4, filter_subject=f"{name}.q.>"
    )
    created = await js.ensure_consumer(name, consumer)
    same = await js.ensure_consumer(name, consumer)
    assert created.name == same.name == "c"
    info_ = await js.consumer_info(name, "c")
    assert info_.config["ack_wait"] == 3_000_000_000
    assert info_.config["max_deliver"] == 4
    assert info_.config["filter_subject"] == f"{name}.q.>"

    with pytest.raises(StreamNotFoundError):
        await js.stream_info(unique("missing"))
    with pytest.raises(ConsumerNotFoundError):
        await js.consumer_info(name, "missing")
    with pytest.raises(ConsumerNotFoundError):
        await js.fetch(name, "missing", 1, expires=1)
    with pytest.raises(InvalidInputError):
        await js.ensure_stream(StreamConfig(name="bad.name"))
    await js.delete_stream(name)


async def test_publish_pub_ack_and_msg_id_dedupe(js: JetStream) -> None:
    stream, _ = await work_queue(js)
    first = await js.publish(f"{stream}.q.a", b"job", msg_id="job-1", headers={"K": "v"})
    second = await js.publish(f"{stream}.q.a", b"job", msg_id="job-1")
    third = await js.publish(f"{stream}.q.a", b"job", msg_id="job-2")
    assert (first.stream, first.seq, first.duplicate) == (stream, 1, False)
    assert (second.seq, second.duplicate) == (1, True)
    assert (third.seq, third.duplicate) == (2, False)
    assert (await js.stream_info(stream)).messages == 2
    with pytest.raises(NatsError, match="no stream"):
        await js.publish(unique("unbound."), b"x")


async def test_fetch_batch_expires_and_no_messages(js: JetStream) -> None:
    stream, consumer = await work_queue(js)
    for index in range(5):
        await js.publish(f"{stream}.q.{index}", str(index).encode())
    batch = await js.fetch(stream, consumer, 3, expires=2)
    assert [msg.payload for msg in batch] == [b"0", b"1", b"2"]
    assert [msg.metadata.stream_seq for msg in batch] == [1, 2, 3]
    assert batch[0].metadata.num_delivered == 1
    assert batch[0].metadata.num_pending == 4
    assert batch[0].metadata.stream == stream
    start = anyio.current_time()
    rest = await js.fetch(stream, consumer, 10, expires=0.3, idle_heartbeat=0.1)
    assert [msg.payload for msg in rest] == [b"3", b"4"]
    assert anyio.current_time() - start >= 0.25  # waited for the batch until expiry
    for msg in batch + rest:
        await msg.ack()
    start = anyio.current_time()
    assert await js.fetch(stream, consumer, 10, no_wait=True) == []
    assert anyio.current_time() - start < 1


async def test_fetch_asks_for_no_more_bytes_than_its_buffer_holds(
    nats_server: NatsServer,
) -> None:
    """A batch of large messages is cut by bytes on the server (``max_bytes``), not
    dropped as a slow consumer by the client: the rest comes with the next fetch."""
    async with Client(nats_server.url, max_pending_bytes=100_000) as client:
        js = JetStream(client)
        budget = client.reply_budget()
        assert budget == 2 * client.max_payload  # at least one message always fits
        stream, consumer = await work_queue(js)
        try:
            count, size = 30, 100_000  # 3 MB: over the budget
            for index in range(count):
                await js.publish(f"{stream}.q.{index}", bytes([index]) * size)
            first = await js.fetch(stream, consumer, count, no_wait=True)
            assert 0 < len(first) < count
            assert (len(first) - 1) * size <= budget
            rest = await js.fetch(stream, consumer, count, no_wait=True)
            assert [msg.payload[0] for msg in first + rest] == list(range(count))
            assert all(len(msg.payload) == size for msg in first + rest)
        finally:
            await js.delete_stream(stream)


async def test_ack_removes_from_work_queue(js: JetStream) -> None:
    stream, consumer = await work_queue(js)
    await js.publish(f"{stream}.q.x", b"1")
    await js.publish(f"{stream}.q.x", b"2")
    first, second = await js.fetch(stream, consumer, 2, expires=2)
    await first.ack_sync()
    assert (await js.stream_info(stream)).messages == 1
    await second.ack_sync()
    assert (await js.stream_info(stream)).messages == 0
    assert (await js.consumer_info(stream, consumer)).num_ack_pending == 0


async def test_nak_with_delay_redelivers_not_before(js: JetStream) -> None:
    stream, consumer = await work_queue(js)
    await js.publish(f"{stream}.q.x", b"retry me")
    (msg,) = await js.fetch(stream, consumer, 1, expires=2)
    await msg.nak(delay=0.5)
    naked_at = anyio.current_time()
    (again,) = await js.fetch(stream, consumer, 1, expires=3)
    assert anyio.current_time() - naked_at >= 0.45
    assert again.metadata.num_delivered == 2
    assert again.metadata.stream_seq == msg.metadata.stream_seq
    await again.nak()  # no delay: back at once
    (third,) = await js.fetch(stream, consumer, 1, expires=3)
    assert third.metadata.num_delivered == 3
    await third.ack()


async def test_in_progress_holds_and_term_stops_redelivery(js: JetStream) -> None:
    stream, consumer = await work_queue(js, ack_wait=0.6)
    await js.publish(f"{stream}.q.x", b"long job")
    (msg,) = await js.fetch(stream, consumer, 1, expires=2)
    fetched_at = anyio.current_time()

    redelivered: list[object] = []

    async def try_fetch() -> None:
        redelivered.extend(await js.fetch(stream, consumer, 1, expires=1.2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(try_fetch)
        while anyio.current_time() - fetched_at < 1.3:  # over twice the ack wait
            await msg.in_progress()
            await anyio.sleep(0.15)
    assert redelivered == []  # kept by +WPI past its ack wait

    # without progress reports, it comes back after the ack wait
    (again,) = await js.fetch(stream, consumer, 1, expires=3)
    assert again.metadata.num_delivered == 2
    await again.term("poison")
    assert await js.fetch(stream, consumer, 1, expires=1.0) == []
    assert (await js.consumer_info(stream, consumer)).num_ack_pending == 0


async def test_consume_stream(js: JetStream) -> None:
    stream, consumer = await work_queue(js)
    for index in range(7):
        await js.publish(f"{stream}.q.x", str(index).encode())
    got = []
    with anyio.fail_after(TIMEOUT):
        async with js.consume(stream, consumer, batch=3, expires=2, idle_heartbeat=0.5) as msgs:
            async for msg in msgs:
                got.append(msg.payload)
                await msg.ack()
                if len(got) == 7:
                    break
    assert got == [str(index).encode() for index in range(7)]


async def test_message_schedule(js: JetStream, nc: Client) -> None:
    if nc.server_version < (2, 12, 0):
        with pytest.raises(NotSupportedError, match=r"2\.12"):
            await js.publish_at("a.b", "c.d", b"", at=dt.datetime.now(dt.timezone.utc))
        pytest.skip("nats-server older than 2.12: no message schedules")
    stream, consumer = await work_queue(js, allow_msg_schedules=True)
    at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.8)
    ack = await js.publish_at(f"{stream}.sched.1", f"{stream}.q.due", b"later", at=at)
    assert ack.stream == stream
    (msg,) = await js.fetch(stream, consumer, 1, expires=4)
    assert dt.datetime.now(dt.timezone.utc) >= at
    assert msg.subject == f"{stream}.q.due"
    assert msg.payload == b"later"
    assert msg.headers is not None
    assert msg.headers["Nats-Scheduler"] == f"{stream}.sched.1"
    await msg.ack()


async def test_old_server_refuses_schedules_clearly(js: JetStream, nc: Client) -> None:
    real = nc._info
    assert real is not None
    nc._info = Info({**real.raw, "version": "2.11.4"})
    try:
        with pytest.raises(NotSupportedError, match=r"2\.12.*2\.11\.4"):
            await js.publish_at("a.b", "c.d", b"", at=dt.datetime.now(dt.timezone.utc))
        with pytest.raises(NotSupportedError):
            await js.ensure_stream(StreamConfig(name=unique("S"), allow_msg_schedules=True))
    finally:
        nc._info = real


# ============================================================================= KV


async def test_kv_put_get_create_update_delete_keys(js: JetStream) -> None:
    kv = await js.create_key_value(unique("b"))
    again = await js.create_key_value(kv.bucket)  # idempotent
    assert again.stream == kv.stream
    info = await js.stream_info(kv.stream)
    assert info.config["subjects"] == [f"$KV.{kv.bucket}.>"]
    assert info.config["max_msgs_per_subject"] == 1
    assert info.config["allow_rollup_hdrs"] is True
    assert info.config["allow_direct"] is True

    with pytest.raises(KeyNotFoundError):
        await kv.get("job.1")
    rev1 = await kv.put("job.1", b"queued")
    entry = await kv.get("job.1")
    assert (entry.key, entry.value, entry.revision, entry.operation) == (
        "job.1",
        b"queued",
        rev1,
        "PUT",
    )
    assert abs((dt.datetime.now(dt.timezone.utc) - entry.created).total_seconds()) < 60

    with pytest.raises(KeyExistsError):
        await kv.create("job.1", b"other")
    rev2 = await kv.update("job.1", b"running", rev1)
    assert rev2 > rev1
    with pytest.raises(WrongRevisionError):
        await kv.update("job.1", b"stale writer", rev1)
    assert (await kv.get("job.1")).value == b"running"

    created = await kv.create("job.2", b"new")
    await kv.put("other", b"x")
    assert sorted(await kv.keys()) == ["job.1", "job.2", "other"]
    assert sorted(await kv.keys(filter="job.>")) == ["job.1", "job.2"]

    await kv.delete("job.2")
    with pytest.raises(KeyDeletedError) as deleted:
        await kv.get("job.2")
    assert deleted.value.operation == "DEL"
    assert sorted(await kv.keys()) == ["job.1", "other"]
    recreated = await kv.create("job.2", b"again")  # create works over a delete marker
    assert recreated > created
    with pytest.raises(WrongRevisionError):
        await kv.delete("job.2", last=created)

    await kv.purge("other")
    with pytest.raises(KeyNotFoundError):
        await kv.get("other")
    assert sorted(await kv.keys()) == ["job.1", "job.2"]

    with pytest.raises(InvalidKeyError):
        await kv.put("job:1", b"colon is not in the KV charset")
    with pytest.raises(InvalidInputError):
        await kv.put("k", b"v", ttl=5)  # bucket made without per-key TTL

    empty = await js.create_key_value(unique("e"))
    assert await empty.keys() == []


async def test_kv_per_key_ttl_when_supported(js: JetStream, nc: Client) -> None:
    if nc.server_version < (2, 11, 0):
        with pytest.raises(NotSupportedError):
            await js.create_key_value(unique("t"), per_key_ttl=True)
        pytest.skip("nats-server older than 2.11: no per-message TTL")
    kv = await js.create_key_value(unique("t"), per_key_ttl=True)
    assert kv.per_key_ttl
    revision = await kv.put("short", b"lived", ttl=1)
    assert (await kv.get("short")).revision == revision
    deadline = time.monotonic() + TIMEOUT
    while True:  # the server removes it about a second later
        try:
            await kv.get("short")
        except KeyNotFoundError:
            break
        assert time.monotonic() < deadline, "per-key TTL did not expire the value"
        await anyio.sleep(0.1)


async def test_consume_survives_a_server_restart() -> None:
    server = await anyio.to_thread.run_sync(start_nats_server)
    try:
        lost = anyio.Event()

        def on_error(error: NatsError) -> None:
            if isinstance(error, ConnectionLostError):
                lost.set()

        async with Client(
            server.url, reconnect_wait=0.02, reconnect_max_wait=0.2, error_callback=on_error
        ) as client:
            js = JetStream(client)
            stream, consumer = await work_queue(js)
            received: list[bytes] = []
            got_one, got_two = anyio.Event(), anyio.Event()

            async def work() -> None:
                async with js.consume(stream, consumer, batch=4, expires=2) as msgs:
                    async for msg in msgs:
                        received.append(msg.payload)
                        await msg.ack()
                        (got_one if len(received) == 1 else got_two).set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(work)
                await js.publish(f"{stream}.q.x", b"before")
                with anyio.fail_after(TIMEOUT):
                    await got_one.wait()
                await anyio.to_thread.run_sync(server.restart)  # file store: the stream stays
                with anyio.fail_after(10):
                    await lost.wait()
                    await client.wait_connected()
                    await js.publish(f"{stream}.q.x", b"after")
                    await got_two.wait()
                tg.cancel_scope.cancel()
            assert received == [b"before", b"after"]
    finally:
        await anyio.to_thread.run_sync(server.close)
