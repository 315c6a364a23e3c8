"""AdaMax as optax transformations, the user-facing aliases and the functional step."""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax import _validation
from adamax_jax._core import (
    COMPLEX_MODES,
    EPS_MODES,
    ComplexMode,
    EpsMode,
    adamax_leaf,
    bias_corrections,
    compute_dtype,
    nu_is_scaled,
    nu_storage_dtype,
    real_dtype,
)
from adamax_jax._precision import advance_nu_scale, compensate_rounding
from adamax_jax._sharding import zeros_like
from adamax_jax._tree import map_unzip


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`.

    Attributes:
        count: The number of steps taken, an int32 scalar; it saturates.
        mu: The first moment ``m_t``, shaped like the parameters.
        nu: The infinity norm. It holds ``u_t`` itself, as in optax, wherever ν
            is stored in 32 bits or more; below that it holds ``u_t / nu_scale``
            (see :func:`scale_by_adamax`). :func:`infinity_norm` gives ``u_t``
            either way.
        nu_scale: The float32 scalar of the scaled representation, or ``None``
            when no leaf uses it.
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    nu_scale: jax.Array | None = None


def _check_hyperparameters(b1: Any, b2: Any, eps: Any, eps_mode: Any) -> tuple[Any, Any, Any]:
    """β₁, β₂ and ε read as Python floats (traced ones as 0-d arrays), range-checked."""
    _validation.check_choice("eps_mode", eps_mode, EPS_MODES)
    return (
        _validation.check_interval("b1", b1, 0.0, 1.0, high_open=True),
        _validation.check_interval("b2", b2, 0.0, 1.0),
        _validation.check_nonnegative_finite("eps", eps),
    )


def _guard_zero_denominator(eps: Any, eps_mode: str) -> bool:
    # Only when the denominator can be zero: then u = 0, every gradient so far
    # was 0, m = 0 too, and the step is 0 rather than 0/0. With ε in either
    # place the denominator is at least ε, unless ε is traced or so small that
    # it flushes to zero in float32 (after the gain of a scaled ν, >= 1/2).
    if eps_mode == "none" or not isinstance(eps, numbers.Real):
        return True
    return eps < 4 * float(jnp.finfo(jnp.float32).tiny)


def scale_by_adamax(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_mode: EpsMode = "denominator",
    nesterov: bool = False,
    complex_mode: ComplexMode = "modulus",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales updates by the AdaMax rule: ``m̂_t / (u_t + ε)``.

    See :func:`adamax` for the maths. The update has the sign of the gradient,
    as optax's ``scale_by_*`` transformations do.

    Arithmetic runs in float32 at least, whatever the storage dtypes; the
    returned updates have the gradient's dtype, and the state keeps its dtypes
    from step to step.

    Where ν is stored in fewer than 32 bits (``nu_dtype`` of bfloat16 or
    float16, or such parameters), the per-step decay ``β₂ u`` is below half a
    unit in the last place for the usual β₂ and would be rounded away on every
    store, so that ``u`` never decays. There ν is stored scaled: ``nu`` holds
    ``u_t / s_t`` with one float32 scalar ``s_t`` (``nu_scale``) for the whole
    tree. The decay goes into ``s_t`` alone; a stored value changes only when
    a gradient exceeds it (one rounding, not one per step), and when ``s_t``
    leaves [1, 2) a power of two — exact in binary floating point — moves it
    back and is applied to every stored ν. As ``s_t >= 1``, a stored value is
    at most ``u_t`` (up to the rounding of its store), so it overflows only
    where ``u_t`` itself would. Where every ν is stored in 32 bits or more
    (the default for float32 parameters) ``nu`` holds ``u_t`` itself, as in
    optax, and ``nu_scale`` is ``None``; :func:`infinity_norm` reads ``u_t``
    from either.

    A first moment stored in fewer than 32 bits is rounded to nearest, except
    where that would leave it unchanged although it moved: it then moves by
    one unit in the last place towards the new value. Rounding to nearest
    alone lets ``m_t`` stall short of a steady gradient, by up to
    ``ulp / (2 (1 - β₁))`` (2 to 4 % in bfloat16), and every later step with it.

    Args:
        b1: Decay of the first moment, in [0, 1).
        b2: Decay of the infinity norm, in [0, 1].
        eps: ε, finite and >= 0; where it goes depends on `eps_mode`.
        eps_mode: "denominator" (``m̂/(u + ε)``), "inside_max"
            (``u = max(β₂u, |g| + ε)``, ``m̂/u``) or "none" (the paper's rule).
        nesterov: Use Nesterov momentum (NadaMax), see :func:`nadamax`.
        complex_mode: For complex parameters: "modulus" tracks ``|g|``, the
            modulus, and stores ν in the real dtype; "split" tracks the real
            and imaginary parts as two independent real parameters.
        mu_dtype: Storage dtype of ``mu``; defaults to the parameter's dtype.
        nu_dtype: Storage dtype of ``nu``; defaults to the parameter's dtype.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.
    """
    b1, b2, eps = _check_hyperparameters(b1, b2, eps, eps_mode)
    _validation.check_bool("nesterov", nesterov)
    _validation.check_choice("complex_mode", complex_mode, COMPLEX_MODES)
    _validation.check_dtype("mu_dtype", mu_dtype)
    _validation.check_dtype("nu_dtype", nu_dtype)
    guard = _guard_zero_denominator(eps, eps_mode)

    def init_fn(params: optax.Params) -> ScaleByAdamaxState:
        _validation.check_trainable(params)
        _validation.check_storage_dtypes(params, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

        def mu_leaf(p):
            dtype = jnp.asarray(p).dtype if mu_dtype is None else jnp.dtype(mu_dtype)
            if jnp.iscomplexobj(p) and not jnp.issubdtype(dtype, jnp.complexfloating):
                dtype = jnp.dtype(jnp.complex128 if dtype.itemsize > 4 else jnp.complex64)
            return zeros_like(p, dtype)

        def nu_leaf(p):
            return zeros_like(p, nu_storage_dtype(jnp.asarray(p).dtype, nu_dtype, complex_mode))

        mu = jax.tree.map(mu_leaf, params)
        nu = jax.tree.map(nu_leaf, params)
        scaled = any(nu_is_scaled(v.dtype) for v in jax.tree.leaves(nu))
        return ScaleByAdamaxState(
            count=jnp.zeros([], jnp.int32),
            mu=mu,
            nu=nu,
            nu_scale=jnp.ones([], jnp.float32) if scaled else None,
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByAdamaxState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByAdamaxState]:
        del extra_args
        _validation.check_same_structure("updates", updates, "state.mu", state.mu)
        if params is not None:
            _validation.check_same_structure("params", params, "state.mu", state.mu)
        count = optax.safe_increment(state.count)
        nu_scale = state.nu_scale
        gain = shift = None
        if nu_scale is not None:
            nu_scale, gain, shift = advance_nu_scale(nu_scale, b2)

        corrections = {}

        def leaf(g, m, v):
            if g is None:
                return None, None, None
            scaled = gain is not None and nu_is_scaled(v.dtype)
            rdt = real_dtype(compute_dtype(g.dtype))
            if rdt not in corrections:
                corrections[rdt] = bias_corrections(b1, count, rdt, nesterov)
            return adamax_leaf(
                g,
                m,
                v,
                count,
                b1=b1,
                b2=b2,
                eps=eps,
                eps_mode=eps_mode,
                nesterov=nesterov,
                complex_mode=complex_mode,
                nu_gain=gain if scaled else None,
                nu_decay=shift if scaled else None,
                guard_zero=guard,
                corrections=corrections[rdt],
            )

        directions, mu, nu = map_unzip(leaf, 3, updates, state.mu, state.nu)
        return directions, ScaleByAdamaxState(count=count, mu=mu, nu=nu, nu_scale=nu_scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def infinity_norm(state: ScaleByAdamaxState) -> optax.Updates:
    """The infinity norm ``u_t`` of a :class:`ScaleByAdamaxState`, in float32 or wider.

    Undoes the scaled representation of low-precision ν, so that callers never
    need to know which leaves use it.

    Args:
        state: A state of :func:`scale_by_adamax`.

    Returns:
        A tree shaped like ``state.nu``.
    """

    def leaf(v):
        if v is None:
            return None
        if state.nu_scale is not None and nu_is_scaled(v.dtype):
            return v.astype(jnp.float32) * state.nu_scale
        return v

    return jax.tree.map(leaf, state.nu, is_leaf=lambda x: x is None)


def _chain(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any = None,
    mask: Any = None,
    compensated: bool = False,
) -> optax.GradientTransformationExtraArgs:
    learning_rate = _validation.check_learning_rate(learning_rate)
    _validation.check_bool("compensated", compensated)
    parts = [direction]
    if weight_decay is not None:
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if compensated:
        parts.append(compensate_rounding())
    return optax.chain(*parts)


def adamax(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_mode: EpsMode = "denominator",
    complex_mode: ComplexMode = "modulus",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    compensated: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The AdaMax optimizer (Kingma & Ba, 2014, Algorithm 2).

    AdaMax is Adam with the infinity norm in place of the second moment: ``u``
    tracks the largest recent gradient magnitude, decayed by β₂. Only the first
    moment is bias-corrected. With :math:`g_t` the gradient at step
    :math:`t \ge 1`, :math:`m_0 = u_0 = 0`, and `eps_mode` choosing where
    :math:`\epsilon` goes:

    .. math::
        \begin{align*}
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        \text{"denominator": } u_t &= \max(\beta_2 u_{t-1}, |g_t|), &
            \theta_t &= \theta_{t-1} - \frac{\alpha}{1 - \beta_1^t}
            \frac{m_t}{u_t + \epsilon} \\
        \text{"inside_max": } u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon), &
            \theta_t &= \theta_{t-1} - \frac{\alpha}{1 - \beta_1^t} \frac{m_t}{u_t} \\
        \text{"none": } u_t &= \max(\beta_2 u_{t-1}, |g_t|), &
            \theta_t &= \theta_{t-1} - \frac{\alpha}{1 - \beta_1^t} \frac{m_t}{u_t}
        \end{align*}

    "denominator" is the convention of Keras, TensorFlow, Flux and MXNet;
    "inside_max" that of PyTorch and ``optax.adamax``; "none" the paper's (a
    step is 0 where every gradient so far was 0).

    Args:
        learning_rate: α, a number or an ``optax`` schedule.
        b1: β₁, the decay of the first moment, in [0, 1).
        b2: β₂, the decay of the infinity norm, in [0, 1].
        eps: ε, finite and >= 0.
        eps_mode: "denominator", "inside_max" or "none", as above.
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment; defaults to the parameter's.
        nu_dtype: Storage dtype of the infinity norm; defaults to the
            parameter's. Below 32 bits it is stored scaled so that it still
            decays, see :func:`scale_by_adamax`.
        compensated: Add :func:`compensate_rounding` at the end, so that
            bfloat16 or float16 parameters keep updates smaller than their
            rounding step.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax
        >>> from adamax_jax import adamax
        >>> opt = adamax(learning_rate=0.002)
        >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.array([0.1, 0.2, 0.3])}
        >>> updates, state = jax.jit(opt.update)(grads, state, params)
        >>> print(optax.apply_updates(params, updates)["w"])
        [0.998 1.998 2.998]

    References:
        Kingma & Ba, `Adam: A Method for Stochastic Optimization
        <https://arxiv.org/abs/1412.6980>`_, 2014 (Section 7.1, Algorithm 2).
    """
    return _chain(
        scale_by_adamax(
            b1,
            b2,
            eps,
            eps_mode=eps_mode,
            complex_mode=complex_mode,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        learning_rate,
        compensated=compensated,
    )


def adamaxw(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    mask: Any = None,
    *,
    eps_mode: EpsMode = "denominator",
    complex_mode: ComplexMode = "modulus",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    compensated: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaMax with decoupled weight decay, scaled by the learning rate.

    .. math::
        \theta_t = \theta_{t-1} - \alpha_t \left(d_t + \lambda \theta_{t-1}\right)

    where :math:`d_t` is the AdaMax direction of :func:`adamax` (bias
    correction included) and :math:`\lambda` is `weight_decay`. This is the
    rule of ``optax.adamaxw`` and of Keras' ``Adamax(weight_decay=...)``.

    Args:
        learning_rate: α, a number or an ``optax`` schedule.
        b1: β₁, in [0, 1).
        b2: β₂, in [0, 1].
        eps: ε, finite and >= 0.
        weight_decay: λ, finite.
        mask: A pytree of booleans, or a callable returning one from the
            parameters, saying which leaves decay; as in
            ``optax.add_decayed_weights``.
        eps_mode: "denominator", "inside_max" or "none", see :func:`adamax`.
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment.
        nu_dtype: Storage dtype of the infinity norm.
        compensated: Add :func:`compensate_rounding` at the end.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> from adamax_jax import adamaxw
        >>> opt = adamaxw(learning_rate=0.1, weight_decay=0.5)
        >>> params = jnp.array([1.0, -1.0])
        >>> state = opt.init(params)
        >>> updates, state = opt.update(jnp.zeros(2), state, params)
        >>> print(optax.apply_updates(params, updates))
        [ 0.95 -0.95]

    References:
        Loshchilov & Hutter, `Decoupled Weight Decay Regularization
        <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    weight_decay = _validation.check_finite("weight_decay", weight_decay)
    return _chain(
        scale_by_adamax(
            b1,
            b2,
            eps,
            eps_mode=eps_mode,
            complex_mode=complex_mode,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        compensated=compensated,
    )


def nadamax(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_mode: EpsMode = "denominator",
    complex_mode: ComplexMode = "modulus",
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
    compensated: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""NadaMax: AdaMax with Nesterov momentum (Dozat, 2016).

    The first moment looks one step ahead; ``m_t`` and ``u_t`` are those of
    :func:`adamax`, and with a constant β₁:

    .. math::
        \begin{align*}
        \hat m_t &= \frac{\beta_1 m_t}{1 - \beta_1^{t+1}}
            + \frac{(1 - \beta_1) g_t}{1 - \beta_1^t} \\
        \theta_t &= \theta_{t-1} - \alpha \frac{\hat m_t}{u_t + \epsilon}
        \end{align*}

    (for "denominator"; `eps_mode` places ε as in :func:`adamax`).

    Args:
        learning_rate: α, a number or an ``optax`` schedule.
        b1: β₁, in [0, 1).
        b2: β₂, in [0, 1].
        eps: ε, finite and >= 0.
        eps_mode: "denominator", "inside_max" or "none".
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment.
        nu_dtype: Storage dtype of the infinity norm.
        compensated: Add :func:`compensate_rounding` at the end.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> from adamax_jax import nadamax
        >>> opt = nadamax(learning_rate=0.002)
        >>> params = jnp.array([1.0])
        >>> state = opt.init(params)
        >>> updates, state = opt.update(jnp.array([0.1]), state, params)
        >>> print(optax.apply_updates(params, updates))
        [0.9970526]

    References:
        Dozat, `Incorporating Nesterov Momentum into Adam
        <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR 2016
        workshop.
    """
    return _chain(
        scale_by_adamax(
            b1,
            b2,
            eps,
            eps_mode=eps_mode,
            nesterov=True,
            complex_mode=complex_mode,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        learning_rate,
        compensated=compensated,
    )


def _as_tree(name: str, x: Any) -> Any:
    """`x` with arrays for leaves; integer leaves promoted to the default float dtype.

    A list or tuple of numbers is one array, as NumPy reads it (a NamedTuple
    stays a pytree node). Integer leaves become floating point as JAX promotes
    an integer array with a Python float (float32, or float64 under
    ``jax_enable_x64``), so that no result is ever truncated to an integer.
    """

    def numeric(y: Any) -> bool:
        if isinstance(y, (list, tuple)) and not hasattr(y, "_fields"):
            return all(numeric(z) for z in y)
        return isinstance(y, numbers.Number) and not isinstance(y, bool)

    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields") and x and numeric(x):
        x = np.asarray(x, dtype=np.result_type(*np.ravel(x), np.float32))

    def leaf(path: Any, y: Any) -> Any:
        if y is None:
            return None
        dtype = None
        if not isinstance(y, (bool, np.bool_, str, bytes)):
            try:
                y = jnp.asarray(y)
                dtype = y.dtype
            except TypeError:  # not an array JAX can hold
                pass
        if dtype is None or not (
            jnp.issubdtype(dtype, jnp.inexact) or jnp.issubdtype(dtype, jnp.integer)
        ):
            raise TypeError(
                f"`{name}`{jax.tree_util.keystr(path)} must hold real or complex numbers, "
                f"got {y!r}."
            )
        if jnp.issubdtype(dtype, jnp.integer):
            with jax.numpy_dtype_promotion("standard"):
                y = y.astype(jnp.result_type(dtype, float))
        return y

    return jax.tree_util.tree_map_with_path(leaf, x, is_leaf=lambda y: y is None)


def adamax_step(
    param: Any,
    grad: Any,
    m: Any,
    u: Any,
    t: jax.typing.ArrayLike,
    learning_rate: jax.typing.ArrayLike = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_mode: EpsMode = "denominator",
) -> tuple[Any, Any, Any]:
    r"""One AdaMax step, as a function of the parameter and the two moments.

    .. math::
        \begin{align*}
        m_t &= \beta_1 m + (1 - \beta_1) g \\
        u_t &= \max(\beta_2 u, |g|) \\
        \theta_t &= \theta - \frac{\alpha}{1 - \beta_1^t} \frac{m_t}{u_t + \epsilon}
        \end{align*}

    with ε placed by `eps_mode` as in :func:`adamax`. The same equations as the
    optax transformations, for code that keeps its own state.

    Integer leaves of `param`, `grad`, `m` and `u` are promoted as JAX
    promotes an integer array with a Python float (to float32, or float64
    under ``jax_enable_x64``), so ``adamax_step(1, 0.1, 0, 0, 1)`` gives the
    float32 0.998, never a truncated integer. Every other leaf keeps its dtype.

    Args:
        param: θ: a number, a (nested) list of numbers, an array or a pytree.
        grad: g, shaped like `param`.
        m: The first moment, shaped like `param`.
        u: The infinity norm, shaped like `param`.
        t: The 1-based step number: an integer >= 1, of any integer type, or a
            float with an integral value; past ``2**31 - 1`` it is read as
            ``2**31 - 1``, where the step counter of the transformations
            saturates. A traced `t` cannot be checked: where it is not an
            integer >= 1 the returned parameter is NaN.
        learning_rate: α, a real number finite in float32.
        b1: β₁, in [0, 1).
        b2: β₂, in [0, 1].
        eps: ε, >= 0 and finite in float32.
        eps_mode: "denominator", "inside_max" or "none".

    Returns:
        ``(param, m, u)`` after the step, as arrays in pytrees shaped like
        `param`.

    Raises:
        ValueError: If a concrete hyperparameter or `t` breaks the rules above
            (naming it), or `grad`, `m` or `u` is not shaped like `param`.
        TypeError: If a leaf of `param`, `grad`, `m` or `u` is boolean or not
            a number (naming the argument and the key path).

    Examples:
        >>> from adamax_jax import adamax_step
        >>> param, m, u = adamax_step(1.0, 0.1, 0.0, 0.0, t=1)
        >>> print(f"{param:.4f} {m:.4f} {u:.4f}")
        0.9980 0.0100 0.1000
    """
    b1, b2, eps = _check_hyperparameters(b1, b2, eps, eps_mode)
    learning_rate = _validation.check_finite("learning_rate", learning_rate)
    count, valid = _validation.check_step(t)
    param, grad, m, u = (
        _as_tree(name, x) for name, x in (("param", param), ("grad", grad), ("m", m), ("u", u))
    )
    for name, tree in (("grad", grad), ("m", m), ("u", u)):
        _validation.check_same_structure(name, tree, "param", param)
    count = jnp.asarray(count, jnp.int32)
    guard = _guard_zero_denominator(eps, eps_mode)

    def leaf(p, g, m_, u_):
        if p is None:
            return None, None, None
        direction, m_new, u_new = adamax_leaf(
            g, m_, u_, count, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode, guard_zero=guard
        )
        lr = jnp.asarray(learning_rate, jnp.finfo(direction.dtype).dtype).astype(direction.dtype)
        new = p.astype(direction.dtype) - lr * direction
        if valid is not None:
            new = jnp.where(valid, new, jnp.full_like(new, jnp.nan))
        return new.astype(p.dtype), m_new, u_new

    return map_unzip(leaf, 3, param, grad, m, u)
