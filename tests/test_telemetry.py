"""OpenTelemetry: spans across producer and worker, chains in one trace, metrics."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from server_support import TIMEOUT, noop, running

from tasqueue_anyio import Chain, Job, JobContext, Server
from tasqueue_anyio.abc import Broker, Results

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def by_name(finished: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name.startswith(prefix)]


async def test_producer_and_consumer_spans_share_a_trace(
    broker: Broker,
    results: Results,
    queue_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    producer = Server(broker=broker, results=results, tracer_provider=provider)
    worker = Server(broker=broker, results=results, tracer_provider=provider)
    worker.register_task("t", noop, queue=queue_name, raw=True)
    async with producer, worker, running(worker):
        job_id = await producer.enqueue(Job("t", queue=queue_name))
        await producer.wait(job_id, timeout=TIMEOUT)
    finished = exporter.get_finished_spans()
    [enqueue] = by_name(finished, "tasqueue.enqueue")
    [process] = by_name(finished, "tasqueue.process")
    assert enqueue.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert enqueue.context is not None
    assert process.context is not None
    assert process.context.trace_id == enqueue.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == enqueue.context.span_id
    assert process.attributes is not None
    assert process.attributes["tasqueue.job.id"] == job_id
    assert process.attributes["tasqueue.task"] == "t"
    assert process.attributes["tasqueue.queue"] == queue_name
    assert process.attributes["tasqueue.attempt"] == 1
    assert process.attributes["tasqueue.status"] == "successful"
    assert process.end_time is not None  # spans end


async def test_chain_links_and_follow_ups_are_in_one_trace(
    broker: Broker,
    results: Results,
    queue_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    server = Server(broker=broker, results=results, tracer_provider=provider)
    server.register_task("t", noop, queue=queue_name, raw=True)
    follow_up = Job("t", queue=queue_name)
    chain = Chain([Job("t", queue=queue_name), Job("t", queue=queue_name, on_success=[follow_up])])
    async with server, running(server):
        await server.enqueue_chain(chain)
        await server.wait_chain(chain.id, timeout=TIMEOUT)
        await server.wait(follow_up.id, timeout=TIMEOUT)
    finished = exporter.get_finished_spans()
    processes = by_name(finished, "tasqueue.process")
    assert len(processes) == 3
    trace_ids = {s.context.trace_id for s in finished if s.context is not None}
    assert len(trace_ids) == 1
    # each link's span is the parent of what it enqueued
    by_job = {s.attributes["tasqueue.job.id"]: s for s in processes if s.attributes}
    first, second = (by_job[job.id] for job in chain.jobs)
    assert second.parent is not None
    assert first.context is not None
    assert second.parent.span_id == first.context.span_id
    after = by_job[follow_up.id]
    assert after.parent is not None
    assert second.context is not None
    assert after.parent.span_id == second.context.span_id


async def test_failing_job_span_has_error_status_and_exception(
    broker: Broker,
    results: Results,
    queue_name: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans

    async def boom(payload: bytes, ctx: JobContext) -> None:
        raise ValueError("broken on purpose")

    server = Server(broker=broker, results=results, tracer_provider=provider)
    server.register_task("boom", boom, queue=queue_name, raw=True)
    async with server, running(server):
        job_id = await server.enqueue(Job("boom", queue=queue_name, max_retries=1))
        await server.wait(job_id, timeout=TIMEOUT)
    processes = by_name(exporter.get_finished_spans(), "tasqueue.process")
    assert len(processes) == 2  # one span per attempt
    assert [s.attributes["tasqueue.attempt"] for s in processes if s.attributes] == [1, 1]
    for span in processes:
        assert span.status.status_code is StatusCode.ERROR
        assert "broken on purpose" in (span.status.description or "")
        [event] = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ValueError"


async def test_no_provider_means_no_trace_context_in_messages(
    broker: Broker, results: Results, queue_name: str
) -> None:
    server = Server(broker=broker, results=results)
    async with server:
        job_id = await server.enqueue(Job("t", queue=queue_name))
        assert (await server.get_job(job_id)).meta.trace == {}


async def test_metrics_count_outcomes_by_task_and_queue(
    broker: Broker, results: Results, queue_name: str
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    attempts: dict[str, int] = {}

    async def flaky(payload: bytes, ctx: JobContext) -> None:
        attempts[ctx.job_id] = attempts.get(ctx.job_id, 0) + 1
        if payload == b"fail" or attempts[ctx.job_id] == 1:
            raise RuntimeError("no")

    blocked = anyio.Event()

    async def block(payload: bytes, ctx: JobContext) -> None:
        blocked.set()
        await anyio.sleep_forever()

    server = Server(broker=broker, results=results, meter_provider=provider)
    server.register_task("flaky", flaky, queue=queue_name, raw=True)
    server.register_task("block", block, queue=queue_name, raw=True)
    async with server, running(server):
        ok = await server.enqueue(Job("flaky", b"ok", queue=queue_name, max_retries=1))
        bad = await server.enqueue(Job("flaky", b"fail", queue=queue_name))
        stuck = await server.enqueue(Job("block", queue=queue_name))
        for job_id in (ok, bad):
            await server.wait(job_id, timeout=TIMEOUT)
        with anyio.fail_after(TIMEOUT):
            await blocked.wait()
        await server.cancel(stuck)
        await server.wait(stuck, timeout=TIMEOUT)
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, str, str], float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    key = (
                        metric.name,
                        str(attrs.get("tasqueue.task")),
                        str(attrs.get("tasqueue.status", "")),
                    )
                    value = getattr(point, "value", None)
                    points[key] = float(value if value is not None else point.count)  # type: ignore[union-attr]
    assert points[("tasqueue.jobs.successful", "flaky", "")] == 1
    assert points[("tasqueue.jobs.retried", "flaky", "")] == 1
    assert points[("tasqueue.jobs.failed", "flaky", "")] == 1
    assert points[("tasqueue.jobs.cancelled", "block", "")] == 1
    assert points[("tasqueue.job.duration", "flaky", "successful")] == 1
    provider.shutdown()
