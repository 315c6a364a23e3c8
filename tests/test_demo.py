import importlib.util
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamax_jax as ax
from adamax_jax import _problems as p

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def numpy_loop(grad, start, steps=1000, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """The published NumPy loop, as written there: it adds `update = -lr_hat * m / (u + eps)`."""
    point = np.array(start, dtype=np.float64)
    moment = np.zeros_like(point)
    weight = np.zeros_like(point)
    points = [point.copy()]
    for i in range(steps):
        learning_rate_hat = lr / (1 - b1 ** (i + 1))
        moment = b1 * moment + (1 - b1) * grad(point)
        weight = np.maximum(b2 * weight, abs(grad(point)))
        update = -learning_rate_hat * moment / (weight + eps)
        point = point + update
        points.append(point.copy())
    return np.stack(points)


def numpy_fdash(x):
    return 1 - 3 * (x**2)


def numpy_gradient(point):
    x, y = point[0], point[1]
    return np.array([4 * x + 2 * y - 6, 2 * x + 4 * y], dtype=np.float64)


PROBLEMS = {
    "cubic": (p.cubic_grad, numpy_fdash, p.CUBIC_START, p.CUBIC_MINIMUM),
    "quadratic": (p.quadratic_grad, numpy_gradient, p.QUADRATIC_START, p.QUADRATIC_MINIMUM),
}


def _run(kind, problem, dtype):
    grad, _, start, _ = PROBLEMS[problem]
    if kind == "adamax":
        return p.trajectory(ax.adamax(p.TOY_LEARNING_RATE), grad, start, dtype=dtype)
    return p.step_trajectory(grad, start, dtype=dtype)


# The published results, typed in from the document.
PRINTED = {
    "scalar, t=1": (0.998, 0.01, 0.1),
    "vector, t=1": ([0.998, 1.998, 2.998], [0.01, 0.02, 0.03], [0.1, 0.2, 0.3]),
    "history, t=5": (0.49925, 0.023, 0.14985),
}


@pytest.mark.parametrize("index", range(len(p.REFERENCE_CASES)))
def test_reference_cases_pass_and_match_the_document(index):
    case = p.REFERENCE_CASES[index]
    got, ok = p.check_reference_case(case)
    assert ok, case.name
    printed = PRINTED[case.name]
    chex.assert_trees_all_close(case.expected, printed, rtol=0, atol=0)
    # The document rounds the third case's parameter to five places.
    atol = 5e-6 if case.name == "history, t=5" else 1e-7
    for value, expected in zip(got, printed, strict=True):
        np.testing.assert_allclose(value, np.asarray(expected, np.float32), rtol=1e-6, atol=atol)


@pytest.mark.parametrize("index", range(len(p.REFERENCE_CASES)))
@pytest.mark.parametrize("which", [0, 1, 2])
def test_reference_check_catches_a_wrong_expectation(index, which):
    case = p.REFERENCE_CASES[index]
    expected = list(case.expected)
    # Twice the tolerance of a rounded value, far above float32 precision.
    expected[which] = np.asarray(expected[which], np.float64) + 1e-5
    _, ok = p.check_reference_case(case._replace(expected=tuple(expected)))
    assert not ok


@pytest.mark.parametrize(
    ("shift", "accepted"), [(4e-6, True), (-4e-6, True), (6e-6, False), (-6e-6, False)]
)
def test_rounded_value_is_accepted_within_half_a_unit_only(shift, accepted):
    case = p.REFERENCE_CASES[2]
    assert case.decimals == 5
    # The exact result is 0.4992503880: 0.49925 + shift lies 3.6e-6, 4.4e-6,
    # 5.6e-6 and 6.4e-6 from it; half a unit of the fifth place is 5e-6.
    shifted = case._replace(expected=(case.expected[0] + shift, *case.expected[1:]))
    assert p.check_reference_case(shifted)[1] == accepted
    # Without rounding the same shift is far outside float32 precision.
    assert not p.check_reference_case(shifted._replace(decimals=None))[1]


@pytest.mark.parametrize("x", [-1.0, -0.3, 0.0, 0.8])
def test_cubic_grad_is_the_derivative(x):
    x = jnp.float32(x)
    chex.assert_trees_all_close(p.cubic_grad(x), jax.grad(p.cubic)(x), rtol=1e-6)


@pytest.mark.parametrize("point", [(1.0, 0.0), (2.0, -1.0), (-0.5, 3.0)])
def test_quadratic_grad_is_the_gradient(point):
    point = jnp.asarray(point, jnp.float32)
    chex.assert_trees_all_close(p.quadratic_grad(point), jax.grad(p.quadratic)(point), rtol=1e-6)


def test_minima_are_minima():
    # Derivatives of the package's own functions, by autodiff in float64: the gradient
    # vanishes at the stated minimum and the curvature there is positive.
    with jax.enable_x64(True):
        x = jnp.float64(p.CUBIC_MINIMUM)
        assert abs(float(jax.grad(p.cubic)(x))) < 1e-15
        assert float(jax.grad(jax.grad(p.cubic))(x)) > 0
        xy = jnp.asarray(p.QUADRATIC_MINIMUM, jnp.float64)
        np.testing.assert_array_equal(np.asarray(jax.grad(p.quadratic)(xy)), [0.0, 0.0])
        hessian = np.asarray(jax.hessian(p.quadratic)(xy))
    assert np.all(np.linalg.eigvalsh(hessian) > 0), hessian
    # The written-out gradients the demo steps with are those of the functions.
    with jax.enable_x64(True):
        for x in (-1.3, -0.2, 0.7):
            assert float(p.cubic_grad(jnp.float64(x))) == pytest.approx(
                float(jax.grad(p.cubic)(jnp.float64(x))), rel=1e-14
            )
        for point in ((1.0, 0.0), (-2.0, 3.5)):
            point = jnp.asarray(point, jnp.float64)
            np.testing.assert_allclose(
                p.quadratic_grad(point), jax.grad(p.quadratic)(point), rtol=1e-14
            )


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("kind", ["adamax", "adamax_step"])
def test_float64_trajectory_is_the_published_loops(kind, problem):
    _, numpy_grad, start, _ = PROBLEMS[problem]
    got = _run(kind, problem, np.float64)
    assert got.dtype == np.float64
    expected = numpy_loop(numpy_grad, start)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["adamax", "adamax_step"])
