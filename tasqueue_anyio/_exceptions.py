"""The error hierarchy: one root, :class:`TasqueueError`, and a subclass per situation."""

from __future__ import annotations

from typing import Any


class TasqueueError(Exception):
    """Root of every error this library raises on purpose."""


class InvalidInputError(TasqueueError, ValueError):
    """An argument (queue name, job id, payload, option) was refused before any I/O."""


class PayloadTooLargeError(InvalidInputError):
    """A job payload, result or encoded message is over a size limit: the server's
    (``max_payload_size``, ``max_message_size``) or a backend's (NATS: the server's
    ``max_payload``)."""

    def __init__(self, what: str, size: int, limit: int, *, cause: str | None = None) -> None:
        super().__init__(
            f"{what} is {size} bytes, over the limit of {limit} bytes; "
            + (
                cause
                if cause is not None
                else "store large data elsewhere and pass a reference, or raise the limit "
                "(Server(max_payload_size=...))"
            )
        )
        self.size = size
        self.limit = limit


class NotFoundError(TasqueueError, LookupError):
    """No job, result, group or chain is stored under the given id."""


class JobNotFoundError(NotFoundError):
    """No job state is stored under the given id."""


class ResultNotFoundError(NotFoundError):
    """The job exists (or existed) but never saved a result."""


class UnknownTaskError(TasqueueError, LookupError):
    """A job names a task that is not registered on this server."""


class QueueConcurrencyError(TasqueueError, ValueError):
    """A task was registered on a queue with a concurrency other than the queue's."""


class BrokerError(TasqueueError):
    """The broker or results backend failed (connection lost, server error)."""


class LeaseLostError(BrokerError):
    """A worker's run of a job no longer owns it: its lease expired (the worker was
    paused or cut off) and another worker took the job over. Nothing was written."""


class NotReplicatedError(BrokerError):
    """An enqueue was stored on the Redis primary, but fewer replicas than the broker's
    ``wait_replicas`` acknowledged it within ``wait_timeout`` (``WAIT``): the messages
    run, unless the primary fails over before they reach a replica. The jobs' state
    stays recorded; enqueueing the same job ids again stores nothing twice.

    :ivar acknowledged: how many replicas acknowledged the write
    :ivar wanted: how many the broker waits for
    """

    def __init__(self, message: str, *, acknowledged: int, wanted: int) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged
        self.wanted = wanted


class DecodeError(TasqueueError, ValueError):
    """Bytes read from a broker or store are not a valid message of this library."""


class JobTimeoutError(TasqueueError, TimeoutError):
    """A job ran past its own ``timeout`` (or its group's or chain's deadline) and was
    stopped: the run's error, recorded as the job's (retried if retries remain).

    Not to be mixed up with the built-in :class:`TimeoutError` that ``wait()`` and a
    handle's ``result()`` raise when the *caller's* ``timeout`` runs out: then the job
    goes on, and nothing about it changed.
    """


class JobCancelledError(TasqueueError):
    """A job was cancelled by :meth:`~tasqueue_anyio.Client.cancel`; also what
    :meth:`JobContext.check_cancelled` raises in a run told to stop."""


class JobFailedError(TasqueueError):
    """A job (or a group or chain) whose result was asked for ended ``failed``.

    :ivar job_id: the failed job's id (a group's or chain's when no member failed)
    :ivar error: the error recorded for its last run, as ``"ExceptionType: message"``
        (``"JobTimeoutError: ..."`` for a job stopped by its own timeout)
    :ivar job: the failed job's final message (``None`` for a group or chain)
    """

    def __init__(self, job_id: str, error: str, job: Any = None, *, kind: str = "job") -> None:
        super().__init__(f"{kind} {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error
        self.job = job


class DuplicateJobError(TasqueueError):
    """A group or chain was enqueued with a member whose id names a live job (queued,
    scheduled, running, or held by its ``unique_for``). Nothing of the group or chain
    runs: its record ends ``failed`` saying so, and the live jobs are left as they are.
    (A plain :meth:`~tasqueue_anyio.Client.enqueue` of such an id is not an error: it
    returns the live job's handle.)

    :ivar job_ids: the ids that were taken
    """

    def __init__(self, job_ids: Any) -> None:
        self.job_ids = sorted(job_ids)
        shown = ", ".join(self.job_ids[:10]) + (" ..." if len(self.job_ids) > 10 else "")
        super().__init__(
            f"job ids already taken by live jobs: {shown}; give the members other ids, or "
            f"wait for those jobs to end"
        )
