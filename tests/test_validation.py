import decimal
import fractions
import functools
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

INT32_MAX = int(np.iinfo(np.int32).max)
NAN, INF = float("nan"), float("inf")


def _step_with(**kwargs):
    """adamax_step with one bad keyword, the rest valid."""
    return ax.adamax_step(1.0, 0.1, 0.0, 0.0, 1, **kwargs)


FACTORIES = {
    "scale_by_adamax": ax.scale_by_adamax,
    "adamax": ax.adamax,
    "adamaxw": ax.adamaxw,
    "nadamax": ax.nadamax,
    "adamax_step": _step_with,
}
# (argument, bad value, factories that take the argument)
ALL = tuple(FACTORIES)
OPTIMIZERS = ("adamax", "adamaxw", "nadamax")
TRANSFORMS = ("scale_by_adamax", "adamax", "adamaxw", "nadamax")
BAD_HYPERPARAMETERS = [
    ("b1", 1.0, ALL),
    ("b1", 1.5, ALL),
    ("b1", -0.1, ALL),
    ("b1", NAN, ALL),
    ("b1", INF, ALL),
    ("b1", True, ALL),
    ("b1", "0.9", ALL),
    ("b1", 0.9 + 0j, ALL),
    ("b1", None, ALL),
    ("b1", np.float32(1.0), ALL),
    ("b1", np.array([0.5, 1.0]), ALL),
    ("b2", 1.0001, ALL),
    ("b2", -1e-9, ALL),
    ("b2", NAN, ALL),
    ("b2", -INF, ALL),
    ("b2", np.float64(2.0), ALL),
    ("eps", -1e-8, ALL),
    ("eps", INF, ALL),
    ("eps", NAN, ALL),
    ("eps", False, ALL),
    ("learning_rate", NAN, OPTIMIZERS + ("adamax_step",)),
    ("learning_rate", -INF, OPTIMIZERS + ("adamax_step",)),
    ("learning_rate", None, OPTIMIZERS),
    ("learning_rate", "0.1", OPTIMIZERS + ("adamax_step",)),
    ("learning_rate", np.array(NAN, np.float32), OPTIMIZERS + ("adamax_step",)),
    ("weight_decay", INF, ("adamaxw",)),
    ("weight_decay", NAN, ("adamaxw",)),
    ("weight_decay", None, ("adamaxw",)),
    ("eps_mode", "inside", ALL),
    ("eps_mode", "Denominator", ALL),
    ("eps_mode", None, ALL),
    ("eps_mode", 1, ALL),
    ("complex_mode", "real", TRANSFORMS),
    ("complex_mode", None, TRANSFORMS),
    ("mu_dtype", jnp.int32, TRANSFORMS),
    ("mu_dtype", "foo", TRANSFORMS),
    ("mu_dtype", bool, TRANSFORMS),
    ("nu_dtype", jnp.int16, TRANSFORMS),
    ("nu_dtype", "bar", TRANSFORMS),
]
CASES = [
    pytest.param(factory, name, value, id=f"{factory}-{name}={value!r}")
    for name, value, factories in BAD_HYPERPARAMETERS
    for factory in factories
]


@pytest.mark.parametrize("factory, name, value", CASES)
def test_bad_hyperparameter_names_argument_and_value(factory, name, value):
    pattern = re.escape(f"`{name}`") + ".*" + re.escape(repr(value))
    with pytest.raises(ValueError, match=pattern):
        FACTORIES[factory](**{name: value})


@pytest.mark.parametrize(
    "factory, name, value",
    [
        ("scale_by_adamax", "nesterov", "yes"),
        ("scale_by_adamax", "nesterov", None),
        ("adamax", "compensated", 1),
        ("adamaxw", "compensated", "no"),
        ("nadamax", "compensated", None),
    ],
)
def test_bad_flag_names_argument_and_value(factory, name, value):
    pattern = re.escape(f"`{name}`") + ".*" + re.escape(repr(value))
    with pytest.raises(ValueError, match=pattern):
        FACTORIES[factory](**{name: value})


def _kwargs_id(kwargs):
    return ",".join(f"{a}={v!r}" for a, v in kwargs.items())


EDGES = [
    dict(b1=0.0),
    dict(b1=0),
    dict(b1=np.float32(0.999)),
    dict(b2=0.0),
    dict(b2=1.0),
    dict(b2=1),
    dict(eps=0.0),
    dict(eps=0.0, eps_mode="none"),
    dict(eps=0.0, eps_mode="inside_max"),
    dict(eps=np.float64(1e-3)),
    dict(b1=0.0, b2=0.0, eps=0.0),
]


