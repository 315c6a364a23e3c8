from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests.reference import adamax_numpy

# The seed's reference cases: (param, grad, m, u, t) -> (param, m, u).
CASES = {
    "a": ((1.0, 0.1, 0.0, 0.0, 1), (0.998, 0.01, 0.1)),
    "b": (
        ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 1),
        ([0.998, 1.998, 2.998], [0.01, 0.02, 0.03], [0.1, 0.2, 0.3]),
    ),
    "c": ((0.5, 0.05, 0.02, 0.15, 5), (0.4992503879763, 0.023, 0.14985)),
}
# The document prints case (c) rounded to five places.
PRINTED_C = 0.49925


def _via_transformation(param, grad, m, u, t, eps_mode="denominator"):
    """Runs one step through `adamax` from a state holding (m, u) at step t - 1."""
    opt = ax.adamax(eps_mode=eps_mode)
    param, grad, m, u = (jnp.asarray(x, jnp.float32) for x in (param, grad, m, u))
    state = opt.init(param)
    inner = state[0]._replace(count=jnp.asarray(t - 1, jnp.int32), mu=m, nu=u)
    updates, new_state = opt.update(grad, (inner, *state[1:]), param)
    return optax.apply_updates(param, updates), new_state[0].mu, new_state[0].nu


def _runners():
    def step(*args):
        return ax.adamax_step(*args)

    def transform(*args):
        return _via_transformation(*args)

    def vmapped(fn):
        def run(param, grad, m, u, t):
            batch = [jnp.stack([jnp.asarray(x, jnp.float32)] * 3) for x in (param, grad, m, u)]
            out = jax.vmap(lambda *a: fn(*a, t))(*batch)
            for leaf in out:
                np.testing.assert_array_equal(leaf[0], leaf[2])
            return tuple(leaf[1] for leaf in out)

        return run

    return {
        "step-eager": step,
        "step-jit": jax.jit(step, static_argnums=4),
        "step-vmap": vmapped(step),
        "transform-eager": transform,
        "transform-jit": jax.jit(transform, static_argnums=4),
        "transform-vmap": vmapped(transform),
    }


RUNNERS = _runners()


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("case", list(CASES))
def test_reference_cases(case, runner):
    args, expected = CASES[case]
    got = RUNNERS[runner](*args)
    expected = tuple(np.asarray(e, np.float32) for e in expected)
    chex.assert_trees_all_close(tuple(np.asarray(g) for g in got), expected, rtol=2e-7, atol=0)


def test_case_c_as_printed_and_exactly_in_float64():
    with jax.enable_x64(True):
        args = tuple(np.asarray(a, np.float64) for a in CASES["c"][0][:4]) + (5,)
        param, m, u = ax.adamax_step(*args)
        assert param.dtype == jnp.float64
        chex.assert_trees_all_close(
            (param, m, u), tuple(np.float64(e) for e in CASES["c"][1]), rtol=1e-12, atol=0
        )
    assert round(float(param), 5) == PRINTED_C


def test_step_rejects_step_zero():
    with pytest.raises(ValueError, match="`t`"):
        ax.adamax_step(1.0, 0.1, 0.0, 0.0, 0)


HYPERS = [
    dict(lr=0.002, b1=0.9, b2=0.999, eps=1e-8),
    dict(lr=0.05, b1=0.5, b2=0.9, eps=1e-3),
    dict(lr=0.01, b1=0.0, b2=1.0, eps=0.0),
]


def _random_grads(rng, steps, shape):
    mags = 10.0 ** rng.uniform(-4, 1, size=(steps, *shape))
    grads = mags * rng.choice([-1.0, 1.0], size=(steps, *shape))
    grads[rng.random(size=grads.shape) < 0.1] = 0.0
    return grads


