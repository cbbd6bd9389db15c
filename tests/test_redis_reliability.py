"""Reliability of the Redis broker and results store, with real worker processes (issue 4).

Every worker is ``python -m tasqueue_anyio.cli worker reliability_app:make_server`` (see
``tests/reliability_app.py``), or, in the kill storm, the same entry point forked by the
fork server of ``tests/worker_fleet.py`` (a cold interpreter start costs more than the 2 s
between kills on a busy machine), on loopback only, with a lease of :data:`LEASE` seconds given through its
environment; the test process enqueues and inspects with a
:class:`Server` of its own on the same store, and reads the keys the tasks and the
backends leave in Redis (the layouts documented in ``brokers/redis.py`` and
``results/redis.py``). Every process a test starts is killed by its own pid when the test
ends, whatever happens, and every test is bounded by :data:`TEST_TIMEOUT`.

- a worker ``SIGKILL``-ed mid-job: the job ends on another worker after the lease, attempt 2;
- a kill storm: 3 workers, 2,000 jobs, a worker killed and restarted every 2 s: every job
  ends successful, its idempotent effect recorded once, no message left held;
- a zombie: the owner of a job ``SIGSTOP``-ped past its lease, another worker ends the job,
  the owner resumes: its late result, state write and ack are refused;
- Redis killed (``SIGKILL``) mid-load and restarted from its append-only file: every
  acknowledged enqueue completes, the workers reconnect with a bounded backoff and do not
  spin while Redis is away;
- poison messages pushed straight into a queue's keys: dead-lettered, the queue flows on.
"""

from __future__ import annotations

import gc
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from uuid import uuid4

import anyio
import coredis
import msgpack
import pytest
import reliability_app
from redis_server import RedisServer, restart_redis_server, start_redis_server
from worker_fleet import (
    WorkerFleet,
    WorkerProcess,
    enqueue_from_processes,
    get_jobs,
    ran_since,
    unwrapped_groups,
    wait_until,
    worker_env,
)

from tasqueue_anyio import BrokerError, Job, Server, Status
from tasqueue_anyio._client import EVENTS_CHANNEL
from tasqueue_anyio.brokers.redis import RedisBroker

pytestmark = pytest.mark.anyio

#: The app the worker processes run.
APP = "reliability_app"
QUEUE = reliability_app.QUEUE
#: The lease of every worker process (seconds).
LEASE = 1.5
#: The bound of one whole test (seconds); each aims at well under 20.
TEST_TIMEOUT = 75.0
#: The bound of one step (a worker starting, a job ending).
STEP = 20.0


@pytest.fixture
def anyio_backend() -> str:
    """The test side runs on asyncio; the worker processes run on both backends."""
    return "asyncio"


# -- the fleet of worker processes (tests/worker_fleet.py) ---------------------------------


class Fleet(WorkerFleet):
    """One test's store (a Redis URL and a key prefix of its own) and its workers of
    ``reliability_app``, each with a lease of :data:`LEASE` seconds."""

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
        self.prefix = f"rel{uuid4().hex[:10]}"
        self.keys = reliability_app.Keys(self.prefix)
        env = worker_env(
            {
                "RELIABILITY_REDIS_URL": url,
                "RELIABILITY_PREFIX": self.prefix,
                "RELIABILITY_LEASE": repr(LEASE),
                "RELIABILITY_CONCURRENCY": str(concurrency),
                "RELIABILITY_LIMITS": limits,
            }
        )
        super().__init__(APP, directory, env, forked=forked, step=STEP)

    def server(self) -> Server:
        """A server on this fleet's store (it runs nothing: open it with ``async with``)."""
        return reliability_app.make_server(self.url, self.prefix, LEASE)

    def queue_key(self, suffix: str) -> bytes:
        """A key of :data:`QUEUE` in the broker's layout (``P:{q:Q}:SUFFIX``)."""
        return f"{self.prefix}:{{q:{QUEUE}}}:{suffix}".encode()

    def success_key(self) -> bytes:
        """The results store's listing of successful jobs (``P:{l}:success``)."""
        return f"{self.prefix}:{{l}}:success".encode()

    async def wait_consuming(self, client: coredis.Redis[bytes], count: int) -> None:
        """Wait until ``count`` workers consume the queue: each broker subscribes to the
        queue's notification channel before its first fetch."""
        channel = self.queue_key("notify")

        async def consuming() -> bool:
            subscribers = await client.pubsub_numsub(channel)
            return subscribers.get(channel, 0) >= count

        await wait_until(consuming, f"{count} workers consuming", self)

    async def queue_state(self, client: coredis.Redis[bytes]) -> dict[str, int]:
        """How many messages the queue's keys hold: due, stored, leased, held, scheduled."""
        return {
            "ready": await client.llen(self.queue_key("ready")),
            "msg": await client.hlen(self.queue_key("msg")),
            "lease": await client.zcard(self.queue_key("lease")),
            "held": await client.hlen(self.queue_key("held")),
            "sched": await client.zcard(self.queue_key("sched")),
        }

    async def wait_drained(self, client: coredis.Redis[bytes]) -> None:
        """Wait until every message of the queue was acked (or dead-lettered): no message
        stored, due, scheduled, leased or held (a crashed worker's come back after the
        lease and are acked by the next delivery)."""

        async def drained() -> bool:
            return not any((await self.queue_state(client)).values())

        await wait_until(drained, "the queue to drain", self, timeout=LEASE * 4 + 10)


