"""The public surface: what ``tasqueue_anyio`` exports and what importing it costs."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import pytest

import tasqueue_anyio


def _public_names() -> list[str]:
    return sorted(name for name in dir(tasqueue_anyio) if not name.startswith("_"))


def test_public_set_is_not_empty() -> None:
    names = set(_public_names())
    for expected in ["Server", "Job", "JobContext", "Status", "Backoff", "TasqueueError"]:
        assert expected in names


@pytest.mark.parametrize("name", _public_names())
def test_public_classes_and_functions_live_in_the_package(name: str) -> None:
    value = getattr(tasqueue_anyio, name)
    if isinstance(value, types.ModuleType):
        # a submodule (abc, brokers, results, ...): its own module path is its name
        assert value.__name__ == f"tasqueue_anyio.{name}"
        return
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == "tasqueue_anyio", (
            f"tasqueue_anyio.{name}.__module__ is {value.__module__!r}"
        )
        assert value.__name__ == name


def test_exceptions_share_one_root() -> None:
    for name in _public_names():
        value = getattr(tasqueue_anyio, name)
        if inspect.isclass(value) and issubclass(value, BaseException):
            assert issubclass(value, tasqueue_anyio.TasqueueError), name


def test_lookup_errors_are_lookup_errors() -> None:
    for cls in (
        tasqueue_anyio.NotFoundError,
        tasqueue_anyio.JobNotFoundError,
        tasqueue_anyio.ResultNotFoundError,
        tasqueue_anyio.UnknownTaskError,
    ):
        assert issubclass(cls, LookupError), cls


_IMPORT_PROBE = """
import json, sys
import tasqueue_anyio
print(json.dumps(sorted(sys.modules)))
"""


def test_import_pulls_in_no_event_loop_or_backend_modules() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True
    ).stdout
    modules = set(json.loads(out))
    ours = {m for m in modules if m == "tasqueue_anyio" or m.startswith("tasqueue_anyio.")}
    # no event-loop-specific code of ours, and no backend (each is imported on use only)
    for module in ours:
        parts = module.split(".")
        assert not any("asyncio" in p or "trio" in p for p in parts), module
        assert not module.startswith(
            ("tasqueue_anyio.brokers.", "tasqueue_anyio.results.", "tasqueue_anyio._nats")
        ), module
    # Trio is an optional extra: importing the package must not need it; nor may it
    # start asyncio (the library is AnyIO only)
    assert "trio" not in modules
    assert "asyncio" not in modules
    # no backend client library either
    for client in ("coredis", "redis", "nats"):
        assert client not in modules, client
