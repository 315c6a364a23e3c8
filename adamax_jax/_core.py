"""The AdaMax equations for one array: the only place they are written down."""

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adamax_jax._precision import below_32_bits, store_moment

EpsMode = Literal["denominator", "inside_max", "none"]
ComplexMode = Literal["modulus", "split"]

EPS_MODES: tuple[str, ...] = ("denominator", "inside_max", "none")
COMPLEX_MODES: tuple[str, ...] = ("modulus", "split")


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """The dtype the arithmetic runs in: at least float32, whatever the storage."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


def real_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """The real counterpart of a (possibly complex) floating dtype."""
    return jnp.finfo(dtype).dtype


def nu_storage_dtype(
    param_dtype: jax.typing.DTypeLike,
    nu_dtype: jax.typing.DTypeLike | None,
    complex_mode: ComplexMode,
) -> jnp.dtype:
    """The dtype ν is stored in for a parameter of `param_dtype`.

    For complex parameters in "modulus" mode ν is a real array (the norm of a
    complex number is real); in "split" mode it is complex, its real and
    imaginary parts holding the two separate infinity norms.
    """
    base = jnp.dtype(param_dtype if nu_dtype is None else nu_dtype)
    if jnp.issubdtype(jnp.dtype(param_dtype), jnp.complexfloating):
        if complex_mode == "modulus":
            return real_dtype(base)
        if not jnp.issubdtype(base, jnp.complexfloating):
            return jnp.dtype(jnp.complex128 if base.itemsize > 4 else jnp.complex64)
    return base


def nu_is_scaled(nu_dtype: jax.typing.DTypeLike) -> bool:
    """Whether ν of this storage dtype is kept in the scaled representation.

    Below 32 bits a per-step decay of ``β₂ u`` is smaller than half a unit in
    the last place for the usual β₂ and would be rounded away on every store.
    """
    return below_32_bits(nu_dtype)


def _split_apply(fn, *xs):
    """Applies a real function to real and imaginary parts separately."""
    return lax.complex(fn(*(x.real for x in xs)), fn(*(x.imag for x in xs)))


def _bias_correction(b1: jax.Array, one_minus_b1: jax.Array, count: jax.Array) -> jax.Array:
    """``1 - β₁^t``: an integer power as optax computes it, finite for every t.

    Where β₁ rounds to 1 in this dtype (1 - 1e-8 in float32) the power gives
    0 and the step would be infinite; there ``1 - β₁``, formed before the
    rounding, gives it as ``-expm1(t log1p(-(1 - β₁)))``.
    """
    power = 1 - lax.pow(b1, count)
    small = -jnp.expm1(count.astype(b1.dtype) * jnp.log1p(-one_minus_b1))
    return jnp.where(b1 < 1, power, small)


def bias_corrections(
    b1: jax.typing.ArrayLike, count: jax.Array, dtype: jax.typing.DTypeLike, nesterov: bool
) -> tuple[jax.Array, jax.Array | None]:
    """``1 - β₁^t`` in the real `dtype`, and ``1 - β₁^(t+1)`` for Nesterov momentum.

    One pair serves every leaf of that dtype: computed once per step rather
    than once per leaf, it keeps tracing and compiling a large tree short.
    """
    b1_r = jnp.asarray(b1, dtype)
    one_minus_b1_r = jnp.asarray(1 - b1, dtype)
    bc = _bias_correction(b1_r, one_minus_b1_r, count)
    if not nesterov:
        return bc, None
    return bc, _bias_correction(b1_r, one_minus_b1_r, jnp.asarray(optax.safe_increment(count)))


def adamax_leaf(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    count: jax.Array,
    *,
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    eps_mode: EpsMode = "denominator",
    nesterov: bool = False,
    complex_mode: ComplexMode = "modulus",
    nu_gain: jax.typing.ArrayLike | None = None,
    nu_decay: jax.typing.ArrayLike | None = None,
    guard_zero: bool = False,
    corrections: tuple[jax.Array, jax.Array | None] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""One AdaMax step for one array.

    .. math::
        \begin{align*}
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| [+ \epsilon]) \\
        d_t &= \frac{m_t}{1 - \beta_1^t} \Big/ (u_t [+ \epsilon])
        \end{align*}

    ν is stored as ``v = u · gain``. In the direct representation ``gain`` is
    1 and ``decay`` is β₂. In the scaled one the caller passes the gain of this
    step and ``decay`` is the exact power of two that moves ``v`` from the last
    step's gain to this one's, so a stored ν only changes when a gradient
    exceeds it.

    Args:
        g: The gradient.
        m: The stored first moment.
        v: The stored infinity norm.
        count: The 1-based step ``t`` (an integer array).
        b1: β₁.
        b2: β₂.
        eps: ε.
        eps_mode: Where ε goes: "denominator", "inside_max" or "none".
        nesterov: Use the Nesterov-momentum estimate of NadaMax.
        complex_mode: "modulus" or "split", for complex gradients.
        nu_gain: The gain of the scaled representation, or None for direct.
        nu_decay: The factor applied to the stored ν; defaults to β₂.
        guard_zero: Give 0 where the denominator is 0 (possible only without
            ε, and only where every gradient so far was 0, so that m is 0 too).
        corrections: :func:`bias_corrections` for this leaf's real compute
            dtype, when the caller shares them between leaves.

    Returns:
        The direction (in the gradient's dtype) and the new ``m`` and ``v`` in
        their storage dtypes.
    """
    cdt = compute_dtype(g.dtype)
    rdt = real_dtype(cdt)
    split = complex_mode == "split" and jnp.issubdtype(cdt, jnp.complexfloating)
    b1_r = jnp.asarray(b1, rdt)
    b1_c = b1_r.astype(cdt)
    # 1 - β₁ is formed before the cast, so a Python β₁ gives the correctly
    # rounded 1 - β₁ (as optax computes it), not 1 - round(β₁).
    one_minus_b1 = jnp.asarray(1 - b1, rdt).astype(cdt)
    eps_r = jnp.asarray(eps, rdt)
    decay = jnp.asarray(b2 if nu_decay is None else nu_decay, rdt)
    gc = g.astype(cdt)

    # The same order of operations as optax's update_moment, so that the two
    # agree to the bit in float32.
    m_new = one_minus_b1 * gc + b1_c * m.astype(cdt)

    if split:
        mag = _split_apply(jnp.abs, gc)
    else:
        mag = jnp.abs(gc)
    if eps_mode == "inside_max":
        mag = mag + (lax.complex(eps_r, eps_r) if split else eps_r)
    vc = v.astype(mag.dtype)
    if nu_gain is not None:
        mag = mag * jnp.asarray(nu_gain, rdt).astype(mag.dtype)
    if split:
        v_new = _split_apply(jnp.maximum, mag, decay.astype(mag.dtype) * vc)
    else:
        v_new = jnp.maximum(mag, decay * vc)
    m_stored = store_moment(m_new, m)
    v_stored = v_new.astype(v.dtype)
    if below_32_bits(m.dtype) or below_32_bits(v.dtype):
        # A step from the unrounded moments makes XLA recompute them from the
        # old ones after the new ones have been stored over them, so that a
        # donated step first copies both old moments: two extra full-size
        # buffers and passes. The step is taken from the stored moments
        # instead, and |g| (+ ε) is applied again so that the rounding of ν
        # can never take the denominator below it.
        m_stored, v_stored = lax.optimization_barrier((m_stored, v_stored))
        m_new = m_stored.astype(cdt)
        v_back = v_stored.astype(mag.dtype)
        v_new = _split_apply(jnp.maximum, mag, v_back) if split else jnp.maximum(mag, v_back)
    u = v_new if nu_gain is None else v_new / jnp.asarray(nu_gain, rdt).astype(mag.dtype)

    if corrections is None:
        corrections = bias_corrections(b1, count, rdt, nesterov)
    bc, bc_next = corrections
    if nesterov:
        assert bc_next is not None, "Nesterov momentum needs the correction for t + 1."
        m_hat = b1_c * m_new / bc_next.astype(cdt) + one_minus_b1 * gc / bc.astype(cdt)
    else:
        m_hat = m_new / bc.astype(cdt)
    if eps_mode == "denominator":
        u = u + (lax.complex(eps_r, eps_r) if split else eps_r)

    def divide(a, b):
        q = a / b
        return jnp.where(b == 0, jnp.zeros_like(q), q) if guard_zero else q

    if split:
        direction = _split_apply(divide, m_hat, u)
    else:
        direction = divide(m_hat, u.astype(cdt))
    return direction.astype(g.dtype), m_stored, v_stored
