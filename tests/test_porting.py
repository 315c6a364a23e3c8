"""Moving an AdaMax run between PyTorch, Keras and JAX mid-training, in both directions.

The real frameworks run (PyTorch 2.13 CPU, Keras 3 on the JAX backend): a run that moves
after 100 steps must take the same next 100 steps as the run that never moved, within the
parity tests' bound (1e-5 relative, float32), where a cold restart (m = u = 0, t = 1) does
not. torch and keras are imported unconditionally: where one is missing these tests fail.
"""

import functools
import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import adamax_jax as ax
from tests.reference import params_away_from_zero, random_gradients

keras = None


@pytest.fixture(scope="module", autouse=True)
def keras_on_jax():
    """Imports keras on its JAX backend, as tests/test_parity_keras.py does (see there)."""
    global keras
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BACKEND", "jax")
        if "keras" in sys.modules:
            assert sys.modules["keras"].backend.backend() == "jax"
        keras = importlib.import_module("keras")
        yield keras
    keras = None


BEFORE, AFTER = 100, 100
# The parity tests' bound on the relative deviation of any parameter, float32.
RTOL = 1e-5
# A cold restart must miss the uninterrupted run by far more than that: its first steps
# are α·sign(g) for every parameter, where the carried state's are much smaller.
COLD = 100 * RTOL
SHAPES = ((8, 8), (8,))
NAMES = ("w", "b")  # Keras variable names, in the frameworks' order

TORCH_HYPERS = {
    "default": dict(lr=2e-3, b1=0.9, b2=0.999, eps=1e-8),
    "fast": dict(lr=1e-3, b1=0.5, b2=0.9, eps=1e-3),
}
KERAS_HYPERS = {
    "default": dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-7),
    "fast": dict(lr=2e-3, b1=0.5, b2=0.9, eps=1e-3),
}


def _problem(seed, shapes=SHAPES, steps=BEFORE + AFTER, dtype=np.float32):
    """Parameters (a list, in the frameworks' order) and `steps` gradients for each."""
    rng = np.random.default_rng(seed)

    def draw(f, *args):
        x = f(rng, *args)
        if np.issubdtype(dtype, np.complexfloating):
            x = x + 1j * f(rng, *args)
        return x.astype(dtype)

    params = [draw(params_away_from_zero, s) for s in shapes]
    grads = [draw(random_gradients, steps, s) for s in shapes]
    return params, grads


def _deviation(got, want):
    """The largest relative deviation of any parameter (real and imaginary parts apart)."""

    def parts(x):
        x = np.asarray(x)
        return [x.real, x.imag] if np.iscomplexobj(x) else [x]

    return max(
        float(np.max(np.abs(g - w) / np.abs(w)))
        for a, b in zip(got, want, strict=True)
        for g, w in zip(parts(a), parts(b), strict=True)
    )


# ---------------------------------------------------------------------------------------
# The frameworks


def _torch_run(params, grads, steps, start=0, state_dict=None, scheduler=None, **kwargs):
    """torch.optim.Adamax over gradients start..start+steps; returns (params, optimizer)."""
    tensors = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in params]
    opt = torch.optim.Adamax(tensors, **kwargs)
    sched = scheduler(opt) if scheduler else None
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    for i in range(start, start + steps):
        for t, g in zip(tensors, grads, strict=True):
            t.grad = torch.from_numpy(np.array(g[i]))
        opt.step()
        if sched is not None:
            sched.step()
    return [t.detach().numpy().copy() for t in tensors], opt


def _torch_kwargs(lr, b1, b2, eps, **rest):
    return dict(lr=lr, betas=(b1, b2), eps=eps, **rest)


def _keras_build(params, exclude=None, **kwargs):
    variables = [keras.Variable(p, name=n) for p, n in zip(params, NAMES, strict=True)]
    opt = keras.optimizers.Adamax(**kwargs)
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    opt.build(variables)
    return variables, opt


def _keras_steps(variables, opt, grads, steps, start=0):
    # Keras' own arithmetic promotes Python scalars against its int counter.
    with jax.numpy_dtype_promotion("standard"):
        for i in range(start, start + steps):
            opt.apply([jnp.asarray(g[i]) for g in grads], variables)
    return [np.asarray(v.value) for v in variables]


def _keras_kwargs(lr, b1, b2, eps, **rest):
    return dict(learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps, **rest)


def _jax_run(opt, params, grads, steps, start=0, state=None):
    """`opt` over gradients start..start+steps in one jitted scan; returns (params, state).

    `params` is a tree, `grads` the same tree of gradients stacked along a leading axis.
    """
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params) if state is None else state
    window = jax.tree.map(lambda g: jnp.asarray(g[start : start + steps]), grads)
    params, state = _runner(opt)(params, state, window)
    return jax.tree.map(np.asarray, params), state


@functools.cache
def _runner(opt):
    """One jitted scan per optimizer, so that a cold and a converted run compile once."""

    @jax.jit
    def run(params, state, window):
        def body(carry, g):
            p, s = carry
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), window)[0]

    return run


@functools.cache
def _torch_reference(hyper):
    """The uninterrupted 200-step PyTorch run, and its state after 100 steps."""
    params, grads = _problem(0)
    kwargs = _torch_kwargs(**TORCH_HYPERS[hyper])
    whole, _ = _torch_run(params, grads, BEFORE + AFTER, **kwargs)
    half, opt = _torch_run(params, grads, BEFORE, **kwargs)
    return whole, half, opt.state_dict()


@functools.cache
def _keras_reference(hyper, weight_decay=None):
    """The uninterrupted 200-step Keras run, and its optimizer after 100 steps."""
    params, grads = _problem(1)
    kwargs = _keras_kwargs(**KERAS_HYPERS[hyper], weight_decay=weight_decay)
    exclude = ["b"] if weight_decay else None
    variables, opt = _keras_build(params, exclude, **kwargs)
    half = _keras_steps(variables, opt, grads, BEFORE)
    moments = ([np.asarray(m.value) for m in opt._m], [np.asarray(u.value) for u in opt._u])
    whole = _keras_steps(variables, opt, grads, AFTER, start=BEFORE)
    # `opt` has gone on: rebuild its state after 100 steps for the tests.
    _, at_half = _keras_build(half, exclude, **kwargs)
    at_half.iterations.assign(BEFORE)
    for var, value in zip([*at_half._m, *at_half._u], [*moments[0], *moments[1]], strict=True):
        var.assign(value)
    return whole, half, at_half


