import functools
import re

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
    assert isinstance(state[0].nu["w"], ax.EncodedMoment)


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
