"""Properties of AdaMax that hold for every gradient sequence, checked with hypothesis.

The exact bound of the step. With ε = 0, write c₁ = 1 - β₁, r = β₁/β₂ and
S_t = Σ_{j=0}^{t-1} r^j. Unrolled, m_t = c₁ Σ_{k=1}^{t} β₁^{t-k} g_k. The infinity
norm keeps every past gradient, decayed: u_t ≥ β₂^{t-k} u_k ≥ β₂^{t-k} |g_k|, so
|g_k| ≤ u_t / β₂^{t-k}. Hence |m_t| ≤ c₁ u_t Σ_k (β₁/β₂)^{t-k} = c₁ S_t u_t and

    |Δθ_t| = α |m_t| / ((1 - β₁^t) u_t) ≤ α c₁ S_t / (1 - β₁^t) =: α B(t).

Equality needs every inequality to be tight at once: all g_k of one sign and
|g_k| = u_t / β₂^{t-k} for every k, i.e. g_k = g₁ β₂^{k-1} (each gradient the
last one decayed by exactly β₂). So B(t) is attained, not only approached. B(1)
= 1, and for β₁ < β₂, B(t) → (1 - β₁)/(1 - β₁/β₂) = 1.00909... for the defaults;
the paper's |Δθ| ≤ α holds for β₂ = 1 only. With ε > 0 in either place the
denominator only grows, so B still bounds the step.

NadaMax: m̂_t = β₁ m_t/(1 - β₁^{t+1}) + c₁ g_t/(1 - β₁^t) with |g_t| ≤ u_t gives
B_N(t) = β₁ c₁ S_t/(1 - β₁^{t+1}) + c₁/(1 - β₁^t), attained by the same sequence.

In floating point the implementation decays with β₁ and β₂ rounded to the
compute dtype and multiplies g by 1 - β₁ rounded there; the bounds below use
those same constants, so they are exact for the arithmetic that runs, up to the
rounding of t sums, one power (absolute error below one ulp, so relative error
ulp/(1 - β₁^t) in the bias correction) and a few products.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import adamax_jax as ax

T, N = 24, 3
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

MAGNITUDE = st.one_of(st.just(0.0), st.floats(1e-6, 1e3), st.floats(-1e3, -1e-6))
GRADS = hnp.arrays(np.float64, (T, N), elements=MAGNITUDE)
B1 = st.one_of(st.sampled_from([0.0, 0.9]), st.floats(0.0, 0.99))
B2 = st.one_of(st.sampled_from([0.999, 1.0]), st.floats(0.1, 1.0))
LR = st.floats(1e-4, 1.0)
EPS = st.one_of(st.just(0.0), st.floats(1e-12, 1e-3))
# "inside_max" with ε = 0 is "none"; its ε = 0 case is in test_validation.py.
POSITIVE_EPS = st.floats(1e-12, 1e-3)


def _real(dtype):
    return np.finfo(dtype).dtype


@functools.cache
def _trajectory(kind, dtype, eps_mode="denominator", complex_mode="modulus", steps=T):
    """A compiled run over a (steps, N) gradient sequence; hyperparameters traced.

    Returns per step the update, u_t (``infinity_norm``) and m_t.
    """
    del dtype, steps  # Part of the cache key: one compiled function for each.

    def run(lr, b1, b2, eps, grads):
        if kind == "scale_by_adamax":
            opt = ax.scale_by_adamax(b1, b2, eps, eps_mode=eps_mode, complex_mode=complex_mode)
        else:
            factory = ax.nadamax if kind == "nadamax" else ax.adamax
            opt = factory(lr, b1, b2, eps, eps_mode=eps_mode)
        params = jnp.zeros_like(grads[0])
        state = opt.init(params)

        def body(state, g):
            updates, state = opt.update(g, state, params)
            inner = state if kind == "scale_by_adamax" else state[0]
            return state, (updates, ax.infinity_norm(inner), inner.mu)

        return jax.lax.scan(body, state, grads)[1]

    return jax.jit(run)


def _run(kind, grads, lr, b1, b2, eps, eps_mode="denominator", complex_mode="modulus"):
    dtype = grads.dtype
    real = _real(dtype)
    fn = _trajectory(kind, dtype, eps_mode, complex_mode, grads.shape[0])
    args = [np.asarray(x, real) for x in (lr, b1, b2, eps)]
    with jax.enable_x64(real == np.float64):
        return tuple(np.asarray(x) for x in fn(*args, jnp.asarray(grads)))


def _constants(b1, b2, dtype):
    """β₁, β₂ and 1 - β₁ as the implementation sees them (traced in `dtype`)."""
    real = _real(dtype)
    b1_r, b2_r = real.type(b1), real.type(b2)
    return float(b1_r), float(b2_r), float(real.type(1) - b1_r)


def bound(b1, b2, dtype, steps, nesterov=False):
    """B(t) (or B_N(t)) for t = 1..steps, and its relative rounding allowance."""
    b1_r, b2_r, c1 = _constants(b1, b2, dtype)
    t = np.arange(1, steps + 1, dtype=np.float64)
    ratio = b1_r / b2_r
    s = np.cumsum(ratio ** np.arange(steps, dtype=np.float64))
    bc = 1 - b1_r**t
    b = c1 * s / bc
    if nesterov:
        b = b1_r * c1 * s / (1 - b1_r ** (t + 1)) + c1 / bc
    allowance = np.finfo(dtype).eps * (t + 4 + 1 / bc)
    return b, allowance


# u_t ≥ |g_t| and u_t ≥ β₂ u_{t-1}: exact, in the compute dtype.

U_CASES = [
    ("adamax", np.float32, "denominator", "modulus"),
    ("adamax", np.float32, "inside_max", "modulus"),
    ("adamax", np.float64, "none", "modulus"),
    ("nadamax", np.float64, "inside_max", "modulus"),
    ("scale_by_adamax", np.complex64, "denominator", "split"),
    ("scale_by_adamax", np.complex64, "inside_max", "modulus"),
]


@pytest.mark.parametrize("kind, dtype, eps_mode, complex_mode", U_CASES)
@SETTINGS
@given(grads=GRADS, imag=GRADS, b1=B1, b2=B2, eps=EPS)
def test_u_is_the_max_of_decayed_u_and_gradient(
    kind, dtype, eps_mode, complex_mode, grads, imag, b1, b2, eps
):
    real = _real(dtype)
    g = grads.astype(dtype)
    if np.iscomplexobj(g):
        g = g + 1j * imag.astype(dtype)
    _, u, _ = _run(kind, g, 0.01, b1, b2, eps, eps_mode, complex_mode)
    split = complex_mode == "split" and np.iscomplexobj(g)
    parts = (np.real, np.imag) if split else (lambda x: x,)
    for part in parts:
        u_part = part(u)
        mag = np.abs(part(g)) if split else np.abs(g)
        if eps_mode == "inside_max":
            mag = mag + real.type(eps)
        decayed = real.type(b2) * np.concatenate([np.zeros((1, N), real), u_part[:-1]])
        if np.iscomplexobj(g) and not split:
            # |g| of a complex number is rounded by XLA and by NumPy, each
            # to within one ulp; the comparison allows for both.
            mag = mag * (1 - 2 * np.finfo(real).eps)
        else:
            assert np.all((u_part == mag) | (u_part == decayed))
        assert np.all(u_part >= mag)
        assert np.all(u_part >= decayed)


# |Δθ_t| ≤ α B(t), and B(t) is attained.

BOUND_CASES = [
    ("adamax", np.float64, "none"),
    ("adamax", np.float64, "denominator"),
    ("adamax", np.float64, "inside_max"),
    ("nadamax", np.float64, "none"),
    ("nadamax", np.float64, "inside_max"),
    ("adamax", np.float32, "denominator"),
]


@pytest.mark.parametrize("kind, dtype, eps_mode", BOUND_CASES)
@SETTINGS
@given(grads=GRADS, b1=B1, b2=B2, lr=LR, eps=EPS, positive_eps=POSITIVE_EPS)
# XLA's float64 log1p was 1.6e-14 off at -0.40625 (β₁ = 0.59375), past the bound.
@example(grads=np.ones((T, N)), b1=0.59375, b2=0.999, lr=1.0, eps=0.0, positive_eps=1e-3)
def test_step_within_exact_bound(kind, dtype, eps_mode, grads, b1, b2, lr, eps, positive_eps):
    eps = positive_eps if eps_mode == "inside_max" else eps
    updates, _, _ = _run(kind, grads.astype(dtype), lr, b1, b2, eps, eps_mode)
    b, allowance = bound(b1, b2, dtype, T, nesterov=kind == "nadamax")
    limit = float(_real(dtype).type(lr)) * b * (1 + allowance)
    assert np.all(np.isfinite(updates))
    assert np.all(np.abs(updates) <= limit[:, None])


def _adversarial(b2, dtype, steps, sign=1.0):
    """g_k = g₁ β₂^{k-1}, each decayed from the last in `dtype` as u is."""
    real = _real(dtype)
    g = np.empty(steps, real)
    g[0] = sign
    for k in range(1, steps):
        g[k] = real.type(b2) * g[k - 1]
    return np.repeat(g[:, None], N, axis=1)


TIGHT = [(0.9, 0.999), (0.5, 0.9), (0.9, 0.95), (0.0, 0.5), (0.99, 1.0), (0.9, 0.6)]


@pytest.mark.parametrize("kind", ["adamax", "nadamax"])
@pytest.mark.parametrize("b1, b2", TIGHT)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bound_is_attained(b1, b2, kind, sign):
    steps, lr = 200, 0.002
    grads = _adversarial(b2, np.float64, steps, sign)
    updates, _, _ = _run(kind, grads, lr, b1, b2, 0.0, "none")
    b, allowance = bound(b1, b2, np.float64, steps, nesterov=kind == "nadamax")
    ratio = np.abs(updates[:, 0]) / (lr * b)
    np.testing.assert_array_less(1 - allowance, ratio)
    np.testing.assert_array_less(ratio, 1 + allowance)
    np.testing.assert_array_equal(np.sign(updates), -sign * np.ones_like(updates))


@pytest.mark.parametrize("kind, limit", [("adamax", 0.1 / (1 - 0.9 / 0.999)), ("nadamax", None)])
def test_default_step_exceeds_learning_rate(kind, limit):
    # The paper's |Δθ| ≤ α fails for the defaults: the step tends to α · 1.00909.
    b1, b2, lr, steps = 0.9, 0.999, 0.002, 4000
    if limit is None:
        limit = b1 * 0.1 / (1 - b1 / b2) + (1 - b1)
    grads = _adversarial(b2, np.float64, steps)
    updates, _, _ = _run(kind, grads, lr, b1, b2, 0.0, "none")
    steady = np.abs(updates[-1, 0]) / lr
    assert steady > 1.008
    np.testing.assert_allclose(steady, limit, rtol=1e-12)
    b, _ = bound(b1, b2, np.float64, steps, nesterov=kind == "nadamax")
    np.testing.assert_allclose(b[-1], limit, rtol=1e-12)


def test_bound_in_float32_is_attained():
    b1, b2, lr, steps = 0.9, 0.999, 0.002, 300
    updates, _, _ = _run("adamax", _adversarial(b2, np.float32, steps), lr, b1, b2, 0.0, "none")
    b, allowance = bound(b1, b2, np.float32, steps)
    ratio = np.abs(updates[:, 0]) / (float(np.float32(lr)) * b)
    np.testing.assert_array_less(1 - allowance, ratio)
    np.testing.assert_array_less(ratio, 1 + allowance)


# Invariance under g -> c g (c > 0, ε = 0) and equivariance under g -> -g.


@pytest.mark.parametrize("kind, eps_mode", [("adamax", "none"), ("nadamax", "denominator")])
@SETTINGS
@given(grads=GRADS, b1=B1, b2=B2, c=st.floats(1e-3, 1e3))
def test_scale_invariance_float64(kind, eps_mode, grads, b1, b2, c):
    plain, _, _ = _run(kind, grads, 1.0, b1, b2, 0.0, eps_mode)
    scaled, _, _ = _run(kind, c * grads, 1.0, b1, b2, 0.0, eps_mode)
    # Both runs are within the rounding allowance of the same exact value.
    b, allowance = bound(b1, b2, np.float64, T, nesterov=kind == "nadamax")
    assert np.all(np.abs(scaled - plain) <= (2 * b * allowance)[:, None])


SCALE_CASES = [
    ("adamax", np.float32, "none", "modulus"),
    ("nadamax", np.float32, "denominator", "modulus"),
    ("scale_by_adamax", np.complex64, "denominator", "modulus"),
    ("scale_by_adamax", np.complex64, "none", "split"),
]


@pytest.mark.parametrize("kind, dtype, eps_mode, complex_mode", SCALE_CASES)
@SETTINGS
@given(grads=GRADS, imag=GRADS, b1=B1, b2=B2, k=st.integers(-20, 20))
def test_power_of_two_scaling_is_bit_exact(
    kind, dtype, eps_mode, complex_mode, grads, imag, b1, b2, k
):
    # Scaling by a power of two is exact in binary floating point, and so is
    # every operation of the step on the scaled values (no under- or overflow
    # for these magnitudes): the updates agree to the bit.
    g = grads.astype(dtype)
    if np.iscomplexobj(g):
        g = g + 1j * imag.astype(dtype)
    c = _real(dtype).type(2.0**k)
    plain, u, m = _run(kind, g, 0.01, b1, b2, 0.0, eps_mode, complex_mode)
    scaled, u_c, m_c = _run(kind, c * g, 0.01, b1, b2, 0.0, eps_mode, complex_mode)
    # XLA's CPU backend flushes values below the smallest normal number to 0,
    # so that a moment decaying that far reads 0 in one run and a normal value
    # in the other: the premise holds on the elements whose values, in both
    # runs, are 0 or far enough from that range that the scaling cannot take
    # them there (almost all of them; see the count below).
    margin = np.finfo(_real(dtype)).tiny * 2.0 ** (abs(k) + 1)
    values = (plain, scaled, u, u_c, m, m_c)
    split = (np.real, np.imag)
    parts = [f(x) for x in values for f in (split if np.iscomplexobj(x) else (np.abs,))]
    clear = np.logical_and.reduce([(x == 0) | (np.abs(x) >= margin) for x in parts])
    assert clear.sum() >= clear.size // 2, (clear.sum(), k)
    np.testing.assert_array_equal(scaled[clear], plain[clear])
    np.testing.assert_array_equal(u_c[clear], (c * u)[clear])
    np.testing.assert_array_equal(m_c[clear], (c * m)[clear])


SIGN_CASES = [
    ("adamax", np.float32, "denominator", "modulus"),
    ("adamax", np.float64, "inside_max", "modulus"),
    ("nadamax", np.float32, "none", "modulus"),
    ("scale_by_adamax", np.complex64, "denominator", "modulus"),
    ("scale_by_adamax", np.complex64, "inside_max", "split"),
]


@pytest.mark.parametrize("kind, dtype, eps_mode, complex_mode", SIGN_CASES)
@SETTINGS
@given(grads=GRADS, imag=GRADS, b1=B1, b2=B2, eps=POSITIVE_EPS)
def test_sign_equivariance_is_bit_exact(
    kind, dtype, eps_mode, complex_mode, grads, imag, b1, b2, eps
):
    g = grads.astype(dtype)
    if np.iscomplexobj(g):
        g = g + 1j * imag.astype(dtype)
    plain, u, m = _run(kind, g, 0.01, b1, b2, eps, eps_mode, complex_mode)
    flipped, u_f, m_f = _run(kind, -g, 0.01, b1, b2, eps, eps_mode, complex_mode)
    np.testing.assert_array_equal(flipped, -plain)
    np.testing.assert_array_equal(m_f, -m)
    np.testing.assert_array_equal(u_f, u)


def test_update_is_minus_learning_rate_times_direction():
    # The bound tests read Δθ from `adamax(learning_rate=α)`: it is -α d exactly.
    grads = _adversarial(0.999, np.float64, 5)
    with_lr, _, _ = _run("adamax", grads, 0.25, 0.9, 0.999, 0.0, "none")
    direction, _, _ = _run("scale_by_adamax", grads, 0.25, 0.9, 0.999, 0.0, "none")
    np.testing.assert_array_equal(with_lr, -0.25 * direction)
