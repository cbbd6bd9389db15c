"""Reading the tutorials' pages: their console blocks (run by ``test_tutorials.py``) and the
files they include (not a test module itself).

A tutorial page shows its code with ``literalinclude`` of files in ``docs/tutorials/code/``
(so the code is a real file: run, linted and type-checked like the rest of the project), and
what running it prints in a ``console`` block::

    ```console
    $ python3 first_job.py
    result: 42
    ```

Each ``$ python3 ...`` line is a command, run in ``docs/tutorials/code/``, and the lines
after it, up to the next command or the end of the block, are its expected output, line by
line. ``...`` in an expected line matches any text (a job id, a duration). A script that
takes the AnyIO backend as its first argument (``backend=sys.argv[1]``) is run a second time
with ``trio`` appended, and must print the same. Commands that are not ``python3`` (starting
a server or a worker) are written in ``sh`` blocks instead, and a test of their own plays them.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
from examples_support import user_environ

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
CODE = TUTORIALS / "code"

#: The Redis database the tutorials' scripts use on the session's server (emptied per run).
TUTORIAL_DB = 9

_FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\{[\w-]+\})?\s*([\w-]*)\s*(.*)$")
_INCLUDE = re.compile(r"^(?:`{3,}|:{3,})\{literalinclude\}\s+(\S+)", re.M)


@attrs.frozen
class ConsoleRun:
    """One command of a console block and the output the page shows for it."""

    page: str
    line: int
    argv: tuple[str, ...]
    expected: tuple[str, ...]

    @property
    def script(self) -> Path | None:
        """The Python file the command runs (``python3 FILE``), if it runs one."""
        args = [a for a in self.argv[1:] if not a.startswith("-")]
        if self.argv[1:3] == ("-m", "pytest") or not args:
            return None
        return CODE / args[0]

    @property
    def takes_backend(self) -> bool:
        """The script picks its AnyIO backend from its first argument."""
        script = self.script
        return script is not None and "backend=sys.argv[1]" in script.read_text()

    def matches(self, output: str) -> str | None:
        """``None`` when ``output`` is what the page shows, else what differs."""
        got = output.splitlines()
        if len(got) != len(self.expected):
            return f"{len(got)} lines printed, the page shows {len(self.expected)}"
        for number, (want, line) in enumerate(zip(self.expected, got, strict=True), 1):
            pattern = ".*".join(re.escape(part) for part in want.split("..."))
            if not re.fullmatch(pattern, line):
                return f"line {number}: printed {line!r}, the page shows {want!r}"
        return None


def pages() -> list[Path]:
    """The tutorial pages, in order."""
    return sorted(TUTORIALS.glob("*.md"))


def blocks(text: str, language: str) -> Iterator[tuple[int, list[str]]]:
    """The fenced blocks of ``language`` in a MyST page: (line of the fence, body lines)."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, directive, lang = match.group(1), match.group(2), match.group(3)
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if directive is None and lang == language:
            yield index + 1, lines[index + 1 : end]
        index = end + 1


def console_runs(page: Path) -> list[ConsoleRun]:
    """Every command of the page's console blocks, with its expected output."""
    runs: list[ConsoleRun] = []
    for line, body in blocks(page.read_text(), "console"):
        current: ConsoleRun | None = None
        for offset, text in enumerate(body, 1):
            if text.startswith("$ "):
                if current is not None:
                    runs.append(current)
                argv = tuple(shlex.split(text[2:]))
                if argv[0] != "python3":
                    raise ValueError(
                        f"{page.name}:{line + offset}: console blocks run python3 only "
                        f"(write other commands in an sh block): {text!r}"
                    )
                current = ConsoleRun(page.name, line + offset, argv, ())
            elif current is None:
                raise ValueError(f"{page.name}:{line + offset}: output before any command")
            else:
                current = attrs.evolve(current, expected=(*current.expected, text))
        if current is not None:
            runs.append(current)
    return runs


def included_files(page: Path) -> list[Path]:
    """The files a page includes with ``literalinclude``, resolved."""
    return [(page.parent / name).resolve() for name in _INCLUDE.findall(page.read_text())]


def flush_tutorial_db(port: int) -> None:
    """Empty :data:`TUTORIAL_DB` of the Redis server on ``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"SELECT {TUTORIAL_DB}\r\nFLUSHDB\r\n".encode())
        reply = b""
        while reply.count(b"\r\n") < 2:
            reply += sock.recv(64)
        assert reply == b"+OK\r\n+OK\r\n", reply


def run_command(
    argv: tuple[str, ...], env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run a page's ``python3 ...`` command in the tutorials' code directory."""
    return subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=CODE,
        env={**user_environ(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
