"""Speed and memory of the AdaMax step, against optax, PyTorch and the memory floor.

Run it with ``python -m adamax_jax.benchmark`` (``--help`` lists the options).

AdaMax is memory-bound: a fused step reads the parameters θ, the gradient g
and the two moments m and u, and writes θ, m and u back, seven streams of
parameter-sized arrays. The floor is a jitted, buffer-donated elementwise
kernel with the same seven streams and next to no arithmetic; every optimizer
is reported as a multiple of its time, and as achieved bandwidth (the bytes of
the seven streams over the step time). XLA's CPU backend runs the floor, like
the optimizer steps, as three loops that each read g: there the bandwidth
counts seven streams of the nine moved.

For each parameter tree, in one process and on the same data, it times the
jitted, donated step (``update`` then ``optax.apply_updates``) of
``adamax_jax.adamax`` with float32, bfloat16 and 8-bit (int8 μ, uint8 ν,
block-wise) state and of
``optax.adamax``, and, when PyTorch is installed and the JAX backend is the
CPU, one ``torch.optim.Adamax.step`` with ``foreach=True`` and with
``foreach=False``, PyTorch given as many threads as JAX's CPU client uses.
The runners take their timed steps in turn, round after round, so that a
change of load on the machine falls on all of them alike; each reports the
median of its timed steps after warm-up. All rows use ε inside the max (the
convention of optax and PyTorch), so they compute the same numbers, and each
row says how far its final parameters are from optax's.

For the JAX rows it also reports the compile time (lowering and compiling,
what a first call costs; the median of ``--compile-repeats`` fresh compiles),
the compiled executable's memory analysis (a donated step should need no
temporary buffer of a parameter's size), and the bytes of optimizer state per
parameter.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

LEARNING_RATE = 0.002
B1 = 0.9
B2 = 0.999
EPS = 1e-8
SEED = 0

# The runners' names, as they appear in the table and the JSON.
FLOOR = "floor (7 streams)"
OURS = "adamax_jax"
OURS_BF16 = "adamax_jax, bf16 state"
OURS_INT8 = "adamax_jax, int8/uint8 state"
OPTAX = "optax.adamax"
TORCH_FOREACH = "torch Adamax foreach=True"
TORCH_LOOP = "torch Adamax foreach=False"


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """A parameter tree to time: its leaves' paths and shapes, all float32."""

    key: str
    description: str
    leaves: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def n_params(self) -> int:
        """The number of scalar parameters."""
        return sum(math.prod(shape) for _, shape in self.leaves)

    @property
    def n_leaves(self) -> int:
        """The number of arrays."""
        return len(self.leaves)


def one_leaf(n: int) -> TreeSpec:
    """One float32 array of `n` parameters."""
    return TreeSpec("one-leaf", f"one leaf of {n:,} params", (("w", (n,)),))


def many_leaves(n_leaves: int) -> TreeSpec:
    """`n_leaves` arrays of 16,384 parameters in four different shapes."""
    shapes = ((128, 128), (64, 256), (256, 64), (16384,))
    leaves = tuple((f"w{i:04d}", shapes[i % len(shapes)]) for i in range(n_leaves))
    spec = TreeSpec("many-leaves", "", leaves)
    return dataclasses.replace(
        spec, description=f"{spec.n_params:,} params in {n_leaves} leaves of 16,384"
    )


def transformer(blocks: int, width: int, vocab: int) -> TreeSpec:
    """Embedding, `blocks` blocks of attention, MLP and two norms, a final norm."""
    leaves: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, width))]
    for b in range(blocks):
        p = f"block{b:02d}"
        for name in ("q", "k", "v", "o"):
            leaves += [(f"{p}/attn/{name}/w", (width, width)), (f"{p}/attn/{name}/b", (width,))]
        leaves += [
            (f"{p}/mlp/up/w", (width, 4 * width)),
            (f"{p}/mlp/up/b", (4 * width,)),
            (f"{p}/mlp/down/w", (4 * width, width)),
            (f"{p}/mlp/down/b", (width,)),
        ]
        for norm in ("norm1", "norm2"):
            leaves += [(f"{p}/{norm}/scale", (width,)), (f"{p}/{norm}/bias", (width,))]
    leaves += [("final_norm/scale", (width,)), ("final_norm/bias", (width,))]
    spec = TreeSpec("transformer", "", tuple(leaves))
    return dataclasses.replace(
        spec,
        description=(
            f"transformer-like: {blocks} blocks, width {width}, vocab {vocab}; "
            f"{spec.n_params:,} params in {spec.n_leaves} leaves"
        ),
    )


