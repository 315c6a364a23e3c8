"""Runs an optimizer over a sequence of gradients, as the tests compare trajectories."""

import jax
import jax.numpy as jnp
import optax


def scan_trajectory(opt, params, grads, promotion="strict"):
    """Applies `opt` once per gradient in one jitted scan.

    Args:
        opt: An optax transformation.
        params: The initial parameters.
        grads: The gradients, stacked along a leading axis of steps.
        promotion: The dtype promotion mode to trace under ("standard" for
            transformations that are not ours).

    Returns:
        The final optimizer state, and the parameters after every step
        (stacked along a leading axis).
    """

    @jax.jit
    def run(params, grads):
        with jax.numpy_dtype_promotion(promotion):

            def body(carry, g):
                p, s = carry
                u, s = opt.update(g, s, p)
                p = optax.apply_updates(p, u)
                return (p, s), p

            return jax.lax.scan(body, (params, opt.init(params)), grads)

    (_, state), path = run(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    return state, path
