"""How the moments are stored: one codec per storage kind, named in the state it writes.

The equations (:func:`adamax_jax._core.adamax_leaf`) work on moments in the
compute dtype and know nothing of storage. A codec turns a stored moment into
values (``decode``) and values back into storage (``encode``); its rounding
rules are written once, here. A moment stored in 32 bits or more is a plain
array holding the moment itself, as in optax. A moment that needs a scale to
be stored correctly is an :class:`EncodedMoment`, which carries the scale and
the name of the codec that wrote it, so that a cast, a conversion or a restore
either keeps its meaning or is refused; it is never reinterpreted silently.
"""

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adamax_jax._precision import below_32_bits, store_moment
from adamax_jax._sharding import zeros_like

Role = Literal["mu", "nu"]

SCALED = "scaled"
CODECS: tuple[str, ...] = (SCALED,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncodedMoment:
    """A moment stored with a scale, and the name of the codec that wrote it.

    With the "scaled" codec (bfloat16 and float16 ν, float16 μ) the moment is
    ``codes · scale``, computed in float32. Any floating dtype of ``codes``
    keeps that meaning, so ``optax.tree.cast`` of a state changes its
    precision but not its values.

    Attributes:
        codes: The stored values, shaped like the parameter.
        scale: A float32 scalar, at least 1.
        codec: The codec that wrote it (static pytree metadata).
    """

    codes: jax.Array
    scale: jax.Array
    codec: str = dataclasses.field(default=SCALED, metadata={"static": True})

    # A leaf of parameter-shaped trees (see adamax_jax._tree.is_leaf).
    __adamax_moment__ = True

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the moment (that of its parameter)."""
        return tuple(self.codes.shape)


def is_encoded(x: Any) -> bool:
    """Whether `x` is an :class:`EncodedMoment`."""
    return isinstance(x, EncodedMoment)


def codec_for(storage_dtype: jax.typing.DTypeLike, role: Role) -> str | None:
    """The codec of a moment stored in `storage_dtype`, or None for a plain array.

    ν below 32 bits is scaled, so that its per-step decay (far below half a unit
    in the last place for the usual β₂) is not rounded away. μ below 32 bits is
    a plain array: its rounding rule needs no scale.
    """
    dtype = jnp.dtype(storage_dtype)
    if role == "nu" and below_32_bits(dtype):
        return SCALED
    return None


def init_moment(p: Any, storage_dtype: jax.typing.DTypeLike, role: Role) -> Any:
    """A zero moment for parameter `p` (an array or ``jax.ShapeDtypeStruct``)."""
    dtype = jnp.dtype(storage_dtype)
    codes = zeros_like(p, dtype)
    if codec_for(dtype, role) is None:
        return codes
    return EncodedMoment(codes=codes, scale=jnp.ones([], jnp.float32), codec=SCALED)


def stored_values(x: Any) -> jax.Array:
    """The parameter-shaped array of a stored moment: its codes, or the plain array."""
    return x.codes if is_encoded(x) else x


def storage_dtype(x: Any) -> jnp.dtype:
    """The dtype a moment's values are stored in."""
    return jnp.dtype((x.codes if is_encoded(x) else x).dtype)


def check_moment(x: Any, where: str, role: Role) -> None:
    """Refuses a stored moment whose layout contradicts what its dtypes need.

    Args:
        x: A plain array or an :class:`EncodedMoment`.
        where: Its name in the state, for the message (e.g. ``state.nu['w']``).
        role: "mu" or "nu".

    Raises:
        ValueError: If the moment cannot be read as it was written.
    """
    convert = (
        "Build the state with `opt.init`, or convert one with `adamax_jax.convert_state(state, "
        "opt, params)`."
    )
    if not is_encoded(x):
        dtype = jnp.dtype(x.dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"`{where}` is a {dtype} array; a moment must be floating point.")
        if codec_for(dtype, role) is not None:
            raise ValueError(
                f"`{where}` is a plain {dtype} array. A {role} stored in {dtype} must carry "
                "its scale (an `EncodedMoment`, as `opt.init` makes it), or its decay would "
                f"round away and it would never decrease. {convert}"
            )
        return
    if x.codec not in CODECS:
        raise ValueError(f"`{where}` was written by an unknown codec {x.codec!r}. {convert}")
    codes, scale = jnp.dtype(x.codes.dtype), jnp.dtype(x.scale.dtype)
    if not jnp.issubdtype(codes, jnp.floating):
        raise ValueError(
            f"`{where}.codes` is {codes}, but the {x.codec!r} codec stores a real floating "
            f"dtype: a cast changed it. {convert}"
        )
    if scale != jnp.float32 or jnp.shape(x.scale) != ():
        raise ValueError(
            f"`{where}.scale` must be a float32 scalar, got {scale} of shape "
            f"{jnp.shape(x.scale)}: a cast changed it (cast the state back, or convert it). "
            f"{convert}"
        )


def decode(x: Any, dtype: jax.typing.DTypeLike) -> jax.Array:
    """The moment's values in `dtype` (the compute dtype)."""
    if not is_encoded(x):
        return x.astype(dtype)
    rdt = jnp.finfo(dtype).dtype
    value = x.codes.astype(dtype) * x.scale.astype(rdt).astype(dtype)
    # A code rounded up next to the largest finite value can read back past it;
    # the moment it stands for cannot, so neither does its value.
    big = jnp.asarray(jnp.finfo(rdt).max, rdt).astype(value.dtype)
    return jnp.clip(value, -big, big)


def _pow2_at_least(ratio: jax.Array) -> jax.Array:
    """The smallest power of two ``2^j >= ratio`` with ``j >= 0``, in float32."""
    mantissa, exponent = jnp.frexp(jnp.maximum(ratio, jnp.float32(1)))
    # ratio = mantissa · 2^exponent with mantissa in [0.5, 1): exactly a power
    # of two where the mantissa is 0.5.
    j = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return jnp.ldexp(jnp.float32(1), j)


def next_scale(x: Any, role: Role, b2: jax.typing.ArrayLike) -> jax.Array | None:
    """The scale for this step's store of a scaled ν; None for a plain moment.

    The decay is carried by the scale: ``s' = s β₂ 2^j`` with ``j >= 0`` the
    smallest that keeps ``s' >= 1``, so that a stored value that is not
    replaced is multiplied by the exact power of two ``2^-j`` (once every
    ``log 2 / -log β₂`` steps) and keeps its bits.

    Args:
        x: The stored moment.
        role: "mu" or "nu".
        b2: β₂.

    Returns:
        A float32 scalar, or None.
    """
    if not is_encoded(x):
        return None
    scale = x.scale.astype(jnp.float32)
    decayed = scale * jnp.asarray(b2, jnp.float32) if role == "nu" else scale
    # β₂ = 0 leaves nothing to decay: any scale will do; take 1.
    positive = decayed > 0
    base = jnp.where(positive, decayed, jnp.float32(1))
    return jnp.where(positive, base * _pow2_at_least(1 / base), jnp.float32(1))


@jax.custom_jvp
def _next_up(x: jax.Array) -> jax.Array:
    """The next representable value above a finite, non-negative `x`."""
    bits = lax.bitcast_convert_type(x, _uint_of(x.dtype))
    return lax.bitcast_convert_type(bits + 1, x.dtype)


@_next_up.defjvp
def _next_up_jvp(primals, tangents):
    # Rounding has no useful derivative; the straight-through rule passes the
    # tangent of the value on, as the store of the value would.
    (x,), (dx,) = primals, tangents
    return _next_up(x), dx


def _uint_of(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def _saturate(codes: jax.Array) -> jax.Array:
    """Keeps a store finite: beyond the largest finite value, that value."""
    big = jnp.asarray(jnp.finfo(codes.dtype).max, codes.dtype)
    return jnp.clip(codes, -big, big)


def encode(
    value: jax.Array,
    previous: Any,
    role: Role,
    scale: jax.Array | None,
    floor: jax.Array | None = None,
    salt: jax.typing.ArrayLike = 0,
) -> Any:
    """Stores `value` in the layout and dtype of `previous`.

    μ below 32 bits is rounded by :func:`adamax_jax._precision.store_moment`
    (to nearest, but never stalled). ν is rounded to nearest and then, where
    the stored value would read back below `floor` (this step's ``|g|``, + ε
    where ε is inside the max), moved up one unit in the last place: a stored ν
    never comes back below the gradient it holds, so no later step exceeds the
    step bound. A store beyond the storage dtype's range saturates at its
    largest finite value (only bfloat16 can be reached, by float32 gradients
    within 0.4 % of float32's maximum).

    Args:
        value: The new moment, in the compute dtype.
        previous: The stored moment of the last step.
        role: "mu" or "nu".
        scale: :func:`next_scale` of `previous`.
        floor: The least value a stored ν may read back as.
        salt: Differs from step to step (the count), for μ's rounding draw.

    Returns:
        The stored moment, in the layout of `previous`.
    """
    plain = previous.codes if is_encoded(previous) else previous
    dtype = plain.dtype
    if is_encoded(previous):
        rdt = jnp.finfo(value.dtype).dtype
        value = value / scale.astype(rdt).astype(value.dtype)
        if floor is not None:
            floor = floor / scale.astype(rdt)
    if role == "mu":
        codes = store_moment(value, plain, salt)
    else:
        codes = value.astype(dtype)
        if floor is not None and below_32_bits(dtype) and not jnp.iscomplexobj(codes):
            codes = jnp.where(codes.astype(floor.dtype) < floor, _next_up(codes), codes)
    if below_32_bits(dtype):
        codes = _saturate(codes)
    if is_encoded(previous):
        return EncodedMoment(codes=codes, scale=scale, codec=previous.codec)
    return codes


def barrier(m: Any, v: Any) -> tuple[Any, Any]:
    """An optimization barrier over two stored moments (plain or encoded)."""
    return lax.optimization_barrier((m, v))


def nbytes_per_value(x: Any) -> float:
    """Bytes of storage per value of a moment, scales included."""
    leaves = jax.tree.leaves(x)
    size = np.prod(jnp.shape(x.codes if is_encoded(x) else x)) or 1
    return sum(jnp.dtype(leaf.dtype).itemsize * np.prod(jnp.shape(leaf)) for leaf in leaves) / size


def from_value(value: jax.Array, template: Any, role: Role) -> Any:
    """Stores moment values `value` in the layout and dtype of `template`, from scratch.

    Used to convert a state written in another layout: a plain array takes the
    values rounded to its dtype; an encoded one starts from a fresh scale.
    """
    if not is_encoded(template):
        return value.astype(template.dtype)
    mag = jnp.abs(value)
    fresh = EncodedMoment(
        codes=template.codes, scale=jnp.ones([], jnp.float32), codec=template.codec
    )
    scale = next_scale(fresh, role, 1.0)
    return encode(value, fresh, role, scale, floor=mag if role == "nu" else None)
