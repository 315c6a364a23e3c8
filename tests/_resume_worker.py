"""Checkpoints across meshes and process counts, run by tests/test_resume.py in subprocesses.

``python -m tests._resume_worker ROLE --devices D --out DIR [--process-id I --port P]``
sets ``XLA_FLAGS`` for D host devices before JAX starts, then plays ROLE:

* ``train``, as one of 2 processes of 4 devices (gloo over 127.0.0.1): trains
  the model of tests/_multiprocess_worker.py with ZeRO-1 state for ``K``
  steps and saves params and state with orbax (each process writing its
  shards); then goes on for ``N`` more steps, the uninterrupted run, whose
  end process 0 writes to ``DIR/reference_<config>.npz``.
* ``restore8``, one process of 8 devices: resumes the ``train`` checkpoint on
  other meshes and layouts (ZeRO-1 on a 4 × 2 mesh of Explicit axes; ZeRO-1
  off), runs its own checkpoint without ZeRO-1 and resumes it with it, and
  records what the compiled updates on Explicit and FSDP layouts move.
* ``restore2``, one of 2 processes of 4 devices again: resumes the ``train``
  checkpoint on the mesh and layout that wrote it.

Each writes ``DIR/<role>.npz`` (final params and state, by key path) and
``DIR/<role>.json`` (facts); the tests make the assertions. Importing this
module has no side effects.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
K = 3  # steps before the checkpoint
N = 3  # steps after it
LEARNING_RATE = 0.01
CONFIGS = ("f32", "bf16")
COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(-start)?\("
)
ARRAY_TYPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")


def make_optimizer(config):
    import jax.numpy as jnp

    import adamax_jax as ax

    if config == "f32":
        return ax.adamax(LEARNING_RATE)
    return ax.adamax(LEARNING_RATE, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)


def flat(tree):
    """A pytree as {key path: numpy array}, bfloat16 kept as its bits' float32 value (exact)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jax.process_count() > 1 and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        x = np.asarray(leaf)
        out[jax.tree_util.keystr(path)] = x.astype(np.float32) if x.dtype == jnp.bfloat16 else x
    return out


class Trainer:
    """The model, its batches and its jitted step on one mesh, with a given state layout."""

    def __init__(self, config, mesh, data_axis, zero1):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import adamax_jax as ax
        from tests import _multiprocess_worker as mp

        self.mesh = mesh
        self.opt = make_optimizer(config)
        self.host_params, self.xs, self.ys = mp.problem()
        replicated = NamedSharding(mesh, P())
        self.batch_sh = NamedSharding(mesh, P(data_axis))
        self.param_sh = {k: replicated for k in self.host_params}
        self.abstract_params = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
            for k, v in self.host_params.items()
        }
        with jax.set_mesh(mesh):
            shardings = (
                ax.zero1_state_shardings(self.opt, self.abstract_params, mesh, data_axis)
                if zero1
                else "params"
            )
            self.abstract_state = ax.abstract_state(
                self.opt, self.abstract_params, shardings=shardings
            )
            self.state_sh = jax.tree.map(lambda s: s.sharding, self.abstract_state)
            self.step = jax.jit(
                mp.train_step(self.opt),
                in_shardings=(self.param_sh, self.state_sh, self.batch_sh, self.batch_sh),
                out_shardings=(self.param_sh, self.state_sh, replicated),
            )

    def global_array(self, host, sharding):
        import jax

        # Every process holds the whole host array and hands over its own shards.
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def init(self):
        import jax

        params = {k: self.global_array(v, self.param_sh[k]) for k, v in self.host_params.items()}
        with jax.set_mesh(self.mesh):
            state = jax.jit(self.opt.init, out_shardings=self.state_sh)(params)
        return params, state

    def run(self, params, state, first, last):
        import jax

        with jax.set_mesh(self.mesh):
            for x, y in zip(self.xs[first:last], self.ys[first:last], strict=True):
                x, y = self.global_array(x, self.batch_sh), self.global_array(y, self.batch_sh)
                params, state, _ = self.step(params, state, x, y)
        return params, state

    def restore(self, path):
        """Restores {"params", "opt"} from `path` onto this mesh and layout, checked first."""
        import orbax.checkpoint as ocp

        import adamax_jax as ax

        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata
            ax.check_state(self.opt, self.abstract_params, metadata["opt"])
            target = {"params": self.abstract_params, "opt": self.abstract_state}
            restored = checkpointer.restore(path, target)
        return restored["params"], restored["opt"]

    def specs(self, state):
        import jax

        return {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
        }