@asynccontextmanager
async def opened(f: Fleet) -> AsyncIterator[tuple[Server, coredis.Redis[bytes]]]:
    """The test side's server on the fleet's store, and its broker's Redis client."""
    with unwrapped_groups():
        async with f.server() as server:
            broker = server.broker
            assert isinstance(broker, RedisBroker)
            assert isinstance(broker.client, coredis.Redis)
            yield server, broker.client


async def started_runs(client: coredis.Redis[bytes], f: Fleet, job_id: str) -> list[str]:
    """The ``"<pid>:<attempt>"`` of every run of ``hold`` that started on ``job_id``."""
    return [item.decode() for item in await client.lrange(f.keys.started(job_id), 0, -1)]


async def first_run(client: coredis.Redis[bytes], f: Fleet, job_id: str) -> WorkerProcess:
    """Wait until a worker starts ``job_id``; that worker."""

    async def started() -> bool:
        return bool(await started_runs(client, f, job_id))

    await wait_until(started, f"job {job_id} to start", f)
    pid, attempt = (await started_runs(client, f, job_id))[0].split(":")
    assert attempt == "1"
    (owner,) = [w for w in f.workers if w.pid == int(pid)]
    return owner


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")


# -- the tests ------------------------------------------------------------------------------


async def test_sigkilled_worker_job_completes_on_another_after_the_lease(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path) as f:
        await f.start("asyncio")
        await f.start("trio")
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 2)
            # 30 s on the first run (killed long before), 0.05 s on the next
            job_id = await server.enqueue(Job("hold", b"30,0.05", queue=QUEUE))
            owner = await first_run(client, f, job_id)
            (other,) = [w for w in f.workers if w is not owner]
            killed_at = time.monotonic()
            owner.kill()

            msg = await server.wait(job_id, timeout=STEP)
            came_back_after = time.monotonic() - killed_at
            assert msg.status is Status.SUCCESSFUL, f.logs()
            assert msg.meta.attempt == 2
            assert await started_runs(client, f, job_id) == [f"{owner.pid}:1", f"{other.pid}:2"]
            assert await server.get_result(job_id) == str(other.pid).encode()
            # it came back through the lease (renewed every LEASE / 3 until the kill)
            assert LEASE * 2 / 3 - 0.2 <= came_back_after <= LEASE + STEP
            assert await server.get_success() == [job_id]
            await f.wait_drained(client)
            assert other.alive, other.log