@pytest.mark.parametrize("factory", ["scale_by_adamax", "adamax", "nadamax"])
@pytest.mark.parametrize(
    "kwargs", EDGES, ids=lambda k: ",".join(f"{a}={v!r}" for a, v in k.items())
)
def test_edge_hyperparameters_accepted_and_finite(factory, kwargs):
    opt = FACTORIES[factory](**kwargs)
    params = jnp.array([1.0, -1.0, 0.5])
    state = opt.init(params)
    for g in ([0.0, 0.0, 0.0], [1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [1e-3, 3.0, 0.0]):
        updates, state = opt.update(jnp.asarray(g), state, params)
        chex.assert_tree_all_finite((updates, state))


@pytest.mark.parametrize("eps", [float(np.finfo(np.float32).tiny), 1e-40, 1e-50])
@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_eps_below_float32_range_gives_no_nan(dtype, eps_mode, eps):
    # ε > 0, yet 0 (or flushed to 0) in float32 arithmetic: the step must not be 0/0.
    opt = ax.adamax(eps=eps, eps_mode=eps_mode)
    params = jnp.zeros(3, dtype)
    state = opt.init(params)
    for g in ([0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]):
        updates, state = opt.update(jnp.asarray(g, dtype), state, params)
        chex.assert_tree_all_finite((updates, state))


@pytest.mark.parametrize("kwargs", [dict(learning_rate=0.0), dict(learning_rate=-0.1)])
def test_learning_rate_may_be_zero_or_negative(kwargs):
    opt = ax.adamax(**kwargs)
    params = jnp.array([1.0])
    updates, _ = opt.update(jnp.array([2.0]), opt.init(params), params)
    np.testing.assert_allclose(updates, [-kwargs["learning_rate"]], rtol=1e-6)


def test_weight_decay_zero_and_numpy_values_accepted():
    for wd in (0.0, np.float32(0.5), np.array(0.5)):
        opt = ax.adamaxw(weight_decay=wd)
        params = jnp.array([1.0])
        updates, _ = opt.update(jnp.array([1.0]), opt.init(params), params)
        chex.assert_tree_all_finite(updates)


def test_schedule_learning_rate_accepted():
    opt = ax.adamax(optax.constant_schedule(0.1))
    params = jnp.array([1.0])
    updates, _ = opt.update(jnp.array([3.0]), opt.init(params), params)
    np.testing.assert_allclose(updates, [-0.1], rtol=1e-6)


def test_traced_hyperparameters_skip_validation_and_match_python_numbers():
    params = jnp.array([1.0, -2.0, 0.5])
    grads = [jnp.array([0.3, -0.1, 2.0]), jnp.array([-0.2, 0.4, 0.0])]

    def run(lr, b1, b2, eps, wd):
        opt = ax.adamaxw(lr, b1, b2, eps, wd)
        state = opt.init(params)
        p = params
        for g in grads:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    hyper = (0.05, 0.8, 0.99, 1e-6, 0.01)
    traced = jax.jit(run)(*(jnp.asarray(h, jnp.float32) for h in hyper))
    chex.assert_trees_all_close(traced, run(*hyper), rtol=1e-6, atol=0)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("factory", [ax.adamax, ax.adamaxw, ax.nadamax])
def test_inject_hyperparams_under_jit_matches_plain(factory):
    hyper = dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-6)
    injected = optax.inject_hyperparams(factory, static_args=("eps_mode",))(
        eps_mode="inside_max", **hyper
    )
    plain = factory(eps_mode="inside_max", **hyper)
    params = jnp.array([1.0, -2.0])
    s_inj, s_plain = injected.init(params), plain.init(params)
    step_inj, step_plain = jax.jit(injected.update), jax.jit(plain.update)
    for g in ([0.5, -1.0], [0.25, 3.0], [-1.0, 0.0]):
        u_inj, s_inj = step_inj(jnp.asarray(g), s_inj, params)
        u_plain, s_plain = step_plain(jnp.asarray(g), s_plain, params)
        chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-6, atol=0)


@pytest.mark.usefixtures("standard_promotion")
def test_inject_hyperparams_still_validates_static_choices():
    with pytest.raises(ValueError, match=re.escape("`eps_mode`") + ".*'sideways'"):
        optax.inject_hyperparams(ax.adamax)(eps_mode="sideways").init(jnp.ones(2))


# Pytrees: grads, state and params that do not match.


def _tree():
    return {
        "layers": [
            {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)},
            {"w": jnp.ones((3, 1)), "b": jnp.zeros(1)},
        ],
        "scale": jnp.ones(()),
    }


def _missing(tree):
    del tree["layers"][1]["b"]
    return tree


def _extra(tree):
    tree["layers"][0]["gamma"] = jnp.ones(3)
    return tree


def _reshaped(tree):
    tree["layers"][1]["w"] = jnp.ones((1, 3))
    return tree


def _none_leaf(tree):
    tree["scale"] = None
    return tree


def _tuple_for_list(tree):
    tree["layers"] = tuple(tree["layers"])
    return tree


MISMATCHES = {
    "missing": (_missing, ["missing from `updates`", "['layers'][1]['b']"]),
    "extra": (_extra, ["in `updates` but not in `state.mu`", "['layers'][0]['gamma']"]),
    "shape": (_reshaped, ["`updates`['layers'][1]['w'] has shape (1, 3)", "(3, 1)"]),
    "none": (_none_leaf, ["`updates`['scale'] is None", "`state.mu`['scale'] is an array"]),
    "container": (_tuple_for_list, ["other container types"]),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("factory", ["scale_by_adamax", "adamax", "adamaxw", "nadamax"])
@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_grads_name_key_path(kind, factory, jit):
    change, fragments = MISMATCHES[kind]
    opt = FACTORIES[factory]()
    params = _tree()
    state = opt.init(params)
    grads = change(_tree())
    update = jax.jit(opt.update) if jit else opt.update
    with pytest.raises(ValueError) as info:
        update(grads, state, params)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
@pytest.mark.parametrize("factory", ["scale_by_adamax", "adamax", "nadamax"])
def test_mismatched_params_in_update_name_key_path(kind, factory):
    change, _ = MISMATCHES[kind]
    opt = FACTORIES[factory]()
    state = opt.init(_tree())
    with pytest.raises(ValueError, match=re.escape("`params`")) as info:
        opt.update(_tree(), state, change(_tree()))
    path = {"missing": "['layers'][1]['b']", "extra": "['layers'][0]['gamma']"}
    assert path.get(kind, "['layers'][1]['w']") in str(info.value)


def test_state_of_another_model_names_key_path():
    opt = ax.adamax()
    state = opt.init({"encoder": jnp.ones(3)})
    with pytest.raises(ValueError, match=re.escape("['decoder']")):
        opt.update({"decoder": jnp.ones(3)}, state)


@pytest.mark.parametrize("argument", ["grad", "m", "u"])
def test_adamax_step_mismatch_names_argument_and_path(argument):
    trees = {k: {"a": jnp.ones(2), "b": jnp.ones(2)} for k in ("param", "grad", "m", "u")}
    del trees[argument]["b"]
    with pytest.raises(ValueError, match=re.escape(f"missing from `{argument}`: ['b']")):
        ax.adamax_step(trees["param"], trees["grad"], trees["m"], trees["u"], 1)


NON_TRAINABLE = {
    "int-array": ({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}, ["['step'] (int32)"]),
    "bool-nested": (
        {"w": jnp.ones(2), "cfg": {"mask": jnp.array([True, False])}},
        ["['cfg']['mask'] (bool)"],
    ),
    "uint8-numpy": ({"img": np.zeros(3, np.uint8), "w": np.ones(2, np.float32)}, ["['img']"]),
    "python-int": ({"n": 3, "w": 1.0}, ["['n'] (int32)"]),
    "list-two": ([jnp.ones(1), jnp.zeros(1, jnp.int8), jnp.ones(1, bool)], ["[1] (int8)", "[2]"]),
    "root": (jnp.arange(3), ["<root> (int32)"]),
}


@pytest.mark.parametrize("factory", ["scale_by_adamax", "adamax", "adamaxw", "nadamax"])
@pytest.mark.parametrize("case", list(NON_TRAINABLE))
def test_integer_or_bool_params_raise_type_error_at_init(case, factory):
    params, fragments = NON_TRAINABLE[case]
    opt = FACTORIES[factory]()
    with pytest.raises(TypeError) as info:
        opt.init(params)
    message = str(info.value)
    for fragment in fragments + ["`optax.masked`", "`optax.set_to_zero`"]:
        assert fragment in message
    assert "['w']" not in message


def test_integer_params_raise_under_jit_and_eval_shape():
    params = {"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)}
    for init in (jax.jit(ax.adamax().init), lambda p: jax.eval_shape(ax.adamax().init, p)):
        with pytest.raises(TypeError, match=re.escape("['step']")):
            init(params)


def test_advice_masked_works():
    params = {"w": jnp.array([1.0, 2.0]), "step": jnp.array(7, jnp.int32)}
    opt = optax.masked(ax.adamax(0.1), {"w": True, "step": False})
    state = opt.init(params)
    grads = {"w": jnp.array([1.0, -1.0]), "step": jnp.array(0, jnp.int32)}
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], [0.9, 2.1], rtol=1e-6)
    assert new["step"].dtype == jnp.int32 and int(new["step"]) == 7


