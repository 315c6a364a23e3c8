"""Parity with optax.adamax / optax.adamaxw: within 1 ulp per step and over whole runs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests.reference import params_away_from_zero, random_gradients

STEPS = 300

# optax.adamax's only ε convention is ε inside the max.
HYPERS = {
    "default": dict(b1=0.9, b2=0.999, eps=1e-8),
    "fast": dict(b1=0.5, b2=0.9, eps=1e-3),
    "no-momentum": dict(b1=0.0, b2=1.0, eps=1e-6),
}
LEARNING_RATES = {
    "constant": 0.002,
    "schedule": optax.exponential_decay(0.002, transition_steps=50, decay_rate=0.5),
}


def _problem(seed, dtype):
    rng = np.random.default_rng(seed)
    shapes = {"w": (8, 4), "b": (4,)}
    params = {k: jnp.asarray(params_away_from_zero(rng, s), dtype) for k, s in shapes.items()}
    grads = {k: jnp.asarray(random_gradients(rng, STEPS, s), dtype) for k, s in shapes.items()}
    return params, grads


def _to_ours(state):
    """An optax adamax state, as ours: ScaleByAdamState(count, mu, nu) maps field by field."""

    def convert(s):
        if isinstance(s, optax.ScaleByAdamState):
            return ax.ScaleByAdamaxState(count=s.count, mu=s.mu, nu=s.nu)
        return s

    return jax.tree.map(convert, state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))


def _inner(state):
    (inner,) = [s for s in state if isinstance(s, (optax.ScaleByAdamState, ax.ScaleByAdamaxState))]
    return inner


def _per_step(ours, theirs, params, grads):
    """Runs `theirs`; at every step also runs one step of `ours` from the same params and state."""

    @jax.jit
    def run(params, grads):
        # optax promotes Python scalars against int32 counts, which strict mode refuses;
        # only its own calls are traced under standard promotion.
        with jax.numpy_dtype_promotion("standard"):
            state = theirs.init(params)

        def body(carry, g):
            p, s = carry
            with jax.numpy_dtype_promotion("standard"):
                u_theirs, s_theirs = theirs.update(g, s, p)
                p_theirs = optax.apply_updates(p, u_theirs)
            u_ours, s_ours = ours.update(g, _to_ours(s), p)
            p_ours = optax.apply_updates(p, u_ours)
            inner_t, inner_o = _inner(s_theirs), _inner(s_ours)
            out = (p_ours, inner_o.mu, inner_o.nu), (p_theirs, inner_t.mu, inner_t.nu)
            return (p_theirs, s_theirs), out

        return jax.lax.scan(body, (params, state), grads)[1]

    return run(params, grads)


def _trajectory(opt, params, grads, promotion, state=None):
    @jax.jit
    def run(params, state, grads):
        with jax.numpy_dtype_promotion(promotion):
            if state is None:
                state = opt.init(params)

            def body(carry, g):
                p, s = carry
                u, s = opt.update(g, s, p)
                p = optax.apply_updates(p, u)
                return (p, s), p

            return jax.lax.scan(body, (params, state), grads)

    (_, state), path = run(params, state, grads)
    return path, state


def _assert_within_one_ulp(ours, theirs):
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_max_ulp(np.asarray(got), np.asarray(want), maxulp=1)


def _optimizers(name, lr, hyper):
    if name == "adamax":
        return ax.adamax(lr, **hyper, eps_mode="inside_max"), optax.adamax(lr, **hyper)
    mask = {"w": True, "b": False}
    return (
        ax.adamaxw(lr, **hyper, weight_decay=0.1, mask=mask, eps_mode="inside_max"),
        optax.adamaxw(lr, **hyper, weight_decay=0.1, mask=mask),
    )


@pytest.mark.parametrize("lr", list(LEARNING_RATES))
@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("name", ["adamax", "adamaxw"])
def test_each_step_within_one_ulp_of_optax(name, hyper, lr):
    params, grads = _problem(0, jnp.float32)
    ours, theirs = _optimizers(name, LEARNING_RATES[lr], HYPERS[hyper])
    got, want = _per_step(ours, theirs, params, grads)
    _assert_within_one_ulp(got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["adamax", "adamaxw"])
def test_trajectory_is_within_one_ulp_of_optax(name, dtype):
    # The core computes the moments in optax's order of operations, so over independent
    # runs of 300 steps they agree to the bit. The parameters agree within 1 ulp at every
    # step of the whole run: the bias correction 1 - β₁ᵗ is computed from the exact
    # 1 - β₁ (optax uses a β₁ rounded to float32), a few ulps of the update apart.
    with jax.enable_x64(dtype == "float64"):
        params, grads = _problem(1, jnp.dtype(dtype))
        ours, theirs = _optimizers(name, 0.002, HYPERS["default"])
        path_ours, state_ours = _trajectory(ours, params, grads, "strict")
        path_theirs, state_theirs = _trajectory(theirs, params, grads, "standard")
        state_ours, state_theirs = _inner(state_ours), _inner(state_theirs)
        _assert_within_one_ulp(path_ours, path_theirs)
        chex.assert_trees_all_equal(
            (state_ours.count, state_ours.mu, state_ours.nu),
            (state_theirs.count, state_theirs.mu, state_theirs.nu),
        )
        chex.assert_trees_all_equal_dtypes(path_ours, params)


@pytest.mark.parametrize("compile_mode", ["jit", "eager"])
def test_separately_compiled_steps_within_one_ulp_of_optax(compile_mode):
    # Each library's step compiled on its own, as two training scripts would run. XLA
    # rewrites a division by a broadcast scalar as a multiplication by its reciprocal,
    # differently in different programs, so the directions may differ in their last
    # bits (optax.adamax differs from itself between jit and eager that way); the
    # parameters still agree within 1 ulp at every step.
    params, grads = _problem(2, jnp.float32)
    # Eager steps are slow: 100 of them.
    grads = jax.tree.map(lambda g: g[:100], grads)
    ours, theirs = _optimizers("adamax", 0.002, HYPERS["default"])
    wrap = jax.jit if compile_mode == "jit" else (lambda f: f)
    update_ours, update_theirs = wrap(ours.update), wrap(theirs.update)
    with jax.numpy_dtype_promotion("standard"):
        state = theirs.init(params)
    p = params
    for i in range(100):
        g = jax.tree.map(lambda x, i=i: x[i], grads)
        u_ours, s_ours = update_ours(g, _to_ours(state), p)
        with jax.numpy_dtype_promotion("standard"):
            u_theirs, state = update_theirs(g, state, p)
        p_ours = optax.apply_updates(p, u_ours)
        p = optax.apply_updates(p, u_theirs)
        _assert_within_one_ulp(
            (p_ours, _inner(s_ours).mu, _inner(s_ours).nu),
            (p, _inner(state).mu, _inner(state).nu),
        )


def test_optax_checkpoint_continues_in_adamax_jax():
    # A run started with optax.adamax resumes with ours from its converted state.
    params, grads = _problem(3, jnp.float32)
    head = jax.tree.map(lambda g: g[:100], grads)
    tail = jax.tree.map(lambda g: g[100:], grads)
    theirs = optax.adamax(0.002)
    path, state = _trajectory(theirs, params, head, "standard")
    resumed, state_ours = _trajectory(
        ax.adamax(0.002, eps_mode="inside_max"),
        jax.tree.map(lambda x: x[-1], path),
        tail,
        "strict",
        state=_to_ours(state),
    )
    full, _ = _trajectory(theirs, params, grads, "standard")
    assert int(_inner(state_ours).count) == STEPS
    _assert_within_one_ulp(resumed, jax.tree.map(lambda x: x[100:], full))


def test_default_eps_mode_is_not_optax():
    # The tolerance above is discriminating: Keras' convention ("denominator") does
    # not pass for optax once ε is large enough to matter.
    params, grads = _problem(4, jnp.float32)
    ours = ax.adamax(0.002, 0.9, 0.999, 1e-3)
    theirs = optax.adamax(0.002, 0.9, 0.999, 1e-3)
    got, want = _per_step(ours, theirs, params, grads)
    with pytest.raises(AssertionError):
        _assert_within_one_ulp(got[0], want[0])