async def test_a_unique_job_held_by_a_killed_worker_stays_one_and_frees_its_id(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The id of a job whose worker was SIGKILLed mid-run stays taken (an enqueue of it
    adds nothing) until the job came back through the lease and ended on another
    worker; then it is free, and an enqueue runs it again."""
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path) as f:
        await f.start("asyncio")
        await f.start("trio")
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 2)
            key = "unique:nightly"
            job_id = await server.enqueue(Job("hold", b"30,0.05", id=key, queue=QUEUE))
            owner = await first_run(client, f, job_id)
            (other,) = [w for w in f.workers if w is not owner]
            owner.kill()
            # the dead worker's job holds its id: nothing new is stored
            assert await server.enqueue(Job("hold", b"0.05", id=key, queue=QUEUE)) == key
            assert (await f.queue_state(client))["msg"] == 1
            held = await server.get_job(key)  # the dead run's state, not reset to queued
            assert (held.status, held.job.payload) == (Status.PROCESSING, b"30,0.05")
            msg = await server.wait(job_id, timeout=STEP)
            assert msg.status is Status.SUCCESSFUL, f.logs()
            assert await started_runs(client, f, key) == [f"{owner.pid}:1", f"{other.pid}:2"]
            # ended: the id is free again, and a new run of it happens
            again = await server.enqueue(Job("hold", b"0.05", id=key, queue=QUEUE))
            assert (await server.wait(again, timeout=STEP)).status is Status.SUCCESSFUL
            runs = await started_runs(client, f, key)
            assert runs[:2] == [f"{owner.pid}:1", f"{other.pid}:2"]
            assert len(runs) == 3
            assert runs[2].endswith(":1")
            await f.wait_drained(client)


async def test_queue_limits_hold_over_three_worker_processes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """3 worker processes (asyncio, Trio, asyncio; 4 processors each) share the queue's
    limits: at most 10 starts per second and 3 jobs running at once. 30 jobs of 0.2 s:
    the measured rate stays within the window, the most running at once is 3, and the
    jobs over a limit wait: none fails, is retried or is run twice."""
    jobs = 30
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path, limits="10,1,3") as f:
        for backend in ("asyncio", "trio", "asyncio"):
            await f.start(backend)
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 3)
            handles = await server.enqueue_many(
                [Job("stamp", b"0.2", queue=QUEUE) for _ in range(jobs)]
            )
            for handle in handles:
                done = await server.wait(handle, timeout=STEP)
                assert (done.status, done.meta.retried) == (Status.SUCCESSFUL, 0), f.logs()
            running_key, most_key, starts_key = f.keys.stamps
            assert int(await client.get(running_key) or 0) == 0  # every run counted out
            starts = sorted(int(t) for t in await client.lrange(starts_key, 0, -1))
            assert len(starts) == jobs  # each ran once
            assert int(await client.get(most_key) or 0) == 3, f.logs()
            # at most 10 starts in any second (the Redis clock stamps them as the runs
            # begin, a few ms after their permits: 50 ms of slack)
            for i in range(len(starts) - 10):
                assert starts[i + 10] - starts[i] >= 1000 - 50, starts
            # so 30 starts span at least 2 s (the 11th and the 21st each wait a window)
            assert starts[-1] - starts[0] >= 2000 - 100, starts
            await f.wait_drained(client)
            # the workers' processes all took part
            assert all(w.alive for w in f.workers), f.logs()


async def test_several_processes_enqueueing_the_same_ids_make_one_job_each(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """4 processes enqueue the same 200 ids, each in its own order, while 2 workers run
    them: every id runs once (a job queued, running, or ended within its unique_for
    holds its id)."""
    count = 200
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path) as f:
        await f.start("asyncio")
        await f.start("trio")
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 2)
            await enqueue_from_processes("reliability_app", f.url, f.prefix, count, 4)
            for n in range(count):
                assert (await server.wait(f"same-{n}", timeout=STEP)).status is Status.SUCCESSFUL
            await f.wait_drained(client)
            executions = await client.hgetall(f.keys.executions)
            assert {k.decode(): int(v) for k, v in executions.items()} == {
                f"same-{n}": 1 for n in range(count)
            }


#: The kill storm: jobs, the seconds each sleeps, processors per worker, seconds between kills.
STORM_JOBS = 2000
STORM_JOB_SECONDS = b"0.05"
STORM_CONCURRENCY = 8
STORM_KILL_EVERY = 2.0


async def test_kill_storm_every_job_completes_with_its_effect_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    backends = ["asyncio", "trio", "asyncio"]
    with (
        anyio.fail_after(TEST_TIMEOUT),
        Fleet(redis_server.url, tmp_path, concurrency=STORM_CONCURRENCY, forked=True) as f,
    ):
        workers = [await f.start(backend) for backend in backends]
        async with opened(f) as (server, client):
            await f.wait_consuming(client, len(workers))
            jobs = [Job("effect", STORM_JOB_SECONDS, queue=QUEUE) for _ in range(STORM_JOBS)]
            began = time.monotonic()
            ids = await server.enqueue_many(jobs)
            kills = 0
            next_kill = began + STORM_KILL_EVERY
            while await client.zcard(f.success_key()) < STORM_JOBS:
                if time.monotonic() >= next_kill:
                    slot = kills % len(workers)
                    workers[slot] = await f.restart(workers[slot])
                    kills += 1
                    next_kill += STORM_KILL_EVERY
                if time.monotonic() - began > TEST_TIMEOUT - 15:
                    pytest.fail(
                        f"{await client.zcard(f.success_key())} of {STORM_JOBS} jobs ended "
                        f"after {kills} kills\n{f.logs()}"
                    )
                await anyio.sleep(0.05)
            all_done = time.monotonic() - began
            await f.wait_drained(client)
            drained = time.monotonic() - began

            # every job in a final state: successful
            assert sorted(await server.get_success()) == sorted(ids)
            assert await server.get_failed() == []
            states = await get_jobs(server, ids)
            assert {msg.status for msg in states.values()} == {Status.SUCCESSFUL}
            redelivered = sum(1 for msg in states.values() if msg.meta.attempt > 1)
            # each effect once per job id, however many times the job ran
            effects = await client.hgetall(f.keys.effects)
            assert {key.decode() for key in effects} == set(ids)
            assert set(effects.values()) == {b"1"}
            assert await client.exists([f.keys.effect(job_id) for job_id in ids]) == STORM_JOBS
            executions = await client.hgetall(f.keys.executions)
            assert {key.decode() for key in executions} == set(ids)
            executed = sum(int(n) for n in executions.values())
            assert executed >= STORM_JOBS
            # the storm did rage, and the workers not killed last are still up
            assert kills >= 2, f"only {kills} kills: the jobs ended too soon"
            assert all(w.alive for w in workers), f.logs()
            print(
                f"\nkill storm: {STORM_JOBS} jobs of {STORM_JOB_SECONDS.decode()}s on "
                f"{len(workers)} workers x {STORM_CONCURRENCY}, {kills} SIGKILLs "
                f"(every {STORM_KILL_EVERY:g}s): {executed} executions reached the effect, {len(effects)} effects recorded "
                f"({executed - STORM_JOBS} duplicate executions by redelivery), "
                f"{redelivered} jobs delivered more than once; all successful after "
                f"{all_done:.1f}s, queue drained after {drained:.1f}s"
            )


async def test_zombie_owner_resumed_after_its_lease_cannot_write(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path) as f:
        await f.start("trio")
        await f.start("asyncio")
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 2)
            # 3 s on the first run: it saves its result long after its lease ran out
            job_id = await server.enqueue(Job("hold", b"3,0.05", queue=QUEUE))
            owner = await first_run(client, f, job_id)
            (other,) = [w for w in f.workers if w is not owner]
            owner.send(signal.SIGSTOP)
            try:
                msg = await server.wait(job_id, timeout=STEP)
                assert msg.status is Status.SUCCESSFUL, f.logs()
                assert msg.meta.attempt == 2
                assert await server.get_result(job_id) == str(other.pid).encode()
                assert owner.state() == "T"  # it was stopped all along
            finally:
                owner.send(signal.SIGCONT)

            # The owner wakes up: its save, its state write and its ack are refused.
            save_refused = f"pid {owner.pid}: LeaseLostError saving the result of job {job_id}"
            ack_refused = f"LeaseLostError: lease lost: cannot ack message '{job_id}/"  # id/retries

            async def refused() -> bool:
                log = owner.log
                return save_refused in log and ack_refused in log

            await wait_until(refused, "the owner's late writes to be refused", f)
            # its end (failed: the save raised) was refused with its ack, in one script
            assert "this run's end was not recorded either" in owner.log

            msg = await server.get_job(job_id)
            assert msg.status is Status.SUCCESSFUL
            assert msg.meta.attempt == 2
            assert await server.get_result(job_id) == str(other.pid).encode()
            saved = await client.lrange(f.keys.saved(job_id), 0, -1)
            assert saved == [str(other.pid).encode()]  # the result was written once
            assert await started_runs(client, f, job_id) == [f"{owner.pid}:1", f"{other.pid}:2"]
            assert await server.get_success() == [job_id]
            assert await server.get_failed() == []
            await f.wait_drained(client)
            assert owner.alive, owner.log
            assert other.alive, other.log
            assert "lease lost" not in other.log


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_a_run_paused_past_its_lease_that_fails_still_retries(
    redis_server: RedisServer, tmp_path: Path, backend: str
) -> None:
    """Issue 11, hole 11: the only worker is stopped past its lease while the first try
    of a job runs, and its message is swept back to the queue (here by an inspection).
    The worker resumes, its run fails: its ``retrying`` write succeeds (no other run
    took the job), the ack that carries the retry is refused (lease lost), and the
    swept message comes back to that worker: it must enqueue the retry, which runs."""
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path, concurrency=1) as f:
        owner = await f.start(backend)
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 1)
            # the first try sleeps 3 s (it is stopped meanwhile), then fails
            job_id = await server.enqueue(Job("flaky", b"3", queue=QUEUE, max_retries=1))

            async def started() -> bool:
                return bool(await started_runs(client, f, job_id))

            await wait_until(started, f"job {job_id} to start", f)
            owner.send(signal.SIGSTOP)
            try:

                async def swept() -> bool:  # the lease ran out: the message is due again
                    return bool(await server.get_pending(QUEUE))

                await wait_until(swept, "the stopped run's message to be swept back", f)
                assert owner.state() == "T"
            finally:
                owner.send(signal.SIGCONT)

            msg = await server.wait(job_id, timeout=STEP)
            assert msg.status is Status.SUCCESSFUL, f.logs()
            assert msg.meta.retried == 1
            assert await started_runs(client, f, job_id) == [f"{owner.pid}:1"]
            # the failed run's ack (carrying the retry) was refused: the hole was reached
            assert "lost its lease" in owner.log
            effects = await client.hgetall(f.keys.effects)
            assert effects == {job_id.encode(): b"1"}
            await f.wait_drained(client)
            assert owner.alive, owner.log


#: The Redis restart: jobs enqueued at first, the seconds each sleeps, the outage.
RESTART_JOBS = 200
RESTART_JOB_SECONDS = b"0.05"
OUTAGE = 3.0
#: The consumer's longest backoff between fetch attempts (brokers/redis.py).
MAX_BACKOFF = 5.0
#: The id of the restart test's cron schedule.
CRON = "every-second"


# coredis 6.9 leaks the memory object streams of every connection attempt that fails
# (``BaseConnection.__init__`` creates them, ``run()`` closes them only once connected):
# while Redis is down, the test process's own client would fail this test with their
# ResourceWarnings. The leak is coredis's, not this library's; collected below.
@pytest.mark.filterwarnings(r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning")
async def test_redis_killed_and_restarted_mid_load_loses_no_acknowledged_job(
    tmp_path: Path,
) -> None:
    require_redis_server()
    redis = start_redis_server(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    try:
        with anyio.fail_after(TEST_TIMEOUT), Fleet(redis.url, tmp_path) as f:
            workers = [await f.start("asyncio"), await f.start("trio")]
            async with opened(f) as (server, client):
                config = await client.config_get(["appendonly", "appendfsync"])
                assert config == {b"appendonly": b"yes", b"appendfsync": b"always"}
                await f.wait_consuming(client, len(workers))
                # a cron schedule firing every second: the workers' schedulers make
                # passes while Redis is away too
                await server.enqueue(Job("nap", b"0", queue=QUEUE, schedule="* * * * * *", id=CRON))

                acknowledged: list[str] = [
                    *await server.enqueue_many(
                        [Job("nap", RESTART_JOB_SECONDS, queue=QUEUE) for _ in range(RESTART_JOBS)]
                    )
                ]
                refused = 0
                producing = True

                async def produce() -> None:
                    """One enqueue every 50 ms, through the outage: the ones that
                    returned are acknowledged."""
                    nonlocal refused
                    while producing:
                        job = Job("nap", RESTART_JOB_SECONDS, queue=QUEUE)
                        try:
                            await server.enqueue(job)
                        except BrokerError:
                            refused += 1
                        else:
                            acknowledged.append(job.id)
                        await anyio.sleep(0.05)

                async def some_done() -> bool:
                    return await client.zcard(f.success_key()) >= 20

                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce)
                    await wait_until(some_done, "the first jobs to end", f)
                    done_before = await client.zcard(f.success_key())
                    # of the acknowledged jobs (the cron runs are listed too): how many
                    # were done when the server went away
                    acked_before = set(acknowledged)
                    acked_done_before = len(acked_before & set(await server.get_success()))
                    cpu_before = [w.cpu_seconds() for w in workers]
                    log_before = [len(w.log) for w in workers]
                    down_at = time.monotonic()
                    redis.kill()
                    await anyio.sleep(OUTAGE)
                    outage = time.monotonic() - down_at
                    cpu = [
                        w.cpu_seconds() - before
                        for w, before in zip(workers, cpu_before, strict=True)
                    ]
                    retries = [
                        w.log[start:].count("failed (Redis failed while fetching")
                        for w, start in zip(workers, log_before, strict=True)
                    ]
                    await anyio.to_thread.run_sync(restart_redis_server, redis)
                    up_at = time.monotonic()
                    up_wall = time.time()

                    async def progressing() -> bool:
                        try:
                            return await client.zcard(f.success_key()) > done_before
                        except BrokerError:  # pragma: no cover - the client reconnects
                            return False

                    await wait_until(progressing, "the workers to reconnect", f, interval=0.02)
                    reconnected_after = time.monotonic() - up_at
                    await anyio.sleep(0.5)
                    producing = False

                assert acked_done_before < len(acked_before)  # killed mid-processing
                assert refused > 0  # enqueues did fail while Redis was down

                acked = set(acknowledged)

                async def all_acknowledged_done() -> bool:
                    return acked <= set(await server.get_success())

                await wait_until(all_acknowledged_done, "every acknowledged job", f, timeout=30)
                # the subscriber connections came back too (coredis resubscribes): the
                # queue's wake-ups, and the events channel (waits, cancel requests)
                notify = f.queue_key("notify")
                events = f"{f.prefix}:ch:{EVENTS_CHANNEL}".encode()

                async def resubscribed() -> bool:
                    counts = await client.pubsub_numsub(notify, events)
                    return counts == {notify: len(workers), events: len(workers) + 1}

                await wait_until(resubscribed, "the subscriptions to come back", f)
                states = await get_jobs(server, acknowledged)
                assert {msg.status for msg in states.values()} == {Status.SUCCESSFUL}

                # the schedule fires again after the restart
                cron_ran_again = partial(ran_since, server, CRON, up_wall)
                await wait_until(cron_ran_again, "a cron run after the restart", f)
                assert await server.remove_schedule(CRON)
                await f.wait_drained(client)

                # the workers survived the outage, reconnected within the consumer's
                # bounded backoff, and idled (no busy loop) while Redis was away
                assert all(w.alive for w in workers), f.logs()
                assert reconnected_after <= MAX_BACKOFF + LEASE + 3, f.logs()
                for worker, used, tries in zip(workers, cpu, retries, strict=True):
                    assert used < 0.5 * outage, f"{worker!r} used {used:.2f}s CPU in {outage:.1f}s"
                    assert 1 <= tries <= 15, f"{worker!r} retried fetching {tries} times"
                print(
                    f"\nredis restart: {len(acknowledged)} acknowledged enqueues all "
                    f"successful ({refused} refused during the outage); outage {outage:.1f}s, "
                    f"worker CPU during it {', '.join(f'{c:.2f}s' for c in cpu)}, fetch "
                    f"retries {retries}; jobs ending again {reconnected_after:.1f}s after "
                    f"the restart"
                )
    finally:
        redis.stop()
        gc.collect()  # the leaked streams (see above), while their warnings are ignored


async def test_poison_messages_are_dead_lettered_and_the_queue_flows(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with anyio.fail_after(TEST_TIMEOUT), Fleet(redis_server.url, tmp_path) as f:
        worker = await f.start("trio")
        async with opened(f) as (server, client):
            await f.wait_consuming(client, 1)
            # Straight into the queue's keys (brokers/redis.py): a stored message whose
            # bytes are not msgpack, one that is msgpack but not a job, and an element
            # of the ready list with no stored message at all.
            not_msgpack = b"\xc1\xff\x00 not msgpack"
            not_a_job = msgpack.packb({"hello": "world"}, use_bin_type=True)
            bare = b"\x00\xfe bare bytes in the ready list"
            await client.hset(
                f.queue_key("msg"), {b"poison-1": not_msgpack, b"poison-2": not_a_job}
            )
            await client.rpush(f.queue_key("ready"), [b"poison-1", b"poison-2", bare])
            await client.publish(f.queue_key("notify"), b"")
            job_id = await server.enqueue(Job("hold", b"0.01", queue=QUEUE))

            msg = await server.wait(job_id, timeout=STEP)
            assert msg.status is Status.SUCCESSFUL, worker.log
            assert await server.get_result(job_id) == str(worker.pid).encode()

            letters = await server.get_dead_letters(QUEUE)
            assert sorted(d.data for d in letters) == sorted([not_msgpack, not_a_job, bare])
            assert all(d.queue == QUEUE and d.reason and d.at > 0 for d in letters)
            assert worker.log.count("dead-lettering an undecodable message") == 3

            # the queue keeps flowing: another good job after the poison
            second = await server.enqueue(Job("hold", b"0.01", queue=QUEUE))
            assert (await server.wait(second, timeout=STEP)).status is Status.SUCCESSFUL
            await f.wait_drained(client)
            assert len(await server.get_dead_letters(QUEUE)) == 3
            assert worker.alive, worker.log
