"""SPMD: state sharded like the parameters, ZeRO-1 state sharding, multi-process training.

The multi-device checks run in subprocesses, since the device count must be set
(XLA_FLAGS) before JAX starts: tests/_sharding_worker.py on 8 host devices, and
tests/_multiprocess_worker.py as 2 processes of 4 host devices each.
"""

import json
import socket
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax
from adamax_jax._sharding import _split, zero1_state_shardings, zeros_like
from tests import _multiprocess_worker, _sharding_worker, background
from tests.background import WorkerFailure, device_env, run_workers
from tests.reference import adamax_numpy

# A bound against a hang, not a speed target: generous for a loaded 2-core machine.
MULTIPROCESS_TIMEOUT_S = 120


# The workers' environment and runner, shared with the other multi-device tests.
_env = device_env


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# In this process, on one device.


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "dtype, target, expected",
    [
        (jnp.float32, None, jnp.float32),
        (jnp.bfloat16, jnp.float32, jnp.float32),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16),
        (jnp.complex64, None, jnp.complex64),
        (jnp.complex64, jnp.float32, jnp.float32),
    ],
)
@pytest.mark.parametrize("shape", [(), (3,), (2, 5)])
def test_zeros_like_is_zero_of_the_dtype_whatever_the_input(shape, dtype, target, expected, jit):
    # NaN and inf in the input must not leak through the select.
    x = jnp.full(shape, jnp.nan, dtype) if shape != (3,) else jnp.array([1, jnp.inf, -2], dtype)
    fn = jax.jit(zeros_like, static_argnums=1) if jit else zeros_like
    out = fn(x, target)
    chex.assert_shape(out, shape)
    assert out.dtype == jnp.dtype(expected)
    np.testing.assert_array_equal(np.asarray(out), np.zeros(shape, expected))


def _mesh(name="data"):
    return Mesh(np.array(jax.devices()[:1]), (name,))


@pytest.mark.parametrize("axis", ["model", (), ("data", "data"), 3, ("data", "model")])
def test_zero1_rejects_an_axis_not_of_the_mesh(axis):
    with pytest.raises(ValueError, match=r"`axis` must name .* got "):
        zero1_state_shardings(ax.adamax(), {"w": jnp.ones(4)}, _mesh(), axis)


def test_zero1_rejects_what_is_not_a_mesh():
    with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh, got str"):
        zero1_state_shardings(ax.adamax(), {"w": jnp.ones(4)}, "data", "data")


def test_zero1_rejects_parameters_on_another_mesh():
    other = NamedSharding(_mesh("x"), P())
    params = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=other)}
    with pytest.raises(ValueError, match=r"`params`\['w'\] is sharded over a mesh with axes"):
        zero1_state_shardings(ax.adamax(), params, _mesh(), "data")


def test_zero1_on_one_device_gives_a_state_that_trains_like_the_plain_one():
    mesh = _mesh()
    opt = ax.adamax(0.1)
    params = {"w": jnp.arange(4.0, dtype=jnp.float32), "s": jnp.float32(1.0)}
    shardings = zero1_state_shardings(opt, params, mesh, "data")
    chex.assert_trees_all_equal_structs(shardings, opt.init(params))
    state = jax.jit(opt.init, out_shardings=shardings)(params)
    grads = {"w": jnp.array([1.0, -2.0, 0.5, 0.0], jnp.float32), "s": jnp.float32(-1.0)}
    got, _ = jax.jit(opt.update)(grads, state, params)
    want, _ = opt.update(grads, opt.init(params), params)
    chex.assert_trees_all_close(got, want)


MESH_2x4 = {"data": 2, "model": 4}


