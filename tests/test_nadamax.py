"""NadaMax (AdaMax with Nesterov momentum) against its float64 NumPy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests.reference import adamax_numpy, params_away_from_zero, random_gradients
from tests.trajectory import scan_trajectory

STEPS = 300

HYPERS = {
    "default": dict(lr=0.002, b1=0.9, b2=0.999, eps=1e-8),
    "fast": dict(lr=0.05, b1=0.5, b2=0.9, eps=1e-3),
    "edge": dict(lr=0.01, b1=0.0, b2=1.0, eps=0.0),
}


@pytest.mark.parametrize("hyper", list(HYPERS))
@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
def test_trajectory_matches_float64_reference(eps_mode, hyper):
    h = HYPERS[hyper]
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(7,))
    grads = random_gradients(rng, STEPS, (7,))
    ref = adamax_numpy(theta0, grads, eps_mode=eps_mode, nesterov=True, **h)
    with jax.enable_x64(True):
        opt = ax.nadamax(h["lr"], h["b1"], h["b2"], h["eps"], eps_mode=eps_mode)
        state, path = scan_trajectory(opt, jnp.asarray(theta0), jnp.asarray(grads))
        chex.assert_trees_all_close(
            np.asarray(path), np.stack([r[0] for r in ref]), rtol=1e-10, atol=1e-12
        )
        # The moments are AdaMax's own; only the step reads them differently.
        chex.assert_trees_all_close(
            (state[0].mu, ax.infinity_norm(state[0])), ref[-1][1:], rtol=1e-10, atol=1e-14
        )


def test_float32_trajectory_within_1e_5_of_float64_reference():
    rng = np.random.default_rng(1)
    theta0 = params_away_from_zero(rng, (64,))
    grads = random_gradients(rng, STEPS, (64,))
    ref = adamax_numpy(theta0, grads, nesterov=True)
    _, path = scan_trajectory(
        ax.nadamax(), jnp.asarray(theta0, jnp.float32), jnp.asarray(grads, jnp.float32)
    )
    chex.assert_trees_all_close(
        np.asarray(path, np.float64), np.stack([r[0] for r in ref]), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("g", [0.1, -3.0, 1e-4])
@pytest.mark.parametrize("b1", [0.9, 0.5])
def test_first_step_in_closed_form(b1, g):
    # At t = 1: m = (1 - β₁)g, u = |g|, and m̂ = β₁g/(1 + β₁) + g, so the step is
    # α(1 + β₁/(1 + β₁))·g/(|g| + ε).
    lr, eps = 0.002, 1e-8
    want = 1.0 - lr * (1 + b1 / (1 + b1)) * g / (abs(g) + eps)
    opt = ax.nadamax(lr, b1, 0.999, eps)
    params = jnp.ones(1, jnp.float32)
    updates, _ = opt.update(jnp.full(1, g, jnp.float32), opt.init(params), params)
    chex.assert_trees_all_close(
        np.asarray(optax.apply_updates(params, updates), np.float64), np.array([want]), rtol=1e-7
    )


def test_differs_from_adamax():
    # The look-ahead changes the step: at t = 1 by a factor 1 + β₁/(1 + β₁).
    params = jnp.ones(3, jnp.float32)
    g = jnp.asarray([0.1, -0.2, 0.3], jnp.float32)
    nada, ada = ax.nadamax(), ax.adamax()
    u_nada, _ = nada.update(g, nada.init(params), params)
    u_ada, _ = ada.update(g, ada.init(params), params)
    chex.assert_trees_all_close(u_nada, u_ada * jnp.float32(1 + 0.9 / 1.9), rtol=1e-6)


@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
def test_without_momentum_is_adamax(eps_mode):
    # With β₁ = 0 there is nothing to look ahead to: m̂ = g for both. Eagerly
    # they agree bit for bit; compiled, NadaMax divides each of its two terms
    # by u before adding them (so that they cannot overflow), and XLA may fuse
    # that chain with one rounding less or more than AdaMax's: one ulp.
    rng = np.random.default_rng(2)
    params = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    grads = jnp.asarray(random_gradients(rng, 50, (16,)), jnp.float32)
    nada_opt = ax.nadamax(0.01, b1=0.0, eps_mode=eps_mode)
    ada_opt = ax.adamax(0.01, b1=0.0, eps_mode=eps_mode)
    _, nada = scan_trajectory(nada_opt, params, grads)
    _, ada = scan_trajectory(ada_opt, params, grads)
    np.testing.assert_array_max_ulp(np.asarray(nada), np.asarray(ada), maxulp=1)
    p_nada, p_ada, s_nada, s_ada = params, params, nada_opt.init(params), ada_opt.init(params)
    for g in grads[:10]:
        u_nada, s_nada = nada_opt.update(g, s_nada, p_nada)
        u_ada, s_ada = ada_opt.update(g, s_ada, p_ada)
        p_nada, p_ada = optax.apply_updates(p_nada, u_nada), optax.apply_updates(p_ada, u_ada)
        chex.assert_trees_all_equal(p_nada, p_ada)


def test_scale_by_adamax_nesterov_is_nadamax():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    grads = {
        k: jnp.asarray(random_gradients(rng, 20, v.shape), jnp.float32) for k, v in params.items()
    }
    chained = optax.chain(ax.scale_by_adamax(nesterov=True), optax.scale(-0.002))
    chex.assert_trees_all_equal(
        scan_trajectory(chained, params, grads)[1], scan_trajectory(ax.nadamax(), params, grads)[1]
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params_keep_their_dtype_and_follow_reference(dtype):
    rng = np.random.default_rng(4)
    theta0 = params_away_from_zero(rng, (32,))
    # The reference sees the same rounded inputs.
    theta0 = np.asarray(jnp.asarray(theta0, dtype), np.float64)
    grads = np.asarray(jnp.asarray(random_gradients(rng, 100, (32,)), dtype), np.float64)
    ref = adamax_numpy(theta0, grads, lr=0.01, nesterov=True)
    opt = ax.nadamax(0.01, compensated=True)
    state, path = scan_trajectory(opt, jnp.asarray(theta0, dtype), jnp.asarray(grads, dtype))
    assert path.dtype == dtype
    chex.assert_trees_all_equal_dtypes(state, opt.init(jnp.asarray(theta0, dtype)))
    # Within one unit of relative rounding of the parameters' dtype: compensation keeps
    # the steps that rounding would drop (without it, 100 steps drift by 5 to 8 units).
    chex.assert_trees_all_close(
        np.asarray(path[-1], np.float64), ref[-1][0], rtol=float(jnp.finfo(dtype).eps), atol=0
    )


def test_inject_hyperparams():
    opt = optax.inject_hyperparams(ax.nadamax)(learning_rate=0.002, b1=0.9)
    params = jnp.ones(3, jnp.float32)
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(jnp.full(3, 0.1, jnp.float32), state, params)
    chex.assert_trees_all_close(
        optax.apply_updates(params, updates), jnp.full(3, 1 - 0.002 * (1 + 0.9 / 1.9)), rtol=1e-6
    )