def save(path, params, state):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"params": params, "opt": state})
        checkpointer.wait_until_finished()


def _distributed(process_id, port):
    import jax

    from tests._multiprocess_worker import _loopback_gloo

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _loopback_gloo()
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=30,
    )
    if jax.device_count() != NUM_PROCESSES * LOCAL_DEVICES:
        sys.exit(f"sees {jax.device_count()} devices, not {NUM_PROCESSES * LOCAL_DEVICES}")


def _mesh_1d(axis_type):
    import jax

    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))


def role_train(out, process_id):
    from jax.sharding import AxisType

    facts = {}
    for config in CONFIGS:
        trainer = Trainer(config, _mesh_1d(AxisType.Auto), "data", zero1=True)
        params, state = trainer.run(*trainer.init(), 0, K)
        save(out / "ckpt" / config, params, state)
        facts[config] = trainer.specs(state)
        params, state = trainer.run(params, state, K, K + N)
        final = flat({"params": params, "opt": state})
        if process_id == 0:
            import numpy as np

            np.savez(out / f"reference_{config}.npz", **final)
    return facts


def role_restore2(out, process_id):
    from jax.sharding import AxisType

    finals, facts = {}, {}
    for config in CONFIGS:
        # The mesh and ZeRO-1 layout that wrote the checkpoint.
        trainer = Trainer(config, _mesh_1d(AxisType.Auto), "data", zero1=True)
        params, state = trainer.restore(out / "ckpt" / config)
        facts[config] = trainer.specs(state)
        params, state = trainer.run(params, state, K, K + N)
        finals.update(
            {f"{config}/{k}": v for k, v in flat({"params": params, "opt": state}).items()}
        )
    return facts, finals


def role_restore8(out):
    import jax
    import numpy as np
    from jax.sharding import AxisType

    finals, facts = {}, {}

    def keep(name, trainer, params, state):
        facts[name] = trainer.specs(state)
        finals.update({f"{name}/{k}": v for k, v in flat({"params": params, "opt": state}).items()})

    # Another mesh shape, on Explicit axes, with ZeRO-1 over its data axis.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    trainer = Trainer("f32", mesh, "data", zero1=True)
    params, state = trainer.restore(out / "ckpt" / "f32")
    keep("mesh4x2_zero1", trainer, *trainer.run(params, state, K, K + N))

    # ZeRO-1 off after a run with it: the state replicated like the parameters.
    plain = Trainer("f32", _mesh_1d(AxisType.Auto), "data", zero1=False)
    params, state = plain.restore(out / "ckpt" / "f32")
    keep("zero1_off", plain, *plain.run(params, state, K, K + N))

    # ZeRO-1 on after a run without it: a run of this process, saved without it.
    params, state = plain.run(*plain.init(), 0, K)
    save(out / "ckpt" / "plain", params, state)
    keep("plain_reference", plain, *plain.run(params, state, K, K + N))
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    trainer = Trainer("f32", mesh, "data", zero1=True)
    params, state = trainer.restore(out / "ckpt" / "plain")
    keep("zero1_on", trainer, *trainer.run(params, state, K, K + N))

    # A checkpoint of another configuration is refused before anything is read.
    import orbax.checkpoint as ocp

    import adamax_jax as ax

    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(out / "ckpt" / "f32").item_metadata
    try:
        ax.check_state(make_optimizer("bf16"), plain.abstract_params, metadata["opt"])
        facts["mismatch"] = None
    except ValueError as error:
        facts["mismatch"] = str(error)

    facts["dtypes"] = {}
    facts["explicit"] = explicit_checks(finals, facts["dtypes"])
    facts["fsdp"] = fsdp_checks()
    np.savez(out / "restore8_arrays.npz", **finals)
    return facts


