"""Tutorial 6: tracing and metrics. The OpenTelemetry SDK's in-memory exporters stand for
the exporter you would use (OTLP to a collector); the server gets the providers.
Run it with ``python3 traced.py`` (or ``... trio``)."""

from __future__ import annotations

import sys

import anyio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tasqueue_anyio import Server

# [providers]
spans = InMemorySpanExporter()  # in production: BatchSpanProcessor(OTLPSpanExporter())
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
metrics = InMemoryMetricReader()  # in production: PeriodicExportingMetricReader(...)
meter_provider = MeterProvider(metric_readers=[metrics])

server = Server(tracer_provider=tracer_provider, meter_provider=meter_provider)
# [providers end]


@server.task(queue="images")
async def thumbnail(image: str, size: int) -> str:
    return f"{image.removesuffix('.png')}-{size}.png"


async def main() -> None:
    async with server, anyio.create_task_group() as tg:
        await tg.start(server.run)
        await (await thumbnail.enqueue("cat.png", 200)).result(timeout=10)
        tg.cancel_scope.cancel()
    finished = spans.get_finished_spans()
    for span in finished:
        attributes = dict(span.attributes or {})
        print(span.name, span.kind.name, attributes.get("tasqueue.status", "-"))
    print("one trace:", len({span.context.trace_id for span in finished}) == 1)
    data = metrics.get_metrics_data()
    names = sorted(
        metric.name
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )
    print("metrics:", names)


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
