"""Pytree plumbing shared by the transformations."""

from collections.abc import Callable
from typing import Any

import jax


def _is_none(x: Any) -> bool:
    return x is None


def is_leaf(x: Any) -> bool:
    """A leaf of a parameter-shaped tree: None, or a stored moment with its scale."""
    # Read from the type: containers such as flax.nnx's Variable hand attribute
    # look-ups on to the value they wrap, and would pass for a moment themselves.
    return x is None or getattr(type(x), "__adamax_moment__", False)


def map_unzip(fn: Callable[..., tuple], n: int, primary: Any, *rest: Any) -> tuple[Any, ...]:
    """Maps `fn` over the leaves of `primary` and `rest`; returns `n` trees.

    ``None`` in `primary` is a leaf, handed to `fn` with the matching leaves of
    `rest`; its results (one per output) take its place in each output tree.
    """
    leaves, treedef = jax.tree.flatten(primary, is_leaf=is_leaf)
    others = [treedef.flatten_up_to(tree) for tree in rest]
    results = [fn(*args) for args in zip(leaves, *others, strict=True)]
    return tuple(jax.tree.unflatten(treedef, [r[i] for r in results]) for i in range(n))
