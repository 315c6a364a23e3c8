"""The release: a wheel and an sdist that twine accepts, a wheel that works on its own, and types.

The wheel is built from the sdist (as `python -m build` does), installed into a fresh virtual
environment, and the package's doctests and the demo's worked examples run there, away from
the source tree, so a file missing from either archive fails here. The new environment reuses
this one's third-party packages (jax, optax, ...) through a path file, without their
`.pth` hooks, so the source tree's editable install is not seen and nothing is downloaded.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import adamax_jax

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p.name for p in (ROOT / "adamax_jax").glob("*.py"))


def _env():
    # Nothing from the source tree: no PYTHONPATH, no XLA flags from other tests.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}


def _run(args, cwd, timeout=600):
    result = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # A copy of the tracked and untracked-but-not-ignored files, so that the build leaves
    # nothing (build/, *.egg-info) in the working tree.
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    src = out / "src"
    for name in filter(None, files):
        path = ROOT / name
        if path.is_file() and not path.is_symlink():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    # No isolation: the build backend comes from the `release` extra, so nothing is fetched.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], out)
    (wheel,) = out.glob("adamax_jax-*.whl")
    (sdist,) = out.glob("adamax_jax-*.tar.gz")
    return wheel, sdist


def test_archives_are_named_for_the_version(dist):
    wheel, sdist = dist
    assert wheel.name == f"adamax_jax-{adamax_jax.__version__}-py3-none-any.whl"
    assert sdist.name == f"adamax_jax-{adamax_jax.__version__}.tar.gz"


def test_twine_accepts_both_archives(dist):
    result = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist)], ROOT)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_archives_hold_every_module_the_types_marker_and_the_license(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"adamax_jax-{adamax_jax.__version__}.dist-info/METADATA").decode()
    for module in [*MODULES, "py.typed"]:
        assert f"adamax_jax/{module}" in names, module
    assert not [n for n in names if n.startswith(("tests/", "docs/", "notebooks/"))]
    assert any(n.endswith("licenses/LICENSE") for n in names), sorted(names)
    assert f"Version: {adamax_jax.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: " in metadata and "Classifier: Typing :: Typed" in metadata
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for module in [*MODULES, "py.typed"]:
        assert f"adamax_jax/{module}" in members, module
    assert {"README.md", "LICENSE", "pyproject.toml"} <= members


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    wheel, _ = dist
    home = tmp_path_factory.mktemp("venv")
    env_dir = home / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], home)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # This environment's packages, after the new one's own: a plain path, whose own .pth
    # files (the editable install of the source tree among them) are not run.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    ours |= set(site.getsitepackages())
    (purelib / "zz_parent.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], home)
    return python, home


def test_the_wheel_is_what_the_new_environment_imports(venv):
    python, home = venv
    result = _run([python, "-c", "import adamax_jax; print(adamax_jax.__file__)"], home)
    imported = Path(result.stdout.strip()).resolve()
    assert imported.is_relative_to(home.resolve()), imported
    assert not imported.is_relative_to(ROOT), imported


def test_the_installed_package_passes_its_doctests(venv):
    python, home = venv
    result = _run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "--doctest-modules",
            "--pyargs",
            "adamax_jax",
        ],
        home,
    )
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout


def test_the_installed_demo_checks_the_worked_examples(venv):
    python, home = venv
    result = _run([python, "-m", "adamax_jax", "--no-digits"], home)
    assert "worked examples" in result.stdout
    assert result.stdout.count("  ok") >= 5, result.stdout
    assert "FAILED" not in result.stdout


def _pyright(*args):
    pyright = shutil.which("pyright", path=str(Path(sys.executable).parent))
    assert pyright, "pyright is not installed (it is in the `test` extra)"
    env = _env()
    # pyright resolves imports with the sys.path of the first `python` on PATH: this one,
    # with the source tree first (pyright cannot follow an editable install's import hook).
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(
        [pyright, "--outputjson", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_pyright_finds_no_type_errors():
    # Standard mode, configured in pyproject.toml's [tool.pyright].
    result = _pyright("adamax_jax")
    report = json.loads(result.stdout)
    errors = [
        f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}"
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]
    assert not errors, "\n".join(errors)
    assert report["summary"]["filesAnalyzed"] >= len(MODULES)
    assert result.returncode == 0, result.stdout[-3000:]


def test_the_public_api_is_fully_annotated():
    # What `py.typed` promises: every symbol the package exports has a known type.
    result = _pyright("--verifytypes", "adamax_jax", "--ignoreexternal")
    report = json.loads(result.stdout)["typeCompleteness"]
    unknown = [
        f"{s['name']}: {[d['message'] for d in s['diagnostics']]}"
        for s in report["symbols"]
        if not s["isTypeKnown"]
    ]
    assert not unknown, "\n".join(unknown)
    assert report["completenessScore"] == 1.0
    assert report["exportedSymbolCounts"]["withKnownType"] >= len(adamax_jax.__all__)
