"""Every self-contained Python example in the README runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# An example that starts with an import is meant to run on its own; the others
# are fragments that continue an earlier one.
RUNNABLE = [b for b in BLOCKS if b.lstrip().startswith(("import ", "from "))]


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 8, len(RUNNABLE)


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(RUNNABLE[index])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(README.parent)
    env["KERAS_BACKEND"] = "jax"
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, RUNNABLE[index][:200] + "\n" + result.stderr[-3000:]
