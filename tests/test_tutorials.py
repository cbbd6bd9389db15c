"""The tutorials run as the pages say: every console block's command is run (on asyncio and,
where the script takes a backend, on Trio) and prints what the page shows; every file the
pages include exists and is run. See ``tutorial_support`` for the rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from tutorial_support import (
    CODE,
    TUTORIAL_DB,
    TUTORIALS,
    ConsoleRun,
    blocks,
    console_runs,
    flush_tutorial_db,
    included_files,
    pages,
    run_command,
)

#: Scripts whose console blocks need workers running beside them: not run by
#: ``test_console_block`` but played, in the page's order, by the test named.
PLAYED_WITH_WORKERS = {
    "producer.py": "test_production_with_redis",
    "report.py": "test_production_with_redis",
    "nats_producer.py": "test_production_with_nats",
}

def _all_runs() -> list[tuple[ConsoleRun, str]]:
    cases: list[tuple[ConsoleRun, str]] = []
    for page in pages():
        for run in console_runs(page):
            if run.script is not None and run.script.name in PLAYED_WITH_WORKERS:
                continue
            cases.append((run, "asyncio"))
            if run.takes_backend:
                cases.append((run, "trio"))
    return cases


@pytest.mark.parametrize(
    ("run", "backend"), _all_runs(), ids=lambda v: v if isinstance(v, str) else f"{v.page}:{v.line}"
)
def test_console_block(run: ConsoleRun, backend: str, request: pytest.FixtureRequest) -> None:
    env: dict[str, str] = {}
    if run.script is not None and "REDIS_URL" in run.script.read_text():
        server = request.getfixturevalue("redis_server")
        flush_tutorial_db(server.port)
        env["REDIS_URL"] = f"redis://127.0.0.1:{server.port}/{TUTORIAL_DB}"
    argv = run.argv + (("trio",) if backend == "trio" else ())
    done = run_command(argv, env)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    problem = run.matches(done.stdout)
    assert problem is None, f"{run.page}:{run.line}: {problem}\n--- printed:\n{done.stdout}"


def test_every_file_is_shown_and_run() -> None:
    """Every file in the code directory is included by a page; every include exists; every
    script is run by a console block or by a test of its own."""
    included: set[Path] = set()
    for page in pages():
        for path in included_files(page):
            assert path.exists(), f"{page.name} includes {path}, which does not exist"
            included.add(path)
    files = {path.resolve() for path in CODE.glob("*.py")}
    assert files - included == set(), "files no page shows"
    run = {r.script.resolve() for page in pages() for r in console_runs(page) if r.script}
    pytests = {p.resolve() for p in CODE.glob("test_*.py")}
    scripts = {p for p in files if 'if __name__ == "__main__":' in p.read_text()}
    assert scripts - run == set(), "scripts that no console block runs"
    for test_file in pytests:
        shown = [r for page in pages() for r in console_runs(page) if test_file.name in r.argv]
        assert shown, f"{test_file.name} is not run by any page's console block"


def test_no_untested_python_on_the_pages() -> None:
    """A tutorial's Python is a file that runs, never a block typed into the page, except a
    ``code-block`` whose caption says it is not run (and why)."""
    for page in pages():
        text = page.read_text()
        assert list(blocks(text, "python")) == [], f"{page.name} has a python block"
        for line in text.splitlines():
            if line.startswith(("```{code-block} python", "````{code-block} python")):
                assert "not run" in text[text.index(line) :].splitlines()[1], (
                    f"{page.name}: a python code-block without ':caption: ... not run ...'"
                )


def test_a_wrong_output_is_caught(tmp_path: Path) -> None:
    """The check itself fails a page whose output differs from what the code prints."""
    page = tmp_path / "page.md"
    page.write_text("```console\n$ python3 first_job.py\nresult: 43\n```\n")
    (run,) = console_runs(page)
    done = run_command(run.argv)
    assert done.returncode == 0
    assert run.matches(done.stdout) is not None
    assert run.takes_backend


def test_the_pages_are_in_order() -> None:
    """The tutorials are numbered, and the site's index lists them in that order."""
    names = [page.stem for page in pages()]
    assert names == sorted(names)
    assert [name[:2] for name in names] == [f"{n:02}" for n in range(1, len(names) + 1)]
    site = (TUTORIALS.parent / "index.md").read_text()
    positions = [site.index(f"tutorials/{name}") for name in names]
    assert positions == sorted(positions)
