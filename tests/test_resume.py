"""Resuming on other hardware: restore targets, checks of saved states, ZeRO-1 on Explicit axes.

The multi-device runs are subprocesses (tests/_resume_worker.py): 2 processes of
4 host devices train and save over 127.0.0.1; one process of 8 devices and 2
processes again resume; this process resumes on its one device.
"""

import json
import re
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax
from tests import _multiprocess_worker as mp
from tests import _resume_worker as worker
from tests import background
from tests.test_sharding import _close_to_single, _env, _free_port, run_workers

# Bounds against a hang, not speed targets: generous for a loaded 2-core machine.
TIMEOUT_S = 240


def _bf16_params():
    return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.bfloat16).reshape(3, 4), "b": jnp.zeros(4)}


def _f32_params():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}


CONFIGS = {
    "float32": (lambda: ax.adamax(0.01), _f32_params),
    "bfloat16-state": (
        lambda: ax.adamax(0.01, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        _f32_params,
    ),
    "compensated": (lambda: ax.adamax(0.01, compensated=True), _bf16_params),
    "chain": (
        lambda: optax.chain(
            optax.clip(1.0),
            optax.apply_if_finite(ax.adamax(0.01, nu_dtype=jnp.bfloat16), 3),
            optax.add_decayed_weights(1e-3),
        ),
        _bf16_params,
    ),
}


def _loss(params):
    return sum(jnp.sum(jnp.sin(3 * x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def _stepper(opt):
    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(step, params, state, steps):
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------
# In this process, on one device.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_abstract_state_is_what_jit_init_makes(name):
    opt, params = CONFIGS[name][0](), CONFIGS[name][1]()
    state = jax.jit(opt.init)(params)
    for form in (params, _abstract(params)):
        target = ax.abstract_state(opt, form)
        assert jax.tree.structure(target) == jax.tree.structure(state)
        assert all(isinstance(t, jax.ShapeDtypeStruct) for t in jax.tree.leaves(target))
        chex.assert_trees_all_equal_shapes_and_dtypes(target, state)
        assert jax.tree.leaves(jax.tree.map(lambda t, x: t.sharding == x.sharding, target, state))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_through_orbax_with_the_abstract_state_is_bit_identical(name, tmp_path):
    opt = CONFIGS[name][0]()
    params = CONFIGS[name][1]()
    step = _stepper(opt)
    straight = _run(step, params, opt.init(params), 5)
    saved = _run(step, params, opt.init(params), 2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": saved[0], "opt": saved[1]})
        checkpointer.wait_until_finished()
    # A fresh optimizer that knows the parameters' shapes only.
    fresh = CONFIGS[name][0]()
    abstract = _abstract(params)
    target = {"params": abstract, "opt": ax.abstract_state(fresh, abstract)}
    with ocp.StandardCheckpointer() as checkpointer:
        ax.check_state(
            fresh, abstract, checkpointer.metadata(tmp_path / "ckpt").item_metadata["opt"]
        )
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    ax.check_state(fresh, abstract, restored["opt"])
    resumed = _run(step, restored["params"], restored["opt"], 3)
    chex.assert_trees_all_equal(resumed, straight)
    chex.assert_trees_all_equal_dtypes(resumed, straight)


def test_abstract_state_takes_one_sharding_a_tree_of_them_or_none():
    opt, params = CONFIGS["bfloat16-state"][0](), _f32_params()
    one = SingleDeviceSharding(jax.devices()[0])
    assert all(
        t.sharding == one for t in jax.tree.leaves(ax.abstract_state(opt, params, shardings=one))
    )
    assert all(
        t.sharding is None for t in jax.tree.leaves(ax.abstract_state(opt, params, shardings=None))
    )
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    zero1 = ax.zero1_state_shardings(opt, params, mesh, "data")
    target = ax.abstract_state(opt, params, shardings=zero1)
    assert jax.tree.leaves(jax.tree.map(lambda t, s: t.sharding == s, target, zero1))


def test_abstract_state_rejects_shardings_of_another_structure():
    opt, params = ax.adamax(0.01), _f32_params()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    other = ax.zero1_state_shardings(ax.adamax(0.01, nu_dtype=jnp.bfloat16), params, mesh, "data")
    plain = ax.zero1_state_shardings(opt, params, mesh, "data")
    with pytest.raises(
        ValueError, match=r"(?s)structure of the state.*\[0\]\.nu_scale\['w'\]: missing"
    ):
        # The other way round: the state has a scale for each ν, `shardings` has not.
        ax.abstract_state(ax.adamax(0.01, nu_dtype=jnp.bfloat16), params, shardings=plain)
    with pytest.raises(
        ValueError, match=r"\[0\]\.nu_scale\['w'\]: NamedSharding in `shardings`, not in the state"
    ):
        ax.abstract_state(opt, params, shardings=other)


@pytest.mark.parametrize("bad, match", [("replicated", "got 'replicated'"), ({}, "got {}")])
def test_abstract_state_rejects_what_is_no_sharding(bad, match):
    with pytest.raises(TypeError, match=rf"`shardings` must be \"params\", None.*{match}"):
        ax.abstract_state(ax.adamax(), _f32_params(), shardings=bad)


def test_abstract_state_rejects_a_tree_with_a_leaf_that_is_no_sharding():
    opt, params = ax.adamax(), _f32_params()
    tree = jax.tree.map(lambda _: "x", ax.abstract_state(opt, params, shardings=None))
    with pytest.raises(TypeError, match=r"`shardings`\[0\]\.count must be a jax.sharding.Sharding"):
        ax.abstract_state(opt, params, shardings=tree)


def test_abstract_state_follows_parameters_on_a_mesh_and_rejects_two_meshes():
    opt = ax.adamax(0.01)
    data, other = (Mesh(np.array(jax.devices()[:1]), (name,)) for name in ("data", "x"))
    params = {
        "w": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=NamedSharding(data, P("data"))),
        "b": jnp.zeros(4),  # no mesh: replicated over that of the others
    }
    target = ax.abstract_state(opt, params)
    assert target[0].mu["w"].sharding.is_equivalent_to(NamedSharding(data, P("data")), 2)
    assert target[0].nu["b"].sharding.is_fully_replicated
    assert target[0].nu["b"].sharding.mesh.axis_names == ("data",)
    params["b"] = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(other, P()))
    with pytest.raises(ValueError, match=r"`params`\['w'\] is sharded over a mesh with axes"):
        ax.abstract_state(opt, params)


def _saved_metadata(opt, params, path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"opt": opt.init(params)})
        checkpointer.wait_until_finished()
        return checkpointer.metadata(path).item_metadata["opt"]


@pytest.mark.parametrize(
    "saved, expected, params, lines",
    [
        # Another dtype configuration: a float32 target would take the bfloat16 arrays.
        (
            lambda: ax.adamax(nu_dtype=jnp.bfloat16),
            ax.adamax,
            _f32_params,
            [
                r"  \[0\]\.nu\['b'\]: bfloat16\[4\] in `state`, expected float32\[4\]",
                # The checkpoint's own key paths for what only it holds.
                r"  \[0\]\['nu_scale'\]\['w'\]: float32\[\] in `state`, not in the state",
                r"  \[0\]\['nu_scale'\]\['b'\]: float32\[\] in `state`, not in the state",
            ],
        ),
        # A leaf the checkpoint lacks.
        (
            ax.adamax,
            lambda: ax.adamax(compensated=True),
            _bf16_params,
            [r"  \[2\]\.compensation\['w'\]: missing from `state`; expected bfloat16\[3, 4\]"],
        ),
        # Another structure: the optimizer's state sits one level down.
        (
            ax.adamax,
            lambda: optax.chain(optax.clip(1.0), ax.adamax()),
            _f32_params,
            [
                r"  \[1\]\[0\]\.count: missing from `state`",
                r"  \[0\]\['count'\]: int32\[\] in `state`",
            ],
        ),
    ],
    ids=["dtypes", "missing-leaf", "structure"],
)
def test_check_state_names_what_differs_in_a_checkpoint(saved, expected, params, lines, tmp_path):
    metadata = _saved_metadata(saved(), params(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="`state` is not a state of `opt` for `params`") as info:
        ax.check_state(expected(), params(), metadata)
    for line in lines:
        assert re.search(line, str(info.value)), (line, str(info.value))


def test_check_state_names_a_shape_that_differs():
    params = _f32_params()
    state = ax.adamax().init({"w": jnp.zeros((4, 3)), "b": jnp.zeros(4)})
    with pytest.raises(
        ValueError, match=r"\[0\]\.mu\['w'\]: float32\[4, 3\] in `state`, expected float32\[3, 4\]"
    ):
        ax.check_state(ax.adamax(), params, state)


def test_check_state_names_a_leaf_that_is_no_array():
    params = _f32_params()
    state = ax.adamax().init(params)
    state = (state[0]._replace(count="seven"), *state[1:])
    with pytest.raises(ValueError, match=r"\[0\]\.count: `state` holds a str, not an array"):
        ax.check_state(ax.adamax(), params, state)


# ---------------------------------------------------------------------------
# 2 processes × 4 devices save; 1 process × 8 devices, 2 processes and this process resume.


def _command(role, devices, out, process_id=0, port=0):
    command = [sys.executable, "-m", "tests._resume_worker", role, "--devices", str(devices)]
    return command + ["--out", str(out), "--process-id", str(process_id), "--port", str(port)]


def train_and_resume(out):
    """Two processes train and save into `out`; one process of 8 devices and two processes
    resume (a job started with the session, tests/background.py)."""
    env = _env(1)  # each worker sets its own device count
    port = _free_port()
    train = [_command("train", 4, out, i, port) for i in range(worker.NUM_PROCESSES)]
    start = time.monotonic()
    run_workers(train, env, TIMEOUT_S, out)
    # The resumes only read the checkpoint: all at once.
    port = _free_port()
    restores = [_command("restore8", 8, out)]
    restores += [_command("restore2", 4, out, i, port) for i in range(worker.NUM_PROCESSES)]
    run_workers(restores, env, TIMEOUT_S, out)
    facts = {
        name: json.loads((out / f"{name}.json").read_text()) for name in ("train_0", "restore8")
    }
    with np.load(out / "restore8_arrays.npz") as f8, np.load(out / "restore2_arrays.npz") as f2:
        arrays = {"restore8": dict(f8), "restore2": dict(f2)}
    for config in worker.CONFIGS:
        with np.load(out / f"reference_{config}.npz") as f:
            arrays[f"reference_{config}"] = dict(f)
    return out, facts, arrays, time.monotonic() - start


@pytest.fixture(scope="module")
def resumed():
    return background.value("resume")


def _prefixed(arrays, prefix):
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _assert_close(got, want, bound):
    assert set(got) == set(want)
    for key, w in want.items():
        if key.endswith(".count"):
            np.testing.assert_array_equal(got[key], w, err_msg=key)
        err = float(np.max(np.abs(got[key] - w), initial=0.0))
        assert err <= bound, f"{key}: {err} > {bound}"
    # Not a run that left everything at zero.
    assert any(np.max(np.abs(w)) > 0 for key, w in want.items() if ".mu[" in key)


@pytest.mark.parametrize("config", worker.CONFIGS)
def test_two_processes_resume_bit_identical_on_the_same_mesh(resumed, config):
    _, _, arrays, _ = resumed
    got = _prefixed(arrays["restore2"], f"{config}/")
    want = arrays[f"reference_{config}"]
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# On another mesh shape, on one device, or in another layout, the batch mean of
# the loss is reduced over other device counts in another order and rounds
# differently in the last bit of float32; AdaMax itself is elementwise. 1e-6
# is tens of ulp of these values (all below 4) after 3 steps of learning rate 0.01.
TOLERANCE = 1e-6


def test_one_process_of_eight_devices_resumes_on_another_mesh(resumed):
    _, facts, arrays, _ = resumed
    specs = facts["restore8"]["mesh4x2_zero1"]
    # ZeRO-1 over the data axis of the 4 × 2 mesh.
    assert specs["[0].mu['w1']"] == "P(None, 'data')" and specs["[0].nu['b1']"] == "P('data',)"
    got = _prefixed(arrays["restore8"], "mesh4x2_zero1/")
    _assert_close(got, arrays["reference_f32"], TOLERANCE)


def test_resume_with_zero1_off_after_a_run_with_it(resumed):
    _, facts, arrays, _ = resumed
    saved = facts["train_0"]["f32"]
    assert saved["[0].mu['w1']"] == "P(None, 'data')"
    assert set(facts["restore8"]["zero1_off"].values()) == {"P()"}
    _assert_close(_prefixed(arrays["restore8"], "zero1_off/"), arrays["reference_f32"], TOLERANCE)


def test_resume_with_zero1_on_after_a_run_without_it(resumed):
    _, facts, arrays, _ = resumed
    assert set(facts["restore8"]["plain_reference"].values()) == {"P()"}
    assert facts["restore8"]["zero1_on"]["[0].nu['w2']"] == "P('data', None)"
    want = _prefixed(arrays["restore8"], "plain_reference/")
    _assert_close(_prefixed(arrays["restore8"], "zero1_on/"), want, TOLERANCE)


def test_one_device_resumes_the_two_process_checkpoint(resumed):
    out, _, arrays, _ = resumed
    opt = worker.make_optimizer("f32")
    host_params, xs, ys = mp.problem()
    one = SingleDeviceSharding(jax.devices()[0])
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in host_params.items()
    }
    target = {"params": abstract, "opt": ax.abstract_state(opt, abstract)}
    with ocp.StandardCheckpointer() as checkpointer:
        ax.check_state(
            opt, abstract, checkpointer.metadata(out / "ckpt" / "f32").item_metadata["opt"]
        )
        restored = checkpointer.restore(out / "ckpt" / "f32", target)
    assert all(x.sharding == one for x in jax.tree.leaves(restored))
    step = jax.jit(mp.train_step(opt))
    params, state = restored["params"], restored["opt"]
    for x, y in zip(
        xs[worker.K : worker.K + worker.N], ys[worker.K : worker.K + worker.N], strict=True
    ):
        params, state, _ = step(params, state, x, y)
    _assert_close(worker.flat({"params": params, "opt": state}), arrays["reference_f32"], TOLERANCE)


def test_a_checkpoint_of_another_configuration_is_refused(resumed):
    _, facts, _, _ = resumed
    message = facts["restore8"]["mismatch"]
    assert message is not None, "a float32 checkpoint restored into a bfloat16 state"
    assert "[0].mu['w1']: float32[8, 16] in `state`, expected bfloat16[8, 16]" in message
    assert "[0].nu_scale['w1']: missing from `state`; expected float32[]" in message


@pytest.mark.parametrize("name", ["adamax", "compensated-bf16"])
def test_explicit_zero1_default_step_matches_auto_and_by_hand(resumed, name):
    _, facts, arrays, _ = resumed
    dtypes = facts["restore8"]["dtypes"]
    prefix = f"explicit/{name}"
    explicit = f"{prefix}/explicit/default"
    # The same program modulo fusion: within the bounds of tests/test_sharding.py.
    _close_to_single(
        arrays["restore8"], dtypes, f"{prefix}/explicit/default", f"{prefix}/auto/default"
    )
    _close_to_single(
        arrays["restore8"], dtypes, f"{prefix}/explicit/by_hand", f"{prefix}/explicit/default"
    )
    # Without `jax.set_mesh` the shardings carry the mesh: the same program.
    no_mesh = _prefixed(arrays["restore8"], f"{prefix}/explicit/no_mesh_context")
    assert set(no_mesh) == set(_prefixed(arrays["restore8"], explicit))
    for key, value in no_mesh.items():
        np.testing.assert_array_equal(value, arrays["restore8"][explicit + key], err_msg=key)
    record = facts["restore8"]["explicit"][f"{name}/explicit"]
    assert record["default"]["state_specs"] == record["by_hand"]["state_specs"]
    assert record["default"]["state_specs"]["[0].mu['b']"] == "P(('model', 'data'),)"


@pytest.mark.parametrize("name", ["adamax", "compensated-bf16"])
def test_explicit_zero1_default_step_moves_no_more_than_by_hand(resumed, name):
    _, facts, _, _ = resumed
    record = facts["restore8"]["explicit"][f"{name}/explicit"]
    default, by_hand = record["default"], record["by_hand"]
    # ZeRO-1 gathers the updates: there must be collectives, and no more of them.
    assert by_hand["collectives"], by_hand
    assert sum(b for _, b in default["collectives"]) <= sum(b for _, b in by_hand["collectives"])
    assert default["collectives"] == by_hand["collectives"]
    for kind in ("argument", "output", "temp"):
        assert default["memory"][kind] <= by_hand["memory"][kind], (kind, record)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
@pytest.mark.parametrize("name", ["adamax", "bf16-state", "adamaxw"])
def test_fsdp_state_follows_the_parameters_with_no_collectives(resumed, name, mode):
    _, facts, _, _ = resumed
    record = facts["restore8"]["fsdp"][f"{name}/{mode}"]
    assert len(record["follows"]) >= 6
    wrong = {k: v for k, v in record["follows"].items() if v[0] != v[1]}
    assert not wrong, wrong
    assert record["target_specs_equal"] and record["zero1_equal"] and record["params_keep"]
    assert record["collectives"] == [], record


# ---------------------------------------------------------------------------
# The example.


def multiprocess_example(out):
    """The example's command, environment and timeout, run in `out` (a job started with the
    session, tests/background.py)."""
    command = [sys.executable, "-m", "adamax_jax.examples.multiprocess", "--processes", "2"]
    command += ["--devices", "2", "--steps", "2", "--dir", str(out / "run")]
    return [command], _env(1), TIMEOUT_S


def test_the_multiprocess_example_runs():
    tmp_path = background.result("multiprocess-example")
    out = (tmp_path / "worker_0.out").read_text()
    assert re.search(r"trained 2 steps in 2 processes", out), out
    assert re.search(r"restored in 1 process", out), out
    match = re.search(r"largest difference from the uninterrupted run: ([0-9.e+-]+)", out)
    assert match and float(match.group(1)) <= TOLERANCE, out
    assert (tmp_path / "run" / "checkpoint").is_dir()


DOCS = Path(__file__).resolve().parents[1] / "docs" / "resuming.md"


def test_the_docs_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    # The self-contained example; the other blocks are fragments of the recipe.
    runnable = [b for b in blocks if b.startswith("import os")]
    assert len(runnable) == 1
    (tmp_path / "example.py").write_text(runnable[0])
    env = _env(8)
    env.pop("XLA_FLAGS")  # the example sets it
    command = [sys.executable, "-W", "error", str(tmp_path / "example.py")]
    run_workers([command], env, TIMEOUT_S, tmp_path)
    out = (tmp_path / "worker_0.out").read_text()
    assert "FSDP state: P('data', 'model') P(('data', 'model'),)" in out, out
    assert "collectives in the update: False" in out, out
    assert "resumed on {'data': 4, 'model': 2} at step 6" in out, out
