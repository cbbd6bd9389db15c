"""The testing example (examples/test_shop_tasks.py, on asyncio and Trio) passes, run
as a user runs it; and a broken task makes it fail (it can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from examples_support import EXAMPLES, user_environ


def run_pytest(*args: str, cwd: Path = EXAMPLES) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=user_environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_testing_example_passes() -> None:
    done = run_pytest("test_shop_tasks.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 passed" in done.stdout


def test_the_testing_example_catches_a_broken_task(tmp_path: Path) -> None:
    # the same tests against a shop whose checkout forgets the cart's items
    source = (EXAMPLES / "shop_tasks.py").read_text()
    broken = source.replace("carts.pop(cart, 0)", "0")
    assert broken != source
    (tmp_path / "shop_tasks.py").write_text(broken)
    shutil.copy(EXAMPLES / "test_shop_tasks.py", tmp_path)
    done = run_pytest("test_shop_tasks.py", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 failed, 6 passed" in done.stdout
