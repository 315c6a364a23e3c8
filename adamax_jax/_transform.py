"""AdaMax as optax transformations, the user-facing aliases and the functional step."""

import functools
import math
import numbers
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax import _codecs, _validation
from adamax_jax._codecs import Role
from adamax_jax._core import (
    COMPLEX_MODES,
    EPS_MODES,
    ComplexMode,
    EpsMode,
    adamax_leaf,
    bias_corrections,
    compute_dtype,
    mu_storage_dtype,
    nu_storage_dtype,
    real_dtype,
)
from adamax_jax._precision import below_32_bits, compensate_rounding
from adamax_jax._sharding import reshard_like
from adamax_jax._tree import is_leaf, map_unzip

# What each transformation of this package was built with, keyed by its update
# function, for code that continues a state written elsewhere and must refuse
# one written with other hyperparameters (convert_state).
HYPERPARAMETERS: "weakref.WeakKeyDictionary[Callable[..., Any], dict[str, Any]]" = (
    weakref.WeakKeyDictionary()
)


class ScaleByAdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`: arrays, and trees of arrays shaped like the parameters.

    Every field is an array or a tree of arrays (and ``None``), as in optax's
    ``ScaleByAdamState`` (whose first three fields these are), so that the
    state survives every container users keep optimizer state in:
    ``flax.nnx.Optimizer`` (which rebuilds each tree on write-back),
    ``flax.serialization``, orbax and any other library that stores arrays.
    Where every moment is stored in 32 bits or more (the default for float32
    parameters) the three last fields are ``None`` and the state holds
    exactly the arrays of ``optax.adamax``'s.

    What a moment means is read from what a checkpoint keeps: a moment with
    no scale (``None`` in its scale tree, or no scale tree) is the moment
    itself; with a float32 scalar scale ``s`` (ν in bfloat16 or float16) it
    is ``codes · s``, the decay carried by ``s``; with float32 block scales
    of shape ``codes.shape[:-1] + (ceil(codes.shape[-1] / B),)`` (8-bit
    storage) it is each block's code values times its scale, with ``B`` the
    length of ``block_size``. ``update`` refuses a moment whose layout
    contradicts its dtype (such as a plain bfloat16 ν after a cast) or a
    block size other than the optimizer's, naming its path.
    :func:`first_moment` and :func:`infinity_norm` read the moments' values.

    Attributes:
        count: The number of steps taken, an int32 scalar; it saturates.
        mu: The first moment ``m_t`` (or its codes), shaped like the parameters.
        nu: The infinity norm ``u_t`` (or its codes), shaped like the parameters.
        mu_scale: None, or a tree shaped like the parameters holding each
            μ's float32 scale (None where μ has none).
        nu_scale: The same for ν.
        block_size: None where no moment is stored block-wise; else a uint8
            array of zeros of shape ``(B,)``, whose length is the block size
            ``B``: held in a shape, it is known when a step is traced and is
            kept in every checkpoint's metadata.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride] (a field, as in optax)
    mu: Any
    nu: Any
    mu_scale: Any = None
    nu_scale: Any = None
    block_size: Any = None


def _check_hyperparameters(b1: Any, b2: Any, eps: Any, eps_mode: Any) -> tuple[Any, Any, Any]:
    """β₁, β₂ and ε read as Python floats (traced ones as 0-d arrays), range-checked."""
    _validation.check_choice("eps_mode", eps_mode, EPS_MODES)
    for name, value in (("b1", b1), ("b2", b2), ("eps", eps)):
        _validation.check_wide_enough(name, value)
    return (
        _validation.check_interval("b1", b1, 0.0, 1.0, high_open=True),
        _validation.check_interval("b2", b2, 0.0, 1.0),
        _validation.check_nonnegative_finite("eps", eps),
    )


def _guard_zero_denominator(eps: Any, eps_mode: str) -> bool:
    # Only when the denominator can be zero: then u = 0, and either every
    # gradient so far was 0 (m = 0 too: the step is 0 rather than 0/0), or β₂ <
    # β₁ let u underflow to 0 before m, where the exact step m/u is unbounded
    # and 0 is given rather than ±inf. With ε in either
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
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescales updates by the AdaMax rule: ``m̂_t / (u_t + ε)``.

    See :func:`adamax` for the maths. The update has the sign of the gradient,
    as optax's ``scale_by_*`` transformations do.

    Arithmetic runs in float32 at least, whatever the storage dtypes; the
    returned updates have the gradient's dtype (integer gradients are first
    converted to the parameter's dtype, or float32), and the state keeps its
    layout and dtypes from step to step.

    Where ν is stored in fewer than 32 bits (``nu_dtype`` of bfloat16 or
    float16, or such parameters), the per-step decay ``β₂ u`` is below half a
    unit in the last place for the usual β₂ and would be rounded away on every
    store, so that ``u`` never decays. There each ν is an
    :class:`EncodedMoment`: codes and a float32 scale ``s_t >= 1`` with
    ``u_t = codes · s_t``. The decay goes into ``s_t`` alone; a stored code
    changes only when a gradient exceeds it (one rounding, not one per step),
    and when ``s_t`` would fall below 1 a power of two — exact in binary
    floating point — moves it back up and is applied to the codes. A code is
    rounded so that it never reads back below the gradient it holds. A
    16-bit moment past its dtype's range (float16 ends at 65504) is held at
    the largest finite value, element by element. Where ν is stored in 32
    bits or more (the default for float32 parameters) it is a plain array
    holding ``u_t``, as in optax; :func:`infinity_norm` reads ``u_t`` from
    either.

    A first moment stored in fewer than 32 bits is rounded stochastically,
    with a deterministic draw (see ``store_moment`` in the precision module):
    rounding to nearest lets ``m_t`` stall short of a steady gradient, by up
    to ``ulp / (2 (1 - β₁))`` (2 to 4 % in bfloat16), and every later step
    with it. What remains is zero-mean noise of about
    ``ulp / sqrt(6 (1 - β₁²))`` of m. Rounding has no derivative; ``jax.grad``
    through an update passes the derivative of the unrounded moments (the
    straight-through rule).

    8-bit storage (``jnp.int8`` for either moment, ``jnp.uint8`` for ν only,
    ``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``) is block-wise, as in
    bitsandbytes' 8-bit optimizers (Dettmers et al., 2022): the last axis is
    cut into blocks of `block_size` values and each block has one float32
    scale, so that the state is sharded like its parameter. float8 codes are
    float8's own values; int8 and uint8 codes space L codes evenly in every
    doubling, as a float's mantissa does (int8: L = 5, codes 11 % to 20 %
    apart, spanning ``2^25.2`` below the block's largest value; uint8, for ν:
    L = 14, 3.7 % to 7.1 % apart, spanning ``2^18.2``), so that values far
    below the largest in their block keep a relative precision that a linear
    map loses. Scales move by powers of two, which these maps represent
    exactly. ν's scale decays by β₂
    each step: a code carried over reads back exactly decayed, and changes only
    when a gradient exceeds it; the scale grows by a power of two when one
    does not fit. ν rounds up, so that it never reads back below ``|g|`` (+ ε
    inside the max) nor below the decayed value it holds: with a float32 μ the
    step bound ``α (1 - β₁) / (1 - β₁/β₂)`` holds as with 32-bit state, and an
    8-bit μ exceeds it by its rounding (up to 2-3× for one step where a block's
    values span orders of magnitude; right on average). μ takes the least
    power-of-two scale that holds a bound on its block's values,
    ``(1 - β₁) max|g| + β₁ max|m|``, and rounds stochastically (unbiased, a
    deterministic draw). A value below the map's range rounds to nearest, 0
    or the smallest code (μ), or up to the smallest code (ν). Leaves
    of fewer than 4096 values keep 8-bit moments as plain float32 arrays
    (bitsandbytes' threshold). 8-bit storage for complex or float64 parameters
    is refused at ``init``. See
    ``docs/low_precision_8bit.md`` for the measurements.

    Args:
        b1: Decay of the first moment, in [0, 1).
        b2: Decay of the infinity norm, in [0, 1].
        eps: ε, >= 0 and finite in float32; where it goes depends on `eps_mode`.
        eps_mode: "denominator" (``m̂/(u + ε)``), "inside_max"
            (``u = max(β₂u, |g| + ε)``, ``m̂/u``) or "none" (the paper's rule).
        nesterov: Use Nesterov momentum (NadaMax), see :func:`nadamax`.
        complex_mode: For complex parameters: "modulus" tracks ``|g|``, the
            modulus, and stores ν in the real dtype; "split" tracks the real
            and imaginary parts as two independent real parameters.
        mu_dtype: Storage dtype of ``mu``; defaults to the parameter's dtype.
            Floating, or 8-bit: ``jnp.int8``, ``jnp.float8_e4m3fn``,
            ``jnp.float8_e5m2``.
        nu_dtype: Storage dtype of ``nu``; defaults to the parameter's dtype.
            Floating, or 8-bit: those of `mu_dtype` and ``jnp.uint8``.
        block_size: Values per block of 8-bit storage, 1 to 4096, along the last axis
            (None: 256). Under ``optax.inject_hyperparams`` pass it in
            ``static_args``.

    Returns:
        An ``optax.GradientTransformationExtraArgs``. Its ``init`` takes
        arrays or ``jax.ShapeDtypeStruct`` leaves.

    Raises:
        ValueError: For a hyperparameter out of range, uint8 μ, a
            `block_size` that is not a positive integer or is given where no
            moment is stored in 8 bits, 8-bit storage for
            complex parameters (in ``init``), or (in ``update``) a state whose
            structure, shapes or layout does not fit.
        TypeError: For a parameter or gradient leaf that is not a number.
    """
    return _scale_by_adamax(
        b1,
        b2,
        eps,
        eps_mode=eps_mode,
        nesterov=nesterov,
        complex_mode=complex_mode,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
        float32_updates=False,
    )


def _is_none(x: Any) -> bool:
    return x is None


def _as_leaf(x: Any) -> Any:
    """A Python or NumPy number as an array; arrays and abstract leaves as they are."""
    if x is None or isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "dtype"):
        return x
    return jnp.asarray(x)


def _float_gradient(g: Any, like: Any, path: str) -> jax.Array:
    """An integer gradient in the dtype of `like` (the parameter), as optax promotes it."""
    g = _as_leaf(g)
    dtype = jnp.dtype(g.dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return g
    if jnp.issubdtype(dtype, jnp.integer):
        target = jnp.dtype(like.dtype) if like is not None else jnp.dtype(jnp.float32)
        if not jnp.issubdtype(target, jnp.inexact):
            target = jnp.dtype(jnp.float32)
        return g.astype(target)
    raise TypeError(
        f"`updates`{path} has dtype {dtype}; AdaMax takes floating-point (or integer) gradients."
    )


def _check_complex_gradient(g: Any, g_name: str, m: Any, m_name: str) -> None:
    """Refuses a complex gradient `g` whose first moment `m` is real (a real parameter's).

    μ would keep the gradient's real part and ν its modulus, and the step would
    be neither that of the real part nor a complex one (``optax.adamax`` returns
    a complex update there).

    Raises:
        TypeError: If `g` is complex and `m` is real, naming both.
    """
    if jnp.iscomplexobj(g) and not jnp.iscomplexobj(_codecs.stored_values(m)):
        raise TypeError(
            f"{g_name} is {jnp.dtype(g.dtype)}, but the moments of its parameter are real "
            f"({m_name} is {_codecs.storage_dtype(m)}): a complex gradient needs a complex "
            "parameter."
        )


def _like(p: Any, g: jax.Array) -> jnp.dtype:
    """The parameter's dtype, or (without parameters) the gradient's."""
    return jnp.dtype((g if p is None else p).dtype)


def _check_not_narrowed(x: Any, role: Role, where: str, expected: jnp.dtype) -> None:
    """Refuses a plain or scaled moment in a narrower dtype than the optimizer stores it in.

    A cast to a wider float keeps every value (the state goes on, in the
    dtypes it was given); a narrower one loses them: a bfloat16 moment of
    1e5 cast to float16 reads inf, and a finite gradient then steps NaN.
    8-bit codes are checked by :func:`adamax_jax._codecs.check_moment`; where
    the optimizer stores 8 bits, a leaf too small for blocks holds float32.

    Raises:
        ValueError: If the moment's dtype does not hold every value of `expected`.
    """
    if _codecs.first_blockwise(x) is not None:
        return
    if expected in _codecs.EIGHT_BIT:
        expected = jnp.dtype(jnp.float32)
    actual = _codecs.storage_dtype(x)
    # NumPy's safe casts (ml_dtypes registers its own): bfloat16 to float32, not to float16.
    if not np.can_cast(expected, actual, casting="safe"):
        raise ValueError(
            f"`state.{role}{where}` is {actual}, but this optimizer stores it in {expected}: "
            f"a cast narrowed it, and values past {actual}'s range or precision are lost. "
            "Cast the state back, or convert it with "
            "`adamax_jax.convert_state(state, opt, params)`."
        )


def _scale_by_adamax(
    b1: Any,
    b2: Any,
    eps: Any,
    *,
    eps_mode: EpsMode,
    nesterov: bool,
    complex_mode: ComplexMode,
    mu_dtype: Any,
    nu_dtype: Any,
    block_size: Any,
    float32_updates: bool,
) -> optax.GradientTransformationExtraArgs:
    """:func:`scale_by_adamax`; with `float32_updates`, updates stay in the compute dtype.

    The aliases use the latter, so that the learning rate and weight decay act
    on the float32 direction and a low-precision update is rounded once.
    """
    b1, b2, eps = _check_hyperparameters(b1, b2, eps, eps_mode)
    _validation.check_bool("nesterov", nesterov)
    _validation.check_choice("complex_mode", complex_mode, COMPLEX_MODES)
    _validation.check_moment_dtype("mu_dtype", mu_dtype)
    _validation.check_moment_dtype("nu_dtype", nu_dtype)
    _validation.check_eight_bit("mu_dtype", mu_dtype, "nu_dtype", nu_dtype, block_size)
    # None, not 256, as the default: optax.inject_hyperparams would make a
    # number a traced hyperparameter, and the block size shapes the state.
    block_size = _codecs.DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    guard = _guard_zero_denominator(eps, eps_mode)
    # The rule the step follows, and what convert_state compares a foreign state with.
    rule = dict(
        b1=b1, b2=b2, eps=eps, eps_mode=eps_mode, nesterov=nesterov, complex_mode=complex_mode
    )

    def init_fn(params: optax.Params) -> ScaleByAdamaxState:
        params = jax.tree.map(_as_leaf, params, is_leaf=_is_none)
        _validation.check_trainable(params)
        _validation.check_storage_dtypes(params, mu_dtype=mu_dtype, nu_dtype=nu_dtype)

        def mu_leaf(p):
            return _codecs.init_moment(p, mu_storage_dtype(p.dtype, mu_dtype), "mu", block_size)

        def nu_leaf(p):
            dtype = nu_storage_dtype(p.dtype, nu_dtype, complex_mode)
            return _codecs.init_moment(p, dtype, "nu", block_size)

        _validation.check_eight_bit_params(params, mu_dtype, nu_dtype)
        _validation.check_block_shards(
            params,
            mu_dtype,
            nu_dtype,
            block_size,
            _codecs.is_blockwise,
            _codecs.MIN_BLOCK_VALUES,
        )

        return _pack(
            jnp.zeros([], jnp.int32), jax.tree.map(mu_leaf, params), jax.tree.map(nu_leaf, params)
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByAdamaxState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByAdamaxState]:
        del extra_args
        _check_is_state(state)
        updates = jax.tree.map(_as_leaf, updates, is_leaf=_is_none)
        try:
            _validation.check_same_structure("updates", updates, "state.mu", state.mu)
        except ValueError:
            _check_not_old_layout(state, updates)
            raise
        _validation.check_same_structure("state.nu", state.nu, "state.mu", state.mu)
        if params is not None:
            params = jax.tree.map(_as_leaf, params, is_leaf=_is_none)
            _validation.check_same_structure("params", params, "state.mu", state.mu)
        # A state cast to floating point (optax.tree.cast) keeps its count as a
        # whole number, exactly where the float has 32 bits or more; the step is
        # that number. A narrower float cannot count past 256 (bfloat16).
        count_in = jnp.asarray(state.count)
        count_dtype = jnp.dtype(count_in.dtype)
        if not (
            jnp.issubdtype(count_dtype, jnp.integer)
            or (jnp.issubdtype(count_dtype, jnp.floating) and count_dtype.itemsize >= 4)
        ):
            raise ValueError(
                f"`state.count` is {count_dtype}, which cannot count the steps exactly: a cast "
                "changed it. Cast it back to int32, or convert the state with "
                "`adamax_jax.convert_state(state, opt, params)`."
            )
        if not _validation.is_traced(count_in) and bool(np.any(np.asarray(count_in) < 0)):
            # 1 - β₁ᵗ < 0 for t < 0: every step would change sign and exceed the bound.
            raise ValueError(
                f"`state.count` is {np.asarray(count_in)}: a step count is never negative "
                "(a corrupted state?). Restore the state, or convert one with "
                "`adamax_jax.convert_state(state, opt, params)`."
            )
        count = jnp.asarray(optax.safe_increment(count_in))
        t = count if jnp.issubdtype(count.dtype, jnp.integer) else _float_count(count)

        corrections: dict[jnp.dtype, Any] = {}
        # Under a trace, one traced step for every leaf of the same shapes and dtypes:
        # a tree of many leaves is traced and lowered once per kind of leaf, not once
        # per leaf (XLA inlines the calls, so that the program is the same). Eagerly,
        # each operation runs as it comes, as optax's do, so that the two agree there
        # to the bit.
        step = functools.partial(adamax_leaf, **rule, guard_zero=guard)
        if any(_validation.is_traced(x) for x in jax.tree.leaves((updates, state))):
            step = jax.jit(step)
        paths, treedef, mus, nus = _unpack(state, block_size)
        grads = treedef.flatten_up_to(updates)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)

        def leaf(i, path, m, g, v, p):
            if g is None:
                return None, None, None
            where = jax.tree_util.keystr(path)
            g = _float_gradient(g, p, where)
            _check_complex_gradient(g, f"`updates`{where}", m, f"`state.mu{where}`")
            if p is not None or mu_dtype is not None:
                _check_not_narrowed(m, "mu", where, mu_storage_dtype(_like(p, g), mu_dtype))
            if p is not None or nu_dtype is not None:
                _check_not_narrowed(
                    v, "nu", where, nu_storage_dtype(_like(p, g), nu_dtype, complex_mode)
                )
            rdt = real_dtype(compute_dtype(g.dtype))
            if rdt not in corrections:
                corrections[rdt] = bias_corrections(b1, t, rdt, nesterov)
            # On Explicit axes the state's layout rules (ZeRO-1 splits it further).
            direction, m_new, v_new = step(
                reshard_like(g, _codecs.stored_values(m)),
                m,
                v,
                t,
                corrections=corrections[rdt],
                # Each leaf draws its own roundings.
                stream=jnp.asarray(i, jnp.uint32),
            )
            if float32_updates:
                # The aliases keep the update in the state's layout through the weight
                # decay, the learning rate and compensate_rounding, and hand it back
                # in the parameters' layout once, at the end: one gather, not two.
                return direction, m_new, v_new
            return reshard_like(direction.astype(g.dtype), g), m_new, v_new

        results = [
            leaf(i, path, m, g, v, p)
            for i, (path, m, g, v, p) in enumerate(zip(paths, mus, grads, nus, ps, strict=True))
        ]
        directions, mu, nu = (treedef.unflatten([r[i] for r in results]) for i in range(3))
        return directions, _pack(count, mu, nu, state.block_size)

    HYPERPARAMETERS[update_fn] = dict(
        rule, mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=block_size
    )
    # optax types a state as an array tree (`chex.ArrayTree`), which has no room for a
    # NamedTuple state with `None` fields, nor for an update that names its state type.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def _codecs_leaf(x: Any) -> bool:
    return is_leaf(x)


def _pack(count: Any, mu: Any, nu: Any, marker: Any = None) -> ScaleByAdamaxState:
    """The state that keeps stored moments `mu` and `nu` (plain or encoded, per leaf).

    `marker` is the state's ``block_size`` array to keep; None makes one where
    a moment is block-wise.
    """
    sizes: set[int] = set()

    def split(tree: Any) -> tuple[Any, Any]:
        leaves, treedef = jax.tree.flatten(tree, is_leaf=_codecs_leaf)
        pairs = [(None, None) if x is None else _codecs.split_moment(x) for x in leaves]
        sizes.update(x.block_size for x in leaves if getattr(x, "block_size", None) is not None)
        scales = [scale for _, scale in pairs]
        scale_tree = None if all(x is None for x in scales) else treedef.unflatten(scales)
        return treedef.unflatten([values for values, _ in pairs]), scale_tree

    mu, mu_scale = split(mu)
    nu, nu_scale = split(nu)
    if marker is None and sizes:
        (size,) = sizes
        marker = jnp.zeros((size,), jnp.uint8)
    return ScaleByAdamaxState(
        count=count, mu=mu, nu=nu, mu_scale=mu_scale, nu_scale=nu_scale, block_size=marker
    )


def _check_is_state(state: Any) -> None:
    """Refuses what is not a :class:`ScaleByAdamaxState`, such as a checkpoint read bare."""
    if isinstance(state, ScaleByAdamaxState):
        return
    kind = type(state).__name__
    keys = f" with keys {sorted(state)}" if isinstance(state, dict) else ""
    raise ValueError(
        f"`state` is a {kind}{keys}, not the ScaleByAdamaxState this transformation keeps. A "
        "checkpoint restored without a target gives its arrays back in plain dicts and "
        "lists, which no longer say what they hold. Restore into the target "
        "`adamax_jax.abstract_state(opt, params)` (orbax: `checkpointer.restore(path, "
        "abstract_state(opt, params))`; flax: `from_bytes(opt.init(params), data)`)."
    )