@pytest.mark.parametrize(
    "shape, spec, axes, sizes, expected",
    [
        ((16, 8), (), ("data",), {"data": 8}, P("data", None)),
        ((3, 24), (), ("data",), {"data": 8}, P(None, "data")),
        ((4, 6), (), ("data",), {"data": 8}, P()),
        ((), (), ("data",), {"data": 8}, P()),
        ((0, 8), (), ("data",), {"data": 8}, P(None, "data")),
        ((8, 16), (None, "model"), ("data",), MESH_2x4, P("data", "model")),
        # Only one dimension: the axes join the one already there.
        ((16,), ("model",), ("data",), MESH_2x4, P(("model", "data"))),
        # 4 is split 4 ways already: 1 left, not divisible by 2.
        ((4, 3), ("model",), ("data",), MESH_2x4, P("model")),
        # Already split over the axis (FSDP): left alone.
        ((8, 16), ("data", "model"), ("data",), MESH_2x4, P("data", "model")),
        ((16, 16), (), ("data", "model"), MESH_2x4, P(("data", "model"), None)),
        # A dimension not split yet wins even where it is the smaller one: a state split
        # over ("model", "data") would no longer combine with a parameter over "model".
        ((2, 64), (None, "model"), ("data",), MESH_2x4, P("data", "model")),
        ((64, 2), ("model",), ("data",), MESH_2x4, P("model", "data")),
        # Among the dimensions not split yet, the largest.
        ((4, 2, 64), (None, None, "model"), ("data",), MESH_2x4, P("data", None, "model")),
        # The unsplit dimension is not divisible: the split one takes the axis.
        ((3, 64), (None, "model"), ("data",), MESH_2x4, P(None, ("model", "data"))),
    ],
)
def test_split_rule(shape, spec, axes, sizes, expected):
    mesh = types.SimpleNamespace(shape=sizes)
    assert _split(shape, spec, axes, mesh) == expected


# ---------------------------------------------------------------------------
# 8 host devices, in a subprocess.


@pytest.fixture(scope="module")
def sharded():
    # tests._sharding_worker on 8 devices, started with the session (tests/background.py).
    out = background.result("sharding")
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "arrays.npz") as arrays:
        return results, dict(arrays)


def _close_to_single(arrays, dtypes, sharded_prefix, single_prefix):
    """Every leaf of the sharded run against the single-device one.

    XLA fuses a partitioned program differently from the whole one, and may
    round a multiply-add once or twice, or keep a low-precision intermediate in
    float32 (excess precision): the last bit can differ. The bound is 2 units
    in the last place of the largest magnitude of each array; a misplaced or
    missing value would be off by the values themselves. A compensation buffer
    takes up what rounding left out of the update: where the two runs' float32
    updates straddle a rounding tie of the parameter, the parameters land a
    unit apart and the buffers differ by that unit the other way. What the
    buffer keeps exact is the sum of the parameter and the buffer, so that sum
    is judged: within 2 units in the last place of the buffer's larger of its
    magnitude and the learning rate.
    """
    keys = [k for k in arrays if k.startswith(sharded_prefix)]
    assert keys, f"no arrays under {sharded_prefix}"
    for key in keys:
        got, want = arrays[key], arrays[single_prefix + key[len(sharded_prefix) :]]
        dtype = np.dtype(jnp.dtype(dtypes[key]))
        if np.issubdtype(dtype, np.integer):
            np.testing.assert_array_equal(got, want, err_msg=key)
            continue
        eps = float(jnp.finfo(dtype).eps)
        scale = np.max(np.abs(want), initial=0.0)
        if ".compensation[" in key:
            # (params, state): the parameter of "[1][2].compensation['w']" is "[0]['w']".
            suffix = "[0]" + key[key.index(".compensation[") + 13 :]
            got = got.astype(np.float64) + arrays[sharded_prefix + suffix].astype(np.float64)
            want = want.astype(np.float64) + arrays[single_prefix + suffix].astype(np.float64)
            scale = max(scale, _sharding_worker.LEARNING_RATE)
        bound = 2 * eps * scale
        err = np.max(np.abs(got - want), initial=0.0)
        assert err <= bound, f"{key}: max error {err} > {bound} (2 ulp of {scale}, {dtype})"


@pytest.mark.parametrize("mode, name", _sharding_worker.FOLLOW_CASES)
def test_jit_init_shards_state_like_params(sharded, mode, name):
    record = sharded[0][f"follow/{mode}/{name}"]
    assert len(record["leaves"]) >= 2 * len(_sharding_worker.LAYOUT)
    wrong = [leaf for leaf in record["leaves"] if not leaf["equivalent"]]
    assert not wrong, "state not sharded like its parameter:\n" + "\n".join(
        f"{w['path']}: {w['state']} vs {w['param']}" for w in wrong
    )
    assert record["scalars_replicated"] and all(record["scalars_replicated"].values())