# ---------------------------------------------------------------------------
# What compiled updates move, on Explicit and FSDP layouts.


def collective_bytes(hlo):
    """The collectives of an HLO module, as (op, bytes of its result) in order."""
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if not match:
            continue
        size = 0
        for dtype, dims in ARRAY_TYPE.findall(match.group(1)):
            bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))
            count = 1
            for d in filter(None, dims.split(",")):
                count *= int(d)
            size += count * bits // 8
        found.append([match.group(2), size])
    return sorted(found)


def memory(compiled):
    analysis = compiled.memory_analysis()
    return {
        name: int(getattr(analysis, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias")
    }


EXPLICIT_LAYOUT = {"w": ((8, 16), (None, "model")), "b": ((8,), ("model",))}
FSDP_LAYOUT = {
    "w": ((16, 8), ("data", "model")),
    "b": ((32,), (("data", "model"),)),
    "e": ((8, 16), ("model", "data")),
}


def _optimizers():
    import jax.numpy as jnp

    import adamax_jax as ax

    return {
        "adamax": (lambda: ax.adamax(LEARNING_RATE), jnp.float32),
        "bf16-state": (
            lambda: ax.adamax(LEARNING_RATE, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
            jnp.float32,
        ),
        "compensated-bf16": (lambda: ax.adamax(LEARNING_RATE, compensated=True), jnp.bfloat16),
        "adamaxw": (lambda: ax.adamaxw(LEARNING_RATE, weight_decay=0.1), jnp.float32),
    }


def _setup(layout, axis_type, factory, dtype, seed=0):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    rng = np.random.default_rng(seed)
    param_sh = {k: NamedSharding(mesh, P(*spec)) for k, (_, spec) in layout.items()}
    host = {k: rng.normal(size=shape).astype(dtype) for k, (shape, _) in layout.items()}
    grads = {k: rng.normal(size=shape).astype(dtype) for k, (shape, _) in layout.items()}
    put = lambda tree: {k: jax.device_put(v, param_sh[k]) for k, v in tree.items()}  # noqa: E731
    return mesh, factory(), param_sh, put(host), put(grads)


def _update_step(opt):
    import optax

    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def explicit_checks(finals, dtypes):
    """ZeRO-1 on a 2 × 4 mesh: the default step against the hand-resharded one."""
    import jax
    from jax.sharding import AxisType

    import adamax_jax as ax
    from tests._sharding_worker import explicit_zero1_step_fn, param_like_trees, store

    results = {}
    for name in ("adamax", "compensated-bf16"):
        factory, dtype = _optimizers()[name]
        for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
            mesh, opt, param_sh, params, grads = _setup(EXPLICIT_LAYOUT, axis_type, factory, dtype)
            record = {}
            with jax.set_mesh(mesh):
                state_sh = ax.zero1_state_shardings(opt, params, mesh, "data")
                steps = {"default": _update_step(opt)}
                if mode == "explicit":
                    mu_sh = param_like_trees(state_sh)["mu"]
                    steps["by_hand"] = explicit_zero1_step_fn(opt, param_sh, mu_sh)
                for kind, fn in steps.items():
                    state = jax.jit(opt.init, out_shardings=state_sh)(params)
                    jitted = jax.jit(
                        fn,
                        in_shardings=(param_sh, state_sh, param_sh),
                        out_shardings=(param_sh, state_sh),
                    )
                    compiled = jitted.lower(grads, state, params).compile()
                    p, s = params, state
                    for _ in range(3):
                        p, s = jitted(grads, s, p)
                    record[kind] = {
                        "collectives": collective_bytes(compiled.as_text()),
                        "memory": memory(compiled),
                        "state_specs": {
                            jax.tree_util.keystr(path): str(x.sharding.spec)
                            for path, x in jax.tree_util.tree_flatten_with_path(s)[0]
                        },
                    }
                    store((p, s), f"explicit/{name}/{mode}/{kind}", finals, dtypes)
            if mode == "explicit":
                # The same step with no mesh context: the shardings carry the mesh.
                state = jax.jit(opt.init, out_shardings=state_sh)(params)
                jitted = jax.jit(
                    _update_step(opt),
                    in_shardings=(param_sh, state_sh, param_sh),
                    out_shardings=(param_sh, state_sh),
                )
                p, s = params, state
                for _ in range(3):
                    p, s = jitted(grads, s, p)
                store((p, s), f"explicit/{name}/{mode}/no_mesh_context", finals, dtypes)
            results[f"{name}/{mode}"] = record
    return results


def fsdp_checks():
    """Params, gradients and state split over ("data", "model"): the state follows."""
    import jax
    from jax.sharding import AxisType

    import adamax_jax as ax

    results = {}
    for name in ("adamax", "bf16-state", "adamaxw"):
        factory, dtype = _optimizers()[name]
        for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
            mesh, opt, param_sh, params, grads = _setup(FSDP_LAYOUT, axis_type, factory, dtype)
            with jax.set_mesh(mesh):
                target = ax.abstract_state(opt, params)
                zero1 = ax.zero1_state_shardings(opt, params, mesh, "data")
                state = jax.jit(opt.init)(params)
                compiled = jax.jit(_update_step(opt)).lower(grads, state, params).compile()
                new_params, new_state = compiled(grads, state, params)
            trees = {
                jax.tree_util.keystr(path): leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(new_state)[0]
            }
            results[f"{name}/{mode}"] = {
                # Every state array shaped like a parameter, with its spec and that of
                # the parameter of the same name.
                "follows": {
                    path: [
                        str(x.sharding.spec),
                        str(param_sh[re.findall(r"'(\w+)'", path)[-1]].spec),
                    ]
                    for path, x in trees.items()
                    if x.ndim > 0
                },
                "target_specs_equal": all(
                    t.sharding.is_equivalent_to(x.sharding, x.ndim)
                    for t, x in zip(
                        jax.tree.leaves(target), jax.tree.leaves(new_state), strict=True
                    )
                ),
                "zero1_equal": all(
                    z.is_equivalent_to(x.sharding, x.ndim)
                    for z, x in zip(jax.tree.leaves(zero1), jax.tree.leaves(new_state), strict=True)
                ),
                "params_keep": all(
                    new_params[k].sharding.is_equivalent_to(param_sh[k], new_params[k].ndim)
                    for k in params
                ),
                "collectives": collective_bytes(compiled.as_text()),
            }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["train", "restore8", "restore2"])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    if args.role != "restore8":
        _distributed(args.process_id, args.port)
    if jax.local_device_count() != args.devices:
        sys.exit(f"needs {args.devices} local devices, has {jax.local_device_count()}")
    if args.role == "train":
        facts = role_train(args.out, args.process_id)
    elif args.role == "restore2":
        facts, finals = role_restore2(args.out, args.process_id)
        if args.process_id == 0:
            np.savez(args.out / "restore2_arrays.npz", **finals)
    else:
        facts = role_restore8(args.out)
    name = args.role + (f"_{args.process_id}" if args.role != "restore8" else "")
    (args.out / f"{name}.json").write_text(json.dumps(facts, indent=1))
    if args.role != "restore8":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