def _check_not_old_layout(state: ScaleByAdamaxState, updates: Any) -> None:
    """Refuses moments kept as ``{'codes', 'scale'}`` nodes, the layout of earlier releases.

    Called where `updates` and ``state.mu`` differ in structure: a moment of the
    earlier layout is a node with those two keys where `updates` has a leaf.
    """
    leaves = {
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none)[0]
    }
    for role in ("mu", "nu"):
        for path, _ in jax.tree_util.tree_flatten_with_path(getattr(state, role))[0]:
            keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            if (
                keys
                and keys[-1] in ("codes", "scale")
                and jax.tree_util.keystr(path[:-1]) in leaves
            ):
                where = jax.tree_util.keystr(path[:-1])
                raise ValueError(
                    f"`state.{role}{where}` holds {keys[-1]!r}: moments kept as codes and "
                    "scale inside `mu` and `nu` are the layout of earlier releases. Rebuild the "
                    "state: read the values (codes times scale) into an "
                    "`optax.ScaleByAdamState(count, mu, nu)` and pass it to "
                    "`adamax_jax.convert_state(state, opt, params)`; restore checkpoints "
                    "into `adamax_jax.abstract_state(opt, params)`."
                )


def _recorded_block_size(marker: Any) -> int | None:
    """The block size a state's ``block_size`` array records (its length), or None."""
    if marker is None:
        return None
    shape = getattr(marker, "shape", None)
    if shape is None or len(shape) != 1 or shape[0] < 1:
        raise ValueError(
            "`state.block_size` must be None or a 1-D array whose length is the block size, "
            f"got {type(marker).__name__} of shape {shape}. Build the state with `opt.init`."
        )
    return int(shape[0])