def _config(optimizer):
    # Keras' get_config reads its rate through `__array__`, which NumPy 2 deprecates.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return optimizer.get_config()


# ---------------------------------------------------------------------------------------
# PyTorch


@pytest.mark.parametrize("hyper", list(TORCH_HYPERS))
def test_torch_run_continues_in_jax(hyper):
    h = TORCH_HYPERS[hyper]
    _, grads = _problem(0)
    whole, half, state_dict = _torch_reference(hyper)
    opt = ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"], eps_mode="inside_max")
    state = ax.convert_state(state_dict, opt, [jnp.asarray(p) for p in half])
    assert int(ax.adamax_state(state).count) == BEFORE
    for got, want in zip(ax.first_moment(state), state_dict["state"].values(), strict=True):
        np.testing.assert_array_equal(got, want["exp_avg"].numpy())
    for got, want in zip(ax.infinity_norm(state), state_dict["state"].values(), strict=True):
        np.testing.assert_array_equal(got, want["exp_inf"].numpy())
    moved, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL
    cold, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE)
    assert _deviation(cold, whole) > COLD


def test_torch_optimizer_itself_converts_as_its_state_dict():
    params, grads = _problem(0)
    _, torch_opt = _torch_run(params, grads, 3, foreach=True)
    opt = ax.adamax(eps_mode="inside_max")
    leaves = [jnp.asarray(p) for p in params]
    a = ax.convert_state(torch_opt, opt, leaves)
    b = ax.convert_state(torch_opt.state_dict(), opt, leaves)
    for read in (ax.first_moment, ax.infinity_norm):
        for x, y in zip(read(a), read(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("hyper", list(TORCH_HYPERS))
def test_jax_run_continues_in_torch(hyper, foreach):
    h = TORCH_HYPERS[hyper]
    params, grads = _problem(0)
    whole, _, _ = _torch_reference(hyper)
    opt = ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"], eps_mode="inside_max")
    half, state = _jax_run(opt, params, grads, BEFORE)
    kwargs = _torch_kwargs(**h, foreach=foreach)
    _, fresh = _torch_run(half, grads, 0, **kwargs)
    moved, _ = _torch_run(
        half,
        grads,
        AFTER,
        start=BEFORE,
        state_dict=ax.to_torch_state_dict(state, opt, fresh),
        **kwargs,
    )
    assert _deviation(moved, whole) <= RTOL
    cold, _ = _torch_run(half, grads, AFTER, start=BEFORE, **kwargs)
    assert _deviation(cold, whole) > COLD


def test_complex_parameters_as_torch_stores_them():
    # PyTorch runs AdaMax on view_as_real: complex_mode="split", moments complex.
    params, grads = _problem(2, dtype=np.complex64)
    whole, _ = _torch_run(params, grads, BEFORE + AFTER)
    half, torch_opt = _torch_run(params, grads, BEFORE)
    leaves = [jnp.asarray(p) for p in half]
    with pytest.raises(ValueError, match="complex_mode"):
        ax.convert_state(torch_opt, ax.adamax(eps_mode="inside_max"), leaves)
    opt = ax.adamax(eps_mode="inside_max", complex_mode="split")
    state = ax.convert_state(torch_opt, opt, leaves)
    moved, state_after = _jax_run(opt, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL
    cold, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE)
    assert _deviation(cold, whole) > COLD
    # And back: the complex moments load into PyTorch as they are.
    _, half_state = _jax_run(opt, params, grads, BEFORE)
    _, fresh = _torch_run(half, grads, 0)
    back, _ = _torch_run(
        half,
        grads,
        AFTER,
        start=BEFORE,
        state_dict=ax.to_torch_state_dict(half_state, opt, fresh),
    )
    assert _deviation(back, whole) <= RTOL


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_maximize_and_coupled_weight_decay_go_through_the_building_block(weight_decay):
    h = TORCH_HYPERS["default"]
    params, grads = _problem(3)
    kwargs = _torch_kwargs(**h, maximize=True, weight_decay=weight_decay)
    whole, _ = _torch_run(params, grads, BEFORE + AFTER, **kwargs)
    half, torch_opt = _torch_run(params, grads, BEFORE, **kwargs)
    leaves = [jnp.asarray(p) for p in half]
    # No alias negates the gradient or adds L2 to it: refused, naming both.
    with pytest.raises(ValueError, match="`maximize` is True") as refusal:
        ax.convert_state(torch_opt, ax.adamax(h["lr"], eps_mode="inside_max"), leaves)
    assert ("`weight_decay` is 0.01" in str(refusal.value)) == bool(weight_decay)
    # docs/porting.md's chain hides its hyperparameters: refused, saying how to go on ...
    inner = ax.scale_by_adamax(h["b1"], h["b2"], h["eps"], eps_mode="inside_max")
    parts = [optax.scale(-1.0), optax.add_decayed_weights(weight_decay)]
    chain = optax.chain(*parts, inner, optax.scale_by_learning_rate(h["lr"]))
    with pytest.raises(ValueError, match="cannot be read.*scale_by_adamax"):
        ax.convert_state(torch_opt, chain, leaves)
    # ... which is to convert into its building block, then into the chain.
    state = ax.convert_state(ax.convert_state(torch_opt, inner, leaves), chain, leaves)
    moved, state = _jax_run(chain, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL
    # The way back takes the building block as `opt` as well.
    sd = ax.to_torch_state_dict(state, inner, torch_opt)
    assert float(sd["state"][0]["step"]) == BEFORE + AFTER
    with pytest.raises(ValueError, match="cannot be read"):
        ax.to_torch_state_dict(state, chain, torch_opt)


def test_learning_rate_schedule_goes_on_from_the_step_count():
    # PyTorch's ExponentialLR, stepped after each step, is optax's exponential_decay with
    # transition_steps=1; the schedule's clock must go on from 100, not restart at 0.
    h, gamma = TORCH_HYPERS["default"], 0.99
    params, grads = _problem(4)
    kwargs = _torch_kwargs(**h)

    def schedule(o):
        return torch.optim.lr_scheduler.ExponentialLR(o, gamma)

    whole, _ = _torch_run(params, grads, BEFORE + AFTER, scheduler=schedule, **kwargs)
    half, torch_opt = _torch_run(params, grads, BEFORE, scheduler=schedule, **kwargs)
    leaves = [jnp.asarray(p) for p in half]
    rate = optax.exponential_decay(h["lr"], transition_steps=1, decay_rate=gamma)
    opt = ax.adamax(rate, eps_mode="inside_max")
    moved, _ = _jax_run(
        opt, half, grads, AFTER, start=BEFORE, state=ax.convert_state(torch_opt, opt, leaves)
    )
    assert _deviation(moved, whole) <= RTOL
    # The constant rate PyTorch started from is not the one it has come to.
    with pytest.raises(ValueError, match=r"`lr` is 0\.000732.* `learning_rate` is 0\.002"):
        ax.convert_state(torch_opt, ax.adamax(h["lr"], eps_mode="inside_max"), leaves)
    # optax.inject_hyperparams hides the hyperparameters: the refusal gives the way that
    # carries the step count to its clock as well (converting twice alone restarts it at 0).
    injected = optax.inject_hyperparams(ax.adamax)(learning_rate=rate, eps_mode="inside_max")
    recipe = (
        r"`convert_state\(\(inner, optax\.ScaleByScheduleState\(adamax_state\(inner\)\.count\)\)"
    )
    with pytest.raises(ValueError, match=recipe):
        ax.convert_state(torch_opt, injected, leaves)
    inner = ax.convert_state(torch_opt, ax.scale_by_adamax(eps_mode="inside_max"), leaves)
    clock = optax.ScaleByScheduleState(ax.adamax_state(inner).count)
    state = ax.convert_state((inner, clock), injected, leaves)
    assert int(state.count) == BEFORE
    moved, _ = _jax_run(injected, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL


def _torch_at_step(step, lr=1e-3):
    """A one-parameter torch.optim.Adamax state_dict, its step count set to `step`."""
    weights = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.Adamax(weights, lr=lr)
    weights[0].grad = torch.ones(3)
    optimizer.step()
    state_dict = optimizer.state_dict()
    state_dict["state"][0]["step"] = torch.tensor(float(step))
    return state_dict


@pytest.mark.parametrize("step", [1, 1_000_000, 10_000_000])
def test_a_schedule_is_held_to_a_fixed_tolerance_at_any_step_count(step):
    # A constant schedule does not drift with the count: 5 % more, or twice the rate, is
    # refused at every count, as a plain float is; the rate itself is taken.
    state_dict = _torch_at_step(step)
    for rate in (1.05e-3, 2e-3):
        opt = ax.adamax(optax.constant_schedule(rate), eps_mode="inside_max")
        with pytest.raises(ValueError, match=r"`lr` is 0\.001 in PyTorch.*at count"):
            ax.convert_state(state_dict, opt, [jnp.ones(3)])
    opt = ax.adamax(optax.constant_schedule(1e-3), eps_mode="inside_max")
    assert int(ax.adamax_state(ax.convert_state(state_dict, opt, [jnp.ones(3)])).count) == step


def test_an_exponential_decay_is_compared_as_each_framework_computes_it():
    # A million steps of a decay rate of 0.999999: optax's schedule, computed in float32
    # (a power of the rounded rate), is 1.3 % below the exact rate. PyTorch's ExponentialLR
    # multiplies in float64 and lands on the exact one; Keras' ExponentialDecay computes
    # in float32 as optax does. Both are taken, and 1 % off either is not.
    count, gamma = 1_000_000, 0.999999
    rate = optax.exponential_decay(2e-3, transition_steps=1, decay_rate=gamma)
    opt = ax.adamax(rate, eps_mode="inside_max")
    lr = 2e-3
    for _ in range(count):  # ExponentialLR's steps
        lr *= gamma
    in_float32 = float(rate(jnp.asarray(count, jnp.int32)))
    assert abs(in_float32 / lr - 1) > 0.01  # the drift a fixed tolerance must not absorb
    state_dict = _torch_at_step(count)
    for taken in (lr, in_float32):
        state_dict["param_groups"][0]["lr"] = taken
        state = ax.convert_state(state_dict, opt, [jnp.ones(3)])
        assert int(ax.adamax_state(state).count) == count
    for off in (lr * 1.01, in_float32 * 0.99):
        state_dict["param_groups"][0]["lr"] = off
        with pytest.raises(ValueError, match=r"0\.000735758.*; 0\.000726053.* in float32"):
            ax.convert_state(state_dict, opt, [jnp.ones(3)])
    schedule = keras.optimizers.schedules.ExponentialDecay(2e-3, 1, gamma)
    _, keras_opt = _keras_build(
        [np.ones(3, np.float32), np.ones(2, np.float32)], learning_rate=schedule
    )
    keras_opt.iterations.assign(count)
    leaves = [jnp.ones(3), jnp.ones(2)]
    state = ax.convert_state(keras_opt, ax.adamax(rate, eps=1e-7), leaves)
    assert int(ax.adamax_state(state).count) == count


def test_a_step_count_past_int32_saturates_with_a_schedule_too():
    # The state's count saturates at the int32 maximum, and so does the schedule's clock:
    # the schedule is read there, not at a count int32 cannot hold.
    state_dict = _torch_at_step(3_000_000_000)
    opt = ax.adamax(optax.constant_schedule(1e-3), eps_mode="inside_max")
    state = ax.convert_state(state_dict, opt, [jnp.ones(3)])

    def is_clock(x):
        return isinstance(x, optax.ScaleByScheduleState)

    clocks = [x for x in jax.tree.leaves(state, is_leaf=is_clock) if is_clock(x)]
    assert int(ax.adamax_state(state).count) == np.iinfo(np.int32).max
    assert [int(c.count) for c in clocks] == [np.iinfo(np.int32).max]


def _one_cycle(o):
    return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-3, total_steps=10)


def _cyclic(o):
    return torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=2e-3, step_size_up=4)


@pytest.mark.parametrize("scheduler", [_one_cycle, _cyclic], ids=["OneCycleLR", "CyclicLR"])
def test_cyclic_schedulers_bookkeeping_is_taken_both_ways(scheduler):
    # OneCycleLR and CyclicLR keep the bounds of the rate (`max_lr`, `min_lr`) and, with
    # cycle_momentum (their default), of β₁ (`base_momentum`, `max_momentum`) in each param
    # group; the step reads only `lr` and `betas`, which are checked as they are now.
    params, grads = _problem(8, shapes=((3,),), steps=3)
    _, optimizer = _torch_run(params, grads, 3, scheduler=scheduler)
    group = optimizer.param_groups[0]
    assert {"max_momentum", "base_momentum"} <= set(group)
    b1 = group["betas"][0]
    assert b1 != 0.9  # cycled: `opt` must have β₁ as it is now
    opt = ax.adamax(group["lr"], b1, eps_mode="inside_max")
    leaves = [jnp.asarray(p) for p in params]
    state = ax.convert_state(optimizer, opt, leaves)
    assert int(ax.adamax_state(state).count) == 3
    with pytest.raises(ValueError, match=r"`betas\[0\]` is 0\.\d+ in PyTorch, `b1` is 0\.9 "):
        ax.convert_state(optimizer, ax.adamax(group["lr"], eps_mode="inside_max"), leaves)
    optimizer.load_state_dict(ax.to_torch_state_dict(opt.init(leaves), opt, optimizer))
    assert float(next(iter(optimizer.state.values()))["step"]) == 0.0


def test_an_unknown_group_key_on_the_way_out_names_the_optimizer():
    optimizer, leaves = _stepped_torch()
    optimizer.param_groups[0]["custom"] = 1
    opt = ax.adamax(2e-3, eps_mode="inside_max")
    with pytest.raises(ValueError, match=r"Param group 0 of `optimizer` holds \['custom'\]"):
        ax.to_torch_state_dict(opt.init(leaves), opt, optimizer)
    with pytest.raises(ValueError, match=r"Param group 0 of the PyTorch optimizer holds"):
        ax.convert_state(optimizer, opt, leaves)


def test_complex_parameters_ported_as_real_pairs_take_any_complex_mode():
    # A complex PyTorch parameter ported as real (..., 2) pairs (view_as_real), its moments
    # with it: on real parameters complex_mode changes nothing, so every mode converts, and
    # the state goes back into PyTorch's complex moments as it came.
    param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    optimizer = torch.optim.Adamax([param])
    param.grad = torch.randn(3, dtype=torch.complex64)
    optimizer.step()

    def from_torch(ps):
        return [np.stack([ps[0].real, ps[0].imag], -1)]

    def to_torch(tree):
        return [jax.lax.complex(tree[0][..., 0], tree[0][..., 1])]

    leaves = [jnp.asarray(torch.view_as_real(param.detach()).numpy())]
    split = ax.adamax(eps_mode="inside_max", complex_mode="split")
    want = ax.convert_state((optimizer, from_torch), split, leaves)
    opt = ax.adamax(eps_mode="inside_max")  # complex_mode="modulus"
    state = ax.convert_state((optimizer, from_torch), opt, leaves)
    for read in (ax.first_moment, ax.infinity_norm):
        np.testing.assert_array_equal(read(state)[0], read(want)[0])
    back = ax.to_torch_state_dict(state, opt, optimizer, order=to_torch)
    for key in ("exp_avg", "exp_inf"):
        np.testing.assert_array_equal(back["state"][0][key], optimizer.state[param][key].numpy())


def test_convolution_kernel_moves_with_its_layout():
    # PyTorch keeps a convolution kernel as OIHW, flax as HWIO: mapped by position the
    # shapes differ, and the error names both; the function that ports the parameters
    # moves the state with them, both ways.
    params, grads = _problem(5, shapes=((4, 3, 3, 3), (4,)))
    whole, _ = _torch_run(params, grads, BEFORE + AFTER)
    half, torch_opt = _torch_run(params, grads, BEFORE)

    def from_torch(ps):
        return {"kernel": ps[0].transpose(2, 3, 1, 0), "bias": ps[1]}

    def to_torch(tree):
        return [tree["kernel"].transpose(3, 2, 0, 1), tree["bias"]]

    flax = jax.tree.map(jnp.asarray, from_torch(half))
    opt = ax.adamax(eps_mode="inside_max")
    with pytest.raises(
        ValueError,
        match=r"parameter 0 has shape \(4, 3, 3, 3\).*`params`\[0\], has shape \(3, 3, 3, 4\)",
    ):
        ax.convert_state(torch_opt, opt, [flax["kernel"], flax["bias"]])
    state = ax.convert_state((torch_opt, from_torch), opt, flax)
    # The gradients move as the parameters do (a leading axis of steps).
    steps = {"kernel": grads[0].transpose(0, 3, 4, 2, 1), "bias": grads[1]}
    moved, state = _jax_run(opt, flax, steps, AFTER, start=BEFORE, state=state)
    assert _deviation(to_torch(moved), whole) <= RTOL
    # Back to PyTorch with the inverse function: the state PyTorch holds after 200 steps.
    _, torch_whole = _torch_run(params, grads, BEFORE + AFTER)
    back = ax.to_torch_state_dict(state, opt, torch_whole, order=to_torch)
    want_state = torch_whole.state_dict()["state"].values()
    for got, want in zip(back["state"].values(), want_state, strict=True):
        for key in ("exp_avg", "exp_inf"):
            np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=RTOL, atol=0)
    with pytest.raises(ValueError, match=r"has shape \(3, 3, 3, 4\).*parameter 0"):
        ax.to_torch_state_dict(state, opt, torch_whole, order=lambda t: [t["kernel"], t["bias"]])


# Storage dtypes on the receiving side: (mu_dtype, nu_dtype, the relative spacing of its
# codes, which bounds how far a stored moment reads back from the value it was given).
# 16-bit: one unit in the last place (bfloat16 2^-7, float16 2^-10, normal values).
# 8-bit (docs/low_precision_8bit.md): int8 codes are up to 20 % apart, uint8 7.1 %,
# float8_e4m3fn 12.5 % (3 mantissa bits); values far below their block's largest round to
# the map's smallest code, so an absolute term of the same fraction of the largest is allowed.
STORAGE = {
    "float32": (jnp.float32, jnp.float32, 0.0),
    "bfloat16": (jnp.bfloat16, jnp.bfloat16, 2.0**-7),
    "float16": (jnp.float16, jnp.float16, 2.0**-10),
    "int8-uint8": (jnp.int8, jnp.uint8, 0.2),
    "int8": (jnp.int8, jnp.int8, 0.2),
    "float8_e4m3fn": (jnp.float8_e4m3fn, jnp.float8_e4m3fn, 0.125),
}


@pytest.mark.parametrize("storage", list(STORAGE))
def test_every_storage_dtype_receives_a_torch_state(storage):
    mu_dtype, nu_dtype, spacing = STORAGE[storage]
    # 64 x 64 = 4096 values: the smallest leaf kept in 8 bits.
    params, grads = _problem(6, shapes=((64, 64), (64,)), steps=BEFORE + 20)
    whole, _ = _torch_run(params, grads, BEFORE + 20)
    half, torch_opt = _torch_run(params, grads, BEFORE)
    leaves = [jnp.asarray(p) for p in half]
    opt = ax.adamax(eps_mode="inside_max", mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    state = ax.convert_state(torch_opt, opt, leaves)
    per_param = list(torch_opt.state_dict()["state"].values())
    for got, want in zip(ax.first_moment(state), per_param, strict=True):
        m = want["exp_avg"].numpy()
        np.testing.assert_allclose(got, m, rtol=spacing, atol=spacing * np.max(np.abs(m)))
    for got, want in zip(ax.infinity_norm(state), per_param, strict=True):
        u, got = want["exp_inf"].numpy(), np.asarray(got)
        np.testing.assert_allclose(got, u, rtol=spacing, atol=spacing * np.max(u))
        if storage != "float32":
            # ν rounds up: it never reads back below the norm it was given.
            assert np.all(got >= u * (1 - 2.0**-24)), storage
    # It goes on sensibly. A cold restart loses all of m and u; the stored state at most
    # its codes' spacing of them, so over 20 steps it lands that much closer (or 10 times,
    # for the finer storage) to PyTorch's run.
    moved, _ = _jax_run(opt, half, grads, 20, start=BEFORE, state=state)
    cold, _ = _jax_run(opt, half, grads, 20, start=BEFORE)
    assert _deviation(moved, whole) < max(spacing, 0.1) * _deviation(cold, whole)
    if storage == "float32":
        assert _deviation(moved, whole) <= RTOL
    # And it goes back out as it reads.
    back = ax.to_torch_state_dict(state, opt, torch_opt)
    for got, want in zip(back["state"].values(), ax.first_moment(state), strict=True):
        np.testing.assert_array_equal(got["exp_avg"].numpy(), np.asarray(want))


def test_bfloat16_parameters_convert_from_bfloat16_torch():
    params, grads = _problem(7, steps=BEFORE)
    tensors = [torch.nn.Parameter(torch.from_numpy(p).to(torch.bfloat16)) for p in params]
    torch_opt = torch.optim.Adamax(tensors)
    for i in range(BEFORE):
        for t, g in zip(tensors, grads, strict=True):
            t.grad = torch.from_numpy(g[i]).to(torch.bfloat16)
        torch_opt.step()
    leaves = [jnp.asarray(t.detach().float().numpy()).astype(jnp.bfloat16) for t in tensors]
    state = ax.convert_state(torch_opt, ax.adamax(eps_mode="inside_max"), leaves)
    for got, t in zip(ax.infinity_norm(state), tensors, strict=True):
        u = torch_opt.state[t]["exp_inf"].float().numpy()
        # A bfloat16 ν is kept scaled, and rounds up: within one bfloat16 unit above u.
        assert np.all(np.asarray(got) >= u) and np.all(np.asarray(got) <= u * (1 + 2.0**-7))


# ---------------------------------------------------------------------------------------
# Keras


@pytest.mark.parametrize("hyper", list(KERAS_HYPERS))
def test_keras_run_continues_in_jax_and_back(hyper):
    h = KERAS_HYPERS[hyper]
    _, grads = _problem(1)
    whole, half, keras_opt = _keras_reference(hyper)
    opt = ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"])
    leaves = [jnp.asarray(p) for p in half]
    state = ax.convert_state(keras_opt, opt, leaves)
    assert int(ax.adamax_state(state).count) == BEFORE
    moved, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL
    cold, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE)
    assert _deviation(cold, whole) > COLD
    # Its variables and config convert as the optimizer does.
    variables = {
        "iterations": keras_opt.iterations,
        "momentums": [np.asarray(m.value) for m in keras_opt._m],
        "norms": [np.asarray(u.value) for u in keras_opt._u],
        "config": _config(keras_opt),
    }
    same = ax.convert_state(variables, opt, leaves)
    for read in (ax.first_moment, ax.infinity_norm):
        for x, y in zip(read(same), read(state), strict=True):
            np.testing.assert_array_equal(x, y)
    # And back: JAX's state after 100 steps, in a fresh Keras optimizer, goes on as Keras.
    params, _ = _problem(1)
    jax_half, jax_state = _jax_run(opt, params, grads, BEFORE)
    variables, fresh = _keras_build(jax_half, **_keras_kwargs(**h))
    ax.assign_to_keras(jax_state, opt, fresh)
    assert int(np.asarray(fresh.iterations.value)) == BEFORE
    back = _keras_steps(variables, fresh, grads, AFTER, start=BEFORE)
    assert _deviation(back, whole) <= RTOL


def test_keras_weight_decay_is_adamaxw_with_its_exclusions():
    h = KERAS_HYPERS["default"]
    _, grads = _problem(1)
    whole, half, keras_opt = _keras_reference("default", weight_decay=0.05)
    leaves = [jnp.asarray(p) for p in half]
    hypers = (h["lr"], h["b1"], h["b2"], h["eps"])
    # Keras leaves out "b" (exclude_from_weight_decay); a mask that decays it is refused.
    with pytest.raises(ValueError, match=r"decay different parameters: `params`\[1\]"):
        ax.convert_state(keras_opt, ax.adamaxw(*hypers, weight_decay=0.05), leaves)
    with pytest.raises(ValueError, match="`weight_decay` is 0.05 in Keras"):
        ax.convert_state(keras_opt, ax.adamax(*hypers), leaves)
    opt = ax.adamaxw(*hypers, weight_decay=0.05, mask=[True, False])
    state = ax.convert_state(keras_opt, opt, leaves)
    moved, _ = _jax_run(opt, half, grads, AFTER, start=BEFORE, state=state)
    assert _deviation(moved, whole) <= RTOL
    # And back, with the mask checked the same way: JAX's first 100 steps, then Keras'.
    params, _ = _problem(1)
    jax_half, jax_state = _jax_run(opt, params, grads, BEFORE)
    kwargs = _keras_kwargs(**h, weight_decay=0.05)
    variables, fresh = _keras_build(jax_half, ["b"], **kwargs)
    with pytest.raises(ValueError, match=r"variable 1 \('b'\) \(does not decay in Keras\)"):
        ax.assign_to_keras(jax_state, ax.adamaxw(*hypers, weight_decay=0.05), fresh)
    ax.assign_to_keras(jax_state, opt, fresh)
    back = _keras_steps(variables, fresh, grads, AFTER, start=BEFORE)
    assert _deviation(back, whole) <= RTOL


def test_keras_order_is_mapped_by_the_porting_function():
    h = KERAS_HYPERS["default"]
    _, grads = _problem(1)
    whole, half, keras_opt = _keras_reference("default")
    params = {"kernel": jnp.asarray(half[0]), "bias": jnp.asarray(half[1])}
    opt = ax.adamax(h["lr"], h["b1"], h["b2"], h["eps"])
    # Sorted keys put the bias first: by position, Keras' kernel meets the bias.
    with pytest.raises(ValueError, match=r"variable 0 \('w'\) has shape \(8, 8\).*\['bias'\]"):
        ax.convert_state(keras_opt, opt, params)
    state = ax.convert_state((keras_opt, lambda v: {"kernel": v[0], "bias": v[1]}), opt, params)
    steps = {"kernel": grads[0], "bias": grads[1]}
    moved, _ = _jax_run(opt, params, steps, AFTER, start=BEFORE, state=state)
    assert _deviation([moved["kernel"], moved["bias"]], whole) <= RTOL


def test_keras_moving_average_of_the_weights_is_refused_both_ways():
    # With use_ema, Keras keeps a moving average of the weights and `fit` ends by writing it
    # into them: it is not carried, so it is refused, saying how to go on without it.
    params = [np.ones(3, np.float32), np.ones(2, np.float32)]
    leaves = [jnp.asarray(p) for p in params]
    opt = ax.adamax(1e-3, eps=1e-7)
    for every in (None, 10):
        _, keras_opt = _keras_build(params, use_ema=True, ema_overwrite_frequency=every)
        keras_opt.iterations.assign(3)
        with pytest.raises(ValueError, match=r"`use_ema` is True in Keras.*`use_ema` to False"):
            ax.convert_state(keras_opt, opt, leaves)
        variables = {
            "iterations": 3,
            "momentums": [np.asarray(m.value) for m in keras_opt._m],
            "norms": [np.asarray(u.value) for u in keras_opt._u],
            "config": _config(keras_opt),
        }
        with pytest.raises(ValueError, match=r"`use_ema` is True in Keras"):
            ax.convert_state(variables, opt, leaves)
        with pytest.raises(ValueError, match=r"`use_ema` is True in Keras"):
            ax.assign_to_keras(opt.init(leaves), opt, keras_opt)
        keras_opt.use_ema = False  # the way on, without the average
        assert int(ax.adamax_state(ax.convert_state(keras_opt, opt, leaves)).count) == 3
        ax.assign_to_keras(opt.init(leaves), opt, keras_opt)
        variables["config"]["use_ema"] = False
        ax.convert_state(variables, opt, leaves)


def test_keras_loss_scale_optimizer_is_its_inner_optimizer():
    # A LossScaleOptimizer steps its inner Adamax with the unscaled gradients, and a step
    # skipped for a non-finite gradient is not one of the inner `iterations`: the AdaMax
    # state is the inner optimizer's, both ways. The loss scale is not carried.
    variables = [keras.Variable(np.ones(3, np.float32))]
    keras_opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adamax())
    keras_opt.build(variables)
    scale = float(keras_opt.dynamic_scale.value)
    at = [i for i, v in enumerate(keras_opt.variables) if v is keras_opt.dynamic_scale][0]
    values, trainable = [v.value for v in keras_opt.variables], [variables[0].value]
    step = jax.jit(keras_opt.stateless_apply)  # as Keras' JAX trainer steps
    with jax.numpy_dtype_promotion("standard"):  # Keras mixes dtypes in its own update
        for g in (1.0, np.inf, 1.0):  # the second is skipped, and halves the scale
            g = jnp.full(3, g * scale, jnp.float32)
            trainable, values = step(values, [g], trainable)
            scale = float(values[at])
    for var, value in zip(keras_opt.variables, values, strict=True):
        var.assign(value)
    opt = ax.adamax(1e-3, eps=1e-7)
    state = ax.convert_state(keras_opt, opt, [jnp.ones(3)])
    assert int(ax.adamax_state(state).count) == 2
    np.testing.assert_allclose(ax.first_moment(state)[0], 0.19, rtol=1e-6)
    np.testing.assert_array_equal(ax.infinity_norm(state)[0], 1.0)
    # Its variables with its config convert the same way.
    inner = keras_opt.inner_optimizer
    given = {
        "iterations": inner.iterations,
        "momentums": [np.asarray(m.value) for m in inner._m],
        "norms": [np.asarray(u.value) for u in inner._u],
        "config": _config(keras_opt),
    }
    same = ax.convert_state(given, opt, [jnp.ones(3)])
    np.testing.assert_array_equal(ax.first_moment(same)[0], ax.first_moment(state)[0])
    # And the way back writes the inner optimizer's state.
    _, step = opt.update([jnp.full(3, 0.5)], opt.init([jnp.ones(3)]), [jnp.ones(3)])
    ax.assign_to_keras(step, opt, keras_opt)
    assert int(np.asarray(inner.iterations.value)) == 1
    np.testing.assert_array_equal(np.asarray(inner._u[0].value), 0.5)


