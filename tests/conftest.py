"""Makes JAX strict, so that silent dtype or rank promotions fail loudly.

Also: the long worker subprocesses start with the session (tests/background.py),
hypothesis keeps no example database (nothing is written into the
repository), compiled programs are cached for the session, under ``CI=true``
a run with any skipped test fails, and the documentation site is built at
most once a session, in the background (``docs_build``).
"""

import os
import shutil
import tempfile

import hypothesis
import jax
import pytest

from tests import background

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Many tests build the same step again (a new optimizer each time, the same
# program): JAX's compilation cache, kept for this session only in a fresh
# folder, hands back the compiled program instead of compiling it again. Every
# compile is kept, however short, since short ones are most of the suite's.
# Subprocesses (the workers, the benchmark) do not share it.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="adamax-jax-tests-")
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# No `.hypothesis/` directory in the checkout: the examples that matter are pinned
# in the tests (`derandomize`, `@example`), and a database would make a run depend
# on what earlier runs found.
hypothesis.settings.register_profile("adamax_jax", database=None)
hypothesis.settings.load_profile("adamax_jax")


@pytest.fixture
def standard_promotion():
    """For code under test that is not ours (optax, keras) and promotes implicitly."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="session")
def docs_build():
    """The site, built once (tests/docs_build.py): the docs tests read it, the notebook
    tests the tour as the build executed it."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    # Built in the background from the start of the session; its folder goes with the others.
    return background.value("docs")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _module(item) -> str | None:
    module = getattr(item, "module", None)
    return None if module is None else module.__name__


def pytest_collection_modifyitems(session, config, items):
    """Runs the modules that read background jobs last, and starts those jobs
    (tests/background.py): they run while the other tests do."""
    readers = background.modules()
    items[:] = [i for i in items if _module(i) not in readers] + [
        i for i in items if _module(i) in readers
    ]
    if not config.option.collectonly:
        background.queue([m for m in map(_module, items) if m is not None])


def pytest_sessionfinish(session, exitstatus):
    """Under ``CI=true``, a skipped test fails the run.

    CI installs every test dependency (``pip install -e ".[test]"`` and torch), so
    a skip there means a check did not run that should have: a missing package, a
    backend that was not the expected one. Locally a skip is only reported
    (``-ra`` lists each with its reason).
    """
    background.stop()
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)
    if not _ci() or exitstatus != pytest.ExitCode.OK:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Says why a CI run with skips failed, after the summary of the skips."""
    skipped = terminalreporter.stats.get("skipped", [])
    if _ci() and skipped:
        terminalreporter.write_line(
            f"CI=true: {len(skipped)} test(s) skipped; every check must run in CI, so the "
            "run fails.",
            red=True,
        )
