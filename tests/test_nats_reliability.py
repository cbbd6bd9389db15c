"""Reliability of the NATS broker and results store with real worker processes.

Every worker is ``python -m tasqueue_anyio.cli worker nats_reliability_app:make_server``
(see ``tests/nats_reliability_app.py``) on the session's ``nats-server``, with an ack wait
of :data:`ACK_WAIT` seconds; the test process enqueues, inspects and runs the second
worker in-process, on the same stream and bucket. Every process a test starts is killed
by its own pid when the test ends.

- a worker ``SIGKILL``-ed mid-job: JetStream delivers the job again after the ack wait and
  it ends on the other worker, attempt 2;
- a zombie: the owner of a job ``SIGSTOP``-ped past the ack wait, another worker ends the
  job, the owner resumes: its late result, state write and ack are refused;
- a kill storm: 3 workers (forked by the fork server of ``tests/worker_fleet.py``: a cold
  interpreter start costs about the 2 s between kills on a busy machine), 2,000 jobs, a worker ``SIGKILL``-ed and
  restarted every 2 s: every job ends successful, its idempotent effect recorded once,
  nothing left in the stream or held by the consumer;
- nats-server ``SIGKILL``-ed mid-load and restarted on the same port and file store (a
  server of the test's own): every acknowledged enqueue completes, the workers reconnect
  within the client's bounded backoff and do not spin while the server is away, and the
  event subscriptions (waits, cancel requests) and the cron scheduler work again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from uuid import uuid4

import anyio
import nats_reliability_app
import pytest
from nats_server import NatsServer, start_nats_server
from worker_fleet import (
    WorkerFleet,
    enqueue_from_processes,
    get_jobs,
    ran_since,
    spawn_worker,
    unwrapped_groups,
    wait_until,
    worker_env,
)

from tasqueue_anyio import BrokerError, Job, Server, Status
from tasqueue_anyio._nats.jetstream import ConsumerNotFoundError, StreamConfig
from tasqueue_anyio._nats.protocol import NatsError
from tasqueue_anyio.brokers.nats import NatsBroker

pytestmark = pytest.mark.anyio

#: The app the worker processes run.
APP = "nats_reliability_app"
QUEUE = nats_reliability_app.QUEUE
#: The ack wait of every worker (seconds).
ACK_WAIT = 1.5
#: The bound of one step (a worker starting, a job ending).
STEP = 30.0


@pytest.fixture
def anyio_backend() -> str:
    """The test side runs on asyncio; the worker processes run on both backends."""
    return "asyncio"


@contextmanager
def worker(url: str, name: str, backend: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker process, killed (by its pid) and reaped when the block ends."""
    env = worker_env(
        {
            "NATS_RELIABILITY_URL": url,
            "NATS_RELIABILITY_NAME": name,
            "NATS_RELIABILITY_ACK_WAIT": repr(ACK_WAIT),
        }
    )
    process = spawn_worker(APP, backend, env, log_path)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


@asynccontextmanager
async def local_server(url: str, name: str) -> AsyncIterator[Server]:
    """The test's own server on the test's stream and bucket (deleted afterwards)."""
    server = nats_reliability_app.make_server(url, name, ACK_WAIT)
    async with server:
        try:
            yield server
        finally:
            with anyio.CancelScope(shield=True):
                broker, results = server.broker, server.results
                await broker.js.delete_stream(broker.stream)  # type: ignore[attr-defined]
                await results.drop()  # type: ignore[attr-defined]


