"""Sharding helpers: optimizer state that lives where the parameters live."""

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def zeros_like(x: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
    """Zeros shaped, and under ``jax.jit`` sharded, like `x`.

    ``jnp.zeros_like`` depends on no input data, so inside ``jit`` on a mesh of
    ``Auto`` axes the compiler is free to place it anywhere and typically leaves
    it on one device. A select that reads `x` ties the result to the sharding
    of `x`; it costs one pass at initialisation only. On ``Explicit`` axes the
    sharding is part of the type, and every operand carries that of `x`.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        # Abstract parameters: zeros of that shape, on their sharding if they have one.
        target = jnp.dtype(x.dtype if dtype is None else dtype)
        if getattr(x, "sharding", None) is not None:
            return jnp.zeros(x.shape, target, device=x.sharding)
        return jnp.zeros(x.shape, target)
    x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = x.real
    zeros = lax.full_like(x, 0, dtype)
    return jnp.where(lax.full_like(x, False, jnp.bool_), x.astype(dtype), zeros)


def _same_mesh(a: Any, b: Mesh) -> bool:
    if tuple(a.axis_names) != tuple(b.axis_names) or tuple(a.axis_sizes) != tuple(b.axis_sizes):
        return False
    # An abstract mesh names no devices.
    return not isinstance(a, Mesh) or np.array_equal(a.device_ids, b.device_ids)


def _spec_axes(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _normalized_spec(spec: Any, ndim: int) -> tuple[tuple[str, ...], ...]:
    entries = [_spec_axes(e) for e in spec]
    return tuple(entries + [()] * (ndim - len(entries)))


def explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding of `x` where it is part of its type (``Explicit`` mesh axes), else None.

    `x` is an array, a tracer or a ``jax.ShapeDtypeStruct``; anything else
    (a NumPy array, a Python number) has none.
    """
    if isinstance(x, jax.Array):
        sharding = jax.typeof(x).sharding
    else:
        sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.explicit_axes:
        return sharding
    return None


def explicit_shards(x: Any) -> tuple[tuple[str, ...], int]:
    """The ``Explicit`` mesh axes that split the last axis of `x`, and into how many shards."""
    sharding = explicit_sharding(x)
    ndim = len(jnp.shape(x))
    if sharding is None or ndim == 0:
        return (), 1
    explicit = set(sharding.mesh.explicit_axes)
    axes = tuple(a for a in _normalized_spec(sharding.spec, ndim)[-1] if a in explicit)
    return axes, math.prod(sharding.mesh.shape[a] for a in axes)


def reshard_like(x: Any, like: Any) -> Any:
    """`x` resharded to the layout of `like`, where that layout is on ``Explicit`` axes.

    On ``Explicit`` mesh axes a sharding is part of an array's type, and an
    operation on two arrays split differently over the same dimension (a
    gradient split over "model", its ZeRO-1 state over ``("model", "data")``)
    is a type error. This moves `x` to the sharding of `like` with
    ``jax.sharding.reshard``, which costs what moving the data costs: a slice
    where `like` is split further, an all-gather where it is split less. On
    ``Auto`` axes, and where the two layouts agree already, `x` is returned as
    it is, and the compiler places the data.

    Args:
        x: An array, or ``None``.
        like: An array of the same shape whose layout `x` takes, or ``None``.

    Returns:
        `x`, resharded where the types require it.
    """
    if x is None or like is None:
        return x
    target = explicit_sharding(like)
    if target is None:
        return x
    ndim = len(jnp.shape(like))
    source = explicit_sharding(x)
    if source is not None and _normalized_spec(source.spec, ndim) == _normalized_spec(
        target.spec, ndim
    ):
        return x
    return jax.sharding.reshard(x, target)


def _abstract_param(path: Any, leaf: Any, mesh: Mesh) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        if not _same_mesh(sharding.mesh, mesh):
            raise ValueError(
                f"`params`{jax.tree_util.keystr(path)} is sharded over a mesh with axes "
                f"{dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes, strict=True))}, "
                f"not over `mesh` {dict(mesh.shape)}."
            )
        sharding = NamedSharding(mesh, sharding.spec)
    else:
        # Host arrays and arrays on one device are taken as replicated over the mesh.
        sharding = NamedSharding(mesh, PartitionSpec())
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf), sharding=sharding)


def params_mesh(params: Any) -> Mesh | None:
    """The one mesh the leaves of `params` are sharded over, or ``None`` if none is.

    Raises:
        ValueError: If leaves of `params` are sharded over different meshes.
    """
    found = None
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding) or not isinstance(sharding.mesh, Mesh):
            continue
        if found is None:
            found = (path, sharding.mesh)
        elif not _same_mesh(sharding.mesh, found[1]):
            raise ValueError(
                f"`params`{jax.tree_util.keystr(path)} is sharded over a mesh with axes "
                f"{dict(sharding.mesh.shape)}, `params`{jax.tree_util.keystr(found[0])} over "
                f"one with axes {dict(found[1].shape)}; all must share one mesh."
            )
    return None if found is None else found[1]


