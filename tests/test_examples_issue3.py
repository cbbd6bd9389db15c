"""The group and chain examples run and print what they promise (each on asyncio and Trio)."""

from __future__ import annotations

import pytest
from examples_support import run_example


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_group_example(backend: str) -> None:
    assert run_example("group.py", backend) == [
        "group squares successful",
        "square-2 successful",
        "square-3 successful",
        "square-4 successful",
        "results: [4, 9, 16]",
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_chain_example(backend: str) -> None:
    assert run_example("chain.py", backend) == [
        "chain pipeline successful",
        "fetch successful",
        "transform successful",
        "store successful",
        "final result: stored 13 characters under 'greeting'",
    ]
