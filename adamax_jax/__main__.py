"""The demo, ``python -m adamax_jax``: the worked examples and a small model, checked.

It runs the three published worked examples of one step through
:func:`adamax_jax.adamax_step` and the two classic toy problems (in float64,
as the published NumPy loop, and in float32), trains a small MLP on
scikit-learn's bundled digits against ``optax.adam``, and prints a compact
report. ``--plot PATH`` saves a figure (needs matplotlib). The exit status is
1 if a worked example or a toy problem misses its tolerance, 0 otherwise.

Install the extras first: ``python -m pip install ".[demo]"``.
"""

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import numpy as np
import optax

import adamax_jax
from adamax_jax import _problems as p
from adamax_jax._transform import adamax

# Tolerances of the published walk-throughs: the 1-D problem is within 5e-3 of
# its minimum after 200 steps and within 1e-6 after 1000; the 2-D one within
# 1e-6 after 1000.
CUBIC_TOL_200 = 5e-3
TOY_TOL_END = 1e-6

# One learning rate for both optimizers, so that the curves compare the rules.
DIGITS_LEARNING_RATE = 5e-3


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adamax_jax",
        description="AdaMax on the worked examples, two toy problems and a small model.",
    )
    parser.add_argument("--plot", metavar="PATH", help="save the figure (PNG) to PATH")
    parser.add_argument(
        "--epochs", type=int, default=20, help="epochs of the digits model (default: 20)"
    )
    parser.add_argument("--no-digits", action="store_true", help="skip the digits model")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"`--epochs` must be >= 1, got {args.epochs}.")
    return args


def _fmt(x: Any) -> str:
    values = np.atleast_1d(np.asarray(x, np.float64))
    text = ", ".join(f"{v:.6g}" for v in values)
    return text if np.ndim(x) == 0 else f"[{text}]"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def _reference_cases(out: TextIO) -> bool:
    print("worked examples (adamax_step, float32, α=0.002 β₁=0.9 β₂=0.999 ε=1e-8)", file=out)
    all_ok = True
    for case in p.REFERENCE_CASES:
        (param, m, u), ok = p.check_reference_case(case)
        all_ok = all_ok and ok
        got = f"({_fmt(param)}, {_fmt(m)}, {_fmt(u)})"
        if ok:
            rounded = "" if case.decimals is None else f" (param to {case.decimals} places)"
            verdict = f"as published{rounded}"
        else:
            verdict = "published as (" + ", ".join(_fmt(e) for e in case.expected) + ")"
        print(f"  {case.name:<13} {got}  {verdict}  {_verdict(ok)}", file=out)
    return all_ok


def _toy_problems(out: TextIO) -> tuple[bool, dict[str, np.ndarray]]:
    lr = p.TOY_LEARNING_RATE
    runs = {
        "cubic64": p.step_trajectory(p.cubic_grad, p.CUBIC_START, dtype=np.float64),
        "cubic32": p.step_trajectory(p.cubic_grad, p.CUBIC_START),
        "quad64": p.trajectory(adamax(lr), p.quadratic_grad, p.QUADRATIC_START, dtype=np.float64),
        "quad32": p.trajectory(adamax(lr), p.quadratic_grad, p.QUADRATIC_START),
    }
    d_cubic = p.distance(runs["cubic64"], p.CUBIC_MINIMUM)
    d_quad = p.distance(runs["quad64"], p.QUADRATIC_MINIMUM)
    cubic_ok = d_cubic[200] <= CUBIC_TOL_200 and d_cubic[-1] <= TOY_TOL_END
    quad_ok = d_quad[-1] <= TOY_TOL_END
    f32_cubic = p.distance(runs["cubic32"], p.CUBIC_MINIMUM)[-1]
    f32_quad = p.distance(runs["quad32"], p.QUADRATIC_MINIMUM)[-1]

    steps = p.TOY_STEPS
    print(f"toy problems (lr {lr}, default betas, {steps} steps, float64 as published)", file=out)
    print(
        f"  1-D x - x³ from -1, adamax_step loop: |x + 1/√3| {d_cubic[200]:.1e} at step 200"
        f" (≤ {CUBIC_TOL_200:.0e}), {d_cubic[-1]:.1e} at {steps} (≤ {TOY_TOL_END:.0e})"
        f"  {_verdict(cubic_ok)}",
        file=out,
    )
    print(
        f"  2-D 2x²+2xy+2y²-6x from (1, 0), adamax(): |(x, y) - (2, -1)| {d_quad[-1]:.1e}"
        f" at {steps} (≤ {TOY_TOL_END:.0e})  {_verdict(quad_ok)}",
        file=out,
    )
    print(
        f"  (in float32 they stall at {f32_cubic:.1e} and {f32_quad:.1e}, where a step is"
        " below half the float32 spacing of x)",
        file=out,
    )
    return bool(cubic_ok and quad_ok), runs


