"""No silent wrong answers: the state says what it means, finite input gives finite output,
what optax accepts is accepted, derivatives are finite, hyperparameters keep their precision."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests.reference import adamax_numpy

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
ALIASES = {"adamax": ax.adamax, "adamaxw": ax.adamaxw, "nadamax": ax.nadamax}


def _run(opt, params, grads, state=None):
    state = opt.init(params) if state is None else state
    step = jax.jit(opt.update)
    updates = None
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, updates


# --- 1. The state says what it means ------------------------------------------------------


def _burst_then_small(n_small, small):
    return [jnp.ones(3, F32)] + [jnp.full(3, small, F32)] * n_small


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_cast_state_keeps_its_values(alias, dtype):
    opt = ALIASES[alias](0.01, mu_dtype=dtype, nu_dtype=dtype)
    params = jnp.zeros(3, F32)
    _, state, _ = _run(opt, params, _burst_then_small(299, 1e-4))
    u = np.asarray(ax.infinity_norm(state), np.float64)
    # u decayed from the burst: 0.999^299 = 0.7414, stored at most one ulp high.
    assert np.all((u >= 0.999**299 * (1 - 1e-5)) & (u <= 0.999**299 * (1 + 2**-7))), u
    cast = optax.tree.cast(state, F32)
    chex.assert_trees_all_equal(ax.infinity_norm(cast), ax.infinity_norm(state))
    g = jnp.full(3, 1e-4, F32)
    want, _ = opt.update(g, state, params)
    got, _ = opt.update(g, cast, params)
    # The cast state only stores its μ more precisely: the same step to μ's precision.
    np.testing.assert_allclose(got, want, rtol=2**-7)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_plain_low_precision_nu_is_refused_with_the_way_to_convert(dtype):
    opt = ax.adamax(0.01)
    params = {"w": jnp.zeros(3, dtype)}
    state = ax.adamax(0.01, nu_dtype=F32, mu_dtype=F32).init(params)
    inner = state[0]
    cast = (inner._replace(nu=optax.tree.cast(inner.nu, dtype)), *state[1:])
    with pytest.raises(ValueError, match=r"`state\.nu\['w'\]` is a plain .*convert_state"):
        opt.update({"w": jnp.ones(3, dtype)}, cast, params)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_count_or_scale_cast_below_32_bits_is_refused(dtype):
    # bfloat16 counts 256 + 1 as 256, and a 16-bit scale is not the one that was written.
    opt = ax.adamax(0.01, nu_dtype=BF16)
    params = {"w": jnp.zeros(3)}
    _, state, _ = _run(opt, params, [{"w": jnp.ones(3)}] * 3)
    cast = optax.tree.cast(state, dtype)
    with pytest.raises(ValueError, match=rf"`state.count` is {jnp.dtype(dtype).name}"):
        opt.update({"w": jnp.ones(3)}, cast, params)
    inner = cast[0]._replace(count=state[0].count)
    with pytest.raises(ValueError, match=r"nu_scale\['w'\]` must be a float32 scalar"):
        opt.update({"w": jnp.ones(3)}, (inner, *cast[1:]), params)


def test_a_float32_cast_state_runs_in_a_scan():
    opt = ax.adamax(0.01, mu_dtype=BF16, nu_dtype=BF16)
    params = jnp.zeros(3)
    _, state, _ = _run(opt, params, [jnp.ones(3)] * 3)
    cast = optax.tree.cast(state, F32)

    def body(s, g):
        return opt.update(g, s, params)[1], None

    final, _ = jax.lax.scan(body, cast, jnp.full((5, 3), 0.5))
    chex.assert_trees_all_equal_dtypes(final, cast)
    assert int(final[0].count) == 8


@pytest.mark.parametrize("narrow", [F16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_state_cast_to_a_narrower_float_is_refused(narrow, jit):
    # bfloat16 moments of 1e6 cast to float16 read inf, and a finite gradient then stepped NaN.
    params = {"w": jnp.zeros((4, 8))}
    opt = ax.adamax(1e-2, mu_dtype=BF16, nu_dtype=BF16)
    g = {"w": jnp.full((4, 8), 1e6)}
    _, state = opt.update(g, opt.init(params), params)
    inner = ax.adamax_state(state)
    update = jax.jit(opt.update) if jit else opt.update
    narrowed_nu = (inner._replace(nu=optax.tree.cast(inner.nu, narrow)), *state[1:])
    with pytest.raises(ValueError, match=rf"`state\.nu\['w'\]` is {jnp.dtype(narrow).name}, but"):
        update(g, narrowed_nu, params)
    narrowed_mu = (inner._replace(mu=optax.tree.cast(inner.mu, narrow)), *state[1:])
    message = r"`state\.mu\['w'\]` is (float16, but this optimizer stores it in bfloat16|a plain)"
    with pytest.raises(ValueError, match=message):
        update(g, narrowed_mu, params)
    # Without parameters the optimizer's own storage dtypes say what was narrowed.
    with pytest.raises(ValueError, match=r"`state\.nu\['w'\]`"):
        update(g, narrowed_nu)


def test_a_state_of_narrower_parameters_is_refused_where_the_parameters_say_so():
    # mu_dtype=None stores the moments in the parameters' dtype: float32 parameters read a
    # float16 μ as narrowed; without parameters there is nothing to compare with.
    params = {"w": jnp.zeros(3, F32)}
    opt = ax.adamax(1e-2)
    state = opt.init(params)
    inner = ax.adamax_state(state)
    narrowed = (inner._replace(mu=optax.tree.cast(inner.mu, F16)), *state[1:])
    g = {"w": jnp.ones(3, F32)}
    with pytest.raises(ValueError, match=r"`state\.mu\['w'\]` is float16, but .* float32"):
        opt.update(g, narrowed, params)
    updates, _ = opt.update({"w": jnp.ones(3, F16)}, narrowed)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), -1e-2, rtol=1e-3)


def test_a_negative_count_is_refused_eagerly():
    # 1 - β₁ᵗ < 0 for t < 0: a count of -5 stepped against the gradient, past the bound.
    params = {"w": jnp.zeros(3)}
    opt = ax.adamax(1e-2, mu_dtype=jnp.int8)
    state = opt.init(params)
    bad = (ax.adamax_state(state)._replace(count=jnp.asarray(-5, jnp.int32)), *state[1:])
    with pytest.raises(ValueError, match=r"`state\.count` is -5: a step count is never negative"):
        opt.update({"w": jnp.ones(3)}, bad, params)


def test_codes_cast_to_integers_are_refused():
    opt = ax.adamax(0.01, nu_dtype=BF16)
    params = {"w": jnp.zeros(3)}
    state = optax.tree.cast(opt.init(params), jnp.int32)
    with pytest.raises(ValueError, match=r"mu\['w'\]` is a int32 array|codes` is int32"):
        opt.update({"w": jnp.ones(3)}, state, params)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("source", ["adamax", "adamaxw"])
@pytest.mark.parametrize("param_dtype", [F32, BF16, F16])
def test_converting_an_optax_state_keeps_u_decaying(source, param_dtype):
    # Gradient 1 then 1999 of 1e-3: u = 0.999^1999 = 0.1353 after, for any dtype.
    params = jnp.zeros(3, param_dtype)
    theirs = getattr(optax, source)(1e-3)
    grads = [jnp.ones(3, param_dtype)] + [jnp.full(3, 1e-3, param_dtype)] * 1999
    with jax.numpy_dtype_promotion("standard"):
        _, optax_state, _ = _run(theirs, params, grads[:1])
    ours = getattr(ax, source)(1e-3)
    state = ax.convert_state(optax_state, ours, params)
    chex.assert_trees_all_equal_structs(state, ours.init(params))
    assert int(ax.adamax_state(state).count) == 1
    _, state, _ = _run(ours, params, grads[1:], state)
    u = np.asarray(ax.infinity_norm(state), np.float64)
    np.testing.assert_allclose(u, 0.999**1999, rtol=2**-7)


def test_converting_between_storage_dtypes_and_a_schedule_count():
    schedule = optax.linear_schedule(1e-2, 1e-3, 100)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    grads = [jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.5 + k), params) for k in range(5)]
    f32 = ax.adamax(schedule)
    _, state, _ = _run(f32, params, grads)
    low = ax.adamax(schedule, mu_dtype=F16, nu_dtype=BF16)
    converted = ax.convert_state(state, low, params)
    chex.assert_trees_all_close(ax.infinity_norm(converted), ax.infinity_norm(state), rtol=2**-7)
    kinds = (ax.ScaleByAdamaxState, optax.ScaleByScheduleState)
    nodes = jax.tree.leaves(converted, is_leaf=lambda x: isinstance(x, kinds))
    counts = [int(s.count) for s in nodes if isinstance(s, kinds)]
    assert counts == [5, 5]
    back = ax.convert_state(converted, f32, params)
    chex.assert_trees_all_close(ax.adamax_state(back).mu, ax.adamax_state(state).mu, rtol=2**-10)


def test_convert_state_names_what_is_wrong():
    params = {"w": jnp.zeros(3)}
    with pytest.raises(
        ValueError, match="exactly one ScaleByAdamaxState or optax.ScaleByAdamState"
    ):
        ax.convert_state(optax.sgd(0.1).init(params), ax.adamax(), params)
    state = ax.adamax().init({"v": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"missing from `state.mu`: \['w'\]"):
        ax.convert_state(state, ax.adamax(), params)


# --- 2. Finite input, finite output ----------------------------------------------------


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("eps_mode", ["denominator", "inside_max", "none"])
def test_gradients_near_the_float32_maximum_give_finite_bounded_steps(alias, eps_mode):
    opt = ALIASES[alias](0.002, eps_mode=eps_mode)
    params = jnp.zeros(2, F32)
    big = float(jnp.finfo(F32).max)
    grads = [jnp.array([3e38, -1.0], F32), jnp.array([big, -big], F32), jnp.array([-big, 1], F32)]
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        chex.assert_tree_all_finite(updates)
        # The exact step bound for the defaults, with NadaMax's look-ahead.
        assert np.all(np.abs(np.asarray(updates)) <= 0.002 * 2.1)
    first, _ = opt.update(grads[0], opt.init(params), params)
    assert float(first[0]) < 0 and float(first[1]) > 0


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("spike", [1e6, 1e30, 3e38])
def test_low_precision_state_survives_a_gradient_spike(alias, dtype, spike):
    # A spike in element 0 only; the others see ordinary gradients throughout.
    params = jnp.zeros(4, F32)
    rng = np.random.default_rng(0)
    grads = [jnp.asarray([spike, 1.0, 1e-3, -0.5], F32)] + [
        jnp.asarray(rng.normal(size=4) * [1, 1, 1e-3, 1], F32) for _ in range(100)
    ]
    low = ALIASES[alias](0.002, mu_dtype=dtype, nu_dtype=dtype)
    exact = ALIASES[alias](0.002)
    p_low, s_low, u_low = _run(low, params, grads)
    p_exact, s_exact, _ = _run(exact, params, grads)
    chex.assert_tree_all_finite((p_low, u_low, ax.infinity_norm(s_low)))
    u, u_exact = np.asarray(ax.infinity_norm(s_low)), np.asarray(ax.infinity_norm(s_exact))
    # The elements the spike did not touch keep their exact values ...
    np.testing.assert_allclose(u[1:], u_exact[1:], rtol=2**-7 if dtype == BF16 else 2**-9)
    # ... and follow exactly the path they follow without it: every store is element by
    # element, the rounding draws included.
    calm = [grads[0].at[0].set(1.0)] + grads[1:]
    p_calm, _, _ = _run(low, params, calm)
    chex.assert_trees_all_equal(p_low[1:], p_calm[1:])
    if dtype == BF16:
        np.testing.assert_allclose(u[0], u_exact[0], rtol=2**-7)
    else:
        # float16 holds the spike at its largest value (times a scale in [1, 2)).
        assert 65504 <= u[0] <= 2 * 65504
    # Every step stays within the exact step bound (NadaMax's look-ahead included).
    assert np.all(np.abs(np.asarray(u_low)) <= 0.002 * 2.1)


def test_float16_updates_past_its_range_saturate():
    # β₂ < β₁ lets m/u grow without bound once the gradients stop: past float16's range.
    opt = ax.adamax(0.01, b2=0.0)
    params = jnp.zeros(2, F16)
    grads = [jnp.ones(2, F16)] + [jnp.zeros(2, F16)] * 10
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        chex.assert_tree_all_finite(updates)


def test_bfloat16_nu_at_the_float32_maximum_saturates_finite():
    opt = ax.adamax(0.002, nu_dtype=BF16)
    params = jnp.zeros(2, F32)
    big = float(jnp.finfo(F32).max)
    updates, state = opt.update(jnp.array([big, -big], F32), opt.init(params), params)
    chex.assert_tree_all_finite((updates, ax.infinity_norm(state)))
    np.testing.assert_allclose(updates, [-0.002, 0.002], rtol=1e-6)


# --- 5. What optax accepts, we accept --------------------------------------------------


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("alias", ALIASES)
def test_python_float_leaves_eagerly(alias):
    opt = ALIASES[alias](0.002)
    theirs = {"adamax": optax.adamax, "adamaxw": optax.adamaxw, "nadamax": None}[alias]
    state = opt.init({"w": 0.5})
    updates, _ = opt.update({"w": 1.0}, state, {"w": 0.5})
    if theirs is not None:
        want, _ = theirs(0.002).update({"w": 1.0}, theirs(0.002).init({"w": 0.5}), {"w": 0.5})
        np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
    else:
        assert float(updates["w"]) < 0


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("param_dtype", [F32, BF16])
def test_integer_gradients_are_promoted_to_the_parameter_dtype(param_dtype):
    params = {"w": jnp.zeros(3, param_dtype)}
    opt = ax.adamax(0.002)
    updates, _ = opt.update({"w": jnp.array([1, -2, 0], jnp.int32)}, opt.init(params), params)
    assert updates["w"].dtype == param_dtype
    want, _ = optax.adamax(0.002).update(
        {"w": jnp.array([1, -2, 0], jnp.int32)}, optax.adamax(0.002).init(params), params
    )
    np.testing.assert_allclose(
        np.asarray(updates["w"], np.float32), np.asarray(want["w"], np.float32), rtol=1e-2
    )
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), [-0.002, 0.002, 0], rtol=1e-2)


def test_boolean_gradients_are_refused_with_their_path():
    params = {"w": jnp.zeros(2)}
    opt = ax.scale_by_adamax()
    with pytest.raises(TypeError, match=r"`updates`\['w'\] has dtype bool"):
        opt.update({"w": jnp.array([True, False])}, opt.init(params), params)


@pytest.mark.parametrize("storage", [F32, BF16, F16, jnp.int8])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_complex_gradient_of_a_real_parameter_is_refused_with_its_path(storage, jit):
    # μ would keep the real part and ν the modulus: the step for 3+4j was 0.6.
    params = {"w": jnp.zeros(4096)}
    opt = ax.adamax(1.0, mu_dtype=storage)
    update = jax.jit(opt.update) if jit else opt.update
    grads = {"w": jnp.full(4096, 3 + 4j, jnp.complex64)}
    with pytest.raises(TypeError, match=r"`updates`\['w'\] is complex64.*`state\.mu\['w'\]`"):
        update(grads, opt.init(params), params)
    with pytest.raises(TypeError, match=r"`grad`\['w'\] is complex64.*`m\['w'\]` is float32"):
        ax.adamax_step(params, grads, {"w": jnp.zeros(4096)}, {"w": jnp.zeros(4096)}, 1)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_scalar_scale_on_mu_is_refused_with_its_path(dtype):
    # Only a 16-bit ν is scaled; a μ read through a scale of 1000 stepped 473 times too far.
    params = {"w": jnp.ones((8, 1000))}
    opt = ax.adamax(1e-2, mu_dtype=dtype, nu_dtype=dtype)
    g = {"w": jnp.full((8, 1000), 0.5)}
    _, state = opt.update(g, opt.init(params), params)
    inner = ax.adamax_state(state)
    bad = (inner._replace(mu_scale={"w": jnp.asarray(1000.0, F32)}), *state[1:])
    message = r"`state\.mu_scale\['w'\]` is a scalar scale, but a μ"
    with pytest.raises(ValueError, match=message):
        opt.update(g, bad, params)
    with pytest.raises(ValueError, match=message):
        jax.jit(opt.update)(g, bad, params)
    with pytest.raises(ValueError, match=message):
        ax.first_moment(bad)
    # The moments swapped (μ in ν's place with ν's scale, and back) are refused too.
    swapped = inner._replace(
        mu=inner.nu, nu=inner.mu, mu_scale=inner.nu_scale, nu_scale=inner.mu_scale
    )
    with pytest.raises(ValueError, match=r"`state\.mu_scale\['w'\]` is a scalar scale"):
        opt.update(g, (swapped, *state[1:]), params)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_init_of_abstract_parameters(alias, dtype):
    opt = ALIASES[alias](0.002, compensated=True)
    abstract = jax.ShapeDtypeStruct((2, 4, 8), dtype)
    state = opt.init(abstract)
    concrete = opt.init(jnp.zeros((2, 4, 8), dtype))
    chex.assert_trees_all_equal_structs(state, concrete)
    chex.assert_trees_all_equal(state, concrete)
    chex.assert_trees_all_equal_structs(jax.eval_shape(opt.init, abstract), concrete)


def test_init_of_abstract_parameters_keeps_their_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = ax.adamax().init(jax.ShapeDtypeStruct((4,), F32, sharding=sharding))
    assert state[0].mu.sharding == sharding


def test_extended_dtype_leaves_are_refused_with_their_path():
    params = {"w": jnp.zeros(2), "key": jax.random.key(0)}
    with pytest.raises(TypeError, match=r"\['key'\] \(key<fry>\)"):
        ax.adamax().init(params)


def test_helpers_find_the_state_in_a_chain():
    opt = optax.chain(optax.clip(1.0), ax.adamax(0.1))
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    _, state = opt.update({"w": jnp.array([0.5, -2.0])}, state, params)
    np.testing.assert_allclose(ax.infinity_norm(state)["w"], [0.5, 1.0])
    assert ax.adamax_state(state) is state[1][0]
    with pytest.raises(ValueError, match="holds no ScaleByAdamaxState"):
        ax.infinity_norm(optax.sgd(0.1).init(params))
    two = optax.multi_transform({"a": ax.adamax(), "b": ax.adamax()}, {"w": "a", "v": "b"})
    with pytest.raises(ValueError, match=r"several ScaleByAdamaxState, at .*'a'.*'b'"):
        ax.infinity_norm(two.init({"w": jnp.zeros(1), "v": jnp.zeros(1)}))


# --- 6. Derivatives are finite wherever the forward pass is -----------------------------


def _meta_after(opt, x, y):
    """The loss after one step from `p`: the forward pass that meta-gradients go through."""

    def loss(p):
        return jnp.sum((p["w"] * x + 0.0 * jnp.sum(p["dead"]) - y) ** 2)

    def after(p):
        updates, _ = opt.update(jax.grad(loss)(p), opt.init(p), p)
        return loss(optax.apply_updates(p, updates))

    return after


def _meta_loss(opt, params, x, y):
    after = _meta_after(opt, x, y)
    return after(params), jax.grad(after)(params)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("eps_mode", ["none", "denominator", "inside_max"])
def test_meta_gradients_are_finite_with_a_dead_parameter(alias, eps_mode):
    opt = ALIASES[alias](0.1, eps_mode=eps_mode)
    params = {"w": jnp.array([0.5, -1.0]), "dead": jnp.zeros(3)}
    value, grads = _meta_loss(opt, params, jnp.array([1.0, 2.0]), jnp.array([2.0, 1.0]))
    assert np.isfinite(float(value))
    chex.assert_tree_all_finite(grads)
    # The meta-gradient of w against central differences of the forward value (the
    # forward pass alone: the differences need no gradients of their own).
    after = _meta_after(opt, jnp.array([1.0, 2.0]), jnp.array([2.0, 1.0]))
    h = 1e-3
    for i in range(2):
        up = after({"w": params["w"].at[i].add(h), "dead": params["dead"]})
        down = after({"w": params["w"].at[i].add(-h), "dead": params["dead"]})
        np.testing.assert_allclose(grads["w"][i], (up - down) / (2 * h), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_grad_through_a_low_precision_state_update(alias, dtype):
    opt = ALIASES[alias](0.1, mu_dtype=dtype, nu_dtype=dtype)
    params = jnp.array([0.5, -1.0, 2.0])
    state = opt.init(params)
    _, state = opt.update(jnp.array([0.3, 0.1, -0.2]), state, params)

    def f(g):
        updates, _ = opt.update(g, state, params)
        return jnp.sum(updates**2)

    g = jnp.array([0.2, -0.4, 0.1])
    grad = jax.grad(f)(g)
    chex.assert_tree_all_finite(grad)
    # The straight-through derivative matches that of float32 state within rounding.
    state32 = ALIASES[alias](0.1, mu_dtype=F32, nu_dtype=F32).init(params)
    exact = ALIASES[alias](0.1, mu_dtype=F32, nu_dtype=F32)
    _, state32 = exact.update(jnp.array([0.3, 0.1, -0.2]), state32, params)

    def f32(g):
        updates, _ = exact.update(g, state32, params)
        return jnp.sum(updates**2)

    np.testing.assert_allclose(grad, jax.grad(f32)(g), rtol=0.05, atol=1e-6)


# --- 7. Hyperparameters keep their precision --------------------------------------------


@pytest.mark.parametrize("b1", [0.9, 0.99, 0.999, 0.9999, 0.999999, 1 - 1e-8])
@pytest.mark.parametrize("alias", ["adamax", "adamaxw"])
def test_a_constant_gradient_takes_the_exact_steps_for_any_b1(alias, b1):
    params = jnp.ones(1, F32)
    opt = ALIASES[alias](1e-3, b1=b1, **({"weight_decay": 0.0} if alias == "adamaxw" else {}))
    history = adamax_numpy(np.ones(1), np.full((5, 1), 0.5), lr=1e-3, b1=b1)
    state = opt.init(params)
    for step, (want, _, _) in enumerate(history, start=1):
        updates, state = opt.update(jnp.full(1, 0.5, F32), state, params)
        params = optax.apply_updates(params, updates)
        exact = want[0] - (history[step - 2][0][0] if step > 1 else 1.0)
        # float32 rounds the moment (an ulp a step) and the bias correction
        # -expm1(t log1p(-(1 - β₁))) (one or two ulps); a bias correction from a
        # β₁ rounded to float32 is off by 1.3e-5 at β₁ = 0.999, 1.3e-2 at 0.999999.
        np.testing.assert_allclose(float(updates[0]), exact, rtol=1e-6, err_msg=f"step {step}")


def test_the_first_update_for_b1_0999_is_the_exact_one():
    opt = ax.adamax(1e-3, b1=0.999)
    updates, _ = opt.update(jnp.full(1, 0.5), opt.init(jnp.zeros(1)))
    # Within the two ulps of float32's bias correction; -1.000013e-3 before.
    np.testing.assert_allclose(float(updates[0]), -9.99999980e-4, rtol=3e-7)


@pytest.mark.parametrize("b1", [0.9, 0.999, 1 - 1e-6, 1 - 1e-8])
@pytest.mark.parametrize("alias", ALIASES)
def test_injected_and_plain_hyperparameters_agree(alias, b1):
    params = jnp.zeros(2, F32)
    grads = [jnp.array([0.5, -0.2]), jnp.array([0.1, 0.3]), jnp.array([-0.4, 0.0])]
    plain = ALIASES[alias](learning_rate=1e-3, b1=b1)
    injected = optax.inject_hyperparams(ALIASES[alias])(learning_rate=1e-3, b1=b1)
    p_plain, _, u_plain = _run(plain, params, grads)
    p_inj, _, u_inj = _run(injected, params, grads)
    chex.assert_tree_all_finite((u_inj, p_inj))
    # float32 holds no β₁ between 1 - 2^-24 and 1: an injected β₁ that rounded to 1 is
    # taken as 1 - 2^-24, whose steps differ from those of 1 - 1e-8 by far less than this.
    np.testing.assert_allclose(u_inj, u_plain, rtol=1e-5)
    np.testing.assert_allclose(p_inj, p_plain, rtol=1e-5)


def _bf16(x):
    return np.asarray(x, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("alias", ["adamax", "adamaxw"])
def test_bfloat16_parameters_get_one_rounding_of_the_step(alias):
    rng = np.random.default_rng(0)
    n, lr, wd = 4096, 2.9e-4, 0.1
    p0 = _bf16(rng.normal(size=n))
    grads = _bf16(rng.normal(size=(3, n)))
    kwargs = {"weight_decay": wd} if alias == "adamaxw" else {}
    opt = ALIASES[alias](lr, mu_dtype=F32, nu_dtype=F32, **kwargs)
    params = jnp.asarray(p0, BF16)
    state = opt.init(params)
    # The AdaMax directions d_t of these gradients, in float64 (θ moves by -d_t at lr = 1).
    path = [np.zeros(n)] + [h[0] for h in adamax_numpy(np.zeros(n), grads, lr=1.0)]
    directions = [path[t] - path[t + 1] for t in range(len(grads))]
    for step, (g, d) in enumerate(zip(grads, directions, strict=True), start=1):
        theta = np.asarray(params, np.float64)
        updates, state = opt.update(jnp.asarray(g, BF16), state, params)
        # The exact step from these parameters, rounded once to bfloat16.
        one_rounding = _bf16(-lr * (d + (wd * theta if kwargs else 0.0)))
        got = np.asarray(updates, np.float64)
        mismatch = np.mean(got != one_rounding)
        assert mismatch < 0.01, f"step {step}: {mismatch:.1%} differ from one rounding"
        # Rounding the direction, the learning rate and their product (three roundings)
        # would miss far more often: the test tells the two apart.
        # (At step 1 the direction is ±1 and the two coincide.)
        three = _bf16(-_bf16(lr) * _bf16(d + (wd * theta if kwargs else 0.0)))
        if step > 1:
            assert np.mean(three != one_rounding) > 5 * max(mismatch, 0.002)
        params = optax.apply_updates(params, updates)


# --- Found by trying to break it ------------------------------------------------------


@pytest.mark.parametrize("b1", [0.9, 0.99, 0.999])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_a_16_bit_mu_neither_stalls_nor_runs_ahead_for_b1_near_1(b1, dtype):
    # A constant gradient: the exact update is -lr at every step. A move of a whole unit
    # at every stalled store took μ there ulp/|Δ| times too fast (149 % off at β₁ = 0.999).
    n, steps, lr = 256, 3000, 1e-3
    opt = ax.adamax(lr, b1=b1, mu_dtype=dtype, nu_dtype=F32)
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.uniform(0.5, 2.0, n), F32)
    params = jnp.zeros(n)

    @jax.jit
    def run(state):
        def body(s, _):
            u, s = opt.update(g, s, params)
            return s, jnp.abs(u / -lr - 1)

        return jax.lax.scan(body, state, None, length=steps)[1]

    errors = np.asarray(run(opt.init(params)))
    # Stochastic rounding leaves μ a zero-mean noise of at most ulp / sqrt(6 (1 - β₁²))
    # relative (one ulp is at most 2^-7 of a bfloat16 value, 2^-10 of a float16 one): its
    # median over parameters stays below that at every step, and no step is far off.
    ulp = 2.0**-7 if dtype == BF16 else 2.0**-10
    noise = ulp / np.sqrt(6 * (1 - b1**2))
    assert np.median(errors, axis=1).max() < noise, np.median(errors, axis=1).max()
    assert errors.max() < 5 * noise, errors.max()


@pytest.mark.parametrize("mode", ["modulus", "split"])
@pytest.mark.parametrize("alias", ALIASES)
def test_a_complex_gradient_whose_modulus_overflows_gives_finite_steps(alias, mode):
    opt = ALIASES[alias](1e-3, complex_mode=mode)
    params = jnp.zeros(1, jnp.complex64)
    state = opt.init(params)
    for g in (3.4e38 + 3.4e38j, 1 + 1j, -2 - 0.5j):
        updates, state = opt.update(jnp.array([g], jnp.complex64), state, params)
        chex.assert_tree_all_finite((updates, ax.infinity_norm(state)))
        assert float(jnp.abs(updates[0])) <= 2.1e-3 * np.sqrt(2)
    # u holds the largest finite value for the modulus it cannot represent, and decays.
    u = np.asarray(ax.infinity_norm(state)).real
    assert np.all(np.isfinite(u)) and np.all(u > 1e38)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_adamax_step_refuses_a_16_bit_u(dtype):
    with pytest.raises(TypeError, match=r"`u` is .*never decays"):
        ax.adamax_step(1.0, 0.1, 0.0, jnp.zeros((), dtype), t=1)


@pytest.mark.parametrize(
    ("count", "expected"), [(2**40, 2**31 - 1), (2**32 + 1, 2**31 - 1), (7, 7), (7.0, 7)]
)
def test_convert_state_saturates_the_count(count, expected):
    params = {"w": jnp.zeros(2)}
    state = (
        optax.ScaleByAdamState(count=count, mu={"w": jnp.zeros(2)}, nu={"w": jnp.ones(2)}),
        optax.EmptyState(),
    )
    assert int(ax.adamax_state(ax.convert_state(state, ax.adamax(), params)).count) == expected


@pytest.mark.parametrize("count", [-5, 3.7, float("nan")])
def test_convert_state_refuses_a_count_that_is_no_step(count):
    params = {"w": jnp.zeros(2)}
    state = optax.ScaleByAdamState(count=count, mu={"w": jnp.zeros(2)}, nu={"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="count must be a whole number >= 0"):
        ax.convert_state(state, ax.adamax(), params)


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("injected", ["source", "target", "both"])
def test_convert_state_carries_the_count_of_inject_hyperparams(injected):
    schedule = optax.linear_schedule(0.0, 0.01, 100)
    params = {"w": jnp.zeros(2)}

    def make(lib, inject):
        return optax.inject_hyperparams(lib.adamax)(schedule) if inject else lib.adamax(schedule)

    source = make(optax, injected in ("source", "both"))
    _, state, _ = _run(source, params, [{"w": jnp.ones(2)}] * 100)
    target = make(ax, injected in ("target", "both"))
    converted = ax.convert_state(state, target, params)
    updates, _ = target.update({"w": jnp.ones(2)}, converted, params)
    # After 100 steps of warm-up the learning rate is 0.01, not 0 again.
    np.testing.assert_allclose(updates["w"], -0.01, rtol=1e-4)


def test_convert_state_into_a_masked_optimizer():
    params = {"w": jnp.zeros(2), "b": jnp.zeros(3)}
    with jax.numpy_dtype_promotion("standard"):
        _, state, _ = _run(optax.adamax(0.01), params, [jax.tree.map(jnp.ones_like, params)])
    target = optax.masked(ax.adamax(0.01), {"w": True, "b": False})
    converted = ax.convert_state(state, target, params)
    chex.assert_trees_all_equal_structs(converted, target.init(params))
    np.testing.assert_allclose(ax.infinity_norm(converted)["w"], 1.0)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_parameters_of_a_dtype_no_moment_is_stored_in_are_refused(dtype):
    with pytest.raises(ValueError, match=r"`params`\['w'\] is float8.*pass `mu_dtype`"):
        ax.adamax().init({"w": jnp.zeros(3, dtype)})


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_meta_gradients_are_finite_with_16_bit_state(dtype):
    opt = ax.adamax(0.1, mu_dtype=dtype, nu_dtype=dtype)
    params = {"w": jnp.array([0.5, -1.0]), "dead": jnp.zeros(3)}
    value, grads = _meta_loss(opt, params, jnp.array([1.0, 2.0]), jnp.array([2.0, 1.0]))
    assert np.isfinite(float(value))
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_correction_within_a_few_ulp_for_every_b1(dtype):
    # XLA's float64 log1p is up to 120 ulp off on [-0.5, -0.3] and its float32 log a few
    # ulp off near 1: 1 - β₁ᵗ is formed so that neither reaches it, for any β₁ and t.
    from adamax_jax._core import bias_corrections

    b1s = [0.0, 0.1, 0.3, 0.5, 0.59375, 0.6, 0.65, 0.7, 0.75, 0.9, 0.99, 0.999, 1 - 1e-8]
    counts = [1, 2, 3, 50, 1000]
    # β₁ and t as arguments, as injected hyperparameters arrive: constants would be
    # folded by the compiler with the host's own log1p. One program for every β₁ and t.
    correction = jax.jit(lambda b, c: bias_corrections(b, c, dtype, False)[0])
    with jax.enable_x64(dtype == np.float64):
        for b1 in b1s:
            one_minus = max(1 - np.float64(dtype(b1)), np.finfo(dtype).epsneg)
            for t in counts:
                got = float(correction(jnp.asarray(b1, dtype), t))
                with np.errstate(divide="ignore"):  # β₁ = 0: log 0
                    want = -np.expm1(t * np.log1p(-one_minus))
                assert abs(got - want) <= 4 * np.finfo(dtype).eps * want, (b1, t, got, want)