@pytest.mark.usefixtures("standard_promotion")
def test_advice_set_to_zero_works():
    params = {"w": jnp.array([1.0, 2.0]), "table": jnp.arange(3, dtype=jnp.int32)}
    labels = {"w": "train", "table": "frozen"}
    opt = optax.multi_transform({"train": ax.adamax(0.1), "frozen": optax.set_to_zero()}, labels)
    state = opt.init(params)
    grads = {"w": jnp.array([1.0, -1.0]), "table": jnp.ones(3, jnp.int32)}
    updates, state = opt.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], [-0.1, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(updates["table"], [0, 0, 0])


def test_abstract_init_of_float_params():
    params = {
        "w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    state = jax.eval_shape(ax.adamax().init, params)
    assert state[0].mu["w"].shape == (2, 3)
    assert state[0].nu["w"].dtype == jnp.bfloat16 and state[0].nu_scale["w"].shape == ()


# Guards: non-finite gradients, a saturating counter, finite bias correction.


GUARDED = {
    "adamax": lambda: ax.adamax(0.1),
    "adamaxw": lambda: ax.adamaxw(0.1, weight_decay=0.01),
    "nadamax": lambda: ax.nadamax(0.1),
    "bf16-nu": lambda: ax.adamax(0.1, nu_dtype=jnp.bfloat16),
    "compensated": lambda: ax.adamax(0.1, compensated=True),
}


@functools.cache
def _guarded_step(name):
    guarded = optax.apply_if_finite(GUARDED[name](), max_consecutive_errors=3)

    @jax.jit
    def step(params, state, grads):
        updates, state = guarded.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return guarded, step


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("name", list(GUARDED))
def test_apply_if_finite_skips_bad_step_and_keeps_state(name, bad):
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": jnp.array([0.1], jnp.bfloat16)}
    good = [
        {"w": jnp.array([0.3, -0.1, 2.0]), "b": jnp.array([0.5], jnp.bfloat16)},
        {"w": jnp.array([-0.2, 0.4, 0.1]), "b": jnp.array([-0.25], jnp.bfloat16)},
        {"w": jnp.array([0.7, 0.0, -1.0]), "b": jnp.array([1.0], jnp.bfloat16)},
    ]
    poisoned = {"w": jnp.array([0.1, bad, 0.2]), "b": jnp.array([0.5], jnp.bfloat16)}
    guarded, step = _guarded_step(name)
    # Uninterrupted: good[0], good[1], good[2].
    p_ref, s_ref = params, guarded.init(params)
    for g in good:
        p_ref, s_ref = step(p_ref, s_ref, g)

    # Interrupted: good[0], poisoned twice, good[1], good[2].
    p, s = step(params, guarded.init(params), good[0])
    for i in range(2):
        p_bad, s_bad = step(p, s, poisoned)
        chex.assert_trees_all_equal(p_bad, p)
        chex.assert_trees_all_equal(s_bad.inner_state, s.inner_state)
        assert int(s_bad.notfinite_count) == i + 1 and not bool(s_bad.last_finite)
        p, s = p_bad, s_bad
    for g in good[1:]:
        p, s = step(p, s, g)
    chex.assert_trees_all_equal(p, p_ref)
    chex.assert_trees_all_equal(s.inner_state, s_ref.inner_state)
    assert int(s.total_notfinite) == 2 and int(s.notfinite_count) == 0


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
def test_count_saturates_at_int32_max(nesterov, jit):
    tx = ax.scale_by_adamax(nesterov=nesterov)
    update = jax.jit(tx.update) if jit else tx.update
    g = jnp.array([1.0, -2.0, 0.0])
    state = tx.init(g)._replace(count=jnp.asarray(INT32_MAX - 1, jnp.int32))
    m = np.zeros(3)
    for _ in range(3):
        updates, state = update(g, state)
        assert state.count.dtype == jnp.int32 and int(state.count) == INT32_MAX
        # At t ~ 2**31, β₁^t is 0 in float32: the bias correction is exactly 1.
        m = 0.9 * m + 0.1 * np.asarray(g, np.float64)
        m_hat = 0.9 * m + 0.1 * np.asarray(g) if nesterov else m
        expected = m_hat / (np.abs(np.asarray(g, np.float64)) + 1e-8)
        np.testing.assert_allclose(updates, expected, rtol=1e-6, atol=1e-30)


B1_NEAR_ONE = [0.0, 0.5, 0.9, 0.999, 0.99999, 1 - 2**-24, 1 - 1e-8]


def _bias_correction(b1, t):
    """1 - β₁^t in float64, accurate for β₁ near 1."""
    return 1.0 if b1 == 0 else -np.expm1(t * np.log1p(-(1 - b1)))


@pytest.mark.parametrize("t", [1, 2, 100, 2**24 + 1, INT32_MAX - 1, INT32_MAX])
@pytest.mark.parametrize("b1", B1_NEAR_ONE)
@pytest.mark.parametrize("nesterov", [False, True])
def test_bias_correction_finite_at_any_t(b1, t, nesterov):
    # A constant gradient from the start gives m_t = (1 - β₁^t) g; the state
    # is built to be that of step t - 1, so the step is known in closed form.
    g = np.array([0.5, -3.0], np.float32)
    tx = ax.scale_by_adamax(b1=b1, b2=1.0, eps=0.0, nesterov=nesterov)
    m_prev = (0.0 if t == 1 else _bias_correction(b1, t - 1)) * g.astype(np.float64)
    state = tx.init(g)._replace(
        count=jnp.asarray(t - 1, jnp.int32),
        mu=jnp.asarray(m_prev, jnp.float32),
        nu=jnp.abs(jnp.asarray(g)),
    )
    updates, state = tx.update(jnp.asarray(g), state)
    chex.assert_tree_all_finite(updates)
    scale = 1.0
    if nesterov:
        after = _bias_correction(b1, min(t + 1, INT32_MAX))
        scale = b1 * _bias_correction(b1, t) / after + (1 - b1) / _bias_correction(b1, t)
    # m and the bias correction use β₁ rounded to float32, as optax does; the
    # relative error this rounding makes in 1 - β₁ bounds the error of each
    # (of m through the state built here with the exact β₁), so twice it
    # bounds the step's.
    b1_32 = float(np.float32(b1))
    rounding = abs(b1 - b1_32) / (1 - b1_32) if b1_32 < 1 else 0.0
    np.testing.assert_allclose(updates, scale * np.sign(g), rtol=1e-5 + 2 * rounding)


def test_adamax_step_saturates_beyond_int32():
    at_max = ax.adamax_step(1.0, 0.1, 0.02, 0.15, INT32_MAX)
    for t in (2**31, 2**40):
        chex.assert_trees_all_equal(ax.adamax_step(1.0, 0.1, 0.02, 0.15, t), at_max)


# Hyperparameters of every form: read as one number and checked at build time.

# Exact in float32, so that every form (float32 JAX arrays included) holds the
# same number as the Python float.
VALID = {
    "learning_rate": 0.0625,
    "b1": 0.875,
    "b2": 0.9921875,
    "eps": 2.0**-20,
    "weight_decay": 0.25,
}
TAKES = {
    "learning_rate": ("adamax", "adamaxw", "nadamax", "adamax_step"),
    "b1": ALL,
    "b2": ALL,
    "eps": ALL,
    "weight_decay": ("adamaxw",),
}
FORMS = {
    "list": lambda x: [x],
    "tuple": lambda x: (x,),
    "nested-list": lambda x: [[x]],
    "np-float64": np.float64,
    "np-float32": np.float32,
    "np-0d": np.asarray,
    "np-1": lambda x: np.asarray([x]),
    "np-1x1": lambda x: np.asarray([[x]]),
    "jnp-0d": jnp.asarray,
    "jnp-1": lambda x: jnp.asarray([x]),
    "jnp-bfloat16": lambda x: jnp.asarray(x, jnp.bfloat16),
    "fraction": fractions.Fraction,
    "decimal": lambda x: decimal.Decimal(repr(x)),
}


def _first_update(factory, **kwargs):
    """The first two updates (or adamax_step results) with these hyperparameters."""
    if factory == "adamax_step":
        zeros = jnp.zeros(2)
        p, m, u = ax.adamax_step(
            jnp.array([1.0, -0.5]), jnp.array([0.3, -2.0]), zeros, zeros, 1, **kwargs
        )
        return ax.adamax_step(p, jnp.array([-0.1, 4.0]), m, u, 2, **kwargs)
    opt = FACTORIES[factory](**kwargs)
    params = jnp.array([1.0, -0.5])
    state = opt.init(params)
    out = []
    for g in ([0.3, -2.0], [-0.1, 4.0]):
        updates, state = opt.update(jnp.asarray(g), state, params)
        out.append(updates)
    return out


HYPER_FORM_CASES = [
    pytest.param(factory, name, form, id=f"{factory}-{name}-{form}")
    for name, factories in TAKES.items()
    for factory in factories
    for form in FORMS
]


@pytest.mark.parametrize("factory, name, form", HYPER_FORM_CASES)
def test_hyperparameter_of_any_form_gives_the_plain_float_updates(factory, name, form):
    value = FORMS[form](VALID[name])
    if form == "jnp-bfloat16" and name in ("b1", "b2", "eps"):
        # β₁, β₂ and ε below 32 bits are refused, exact or not: rounded, they would be
        # another optimizer (tests/test_never_silent.py).
        with pytest.raises(ValueError, match=rf"`{name}` arrived as a bfloat16 array"):
            _first_update(factory, **{name: value})
        return
    chex.assert_trees_all_equal(
        _first_update(factory, **{name: value}), _first_update(factory, **{name: VALID[name]})
    )


# Out of range in each form; the plain-float versions are in BAD_HYPERPARAMETERS.
OUT_OF_RANGE = {
    "learning_rate": [1e39, -1e39, 10**400, decimal.Decimal("1e400"), fractions.Fraction(10**400)],
    "b1": [1.0, -0.25],
    "b2": [1.5, -0.25],
    "eps": [-0.3, 1e39, 3.5e38],
    "weight_decay": [NAN, 1e39, -INF],
}


@pytest.mark.parametrize(
    "factory, name, form, value",
    [
        pytest.param(factory, name, form, value, id=f"{factory}-{name}-{form}-{value!r:.20}")
        for name, values in OUT_OF_RANGE.items()
        for factory in TAKES[name]
        for form in ("plain", "list", "np-1", "jnp-0d", "jnp-1", "decimal")
        for value in values
        # Forms that cannot hold the value: JAX refuses a Python int beyond int64 itself.
        if not (form == "decimal" and isinstance(value, (decimal.Decimal, fractions.Fraction)))
        and not (form.startswith("jnp") and not isinstance(value, float))
        # A float32 JAX array of β₁ = 1 is read as the nearest float32 below 1.
        and not (form.startswith("jnp") and name == "b1" and value == 1.0)
    ],
)
def test_out_of_range_hyperparameter_of_any_form_names_argument(factory, name, form, value):
    if form == "plain":
        bad = value
    else:
        with np.errstate(over="ignore"):
            bad = FORMS[form](value)
    pattern = re.escape(f"`{name}`") + ".*" + re.escape(repr(bad))
    with pytest.raises(ValueError, match=pattern):
        FACTORIES[factory](**{name: bad})


@pytest.mark.parametrize(
    "factory", ["adamax", "adamaxw", "nadamax", "scale_by_adamax", "adamax_step"]
)
@pytest.mark.parametrize("eps", [1e39, np.float64(1e39), [1e39], decimal.Decimal("1e39"), 2.0**128])
def test_eps_infinite_in_float32_is_refused_with_the_reason(factory, eps):
    with pytest.raises(ValueError, match=re.escape("`eps` must be finite in float32")):
        FACTORIES[factory](eps=eps)


def test_hyperparameters_at_the_float32_limit():
    f32_max = float(np.finfo(np.float32).max)
    # The largest double that rounds to a finite float32 is accepted; the next is not.
    limit = np.nextafter(2.0**128 * (1 - 2.0**-25), 0.0)
    for value in (f32_max, limit):
        ax.adamax(eps=value)
        ax.adamaxw(learning_rate=-value, weight_decay=value)
    for value in (2.0**128 * (1 - 2.0**-25), 2.0**128):
        for name in ("eps", "learning_rate", "weight_decay"):
            with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
                ax.adamaxw(**{name: value})


# The inputs of the report, one by one.
ISSUE_INPUTS = [
    ("adamax", "b2", [1.5], "in [0, 1]"),
    ("adamax", "eps", [-0.3], ">= 0"),
    ("adamax", "b1", np.array([]), "one element"),
    ("adamaxw", "weight_decay", [NAN], "finite"),
    ("adamax", "learning_rate", np.array([0.1, 0.2]), "one element"),
    ("adamax", "learning_rate", jnp.array([0.1, 0.2]), "one element"),
    ("adamax", "eps", 1e39, "finite in float32"),
]


@pytest.mark.parametrize("factory, name, value, requirement", ISSUE_INPUTS)
def test_reported_hyperparameters_refused_at_build_time(factory, name, value, requirement):
    with pytest.raises(ValueError) as info:
        FACTORIES[factory](**{name: value})
    message = str(info.value)
    assert f"`{name}`" in message and repr(value) in message and requirement in message


def test_one_element_learning_rate_is_the_scalar_and_keeps_the_shape():
    # A (1,)-shaped learning rate must not broadcast a 0-d parameter's update to (1,).
    opt, plain = ax.adamax(learning_rate=[0.1]), ax.adamax(learning_rate=0.1)
    params = jnp.asarray(1.0)
    updates, _ = opt.update(jnp.asarray(2.0), opt.init(params), params)
    expected, _ = plain.update(jnp.asarray(2.0), plain.init(params), params)
    assert updates.shape == () and updates.dtype == jnp.float32
    chex.assert_trees_all_equal(updates, expected)
    # A few float32 roundings (0.1, 1 - β₁) from the exact value.
    np.testing.assert_allclose(updates, -0.1 * 2.0 / (2.0 + 1e-8), rtol=1e-6)


NOT_SCALAR = {
    "list-2": [0.5, 0.5],
    "tuple-2": (0.5, 0.5),
    "np-2": np.array([0.5, 0.5]),
    "np-1x2": np.array([[0.5, 0.5]]),
    "jnp-2": jnp.array([0.5, 0.5]),
    "empty-list": [],
    "jnp-empty": jnp.zeros((0,)),
}
NOT_REAL = {
    "ragged": [[0.5], [0.5, 0.5]],
    "strings": ["0.5"],
    "np-complex": np.complex64(0.5),
    "jnp-complex": jnp.asarray(0.5 + 0j),
    "np-bool": np.bool_(True),
    "np-bool-array": np.array([True]),
    "object": object(),
    "shape-dtype-struct": jax.ShapeDtypeStruct((), jnp.float32),
}


@pytest.mark.parametrize("name", list(TAKES))
@pytest.mark.parametrize("form", list(NOT_SCALAR) + list(NOT_REAL))
def test_non_scalar_or_non_real_hyperparameter_names_argument(name, form):
    value = {**NOT_SCALAR, **NOT_REAL}[form]
    requirement = "scalar (one element)" if form in NOT_SCALAR else "real number"
    for factory in TAKES[name]:
        with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a {requirement}")):
            FACTORIES[factory](**{name: value})


def test_schedules_pass_for_the_learning_rate_only():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    for factory in OPTIMIZERS:
        FACTORIES[factory](learning_rate=schedule)
    with pytest.raises(ValueError, match=re.escape("`learning_rate` must be a real number")):
        ax.adamax_step(1.0, 0.1, 0.0, 0.0, 1, learning_rate=schedule)
    with pytest.raises(ValueError, match=re.escape("`b1` must be a real number")):
        ax.adamax(b1=schedule)


@pytest.mark.parametrize("factory", OPTIMIZERS)
def test_traced_hyperparameters_of_one_element_match_and_of_two_are_refused(factory):
    params = jnp.array([1.0, -2.0])

    def first_update(hyper):
        o = FACTORIES[factory](**hyper)
        return o.update(jnp.array([0.5, -0.25]), o.init(params), params)[0]

    one = {k: jnp.asarray([VALID[k]]) for k in TAKES if factory in TAKES[k]}
    chex.assert_trees_all_equal(
        jax.jit(first_update)(one), first_update({k: VALID[k] for k in one})
    )
    for name in one:
        two = {**one, name: jnp.asarray([VALID[name]] * 2)}
        with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a scalar")):
            jax.jit(first_update)(two)
        complex_ = {**one, name: jnp.asarray(VALID[name] + 0j)}
        with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a real number")):
            jax.jit(first_update)(complex_)


def test_concrete_jax_arrays_are_checked_under_jit_too():
    # A concrete array closed over by a jitted function is not traced: it is checked.
    b1 = jnp.asarray(1.5)

    def build(params):
        return ax.adamax(b1=b1).init(params)

    with pytest.raises(ValueError, match=re.escape("`b1` must be in [0, 1)")):
        jax.jit(build)(jnp.ones(2))


def test_vmapped_hyperparameters_pass_and_match():
    params = jnp.array([1.0, -2.0])
    grads = jnp.array([0.5, -0.25])

    def first_update(lr, b1):
        opt = ax.adamax(lr, b1)
        return opt.update(grads, opt.init(params), params)[0]

    lrs, b1s = jnp.array([0.0625, 0.125]), jnp.array([0.875, 0.5])
    batched = jax.vmap(first_update)(lrs, b1s)
    for i in range(2):
        chex.assert_trees_all_equal(batched[i], first_update(float(lrs[i]), float(b1s[i])))


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_learning_rate_keeps_working(jit):
    injected = optax.inject_hyperparams(ax.adamax)(learning_rate=1e-3)
    plain = ax.adamax(1e-3)
    params = jnp.array([1.0, -2.0])
    s_inj, s_plain = injected.init(params), plain.init(params)
    update_inj = jax.jit(injected.update) if jit else injected.update
    for g in ([0.5, -1.0], [0.25, 3.0]):
        u_inj, s_inj = update_inj(jnp.asarray(g), s_inj, params)
        u_plain, s_plain = plain.update(jnp.asarray(g), s_plain, params)
        chex.assert_trees_all_close(u_inj, u_plain, rtol=1e-6, atol=0)
    # The second update in closed form: m̂ = m₂ / (1 - β₁²), u₂ = max(β₂ u₁, |g₂|).
    m2 = 0.9 * (0.1 * np.array([0.5, -1.0])) + 0.1 * np.array([0.25, 3.0])
    u2 = np.maximum(0.999 * np.array([0.5, 1.0]), np.array([0.25, 3.0]))
    np.testing.assert_allclose(u_inj, -1e-3 * m2 / 0.19 / (u2 + 1e-8), rtol=1e-6)


@pytest.mark.usefixtures("standard_promotion")
def test_inject_hyperparams_validates_concrete_values_eagerly():
    opt = optax.inject_hyperparams(ax.adamax)(learning_rate=1e-3, b2=1.5)
    with pytest.raises(ValueError, match=re.escape("`b2` must be in [0, 1]")):
        opt.init(jnp.ones(2))


# Storage dtypes.

FLOAT8 = [
    getattr(jnp, n)
    for n in dir(jnp)
    if n.startswith("float8_") and jnp.issubdtype(jnp.dtype(getattr(jnp, n)), jnp.floating)
]


SUPPORTED_FLOAT8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


@pytest.mark.parametrize("factory", TRANSFORMS)
@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", FLOAT8, ids=lambda d: jnp.dtype(d).name)
def test_float8_storage_is_block_wise_or_refused_at_build_time(dtype, name, factory):
    # float8_e4m3fn and float8_e5m2 are block-wise 8-bit storage (tests/test_eightbit.py);
    # the other float8 dtypes are refused, naming the argument and the value.
    if jnp.dtype(dtype) in SUPPORTED_FLOAT8:
        FACTORIES[factory](**{name: dtype})
        return
    with pytest.raises(
        ValueError, match=re.escape(f"`{name}` got {dtype!r}") + ".*8-bit storage is"
    ):
        FACTORIES[factory](**{name: dtype})


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize(
    "dtype",
    # (int8 and uint8 are 8-bit block-wise storage, see tests/test_eightbit.py.)
    [jnp.int32, jnp.int16, jnp.int4, jnp.bool_, jnp.float4_e2m1fn, "float6_e2m3fn", "U3"],
    ids=str,
)
def test_other_storage_dtypes_refused(name, dtype):
    with pytest.raises(ValueError, match=re.escape(f"`{name}` must be None or one of float16")):
        ax.adamax(**{name: dtype})


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype", "compensate_rounding"])
@pytest.mark.parametrize(
    "value",
    # NumPy's parser raises SyntaxError for the malformed strings of fields, TypeError
    # for the others; each is refused by the argument's name, with or without 8-bit blocks.
    ["i1,,", ",", "(2)i4", "not a dtype", 3.5, {"a": 1}, object()],
    ids=["fields-i1", "fields-empty", "subarray", "name", "float", "dict", "object"],
)
def test_what_names_no_dtype_is_refused_by_name(name, value):
    if name == "compensate_rounding":
        with pytest.raises(ValueError, match=r"`dtype` must be a floating dtype or None"):
            ax.compensate_rounding(dtype=value)
        return
    for extra in ({}, {"block_size": 64}):
        with pytest.raises(ValueError, match=rf"`{name}` must be a floating dtype or None"):
            ax.adamax(**{name: value}, **extra)


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
def test_a_dtype_made_a_hyperparameter_is_refused_with_static_args(name):
    # optax.inject_hyperparams takes a dtype (a callable) for a schedule and hands over
    # an array; NumPy reads an array's dtype only through a deprecated path.
    injected = optax.inject_hyperparams(ax.adamax)(1e-3, **{name: jnp.bfloat16})
    with pytest.raises(ValueError, match=rf"`{name}` arrived as an array.*static_args"):
        injected.init({"w": jnp.ones(8)})
    for array in (jnp.zeros((), jnp.uint8), np.zeros((), np.float32)):
        with pytest.raises(ValueError, match=rf"`{name}` arrived as an array"):
            ax.adamax(**{name: array})
    with pytest.raises(ValueError, match=r"`dtype` arrived as an array"):
        ax.compensate_rounding(dtype=jnp.zeros((), jnp.bfloat16))
    static = optax.inject_hyperparams(ax.adamax, static_args=(name,))(1e-3, **{name: jnp.bfloat16})
    state = ax.adamax_state(static.init({"w": jnp.ones(8)}))
    assert getattr(state, name[:2])["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_a_complex_compensation_buffer_is_refused(dtype):
    # The parameters it compensates are real and below 32 bits.
    with pytest.raises(ValueError, match=r"`dtype` got .*complex.*real parameters"):
        ax.compensate_rounding(dtype=dtype)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("factory", TRANSFORMS)
@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.complex64, "complex64"])
def test_complex_storage_for_real_params_is_their_real_counterpart(dtype, name, factory, jit):
    # A mixed tree can name a complex storage dtype: its real leaves store float32.
    opt = FACTORIES[factory](**{name: dtype})
    params = {"w": jnp.ones(2, jnp.complex64), "b": jnp.ones(3, jnp.bfloat16)}
    init = jax.jit(opt.init) if jit else opt.init
    state = ax.adamax_state(init(params))
    assert getattr(state, name[:2])["b"].dtype == jnp.float32
    assert state.mu["w"].dtype == jnp.complex64


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("complex_mode", ["modulus", "split"])
def test_complex_storage_for_complex_params_still_works(name, complex_mode):
    opt = ax.adamax(0.1, complex_mode=complex_mode, **{name: jnp.complex64})
    params = jnp.array([1.0 + 1.0j, -1.0j], jnp.complex64)
    state = opt.init(params)
    updates, state = opt.update(jnp.array([1.0 + 0j, 1j], jnp.complex64), state, params)
    chex.assert_tree_all_finite((updates, state))
    assert updates.dtype == jnp.complex64


# adamax_step: `t` and integer leaves.

BAD_STEPS = [
    0.0,
    -1.0,
    1.5,
    0,
    -3,
    NAN,
    INF,
    True,
    np.float32(1.5),
    np.int64(0),
    np.array([0]),
    [1.5],
    jnp.asarray(0),
    jnp.asarray(1.5),
    jnp.asarray([2, 3]),
    fractions.Fraction(3, 2),
    decimal.Decimal("1.5"),
    decimal.Decimal("NaN"),
    "1",
    None,
]


@pytest.mark.parametrize("t", BAD_STEPS, ids=repr)
def test_adamax_step_refuses_a_step_that_is_not_an_integer_from_one(t):
    with pytest.raises(ValueError, match=re.escape("`t`") + ".*" + re.escape(repr(t))):
        ax.adamax_step(1.0, 0.1, 0.0, 0.0, t)


def test_adamax_step_t_zero_float_is_refused_not_minus_infinity():
    with pytest.raises(
        ValueError, match=re.escape("`t` is the 1-based step and must be an integer >= 1, got 0.0.")
    ):
        ax.adamax_step(1.0, 0.1, 0.0, 0.0, t=0.0)


GOOD_STEPS = [
    2,
    2.0,
    np.int64(2),
    np.uint8(2),
    np.float32(2.0),
    np.array(2),
    np.array([2]),
    [2],
    (2,),
    jnp.asarray(2),
    jnp.asarray([2.0]),
    fractions.Fraction(4, 2),
    decimal.Decimal("2.000"),
]


@pytest.mark.parametrize("t", GOOD_STEPS, ids=repr)
def test_adamax_step_reads_integral_steps_of_any_form(t):
    # At t = 2 from m = 0.05, u = 0.5 with g = 0.1: m = 0.055, 1 - β₁² = 0.19, u = 0.4995.
    expected = 1.0 - 0.002 * (0.055 / 0.19) / (0.4995 + 1e-8)
    p, m, u = ax.adamax_step(1.0, 0.1, 0.05, 0.5, t)
    np.testing.assert_allclose(p, expected, rtol=1e-7)
    chex.assert_trees_all_equal((p, m, u), ax.adamax_step(1.0, 0.1, 0.05, 0.5, 2))


HUGE_STEPS = {
    "int": 2**31 + 5,
    "int-2**63": 2**63,
    "np-int64": np.int64(2**31 + 5),
    "np-uint32": np.uint32(2**32 - 1),
    "np-uint64": np.uint64(2**64 - 1),
    "float": float(2**31 + 5),
    "float-1e300": 1e300,
    "np-float32": np.float32(3e9),
    "decimal": decimal.Decimal(2**31 + 5),
    "list": [2**31 + 5],
}


@pytest.mark.parametrize("t", list(HUGE_STEPS))
def test_adamax_step_huge_step_saturates_like_the_counter(t):
    at_max = ax.adamax_step(1.0, 0.1, 0.02, 0.15, INT32_MAX)
    chex.assert_trees_all_equal(ax.adamax_step(1.0, 0.1, 0.02, 0.15, HUGE_STEPS[t]), at_max)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["int64", "uint64", "uint32", "float64"])
