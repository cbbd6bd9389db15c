"""The typed face is typed: ``assert_type`` checks (which ``mypy --strict`` verifies when
CI checks this file) and mypy run on small snippets that must fail where a user's
mistake is (a wrong argument, a wrong use of a result)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import tasqueue_anyio
from tasqueue_anyio import (
    BlockingClient,
    BlockingJobHandle,
    Chain,
    ChainHandle,
    Client,
    Group,
    GroupHandle,
    Job,
    JobContext,
    JobHandle,
    Server,
    TaskFunction,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # the package's mypy target is 3.10
    from typing_extensions import assert_type

server = Server()


@server.task()
async def add(a: int, b: int) -> int:
    return a + b


@server.task()
def shout(text: str, *, times: int = 1) -> str:  # a plain def: the same typing
    return text.upper() * times


@server.task("raw", raw=True)
async def raw(payload: bytes, ctx: JobContext) -> None:
    pass


async def _types(client: Client, blocking: BlockingClient) -> None:
    """Never run: mypy --strict checks these when CI checks the tests."""
    typed: TaskFunction[[int, int], int] = add  # the signature, parameter by parameter
    assert typed is add
    job = await add.enqueue(40, 2)
    assert_type(job, JobHandle[int])
    assert_type(await job.result(timeout=1), int)
    assert_type(await shout.options(delay=1).enqueue("x", times=2), JobHandle[str])
    assert_type(add.job(1, 2), Job)
    assert_type(add.link(2), Job)  # the previous link's result comes first
    assert_type(await client.enqueue(add, 1, 2), JobHandle[int])
    assert_type(await client.enqueue(add.job(1, 2)), JobHandle[Any])
    assert_type(blocking.enqueue(add, 1, 2), BlockingJobHandle[int])
    assert_type(blocking.enqueue(add, 1, 2).result(), int)
    assert_type(await server.enqueue_group(Group([add.job(1, 2)])), GroupHandle)
    assert_type(await server.enqueue_chain(Chain([add.job(1, 2), add.link(3)])), ChainHandle)
    handler: Callable[[bytes, JobContext], Coroutine[Any, Any, None]] = raw  # unchanged
    assert handler is raw


GOOD = '''
from tasqueue_anyio import Chain, Server

server = Server()

@server.task()
async def add(a: int, b: int) -> int:
    return a + b

@server.task()
def label(total: int, name: str) -> str:
    return f"{name}={total}"

async def use() -> str:
    total: int = await (await add.enqueue(40, 2)).result()
    chain = Chain([add.job(1, 2), add.link(3), label.link(name="sum")])
    await server.enqueue_chain(chain)
    # HERE
    return str(total + 1)
'''

#: snippet name -> (a line put in GOOD's use(), the error mypy must report)
BAD = {
    "wrong_argument_type": (
        'await add.enqueue("forty", 2)',
        'Argument 1 to "enqueue" of "TaskFunction" has incompatible type "str"; expected "int"',
    ),
    "missing_argument": (
        "await add.enqueue(40)",
        'Missing positional argument "b" in call to "enqueue" of "TaskFunction"',
    ),
    "unknown_keyword": (
        "await add.enqueue(40, 2, delay=5)",
        'Unexpected keyword argument "delay" for "enqueue" of "TaskFunction"',
    ),
    "wrong_use_of_the_result": (
        "(await (await add.enqueue(1, 2)).result()).upper()",
        '"int" has no attribute "upper"',
    ),
    "wrong_link_argument": (
        "label.link(3)",
        'Argument 1 to "link" of "TaskFunction" has incompatible type "int"; expected "str"',
    ),
    "wrong_job_argument": (
        "add.job(1, None)",
        'Argument 2 to "job" of "TaskFunction" has incompatible type "None"; expected "int"',
    ),
}


def test_mypy_accepts_right_code_and_catches_mistakes(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    for name, (line, _) in BAD.items():
        (tmp_path / f"{name}.py").write_text(GOOD.replace("# HERE", line))
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--show-error-codes",
         "--no-error-summary", *sorted(p.name for p in tmp_path.glob("*.py"))],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(Path(tasqueue_anyio.__file__).parent.parent)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        file, _, rest = line.partition(":")
        if ": error: " in rest:
            errors.setdefault(file.removesuffix(".py"), []).append(rest.split(": error: ", 1)[1])
    assert "good" not in errors, errors["good"]
    for name, (_, expected) in BAD.items():
        assert any(expected in error for error in errors.get(name, [])), (name, errors.get(name))
    assert set(errors) == set(BAD), done.stdout + done.stderr
