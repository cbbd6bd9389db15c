"""Client.purge (waiting jobs removed and recorded cancelled) and
Client.replay_dead_letters (dead letters that decode now run), on every backend and both
AnyIO backends; and the CLI's purge and replay."""

from __future__ import annotations

import pytest
from broker_support import consuming, receive
from server_support import TIMEOUT, running

from tasqueue_anyio import Group, Server, Status
from tasqueue_anyio.abc import Broker, Envelope, JobRecord, Results

pytestmark = pytest.mark.anyio


async def test_purge_cancels_the_waiting_jobs(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    ran: list[int] = []

    @server.task(queue=queue_name)
    async def work(x: int) -> int:
        ran.append(x)
        return x

    async with server:
        due = [await work.enqueue(i) for i in range(3)]
        later = await work.options(delay=3600).enqueue(9)
        group = await server.enqueue_group(Group([work.job(7)]))
        assert await server.purge(queue_name) == 5
        for job in [*due, later, *group.jobs]:
            assert await job.status() is Status.CANCELLED
        assert (await group.wait(timeout=TIMEOUT)).status is Status.CANCELLED
        assert (await server.counts(queue_name)).empty
        after = await work.enqueue(100)
        async with running(server):
            assert await after.result(timeout=TIMEOUT) == 100
    assert ran == [100]


async def test_replay_puts_back_the_dead_letters_that_decode(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)

    @server.task(queue=queue_name)
    async def work(x: int) -> int:
        return x * 2

    async with server:
        # as an older worker that could not read them left them: two messages that
        # decode now (their jobs recorded failed), one that never will
        fixed = [work.job(i) for i in (1, 2)]
        prepared = [server._new_message(job) for job in fixed]
        await results.set_jobs(
            {m.id: JobRecord(status=Status.FAILED.value, data=d) for m, d in prepared}
        )
        await broker.enqueue_many(
            [
                *(Envelope(queue=queue_name, data=d, id=f"{m.id}/0") for m, d in prepared),
                Envelope(queue=queue_name, data=b"garbage", id="garbage"),
            ]
        )
        async with consuming(broker, queue_name) as stream:
            for _ in range(3):
                await (await receive(stream)).dead_letter("could not decode then")
        letters = await server.get_dead_letters(queue_name)
        assert len(letters) == 3
        replayed = await server.replay_dead_letters(queue_name, [letters[0].id, letters[2].id])
        assert replayed == [fixed[0].id]
        replayed += await server.replay_dead_letters(queue_name)  # the rest that decodes
        assert replayed == [fixed[0].id, fixed[1].id]
        assert [d.data for d in await server.get_dead_letters(queue_name)] == [b"garbage"]
        async with running(server):
            assert [await job.result(timeout=TIMEOUT) for job in replayed] == [2, 4]
        assert await server.replay_dead_letters(queue_name) == []  # nothing more decodes
