"""Every Python example in the README and the documentation pages runs, and prints what it says.

Three kinds of fenced block are run:

- a ```` ```python ```` block that starts with an import runs on its own as a script; a
  ```` ```python ```` block that does not continues the last one of the same page, and runs
  after it;
- a ```` ```text ```` block right after a script (or after a paragraph that says "prints" and
  ends in a colon) is what that script must print; it is compared with doctest's rules
  (``...`` matches anything, runs of whitespace are equal);
- the ```` ```pycon ```` blocks (``>>>``) of a page run as one doctest, in order.

A ```` ```py ```` block is a fragment of a larger program (a step of a recipe whose whole
program is run elsewhere, as the resuming page's is by tests/test_resume.py): shown, not run.

Each runs in a fresh interpreter, with warnings as errors, from a temporary directory.
"""

import doctest
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Script:
    page: str
    line: int
    source: str
    expected: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(text):
    """(language, body, line, prose before it) for every fenced block of a Markdown page."""
    out, end = [], 0
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((m.group(1), m.group(2), line, text[end : m.start()]))
        end = m.end()
    return out


def _scripts(path, root=ROOT):
    scripts, last = [], None
    name = str(path.relative_to(root))
    for lang, body, line, before in _blocks(path.read_text()):
        if lang == "python":
            if body.lstrip().startswith(("import ", "from ")):
                last = Script(name, line, body)
            elif last is not None:
                last = Script(name, line, last.source + "\n" + body)
            else:
                raise AssertionError(f"{name}:{line}: a fragment with no example before it")
            scripts.append(last)
        elif lang == "text" and scripts and scripts[-1] is last:
            said = before.strip().split("\n\n")[-1]
            if not said or ("prints" in said and said.endswith(":")):
                assert last.expected is None, f"{name}:{line}: two outputs for one example"
                last.expected = body
    return scripts


def _doctest_source(path):
    blocks = [body for lang, body, _, _ in _blocks(path.read_text()) if lang == "pycon"]
    return "\n".join(blocks)


SCRIPTS = [s for page in PAGES for s in _scripts(page)]
DOCTEST_PAGES = [p for p in PAGES if _doctest_source(p)]


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    env["KERAS_BACKEND"] = "jax"
    return subprocess.run(
        [sys.executable, "-W", "error", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pages_have_examples():
    assert len([s for s in SCRIPTS if s.page == "README.md"]) >= 1
    assert len(SCRIPTS) >= 12, [s.id for s in SCRIPTS]
    assert len([s for s in SCRIPTS if s.expected is not None]) >= 6
    assert len(DOCTEST_PAGES) >= 1


def test_parser_pairs_outputs_with_their_scripts(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport a\n```\n\n```text\n1\n```\n\n"
        "Prose that prints.\n\n```text\nnot an output\n```\n\n"
        "```python\nb = 2\n```\n\nIt prints:\n\n```text\n2\n```\n"
    )
    first, second = _scripts(page, root=tmp_path)
    assert (first.source, first.expected) == ("import a\n", "1\n")
    assert (second.source, second.expected) == ("import a\n\nb = 2\n", "2\n")


def _matches(expected, got):
    return doctest.OutputChecker().check_output(expected, got, FLAGS)


def test_output_check_can_fail():
    assert _matches("[1.002 1.002 1.002]\n", "[1.002   1.002 1.002]\n")
    assert _matches("loss ...e-1..., b 0.300\n", "loss 1.08e-12, b 0.300\n")
    assert not _matches("[1.002 1.002 1.002]\n", "[1.001 1.002 1.002]\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.id for s in SCRIPTS])
def test_example_runs_and_prints_what_it_says(script, tmp_path):
    path = tmp_path / "example.py"
    path.write_text(script.source)
    result = _run([str(path)], tmp_path)
    assert result.returncode == 0, script.source[:200] + "\n" + result.stderr[-3000:]
    if script.expected is not None:
        assert _matches(script.expected, result.stdout), (
            f"{script.id} promises\n{script.expected}but prints\n{result.stdout}"
        )


@pytest.mark.parametrize("page", DOCTEST_PAGES, ids=[p.name for p in DOCTEST_PAGES])
def test_page_doctests(page, tmp_path):
    path = tmp_path / "page.txt"
    path.write_text(_doctest_source(page))
    code = (
        "import doctest, sys\n"
        f"r = doctest.testfile({str(path)!r}, module_relative=False, optionflags={FLAGS})\n"
        "sys.exit(1 if r.failed or not r.attempted else 0)\n"
    )
    result = _run(["-c", code], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