def _unpack(state: ScaleByAdamaxState, block_size: int | None) -> tuple[list, Any, list, list]:
    """The stored moments of `state`, leaf by leaf: paths, treedef, μs and νs.

    Each moment is read the way it was written (see :class:`ScaleByAdamaxState`)
    and checked; `block_size` is the reading optimizer's (None: any).
    """
    recorded = _recorded_block_size(state.block_size)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state.mu, is_leaf=_codecs_leaf)
    paths = [path for path, _ in flat]

    def leaves(tree: Any, name: str) -> list[Any]:
        if tree is None:
            return [None] * len(flat)
        try:
            return treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"`state.{name}` does not have the structure of `state.mu`: {e}"
            ) from e

    def read(role: Role, values: list[Any], scales: list[Any]) -> list[Any]:
        out = []
        for path, x, scale in zip(paths, values, scales, strict=True):
            where = f"state.{role}{jax.tree_util.keystr(path)}"
            if x is None:
                if scale is not None:
                    raise ValueError(f"`{where}` is None but has a scale.")
                out.append(None)
                continue
            x = _codecs.join_moment(x, scale, where, role, recorded, block_size)
            _codecs.check_moment(x, where, role)
            out.append(x)
        return out

    mus = read("mu", [x for _, x in flat], leaves(state.mu_scale, "mu_scale"))
    nus = read("nu", leaves(state.nu, "nu"), leaves(state.nu_scale, "nu_scale"))
    return paths, treedef, mus, nus