async def wait_status(server: Server, job_id: str, status: Status) -> None:
    with anyio.fail_after(STEP):
        while (await server.get_job(job_id)).status is not status:  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_sigkilled_worker_job_ends_on_another_after_the_ack_wait(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    name = f"rel{uuid4().hex[:10]}"
    async with local_server(nats_server.url, name) as server:
        job_id = await server.enqueue(Job("hold", b"60,0", queue=QUEUE))
        with worker(nats_server.url, name, backend, tmp_path / "worker.log") as process:
            await wait_status(server, job_id, Status.PROCESSING)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        killed_at = time.monotonic()
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            done = await server.wait(job_id, timeout=STEP)
            tg.cancel_scope.cancel()
        assert time.monotonic() - killed_at < ACK_WAIT + 5
        assert done.status is Status.SUCCESSFUL
        assert done.meta.attempt == 2
        assert await server.get_result(job_id) == f"{os.getpid()}:2".encode()
        assert await server.get_pending(QUEUE) == []
        info = await server.broker.js.stream_info(server.broker.stream)  # type: ignore[attr-defined]
        assert info.messages == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_a_unique_job_held_by_a_killed_worker_stays_one_and_frees_its_id(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    """The id of a job whose worker was SIGKILLed mid-run stays taken (an enqueue of it
    adds nothing) until the job came back after the ack wait and ended; then it is free,
    and an enqueue runs it again."""
    name = f"rel{uuid4().hex[:10]}"
    key = "unique:nightly"
    async with local_server(nats_server.url, name) as server:
        stream = server.broker.stream  # type: ignore[attr-defined]
        await server.enqueue(Job("hold", b"60,0", id=key, queue=QUEUE))
        with worker(nats_server.url, name, backend, tmp_path / "worker.log") as process:
            await wait_status(server, key, Status.PROCESSING)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        assert await server.enqueue(Job("hold", b"0", id=key, queue=QUEUE)) == key
        held = await server.get_job(key)  # the dead run's state, not reset to queued
        assert (held.status, held.job.payload) == (Status.PROCESSING, b"60,0")
        info = await server.broker.js.stream_info(stream)  # type: ignore[attr-defined]
        assert info.messages == 1
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)
            done = await server.wait(key, timeout=STEP)
            assert (done.status, done.meta.attempt) == (Status.SUCCESSFUL, 2)
            again = await server.enqueue(Job("hold", b"0", id=key, queue=QUEUE))
            with anyio.fail_after(STEP):
                while (await server.get_job(again)).job.payload != b"0":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            rerun = await server.wait(again, timeout=STEP)
            tg.cancel_scope.cancel()
        assert (rerun.status, rerun.meta.attempt) == (Status.SUCCESSFUL, 1)
        assert await server.get_result(key) == f"{os.getpid()}:1".encode()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_zombie_owner_resumed_after_its_ack_wait_cannot_write(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    name = f"rel{uuid4().hex[:10]}"
    log_path = tmp_path / "zombie.log"
    async with local_server(nats_server.url, name) as server:
        # attempt 1 (the zombie) sleeps 1 s then saves; attempt 2 (here) saves at once
        job_id = await server.enqueue(Job("hold", b"1,0", queue=QUEUE))
        with worker(nats_server.url, name, backend, log_path) as process:
            await wait_status(server, job_id, Status.PROCESSING)
            os.kill(process.pid, signal.SIGSTOP)
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.run)
                    done = await server.wait(job_id, timeout=STEP)
                    tg.cancel_scope.cancel()
            finally:
                os.kill(process.pid, signal.SIGCONT)
            # the zombie resumes: its save, its state write and its ack are refused
            with anyio.fail_after(STEP):
                while "LeaseLostError" not in log_path.read_text(errors="replace"):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            await anyio.sleep(ACK_WAIT)  # time for anything else it might do
            assert process.poll() is None  # it lives on, and takes no harm
        log = log_path.read_text(errors="replace")
        assert f"pid {process.pid}: LeaseLostError" in log
        final = await server.get_job(job_id)
        assert done.status is Status.SUCCESSFUL
        assert (final.status, final.meta.attempt) == (Status.SUCCESSFUL, 2)
        assert await server.get_result(job_id) == f"{os.getpid()}:2".encode()
        info = await server.broker.js.stream_info(server.broker.stream)  # type: ignore[attr-defined]
        assert info.messages == 0


# -- fleets of worker processes (the kill storm, the server restart) ---------------------------

#: The bound of one whole fleet test (seconds); each aims at well under 30.
TEST_TIMEOUT = 80.0


class Fleet(WorkerFleet):
    """One test's stream, bucket and effects stream (a name of its own) and its workers of
    ``nats_reliability_app`` (see :class:`WorkerFleet`), each with an ack wait of
    :data:`ACK_WAIT` seconds."""

    def __init__(
        self,
        url: str,
        directory: Path,
        *,
        concurrency: int = 4,
        forked: bool = False,
        limits: str = "",
    ) -> None:
        self.url = url
        self.name = f"rel{uuid4().hex[:10]}"
        self.effects = nats_reliability_app.Effects(self.name)
        env = worker_env(
            {
                "NATS_RELIABILITY_URL": url,
                "NATS_RELIABILITY_NAME": self.name,
                "NATS_RELIABILITY_ACK_WAIT": repr(ACK_WAIT),
                "NATS_RELIABILITY_CONCURRENCY": str(concurrency),
                "NATS_RELIABILITY_LIMITS": limits,
            }
        )
        super().__init__(APP, directory, env, forked=forked, step=STEP)

    async def wait_consuming(self, server: Server, count: int) -> None:
        """Wait until ``count`` workers consume the queue: each keeps a pull request
        waiting on the queue's consumer while the queue is empty."""
        broker = nats_broker(server)

        async def consuming() -> bool:
            try:
                info = await broker.js.consumer_info(broker.stream, QUEUE)
            except ConsumerNotFoundError:
                return False
            return info.num_waiting >= count

        await wait_until(consuming, f"{count} workers consuming", self)

    async def queue_state(self, server: Server) -> dict[str, int]:
        """Messages in the broker's stream; messages of the queue's consumer not yet
        delivered, and delivered but not acknowledged."""
        broker = nats_broker(server)
        stream = await broker.js.stream_info(broker.stream)
        consumer = await broker.js.consumer_info(broker.stream, QUEUE)
        return {
            "messages": stream.messages,
            "num_pending": consumer.num_pending,
            "num_ack_pending": consumer.num_ack_pending,
        }

    async def wait_drained(self, server: Server) -> None:
        """Wait until every message of the stream was acknowledged: none left in the
        stream, none pending or held on the consumer (a crashed worker's come back after
        the ack wait and are acked by the next delivery)."""

        async def drained() -> bool:
            return not any((await self.queue_state(server)).values())

        await wait_until(drained, "the queue to drain", self, timeout=ACK_WAIT * 4 + 10)


def nats_broker(server: Server) -> NatsBroker:
    broker = server.broker
    assert isinstance(broker, NatsBroker)
    return broker


@asynccontextmanager
async def opened(f: Fleet) -> AsyncIterator[Server]:
    """The test side's server on the fleet's stream and bucket, with the effects stream
    created; on exit the fleet's workers are killed (so none creates the stream again),
    then all three are deleted."""
    server = nats_reliability_app.make_server(f.url, f.name, ACK_WAIT)
    with unwrapped_groups():
        async with server:
            broker = nats_broker(server)
            await broker.js.ensure_stream(
                StreamConfig(
                    name=f.effects.stream, subjects=[f"{f.effects.stream}.>"], allow_direct=True
                )
            )
            try:
                yield server
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(20):
                    await anyio.to_thread.run_sync(f.close)
                    for stream in (broker.stream, f.effects.stream):
                        with contextlib.suppress(NatsError):
                            await broker.js.delete_stream(stream)
                    with contextlib.suppress(NatsError, BrokerError):
                        await server.results.drop()  # type: ignore[attr-defined]


async def traces(server: Server, subjects: str, f: Fleet) -> dict[str, int]:
    """How many messages the effects stream holds per job id, on ``subjects``."""
    broker = nats_broker(server)
    info = await broker.js.stream_info(f.effects.stream, subjects_filter=subjects)
    return {f.effects.job_id(subject): count for subject, count in info.subjects.items()}


#: The kill storm: jobs, the seconds each sleeps, processors per worker, seconds between kills.
STORM_JOBS = 2000
STORM_JOB_SECONDS = b"0.05"
STORM_CONCURRENCY = 8
STORM_KILL_EVERY = 2.0


async def test_kill_storm_every_job_completes_with_its_effect_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    backends = ["asyncio", "trio", "asyncio"]
    with (
        anyio.fail_after(TEST_TIMEOUT),
        Fleet(nats_server.url, tmp_path, concurrency=STORM_CONCURRENCY, forked=True) as f,
    ):
        workers = [await f.start(backend) for backend in backends]
        async with opened(f) as server:
            await f.wait_consuming(server, len(workers))
            jobs = [Job("effect", STORM_JOB_SECONDS, queue=QUEUE) for _ in range(STORM_JOBS)]
            began = time.monotonic()
            ids = await server.enqueue_many(jobs)
            kills = 0
            next_kill = began + STORM_KILL_EVERY
            next_count = began
            while True:
                now = time.monotonic()
                if now >= next_count:
                    if len(await server.get_success()) >= STORM_JOBS:
                        break
                    next_count = time.monotonic() + 0.25
                if now >= next_kill:
                    slot = kills % len(workers)
                    workers[slot] = await f.restart(workers[slot])
                    kills += 1
                    next_kill += STORM_KILL_EVERY
                if now - began > TEST_TIMEOUT - 15:
                    pytest.fail(
                        f"{len(await server.get_success())} of {STORM_JOBS} jobs ended "
                        f"after {kills} kills\n{f.logs()}"
                    )
                await anyio.sleep(0.05)
            all_done = time.monotonic() - began
            await f.wait_drained(server)
            drained = time.monotonic() - began

            # every job in a final state: successful
            assert sorted(await server.get_success()) == sorted(ids)
            assert await server.get_failed() == []
            states = await get_jobs(server, ids)
            assert {msg.status for msg in states.values()} == {Status.SUCCESSFUL}
            redelivered = sum(1 for msg in states.values() if msg.meta.attempt > 1)
            redeliveries = sum(msg.meta.attempt - 1 for msg in states.values())
            # each effect once per job id, however many times the job ran
            effects = await traces(server, f.effects.effects, f)
            assert set(effects) == set(ids)
            assert set(effects.values()) == {1}
            executions = await traces(server, f.effects.executions, f)
            assert set(executions) == set(ids)
            executed = sum(executions.values())
            assert executed >= STORM_JOBS
            # nothing left in the stream, pending or held on the consumer
            assert await f.queue_state(server) == {
                "messages": 0,
                "num_pending": 0,
                "num_ack_pending": 0,
            }
            assert await server.get_pending(QUEUE) == []
            # the storm did rage, and the workers not killed last are still up
            assert kills >= 2, f"only {kills} kills: the jobs ended too soon"
            assert all(w.alive for w in workers), f.logs()
            print(
                f"\nNATS kill storm: {STORM_JOBS} jobs of {STORM_JOB_SECONDS.decode()}s on "
                f"{len(workers)} workers x {STORM_CONCURRENCY}, {kills} SIGKILLs (every "
                f"{STORM_KILL_EVERY:g}s): {executed} executions reached the effect, "
                f"{len(effects)} effects recorded ({executed - STORM_JOBS} duplicate "
                f"executions by redelivery), {redeliveries} redeliveries of {redelivered} "
                f"jobs; all successful after {all_done:.1f}s, stream drained after "
                f"{drained:.1f}s"
            )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_a_run_paused_past_its_ack_wait_that_fails_still_retries(
    nats_server: NatsServer, tmp_path: Path, backend: str
) -> None:
    """Issue 11, hole 11: the only worker is stopped past its ack wait while the first
    try of a job runs. It resumes, its run fails: its ``retrying`` write succeeds (no
    other run took the job), the ack that carries the retry is refused (lease lost), and
    JetStream delivers the message again to that worker: it must enqueue the retry,
    which runs."""
    with anyio.fail_after(TEST_TIMEOUT), Fleet(nats_server.url, tmp_path, concurrency=1) as f:
        async with opened(f) as server:
            owner = await f.start(backend)
            await f.wait_consuming(server, 1)
            # the first try sleeps 3 s (it is stopped meanwhile), then fails
            job_id = await server.enqueue(Job("flaky", b"3", queue=QUEUE, max_retries=1))
            await wait_status(server, job_id, Status.PROCESSING)
            owner.send(signal.SIGSTOP)
            try:
                await anyio.sleep(ACK_WAIT * 2)  # the pause: past the ack wait
                assert owner.state() == "T"
            finally:
                owner.send(signal.SIGCONT)

            msg = await server.wait(job_id, timeout=STEP)
            assert msg.status is Status.SUCCESSFUL, f.logs()
            assert msg.meta.retried == 1
            # the failed run's ack (carrying the retry) was refused: the hole was reached
            assert "lost its lease" in owner.log
            assert await traces(server, f.effects.effects, f) == {job_id: 1}
            await f.wait_drained(server)
            assert owner.alive, owner.log


#: The server restart: jobs enqueued at first, the seconds each sleeps, the outage.
RESTART_JOBS = 200
RESTART_JOB_SECONDS = b"0.05"
OUTAGE = 3.0
#: Concurrent producers enqueueing through the outage.
PRODUCERS = 3
#: The client's longest backoff between reconnect attempts (``Client.reconnect_max_wait``).
RECONNECT_MAX_WAIT = 4.0
#: The id of the restart test's cron schedule.
CRON = "every-second"


async def test_nats_server_killed_and_restarted_mid_load_loses_no_acknowledged_job(
    tmp_path: Path,
) -> None:
    nats = start_nats_server(directory=tmp_path / "nats")
    try:
        with anyio.fail_after(TEST_TIMEOUT), Fleet(nats.url, tmp_path) as f:
            workers = [await f.start("asyncio"), await f.start("trio")]
            async with opened(f) as server:
                broker = nats_broker(server)
                # the queue's stream and the results bucket are on disk
                for stream in (broker.stream, f"KV_{f.name}"):
                    info = await broker.js.stream_info(stream)
                    assert info.config["storage"] == "file", stream
                await f.wait_consuming(server, len(workers))
                # a cron schedule firing every second: the workers' schedulers make
                # passes while the server is away too
                await server.enqueue(Job("nap", b"0", queue=QUEUE, schedule="* * * * * *", id=CRON))

                acknowledged: list[str] = [
                    *await server.enqueue_many(
                        [Job("nap", RESTART_JOB_SECONDS, queue=QUEUE) for _ in range(RESTART_JOBS)]
                    )
                ]
                refused = 0
                tried_while_down = 0
                producing = True
                down = False

                async def produce() -> None:
                    """One enqueue every 50 ms, through the outage: the ones that
                    returned are acknowledged. (The client queues what is published
                    while the server is away and sends it once reconnected: an enqueue
                    begun in the outage is acknowledged if the reply comes within the
                    backend's timeout, refused otherwise.)"""
                    nonlocal refused, tried_while_down
                    while producing:
                        job = Job("nap", RESTART_JOB_SECONDS, queue=QUEUE)
                        if down:
                            tried_while_down += 1
                        try:
                            await server.enqueue(job)
                        except BrokerError:
                            refused += 1
                        else:
                            acknowledged.append(job.id)
                        await anyio.sleep(0.05)

                async def succeeded() -> int:
                    try:
                        return len(await server.get_success())
                    except BrokerError:  # the test's own client reconnects
                        return 0

                async def some_done() -> bool:
                    return await succeeded() >= 20

                async with anyio.create_task_group() as tg:
                    for _ in range(PRODUCERS):
                        tg.start_soon(produce)
                    await wait_until(some_done, "the first jobs to end", f)
                    done_before = await succeeded()
                    # of the acknowledged jobs (the cron runs are listed too): how many
                    # were done when the server went away
                    acked_before = set(acknowledged)
                    acked_done_before = len(acked_before & set(await server.get_success()))
                    cpu_before = [w.cpu_seconds() for w in workers]
                    log_before = [len(w.log) for w in workers]
                    down_at = time.monotonic()
                    nats.kill()
                    down = True
                    await anyio.sleep(OUTAGE)
                    outage = time.monotonic() - down_at
                    cpu = [
                        w.cpu_seconds() - before
                        for w, before in zip(workers, cpu_before, strict=True)
                    ]
                    await anyio.to_thread.run_sync(nats.start)
                    down = False
                    up_at = time.monotonic()
                    up_wall = time.time()

                    async def progressing() -> bool:
                        return await succeeded() > done_before

                    await wait_until(progressing, "the workers to reconnect", f, interval=0.02)
                    reconnected_after = time.monotonic() - up_at
                    await anyio.sleep(0.5)
                    producing = False

                assert acked_done_before < len(acked_before)  # killed mid-processing
                assert tried_while_down > 0  # enqueues were begun while the server was down

                acked = set(acknowledged)

                async def all_acknowledged_done() -> bool:
                    return acked <= set(await server.get_success())

                await wait_until(all_acknowledged_done, "every acknowledged job", f, timeout=30)
                states = await get_jobs(server, acknowledged)
                assert {msg.status for msg in states.values()} == {Status.SUCCESSFUL}

                # both clients of each worker (broker, results) lost the server and
                # reconnected, once (the client logs both; one worker may end every job
                # while a client of the other still waits out its backoff)
                def counts(line: str) -> list[int]:
                    return [
                        w.log[start:].count(line)
                        for w, start in zip(workers, log_before, strict=True)
                    ]

                async def all_reconnected() -> bool:
                    return min(counts("NATS reconnected")) >= 2

                await wait_until(all_reconnected, "every worker's clients to reconnect", f)
                assert counts("NATS connection lost") == [2] * len(workers), f.logs()
                assert counts("NATS reconnected") == [2] * len(workers), f.logs()

                # the event subscriptions came back: this process's (a wait is woken by
                # the job's end event only) and the workers' (a cancel request)
                assert broker.client.is_connected
                await broker.client.flush()
                job_id = await server.enqueue(Job("nap", b"0", queue=QUEUE))
                assert (await server.wait(job_id, timeout=STEP)).status is Status.SUCCESSFUL
                held = await server.enqueue(Job("hold", b"60", queue=QUEUE))
                await wait_status(server, held, Status.PROCESSING)
                await server.cancel(held)
                assert (await server.wait(held, timeout=STEP)).status is Status.CANCELLED

                # the schedule fires again after the restart
                cron_ran_again = partial(ran_since, server, CRON, up_wall)
                await wait_until(cron_ran_again, "a cron run after the restart", f)
                assert await server.remove_schedule(CRON)
                await f.wait_drained(server)

                # the workers survived the outage, reconnected within the client's
                # bounded backoff, and idled (no busy loop) while the server was away
                assert all(w.alive for w in workers), f.logs()
                assert reconnected_after <= RECONNECT_MAX_WAIT + ACK_WAIT + 3, f.logs()
                for worker, used in zip(workers, cpu, strict=True):
                    assert used < 0.5 * outage, f"{worker!r} used {used:.2f}s CPU in {outage:.1f}s"
                print(
                    f"\nnats-server restart: {len(acknowledged)} acknowledged enqueues all "
                    f"successful ({tried_while_down} begun while the server was down, "
                    f"{refused} refused); outage {outage:.1f}s, "
                    f"worker CPU during it {', '.join(f'{c:.2f}s' for c in cpu)}; jobs ending "
                    f"again {reconnected_after:.1f}s after the restart"
                )
    finally:
        nats.stop()  # its store and log stay in tmp_path


async def test_queue_limits_hold_over_three_worker_processes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """3 worker processes (asyncio, Trio, asyncio; 4 processors each) share the queue's
    limits: at most 10 starts per second and 3 jobs running at once. 30 jobs of 0.2 s
    each run once, never more than 3 at once (by the order of their stamps in a stream)
    and never more than 10 starting in a second (by the server's times)."""
    jobs = 30
    with anyio.fail_after(TEST_TIMEOUT), Fleet(nats_server.url, tmp_path, limits="10,1,3") as f:
        for backend in ("asyncio", "trio", "asyncio"):
            await f.start(backend)
        async with opened(f) as server:
            await f.wait_consuming(server, 3)
            handles = await server.enqueue_many(
                [Job("stamp", b"0.2", queue=QUEUE) for _ in range(jobs)]
            )
            for handle in handles:
                done = await server.wait(handle, timeout=STEP)
                assert (done.status, done.meta.retried) == (Status.SUCCESSFUL, 0), f.logs()
            stamps = await nats_broker(server).read_range(f.effects.stream, f.effects.stamps)
            now, most, starts = 0, 0, []
            for stamp in stamps:  # in the stream's order
                if stamp.payload == b"in":
                    now += 1
                    most = max(most, now)
                    starts.append(stamp.time.timestamp())
                else:
                    now -= 1
            assert len(starts) == jobs  # each ran once
            assert most == 3, f.logs()
            for i in range(len(starts) - 10):
                assert starts[i + 10] - starts[i] >= 1.0 - 0.05, starts
            assert starts[-1] - starts[0] >= 2.0 - 0.1
            await f.wait_drained(server)


async def test_several_processes_enqueueing_the_same_ids_make_one_job_each(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """4 processes enqueue the same 200 ids, each in its own order, while 2 workers run
    them: every id runs once (a job queued, running, or ended within its unique_for
    holds its id)."""
    count = 200
    with anyio.fail_after(TEST_TIMEOUT), Fleet(nats_server.url, tmp_path) as f:
        await f.start("asyncio")
        await f.start("trio")
        async with opened(f) as server:
            await f.wait_consuming(server, 2)
            await enqueue_from_processes("nats_reliability_app", f.url, f.name, count, 4)
            for n in range(count):
                assert (await server.wait(f"same-{n}", timeout=STEP)).status is Status.SUCCESSFUL
            await f.wait_drained(server)
            assert await traces(server, f.effects.executions, f) == {
                f"same-{n}": 1 for n in range(count)
            }
