"""The AdaMax equations for one array: the only place they are written down."""

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adamax_jax import _codecs, _precision

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


def mu_storage_dtype(
    param_dtype: jax.typing.DTypeLike, mu_dtype: jax.typing.DTypeLike | None
) -> jnp.dtype:
    """The dtype μ is stored in for a parameter of `param_dtype`.

    A complex parameter's μ is complex (a real `mu_dtype` gives the complex
    dtype of its precision); a real parameter stores a complex `mu_dtype` in
    its real counterpart (complex64: float32), as ν of a complex parameter is
    stored in "modulus" mode.
    """
    dtype = jnp.dtype(param_dtype if mu_dtype is None else mu_dtype)
    complex_param = jnp.issubdtype(jnp.dtype(param_dtype), jnp.complexfloating)
    if complex_param and not jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if dtype.itemsize > 4 else jnp.complex64)
    if not complex_param and jnp.issubdtype(dtype, jnp.complexfloating):
        return real_dtype(dtype)
    return dtype


def nu_storage_dtype(
    param_dtype: jax.typing.DTypeLike,
    nu_dtype: jax.typing.DTypeLike | None,
    complex_mode: ComplexMode,
) -> jnp.dtype:
    """The dtype ν is stored in for a parameter of `param_dtype`.

    For complex parameters in "modulus" mode ν is a real array (the norm of a
    complex number is real); in "split" mode it is complex, its real and
    imaginary parts holding the two separate infinity norms. A real parameter
    stores a complex `nu_dtype` in its real counterpart (complex64: float32).
    """
    base = jnp.dtype(param_dtype if nu_dtype is None else nu_dtype)
    if not jnp.issubdtype(jnp.dtype(param_dtype), jnp.complexfloating):
        # A complex storage dtype on a real leaf of a mixed tree: its real counterpart.
        return real_dtype(base) if jnp.issubdtype(base, jnp.complexfloating) else base
    if jnp.issubdtype(jnp.dtype(param_dtype), jnp.complexfloating):
        if complex_mode == "modulus":
            return real_dtype(base)
        if not jnp.issubdtype(base, jnp.complexfloating):
            return jnp.dtype(jnp.complex128 if base.itemsize > 4 else jnp.complex64)
    return base


def _split_apply(fn, *xs):
    """Applies a real function to real and imaginary parts separately."""
    return lax.complex(fn(*(x.real for x in xs)), fn(*(x.imag for x in xs)))


def b1_terms(b1: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike) -> tuple[jax.Array, jax.Array]:
    """β₁ and ``1 - β₁`` in the real `dtype`, the second as exact as `b1` allows.

    A Python β₁ gives the correctly rounded ``1 - β₁`` (formed before the cast,
    as optax forms it), not ``1 - round(β₁)``: for ``β₁ = 1 - 1e-8`` the first
    is 1e-8 and the second 0 in float32. An array β₁ (as
    ``optax.inject_hyperparams`` passes it, in float32 by default) has already
    been rounded; where it rounded to 1, outside [0, 1), the nearest value
    below 1 is taken (``1 - β₁ = 2^-24`` in float32), so that the step stays
    the one of a β₁ that close to 1 instead of 0/0. Pass
    ``hyperparam_dtype=jnp.float64`` to ``inject_hyperparams`` (with
    ``jax_enable_x64``) to keep β₁ exact.
    """
    dtype = jnp.dtype(dtype)
    if isinstance(b1, (int, float)):
        return jnp.asarray(b1, dtype), jnp.asarray(1 - b1, dtype)
    b1_r = jnp.asarray(b1).astype(dtype)
    below_one = jnp.asarray(jnp.finfo(dtype).epsneg, dtype)
    one_minus = jnp.maximum(1 - b1_r, below_one)
    return jnp.minimum(b1_r, 1 - below_one), one_minus


