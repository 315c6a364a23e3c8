"""A bounded fuzz run: random pytrees, dtypes and hyperparameters.

Every example either raises one of the documented errors (a ValueError naming a
bad hyperparameter or the key path of a mismatched gradient, a TypeError naming
the key path of an integer or boolean parameter) or runs three steps without a
NaN anywhere, keeping every dtype.
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import event, given, settings
from hypothesis import strategies as st

import adamax_jax as ax

STEPS = 3
DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"]
SHAPES = [(), (0,), (1,), (3,), (2, 3)]
STORAGE = [None, "float16", "bfloat16", "float32", "float64"]
KEYS = ["w", "b", "scale", "emb", "k"]


@dataclass(frozen=True)
class Leaf:
    """What a parameter will be: not a pytree node, so a leaf to jax.tree."""

    dtype: str
    shape: tuple[int, ...]


LEAF = st.builds(Leaf, st.sampled_from(DTYPES), st.sampled_from(SHAPES))
TREES = st.recursive(
    st.one_of(LEAF, st.none()),
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=2).map(tuple),
    ),
    max_leaves=6,
)

TAKES = {
    "scale_by_adamax": {"b1", "b2", "eps", "eps_mode", "complex_mode", "mu_dtype", "nu_dtype"},
    "adamax": {"learning_rate", "b1", "b2", "eps", "eps_mode", "complex_mode", "mu_dtype"}
    | {"nu_dtype"},
    "nadamax": {"learning_rate", "b1", "b2", "eps", "eps_mode", "complex_mode", "mu_dtype"}
    | {"nu_dtype"},
}
TAKES["adamaxw"] = TAKES["adamax"] | {"weight_decay"}
BAD = {
    "b1": [1.0, -0.5, math.nan, 2, True, "0.9"],
    "b2": [1.5, -0.1, math.nan],
    "eps": [-1e-3, math.inf, math.nan],
    "learning_rate": [math.nan, math.inf, None],
    "weight_decay": [math.nan, -math.inf],
    "eps_mode": ["max", None],
    "complex_mode": ["polar"],
    "mu_dtype": ["int32", "x"],
    "nu_dtype": ["bool", "y"],
}
FACTORIES = {
    "scale_by_adamax": ax.scale_by_adamax,
    "adamax": ax.adamax,
    "adamaxw": ax.adamaxw,
    "nadamax": ax.nadamax,
}
FAULTS = [None, None, None, None, "hyper", "int_leaf", "none_grad", "shape", "extra_grad"]


@st.composite
def hyperparameters(draw):
    factory = draw(st.sampled_from(list(FACTORIES)))
    values = {
        "learning_rate": draw(st.sampled_from([0.002, 1.0]) | st.floats(1e-5, 1.0)),
        "b1": draw(st.sampled_from([0.0, 0.9, 1 - 1e-8]) | st.floats(0.0, 1.0, exclude_max=True)),
        "b2": draw(st.sampled_from([0.0, 0.999, 1.0]) | st.floats(0.0, 1.0)),
        "eps": draw(st.sampled_from([0.0, 1e-8]) | st.floats(0.0, 1e-3)),
        "weight_decay": draw(st.sampled_from([0.0, 1e-4]) | st.floats(-1.0, 1.0)),
        "eps_mode": draw(st.sampled_from(["denominator", "inside_max", "none"])),
        "complex_mode": draw(st.sampled_from(["modulus", "split"])),
        "mu_dtype": draw(st.sampled_from(STORAGE)),
        "nu_dtype": draw(st.sampled_from(STORAGE)),
    }
    kwargs = {k: v for k, v in values.items() if k in TAKES[factory]}
    if factory != "scale_by_adamax":
        kwargs["compensated"] = draw(st.booleans())
    return factory, kwargs


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), p, x) for p, x in leaves]


def _replace(tree, path, fn):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(x) if p == path else x, tree)


def _storage_max(dtypes):
    return min(float(jnp.finfo(d).max) for d in dtypes)


def _array(rng, shape, dtype, high):
    def real():
        magnitude = np.asarray(10.0 ** rng.uniform(-30, math.log10(high), size=shape))
        magnitude[rng.random(shape) < 0.2] = 0.0
        return magnitude * rng.choice([-1.0, 1.0], size=shape)

    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.asarray(real() + 1j * real(), dtype)
    return jnp.asarray(real(), dtype)


def _has_nan(tree):
    return any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(tree))


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    spec=TREES.filter(lambda t: any(isinstance(x, Leaf) for x in jax.tree.leaves(t))),
    hyper=hyperparameters(),
    fault=st.sampled_from(FAULTS),
    bad=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_only_documented_errors_and_no_nan(spec, hyper, fault, bad, seed):
    factory, kwargs = hyper
    event(f"fault: {fault}")
    rng = np.random.default_rng(seed)
    leaves = [x for x in jax.tree.leaves(spec) if isinstance(x, Leaf)]
    dtypes = [x.dtype for x in leaves] + [kwargs.get("mu_dtype"), kwargs.get("nu_dtype")]
    wide = any(d in ("float64", "complex128") for d in dtypes)
    for d in {x.dtype for x in leaves}:
        event(f"dtype: {d}")

    if fault == "hyper":
        name = bad.draw(st.sampled_from(sorted(set(BAD) & set(kwargs))))
        value = bad.draw(st.sampled_from(BAD[name]))
        kwargs = {**kwargs, name: value}
        try:
            FACTORIES[factory](**kwargs)
        except ValueError as e:
            assert f"`{name}`" in str(e) and repr(value) in str(e)
            return
        raise AssertionError(f"no ValueError for {name}={value!r}")

    with jax.enable_x64(wide):
        # Gradients no larger than every storage dtype holds, with room for
        # the modulus of a complex number and for m after bias correction.
        high = min(1e30, _storage_max([d for d in dtypes if d is not None]) / 100)
        params = jax.tree.map(lambda x: _array(rng, x.shape, x.dtype, 1e3), spec)
        opt = FACTORIES[factory](**kwargs)

        if fault == "int_leaf":
            label, path, _ = _paths(params)[rng.integers(len(_paths(params)))]
            label = label or "<root>"
            bad_dtype = rng.choice(["int32", "bool"])
            params = _replace(params, path, lambda x: jnp.zeros(x.shape, bad_dtype))
            try:
                opt.init(params)
            except TypeError as e:
                assert label in str(e) and "optax.masked" in str(e)
                return
            raise AssertionError(f"no TypeError for an integer leaf at {label}")

        state = opt.init(params)
        first_state = state
        for step in range(STEPS):
            grads = jax.tree.map(lambda p: _array(rng, p.shape, p.dtype, high), params)
            if step == STEPS - 1 and fault in ("none_grad", "shape", "extra_grad"):
                label, path, _ = _paths(grads)[rng.integers(len(_paths(grads)))]
                label = label or "`updates`"
                if fault == "none_grad":
                    grads = _replace(grads, path, lambda x: None)
                elif fault == "shape":
                    grads = _replace(grads, path, lambda x: jnp.zeros((*x.shape, 2), x.dtype))
                else:
                    grads = {"extra": jnp.ones(2), "grads": grads}
                    label = "['extra']"
                try:
                    opt.update(grads, state, params)
                except ValueError as e:
                    assert label in str(e)
                    return
                raise AssertionError(f"no ValueError for a {fault} gradient at {label}")
            updates, state = opt.update(grads, state, params)
            new_params = optax.apply_updates(params, updates)
            assert not _has_nan((updates, state, new_params))
            if kwargs["b1"] <= kwargs["b2"]:
                # Then |step| ≤ α B(t) ≤ α t (test_properties.py): finite.
                assert _all_finite((updates, state, new_params))
            assert jax.tree.structure(updates) == jax.tree.structure(params)
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
                assert u.dtype == p.dtype and u.shape == p.shape
            for s, s0 in zip(jax.tree.leaves(state), jax.tree.leaves(first_state), strict=True):
                assert s.dtype == s0.dtype and s.shape == s0.shape
            params = new_params
