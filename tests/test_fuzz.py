"""A bounded fuzz run: random pytrees, dtypes and hyperparameters.

Every example either raises one of the documented errors (a ValueError naming a
bad hyperparameter or the key path of a mismatched gradient, a TypeError naming
the key path of an integer or boolean parameter) or runs three steps without a
NaN anywhere, keeping every dtype. Hyperparameters come in every form a user may
pass (lists, tuples, NumPy and JAX arrays, ``Fraction``, ``Decimal``): a valid
one gives the updates of the plain float, an invalid one fails when the
optimizer is built. Finite input of any floating dtype and magnitude, and
Python-number or integer gradient leaves, give finite updates.
"""

import decimal
import fractions
import functools
import math
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
    "eps": [-1e-3, math.inf, math.nan, 1e39],
    "learning_rate": [math.nan, math.inf, None, 1e39],
    "weight_decay": [math.nan, -math.inf, -1e39],
    "eps_mode": ["max", None],
    "complex_mode": ["polar"],
    # float8_e4m3fn, float8_e5m2, int8 (and uint8 for ν) are 8-bit block-wise storage.
    "mu_dtype": ["int32", "x", "float8_e4m3fnuz", "uint8"],
    "nu_dtype": ["bool", "y", "float8_e4m3fnuz", "int16"],
}
NUMERIC = ("learning_rate", "b1", "b2", "eps", "weight_decay")
# Forms that hold a Python float exactly, as the plain float does.
EXACT_FORMS = {
    "plain": lambda x: x,
    "list": lambda x: [x],
    "tuple": lambda x: (x,),
    "nested-list": lambda x: [[x]],
    "np-float64": np.float64,
    "np-0d": lambda x: np.asarray(x, np.float64),
    "np-1": lambda x: np.asarray([x], np.float64),
    "fraction": fractions.Fraction,
    "decimal": lambda x: decimal.Decimal(repr(x)),
}
# Forms that hold a float32 value exactly.
FLOAT32_FORMS = {
    **EXACT_FORMS,
    "np-float32": np.float32,
    "np-1x1-float32": lambda x: np.asarray([[x]], np.float32),
    "jnp-0d": lambda x: jnp.asarray(x, jnp.float32),
    "jnp-1": lambda x: jnp.asarray([x], jnp.float32),
}
# Never one number: refused whatever the value.
NOT_SCALAR_FORMS = {
    "list-2": lambda x: [x, x],
    "tuple-2": lambda x: (x, x),
    "np-2": lambda x: np.asarray([x, x]),
    "jnp-2": lambda x: jnp.asarray([x, x], jnp.float32),
    "jnp-2x1": lambda x: jnp.asarray([[x], [x]], jnp.float32),
    "empty": lambda x: [],
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
    plain = dict(kwargs)
    for name in set(NUMERIC) & set(kwargs):
        form = draw(st.sampled_from(["plain"] * 4 + list(EXACT_FORMS)))
        kwargs[name] = EXACT_FORMS[form](kwargs[name])
    return factory, kwargs, plain


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
    factory, kwargs, plain = hyper
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
        if name in NUMERIC and isinstance(value, float):
            forms = {**EXACT_FORMS, **NOT_SCALAR_FORMS}
            if not math.isfinite(value):
                del forms["fraction"]  # holds finite numbers only
            value = forms[bad.draw(st.sampled_from(sorted(forms)))](value)
        if name in NUMERIC and bad.draw(st.booleans()):
            # A valid value in a form that is never one number.
            value = NOT_SCALAR_FORMS[bad.draw(st.sampled_from(sorted(NOT_SCALAR_FORMS)))](
                plain[name]
            )
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
            if plain["b1"] <= plain["b2"]:
                # Then |step| ≤ α B(t) ≤ α t (test_properties.py): finite.
                assert _all_finite((updates, state, new_params))
            assert jax.tree.structure(updates) == jax.tree.structure(params)
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
                assert u.dtype == p.dtype and u.shape == p.shape
            for s, s0 in zip(jax.tree.leaves(state), jax.tree.leaves(first_state), strict=True):
                assert s.dtype == s0.dtype and s.shape == s0.shape
            params = new_params


# Kind 3: hyperparameters of any form, checked when the optimizer is built.

FORM_FACTORIES = {
    **FACTORIES,
    "adamax_step": lambda **kw: functools.partial(ax.adamax_step, **kw),
}
FORM_TAKES = {
    **{k: v & set(NUMERIC) for k, v in TAKES.items()},
    "adamax_step": {"learning_rate", "b1", "b2", "eps"},
}
VALID = {
    "learning_rate": st.sampled_from([0.002, 1.0, 0.0, -0.5]) | st.floats(-10.0, 10.0),
    "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99),
    "b2": st.sampled_from([0.0, 0.999, 1.0]) | st.floats(0.0, 1.0),
    "eps": st.sampled_from([0.0, 1e-8, float(np.finfo(np.float32).max)]) | st.floats(0.0, 1e-3),
    "weight_decay": st.sampled_from([0.0, 1e-4]) | st.floats(-1.0, 1.0),
}
INVALID = {
    "learning_rate": [math.nan, math.inf, -math.inf, 1e39, -3.5e38],
    "b1": [1.0, 1.5, -0.5, math.nan, math.inf],
    "b2": [1.0 + 2**-20, -0.5, math.nan, -math.inf],
    "eps": [-1e-8, -1.0, math.nan, math.inf, 1e39, 3.5e38],
    "weight_decay": [math.nan, math.inf, 1e39, -1e39],
}
FORM_PARAMS = jnp.array([1.0, -0.5, 2.0])
FORM_GRADS = (jnp.array([0.3, -2.0, 0.0]), jnp.array([-0.1, 4.0, 1e-3]))


def _two_steps(build):
    """The two updates (or adamax_step results) of the transformation `build` gives."""
    tx = build()
    if isinstance(tx, functools.partial):
        zeros = jnp.zeros_like(FORM_PARAMS)
        p, m, u = tx(FORM_PARAMS, FORM_GRADS[0], zeros, zeros, 1)
        return tx(p, FORM_GRADS[1], m, u, 2)
    state = tx.init(FORM_PARAMS)
    out = []
    for g in FORM_GRADS:
        updates, state = tx.update(g, state, FORM_PARAMS)
        out.append(updates)
    return out


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_fuzz_hyperparameter_forms_checked_at_build_time(data):
    factory = data.draw(st.sampled_from(sorted(FORM_FACTORIES)))
    name = data.draw(st.sampled_from(sorted(FORM_TAKES[factory])))
    valid = data.draw(st.booleans())
    if valid:
        # Rounded to float32, so that every form holds the same number.
        value = float(np.float32(data.draw(VALID[name])))
    else:
        value = data.draw(st.sampled_from(INVALID[name]))
    forms = {**FLOAT32_FORMS, **NOT_SCALAR_FORMS}
    if not math.isfinite(value):
        del forms["fraction"]  # holds finite numbers only
    if name == "b1" and value == 1.0:
        # A float32 JAX array of β₁ = 1 is read as the nearest float32 below 1,
        # as inject_hyperparams delivers β₁ = 1 - 1e-8 (tests/test_validation.py).
        del forms["jnp-0d"], forms["jnp-1"]
    form = data.draw(st.sampled_from(sorted(forms)))
    with np.errstate(over="ignore"):
        given_value = forms[form](value)
    event(f"{'valid' if valid else 'invalid'} {name}, {form}")

    build = functools.partial(FORM_FACTORIES[factory], **{name: given_value})
    if not valid or form in NOT_SCALAR_FORMS:
        with pytest.raises(ValueError) as info:
            tx = build()
            if factory == "adamax_step":
                # A function, not a transformation: its first call is the build.
                tx(FORM_PARAMS, FORM_GRADS[0], FORM_PARAMS, FORM_PARAMS, 1)
        assert f"`{name}`" in str(info.value) and repr(given_value) in str(info.value)
        return
    reference = functools.partial(FORM_FACTORIES[factory], **{name: value})
    chex.assert_trees_all_equal(_two_steps(build), _two_steps(reference))


# Kinds 2 and 5: finite input of any floating dtype and magnitude gives finite
# updates, with gradient leaves that are Python numbers or integers, as optax takes.

PARAM_DTYPES = ["float16", "bfloat16", "float32"]
STATE_DTYPES = [None, "float16", "bfloat16", "float32"]


def _gradient(rng, dtype, kind, shape, huge):
    """A finite gradient up to the dtype's largest value, or an integer one."""
    top = math.log10(float(jnp.finfo(dtype).max))
    magnitude = np.asarray(10.0 ** rng.uniform(top - 1 if huge else -8, top, size=shape))
    values = np.minimum(magnitude, float(jnp.finfo(dtype).max)) * rng.choice([-1, 1], size=shape)
    if kind == "array":
        return jnp.asarray(values, dtype)
    integers = np.clip(np.round(values), -(2**31) + 1, 2**31 - 1).astype(np.int64)
    if kind == "python-float":
        return float(values.reshape(-1)[0]) if shape == () else jnp.asarray(values, dtype)
    if kind == "python-int":
        return int(integers.reshape(-1)[0]) if shape == () else jnp.asarray(integers, jnp.int32)
    return jnp.asarray(integers, jnp.int32)


def _four_steps_finite(factory, param_dtype, mu_dtype, nu_dtype, grad_kind, python_param, seed):
    rng = np.random.default_rng(seed)
    opt = FACTORIES[factory](mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    shapes = {"w": (3,), "s": ()}
    params = {k: jnp.asarray(rng.uniform(-2, 2, size=v), param_dtype) for k, v in shapes.items()}
    if python_param:
        params["s"] = float(params["s"])
    state = opt.init(params)
    # A huge gradient first, then smaller ones: a moment that overflowed once
    # would poison every later step.
    for step in range(4):
        grads = {
            k: _gradient(rng, param_dtype, grad_kind, v, huge=step == 0) for k, v in shapes.items()
        }
        updates, state = opt.update(grads, state, params)
        assert _all_finite(updates), (step, grads, updates)
        # optax adds a float32 update (of a Python-float gradient, say) to a
        # bfloat16 parameter by implicit promotion, which strict mode forbids.
        with jax.numpy_dtype_promotion("standard"):
            params = optax.apply_updates(params, updates)
        assert _all_finite(params), (step, grads, params)


FINITE_FACTORIES = ["adamax", "adamaxw", "nadamax", "scale_by_adamax"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    factory=st.sampled_from(FINITE_FACTORIES),
    param_dtype=st.sampled_from(PARAM_DTYPES),
    mu_dtype=st.sampled_from(STATE_DTYPES),
    nu_dtype=st.sampled_from(STATE_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_finite_updates_for_finite_gradients_of_any_dtype_and_magnitude(
    factory, param_dtype, mu_dtype, nu_dtype, seed
):
    event(f"{factory}, params {param_dtype}, mu {mu_dtype}, nu {nu_dtype}")
    _four_steps_finite(factory, param_dtype, mu_dtype, nu_dtype, "array", False, seed)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    factory=st.sampled_from(FINITE_FACTORIES),
    param_dtype=st.sampled_from(PARAM_DTYPES),
    grad_kind=st.sampled_from(["python-float", "python-int", "int32-array"]),
    python_param=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_python_number_and_integer_gradient_leaves_give_finite_updates(
    factory, param_dtype, grad_kind, python_param, seed
):
    event(f"{factory}, params {param_dtype}, grads {grad_kind}, python param {python_param}")
    _four_steps_finite(factory, param_dtype, None, None, grad_kind, python_param, seed)
