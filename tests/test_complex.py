"""Complex parameters: "modulus" as optax.adamax, "split" as torch.optim.Adamax.

torch is imported unconditionally: where it is missing this module fails, so that CI never
skips the port check silently.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adamax_jax as ax
from tests.reference import adamax_numpy_complex, params_away_from_zero, random_gradients
from tests.trajectory import scan_trajectory

STEPS = 300
SHAPE = (6, 5)
REAL = {"complex64": np.float32, "complex128": np.float64}


def _problem(seed, dtype, steps=STEPS):
    rng = np.random.default_rng(seed)
    theta0 = params_away_from_zero(rng, SHAPE) + 1j * params_away_from_zero(rng, SHAPE)
    # Real and imaginary parts are 0 independently, so some entries are 0, some real,
    # some imaginary.
    grads = random_gradients(rng, steps, SHAPE) + 1j * random_gradients(rng, steps, SHAPE)
    return theta0.astype(dtype), grads.astype(dtype)


def _parts(x):
    """The real and imaginary parts, as one real array: each compared on its own."""
    x = np.asarray(x)
    return np.stack([x.real, x.imag])


def _path(opt, params, grads, promotion="strict"):
    state, path = scan_trajectory(opt, params, grads, promotion)
    (inner,) = [s for s in state if isinstance(s, ax.ScaleByAdamaxState)]
    return path, inner


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_modulus_each_step_within_one_ulp_of_optax(dtype):
    with jax.enable_x64(dtype == "complex128"):
        params, grads = _problem(0, dtype)
        theirs = optax.adamax(0.002)
        ours = ax.adamax(0.002, eps_mode="inside_max")

        @jax.jit
        def run(params, grads):
            # optax's complex ν takes real |g| + ε into a complex maximum: standard
            # promotion for its calls only.
            with jax.numpy_dtype_promotion("standard"):
                state = theirs.init(params)

            def body(carry, g):
                p, s = carry
                with jax.numpy_dtype_promotion("standard"):
                    u_t, s_t = theirs.update(g, s, p)
                    p_t = optax.apply_updates(p, u_t)
                # An optax state converts by taking the real part of its ν.
                mine = ax.ScaleByAdamaxState(count=s[0].count, mu=s[0].mu, nu=s[0].nu.real)
                u_o, s_o = ours.update(g, (mine, *s[1:]), p)
                p_o = optax.apply_updates(p, u_o)
                return (p_t, s_t), ((p_o, s_o[0].mu, s_o[0].nu), (p_t, s_t[0].mu, s_t[0].nu))

            return jax.lax.scan(body, (params, state), grads)[1]

        (p_o, mu_o, nu_o), (p_t, mu_t, nu_t) = run(jnp.asarray(params), jnp.asarray(grads))
        for got, want in ((p_o, p_t), (mu_o, mu_t), (nu_o, nu_t.real)):
            np.testing.assert_array_max_ulp(_parts(got), _parts(want), maxulp=1)
        # optax's ν is real in all but its dtype.
        np.testing.assert_array_equal(np.asarray(nu_t).imag, 0)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_modulus_stores_nu_in_the_real_dtype(dtype):
    with jax.enable_x64(dtype == "complex128"):
        params = jnp.ones(SHAPE, dtype)
        ours = ax.scale_by_adamax(complex_mode="modulus").init(params)
        theirs = optax.scale_by_adamax().init(params)
        assert ours.nu.dtype == REAL[dtype]
        assert theirs.nu.dtype == dtype
        assert ours.nu.nbytes * 2 == theirs.nu.nbytes
        assert ours.mu.dtype == theirs.mu.dtype == dtype
        # And it stays real through jitted steps.
        opt = ax.adamax(complex_mode="modulus")
        state = opt.init(params)
        for _ in range(2):
            _, new_state = jax.jit(opt.update)(jnp.full(SHAPE, 0.1 - 0.2j, dtype), state, params)
            chex.assert_trees_all_equal_dtypes(new_state, state)
            state = new_state


def test_split_keeps_two_norms_in_a_complex_nu():
    params = jnp.zeros(3, jnp.complex64)
    g = jnp.asarray([3 - 4j, -1j, 2], jnp.complex64)
    opt = ax.scale_by_adamax(eps_mode="none", complex_mode="split")
    state = opt.init(params)
    assert state.nu.dtype == jnp.complex64
    updates, state = opt.update(g, state)
    # u = |Re g| + i|Im g|, not the modulus (which would be 5 for 3 - 4j).
    np.testing.assert_array_equal(state.nu, np.asarray([3 + 4j, 0 + 1j, 2 + 0j], np.complex64))
    # The first step is sign(Re g) + i sign(Im g), 0 where a part of g is 0 (up to the
    # rounding of 1 - β₁ and of the bias correction in float32).
    np.testing.assert_allclose(updates, np.asarray([1 - 1j, -1j, 1], np.complex64), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates).real[1], 0)
    np.testing.assert_array_equal(np.asarray(updates).imag[2], 0)


def _torch_path(params, grads, **kwargs):
    p = torch.nn.Parameter(torch.from_numpy(params.copy()))
    opt = torch.optim.Adamax([p], **kwargs)
    path = []
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        path.append(p.detach().numpy().copy())
    return np.stack(path)


# float32 is the 1e-5; in float64, 300 steps of a few roundings each.
@pytest.mark.parametrize("dtype, rtol", [("complex64", 1e-5), ("complex128", 1e-12)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
def test_split_matches_torch(foreach, weight_decay, dtype, rtol):
    params, grads = _problem(1, dtype)
    want = _torch_path(params, grads, weight_decay=weight_decay, foreach=foreach)
    with jax.enable_x64(dtype == "complex128"):
        opt = optax.chain(
            optax.add_decayed_weights(weight_decay),
            ax.scale_by_adamax(eps_mode="inside_max", complex_mode="split"),
            optax.scale_by_learning_rate(0.002),
        )
        got, state = _path(opt, params, grads)
        assert got.dtype == dtype and state.nu.dtype == dtype
    chex.assert_trees_all_close(_parts(got), _parts(want), rtol=rtol, atol=0)


def test_modulus_is_not_torch():
    # The two modes differ: the modulus couples the parts, torch does not.
    params, grads = _problem(2, "complex64")
    want = _torch_path(params, grads)
    got, _ = _path(ax.adamax(eps_mode="inside_max", complex_mode="modulus"), params, grads)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(_parts(got), _parts(want), rtol=1e-5, atol=0)


@pytest.mark.parametrize("nesterov", [False, True], ids=["adamax", "nadamax"])
@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
@pytest.mark.parametrize("complex_mode", ["modulus", "split"])
def test_matches_float64_reference(complex_mode, eps_mode, nesterov):
    hyper = dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-3)
    params, grads = _problem(3, "complex128", steps=100)
    ref = adamax_numpy_complex(
        params, grads, **hyper, eps_mode=eps_mode, nesterov=nesterov, complex_mode=complex_mode
    )
    alias = ax.nadamax if nesterov else ax.adamax
    with jax.enable_x64(True):
        opt = alias(
            hyper["lr"],
            hyper["b1"],
            hyper["b2"],
            hyper["eps"],
            eps_mode=eps_mode,
            complex_mode=complex_mode,
        )
        got, _ = _path(opt, params, grads)
    chex.assert_trees_all_close(_parts(got), _parts(np.stack(ref)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("complex_mode", ["modulus", "split"])
def test_real_parameters_ignore_complex_mode(complex_mode):
    rng = np.random.default_rng(4)
    params = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
    grads = jnp.asarray(random_gradients(rng, 30, (8,)), jnp.float32)
    got, state = _path(ax.adamax(complex_mode=complex_mode), params, grads)
    want, _ = _path(ax.adamax(), params, grads)
    assert state.nu.dtype == jnp.float32
    chex.assert_trees_all_equal(got, want)


def test_mixed_tree_of_real_and_complex_leaves():
    # Each leaf follows its own dtype's rule, as if it were alone.
    rng = np.random.default_rng(5)
    params = {
        "z": jnp.asarray(rng.normal(size=4) + 1j * rng.normal(size=4), jnp.complex64),
        "x": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    grads = {
        "z": jnp.asarray(
            random_gradients(rng, 20, (4,)) + 1j * random_gradients(rng, 20, (4,)), jnp.complex64
        ),
        "x": jnp.asarray(random_gradients(rng, 20, (3,)), jnp.float32),
    }
    opt = ax.adamax(complex_mode="split")
    got, state = _path(opt, params, grads)
    assert state.nu["z"].dtype == jnp.complex64 and state.nu["x"].dtype == jnp.float32
    for k in params:
        alone, _ = _path(opt, params[k], grads[k])
        chex.assert_trees_all_equal(got[k], alone)


def test_rejects_unknown_complex_mode():
    with pytest.raises(ValueError, match=r"`complex_mode`.*'polar'"):
        ax.adamax(complex_mode="polar")
