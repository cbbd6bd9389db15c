"""tasqueue_anyio: a distributed job/worker library on AnyIO, for Trio and asyncio.

The public API lives here; backends are in :mod:`tasqueue_anyio.brokers` and
:mod:`tasqueue_anyio.results`, their contracts in :mod:`tasqueue_anyio.abc`.
"""

from __future__ import annotations

from contextlib import suppress as _suppress

from ._blocking import BlockingChainHandle as BlockingChainHandle
from ._blocking import BlockingClient as BlockingClient
from ._blocking import BlockingGroupHandle as BlockingGroupHandle
from ._blocking import BlockingJobHandle as BlockingJobHandle
from ._client import ChainHandle as ChainHandle
from ._client import Client as Client
from ._client import Counts as Counts
from ._client import GroupHandle as GroupHandle
from ._client import JobHandle as JobHandle
from ._client import TaskFunction as TaskFunction
from ._codecs import Codec as Codec
from ._codecs import JsonCodec as JsonCodec
from ._codecs import MsgpackCodec as MsgpackCodec
from ._exceptions import BrokerError as BrokerError
from ._exceptions import DecodeError as DecodeError
from ._exceptions import DuplicateJobError as DuplicateJobError
from ._exceptions import InvalidInputError as InvalidInputError
from ._exceptions import JobCancelledError as JobCancelledError
from ._exceptions import JobFailedError as JobFailedError
from ._exceptions import JobNotFoundError as JobNotFoundError
from ._exceptions import JobTimeoutError as JobTimeoutError
from ._exceptions import LeaseLostError as LeaseLostError
from ._exceptions import NotFoundError as NotFoundError
from ._exceptions import NotReplicatedError as NotReplicatedError
from ._exceptions import PayloadTooLargeError as PayloadTooLargeError
from ._exceptions import QueueConcurrencyError as QueueConcurrencyError
from ._exceptions import ResultNotFoundError as ResultNotFoundError
from ._exceptions import TasqueueError as TasqueueError
from ._exceptions import UnknownTaskError as UnknownTaskError
from ._groups import Chain as Chain
from ._groups import ChainMessage as ChainMessage
from ._groups import Group as Group
from ._groups import GroupMessage as GroupMessage
from ._jobs import DEFAULT_QUEUE as DEFAULT_QUEUE
from ._jobs import Backoff as Backoff
from ._jobs import Job as Job
from ._jobs import JobContext as JobContext
from ._jobs import JobMessage as JobMessage
from ._jobs import Meta as Meta
from ._jobs import Progress as Progress
from ._jobs import Status as Status
from ._jobs import current_job as current_job
from ._schedule import Schedule as Schedule
from ._server import Server as Server
from ._tasks import Task as Task

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_QUEUE",
    "Backoff",
    "BlockingChainHandle",
    "BlockingClient",
    "BlockingGroupHandle",
    "BlockingJobHandle",
    "BrokerError",
    "Chain",
    "ChainHandle",
    "ChainMessage",
    "Client",
    "Codec",
    "Counts",
    "DecodeError",
    "DuplicateJobError",
    "Group",
    "GroupHandle",
    "GroupMessage",
    "InvalidInputError",
    "Job",
    "JobCancelledError",
    "JobContext",
    "JobFailedError",
    "JobHandle",
    "JobMessage",
    "JobNotFoundError",
    "JobTimeoutError",
    "JsonCodec",
    "LeaseLostError",
    "Meta",
    "MsgpackCodec",
    "NotFoundError",
    "NotReplicatedError",
    "PayloadTooLargeError",
    "Progress",
    "QueueConcurrencyError",
    "ResultNotFoundError",
    "Schedule",
    "Server",
    "Status",
    "Task",
    "TaskFunction",
    "TasqueueError",
    "UnknownTaskError",
    "current_job",
]


def _fix_module() -> None:
    for name, value in list(globals().items()):
        module = getattr(value, "__module__", "") or ""
        if not name.startswith("_") and module.startswith("tasqueue_anyio._"):
            with _suppress(AttributeError, TypeError):
                value.__module__ = __name__


_fix_module()
del _fix_module
