"""Sharding helpers: optimizer state that lives where the parameters live."""

import jax
import jax.numpy as jnp


def zeros_like(x: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
    """Zeros shaped, and under ``jax.jit`` sharded, like `x`.

    ``jnp.zeros_like`` depends on no input data, so inside ``jit`` the compiler
    is free to place it anywhere and typically leaves it on one device. A select
    that reads `x` ties the result to the sharding of `x`; it costs one pass at
    initialisation only.
    """
    x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = x.real
    zeros = jnp.zeros(x.shape, dtype)
    return jnp.where(jnp.zeros(x.shape, bool), x.astype(dtype), zeros)