def _float_count(count: jax.Array) -> jax.Array:
    top = float(np.iinfo(np.int32).max)
    return jnp.clip(count, 0, top).astype(jnp.int32)


def _find_adamax_states(state: Any) -> list[tuple[str, ScaleByAdamaxState]]:
    found = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, ScaleByAdamaxState)
    )[0]
    return [
        (jax.tree_util.keystr(path), s) for path, s in found if isinstance(s, ScaleByAdamaxState)
    ]


def adamax_state(state: Any) -> ScaleByAdamaxState:
    """The one :class:`ScaleByAdamaxState` inside an optimizer state.

    Args:
        state: A state of any transformation of this package, or of a chain
            (or other combinator) holding exactly one.

    Returns:
        That ``ScaleByAdamaxState``.

    Raises:
        ValueError: If `state` holds none, or more than one (their paths are
            named; pass the one you mean).
    """
    found = _find_adamax_states(state)
    if len(found) == 1:
        return found[0][1]
    if not found:
        raise ValueError(
            f"`state` holds no ScaleByAdamaxState (got {type(state).__name__}); pass the "
            "state of an AdaMax transformation or of a chain that contains one."
        )
    raise ValueError(
        "`state` holds several ScaleByAdamaxState, at "
        + ", ".join(p or "<root>" for p, _ in found)
        + "; pass the one you mean."
    )


