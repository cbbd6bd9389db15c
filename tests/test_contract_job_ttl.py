"""The results-store contract of a job's own TTL (:attr:`JobRecord.ttl`), on every store
(the Redis Cluster and nats-server 2.10 included) and both AnyIO backends: a final record
written with a TTL, and its result, expire after it; other jobs keep the store's defaults;
a store that cannot keep a TTL per job says so before anything is stored."""

from __future__ import annotations

from uuid import uuid4

import anyio
import pytest

from tasqueue_anyio import InvalidInputError
from tasqueue_anyio._exceptions import JobNotFoundError, ResultNotFoundError
from tasqueue_anyio.abc import JobRecord, Results
from tasqueue_anyio.results.nats import NatsResults

pytestmark = pytest.mark.anyio

#: NATS per-message TTLs are whole seconds: the shortest is 1
TTL = 1.0
TIMEOUT = 8.0


async def gone(results: Results, job_id: str) -> None:
    """Wait until the job's state and its result are gone (TTLs running out: nothing
    announces it; the result may go a moment after the state)."""
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                await results.get_job(job_id)
            except JobNotFoundError:
                break
            await anyio.sleep(0.1)
        while True:
            try:
                await results.get_result(job_id)
            except ResultNotFoundError:
                break
            await anyio.sleep(0.1)


async def test_jobs_end_with_their_own_ttl(results: Results) -> None:
    if isinstance(results, NatsResults) and results.client.server_version < (2, 11, 0):
        with pytest.raises(InvalidInputError, match="ttl"):
            results.check_job_ttl()
        return  # (nats-server 2.10: refused before anything is stored)
    results.check_job_ttl()
    ids = {
        name: f"ttl-{name}-{uuid4().hex[:8]}"
        for name in ("ok", "failed", "early", "plain", "retrying")
    }
    for job_id in ids.values():
        await results.set_jobs({job_id: JobRecord(status="processing", data=b"d", run="0.1.a")})

    async def end(name: str, record: JobRecord) -> None:
        assert await results.update_job(ids[name], record, expect=("processing",), run="0.1.a")

    # a result written with the end; none; one saved during the run
    await end("ok", JobRecord(status="successful", data=b"d", run="0.1.a", result=b"r", ttl=TTL))
    await end("failed", JobRecord(status="failed", data=b"d", run="0.1.a", ttl=TTL))
    assert await results.set_result(ids["early"], b"saved early", run="0.1.a")
    await end("early", JobRecord(status="successful", data=b"d", run="0.1.a", ttl=TTL))
    # no TTL of its own: the store's defaults (none here)
    await end("plain", JobRecord(status="successful", data=b"d", run="0.1.a", result=b"kept"))
    # a TTL applies to final records only
    await end("retrying", JobRecord(status="retrying", data=b"d", run="0.1.a", ttl=TTL))

    stored = await results.get_job(ids["ok"])
    assert (stored.status, stored.ttl) == ("successful", None)  # write-only
    assert await results.get_result(ids["ok"]) == b"r"
    assert await results.get_result(ids["early"]) == b"saved early"
    for name in ("ok", "failed", "early"):
        await gone(results, ids[name])
    assert (await results.get_job(ids["plain"])).status == "successful"
    assert await results.get_result(ids["plain"]) == b"kept"
    assert (await results.get_job(ids["retrying"])).status == "retrying"
