"""Precision policy: low-precision storage of ν, and compensated parameter updates."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamax_jax import _validation
from adamax_jax._sharding import zeros_like
from adamax_jax._tree import map_unzip


def below_32_bits(dtype: jax.typing.DTypeLike) -> bool:
    """Whether `dtype` is a real floating dtype narrower than float32 (bfloat16, float16)."""
    return jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating)


def store_moment(value: jax.Array, previous: jax.Array) -> jax.Array:
    """Rounds a new first moment to the storage dtype of `previous`.

    Where that dtype has fewer than 32 bits, rounding to nearest would send a
    moment that moved by less than half a unit in the last place back onto
    its previous value: a moment approaching a steady gradient stalls up to
    ``ulp / (2 (1 - β₁))`` short of it (2 to 4 % in bfloat16 for β₁ = 0.9), and
    every step taken from it is that much off. Such a store moves by one unit
    in the last place instead, towards the new value: a moment approaching a
    steady gradient reaches it and then alternates between the two values
    around it. Away from zero, only a normal previous value is moved so: one
    unit in the last place of zero or of a subnormal can be many times the
    moment itself, and a step taken from it would be as far off; towards zero
    the move is always made, so that a decaying moment reaches 0. Every other
    store rounds to nearest, as do all stores of 32 bits or more.

    Its derivative is that of the value (the straight-through rule): the
    rounding itself has none.

    Args:
        value: The new moment, in the compute dtype.
        previous: The stored moment of the last step.

    Returns:
        The moment to store, in the dtype of `previous`.
    """
    if not below_32_bits(previous.dtype):
        return value.astype(previous.dtype)
    return _store_nudged(value, previous)


@jax.custom_jvp
def _store_nudged(value: jax.Array, previous: jax.Array) -> jax.Array:
    dtype = previous.dtype
    rounded = value.astype(dtype)
    before = previous.astype(value.dtype)
    safe = (jnp.abs(previous) >= jnp.finfo(dtype).tiny) | (jnp.abs(value) < jnp.abs(before))
    stalled = (rounded == previous) & (value != before) & safe
    toward = jnp.where(value > before, jnp.inf, -jnp.inf).astype(dtype)
    return jnp.where(stalled, jnp.nextafter(previous, toward), rounded)


@_store_nudged.defjvp
def _store_nudged_jvp(primals, tangents):
    value, previous = primals
    dvalue, _ = tangents
    return _store_nudged(value, previous), dvalue.astype(previous.dtype)


class CompensateRoundingState(NamedTuple):
    """State of :func:`compensate_rounding`: what rounding has left out so far."""

    compensation: optax.Updates


def compensate_rounding(
    dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    """Kahan-compensated updates for low-precision parameters.

    Put it last in a chain. For every parameter stored in fewer than 32 bits it
    keeps the part of past updates that rounding to the parameter's dtype has
    dropped, adds it to the next update, and returns an update with which
    ``optax.apply_updates`` lands on the correctly rounded value of
    ``param + update + compensation`` (summed in float32). Updates smaller than half a unit in the
    last place are no longer lost; they accumulate until they count.
    Parameters of 32 bits or more pass through, with ``None`` as their state.

    Args:
        dtype: The dtype of the compensation buffer; defaults to the
            parameter's dtype (two bytes a bfloat16 parameter).

    Returns:
        An ``optax.GradientTransformation``.
    """
    _validation.check_dtype("dtype", dtype)

    def init_fn(params: optax.Params) -> CompensateRoundingState:
        def init_leaf(p):
            if p is None or not below_32_bits(p.dtype):
                return None
            return zeros_like(p, dtype or p.dtype)

        return CompensateRoundingState(jax.tree.map(init_leaf, params))

    def update_fn(
        updates: optax.Updates, state: CompensateRoundingState, params: optax.Params = None
    ) -> tuple[optax.Updates, CompensateRoundingState]:
        if params is None:
            raise ValueError("`compensate_rounding` needs `params` in `update`.")
        _validation.check_same_structure("params", params, "updates", updates)

        def leaf(c, u, p):
            if c is None:
                return u, None
            exact = p.astype(jnp.float32) + (u.astype(jnp.float32) + c.astype(jnp.float32))
            rounded = exact.astype(p.dtype)
            delta = (rounded.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)
            # What optax.apply_updates computes; the buffer keeps whatever it
            # misses, so the sum stays right even where delta itself rounds.
            landed = jnp.asarray(p + delta).astype(p.dtype)
            return delta, (exact - landed.astype(jnp.float32)).astype(c.dtype)

        new_updates, compensation = map_unzip(leaf, 2, state.compensation, updates, params)
        return new_updates, CompensateRoundingState(compensation)

    return optax.GradientTransformation(init_fn, update_fn)


def state_bytes(state: Any) -> int:
    """Bytes held by the arrays of an optimizer state."""
    return sum(jnp.asarray(x).nbytes for x in jax.tree.leaves(state))
