"""Inputs that once gave a wrong number without a word: each is now right, or refused by name.

Hyperparameters injected in 16 bits, non-finite gradients in every storage dtype, complex
storage dtypes on mixed trees (see test_validation.py), errors that name what is wrong, and
which derivatives flow through which stores.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from adamax_jax._precision import state_bytes

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
ALIASES = {"adamax": ax.adamax, "adamaxw": ax.adamaxw, "nadamax": ax.nadamax}
# Storage configurations: every kind of codec, for both moments.
STORAGE = {
    "float32": {},
    "bf16-nu": {"nu_dtype": BF16},
    "bf16": {"mu_dtype": BF16, "nu_dtype": BF16},
    "f16": {"mu_dtype": F16, "nu_dtype": F16},
    "int8-uint8": {"mu_dtype": jnp.int8, "nu_dtype": jnp.uint8},
    "int8-int8": {"mu_dtype": jnp.int8, "nu_dtype": jnp.int8},
    "e4m3": {"mu_dtype": jnp.float8_e4m3fn, "nu_dtype": jnp.float8_e4m3fn},
    "e5m2": {"mu_dtype": jnp.float8_e5m2, "nu_dtype": jnp.float8_e5m2},
    "bf16-uint8": {"mu_dtype": BF16, "nu_dtype": jnp.uint8},
}
EIGHT_BIT = {"int8-uint8", "int8-int8", "e4m3", "e5m2", "bf16-uint8"}
# Two rows of 4096 values: block-wise for 8-bit storage, 16 blocks of 256 a row.
SHAPE = (2, 4096)


# --- 3. Hyperparameters that arrive in 16 bits -------------------------------------------------


def _schedule(step):
    return 1e-3 * 0.5 ** (step / 100)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("learning_rate", [1e-3, _schedule], ids=["constant", "schedule"])
def test_hyperparameters_injected_below_32_bits_are_refused(alias, dtype, learning_rate):
    # optax injects hyperparameters in the parameters' dtype: β₂ = 0.999 arrives as 1.0 in
    # bfloat16 and u would never decay. Refused, naming the fix, before any step is taken.
    opt = optax.inject_hyperparams(ALIASES[alias])(learning_rate=learning_rate)
    params = jnp.ones(3, dtype)
    with pytest.raises(ValueError, match=r"`b1` arrived as a .*hyperparam_dtype=jnp\.float32"):
        opt.init(params)


@pytest.mark.parametrize("name", ["b1", "b2", "eps"])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_each_16_bit_hyperparameter_is_refused_eagerly_and_traced(name, dtype):
    value = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}[name]
    with pytest.raises(ValueError, match=rf"`{name}` arrived as a {jnp.dtype(dtype).name}"):
        ax.scale_by_adamax(**{name: jnp.asarray(value, dtype)})

    @jax.jit
    def traced(x):
        return ax.adamax(**{name: x}).init(jnp.ones(2))

    with pytest.raises(ValueError, match=rf"`{name}` arrived as a {jnp.dtype(dtype).name}"):
        traced(jnp.asarray(value, dtype))
    with pytest.raises(ValueError, match=rf"`{name}` arrived as a {jnp.dtype(dtype).name}"):
        ax.adamax_step(1.0, 0.1, 0.0, 0.0, 1, **{name: jnp.asarray(value, dtype)})


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_float32_injected_hyperparameters_give_the_plain_optimizer(alias, dtype):
    # The case: g = 1 then 693 zero gradients; u decays to 0.999^693 ≈ 0.4999.
    injected = optax.inject_hyperparams(ALIASES[alias], hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3
    )
    plain = ALIASES[alias](1e-3)
    params = jnp.ones(3, dtype)
    grads = jnp.zeros((694, 3), dtype).at[0].set(1)

    def run(opt):
        def body(state, g):
            return opt.update(g, state, params)[1], None

        return jax.lax.scan(body, opt.init(params), grads)[0]

    u = np.asarray(ax.infinity_norm(jax.jit(lambda: run(injected))()), np.float64)
    want = np.asarray(ax.infinity_norm(jax.jit(lambda: run(plain))()), np.float64)
    np.testing.assert_allclose(u, want, rtol=1e-6)
    # Not 1.0, as with β₂ rounded to 1: the exact 0.4999, up to the rounding up of a
    # 16-bit ν (the plain optimizer's own).
    np.testing.assert_allclose(u, 0.999**693, rtol=1e-2)


# --- 4. A non-finite gradient stays visible ---------------------------------------------------


# Eagerly for one storage of each codec (an eager 8-bit step compiles op by op), and
# compiled for every storage.
NON_FINITE_RUNS = [("eager", c) for c in ("float32", "bf16", "int8-uint8")] + [
    ("jit", c) for c in STORAGE
]


@pytest.mark.usefixtures("standard_promotion")  # optax's own adamax, the reference
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(("how", "config"), NON_FINITE_RUNS)
def test_a_non_finite_gradient_gives_a_non_finite_update_then_and_later(how, config, bad):
    jit = how == "jit"
    opt = ax.adamax(1e-3, **STORAGE[config])
    params = jnp.ones(SHAPE)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    bad_grads = jnp.ones(SHAPE).at[0, 0].set(bad)
    reference = optax.adamax(1e-3)
    ref_state = reference.init(params)
    for step in range(3):
        grads = bad_grads if step == 0 else jnp.ones(SHAPE)
        updates, state = update(grads, state, params)
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        # That element: NaN at the step of the bad gradient and every step after, as optax.
        assert np.isnan(ref_updates[0, 0])
        assert np.isnan(updates[0, 0]), (step, float(updates[0, 0]))
        # Other rows stay finite; without 8-bit blocks, every other element does.
        assert np.all(np.isfinite(updates[1]))
        if config not in EIGHT_BIT or step == 0:
            assert np.sum(~np.isfinite(updates)) == 1
        else:
            # An 8-bit block holds no inf: its scale does, and every value of the block
            # reads NaN from then on (never a silent 0). Other blocks are untouched.
            assert np.all(np.isnan(updates[0, :256]))
            assert np.all(np.isfinite(updates[0, 256:]))


# A last axis that ends in a part block (300 values: a block of 256 and one of 44) is
# reduced in windows, not as blocks; 16 rows are past the size where XLA's CPU backend
# reduces windows in a way that drops a NaN from a max.
PART_BLOCK_SHAPE = (16, 300)
# Both moments 8-bit, and each alone.
PART_BLOCK_STORAGE = {
    **{c: STORAGE[c] for c in ("int8-uint8", "e4m3", "e5m2")},
    "int8-f32": {"mu_dtype": jnp.int8},
    "f32-uint8": {"nu_dtype": jnp.uint8},
}


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("config", ["int8-uint8", "e4m3", "e5m2", "int8-f32", "f32-uint8"], ids=str)
def test_a_non_finite_gradient_in_a_part_block_leaf_stays_visible(config, jit, bad):
    storage = PART_BLOCK_STORAGE[config]
    opt = ax.adamax(1e-3, **storage)
    params = jnp.ones(PART_BLOCK_SHAPE)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    for step in range(3):
        grads = jnp.ones(PART_BLOCK_SHAPE)
        if step == 0:
            grads = grads.at[0, 5].set(bad)
        updates, state = update(grads, state, params)
        assert np.isnan(updates[0, 5]), (step, float(updates[0, 5]))
        # The other block of that row (the part block) and the other rows stay finite.
        assert np.all(np.isfinite(updates[0, 256:])), step
        assert np.all(np.isfinite(updates[1:])), step
    # The state holds it too: the moment of that element reads non-finite.
    assert not np.isfinite(ax.first_moment(state)[0, 5]) or not np.isfinite(
        ax.infinity_norm(state)[0, 5]
    )


@pytest.mark.parametrize("factory", [ax.adamaxw, ax.nadamax], ids=["adamaxw", "nadamax"])
def test_the_aliases_keep_a_part_block_nan_and_huge_finite_gradients_apart(factory):
    # The same block reduction under every alias: a NaN stays, ±3e38 stays finite.
    opt = factory(1e-3, **PART_BLOCK_STORAGE["int8-uint8"])
    params = jnp.ones(PART_BLOCK_SHAPE)
    update = jax.jit(opt.update)
    state = opt.init(params)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=PART_BLOCK_SHAPE)
    huge = jnp.asarray(signs * 3e38, jnp.float32)
    for grads in (huge, jnp.ones(PART_BLOCK_SHAPE)):
        updates, state = update(grads, state, params)
        assert np.all(np.isfinite(updates))
    for step in range(2):
        grads = jnp.ones(PART_BLOCK_SHAPE)
        updates, state = update(grads.at[0, 5].set(jnp.nan) if step == 0 else grads, state, params)
        assert np.isnan(updates[0, 5]), step
        assert np.all(np.isfinite(updates[1:])), step


@pytest.mark.parametrize("pattern", ["alternating", "random"])
@pytest.mark.parametrize("magnitude", [1e37, 3e38])
@pytest.mark.parametrize("config", ["int8-uint8", "e4m3", "e5m2", "int8-f32", "f32-uint8"], ids=str)
def test_huge_finite_gradients_in_a_part_block_leaf_keep_every_step_finite(
    config, magnitude, pattern
):
    # Finite input, finite output: whatever carries a NaN through a block's reduction
    # must not make one from finite values (a sum of ±1e37 overflows to inf - inf).
    storage = PART_BLOCK_STORAGE[config]
    opt = ax.adamax(1e-3, **storage)
    params = jnp.zeros(PART_BLOCK_SHAPE)
    state = opt.init(params)
    update = jax.jit(opt.update)
    if pattern == "alternating":
        signs = np.where(np.arange(PART_BLOCK_SHAPE[1]) % 2 == 0, 1.0, -1.0)
        signs = np.broadcast_to(signs, PART_BLOCK_SHAPE)
    else:
        signs = np.random.default_rng(0).choice([-1.0, 1.0], size=PART_BLOCK_SHAPE)
    huge = jnp.asarray(signs * magnitude, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(huge)))
    b1, b2 = 0.9, 0.999
    steps = (huge, jnp.ones(PART_BLOCK_SHAPE), huge, jnp.ones(PART_BLOCK_SHAPE))
    for t, grads in enumerate(steps, start=1):
        updates, state = update(grads, state, params)
        assert np.all(np.isfinite(updates))
        # The step bound, up to the 1.6x that 8-bit μ's roundings can add to it
        # (docs/low_precision_8bit.md).
        bound = 1e-3 * (1 - b1) * (1 - (b1 / b2) ** t) / ((1 - b1 / b2) * (1 - b1**t))
        assert float(jnp.max(jnp.abs(updates))) <= 1.6 * bound
    assert np.all(np.isfinite(ax.first_moment(state)))
    assert np.all(np.isfinite(ax.infinity_norm(state)))


@pytest.mark.parametrize("config", STORAGE)
def test_apply_if_finite_skips_the_step_and_trains_on(config):
    opt = optax.apply_if_finite(ax.adamax(1e-3, **STORAGE[config]), max_consecutive_errors=5)
    clean = ax.adamax(1e-3, **STORAGE[config])
    params = jnp.ones(SHAPE)
    state, clean_state = opt.init(params), clean.init(params)
    update, clean_update = jax.jit(opt.update), jax.jit(clean.update)
    updates, state = update(jnp.ones(SHAPE).at[0, 0].set(np.inf), state, params)
    assert not np.any(updates)
    for _ in range(2):
        updates, state = update(jnp.ones(SHAPE), state, params)
        clean_updates, clean_state = clean_update(jnp.ones(SHAPE), clean_state, params)
        chex.assert_trees_all_equal(updates, clean_updates)


def test_a_float32_moment_past_float16s_range_still_saturates():
    # Finite input gives finite output: only non-finite input stays non-finite.
    opt = ax.adamax(1e-3, mu_dtype=F16, nu_dtype=F16)
    params = jnp.zeros(4)
    updates, state = opt.update(jnp.full(4, 1e30), opt.init(params), params)
    assert np.all(np.isfinite(updates))
    assert np.all(np.isfinite(ax.infinity_norm(state))) and np.all(np.isfinite(state[0].mu))


# --- A float16 μ past its range still steps by the learning rate --------------------------------


@pytest.mark.parametrize("g", [1e6, 3e38])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float16_mu_past_its_range_keeps_the_first_step_at_the_learning_rate(g, jit):
    """guards.md: "a gradient at float32's largest value gives a step of the learning rate", in
    every storage dtype. At t = 1 the step is α (1 - β₁) g / ((1 - β₁) |g|) = α exactly, as
    optax.adamax and float32 state give. A float16 μ saturates at 65504; a step taken from the
    stored μ would be 0.655 α for g = 1e6, 2e-33 α for g = 3e38 (the parameter frozen).
    """
    opt = ax.adamax(1.0, mu_dtype=jnp.float16)
    params = jnp.zeros(3, F32)
    update = jax.jit(opt.update) if jit else opt.update
    updates, _ = update(jnp.full(3, g, F32), opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates), -1.0, rtol=1e-3)


def test_float16_parameters_with_float32_gradients_keep_the_first_step_at_the_learning_rate():
    """float16 parameters default to a float16 μ; a float32 gradient of 1e6 (mixed precision)
    must still give a first step of α (to float16's rounding), not 0.655 α."""
    opt = ax.adamax(1.0)
    params = jnp.zeros(3, jnp.float16)
    updates, _ = opt.update(jnp.full(3, 1e6, F32), opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates, np.float32), -1.0, rtol=1e-3)


