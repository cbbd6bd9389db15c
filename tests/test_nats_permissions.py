"""The NATS backends as users with subject permissions (S3).

One ``nats-server -js`` of this module's own, with users (``authorization { users }``):

- ``app`` may use exactly the subjects docs/nats.md lists for a broker of prefix
  :data:`PREFIX` and a results store of bucket :data:`BUCKET`: a job runs end to end;
- the others each miss one part of them: the project's own subjects, the JetStream API,
  the reply inboxes, the event subjects. Opening a backend as one of them fails at once,
  once, with a :class:`BrokerError` naming the refused subject: not a hang, not a retry,
  not a request timeout (the backends' timeout is far longer than the test allows).
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from nats_server import NatsServer, start_nats_server
from server_support import TIMEOUT, running

from tasqueue_anyio import BrokerError, Job, JobContext, Server, Status
from tasqueue_anyio.brokers.nats import NatsBroker
from tasqueue_anyio.results.nats import NatsResults

pytestmark = pytest.mark.anyio

PREFIX = "perm"
BUCKET = "permjobs"
#: The backends' request timeout: an error that came from a timeout could not come in
#: the test's bound.
LONG = 60.0

#: What a user of a broker of prefix P and a results store of bucket B may use (the
#: list of docs/nats.md).
APP_PERMISSIONS = f"""{{
        publish: {{allow: ["{PREFIX}.>", "$JS.API.>", "$JS.ACK.{PREFIX}.>", "$KV.{BUCKET}.>"]}}
        subscribe: {{allow: ["_INBOX.>", "{PREFIX}.e.>"]}}
    }}"""

CONFIG = f"""
authorization {{
  users = [
    {{user: "app", password: "pw", permissions: {APP_PERMISSIONS}}}
    {{user: "outsider", password: "pw", permissions: {{
        publish: {{deny: ["{PREFIX}.>", "$KV.{BUCKET}.>"]}}
        subscribe: {{deny: ["{PREFIX}.>", "$KV.{BUCKET}.>"]}}
    }}}}
    {{user: "no-api", password: "pw", permissions: {{publish: {{deny: ["$JS.API.>"]}}}}}}
    {{user: "no-inbox", password: "pw", permissions: {{subscribe: {{deny: ["_INBOX.>"]}}}}}}
    {{user: "no-events", password: "pw", permissions: {{subscribe: {{deny: ["{PREFIX}.e.>"]}}}}}}
  ]
}}
"""


@pytest.fixture(scope="module")
def users_server() -> Iterator[NatsServer]:
    server = start_nats_server(CONFIG)
    yield server
    server.close()


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:pw@127.0.0.1:{server.port}"


async def test_a_job_runs_as_a_user_allowed_only_the_listed_subjects(
    users_server: NatsServer,
) -> None:
    where = url(users_server, "app")
    worker = Server(
        broker=NatsBroker(where, prefix=PREFIX, ack_wait=5),
        results=NatsResults(where, prefix=BUCKET),
    )

    @worker.task("double", raw=True)
    async def double(payload: bytes, ctx: JobContext) -> None:
        await ctx.save(payload * 2)

    with anyio.fail_after(TIMEOUT * 2):
        async with worker:
            try:
                async with running(worker):
                    job_id = await worker.enqueue(Job("double", b"ab"))
                    done = await worker.wait(job_id)
                    assert done.status is Status.SUCCESSFUL
                    assert await worker.get_result(job_id) == b"abab"
                    broker = worker.broker
                    assert isinstance(broker, NatsBroker)
                    # acked (an ack refused for permission would leave it in the stream)
                    with anyio.fail_after(TIMEOUT):
                        while (await broker.js.stream_info(broker.stream)).messages:  # noqa: ASYNC110
                            await anyio.sleep(0.01)
            finally:
                with anyio.CancelScope(shield=True):
                    await worker.broker.js.delete_stream(PREFIX)  # type: ignore[attr-defined]
                    await worker.results.drop()  # type: ignore[attr-defined]


#: user -> the subject the broker's and the results store's error names (None: that
#: backend opens, the user is refused nothing it needs)
REFUSED: dict[str, tuple[str | None, str | None]] = {
    "outsider": (f'"{PREFIX}.q._probe"', f'"$KV.{BUCKET}._probe"'),
    "no-api": (f'"$JS.API.STREAM.CREATE.{PREFIX}"', f'"$JS.API.STREAM.CREATE.KV_{BUCKET}"'),
    "no-inbox": ('"_INBOX.', '"_INBOX.'),
    "no-events": (f'"{PREFIX}.e._probe"', None),
}


@pytest.mark.parametrize("backend", ["broker", "results"])
@pytest.mark.parametrize("user", sorted(REFUSED))
async def test_a_user_refused_a_subject_fails_to_open_at_once_naming_it(
    users_server: NatsServer, user: str, backend: str
) -> None:
    subject = REFUSED[user][0 if backend == "broker" else 1]
    where = url(users_server, user)
    opened = (
        NatsBroker(where, prefix=PREFIX, timeout=LONG)
        if backend == "broker"
        else NatsResults(where, prefix=BUCKET, timeout=LONG)
    )
    with anyio.fail_after(TIMEOUT):
        if subject is None:
            async with opened:
                pass
            return
        with pytest.raises(BrokerError, match="Permissions Violation") as info:
            async with opened:
                pass
    assert subject in str(info.value)
    assert f"opening the NATS {'broker' if backend == 'broker' else 'results store'}" in str(
        info.value
    )
    assert not opened.is_open
