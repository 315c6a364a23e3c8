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
``adamax_jax.adamax`` with each storage kind of ``--storage`` (float32 state;
``mu_dtype=nu_dtype=jnp.bfloat16``; block-wise 8-bit int8 μ and uint8 ν;
block-wise 8-bit ``float8_e4m3fn`` μ and ν) and of
``optax.adamax``, and, when PyTorch is installed and the JAX backend is the
CPU, one ``torch.optim.Adamax.step`` with ``foreach=True`` and with
``foreach=False``, PyTorch given as many threads as JAX's CPU client uses.
The runners take their timed steps in turn, round after round, so that a
change of load on the machine falls on all of them alike; each reports the
median of its timed steps after warm-up, and each storage kind the median over
the rounds of its step time over the float32-state step of the same round. All
rows use ε inside the max (the convention of optax and PyTorch), so they
compute the same numbers, and each row says how far its final parameters are
from optax's.

For the JAX rows it also reports the compile time of the donated step,
``jax.jit(step, donate_argnums=...).lower(*args).compile()`` of a fresh
function (the median of ``--compile-repeats``, interleaved across the rows):
in this process after ``jax.clear_caches()``, or, with ``--compile-timeout``,
each in a fresh process that is stopped after that many seconds (reported as
"> N s"; a row none of whose compiles finished is not timed; a compile
process that dies, out of memory say, or runs out of ``--compile-memory``, is
reported as failed and its row is not timed either; each process's peak
resident memory is reported too). It reports the
compiled step's memory analysis: the temporary bytes, and, read from XLA's
buffer assignment where the temporaries could hold a parameter leaf, whether
any temporary buffer has a parameter leaf's shape (a donated step should need
none); and the bytes of optimizer state per parameter.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
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
OURS_FP8 = "adamax_jax, float8_e4m3fn state"
OPTAX = "optax.adamax"
TORCH_FOREACH = "torch Adamax foreach=True"
TORCH_LOOP = "torch Adamax foreach=False"

# The storage kinds of `--storage`: each one's row and its `mu_dtype` and `nu_dtype`.
STORAGE: dict[str, tuple[str, Any, Any]] = {
    "float32": (OURS, None, None),
    "bfloat16": (OURS_BF16, jnp.bfloat16, jnp.bfloat16),
    "int8": (OURS_INT8, jnp.int8, jnp.uint8),
    "float8": (OURS_FP8, jnp.float8_e4m3fn, jnp.float8_e4m3fn),
}
# The JAX rows by kind of step, in the order of the table.
ROWS: dict[str, str] = {"floor": FLOOR, **{k: v[0] for k, v in STORAGE.items()}, "optax": OPTAX}
# Values in each leaf of the `leaves-N` trees (8-bit storage applies from 4096).
LEAF_SIZE = 16_384


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


def many_leaves(n_leaves: int, key: str = "many-leaves") -> TreeSpec:
    """`n_leaves` arrays of 16,384 parameters in four different shapes."""
    shapes = ((128, 128), (64, 256), (256, 64), (LEAF_SIZE,))
    leaves = tuple((f"w{i:04d}", shapes[i % len(shapes)]) for i in range(n_leaves))
    spec = TreeSpec(key, "", leaves)
    return dataclasses.replace(
        spec,
        description=f"{spec.n_params:,} params in {n_leaves} "
        f"{'leaf' if n_leaves == 1 else 'leaves'} of 16,384",
    )


def leaves(n_leaves: int) -> TreeSpec:
    """The tree ``leaves-N`` of ``--trees``: `n_leaves` arrays of 16,384 parameters.

    The same in a ``--quick`` run; ``leaves-1000`` is ``many-leaves`` of a full run.
    """
    return many_leaves(n_leaves, key=f"leaves-{n_leaves}")