# --- 6. Errors that say what is wrong ---------------------------------------------------------


@pytest.mark.parametrize("block_size", [4097, 2**31, 2**63, 10**30])
def test_a_block_size_past_4096_is_refused_by_name(block_size):
    with pytest.raises(ValueError, match=r"`block_size` must be a positive integer of at most"):
        ax.adamax(mu_dtype=jnp.int8, block_size=block_size)


def test_the_largest_block_size_works():
    opt = ax.adamax(1e-3, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, block_size=4096)
    params = jnp.ones(SHAPE)
    updates, state = jax.jit(opt.update)(jnp.ones(SHAPE), opt.init(params), params)
    assert state[0].mu_scale.shape == (2, 1) and np.all(np.isfinite(updates))
    # The block size is recorded in an array of its length: at most 4 KiB, whatever the state.
    default = ax.adamax(1e-3, mu_dtype=jnp.int8, nu_dtype=jnp.uint8).init(params)
    assert state_bytes(state) <= state_bytes(default) + 4096


def test_an_injected_block_size_says_to_use_static_args():
    opt = optax.inject_hyperparams(
        ax.adamax, static_args=("mu_dtype",), hyperparam_dtype=jnp.float32
    )(learning_rate=1e-3, mu_dtype=jnp.int8, block_size=128)
    with pytest.raises(ValueError, match=r"`block_size` arrived as an array.*static_args"):
        opt.init(jnp.ones(SHAPE))
    opt = optax.inject_hyperparams(
        ax.adamax, static_args=("block_size", "mu_dtype"), hyperparam_dtype=jnp.float32
    )(learning_rate=1e-3, mu_dtype=jnp.int8, block_size=128)
    state = opt.init(jnp.ones(SHAPE))
    assert ax.adamax_state(state).block_size.shape == (128,)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_compensate_rounding_in_8_bits_says_why(dtype):
    with pytest.raises(ValueError, match=r"too few mantissa bits.*`mu_dtype` and `nu_dtype`"):
        ax.compensate_rounding(dtype=dtype)


