"""The README's front door: exactly two set-up commands, and its first example runs and
prints what it says, on asyncio and Trio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_two_set_up_commands() -> None:
    first = blocks("sh")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("python3 -m pip install -e '.[trio]' && python3 examples/demo.py")
    assert first[1].startswith("bash .ci/test")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_first_example_runs(backend: str, tmp_path: Path) -> None:
    code = blocks("python")[0]
    assert "@server.task(" in code
    assert "raw=True" not in code  # the front door is the typed face
    if backend == "trio":
        code = code.replace("anyio.run(main)", 'anyio.run(main, backend="trio")', 1)
    script = tmp_path / "glance.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "42\n"
