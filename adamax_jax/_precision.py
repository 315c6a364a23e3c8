"""Precision policy: low-precision storage of ν, and compensated parameter updates."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from adamax_jax import _validation
from adamax_jax._sharding import reshard_like, zeros_like
from adamax_jax._tree import map_unzip


def below_32_bits(dtype: jax.typing.DTypeLike) -> bool:
    """Whether `dtype` is a real floating dtype narrower than float32 (bfloat16, float16)."""
    return jnp.dtype(dtype).itemsize < 4 and jnp.issubdtype(dtype, jnp.floating)


def store_moment(
    value: jax.Array, previous: jax.Array, seed: jax.typing.ArrayLike = 0
) -> jax.Array:
    """Rounds a new first moment to the storage dtype of `previous`.

    Where that dtype has fewer than 32 bits, rounding to nearest would send a
    moment that moved by less than half a unit in the last place back onto
    its previous value: a moment approaching a steady gradient stalls up to
    ``ulp / (2 (1 - β₁))`` short of it (2 to 4 % in bfloat16 for β₁ = 0.9,
    half the gradient for β₁ = 0.999), and every step taken from it is that
    much off. Moving such a store by a whole unit in the last place instead
    takes the moment to a steady gradient ``ulp / |Δ|`` times too fast (four
    times for β₁ = 0.999 in bfloat16), and rounding to nearest a move of
    between half a unit and one does the same. So every such store is rounded
    stochastically: to the representable value above or below, with the
    probabilities that make its expected value the new value. The moment then
    follows the exact recursion on average, with a zero-mean noise of about
    ``ulp / sqrt(6 (1 - β₁²))`` (0.4 % in bfloat16 for β₁ = 0.9). The draw is
    a hash of the previous value and `seed` (bits of the gradient and the step
    count, see :func:`seed`): deterministic, the same eagerly and compiled, and
    fresh at every step. A finite store beyond the dtype's range saturates at
    its largest finite value; inf and NaN are stored as they are. Stores of
    32 bits or more round to nearest.

    Its derivative is that of the value (the straight-through rule): the
    rounding itself has none.

    Args:
        value: The new moment, in the compute dtype (float32 or wider).
        previous: The stored moment of the last step.
        seed: uint32 bits, per element or one for all, that differ from step to
            step (:func:`seed`).

    Returns:
        The moment to store, in the dtype of `previous`.

    References:
        Gupta et al., `Deep Learning with Limited Numerical Precision
        <https://arxiv.org/abs/1502.02551>`_, 2015 (stochastic rounding).
    """
    if not below_32_bits(previous.dtype):
        return value.astype(previous.dtype)
    return _store_stochastic(value, previous, jnp.asarray(seed).astype(jnp.uint32))


def seed(
    gradient: jax.Array, count: jax.typing.ArrayLike, stream: jax.typing.ArrayLike = 0
) -> jax.Array:
    """uint32 bits per element for the rounding draws of one step.

    From the gradient's bits, the step count, the element's position in its
    leaf and the leaf's `stream` (its index in the tree): inputs of the step,
    so that an eager and a compiled step (whose float32 arithmetic may differ
    in the last bit) draw the same, and nothing is carried in the state. The
    position keeps equal values in different blocks or leaves (the zero
    gradients of unused embedding rows, say) from rounding alike; it is an
    iota, which the compiler partitions with the array, so that the draws do
    not depend on how the leaf is sharded.
    """
    g = gradient.real if jnp.iscomplexobj(gradient) else gradient
    bits = lax.bitcast_convert_type(g.astype(jnp.float32), jnp.uint32)
    position = jnp.zeros(g.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(g.ndim)):
        position = position + lax.broadcasted_iota(jnp.uint32, g.shape, axis) * jnp.uint32(
            stride & 0xFFFFFFFF
        )
        stride *= g.shape[axis]
    # Odd multipliers take distinct positions, leaves and counts to distinct
    # words; the one hash of the draw (:func:`_random_bits`) mixes them.
    where = (position + jnp.asarray(stream).astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)) * (
        jnp.uint32(0x27D4EB2F)
    )
    return bits ^ (jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)) ^ where


def _mix(h: jax.Array) -> jax.Array:
    """The finaliser of MurmurHash3: every input bit moves every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _random_bits(x: jax.Array, y: jax.Array, salt: jax.Array) -> jax.Array:
    """32 pseudo-random bits per element from the uint32 bits `x`, `y` and `salt`.

    A counter-based hash: deterministic, cheap, with no key to carry and no
    index, so that it follows any sharding.
    """
    return _mix(x ^ ((y << 13) | (y >> 19)) ^ (salt * jnp.uint32(0x9E3779B9)))