# --- Derivatives: which flow through which stores ----------------------------------------------


def _gradients(shape=SHAPE):
    k0, k1 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k0, shape), jax.random.normal(k1, shape)


# Rows of 1100 values end in a part block of 76: its peaks come from windowed reductions.
PART_BLOCK = (4, 1100)


@pytest.mark.parametrize(
    "config, shape",
    [(c, SHAPE) for c in STORAGE] + [(c, PART_BLOCK) for c in sorted(EIGHT_BIT)],
)
def test_the_derivative_in_the_current_gradient_is_the_float32_steps(config, shape):
    # 8-bit state: the step is computed from the unrounded moments, so its derivative in
    # this step's gradient is exactly that of a float32 step from the same stored values.
    g0, g1 = _gradients(shape)
    opt, ref = ax.adamax(1e-3, **STORAGE[config]), ax.adamax(1e-3)
    params = jnp.zeros(shape)
    _, state = jax.jit(opt.update)(g0, opt.init(params), params)
    as_float32 = ax.convert_state(state, ref, params)
    d = jax.jit(jax.grad(lambda g: jnp.sum(opt.update(g, state, params)[0])))(g1)
    d32 = jax.jit(jax.grad(lambda g: jnp.sum(ref.update(g, as_float32, params)[0])))(g1)
    assert np.all(np.isfinite(d)) and np.any(d)
    if config in EIGHT_BIT or config == "float32":
        chex.assert_trees_all_equal(d, d32)