def bias_corrections(
    b1: jax.typing.ArrayLike, count: jax.Array, dtype: jax.typing.DTypeLike, nesterov: bool
) -> tuple[jax.Array, jax.Array | None]:
    """``1 - β₁^t`` in the real `dtype`, and ``1 - β₁^(t+1)`` for Nesterov momentum.

    Computed as ``-expm1(t log β₁)`` from the same ``1 - β₁`` as the
    moment (:func:`b1_terms`), for every β₁: an integer power of a β₁ rounded
    to float32 gives ``1 - β₁^t`` off by ``(β₁ - round(β₁)) t / (1 - β₁^t)``
    relative, 1.3e-5 at step 1 for β₁ = 0.999 and growing as β₁ nears 1,
    while the moment uses the exact ``1 - β₁``, so that even a constant
    gradient's step would be off by that much. One pair serves every leaf of
    that dtype: computed once per step rather than once per leaf, it keeps
    tracing and compiling a large tree short.
    """
    _, one_minus_b1 = b1_terms(b1, dtype)
    # log β₁ is log1p(-(1 - β₁)) where 1 - β₁ < 1/4, and log(r) + log1p(e / r)
    # above, with r = 1 - (1 - β₁) rounded and e its exact rounding error:
    # XLA's float64 log1p is up to 120 ulp off on [-0.5, -0.3] (β₁ from 0.5
    # to 0.7), which broke the exact step bound, and its float32 log is a few
    # ulp off relative to log r for r near 1, where log1p is exact.
    r = 1 - one_minus_b1
    e = (1 - r) - one_minus_b1
    exact_log = jnp.log(r) + jnp.log1p(-e / jnp.where(r == 0, jnp.ones_like(r), r))
    log_b1 = jnp.where(one_minus_b1 < 0.25, jnp.log1p(-one_minus_b1), exact_log)

    def correction(t: jax.typing.ArrayLike) -> jax.Array:
        return -jnp.expm1(jnp.asarray(t).astype(log_b1.dtype) * log_b1)

    if not nesterov:
        return correction(count), None
    return correction(count), correction(optax.safe_increment(count))


def _safe_divide(a: jax.Array, b: jax.Array, guard_zero: bool) -> jax.Array:
    """``a / b``, and 0 where `b` is 0 if `guard_zero`, with finite derivatives there too."""
    if not guard_zero:
        return a / b
    zero = b == 0
    # The safe-where pattern: the division never sees the 0, so that neither
    # branch's derivative is NaN where the forward value is finite.
    q = a / jnp.where(zero, jnp.ones_like(b), b)
    return jnp.where(zero, jnp.zeros_like(q), q)


def adamax_leaf(
    g: jax.Array,
    m: Any,
    v: Any,
    count: jax.Array,
    *,
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    eps_mode: EpsMode = "denominator",
    nesterov: bool = False,
    complex_mode: ComplexMode = "modulus",
    guard_zero: bool = False,
    corrections: tuple[jax.Array, jax.Array | None] | None = None,
    stream: jax.typing.ArrayLike = 0,
) -> tuple[jax.Array, Any, Any]:
    r"""One AdaMax step for one array: the equations, between a read and a write of storage.

    The stored moments are read as values in the compute dtype (float32 at
    least), :func:`moments` and :func:`direction` run on those values, and
    :func:`adamax_jax._codecs.store` writes the new moments back with each
    storage's rounding rule and says which values the step is taken from.

    Args:
        g: The gradient.
        m: The stored first moment (a plain array or an
            :class:`~adamax_jax._codecs.EncodedMoment`).
        v: The stored infinity norm.
        count: The 1-based step ``t`` (an integer array).
        b1: β₁.
        b2: β₂.
        eps: ε.
        eps_mode: Where ε goes: "denominator", "inside_max" or "none".
        nesterov: Use the Nesterov-momentum estimate of NadaMax.
        complex_mode: "modulus" or "split", for complex gradients.
        guard_zero: Give 0 where the denominator is 0 (possible only without
            ε, and only where every gradient so far was 0, so that m is 0 too).
        corrections: :func:`bias_corrections` for this leaf's real compute
            dtype, when the caller shares them between leaves.
        stream: A number that differs from leaf to leaf of a tree, so that
            their rounding draws are independent (:func:`adamax_jax._precision.seed`).

    Returns:
        The direction in the compute dtype, and the new ``m`` and ``v`` in
        their storage layouts.
    """
    cdt = compute_dtype(g.dtype)
    rdt = real_dtype(cdt)
    split = complex_mode == "split" and jnp.issubdtype(cdt, jnp.complexfloating)
    gc = g.astype(cdt)
    b1_pair = b1_terms(b1, rdt)
    eps_r = jnp.asarray(eps, rdt)
    layout = _codecs.Layout.of(m, v)
    gc, m, v = layout.enter(gc, m, v)
    eps_inside = eps_r if eps_mode == "inside_max" else None
    m_new, v_new, floor = moments(
        gc,
        _codecs.decode(m, cdt),
        _codecs.decode(v, cdt if split else rdt),
        b1=b1_pair,
        b2=b2,
        eps=eps_inside,
        split=split,
    )
    m, v, m_new, v_new = _codecs.store(
        m,
        v,
        m_new,
        v_new,
        gc,
        floor,
        b1=b1_pair,
        b2=b2,
        eps=eps_inside,
        salt=_precision.seed(gc, count, stream),
    )
    if corrections is None:
        corrections = bias_corrections(b1, count, rdt, nesterov)
    d = direction(
        m_new,
        v_new,
        gc,
        b1=b1_pair,
        eps=eps_r if eps_mode == "denominator" else None,
        corrections=corrections,
        split=split,
        guard_zero=guard_zero,
    )
    return layout.leave(d, m, v)