def test_the_sharding_check_tells_state_on_one_device_apart(sharded):
    # optax's own adamax makes its zeros from nothing; under jit on Auto axes
    # they land on one device. The same comparison must see that.
    control = sharded[0]["optax_control"]
    assert set(control) == set(_sharding_worker.LAYOUT)
    assert not any(control[k] for k in ("w", "b", "e")), control


@pytest.mark.parametrize("mode, name", _sharding_worker.FOLLOW_CASES)
def test_update_adds_no_collectives(sharded, mode, name):
    record = sharded[0][f"follow/{mode}/{name}"]
    assert record["collectives"] == [], f"collectives in the compiled update: {record}"


@pytest.mark.parametrize("mode, name", _sharding_worker.FOLLOW_CASES)
def test_update_keeps_every_sharding(sharded, mode, name):
    record = sharded[0][f"follow/{mode}/{name}"]
    assert record["state_out_equivalent"]
    assert record["param_out_equivalent"]


@pytest.mark.parametrize("mode, name", _sharding_worker.FOLLOW_CASES)
def test_sharded_steps_equal_single_device_steps(sharded, mode, name):
    results, arrays = sharded
    _close_to_single(
        arrays, results["dtypes"], f"follow/{mode}/{name}/sharded", f"follow/single/{name}"
    )


# The float32 configurations of the worker, as the float64 NumPy reference runs them:
# name -> (keyword arguments of adamax_numpy, leaves without weight decay).
FLOAT64_REFERENCE = {
    "adamax": (dict(), ()),
    "adamaxw-masked": (dict(weight_decay=0.1), ("b",)),
    "nadamax-inside-max": (dict(nesterov=True, eps_mode="inside_max"), ()),
}


def _check_against_float64(arrays, prefix, shapes, steps):
    """The sharded parameters against tests/reference.py, fed the worker's data.

    An independent reference, besides the single-device run of the package: 3 steps of
    float32 rounding each, well below a step (the learning rate, 0.01).
    """
    name = prefix.split("/")[-2]
    kwargs, no_decay = FLOAT64_REFERENCE[name]
    params = _sharding_worker.host_tree(shapes, np.float32, 0)
    grads = [_sharding_worker.host_tree(shapes, np.float32, 1 + i) for i in range(steps)]
    for key, p0 in params.items():
        leaf_kwargs = dict(kwargs, weight_decay=0.0) if key in no_decay else kwargs
        stacked = np.stack([np.asarray(g[key], np.float64) for g in grads])
        want = adamax_numpy(
            np.asarray(p0, np.float64), stacked, lr=_sharding_worker.LEARNING_RATE, **leaf_kwargs
        )[-1][0]
        got = arrays[f"{prefix}[0]['{key}']"]
        np.testing.assert_allclose(
            got, want, rtol=1e-6, atol=1e-6, err_msg=f"{prefix}[0]['{key}'] vs float64 reference"
        )
        # It moved: a run that left the parameters alone would be far off.
        assert np.max(np.abs(want - p0)) > 0.1 * _sharding_worker.LEARNING_RATE, key


@pytest.mark.parametrize("mode", list(_sharding_worker.MODES))
@pytest.mark.parametrize("name", list(FLOAT64_REFERENCE))
def test_sharded_steps_equal_the_float64_reference(sharded, mode, name):
    shapes = {k: shape for k, (shape, _) in _sharding_worker.LAYOUT.items()}
    _check_against_float64(
        sharded[1], f"follow/{mode}/{name}/sharded", shapes, _sharding_worker.STEPS
    )


@pytest.mark.parametrize(
    "mode, layout, name",
    [case for case in _sharding_worker.ZERO1_CASES if case[2] in FLOAT64_REFERENCE],
)
def test_zero1_steps_equal_the_float64_reference(sharded, mode, layout, name):
    _, _, spec = _sharding_worker.ZERO1_LAYOUTS[layout]
    shapes = {k: shape for k, (shape, _) in spec.items()}
    _check_against_float64(sharded[1], f"zero1/{mode}/{layout}/{name}/sharded", shapes, 3)


