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
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adamax_jax._precision import _random_bits, below_32_bits, saturate, store_moment
from adamax_jax._sharding import explicit_sharding, zeros_like

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

    With the "scaled" codec (bfloat16 and float16 ν; a 16-bit μ is a plain
    array) the moment is ``codes · scale``, computed in float32. Any floating dtype of ``codes``
    keeps that meaning, so ``optax.tree.cast`` of a state changes its
    precision but not its values.

    With the "blockwise" codec (8-bit storage: int8, uint8, float8_e4m3fn,
    float8_e5m2) the last axis is cut into blocks of ``block_size`` values,
    each with its own float32 scale, and the moment is ``map(codes) · scale``
    of its block; ``map`` is float8's own value for float8 codes, and for
    int8 and uint8 a map with L codes evenly spaced in every doubling (see
    :func:`adamax_jax.scale_by_adamax`).

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
    # the sharding of the parameter along every axis. On Explicit axes the
    # slice names its sharding, that of `p` (its shards hold whole blocks, see
    # _validation.check_block_shards), or an eager slice is refused.
    p = jnp.asarray(p)
    explicit = explicit_sharding(p)
    if explicit is None:
        firsts = p[..., ::block_size]
    else:
        firsts = p.at[..., ::block_size].get(out_sharding=explicit)
    return zeros_like(firsts, jnp.dtype(jnp.float32)) + jnp.float32(fill)


def is_blockwise(shape: tuple[int, ...], block_size: int) -> bool:
    """Whether 8-bit moments of a parameter of `shape` are stored block-wise.

    Not for leaves of fewer than :data:`MIN_BLOCKWISE_SIZE` values, nor for
    leaves whose last axis is shorter than :data:`MIN_BLOCK_VALUES` (or than
    the block size, if smaller): those are plain float32 arrays.
    """
    if len(shape) == 0 or shape[-1] < min(block_size, MIN_BLOCK_VALUES):
        return False
    return int(np.prod(shape)) >= MIN_BLOCKWISE_SIZE


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
        if not is_blockwise(tuple(p.shape), block_size):
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


def split_moment(x: Any) -> tuple[Any, Any]:
    """A stored moment as the two arrays the state keeps: values (or codes), and scale or None."""
    if is_encoded(x):
        return x.codes, x.scale
    return x, None


def join_moment(
    values: Any, scale: Any, where: str, role: Role, block_size: int | None, expected: int | None
) -> Any:
    """The stored moment that `values` and `scale` (from the state's two trees) make.

    The codec is read from what a checkpoint keeps: no scale is a plain array;
    a scalar scale is the "scaled" codec; a scale with the codes' rank is the
    "blockwise" codec, in blocks of the state's `block_size` (the length of its
    ``block_size`` array).

    Args:
        values: The array of ``state.mu`` or ``state.nu`` for one parameter.
        scale: The matching array of ``state.mu_scale`` or ``state.nu_scale``, or None.
        where: The moment's path, for messages (``state.nu['w']``).
        role: "mu" or "nu".
        block_size: The block size the state records, or None where it records none.
        expected: The block size of the optimizer that reads it (None: any).

    Raises:
        ValueError: If the pair cannot be read as it was written, or was written
            in blocks of another size.
    """
    if scale is None:
        return values
    convert = (
        "Build the state with `opt.init`, or convert one with `adamax_jax.convert_state(state, "
        "opt, params)`."
    )
    if not (hasattr(scale, "shape") and hasattr(values, "shape")):
        raise ValueError(f"`{where}` and its scale must be arrays. {convert}")
    if jnp.ndim(scale) == 0:
        return EncodedMoment(codes=values, scale=scale, codec=SCALED)
    if block_size is None:
        raise ValueError(
            f"`{where}` has block scales of shape {tuple(jnp.shape(scale))}, but the state "
            f"records no block size (`block_size` is None). {convert}"
        )
    if expected is not None and block_size != expected:
        # Blocks of another size would read every scale against the wrong values.
        raise ValueError(
            f"`{where}` was written in blocks of {block_size} values, but this optimizer's "
            f"`block_size` is {expected}. Build the optimizer with the state's block size, "
            "or convert the state with `adamax_jax.convert_state(state, opt, params)`."
        )
    return EncodedMoment(codes=values, scale=scale, codec=BLOCKWISE, block_size=block_size)


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
        codec = codec_for(dtype, role)
        if codec == SCALED:
            raise ValueError(
                f"`{where}` is a plain {dtype} array. A {role} stored in {dtype} must carry "
                f"its scale (in `{_scale_path(where, role)}`, as `opt.init` makes it), or its "
                f"decay would round away and it would never decrease. {convert}"
            )
        if codec == BLOCKWISE:
            raise ValueError(
                f"`{where}` is a plain {dtype} array. A {role} stored in {dtype} is 8-bit "
                f"codes with one scale per block (in `{_scale_path(where, role)}`, as "
                f"`opt.init` makes them); without them the codes mean nothing. {convert}"
            )
        return
    if x.codec not in CODECS:
        raise ValueError(f"`{where}` was written by an unknown codec {x.codec!r}. {convert}")
    if x.codec == BLOCKWISE:
        _check_blockwise(x, where, role, convert)
        return
    if role == "mu":
        # A μ is plain or block-wise: a scalar scale on it is a state put together
        # by hand (or its moments swapped), and would scale every μ read from it.
        raise ValueError(
            f"`{_scale_path(where, role)}` is a scalar scale, but a μ is stored as a plain "
            f"array or in 8-bit blocks; only a 16-bit ν carries a scalar scale. {convert}"
        )
    codes, scale = jnp.dtype(x.codes.dtype), jnp.dtype(x.scale.dtype)
    if not jnp.issubdtype(codes, jnp.floating):
        raise ValueError(
            f"`{where}` is {codes}, but the {x.codec!r} codec stores a real floating "
            f"dtype: a cast changed it. {convert}"
        )
    if scale != jnp.float32 or jnp.shape(x.scale) != ():
        raise ValueError(
            f"`{_scale_path(where, role)}` must be a float32 scalar, got {scale} of shape "
            f"{jnp.shape(x.scale)}: a cast changed it (cast the state back, or convert it). "
            f"{convert}"
        )