def test_adamax_step_huge_x64_array_step_saturates(dtype, jit):
    with jax.enable_x64(True):
        at_max = ax.adamax_step(1.0, 0.1, 0.02, 0.15, INT32_MAX)
        t = jnp.asarray(2**32 - 1 if dtype == "uint32" else 2**31 + 5, dtype)
        step = jax.jit(ax.adamax_step) if jit else ax.adamax_step
        got = step(1.0, 0.1, 0.02, 0.15, t)
        chex.assert_trees_all_equal(got, at_max)
        # Far from the -inf of a wrapped, negative step: the bias correction is 1.
        expected = 1.0 - 0.002 * (0.9 * 0.02 + 0.1 * 0.1) / (0.15 * 0.999 + 1e-8)
        np.testing.assert_allclose(got[0], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "t",
    [jnp.asarray(0), jnp.asarray(-1), jnp.asarray(1.5), jnp.asarray(NAN), jnp.asarray(-3e9)],
    ids=repr,
)
def test_adamax_step_traced_invalid_step_gives_nan_not_a_wrong_number(t):
    zeros = jnp.zeros(2)
    p, m, u = jax.jit(ax.adamax_step)(jnp.array([1.0, 2.0]), jnp.array([0.1, 0.2]), zeros, zeros, t)
    assert bool(jnp.all(jnp.isnan(p)))


