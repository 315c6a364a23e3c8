"""Checks of hyperparameters, dtypes and pytrees, with errors that name what is wrong.

A concrete hyperparameter of any form (a Python number, another ``numbers``
type such as ``Fraction`` or ``Decimal``, a NumPy scalar or array, a list or
tuple, a concrete JAX array) is read as one Python number and range-checked
when the optimizer is built, so that a bad value fails there and never later.
A traced value (under ``jax.jit``, ``jax.vmap`` or ``optax.inject_hyperparams``)
has no value yet: its shape and dtype are checked, and it passes as a 0-d
array. The rules are listed in ``docs/input_rules.md``.
"""

import decimal
import fractions
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import core

from adamax_jax._sharding import explicit_shards
from adamax_jax._tree import is_leaf

INT32_MAX = int(np.iinfo(np.int32).max)

# The storage dtypes of the moments (a complex one stores a real parameter's
# moments in its real counterpart); 8-bit ones (block-wise) are checked by
# `check_moment_dtype` and `check_eight_bit`.
STORAGE_DTYPES: tuple[jnp.dtype, ...] = tuple(
    jnp.dtype(d)
    for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64, jnp.complex64, jnp.complex128)
)


def is_traced(value: Any) -> bool:
    """Whether `value` is a JAX tracer: a value known only when the program runs."""
    return isinstance(value, core.Tracer)


def _not_real(name: str, value: Any) -> ValueError:
    return ValueError(f"`{name}` must be a real number, got {value!r}.")


def _check_kind(name: str, value: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    """Refuses non-real dtypes and more (or fewer) than one element."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bool_ or not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise _not_real(name, value)
    if math.prod(shape) != 1:
        raise ValueError(
            f"`{name}` must be a scalar (one element), got {value!r} of shape {tuple(shape)}."
        )


def _scalar(name: str, value: Any) -> Any:
    """One real number from `value`: a Python or ``numbers`` scalar, or a traced 0-d array.

    Containers and arrays of one element (any number of dimensions) give that
    element, as PyTorch reads a one-element tensor; other sizes are refused.
    """
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise _not_real(name, value)
    if is_traced(value):
        _check_kind(name, value, value.dtype, value.shape)
        return jnp.reshape(value, ())
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, np.generic):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:  # ragged lists, objects NumPy cannot read
        raise _not_real(name, value) from e
    _check_kind(name, value, array.dtype, array.shape)
    element = array.reshape(())
    if jnp.issubdtype(array.dtype, jnp.integer):
        return int(element)
    return float(element.astype(np.float64))


def _as_float(value: Any) -> float:
    """The nearest float64; ±inf where the value is beyond the float64 range.

    A value that has none (a signaling NaN ``Decimal``) reads as NaN, which no
    range admits, so that the error names the argument.
    """
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    except (ValueError, ArithmeticError):
        return math.nan


def _finite_in_float32(x: float) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(x)))


def _read_as(value: Any, x: Any) -> str:
    """For an error message: what `value` was read as, where that is not its repr."""
    return "" if repr(x) == repr(value) else f" (read as {x!r})"


def _checked(name: str, value: Any, ok: Any, requirement: str) -> Any:
    """`value` read as a Python float and checked by `ok`; a traced value as it is."""
    x = _scalar(name, value)
    if is_traced(x):
        return x
    f = _as_float(x)
    if not ok(f):
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}{_read_as(value, f)}.")
    return f


def check_wide_enough(name: str, value: Any) -> None:
    """Refuses β₁, β₂ or ε that arrives in a floating dtype of fewer than 32 bits.

    ``optax.inject_hyperparams`` injects hyperparameters in the parameters'
    dtype unless told otherwise: with bfloat16 parameters β₁ = 0.9 arrives as
    0.8984375 and β₂ = 0.999 as 1.0, so that u would never decay. The dtype is
    known when the step is traced, so this is refused then, concrete or not.

    Raises:
        ValueError: Naming `name`, the dtype and the fix.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None or isinstance(value, (int, float)):
        return
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return
    read = "" if is_traced(value) else f" (it reads {float(np.asarray(value, np.float32))!r})"
    raise ValueError(
        f"`{name}` arrived as a {dtype} array{read}: rounded to {dtype} it is another "
        "AdaMax (β₂ = 0.999 is 1.0 in bfloat16, and u would never decay). "
        "`optax.inject_hyperparams` injects hyperparameters in the parameters' dtype: pass "
        "`hyperparam_dtype=jnp.float32` to it, or give β₁, β₂ and ε as float32 (or wider) "
        "arrays or Python numbers."
    )


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_open: bool = False,
) -> Any:
    """A hyperparameter in [low, high] (or [low, high)), read as a Python float.

    Args:
        name: The argument's name, for the error message.
        value: A concrete real scalar of any form, or a traced one.
        low: The smallest value allowed.
        high: The largest value allowed, or the bound it must stay below.
        high_open: Whether `high` itself is refused.

    Returns:
        The value as a Python float, or a traced value as a 0-d array. One
        exception, for the open bound: a concrete float32 JAX array equal to
        `high` (as ``optax.inject_hyperparams`` makes of β₁ = 1 - 1e-8) is
        returned as a 0-d array, to be read as the nearest float32 below it,
        as it is when traced.

    Raises:
        ValueError: If `value` is not one real number, or is outside the
            interval (for a NumPy or narrower-than-float32 value that rounded
            to the open bound, the message says how to keep it below).
    """

    def inside(x: float) -> bool:
        return low <= x < high if high_open else low <= x <= high

    bracket = ")" if high_open else "]"
    dtype = getattr(value, "dtype", None)
    narrow = (
        high_open
        and dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)
        and jnp.finfo(dtype).bits < 64
        and not is_traced(value)
        and _scalar(name, value) == high
    )
    if narrow and isinstance(value, jax.Array) and jnp.dtype(dtype) == jnp.float32:
        # `optax.inject_hyperparams` hands over float32 arrays, in which
        # β₁ = 1 - 1e-8 is 1. Such an array is read as the nearest float32
        # below 1 (see `b1_terms`), concrete as when traced under jit.
        return jnp.reshape(value, ())
    try:
        return _checked(name, value, inside, f"in [{low:g}, {high:g}{bracket}")
    except ValueError as e:
        if not narrow:
            raise
        raise ValueError(
            f"{e.args[0]} A value this close to {high:g} is {high:g} in {jnp.dtype(dtype)}: "
            "give it as a Python float or a float64 value (with "
            "`optax.inject_hyperparams(..., hyperparam_dtype=jnp.float64)` under "
            "`jax_enable_x64`)."
        ) from None