def small_tree(n_leaves: int) -> TreeSpec:
    """`n_leaves` arrays of 1,312 parameters in four different shapes."""
    shapes = ((32, 41), (41, 32), (1312,), (16, 82))
    leaves = tuple((f"w{i:03d}", shapes[i % len(shapes)]) for i in range(n_leaves))
    spec = TreeSpec("small-tree", "", leaves)
    return dataclasses.replace(
        spec, description=f"{spec.n_params:,} params in {n_leaves} leaves of 1,312"
    )


def tree_specs(quick: bool) -> list[TreeSpec]:
    """The trees of a full run, or the scaled-down ones of ``--quick``."""
    if quick:
        return [one_leaf(1 << 18), many_leaves(16), transformer(2, 64, 512), small_tree(25)]
    return [one_leaf(1 << 24), many_leaves(1000), transformer(12, 384, 8192), small_tree(100)]


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress lines on stderr; a bar that redraws itself when stderr is a terminal."""

    def __init__(self, stream: Any = None) -> None:
        """Writes to `stream` (default: ``sys.stderr``)."""
        self.stream: Any = sys.stderr if stream is None else stream
        self.tty: bool = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start: float = time.perf_counter()

    def line(self, text: str) -> None:
        """Prints one line, prefixed with the seconds since the start."""
        self.stream.write(f"[{time.perf_counter() - self.start:7.1f} s] {text}\n")
        self.stream.flush()

    def bar(self, label: str, done: int, total: int) -> None:
        """Shows `done` of `total`; off a terminal, only the last state is printed."""
        if not self.tty and done < total:
            return
        width = 30
        filled = width * done // max(total, 1)
        text = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
        if self.tty:
            end = "\n" if done >= total else ""
            elapsed = time.perf_counter() - self.start
            self.stream.write(f"\r[{elapsed:7.1f} s] {text}{end}")
            self.stream.flush()
        else:
            self.line(text)


# --------------------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
    """One optimizer on one tree: a step to time and what was measured up front.

    Attributes:
        name: The row's name.
        step: Takes one step and returns once its results are ready.
        params: The parameters now, as NumPy arrays in leaf order.
        state_bytes: The bytes of optimizer state now (PyTorch's exists only
            after a first step).
        bytes_per_step: The bytes of the seven streams in this runner's dtypes.
        compile: Compile time and memory analysis, for the JAX rows.
        full_size_bytes: A buffer of the largest leaf's size in the narrowest
            dtype the step keeps: a temporary buffer this large is an extra
            full-size buffer.
        times: The timed steps, in seconds.
    """

    name: str
    step: Callable[[], None]
    params: Callable[[], list[np.ndarray]]
    state_bytes: Callable[[], int]
    bytes_per_step: int
    compile: dict[str, Any] | None = None
    full_size_bytes: int | None = None
    times: list[float] = dataclasses.field(default_factory=list)


def _nbytes(tree: Any) -> int:
    return sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree))


def _full_size(*trees: Any) -> int:
    leaves = jax.tree.leaves(trees)
    return max(math.prod(x.shape) for x in leaves) * min(x.dtype.itemsize for x in leaves)


def _memory(compiled: Any) -> dict[str, int | None]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        stats = None
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {
        f"{f}_bytes": None if stats is None else int(getattr(stats, f"{f}_size_in_bytes"))
        for f in fields
    }


def _compile(
    make_fn: Callable[[], Callable], args: tuple, donate: tuple[int, ...], repeats: int
) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles a fresh function from `make_fn`, `repeats` times.

    Each is what a first call costs: a new function object misses every cache
    of tracing, lowering and compilation. The run with the median total is
    reported, with all totals.
    """
    runs, compiled = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        lowered = jax.jit(make_fn(), donate_argnums=donate).lower(*args)
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        runs.append((done - start, lowered_at - start, done - lowered_at))
    if compiled is None:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    total, lower, xla = sorted(runs)[(repeats - 1) // 2]
    info = {
        "compile_s": total,
        "lower_s": lower,
        "xla_compile_s": xla,
        "compile_runs_s": [r[0] for r in runs],
        **_memory(compiled),
    }
    return compiled, info


def _host(tree: dict[str, jax.Array], keys: Iterable[str]) -> list[np.ndarray]:
    # In the order of `keys`: JAX hands dicts back with their keys sorted.
    return [np.asarray(tree[k]) for k in keys]


def _device(tree: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in tree.items()}


def floor_runner(
    params_np: dict[str, np.ndarray], grads: dict[str, jax.Array], compile_repeats: int = 1
) -> Runner:
    """The floor: reads θ, g, m, u and writes θ, m, u with next to no arithmetic.

    It is the two moment updates of AdaMax and a plain gradient step: all of its
    memory traffic, none of its division or bias correction.
    """
    lr, b1, b2 = (jnp.float32(x) for x in (LEARNING_RATE, B1, B2))
    one_minus_b1 = jnp.float32(1 - B1)

    def make_kernel():
        def kernel(params, grads, mu, nu):
            params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
            mu = jax.tree.map(lambda m, g: b1 * m + one_minus_b1 * g, mu, grads)
            nu = jax.tree.map(lambda u, g: jnp.maximum(b2 * u, jnp.abs(g)), nu, grads)
            return params, mu, nu

        return kernel

    params = _device(params_np)
    mu = jax.tree.map(jnp.zeros_like, params)
    nu = jax.tree.map(jnp.zeros_like, params)
    bytes_per_step = 2 * _nbytes(params) + _nbytes(grads) + 2 * _nbytes(mu) + 2 * _nbytes(nu)
    compiled, info = _compile(make_kernel, (params, grads, mu, nu), (0, 2, 3), compile_repeats)
    box = [params, mu, nu]

    def step() -> None:
        box[0], box[1], box[2] = compiled(box[0], grads, box[1], box[2])
        jax.block_until_ready(box)

    return Runner(
        FLOOR,
        step,
        lambda: _host(box[0], params_np),
        lambda: _nbytes(box[1:]),
        bytes_per_step,
        info,
        _full_size(params, mu, nu),
    )


def optax_runner(
    name: str,
    opt: optax.GradientTransformation,
    params_np: dict[str, np.ndarray],
    grads: dict[str, jax.Array],
    compile_repeats: int = 1,
) -> Runner:
    """The jitted, donated ``update`` and ``optax.apply_updates`` of an optimizer."""

    def make_step():
        def train_step(params, grads, state):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return train_step

    params = _device(params_np)
    state = opt.init(params)
    # The moments are the state's parameter-shaped arrays; the rest are scalars.
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    bytes_per_step = 2 * _nbytes(params) + _nbytes(grads) + 2 * _nbytes(moments)
    compiled, info = _compile(make_step, (params, grads, state), (0, 2), compile_repeats)
    box = [params, state]

    def step() -> None:
        box[0], box[1] = compiled(box[0], grads, box[1])
        jax.block_until_ready(box)

    return Runner(
        name,
        step,
        lambda: _host(box[0], params_np),
        lambda: _nbytes(box[1]),
        bytes_per_step,
        info,
        _full_size(params, moments),
    )


def torch_runner(
    name: str,
    foreach: bool,
    params_np: dict[str, np.ndarray],
    grads_np: dict[str, np.ndarray],
    threads: int,
) -> Runner:
    """``torch.optim.Adamax.step`` on CPU tensors holding the same data."""
    import torch

    torch.set_num_threads(threads)
    params = [torch.nn.Parameter(torch.from_numpy(np.array(v))) for v in params_np.values()]
    for p, g in zip(params, grads_np.values(), strict=True):
        p.grad = torch.from_numpy(np.array(g))
    opt = torch.optim.Adamax(params, lr=LEARNING_RATE, betas=(B1, B2), eps=EPS, foreach=foreach)
    bytes_per_step = 7 * sum(p.numel() * p.element_size() for p in params)

    def state_bytes() -> int:
        tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def host() -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in params]

    return Runner(name, opt.step, host, state_bytes, bytes_per_step)