@pytest.mark.parametrize("t", [jnp.asarray(1), jnp.asarray(2.0), jnp.asarray(3e9)], ids=repr)
def test_adamax_step_traced_valid_step_matches_eager(t):
    args = (
        jnp.array([1.0, 2.0]),
        jnp.array([0.1, 0.2]),
        jnp.array([0.05, 0.0]),
        jnp.array([0.5, 0.0]),
    )
    chex.assert_trees_all_close(
        jax.jit(ax.adamax_step)(*args, t),
        ax.adamax_step(*args, int(min(float(t), INT32_MAX))),
        rtol=1e-7,
        atol=0,
    )


def test_adamax_step_integer_param_is_promoted_not_truncated():
    p, m, u = ax.adamax_step(1, 0.1, 0.0, 0.0, 1)
    assert p.dtype == jnp.float32
    np.testing.assert_allclose(p, 1.0 - 0.002 * 0.1 / (0.1 + 1e-8), rtol=1e-7)
    np.testing.assert_allclose(p, 0.998, rtol=1e-7)


@pytest.mark.parametrize(
    "zero",
    [0, np.int64(0), jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.uint8), [0]],
    ids=repr,
)
def test_adamax_step_integer_moments_give_the_float_moment_steps(zero):
    def wrap(x):
        return [x] if isinstance(zero, list) else x

    def run(m, u):
        p = wrap(1.0)
        for t in (1, 2, 3):
            p, m, u = ax.adamax_step(p, wrap(0.1), m, u, t)
        return p, m, u

    got, floats = run(zero, zero), run(wrap(0.0), wrap(0.0))
    chex.assert_trees_all_equal(got, floats)
    # A constant gradient: m̂ = g and u = g at every step.
    np.testing.assert_allclose(jnp.ravel(got[0]), 1.0 - 3 * 0.002 * 0.1 / (0.1 + 1e-8), rtol=1e-7)
    np.testing.assert_allclose(got[0], 0.994, rtol=1e-6)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in got)