@pytest.mark.parametrize("hyper", HYPERS, ids=["default", "fast", "edge"])
@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
def test_trajectory_matches_float64_reference(hyper, eps_mode):
    rng = np.random.default_rng(0)
    steps, shape = 300, (7,)
    theta0 = rng.normal(size=shape)
    grads = _random_grads(rng, steps, shape)
    ref = adamax_numpy(theta0, grads, eps_mode=eps_mode, **hyper)

    with jax.enable_x64(True):
        opt = ax.adamax(hyper["lr"], hyper["b1"], hyper["b2"], hyper["eps"], eps_mode=eps_mode)
        params = jnp.asarray(theta0)
        state = opt.init(params)

        @jax.jit
        def run(params, state, grads):
            def body(carry, g):
                p, s = carry
                upd, s = opt.update(g, s, p)
                p = optax.apply_updates(p, upd)
                return (p, s), p

            return jax.lax.scan(body, (params, state), grads)

        (_, state), path = run(params, state, jnp.asarray(grads))
        ref_path = np.stack([h[0] for h in ref])
        chex.assert_trees_all_close(np.asarray(path), ref_path, rtol=1e-10, atol=1e-12)
        chex.assert_trees_all_close(
            (state[0].mu, ax.infinity_norm(state[0])), ref[-1][1:], rtol=1e-10, atol=1e-14
        )


def test_trajectory_float32_against_float64_reference():
    rng = np.random.default_rng(1)
    theta0 = rng.normal(size=(64,))
    grads = _random_grads(rng, 500, (64,))
    ref = adamax_numpy(theta0, grads)
    opt = ax.adamax()
    params = jnp.asarray(theta0, jnp.float32)
    state = opt.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for g in grads:
        params, state = step(params, state, jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(params, ref[-1][0], rtol=1e-5, atol=1e-6)


class Pair(NamedTuple):
    weight: jax.Array
    bias: jax.Array | None


def _nested_tree(rng):
    return {
        "layers": [
            Pair(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), None),
            Pair(
                jnp.asarray(rng.normal(size=(4,)), jnp.float32),
                jnp.asarray(rng.normal(size=()), jnp.float32),
            ),
        ],
        "scalar": jnp.asarray(0.5, jnp.float32),
        "tuple": (jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),),
        "none": None,
    }


def test_nested_pytree_matches_leafwise_reference():
    rng = np.random.default_rng(2)
    params = _nested_tree(rng)
    opt = ax.adamax(learning_rate=0.01)
    state = opt.init(params)
    grads_seq = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(20)
    ]
    p = params
    for g in grads_seq:
        upd, state = jax.jit(opt.update)(g, state, p)
        p = optax.apply_updates(p, upd)
    assert p["none"] is None and p["layers"][0].bias is None
    flat0, treedef = jax.tree.flatten(params)
    flat_g = [treedef.flatten_up_to(g) for g in grads_seq]
    for i, (leaf, got) in enumerate(zip(flat0, jax.tree.leaves(p), strict=True)):
        ref = adamax_numpy(np.asarray(leaf), np.stack([np.asarray(g[i]) for g in flat_g]), lr=0.01)
        np.testing.assert_allclose(got, ref[-1][0], rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_keep_their_dtypes():
    params = {
        "f32": jnp.ones(3, jnp.float32),
        "bf16": jnp.ones(3, jnp.bfloat16),
        "f16": jnp.ones(3, jnp.float16),
    }
    opt = ax.adamax()
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    for _ in range(3):
        updates, new_state = jax.jit(opt.update)(grads, state, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        chex.assert_trees_all_equal_dtypes(new_state, state)
        state = new_state


def test_jit_does_not_retrace_across_steps():
    opt = ax.adamax()
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    state = opt.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(5):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, 0.1 * (i + 1)), params)
        params, state = step(params, state, grads)
    assert int(state[0].count) == 5


def test_vmap_over_learning_rate_sweep():
    lrs = jnp.array([0.001, 0.01, 0.1])
    theta0 = jnp.array([1.0, -2.0])

    def train(lr):
        opt = optax.inject_hyperparams(ax.adamax)(learning_rate=lr)
        p = theta0
        s = opt.init(p)
        for _ in range(10):
            u, s = opt.update(2 * p, s, p)
            p = optax.apply_updates(p, u)
        return p

    got = jax.jit(jax.vmap(train))(lrs)
    for lr, row in zip(np.asarray(lrs), np.asarray(got), strict=True):
        ref = adamax_numpy(np.asarray(theta0), _Quadratic(10), lr=float(lr))
        np.testing.assert_allclose(row, ref[-1][0], rtol=1e-5)