# What the split rule gives, worked out by hand for each layout.
ZERO1_SPECS = {
    "1d": {"w": ["data"], "v": [None, "data"], "b": ["data"], "e": [], "s": []},
    "2d": {
        "w": ["data", "model"],
        "n": ["data", "model"],
        "m": ["model", "data"],
        "b": [["model", "data"]],
        "c": [],
        "s": [],
    },
    # "k" in whole blocks of 256 along its last axis; "v" (1000 / 8 is no
    # multiple of 256) along its first; "w" is small and stays float32.
    "1d-blocks": {"k": [None, "data"], "v": ["data"], "w": ["data"], "s": []},
}


def test_8_bit_configurations_are_checked():
    names = {name for _, name in _sharding_worker.FOLLOW_CASES}
    assert "adamax-int8-state" in names
    assert any(layout == "1d-blocks" for _, layout, _ in _sharding_worker.ZERO1_CASES)


@pytest.mark.parametrize("mode, name", _sharding_worker.FOLLOW_CASES)
def test_jit_init_shards_block_scales_like_codes(sharded, mode, name):
    record = sharded[0][f"follow/{mode}/{name}"]
    if "int8" in name:
        # mu['k'] and nu['k']: the only leaf large enough for 8-bit blocks.
        assert set(record["block_scales"]) == {"mu['k']", "nu['k']"}
    assert all(record["block_scales"].values()), record["block_scales"]


@pytest.mark.parametrize("mode, layout, name", _sharding_worker.ZERO1_CASES)
def test_zero1_splits_block_scales_like_codes(sharded, mode, layout, name):
    record = sharded[0][f"zero1/{mode}/{layout}/{name}"]
    if layout == "1d-blocks":
        assert set(record["block_scales"]) == {"mu['k']", "mu['v']", "nu['k']", "nu['v']"}
    assert all(record["block_scales"].values()), record["block_scales"]
    assert all(record["block_scales_placed"].values()), record["block_scales_placed"]


@pytest.mark.parametrize("mode, layout, name", _sharding_worker.ZERO1_CASES)
def test_zero1_specs(sharded, mode, layout, name):
    record = sharded[0][f"zero1/{mode}/{layout}/{name}"]
    trees = ["mu", "nu"] + (["compensation"] if "compensated" in name else [])
    expected = {f"{t}['{k}']": v for t in trees for k, v in ZERO1_SPECS[layout].items()}
    wrong = {k: v for k, v in record["specs"].items() if expected.get(k) != v}
    assert set(record["specs"]) == set(expected)
    assert not wrong, "state specs other than the documented choice: " + ", ".join(
        f"{k}: {v} (expected {expected[k]})" for k, v in wrong.items()
    )
    assert record["abstract_same"], "abstract parameters gave other shardings"


@pytest.mark.parametrize("mode, layout, name", _sharding_worker.ZERO1_CASES)
def test_zero1_state_bytes_per_device(sharded, mode, layout, name):
    record = sharded[0][f"zero1/{mode}/{layout}/{name}"]
    n = record["axis_size"]
    assert record["split_paths"], "nothing was split"
    assert record["split_total"] % n == 0
    for device, got in record["split_per_device"].items():
        # 1/N of what each device holds without ZeRO-1 ...
        assert got * n == record["split_per_device_unzero"][device], device
        # ... which, with 8 devices in all, is 1/8 of the whole in both layouts.
        assert got * 8 == record["split_total"], device
    # What cannot be split is whole on every device.
    assert set(record["whole_per_device"].values()) == {record["whole_total"]}


@pytest.mark.parametrize("mode, layout, name", _sharding_worker.ZERO1_CASES)
def test_zero1_state_and_params_placed_as_asked(sharded, mode, layout, name):
    record = sharded[0][f"zero1/{mode}/{layout}/{name}"]
    assert record["state_placed_as_asked"]
    assert record["scalars_replicated"]
    assert record["params_keep_shardings"]


@pytest.mark.parametrize("mode, layout, name", _sharding_worker.ZERO1_CASES)
def test_zero1_steps_equal_single_device_steps(sharded, mode, layout, name):
    results, arrays = sharded
    prefix = f"zero1/{mode}/{layout}/{name}"
    _close_to_single(arrays, results["dtypes"], f"{prefix}/sharded", f"{prefix}/single")


# ---------------------------------------------------------------------------
# 2 processes of 4 host devices, over 127.0.0.1.


# What the coordinator prints when another process took its port between
# `_free_port` and its own bind.
PORT_TAKEN = ("Failed to add port to server", "Address already in use")
PORT_ATTEMPTS = 3