# ---------------------------------------------------------------------------------------
# Refusals: each names what differs


def _stepped_torch(cls=torch.optim.Adamax, params=None, steps=2, groups=None, **kwargs):
    params = params if params is not None else _problem(8, steps=steps)[0]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = cls(groups(tensors) if groups else tensors, **kwargs)
    for _ in range(steps):
        for t in tensors:
            t.grad = torch.ones_like(t)
        opt.step()
    return opt, [jnp.asarray(t.detach().numpy()) for t in tensors]


TORCH_OPT = ax.adamax(2e-3, eps_mode="inside_max")


def _adam_state():
    opt, leaves = _stepped_torch(torch.optim.Adam)
    return opt.state_dict(), TORCH_OPT, leaves


def _adam_state_in_adamax_groups():
    # Adam's per-parameter state under groups that look like Adamax's.
    opt, leaves = _stepped_torch(torch.optim.Adam)
    state_dict = opt.state_dict()
    for group in state_dict["param_groups"]:
        for key in ("amsgrad", "decoupled_weight_decay", "fused"):
            group.pop(key, None)
    return state_dict, TORCH_OPT, leaves


def _adam_optimizer():
    opt, leaves = _stepped_torch(torch.optim.Adam)
    return opt, TORCH_OPT, leaves