@pytest.mark.parametrize("jit", [False, True])
def test_adamax_step_integer_arrays_and_trees_are_promoted(jit):
    step = jax.jit(ax.adamax_step, static_argnums=()) if jit else ax.adamax_step
    param = {
        "a": jnp.array([1, -2], jnp.int32),
        "b": np.array([3], np.int64),
        "c": jnp.array([0.5], jnp.bfloat16),
    }
    grad = {
        "a": jnp.array([1, 0], jnp.int8),
        "b": np.array([-2.0]),
        "c": jnp.array([1.0], jnp.bfloat16),
    }
    zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x)), param)
    p, m, u = step(param, grad, zeros, zeros, 1)
    assert p["a"].dtype == p["b"].dtype == jnp.float32 and p["c"].dtype == jnp.bfloat16
    np.testing.assert_allclose(p["a"], [1.0 - 0.002 / (1 + 1e-8), -2.0], rtol=1e-7)
    np.testing.assert_allclose(p["b"], [3.0 + 0.002], rtol=1e-7)
    assert m["a"].dtype == u["a"].dtype == jnp.float32


def test_adamax_step_integer_leaves_promote_to_float64_under_x64():
    with jax.enable_x64(True):
        p, m, u = ax.adamax_step(np.array([1]), np.array([1]), np.array([0]), np.array([0]), 1)
        assert p.dtype == m.dtype == u.dtype == jnp.float64
        np.testing.assert_allclose(p, [1.0 - 0.002 / (1 + 1e-8)], rtol=1e-15)


