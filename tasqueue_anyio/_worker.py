"""The worker pipeline: per queue a consumer feeding a memory object stream and N
processors; each job runs in its own cancel scope."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from ._codec import decode_message
from ._exceptions import DecodeError, JobCancelledError, JobTimeoutError, UnknownTaskError
from ._jobs import Job, JobContext, JobMessage, Status
from .abc import FINAL_STATUSES, Delivery, Envelope, JobRecord

if TYPE_CHECKING:
    from ._server import Server, Task

__all__ = ["Worker"]

_RUNNABLE = ("queued", "retrying", "processing")
_PROCESSING = ("processing",)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Worker:
    """Runs the queues of a :class:`Server` (made by :meth:`Server.run`)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.results = server.results
        self.broker = server.broker
        self.log = server.log
        self._consumers_scope: anyio.CancelScope | None = None
        self._processors_scope: anyio.CancelScope | None = None
        self._stop_grace: float | None = None

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        async with anyio.create_task_group() as processors:
            self._processors_scope = processors.cancel_scope
            async with anyio.create_task_group() as consumers:
                self._consumers_scope = consumers.cancel_scope
                for queue, concurrency in self.server.queues.items():
                    send, receive = anyio.create_memory_object_stream[Delivery](0)
                    consumers.start_soon(self.broker.consume, queue, send, name=f"consume {queue}")
                    with receive:
                        for i in range(concurrency):
                            processors.start_soon(
                                self._processor, receive.clone(), name=f"{queue}#{i}"
                            )
                if self._stop_grace is not None:  # stop() before we got here
                    self.stop(self._stop_grace)
                task_status.started()

    def stop(self, grace: float) -> None:
        self._stop_grace = grace
        if self._consumers_scope is not None and self._processors_scope is not None:
            self._consumers_scope.cancel()
            deadline = anyio.current_time() + grace
            self._processors_scope.deadline = min(self._processors_scope.deadline, deadline)

    async def _processor(self, receive: MemoryObjectReceiveStream[Delivery]) -> None:
        with receive:
            async for delivery in receive:
                try:
                    await self.process(delivery)
                except Exception:
                    # A backend failure while recording: leave the message to come back.
                    self.log.exception("processing a delivery of queue %r failed", delivery.queue)
                    with anyio.move_on_after(self.server.finalize_timeout, shield=True):
                        try:
                            await delivery.nack(delay=1.0)
                        except Exception:
                            self.log.exception(
                                "nack failed; the broker's lease returns the message"
                            )

    # -- one delivery ---------------------------------------------------------------------------

    async def process(self, delivery: Delivery) -> None:
        server = self.server
        try:
            msg = decode_message(delivery.data, max_size=server.max_message_size)
        except DecodeError as exc:
            self.log.warning(
                "dead-lettering an undecodable message on queue %r: %s",
                delivery.queue,
                exc,
                extra={"queue": delivery.queue},
            )
            with anyio.move_on_after(server.finalize_timeout, shield=True):
                await delivery.dead_letter(str(exc))
            return

        job_id = msg.id
        active = _ActiveJobRef(server, job_id)
        with active:
            meta = attrs.evolve(
                msg.meta,
                status=Status.PROCESSING,
                processed_at=time.time(),
                attempt=delivery.attempt,
            )
            msg = JobMessage(meta=meta, job=msg.job)
            data = server.encode(msg)
            refused = await self.results.start_job(
                job_id, JobRecord(status="processing", data=data)
            )
            if refused is not None:
                await self._not_started(delivery, msg, refused)
                return
            await self._run(delivery, msg, data, active.job)

    async def _not_started(self, delivery: Delivery, msg: JobMessage, current: JobRecord) -> None:
        """The job may not start: cancelled, or ended before (a redelivery after a crash)."""
        status = current.status
        with anyio.move_on_after(self.server.finalize_timeout, shield=True):
            if status not in FINAL_STATUSES:  # cancel requested while it was held
                cancelled = self._evolve(
                    msg, Status.CANCELLED, prev_error="cancelled before it started"
                )
                if await self.results.update_job(msg.id, self._record(cancelled), expect=_RUNNABLE):
                    await delivery.ack()
                    await self.server.publish_finished(msg.id, Status.CANCELLED)
                    return
                status = (await self.results.get_job(msg.id)).status
            follow_ups: Sequence[Job] = ()
            if status == "successful":
                follow_ups = msg.job.on_success
            elif status == "failed":
                follow_ups = msg.job.on_error
            # A crash between recording the end and acking left the follow-ups unsent.
            await self._ack(delivery, msg, follow_ups)

    async def _run(self, delivery: Delivery, msg: JobMessage, data: bytes, active: Any) -> None:
        server = self.server
        task = server.get_task(msg.job.task)
        meta = msg.meta
        ctx = JobContext(meta=meta, save_fn=self.results.set_result)
        error: BaseException | None = None
        cancelled = False

        deadline = math.inf
        if meta.timeout is not None:
            deadline = anyio.current_time() + meta.timeout
        if meta.deadline is not None:
            deadline = min(deadline, anyio.current_time() + (meta.deadline - time.time()))

        with server.tracing.consumer_span(msg, delivery.attempt) as span:
            try:
                if task is None:
                    error = UnknownTaskError(
                        f"task {msg.job.task!r} is not registered on this worker "
                        f"(registered: {', '.join(server.get_tasks()) or 'none'})"
                    )
                else:
                    with anyio.CancelScope(deadline=deadline) as scope:
                        active.scope = scope
                        if active.cancelled_by_request:
                            scope.cancel()
                        try:
                            await self._callback(task.on_processing, ctx)
                            if task.is_async:
                                await task.handler(msg.job.payload, ctx)  # type: ignore[misc]
                            else:
                                await anyio.to_thread.run_sync(
                                    task.handler, msg.job.payload, ctx, abandon_on_cancel=True
                                )
                        except Exception as exc:
                            error = exc
                    if scope.cancelled_caught or (error is not None and scope.cancel_called):
                        if active.cancelled_by_request:
                            cancelled = True
                            error = JobCancelledError(f"job {msg.id} was cancelled")
                        elif (
                            meta.deadline is not None
                            and time.time() >= meta.deadline
                            and (meta.timeout is None or anyio.current_time() < deadline)
                        ):
                            error = JobTimeoutError(f"job {msg.id} ran past its parent's deadline")
                        else:
                            error = JobTimeoutError(
                                f"job {msg.id} ran past its timeout of {meta.timeout:g}s and was stopped"
                                if meta.timeout is not None
                                else f"job {msg.id} ran past its deadline and was stopped"
                            )
            except anyio.get_cancelled_exc_class():
                # Shutdown is not an outcome: the job goes back to the broker.
                with anyio.move_on_after(server.finalize_timeout, shield=True):
                    requeued = self._evolve(msg, Status.QUEUED)
                    await self.results.update_job(
                        msg.id, self._record(requeued), expect=_PROCESSING
                    )
                    await delivery.nack()
                raise

            if span is not None:
                span.set_attribute(
                    "tasqueue.status",
                    "cancelled" if cancelled else "successful" if error is None else "failed",
                )
                if error is not None and not cancelled:
                    from opentelemetry.trace import Status as SpanStatus
                    from opentelemetry.trace import StatusCode

                    span.record_exception(error)
                    span.set_status(SpanStatus(StatusCode.ERROR, _describe(error)))

        if cancelled:
            await self._finish_cancelled(delivery, msg)
        elif error is None:
            await self._finish_success(delivery, msg, data, ctx, task)
        else:
            await self._finish_error(delivery, msg, ctx, task, error)

    # -- endings --------------------------------------------------------------------------------

    async def _finish_success(
        self, delivery: Delivery, msg: JobMessage, data: bytes, ctx: JobContext, task: Task | None
    ) -> None:
        # The stored status is authoritative over the one inside ``data``, so the
        # processing message's bytes serve the final record as they are.
        with anyio.move_on_after(self.server.finalize_timeout, shield=True):
            if not await self.results.update_job(
                msg.id, JobRecord(status="successful", data=data), expect=_PROCESSING
            ):
                self.log.warning(
                    "job %s ended elsewhere; not recording this run",
                    msg.id,
                    extra={"job_id": msg.id},
                )
                await delivery.ack()
                return
            await self._callback(task.on_success if task else None, ctx)
            await self._ack(delivery, msg, msg.job.on_success)
            await self.server.publish_finished(msg.id, Status.SUCCESSFUL)

    async def _finish_error(
        self,
        delivery: Delivery,
        msg: JobMessage,
        ctx: JobContext,
        task: Task | None,
        error: BaseException,
    ) -> None:
        meta = msg.meta
        description = _describe(error)
        past_deadline = meta.deadline is not None and time.time() >= meta.deadline
        if meta.retried < meta.max_retries and not past_deadline:
            delay = meta.backoff.delay(meta.retried) if meta.backoff is not None else 0.0
            retry = attrs.evolve(
                msg,
                meta=attrs.evolve(
                    meta,
                    status=Status.RETRYING,
                    retried=meta.retried + 1,
                    prev_error=description,
                    eta=time.time() + delay if delay > 0 else None,
                ),
            )
            data = self.server.encode(retry)
            with anyio.move_on_after(self.server.finalize_timeout, shield=True) as scope:
                if not await self.results.update_job(
                    msg.id, JobRecord(status="retrying", data=data), expect=_PROCESSING
                ):
                    await delivery.ack()
                    return
                # The retry is a new message, on the queue before the old one is gone.
                await delivery.ack(enqueue=[_envelope(retry, data)])
            if scope.cancelled_caught:
                return
            self.log.info(
                "job %s failed (%s); retry %d of %d",
                msg.id,
                description,
                meta.retried + 1,
                meta.max_retries,
                extra={"job_id": msg.id},
            )
            await self._callback(task.on_retrying if task else None, ctx, error)
            return

        failed = self._evolve(msg, Status.FAILED, prev_error=description)
        self.log.info("job %s failed: %s", msg.id, description, extra={"job_id": msg.id})
        with anyio.move_on_after(self.server.finalize_timeout, shield=True):
            if not await self.results.update_job(msg.id, self._record(failed), expect=_PROCESSING):
                await delivery.ack()
                return
            await self._callback(task.on_failed if task else None, ctx, error)
            await self._ack(delivery, msg, msg.job.on_error)
            await self.server.publish_finished(msg.id, Status.FAILED)

    async def _finish_cancelled(self, delivery: Delivery, msg: JobMessage) -> None:
        cancelled = self._evolve(msg, Status.CANCELLED, prev_error="cancelled while running")
        with anyio.move_on_after(self.server.finalize_timeout, shield=True):
            await self.results.update_job(msg.id, self._record(cancelled), expect=_PROCESSING)
            await delivery.ack()
            await self.server.publish_finished(msg.id, Status.CANCELLED)

    async def _ack(self, delivery: Delivery, msg: JobMessage, follow_ups: Sequence[Job]) -> None:
        """Ack, enqueueing follow-up jobs in the same step (their state recorded first)."""
        if not follow_ups:
            await delivery.ack()
            return
        prepared = [self.server.new_message(job) for job in follow_ups]
        await self.results.set_jobs(
            {m.id: JobRecord(status=m.meta.status.value, data=data) for m, data in prepared}
        )
        await delivery.ack(enqueue=[_envelope(m, data) for m, data in prepared])

    # -- helpers --------------------------------------------------------------------------------

    def _evolve(self, msg: JobMessage, status: Status, **changes: Any) -> JobMessage:
        return attrs.evolve(msg, meta=attrs.evolve(msg.meta, status=status, **changes))

    def _record(self, msg: JobMessage) -> JobRecord:
        return JobRecord(status=msg.meta.status.value, data=self.server.encode(msg))

    async def _callback(self, callback: Any, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.log.exception(
                "callback %r of job %s raised; the job's state is unaffected",
                getattr(callback, "__name__", callback),
                args[0].meta.id,
                extra={"job_id": args[0].meta.id},
            )


def _envelope(msg: JobMessage, data: bytes) -> Envelope:
    from ._server import envelope

    return envelope(msg, data)


class _ActiveJobRef:
    """Registers a job as running in this process for the duration of a ``with`` block,
    so a cancel request that arrives at any point finds it."""

    __slots__ = ("job", "job_id", "server")

    def __init__(self, server: Server, job_id: str) -> None:
        from ._server import _ActiveJob

        self.server = server
        self.job_id = job_id
        self.job = _ActiveJob()

    def __enter__(self) -> _ActiveJobRef:
        self.server.active.setdefault(self.job_id, []).append(self.job)
        return self

    def __exit__(self, *exc: object) -> None:
        jobs = self.server.active.get(self.job_id)
        if jobs is not None:
            jobs.remove(self.job)
            if not jobs:
                del self.server.active[self.job_id]
