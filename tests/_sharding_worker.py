"""Multi-device checks, run by tests/test_sharding.py in a subprocess with 8 host devices.

``python -m tests._sharding_worker OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` writes ``OUT_DIR/results.json``
(facts about shardings, compiled HLO and bytes) and ``OUT_DIR/arrays.npz`` (the
results of sharded and of single-device runs); the test makes the assertions.
Importing this module has no side effects.
"""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax
from adamax_jax._precision import CompensateRoundingState
from adamax_jax._sharding import zero1_state_shardings

DEVICES = 8
STEPS = 3
LEARNING_RATE = 0.01
COLLECTIVES = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)")
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}

# Parameters over a (data=2, model=4) mesh: name -> (shape, spec).
LAYOUT = {
    "w": ((8, 16), P("data", "model")),
    "b": ((16,), P("model")),
    "e": ((4, 6), P(None, "data")),
    "c": ((3,), P()),
    "s": ((), P()),
    # Large enough for block-wise 8-bit state: a block of 256 on each device.
    "k": ((8, 1024), P("data", "model")),
}

# ZeRO-1 layouts: (mesh shape, axis names, parameters). On "1d" the parameters
# are replicated (pure data parallelism); on "2d" they are split over "model".
ZERO1_LAYOUTS = {
    "1d": (
        (8,),
        ("data",),
        {
            "w": ((16, 8), P()),
            "v": ((3, 24), P()),
            "b": ((8,), P()),
            "e": ((4, 6), P()),
            "s": ((), P()),
        },
    ),
    "2d": (
        (2, 4),
        ("data", "model"),
        {
            "w": ((8, 16), P(None, "model")),
            # The dimension not split yet is the smaller one: it takes "data" all the same.
            "n": ((2, 64), P(None, "model")),
            "m": ((64, 2), P("model", None)),
            "b": ((16,), P("model")),
            "c": ((3,), P()),
            "s": ((), P()),
        },
    ),
    # Leaves stored block-wise in 8 bits: "k" splits along its last axis in
    # whole blocks; "v" cannot (1000 / 8 is no multiple of 256) and splits
    # along its first.
    "1d-blocks": (
        (8,),
        ("data",),
        {
            "k": ((16, 2048), P()),
            "v": ((64, 1000), P()),
            "w": ((16, 8), P()),
            "s": ((), P()),
        },
    ),
}


