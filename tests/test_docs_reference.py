"""The API reference (docs/api.md, built by Sphinx in .ci/run) covers every public name,
and every public name has a docstring for it to show."""

from __future__ import annotations

import inspect
from pathlib import Path

import tasqueue_anyio
import tasqueue_anyio.abc
import tasqueue_anyio.dashboard
import tasqueue_anyio.testing

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    modules = (tasqueue_anyio, tasqueue_anyio.abc, tasqueue_anyio.testing, tasqueue_anyio.dashboard)
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            documentable = inspect.isclass(obj) or inspect.isfunction(obj)
            if documentable and not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
    assert missing == []


def test_the_reference_documents_every_public_module() -> None:
    text = API.read_text()
    for module in (
        "tasqueue_anyio",
        "tasqueue_anyio.abc",
        "tasqueue_anyio.testing",
        "tasqueue_anyio.dashboard",
    ):
        assert f".. automodule:: {module}\n   :members:" in text, module
    # the package's reference takes its members from __all__ (imported from private modules)
    assert ":imported-members:" in text