def _one_leaf_missing():
    opt, leaves = _stepped_torch()
    return opt, TORCH_OPT, leaves[:1]


def _one_leaf_too_many():
    opt, leaves = _stepped_torch()
    return opt, TORCH_OPT, [*leaves, jnp.ones(3)]


def _one_parameter_never_stepped():
    params = _problem(8)[0]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = torch.optim.Adamax(tensors)
    tensors[0].grad = torch.ones_like(tensors[0])  # the bias has no gradient
    opt.step()
    return opt, TORCH_OPT, [jnp.asarray(p) for p in params]


def _named_parameters_in_another_order():
    # Optimizers built from named_parameters() keep the names: the error gives them.
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    opt = torch.optim.Adamax(model.named_parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return opt, TORCH_OPT, {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}


def _float64_against_float32():
    params = [p.astype(np.float64) for p in _problem(8)[0]]
    opt, _ = _stepped_torch(params=params)
    return opt, TORCH_OPT, [jnp.asarray(p, jnp.float32) for p in params]


def _parameter_cast_after_its_moments():
    # `p.data = p.data.half()` after PyTorch made its float32 moments.
    opt, _ = _stepped_torch()
    for group in opt.param_groups:
        for p in group["params"]:
            p.data = p.data.half()
    params = [p for g in opt.param_groups for p in g["params"]]
    return opt, TORCH_OPT, [jnp.asarray(p.detach().numpy()) for p in params]


def _groups_with_other_betas():
    opt, leaves = _stepped_torch(
        groups=lambda ts: [{"params": ts[:1]}, {"params": ts[1:], "betas": (0.9, 0.99)}]
    )
    return opt, TORCH_OPT, leaves


def _other_learning_rate():
    opt, leaves = _stepped_torch(lr=1e-3)
    return opt, TORCH_OPT, leaves


def _other_eps_mode():
    opt, leaves = _stepped_torch()
    return opt, ax.adamax(2e-3), leaves


def _nadamax():
    opt, leaves = _stepped_torch()
    return opt, ax.nadamax(2e-3, eps_mode="inside_max"), leaves


def _adamaxw():
    opt, leaves = _stepped_torch()
    return opt, ax.adamaxw(2e-3, eps_mode="inside_max", weight_decay=1e-2), leaves


def _steps_differ():
    opt, leaves = _stepped_torch()
    state_dict = opt.state_dict()
    state_dict["state"][1]["step"] = torch.tensor(1.0)
    return state_dict, TORCH_OPT, leaves


def _chain():
    opt, leaves = _stepped_torch()
    return opt, optax.chain(ax.scale_by_adamax(eps_mode="inside_max"), optax.scale(-2e-3)), leaves


def _keras_adam():
    variables = [keras.Variable(np.ones(3, np.float32))]
    opt = keras.optimizers.Adam()
    opt.build(variables)
    return opt, ax.adamax(1e-3, eps=1e-7), [jnp.ones(3)]


def _keras_unbuilt():
    return keras.optimizers.Adamax(), ax.adamax(1e-3, eps=1e-7), [jnp.ones(3)]


def _keras_without_config():
    return (
        {"iterations": 3, "momentums": [np.ones(3)], "norms": [np.ones(3)]},
        ax.adamax(1e-3, eps=1e-7),
        [jnp.ones(3)],
    )


def _keras_other_beta():
    _, opt = _keras_build([np.ones(3, np.float32), np.ones(2, np.float32)], beta_2=0.99)
    return opt, ax.adamax(1e-3, eps=1e-7), [jnp.ones(3), jnp.ones(2)]


def _keras_clipnorm():
    _, opt = _keras_build([np.ones(3, np.float32), np.ones(2, np.float32)], clipnorm=1.0)
    return opt, ax.adamax(1e-3, eps=1e-7), [jnp.ones(3), jnp.ones(2)]


BAD = {
    "torch-adam": (_adam_state, r"holds \['amsgrad', .*: another optimizer's.*Adam"),
    "torch-adam-state": (
        _adam_state_in_adamax_groups,
        r"holds \['exp_avg', 'exp_avg_sq', 'step'\], not torch\.optim\.Adamax's",
    ),
    "torch-adam-optimizer": (_adam_optimizer, r"torch\.optim\.adam\.Adam, not a torch"),
    "missing-leaf": (_one_leaf_missing, r"parameter 1 \(shape \(8,\)\) maps to no leaf"),
    "extra-leaf": (_one_leaf_too_many, r"no parameter of it maps to `params`\[2\]"),
    "named-shape": (
        _named_parameters_in_another_order,
        r"parameter 0 \('0\.weight'\) has shape \(3, 2\).*`params`\['dense'\]\['bias'\], has "
        r"shape \(3,\)",
    ),
    "missing-state": (
        _one_parameter_never_stepped,
        r"no state for parameter 1 .*one step count.*leave it out: convert a state_dict whose "
        r"param groups do not list it",
    ),
    "dtype": (
        _float64_against_float32,
        r"moments of its parameter 0 in float64, but `params`\[0\] is float32.*"
        r"jax_enable_x64.*`from_list` that casts",
    ),
    "dtype-cast-since": (
        _parameter_cast_after_its_moments,
        r"moments of its parameter 0 in float32 \(the parameter itself is float16 now\), but "
        r"`params`\[0\] is float16",
    ),
    "groups-betas": (
        _groups_with_other_betas,
        r"groups 0 and 1 of the PyTorch optimizer differ in `betas\[1\]` \(0\.999 against 0\.99\)",
    ),
    "lr": (_other_learning_rate, r"`lr` is 0\.001 in PyTorch, `learning_rate` is 0\.002"),
    "eps-mode": (_other_eps_mode, r"eps_mode='inside_max'`, `opt` has `eps_mode='denominator'"),
    "nadamax": (_nadamax, r"NadaMax"),
    "adamaxw": (_adamaxw, r"decoupled `weight_decay` 0\.01, PyTorch has none"),
    "steps-differ": (_steps_differ, r"parameter 0: 2, parameter 1: 1"),
    "chain": (_chain, r"hyperparameters of `opt` cannot be read"),
    "keras-adam": (_keras_adam, r"Adam, not a keras\.optimizers\.Adamax"),
    "keras-unbuilt": (_keras_unbuilt, r"not built"),
    "keras-no-config": (_keras_without_config, r"get_config\(\)"),
    "keras-beta": (_keras_other_beta, r"`beta_2` is 0\.99 in Keras, `b2` is 0\.999"),
    "keras-clipnorm": (_keras_clipnorm, r"`clipnorm` is 1\.0 in Keras"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_naming_what_differs(case):
    make, message = BAD[case]
    state, opt, params = make()
    with pytest.raises(ValueError, match=message):
        ax.convert_state(state, opt, params)


def test_the_ways_on_that_refusals_give_work():
    # A frozen parameter (no state) is left out: the state_dict without it converts.
    optimizer, _, params = _one_parameter_never_stepped()
    state_dict = optimizer.state_dict()
    for group in state_dict["param_groups"]:
        group["params"] = [i for i in group["params"] if i in state_dict["state"]]
    state = ax.convert_state(state_dict, TORCH_OPT, params[:1])
    assert int(ax.adamax_state(state).count) == 1
    # A float64 run goes on in float32 through a `from_list` that casts.
    optimizer, _, params = _float64_against_float32()
    state = ax.convert_state(
        (optimizer, lambda ps: [p.astype(np.float32) for p in ps]), TORCH_OPT, params
    )
    want = next(iter(optimizer.state.values()))["exp_inf"].numpy().astype(np.float32)
    np.testing.assert_array_equal(ax.infinity_norm(state)[0], want)


def test_bad_output_is_refused_naming_what_differs():
    params, _ = _problem(8)
    opt = ax.adamax(2e-3, eps_mode="inside_max")
    state = opt.init([jnp.asarray(p) for p in params])
    other, _ = _stepped_torch(lr=1e-3)
    with pytest.raises(ValueError, match=r"`lr` is 0\.001 in PyTorch"):
        ax.to_torch_state_dict(state, opt, other)
    with pytest.raises(ValueError, match="must be a torch.optim.Adamax"):
        ax.to_torch_state_dict(state, opt, _stepped_torch(torch.optim.Adam)[0])
    short = opt.init([jnp.asarray(params[0])])
    with pytest.raises(ValueError, match=r"parameter 1 of PyTorch gets no moment"):
        ax.to_torch_state_dict(short, opt, _stepped_torch()[0])
    variables, keras_opt = _keras_build(params, beta_1=0.8)
    with pytest.raises(ValueError, match=r"`beta_1` is 0\.8 in Keras"):
        ax.assign_to_keras(state, ax.adamax(1e-3, eps=1e-7), keras_opt)
    # A refusal leaves the Keras optimizer as it was.
    assert int(np.asarray(keras_opt.iterations.value)) == 0
    del variables


# ---------------------------------------------------------------------------------------
# The example


def test_the_example_runs_and_shows_the_spike(capsys):
    from adamax_jax.examples import continue_training

    # The example writes `x @ w + b` as NumPy users do; the suite raises on rank promotion.
    with jax.numpy_rank_promotion("allow"):
        results = continue_training.main(steps=30)
    out = capsys.readouterr().out
    assert "PyTorch" in out and "Keras" in out, out
    for framework in ("torch", "keras"):
        r = results[framework]
        assert r["deviation"] <= RTOL and r["back"] <= RTOL, (framework, r)
        # The converted run keeps descending; a cold restart's loss jumps.
        assert r["warm_peak"] <= r["loss_at_move"], (framework, r)
        assert r["cold_peak"] > 1.2 * r["loss_at_move"], (framework, r)