def _ours(state_dtype: Any, nu_dtype: Any = None) -> optax.GradientTransformation:
    from adamax_jax import adamax

    return adamax(
        LEARNING_RATE,
        B1,
        B2,
        EPS,
        eps_mode="inside_max",
        mu_dtype=state_dtype,
        nu_dtype=state_dtype if nu_dtype is None else nu_dtype,
    )


# --------------------------------------------------------------------------- running


def tree_data(spec: TreeSpec) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters and a gradient for `spec`, the same on every run."""
    rng = np.random.default_rng(SEED)
    params = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in spec.leaves}
    grads = {k: (1e-3 * rng.standard_normal(s)).astype(np.float32) for k, s in spec.leaves}
    return params, grads


def cpu_threads() -> int:
    """The CPUs this process may run on, the size of XLA's CPU thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def torch_skip_reason() -> str | None:
    """Why the PyTorch rows cannot run here, or None when they can."""
    if jax.default_backend() != "cpu":
        return f"the JAX backend is {jax.default_backend()!r} and the PyTorch rows run on the CPU"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed"
    return None


def run_tree(
    spec: TreeSpec,
    *,
    steps: int,
    warmup: int,
    compile_repeats: int,
    with_torch: bool,
    threads: int,
    progress: Progress,
    label: str,
) -> dict[str, Any]:
    """Times every optimizer on one tree, round after round; returns its results."""
    params_np, grads_np = tree_data(spec)
    grads = _device(grads_np)
    reps = compile_repeats
    builders: list[tuple[str, Callable[[], Runner]]] = [
        (FLOOR, lambda: floor_runner(params_np, grads, reps)),
        (OURS, lambda: optax_runner(OURS, _ours(None), params_np, grads, reps)),
        (OURS_BF16, lambda: optax_runner(OURS_BF16, _ours(jnp.bfloat16), params_np, grads, reps)),
        (
            OURS_INT8,
            lambda: optax_runner(OURS_INT8, _ours(jnp.int8, jnp.uint8), params_np, grads, reps),
        ),
        (
            OPTAX,
            lambda: optax_runner(
                OPTAX, optax.adamax(LEARNING_RATE, B1, B2, EPS), params_np, grads, reps
            ),
        ),
    ]
    if with_torch:
        builders += [
            (
                TORCH_FOREACH,
                lambda: torch_runner(TORCH_FOREACH, True, params_np, grads_np, threads),
            ),
            (TORCH_LOOP, lambda: torch_runner(TORCH_LOOP, False, params_np, grads_np, threads)),
        ]
    runners = []
    for name, build in builders:
        runner = build()
        done = (
            "" if runner.compile is None else f": compiled in {runner.compile['compile_s']:.2f} s"
        )
        progress.line(f"{label} {name}{done}")
        runners.append(runner)

    for w in range(warmup):
        for runner in runners:
            runner.step()
        progress.bar(f"{label} warm-up", w + 1, warmup)
    for r in range(steps):
        for runner in runners:
            start = time.perf_counter()
            runner.step()
            runner.times.append(time.perf_counter() - start)
        progress.bar(f"{label} timing ", r + 1, steps)

    final = {runner.name: runner.params() for runner in runners}
    floor_s = statistics.median(runners[0].times)
    optax_s = statistics.median(next(r for r in runners if r.name == OPTAX).times)
    rows = []
    for runner in runners:
        median = statistics.median(runner.times)
        q1, _, q3 = statistics.quantiles(runner.times, n=4)
        state_bytes = runner.state_bytes()
        row: dict[str, Any] = {
            "optimizer": runner.name,
            "steps": len(runner.times),
            "median_s": median,
            "min_s": min(runner.times),
            "q1_s": q1,
            "q3_s": q3,
            "x_floor": median / floor_s,
            "speedup_vs_optax": optax_s / median,
            "bytes_per_step": runner.bytes_per_step,
            "gb_per_s": runner.bytes_per_step / median / 1e9,
            "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / spec.n_params,
            "state_x_params": state_bytes / (4 * spec.n_params),
            "max_abs_diff_vs_optax": None,
            "compile_s": None,
            "lower_s": None,
            "xla_compile_s": None,
            "compile_runs_s": None,
            "temp_bytes": None,
            "argument_bytes": None,
            "output_bytes": None,
            "alias_bytes": None,
            "generated_code_bytes": None,
            "full_size_bytes": runner.full_size_bytes,
            "no_full_size_temp": None,
        }
        if runner.compile is not None:
            row.update(runner.compile)
            if row["temp_bytes"] is not None:
                row["no_full_size_temp"] = row["temp_bytes"] < runner.full_size_bytes
        if runner.name != FLOOR:
            row["max_abs_diff_vs_optax"] = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(final[runner.name], final[OPTAX], strict=True)
            )
        rows.append(row)
    return {
        "key": spec.key,
        "description": spec.description,
        "n_params": spec.n_params,
        "n_leaves": spec.n_leaves,
        "param_bytes": 4 * spec.n_params,
        "leaf_shapes": [list(s) for _, s in spec.leaves],
        "results": rows,
    }


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": cpu_threads(),
        "memory_bytes": memory,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "optax": optax.__version__,
        "torch": version("torch"),
    }


