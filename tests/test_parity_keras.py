"""Parity with keras.optimizers.Adamax on the JAX backend: float32, 300 steps, rtol 1e-5.

keras is imported unconditionally (by the module fixture below): where it is missing every
test here errors, so that CI never skips the port check silently.
"""

import importlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests.reference import params_away_from_zero, random_gradients
from tests.trajectory import scan_trajectory

keras = None


@pytest.fixture(scope="module", autouse=True)
def keras_on_jax():
    """Imports keras on its JAX backend, with KERAS_BACKEND set for this module only.

    Keras reads KERAS_BACKEND once, when ``keras`` is first imported
    (``keras.src.backend.config``), and keeps that backend for the process. The variable is
    set for the import and removed after this module, so that no other test and no worker
    process started later inherits it. The JAX backend needs no TensorFlow.
    """
    global keras
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", "jax")
        if "keras" in sys.modules:
            # Imported before with some backend: it must be JAX's.
            assert sys.modules["keras"].backend.backend() == "jax"
        keras = importlib.import_module("keras")
        yield keras
    keras = None


STEPS = 300
# The bound on the largest relative deviation of any parameter at any step.
RTOL = 1e-5
# keras.optimizers.Adamax's default ε.
KERAS_EPS = 1e-7

# lr <= 0.002 keeps the parameters (|θ0| in [1, 2]) away from 0 for 300 steps, so that a
# relative deviation means something at every step.
HYPERS = {
    "default": dict(lr=0.001, b1=0.9, b2=0.999, eps=KERAS_EPS),
    "fast": dict(lr=0.002, b1=0.5, b2=0.9, eps=1e-3),
}
SHAPES = {"kernel": (8, 8), "bias": (8,)}


def test_keras_runs_on_jax():
    assert keras.backend.backend() == "jax"


def _problem(seed):
    rng = np.random.default_rng(seed)
    params = {k: params_away_from_zero(rng, s).astype(np.float32) for k, s in SHAPES.items()}
    grads = {k: random_gradients(rng, STEPS, s).astype(np.float32) for k, s in SHAPES.items()}
    return params, grads


def _keras_path(params, grads, exclude_from_weight_decay=None, dtype="float32", **kwargs):
    """Parameters after each step of keras.optimizers.Adamax fed the given gradients."""
    variables = {k: keras.Variable(v, dtype=dtype, name=k) for k, v in params.items()}
    opt = keras.optimizers.Adamax(**kwargs)
    if exclude_from_weight_decay:
        opt.exclude_from_weight_decay(var_names=exclude_from_weight_decay)
    path = {k: [] for k in variables}
    # Keras' own arithmetic promotes Python scalars against int64 counters; strict
    # promotion is for our code, not Keras'.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(STEPS):
            opt.apply([jnp.asarray(grads[k][i]) for k in variables], list(variables.values()))
            for k, v in variables.items():
                path[k].append(np.asarray(v.value))
    return {k: np.stack(v) for k, v in path.items()}


def _jax_path(opt, params, grads):
    return jax.tree.map(np.asarray, scan_trajectory(opt, params, grads)[1])


def _keras_kwargs(hyper):
    return dict(
        learning_rate=hyper["lr"], beta_1=hyper["b1"], beta_2=hyper["b2"], epsilon=hyper["eps"]
    )


@pytest.mark.parametrize("hyper", list(HYPERS))
def test_adamax_matches_keras(hyper):
    h = HYPERS[hyper]
    params, grads = _problem(0)
    want = _keras_path(params, grads, **_keras_kwargs(h))
    got = _jax_path(ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"]), params, grads)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("exclude", [None, ["bias"]], ids=["all", "no-bias"])
@pytest.mark.parametrize("weight_decay", [0.05, 0.5])
def test_decoupled_weight_decay_matches_keras(weight_decay, exclude):
    # Keras applies θ ← θ - θ·λ·lr before its AdaMax step; the AdaMax direction does not
    # depend on θ, so this is adamaxw's θ ← θ - lr·(d + λθ).
    h = HYPERS["default"]
    params, grads = _problem(1)
    want = _keras_path(
        params,
        grads,
        exclude_from_weight_decay=exclude,
        weight_decay=weight_decay,
        **_keras_kwargs(h),
    )
    mask = None if exclude is None else {"kernel": True, "bias": False}
    opt = ax.adamaxw(h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=weight_decay, mask=mask)
    got = _jax_path(opt, params, grads)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)


# keras.optimizers.AdamW's default λ, and a large one.
@pytest.mark.parametrize("weight_decay", [4e-3, 0.5])
def test_weight_decay_rule_matches_keras_in_float64(weight_decay):
    # Keras rounds θ - θ·λ·lr to θ's dtype as a step of its own. Where λ·lr is tiny that
    # rounding is the same fraction of an ulp every step, and in float32 Keras drifts from
    # the exact rule (by about 1e-5 relative over 300 steps at λ = 4e-3, lr = 1e-3). In float64
    # the rule itself is compared: Keras and adamaxw agree to rounding, and adamaxw in
    # float32 stays within the port tolerance of Keras in float64.
    # Keras keeps the learning rate in a float32 variable: 2**-10 is exact there.
    h = dict(HYPERS["default"], lr=2.0**-10)
    params, grads = _problem(2)
    with jax.enable_x64(True):
        want = _keras_path(
            params, grads, dtype="float64", weight_decay=weight_decay, **_keras_kwargs(h)
        )
        opt = ax.adamaxw(h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=weight_decay)
        as64 = jax.tree.map(lambda x: x.astype(np.float64), (params, grads))
        got64 = _jax_path(opt, *as64)
        got32 = _jax_path(opt, params, grads)
    chex.assert_trees_all_equal_dtypes(got64, want)
    # 300 steps of a few float64 roundings each.
    chex.assert_trees_all_close(got64, want, rtol=1e-12, atol=0)
    chex.assert_trees_all_close(got32, want, rtol=RTOL, atol=0)


def test_keras_weight_decay_is_not_coupled():
    # The tolerance is discriminating: torch-style coupled L2 (λθ added to the gradient)
    # is not Keras' weight decay.
    h, weight_decay = HYPERS["default"], 0.5
    params, grads = _problem(3)
    want = _keras_path(params, grads, weight_decay=weight_decay, **_keras_kwargs(h))
    coupled = optax.chain(
        optax.add_decayed_weights(weight_decay),
        ax.scale_by_adamax(h["b1"], h["b2"], h["eps"]),
        optax.scale_by_learning_rate(h["lr"]),
    )
    got = _jax_path(coupled, params, grads)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "keras_clip, optax_clip",
    [
        (dict(global_clipnorm=1.0), optax.clip_by_global_norm(1.0)),
        (dict(clipvalue=0.5), optax.clip(0.5)),
    ],
    ids=["global_clipnorm", "clipvalue"],
)
def test_gradient_clipping_matches_keras(keras_clip, optax_clip):
    h = HYPERS["default"]
    params, grads = _problem(4)
    want = _keras_path(params, grads, **keras_clip, **_keras_kwargs(h))
    got = _jax_path(optax.chain(optax_clip, ax.adamax(h["lr"], eps=h["eps"])), params, grads)
    chex.assert_trees_all_close(got, want, rtol=RTOL, atol=0)
