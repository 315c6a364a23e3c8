import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import adamax_jax as ax


def _params():
    return {
        "dense": {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)},
        "norm": {"scale": jnp.ones(4, jnp.bfloat16)},
        "head": (jnp.arange(4, dtype=jnp.float16) / 4, None),
    }


def _float32_params():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}


def _eight_bit_params():
    # One leaf large enough for block-wise 8-bit state (3 blocks of 256 along
    # its last axis, the last one partial), one kept in float32.
    return {"w": jnp.linspace(-1.0, 1.0, 8 * 600).reshape(8, 600), "b": jnp.zeros(4)}


def _loss(params):
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(params)]
    return sum(jnp.sum(jnp.sin(3 * x) + x**2) for x in leaves)


def _matrices(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


CONFIGS = {
    # float32 only: every moment a plain array, as in optax.
    "adamax-f32": (lambda: ax.adamax(0.01), _float32_params),
    "adamax-mixed": (lambda: ax.adamax(0.01), _params),
    "bf16-nu": (lambda: ax.adamax(0.01, nu_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16), _params),
    "compensated": (lambda: ax.adamax(0.01, compensated=True), _params),
    "nadamax": (lambda: ax.nadamax(0.01), _params),
    "adamaxw-mask": (
        lambda: ax.adamaxw(
            0.01, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
        _float32_params,
    ),
    "apply-if-finite": (
        lambda: optax.apply_if_finite(ax.adamax(0.01), max_consecutive_errors=2),
        _params,
    ),
    "int8-state": (
        lambda: ax.adamax(0.01, mu_dtype=jnp.int8, nu_dtype=jnp.uint8),
        _eight_bit_params,
    ),
    "float8-state": (
        lambda: ax.nadamax(0.01, mu_dtype=jnp.float8_e4m3fn, nu_dtype=jnp.float8_e5m2),
        _eight_bit_params,
    ),
}


@functools.cache
def _compiled(name):
    """One optimizer and one compiled step per configuration, shared by the tests."""
    opt = CONFIGS[name][0]()

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return opt, step


def _run(name, params, state, steps):
    _, step = _compiled(name)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _inner(state):
    """The ScaleByAdamaxState inside a chain or a wrapper."""
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ax.ScaleByAdamaxState))
        if isinstance(s, ax.ScaleByAdamaxState)
    ]
    assert len(found) == 1
    return found[0]


def _structure(tree):
    return jax.tree.structure(tree, is_leaf=lambda x: x is None)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_is_a_plain_pytree_of_arrays(name):
    opt, _ = _compiled(name)
    params = CONFIGS[name][1]()
    _, state = _run(name, params, opt.init(params), 2)
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    # Through host memory and back, as any serializer would do it.
    host = jax.tree.map(np.asarray, state)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    back = jax.tree.map(jnp.asarray, host)
    assert _structure(back) == _structure(state)
    chex.assert_trees_all_equal(back, state)
    chex.assert_trees_all_equal_dtypes(back, state)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_orbax_round_trip(name, tmp_path):
    opt, _ = _compiled(name)
    params = CONFIGS[name][1]()
    _, state = _run(name, params, opt.init(params), 3)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "state", target)
    assert _structure(restored) == _structure(state)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal_dtypes(restored, state)
    inner, restored_inner = _inner(state), _inner(restored)
    assert type(restored_inner) is ax.ScaleByAdamaxState
    chex.assert_trees_all_equal_structs(restored_inner, inner)
    scales = jax.tree.leaves((restored_inner.mu_scale, restored_inner.nu_scale))
    if name == "adamax-f32":
        assert not scales and restored_inner.block_size is None
    if name == "bf16-nu":
        assert scales and all(x.shape == () for x in scales)
    if name.endswith("8-state"):
        # mu['w'] and nu['w'] block-wise, with their scales and the block size.
        assert [x.shape for x in scales] == [(8, 3)] * 2
        assert restored_inner.block_size.shape == (256,)


@pytest.mark.parametrize(
    "name",
    ["adamax-f32", "bf16-nu", "compensated", "apply-if-finite", "int8-state", "float8-state"],
)
@pytest.mark.parametrize("k", [1, 5])
def test_resume_is_bit_identical(name, k, tmp_path):
    steps = 8
    opt, _ = _compiled(name)
    params = CONFIGS[name][1]()
    straight = _run(name, params, opt.init(params), steps)

    saved_params, saved_state = _run(name, params, opt.init(params), k)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / f"step_{k}", {"params": saved_params, "opt": saved_state})
        checkpointer.wait_until_finished()
    del saved_params, saved_state

    # A fresh program knows only the shapes: it builds the target abstractly.
    fresh = CONFIGS[name][0]()
    template = CONFIGS[name][1]()
    target = jax.eval_shape(lambda p: {"params": p, "opt": fresh.init(p)}, template)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / f"step_{k}", target)
    resumed = _run(name, restored["params"], restored["opt"], steps - k)

    chex.assert_trees_all_equal(resumed, straight)
    chex.assert_trees_all_equal_dtypes(resumed, straight)
    assert int(_inner(resumed[1]).count) == steps