def infinity_norm(state: Any) -> optax.Updates:
    """The infinity norm ``u_t``, in float32 or wider, from an AdaMax state.

    Reads each ν the way it was written (a plain array, or an
    :class:`EncodedMoment` decoded with its scale), so that callers never need
    to know the storage layout.

    Args:
        state: A :class:`ScaleByAdamaxState`, or any optimizer state holding
            exactly one (the state of ``adamax(...)``, a chain, ...).

    Returns:
        A tree shaped like the parameters: ``u_t`` per leaf, float32 for
        parameters below 32 bits, else the parameter's real dtype.

    Raises:
        ValueError: If `state` holds no AdaMax state, or several.
    """
    return _read_moments(adamax_state(state))[1]


def first_moment(state: Any) -> optax.Updates:
    """The first moment ``m_t`` (unbiased, not bias-corrected), from an AdaMax state.

    Reads each μ the way it was written (a plain array, or codes with their
    scales), so that callers never need to know the storage layout.

    Args:
        state: A :class:`ScaleByAdamaxState`, or any optimizer state holding
            exactly one.

    Returns:
        A tree shaped like the parameters: ``m_t`` per leaf, float32 for
        parameters below 32 bits, else the parameter's dtype.

    Raises:
        ValueError: If `state` holds no AdaMax state, or several.
    """
    return _read_moments(adamax_state(state))[0]


