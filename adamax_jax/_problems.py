"""The demo's problems: the worked examples, the two toy functions and a digits MLP.

Everything here runs in the default float32. The digits data comes from
scikit-learn's bundled copy (no download); scikit-learn is imported only by
:func:`load_digits`, so the rest works without it.
"""

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax._transform import adamax_step


class ReferenceCase(NamedTuple):
    """One published worked example: the inputs of one step and the printed result.

    Attributes:
        name: A short label.
        inputs: ``(param, grad, m, u, t)``.
        expected: ``(param, m, u)`` as printed.
        decimals: The places ``param`` is printed to, or None where the
            prints the exact value.
    """

    name: str
    inputs: tuple[Any, Any, Any, Any, int]
    expected: tuple[Any, Any, Any]
    decimals: int | None


# The three published cases, with the default hyperparameters
# (α = 0.002, β₁ = 0.9, β₂ = 0.999, ε = 1e-8).
REFERENCE_CASES: tuple[ReferenceCase, ...] = (
    ReferenceCase("scalar, t=1", (1.0, 0.1, 0.0, 0.0, 1), (0.998, 0.01, 0.1), None),
    ReferenceCase(
        "vector, t=1",
        ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 1),
        ([0.998, 1.998, 2.998], [0.01, 0.02, 0.03], [0.1, 0.2, 0.3]),
        None,
    ),
    ReferenceCase("history, t=5", (0.5, 0.05, 0.02, 0.15, 5), (0.49925, 0.023, 0.14985), 5),
)

# float32 carries about seven significant digits.
FLOAT32_RTOL = 1e-6


def check_reference_case(case: ReferenceCase) -> tuple[tuple[np.ndarray, ...], bool]:
    """Runs one reference case through :func:`adamax_step` and compares.

    A value printed rounded may differ by half a unit in its last printed
    place; the others must agree to float32 precision.

    Args:
        case: The case.

    Returns:
        ``((param, m, u), ok)``, the step's results as NumPy arrays.
    """
    got = tuple(np.asarray(x) for x in adamax_step(*case.inputs))
    ok = True
    for i, (value, expected) in enumerate(zip(got, case.expected, strict=True)):
        expected = np.asarray(expected, np.float64)
        atol = 0.5 * 10.0 ** (-case.decimals) if i == 0 and case.decimals is not None else 0.0
        close = np.allclose(value, expected, rtol=FLOAT32_RTOL, atol=atol)
        ok = ok and value.shape == expected.shape and bool(close)
    return got, ok


# f(x) = x - x³, from x = -1; its local minimum is at -1/√3.
CUBIC_START = -1.0
CUBIC_MINIMUM = -1.0 / math.sqrt(3.0)

# f(x, y) = 2x² + 2xy + 2y² - 6x, from (1, 0); its minimum is at (2, -1).
QUADRATIC_START = (1.0, 0.0)
QUADRATIC_MINIMUM = (2.0, -1.0)

# The published walk-throughs: learning rate 0.01, default betas, 1000 iterations.
TOY_LEARNING_RATE = 0.01
TOY_STEPS = 1000


# The toy functions take NumPy arrays (for plots) as well as JAX arrays.
ArrayT = TypeVar("ArrayT", jax.Array, np.ndarray)


def cubic(x: ArrayT) -> ArrayT:
    """The 1-D toy function, ``x - x³``."""
    return x - x**3


def cubic_grad(x: jax.Array) -> jax.Array:
    """Its derivative, ``1 - 3x²``, written out as in the walk-through."""
    return 1 - 3 * x**2


def quadratic(p: ArrayT) -> ArrayT:
    """The 2-D toy function, ``2x² + 2xy + 2y² - 6x``, of ``p = (x, y)``."""
    x, y = p[..., 0], p[..., 1]
    return 2 * x**2 + 2 * x * y + 2 * y**2 - 6 * x


def quadratic_grad(p: jax.Array) -> jax.Array:
    """Its gradient, ``(4x + 2y - 6, 2x + 4y)``, written out as in the walk-through."""
    x, y = p[..., 0], p[..., 1]
    return jnp.stack([4 * x + 2 * y - 6, 2 * x + 4 * y], axis=-1)


def _precision(dtype: jax.typing.DTypeLike) -> contextlib.AbstractContextManager:
    """float64 arrays exist in JAX only inside ``jax.enable_x64``."""
    return jax.enable_x64(True) if np.dtype(dtype).itemsize > 4 else contextlib.nullcontext()


def trajectory(
    opt: optax.GradientTransformation,
    grad_fn: Callable[[jax.Array], jax.Array],
    start: Any,
    steps: int = TOY_STEPS,
    dtype: jax.typing.DTypeLike = np.float32,
) -> np.ndarray:
    """Runs `opt` on a gradient field in one compiled loop.

    Args:
        opt: Any optax optimizer.
        grad_fn: The gradient as a function of the parameters.
        start: The starting point.
        steps: The number of updates.
        dtype: The dtype of the parameters, float32 or float64.

    Returns:
        The points, shape ``(steps + 1, *start.shape)``: the start, then the
        point after each update.
    """
    with _precision(dtype):
        return _trajectory(opt, grad_fn, jnp.asarray(start, dtype), steps)


def _trajectory(opt, grad_fn, x0, steps):
    @jax.jit
    def run(x0):
        def body(carry, _):
            x, state = carry
            updates, state = opt.update(grad_fn(x), state, x)
            x = cast(jax.Array, optax.apply_updates(x, updates))
            return (x, state), x

        _, xs = jax.lax.scan(body, (x0, opt.init(x0)), length=steps)
        return jnp.concatenate([x0[None], xs])

    return np.asarray(run(x0))


