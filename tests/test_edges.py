"""Edges of the 8-bit and 16-bit state: saturation, tiny scales, x64.

Each test names what goes wrong without its rule and what the right value is.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adamax_jax as ax

F32 = jnp.float32
BIG = 4096  # the smallest leaf stored block-wise


@pytest.mark.parametrize("g", [1e6, 3e38])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float16_nu_past_its_range_keeps_the_first_step_within_the_bound(g, jit):
    """A float16 ν saturates at 65504 times its scale (< 2^17); the step must not divide by that.

    The 16-bit step is taken from the stored moments, and the store of ν was
    trusted to read back at least |g|. Past float16's range it saturates, so
    that the first step with a gradient of 1e6 was 7.6 learning rates, and with
    3e38 it was 2.3e33 learning rates. The step bound at t = 1 is α (1 - β₁)/(1 - β₁)
    = α: the step must be α (to rounding), as it is with float32 state.
    """
    opt = ax.adamax(1.0, nu_dtype=jnp.float16)
    params = jnp.zeros(3)
    update = jax.jit(opt.update) if jit else opt.update
    updates, _ = update(jnp.full(3, g, F32), opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates), -1.0, rtol=1e-6)


@pytest.mark.parametrize("g", [1.2e-38, 1.3e-38, 2.0e-38, 2.35e-38, 3e-38])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bfloat16_nu_holds_gradients_just_above_the_smallest_normal(g, jit):
    """A bfloat16 ν of |g| below float32's smallest normal number times its scale reads back |g|+.

    The scale is in [1.0039, 2.0078), so that |g| / scale was a subnormal
    number for |g| up to about 2.4e-38: XLA flushed the code to 0, and
    ``infinity_norm`` read 0 with a nonzero gradient, below the |g| that a
    stored ν never comes back under. The right value is at least |g| and at
    most one code above the smallest normal number times the scale (< 2.4e-38
    · (1 + 2^-7)), or one code above |g|.
    """
    opt = ax.adamax(1.0, eps=0.0, eps_mode="none", nu_dtype=jnp.bfloat16)
    params = jnp.zeros(3)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    for _ in range(3):
        _, state = update(jnp.full(3, g, F32), state, params)
    u = np.asarray(ax.infinity_norm(state)).astype(np.float64)
    assert np.all(u >= np.float64(np.float32(g))), u
    assert np.all(u <= max(2.4e-38, g) * (1 + 2.0**-7)), u


_X64_FLOAT8 = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import adamax_jax as ax
    for dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
        opt = ax.adamax(1.0, mu_dtype=dtype, nu_dtype=dtype)
        p = jnp.zeros(4096, jnp.float32)
        u, s = opt.update(jnp.ones(4096, jnp.float32), opt.init(p), p)
        assert abs(float(u[0]) + 1.0) < 1e-5, float(u[0])
    print("ok")
    """
)


def test_float8_eager_step_under_x64_does_not_crash():
    """An eager step with float8 state under ``jax_enable_x64`` killed the process (SIGSEGV).

    ``_codecs._codes`` built the float8 sign bit with ``jnp.where(rank < 0,
    0x80, 0)``: under x64 that is a weakly typed int64, and its ``|`` with the
    int32 magnitudes, run eagerly, crashes XLA's CPU compiler. The step must run
    and give -α at t = 1. (Run in a subprocess: the crash takes the interpreter.)
    """
    _run_script(_X64_FLOAT8)


EIGHT_BIT_NU = [jnp.int8, jnp.uint8, jnp.float8_e4m3fn, jnp.float8_e5m2]


@pytest.mark.parametrize("nu_dtype", EIGHT_BIT_NU, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("first", [2e-37, 1e-35])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_8_bit_nu_keeps_a_block_whose_scale_decays_below_the_normal_range(nu_dtype, first, jit):
    """A block whose scale decays below 2^-126 lost every value it held.

    Such a block was treated as a fresh one: its scale came from this step's
    |g| alone (0 for a block of zeros) and its carried codes were dropped,
    although its decayed values are normal float32 numbers (up to the top code
    times 2^-126: 3.7e-37 for int8, 6.7e-34 for float8_e5m2). u then read back
    0 instead of β₂ u, and with ε = 0 the next small gradient gave a step of
    5 (int8) to 249 (e5m2) learning rates, where the bound is
    α (1 - β₁)/(1 - β₁/β₂) ≈ 1.0. Right: u never reads back below the decayed
    float32 value (β₂ u, to float32 rounding), and every step stays within the bound.
    """
    b1, b2 = 0.9, 0.999
    opt = ax.adamax(1.0, b1=b1, b2=b2, eps=0.0, eps_mode="none", mu_dtype=F32, nu_dtype=nu_dtype)
    params = jnp.zeros(BIG)
    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    bound = (1 - b1) / (1 - b1 / b2) * (1 + 1e-5)
    previous = None
    for g in [first, 0.0, 1.2e-38, 1.2e-38]:
        updates, state = update(jnp.full(BIG, g, F32), state, params)
        assert float(jnp.max(jnp.abs(updates))) <= bound
        u = np.asarray(ax.infinity_norm(state), np.float64)
        if previous is not None:
            assert u.min() >= previous * b2 * (1 - 2.0**-16), (u.min(), previous * b2)
        previous = u.max()


_X64_FLOAT64_PARAMS = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import adamax_jax as ax
    b1, b2 = 0.9, 0.999
    bound = (1 - b1) / (1 - b1 / b2) * (1 + 1e-6)
    for dtype in (jnp.uint8, jnp.int8, jnp.float8_e4m3fn):
        opt = ax.adamax(1.0, b1=b1, b2=b2, mu_dtype=jnp.float64, nu_dtype=dtype)
        p = {"w": jnp.zeros(4096, jnp.float64)}
        try:
            opt.init(p)
        except ValueError as e:
            assert "float64" in str(e) and "['w']" in str(e), str(e)
        else:
            raise AssertionError(f"8-bit {jnp.dtype(dtype).name} state for float64 accepted")
    print("ok")
    """
)


def test_8_bit_state_for_float64_parameters_is_refused():
    """8-bit state for float64 parameters is refused by ``init``, naming the leaf.

    The block scales and the values read back are float32, so that a float64
    gradient of 1e300 was stored as 3.4e38 while μ (float64) held it: the next
    step was 1.1e261 learning rates, where the bound is α (1 - β₁)/(1 - β₁/β₂)
    ≈ 1.0. As for complex parameters, ``init`` refuses it.
    """
    _run_script(_X64_FLOAT64_PARAMS)


def _run_script(script: str) -> None:
    """Runs `script` in a fresh interpreter (x64 is process-wide); it must print "ok"."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip().endswith("ok"), done.stdout[-2000:]
