"""The optimizer state in the containers users keep it in: flax.nnx, flax serialization, orbax.

Every storage dtype: the real ``nnx.Optimizer`` (eagerly and
under ``nnx.jit``) against a plain optax loop, ``flax.serialization`` and orbax
round trips that continue bit-identically, a block size recorded in every
checkpoint and refused when it differs, a restore without a target refused with
the way to restore, and ``convert_state`` giving arrays of its own.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

import adamax_jax as ax

LR = 1e-2

# Every storage dtype, as `adamax(LR, **kwargs)`.
STORAGE = {
    "float32": {},
    "nu-bfloat16": {"nu_dtype": jnp.bfloat16},
    "nu-float16": {"nu_dtype": jnp.float16},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "float16": {"mu_dtype": jnp.float16, "nu_dtype": jnp.float16},
    "int8-uint8": {"mu_dtype": jnp.int8, "nu_dtype": jnp.uint8},
    "int8-int8": {"mu_dtype": jnp.int8, "nu_dtype": jnp.int8},
    "float8_e4m3fn": {"mu_dtype": jnp.float8_e4m3fn, "nu_dtype": jnp.float8_e4m3fn},
    "float8_e5m2": {"mu_dtype": jnp.float8_e5m2, "nu_dtype": jnp.float8_e5m2},
    "bfloat16-uint8": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.uint8},
}

OPTIMIZERS = {f"adamax-{k}": functools.partial(ax.adamax, LR, **kw) for k, kw in STORAGE.items()}
OPTIMIZERS["adamaxw-int8-uint8"] = functools.partial(
    ax.adamaxw, LR, weight_decay=0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8
)
OPTIMIZERS["nadamax-bfloat16"] = functools.partial(
    ax.nadamax, LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16
)

STEPS = 5


def _structure(tree):
    return jax.tree.structure(tree, is_leaf=lambda x: x is None)


def _assert_identical(got, want):
    assert _structure(got) == _structure(want)
    chex.assert_trees_all_equal(got, want)
    chex.assert_trees_all_equal_dtypes(got, want)


def _eight_bit_leaves(state):
    return [x for x in jax.tree.leaves(state) if jnp.dtype(x.dtype).itemsize == 1]


# ---------------------------------------------------------------------------
# flax.nnx


class _Model(nnx.Module):
    def __init__(self, rngs):
        # Kernel of 8192 values: block-wise in 8 bits; its bias keeps float32 moments.
        self.linear = nnx.Linear(64, 128, rngs=rngs)
        # 2 blocks of 256 along the last axis, the second a part block of 44.
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (16, 300)))

    def __call__(self, x):
        return self.linear(x), jnp.sin(x[:, :16] @ self.w)


def _loss(model, x, y):
    out, side = model(x)
    return jnp.mean((out - y) ** 2) + jnp.mean(side)


@functools.cache
def _batches():
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(8, 64)), jnp.float32) for _ in range(STEPS)]
    ys = [jnp.asarray(rng.normal(size=(8, 128)), jnp.float32) for _ in range(STEPS)]
    return xs, ys


@functools.cache
def _fixed_grads():
    """Gradients fixed in advance, a different one for each step (nnx.State of Params)."""
    model = _Model(nnx.Rngs(0))
    grad = nnx.jit(nnx.grad(_loss))
    return [grad(model, x, y) for x, y in zip(*_batches(), strict=True)]


def _pure_params(model):
    return nnx.as_pure(nnx.state(model, nnx.Param))


def _assert_same_run(model, optimizer, params, state):
    assert int(optimizer.step[...]) == STEPS
    _assert_identical(_pure_params(model), params)
    # Not a run in which nothing moved.
    assert not np.array_equal(_pure_params(_Model(nnx.Rngs(0)))["w"], params["w"])
    # The state nnx keeps is the state optax keeps, and reads as the same moments.
    kept = nnx.as_pure(optimizer.opt_state)
    _assert_identical(kept, state)
    _assert_identical(ax.infinity_norm(kept), ax.infinity_norm(state))
    _assert_identical(ax.first_moment(kept), ax.first_moment(state))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_optimizer_matches_a_plain_optax_loop(name):
    model = _Model(nnx.Rngs(0))
    # Eager, as nnx.Optimizer.update runs here: a compiled step may fuse the
    # float32 arithmetic otherwise and differ in the last bit.
    opt = OPTIMIZERS[name]()
    params = _pure_params(model)
    state = opt.init(params)
    for grads in _fixed_grads():
        updates, state = opt.update(nnx.as_pure(grads), state, params)
        params = optax.apply_updates(params, updates)

    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
    for grads in _fixed_grads():
        optimizer.update(model, grads)

    _assert_same_run(model, optimizer, params, state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_jit_train_step_matches_a_plain_optax_loop(name):
    model = _Model(nnx.Rngs(0))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    opt = OPTIMIZERS[name]()

    def pure_loss(params, x, y):
        return _loss(nnx.merge(graphdef, params, rest), x, y)

    @jax.jit
    def plain_step(params, state, x, y):
        grads = jax.grad(pure_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = _pure_params(model)
    state = opt.init(params)
    for x, y in zip(*_batches(), strict=True):
        params, state = plain_step(params, state, x, y)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(_loss)(model, x, y)
        optimizer.update(model, grads)

    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
    for x, y in zip(*_batches(), strict=True):
        train_step(model, optimizer, x, y)

    _assert_same_run(model, optimizer, params, state)


# ---------------------------------------------------------------------------
# flax serialization and orbax, on plain parameters


def _params():
    key = jax.random.key(1)
    k1, k2 = jax.random.split(key)
    return {
        "kernel": 0.1 * jax.random.normal(k1, (64, 128)),
        "bias": jnp.zeros(128),
        "w": 0.1 * jax.random.normal(k2, (16, 300)),
    }


def _tree_loss(params):
    return sum(jnp.sum(jnp.sin(3 * x) + x**2) for x in jax.tree.leaves(params))


@functools.cache
def _compiled(name):
    opt = OPTIMIZERS[name]()

    @jax.jit
    def step(params, state):
        grads = jax.grad(_tree_loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, step


def _run(step, params, state, steps):
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@functools.cache
def _trained(name):
    opt, step = _compiled(name)
    params, state = _run(step, _params(), opt.init(_params()), 2)
    # 8-bit configurations hold 8-bit moments for these parameters (block-wise ones).
    assert bool(_eight_bit_leaves(state)) == ("int8" in name or "float8" in name), name
    return params, state


@pytest.mark.parametrize("via", ["bytes", "state_dict"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flax_serialization_round_trip_continues_bit_identically(name, via):
    opt, step = _compiled(name)
    params, state = _trained(name)
    if via == "bytes":
        blob = serialization.to_bytes(state)
        restored = serialization.from_bytes(opt.init(params), blob)
    else:
        # Through host memory, as a user's own serializer would keep the state dict.
        host = jax.tree.map(np.asarray, serialization.to_state_dict(state))
        restored = serialization.from_state_dict(opt.init(params), host)
    _assert_identical(restored, state)
    assert type(ax.adamax_state(restored)) is ax.ScaleByAdamaxState
    _assert_identical(_run(step, params, restored, 3), _run(step, params, state, 3))


def _save(path, tree):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
        checkpointer.wait_until_finished()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_orbax_round_trip_into_abstract_state_continues_bit_identically(name, tmp_path):
    opt, step = _compiled(name)
    params, state = _trained(name)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", ax.abstract_state(opt, params))
    _assert_identical(restored, state)
    _assert_identical(_run(step, params, restored, 3), _run(step, params, state, 3))


@pytest.mark.parametrize("name", ["adamax-float32", "adamax-int8-uint8"])
def test_orbax_restore_without_a_target_is_refused_naming_abstract_state(name, tmp_path):
    opt, _ = _compiled(name)
    params, state = _trained(name)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state")
    grads = jax.grad(_tree_loss)(params)
    with pytest.raises(ValueError, match="abstract_state"):
        opt.update(grads, restored, params)


# ---------------------------------------------------------------------------
# The block size, recorded in what a checkpoint keeps


def _block_params():
    return {"w": jnp.linspace(-1.0, 1.0, 16 * 300).reshape(16, 300)}


def _eight_bit(block_size):
    return ax.adamax(1e-3, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, block_size=block_size)


@functools.cache
def _block_compiled(block_size):
    opt = _eight_bit(block_size)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_tree_loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, step


@functools.cache
def _block_trained():
    opt, step = _block_compiled(256)
    params = _block_params()
    return _run(step, params, opt.init(params), 3)


def _block_message(message):
    # Names the block size the state was written with.
    return re.search(r"(?i)block", message) and "256" in message


def _restore(via, path, blob, opt, params):
    if via == "orbax":
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, ax.abstract_state(opt, params))
    return serialization.from_bytes(opt.init(params), blob)


def _saved_block_state(tmp_path):
    params, state = _block_trained()
    _save(tmp_path / "state", state)
    return params, state, tmp_path / "state", serialization.to_bytes(state)


@pytest.mark.parametrize("via", ["orbax", "flax"])
def test_checkpoint_of_the_same_block_size_restores_and_continues(via, tmp_path):
    params, state, path, blob = _saved_block_state(tmp_path)
    opt, step = _block_compiled(256)
    ax.check_state(opt, params, state)
    restored = _restore(via, path, blob, opt, params)
    ax.check_state(opt, params, restored)
    _assert_identical(restored, state)
    # u reads back as it was written, not rescaled by other blocks.
    _assert_identical(ax.infinity_norm(restored), ax.infinity_norm(state))
    _assert_identical(ax.first_moment(restored), ax.first_moment(state))
    _assert_identical(_run(step, params, restored, 3), _run(step, params, state, 3))


def test_checkpoint_metadata_of_another_block_size_is_refused(tmp_path):
    params, _, path, _ = _saved_block_state(tmp_path)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
    # The right optimizer passes: the check itself reads this metadata.
    ax.check_state(_eight_bit(256), params, metadata)
    with pytest.raises(ValueError) as info:
        ax.check_state(_eight_bit(200), params, metadata)
    assert _block_message(str(info.value)), str(info.value)


@pytest.mark.parametrize("via", ["orbax", "flax"])
def test_state_of_another_block_size_is_refused_after_a_restore(via, tmp_path):
    params, _, path, blob = _saved_block_state(tmp_path)
    opt = _eight_bit(200)
    # flax restores into the other optimizer's state as it is; orbax refuses
    # that target by the shape of `block_size`, so it restores the checkpoint
    # as it was written (as from its metadata), and the other optimizer is
    # given that state.
    restored = _restore(via, path, blob, opt if via == "flax" else _eight_bit(256), params)
    with pytest.raises(ValueError) as info:
        ax.check_state(opt, params, restored)
    assert _block_message(str(info.value)), str(info.value)
    grads = jax.grad(_tree_loss)(params)
    with pytest.raises(ValueError) as info:
        opt.update(grads, restored, params)
    assert _block_message(str(info.value)), str(info.value)
    with pytest.raises(ValueError) as info:
        jax.jit(opt.update)(grads, restored, params)
    assert _block_message(str(info.value)), str(info.value)


# ---------------------------------------------------------------------------
# convert_state: a state of its own


CONVERSIONS = {
    "optax-float32": (lambda: optax.adamax(1e-3), ax.adamax),
    "float32-float32": (ax.adamax, ax.adamax),
    "bfloat16-float32": (lambda: OPTIMIZERS["adamax-bfloat16"](), ax.adamax),
    "float32-nu-bfloat16": (ax.adamax, lambda: OPTIMIZERS["adamax-nu-bfloat16"]()),
    "int8-uint8-int8-uint8": (
        lambda: OPTIMIZERS["adamax-int8-uint8"](),
        lambda: OPTIMIZERS["adamax-int8-uint8"](),
    ),
}


@pytest.mark.parametrize("case", CONVERSIONS)
def test_convert_state_shares_no_buffer_with_its_source(case):
    source, target = (make() for make in CONVERSIONS[case])
    params = {"w": _params()["w"], "b": jnp.zeros(8)}
    grads = jax.grad(_tree_loss)(params)
    old = source.init(params)
    # optax's own update promotes Python floats against int32.
    with jax.numpy_dtype_promotion("standard"):
        update = jax.jit(source.update)
        for _ in range(2):
            _, old = update(grads, old, params)
    before = jax.tree.map(np.array, old)

    new = ax.convert_state(old, target, params)

    def step(params, state):
        updates, state = target.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    _, out = jax.jit(step, donate_argnums=1)(params, new)
    # The donation took place: the converted state's buffers are gone.
    assert all(x.is_deleted() for x in jax.tree.leaves(new))
    assert jax.tree.leaves(out)
    for x in jax.tree.leaves(old):
        assert not x.is_deleted()
    _assert_identical(jax.tree.map(np.asarray, old), before)
