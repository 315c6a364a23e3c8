"""Checkpoints: the optimizer state to restore into, and the check that a saved one fits."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Sharding

from adamax_jax._codecs import LARGEST_SCALE
from adamax_jax._sharding import init_placement, params_mesh
from adamax_jax._transform import ScaleByAdamaxState
from adamax_jax._validation import is_traced


def _plain(shapes: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)


def abstract_state(
    opt: optax.GradientTransformation,
    params: Any,
    *,
    shardings: Any = "params",
) -> Any:
    """The optimizer state of `opt` for `params`, as ``jax.ShapeDtypeStruct``.

    The target to restore a checkpointed state into, on any mesh and in any
    layout: a checkpointing library (orbax) reads each array straight into the
    shards given here, whatever device count or layout wrote it. Shapes and
    dtypes are those of ``opt.init(params)``, found with ``jax.eval_shape``, so
    that any ``optax`` transformation and any state layout is covered and
    nothing is computed or allocated.

    `shardings` says where the state goes:

    * ``"params"``: where ``jax.jit(opt.init)`` places it for `params`, for
      the transformations of this package like the parameters themselves
      (scalars such as ``count`` replicated). `params` are arrays or
      ``jax.ShapeDtypeStruct`` with their shardings, all over one mesh; leaves
      without a ``NamedSharding`` count as replicated over it, and parameters
      with no mesh at all put the state where they are (or on the default
      device).
    * a ``jax.sharding.Sharding``: every array of the state placed so (one
      device, or replicated over a mesh).
    * a pytree of ``Sharding`` with the structure of the state, such as
      :func:`zero1_state_shardings` gives (ZeRO-1: the state split over the
      data axis).
    * ``None``: shapes and dtypes only, with no placement.

    Args:
        opt: The optimizer, any ``optax.GradientTransformation``.
        params: The parameters the state is for: arrays or
            ``jax.ShapeDtypeStruct``, with the shapes and dtypes of the run
            that continues.
        shardings: ``"params"``, a ``Sharding``, a pytree of them, or ``None``.

    Returns:
        A pytree with the structure of ``opt.init(params)`` whose leaves are
        ``jax.ShapeDtypeStruct`` (with the sharding asked for).

    Raises:
        TypeError: If `shardings` is none of the above, or a pytree with a leaf
            that is not a ``Sharding``.
        ValueError: If the pytree of `shardings` does not have the structure of
            the state (the message lists the key paths that differ), or the
            leaves of `params` are sharded over different meshes.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from adamax_jax import abstract_state, adamax
        >>> opt = adamax(0.01, nu_dtype=jnp.bfloat16)
        >>> params = {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
        >>> one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        >>> target = abstract_state(opt, params, shardings=one)
        >>> target[0].nu["w"].sharding == one
        True
        >>> target = abstract_state(opt, params, shardings=None)
        >>> target[0].nu["w"]
        ShapeDtypeStruct(shape=(4, 3), dtype=bfloat16)
        >>> target[0].nu_scale["w"]
        ShapeDtypeStruct(shape=(), dtype=float32)
    """
    if isinstance(shardings, str) and shardings == "params":
        shapes, placed = init_placement(opt, params, params_mesh(params))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, placed
        )
    shapes = _plain(jax.eval_shape(opt.init, _plain(params)))
    if shardings is None:
        return shapes
    if isinstance(shardings, Sharding):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings), shapes
        )
    leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
    if isinstance(shardings, str) or not leaves:
        raise TypeError(
            '`shardings` must be "params", None, a jax.sharding.Sharding or a pytree of them, '
            f"got {shardings!r}."
        )
    for path, leaf in leaves:
        if not isinstance(leaf, Sharding):
            raise TypeError(
                f"`shardings`{jax.tree_util.keystr(path)} must be a jax.sharding.Sharding, "
                f"got {type(leaf).__name__}."
            )
    if jax.tree.structure(shardings) != jax.tree.structure(shapes):
        lines = _differences(shapes, shardings, "`shardings`", compare=False) or [
            f"  {jax.tree.structure(shardings)} is not {jax.tree.structure(shapes)}"
        ]
        raise ValueError(
            "`shardings` must have the structure of the state `opt.init(params)`:\n"
            + "\n".join(lines)
        )
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _key(entry: Any) -> str:
    # A NamedTuple's field, a dict's key and a list's index, as a checkpoint
    # stores them (orbax keeps NamedTuples as dicts and tuples as lists).
    for attribute in ("name", "key", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _by_key(tree: Any) -> dict[tuple[str, ...], tuple[str, Any]]:
    return {
        tuple(_key(e) for e in path): (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _describe(leaf: Any) -> str:
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
        return type(leaf).__name__
    return f"{jnp.dtype(dtype).name}{list(shape)}"


def _differences(expected: Any, found: Any, name: str, compare: bool = True) -> list[str]:
    want, got = _by_key(expected), _by_key(found)
    lines = []
    for key, (path, leaf) in want.items():
        if key not in got:
            lines.append(f"  {path}: missing from {name}; expected {_describe(leaf)}")
            continue
        other = got[key][1]
        if not compare:
            continue
        shape, dtype = getattr(other, "shape", None), getattr(other, "dtype", None)
        if shape is None or dtype is None:
            lines.append(f"  {path}: {name} holds a {type(other).__name__}, not an array")
            continue
        if jnp.dtype(dtype) != jnp.dtype(leaf.dtype) or tuple(shape) != tuple(leaf.shape):
            lines.append(f"  {path}: {_describe(other)} in {name}, expected {_describe(leaf)}")
    for key, (path, leaf) in got.items():
        if key not in want:
            lines.append(f"  {path}: {_describe(leaf)} in {name}, not in the state of `opt`")
    return lines


def _block_size_differences(expected: Any, found: Any) -> list[str]:
    """Where `found` records another block size than `expected` (the length of ``block_size``).

    Blocks of another size would read every scale against the wrong values,
    and the scales can have the same shape either way (300 values are two
    blocks of 256 or of 200).
    """
    want, got = _by_key(expected), _by_key(found)
    lines = []
    for key, (path, leaf) in got.items():
        if key[-1:] != ("block_size",) or key not in want:
            continue
        size, expected_size = getattr(leaf, "shape", None), getattr(want[key][1], "shape", None)
        if size is not None and expected_size is not None and tuple(size) != tuple(expected_size):
            lines.append(
                f"  {path}: written in blocks of {size[0] if size else '?'} values, but the "
                f"optimizer's `block_size` is {expected_size[0] if expected_size else '?'}"
            )
    return lines


def check_state(opt: optax.GradientTransformation, params: Any, state: Any) -> None:
    """Checks that `state` is a state of `opt` for `params`: the same arrays, dtypes and shapes.

    A checkpoint restores into whatever target it is given: an array saved in
    bfloat16 comes back cast to a float32 target, a leaf the target lacks is
    dropped, and the optimizer goes on from a state it never wrote. Check the
    checkpoint's metadata before restoring (or the restored state after), so
    that a state of another configuration fails loudly instead.

    Leaves are matched by their key paths, with a NamedTuple's fields, a
    dict's keys and a sequence's indices taken alike (checkpoints store
    NamedTuples as dicts and tuples as lists); ``None`` leaves hold nothing.

    Args:
        opt: The optimizer, any ``optax.GradientTransformation``.
        params: The parameters: arrays or ``jax.ShapeDtypeStruct``.
        state: A pytree whose leaves have ``shape`` and ``dtype``: a restored
            state, or the metadata a checkpointing library keeps of one (such
            as the subtree of ``orbax.checkpoint.StandardCheckpointer().
            metadata(path).item_metadata`` that holds the state).

    Raises:
        ValueError: If `state` does not match ``opt.init(params)``; the message
            lists every key path that is missing, extra, or of another dtype
            or shape. And where they match, if a scale of a restored state
            (not metadata) is negative or above 2^125 (+inf included), values
            no step writes.

    Examples:
        >>> import jax.numpy as jnp
        >>> from adamax_jax import adamax, check_state
        >>> params = {"w": jnp.zeros(3)}
        >>> check_state(adamax(), params, adamax().init(params))
        >>> saved = adamax(mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16).init(params)
        >>> check_state(adamax(), params, saved)
        Traceback (most recent call last):
        ...
        ValueError: `state` is not a state of `opt` for `params`:
          [0].mu['w']: bfloat16[3] in `state`, expected float32[3]
          [0].nu['w']: bfloat16[3] in `state`, expected float32[3]
          [0].nu_scale['w']: float32[] in `state`, not in the state of `opt`
    """
    expected = abstract_state(opt, params, shardings=None)
    blocks = _block_size_differences(expected, state)
    # A block size of another length is said as such, not as an array of another shape.
    lines = [
        x for x in _differences(expected, state, "`state`") if "block_size:" not in x or not blocks
    ]
    lines += blocks
    if not lines:
        lines = _scale_differences(expected, state)
    if lines:
        raise ValueError("`state` is not a state of `opt` for `params`:\n" + "\n".join(lines))


def _scale_keys(expected: Any) -> list[tuple[str, ...]]:
    """The key paths of the `mu_scale` and `nu_scale` fields of each AdaMax state in `expected`."""

    def is_adamax_state(x: Any) -> bool:
        return isinstance(x, ScaleByAdamaxState)

    flat = jax.tree_util.tree_flatten_with_path(expected, is_leaf=is_adamax_state)[0]
    prefixes = [tuple(_key(e) for e in path) for path, x in flat if is_adamax_state(x)]
    return [p + (field,) for p in prefixes for field in ("mu_scale", "nu_scale")]


def _host_values(leaf: Any) -> list[np.ndarray]:
    """The values of `leaf` this process holds (its own shards of a multi-process array)."""
    if isinstance(leaf, jax.Array):
        return [np.asarray(shard.data, np.float32) for shard in leaf.addressable_shards]
    return [np.asarray(leaf, np.float32)]


def _scale_differences(expected: Any, found: Any) -> list[str]:
    """Where a scale of `found` holds a value no step writes: negative, or above 2^125.

    A scale is positive and at most 2^125, 0 for an 8-bit ν block that holds
    nothing yet, or NaN for a block that took a non-finite gradient (which
    stays visible). A larger ν scale (+inf included) reads back as the largest
    finite value or freezes its parameters; a negative one flips the sign of
    what it holds. Checked where the scales are values (a restored state, in
    the shards this process holds), not where they are metadata.
    """
    scales = _scale_keys(expected)
    lines = []
    for key, (path, leaf) in _by_key(found).items():
        if not any(key[: len(s)] == s for s in scales):
            continue
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)) or is_traced(leaf):
            continue
        values = _host_values(leaf)
        bad = sum(int(np.sum((v < 0) | (v > LARGEST_SCALE))) for v in values)
        if bad:
            held = sum(v.size for v in values)
            lines.append(
                f"  {path}: {bad} of {held} scales negative or above 2^125 (infinite "
                "included); a scale no step writes (a state changed by hand?)"
            )
    return lines