def optimizers():
    """Optimizer configurations: name -> (factory, parameter dtype)."""
    return {
        "adamax": (lambda: ax.adamax(LEARNING_RATE), jnp.float32),
        "adamax-bf16-state": (
            lambda: ax.adamax(LEARNING_RATE, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
            jnp.float32,
        ),
        "adamaxw-masked": (
            lambda: ax.adamaxw(LEARNING_RATE, weight_decay=0.1, mask={k: k != "b" for k in LAYOUT}),
            jnp.float32,
        ),
        "nadamax-inside-max": (
            lambda: ax.nadamax(LEARNING_RATE, eps_mode="inside_max"),
            jnp.float32,
        ),
        "adamax-compensated-bf16": (
            lambda: ax.adamax(LEARNING_RATE, compensated=True),
            jnp.bfloat16,
        ),
        "scale_by_adamax-complex": (lambda: ax.scale_by_adamax(), jnp.complex64),
        "adamax-int8-state": (
            lambda: ax.adamax(LEARNING_RATE, mu_dtype=jnp.int8, nu_dtype=jnp.uint8),
            jnp.float32,
        ),
    }


FOLLOW_CASES = [(mode, name) for mode in MODES for name in optimizers()]
ZERO1_CASES = [
    ("auto", "1d", "adamax"),
    ("auto", "1d", "adamax-bf16-state"),
    ("auto", "2d", "adamax"),
    ("auto", "2d", "adamax-compensated-bf16"),
    ("explicit", "1d", "adamax"),
    ("explicit", "2d", "adamax-compensated-bf16"),
    ("auto", "1d-blocks", "adamax-int8-state"),
    ("explicit", "1d-blocks", "adamax-int8-state"),
]


def host_tree(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.normal(size=shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        out[name] = np.asarray(x).astype(dtype)
    return out


def put(tree, shardings):
    return jax.tree.map(jax.device_put, tree, shardings)


def _nodes(state):
    kinds = (ax.ScaleByAdamaxState, CompensateRoundingState)
    return [n for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))]


def param_like_trees(state):
    """The trees of `state` shaped like the parameters, by name."""
    trees = {}
    for node in _nodes(state):
        if isinstance(node, ax.ScaleByAdamaxState):
            trees["mu"], trees["nu"] = node.mu, node.nu
        elif isinstance(node, CompensateRoundingState):
            trees["compensation"] = node.compensation
    return trees


def _scales(node, name, where=None):
    """(path, codes, scale, placed codes, placed scale) for each moment of `name` with a scale."""
    where = node if where is None else where
    scales = getattr(node, f"{name}_scale")
    if scales is None:
        return []
    leaves = jax.tree_util.tree_flatten_with_path(getattr(node, name))[0]
    treedef = jax.tree.structure(getattr(node, name))
    out = []
    for (path, x), scale, px, ps in zip(
        leaves,
        treedef.flatten_up_to(scales),
        treedef.flatten_up_to(getattr(where, name)),
        treedef.flatten_up_to(getattr(where, f"{name}_scale")),
        strict=True,
    ):
        if scale is not None:
            out.append((path, x, scale, px, ps))
    return out


def block_scales(state, shardings=None):
    """For each block-wise moment: whether its scales are split like its codes.

    Reads the shardings of the arrays of `state`, or those of `shardings` (a
    tree of shardings with the structure of `state`).
    """
    node = next(n for n in _nodes(state) if isinstance(n, ax.ScaleByAdamaxState))
    where = node
    if shardings is not None:
        where = next(n for n in _nodes(shardings) if isinstance(n, ax.ScaleByAdamaxState))
    out = {}
    for name in ("mu", "nu"):
        for path, x, scale_array, placed_codes, placed_scale in _scales(node, name, where):
            if scale_array.ndim == 0:
                continue
            codes = placed_codes if shardings is not None else placed_codes.sharding
            scale = placed_scale if shardings is not None else placed_scale.sharding
            out[f"{name}{jax.tree_util.keystr(path)}"] = spec_entries(codes.spec) == spec_entries(
                scale.spec
            ) and equivalent(codes, scale, x.ndim)
    return out


def scalars(state):
    """The scalars of the AdaMax state: the count, and the scale of every scaled moment."""
    node = next(n for n in _nodes(state) if isinstance(n, ax.ScaleByAdamaxState))
    out = {"count": node.count}
    for name in ("mu", "nu"):
        for path, _, scale, _, _ in _scales(node, name):
            # Block-wise scales are arrays, split like their codes (block_scales).
            if scale.ndim == 0:
                out[f"{name}{jax.tree_util.keystr(path)}.scale"] = scale
    return out


def step_fn(opt):
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def explicit_zero1_step_fn(opt, param_sh, mu_sh):
    """On Explicit axes shardings are types: gradients and parameters are cut to
    the state's sharding before the update, and the updates gathered back."""

    def step(grads, state, params):
        cut = jax.sharding.reshard(params, mu_sh)
        updates, state = opt.update(jax.sharding.reshard(grads, mu_sh), state, cut)
        updates = jax.sharding.reshard(updates, param_sh)
        return optax.apply_updates(params, updates), state

    return step


def run_steps(opt, params, state, grads_list, jitted=None):
    step = jitted or jax.jit(step_fn(opt))
    for grads in grads_list:
        params, state = step(grads, state, params)
    return params, state


def run_single(opt, host_params, host_grads):
    """The reference: the same steps on one device."""
    one = jax.devices()[0]
    params = jax.device_put(host_params, one)
    return run_steps(opt, params, jax.jit(opt.init)(params), jax.device_put(host_grads, one))


def store(tree, prefix, arrays, dtypes):
    """Adds the leaves of `tree` to `arrays` (bfloat16 as float32, exactly) and `dtypes`."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = prefix + jax.tree_util.keystr(path)
        x = np.asarray(leaf)
        dtypes[key] = str(x.dtype)
        arrays[key] = x.astype(np.float32) if x.dtype == jnp.bfloat16 else x


def spec_entries(spec):
    """A PartitionSpec as a JSON list, without the trailing Nones that mean the same."""
    entries = [list(e) if isinstance(e, tuple) else e for e in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return entries


def equivalent(a, b, ndim):
    return bool(a.is_equivalent_to(b, ndim))


def check_follow(mode, name, results, arrays):
    """`jit(init)` places the state like the parameters; the update adds no collectives."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(MODES[mode],) * 2)
    factory, dtype = optimizers()[name]
    opt = factory()
    shapes = {k: shape for k, (shape, _) in LAYOUT.items()}
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()}
    host_params = host_tree(shapes, dtype, 0)
    host_grads = [host_tree(shapes, dtype, 1 + i) for i in range(STEPS)]
    with jax.set_mesh(mesh):
        params = put(host_params, shardings)
        grads = [put(g, shardings) for g in host_grads]
        state = jax.jit(opt.init)(params)
        leaves = [
            {
                "path": f"{tree_name}['{key}']",
                "equivalent": equivalent(tree[key].sharding, p.sharding, p.ndim),
                "state": str(tree[key].sharding),
                "param": str(p.sharding),
            }
            for tree_name, tree in param_like_trees(state).items()
            for key, p in params.items()
            if tree[key] is not None
        ]
        jitted = jax.jit(step_fn(opt))
        compiled = jitted.lower(grads[0], state, params).compile()
        out_params, out_state = compiled.output_shardings
        new_params, new_state = run_steps(opt, params, state, grads, jitted)
    results[f"follow/{mode}/{name}"] = {
        "leaves": leaves,
        "block_scales": block_scales(state),
        "scalars_replicated": {
            k: v.sharding.is_fully_replicated for k, v in scalars(state).items()
        },
        "collectives": sorted(set(COLLECTIVES.findall(compiled.as_text()))),
        "state_out_equivalent": all(
            jax.tree.leaves(
                jax.tree.map(lambda o, x: equivalent(o, x.sharding, x.ndim), out_state, state)
            )
        ),
        "param_out_equivalent": all(
            equivalent(out_params[k], params[k].sharding, params[k].ndim)
            and equivalent(new_params[k].sharding, params[k].sharding, params[k].ndim)
            for k in params
        ),
    }
    store((new_params, new_state), f"follow/{mode}/{name}/sharded", arrays, results["dtypes"])
    if mode == "auto":
        single = run_single(opt, host_params, host_grads)
        store(single, f"follow/single/{name}", arrays, results["dtypes"])