def transformer(blocks: int, width: int, vocab: int, stacked: bool = False) -> TreeSpec:
    """Embedding, `blocks` blocks of attention, MLP and two norms, a final norm.

    With `stacked`, each parameter of the blocks is one leaf with a leading axis of
    `blocks`, as ``nnx.scan`` or ``flax.linen.scan`` over layers lay them out: the
    same parameters in 19 leaves instead of ``16 blocks + 3``.
    """
    block: list[tuple[str, tuple[int, ...]]] = []
    for name in ("q", "k", "v", "o"):
        block += [(f"attn/{name}/w", (width, width)), (f"attn/{name}/b", (width,))]
    block += [
        ("mlp/up/w", (width, 4 * width)),
        ("mlp/up/b", (4 * width,)),
        ("mlp/down/w", (4 * width, width)),
        ("mlp/down/b", (width,)),
    ]
    for norm in ("norm1", "norm2"):
        block += [(f"{norm}/scale", (width,)), (f"{norm}/bias", (width,))]
    leaves: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, width))]
    if stacked:
        leaves += [(f"blocks/{name}", (blocks, *shape)) for name, shape in block]
    else:
        leaves += [(f"block{b:02d}/{name}", shape) for b in range(blocks) for name, shape in block]
    leaves += [("final_norm/scale", (width,)), ("final_norm/bias", (width,))]
    spec = TreeSpec("transformer-stacked" if stacked else "transformer", "", tuple(leaves))
    return dataclasses.replace(
        spec,
        description=(
            f"transformer-like{', layers stacked' if stacked else ''}: {blocks} blocks, "
            f"width {width}, vocab {vocab}; {spec.n_params:,} params in {spec.n_leaves} leaves"
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


_LEAVES_KEY = re.compile(r"leaves-([1-9][0-9]*)")


def tree_spec(key: str, quick: bool) -> TreeSpec | None:
    """The tree a key of ``--trees`` names (a fixed tree or ``leaves-N``), or None."""
    match = _LEAVES_KEY.fullmatch(key)
    if match is not None:
        return leaves(int(match.group(1)))
    specs = tree_specs(quick)
    if key == "transformer-stacked":
        # The transformer of this run, its layers stacked.
        shape = next(s for s in specs if s.key == "transformer")
        blocks = sum(1 for name, _ in shape.leaves if name.endswith("/attn/q/w"))
        width, vocab = shape.leaves[0][1][1], shape.leaves[0][1][0]
        return transformer(blocks, width, vocab, stacked=True)
    return next((s for s in specs if s.key == key), None)


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


MEMORY_FIELDS = ("temp", "argument", "output", "alias", "generated_code")


def _memory(compiled: Any) -> dict[str, int | None]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        stats = None
    return {
        f"{f}_bytes": None if stats is None else int(getattr(stats, f"{f}_size_in_bytes"))
        for f in MEMORY_FIELDS
    }


def _host(tree: dict[str, jax.Array], keys: Iterable[str]) -> list[np.ndarray]:
    # In the order of `keys`: JAX hands dicts back with their keys sorted.
    return [np.asarray(tree[k]) for k in keys]


def _device(tree: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in tree.items()}


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


def optimizer(kind: str) -> optax.GradientTransformation:
    """The optimizer of a row: ``"optax"`` or a storage kind of `STORAGE`."""
    if kind == "optax":
        return optax.adamax(LEARNING_RATE, B1, B2, EPS)
    _, mu_dtype, nu_dtype = STORAGE[kind]
    return _ours(mu_dtype, nu_dtype)


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """A JAX row's step: what is compiled and timed.

    Attributes:
        make: Returns a fresh step function (a new object misses every cache of
            tracing, lowering and compilation).
        args: The step's arguments from the parameters and the gradient
            (concrete arrays, or under ``jax.eval_shape`` their shapes).
        donate: The positions of the donated arguments.
    """

    make: Callable[[], Callable]
    args: Callable[[Any, Any], tuple]
    donate: tuple[int, ...]


def step_setup(kind: str) -> StepSetup:
    """The step of the row `kind`: ``"floor"``, ``"optax"`` or a storage kind.

    The floor reads θ, g, m, u and writes θ, m, u with next to no arithmetic: the
    two moment updates of AdaMax and a plain gradient step, all of its memory
    traffic, none of its division or bias correction. The others are the
    optimizer's ``update`` and ``optax.apply_updates``.
    """
    if kind == "floor":
        lr, b1, b2 = (jnp.float32(x) for x in (LEARNING_RATE, B1, B2))
        one_minus_b1 = jnp.float32(1 - B1)

        def make_kernel() -> Callable:
            def kernel(params, grads, mu, nu):
                params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
                mu = jax.tree.map(lambda m, g: b1 * m + one_minus_b1 * g, mu, grads)
                nu = jax.tree.map(lambda u, g: jnp.maximum(b2 * u, jnp.abs(g)), nu, grads)
                return params, mu, nu

            return kernel

        def floor_args(params: Any, grads: Any) -> tuple:
            zeros = lambda p: jnp.zeros(p.shape, p.dtype)  # noqa: E731
            return params, grads, jax.tree.map(zeros, params), jax.tree.map(zeros, params)

        return StepSetup(make_kernel, floor_args, (0, 2, 3))
    opt = optimizer(kind)

    def make_step() -> Callable:
        def train_step(params, grads, state):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return train_step

    return StepSetup(make_step, lambda params, grads: (params, grads, opt.init(params)), (0, 2))


def _abstract_params(spec: TreeSpec) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in spec.leaves}


def _abstract_args(kind: str, spec: TreeSpec) -> tuple:
    params = _abstract_params(spec)
    return jax.eval_shape(step_setup(kind).args, params, params)


def _state_and_streams(kind: str, args: tuple) -> tuple[Any, int, int]:
    """The state in `args`, the bytes of the seven streams and a full-size buffer's bytes."""
    if kind == "floor":
        params, grads, mu, nu = args
        streams = 2 * _nbytes(params) + _nbytes(grads) + 2 * _nbytes(mu) + 2 * _nbytes(nu)
        return (mu, nu), streams, _full_size(params, mu, nu)
    params, grads, state = args
    # The moments are the state's arrays (for 8-bit moments, their block scales and the
    # 256 bytes that record the block size too); the rest are scalars.
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    streams = 2 * _nbytes(params) + _nbytes(grads) + 2 * _nbytes(moments)
    return state, streams, _full_size(params, moments)


def compile_here(
    setup: StepSetup, args: tuple[Any, ...], options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles a fresh step after ``jax.clear_caches()``: a first call's cost."""
    jax.clear_caches()
    start = time.perf_counter()
    lowered = jax.jit(setup.make(), donate_argnums=setup.donate).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile() if options is None else lowered.compile(compiler_options=options)
    done = time.perf_counter()
    info = {"compile_s": done - start, "lower_s": lowered_at - start}
    return compiled, {**info, "xla_compile_s": done - lowered_at, **_memory(compiled)}


# How long a compile worker may take to start (import JAX, build the step's shapes).
WORKER_START_S = 300.0


def _peak_rss_bytes() -> int | None:
    """This process's peak resident memory, where Linux says (None elsewhere).

    Not ``getrusage``: its ``ru_maxrss`` survives ``execve``, and so starts at the
    parent's resident memory when it started the process.
    """
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None
    return None if line is None else 1024 * int(line.split()[1])  # in kB


def compile_worker() -> None:
    """In a fresh process: compiles the step that stdin describes once, prints its times.

    Prints ``ready`` once JAX is up and the step's arguments are built, then one
    line of JSON, the result of `compile_here` and the process's peak resident
    memory.
    """
    job = json.loads(sys.stdin.read())
    if job["memory_limit_bytes"] is not None:
        import resource

        limit = job["memory_limit_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    spec = TreeSpec("worker", "", tuple((k, tuple(s)) for k, s in job["leaves"]))
    args = _abstract_args(job["kind"], spec)
    # Start XLA's compiler, which a first compile in a process would otherwise pay for.
    jax.jit(lambda x: x + 1).lower(jnp.float32(0)).compile()
    print("ready", flush=True)
    _, info = compile_here(step_setup(job["kind"]), args)
    print(json.dumps({**info, "compile_peak_rss_bytes": _peak_rss_bytes()}), flush=True)


# What a process that ran out of memory writes on its way out.
_OUT_OF_MEMORY = ("bad_alloc", "MemoryError", "mmap error", "annot allocate", "out of memory")


def _failure(returncode: int, stderr: str, ready: bool) -> str:
    """Why a compile worker died, in a few words."""
    if returncode < 0:
        try:
            why = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            why = f"killed by signal {-returncode}"
    else:
        why = f"exit status {returncode}"
    if not ready:
        why = f"{why} before it was ready"
    if any(marker in stderr for marker in _OUT_OF_MEMORY):
        return f"{why}: out of memory"
    if returncode == -signal.SIGKILL:
        return f"{why} (the kernel's OOM killer?)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"{why}: {lines[-1][:200]}" if lines else why


def compile_in_subprocess(
    kind: str, spec: TreeSpec, timeout: float, memory_limit: int | None = None
) -> dict[str, Any] | None:
    """`compile_here` of the row `kind` in a fresh process; None after `timeout` seconds.

    The timeout counts from when the worker is ready (JAX imported, arguments
    built); then the process is killed. With `memory_limit` (bytes), the
    worker's address space is limited to that (``RLIMIT_AS``). A worker that
    dies (out of memory, say) gives ``{"error": why}``.
    """
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    leaves = [[k, list(s)] for k, s in spec.leaves]
    job = json.dumps({"kind": kind, "leaves": leaves, "memory_limit_bytes": memory_limit})
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", "from adamax_jax.benchmark import compile_worker; compile_worker()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout, proc.stderr

        def read_stdout() -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        readers = [
            threading.Thread(target=read_stdout, daemon=True),
            threading.Thread(target=lambda: errors.append(err.read()), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.stdin.write(job)
            proc.stdin.close()
            try:
                ready = lines.get(timeout=WORKER_START_S)
            except queue.Empty:
                ready = f"not ready after {WORKER_START_S:g} s"
            result = None
            if ready is not None and ready.strip() == "ready":
                try:
                    result = lines.get(timeout=timeout)
                except queue.Empty:
                    return None  # out of time: killed below
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for reader in readers:
                reader.join()
    if result is None:
        # A measurement that failed (out of memory, say): reported, and the run goes on.
        was_ready = ready is not None and ready.strip() == "ready"
        return {"error": _failure(proc.returncode, "".join(errors), was_ready)}
    return json.loads(result)


_ALLOCATION = re.compile(r"allocation \d+: size (\d+)(.*)")
_VALUE = re.compile(r"\s*value: <\d+ \S+ @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_ARRAY = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")


def temp_buffers(
    buffer_assignment: str,
) -> tuple[int, list[tuple[int, tuple[int, ...] | None, str]]]:
    """The temporary buffers in the text of XLA's buffer assignment.

    Args:
        buffer_assignment: A ``*buffer-assignment.txt`` file of an XLA dump.

    Returns:
        The bytes of the temporary allocations (neither a parameter, an output, a
        constant nor thread-local; what ``memory_analysis()`` counts as temp),
        and their buffers as (bytes, dimensions or None for a tuple, shape).
    """
    not_temp = ("parameter", "output shape", "maybe-live-out", "constant", "thread-local")
    total, buffers, in_temp = 0, [], False
    for line in buffer_assignment.splitlines():
        allocation = _ALLOCATION.fullmatch(line.rstrip())
        if allocation is not None:
            in_temp = not any(word in allocation.group(2) for word in not_temp)
            total += int(allocation.group(1)) if in_temp else 0
            continue
        value = _VALUE.match(line)
        if value is not None and in_temp:
            shape = value.group(2).split("{")[0]
            array = _ARRAY.fullmatch(shape)
            dims = None if array is None else tuple(int(d) for d in array.group(1).split(",") if d)
            buffers.append((int(value.group(1)), dims, shape))
    return total, buffers


def _leaf_sizes(spec: TreeSpec) -> set[int]:
    return {math.prod(s) for _, s in spec.leaves if math.prod(s) > 1}


def compile_with_buffers(
    setup: StepSetup, args: tuple[Any, ...], spec: TreeSpec
) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """Compiles the step with XLA's dump on.

    Returns it, its compile time and memory (as :func:`compile_here`) and a
    summary of its temporary buffers: None where the backend writes no buffer
    assignment. A buffer is leaf-sized when it has the shape of a parameter leaf
    of two values or more (in any dtype): a copy of a leaf, or of its moment.
    """
    with tempfile.TemporaryDirectory(prefix="adamax_jax_benchmark_") as dump:
        try:
            compiled, info = compile_here(setup, args, {"xla_dump_to": dump})
        except Exception:  # a backend that takes no dump options
            return (*compile_here(setup, args), None)
        paths = sorted(p for p in Path(dump).glob("*buffer-assignment.txt"))
        if not paths:
            return compiled, info, None
        total, buffers = temp_buffers(paths[-1].read_text())
    shapes = {s for _, s in spec.leaves if math.prod(s) > 1}
    leaf_sized = [b for b in buffers if b[1] in shapes]
    largest = max(buffers, default=(0, None, None))
    summary = {
        "temp_allocation_bytes": total,
        "count": len(buffers),
        "largest_bytes": largest[0],
        "largest_shape": largest[2],
        "leaf_sized_count": len(leaf_sized),
        "leaf_sized_bytes": sum(b[0] for b in leaf_sized),
    }
    return compiled, info, summary


def make_runner(
    kind: str,
    compiled: Any,
    args: tuple[Any, ...],
    params_np: dict[str, np.ndarray],
    compile_info: dict[str, Any] | None,
) -> Runner:
    """A JAX row: steps `compiled` on `args` (donated ones replaced by its outputs)."""
    _, bytes_per_step, full_size = _state_and_streams(kind, args)
    if kind == "floor":
        params, grads, mu, nu = args
        floor_box = [params, mu, nu]

        def floor_step() -> None:
            floor_box[0], floor_box[1], floor_box[2] = compiled(
                floor_box[0], grads, floor_box[1], floor_box[2]
            )
            jax.block_until_ready(floor_box)

        return Runner(
            FLOOR,
            floor_step,
            lambda: _host(floor_box[0], params_np),
            lambda: _nbytes(floor_box[1:]),
            bytes_per_step,
            compile_info,
            full_size,
        )
    params, grads, state = args
    box = [params, state]

    def step() -> None:
        box[0], box[1] = compiled(box[0], grads, box[1])
        jax.block_until_ready(box)

    return Runner(
        ROWS[kind],
        step,
        lambda: _host(box[0], params_np),
        lambda: _nbytes(box[1]),
        bytes_per_step,
        compile_info,
        full_size,
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


def _compile_summary(
    runs: list[dict[str, Any]], timed_out: bool, timeout: float | None, error: str | None
) -> dict[str, Any]:
    """The compile of median total time, all totals, and whether one ran out of time or failed."""
    info: dict[str, Any] = {
        "compile_s": None,
        "lower_s": None,
        "xla_compile_s": None,
        **{f"{f}_bytes": None for f in MEMORY_FIELDS},
    }
    if runs:
        info = dict(sorted(runs, key=lambda r: r["compile_s"])[(len(runs) - 1) // 2])
    if timed_out or error is not None:
        # A compile that ran out of time or failed has no median to report.
        info.update(compile_s=None, lower_s=None, xla_compile_s=None)
    peaks = [r["compile_peak_rss_bytes"] for r in runs if r.get("compile_peak_rss_bytes")]
    info["compile_peak_rss_bytes"] = max(peaks, default=None)
    info["compile_runs_s"] = [r["compile_s"] for r in runs]
    info["compile_timed_out"] = timed_out
    info["compile_timeout_s"] = timeout
    info["compile_error"] = error
    return info


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _timing(times: list[float]) -> dict[str, Any]:
    if not times:
        return dict.fromkeys(("median_s", "min_s", "q1_s", "q3_s"))
    q1, _, q3 = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "min_s": min(times), "q1_s": q1, "q3_s": q3}


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
    storage: Sequence[str] = tuple(STORAGE),
    compile_timeout: float | None = None,
    compile_memory: int | None = None,
    dump_compiles: bool = False,
) -> dict[str, Any]:
    """Compiles and times every optimizer on one tree, round after round; returns its results.

    Args:
        spec: The tree.
        steps: Timed steps of each row.
        warmup: Untimed steps of each row first.
        compile_repeats: Compiles of each JAX row, interleaved across the rows.
        with_torch: Whether to add the PyTorch rows.
        threads: PyTorch's threads.
        progress: Where progress lines go.
        label: The prefix of this tree's progress lines.
        storage: The storage kinds of the adamax_jax rows; ``"float32"`` among them.
        compile_timeout: None to compile in this process; else seconds after which
            a compile, each in a fresh process, is stopped.
        compile_memory: With `compile_timeout`, the address space in bytes that
            each compile process may use, or None for no limit. A compile that
            fails (runs out of memory, say) is reported, and its row not timed.
        dump_compiles: Without `compile_timeout`: compile with XLA's dump on and
            read the temporary buffers from those compiles, so that each row
            compiles once (``--quick``); the compile times then include writing
            the dump. Otherwise a row with room for a leaf-sized buffer is
            compiled once more, with the dump, after the timed compiles.

    Returns:
        The tree and one row of results for each optimizer.
    """
    if "float32" not in storage:
        raise ValueError(f"`storage` must include 'float32', got {list(storage)}.")
    params_np, grads_np = tree_data(spec)
    grads = _device(grads_np)
    kinds = ["floor", *[k for k in STORAGE if k in storage], "optax"]
    setups = {kind: step_setup(kind) for kind in kinds}
    args: dict[str, tuple] = {}
    compiled: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    timed_out: set[str] = set()
    failed: dict[str, str] = {}
    dumped: dict[str, dict[str, Any] | None] = {}

    def concrete_args(kind: str) -> tuple:
        if kind not in args:
            args[kind] = setups[kind].args(_device(params_np), grads)
        return args[kind]

    for r in range(compile_repeats):
        for kind in kinds:
            if kind in timed_out or kind in failed:
                continue
            if compile_timeout is None and dump_compiles:
                compiled[kind], info, dumped[kind] = compile_with_buffers(
                    setups[kind], concrete_args(kind), spec
                )
                where = ""
            elif compile_timeout is None:
                compiled[kind], info = compile_here(setups[kind], concrete_args(kind))
                where = ""
            else:
                info = compile_in_subprocess(kind, spec, compile_timeout, compile_memory)
                where = ", fresh process"
            count = f" ({r + 1}/{compile_repeats}{where})"
            if info is None:
                timed_out.add(kind)
                progress.line(f"{label} {ROWS[kind]}: compile > {compile_timeout:g} s{count}")
            elif "error" in info:
                failed[kind] = info["error"]
                progress.line(f"{label} {ROWS[kind]}: compile failed: {info['error']}{count}")
            else:
                runs[kind].append(info)
                peak = info.get("compile_peak_rss_bytes")
                memory = "" if peak is None else f", peak RSS {_size(peak)}"
                progress.line(
                    f"{label} {ROWS[kind]}: compiled in {info['compile_s']:.2f} s{memory}{count}"
                )

    leaf_sizes = _leaf_sizes(spec)
    compile_info: dict[str, dict[str, Any]] = {}
    runners: list[Runner] = []
    for kind in kinds:
        info = _compile_summary(runs[kind], kind in timed_out, compile_timeout, failed.get(kind))
        info["temp_buffers"] = None
        compile_info[kind] = info
        if not runs[kind] or kind in failed:
            # No compile finished in time, or one failed (and would fail here): not timed.
            continue
        temp = info["temp_bytes"]
        if temp is not None and leaf_sizes and temp >= min(leaf_sizes):
            # Room for a leaf-sized buffer (of a byte a value or more): read the buffers.
            if kind in dumped:
                info["temp_buffers"] = dumped[kind]
            else:
                exe, _, info["temp_buffers"] = compile_with_buffers(
                    setups[kind], concrete_args(kind), spec
                )
                compiled.setdefault(kind, exe)
        if kind not in compiled:
            compiled[kind], _ = compile_here(setups[kind], concrete_args(kind))
        runners.append(make_runner(kind, compiled[kind], concrete_args(kind), params_np, info))
        progress.line(f"{label} {ROWS[kind]}: ready")
    if with_torch:
        for name, foreach in ((TORCH_FOREACH, True), (TORCH_LOOP, False)):
            runners.append(torch_runner(name, foreach, params_np, grads_np, threads))
            progress.line(f"{label} {name}: ready")

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

    by_name = {runner.name: runner for runner in runners}
    final = {runner.name: runner.params() for runner in runners}

    def median(name: str) -> float | None:
        runner = by_name.get(name)
        return None if runner is None else statistics.median(runner.times)

    floor_s, optax_s = median(FLOOR), median(OPTAX)
    baseline = by_name.get(OURS)
    names = [ROWS[kind] for kind in kinds] + ([TORCH_FOREACH, TORCH_LOOP] if with_torch else [])
    kind_of = {ROWS[kind]: kind for kind in kinds}
    largest_leaf_bytes = 4 * max(math.prod(s) for _, s in spec.leaves)
    rows = []
    for name in names:
        runner = by_name.get(name)
        kind = kind_of.get(name)
        times = [] if runner is None else runner.times
        if runner is not None:
            state_bytes = runner.state_bytes()
            bytes_per_step, full_size = runner.bytes_per_step, runner.full_size_bytes
        else:  # a JAX row that was not timed: its sizes from the shapes
            assert kind is not None
            state, bytes_per_step, full_size = _state_and_streams(kind, _abstract_args(kind, spec))
            state_bytes = _nbytes(state)
        timing = _timing(times)
        paired = None
        if times and baseline is not None:
            paired = statistics.median(t / b for t, b in zip(times, baseline.times, strict=True))
        row: dict[str, Any] = {
            "optimizer": name,
            "storage": kind if kind in STORAGE else None,
            "steps": len(times),
            **timing,
            "times_s": list(times),
            "x_floor": _div(timing["median_s"], floor_s),
            "speedup_vs_optax": _div(optax_s, timing["median_s"]),
            "x_float32_state": paired,
            "bytes_per_step": bytes_per_step,
            "gb_per_s": _div(bytes_per_step / 1e9, timing["median_s"]),
            "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / spec.n_params,
            "state_x_params": state_bytes / (4 * spec.n_params),
            "max_abs_diff_vs_optax": None,
            "compile_s": None,
            "lower_s": None,
            "xla_compile_s": None,
            "compile_runs_s": None,
            "compile_timed_out": None,
            "compile_timeout_s": None,
            "compile_error": None,
            "compile_peak_rss_bytes": None,
            "compile_in_subprocess": None,
            "compile_x_float32_state": None,
            "temp_bytes": None,
            "argument_bytes": None,
            "output_bytes": None,
            "alias_bytes": None,
            "generated_code_bytes": None,
            "full_size_bytes": full_size,
            "no_full_size_temp": None,
            "temp_x_largest_leaf": None,
            "temp_buffers": None,
            "leaf_sized_temp": None,
        }
        if kind is not None:
            row.update(compile_info[kind])
            row["compile_in_subprocess"] = compile_timeout is not None
            row["compile_x_float32_state"] = _div(
                row["compile_s"], compile_info["float32"]["compile_s"]
            )
            temp = row["temp_bytes"]
            if temp is not None:
                row["no_full_size_temp"] = temp < full_size
                row["temp_x_largest_leaf"] = temp / largest_leaf_bytes
                if row["temp_buffers"] is not None:
                    row["leaf_sized_temp"] = row["temp_buffers"]["leaf_sized_count"] > 0
                elif not leaf_sizes or temp < min(leaf_sizes):
                    row["leaf_sized_temp"] = False  # too small to hold a leaf
        if name != FLOOR and name in final and OPTAX in final:
            row["max_abs_diff_vs_optax"] = max(
                float(np.max(np.abs(a - b))) for a, b in zip(final[name], final[OPTAX], strict=True)
            )
        rows.append(row)
    return {
        "key": spec.key,
        "description": spec.description,
        "n_params": spec.n_params,
        "n_leaves": spec.n_leaves,
        "param_bytes": 4 * spec.n_params,
        "largest_leaf_bytes": largest_leaf_bytes,
        "leaf_shapes": [list(s) for _, s in spec.leaves],
        "results": rows,
    }


# --------------------------------------------------------------------------- reporting


def _cores() -> int | None:
    """Physical cores, from ``/proc/cpuinfo`` (None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    cores: set[tuple[str, str]] = set()
    for block in text.split("\n\n"):
        pairs = (line.partition(":") for line in block.splitlines())
        fields = {k.strip(): v.strip() for k, _, v in pairs}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return cpu


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = cpu_model()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = None
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cores": _cores(),
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


def _field(tree: dict[str, Any] | None, name: str, field: str) -> Any:
    row = None if tree is None else _optional_row(tree, name)
    return None if row is None else row[field]


def targets(trees: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals of the step, checked against one run's numbers (None where not measured)."""
    checks = []

    def check(text: str, value: float | None, op: str, threshold: float) -> None:
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        checks.append(
            {"target": text, "value": value, "op": op, "threshold": threshold, "met": met}
        )

    for tree in trees:
        speed = _field(tree, OURS, "speedup_vs_optax")
        check(f"{tree['key']}: speed of {OURS} / {OPTAX}", speed, ">=", 1.0)
    by_key = {t["key"]: t for t in trees}
    leaf = by_key.get("one-leaf")
    if leaf is not None:
        ours_s = _field(leaf, OURS, "median_s")
        speed = _div(_field(leaf, TORCH_FOREACH, "median_s"), ours_s)
        check(f"one-leaf: speed of {OURS} / {TORCH_FOREACH}", speed, ">=", 2.0)
        check(f"one-leaf: time of {OURS} / floor", _field(leaf, OURS, "x_floor"), "<=", 1.3)
        # To four places: the step count and ν's scale add a few bytes to the moments.
        ours_state = round(_field(leaf, OURS, "state_x_params"), 4)
        check(f"one-leaf: state of {OURS} / params", ours_state, "<=", 2.0)
        bf16_state = _field(leaf, OURS_BF16, "state_x_params")
        bf16_state = None if bf16_state is None else round(bf16_state, 4)
        check(f"one-leaf: state of {OURS_BF16} / params", bf16_state, "<=", 1.0)
        int8_bytes = _field(leaf, OURS_INT8, "state_bytes_per_param")
        check(f"one-leaf: state bytes per parameter of {OURS_INT8}", int8_bytes, "<=", 2.05)
    # Each storage kind against float32 state: (step time, compile time) at most.
    limits = {OURS_BF16: (1.0, 1.5), OURS_INT8: (2.0, 3.0), OURS_FP8: (2.0, 3.0)}
    for key in ("one-leaf", "transformer"):
        tree = by_key.get(key)
        if tree is None:
            continue
        f32_s = _field(tree, OURS, "median_s")
        for name, (limit, _) in limits.items():
            if _optional_row(tree, name) is None:
                continue
            ratio = _div(_field(tree, name, "median_s"), f32_s)
            check(f"{key}: step time of {name} / {OURS}", ratio, "<=", limit)
    many = by_key.get("many-leaves")
    if many is not None:
        ratio = _div(_field(many, OURS, "compile_s"), _field(many, OPTAX, "compile_s"))
        check(f"many-leaves: compile time of {OURS} / {OPTAX}", ratio, "<=", 1.0)
        check(f"many-leaves: compile time of {OURS} / {OPTAX}, stretch", ratio, "<=", 0.5)
    for tree in trees:
        if tree["key"] not in ("many-leaves", "leaves-100", "leaves-1000"):
            continue
        ours_c = _field(tree, OURS, "compile_s")
        for name, (_, limit) in limits.items():
            if _optional_row(tree, name) is None:
                continue
            ratio = _div(_field(tree, name, "compile_s"), ours_c)
            check(f"{tree['key']}: compile time of {name} / {OURS}", ratio, "<=", limit)
    # The temporaries of a donated step hold no buffer of a parameter leaf's shape.
    for tree in trees:
        for name in (OURS, *limits):
            row = _optional_row(tree, name)
            if row is None:
                continue
            sized = row["leaf_sized_temp"]
            buffers = row["temp_buffers"]
            count = None if sized is None else buffers["leaf_sized_count"] if buffers else 0
            check(f"{tree['key']}: leaf-sized temp buffers of {name}", count, "<=", 0)
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


def _ms(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x * 1e3, fmt)


def _compile_text(row: dict[str, Any], fmt: str = ".2f") -> str:
    """The compile time, "> N" where a compile ran out of time, "failed" where one failed."""
    if row.get("compile_error"):
        return "failed"
    if row.get("compile_timed_out"):
        return f"> {row['compile_timeout_s']:g}"
    return _num(row["compile_s"], fmt)


def _hardware(meta: dict[str, Any]) -> str:
    return meta["cpu"] if meta["backend"] == "cpu" else meta["device"]


def machine_line(meta: dict[str, Any]) -> str:
    """The machine in one line: CPU, cores, memory, backend and versions."""
    cores = "" if meta.get("cores") is None else f"{meta['cores']} cores, "
    memory = meta.get("memory_bytes")
    memory_text = "" if memory is None else f", {memory / (1 << 30):.0f} GiB"
    device = "" if meta["backend"] == "cpu" else f", {meta['device_count']} × {meta['device']}"
    return (
        f"Machine: {meta['cpu']} ({cores}{meta['cpu_count']} CPUs, "
        f"{meta['threads']} usable{memory_text}); jax {meta['jax']} "
        f"(jaxlib {meta['jaxlib']}, {meta['backend']} backend{device}), "
        f"optax {meta['optax']}, torch {meta['torch'] or 'absent'}, "
        f"Python {meta['python']}"
    )


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
        vs_torch = _div(_field(tree, TORCH_FOREACH, "median_s"), ours["median_s"])
        lines.append(
            f"| {tree['key']} | {tree['n_params']:,} | {tree['n_leaves']} "
            f"| {_ms(ours['median_s'])} | {_num(ours['x_floor'], '.2f')} "
            f"| {_num(ours['gb_per_s'], '.1f')} "
            f"| {_num(ours['speedup_vs_optax'], '.2f')} | {_num(vs_torch, '.2f')} "
            f"| {_compile_text(ours)} ({_compile_text(optax_row)}) "
            f"| {_size(ours['temp_bytes'])} |"
        )
    return lines


def _leaf_sized_text(row: dict[str, Any]) -> str:
    buffers = row["temp_buffers"]
    if buffers is not None:
        largest = f"largest {_size(buffers['largest_bytes'])}"
        if buffers["largest_shape"] is not None:
            largest += f" {buffers['largest_shape']}"
        if buffers["leaf_sized_count"] == 0:
            return f"none ({largest})"
        return f"{buffers['leaf_sized_count']}, {_size(buffers['leaf_sized_bytes'])} ({largest})"
    if row["leaf_sized_temp"] is False:
        return "none (temp < a leaf)"
    return "-"


def _ratio_text(row: dict[str, Any], f32: dict[str, Any]) -> str:
    if row.get("compile_error"):
        return "-"
    if row.get("compile_timed_out"):
        bound = _div(row["compile_timeout_s"], f32["compile_s"])
        return "-" if bound is None else f"> {bound:.1f}"
    return _num(row["compile_x_float32_state"], ".2f")


def _small_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if 0 < x < 0.005:
        return "< 0.01"
    return f"{x:.2f}"


def storage_table(report: dict[str, Any]) -> list[str]:
    """One line per tree and storage kind: step and compile time against float32 state, memory."""
    lines = [
        f"### storage: {OURS} by state storage",
        "",
        "| tree | storage | step ms | × float32 step | compile s | × float32 compile "
        "| compile peak RSS | state B/param | temp memory | temp / largest leaf "
        "| leaf-sized temp buffers |",
        "|" + " --- |" * 11,
    ]
    for tree in report["trees"]:
        f32 = _row(tree, OURS)
        for row in tree["results"]:
            if row["storage"] is None:
                continue
            step = _ms(row["median_s"])
            if row["median_s"] is None and row["compile_error"]:
                step = f"- (compile failed: {row['compile_error']})"
            elif row["median_s"] is None and row["compile_timed_out"]:
                step = "- (not compiled in time)"
            lines.append(
                f"| {tree['key']} | {row['storage']} | {step} "
                f"| {_num(row['x_float32_state'], '.2f')} | {_compile_text(row)} "
                f"| {_ratio_text(row, f32)} | {_size(row['compile_peak_rss_bytes'])} "
                f"| {row['state_bytes_per_param']:.2f} "
                f"| {_size(row['temp_bytes'])} | {_small_ratio(row['temp_x_largest_leaf'])} "
                f"| {_leaf_sized_text(row)} |"
            )
    return lines


def table(report: dict[str, Any]) -> str:
    """The results as Markdown tables: a summary, storage kinds, one per tree, the targets."""
    meta = report["machine"]
    lines = [
        f"AdaMax step, {meta['backend']} ({_hardware(meta)}), "
        f"{meta['threads']} threads; jax {meta['jax']}, optax {meta['optax']}, "
        f"torch {meta['torch'] or 'absent'}; median of {report['steps']} steps "
        f"after {report['warmup']} warm-up",
        "",
        machine_line(meta),
        "",
        f"Command: {report['command']}",
        "",
    ]
    lines += [*summary(report), ""]
    lines += [*storage_table(report), ""]
    header = (
        "| optimizer | median ms | × floor | speed vs optax | GB/s | compile s | temp memory "
        "| state B/param | max Δθ vs optax |"
    )
    for tree in report["trees"]:
        lines += [f"### {tree['key']}: {tree['description']}", "", header, "|" + " --- |" * 9]
        for r in tree["results"]:
            lines.append(
                f"| {r['optimizer']} | {_ms(r['median_s'], '.3f')} | {_num(r['x_floor'], '.2f')} "
                f"| {_num(r['speedup_vs_optax'], '.2f')} | {_num(r['gb_per_s'], '.1f')} "
                f"| {_compile_text(r)} | {_size(r['temp_bytes'])} "
                f"| {r['state_bytes_per_param']:.2f} | {_num(r['max_abs_diff_vs_optax'], '.1e')} |"
            )
        lines.append("")
    lines += ["### targets", ""]
    if report["quick"]:
        lines += ["(a --quick run: the trees are too small for these to mean much)", ""]
    for t in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(
            f"- {t['target']}: {_num(t['value'], 'd' if isinstance(t['value'], int) else '.2f')} "
            f"({t['op']} {t['threshold']}: {verdict})"
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
            values = [_field(t, name, field) for t in trees]
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
    keys = [s.key for s in tree_specs(quick=True)]
    parser.add_argument(
        "--trees",
        help=f"comma-separated subset of: {', '.join(keys)}, transformer-stacked (the "
        "transformer's layers stacked, as by nnx.scan), leaves-N (N leaves of 16,384 "
        "values, the same in --quick)",
    )
    parser.add_argument(
        "--storage",
        help="comma-separated storage kinds of the adamax_jax rows: float32 (always run, "
        "the baseline of the ratios), bfloat16, int8 (int8 μ, uint8 ν), float8 "
        "(float8_e4m3fn μ and ν); default all",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        metavar="SECONDS",
        help="compile each JAX step in a fresh process and stop it after SECONDS (reported "
        "as '> SECONDS'; a row none of whose compiles finished is not timed); default: "
        "compile in this process after jax.clear_caches(), without a limit",
    )
    parser.add_argument(
        "--compile-memory",
        type=float,
        metavar="GIB",
        help="with --compile-timeout: limit each compile process's address space to GIB "
        "(RLIMIT_AS); a compile that runs out is reported as failed, its row not timed",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error(f"`--steps` must be at least 2, got {args.steps}.")
    if args.compile_repeats is not None and args.compile_repeats < 1:
        parser.error(f"`--compile-repeats` must be at least 1, got {args.compile_repeats}.")
    if args.warmup is not None and args.warmup < 1:
        parser.error(f"`--warmup` must be at least 1, got {args.warmup}.")
    if args.compile_timeout is not None and not args.compile_timeout > 0:
        parser.error(f"`--compile-timeout` must be positive, got {args.compile_timeout:g}.")
    if args.compile_memory is not None:
        if args.compile_timeout is None:
            parser.error("`--compile-memory` needs `--compile-timeout` (a compile process).")
        if not args.compile_memory > 0:
            parser.error(f"`--compile-memory` must be positive, got {args.compile_memory:g}.")
    if args.trees is not None:
        if any(tree_spec(key, quick=True) is None for key in args.trees.split(",")):
            parser.error(
                f"`--trees` must name some of {', '.join(keys)} or leaves-N (N >= 1), "
                f"got {args.trees!r}."
            )
    if args.storage is not None:
        unknown = sorted(set(args.storage.split(",")) - set(STORAGE))
        if unknown:
            parser.error(
                f"`--storage` must name some of {', '.join(STORAGE)}, got {args.storage!r}."
            )
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
        keys = list(dict.fromkeys(args.trees.split(",")))
        specs = [s for s in (tree_spec(k, args.quick) for k in keys) if s is not None]
    threads = cpu_threads()
    notes = [
        "every row uses eps inside the max (optax's and PyTorch's convention), "
        "so all compute the same numbers",
        f"PyTorch runs on the CPU with torch.set_num_threads({threads}), "
        "the threads XLA's CPU client has",
        "× float32 step: the median over the timed rounds of the row's step time over "
        "the float32-state step of the same round",
    ]
    asked = list(STORAGE) if args.storage is None else args.storage.split(",")
    storage = [k for k in STORAGE if k in asked or k == "float32"]
    if "float32" not in asked:
        notes.append("float32 state was added to --storage: it is the baseline of the ratios")
    if args.compile_timeout is None:
        notes.append(
            "compile s: jax.jit(step, donate_argnums=...).lower(*args).compile() of a fresh "
            "function, in this process after jax.clear_caches()"
            + (
                "; --quick compiles each step once, with XLA's dump on for its temp buffers, "
                "so this includes writing the dump"
                if args.quick
                else ""
            )
        )
    else:
        notes.append(
            "compile s: jax.jit(step, donate_argnums=...).lower(*args).compile() of a fresh "
            f"function, each in a fresh process stopped after {args.compile_timeout:g} s "
            "('> N': it ran out of time; a row none of whose compiles finished is not timed)"
            + (
                ""
                if args.compile_memory is None
                else f", its address space limited to {args.compile_memory:g} GiB"
            )
        )
    notes.append(
        "leaf-sized temp buffers: temporary buffers of a parameter leaf's shape (any dtype), "
        "from XLA's buffer assignment where the temp memory could hold one"
    )
    skip = "--no-torch was given" if args.no_torch else torch_skip_reason()
    if skip is not None:
        notes.append(f"PyTorch rows skipped: {skip}")
    memory_limit = None
    if args.compile_memory is not None:
        memory_limit = int(args.compile_memory * (1 << 30))
    progress = Progress()
    progress.line(
        f"{len(specs)} trees, storage {', '.join(storage)}; {steps} timed steps each "
        f"after {warmup} warm-up"
    )
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
                storage=storage,
                compile_timeout=args.compile_timeout,
                compile_memory=memory_limit,
                dump_compiles=args.quick,
            )
        )
    report = {
        "command": " ".join(["python -m adamax_jax.benchmark", *argv]),
        "quick": args.quick,
        "steps": steps,
        "warmup": warmup,
        "compile_repeats": compile_repeats,
        "storage": storage,
        "compile_timeout_s": args.compile_timeout,
        "compile_memory_bytes": memory_limit,
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
