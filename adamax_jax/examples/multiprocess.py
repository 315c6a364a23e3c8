"""Train in N processes, save, and resume in one process on another layout.

``python -m adamax_jax.examples.multiprocess --processes 2`` starts 2 local
processes of 4 CPU devices each, talking over 127.0.0.1 only (``jax.distributed``
with gloo). They train a small model data-parallel with the AdaMax state split
over the data axis (ZeRO-1, :func:`adamax_jax.zero1_state_shardings`), save
parameters and state with orbax (each process writing its shards), and go on
training: the uninterrupted run. Then ONE process with all the devices, on a
mesh of another shape and on ``Explicit`` axes, restores the checkpoint into
:func:`adamax_jax.abstract_state` after :func:`adamax_jax.check_state`, trains
as many steps again, and prints how far it is from the uninterrupted run.

It needs orbax (``pip install orbax-checkpoint``). Every process stops by
itself; the launcher kills them all if one fails or past ``--timeout``.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LEARNING_RATE = 0.01
BATCH = 64
FEATURES = 8
HIDDEN = 16


def _problem(steps):
    import numpy as np

    rng = np.random.default_rng(0)
    params = {
        "w1": (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
    }
    xs = rng.normal(size=(steps, BATCH, FEATURES)).astype(np.float32)
    ys = np.sin(xs.sum(axis=-1, keepdims=True)).astype(np.float32)
    return params, xs, ys


class _Run:
    """The model on a mesh, data-parallel over its "data" axis, state ZeRO-1 over it."""

    def __init__(self, mesh):
        import jax
        import jax.numpy as jnp
        import optax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import adamax_jax as ax

        self.mesh, self.opt = mesh, ax.adamax(LEARNING_RATE)
        replicated = NamedSharding(mesh, P())
        self.batch = NamedSharding(mesh, P("data"))
        host, _, _ = _problem(0)
        self.param_sh = {k: replicated for k in host}
        self.abstract_params = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in host.items()
        }
        with jax.set_mesh(mesh):
            state_sh = ax.zero1_state_shardings(self.opt, self.abstract_params, mesh, "data")
            self.abstract_state = ax.abstract_state(
                self.opt, self.abstract_params, shardings=state_sh
            )

        def loss(params, x, y):
            h = jnp.tanh(x @ params["w1"] + params["b1"][None])
            return jnp.mean((h @ params["w2"] - y) ** 2)

        def step(params, state, x, y):
            value, grads = jax.value_and_grad(loss)(params, x, y)
            updates, state = self.opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

        self.step = jax.jit(
            step,
            in_shardings=(self.param_sh, state_sh, self.batch, self.batch),
            out_shardings=(self.param_sh, state_sh, replicated),
        )
        self.state_sh = state_sh

    @staticmethod
    def put(host, sharding):
        import jax

        # Every process holds the whole host array and hands over its own shards.
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def init(self):
        import jax

        host, _, _ = _problem(0)
        params = {k: self.put(v, self.param_sh[k]) for k, v in host.items()}
        with jax.set_mesh(self.mesh):
            return params, jax.jit(self.opt.init, out_shardings=self.state_sh)(params)

    def train(self, params, state, xs, ys):
        import jax

        loss = None
        with jax.set_mesh(self.mesh):
            for x, y in zip(xs, ys, strict=True):
                x, y = self.put(x, self.batch), self.put(y, self.batch)
                params, state, loss = self.step(params, state, x, y)
        return params, state, float(loss)  # pyright: ignore[reportArgumentType]


def _loopback_gloo():
    # Gloo binds to the address the host name resolves to unless told
    # otherwise; keep every connection on the loopback interface. There is no
    # public option for this, hence the private module (skipped if it moved).
    try:
        from jax._src import xla_bridge

        make = xla_bridge._jax.make_gloo_tcp_collectives  # pyright: ignore[reportPrivateImportUsage]
    except (ImportError, AttributeError):
        return

    def loopback(distributed_client, hostname=None, interface=None):
        del hostname, interface
        return make(distributed_client=distributed_client, hostname="127.0.0.1")

    xla_bridge._jax.make_gloo_tcp_collectives = loopback  # pyright: ignore[reportPrivateImportUsage]


def _train(args):
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _loopback_gloo()
    address = f"127.0.0.1:{args.port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=args.processes,
        process_id=args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=30,
    )
    import orbax.checkpoint as ocp

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    run = _Run(mesh)
    _, xs, ys = _problem(2 * args.steps)
    params, state, loss = run.train(*run.init(), xs[: args.steps], ys[: args.steps])
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(args.dir / "checkpoint", {"params": params, "opt": state})
        checkpointer.wait_until_finished()
    spec = state[0].mu["w1"].sharding.spec
    params, _, _ = run.train(params, state, xs[args.steps :], ys[args.steps :])
    if args.process_id == 0:
        print(
            f"trained {args.steps} steps in {args.processes} processes on a mesh "
            f"{dict(mesh.shape)} (loss {loss:.4f}), state ZeRO-1 (mu['w1'] {spec}); "
            f"saved to {args.dir / 'checkpoint'}",
            flush=True,
        )
        # Replicated parameters: every process holds the whole of each.
        final = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
        np.savez(args.dir / "uninterrupted.npz", **final)  # pyright: ignore[reportArgumentType]
    jax.distributed.shutdown()


def _restore(args):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    import adamax_jax as ax

    devices = jax.device_count()
    mesh = jax.make_mesh((devices // 2, 2), ("data", "model"))
    run = _Run(mesh)
    path = args.dir / "checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        ax.check_state(run.opt, run.abstract_params, metadata["opt"])
        target = {"params": run.abstract_params, "opt": run.abstract_state}
        restored = checkpointer.restore(path, target)
    _, xs, ys = _problem(2 * args.steps)
    params, state, loss = run.train(
        restored["params"], restored["opt"], xs[args.steps :], ys[args.steps :]
    )
    with np.load(args.dir / "uninterrupted.npz") as want:
        diff = max(float(np.max(np.abs(np.asarray(params[k]) - want[k]))) for k in want)
    print(
        f"restored in 1 process on a mesh {dict(mesh.shape)} of {mesh.axis_types[0].name} "
        f"axes, state ZeRO-1 (mu['w1'] {state[0].mu['w1'].sharding.spec}); trained "
        f"{args.steps} more steps (loss {loss:.4f}); largest difference from the "
        f"uninterrupted run: {diff:.3g}",
        flush=True,
    )


def _launch(commands, env, timeout):
    """Runs `commands` at once; kills them all if one fails or past `timeout` seconds."""
    procs = [subprocess.Popen(c, env=env) for c in commands]
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                sys.exit(f"a process failed with exit code {[c for c in codes if c]}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                sys.exit(f"processes still running after {timeout} s; stopped")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    """Runs the example; see the module docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--steps", type=int, default=5, help="steps before and after saving")
    parser.add_argument("--dir", type=Path, default=None, help="where to save (default: temp)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before giving up")
    parser.add_argument("--role", choices=["train", "restore"], help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "train":
        return _train(args)
    if args.role == "restore":
        return _restore(args)

    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        sys.exit("this example saves with orbax: pip install orbax-checkpoint")
    if args.processes < 1 or args.devices < 1 or (args.processes * args.devices) % 2:
        parser.error("`--processes` × `--devices` must be a positive even number")
    if args.steps < 1:
        parser.error("`--steps` must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        common = [sys.executable, "-m", "adamax_jax.examples.multiprocess"]
        common += ["--processes", str(args.processes), "--steps", str(args.steps)]
        common += ["--dir", str(directory)]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        port = str(_free_port())
        train = [
            common + ["--role", "train", "--process-id", str(i), "--port", port]
            for i in range(args.processes)
        ]
        _launch(train, env, args.timeout)
        total = args.processes * args.devices
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={total}"
        _launch([common + ["--role", "restore"]], env, args.timeout)


if __name__ == "__main__":
    main()
