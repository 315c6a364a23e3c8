"""The tour notebook: committed with its outputs, and it still runs clean from the top.

It runs once a session, in the build of the documentation site that executes it (the
``docs_build`` fixture of tests/conftest.py); these tests read what that run gave.
"""

import ast
import pathlib

import pytest

import adamax_jax

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")  # what myst-nb executes the notebook with

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "adamax_tour.ipynb"

# Cells whose printed output does not depend on the machine (no versions, sizes
# or digits at the level of float64 rounding), found by a line of their source.
EXACT_CELLS = ("adamax_step(*inputs)", "assert dist[-1] < 1e-6")


def _code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


def _mimetypes(nb):
    return [key for cell in _code_cells(nb) for o in cell.outputs for key in o.get("data", {})]


@pytest.fixture(scope="module")
def committed():
    return nbformat.read(NOTEBOOK, as_version=4)


@pytest.fixture(scope="module")
def executed(docs_build):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # myst-nb executes it with a python3 kernel, and a cell that raises fails the build.
    assert docs_build.tour.is_file(), "the tour was not executed:\n" + docs_build.log()
    nb = nbformat.read(docs_build.tour, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    # The GIF went where it was told to go (the build's temporary directory, removed with
    # it), not over the committed one.
    assert docs_build.gif.read_bytes()[:6] == b"GIF89a"
    return nb


def test_committed_notebook_carries_its_outputs(committed):
    cells = _code_cells(committed)
    assert committed.metadata.kernelspec.name == "python3"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert all(c.outputs for c in cells)
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    mimetypes = _mimetypes(committed)
    assert mimetypes.count("image/png") >= 4
    assert mimetypes.count("image/gif") == 1


def test_notebook_uses_only_the_public_api(committed):
    public = set(adamax_jax.__all__) | {"__version__"}
    imported = set()
    for cell in _code_cells(committed):
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "adamax_jax" in node.module:
                assert node.module == "adamax_jax", node.module
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("adamax_jax."), alias.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "adamax_jax":
                    assert node.attr in public, node.attr
    assert imported and imported <= public, imported


def test_notebook_covers_the_tour(committed):
    source = "\n".join(cell.source for cell in _code_cells(committed))
    for needle in (
        "PillowWriter",
        ".contour(",
        "optax.adam(",
        "optax.sgd(LR, momentum=0.9)",
        "optax.adagrad(",
        "optax.rmsprop(",
        "load_digits",
        "jax.jit",
        "adamax_step(",
    ):
        assert needle in source, needle


def test_notebook_runs_without_errors(executed):
    cells = _code_cells(executed)
    assert all(c.execution_count is not None for c in cells)
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else None
    assert _mimetypes(executed).count("image/gif") == 1


@pytest.mark.parametrize("marker", EXACT_CELLS)
def test_committed_outputs_are_current(committed, executed, marker):
    def find(nb):
        (cell,) = [c for c in _code_cells(nb) if marker in c.source]
        return _stdout(cell)

    fresh = find(executed)
    assert fresh
    assert find(committed) == fresh
