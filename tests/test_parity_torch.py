"""Parity with torch.optim.Adamax: the real PyTorch, float32, 300 steps, relative deviation <= 1e-5.

torch is imported unconditionally: where it is missing this module fails, so that CI never
skips the port check silently.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adamax_jax as ax
from tests.reference import params_away_from_zero, random_gradients
from tests.trajectory import scan_trajectory

STEPS = 300
# The bound on the largest relative deviation of any parameter at any step.
RTOL = 1e-5

# lr <= 0.002 keeps the parameters (|θ0| in [1, 2]) away from 0 for 300 steps, so that a
# relative deviation means something at every step. torch.optim.Adamax refuses β₂ = 1.
HYPERS = {
    "default": dict(lr=0.002, b1=0.9, b2=0.999, eps=1e-8),
    "fast": dict(lr=0.001, b1=0.5, b2=0.9, eps=1e-3),
    "no-momentum": dict(lr=0.002, b1=0.0, b2=0.99, eps=1e-6),
}
SHAPES = {"w": (8, 8), "b": (8,)}


def _problem(seed):
    rng = np.random.default_rng(seed)
    params = {k: params_away_from_zero(rng, s).astype(np.float32) for k, s in SHAPES.items()}
    grads = {k: random_gradients(rng, STEPS, s).astype(np.float32) for k, s in SHAPES.items()}
    return params, grads


def _torch_path(params, grads, **kwargs):
    """Parameters after each step of torch.optim.Adamax fed the given gradients."""
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch.optim.Adamax(list(tensors.values()), **kwargs)
    path = {k: [] for k in tensors}
    for i in range(STEPS):
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k][i].copy())
        opt.step()
        for k, t in tensors.items():
            path[k].append(t.detach().numpy().copy())
    return {k: np.stack(v) for k, v in path.items()}


def _jax_path(opt, params, grads):
    return jax.tree.map(np.asarray, scan_trajectory(opt, params, grads)[1])


def _torch_kwargs(hyper):
    return dict(lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("hyper", list(HYPERS))
def test_adamax_matches_torch(hyper, foreach):
    h = HYPERS[hyper]
    params, grads = _problem(0)
    want = _torch_path(params, grads, **_torch_kwargs(h), foreach=foreach)
    got = _jax_path(
        ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"], eps_mode="inside_max"), params, grads
    )
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)


def _coupled(weight_decay, lr, maximize=False, **hyper):
    """torch's Adamax(weight_decay, maximize) by composition: the gradient is changed first."""
    parts = [optax.scale(-1.0)] if maximize else []
    if weight_decay:
        # torch adds λθ to the (already negated) gradient, before the moments see it.
        parts.append(optax.add_decayed_weights(weight_decay))
    parts += [ax.scale_by_adamax(**hyper, eps_mode="inside_max"), optax.scale_by_learning_rate(lr)]
    return optax.chain(*parts)


@pytest.mark.parametrize("weight_decay", [1e-2, 0.5])
def test_coupled_weight_decay_by_composition(weight_decay):
    h = HYPERS["default"]
    params, grads = _problem(1)
    want = _torch_path(params, grads, **_torch_kwargs(h), weight_decay=weight_decay)
    opt = _coupled(weight_decay, h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"])
    got = _jax_path(opt, params, grads)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_maximize_by_composition(weight_decay):
    h = HYPERS["default"]
    params, grads = _problem(2)
    want = _torch_path(params, grads, **_torch_kwargs(h), weight_decay=weight_decay, maximize=True)
    opt = _coupled(weight_decay, h["lr"], maximize=True, b1=h["b1"], b2=h["b2"], eps=h["eps"])
    got = _jax_path(opt, params, grads)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)
    # Maximizing really climbs: the opposite direction of a plain run.
    plain = _jax_path(ax.adamax(h["lr"], eps_mode="inside_max"), params, grads)
    assert not np.allclose(plain["w"][-1], got["w"][-1], rtol=RTOL, atol=0)


def test_learning_rate_schedule_matches_torch_scheduler():
    # torch's ExponentialLR, stepped after each optimizer step, is optax's exponential_decay
    # with transition_steps=1: both use lr0 * gamma**k at the k-th step (from 0).
    h, gamma = HYPERS["default"], 0.995
    params, grads = _problem(3)
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch.optim.Adamax(list(tensors.values()), **_torch_kwargs(h))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    for i in range(STEPS):
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k][i].copy())
        opt.step()
        sched.step()
    want = {k: t.detach().numpy() for k, t in tensors.items()}
    lr = optax.exponential_decay(h["lr"], transition_steps=1, decay_rate=gamma)
    got = _jax_path(ax.adamax(lr, eps_mode="inside_max"), params, grads)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], got), want, rtol=RTOL, atol=0)


def test_adamax_step_matches_torch():
    # The functional step, for code that keeps its own (m, u), follows torch as well.
    h = HYPERS["fast"]
    params, grads = _problem(4)
    want = _torch_path(params, grads, **_torch_kwargs(h))
    step = jax.jit(
        lambda p, g, m, u, t: ax.adamax_step(
            p, g, m, u, t, h["lr"], h["b1"], h["b2"], h["eps"], eps_mode="inside_max"
        )
    )
    p = jax.tree.map(jnp.asarray, params)
    m = u = jax.tree.map(jnp.zeros_like, p)
    for i in range(STEPS):
        p, m, u = step(p, jax.tree.map(lambda g, i=i: g[i], grads), m, u, i + 1)
    chex.assert_trees_all_close(p, jax.tree.map(lambda x: x[-1], want), rtol=RTOL, atol=0)


def test_default_eps_mode_is_not_torch():
    # The tolerance is discriminating: ε in the denominator (Keras' convention) is not
    # PyTorch's. The two differ by (1 - β₂)ε in the denominator, so ε must be large to show.
    h = dict(HYPERS["fast"], eps=0.1)
    params, grads = _problem(5)
    want = _torch_path(params, grads, **_torch_kwargs(h))
    got = _jax_path(ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"]), params, grads)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)