def moments(
    g: jax.Array,
    m: jax.Array,
    u: jax.Array,
    *,
    b1: tuple[jax.Array, jax.Array],
    b2: jax.typing.ArrayLike,
    eps: jax.Array | None,
    split: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The new moments from the gradient and the previous ones, all in the compute dtype.

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u_t = \max(\beta_2 u_{t-1}, |g_t| [+ \epsilon])

    Args:
        g: The gradient.
        m: The previous first moment.
        u: The previous infinity norm: real, or complex in "split" mode.
        b1: β₁ and ``1 - β₁`` in the real compute dtype (:func:`b1_terms`).
        b2: β₂.
        eps: ε where it goes inside the max, else None.
        split: Complex "split" mode: real and imaginary parts have separate norms.

    Returns:
        ``m_t``, ``u_t``, and ``|g_t|`` (+ ε), the least value ``u_t`` may be stored as.
    """
    b1_r, one_minus_b1 = b1
    # The same order of operations as optax's update_moment, so that the two
    # agree to the bit in float32.
    m_new = one_minus_b1.astype(g.dtype) * g + b1_r.astype(g.dtype) * m
    rdt = real_dtype(g.dtype)
    if split:
        mag = _split_apply(jnp.abs, g)
    else:
        # The modulus of a complex number with both parts near the largest
        # finite value is past it; u holds that largest value instead.
        mag = jnp.abs(g)
        if jnp.iscomplexobj(g):
            mag = jnp.minimum(mag, jnp.asarray(jnp.finfo(rdt).max, rdt))
    if eps is not None:
        mag = mag + (lax.complex(eps, eps) if split else eps)
    decay = jnp.asarray(b2, rdt)
    if split:
        return m_new, _split_apply(jnp.maximum, mag, decay.astype(mag.dtype) * u), mag
    return m_new, jnp.maximum(mag, decay * u), mag


def direction(
    m: jax.Array,
    u: jax.Array,
    g: jax.Array,
    *,
    b1: tuple[jax.Array, jax.Array],
    eps: jax.Array | None,
    corrections: tuple[jax.Array, jax.Array | None],
    split: bool,
    guard_zero: bool,
) -> jax.Array:
    r"""The step's direction from the new moments, in the compute dtype.

    .. math::
        d_t = \frac{m_t}{1 - \beta_1^t} \Big/ (u_t [+ \epsilon])

    With Nesterov momentum (``corrections`` holds ``1 - β₁^(t+1)`` too), NadaMax's
    ``(β₁ m_t / (1 - β₁^(t+1)) + (1 - β₁) g_t / (1 - β₁^t)) / u_t``.

    Args:
        m: The new first moment.
        u: The new infinity norm.
        g: The gradient.
        b1: β₁ and ``1 - β₁`` in the real compute dtype (:func:`b1_terms`).
        eps: ε where it goes in the denominator, else None.
        corrections: ``1 - β₁^t`` and, for Nesterov momentum, ``1 - β₁^(t+1)``
            (:func:`bias_corrections`).
        split: Complex "split" mode: real and imaginary parts have separate norms.
        guard_zero: Give 0 where the denominator is 0.
    """
    cdt = m.dtype
    b1_c, one_minus_b1 = (x.astype(cdt) for x in b1)
    bc = corrections[0].astype(cdt)
    bc_next = None if corrections[1] is None else corrections[1].astype(cdt)
    if eps is not None:
        u = u + (lax.complex(eps, eps) if split else eps)

    def divide(a, b):
        if split:
            return _split_apply(lambda x, y: _safe_divide(x, y, guard_zero), a, b)
        return _safe_divide(a, b.astype(cdt), guard_zero)

    if bc_next is not None:
        # Each ratio is divided by u first: m/u and g/u are at most about 1,
        # where β₁ m / (1 - β₁^(t+1)) + (1 - β₁) g / (1 - β₁^t) can overflow
        # for gradients near the dtype's largest value.
        return b1_c / bc_next * divide(m, u) + one_minus_b1 / bc * divide(g, u)
    # m̂ = m / (1 - β₁^t) is a weighted mean of the gradients, so at most the
    # largest finite value; the roundings of m and of the correction can take
    # it one ulp past that, to infinity, where a gradient is that large. Only a
    # finite m is held there: an infinite one (a non-finite gradient) stays
    # infinite, so that m̂/u is NaN, as in optax, and not a silent 0.
    m_hat = m / bc
    big = jnp.asarray(jnp.finfo(cdt).max, real_dtype(cdt))

    def clip(x):
        return jnp.clip(x, -big, big)

    held = _split_apply(clip, m_hat) if jnp.iscomplexobj(m_hat) else clip(m_hat)
    return divide(jnp.where(jnp.isfinite(m), held, m_hat), u)
