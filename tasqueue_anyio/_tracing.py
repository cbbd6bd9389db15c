"""OpenTelemetry helpers, through ``opentelemetry-api`` only (no SDK at run time).

With no tracer provider the server uses no tracer at all: not even a no-op span is made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject

if TYPE_CHECKING:
    from ._jobs import JobMessage

__all__ = ["Metrics", "Tracing"]

_NAME = "tasqueue_anyio"


class Tracing:
    """Spans for enqueue (producer) and processing (consumer), or nothing."""

    def __init__(self, provider: trace.TracerProvider | None) -> None:
        self.tracer = (
            None if provider is None else trace.get_tracer(_NAME, tracer_provider=provider)
        )

    def carrier(self) -> dict[str, str]:
        """The current trace context as W3C headers (empty without a tracer)."""
        if self.tracer is None:
            return {}
        carrier: dict[str, str] = {}
        inject(carrier)
        return carrier

    @contextmanager
    def producer_span(self, name: str, attributes: dict[str, Any]) -> Iterator[None]:
        if self.tracer is None:
            yield
            return
        with self.tracer.start_as_current_span(
            name, kind=trace.SpanKind.PRODUCER, attributes=attributes
        ):
            yield

    def consumer_span(
        self, msg: JobMessage, attempt: int
    ) -> AbstractContextManager[trace.Span | None]:
        """A span for one run of a job, continuing the producer's trace (or nothing)."""
        if self.tracer is None:
            return _NO_SPAN
        return self._consumer_span(msg, attempt)

    @contextmanager
    def _consumer_span(self, msg: JobMessage, attempt: int) -> Iterator[trace.Span | None]:
        assert self.tracer is not None
        attributes: dict[str, str | int] = {
            "tasqueue.job.id": msg.id,
            "tasqueue.task": msg.job.task,
            "tasqueue.queue": msg.meta.queue,
            "tasqueue.attempt": attempt,
        }
        token = otel_context.attach(extract(msg.meta.trace))
        try:
            with self.tracer.start_as_current_span(
                f"tasqueue.process {msg.job.task}",
                kind=trace.SpanKind.CONSUMER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                yield span
        finally:
            otel_context.detach(token)


_NO_SPAN: AbstractContextManager[None] = nullcontext()


class Metrics:
    """Job counters and a duration histogram through the OpenTelemetry metrics API, or
    nothing when no meter provider is given.

    Instruments (attributes ``tasqueue.task`` and ``tasqueue.queue``):
    ``tasqueue.jobs.successful``, ``tasqueue.jobs.failed``, ``tasqueue.jobs.retried``,
    ``tasqueue.jobs.cancelled`` (counters) and ``tasqueue.job.duration`` (seconds a run
    took, histogram, with ``tasqueue.status`` too).
    """

    def __init__(self, provider: Any) -> None:
        self.enabled = provider is not None
        if provider is None:
            return
        from opentelemetry import metrics

        meter = metrics.get_meter(_NAME, meter_provider=provider)
        self._counters = {
            status: meter.create_counter(
                f"tasqueue.jobs.{status}", unit="{job}", description=f"jobs {status}"
            )
            for status in ("successful", "failed", "retried", "cancelled")
        }
        self._duration = meter.create_histogram(
            "tasqueue.job.duration", unit="s", description="how long a job's run took"
        )

    def record(self, outcome: str, task: str, queue: str, duration: float | None) -> None:
        """Count a run's ``outcome`` (``successful``, ``failed``, ``retried``, ``cancelled``)."""
        if not self.enabled:
            return
        attributes = {"tasqueue.task": task, "tasqueue.queue": queue}
        self._counters[outcome].add(1, attributes)
        if duration is not None:
            self._duration.record(duration, {**attributes, "tasqueue.status": outcome})