def _read_moments(state: ScaleByAdamaxState) -> tuple[Any, Any]:
    """The values of μ and ν of `state`, trees shaped like the parameters, in the compute dtype."""
    _check_is_state(state)
    _, treedef, mus, nus = _unpack(state, None)

    def value(x: Any) -> Any:
        if x is None:
            return None
        return _codecs.decode(x, compute_dtype(_codecs.storage_dtype(x)))

    return tuple(treedef.unflatten([value(x) for x in xs]) for xs in (mus, nus))  # type: ignore[return-value]


def _adam_like_states(state: Any) -> list[tuple[str, Any]]:
    """States holding ``count``, ``mu`` and ``nu``: ours, and optax's ScaleByAdamState."""

    def adam_like(x: Any) -> bool:
        return isinstance(x, (ScaleByAdamaxState, optax.ScaleByAdamState))

    found = jax.tree_util.tree_flatten_with_path(state, is_leaf=adam_like)[0]
    return [(jax.tree_util.keystr(path), s) for path, s in found if adam_like(s)]


def convert_state(
    state: Any, opt: optax.GradientTransformation, params: optax.Params
) -> optax.OptState:
    """An AdaMax state, read the way it was written, in the layout `opt` gives `params`.

    Use it to resume from an ``optax.adamax`` or ``optax.adamaxw`` state (any
    dtype), or from a state of this package with other storage dtypes: the
    moments are decoded to their values, then stored the way ``opt.init(params)``
    stores them (with a fresh scale where the target layout has one). The step
    count is carried over (saturating at the int32 maximum), and so is the
    clock of a learning-rate schedule (the count of
    ``optax.ScaleByScheduleState``, or of ``optax.inject_hyperparams`` and the
    schedules it wraps), read from the first such count in `state`; every
    other part of the returned state is ``opt.init(params)``'s. optax keeps
    Adam's state in the same type as AdaMax's (``ScaleByAdamState``), so an
    ``optax.adam`` state would be taken for one: convert only AdaMax states.

    Args:
        state: The state to convert: anything holding exactly one
            :class:`ScaleByAdamaxState` or ``optax.ScaleByAdamState`` (the
            state of ``optax.adamax(...)``, ``optax.adamaxw(...)``, a chain).
            Or a framework's AdaMax state, to continue its run: a
            ``torch.optim.Adamax`` or its ``state_dict()``; a built
            ``keras.optimizers.Adamax``, or a dict of its variables
            (``"iterations"``, and ``"momentums"`` and ``"norms"`` in its
            variables' order) with its ``get_config()`` under ``"config"``.
            The framework's parameters, in its order (PyTorch's param groups,
            one after another; the variables Keras was built with), map to
            the leaves of `params` in ``jax.tree.leaves`` order; or pass
            ``(state, from_list)``, with ``from_list`` the function that ports
            the parameters: it takes the framework's list (NumPy arrays, in
            the framework's dtype) and gives a tree shaped like `params`,
            transposing where layouts differ. The framework's step count is
            carried over, and its hyperparameters are checked against `opt`'s
            (``eps_mode="inside_max"`` for PyTorch, ``"denominator"`` for
            Keras; the learning rate, a schedule's at that count, weight decay
            and ``maximize`` where `opt` is an alias). See docs/porting.md.
        opt: The optimizer to continue with, holding exactly one
            :class:`ScaleByAdamaxState`. For a framework's state it must be
            built by ``adamax``, ``adamaxw`` or ``scale_by_adamax``, so that
            its hyperparameters can be read.
        params: The parameters `opt` will update (arrays, or
            ``jax.ShapeDtypeStruct``), shaped like the state's moments.

    Returns:
        A state with the structure of ``opt.init(params)``.

    Raises:
        ValueError: If either state holds no AdaMax state or several, or the
            moments do not have the structure and shapes of `params` (the key
            paths are named). For a framework's state also: another
            optimizer's state, a missing parameter, a shape or dtype that
            differs from its leaf of `params` (both named), per-parameter step
            counts or param groups that differ, or a hyperparameter that
            differs from `opt`'s (both values named), or `opt`'s that cannot
            be read.

    Examples:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> import adamax_jax as ax
        >>> params = {"w": jnp.ones(3)}
        >>> count, mu, nu = jnp.array(1), {"w": jnp.full(3, 0.05)}, {"w": jnp.full(3, 0.5)}
        >>> state = (optax.ScaleByAdamState(count, mu, nu), optax.EmptyState())
        >>> new = ax.adamax(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
        >>> state = ax.convert_state(state, new, params)
        >>> print(ax.infinity_norm(state)["w"])
        [0.5 0.5 0.5]
    """
    from adamax_jax import _porting  # here: _porting imports this module

    if _porting.is_framework_state(state):
        return _porting.from_framework(state, opt, params)
    found = _adam_like_states(state)
    if len(found) != 1:
        where = ", ".join(p or "<root>" for p, _ in found) or "nowhere"
        raise ValueError(
            "`state` must hold exactly one ScaleByAdamaxState or optax.ScaleByAdamState; "
            f"found at: {where}."
        )
    source = found[0][1]
    target = opt.init(params)
    inner = adamax_state(target)

    def masked(x: Any) -> bool:
        return isinstance(x, optax.MaskedNode)

    def leaf_or_masked(x: Any) -> bool:
        return is_leaf(x) or masked(x)

    def moment(template: Any, value: Any, role: str) -> Any:
        if template is None or masked(template):
            # A parameter `opt` leaves out (optax.masked) has no moment to fill.
            return template
        if value is None or masked(value):
            raise ValueError(f"`state` has no {role} for a parameter that `opt` updates.")
        if jnp.shape(value) != jnp.shape(template):
            raise ValueError(
                f"`state` holds a {role} of shape {jnp.shape(value)} where `opt` keeps one of "
                f"shape {jnp.shape(template)}."
            )
        real = jnp.asarray(value)
        if jnp.iscomplexobj(real) and not jnp.iscomplexobj(_codecs.stored_values(template)):
            # optax keeps ν of a complex parameter as complex numbers: u and 0j.
            real = real.real
        return _codecs.from_value(real, template, role)  # type: ignore[arg-type]

    _validation.check_same_structure("state.mu", source.mu, "params", params)
    _validation.check_same_structure("state.nu", source.nu, "params", params)
    # The values the source's moments hold, and the layout `opt` stores them in.
    if isinstance(source, ScaleByAdamaxState):
        source_mu, source_nu = _read_moments(source)
    else:
        source_mu, source_nu = source.mu, source.nu
    _, treedef, target_mu, target_nu = _unpack(inner, None)
    target_mu, target_nu = treedef.unflatten(target_mu), treedef.unflatten(target_nu)
    mu = jax.tree.map(lambda t, v: moment(t, v, "mu"), target_mu, source_mu, is_leaf=leaf_or_masked)
    nu = jax.tree.map(lambda t, v: moment(t, v, "nu"), target_nu, source_nu, is_leaf=leaf_or_masked)
    converted = _pack(
        _step_count(source.count, "count", inner.count.dtype), mu, nu, inner.block_size
    )

    # The learning rate's own clock: a schedule's count, or inject_hyperparams' (its
    # `count` and the count of each wrapped schedule's state).
    def is_counter(x: Any) -> bool:
        return (
            isinstance(x, tuple)
            and "count" in getattr(x, "_fields", ())
            and not isinstance(x, (ScaleByAdamaxState, optax.ScaleByAdamState))
        )

    def counters(tree: Any) -> list[Any]:
        return [x.count for x in jax.tree.leaves(tree, is_leaf=is_counter) if is_counter(x)]

    clocks = counters(state)

    def replace(x: Any) -> Any:
        if isinstance(x, ScaleByAdamaxState):
            return converted
        if is_counter(x):
            # Whatever it holds (inject_hyperparams holds the optimizer's own state).
            x = type(x)(*(jax.tree.map(replace, f, is_leaf=stop) for f in x))
            if clocks:
                x = x._replace(count=_step_count(clocks[0], "schedule count", x.count.dtype))
        return x

    def stop(x: Any) -> bool:
        return isinstance(x, ScaleByAdamaxState) or is_counter(x)

    return jax.tree.map(replace, target, is_leaf=stop)


