"""The bounded backoff of the loops that must outlive a backend's outage (consumers, the
cron scheduler, the NATS schedule relay)."""

from __future__ import annotations

import logging
from typing import Any

import anyio

__all__ = ["MAX_RETRY_DELAY", "RetryBackoff"]

#: The longest pause between two attempts (seconds).
MAX_RETRY_DELAY = 5.0
#: The first pause (seconds); each failure in a row doubles it.
FIRST_RETRY_DELAY = 0.05


class RetryBackoff:
    """Pauses between the attempts of a loop that retries failures: 50 ms, doubling with
    each failure in a row, at most :data:`MAX_RETRY_DELAY`; a success starts over.

    :param logger: where each failure is logged (a warning)
    :param what: what the loop does, for the log ("consuming queue 'default'")
    :param extra: the log records' ``extra``
    """

    __slots__ = ("delay", "extra", "logger", "what")

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        what: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.logger = logger
        self.what = what
        self.extra = extra
        #: the pause after the last failure (0 after a success)
        self.delay = 0.0

    async def failed(self, exc: BaseException) -> None:
        """Log ``exc`` and sleep the next pause."""
        self.delay = min(MAX_RETRY_DELAY, self.delay * 2 or FIRST_RETRY_DELAY)
        # the text only: a record a handler keeps holds no traceback (and through it the
        # frames and connections of the failed attempt) alive
        self.logger.warning(
            "%s failed (%s); retrying in %.2fs", self.what, str(exc), self.delay, extra=self.extra
        )
        await anyio.sleep(self.delay)

    def succeeded(self) -> None:
        """The attempt worked: the next failure pauses the shortest time again."""
        self.delay = 0.0
