"""Checks of hyperparameters and pytrees, with errors that name what is wrong.

Only concrete values are checked: Python numbers and NumPy scalars or arrays.
JAX arrays pass through untouched, so traced values (as under ``jax.jit`` or
``optax.inject_hyperparams``) keep working and no check waits on a device.
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamax_jax._tree import is_leaf


def _check_number(name: str, value: Any) -> None:
    """Raises ValueError for a value that can never be a real hyperparameter."""
    is_bool = isinstance(value, (bool, np.bool_))
    not_real = isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)
    if is_bool or not_real or value is None or isinstance(value, (str, bytes)):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")


def _concrete_values(value: Any) -> list[float]:
    """The values of a Python number or NumPy value; nothing for anything else."""
    if isinstance(value, numbers.Real):
        return [float(value)]
    if isinstance(value, (np.ndarray, np.generic)):
        return [float(x) for x in np.ravel(value)]
    return []


def _check_values(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    _check_number(name, value)
    if not all(ok(x) for x in _concrete_values(value)):
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}.")


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a concrete `value` is outside [low, high] or [low, high)."""

    def inside(x: float) -> bool:
        return low <= x < high if high_open else low <= x <= high

    bracket = ")" if high_open else "]"
    _check_values(name, value, inside, f"in [{low:g}, {high:g}{bracket}")


def check_nonnegative_finite(name: str, value: Any) -> None:
    """Raises ValueError if a concrete `value` is negative or not finite."""
    _check_values(name, value, lambda x: math.isfinite(x) and x >= 0, "finite and >= 0")


def check_finite(name: str, value: Any) -> None:
    """Raises ValueError if a concrete `value` is not finite."""
    _check_values(name, value, math.isfinite, "finite")


def check_learning_rate(value: Any) -> None:
    """A learning rate is a finite number, an array or a schedule (a callable)."""
    if callable(value):
        return
    if value is None:
        raise ValueError("`learning_rate` must be a number or a schedule, got None.")
    check_finite("learning_rate", value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ValueError if `value` is not one of the strings in `choices`."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_dtype(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is None or a floating or complex dtype."""
    if value is None:
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"`{name}` must be a floating dtype or None, got {value!r}.") from e
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"`{name}` must be a floating dtype or None, got {value!r}.")


def check_storage_dtype(name: str, value: Any) -> None:
    """Raises ValueError unless `value` is None, a floating or complex dtype, int8 or uint8.

    The storage dtypes of the moments: int8 and uint8 are 8-bit block-wise storage.
    """
    if value is not None:
        try:
            if jnp.dtype(value) in _EIGHT_BIT_INTEGERS:
                return
        except TypeError:
            pass
    check_dtype(name, value)


_EIGHT_BIT_INTEGERS = (np.dtype(np.int8), np.dtype(np.uint8))
_EIGHT_BIT = (*_EIGHT_BIT_INTEGERS, jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def _is_eight_bit(value: Any) -> bool:
    return value is not None and jnp.dtype(value) in _EIGHT_BIT


def check_eight_bit(
    mu_name: str, mu_dtype: Any, nu_name: str, nu_dtype: Any, block_size: Any
) -> None:
    """Checks the 8-bit storage options: dtypes that block-wise storage supports, `block_size`.

    Raises:
        ValueError: For uint8 μ (μ has a sign), another 8-bit dtype than int8,
            uint8, float8_e4m3fn and float8_e5m2, or a `block_size` that is
            not a positive integer.
    """
    if block_size is None:
        return _check_eight_bit_dtypes(mu_name, mu_dtype, nu_name, nu_dtype)
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    if block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}.")
    _check_eight_bit_dtypes(mu_name, mu_dtype, nu_name, nu_dtype)


def _check_eight_bit_dtypes(mu_name: str, mu_dtype: Any, nu_name: str, nu_dtype: Any) -> None:
    if mu_dtype is not None and jnp.dtype(mu_dtype) == jnp.uint8:
        raise ValueError(
            f"`{mu_name}` cannot be uint8: the first moment has a sign. Use jnp.int8 (or a "
            f"float8 dtype) for it; uint8 is for `{nu_name}`, which is never negative."
        )
    for name, value in ((mu_name, mu_dtype), (nu_name, nu_dtype)):
        if value is None:
            continue
        dtype = jnp.dtype(value)
        if dtype.itemsize == 1 and dtype not in _EIGHT_BIT:
            raise ValueError(
                f"`{name}` is {dtype}; 8-bit storage is jnp.int8, jnp.uint8 (ν only), "
                "jnp.float8_e4m3fn or jnp.float8_e5m2."
            )


def check_eight_bit_params(params: Any, mu_dtype: Any, nu_dtype: Any) -> None:
    """Raises ValueError naming complex leaves when a moment is stored in 8 bits."""
    names = [n for n, v in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)) if _is_eight_bit(v)]
    if not names:
        return
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
            f"integer or boolean: {', '.join(bad)}. Leave non-trainable leaves "
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
