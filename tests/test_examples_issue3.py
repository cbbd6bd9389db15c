"""The group and chain examples run and print what they promise (each on asyncio and Trio)."""

from __future__ import annotations

import pytest
from examples_support import run_example


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_group_example(backend: str) -> None:
    assert run_example("group.py", backend) == [
        "group squares successful",
        "square-2 successful result=4",
        "square-3 successful result=9",
        "square-4 successful result=16",
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_chain_example(backend: str) -> None:
    assert run_example("chain.py", backend) == [
        "chain pipeline successful",
        "fetch successful received=None",
        "transform successful received=b'hello, chains'",
        "store successful received=b'HELLO, CHAINS'",
        "final result: stored 13 bytes under greeting",
    ]
