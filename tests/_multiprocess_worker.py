"""Data-parallel training of a small model over 2 processes, run by tests/test_sharding.py.

``python -m tests._multiprocess_worker --process-id I --port PORT --out DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` is one of two processes
that train over a mesh of 2 × 4 CPU devices, talking over 127.0.0.1 only, with
the AdaMax state split over the data axis (ZeRO-1). Process I writes
``DIR/process_I.npz`` (final parameters) and ``DIR/process_I.json`` (how the
state was laid out). :func:`train_single` is the same training in one process
on one device, the reference. Importing this module has no side effects.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
STEPS = 6
BATCH = 64
FEATURES = 8
HIDDEN = 16
LEARNING_RATE = 0.01


def problem():
    """Initial parameters and the batches of every step, the same in every process."""
    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
        # One element: it cannot be split over 8 devices and stays replicated.
        "b2": np.zeros(1, np.float32),
    }
    xs = rng.normal(size=(STEPS, BATCH, FEATURES)).astype(np.float32)
    ys = np.sin(xs.sum(axis=-1, keepdims=True)).astype(np.float32)
    return params, xs, ys


def make_optimizer():
    import adamax_jax as ax

    return ax.adamax(LEARNING_RATE)


def train_step(opt):
    import jax
    import jax.numpy as jnp
    import optax

    def loss(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"][None])
        return jnp.mean((h @ params["w2"] + params["b2"][None] - y) ** 2)

    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    return step


def train_single():
    """The reference: the same steps in one process, on one device."""
    import jax

    params, xs, ys = problem()
    opt = make_optimizer()
    step = jax.jit(train_step(opt))
    state = opt.init(params)
    for x, y in zip(xs, ys, strict=True):
        params, state, _ = step(params, state, x, y)
    return {k: np.asarray(v) for k, v in params.items()}


# The JAX releases whose private CPU-client factory `_loopback_gloo` patches, as
# pyproject.toml's `test` extra pins them.
PATCHED_JAX = ">=0.10.2,<0.11"


def _loopback_gloo():
    """Keeps every gloo connection on the loopback interface.

    Gloo binds to the address the host name resolves to unless told otherwise, and
    JAX has no public option for the address: this patches the factory that
    ``jax._src.xla_bridge`` calls, a private module. It is known to work with the
    JAX releases PATCHED_JAX, which pyproject.toml's `test` extra pins; on any other
    release this fails at once, naming that range, rather than hanging on a socket.
    """
    import inspect

    import jax
    from jax._src import xla_bridge

    make = getattr(getattr(xla_bridge, "_jax", None), "make_gloo_tcp_collectives", None)
    try:
        takes_hostname = make is not None and "hostname" in inspect.signature(make).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust the docstring
        takes_hostname = make is not None and "hostname" in (make.__doc__ or "")
    if not takes_hostname:
        sys.exit(
            f"jax {jax.__version__}: jax._src.xla_bridge._jax.make_gloo_tcp_collectives(hostname=) "
            f"is gone; this test runs on jax{PATCHED_JAX} (pyproject.toml, `test` extra)."
        )

    def loopback(distributed_client, hostname=None, interface=None):
        del hostname, interface
        return make(distributed_client=distributed_client, hostname="127.0.0.1")

    xla_bridge._jax.make_gloo_tcp_collectives = loopback


def train_distributed(process_id: int, port: int, out: Path, die_after_init: bool) -> None:
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from adamax_jax._sharding import zero1_state_shardings

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
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
    if jax.local_device_count() != LOCAL_DEVICES:
        sys.exit(f"needs {LOCAL_DEVICES} local devices (XLA_FLAGS), has {jax.local_device_count()}")
    if jax.device_count() != NUM_PROCESSES * LOCAL_DEVICES:
        sys.exit(f"sees {jax.device_count()} devices, not {NUM_PROCESSES * LOCAL_DEVICES}")
    if die_after_init:
        # A crash, not an orderly exit: no shutdown barrier for the peer to meet.
        print(f"process {process_id} stops on purpose after initialize", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))

    def global_array(host, sharding):
        # Every process holds the whole host array and hands over its own shards.
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    host_params, xs, ys = problem()
    opt = make_optimizer()
    param_sh = {k: replicated for k in host_params}
    params = {k: global_array(v, replicated) for k, v in host_params.items()}
    state_sh = zero1_state_shardings(opt, params, mesh, "data")
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    step = jax.jit(
        train_step(opt),
        in_shardings=(param_sh, state_sh, batch, batch),
        out_shardings=(param_sh, state_sh, replicated),
        donate_argnums=(0, 1),
    )
    for x, y in zip(xs, ys, strict=True):
        params, state, _ = step(params, state, global_array(x, batch), global_array(y, batch))

    inner = state[0]
    layout = {
        f"{name}['{key}']": {
            "nbytes": int(leaf.nbytes),
            "local_shard_nbytes": [int(s.data.nbytes) for s in leaf.addressable_shards],
            "spec": str(leaf.sharding.spec),
        }
        for name, tree in (("mu", inner.mu), ("nu", inner.nu))
        for key, leaf in tree.items()
    }
    layout["process_count"] = jax.process_count()
    layout["check_state_of_split_scales"] = check_split_scales(mesh, global_array)
    # Replicated parameters: every process holds the whole of each.
    final = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
    np.savez(out / f"process_{process_id}.npz", **final)
    (out / f"process_{process_id}.json").write_text(json.dumps(layout))
    jax.distributed.shutdown()


def check_split_scales(mesh, global_array) -> bool:
    """`check_state` on an 8-bit state whose block scales are split over the processes.

    Each process holds only its own shards of them, as after a restore; the
    check reads those and must not fetch the others (it raised before).
    Returns whether the scales were split (and the check passed: else it raises).
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import adamax_jax as ax

    opt = ax.adamax(LEARNING_RATE, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
    rows = NamedSharding(mesh, P("data"))
    params = {"w": global_array(np.zeros((jax.device_count(), 4096), np.float32), rows)}
    state = jax.jit(opt.init)(params)
    grads = {"w": global_array(np.ones((jax.device_count(), 4096), np.float32), rows)}
    state = jax.jit(opt.update)(grads, state, params)[1]
    ax.check_state(opt, params, state)
    return not state[0].nu_scale["w"].is_fully_addressable


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--die-after-init", action="store_true")
    args = parser.parse_args(argv)
    train_distributed(args.process_id, args.port, args.out, args.die_after_init)


if __name__ == "__main__":
    main()
