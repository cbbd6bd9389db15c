"""The error hierarchy: one root, :class:`TasqueueError`, and a subclass per situation."""

from __future__ import annotations


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


class DecodeError(TasqueueError, ValueError):
    """Bytes read from a broker or store are not a valid message of this library."""


class JobTimeoutError(TasqueueError, TimeoutError):
    """A job ran past its deadline and was stopped."""


class JobCancelledError(TasqueueError):
    """A job was cancelled by :meth:`Server.cancel`; also what
    :meth:`JobContext.check_cancelled` raises in a run told to stop."""
