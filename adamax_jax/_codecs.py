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

from adamax_jax._precision import below_32_bits, store_moment, uniform_hash
from adamax_jax._sharding import zeros_like

Role = Literal["mu", "nu"]

SCALED = "scaled"
BLOCKWISE = "blockwise"
CODECS: tuple[str, ...] = (SCALED, BLOCKWISE)

# 8-bit storage dtypes, stored block-wise; uint8 only for ν, which is never negative.
EIGHT_BIT: tuple[jnp.dtype, ...] = tuple(
    jnp.dtype(d) for d in (jnp.int8, jnp.uint8, jnp.float8_e4m3fn, jnp.float8_e5m2)
)
# Leaves with fewer values keep their 8-bit moments as plain float32 arrays, as
# bitsandbytes keeps tensors under 4096 values in 32 bits: their scales would
# cost more than the bytes saved, and biases and norms are where precision
# counts most.
MIN_BLOCKWISE_SIZE = 4096
# Nor is a leaf whose last axis holds fewer values than this (or than the block size, if
# smaller) block-wise: a float32 scale for every few values would cost more than float32.
MIN_BLOCK_VALUES = 32
DEFAULT_BLOCK_SIZE = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncodedMoment:
    """A moment stored with a scale, and the name of the codec that wrote it.

    With the "scaled" codec (bfloat16 and float16 ν, float16 μ) the moment is
    ``codes · scale``, computed in float32. Any floating dtype of ``codes``
    keeps that meaning, so ``optax.tree.cast`` of a state changes its
    precision but not its values.

    With the "blockwise" codec (8-bit storage: int8, uint8, float8_e4m3fn,
    float8_e5m2) the last axis is cut into blocks of ``block_size`` values,
    each with its own float32 scale, and the moment is ``map(codes) · scale``
    of its block; ``map`` is float8's own value for float8 codes and a
    logarithmic map for int8 and uint8 (see :func:`adamax_jax.scale_by_adamax`).

    Attributes:
        codes: The stored values, shaped like the parameter.
        scale: "scaled": a float32 scalar, at least 1. "blockwise": float32 of
            shape ``codes.shape[:-1] + (ceil(codes.shape[-1] / block_size),)``.
        codec: The codec that wrote it (static pytree metadata).
        block_size: The values per block of the "blockwise" codec (static
            pytree metadata); None for "scaled".
    """

    codes: jax.Array
    scale: jax.Array
    codec: str = dataclasses.field(default=SCALED, metadata={"static": True})
    block_size: int | None = dataclasses.field(default=None, metadata={"static": True})

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
    a plain array: its rounding rule needs no scale. 8-bit storage is block-wise.
    """
    dtype = jnp.dtype(storage_dtype)
    if dtype in EIGHT_BIT:
        return BLOCKWISE
    if role == "nu" and below_32_bits(dtype):
        return SCALED
    return None


def _block_scales(p: Any, block_size: int, fill: float) -> jax.Array:
    """Float32 `fill` shaped ``p.shape[:-1] + (n_blocks,)``, sharded like `p` where it can be."""
    shape = tuple(p.shape[:-1]) + (-(-p.shape[-1] // block_size),)
    if isinstance(p, jax.ShapeDtypeStruct):
        sharding = getattr(p, "sharding", None)
        if sharding is not None:
            try:
                return jnp.full(shape, fill, jnp.float32, device=sharding)
            except ValueError:
                pass
        return jnp.full(shape, fill, jnp.float32)
    # One value per block, read from `p`, so that under jit the scales follow
    # the sharding of the parameter along every axis.
    return zeros_like(jnp.asarray(p)[..., ::block_size], jnp.dtype(jnp.float32)) + jnp.float32(fill)


def init_moment(
    p: Any, storage_dtype: jax.typing.DTypeLike, role: Role, block_size: int = DEFAULT_BLOCK_SIZE
) -> Any:
    """A zero moment for parameter `p` (an array or ``jax.ShapeDtypeStruct``).

    8-bit storage is block-wise with `block_size` values a block along the
    last axis, except for leaves of fewer than :data:`MIN_BLOCKWISE_SIZE`
    values, and leaves whose last axis is shorter than :data:`MIN_BLOCK_VALUES`
    (or the block size, if smaller), which are plain float32 arrays.
    """
    dtype = jnp.dtype(storage_dtype)
    if dtype in EIGHT_BIT:
        short = len(p.shape) == 0 or p.shape[-1] < min(block_size, MIN_BLOCK_VALUES)
        if int(np.prod(p.shape)) < MIN_BLOCKWISE_SIZE or short:
            return zeros_like(p, jnp.dtype(jnp.float32))
        return EncodedMoment(
            codes=zeros_like(p, dtype),
            # ν's scale 0: a block that holds nothing yet (see _encode_blockwise).
            scale=_block_scales(p, block_size, 0.0 if role == "nu" else 1.0),
            codec=BLOCKWISE,
            block_size=block_size,
        )
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
    if x.codec == BLOCKWISE:
        _check_blockwise(x, where, role, convert)
        return
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


def _check_blockwise(x: Any, where: str, role: Role, convert: str) -> None:
    codes = jnp.dtype(x.codes.dtype)
    allowed = [d for d in EIGHT_BIT if role == "nu" or d != jnp.uint8]
    if codes not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(
            f"`{where}.codes` is {codes}, but the 'blockwise' codec stores a {role} in one of "
            f"{names}: a cast changed it. {convert}"
        )
    bs = x.block_size
    shape = tuple(jnp.shape(x.codes))
    if not isinstance(bs, int) or bs < 1 or not shape:
        raise ValueError(
            f"`{where}` has block size {bs!r} for codes of shape {shape}; the 'blockwise' "
            f"codec needs a positive block size and at least one axis. {convert}"
        )
    want = shape[:-1] + (-(-shape[-1] // bs),)
    scale = jnp.dtype(x.scale.dtype)
    if scale != jnp.float32 or tuple(jnp.shape(x.scale)) != want:
        raise ValueError(
            f"`{where}.scale` must be float32 of shape {want} (one per block of {bs} along "
            f"the last axis), got {scale} of shape {tuple(jnp.shape(x.scale))}. {convert}"
        )


def decode(x: Any, dtype: jax.typing.DTypeLike) -> jax.Array:
    """The moment's values in `dtype` (the compute dtype)."""
    if not is_encoded(x):
        return x.astype(dtype)
    if x.codec == BLOCKWISE:
        return _decode_blockwise(x, dtype)
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
    if x.codec == BLOCKWISE:
        # μ takes a fresh scale from its values in `encode`; ν's decays here.
        return scale * jnp.asarray(b2, jnp.float32) if role == "nu" else scale
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

    μ below 32 bits is rounded stochastically, unbiased
    (:func:`adamax_jax._precision.store_moment`; block-wise codes likewise).
    ν is rounded to nearest and then, where
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
        salt: uint32 bits for μ's rounding draw (:func:`adamax_jax._precision.seed`).

    Returns:
        The stored moment, in the layout of `previous`.
    """
    if is_encoded(previous) and previous.codec == BLOCKWISE:
        assert scale is not None
        return _encode_blockwise(value, previous, role, scale, floor, salt)
    plain = previous.codes if is_encoded(previous) else previous
    dtype = plain.dtype
    if is_encoded(previous):
        assert scale is not None
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
        assert scale is not None
        return EncodedMoment(codes=codes, scale=scale, codec=previous.codec)
    return codes


def barrier(m: Any, v: Any) -> tuple[Any, Any]:
    """An optimization barrier over two stored moments (plain or encoded)."""
    return lax.optimization_barrier((m, v))


def from_value(value: jax.Array, template: Any, role: Role) -> Any:
    """Stores moment values `value` in the layout and dtype of `template`, from scratch.

    Used to convert a state written in another layout: a plain array takes the
    values rounded to its dtype; an encoded one starts from a fresh scale.
    """
    if not is_encoded(template):
        return value.astype(template.dtype)
    mag = jnp.abs(value)
    fresh = EncodedMoment(
        codes=jnp.zeros_like(template.codes),
        scale=(jnp.zeros_like if role == "nu" else jnp.ones_like)(template.scale),
        codec=template.codec,
        block_size=template.block_size,
    )
    scale = next_scale(fresh, role, 1.0)
    return encode(value, fresh, role, scale, floor=mag if role == "nu" else None)


# ---------------------------------------------------------------------------
# The "blockwise" codec: 8-bit codes, one float32 scale per block of the last axis.


@dataclasses.dataclass(frozen=True)
class _CodeMap:
    """How 8-bit codes map to values, through a signed, monotone integer rank.

    The rank of a code is its magnitude index (0 for zero, ``top`` for the
    largest) with the code's sign. Ranks are what the rounding rules move: one
    rank up is the next larger value, in every map.
    """

    top: int  # the largest magnitude index
    signed: bool
    log_steps: int | None  # codes per doubling of the logarithmic map; None for float8


_MAPS: dict[jnp.dtype, _CodeMap] = {
    # Logarithmic maps: magnitude k > 0 is 2^((k - top) / log_steps + 4) of the
    # block's scale. int8 spans 2^25 below the block's largest value with codes
    # 14.9 % apart (μ's values in a block span more than ν's need: a μ below
    # the range is 0 and stops its parameter); uint8, for ν, spends the sign
    # bit on resolution: 2^18 with codes 5.1 % apart.
    jnp.dtype(jnp.int8): _CodeMap(top=127, signed=True, log_steps=5),
    jnp.dtype(jnp.uint8): _CodeMap(top=255, signed=False, log_steps=14),
    # float8: the dtype's own values; the magnitude index is the bit pattern
    # without the sign (0x7F is NaN in e4m3fn, 0x7C infinity in e5m2).
    jnp.dtype(jnp.float8_e4m3fn): _CodeMap(top=0x7E, signed=True, log_steps=None),
    jnp.dtype(jnp.float8_e5m2): _CodeMap(top=0x7B, signed=True, log_steps=None),
}


def code_step(storage: jax.typing.DTypeLike) -> float:
    """The largest ratio between neighbouring nonzero values of an 8-bit code map.

    A ν stored in `storage` reads back at most this factor above the value
    it holds (within the map's range); a rounded μ is off by at most half of
    it. 2^(1/5) for int8, 2^(1/14) for uint8, 1 + 2^-3 for float8_e4m3fn and
    1 + 2^-2 for float8_e5m2 (their normal range).
    """
    cmap = _MAPS[jnp.dtype(storage)]
    if cmap.log_steps is not None:
        return float(2.0 ** (1.0 / cmap.log_steps))
    return 1.0 + 2.0 ** -int(jnp.finfo(storage).nmant)


# The largest code of a logarithmic map is worth 2^4 block scales, so that a
# block holding values up to float32's maximum has a scale whose reciprocal is
# still a normal number (XLA divides by a broadcast scale through its
# reciprocal, and flushes subnormals to zero).
_LOG_TOP_EXPONENT = 4


def _top_value(cmap: _CodeMap, dtype: jnp.dtype) -> float:
    if cmap.log_steps is not None:
        return float(2**_LOG_TOP_EXPONENT)
    return float(jnp.finfo(dtype).max)


def _rank(codes: jax.Array) -> jax.Array:
    """The signed magnitude index of each code, as int32."""
    dtype = jnp.dtype(codes.dtype)
    if _MAPS[dtype].log_steps is not None:
        return codes.astype(jnp.int32)
    bits = lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.int32)
    magnitude = bits & 0x7F
    return jnp.where(bits >= 0x80, -magnitude, magnitude)


def _codes(rank: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Codes of `dtype` from signed magnitude indices (inverse of :func:`_rank`)."""
    if _MAPS[dtype].log_steps is not None:
        return rank.astype(dtype)
    bits = jnp.abs(rank) | jnp.where(rank < 0, 0x80, 0)
    return lax.bitcast_convert_type(bits.astype(jnp.uint8), dtype)


def _value_of_rank(rank: jax.Array, storage: jnp.dtype, dtype: jnp.dtype) -> jax.Array:
    """The value of signed magnitude index `rank` in units of the block scale."""
    cmap = _MAPS[storage]
    if cmap.log_steps is None:
        return _codes(rank, storage).astype(dtype)
    k = jnp.abs(rank)
    exponent = (k - cmap.top).astype(dtype) / cmap.log_steps + _LOG_TOP_EXPONENT
    magnitude = jnp.where(k == 0, jnp.zeros((), dtype), jnp.exp2(exponent))
    return jnp.where(rank < 0, -magnitude, magnitude)


def _nearest_rank(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    """The rank of the code nearest to `x` (in units of the block scale).

    float8 rounds to nearest even; the logarithmic maps round to nearest on a
    logarithmic scale. Values beyond the largest code saturate.
    """
    cmap = _MAPS[storage]
    if cmap.log_steps is None:
        big = jnp.asarray(jnp.finfo(storage).max, x.dtype)
        return _rank(jnp.clip(x, -big, big).astype(storage))
    a = jnp.abs(x)
    positive = a > 0
    exponent = jnp.log2(jnp.where(positive, a, jnp.ones((), a.dtype)))
    k = jnp.round(cmap.top + cmap.log_steps * (exponent - _LOG_TOP_EXPONENT))
    k = jnp.where(positive, jnp.clip(k, 0, cmap.top), 0).astype(jnp.int32)
    return jnp.where(x < 0, -k, k)


def _round_up_rank(
    target: jax.Array, rank: jax.Array, storage: jnp.dtype, scale: jax.Array, tolerance: float
) -> jax.Array:
    """`rank` (within one code of non-negative `target`), moved up where it reads back below.

    The value read back is computed as :func:`decode` computes it (the code's
    value times the block's `scale`, broadcast). With a `tolerance`
    (relative), values within it below `target` count as `target`: a code
    decayed by its scale reads back a few float32 roundings off the value it
    stands for, and must not be pushed up a code for it.
    """
    cmap = _MAPS[storage]
    back = _times_scale(_value_of_rank(rank, storage, target.dtype), scale)
    below = back < target * jnp.asarray(1 - tolerance, target.dtype)
    return jnp.where(below, jnp.minimum(rank + 1, cmap.top), rank)


def _times_scale(values: jax.Array, scale: jax.Array) -> jax.Array:
    """Code values times their block scale, saturating at the dtype's largest finite value.

    A block whose largest value is near float32's maximum has a scale up to
    twice as large as that value needs; its top codes would read back as
    infinity.
    """
    big = jnp.asarray(jnp.finfo(values.dtype).max, values.dtype)
    return jnp.clip(values * scale, -big, big)


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`x` with its last axis cut into blocks: shape ``(..., n_blocks, block_size)``."""
    n = x.shape[-1]
    # A last axis shorter than a block is one block, with nothing to pad.
    block_size = min(block_size, n)
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(x.shape[:-1] + (n_blocks, block_size))


def _from_blocks(x: jax.Array, n: int) -> jax.Array:
    x = x.reshape(x.shape[:-2] + (-1,))
    return x if x.shape[-1] == n else x[..., :n]


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def _pow2(j: jax.Array) -> jax.Array:
    """``2^j`` in float32 for integer ``j`` in [-126, 127], built from its bits."""
    return lax.bitcast_convert_type((j + 127) << 23, jnp.float32)


def _split_mantissa(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x = m · 2^e`` with ``m`` in [1, 2), for positive normal float32 `x`."""
    bits = _bits(x)
    e = ((bits >> 23) & 0xFF) - 127
    m = lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, jnp.float32)
    return m, e


def _fit(peak: jax.Array, base: jax.Array, top: float) -> jax.Array:
    """``base · 2^j`` for the least integer ``j`` with ``peak <= top · base · 2^j``.

    Exponents and mantissas are taken from the bits (the scales are normal
    float32 numbers): a handful of integer operations a block, where
    ``jnp.frexp`` and ``jnp.ldexp`` cost many more and make a step over many
    leaves slow to compile. The ratio of the mantissas stays small, so that
    nothing overflows; the result saturates within [2^-126, 2^126].
    """
    f32 = jnp.float32
    tiny = f32(jnp.finfo(f32).tiny)
    pm, pe = _split_mantissa(jnp.maximum(peak.astype(f32), tiny))
    bm, be = _split_mantissa(jnp.maximum(base.astype(f32), tiny))
    # r in (1 / (2 top), 2 / top]: 2^j_small >= r for the least such j_small.
    rm, re = _split_mantissa(pm / (bm * f32(top)))
    j = pe - be + re + (rm > 1).astype(jnp.int32)
    j = jnp.clip(j, -250, 250)
    half = j // 2
    scale = (
        base.astype(f32) * _pow2(jnp.clip(half, -126, 127)) * _pow2(jnp.clip(j - half, -126, 127))
    )
    # Both the scale and its reciprocal stay normal numbers.
    return jnp.clip(scale, f32(2.0**-126), f32(2.0**126))


def _decode_blockwise(x: "EncodedMoment", dtype: jax.typing.DTypeLike) -> jax.Array:
    dtype = jnp.dtype(dtype)
    storage = jnp.dtype(x.codes.dtype)
    assert x.block_size is not None
    blocks = _to_blocks(x.codes, x.block_size)
    values = _value_of_rank(_rank(blocks), storage, dtype)
    scale = x.scale.astype(jnp.float32).astype(dtype)[..., None]
    return _from_blocks(_times_scale(values, scale), x.codes.shape[-1])


def _encode_blockwise(
    value: jax.Array,
    previous: "EncodedMoment",
    role: Role,
    base: jax.Array,
    floor: jax.Array | None,
    salt: jax.typing.ArrayLike = 0,
) -> "EncodedMoment":
    """Stores `value` block-wise in the codes dtype of `previous`.

    μ: each block's scale is the least power of two that holds its largest
    value; codes round stochastically to one of the two codes around the
    value, with the probabilities that make the stored value right on average
    (as 16-bit μ does, see :func:`adamax_jax._precision.store_moment`): a code
    rounded to nearest stalls short of a steady gradient, and one moved a whole
    code whenever it would stall runs ahead of it.

    ν: `base` is the previous scale times β₂, so that a code carried over reads
    back exactly decayed; it grows by the least power of two that holds the
    largest `floor` of the block (a block of zeros takes a fresh power of two).
    Codes round up: no value reads back below `floor`, nor (within float32
    rounding) below the decayed value it stands for.
    """
    storage = jnp.dtype(previous.codes.dtype)
    cmap = _MAPS[storage]
    bs = previous.block_size
    assert bs is not None
    n = previous.codes.shape[-1]
    cdt = jnp.dtype(value.dtype)
    top = _top_value(cmap, storage)
    vb = _to_blocks(value, bs)
    if role == "mu":
        peak = jnp.max(jnp.abs(vb), axis=-1).astype(jnp.float32)
        scale = jnp.where(peak > 0, _fit(peak, jnp.ones_like(peak), top), jnp.float32(1))
        s = scale.astype(cdt)[..., None]
        # Multiplied by the reciprocal (exact: a power of two), as jit would
        # compute a division, so that eager and compiled steps agree.
        inv = (1 / scale).astype(cdt)[..., None]
        x = vb * inv
        rank = _nearest_rank(x, storage)
        # The code on the other side of the value, taken with probability
        # |x - nearest| / (the gap between the two): unbiased.
        near = _value_of_rank(rank, storage, cdt)
        lowest = -cmap.top if cmap.signed else 0
        other = jnp.clip(rank + jnp.where(x > near, 1, -1), lowest, cmap.top)
        gap = jnp.abs(_value_of_rank(other, storage, cdt) - near)
        seed = jnp.broadcast_to(jnp.asarray(salt).astype(jnp.uint32), value.shape)
        previous_bits = _rank(_to_blocks(previous.codes, bs)).astype(jnp.uint32)
        draw = uniform_hash(previous_bits, _to_blocks(seed, bs)).astype(cdt)
        # Not to or from the zero code: below a block's smallest code the gap to it is
        # many times the value, and a draw that lands there would make a step of many
        # learning rates; such a value rounds to nearest (0, or that code).
        inside = (rank != 0) & (other != 0)
        rank = jnp.where(inside & (draw * gap < jnp.abs(x - near)), other, rank)
    else:
        fb = vb if floor is None else _to_blocks(floor.astype(cdt), bs)
        base = base.astype(jnp.float32)
        # max with the zeros of `base`: the gradient's peaks take the state's
        # sharding (on Explicit mesh axes a select needs it in every operand).
        peak = jnp.maximum(jnp.max(fb, axis=-1).astype(jnp.float32), jnp.zeros_like(base))
        # A scale of 0 marks a block that holds nothing yet (a fresh state, or
        # one decayed below float32's normal range): it takes a fresh power of
        # two from its first nonzero gradient.
        tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
        zero = jnp.zeros_like(base)
        fresh = jnp.where(peak > 0, _fit(peak, jnp.ones_like(base), top), zero)
        kept = jnp.where(peak > base * jnp.float32(top), _fit(peak, base, top), base)
        scale = jnp.where(base >= tiny, kept, fresh)
        s = scale.astype(cdt)[..., None]
        # The reciprocal of the scale, computed once, as jit computes a division
        # by it; the rounding up below compares values read back as decode reads them.
        inv = (1 / jnp.maximum(scale, tiny)).astype(cdt)[..., None]
        # One rounding up serves both bounds: never below this step's floor,
        # nor (within float32 rounding) below the decayed value carried over.
        target = jnp.maximum(fb, vb * jnp.asarray(1 - 2.0**-16, cdt))
        rank = _round_up_rank(target, _nearest_rank(vb * inv, storage), storage, s, 0.0)
    codes = _from_blocks(_codes(rank, storage), n)
    return EncodedMoment(codes=codes, scale=scale, codec=BLOCKWISE, block_size=bs)