def test_cubic_meets_the_published_tolerances(kind):
    d = p.distance(_run(kind, "cubic", np.float64), p.CUBIC_MINIMUM)
    assert d.shape == (p.TOY_STEPS + 1,)
    assert d[0] == pytest.approx(1 - 1 / math.sqrt(3))
    assert d[200] <= 5e-3
    assert d[-1] <= 1e-6
    # Not yet there at 100: the tolerance at 200 is a real test.
    assert d[100] > 5e-3


@pytest.mark.parametrize("kind", ["adamax", "adamax_step"])
def test_quadratic_meets_the_published_tolerance(kind):
    path = _run(kind, "quadratic", np.float64)
    assert path.shape == (p.TOY_STEPS + 1, 2)
    np.testing.assert_array_equal(path[0], [1.0, 0.0])
    assert p.distance(path, p.QUADRATIC_MINIMUM)[-1] <= 1e-6


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("kind", ["adamax", "adamax_step"])
def test_float32_trajectory_follows_float64_until_it_stalls(kind, problem):
    got = _run(kind, problem, np.float32)
    assert got.dtype == np.float32
    expected = numpy_loop(PROBLEMS[problem][1], PROBLEMS[problem][2])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    target = PROBLEMS[problem][3]
    assert p.distance(got, target)[-1] <= 1e-5


def test_distance_is_the_largest_coordinate_gap():
    d = p.distance(np.array([[2.0, -1.0], [2.5, -0.9], [1.0, 1.0]]), (2.0, -1.0))
    np.testing.assert_allclose(d, [0.0, 0.5, 2.0])


def test_load_digits_split():
    pytest.importorskip("sklearn")
    data = p.load_digits()
    assert len(data.y_train) + len(data.y_test) == 1797
    assert len(data.y_test) == round(0.2 * 1797)
    assert data.x_train.shape == (len(data.y_train), 64) and data.x_train.dtype == np.float32
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    assert set(np.unique(data.y_test)) == set(range(10))
    again = p.load_digits()
    np.testing.assert_array_equal(again.y_test, data.y_test)