def _optional_row(tree: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in tree["results"] if r["optimizer"] == name), None)


def _row(tree: dict[str, Any], name: str) -> dict[str, Any]:
    row = _optional_row(tree, name)
    if row is None:
        raise KeyError(f"no {name!r} row for the tree {tree['key']!r}")
    return row


def targets(trees: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals of the step, checked against one run's numbers."""
    checks = []

    def check(text: str, value: float | None, op: str, threshold: float) -> None:
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        checks.append(
            {"target": text, "value": value, "op": op, "threshold": threshold, "met": met}
        )

    for tree in trees:
        ours = _row(tree, OURS)
        check(f"{tree['key']}: speed of {OURS} / {OPTAX}", ours["speedup_vs_optax"], ">=", 1.0)
    by_key = {t["key"]: t for t in trees}
    leaf = by_key.get("one-leaf")
    if leaf is not None:
        ours = _row(leaf, OURS)
        torch_row = _optional_row(leaf, TORCH_FOREACH)
        speed = None if torch_row is None else torch_row["median_s"] / ours["median_s"]
        check(f"one-leaf: speed of {OURS} / {TORCH_FOREACH}", speed, ">=", 2.0)
        check(f"one-leaf: time of {OURS} / floor", ours["x_floor"], "<=", 1.3)
        # To four places: the step count and ν's scale add a few bytes to the moments.
        check(f"one-leaf: state of {OURS} / params", round(ours["state_x_params"], 4), "<=", 2.0)
        bf16_state = round(_row(leaf, OURS_BF16)["state_x_params"], 4)
        check(f"one-leaf: state of {OURS_BF16} / params", bf16_state, "<=", 1.0)
        int8_bytes = _row(leaf, OURS_INT8)["state_bytes_per_param"]
        check(f"one-leaf: state bytes per parameter of {OURS_INT8}", int8_bytes, "<=", 2.05)
    # Fewer bytes should make a faster step: low-precision state against float32 state.
    for key in ("one-leaf", "transformer"):
        tree = by_key.get(key)
        if tree is None:
            continue
        f32_s = _row(tree, OURS)["median_s"]
        for name, limit in ((OURS_BF16, 1.0), (OURS_INT8, 1.3)):
            ratio = _row(tree, name)["median_s"] / f32_s
            check(f"{key}: step time of {name} / {OURS}", ratio, "<=", limit)
    many = by_key.get("many-leaves")
    if many is not None:
        ratio = _row(many, OURS)["compile_s"] / _row(many, OPTAX)["compile_s"]
        check(f"many-leaves: compile time of {OURS} / {OPTAX}", ratio, "<=", 1.0)
        check(f"many-leaves: compile time of {OURS} / {OPTAX}, stretch", ratio, "<=", 0.5)
        for name in (OURS_BF16, OURS_INT8):
            ratio = _row(many, name)["compile_s"] / _row(many, OURS)["compile_s"]
            check(f"many-leaves: compile time of {name} / {OURS}", ratio, "<=", 1.5)
    return checks


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _hardware(meta: dict[str, Any]) -> str:
    return meta["cpu"] if meta["backend"] == "cpu" else meta["device"]


def summary(report: dict[str, Any]) -> list[str]:
    """One line per tree for adamax_jax (float32 state): the figures a reader wants first."""
    lines = [
        f"### summary: {OURS} (float32 state)",
        "",
        "| tree | params | leaves | step ms | × floor | GB/s | speed vs optax "
        "| speed vs torch foreach | compile s (optax) | temp memory |",
        "|" + " --- |" * 10,
    ]
    for tree in report["trees"]:
        ours, optax_row = _row(tree, OURS), _row(tree, OPTAX)
        torch_row = _optional_row(tree, TORCH_FOREACH)
        vs_torch = None if torch_row is None else torch_row["median_s"] / ours["median_s"]
        lines.append(
            f"| {tree['key']} | {tree['n_params']:,} | {tree['n_leaves']} "
            f"| {ours['median_s'] * 1e3:.2f} | {ours['x_floor']:.2f} | {ours['gb_per_s']:.1f} "
            f"| {ours['speedup_vs_optax']:.2f} | {_num(vs_torch, '.2f')} "
            f"| {ours['compile_s']:.2f} ({optax_row['compile_s']:.2f}) "
            f"| {_size(ours['temp_bytes'])} |"
        )
    return lines


def table(report: dict[str, Any]) -> str:
    """The results as Markdown tables, one per tree, then the targets."""
    meta = report["machine"]
    lines = [
        f"AdaMax step, {meta['backend']} ({_hardware(meta)}), "
        f"{meta['threads']} threads; jax {meta['jax']}, optax {meta['optax']}, "
        f"torch {meta['torch'] or 'absent'}; median of {report['steps']} steps "
        f"after {report['warmup']} warm-up",
        "",
    ]
    lines += [*summary(report), ""]
    header = (
        "| optimizer | median ms | × floor | speed vs optax | GB/s | compile s | temp memory "
        "| state B/param | max Δθ vs optax |"
    )
    for tree in report["trees"]:
        lines += [f"### {tree['key']}: {tree['description']}", "", header, "|" + " --- |" * 9]
        for r in tree["results"]:
            lines.append(
                f"| {r['optimizer']} | {r['median_s'] * 1e3:.3f} | {r['x_floor']:.2f} "
                f"| {r['speedup_vs_optax']:.2f} | {r['gb_per_s']:.1f} "
                f"| {_num(r['compile_s'], '.2f')} | {_size(r['temp_bytes'])} "
                f"| {r['state_bytes_per_param']:.2f} | {_num(r['max_abs_diff_vs_optax'], '.1e')} |"
            )
        lines.append("")
    lines += ["### targets", ""]
    if report["quick"]:
        lines += ["(a --quick run: the trees are too small for these to mean much)", ""]
    for t in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(
            f"- {t['target']}: {_num(t['value'], '.2f')} ({t['op']} {t['threshold']}: {verdict})"
        )
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Writes three bar charts: time over the floor, bandwidth, compile time."""
    from matplotlib.figure import Figure

    trees = report["trees"]
    names = [r["optimizer"] for r in trees[0]["results"]]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    width = 0.8 / len(names)
    panels = (
        ("x_floor", "step time / floor (lower is better)", names),
        ("gb_per_s", "achieved GB/s (7 streams / step time)", names),
        ("compile_s", "compile time, s (JAX only)", [n for n in names if "torch" not in n]),
    )
    for ax, (field, title, shown) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            if name not in shown:
                continue
            values = [(_row(t, name) or {}).get(field) for t in trees]
            xs = [j + (i - len(names) / 2 + 0.5) * width for j in range(len(trees))]
            ax.bar(xs, [np.nan if v is None else v for v in values], width, label=name)
        ax.set_xticks(range(len(trees)), [t["key"] for t in trees])
        ax.set_title(title)
        if field == "x_floor":
            ax.axhline(1.0, color="black", linewidth=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(names), fontsize="small")
    meta = report["machine"]
    fig.suptitle(
        f"AdaMax step on {meta['backend']} ({_hardware(meta)}, "
        f"{meta['threads']} threads)" + (", --quick" if report["quick"] else "")
    )
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m adamax_jax.benchmark``."""
    parser = argparse.ArgumentParser(
        prog="python -m adamax_jax.benchmark",
        description="Times the AdaMax step against optax, PyTorch and the memory floor.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small trees and few steps: proves it works"
    )
    parser.add_argument("--out", type=Path, help="write results.json and results.png here")
    parser.add_argument(
        "--steps", type=int, help="timed steps per optimizer (default 20, quick 10)"
    )
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 2)")
    parser.add_argument(
        "--compile-repeats",
        type=int,
        help="compile each JAX step this many times, report the median (default 3, quick 1)",
    )
    parser.add_argument(
        "--trees",
        help="comma-separated subset of: one-leaf, many-leaves, transformer, small-tree",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f"`--steps` must be at least 2, got {args.steps}.")
    if args.compile_repeats is not None and args.compile_repeats < 1:
        parser.error(f"`--compile-repeats` must be at least 1, got {args.compile_repeats}.")
    if args.warmup is not None and args.warmup < 1:
        parser.error(f"`--warmup` must be at least 1, got {args.warmup}.")
    keys = [s.key for s in tree_specs(quick=True)]
    if args.trees is not None:
        unknown = sorted(set(args.trees.split(",")) - set(keys))
        if unknown:
            parser.error(f"`--trees` must name some of {', '.join(keys)}, got {args.trees!r}.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; prints the table, and writes the files `--out` asks for."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    steps = args.steps or (10 if args.quick else 20)
    warmup = args.warmup or (2 if args.quick else 3)
    compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    specs = tree_specs(args.quick)
    if args.trees is not None:
        specs = [s for s in specs if s.key in args.trees.split(",")]
    threads = cpu_threads()
    notes = [
        "every row uses eps inside the max (optax's and PyTorch's convention), "
        "so all compute the same numbers",
        f"PyTorch runs on the CPU with torch.set_num_threads({threads}), "
        "the threads XLA's CPU client has",
    ]
    skip = "--no-torch was given" if args.no_torch else torch_skip_reason()
    if skip is not None:
        notes.append(f"PyTorch rows skipped: {skip}")
    progress = Progress()
    progress.line(f"{len(specs)} trees, {steps} timed steps each after {warmup} warm-up")
    trees = []
    for i, spec in enumerate(specs):
        label = f"[{i + 1}/{len(specs)} {spec.key}]"
        progress.line(f"{label} {spec.description}")
        trees.append(
            run_tree(
                spec,
                steps=steps,
                warmup=warmup,
                compile_repeats=compile_repeats,
                with_torch=skip is None,
                threads=threads,
                progress=progress,
                label=label,
            )
        )
    report = {
        "command": " ".join(["python -m adamax_jax.benchmark", *argv]),
        "quick": args.quick,
        "steps": steps,
        "warmup": warmup,
        "compile_repeats": compile_repeats,
        "machine": machine(),
        "hyperparameters": {"learning_rate": LEARNING_RATE, "b1": B1, "b2": B2, "eps": EPS},
        "trees": trees,
        "notes": notes,
    }
    report["targets"] = targets(trees)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            report["notes"].append("no results.png: matplotlib is not installed")
            png = None
        else:
            png = args.out / "results.png"
            plot(report, png)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        progress.line(f"wrote {args.out / 'results.json'}" + (f" and {png}" if png else ""))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