@pytest.mark.parametrize("config", STORAGE)
def test_derivatives_through_a_stored_moment(config):
    # Through the state, in an earlier gradient: 32- and 16-bit stores pass the derivative of
    # the unrounded moment on (straight through); 8-bit codes are integers and pass none.
    g0, g1 = _gradients()
    opt = ax.adamax(1e-3, **STORAGE[config])
    params = jnp.zeros(SHAPE)

    def two_steps(g0):
        _, state = opt.update(g0, opt.init(params), params)
        return jnp.sum(opt.update(g1, state, params)[0])

    d = jax.jit(jax.grad(two_steps))(g0)
    assert np.all(np.isfinite(d))
    kw = STORAGE[config]
    both_eight_bit = all(jnp.dtype(kw.get(k, F32)).itemsize == 1 for k in ("mu_dtype", "nu_dtype"))
    if both_eight_bit:
        assert not np.any(d)
    else:
        assert np.mean(np.abs(d)) > 1e-5


# --- Stochastic rounding: independent draws across blocks and leaves ----------------------------


@pytest.mark.parametrize("mu_dtype", [BF16, F16, jnp.int8, jnp.float8_e4m3fn])
def test_equal_values_in_other_leaves_and_blocks_round_independently(mu_dtype):
    # Two leaves holding the same values, and the blocks of one leaf holding the same values,
    # under zero gradients (unused embedding rows): each store rounds up or down by its own
    # draw, so that the two agree about as often as independent draws do, not every time.
    opt = ax.adamax(1e-3, mu_dtype=mu_dtype)
    row = jnp.linspace(0.1, 1.0, 256)
    g0 = jnp.tile(row, 32)
    params = {"a": jnp.zeros(g0.shape), "b": jnp.zeros(g0.shape)}
    _, state = opt.update({"a": g0, "b": g0}, opt.init(params), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update, first_moment = jax.jit(opt.update), jax.jit(ax.first_moment)
    alike_leaves, alike_blocks = [], []
    before = first_moment(state)
    for _ in range(20):
        _, state = update(zeros, state, params)
        after = first_moment(state)
        # Each value's decay this step: exactly β₁ where rounding went one way.
        decay = {k: np.asarray(after[k]) / np.asarray(before[k]) for k in after}
        alike_leaves.append(np.mean(decay["a"] == decay["b"]))
        alike_blocks.append(np.mean(decay["a"][:256] == decay["a"][256:512]))
        before = after
    # The values are the same in both leaves and in both blocks, so that the stores are
    # alike only by chance; shared draws would make them alike every time.
    assert np.mean(alike_leaves) < 0.9, np.mean(alike_leaves)
    assert np.mean(alike_blocks) < 0.9, np.mean(alike_blocks)


def test_an_old_layout_state_is_refused_as_a_state_not_blamed_on_the_gradients():
    """A state of the previous layout (μ as {'codes', 'scale'} dicts) is refused with a message
    that blames `updates` ("`updates` does not have the structure of `state.mu`; missing from
    `updates`: ['w']['codes'] ...") and says nothing of what to do. It must name the state and
    the way out (`convert_state` / `abstract_state`)."""
    params = {"w": jnp.ones((16, 512), F32)}
    grads = {"w": jnp.full((16, 512), 0.1, F32)}
    opt = ax.adamax(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
    state = opt.init(params)
    inner = state[0]
    old = inner._replace(
        mu={"w": {"codes": inner.mu["w"], "scale": inner.mu_scale["w"]}}, mu_scale=None
    )
    with pytest.raises(ValueError) as info:
        opt.update(grads, (old,) + tuple(state[1:]), params)
    message = str(info.value)
    assert not message.startswith("`updates`"), message
    assert "convert_state" in message or "abstract_state" in message, message


def test_the_derivative_is_finite_for_tiny_gradients_while_u_squared_is_normal():
    # d(m/u) holds u²: with the default ε it stays a normal number; with ε = 0 and u = 1e-20
    # it underflows, and the derivative is infinite (as optax's), as docs/guards.md says.
    g = jnp.array([1e-30, 1e-20, 0.3])
    for eps, finite in ((1e-8, True), (0.0, False)):
        opt = ax.adamax(1e-3, eps=eps, eps_mode="none" if eps == 0 else "denominator")
        state = opt.init(jnp.zeros(3))

        def total(g, opt=opt, state=state):
            return jnp.sum(opt.update(g, state)[0])

        assert np.all(np.isfinite(opt.update(g, state)[0]))
        d = jax.grad(total)(g)
        assert np.all(np.isfinite(d)) == finite, d
    reference = optax.adamax(1e-3, eps=0.0)
    optax_state = reference.init(jnp.zeros(3))
    with jax.numpy_dtype_promotion("standard"):
        d_optax = jax.grad(lambda g: jnp.sum(reference.update(g, optax_state)[0]))(g)
    assert not np.all(np.isfinite(d_optax))