def run_processes(out, die_after_init=()):
    """Runs the 2-process job on a free port; on a failure to bind it, on another one.

    `_free_port` binds a port, releases it, and the coordinator binds it later: a test
    running in parallel can take it in between. That failure, and only that one, is
    retried, up to PORT_ATTEMPTS times.
    """
    for attempt in range(PORT_ATTEMPTS):
        try:
            run_workers(
                _process_commands(out, die_after_init),
                _env(_multiprocess_worker.LOCAL_DEVICES),
                MULTIPROCESS_TIMEOUT_S,
                out,
            )
            return
        except WorkerFailure as failure:
            if attempt + 1 == PORT_ATTEMPTS or not any(t in str(failure) for t in PORT_TAKEN):
                raise


def _process_commands(out, die_after_init=()):
    port = _free_port()
    commands = []
    for i in range(_multiprocess_worker.NUM_PROCESSES):
        command = [sys.executable, "-m", "tests._multiprocess_worker", "--process-id", str(i)]
        command += ["--port", str(port), "--out", str(out)]
        if i in die_after_init:
            command.append("--die-after-init")
        commands.append(command)
    return commands


def test_two_processes_train_like_one(tmp_path):
    run_processes(tmp_path)
    reference = _multiprocess_worker.train_single()
    initial, _, _ = _multiprocess_worker.problem()
    finals = []
    for i in range(_multiprocess_worker.NUM_PROCESSES):
        with np.load(tmp_path / f"process_{i}.npz") as f:
            finals.append(dict(f))
        layout = json.loads((tmp_path / f"process_{i}.json").read_text())
        assert layout.pop("process_count") == 2
        # check_state read the block scales each process holds, no others.
        assert layout.pop("check_state_of_split_scales") is True
        for path, leaf in layout.items():
            shards = leaf["local_shard_nbytes"]
            assert len(shards) == _multiprocess_worker.LOCAL_DEVICES, path
            # b2 has one element and stays whole; all else is split 8 ways.
            parts = 1 if "b2" in path else 8
            assert shards == [leaf["nbytes"] // parts] * len(shards), (path, leaf)
    chex.assert_trees_all_equal(finals[0], finals[1])
    for key, want in reference.items():
        assert np.max(np.abs(finals[0][key] - want)) <= 1e-6, key
        # It trained: a run that left the parameters alone would pass the rest.
        assert np.max(np.abs(want - initial[key])) > 1e-3, key


def test_a_dead_process_fails_the_run_with_its_message(tmp_path):
    with pytest.raises(WorkerFailure, match=r"(?s)worker 1 .* exited with 3.*stops on purpose"):
        run_processes(tmp_path, die_after_init={1})
    # Its peer cannot have finished without it; it was stopped, not waited for.
    assert not (tmp_path / "process_0.npz").exists()


def test_a_port_taken_before_the_coordinator_binds_it_is_retried(monkeypatch, tmp_path):
    calls = []

    def fake_run_workers(commands, env, timeout, log_dir):
        calls.append(commands[0][commands[0].index("--port") + 1])
        if len(calls) == 1:
            raise WorkerFailure("worker 0 exited with -11; Failed to add port to server: ...")

    monkeypatch.setattr(sys.modules[__name__], "run_workers", fake_run_workers)
    run_processes(tmp_path)
    assert len(calls) == 2

    def other_failure(commands, env, timeout, log_dir):
        calls.append(None)
        raise WorkerFailure("worker 1 exited with 3")

    calls.clear()
    monkeypatch.setattr(sys.modules[__name__], "run_workers", other_failure)
    with pytest.raises(WorkerFailure, match="exited with 3"):
        run_processes(tmp_path)
    # Any other failure is not retried.
    assert calls == [None]


def test_eager_init_and_update_on_explicit_axes_place_8_bit_state_as_jit_does(sharded):
    record = sharded[0]["explicit_blocks"]
    assert set(record["eager_block_scales"]) == {"mu['k']", "nu['k']"}
    assert all(record["eager_block_scales"].values()), record["eager_block_scales"]
    assert record["eager_init_placed_like_jit"]
    assert record["eager_update_placed_like_jit"]
    # A part block on an axis split over a mesh axis of size 1, eagerly: as on one device.
    assert record["size_one_axis_eager_update_equal"]


@pytest.mark.parametrize("how", ["eager", "jit"])
def test_explicit_shards_that_split_an_8_bit_block_are_refused_naming_the_leaf(sharded, how):
    message = sharded[0]["explicit_blocks"][f"straddling_{how}"]
    assert message is not None, "a block split over two shards was accepted"
    for part in ("params['k']", "1040", "('model',)", "4 shards of 260", "`block_size` of 130"):
        assert part in message, (part, message)


def test_a_block_size_that_divides_the_shards_trains_like_one_device(sharded):
    results, arrays = sharded
    record = results["explicit_blocks"]
    assert set(record["fitted_block_scales"]) == {"mu['k']", "nu['k']"}
    assert all(record["fitted_block_scales"].values()), record["fitted_block_scales"]
    assert record["fitted_eager_init_placed_like_jit"]
    assert record["fitted_collectives"] == []
    _close_to_single(arrays, results["dtypes"], "explicit_blocks/sharded", "explicit_blocks/single")


def _abstract(shape, spec):
    mesh = jax.sharding.AbstractMesh(
        (2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
    )
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))


