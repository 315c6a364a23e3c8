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
from tests import background

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


def _build(out):
    """The wheel and the sdist, built into `out` from a copy of the checkout."""
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


def build_and_install(out):
    """Builds the archives, installs the wheel in a new environment and runs its doctests
    there, in folders under `out` (a job started with the session, tests/background.py).

    Returns:
        The wheel, the sdist, the new environment's python and its home folder, and the
        doctests' completed process.
    """
    dist = out / "dist"
    dist.mkdir()
    wheel, sdist = _build(dist)
    home = out / "venv"
    home.mkdir()
    python = _install(wheel, home)
    return wheel, sdist, python, home, _doctests(python, home)


@pytest.fixture(scope="module")
def package():
    pytest.importorskip("build")
    return background.value("package")


@pytest.fixture(scope="module")
def dist(package):
    return package[:2]


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


def _install(wheel, home):
    """A new environment in `home` with `wheel` installed; its python."""
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
    return python


@pytest.fixture(scope="module")
def venv(package):
    return package[2:4]


def test_the_wheel_is_what_the_new_environment_imports(venv):
    python, home = venv
    result = _run([python, "-c", "import adamax_jax; print(adamax_jax.__file__)"], home)
    imported = Path(result.stdout.strip()).resolve()
    assert imported.is_relative_to(home.resolve()), imported
    assert not imported.is_relative_to(ROOT), imported


def _doctests(python, home):
    """The installed package's doctests, run in its environment."""
    return subprocess.run(
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
        cwd=home,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_installed_package_passes_its_doctests(package):
    result = package[4]
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout


def test_the_installed_demo_checks_the_worked_examples(venv):
    python, home = venv
    result = _run([python, "-m", "adamax_jax", "--no-digits"], home)
    assert "worked examples" in result.stdout
    assert result.stdout.count("  ok") >= 5, result.stdout
    assert "FAILED" not in result.stdout


def pyright(*args):
    exe = shutil.which("pyright", path=str(Path(sys.executable).parent))
    assert exe, "pyright is not installed (it is in the `test` extra)"
    env = _env()
    # pyright resolves imports with the sys.path of the first `python` on PATH: this one,
    # with the source tree first (pyright cannot follow an editable install's import hook).
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(
        [exe, "--outputjson", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_pyright_finds_no_type_errors():
    # Standard mode, configured in pyproject.toml's [tool.pyright]; run from the start of
    # the session (tests/background.py).
    result = background.value("pyright")
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
    result = pyright("--verifytypes", "adamax_jax", "--ignoreexternal")
    report = json.loads(result.stdout)["typeCompleteness"]
    unknown = [
        f"{s['name']}: {[d['message'] for d in s['diagnostics']]}"
        for s in report["symbols"]
        if not s["isTypeKnown"]
    ]
    assert not unknown, "\n".join(unknown)
    assert report["completenessScore"] == 1.0
    assert report["exportedSymbolCounts"]["withKnownType"] >= len(adamax_jax.__all__)