def check_nonnegative_finite(name: str, value: Any) -> Any:
    """A hyperparameter >= 0 and finite in float32 (ε), read as a Python float.

    Float32 is the narrowest dtype the arithmetic runs in, so a value that is
    infinite there (1e39) is refused even though Python holds it.

    Raises:
        ValueError: If `value` is not one real number, is negative, or is not
            finite in float32.
    """
    return _checked(
        name,
        value,
        lambda x: x >= 0 and _finite_in_float32(x),
        "finite in float32 (the dtype it is applied in) and >= 0",
    )


def check_finite(name: str, value: Any) -> Any:
    """A hyperparameter finite in float32, read as a Python float.

    Raises:
        ValueError: If `value` is not one real number, or is not finite in float32.
    """
    return _checked(
        name, value, _finite_in_float32, "finite in float32 (the dtype it is applied in)"
    )


def check_learning_rate(value: Any) -> Any:
    """A learning rate: a schedule (a callable, passed on) or a number finite in float32.

    Raises:
        ValueError: If `value` is neither a callable nor one real number finite
            in float32.
    """
    if callable(value) and not is_traced(value):
        return value
    if value is None:
        raise ValueError("`learning_rate` must be a number or a schedule, got None.")
    return check_finite("learning_rate", value)


def check_step(value: Any) -> tuple[Any, Any]:
    """The 1-based step `t` of ``adamax_step``: an integer >= 1, saturated at the int32 maximum.

    Integral floats (``3.0``) and other exact forms (``Fraction(3)``,
    ``Decimal(3)``, one-element arrays) are read as that integer; a step past
    the int32 maximum is read as that maximum, as the step counter of the
    transformations saturates. A traced `t` cannot be refused: it is clipped
    to the int32 range before the cast (so that an int64 `t` cannot wrap),
    and a flag says whether it is an integer >= 1.

    Returns:
        ``(count, valid)``: a Python int in [1, 2**31 - 1] and None, or for a
        traced `t` an int32 0-d array and a boolean 0-d array.

    Raises:
        ValueError: If a concrete `t` is not one real number, not an integer,
            or < 1.
    """
    x = _scalar("t", value)
    if is_traced(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            info = jnp.iinfo(x.dtype)
            low, high = max(int(info.min), -INT32_MAX - 1), min(int(info.max), INT32_MAX)
            return jnp.clip(x, low, high).astype(jnp.int32), x >= 1
        # A float beyond the int32 range has no defined cast: select the ends.
        high, low = x >= INT32_MAX, x < -INT32_MAX - 1
        inside = jnp.where(high | low, jnp.zeros_like(x), x).astype(jnp.int32)
        count = jnp.where(high, INT32_MAX, jnp.where(low, -INT32_MAX - 1, inside))
        valid = (x >= 1) & (x == jnp.floor(x)) & jnp.isfinite(x)
        return count.astype(jnp.int32), valid
    try:
        exact = fractions.Fraction(x)
    except (ValueError, OverflowError):  # nan, inf
        exact = None
    if exact is None or exact.denominator != 1 or exact < 1:
        raise ValueError(
            f"`t` is the 1-based step and must be an integer >= 1, got {value!r}"
            f"{_read_as(value, x)}."
        )
    return min(int(exact), INT32_MAX), None


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ValueError if `value` is not one of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def _as_dtype(value: Any) -> jnp.dtype | None:
    """`value` as a dtype, or None where NumPy cannot read it as one.

    NumPy's parser raises TypeError for most such values, and SyntaxError for
    a malformed string of fields (``"i1,,"``).
    """
    try:
        return jnp.dtype(value)
    except (TypeError, ValueError, SyntaxError):
        return None


def _check_not_an_array(name: str, value: Any) -> None:
    """Refuses an array where a dtype is named (what ``optax.inject_hyperparams`` hands over)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        raise ValueError(
            f"`{name}` arrived as an array ({type(value).__name__} of dtype {value.dtype}): "
            "it names how values are stored, so it cannot be a hyperparameter. Pass a dtype "
            f"(e.g. jnp.bfloat16); under `optax.inject_hyperparams` pass it in `static_args`: "
            f"`optax.inject_hyperparams(adamax, static_args=('{name}',))`."
        )


def check_dtype(name: str, value: Any) -> None:
    """A floating storage dtype: None (the parameter's own) or one of `STORAGE_DTYPES`.

    For arrays stored element by element, such as the buffer of
    :func:`adamax_jax.compensate_rounding`; the moments' own dtypes, which may
    also be 8-bit (block-wise), are checked by :func:`check_moment_dtype`.

    Raises:
        ValueError: For an 8-bit float (3 or 2 mantissa bits, which would drop
            again what such a buffer keeps), for any other dtype that is not
            float16, bfloat16, float32, float64, complex64 or complex128, and
            for an array (a dtype ``optax.inject_hyperparams`` made a value).
    """
    if value is None:
        return
    _check_not_an_array(name, value)
    dtype = _as_dtype(value)
    if dtype is None:
        raise ValueError(f"`{name}` must be a floating dtype or None, got {value!r}.")
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:
        raise ValueError(
            f"`{name}` got {value!r} ({dtype}): an 8-bit float has too few mantissa bits "
            "to keep what rounding drops, element by element; use bfloat16, float16 or "
            "float32 here (8-bit storage is for the moments: `mu_dtype` and `nu_dtype`)."
        )
    if dtype not in STORAGE_DTYPES:
        accepted = ", ".join(str(d) for d in STORAGE_DTYPES)
        raise ValueError(f"`{name}` must be None or one of {accepted}; got {value!r} ({dtype}).")


def check_storage_dtypes(params: Any, **dtypes: Any) -> None:
    """Refuses a parameter whose own dtype cannot store a moment where no dtype is named.

    Raises:
        ValueError: Naming the argument and the first parameter's key path.
    """
    for path, leaf in _paths(params).items():
        if leaf is not None:
            for name, dtype in dtypes.items():
                if dtype is None and _dtype(leaf) not in STORAGE_DTYPES:
                    # The moments would default to the parameter's own dtype.
                    raise ValueError(
                        f"`params`{path} is {_dtype(leaf)}, which a moment cannot be stored "
                        f"in; pass `{name}` (one of "
                        + ", ".join(str(d) for d in STORAGE_DTYPES)
                        + ")."
                    )


def check_moment_dtype(name: str, value: Any) -> None:
    """A moment's storage dtype: one of :func:`check_dtype`'s, or an 8-bit block-wise one.

    Raises:
        ValueError: For a one-byte dtype other than int8, uint8, float8_e4m3fn
            and float8_e5m2, and as :func:`check_dtype` for the others.
    """
    if value is not None:
        _check_not_an_array(name, value)
        dtype = _as_dtype(value)
        if dtype is not None and dtype in _EIGHT_BIT:
            return
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:
            raise ValueError(
                f"`{name}` got {value!r} ({dtype}); 8-bit storage is jnp.int8, jnp.uint8 "
                "(ν only), jnp.float8_e4m3fn or jnp.float8_e5m2."
            )
    check_dtype(name, value)


_EIGHT_BIT_INTEGERS = (np.dtype(np.int8), np.dtype(np.uint8))
_EIGHT_BIT = (*_EIGHT_BIT_INTEGERS, jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def _is_eight_bit(value: Any) -> bool:
    """Whether `value` names an 8-bit storage dtype (False for None or what names no dtype)."""
    return value is not None and _as_dtype(value) in _EIGHT_BIT


def _dtype_name(value: Any) -> str:
    dtype = None if value is None else _as_dtype(value)
    return str(dtype) if dtype is not None or value is None else repr(value)


# The largest block, as in bitsandbytes (whose blocks run from 64 to 4096 values): the
# state records the block size as the length of a uint8 array, at most 4 KiB.
MAX_BLOCK_SIZE = 4096


def check_eight_bit(
    mu_name: str, mu_dtype: Any, nu_name: str, nu_dtype: Any, block_size: Any
) -> None:
    """Checks the 8-bit storage options: dtypes that block-wise storage supports, `block_size`.

    Raises:
        ValueError: For uint8 μ (μ has a sign), another 8-bit dtype than int8,
            uint8, float8_e4m3fn and float8_e5m2, a `block_size` that is not a
            positive integer, or a `block_size` where neither moment is stored
            in 8 bits (it would be ignored).
    """
    if block_size is None:
        return _check_eight_bit_dtypes(mu_name, mu_dtype, nu_name, nu_dtype)
    if not (_is_eight_bit(mu_dtype) or _is_eight_bit(nu_dtype)):
        # Checked first: whatever its value, the fix is to drop it. Only 8-bit storage
        # is cut into blocks, and a parameter's own dtype is never 8-bit storage
        # (STORAGE_DTYPES), so the named dtypes decide.
        raise ValueError(
            f"`block_size` is for 8-bit storage, but neither `{mu_name}` "
            f"({_dtype_name(mu_dtype)}) nor `{nu_name}` ({_dtype_name(nu_dtype)}) is an "
            "8-bit dtype, so no moment is stored in blocks. Drop `block_size`, or store a "
            "moment in jnp.int8, jnp.uint8 (ν), jnp.float8_e4m3fn or jnp.float8_e5m2."
        )
    if hasattr(block_size, "dtype") and not isinstance(block_size, (int, np.integer)):
        # optax.inject_hyperparams makes every numeric argument a (traced) array.
        raise ValueError(
            f"`block_size` arrived as an array ({block_size!r}): it shapes the state, so "
            "it cannot be a hyperparameter. Under `optax.inject_hyperparams` pass it in "
            "`static_args`: `optax.inject_hyperparams(adamax, static_args=('block_size',))`."
        )
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    if not 1 <= int(block_size) <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"`block_size` must be a positive integer of at most {MAX_BLOCK_SIZE}, got "
            f"{block_size!r}: one float32 scale per 4096 values costs 0.1 % of the codes "
            "already, and the state records the block size in an array of that length."
        )
    _check_eight_bit_dtypes(mu_name, mu_dtype, nu_name, nu_dtype)


def _check_eight_bit_dtypes(mu_name: str, mu_dtype: Any, nu_name: str, nu_dtype: Any) -> None:
    if mu_dtype is not None and jnp.dtype(mu_dtype) == jnp.uint8:
        raise ValueError(
            f"`{mu_name}` cannot be uint8 (got {mu_dtype!r}): the first moment has a sign. "
            "Use jnp.int8 (or a "
            f"float8 dtype) for it; uint8 is for `{nu_name}`, which is never negative."
        )
    for name, value in ((mu_name, mu_dtype), (nu_name, nu_dtype)):
        if value is None:
            continue
        dtype = jnp.dtype(value)
        if dtype.itemsize == 1 and dtype not in _EIGHT_BIT:
            raise ValueError(
                f"`{name}` got {value!r} ({dtype}); 8-bit storage is jnp.int8, jnp.uint8 "
                "(ν only), jnp.float8_e4m3fn or jnp.float8_e5m2."
            )


def check_eight_bit_params(params: Any, mu_dtype: Any, nu_dtype: Any) -> None:
    """Raises ValueError naming complex or float64 leaves when a moment is stored in 8 bits.

    Block scales and the values read back are float32 (as are the plain
    moments of small leaves): a float64 value past float32's range could not
    be stored, and the steps after it would not keep the step bound.
    """
    names = [n for n, v in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)) if _is_eight_bit(v)]
    if not names:
        return
    wide = [
        path or "<root>"
        for path, leaf in _paths(params).items()
        if leaf is not None and _dtype(leaf) == jnp.float64
    ]
    if wide:
        raise ValueError(
            f"8-bit storage ({', '.join(f'`{n}`' for n in names)}) keeps float32 block scales; "
            f"these leaves are float64: {', '.join(wide)}, whose values can pass float32's "
            "range. Store their moments in float64 or float32 (an `optax.multi_transform` "
            "can give them their own optimizer), or train them in float32."
        )
    bad = [
        path or "<root>"
        for path, leaf in _paths(params).items()
        if leaf is not None and jnp.issubdtype(_dtype(leaf), jnp.complexfloating)
    ]
    if bad:
        raise ValueError(
            f"8-bit storage ({', '.join(f'`{n}`' for n in names)}) is for real parameters; "
            f"these leaves are complex: {', '.join(bad)}. Store their moments in a floating "
            "dtype (an `optax.multi_transform` can give them their own optimizer)."
        )


def check_block_shards(
    params: Any,
    mu_dtype: Any,
    nu_dtype: Any,
    block_size: int,
    blockwise: Callable[[tuple[int, ...], int], bool],
    least: int,
) -> None:
    """Raises ValueError naming leaves whose shards would split an 8-bit block.

    On ``Explicit`` mesh axes each shard of a block-wise moment must hold
    whole blocks along the last axis: a block's scale is its largest value,
    and a block across two shards would need the other shard's values (a
    collective in every step), which the sharding types refuse. The message
    names one `block_size` that divides the shards of every split leaf, where
    one of at least `least` values does.

    Args:
        params: The parameters, as passed to ``init``.
        mu_dtype: The storage dtype of μ (or None).
        nu_dtype: The storage dtype of ν (or None).
        block_size: Values per block along the last axis.
        blockwise: Whether a leaf of a shape is stored block-wise (given the block size).
        least: The fewest values a block suggested in the message may have.
    """
    names = [n for n, v in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)) if _is_eight_bit(v)]
    if not names:
        return
    bad, widths, uneven = [], [], 0
    for path, leaf in _paths(params).items():
        if leaf is None or not blockwise(tuple(jnp.shape(leaf)), block_size):
            continue
        axes, shards = explicit_shards(leaf)
        n = jnp.shape(leaf)[-1]
        if shards == 1:
            continue
        where = f"`params{path}` (last axis {n} split over {axes} into {shards} "
        if n % shards:
            bad.append(where + "uneven shards)")
            uneven += 1
            continue
        widths.append(n // shards)
        if (n // shards) % block_size:
            bad.append(where + f"shards of {n // shards})")
    if not bad:
        return
    common = math.gcd(*widths) if widths else 0
    # The largest divisor no larger than the block size asked for, or else the least
    # larger one (shards of 125 with blocks of 100 take blocks of 125).
    # Divisors in pairs up to the square root: a shard may hold billions of values.
    pairs = [(d, common // d) for d in range(1, math.isqrt(common) + 1) if common % d == 0]
    divisors = sorted({d for pair in pairs for d in pair if d >= least})
    smaller = [d for d in divisors if d <= block_size]
    fits = max(smaller) if smaller else min(divisors, default=0)
    if fits and uneven == 0:
        hint = f"A `block_size` of {fits} divides the shards of every split leaf; choose it, "
    else:
        hint = f"No `block_size` of at least {least} divides them all; "
    raise ValueError(
        f"8-bit storage ({', '.join(f'`{n}`' for n in names)}) keeps one scale per block "
        f"of `block_size` ({block_size}) values along the last axis, and on Explicit mesh "
        "axes every shard must hold whole blocks; these do not: "
        + "; ".join(bad)
        + ". "
        + hint
        + "shard another axis, or keep these leaves' moments in 16 or 32 bits (an "
        "`optax.multi_transform` can give them their own optimizer)."
    )


def _is_none(x: Any) -> bool:
    # None, and a stored moment with its scale, are leaves of a parameter-shaped tree.
    return is_leaf(x)


def _paths(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _dtype(leaf: Any) -> jnp.dtype:
    # Arrays, tracers and jax.ShapeDtypeStruct carry a dtype; reading it
    # copies nothing, where jnp.asarray would copy a NumPy leaf to the device.
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.extended):
        # PRNG keys and other extended dtypes are no NumPy dtypes: keep them as they are.
        return dtype
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(leaf)


def check_trainable(params: Any) -> None:
    """Raises TypeError for integer or boolean leaves, naming their paths."""
    bad = [
        f"{path or '<root>'} ({_dtype(leaf)})"
        for path, leaf in _paths(params).items()
        if leaf is not None and not jnp.issubdtype(_dtype(leaf), jnp.inexact)
    ]
    if bad:
        raise TypeError(
            "AdaMax updates floating-point parameters only; these leaves are "
            f"not floating point: {', '.join(bad)}. Leave non-trainable leaves "
            "out with `optax.masked`, or zero their updates with "
            "`optax.set_to_zero` in an `optax.multi_transform`."
        )


def check_same_structure(name: str, tree: Any, reference_name: str, reference: Any) -> None:
    """Raises ValueError naming the key paths where `tree` differs from `reference`.

    Shapes are compared as well, so that no leaf is broadcast silently.
    """
    got, want = _paths(tree), _paths(reference)
    missing = [p or "<root>" for p in want if p not in got]
    extra = [p or "<root>" for p in got if p not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from `{name}`: {', '.join(missing)}")
        if extra:
            parts.append(f"in `{name}` but not in `{reference_name}`: {', '.join(extra)}")
        raise ValueError(
            f"`{name}` does not have the structure of `{reference_name}`; " + "; ".join(parts) + "."
        )
    if jax.tree.structure(tree, is_leaf=_is_none) != jax.tree.structure(
        reference, is_leaf=_is_none
    ):
        raise ValueError(
            f"`{name}` has the key paths of `{reference_name}` but other container types: "
            f"{jax.tree.structure(tree, is_leaf=_is_none)} vs "
            f"{jax.tree.structure(reference, is_leaf=_is_none)}."
        )
    for path, leaf in got.items():
        ref = want[path]
        if (leaf is None) != (ref is None):
            raise ValueError(
                f"`{name}`{path} is {'None' if leaf is None else 'an array'} where "
                f"`{reference_name}`{path} is {'None' if ref is None else 'an array'}."
            )
        if leaf is not None and jnp.shape(leaf) != jnp.shape(ref):
            raise ValueError(
                f"`{name}`{path} has shape {jnp.shape(leaf)}, but `{reference_name}`{path} "
                f"has shape {jnp.shape(ref)}."
            )