SCALED_STATES = {
    "int8-uint8": {"mu_dtype": jnp.int8, "nu_dtype": jnp.uint8},
    "bf16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
}


def _with_scale(state, field, change):
    inner = state[0]
    return (inner._replace(**{field: jax.tree.map(change, getattr(inner, field))}), *state[1:])


@pytest.mark.parametrize(
    ("config", "field", "change"),
    [
        ("int8-uint8", "mu_scale", lambda s: -s),
        ("int8-uint8", "nu_scale", lambda s: s * np.inf),
        ("int8-uint8", "nu_scale", lambda s: -s),
        ("bf16", "nu_scale", lambda s: s * np.inf),
        ("bf16", "nu_scale", lambda s: -s),
    ],
    ids=["int8-mu-negated", "uint8-nu-inf", "uint8-nu-negated", "bf16-nu-inf", "bf16-nu-negated"],
)
def test_check_state_refuses_scales_no_step_writes(config, field, change):
    # An infinite ν scale reads back as the largest finite value and freezes its
    # parameters; a negative one flips what it holds: a state changed by hand.
    opt = ax.adamax(1e-3, **SCALED_STATES[config])
    params = {"w": jnp.zeros((16, 512))}
    state = opt.update({"w": jnp.ones((16, 512))}, opt.init(params), params)[1]
    ax.check_state(opt, params, state)
    with pytest.raises(
        ValueError, match=rf"\[0\]\.{field}\['w'\]: \d+ of \d+ scales negative or above"
    ):
        ax.check_state(opt, params, _with_scale(state, field, change))


@pytest.mark.parametrize("config", list(SCALED_STATES))
def test_check_state_accepts_the_scales_steps_write(config):
    # 0 (an 8-bit ν block that holds nothing yet, as `init` writes it) and NaN (a block
    # that took a non-finite gradient, kept visible) are written by steps.
    opt = ax.adamax(1e-3, **SCALED_STATES[config])
    params = {"w": jnp.zeros((16, 512))}
    ax.check_state(opt, params, opt.init(params))
    state = opt.update({"w": jnp.full((16, 512), jnp.nan)}, opt.init(params), params)[1]
    if config == "int8-uint8":
        # 8-bit codes hold no NaN: the block's scale does.
        assert np.isnan(np.asarray(state[0].nu_scale["w"])).all()
    ax.check_state(opt, params, state)


@pytest.mark.parametrize("config", [{}, *SCALED_STATES.values()], ids=["float32", *SCALED_STATES])
def test_check_state_takes_parameters_named_like_scales_as_moments(config):
    # Only the state's own `mu_scale`/`nu_scale` fields are scales: a parameter of that
    # name has moments, negative or infinite as its gradients make them.
    opt = ax.adamax(1e-3, **config)
    params = {"mu_scale": jnp.zeros(3), "nu_scale": jnp.zeros(3)}
    grads = {"mu_scale": -jnp.ones(3), "nu_scale": jnp.full(3, jnp.inf)}
    state = opt.update(grads, opt.init(params), params)[1]
    assert np.all(np.asarray(ax.first_moment(state)["mu_scale"]) < 0)
    ax.check_state(opt, params, state)


@pytest.mark.parametrize("scale", [2.0**126, float(jnp.finfo(jnp.float32).max)])
def test_check_state_refuses_a_finite_scale_above_what_steps_write(scale):
    # A block scale is clipped to 2^125: a larger one froze its parameters (an update of 0).
    opt = ax.adamax(1e-3, **SCALED_STATES["int8-uint8"])
    params = {"w": jnp.zeros((16, 512))}
    state = opt.update({"w": jnp.ones((16, 512))}, opt.init(params), params)[1]
    with pytest.raises(ValueError, match=r"nu_scale\['w'\]: 32 of 32 scales negative or above"):
        ax.check_state(opt, params, _with_scale(state, "nu_scale", lambda s: s * 0 + scale))


def test_check_state_refuses_a_numpy_scalar_scale_no_step_writes():
    opt = ax.adamax(1e-3, **SCALED_STATES["bf16"])
    params = {"w": jnp.zeros((16, 512))}
    state = opt.init(params)
    ax.check_state(opt, params, _with_scale(state, "nu_scale", lambda s: np.float32(s)))
    with pytest.raises(ValueError, match=r"nu_scale\['w'\]: 1 of 1 scales negative or above"):
        ax.check_state(opt, params, _with_scale(state, "nu_scale", lambda s: np.float32(np.inf)))