def _scale_path(where: str, role: Role) -> str:
    """Where the scale of the moment at `where` is: ``state.nu['w']`` → ``state.nu_scale['w']``."""
    return where.replace(f"state.{role}", f"state.{role}_scale", 1)


def _check_blockwise(x: Any, where: str, role: Role, convert: str) -> None:
    codes = jnp.dtype(x.codes.dtype)
    allowed = [d for d in EIGHT_BIT if role == "nu" or d != jnp.uint8]
    if codes not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(
            f"`{where}` is {codes}, but the 'blockwise' codec stores a {role} in one of "
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
            f"`{_scale_path(where, role)}` must be float32 of shape {want} (one per block of "
            f"{bs} along the last axis), got {scale} of shape {tuple(jnp.shape(x.scale))}. "
            f"{convert}"
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
    if jnp.iscomplexobj(value):
        return jnp.clip(value, -big, big)
    # A non-finite code (a non-finite gradient was stored) reads as it is.
    return saturate(value, x.codes.astype(value.dtype), big)


def next_scale(x: Any, role: Role, b2: jax.typing.ArrayLike) -> jax.Array | None:
    """The scale for this step's store of a scaled ν; None for a plain moment.

    The decay is carried by the scale: ``s' = s β₂ 2^j`` with ``j >= 0`` the
    smallest that keeps ``s' >= T``, so that a stored value that is not
    replaced is multiplied by the exact power of two ``2^-j`` (once every
    ``log 2 / -log β₂`` steps) and keeps its bits. T is 1, and for bfloat16
    codes the float32 maximum over bfloat16's (1.0039): then every finite
    float32 value divided by the scale is within bfloat16's range, and a
    stored ν never saturates below the gradient it holds (:func:`holds_floor`).

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
    # The least 2^j with j >= 0 that takes the decayed scale (m 2^e, m in [1, 2)) to at
    # least T, added to its exponent. β₂ = 0 (or one that takes it below float32's
    # normal range) leaves nothing to decay: any scale will do; take 2 (at least T).
    least = _least_scale(x.codes.dtype)
    normal = decayed >= jnp.float32(jnp.finfo(jnp.float32).tiny)
    mantissa, exponent = _split_mantissa(jnp.where(normal, decayed, jnp.float32(1)))
    j = jnp.maximum(-exponent + (mantissa < jnp.float32(least)).astype(jnp.int32), 0)
    up = lax.bitcast_convert_type(_bits(decayed) + (j << 23), jnp.float32)
    return jnp.where(normal, up, jnp.float32(2))


def _least_scale(codes: jax.typing.DTypeLike) -> float:
    """The least scale :func:`next_scale` keeps for codes of `codes`: T in [1, 2)."""
    if jnp.dtype(codes) == jnp.bfloat16:
        f32_max, bf16_max = float(jnp.finfo(jnp.float32).max), float(jnp.finfo(jnp.bfloat16).max)
        return float(np.nextafter(np.float32(f32_max / bf16_max), np.float32(2)))
    return 1.0


def holds_floor(x: Any, dtype: jax.typing.DTypeLike) -> bool:
    """Whether a stored ν read back in `dtype` is never below the floor it was stored with.

    True where storing cannot saturate: bfloat16 ν with its scale of at least
    1.0039 (:func:`next_scale`) for float32 values, and a plain ν of `dtype`
    itself. A float16 ν saturates past 65504 times its scale, and a plain ν
    of a narrower dtype rounds; the step then takes ``max(|g|, ν)`` again.
    """
    dtype = jnp.dtype(dtype)
    if is_encoded(x):
        return (
            x.codec == SCALED and jnp.dtype(x.codes.dtype) == jnp.bfloat16 and dtype == jnp.float32
        )
    return jnp.dtype(x.dtype) == dtype


def holds_value(x: Any, dtype: jax.typing.DTypeLike) -> bool:
    """Whether a stored plain μ holds every finite `dtype` value, rounded (no saturation).

    False for float16 (it ends at 65504); true for bfloat16 (float32's range) and
    for 32 bits or more.
    """
    stored = jnp.dtype(x.codes.dtype if is_encoded(x) else x.dtype)
    real = jnp.dtype(jnp.finfo(dtype).dtype)
    return float(jnp.finfo(stored).max) >= float(jnp.finfo(real).max) * (1 - 2.0**-8)


def store(
    m: Any,
    v: Any,
    m_new: jax.Array,
    v_new: jax.Array,
    g: jax.Array,
    floor: jax.Array,
    *,
    b1: tuple[jax.Array, jax.Array],
    b2: jax.typing.ArrayLike,
    eps: jax.Array | None,
    salt: jax.typing.ArrayLike,
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """Writes this step's moments over the stored `m` and `v`, each with its codec's rule.

    μ is rounded unbiased, ν never below `floor` (:func:`encode`). The values
    the step is then taken from are returned with the stored moments:

    * 16-bit storage: the stored moments read back. A step from the unrounded
      moments makes XLA recompute them from the old ones after the new ones
      have been stored over them, so that a donated step first copies both old
      moments: two extra full-size buffers and passes. Where a stored ν reads
      back at least |g| (+ ε) (a bfloat16 ν cannot saturate) the gradient
      need not be read again; elsewhere (a float16 ν saturates at 65504 times
      its scale) ``max(floor, ν)`` is taken again. A float16 μ, which
      saturates at 65504, steps from the unrounded m (its rounding enters
      later steps), so that a gradient past float16's range still steps by the
      learning rate.
    * Block-wise (8-bit) storage and 32 bits: the unrounded moments. 8-bit
      codes are stored by integer operations that XLA recomputes in the step
      whatever a barrier says; the step reads the unrounded moments in the
      same pass.

    Block-wise scales are fitted to bounds on each block's largest value,
    computed from the largest ``|g|`` and the largest stored value of the
    block by the moment equations' own operations (``(1 - β₁) g + β₁ m``,
    ``|g| + ε``, ``β₂ u``; rounding is monotone, so that they bound the new
    values): no pass over the new values.

    Args:
        m: The stored first moment of the last step.
        v: The stored infinity norm of the last step.
        m_new: The new first moment, in the compute dtype.
        v_new: The new infinity norm, in the compute dtype (complex in
            "split" mode).
        g: The gradient in the compute dtype.
        floor: ``|g|`` (+ ε where ε is inside the max): the least value the
            stored ν may read back as (complex in "split" mode: per part).
        b1: β₁ and ``1 - β₁`` in the real compute dtype.
        b2: β₂.
        eps: ε where it is inside the max, else None.
        salt: uint32 bits for μ's rounding draws (:func:`adamax_jax._precision.seed`).

    Returns:
        The stored μ and ν, and the values of μ and ν the step is taken from.
    """
    # Complex "split" mode keeps a floor per part; a modulus floor is real.
    split = jnp.iscomplexobj(floor)
    cdt = m_new.dtype
    m_peak = v_peak = v_held = None
    layout = first_blockwise(m, v)
    if layout is not None:
        b1_r, one_minus_b1 = b1
        g_peak = block_peaks(g, layout)
        m_old_peak = moment_peaks(m, cdt)
        if m_old_peak is not None:
            m_peak = one_minus_b1.astype(cdt) * g_peak + b1_r.astype(cdt) * m_old_peak
        v_peak = g_peak if eps is None else g_peak + eps
        v_old_peak = moment_peaks(v, floor.dtype)
        if v_old_peak is not None:
            # A bound on each block's decayed values, for a block whose scale
            # decays below float32's normal range (see encode).
            v_held = jnp.asarray(b2, jnp.finfo(cdt).dtype) * v_old_peak
    m_stored = encode(m_new, m, "mu", next_scale(m, "mu", b2), salt=salt, peak=m_peak)
    v_stored = encode(
        v_new,
        v,
        "nu",
        next_scale(v, "nu", b2),
        floor=None if split else floor,
        peak=v_peak,
        held=v_held,
    )
    if layout is not None or (storage_dtype(m).itemsize >= 4 and storage_dtype(v).itemsize >= 4):
        return m_stored, v_stored, m_new, v_new
    m_stored, v_stored = lax.optimization_barrier((m_stored, v_stored))
    if holds_value(m_stored, cdt):
        m_new = decode(m_stored, cdt)
    v_new = decode(v_stored, floor.dtype)
    if split:
        v_new = lax.complex(
            jnp.maximum(floor.real, v_new.real), jnp.maximum(floor.imag, v_new.imag)
        )
    elif not holds_floor(v_stored, floor.dtype):
        v_new = jnp.maximum(floor, v_new)
    return m_stored, v_stored, m_new, v_new


def _uint_of(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def encode(
    value: jax.Array,
    previous: Any,
    role: Role,
    scale: jax.Array | None,
    floor: jax.Array | None = None,
    salt: jax.typing.ArrayLike = 0,
    peak: jax.Array | None = None,
    held: jax.Array | None = None,
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
        peak: For a block-wise moment, at least the largest ``|value|`` (μ) or
            `floor` (ν) of each block, shaped like its scale (:func:`block_peaks`);
            None to compute it from the values.
        held: For a block-wise ν, at least the largest decayed value ``β₂ u`` of
            each block, shaped like its scale (β₂ times :func:`moment_peaks` of
            `previous`); None where the block-wise ν held nothing (a fresh
            state). A block whose scale decays below float32's normal range
            takes a fresh scale that holds it, so that its decayed values are
            kept.

    Returns:
        The stored moment, in the layout of `previous`.
    """
    if is_encoded(previous) and previous.codec == BLOCKWISE:
        assert scale is not None
        return _encode_blockwise(value, previous, role, scale, floor, salt, peak, held)
    plain = previous.codes if is_encoded(previous) else previous
    dtype = plain.dtype
    if role == "mu":
        # Rounded stochastically and saturated by store_moment; μ is never scaled.
        assert not is_encoded(previous)
        return store_moment(value, plain, salt)
    if not is_encoded(previous):
        return _saturate_to(value, dtype) if below_32_bits(dtype) else value.astype(dtype)
    assert scale is not None
    rdt = jnp.finfo(value.dtype).dtype
    s = scale.astype(rdt).astype(value.dtype)
    # Multiplied by the reciprocal of the scale: the rounding up below compares
    # the value read back, so that the reciprocal need not be exact, and a
    # carried code (value = code · scale, to a few roundings) comes back as itself.
    q = value * _reciprocal(s)
    if floor is None or jnp.iscomplexobj(q):
        codes = _saturate_to(q, dtype)
    else:
        codes = _store_up(q, s, floor.astype(q.dtype), dtype)
    return EncodedMoment(codes=codes, scale=scale, codec=previous.codec)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _store_up(q: jax.Array, s: jax.Array, floor: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Non-negative `q` stored in 16-bit float `dtype`, never reading back below `floor`.

    Rounded to nearest (saturating at the largest finite value), then moved up
    one unit in the last place where the code times `s`, read back as decode
    reads it, is below `floor`. The choice is made in the compute dtype and
    the result converted once, exactly, as the last operation: XLA on CPU
    recomputes cheap operations that follow a conversion in every loop that
    reads the stored codes, from the old codes if they have been overwritten
    (so that a donated step copies them first). For bfloat16 the rounding is
    computed on float32 bits, which is cheaper than a conversion.
    """
    rdt = q.dtype
    big = jnp.asarray(jnp.finfo(dtype).max, rdt)
    q = saturate(q, q, big)
    if dtype == jnp.bfloat16 and rdt == jnp.float32:
        # A nonzero floor below float32's smallest normal number times the scale
        # would give a subnormal code, which XLA reads back as 0 (it flushes
        # subnormals): it takes that smallest normal number instead, read back
        # as at most twice the floor's range above it.
        tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
        q = jnp.maximum(q, jnp.where(floor > 0, tiny, jnp.float32(0)))
        bits = lax.bitcast_convert_type(q, jnp.uint32)
        # Round to nearest, ties to even, at the 16th bit; exact in bfloat16.
        near = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) & jnp.uint32(0xFFFF0000)
        code = lax.bitcast_convert_type(near, rdt)
        above = lax.bitcast_convert_type(near + jnp.uint32(0x10000), rdt)
    else:
        stored = q.astype(dtype)
        code = stored.astype(rdt)
        bits = lax.bitcast_convert_type(stored, _uint_of(dtype))
        above = lax.bitcast_convert_type(bits + 1, dtype).astype(rdt)
    up = (_times_scale(code, s) < floor) & (code < big)
    return jnp.where(up, above, code).astype(dtype)


@_store_up.defjvp
def _store_up_jvp(dtype, primals, tangents):
    # Rounding has no useful derivative; the straight-through rule passes the
    # tangent of the value on, as the store of the value would.
    q, s, floor = primals
    return _store_up(q, s, floor, dtype), tangents[0].astype(dtype)


def _reciprocal(s: jax.Array) -> jax.Array:
    """``1 / s`` for positive normal float32 `s` up to 2^125, within a few units in the last place.

    The mantissa's reciprocal is estimated from the bits and refined by three
    Newton steps, and the exponent negated: cheap operations that XLA fuses
    into the loop that uses them (a scalar's is hoisted out of it), where a
    division of a scalar or of a block's scale would be a kernel and a buffer
    of its own for every leaf, and a division in the loop costs a division per
    value. Callers check what they store with it.
    """
    f32 = jnp.float32
    m, e = _split_mantissa(s.astype(f32))
    r = lax.bitcast_convert_type(jnp.int32(0x7EF311C3) - _bits(m), f32)
    for _ in range(3):
        r = r * (f32(2) - m * r)
    # r is in (1/2, 1], so that r · 2^-e is normal for e <= 125.
    return (r * _pow2(-e)).astype(s.dtype)


def _saturate_to(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`x` rounded to nearest in `dtype`, finite values saturating at its largest finite value."""
    if jnp.iscomplexobj(x):
        return x.astype(dtype)
    return saturate(x, x, jnp.asarray(jnp.finfo(dtype).max, x.dtype)).astype(dtype)


def from_value(value: jax.Array, template: Any, role: Role) -> Any:
    """Stores moment values `value` in the layout and dtype of `template`, from scratch.

    Used to convert a state written in another layout: a plain array takes the
    values rounded to its dtype; an encoded one starts from a fresh scale.
    """
    if not is_encoded(template):
        # A copy, never the source's own buffer: donating the converted state
        # must leave the state it came from readable.
        return jnp.array(value, dtype=template.dtype, copy=True)
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
    per_binade: int  # codes per doubling (binade)
    # float8: the biased float32 exponent of binade 1 less one, whose binade 0 holds
    # subnormals (evenly spaced from 0); None for int8/uint8 (see _first_exponent).
    float8_exponent: int | None = None


_MAPS: dict[jnp.dtype, _CodeMap] = {
    # int8 and uint8: magnitude k > 0 is ``2^(k // L) (1 + (k % L) D 2^-23)`` in
    # units of the block's smallest binade, with ``D = floor(2^23 / L)``: L codes
    # evenly spaced in every doubling, as the mantissa of a float with L values;
    # the largest code is in [2^4, 2^5) block scales (see _magnitude). int8
    # (L = 5) spans 2^25.2 below the block's largest value with codes 11 % to 20 %
    # apart: μ's values in a block span more than ν's need, and a μ below the
    # range is 0 and stops its parameter. uint8, for ν (L = 14), spends the sign
    # bit on resolution: 2^18.2 with codes 3.7 % to 7.1 % apart.
    jnp.dtype(jnp.int8): _CodeMap(top=127, signed=True, per_binade=5),
    jnp.dtype(jnp.uint8): _CodeMap(top=255, signed=False, per_binade=14),
    # float8: the dtype's own values, computed the same way (binade 0 holds the
    # subnormals); the magnitude index is the bit pattern without the sign (0x7F
    # is NaN in e4m3fn, 0x7C infinity in e5m2).
    jnp.dtype(jnp.float8_e4m3fn): _CodeMap(
        top=0x7E, signed=True, per_binade=8, float8_exponent=127 - 7
    ),
    jnp.dtype(jnp.float8_e5m2): _CodeMap(
        top=0x7B, signed=True, per_binade=4, float8_exponent=127 - 15
    ),
}


def code_step(storage: jax.typing.DTypeLike) -> float:
    """The largest ratio between neighbouring nonzero values of an 8-bit code map.

    A ν stored in `storage` reads back at most this factor above the value
    it holds (within the map's range, and float8's normal range); a rounded μ
    is off by at most half of it. 1 + 1/5 for int8, 1 + 1/14 for uint8,
    1 + 2^-3 for float8_e4m3fn and 1 + 2^-2 for float8_e5m2.
    """
    return 1.0 + 1.0 / _MAPS[jnp.dtype(storage)].per_binade


# The largest code of an int8 or uint8 map is worth between 2^4 and 2^5 block
# scales, so that a block holding values up to float32's maximum has a scale
# whose reciprocal is still a normal number (XLA divides by a broadcast scale
# through its reciprocal, and flushes subnormals to zero).
_TOP_EXPONENT = 4


def _per_binade(cmap: _CodeMap) -> int:
    return cmap.per_binade


def _first_exponent(cmap: _CodeMap) -> int:
    """The biased float32 exponent of the binade of magnitude indices 0 to L - 1.

    For float8 that binade holds the subnormals instead (:func:`_subnormal_unit`).
    """
    if cmap.float8_exponent is not None:
        return cmap.float8_exponent
    return 127 + _TOP_EXPONENT - cmap.top // _per_binade(cmap)


def _subnormal_unit(cmap: _CodeMap) -> float | None:
    """float8: the value of subnormal index 1 (indices below L are its multiples); else None."""
    if cmap.float8_exponent is None:
        return None
    return 2.0 ** (cmap.float8_exponent - 126) / cmap.per_binade


def _magnitude(k: jax.Array, cmap: _CodeMap) -> jax.Array:
    """The float32 value of non-negative magnitude indices `k` of an int8/uint8 map.

    Built from its bits: the binade ``k // L`` is the exponent, and the
    mantissa is ``floor((k % L) 2^23 / L)``. Every rounding (:func:`_index`)
    works on the same bits, so that a carry out of the mantissa moves to the
    next binade, and a power-of-two change of scale moves every index by a
    whole number of binades (L indices each).
    """
    per = _per_binade(cmap)
    # Divisions by the constant L as a multiply and a shift: XLA counts an integer
    # division as expensive and would write its operand out rather than fuse it.
    binade = _divide(k, per, cmap.top)
    mantissa = _divide(k - binade * per, per, per - 1, numerator_shift=23)
    bits = ((binade + _first_exponent(cmap)) << 23) | mantissa
    normal = lax.bitcast_convert_type(bits, jnp.float32)
    unit = _subnormal_unit(cmap)
    if unit is None:
        return jnp.where(k == 0, jnp.float32(0), normal)
    return jnp.where(k < per, k.astype(jnp.float32) * jnp.float32(unit), normal)


@functools.cache
def _magic(divisor: int, largest: int, numerator_shift: int) -> tuple[int, int]:
    """A multiplier and a shift that divide by `divisor`, found and checked once.

    ``(n << numerator_shift) // divisor == (n * m) >> s`` for every
    ``0 <= n <= largest``, with ``n * m`` within int32.
    """
    n = np.arange(largest + 1, dtype=np.int64)
    want = (n << numerator_shift) // divisor
    for shift in range(32):
        m = -(-(1 << (shift + numerator_shift)) // divisor)
        if largest * m >= 2**31:
            break
        if np.array_equal((n * m) >> shift, want):
            return m, shift
    raise ValueError(f"no int32 multiply-and-shift divides by {divisor} up to {largest}")


def _divide(n: jax.Array, divisor: int, largest: int, numerator_shift: int = 0) -> jax.Array:
    """``(n << numerator_shift) // divisor`` for int32 ``0 <= n <= largest``.

    A multiply and a shift (:func:`_magic`).
    """
    m, shift = _magic(divisor, largest, numerator_shift)
    return (n * m) >> shift


def _magnitude_np(k: int, cmap: _CodeMap) -> float:
    per = _per_binade(cmap)
    unit = _subnormal_unit(cmap)
    if unit is not None and k < per:
        return float(np.float32(k * unit))
    bits = ((k // per + _first_exponent(cmap)) << 23) | (((k % per) << 23) // per)
    return float(np.array(bits, np.int32).view(np.float32))


def _smallest(cmap: _CodeMap) -> float:
    """The value of magnitude index 1 (in block scales)."""
    return _magnitude_np(1, cmap)


def _top_value(cmap: _CodeMap, dtype: jnp.dtype) -> float:
    del dtype
    return _magnitude_np(cmap.top, cmap)


def _index(a: jax.Array, cmap: _CodeMap, carry: jax.Array | int) -> jax.Array:
    """The magnitude index of non-negative float32 `a` (block scales), from its bits.

    The position of `a` within its binade, ``mantissa · L``, is taken in
    units of 2^-23 of a code, and `carry` added before it is truncated:
    ``UP`` (2^23 − 1) rounds up, exactly (the least code not below `a`);
    ``_below(cmap) + 2^22`` to nearest; ``_below(cmap)`` plus 23 uniform random
    bits stochastically (``_below`` makes a code's own value, whose mantissa
    was rounded down, come back as that code). The result is not clipped, and
    is not meaningful below the smallest code (callers decide what such a
    value becomes).
    """
    per = _per_binade(cmap)
    bits = lax.bitcast_convert_type(a, jnp.int32)
    binade = (bits >> 23) - _first_exponent(cmap)
    within = ((bits & 0x7FFFFF) * per + carry) >> 23
    k = binade * per + within
    unit = _subnormal_unit(cmap)
    if unit is None:
        return k
    # float8's subnormals, evenly spaced below its smallest normal value: the same
    # carry, as a fraction of a code, on the position a / unit (exact: a power of two).
    subnormal = a < jnp.float32(unit * per)
    # In units of 2^-23 of a code: below L 2^23, exact in float32 and int32.
    position = (jnp.where(subnormal, a, 0) * jnp.float32(2.0**23 / unit)).astype(jnp.int32)
    return jnp.where(subnormal, (position + carry) >> 23, k)


def _rank(codes: jax.Array) -> jax.Array:
    """The signed magnitude index of each code, as int32."""
    dtype = jnp.dtype(codes.dtype)
    if _MAPS[dtype].float8_exponent is None:
        return codes.astype(jnp.int32)
    bits = lax.bitcast_convert_type(codes, jnp.uint8).astype(jnp.int32)
    magnitude = bits & 0x7F
    return jnp.where(bits >= 0x80, -magnitude, magnitude)


def _codes(rank: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Codes of `dtype` from signed magnitude indices (inverse of :func:`_rank`)."""
    if _MAPS[dtype].float8_exponent is None:
        return rank.astype(dtype)
    bits = jnp.abs(rank) | jnp.where(rank < 0, jnp.int32(0x80), jnp.int32(0))
    return lax.bitcast_convert_type(bits.astype(jnp.uint8), dtype)


def _value_of_rank(rank: jax.Array, storage: jnp.dtype, dtype: jnp.dtype) -> jax.Array:
    """The value of signed magnitude index `rank` in units of the block scale."""
    cmap = _MAPS[storage]
    magnitude = _magnitude(jnp.abs(rank), cmap).astype(dtype)
    return jnp.where(rank < 0, -magnitude, magnitude) if cmap.signed else magnitude


UP = (1 << 23) - 1


def _below(cmap: _CodeMap) -> int:
    """What :func:`_index` adds so that a code's own value, mantissa rounded down, is that code."""
    return _per_binade(cmap) - 1


def _rounded_index(a: jax.Array, cmap: _CodeMap, carry: jax.Array | int) -> jax.Array:
    """:func:`_index` of non-negative `a`, in the map's range.

    A value below the smallest code rounds to nearest (0, or that code where
    it is past half of it); values beyond the largest code saturate.
    """
    a = a.astype(jnp.float32)
    k = _index(a, cmap, carry)
    smallest = jnp.float32(_smallest(cmap))
    k = jnp.where(a < smallest, (a >= smallest / 2).astype(jnp.int32), k)
    return jnp.clip(k, 0, cmap.top)


def _nearest_rank(x: jax.Array, storage: jnp.dtype) -> jax.Array:
    """The rank of the code nearest to `x` (in units of the block scale).

    float8 rounds to nearest even; the int8/uint8 maps round to nearest (ties
    up). Values beyond the largest code saturate.
    """
    cmap = _MAPS[storage]
    k = _rounded_index(jnp.abs(x), cmap, _below(cmap) + (1 << 22))
    return jnp.where(x < 0, -k, k) if cmap.signed else k


def _round_up_rank(
    target: jax.Array, rank: jax.Array, storage: jnp.dtype, scale: jax.Array
) -> jax.Array:
    """`rank` (within one code of non-negative `target`), moved up where it reads back below.

    The value read back is computed as :func:`decode` computes it (the code's
    value times the block's `scale`, broadcast).
    """
    cmap = _MAPS[storage]
    back = _times_scale(_value_of_rank(rank, storage, target.dtype), scale)
    below = back < target
    return jnp.where(below, jnp.minimum(rank + 1, cmap.top), rank)


def _times_scale(values: jax.Array, scale: jax.Array) -> jax.Array:
    """Code values times their block scale, saturating at the dtype's largest finite value.

    A block whose largest value is near float32's maximum has a scale up to
    twice as large as that value needs; its top codes would read back as
    infinity.
    """
    big = jnp.asarray(jnp.finfo(values.dtype).max, values.dtype)
    return jnp.clip(values * scale, -big, big)


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
    return jnp.clip(scale, f32(2.0**-126), f32(LARGEST_SCALE))


# The largest block scale `_fit` gives (its reciprocal stays a normal number); no
# step writes a larger scale of any codec (a 16-bit ν's stays below 2^1.01).
LARGEST_SCALE = 2.0**125


def _blocked(x: "EncodedMoment") -> bool:
    """Whether a block-wise moment's codes are laid out as blocks (see :func:`in_blocks`)."""
    return jnp.ndim(x.codes) == jnp.ndim(x.scale) + 1


def first_blockwise(*moments: Any) -> "EncodedMoment | None":
    """The first block-wise moment among `moments`, or None."""
    for x in moments:
        if is_encoded(x) and x.codec == BLOCKWISE:
            return x
    return None


def block_layout(*moments: Any) -> int | None:
    """The block size to lay a leaf out in (:func:`in_blocks`), or None to keep its layout.

    That of the first block-wise moment among `moments`, where its last axis
    is whole blocks (or one block shorter than `block_size`): the layout is
    then a reshape, free. A last axis that ends in a part block stays as it
    is, with each block's values reduced in windows and its scale spread over
    its values (:func:`_spread`), where cutting it into blocks would pad every
    array of the step, in copies.
    """
    x = first_blockwise(*moments)
    if x is None:
        return None
    assert x.block_size is not None
    n = x.codes.shape[-1]
    return x.block_size if n % x.block_size == 0 or n < x.block_size else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a step lays out the arrays of one leaf (see :func:`in_blocks`).

    Where a moment is stored block-wise and its last axis is whole blocks,
    every array of the step is laid out as blocks of that size, and handed
    back in the leaf's own layout; elsewhere the layout is the leaf's own.
    """

    block_size: int | None
    n: int

    @classmethod
    def of(cls, m: Any, v: Any) -> "Layout":
        """The layout for a leaf whose stored moments are `m` and `v`."""
        size = block_layout(m, v)
        return cls(size, 0 if size is None else stored_values(m).shape[-1])

    def enter(self, g: jax.Array, m: Any, v: Any) -> tuple[jax.Array, Any, Any]:
        """The gradient and the stored moments in this layout."""
        if self.block_size is None:
            return g, m, v
        size = self.block_size
        return to_blocks(g, size), in_blocks(m, size), in_blocks(v, size)

    def leave(self, d: jax.Array, m: Any, v: Any) -> tuple[jax.Array, Any, Any]:
        """The direction and the stored moments back in the leaf's own layout."""
        if self.block_size is None:
            return d, m, v
        return from_blocks(d, self.n), out_of_blocks(m, self.n), out_of_blocks(v, self.n)


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """Array `x` with its last axis cut into blocks: shape ``(..., n_blocks, block_size)``.

    The last axis is whole blocks, or one block shorter than `block_size`
    (:func:`block_layout`): a reshape, with nothing to pad.
    """
    n = x.shape[-1]
    size = min(block_size, n)
    assert n % size == 0, f"{n} values are not whole blocks of {size}"
    return x.reshape(x.shape[:-1] + (n // size, size))


def from_blocks(x: jax.Array, n: int) -> jax.Array:
    """The inverse of :func:`to_blocks` for a last axis of `n` values."""
    return x.reshape(x.shape[:-2] + (n,))


def in_blocks(x: Any, block_size: int) -> Any:
    """A stored moment laid out as blocks of `block_size` values along its last axis.

    A step works on every array of a leaf with a block-wise moment in that
    layout, so that each block's reduction and its codes read the same values
    with no reshape between them: XLA then computes a block's largest value
    in the loop that computes the values instead of writing them out first.
    A block-wise moment keeps its own block size; its scale does not change
    shape.
    """
    if is_encoded(x):
        size = x.block_size if x.codec == BLOCKWISE else block_size
        assert size is not None
        return dataclasses.replace(x, codes=to_blocks(x.codes, size))
    return to_blocks(x, block_size)


def out_of_blocks(x: Any, n: int) -> Any:
    """The inverse of :func:`in_blocks` for a last axis of `n` values."""
    if is_encoded(x):
        return dataclasses.replace(x, codes=from_blocks(x.codes, n))
    return from_blocks(x, n)


def _block_maxima(
    operands: tuple[jax.Array, ...], layout: "EncodedMoment", combine: Any = lax.max
) -> list[jax.Array]:
    """The largest value of each block of each array of `operands`, or 0 where that is larger.

    With ``combine=lax.min``, the least value, or 0 where that is smaller;
    other combinations as `combine` reduces.

    The arrays are laid out as the block-wise moment `layout` is: as blocks
    (reduced along the last axis), or as the leaf (reduced in windows of the
    block size, the last one padded). Each is reduced by a max that starts
    from 0, and callers read only peaks of at least 0 from the results (the
    largest ``|x|``), so that no padding of 0 or below can change a peak:
    neither the windows' own, nor what a partitioner adds where a shard ends
    inside a block. (A partitioned variadic reduce window pads every operand
    with the initial value of the first: a max and a min of the same values
    then took -inf as the least value of a last axis's part block, so that a
    sharded step saturated its scale.)
    """
    zeros = tuple(jnp.zeros((), x.dtype) for x in operands)

    def maxima(a, b):
        return tuple(combine(x, y) for x, y in zip(a, b, strict=True))

    ndim = operands[0].ndim
    if _blocked(layout):
        return list(lax.reduce(operands, zeros, maxima, (ndim - 1,)))
    bs = layout.block_size
    assert bs is not None
    n = operands[0].shape[-1]
    window = (1,) * (ndim - 1) + (bs,)
    padding = [(0, 0)] * (ndim - 1) + [(0, -(-n // bs) * bs - n)]
    return list(lax.reduce_window(operands, zeros, maxima, window, window, padding))


def _spread(per_block: jax.Array, layout: "EncodedMoment") -> jax.Array:
    """One value per block, broadcast against the values of the blocks laid out as `layout`."""
    if _blocked(layout):
        return per_block[..., None]
    bs = layout.block_size
    assert bs is not None
    n = layout.codes.shape[-1]
    shape = per_block.shape
    spread = jnp.broadcast_to(per_block[..., None], shape + (bs,))
    spread = spread.reshape(shape[:-1] + (shape[-1] * bs,))
    explicit = explicit_sharding(spread)
    if explicit is None:
        return spread[..., :n]
    # On Explicit axes an eager slice must name its sharding (a last axis split over
    # an axis of size 1 is the only split that reaches here: others hold whole blocks).
    return spread.at[..., :n].get(out_sharding=explicit)


def block_peaks(x: jax.Array, layout: Any) -> jax.Array:
    """The largest ``|x|`` of each block of real `x`, laid out as block-wise moment `layout`.

    A non-finite value makes its block's peak non-finite. Every reduction is a
    max of values whose peak is at least 0 (:func:`_block_maxima`), so that
    the peaks are the same however the leaf is partitioned.
    """
    # The peaks only choose the scales of integer codes, through which no
    # derivative flows; a windowed reduce of a user computation has no
    # derivative rule in JAX, so that the step's own would fail without this.
    x = lax.stop_gradient(x)
    if _blocked(layout):
        # Laid out as blocks, XLA on CPU reduces `x` and `-x` together as it reads
        # `x`, where it would write ``|x|`` out first (several times slower).
        largest, negated = _block_maxima((x, -x), layout)
        return jnp.maximum(largest, negated)
    # In windows, XLA on CPU writes out any operation on `x` that a windowed
    # reduction reads (|x| or -x: a temporary buffer of the leaf's size, 4 bytes a
    # parameter): the largest and the least value are reduced from `x` itself.
    largest = _block_maxima((x,), layout)[0]
    least = _block_maxima((x,), layout, lax.min)[0]
    # XLA's CPU backend drops a NaN from a windowed max or min over more than a few
    # thousand values (a NaN gradient in a (16, 300) leaf left its block's scale
    # finite, and the state lost it). A third reduction carries it: ``a + 0 b`` is
    # one of the values for finite ones, never an overflow (a plain sum of ±1e37
    # overflowed to inf - inf = NaN in XLA's partial sums), and NaN once any value
    # is non-finite. It cost 11.1 ms -> 13.0 ms on an int8 step over leaves of
    # (8192, 384) and (1536, 384); NaN-carrying max and min reducers, 24 -> 52 ms.
    carried = _block_maxima((x,), layout, lambda a, b: a + b * 0)[0]
    return jnp.where(jnp.isnan(carried), carried, jnp.maximum(largest, -least))


def _code_magnitudes(codes: jax.Array) -> jax.Array:
    """The magnitude index of each 8-bit code (its rank without the sign), in 8 bits.

    Never negative: int8 codes are within ±``top`` (127), and float8 ones are
    read from the bits without the sign's.
    """
    cmap = _MAPS[jnp.dtype(codes.dtype)]
    if cmap.float8_exponent is not None:
        return lax.bitcast_convert_type(codes, jnp.uint8) & jnp.uint8(0x7F)
    return jnp.abs(codes) if cmap.signed else codes


def moment_peaks(x: Any, dtype: jax.typing.DTypeLike) -> jax.Array | None:
    """The largest ``|decode(x)|`` of each block of a block-wise moment.

    Read from the largest code magnitude of each block (a max of non-negative
    indices, see :func:`_block_maxima`); None for any other moment.
    """
    if not (is_encoded(x) and x.codec == BLOCKWISE):
        return None
    cmap = _MAPS[jnp.dtype(x.codes.dtype)]
    largest = _block_maxima((_code_magnitudes(x.codes),), x)[0].astype(jnp.int32)
    values = _magnitude(largest, cmap).astype(dtype)
    scale = x.scale.astype(jnp.float32).astype(dtype)
    return _times_scale(values, scale)


def _decode_blockwise(x: "EncodedMoment", dtype: jax.typing.DTypeLike) -> jax.Array:
    dtype = jnp.dtype(dtype)
    storage = jnp.dtype(x.codes.dtype)
    values = _value_of_rank(_rank(x.codes), storage, dtype)
    return _times_scale(values, _spread(x.scale.astype(jnp.float32).astype(dtype), x))


def _nu_index(
    codes: jax.Array,
    floor: jax.Array,
    base: jax.Array,
    scale: jax.Array,
    inv: jax.Array,
    s: jax.Array,
    cmap: _CodeMap,
    layout: "EncodedMoment",
) -> jax.Array:
    """The new magnitude indices of a ν in an int8/uint8 map, computed on the indices.

    ``u = max(β₂ u_prev, floor)`` is stored as the larger of two indices (the
    map is monotone): the carried one, moved down by the binades the scale
    grew (exact: the decay is in the scale; an index that falls below the
    map's range stays at its smallest code, rounding up), and the least one
    that reads back at least `floor`, checked as decode reads it. So neither
    the old values nor the new ones are decoded here.

    Args:
        codes: The previous codes, laid out as `layout`.
        floor: This step's ``|g|`` (+ ε), laid out as `layout`.
        base: Each block's previous scale times β₂ (below float32's normal range
            for a block that holds nothing).
        scale: Each block's new scale: `base` times a power of two, or fresh.
        inv: The reciprocal of `scale`, spread over the values (:func:`_spread`).
        s: `scale`, spread over the values.
        cmap: The code map.
        layout: The previous moment, whose layout the arrays have.
    """
    tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
    # floor(log2(scale / base)) from the bits: exact for a power of two, and
    # never more than the ratio where a scale saturated at 2^126.
    m_scale, e_scale = _split_mantissa(jnp.maximum(scale, tiny))
    m_base, e_base = _split_mantissa(jnp.maximum(base, tiny))
    grew = e_scale - e_base - (m_scale < m_base).astype(jnp.int32)
    kept = base >= tiny
    # Per block: how far the indices move down, and the least a nonzero index
    # can become (0 for a block that holds nothing, whose indices are dropped).
    down = _spread(jnp.where(kept, grew * _per_binade(cmap), cmap.top + 1), layout)
    least = _spread(kept.astype(jnp.int32), layout)
    k_prev = _rank(codes)
    if cmap.signed:
        k_prev = jnp.abs(k_prev)
    carried = jnp.maximum(k_prev - down, jnp.minimum(k_prev, least))
    # The ceiling of the index from the bits of floor / scale; at least 1 for a
    # nonzero floor (the bits of a positive float are positive), 0 for 0.
    a = floor.astype(jnp.float32) * inv.astype(jnp.float32)
    bits = lax.bitcast_convert_type(a, jnp.int32)
    k = _index(a, cmap, UP)
    k = jnp.clip(k, jnp.minimum(bits, 1), cmap.top)
    # The reciprocal and the product round: where the value read back (as
    # decode reads it) is below the floor, one index up.
    below = _times_scale(_magnitude(k, cmap).astype(floor.dtype), s) < floor
    k = jnp.where(below, jnp.minimum(k + 1, cmap.top), k)
    return jnp.maximum(carried, k)


def _poisoned(scale: jax.Array, peak: jax.Array) -> jax.Array:
    """`scale`, NaN for each block whose peak is not finite (a non-finite gradient).

    8-bit codes hold no inf or NaN: the block's scale holds it instead, so that
    every value of the block reads NaN from then on (and its scale stays NaN),
    visibly, where a saturated scale would silently freeze its parameters.
    """
    return jnp.where(jnp.isfinite(peak), scale, jnp.float32(jnp.nan))


def _encode_blockwise(
    value: jax.Array,
    previous: "EncodedMoment",
    role: Role,
    base: jax.Array,
    floor: jax.Array | None,
    salt: jax.typing.ArrayLike = 0,
    peak: jax.Array | None = None,
    held: jax.Array | None = None,
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
    # The values are laid out as `previous` is (as blocks, or as the leaf):
    # one value per block is spread over its values, and blocks are reduced,
    # in that layout.
    cdt = jnp.dtype(value.dtype)
    top = _top_value(cmap, storage)
    if role == "mu":
        if peak is None:
            peak = block_peaks(value, previous)
        peak = peak.astype(jnp.float32)
        scale = jnp.where(peak > 0, _fit(peak, jnp.ones_like(peak), top), jnp.float32(1))
        scale = _poisoned(scale, peak)
        # The scale is a power of two: its reciprocal, from the bits, is exact
        # (and eager and compiled steps, which could divide differently, agree).
        inv = lax.bitcast_convert_type((254 << 23) - _bits(scale), jnp.float32)
        x = value * _spread(inv.astype(cdt), previous)
        seed = jnp.broadcast_to(jnp.asarray(salt).astype(jnp.uint32), value.shape)
        previous_bits = _rank(previous.codes).astype(jnp.uint32)
        noise = _random_bits(previous_bits, seed, jnp.uint32(0))
        # Random bits below the cut, then truncation: the index moves up with
        # the probability of the dropped fraction of a code (the codes between
        # two binades are evenly spaced, so that this is unbiased). Below the
        # smallest code, to nearest (see _rounded_index).
        carry = (noise >> 9).astype(jnp.int32) + _below(cmap)
        k = _rounded_index(jnp.abs(x), cmap, carry)
        rank = jnp.where(x < 0, -k, k)
    else:
        fb = value if floor is None else floor.astype(cdt)
        base = base.astype(jnp.float32)
        # max with the zeros of `base`: the gradient's peaks take the state's
        # sharding (on Explicit mesh axes a select needs it in every operand).
        if peak is None:
            peak = block_peaks(fb, previous)
        peak = jnp.maximum(peak.astype(jnp.float32), jnp.zeros_like(base))
        # A scale of 0 marks a block that holds nothing yet (a fresh state, or
        # one decayed below float32's normal range): it takes a fresh power of
        # two from its first nonzero gradient.
        tiny = jnp.float32(jnp.finfo(jnp.float32).tiny)
        zero = jnp.zeros_like(base)
        # A block whose scale decayed below float32's normal range (its values
        # may still be normal numbers, up to the top code times 2^-126) takes a
        # fresh scale that holds its decayed values as well as this step's floor,
        # and its codes are computed afresh from the values: dropping them would
        # leave u far below the decayed value, and the next step unbounded.
        fresh_peak = peak if held is None else jnp.maximum(peak, held.astype(jnp.float32))
        fresh = jnp.where(fresh_peak > 0, _fit(fresh_peak, jnp.ones_like(base), top), zero)
        kept = jnp.where(peak > base * jnp.float32(top), _fit(peak, base, top), base)
        renewed = base < tiny
        scale = _poisoned(jnp.where(renewed, fresh, kept), peak)
        s = _spread(scale.astype(cdt), previous)
        # The reciprocal of the scale: the rounding up below compares values read
        # back as decode reads them, so that it need not be exact. A division: XLA
        # computes it once a block, in a kernel of its own, where cheaper
        # operations would be recomputed for every value of the block.
        inv = _spread((1 / jnp.maximum(scale, tiny)).astype(cdt), previous)
        if cmap.float8_exponent is not None:
            # float8's subnormals do not move by whole binades with the scale.
            # One rounding up serves both bounds: never below this step's floor,
            # nor (within float32 rounding) below the decayed value carried over.
            target = jnp.maximum(fb, value * jnp.asarray(1 - 2.0**-16, cdt))
            rank = _round_up_rank(target, _nearest_rank(value * inv, storage), storage, s)
        else:
            # A renewed block's codes hold the values (its decayed ones included),
            # rounded up; the carried indices are dropped with its old scale.
            fb = jnp.where(_spread(renewed, previous), jnp.maximum(fb, value), fb)
            rank = _nu_index(previous.codes, fb, base, scale, inv, s, cmap, previous)
    codes = _codes(rank, storage)
    return EncodedMoment(codes=codes, scale=scale, codec=BLOCKWISE, block_size=bs)