def check_optax_control(results):
    """optax's own adamax under the same jit, so that the check is seen to tell."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = put(
        host_tree({k: shape for k, (shape, _) in LAYOUT.items()}, jnp.float32, 0),
        {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()},
    )
    state = jax.jit(optax.adamax(LEARNING_RATE).init)(params)
    results["optax_control"] = {
        key: equivalent(state[0].mu[key].sharding, p.sharding, p.ndim) for key, p in params.items()
    }


def per_device_bytes(leaves):
    """Bytes of `leaves` on each device, by device id."""
    out = {str(d.id): 0 for d in jax.devices()}
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            out[str(shard.device.id)] += shard.data.nbytes
    return out


def check_zero1(mode, layout, name, results, arrays, singles):
    """`zero1_state_shardings`: bytes per device, placement and results.

    `singles` keeps the single-device references by (layout, optimizer): the mesh's
    axis types do not enter a run on one device, so Auto and Explicit share theirs.
    """
    mesh_shape, names, spec = ZERO1_LAYOUTS[layout]
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(MODES[mode],) * len(names))
    factory, dtype = optimizers()[name]
    opt = factory()
    param_sh = {k: NamedSharding(mesh, p) for k, (_, p) in spec.items()}
    host_params = host_tree({k: shape for k, (shape, _) in spec.items()}, dtype, 0)
    host_grads = [host_tree({k: s for k, (s, _) in spec.items()}, dtype, 1 + i) for i in range(3)]
    with jax.set_mesh(mesh):
        params = put(host_params, param_sh)
        abstract = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sh[k])
            for k, x in host_params.items()
        }
        state_sh = zero1_state_shardings(opt, params, mesh, "data")
        state_sh_abstract = zero1_state_shardings(opt, abstract, mesh, "data")
        state = jax.jit(opt.init, out_shardings=state_sh)(params)
        plain = jax.jit(opt.init)(params)
        step = step_fn(opt)
        if mode == "explicit" and layout == "2d":
            step = explicit_zero1_step_fn(opt, param_sh, param_like_trees(state_sh)["mu"])
        jitted = jax.jit(
            step,
            in_shardings=(param_sh, state_sh, param_sh),
            out_shardings=(param_sh, state_sh),
        )
        grads = [put(g, param_sh) for g in host_grads]
        new_params, new_state = run_steps(opt, params, state, grads, jitted)

    trees, plain_trees, sh_trees = (param_like_trees(t) for t in (state, plain, state_sh))
    paths = [(t, k) for t in trees for k in spec]
    split = [(t, k) for t, k in paths if "data" in str(trees[t][k].sharding.spec)]
    whole = [(t, k) for t, k in paths if (t, k) not in split]
    results[f"zero1/{mode}/{layout}/{name}"] = {
        "specs": {f"{t}['{k}']": spec_entries(sh_trees[t][k].spec) for t, k in paths},
        "block_scales": block_scales(state, state_sh),
        "block_scales_placed": block_scales(state),
        "abstract_same": jax.tree.structure(state_sh) == jax.tree.structure(state_sh_abstract)
        and all(jax.tree.leaves(jax.tree.map(lambda a, b: a == b, state_sh, state_sh_abstract))),
        "state_placed_as_asked": all(
            jax.tree.leaves(
                jax.tree.map(lambda x, s: equivalent(x.sharding, s, x.ndim), state, state_sh)
            )
        ),
        "split_paths": [f"{t}['{k}']" for t, k in split],
        "split_total": sum(trees[t][k].nbytes for t, k in split),
        "split_per_device": per_device_bytes([trees[t][k] for t, k in split]),
        "split_per_device_unzero": per_device_bytes([plain_trees[t][k] for t, k in split]),
        "whole_total": sum(trees[t][k].nbytes for t, k in whole),
        "whole_per_device": per_device_bytes([trees[t][k] for t, k in whole]),
        "scalars_replicated": all(x.sharding.is_fully_replicated for x in scalars(state).values()),
        "params_keep_shardings": all(
            equivalent(new_params[k].sharding, param_sh[k], new_params[k].ndim) for k in spec
        ),
        "axis_size": mesh.shape["data"],
    }
    store(
        (new_params, new_state), f"zero1/{mode}/{layout}/{name}/sharded", arrays, results["dtypes"]
    )
    if (layout, name) not in singles:
        singles[layout, name] = run_single(opt, host_params, host_grads)
    single = singles[layout, name]
    store(single, f"zero1/{mode}/{layout}/{name}/single", arrays, results["dtypes"])


def _placed_alike(a, b):
    """Whether every array of `a` is sharded as the same array of `b`."""
    return all(
        jax.tree.leaves(jax.tree.map(lambda x, y: equivalent(x.sharding, y.sharding, x.ndim), a, b))
    )


def check_explicit_blocks(results, arrays):
    """8-bit state on Explicit axes: an eager `init` and `update` place it as jit does; a
    last axis whose shards would split a block is refused, naming the leaf; a block
    size that divides the shards trains like one device, with no collectives."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    opt = optimizers()["adamax-int8-state"][0]()
    shapes = {k: shape for k, (shape, _) in LAYOUT.items()}
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUT.items()}
    # 1040 over "model" (4) is 260 a shard: not whole blocks of 256, whole blocks of 130.
    wide_sh = {"k": NamedSharding(mesh, P("data", "model"))}
    host_wide = host_tree({"k": (8, 1040)}, jnp.float32, 0)
    host_wide_grads = [host_tree({"k": (8, 1040)}, jnp.float32, 1 + i) for i in range(STEPS)]
    record = {}
    with jax.set_mesh(mesh):
        params = put(host_tree(shapes, jnp.float32, 0), shardings)
        grads = put(host_tree(shapes, jnp.float32, 1), shardings)
        eager, jitted = opt.init(params), jax.jit(opt.init)(params)
        record["eager_block_scales"] = block_scales(eager)
        record["eager_init_placed_like_jit"] = _placed_alike(eager, jitted)
        eager_out = opt.update(grads, eager, params)
        record["eager_update_placed_like_jit"] = _placed_alike(
            eager_out, jax.jit(opt.update)(grads, jitted, params)
        )
        wide = put(host_wide, wide_sh)
        for how, init in (("eager", opt.init), ("jit", jax.jit(opt.init))):
            try:
                init(wide)
                record[f"straddling_{how}"] = None
            except ValueError as e:
                record[f"straddling_{how}"] = str(e)
        fitted = ax.adamax(LEARNING_RATE, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, block_size=130)
        state = jax.jit(fitted.init)(wide)
        record["fitted_block_scales"] = block_scales(state)
        record["fitted_eager_init_placed_like_jit"] = _placed_alike(fitted.init(wide), state)
        step = jax.jit(step_fn(fitted))
        compiled = step.lower(put(host_wide_grads[0], wide_sh), state, wide).compile()
        record["fitted_collectives"] = sorted(set(COLLECTIVES.findall(compiled.as_text())))
        out = run_steps(fitted, wide, state, [put(g, wide_sh) for g in host_wide_grads], step)
    # A last axis that ends in a part block, split over an Explicit axis of size 1
    # (one shard): the eager update spreads the block scales over it with a slice.
    one = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    host_part = host_tree({"k": (16, 1040)}, jnp.float32, 0)["k"]
    eager_single = opt.update(host_part, opt.init(host_part), host_part)[0]
    with jax.set_mesh(one):
        part = jax.device_put(host_part, NamedSharding(one, P("data", "model")))
        eager_split = opt.update(part, opt.init(part), part)[0]
    record["size_one_axis_eager_update_equal"] = bool(
        np.array_equal(np.asarray(eager_split), np.asarray(eager_single))
    )
    results["explicit_blocks"] = record
    store(out, "explicit_blocks/sharded", arrays, results["dtypes"])
    store(
        run_single(fitted, host_wide, host_wide_grads),
        "explicit_blocks/single",
        arrays,
        results["dtypes"],
    )


def main(out_dir: str) -> None:
    if jax.device_count() != DEVICES:
        sys.exit(f"needs {DEVICES} devices (XLA_FLAGS), found {jax.device_count()}")
    # The same strictness as tests/conftest.py.
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    results, arrays = {"dtypes": {}}, {}
    for case in FOLLOW_CASES:
        check_follow(*case, results, arrays)
    check_optax_control(results)
    singles = {}
    for case in ZERO1_CASES:
        check_zero1(*case, results, arrays, singles)
    check_explicit_blocks(results, arrays)
    out = Path(out_dir)
    np.savez(out / "arrays.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
