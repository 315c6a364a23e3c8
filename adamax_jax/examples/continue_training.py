"""Continue a PyTorch or Keras AdaMax run in JAX mid-training, and go back.

``python -m adamax_jax.examples.continue_training`` trains a small network (16 → 64 → 1,
tanh, full batch) to fit a teacher network of the same shape, from a start near it, for
``--steps`` steps with ``torch.optim.Adamax``. It then converts the optimizer's state with
:func:`adamax_jax.convert_state`, trains as many steps again in JAX, and compares the
result with the PyTorch run that never moved. A cold restart (``opt.init``: m = u = 0,
t = 1) is shown for contrast: its first steps move every parameter by about the learning
rate, and the loss jumps. Then the JAX state goes back with
:func:`adamax_jax.to_torch_state_dict` and PyTorch takes as many steps again. The same
for ``keras.optimizers.Adamax`` (on the JAX backend) with :func:`adamax_jax.assign_to_keras`.
A framework that is not installed is skipped, saying so.

PyTorch lays a Linear weight out as (out, in), the JAX model here as (in, out): the
functions that port the parameters, :func:`from_torch` and :func:`to_torch`, move the
state with them.
"""

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

LEARNING_RATE = 0.01
FEATURES, HIDDEN, BATCH = 16, 64, 256
# Steps after the move over which the largest loss is reported.
WATCH = 10


def _data() -> tuple[Any, Any, list[Any]]:
    """Inputs, targets, and initial weights in PyTorch's layout (a weight is (out, in))."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = 3 * rng.normal(size=(BATCH, FEATURES))
    teacher = [
        rng.normal(size=(HIDDEN, FEATURES)) / np.sqrt(FEATURES) / 3,
        rng.normal(size=HIDDEN) * 0.1,
        rng.normal(size=(1, HIDDEN)) / np.sqrt(HIDDEN),
        rng.normal(size=1) * 0.1,
    ]
    y = np.tanh(x @ teacher[0].T + teacher[1]) @ teacher[2].T + teacher[3]
    start = [w + 0.2 * rng.normal(size=w.shape) for w in teacher]
    return x.astype(np.float32), y.astype(np.float32), [w.astype(np.float32) for w in start]


def _loss(params: Any, x: Any, y: Any) -> Any:
    import jax.numpy as jnp

    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def from_torch(ps: list[Any]) -> dict[str, Any]:
    """PyTorch's parameter list (weights (out, in)) as the JAX tree (kernels (in, out))."""
    return {"w1": ps[0].T, "b1": ps[1], "w2": ps[2].T, "b2": ps[3]}


def to_torch(tree: dict[str, Any]) -> list[Any]:
    """The inverse of :func:`from_torch`."""
    return [tree["w1"].T, tree["b1"], tree["w2"].T, tree["b2"]]


def from_keras(vs: list[Any]) -> dict[str, Any]:
    """Keras' variable list (kernels (in, out), as here) as the JAX tree."""
    return {"w1": vs[0], "b1": vs[1], "w2": vs[2], "b2": vs[3]}


def to_keras(tree: dict[str, Any]) -> list[Any]:
    """The inverse of :func:`from_keras`."""
    return [tree["w1"], tree["b1"], tree["w2"], tree["b2"]]


def _deviation(got: dict[str, Any], want: dict[str, Any]) -> float:
    """The largest difference, relative to the largest value of its parameter."""
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k]))))
        / float(np.max(np.abs(np.asarray(want[k]))))
        for k in want
    )


def _jax_steps(opt: Any, params: Any, state: Any, x: Any, y: Any, steps: int) -> Any:
    """`steps` steps of `opt` in JAX; returns the parameters, the state and each step's loss."""
    import jax
    import optax

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, losses + [float(_loss(params, x, y))]


def _compare(
    opt: Any,
    params: Any,
    state: Any,
    x: Any,
    y: Any,
    steps: int,
    uninterrupted: dict[str, Any],
) -> tuple[dict[str, float], Any, Any]:
    """JAX from the converted state and from a cold restart, against the run that never moved."""
    moved, state, warm = _jax_steps(opt, params, state, x, y, steps)
    _, _, cold = _jax_steps(opt, params, opt.init(params), x, y, min(steps, WATCH))
    result = {
        "loss_at_move": warm[0],
        "loss": warm[-1],
        "deviation": _deviation(moved, uninterrupted),
        "warm_peak": max(warm[1 : WATCH + 1]),
        "cold_peak": max(cold[1 : WATCH + 1]),
    }
    return result, moved, state


def _report(name: str, result: dict[str, float], steps: int) -> None:
    print(
        f"{name} for {steps} steps (loss {result['loss_at_move']:.2e}), then JAX for {steps} "
        f"from the converted state: loss {result['loss']:.2e}, parameters within "
        f"{result['deviation']:.1e} of {2 * steps} {name} steps"
    )
    print(
        f"  largest loss over the first {WATCH} steps in JAX: {result['warm_peak']:.2e} "
        f"converted, {result['cold_peak']:.2e} after a cold restart"
    )
    print(
        f"  back to {name} for {steps} more: within {result['back']:.1e} of "
        f"{3 * steps} {name} steps"
    )


