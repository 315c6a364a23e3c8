"""The documentation site, built once per test session for the tests that read it.

The build is the one the README gives (`python -m sphinx -W --keep-going -b html docs OUT`).
It executes the tour notebook, and myst-nb keeps what that run gave in
``jupyter_execute/adamax_tour.ipynb`` beside ``OUT``: tests/test_docs.py reads the site and
tests/test_notebook.py that executed notebook, so the tour runs once a session
(tests/conftest.py's ``docs_build`` fixture).
"""

import dataclasses
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def readable_tempdir():
    # LinkChecker run as root drops to `nobody`, which must be able to read the site.
    path = Path(tempfile.mkdtemp(prefix="adamax-docs-"))
    path.chmod(0o755)
    return path


def make_readable(path):
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IRGRP | stat.S_IROTH | (0o055 if p.is_dir() else 0))


def sphinx(source, out, conf_dir=None, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env)
    args = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    if conf_dir is not None:
        args += ["-c", str(conf_dir)]
    return subprocess.run(
        [*args, str(source), str(out)], env=env, capture_output=True, text=True, timeout=600
    )


@dataclasses.dataclass(frozen=True)
class Build:
    """A build of the site under `root`, and what Sphinx returned."""

    root: Path
    result: subprocess.CompletedProcess

    @property
    def html(self):
        return self.root / "html"

    @property
    def tour(self):
        """The tour notebook as the build executed it."""
        return self.root / "jupyter_execute" / "adamax_tour.ipynb"

    @property
    def gif(self):
        """Where the tour writes its animation (`ADAMAX_TOUR_GIF`): proof that it ran."""
        return self.root / "tour.gif"

    def log(self, limit=5000):
        return self.result.stdout[-limit:] + self.result.stderr[-limit:]


def build(root=None):
    """Builds the site into `root` (made readable), or a new readable temporary directory
    that the caller removes."""
    if root is None:
        root = readable_tempdir()
    root = Path(root)
    root.chmod(0o755)
    result = sphinx(DOCS, root / "html", ADAMAX_TOUR_GIF=str(root / "tour.gif"))
    make_readable(root)
    return Build(root, result)