def test_init_mlp_shapes():
    params = p.init_mlp(jax.random.key(0), (64, 16, 10))
    chex.assert_trees_all_equal_shapes(
        params,
        [
            {"w": jnp.zeros((64, 16)), "b": jnp.zeros(16)},
            {"w": jnp.zeros((16, 10)), "b": jnp.zeros(10)},
        ],
    )
    assert p.mlp(params, jnp.zeros((5, 64), jnp.float32)).shape == (5, 10)


def test_train_mlp_learns_the_digits():
    pytest.importorskip("sklearn")
    data = p.load_digits()
    seen = []
    history = p.train_mlp(ax.adamax(0.01), data, epochs=5, on_epoch=lambda *args: seen.append(args))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([s[1] for s in seen], history.train_loss)
    np.testing.assert_allclose([s[2] for s in seen], history.test_accuracy)
    # Chance is a loss of ln 10 = 2.3 and an accuracy of 10%.
    assert history.train_loss[-1] < 0.3 * history.train_loss[0]
    assert history.test_loss[-1] < 0.5
    assert history.test_accuracy[-1] >= 0.9


def test_importing_the_demo_runs_nothing(capsys):
    # A fresh module object from the file, so the top level really runs here.
    path = os.path.join(REPO, "adamax_jax", "__main__.py")
    spec = importlib.util.spec_from_file_location("adamax_demo_import_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_demo_exits_non_zero_when_a_reference_case_fails(monkeypatch, capsys):
    from adamax_jax.__main__ import main

    case = p.REFERENCE_CASES[0]
    wrong = case._replace(expected=(0.997, *case.expected[1:]))
    monkeypatch.setattr(p, "REFERENCE_CASES", (wrong, *p.REFERENCE_CASES[1:]))
    assert main(["--no-digits"]) == 1
    out = capsys.readouterr().out
    assert "published as (0.997, 0.01, 0.1)  FAILED" in out
    assert out.splitlines()[-1].startswith("SOME CHECKS FAILED")


def test_demo_exits_non_zero_when_a_toy_problem_misses(monkeypatch, capsys):
    from adamax_jax import __main__ as demo

    # The float64 run ends 1.2e-10 from the minimum; a stricter bound fails.
    monkeypatch.setattr(demo, "TOY_TOL_END", 1e-12)
    assert demo.main(["--no-digits"]) == 1
    out = capsys.readouterr().out
    assert sum(line.endswith("FAILED") for line in out.splitlines()) == 1


def test_demo_without_scikit_learn_skips_the_digits(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    from adamax_jax.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "digits model: skipped, scikit-learn is not installed" in out
    assert "test accuracy" not in out


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--unknown"]])
def test_demo_rejects_bad_arguments(argv, capsys):
    from adamax_jax.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: python -m adamax_jax" in capsys.readouterr().err


def test_python_dash_m_report_figure_and_progress(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    figure = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "adamax_jax", "--plot", str(figure), "--epochs", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, out + err
    assert figure.read_bytes()[:8] == PNG_MAGIC
    lines = out.splitlines()
    case_lines = [line for line in lines if line.startswith("  ") and "as published" in line]
    assert len(case_lines) == 3 and all(line.endswith("ok") for line in case_lines)
    assert sum(line.startswith(("  1-D", "  2-D")) and line.endswith("ok") for line in lines) == 2
    assert any(line.startswith("  adamax ") and "test accuracy" in line for line in lines)
    assert any(line.startswith("  adam ") and "test accuracy" in line for line in lines)
    assert lines[-1].startswith("all checks passed")
    assert "FAILED" not in out
    # The finished progress bars, one per optimizer.
    assert err.count("[" + "#" * 24 + "] 2/2 epochs") == 2


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from adamax_jax.__main__ import main

    figure = tmp_path / "demo.png"
    assert main(["--plot", str(figure), "--no-digits"]) == 2
    assert "`--plot` needs matplotlib" in capsys.readouterr().err
    assert not figure.exists()