class _Progress:
    """A plain-text progress bar on a stream, redrawn in place."""

    def __init__(self, label: str, total: int, stream: TextIO, width: int = 24):
        self.label, self.total, self.stream, self.width = label, total, stream, width

    def __call__(self, done: int, loss: float, accuracy: float) -> None:
        # Redrawing in place only makes sense on a terminal; a log gets the
        # finished bar alone.
        if done < self.total and not self.stream.isatty():
            return
        filled = round(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(
            f"\r  {self.label:<7}[{bar}] {done}/{self.total} epochs"
            f"  loss {loss:.4f}  test accuracy {accuracy:.1%}"
        )
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _digits(out: TextIO, err: TextIO, epochs: int) -> dict[str, Any] | None:
    try:
        data = p.load_digits()
    except ImportError:
        print(
            "digits model: skipped, scikit-learn is not installed"
            ' (python -m pip install "adamax_jax[demo]")',
            file=out,
        )
        return None
    lr = DIGITS_LEARNING_RATE
    sizes = (64, 64, 10)
    print(
        f"digits MLP {'-'.join(map(str, sizes))}, {len(data.y_train)} train /"
        f" {len(data.y_test)} test images, batch 64, lr {lr:g}, {epochs} epochs",
        file=out,
    )
    out.flush()
    histories = {}
    for name, opt in (("adamax", adamax(lr)), ("adam", optax.adam(lr))):
        start = time.perf_counter()
        progress = _Progress(name, epochs, err)
        histories[name] = p.train_mlp(opt, data, epochs=epochs, sizes=sizes, on_epoch=progress)
        seconds = time.perf_counter() - start
        h = histories[name]
        print(
            f"  {name:<7}train loss {h.train_loss[0]:.3f} -> {h.train_loss[-1]:.4f},"
            f" test loss {h.test_loss[-1]:.4f}, test accuracy {h.test_accuracy[-1]:.1%}"
            f"  ({seconds:.1f} s)",
            file=out,
        )
    return histories


def _plot(path: str, runs: dict[str, np.ndarray], digits: dict[str, Any] | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), layout="constrained")
    (ax_curve, ax_err), (ax_contour, ax_digits) = fig.subplots(2, 2)

    xs = runs["cubic64"]
    grid = np.linspace(-1.3, 1.3, 400)
    ax_curve.plot(grid, p.cubic(grid), color="0.4", lw=1)
    shown = xs[:201]
    ax_curve.scatter(shown, p.cubic(shown), c=np.arange(shown.size), cmap="viridis", s=12, zorder=3)
    ax_curve.axvline(p.CUBIC_MINIMUM, ls="--", color="0.6", lw=1)
    ax_curve.set(
        title="f(x) = x − x³ from x = −1: the first 200 steps",
        xlabel="x",
        ylabel="f(x)",
        ylim=(-1.2, 1.2),
    )

    steps = np.arange(xs.size)
    for key, target, label in (
        ("cubic", p.CUBIC_MINIMUM, "1-D"),
        ("quad", p.QUADRATIC_MINIMUM, "2-D"),
    ):
        (line,) = ax_err.semilogy(steps, p.distance(runs[key + "64"], target), label=label)
        ax_err.semilogy(
            steps,
            p.distance(runs[key + "32"], target),
            ls=":",
            color=line.get_color(),
            label=f"{label}, float32",
        )
    ax_err.axhline(TOY_TOL_END, color="0.6", lw=1, ls="--")
    ax_err.text(1000, TOY_TOL_END, "1e-6 ", ha="right", va="bottom", color="0.4")
    ax_err.set(title="distance to the minimum", xlabel="step", ylim=(1e-17, 10))
    ax_err.legend(loc="lower left")

    path2 = runs["quad64"]
    gx, gy = np.meshgrid(np.linspace(0.5, 2.5, 200), np.linspace(-1.5, 0.5, 200))
    levels = p.quadratic(np.stack([gx, gy], axis=-1))
    ax_contour.contour(gx, gy, levels, levels=25, cmap="viridis", linewidths=0.7)
    ax_contour.plot(path2[:, 0], path2[:, 1], color="C3", lw=1.5, marker=".", markevery=25)
    ax_contour.plot(*p.QUADRATIC_START, "o", color="C3")
    ax_contour.plot(*p.QUADRATIC_MINIMUM, "*", color="k", ms=12)
    ax_contour.set(
        title="2x² + 2xy + 2y² − 6x from (1, 0)",
        xlabel="x",
        ylabel="y",
        aspect="equal",
    )

    if digits is None:
        ax_digits.text(0.5, 0.5, "digits: scikit-learn not installed", ha="center")
        ax_digits.set_axis_off()
    else:
        for i, (name, h) in enumerate(digits.items()):
            epochs = np.arange(1, h.train_loss.size + 1)
            ax_digits.plot(epochs, h.train_loss, color=f"C{i}", label=f"{name} train")
            ax_digits.plot(epochs, h.test_loss, color=f"C{i}", ls="--", label=f"{name} test")
        ax_digits.set_yscale("log")
        ax_digits.set(
            title=f"digits MLP, cross-entropy, lr {DIGITS_LEARNING_RATE:g}", xlabel="epoch"
        )
        ax_digits.legend()
    fig.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo.

    Args:
        argv: The command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 when every check passes, 1 otherwise.
    """
    args = _parse(argv)
    out, err = sys.stdout, sys.stderr
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                '`--plot` needs matplotlib: python -m pip install "adamax_jax[demo]"',
                file=err,
            )
            return 2
    start = time.perf_counter()
    print(
        f"adamax_jax {adamax_jax.__version__}, jax {jax.__version__} on {jax.default_backend()}",
        file=out,
    )
    cases_ok = _reference_cases(out)
    toys_ok, runs = _toy_problems(out)
    digits = None if args.no_digits else _digits(out, err, args.epochs)
    if args.plot:
        _plot(args.plot, runs, digits)
        print(f"figure saved to {args.plot}", file=out)
    ok = cases_ok and toys_ok
    print(
        f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}"
        f" in {time.perf_counter() - start:.1f} s",
        file=out,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