class _Quadratic:
    """Gradient of sum(x**2), as a callable for the NumPy reference."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, theta):
        return 2 * theta


def _run_chain(opt, params, grads):
    p = jnp.asarray(params, jnp.float32)
    state = opt.init(p)
    for g in grads:
        updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, updates)
    return np.asarray(p, np.float64)


def test_chain_after_clip_by_global_norm():
    # The global norms change from step to step (50, 0.5, 20, 3) and the directions
    # too: clipped at 1, each step's gradient is rescaled by its own factor, which
    # AdaMax's running max does not undo. The first step alone could not tell: its
    # direction g/|g| does not depend on the gradient's scale.
    params = np.array([1.0, 2.0])
    grads = np.array([[30.0, 40.0], [0.3, -0.4], [-12.0, 16.0], [2.4, 1.8]])
    norms = np.linalg.norm(grads, axis=1)
    clipped = grads * np.minimum(1.0, 1.0 / norms)[:, None]
    got = _run_chain(optax.chain(optax.clip_by_global_norm(1.0), ax.adamax(0.1)), params, grads)
    want = adamax_numpy(params, clipped, lr=0.1)[-1][0]
    unclipped = adamax_numpy(params, grads, lr=0.1)[-1][0]
    # The case tells clipping from none by far more than the tolerance.
    assert np.max(np.abs(want - unclipped)) > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg="clip_by_global_norm then adamax")


@pytest.mark.usefixtures("standard_promotion")
def test_inject_hyperparams_traced_b1_b2_eps_and_lr():
    opt = optax.inject_hyperparams(ax.adamax)(learning_rate=0.01, b1=0.8, b2=0.99, eps=1e-6)
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    step = jax.jit(opt.update)
    p = params
    for _ in range(5):
        u, state = step(2 * p, state, p)
        p = optax.apply_updates(p, u)
    ref = adamax_numpy(np.asarray(params), _Quadratic(5), lr=0.01, b1=0.8, b2=0.99, eps=1e-6)
    np.testing.assert_allclose(p, ref[-1][0], rtol=1e-5)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, state = step(2 * p, state, p)
    np.testing.assert_array_equal(u, jnp.zeros(2))


def test_learning_rate_schedule():
    sched = optax.linear_schedule(0.0, 0.1, transition_steps=4)
    opt = ax.adamax(sched)
    p = jnp.array([1.0])
    s = opt.init(p)
    deltas = []
    for _ in range(4):
        u, s = opt.update(jnp.array([1.0]), s, p)
        deltas.append(float(u[0]))
    # A constant gradient gives direction 1 at every step, so each step is -lr_t.
    np.testing.assert_allclose(deltas, [-0.0, -0.025, -0.05, -0.075], rtol=1e-5, atol=1e-9)


@pytest.mark.usefixtures("standard_promotion")
def test_multi_steps_accumulates_the_mean_then_steps():
    # Two micro-gradients per step. Their mean, their sum and the last of them give three
    # different trajectories: the sum differs from the mean by a factor of 2, which a
    # large ε (0.5, added to u) does not cancel, and the last differs in direction.
    eps = 0.5
    params = np.array([1.0, -1.0])
    micro = np.array([[1.0, 3.0], [3.0, -1.0], [-1.0, 0.5], [0.5, 2.0], [2.0, -4.0], [4.0, 1.0]])
    pairs = micro.reshape(3, 2, 2)
    opt = optax.MultiSteps(ax.adamax(0.1, eps=eps), every_k_schedule=2)
    p = jnp.asarray(params, jnp.float32)
    state = opt.init(p)
    for i, g in enumerate(micro):
        updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        if i % 2 == 0:
            np.testing.assert_array_equal(updates, jnp.zeros(2), err_msg=f"micro-step {i + 1}")
        p = optax.apply_updates(p, updates)
    references = {
        mode: adamax_numpy(params, grads, lr=0.1, eps=eps)[-1][0]
        for mode, grads in {
            "mean": pairs.mean(axis=1),
            "sum": pairs.sum(axis=1),
            "last": pairs[:, -1],
        }.items()
    }
    for other in ("sum", "last"):
        assert np.max(np.abs(references[other] - references["mean"])) > 1e-2, other
    np.testing.assert_allclose(
        np.asarray(p, np.float64), references["mean"], rtol=1e-6, err_msg="MultiSteps, mean"
    )


def test_masked_leaves_untouched():
    params = {"w": jnp.ones(2), "frozen": jnp.ones(2)}
    opt = optax.masked(ax.adamax(0.1), {"w": True, "frozen": False})
    s = opt.init(params)
    grads = {"w": jnp.ones(2), "frozen": jnp.ones(2)}
    u, s = opt.update(grads, s, params)
    np.testing.assert_array_equal(u["frozen"], grads["frozen"])
    np.testing.assert_allclose(u["w"], -0.1 * jnp.ones(2), rtol=1e-6)


@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
def test_eps_modes_differ_as_documented(eps_mode):
    eps = 0.5
    p, g = jnp.array([0.0]), jnp.array([1.0])
    opt = ax.adamax(1.0, eps=eps, eps_mode=eps_mode)
    u, s = opt.update(g, opt.init(p), p)
    expected = {"denominator": 1 / 1.5, "inside_max": 1 / 1.5, "none": 1.0}[eps_mode]
    np.testing.assert_allclose(-u, [expected], rtol=1e-6)
    expected_u = {"denominator": 1.0, "inside_max": 1.5, "none": 1.0}[eps_mode]
    np.testing.assert_allclose(s[0].nu, [expected_u], rtol=1e-6)


def test_zero_gradients_without_eps_give_zero_step():
    p = jnp.array([1.0, 2.0])
    opt = ax.adamax(0.1, eps=0.0, eps_mode="none")
    u, _ = opt.update(jnp.zeros(2), opt.init(p), p)
    np.testing.assert_array_equal(u, jnp.zeros(2))


def test_adamaxw_decays_by_learning_rate_times_weight_decay():
    p = jnp.array([2.0, -4.0])
    opt = ax.adamaxw(0.1, weight_decay=0.5)
    u, _ = opt.update(jnp.array([1.0, -1.0]), opt.init(p), p)
    np.testing.assert_allclose(u, -0.1 * (jnp.array([1.0, -1.0]) + 0.5 * p), rtol=1e-6)


def test_adamaxw_mask_exempts_leaves():
    p = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
    opt = ax.adamaxw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
    u, _ = opt.update({"w": jnp.zeros(1), "b": jnp.zeros(1)}, opt.init(p), p)
    np.testing.assert_allclose(u["w"], [-0.1], rtol=1e-6)
    np.testing.assert_array_equal(u["b"], [0.0])


def test_scale_by_adamax_sign_and_state_layout():
    tx = ax.scale_by_adamax()
    p = jnp.array([1.0, 1.0])
    state = tx.init(p)
    assert isinstance(state, ax.ScaleByAdamaxState)
    assert state.count.dtype == jnp.int32 and state.count.shape == ()
    assert state._fields[:3] == ("count", "mu", "nu")
    u, state = tx.update(jnp.array([0.5, -0.5]), state, p)
    np.testing.assert_allclose(u, [1.0, -1.0], rtol=1e-6)
    np.testing.assert_allclose(state.nu, [0.5, 0.5])
    # float32 state holds exactly the arrays of optax's: no scales, no block size.
    assert state._fields == ("count", "mu", "nu", "mu_scale", "nu_scale", "block_size")
    assert state.mu_scale is None and state.nu_scale is None and state.block_size is None
