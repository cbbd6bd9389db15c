"""Registered tasks: the :class:`Task` record and the adapter that runs a typed function.

A typed task's function takes any arguments and returns a value; the adapter decodes the
job's payload into those arguments with the server's codec, calls the function, and keeps
the encoded return value on the job's context, which the worker writes in the same step
as the run's final state.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ._codecs import Codec, decode_args
from ._jobs import JobContext

__all__ = ["Callback", "ErrorCallback", "Handler", "Task", "is_async_callable", "typed_handler"]

Handler = Callable[[bytes, JobContext], Awaitable[None] | None]
Callback = Callable[[JobContext], Awaitable[None] | None]
ErrorCallback = Callable[[JobContext, BaseException], Awaitable[None] | None]


@attrs.frozen(kw_only=True)
class Task:
    """A registered task: a handler, its queue and its lifecycle callbacks.

    :ivar handler: what the worker calls with ``(payload, ctx)``: the bytes-level
        handler itself, or for a typed task the adapter around ``function``
    :ivar function: the typed task's own function (``None`` for a bytes-level handler)
    :ivar abandon_on_cancel: a sync handler's thread is left to finish on its own when
        its run is stopped, instead of being waited for (see ``Server.register_task``)
    """

    name: str
    handler: Handler
    queue: str
    concurrency: int
    is_async: bool
    on_processing: Callback | None = None
    on_success: Callback | None = None
    on_retrying: ErrorCallback | None = None
    on_failed: ErrorCallback | None = None
    abandon_on_cancel: bool = False
    function: Callable[..., Any] | None = None

    @property
    def typed(self) -> bool:
        """Whether this is a typed task (its arguments and result go through the codec)."""
        return self.function is not None


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns an awaitable (an ``async def``, a partial of one, or
    an object whose ``__call__`` is one)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    # an object whose __call__ is ``async def`` (we need the method, not callability)
    call = getattr(fn, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def typed_handler(
    fn: Callable[..., Any], codec: Codec, check_result: Callable[[str, bytes], None]
) -> Handler:
    """The ``(payload, ctx)`` handler that runs the typed function ``fn``.

    A chain link made with ``TaskFunction.link`` receives the previous link's result
    (decoded; ``None`` when that link stored none) as its first positional argument.

    :param check_result: raises when an encoded result may not be stored (its size)
    """

    def arguments(payload: bytes, ctx: JobContext) -> tuple[list[Any], dict[str, Any]]:
        args, kwargs, takes_previous = decode_args(codec, payload)
        if takes_previous:
            previous = ctx.meta.prev_job_result
            args.insert(0, None if previous is None else codec.decode(previous))
        return args, kwargs

    def keep(ctx: JobContext, value: Any) -> None:
        data = codec.encode(value)
        check_result(ctx.meta.id, data)
        ctx.result = data

    if is_async_callable(fn):

        async def run_async(payload: bytes, ctx: JobContext) -> None:
            args, kwargs = arguments(payload, ctx)
            keep(ctx, await fn(*args, **kwargs))

        return run_async

    def run_sync(payload: bytes, ctx: JobContext) -> None:
        args, kwargs = arguments(payload, ctx)
        keep(ctx, fn(*args, **kwargs))

    return run_sync