def step_trajectory(
    grad_fn: Callable[[jax.Array], jax.Array],
    start: Any,
    steps: int = TOY_STEPS,
    learning_rate: float = TOY_LEARNING_RATE,
    dtype: jax.typing.DTypeLike = np.float32,
) -> np.ndarray:
    """The walk-through's own loop, written with :func:`adamax_step` and compiled.

    Args:
        grad_fn: The gradient as a function of the parameters.
        start: The starting point.
        steps: The number of updates.
        learning_rate: α.
        dtype: The dtype of the parameters, float32 or float64.

    Returns:
        The points, shape ``(steps + 1, *start.shape)``.
    """
    with _precision(dtype):
        return _step_trajectory(grad_fn, jnp.asarray(start, dtype), steps, learning_rate)


def _step_trajectory(grad_fn, x0, steps, learning_rate):
    @jax.jit
    def run(x0):
        def body(carry, t):
            x, m, u = carry
            x, m, u = adamax_step(x, grad_fn(x), m, u, t, learning_rate)
            return (x, m, u), x

        zeros = jnp.zeros_like(x0)
        ts = jnp.arange(1, steps + 1, dtype=jnp.int32)
        _, xs = jax.lax.scan(body, (x0, zeros, zeros), ts)
        return jnp.concatenate([x0[None], xs])

    return np.asarray(run(x0))


def distance(points: np.ndarray, target: Any) -> np.ndarray:
    """The largest coordinate distance of each point to `target`, in float64."""
    diff = np.asarray(points, np.float64) - np.asarray(target, np.float64)
    return np.abs(diff).reshape(diff.shape[0], -1).max(axis=1)


class Digits(NamedTuple):
    """The digits data, split once: pixels scaled to [0, 1], labels 0-9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """scikit-learn's bundled 8x8 digits (1797 images), shuffled and split.

    Args:
        test_fraction: The share held out for testing.
        seed: Seed of the shuffle.

    Returns:
        The split data as float32 pixels and int32 labels.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    pixels, labels = sklearn_load_digits(return_X_y=True)
    x = (pixels / 16.0).astype(np.float32)
    y = labels.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (64, 64, 10)) -> list[dict[str, jax.Array]]:
    """He-initialised weights and zero biases of a ReLU MLP.

    Args:
        key: A PRNG key.
        sizes: The width of each layer, input first.

    Returns:
        A list of ``{"w", "b"}`` per layer.
    """
    params = []
    keys = jax.random.split(key, len(sizes) - 1)
    for layer_key, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        w = jax.random.normal(layer_key, (n_in, n_out), jnp.float32) * math.sqrt(2.0 / n_in)
        params.append({"w": w, "b": jnp.zeros((n_out,), jnp.float32)})
    return params


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    """The logits of the MLP for a batch `x`."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None])
    return x @ params[-1]["w"] + params[-1]["b"][None]


def mlp_loss(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy of the MLP on a batch."""
    logits = mlp(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mlp_accuracy(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    """The share of a batch the MLP labels correctly."""
    return jnp.mean((jnp.argmax(mlp(params, x), axis=-1) == y).astype(jnp.float32))


class History(NamedTuple):
    """Per-epoch curves of a training run, as float64 NumPy arrays."""

    train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray


def train_mlp(
    opt: optax.GradientTransformation,
    data: Digits,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    sizes: tuple[int, ...] = (64, 64, 10),
    seed: int = 0,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> History:
    """Trains the MLP with `opt` in minibatches, one compiled call per epoch.

    Each epoch shuffles the training set and takes every full batch in a
    ``lax.scan``; the same seed gives the same initial weights and batches
    whatever the optimizer, so that runs compare like for like.

    Args:
        opt: Any optax optimizer.
        data: The split digits data.
        epochs: Passes over the training set.
        batch_size: Examples per step.
        sizes: The layer widths.
        seed: Seed of the initial weights and the shuffles.
        on_epoch: Called after each epoch with ``(epoch, train_loss,
            test_accuracy)``, epoch counted from 1.

    Returns:
        The per-epoch curves.
    """
    key = jax.random.key(seed)
    init_key, shuffle_key = jax.random.split(key)
    params = init_mlp(init_key, sizes)
    state = opt.init(params)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n_batches = x_train.shape[0] // batch_size

    @jax.jit
    def epoch(params, state, key):
        order = jax.random.permutation(key, x_train.shape[0])[: n_batches * batch_size]
        batches = order.reshape(n_batches, batch_size)

        def step(carry: tuple[Any, Any], idx: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
            params, state = carry
            loss, grads = jax.value_and_grad(mlp_loss)(params, x_train[idx], y_train[idx])
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), batches)
        test_loss = mlp_loss(params, x_test, y_test)
        return params, state, losses.mean(), test_loss, mlp_accuracy(params, x_test, y_test)

    curves: list[tuple[float, float, float]] = []
    for i in range(epochs):
        params, state, train_loss, test_loss, accuracy = epoch(
            params, state, jax.random.fold_in(shuffle_key, i)
        )
        curves.append((float(train_loss), float(test_loss), float(accuracy)))
        if on_epoch is not None:
            on_epoch(i + 1, curves[-1][0], curves[-1][2])
    columns = np.asarray(curves, np.float64).reshape(epochs, 3).T
    return History(*columns)