def uniform_hash(x: jax.Array, y: jax.Array) -> jax.Array:
    """A float32 in [0, 1) per element, from the uint32 bits `x` and `y`."""
    return (_random_bits(x, y, jnp.uint32(0)) >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


@jax.custom_jvp
def _store_stochastic(value: jax.Array, previous: jax.Array, salt: jax.Array) -> jax.Array:
    dtype = previous.dtype
    big = jnp.asarray(jnp.finfo(dtype).max, dtype)
    if dtype == jnp.bfloat16:
        # bfloat16 is the upper half of float32: adding 16 random bits below the cut and
        # truncating rounds the magnitude up exactly as often as the dropped part says.
        # It reads the value once, so that XLA fuses the store with the moment's update.
        bits = lax.bitcast_convert_type(value.astype(jnp.float32), jnp.uint32)
        prev = lax.bitcast_convert_type(previous, jnp.uint16).astype(jnp.uint32)
        noise = _random_bits(prev, salt, jnp.uint32(0)) >> 16
        rounded = lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
        # Exact in bfloat16 already. (A conversion, not a bit shift: XLA would
        # recompute a shift in the step that reads the stored μ, from the old
        # μ after the new one has been stored over it.)
        return saturate(rounded, value, jnp.float32(big)).astype(dtype)
    nearest = value.astype(dtype)
    here = nearest.astype(value.dtype)
    # The representable neighbour on the other side of the value.
    other = jnp.nextafter(nearest, jnp.where(value > here, jnp.inf, -jnp.inf).astype(dtype))
    gap = jnp.abs(other.astype(value.dtype) - here)
    # Taken with probability |value - nearest| / gap (at most 1/2): unbiased.
    prev = lax.bitcast_convert_type(previous, jnp.uint16).astype(jnp.uint32)
    draw = uniform_hash(prev, jnp.broadcast_to(salt, prev.shape)).astype(value.dtype)
    take = draw * gap < jnp.abs(value - here)
    return saturate(jnp.where(take, other, nearest), value, big)


def saturate(rounded: jax.Array, value: jax.Array, big: jax.typing.ArrayLike) -> jax.Array:
    """`rounded` held within ±`big` where `value` is finite; `value`'s inf or NaN elsewhere.

    A finite moment past a narrow dtype's range is held at its largest finite
    value; a non-finite one (from a non-finite gradient) is kept as it is, so
    that the steps taken from it stay non-finite, as optax's do, instead of
    continuing silently from a made-up value.
    """
    big = jnp.asarray(big, rounded.dtype)
    held = jnp.clip(rounded, -big, big)
    return jnp.where(jnp.isfinite(value), held, value.astype(held.dtype))


@_store_stochastic.defjvp
def _store_stochastic_jvp(primals, tangents):
    value, previous, salt = primals
    return _store_stochastic(value, previous, salt), tangents[0].astype(previous.dtype)


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

    Raises:
        ValueError: For a `dtype` that is not float16, bfloat16, float32 or
            float64 (a complex buffer would hold an imaginary part of a real
            parameter's rounding; compensated parameters are real).
    """
    _validation.check_dtype("dtype", dtype)
    if dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
        # Only real parameters below 32 bits are compensated (there is no 16-bit complex).
        raise ValueError(
            f"`dtype` got {dtype!r}: the compensation buffer is for real parameters below "
            "32 bits; use bfloat16, float16, float32 or float64 (or None, the parameter's)."
        )

    def init_fn(params: optax.Params) -> CompensateRoundingState:
        def init_leaf(p):
            if p is None or not below_32_bits(jnp.result_type(p)):
                return None
            return zeros_like(p, dtype or jnp.result_type(p))

        return CompensateRoundingState(jax.tree.map(init_leaf, params))

    def update_fn(
        updates: optax.Updates,
        state: CompensateRoundingState,
        params: optax.Params | None = None,
    ) -> tuple[optax.Updates, CompensateRoundingState]:
        if params is None:
            raise ValueError("`compensate_rounding` needs `params` in `update`.")
        _validation.check_same_structure("params", params, "updates", updates)

        def leaf(c, u, p):
            if c is None:
                return u, None
            # On Explicit axes the buffer's layout rules (ZeRO-1 splits it further).
            layout, u, p = u, reshard_like(u, c), reshard_like(p, c)
            exact = p.astype(jnp.float32) + (u.astype(jnp.float32) + c.astype(jnp.float32))
            rounded = exact.astype(p.dtype)
            delta = (rounded.astype(jnp.float32) - p.astype(jnp.float32)).astype(p.dtype)
            # What optax.apply_updates computes; the buffer keeps whatever it
            # misses, so the sum stays right even where delta itself rounds.
            # reduce_precision rounds as the separate add will: compiled, a
            # plain `p + delta` here may be kept in float32 (XLA's excess
            # precision), and at a tie the buffer would then be off by half a
            # unit in the last place.
            info = jnp.finfo(p.dtype)
            landed = lax.reduce_precision(
                p.astype(jnp.float32) + delta.astype(jnp.float32),
                exponent_bits=info.nexp,
                mantissa_bits=info.nmant,
            )
            return reshard_like(delta, layout), (exact - landed).astype(c.dtype)

        new_updates, compensation = map_unzip(leaf, 2, state.compensation, updates, params)
        return new_updates, CompensateRoundingState(compensation)

    # optax types a state as an array tree (`chex.ArrayTree`), which has no room for a
    # NamedTuple state with `None` fields, nor for an update that names its state type.
    return optax.GradientTransformation(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def state_bytes(state: Any) -> int:
    """Bytes held by the arrays of an optimizer state."""
    return sum(jnp.asarray(x).nbytes for x in jax.tree.leaves(state))
