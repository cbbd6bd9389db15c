"""Value codecs: how a typed task's arguments and result become bytes and back.

A typed job's payload is ``codec.encode([args, kwargs])`` (a list of the positional
arguments and a dict of the keyword arguments); its result is ``codec.encode(value)``.
Producers and workers of one application use the same codec.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol, runtime_checkable

import msgpack

from ._codec import DEFAULT_MAX_MESSAGE_SIZE, _ext_refused, unpack, why
from ._exceptions import DecodeError, InvalidInputError

__all__ = ["Codec", "JsonCodec", "MsgpackCodec", "decode_args", "encode_args"]


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back: a typed task's arguments and its result.

    ``encode`` raises :class:`~tasqueue_anyio.InvalidInputError` (or ``TypeError``) for
    a value it cannot carry; ``decode`` raises :class:`~tasqueue_anyio.DecodeError` for
    bytes it cannot read. Both are called from worker threads too, so they must be
    thread-safe. A codec for pydantic or attrs models encodes them to plain data (say
    ``model.model_dump()``) and rebuilds them from it, or adds a type tag it trusts.
    """

    def encode(self, value: Any) -> bytes:
        """``value`` as bytes."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value ``data`` encodes."""
        ...


class MsgpackCodec:
    """The default codec: msgpack, decoded by the same bounded decoder as the messages.

    It carries ``None``, ``bool``, ``int`` (64-bit), ``float``, ``str``, ``bytes``,
    lists (tuples come back as lists) and dicts (keys of those scalar types); no
    extension types, so no pickle and nothing that builds objects from the wire.

    :param max_size: the largest encoded value ``decode`` reads (bytes)
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._local = threading.local()

    def __repr__(self) -> str:
        return "MsgpackCodec()"

    def encode(self, value: Any) -> bytes:
        packer = getattr(self._local, "packer", None)
        if packer is None:  # a Packer is not thread-safe: one per thread
            packer = self._local.packer = msgpack.Packer(use_bin_type=True, datetime=False)
        try:
            data: bytes = packer.pack(value)
            return data
        except (TypeError, ValueError, OverflowError) as exc:
            packer.reset()
            raise InvalidInputError(
                f"MsgpackCodec cannot encode {type(value).__name__} ({why(exc)}): pass "
                f"plain data (None, bool, int, float, str, bytes, lists, dicts) or give "
                f"the server another codec"
            ) from None

    def decode(self, data: bytes) -> Any:
        if type(data) is bytes and len(data) <= self.max_size:
            try:  # the hot path: unpack's own checks, inline
                return msgpack.unpackb(
                    data, raw=False, strict_map_key=False, ext_hook=_ext_refused
                )
            except DecodeError:
                raise
            except Exception:
                pass  # unpack says why
        return unpack(data, self.max_size, "msgpack value", strict_map_key=False)


class JsonCodec:
    """JSON (UTF-8): readable by anything, for producers in other languages.

    It carries ``None``, ``bool``, ``int``, ``float``, ``str``, lists and dicts with
    string keys (no ``bytes``; tuples come back as lists; NaN and infinities refused).

    :param max_size: the largest encoded value ``decode`` reads (bytes)
    """

    def __init__(self, *, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size

    def __repr__(self) -> str:
        return "JsonCodec()"

    def encode(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"JsonCodec cannot encode this value: {exc}") from None

    def decode(self, data: bytes) -> Any:
        if len(data) > self.max_size:
            raise DecodeError(f"JSON value is {len(data)} bytes, over the limit of {self.max_size}")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise DecodeError(f"not a JSON value: {why(exc)}") from None


def encode_args(
    codec: Codec, args: tuple[Any, ...], kwargs: dict[str, Any], *, previous: bool = False
) -> bytes:
    """A typed job's payload: ``codec.encode([args, kwargs])``, or with ``previous``
    (a chain link that takes the previous link's result as its first argument)
    ``codec.encode([args, kwargs, True])``."""
    return codec.encode([list(args), kwargs, True] if previous else [list(args), kwargs])


def decode_args(codec: Codec, payload: bytes) -> tuple[list[Any], dict[str, Any], bool]:
    """The arguments of a typed job's payload, and whether the previous chain link's
    result goes first.

    :raises DecodeError: the payload is not ``[args, kwargs]`` (or ``[args, kwargs,
        true]``) in ``codec``
    """
    value = codec.decode(payload)
    # the common shape first, by exact types (the hot path of every typed job)
    if type(value) is list and len(value) == 2:
        args, kwargs = value
        if type(args) is list and type(kwargs) is dict and (
            not kwargs or all(type(k) is str for k in kwargs)
        ):
            return args, kwargs, False
    elif (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], list)
        and isinstance(value[1], dict)
        and all(isinstance(k, str) for k in value[1])
        and value[2] is True
    ):
        return value[0], value[1], True
    raise DecodeError(
        f"a typed task's payload must be {codec!r}-encoded [args, kwargs] "
        f"(or [args, kwargs, true] for a chain link taking the previous result), "
        f"got {type(value).__name__}"
    )