def init_placement(opt: optax.GradientTransformation, params: Any, mesh: Mesh | None) -> Any:
    """The shapes of ``opt.init(params)`` and the shardings ``jax.jit(opt.init)`` gives it.

    The compiler's own placement of the state, so that any transformation in
    `opt` is covered, whether or not it shards its state like the parameters.
    With a `mesh`, leaves of `params` without a ``NamedSharding`` count as
    replicated over it, and the mesh context gives arrays that ``opt.init``
    makes from nothing (on Explicit axes) the devices of the mesh. Without
    one, the parameters' own shardings (or the default device) are used.
    """
    if mesh is not None:
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x: _abstract_param(p, x, mesh), params
        )
        context: Any = jax.set_mesh(mesh)
    else:

        def plain(x: Any) -> jax.ShapeDtypeStruct:
            sharding = getattr(x, "sharding", None)
            sharding = sharding if isinstance(sharding, jax.sharding.Sharding) else None
            return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding)

        abstract = jax.tree.map(plain, params)
        context = contextlib.nullcontext()
    init = jax.jit(opt.init)
    with context:
        shapes = jax.eval_shape(init, abstract)
        placed = init.lower(abstract).compile().output_shardings
    return shapes, placed


def _split(
    shape: tuple[int, ...],
    spec: tuple[Any, ...],
    axes: tuple[str, ...],
    mesh: Any,
    block: int | None = None,
) -> PartitionSpec:
    """Adds `axes` to the entry of `spec` for the dimension that takes them best.

    With `block`, the last dimension is split only where every shard holds
    whole blocks of that many values, so that block-wise codes and their
    per-block scales split alike.
    """
    entries = [_spec_axes(e) for e in spec] + [()] * (len(shape) - len(spec))
    if any(a in axes for entry in entries for a in entry):
        # Already split over (part of) `axes`, as the parameters are under FSDP.
        return PartitionSpec(*spec)
    n = math.prod(mesh.shape[a] for a in axes)
    local = [
        size // math.prod(mesh.shape[a] for a in entry)
        for size, entry in zip(shape, entries, strict=True)
    ]
    divisible = [d for d in range(len(shape)) if local[d] % n == 0 and local[d] > 0]
    if block is not None:
        last = len(shape) - 1
        divisible = [d for d in divisible if d != last or (local[d] // n) % block == 0]
    if not divisible:
        return PartitionSpec(*spec)
    # A dimension not split yet if there is one: on Explicit axes a state
    # split over ("model", "data") no longer combines with a parameter split
    # over "model" alone. Then the largest, so that the shards stay large.
    dim = max(divisible, key=lambda d: (not entries[d], local[d], -d))
    new = [(e[0] if len(e) == 1 else e) if e else None for e in entries]
    joined = entries[dim] + axes
    new[dim] = joined[0] if len(joined) == 1 else joined
    return PartitionSpec(*new)


def zero1_state_shardings(
    opt: optax.GradientTransformation,
    params: Any,
    mesh: Mesh,
    axis: str | Sequence[str],
) -> Any:
    """Shardings that split the optimizer state over `axis` of `mesh` (ZeRO stage 1).

    In data parallelism the parameters are replicated over the data axis, and
    so, by default, is the optimizer state that follows them: every device
    holds all of it. ZeRO-1 splits the state over that axis instead; each
    device updates its slice and the compiler all-gathers the new parameters.

    Each state array is first sharded as ``opt.init`` shards it for `params`
    (like its parameter, for the transformations of this package); then one of
    its dimensions whose local size is divisible by the size of `axis` (one not
    split yet if there is one, then the largest) is split over `axis` as well.
    Arrays that cannot be split so (scalars such as ``count``, odd sizes) keep
    that sharding, as do arrays already split over `axis`. Apply the result with ``jax.jit``::

        shardings = zero1_state_shardings(opt, params, mesh, "data")
        state = jax.jit(opt.init, out_shardings=shardings)(params)
        step = jax.jit(train_step, in_shardings=(param_shardings, shardings, batch_shardings),
                       out_shardings=(param_shardings, shardings))

    Args:
        opt: The optimizer, any ``optax.GradientTransformation``.
        params: The parameters: arrays, or ``jax.ShapeDtypeStruct`` with their
            shardings. Leaves without a ``NamedSharding`` count as replicated.
        mesh: The mesh the parameters are (or will be) sharded over.
        axis: The mesh axis to split the state over, or a sequence of axes.

    Returns:
        A pytree of ``NamedSharding`` with the structure of ``opt.init(params)``.

    Raises:
        TypeError: If `mesh` is not a ``jax.sharding.Mesh``.
        ValueError: If `axis` names no axis of `mesh`, or a leaf of `params` is
            sharded over another mesh.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    axes = (axis,) if isinstance(axis, str) else tuple(axis) if isinstance(axis, Sequence) else ()
    if (
        not axes
        or len(set(axes)) != len(axes)
        or not all(isinstance(a, str) and a in mesh.axis_names for a in axes)
    ):
        raise ValueError(
            f"`axis` must name one or more distinct axes of `mesh` {tuple(mesh.axis_names)}, "
            f"got {axis!r}."
        )
    shapes, placed = init_placement(opt, params, mesh)

    def leaf(shape: jax.ShapeDtypeStruct, sharding: Any, block: int | None = None) -> Any:
        spec = ()
        if isinstance(sharding, NamedSharding) and _same_mesh(sharding.mesh, mesh):
            spec = tuple(sharding.spec)
        return NamedSharding(mesh, _split(tuple(shape.shape), spec, axes, mesh, block))

    def fitted(codes: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
        # A block scale is split as its codes are, on every axis whose shards hold
        # whole scales (a last axis of 1040 values over 4 shards holds 260 values,
        # but its 5 scales do not split in 4): elsewhere it is replicated.
        entries = [_spec_axes(e) for e in codes.spec] + [()] * len(shape)
        spec = [
            (e[0] if len(e) == 1 else e)
            if e and size % math.prod(mesh.shape[a] for a in e) == 0
            else None
            for size, e in zip(shape, entries, strict=False)
        ]
        return NamedSharding(mesh, PartitionSpec(*spec))

    def blockwise_leaves(shape: Any) -> list[bool]:
        """Whether either moment of each parameter is block-wise (its scale has an axis)."""
        flat, treedef = jax.tree.flatten(shape.mu, is_leaf=_is_none)
        out = [False] * len(flat)
        for scales in (shape.mu_scale, shape.nu_scale):
            if scales is not None:
                for i, c in enumerate(treedef.flatten_up_to(scales)):
                    out[i] = out[i] or (c is not None and len(c.shape) > 0)
        return out

    def moments(
        shape: Any, sharding: Any, role: str, block: int | None, blockwise_leaf: list[bool]
    ) -> tuple[Any, Any]:
        values, scales = getattr(shape, role), getattr(shape, f"{role}_scale")
        flat, treedef = jax.tree.flatten(values, is_leaf=_is_none)
        placed_values = treedef.flatten_up_to(getattr(sharding, role))
        if scales is None:
            scales_flat, placed_scales = [None] * len(flat), [None] * len(flat)
        else:
            scales_flat = treedef.flatten_up_to(scales)
            placed_scales = treedef.flatten_up_to(getattr(sharding, f"{role}_scale"))
        out_values, out_scales = [], []
        for v, v_sh, c, c_sh, either in zip(
            flat, placed_values, scales_flat, placed_scales, blockwise_leaf, strict=True
        ):
            if v is None:
                out_values.append(None)
                out_scales.append(None)
                continue
            # Block-wise codes and their per-block scales (one per block of the last
            # axis, the other axes those of the codes) are split alike, so that each
            # device holds the scales of its own blocks; and both moments of a
            # parameter are split alike where either is block-wise (on Explicit axes
            # the step combines them element by element).
            blockwise = c is not None and len(c.shape) > 0
            codes = leaf(v, v_sh, block if either else None)
            out_values.append(codes)
            if c is None:
                out_scales.append(None)
            else:
                out_scales.append(fitted(codes, tuple(c.shape)) if blockwise else leaf(c, c_sh))
        new_scales = None if scales is None else treedef.unflatten(out_scales)
        return treedef.unflatten(out_values), new_scales

    def node(shape: Any, sharding: Any) -> Any:
        if not _is_adamax_state(shape):
            return jax.tree.map(leaf, shape, sharding)
        marker = shape.block_size
        block = None if marker is None else int(marker.shape[0])
        either = blockwise_leaves(shape)
        mu, mu_scale = moments(shape, sharding, "mu", block, either)
        nu, nu_scale = moments(shape, sharding, "nu", block, either)
        return shape._replace(
            count=leaf(shape.count, sharding.count),
            mu=mu,
            nu=nu,
            mu_scale=mu_scale,
            nu_scale=nu_scale,
            # The block size is in this array's length; it is never split.
            block_size=None if marker is None else NamedSharding(mesh, PartitionSpec()),
        )

    return jax.tree.map(node, shapes, placed, is_leaf=_is_adamax_state)


def _is_none(x: Any) -> bool:
    return x is None


def _is_adamax_state(x: Any) -> bool:
    """Whether `x` is a ScaleByAdamaxState (its moments and their scales split alike)."""
    fields = getattr(x, "_fields", ())
    return isinstance(x, tuple) and "mu_scale" in fields and "block_size" in fields
