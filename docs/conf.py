"""Sphinx configuration of the documentation site (``sphinx-build -W -n docs docs/_build``)."""

from __future__ import annotations

project = "tasqueue_anyio"
author = "the tasqueue_anyio authors"
copyright = "2026, the tasqueue_anyio authors"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "tasqueue_anyio"
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Warnings are errors and every cross-reference must resolve (-W -n), with no network at
# build time (no intersphinx): names of other libraries are not looked up.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(anyio|trio|asyncio|datetime|collections|typing|typing_extensions|attrs|msgpack|"
        r"coredis|opentelemetry|logging|contextlib|types|abc|enum|zoneinfo|os|pathlib|starlette|"
        r"concurrent)(\..*)?",
    ),
    # type variables, and the private modules' names a public signature or base shows
    (r"py:(class|obj)", r"~?([A-Za-z_.]*\.)?(P|R|R_co|P2|R2|_T|_M|_P|_HT|_C|_B|_R|H|_H|T)"),
    (r"py:.*", r"(tasqueue_anyio\.)?([a-z_.]*\.)?_[A-Za-z_.]*"),
    (r"py:.*", r"tasqueue_anyio\._[a-z_]+(\..*)?"),
    (r"py:.*", r"(bytes|str|int|float|bool|None|Exception|BaseException|object|Any)"),
    # the type aliases of handler and callback signatures (tasqueue_anyio._tasks)
    (r"py:class", r"(Handler|Callback|ErrorCallback|JsMsg)"),
]
