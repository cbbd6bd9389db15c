"""Checks that depend on how much time passed (expiry, ETAs), made robust on a busy
machine without loosening them (not a test module itself).

A timing-dependent check reads the clock (:func:`anyio.current_time`, the monotonic
clock of ``anyio.sleep``) around the calls that matter and asserts only what the
measured times prove (:func:`require`); when the machine was too slow for a try to
prove anything (a step took longer than the margin it needed), the try says so and
:func:`until_conclusive` runs it again, on fresh state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

__all__ = ["Inconclusive", "require", "sleep_until", "until_conclusive"]

#: How many tries a check gets before the test fails (each try is slowed only by load).
TRIES = 5


class Inconclusive(Exception):
    """This try's measured times do not allow its conclusion; try again."""


def require(condition: bool, what: str) -> None:
    """Raise :class:`Inconclusive` unless ``condition`` (a statement about measured
    times) holds."""
    if not condition:
        raise Inconclusive(what)


async def sleep_until(when: float) -> None:
    """Sleep until :func:`anyio.current_time` reads ``when`` (at least)."""
    await anyio.sleep(max(0.0, when - anyio.current_time()))


async def until_conclusive(check: Callable[[], Awaitable[None]], tries: int = TRIES) -> None:
    """Run ``check`` until a try is conclusive (returns, its assertions passed; a failed
    assertion fails the test at once); fail after ``tries`` inconclusive tries."""
    reasons = []
    for _ in range(tries):
        try:
            await check()
            return
        except Inconclusive as exc:
            reasons.append(str(exc))
    raise AssertionError(f"{tries} tries were too slow to conclude: {reasons}")
