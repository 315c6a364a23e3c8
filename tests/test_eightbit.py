"""8-bit state: block-wise int8, uint8 and float8 moments."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from adamax_jax import _codecs
from adamax_jax._precision import state_bytes

I8, U8, E4M3, E5M2 = jnp.int8, jnp.uint8, jnp.float8_e4m3fn, jnp.float8_e5m2
F32 = jnp.float32
B1, B2, LR = 0.9, 0.999, 0.002
# (mu_dtype, nu_dtype) pairs; uint8 is for ν only.
PAIRS = [(I8, U8), (I8, I8), (E4M3, E4M3), (E5M2, E5M2), (F32, U8), (I8, F32)]
PAIR_IDS = [f"{jnp.dtype(m).name}-{jnp.dtype(n).name}" for m, n in PAIRS]
ALIASES = {
    "adamax": lambda **kw: ax.adamax(LR, **kw),
    "adamaxw": lambda **kw: ax.adamaxw(LR, weight_decay=1e-3, **kw),
    "nadamax": lambda **kw: ax.nadamax(LR, **kw),
}
BIG = 4096  # the smallest leaf stored block-wise


def _step_ratio(dtype):
    """The largest ratio between neighbouring nonzero codes of `dtype` (1 for 32 bits)."""
    dtype = jnp.dtype(dtype)
    return _codecs.code_step(dtype) if dtype.itemsize == 1 else 1.0


# --- Layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mu_dtype", "nu_dtype"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(
    ("shape", "block_size", "blocks"),
    [((8, 1024), 256, 4), ((3, 4100), 256, 17), ((5000,), 256, 20), ((2, 4000), 4096, 1)],
)
def test_init_layout(mu_dtype, nu_dtype, shape, block_size, blocks):
    opt = ax.adamax(LR, mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=block_size)
    state = jax.jit(opt.init)({"w": jnp.ones(shape)})[0]
    # The block size is recorded in the length of the state's `block_size` array.
    assert state.block_size.shape == (block_size,)
    for role, dtype in (("mu", mu_dtype), ("nu", nu_dtype)):
        codes, scales = getattr(state, role)["w"], getattr(state, f"{role}_scale")
        if jnp.dtype(dtype).itemsize != 1:
            assert scales is None or scales["w"] is None or scales["w"].shape == ()
            continue
        scale = scales["w"]
        assert codes.dtype == jnp.dtype(dtype) and codes.shape == shape
        assert scale.dtype == F32 and scale.shape == shape[:-1] + (blocks,)
        assert scale.shape[-1] == math.ceil(shape[-1] / block_size)


@pytest.mark.parametrize("shape", [(), (7,), (4095,), (64, 63)])
def test_small_leaves_stay_float32(shape):
    opt = ax.adamax(LR, mu_dtype=I8, nu_dtype=U8)
    state = opt.init({"b": jnp.ones(shape, jnp.bfloat16)})
    assert state[0].mu_scale is None and state[0].nu_scale is None
    assert state[0].block_size is None
    for moment in (state[0].mu["b"], state[0].nu["b"]):
        assert moment.dtype == F32 and moment.shape == shape
    # And they step exactly as float32 state does.
    g = {"b": jnp.full(shape, 0.3, jnp.bfloat16)}
    u8, _ = opt.update(g, state, g)
    ref = ax.adamax(LR, mu_dtype=F32, nu_dtype=F32)
    u32, _ = ref.update(g, ref.init(g), g)
    chex.assert_trees_all_equal(u8, u32)


@pytest.mark.parametrize(("mu_dtype", "nu_dtype"), PAIRS[:4], ids=PAIR_IDS[:4])
def test_state_bytes_per_parameter(mu_dtype, nu_dtype):
    opt = ax.adamax(LR, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    state = opt.init({"w": jnp.zeros((16, 4096))})
    per_param = state_bytes(state) / (16 * 4096)
    assert per_param <= 2.05, per_param
    assert per_param >= 2.0


@pytest.mark.parametrize(("mu_dtype", "nu_dtype"), PAIRS[:4], ids=PAIR_IDS[:4])
@pytest.mark.parametrize("shape", [(512, 384), (256, 1100)], ids=["1.5-blocks", "4.3-blocks"])
def test_a_part_block_step_writes_no_float32_buffer_of_the_leafs_size(mu_dtype, nu_dtype, shape):
    # A last axis that ends in a part block is reduced in windows. Its donated step
    # holds at most the copies of the old 8-bit codes (1 byte a value each, see the
    # docs' 8-bit Speed section) and the block scales, never |g| or -g in float32.
    opt = ax.adamax(LR, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    params = {"w": jax.ShapeDtypeStruct(shape, F32)}
    state = jax.eval_shape(opt.init, params)

    def step(p, g, s):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile()
    n = math.prod(shape)
    # The two copies, and per-block arrays (a few float32 values a block of 256).
    assert compiled.memory_analysis().temp_size_in_bytes <= 2 * n + n // 4


# --- Refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ALIASES)
def test_uint8_mu_is_refused(alias):
    with pytest.raises(ValueError, match=r"`mu_dtype` cannot be uint8"):
        ALIASES[alias](mu_dtype=U8)


@pytest.mark.parametrize("block_size", [0, -256, 2.5, True, "256", 256.0])
def test_bad_block_size_is_refused(block_size):
    with pytest.raises(ValueError, match=r"`block_size` must be a positive integer"):
        ax.adamax(LR, mu_dtype=I8, block_size=block_size)
    with pytest.raises(ValueError, match=r"`block_size` must be a positive integer"):
        ax.scale_by_adamax(nu_dtype=U8, block_size=block_size)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize(
    ("mu_dtype", "nu_dtype"),
    [(None, None), (jnp.bfloat16, None), (None, jnp.float32), (jnp.float16, jnp.bfloat16)],
    ids=["defaults", "bf16-mu", "f32-nu", "f16-bf16"],
)
def test_a_block_size_without_8_bit_storage_is_refused(alias, mu_dtype, nu_dtype):
    # No moment would be stored in blocks: the argument would be ignored without a word.
    with pytest.raises(ValueError, match=r"`block_size` is for 8-bit storage"):
        ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=128)
    with pytest.raises(ValueError, match=r"neither `mu_dtype` .* nor `nu_dtype` .* is an 8-bit"):
        ax.scale_by_adamax(mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=128)
    # Whatever its value: the fix is to drop it, not to fix the value first.
    with pytest.raises(ValueError, match=r"`block_size` is for 8-bit storage"):
        ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=nu_dtype, block_size=0)
    # Without it, and with either moment in 8 bits, the same options build.
    ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    ALIASES[alias](mu_dtype=I8, nu_dtype=nu_dtype, block_size=128)
    ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=U8, block_size=128)


def test_an_injected_block_size_without_8_bit_storage_is_refused_as_such():
    # Not "pass it in static_args" first, which would only lead to the refusal below.
    injected = optax.inject_hyperparams(ax.adamax)(1e-3, block_size=128)
    with pytest.raises(ValueError, match=r"`block_size` is for 8-bit storage"):
        injected.init({"w": jnp.ones(BIG)})


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fnuz, jnp.float8_e4m3b11fnuz])
def test_other_one_byte_floats_are_refused(dtype):
    with pytest.raises(ValueError, match=r"`nu_dtype` got .*float8.*8-bit storage is"):
        ax.adamax(LR, nu_dtype=dtype)


def test_complex_parameters_with_8_bit_state_are_refused():
    opt = ax.adamax(LR, mu_dtype=I8, nu_dtype=U8)
    with pytest.raises(ValueError, match=r"\['z'\]") as info:
        opt.init({"z": jnp.zeros(BIG, jnp.complex64), "w": jnp.zeros(BIG)})
    assert "`mu_dtype`" in str(info.value) and "['w']" not in str(info.value)


def test_cast_state_is_refused_naming_the_path():
    opt = ax.adamax(LR, mu_dtype=I8, nu_dtype=U8)
    params = {"w": jnp.zeros(BIG)}
    state = optax.tree.cast(opt.init(params), F32)
    with pytest.raises(ValueError, match=r"state\.mu\['w'\]` is float32.*cast"):
        opt.update(params, state, params)


def test_state_with_wrong_block_scales_is_refused():
    opt = ax.adamax(LR, mu_dtype=I8, nu_dtype=U8)
    params = {"w": jnp.zeros((2, BIG))}
    state = opt.init(params)
    scale = state[0].nu_scale["w"]
    state = (state[0]._replace(nu_scale={"w": scale[:, :3]}), *state[1:])
    with pytest.raises(ValueError, match=r"state\.nu_scale\['w'\]` must be .*\(2, 16\)"):
        opt.update(params, state, params)


# --- Finite output for every finite gradient -----------------------------------------------------


@functools.cache
def _stepper(alias, mu_dtype, nu_dtype, jit):
    opt = ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return opt, (jax.jit(opt.update) if jit else opt.update)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize(("mu_dtype", "nu_dtype"), PAIRS[:4], ids=PAIR_IDS[:4])
def test_finite_for_huge_tiny_and_zero_gradients(alias, mu_dtype, nu_dtype, jit):
    opt, update = _stepper(alias, mu_dtype, nu_dtype, jit)
    params = jnp.linspace(-1.0, 1.0, BIG, dtype=F32)
    state = opt.init(params)
    normal = jnp.where(jnp.arange(BIG) % 2 == 0, 0.5, -0.25).astype(F32)
    for scale in (1.0, 1e6, 1e30, 3e38, 1e-30, 1e-38, 0.0, 1.0):
        g = (normal * jnp.float32(scale)).at[:2].set(jnp.array([3e38, -1.0], F32))
        updates, state = update(g, state, params)
        assert bool(jnp.all(jnp.isfinite(updates))), (scale, updates)
        params = optax.apply_updates(params, updates)
        assert bool(jnp.all(jnp.isfinite(params)))
        u = ax.infinity_norm(state)
        assert bool(jnp.all(jnp.isfinite(u)))
        # ν never reads back below the gradient it holds.
        assert bool(jnp.all(u >= jnp.abs(g))), scale


# --- ν: exact decay, rounding up, and the step bound --------------------------------------------


@pytest.mark.parametrize("nu_dtype", [U8, I8, E4M3, E5M2])
def test_nu_decays_exactly_through_its_block_scale(nu_dtype):
    opt = ax.scale_by_adamax(nu_dtype=nu_dtype)
    k1, k2 = jax.random.split(jax.random.key(0))
    g0 = jax.random.normal(k1, (BIG,)) * 10.0 ** jax.random.uniform(k2, (BIG,), F32, -2, 1)
    state = opt.init(g0)
    _, state = opt.update(g0, state)
    codes0 = np.asarray(state.nu)
    u0 = np.asarray(ax.infinity_norm(state), np.float64)

    @jax.jit
    def zeros(state):
        def body(s, _):
            return opt.update(jnp.zeros(BIG), s)[1], None

        return jax.lax.scan(body, state, None, length=3000)[0]

    state = zeros(state)
    # No code changed: the decay is carried by the scales alone ...
    np.testing.assert_array_equal(np.asarray(state.nu), codes0)
    # ... and is exact to float32 rounding of the scale, 3000 times.
    np.testing.assert_allclose(
        np.asarray(ax.infinity_norm(state), np.float64), u0 * B2**3000, rtol=3000 * 2**-23
    )


@pytest.mark.parametrize("nu_dtype", [U8, I8, E4M3, E5M2])
def test_nu_rounds_up_within_one_code(nu_dtype):
    opt = ax.scale_by_adamax(nu_dtype=nu_dtype)
    ref = ax.scale_by_adamax()
    k = jax.random.split(jax.random.key(1), 80)
    s8, s32 = opt.init(jnp.zeros(BIG)), ref.init(jnp.zeros(BIG))
    upd8, upd32 = jax.jit(opt.update), jax.jit(ref.update)
    for key in k:
        # Magnitudes spanning 10^3 in every block, inside every map's range.
        k1, k2 = jax.random.split(key)
        sign = jnp.where(jax.random.bernoulli(k1, 0.5, (BIG,)), 1.0, -1.0).astype(F32)
        g = sign * 10.0 ** jax.random.uniform(k2, (BIG,), F32, -1, 2)
        _, s8 = upd8(g, s8)
        _, s32 = upd32(g, s32)
        u8, u32 = np.asarray(ax.infinity_norm(s8)), np.asarray(ax.infinity_norm(s32))
        ratio = u8.astype(np.float64) / u32
        assert ratio.min() >= 1 - 1e-5, ratio.min()
        assert ratio.max() <= _step_ratio(nu_dtype) * (1 + 1e-5), ratio.max()


def _adversarial(steps, size, seed=0):
    """|g_t| growing as β₂^-t with random signs and per-entry scales: attains the bound."""
    rng = np.random.default_rng(seed)
    sign = np.where(rng.random((steps, size)) < 0.9, 1.0, -1.0)
    scale = 10.0 ** rng.uniform(-1, 1, size)
    return (sign * scale * B2 ** -np.arange(1, steps + 1)[:, None]).astype(np.float32)


@pytest.mark.parametrize("nu_dtype", [U8, I8, E4M3, E5M2])
def test_step_bound_holds_with_8_bit_nu(nu_dtype):
    """|Δθ| ≤ α(1 − β₁)(1 − (β₁/β₂)^t)/((1 − β₁/β₂)(1 − β₁^t)), with 8-bit ν exactly.

    (An 8-bit μ carries its own rounding into the step; its excess over the
    bound is measured in docs/low_precision_8bit.md.)
    """
    mu_dtype = F32
    steps = 300
    grads = jnp.asarray(_adversarial(steps, BIG))
    opt = ax.adamax(LR, B1, B2, eps_mode="none", mu_dtype=mu_dtype, nu_dtype=nu_dtype)

    @jax.jit
    def run(grads):
        def body(s, g):
            u, s = opt.update(g, s)
            return s, u

        return jax.lax.scan(body, opt.init(grads[0]), grads)[1]

    updates = np.abs(np.asarray(run(grads), np.float64))
    t = np.arange(1, steps + 1)[:, None]
    bound = LR * (1 - B1) * (1 - (B1 / B2) ** t) / ((1 - B1 / B2) * (1 - B1**t))
    allowance = 1 + 1e-5
    assert np.all(updates <= bound * allowance), np.max(updates / bound)
    # The bound is nearly attained: it is the bound of this gradient sequence.
    assert np.max(updates / bound) > 0.9


# --- μ: no stall ------------------------------------------------------------------------------


@pytest.mark.parametrize("mu_dtype", [I8, E4M3, E5M2])
def test_mu_reaches_a_steady_gradient(mu_dtype):
    opt = ax.scale_by_adamax(mu_dtype=mu_dtype)
    target = jnp.asarray(10.0 ** np.linspace(-2, 1, BIG) * np.where(np.arange(BIG) % 3, 1, -1), F32)

    @jax.jit
    def run(state):
        def body(s, _):
            s = opt.update(target, s)[1]
            return s, ax.first_moment(s)

        return jax.lax.scan(body, state, None, length=400)[1]

    mu = np.asarray(run(opt.init(target)), np.float64)
    tail = mu[-300:]
    # Every value ends within two codes of the gradient (the noise of stochastic rounding
    # is about a code at β₁ = 0.9 in int8). Rounded stochastically, each is right on
    # average: over the last 300 steps the mean of a typical one is well within
    # a quarter of a code of the gradient, and the values are short of it as often as
    # past it (a store rounded to nearest stalls short, by up to (half a code)/(1 - β₁)).
    step = _step_ratio(mu_dtype)
    ratio = tail / np.asarray(target, np.float64)
    assert ratio.min() >= 1 / step**2 - 1e-6 and ratio.max() <= step**2 + 1e-6
    mean = ratio.mean(axis=0)
    assert np.median(np.abs(mean - 1)) < (step - 1) / 4, np.median(np.abs(mean - 1))
    assert abs(np.median(mean) - 1) < (step - 1) / 10, np.median(mean)


# --- Aliases, jit/eager, closeness to float32 state ----------------------------------------------


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize(("mu_dtype", "nu_dtype"), PAIRS[:4], ids=PAIR_IDS[:4])
def test_aliases_track_float32_state_and_jit_equals_eager(alias, mu_dtype, nu_dtype):
    opt8 = ALIASES[alias](mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    opt32 = ALIASES[alias]()
    params = {"w": jnp.ones((4, 1024)), "b": jnp.zeros(3)}
    s8, s32, s8e = opt8.init(params), opt32.init(params), opt8.init(params)
    update8 = jax.jit(opt8.update)
    for i in range(5):
        key = jax.random.key(i)
        # Gradients within a factor 3 of one another: well inside every map.
        g = {
            "w": jax.random.uniform(key, (4, 1024), F32, 1.0, 3.0),
            "b": jnp.full(3, 0.5, F32),
        }
        u8, s8 = update8(g, s8, params)
        u8e, s8e = opt8.update(g, s8e, params)
        u32, s32 = opt32.update(g, s32, params)
        # The stored state is the same to the bit; the float32 arithmetic of
        # the step may differ by an ulp between XLA's fused and eager kernels.
        chex.assert_trees_all_equal(s8, s8e)
        chex.assert_trees_all_close(u8, u8e, rtol=1e-6)
        # One rounding of each moment per step, carried over a few steps.
        log_ratio = np.abs(np.log(np.asarray(u8["w"] / u32["w"], np.float64)))
        worst = np.log(_step_ratio(mu_dtype) * _step_ratio(nu_dtype))
        assert log_ratio.max() <= 2 * worst, log_ratio.max()
        assert np.median(log_ratio) <= worst / 2, np.median(log_ratio)
        # The small leaf is float32 state: the same step.
        np.testing.assert_array_equal(u8["b"], u32["b"])


def test_grad_through_an_update_is_finite():
    opt = ax.adamax(0.1, mu_dtype=I8, nu_dtype=U8)
    x = jnp.linspace(0.5, 1.5, BIG, dtype=F32)

    def loss(w):
        return jnp.sum((w * x - 1.0) ** 2)

    def meta(w):
        state = opt.init(w)
        updates, _ = opt.update(jax.grad(loss)(w), state, w)
        return loss(optax.apply_updates(w, updates))

    value, grad = jax.value_and_grad(meta)(jnp.zeros(BIG))
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.usefixtures("standard_promotion")
def test_convert_state_from_float32_to_8_bit():
    params = {"w": jnp.zeros(BIG)}
    old = optax.adamax(LR)
    g = {"w": jnp.linspace(0.1, 10.0, BIG, dtype=F32)}
    _, state = old.update(g, old.init(params), params)
    new = ax.adamax(LR, mu_dtype=I8, nu_dtype=U8)
    converted = ax.convert_state(state, new, params)
    u = np.asarray(ax.infinity_norm(converted)["w"], np.float64)
    ratio = u / np.asarray(g["w"], np.float64)
    assert ratio.min() >= 1 and ratio.max() <= _step_ratio(U8) * (1 + 1e-6)


# --- Found by trying to break it ------------------------------------------------------


@pytest.mark.parametrize(
    ("mu_dtype", "nu_dtype"),
    [(E4M3, E5M2), (I8, E5M2), (I8, F32), (E4M3, F32), (E5M2, F32), (I8, U8)],
)
@pytest.mark.parametrize("small", [1e-4, 1e-6, 1e-8])
def test_a_mu_below_its_blocks_range_makes_no_large_step(mu_dtype, nu_dtype, small):
    # One large gradient per block of 256 and small ones around it: a small μ below the
    # block's smallest code must not be rounded up to that code (a step of thousands of
    # learning rates); rounded to nearest (0, or that code when the value is past half of
    # it), its step is at most twice the learning rate.
    rng = np.random.default_rng(0)
    g = (rng.uniform(0.5, 1.5, 4096) * small).astype(np.float32)
    g[::256] = 1e3
    opt = ax.adamax(1.0, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    params = jnp.zeros(4096)
    updates, _ = opt.update(jnp.asarray(g), opt.init(params), params)
    assert float(jnp.max(jnp.abs(updates))) <= 2.0, float(jnp.max(jnp.abs(updates)))


def test_a_state_of_another_block_size_is_refused():
    params = {"w": jnp.zeros((8, 600))}
    state = ax.adamax(mu_dtype=I8, nu_dtype=U8).init(params)
    other = ax.adamax(mu_dtype=I8, nu_dtype=U8, block_size=200)
    with pytest.raises(ValueError, match=r"written in blocks of 256 values.*`block_size` is 200"):
        other.update({"w": jnp.ones((8, 600))}, state, params)
    with pytest.raises(
        ValueError,
        match=r"\[0\]\.block_size: written in blocks of 256 values, but the optimizer's "
        r"`block_size` is 200$",
    ):
        ax.check_state(other, params, state)


@pytest.mark.parametrize("shape", [(4096, 1), (1024, 4), (512, 8)])
def test_a_leaf_with_a_short_last_axis_stays_in_float32(shape):
    # One float32 scale per few values would take more than float32 itself.
    state = ax.adamax(mu_dtype=I8, nu_dtype=U8).init({"w": jnp.zeros(shape)})
    assert state[0].mu["w"].dtype == F32 and state[0].nu["w"].dtype == F32