def _step_count(count: Any, name: str, dtype: Any) -> jax.Array:
    """A step count in `dtype`, saturating at the int32 maximum; concrete nonsense refused."""
    top = int(np.iinfo(np.int32).max)
    if not _validation.is_traced(count):
        value = np.asarray(count).item()
        if not (math.isfinite(value) and float(value) == int(value) and value >= 0):
            raise ValueError(f"The state's {name} must be a whole number >= 0, got {value!r}.")
        return jnp.asarray(min(int(value), top), dtype)
    return jnp.clip(count, 0, top).astype(dtype)


def _add_decayed_weights(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
    """``update + λ θ`` in the update's dtype (float32 at least in the aliases)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("`adamaxw` needs `params` in `update` for its weight decay.")

        def leaf(u, p):
            if u is None:
                return None
            return u + jnp.asarray(weight_decay, u.dtype) * reshard_like(p, u).astype(u.dtype)

        return jax.tree.map(leaf, updates, params, is_leaf=_is_none), state

    decay = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(decay, mask) if mask is not None else decay


def _chain(
    b1: Any,
    b2: Any,
    eps: Any,
    learning_rate: optax.ScalarOrSchedule,
    *,
    nesterov: bool,
    eps_mode: EpsMode,
    complex_mode: ComplexMode,
    mu_dtype: Any,
    nu_dtype: Any,
    compensated: bool,
    block_size: Any = None,
    weight_decay: Any = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The aliases: AdaMax, weight decay and the learning rate, rounded once.

    The direction stays in float32 (or wider) through the weight decay and
    the learning rate, so that bfloat16 or float16 parameters get one rounding
    of ``α (d + λθ)``, not one of ``d``, one of ``α`` and one of the product.
    """
    learning_rate = _validation.check_learning_rate(learning_rate)
    _validation.check_bool("compensated", compensated)
    parts: list[optax.GradientTransformation] = [
        _scale_by_adamax(
            b1,
            b2,
            eps,
            eps_mode=eps_mode,
            nesterov=nesterov,
            complex_mode=complex_mode,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
            block_size=block_size,
            float32_updates=True,
        )
    ]
    if weight_decay is not None:
        parts.append(_add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if compensated:
        # compensate_rounding rounds the float32 update itself, keeping what it drops.
        parts.append(compensate_rounding())
    inner = optax.chain(*parts)

    def update_fn(updates, state, params=None, **extra_args):
        updates = jax.tree.map(_as_leaf, updates, is_leaf=_is_none)
        if params is not None:
            params = jax.tree.map(_as_leaf, params, is_leaf=_is_none)
        like = updates if params is None else params
        new, state = inner.update(updates, state, params, **extra_args)

        def rounded(u, ref):
            if u is None:
                return None
            dtype = jnp.dtype(ref.dtype)
            if not jnp.issubdtype(dtype, jnp.inexact):
                # Integer gradients without parameters: the update is float32.
                dtype = jnp.dtype(u.dtype)
            if below_32_bits(dtype) and jnp.dtype(u.dtype) != dtype:
                # A step past a 16-bit dtype's range (a β₂ below β₁ lets m/u grow
                # without bound) is held at its largest finite value, not infinity.
                big = jnp.asarray(jnp.finfo(dtype).max, u.dtype)
                u = jnp.clip(u, -big, big)
            return reshard_like(u.astype(dtype), ref)

        return jax.tree.map(rounded, new, like, is_leaf=_is_none), state

    HYPERPARAMETERS[update_fn] = dict(
        HYPERPARAMETERS[parts[0].update],
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        compensated=compensated,
    )
    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


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
    block_size: int | None = None,
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
        eps: ε, >= 0 and finite in float32.
        eps_mode: "denominator", "inside_max" or "none", as above.
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment; defaults to the parameter's.
        nu_dtype: Storage dtype of the infinity norm; defaults to the
            parameter's. Below 32 bits it is stored scaled so that it still
            decays, see :func:`scale_by_adamax`.
        block_size: Values per block of 8-bit storage (1 to 4096; None: 256), see
            :func:`scale_by_adamax`.
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
        b1,
        b2,
        eps,
        learning_rate,
        nesterov=False,
        eps_mode=eps_mode,
        complex_mode=complex_mode,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
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
    block_size: int | None = None,
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
        eps: ε, >= 0 and finite in float32.
        weight_decay: λ, finite in float32.
        mask: A pytree of booleans, or a callable returning one from the
            parameters, saying which leaves decay; as in
            ``optax.add_decayed_weights``.
        eps_mode: "denominator", "inside_max" or "none", see :func:`adamax`.
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment.
        nu_dtype: Storage dtype of the infinity norm.
        block_size: Values per block of 8-bit storage (1 to 4096; None: 256), see
            :func:`scale_by_adamax`.
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
        b1,
        b2,
        eps,
        learning_rate,
        nesterov=False,
        eps_mode=eps_mode,
        complex_mode=complex_mode,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
        compensated=compensated,
        weight_decay=weight_decay,
        mask=mask,
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
    block_size: int | None = None,
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
        eps: ε, >= 0 and finite in float32.
        eps_mode: "denominator", "inside_max" or "none".
        complex_mode: "modulus" or "split", see :func:`scale_by_adamax`.
        mu_dtype: Storage dtype of the first moment.
        nu_dtype: Storage dtype of the infinity norm.
        block_size: Values per block of 8-bit storage (1 to 4096; None: 256), see
            :func:`scale_by_adamax`.
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
        b1,
        b2,
        eps,
        learning_rate,
        nesterov=True,
        eps_mode=eps_mode,
        complex_mode=complex_mode,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        block_size=block_size,
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
                y = jnp.asarray(y).astype(jnp.result_type(dtype, float))
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
    for path, leaf in jax.tree_util.tree_flatten_with_path(u)[0]:
        if _codecs.codec_for(jnp.asarray(leaf).dtype, "nu") is not None:
            # The transformations store such a ν scaled (an EncodedMoment); a plain
            # one rounds 0.999 u back to u at every step and never decays.
            raise TypeError(
                f"`u`{jax.tree_util.keystr(path)} is {jnp.asarray(leaf).dtype}: a plain 16-bit "
                "u never "
                "decays (β₂ u rounds back to u). Keep `u` in float32 or wider, or use "
                "`scale_by_adamax(nu_dtype=...)`, which stores it scaled."
            )
    for (path, g_), m_ in zip(
        jax.tree_util.tree_flatten_with_path(grad)[0], jax.tree.leaves(m), strict=True
    ):
        where = jax.tree_util.keystr(path)
        _check_complex_gradient(jnp.asarray(g_), f"`grad`{where}", jnp.asarray(m_), f"`m{where}`")
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
