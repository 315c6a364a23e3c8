"""Checks of hyperparameters and pytrees, with errors that name what is wrong.

Only concrete Python numbers are checked, so traced values (as from
``optax.inject_hyperparams``) pass through untouched.
"""

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _is_concrete_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a concrete `value` is outside [low, high] or [low, high)."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if not _is_concrete_number(value):
        return
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or above:
        bracket = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in [{low}, {high}{bracket}, got {value!r}.")


def check_nonnegative_finite(name: str, value: Any) -> None:
    """Raises ValueError if a concrete `value` is negative or not finite."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if _is_concrete_number(value) and (not math.isfinite(value) or value < 0):
        raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")


def check_finite(name: str, value: Any) -> None:
    """Raises ValueError if a concrete `value` is not finite."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if _is_concrete_number(value) and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")


def check_learning_rate(value: Any) -> None:
    """A learning rate is a finite number, an array or a schedule."""
    if callable(value):
        return
    if value is None:
        raise ValueError("`learning_rate` must be a number or a schedule, got None.")
    check_finite("learning_rate", value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ValueError if `value` is not one of `choices`."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")


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


def _is_none(x: Any) -> bool:
    return x is None


def _paths(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_trainable(params: Any) -> None:
    """Raises TypeError for integer or boolean leaves, naming their paths."""
    bad = [
        f"{path or '<root>'} ({jnp.asarray(leaf).dtype})"
        for path, leaf in _paths(params).items()
        if leaf is not None and not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
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