def run_torch(steps: int) -> dict[str, float] | None:
    """PyTorch, then JAX, against PyTorch alone; then back. None where torch is missing."""
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (pip install torch): its part is skipped.")
        return None
    import jax
    import jax.numpy as jnp

    import adamax_jax as ax

    x, y, start = _data()
    opt = ax.adamax(LEARNING_RATE, eps_mode="inside_max")  # torch.optim.Adamax's ε
    moved: dict[str, Any] = {}

    def torch_run(weights: list[Any], steps: int, at: Callable[[int, Any, Any], None]) -> Any:
        model = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
        optimizer = torch.optim.Adamax(model, lr=LEARNING_RATE)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        at(0, model, optimizer)
        for i in range(1, steps + 1):
            optimizer.zero_grad()
            hidden = torch.tanh(xt @ model[0].T + model[1])
            torch.mean((hidden @ model[2].T + model[3] - yt) ** 2).backward()
            optimizer.step()
            at(i, model, optimizer)
        return [p.detach().numpy().copy() for p in model]

    seen: dict[int, list[Any]] = {}

    def checkpoint(i: int, model: Any, optimizer: Any) -> None:
        seen[i] = [p.detach().numpy().copy() for p in model]
        if i == steps:  # the move: PyTorch's state, in JAX's layout
            params = jax.tree.map(jnp.asarray, from_torch(seen[i]))
            moved["params"] = params
            moved["state"] = ax.convert_state((optimizer, from_torch), opt, params)

    torch_run(start, 3 * steps, checkpoint)
    result, params, state = _compare(
        opt, moved["params"], moved["state"], x, y, steps, from_torch(seen[2 * steps])
    )

    # Back: PyTorch goes on from the JAX state, as if it had never stopped.
    def load(i: int, model: Any, optimizer: Any) -> None:
        if i == 0:
            optimizer.load_state_dict(ax.to_torch_state_dict(state, opt, optimizer, to_torch))

    back = torch_run([jax.device_get(w) for w in to_torch(params)], steps, load)
    result["back"] = _deviation(from_torch(back), from_torch(seen[3 * steps]))
    return result


def run_keras(steps: int) -> dict[str, float] | None:
    """Keras, then JAX, against Keras alone; then back. None where keras is missing."""
    # Keras picks its backend once, when it is first imported.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError:
        print("Keras is not installed (pip install keras): its part is skipped.")
        return None
    if keras.backend.backend() != "jax":
        print(f"Keras runs on {keras.backend.backend()}, not JAX: its part is skipped.")
        return None
    import jax
    import jax.numpy as jnp

    import adamax_jax as ax

    x, y, start = _data()
    start = to_keras(from_torch(start))  # Keras' layout is the JAX model's
    opt = ax.adamax(LEARNING_RATE, eps=1e-7)  # keras.optimizers.Adamax's ε, and its place
    grad = jax.jit(jax.grad(_loss))
    moved: dict[str, Any] = {}

    def keras_run(weights: list[Any], steps: int, at: Callable[[int, Any, Any], None]) -> Any:
        variables = [keras.Variable(w) for w in weights]
        optimizer = keras.optimizers.Adamax(LEARNING_RATE)
        optimizer.build(variables)
        at(0, variables, optimizer)
        # Keras' own arithmetic promotes Python scalars against its int counter.
        with jax.numpy_dtype_promotion("standard"):
            for i in range(1, steps + 1):
                values = from_keras([v.value for v in variables])
                optimizer.apply(to_keras(grad(values, x, y)), variables)
                at(i, variables, optimizer)
        return [jax.device_get(v.value) for v in variables]

    seen: dict[int, list[Any]] = {}

    def checkpoint(i: int, variables: Any, optimizer: Any) -> None:
        seen[i] = [jax.device_get(v.value) for v in variables]
        if i == steps:
            params = jax.tree.map(jnp.asarray, from_keras(seen[i]))
            moved["params"] = params
            moved["state"] = ax.convert_state((optimizer, from_keras), opt, params)

    keras_run(start, 3 * steps, checkpoint)
    result, params, state = _compare(
        opt, moved["params"], moved["state"], x, y, steps, from_keras(seen[2 * steps])
    )

    def assign(i: int, variables: Any, optimizer: Any) -> None:
        if i == 0:
            ax.assign_to_keras(state, opt, optimizer, to_keras)

    back = keras_run([jax.device_get(w) for w in to_keras(params)], steps, assign)
    result["back"] = _deviation(from_keras(back), from_keras(seen[3 * steps]))
    return result


def main(steps: int = 100, frameworks: tuple[str, ...] = ("torch", "keras")) -> dict[str, Any]:
    """Runs the comparison for each framework; returns its numbers (None where skipped)."""
    results: dict[str, Any] = {}
    for name, run, label in (("torch", run_torch, "PyTorch"), ("keras", run_keras, "Keras")):
        if name in frameworks:
            results[name] = run(steps)
            if results[name] is not None:
                _report(label, results[name], steps)
    return results


def _cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps before and after the move")
    parser.add_argument(
        "--framework", nargs="+", choices=["torch", "keras"], default=["torch", "keras"]
    )
    args = parser.parse_args(argv)
    main(args.steps, tuple(args.framework))


if __name__ == "__main__":
    _cli(sys.argv[1:])