@pytest.mark.parametrize("argument", ["param", "grad", "m", "u"])
@pytest.mark.parametrize(
    "bad",
    [True, np.array([True, False]), "1.0", object()],
    ids=["True", "bool-array", "text", "object"],
)
def test_adamax_step_boolean_or_text_leaves_name_argument_and_path(argument, bad):
    args = {k: {"w": jnp.ones(2)} for k in ("param", "grad", "m", "u")}
    args[argument] = {"w": bad}
    if not isinstance(bad, np.ndarray):
        args = {k: {"w": 1.0} if k != argument else v for k, v in args.items()}
    with pytest.raises(TypeError, match=re.escape(f"`{argument}`['w']")):
        ax.adamax_step(args["param"], args["grad"], args["m"], args["u"], 1)


def test_input_rules_page_quotes_the_errors_as_raised():
    page = (Path(__file__).resolve().parent.parent / "docs" / "input_rules.md").read_text()
    for build in (
        lambda: ax.adamax(eps=1e39),
        lambda: ax.adamax(b2=[1.5]),
        lambda: ax.adamax(learning_rate=jnp.array([0.1, 0.2])),
    ):
        with pytest.raises(ValueError) as info:
            build()
        assert f"ValueError: {info.value}\n" in page


def test_adamax_step_vmapped_steps_nan_only_where_invalid():
    ts = jnp.array([1, 2, 0, -4, 2**31 - 1])
    p, m, u = jax.vmap(lambda t: ax.adamax_step(1.0, 0.1, 0.05, 0.5, t))(ts)
    assert not bool(jnp.any(jnp.isnan(p[jnp.array([0, 1, 4])])))
    assert bool(jnp.all(jnp.isnan(p[jnp.array([2, 3])])))
    for i in (0, 1, 4):
        chex.assert_trees_all_close(
            (p[i], m[i], u[i]), ax.adamax_step(1.0, 0.1, 0.05, 0.5, int(ts[i])), rtol=1e-7, atol=0
        )


