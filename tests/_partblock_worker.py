"""8-bit state on shards that cut blocks and on last axes that end in a part block.

Run by tests/test_sharding_partblocks.py in one subprocess with 8 host devices:
``python -m tests._partblock_worker OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` writes ``OUT_DIR/results.json``
(for each storage dtype and sharding: the leaves trained, those refused at init with
the message, or the error that stopped the run) and ``OUT_DIR/arrays.npz`` (the
parameters, ``infinity_norm`` and ``first_moment`` after the steps, sharded and on one
device); the test makes the assertions. Only the public API is used (``init``,
``update``, ``infinity_norm``, ``first_moment``, ``zero1_state_shardings``): nothing
here reads the state's fields, so that it holds whatever the state's layout.
Importing this module has no side effects.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax

DEVICES = 8
STEPS = 5
LEARNING_RATE = 1e-3
BLOCK = 256  # the default block size
MESH = ((2, 4), ("data", "model"))

# Storage of (μ, ν): every 8-bit dtype, and a 16-bit μ beside an 8-bit ν.
DTYPES = {
    "int8-uint8": (jnp.int8, jnp.uint8),
    "int8-int8": (jnp.int8, jnp.int8),
    "float8_e4m3fn": (jnp.float8_e4m3fn, jnp.float8_e4m3fn),
    "float8_e5m2": (jnp.float8_e5m2, jnp.float8_e5m2),
    "bfloat16-uint8": (jnp.bfloat16, jnp.uint8),
}

# Parameters over the (data=2, model=4) mesh: name -> (shape, spec). Every one is
# stored block-wise (at least 4096 values), with blocks of 256 along the last axis.
LAYOUT = {
    # 260 a shard; each row ends in a part block of 16.
    "part": ((8, 1040), P(None, "model")),
    # 264 a shard; a part block of 32.
    "part32": ((8, 1056), P(None, "model")),
    # One axis, 1040 a shard over 4 devices; a part block of 64.
    "flat": ((4160,), P("model")),
    # Over a 2-way axis: 520 a shard.
    "two_way": ((8, 1040), P(None, "data")),
    # Over both axes, 130 a shard: every block is cut, and a part block.
    "cut_part": ((8, 1040), P(None, ("data", "model"))),
    # 128 a shard: whole blocks of the leaf, each cut in two; no part block.
    "cut": ((8, 1024), P(None, ("data", "model"))),
    # FSDP-style, split over both axes: 260 a shard along the last, and a part block.
    "fsdp": ((8, 1040), P("data", "model")),
    # FSDP-style with shards of whole blocks: no part block, no block cut.
    "whole": ((8, 1024), P("data", "model")),
    # Rows split, the last axis whole: a part block in every shard.
    "rows": ((8, 1040), P("model", None)),
}


def cuts_blocks(shape, spec):
    """Whether the shards of the last axis hold other than whole blocks (the documented rule)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    last = entries[len(shape) - 1]
    axes = () if last is None else (last,) if isinstance(last, str) else tuple(last)
    sizes = dict(zip(MESH[1], MESH[0], strict=True))
    shards = int(np.prod([sizes[a] for a in axes], dtype=int))
    n = shape[-1]
    return shards > 1 and (n % shards != 0 or (n // shards) % BLOCK != 0)


def make_opt(name):
    mu, nu = DTYPES[name]
    return ax.adamax(LEARNING_RATE, mu_dtype=mu, nu_dtype=nu)


def host_params(shapes):
    """Parameters for leaves by name -> shape."""
    return {
        k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in shapes.items()
    }


def host_grads(shapes, kind):
    """`STEPS` gradients: all ones (which once saturated a sharded part block's scale), or
    random over six decades."""
    if kind == "ones":
        return [{k: np.ones(s, np.float32) for k, s in shapes.items()}] * STEPS
    out = []
    for i in range(STEPS):
        grads = {}
        for k, s in shapes.items():
            rng = np.random.default_rng(1 + i)
            grads[k] = (rng.normal(size=s) * 10.0 ** rng.uniform(-3, 3, size=s)).astype(np.float32)
        out.append(grads)
    return out


def step_fn(opt):
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def explicit_zero1_step_fn(opt, param_sh):
    """On Explicit axes shardings are types: the gradients and parameters are cut to the
    state's sharding (read from what `first_moment` gives back), and the updates gathered."""

    def step(grads, state, params):
        state_sh = jax.tree.map(lambda x: jax.typeof(x).sharding, ax.first_moment(state))
        cut = jax.sharding.reshard(params, state_sh)
        updates, state = opt.update(jax.sharding.reshard(grads, state_sh), state, cut)
        updates = jax.sharding.reshard(updates, param_sh)
        return optax.apply_updates(params, updates), state

    return step


def run_steps(step, params, state, grads_list, put):
    for grads in grads_list:
        params, state = step(put(grads), state, params)
    return params, state


@jax.jit
def _moments(state):
    # Jitted: eagerly, every operation of the decode would be compiled on its own.
    return ax.infinity_norm(state), ax.first_moment(state)


def observed(params, state):
    """What the public API shows: parameters, u_t and m_t, as NumPy float32."""
    nu, mu = _moments(state)
    return {
        "params": {k: np.asarray(v) for k, v in params.items()},
        "nu": {k: np.asarray(v, np.float32) for k, v in nu.items()},
        "mu": {k: np.asarray(v, np.float32) for k, v in mu.items()},
    }


def store(arrays, prefix, obs):
    for what, tree in obs.items():
        for k, v in tree.items():
            arrays[f"{prefix}/{what}/{k}"] = v


def named_leaves(message, names):
    """The leaves among `names` that `message` names as `init` does (``params['k']``)."""
    return sorted(k for k in names if f"params['{k}']" in message)


def single(name, names, kinds):
    """The reference: the same steps on the same tree, jitted, on one device.

    The same tree, leaf for leaf: μ's rounding draws depend on a leaf's place in it.
    """
    opt = make_opt(name)
    one = jax.devices()[0]
    shapes = {k: LAYOUT[k][0] for k in names}
    params = jax.device_put(host_params(shapes), one)
    state = jax.jit(opt.init)(params)
    step = jax.jit(step_fn(opt))
    put = lambda g: jax.device_put(g, one)  # noqa: E731
    return {
        kind: observed(*run_steps(step, params, state, host_grads(shapes, kind), put))
        for kind in kinds
    }


def sharded(name, mode, names, kinds, zero1=False):
    """Init and steps over the mesh, with leaves refused at init set aside.

    Returns the observations by gradient kind, and the refusals: leaf -> message.
    A ValueError that names leaves at init refuses them, and the others are
    tried again; any other failure is raised.
    """
    mesh = jax.make_mesh(*MESH, axis_types=(mode,) * 2)
    opt = make_opt(name)
    refused = {}
    names = list(names)
    with jax.set_mesh(mesh):
        while True:
            param_sh = {k: NamedSharding(mesh, LAYOUT[k][1]) for k in names}
            shapes = {k: LAYOUT[k][0] for k in names}
            params = jax.tree.map(jax.device_put, host_params(shapes), param_sh)
            try:
                if zero1:
                    state_sh = ax.zero1_state_shardings(opt, params, mesh, "data")
                    state = jax.jit(opt.init, out_shardings=state_sh)(params)
                else:
                    state = jax.jit(opt.init)(params)
                break
            except ValueError as e:
                bad = named_leaves(str(e), names)
                if not bad:
                    raise
                for k in bad:
                    refused[k] = str(e)
                names = [k for k in names if k not in bad]
                if not names:
                    return {}, refused
        if zero1:
            base = step_fn(opt) if mode == AxisType.Auto else explicit_zero1_step_fn(opt, param_sh)
            step = jax.jit(
                base,
                in_shardings=(param_sh, state_sh, param_sh),
                out_shardings=(param_sh, state_sh),
            )
        else:
            step = jax.jit(step_fn(opt))
        out, moved = {}, set()
        for kind in kinds:
            put = lambda g: jax.tree.map(jax.device_put, g, param_sh)  # noqa: E731
            new = run_steps(step, params, state, host_grads(shapes, kind), put)
            moved |= relaid(new, (params, state))
            out[kind] = observed(*new)
    return out, refused, sorted(moved)


def relaid(new, old):
    """The key paths of the arrays of `new` laid out otherwise than in `old` (same tree)."""
    moved = set()
    flat_new = jax.tree_util.tree_flatten_with_path(new)[0]
    for (path, a), b in zip(flat_new, jax.tree.leaves(old), strict=True):
        if not a.sharding.is_equivalent_to(b.sharding, a.ndim):
            moved.add(jax.tree_util.keystr(path))
    return moved


MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
KINDS = ("ones", "random")
# The runs against one device: name -> (mesh axes, ZeRO-1 or not, leaves). "rows" keeps
# its last axis whole: it is there for Explicit axes and ZeRO-1. ZeRO-1 splits "part"
# and "rows" further over "data"; the other leaves are split over it already, or
# cannot be split so in whole blocks ("flat"), and keep their sharding.
RUNS = {
    "auto": ("auto", False, tuple(k for k in LAYOUT if k != "rows")),
    "explicit": ("explicit", False, tuple(LAYOUT)),
    "auto-zero1": ("auto", True, ("part", "rows")),
    "explicit-zero1": ("explicit", True, ("part", "rows")),
}


# int8 ν and float8_e5m2 take the code paths of uint8 ν and float8_e4m3fn with other
# constants: they run the layouts that cut blocks or end in a part block on each kind of
# split, which keeps the worker's compile time (about 1 s a sharded leaf) down.
SOME = {"part", "cut_part", "fsdp", "rows"}
FEWER = {"int8-int8", "float8_e5m2"}


def main(out_dir: str) -> None:
    if jax.device_count() != DEVICES:
        sys.exit(f"needs {DEVICES} devices (XLA_FLAGS), found {jax.device_count()}")
    # The same strictness as tests/conftest.py.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    results, arrays = {}, {}
    # The single-device references by (storage, leaves trained): runs that train the same
    # leaves (Explicit axes with and without ZeRO-1, say) share theirs.
    references = {}
    for name in DTYPES:
        for run_name, (mode, zero1, every) in RUNS.items():
            names = tuple(k for k in every if name not in FEWER or k in SOME)
            record = {
                "leaves": list(names),
                "refused": {},
                "error": None,
                "trained": [],
                "relaid": [],
            }
            results[f"{name}/{run_name}"] = record
            try:
                out, refused, record["relaid"] = sharded(name, MODES[mode], names, KINDS, zero1)
            except Exception as e:  # noqa: BLE001 -- reported to the test, which fails on it
                record["error"] = f"{type(e).__name__}: {e}"
                continue
            record["refused"] = refused
            record["trained"] = [k for k in names if k not in refused]
            if not record["trained"]:
                continue
            key = (name, tuple(record["trained"]))
            if key not in references:
                references[key] = single(name, record["trained"], KINDS)
            reference = references[key]
            for kind in KINDS:
                store(arrays, f"{name}/{run_name}/{kind}/sharded", out[kind])
                store(arrays, f"{name}/{run_name}/{kind}/single", reference[kind])
    out = Path(out_dir)
    np.savez(out / "arrays.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