def _refusal(params, block_size=None):
    opt = ax.adamax(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, block_size=block_size)
    with pytest.raises(ValueError, match="every shard must hold whole blocks") as info:
        opt.init(params)
    return str(info.value)


def test_split_block_refusal_names_one_block_size_for_every_split_leaf():
    # Shards of 520, 384 and 256 values: 130 would fit the first alone and break the
    # others; 8 divides them all but is under the least block; 32 (and 64, 128) would
    # not divide 520. So no size is named, and following none of them breaks a leaf.
    params = {
        "a": _abstract((8, 2080), P(None, "model")),
        "b": _abstract((8, 1536), P(None, "model")),
        "c": _abstract((8, 1024), P(None, "model")),
    }
    message = _refusal(params)
    assert "params['a']" in message and "params['b']" in message
    assert "params['c']" not in message  # its shards hold whole blocks of 256
    assert "No `block_size` of at least 32 divides them all" in message
    # Shards of 640 and 384: 128 divides both, and 256 neither.
    params = {"a": _abstract((8, 2560), P(None, "model")), "b": params["b"]}
    message = _refusal(params)
    assert "A `block_size` of 128 divides the shards of every split leaf" in message
    state = jax.eval_shape(ax.adamax(0.1, mu_dtype=jnp.int8, block_size=128).init, params)
    assert state[0].mu_scale["a"].shape == (8, 20)


def test_split_block_refusal_names_no_block_size_below_the_least_block():
    message = _refusal({"w": _abstract((16, 1028), P(None, "model"))})  # shards of 257
    assert "4 shards of 257" in message
    # 257 is prime: no block of 32 to 256 values fits, and one of 257 (the shard) does.
    assert "A `block_size` of 257 divides the shards" in message and "of 1 " not in message
    message = _refusal({"w": _abstract((16, 1032), P(None, "model"))})  # shards of 258
    assert "A `block_size` of 129 divides the shards" in message


def test_split_block_refusal_names_a_larger_block_size_where_no_smaller_one_fits():
    # Shards of 125 values with blocks of 100: 125 fits (a message once said none did).
    message = _refusal({"w": _abstract((16, 500), P(None, "model"))}, block_size=100)
    assert "4 shards of 125" in message
    assert "A `block_size` of 125 divides the shards of every split leaf" in message
    opt = ax.adamax(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, block_size=125)
    state = jax.eval_shape(opt.init, {"w": _abstract((16, 500), P(None, "model"))})
    assert state[0].mu_scale["w"].shape == (16, 4)


def test_split_block_refusal_finds_the_block_size_of_a_huge_shard_quickly():
    # Shards of 999,999,937 values (a prime): the divisors are found up to the square root,
    # not by trying every number up to the shard's size.
    message = _refusal({"w": _abstract((1, 4 * 999_999_937), P(None, "model"))})
    assert "A `block_size` of 999999937 divides the shards" in message


def test_split_block_refusal_reports_uneven_shards_as_such():
    message = _refusal({"w": _abstract((8, 1028), P(None, ("data", "model")))})
    assert "8 uneven shards" in message and "divides the shards" not in message