@pytest.mark.parametrize("role", ["mu_dtype", "nu_dtype", "both"])
def test_complex_storage_on_a_mixed_tree_maps_real_leaves_to_the_real_counterpart(role):
    # A model that mixes real and complex parameters can name a complex storage
    # dtype: real leaves keep their moments in its real counterpart.
    names = ["mu_dtype", "nu_dtype"] if role == "both" else [role]
    params = {"w": jax.ShapeDtypeStruct((2, 4), jnp.bfloat16)}
    state = jax.eval_shape(ax.adamax(**dict.fromkeys(names, jnp.complex64)).init, params)[0]
    for name in names:
        assert getattr(state, name[:2])["w"].dtype == jnp.float32

    z = jnp.linspace(-1.0, 1.0, 3).astype(jnp.complex64) * jnp.complex64(1 + 2j)
    params = {"w": jnp.linspace(-1.0, 1.0, 8), "z": z}
    grads = jax.tree.map(lambda p: p * jnp.asarray(0.3, p.dtype), params)
    opt = ax.adamax(0.01, **dict.fromkeys(names, jnp.complex64))
    # The same as each leaf given that storage by hand (complex64 for the complex
    # leaf, float32 for the real one: the parameters' own dtypes here).
    ref = ax.adamax(0.01)
    state, ref_state = opt.init(params), ref.init(params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        ref_updates, ref_state = ref.update(grads, ref_state, params)
        chex.assert_trees_all_equal(updates, ref_updates)
    assert state[0].mu["w"].dtype == jnp.float32 and state[0].nu["w"].dtype == jnp.float32
    assert state[0].mu["z"].dtype == jnp.complex64


@pytest.mark.usefixtures("standard_promotion")
def test_b1_rounded_to_one_in_float32_reads_the_same_eagerly_and_traced():
    # inject_hyperparams hands the factory float32 arrays: 1 - 1e-8 arrives as
    # 1.0, concrete in init and eager updates, traced under jit. Both read it
    # as the nearest float32 below 1, and give (nearly) the plain float's step.
    injected = optax.inject_hyperparams(ax.adamax)(learning_rate=1e-3, b1=1 - 1e-8)
    plain = ax.adamax(1e-3, b1=1 - 1e-8)
    params = jnp.ones(2)
    grads = jnp.array([0.5, -2.0])
    eager, _ = injected.update(grads, injected.init(params), params)
    traced, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    expected, _ = plain.update(grads, plain.init(params), params)
    chex.assert_trees_all_close(eager, traced, rtol=1e-6, atol=0)
    chex.assert_trees_all_close(eager, expected, rtol=1e-6, atol=0)
    ax.adamax(b1=jnp.asarray([1.0]))


def test_b1_rounded_to_one_in_numpy_float32_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=re.escape("`b1` must be in [0, 1)")) as info:
        ax.adamax(b1=np.float32(1 - 1e-8))
    assert "Python float" in str(info.value) and "hyperparam_dtype=jnp.float64" in str(info.value)


@pytest.mark.parametrize(
    "b1", [jnp.asarray(1 - 1e-3, jnp.bfloat16), jnp.asarray(1.0, jnp.float16)], ids=str
)
def test_b1_below_float32_is_refused_with_the_way_out(b1):
    # Below 32 bits any β₁ is refused, rounded to 1 or not (tests/test_never_silent.py).
    with pytest.raises(ValueError, match=r"`b1` arrived as a .*hyperparam_dtype=jnp\.float32"):
        ax.adamax(b1=b1)


def test_b1_exact_with_float64_injected_hyperparameters():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        opt = optax.inject_hyperparams(ax.adamax, hyperparam_dtype=jnp.float64)(
            learning_rate=1e-3, b1=1 - 1e-8
        )
        params = jnp.ones(2, jnp.float32)
        updates, _ = opt.update(jnp.ones(2, jnp.float32), opt.init(params), params)
        np.testing.assert_allclose(updates, [-1e-3, -1e-3], rtol=1e-6)
