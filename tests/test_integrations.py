"""AdaMax inside real training loops: flax.nnx, gradient accumulation, warm-up schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

EPS = 1e-8


def _regression_data(n=128, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d,))
    y = (np.sin(x @ w) + 0.5 * x[:, 0] ** 2).astype(np.float32)[:, None]
    return jnp.asarray(x), jnp.asarray(y)


def _linear_loss(params, x, y):
    pred = x @ params["w"] + params["b"]
    return jnp.mean((pred - y) ** 2)


def _linear_problem(n=64, d=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d,)) + 0.3 + 0.1 * rng.normal(size=n)).astype(np.float32)
    params = {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return params, jnp.asarray(x), jnp.asarray(y)


class TestFlaxNnx:
    @staticmethod
    def _model():
        nnx = pytest.importorskip("flax.nnx")

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.hidden = nnx.Linear(4, 32, rngs=rngs)
                self.out = nnx.Linear(32, 1, rngs=rngs)

            def __call__(self, x):
                return self.out(nnx.relu(self.hidden(x)))

        return nnx, MLP(nnx.Rngs(0))

    @staticmethod
    def _loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    def test_optimizer_trains_a_model(self):
        nnx, model = self._model()
        optimizer = nnx.Optimizer(model, ax.adamax(learning_rate=0.01), wrt=nnx.Param)
        x, y = _regression_data()

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(self._loss)(model, x, y)
            optimizer.update(model, grads)
            return loss

        first = float(self._loss(model, x, y))
        for _ in range(300):
            train_step(model, optimizer, x, y)
        last = float(self._loss(model, x, y))
        assert np.isfinite(last)
        assert last < 0.1 * first, (first, last)
        inner = optimizer.opt_state[0]
        assert isinstance(inner, ax.ScaleByAdamaxState)
        assert int(inner.count[...]) == 300 == int(optimizer.step[...])

    def test_first_update_is_the_adamax_step(self):
        nnx, model = self._model()
        lr = 0.01
        optimizer = nnx.Optimizer(model, ax.adamax(learning_rate=lr), wrt=nnx.Param)
        x, y = _regression_data()
        before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        grads = nnx.grad(self._loss)(model, x, y)
        optimizer.update(model, grads)
        after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
        # At t = 1: m̂ = g and u = |g|, so the step is -α g / (|g| + ε).
        g = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
        expected = jax.tree.map(lambda p, g: p - lr * g / (np.abs(g) + EPS), before, g)
        chex.assert_trees_all_close(after, expected, rtol=1e-6, atol=1e-7)
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != b), after, before))
        assert all(moved)


# optax.MultiSteps promotes its int32 step counter against Python floats, which
# the strict dtype promotion of the test suite rejects.
@pytest.mark.usefixtures("standard_promotion")
class TestGradientAccumulation:
    K = 4

    def _micro_batches(self, x, y):
        n = x.shape[0] // self.K
        return x.reshape(self.K, n, -1), y.reshape(self.K, n)

    def test_multisteps_equals_big_batch_steps(self):
        params, x, y = _linear_problem()
        big = ax.adamax(0.05)
        accumulated = optax.MultiSteps(ax.adamax(0.05), every_k_schedule=self.K)
        xs, ys = self._micro_batches(x, y)

        @jax.jit
        def big_step(params, state):
            grads = jax.grad(_linear_loss)(params, x, y)
            updates, state = big.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        @jax.jit
        def accumulated_steps(params, state):
            def micro(carry, batch):
                params, state = carry
                grads = jax.grad(_linear_loss)(params, *batch)
                updates, state = accumulated.update(grads, state, params)
                return (optax.apply_updates(params, updates), state), params

            (params, state), seen = jax.lax.scan(micro, (params, state), (xs, ys))
            return params, state, seen

        p_big, s_big = params, big.init(params)
        p_acc, s_acc = params, accumulated.init(params)
        for _ in range(5):
            start = p_acc
            p_big, s_big = big_step(p_big, s_big)
            p_acc, s_acc, seen = accumulated_steps(p_acc, s_acc)
            # The parameters stay put until the K-th micro-batch.
            for leaf, first in zip(jax.tree.leaves(seen), jax.tree.leaves(start), strict=True):
                np.testing.assert_array_equal(leaf, np.broadcast_to(first, leaf.shape))
            chex.assert_trees_all_close(p_acc, p_big, rtol=2e-5, atol=2e-6)
        assert int(s_acc.gradient_step) == 5
        assert int(s_acc.inner_opt_state[0].count) == 5
        moved = jax.tree.map(
            lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), p_big, params
        )
        assert min(jax.tree.leaves(moved)) > 0.1

    def test_schedule_advances_once_per_accumulated_step(self):
        schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
        opt = optax.MultiSteps(ax.adamax(schedule), every_k_schedule=self.K)
        param = jnp.zeros((2,), jnp.float32)
        g = jnp.asarray([0.5, -2.0], jnp.float32)
        state = opt.init(param)
        step = jax.jit(opt.update)
        positions = []
        for _ in range(3 * self.K):
            updates, state = step(g, state, param)
            param = optax.apply_updates(param, updates)
            positions.append(np.asarray(param, np.float64))
        # A constant gradient gives the direction g / (|g| + ε) at every step.
        direction = np.asarray(g, np.float64) / (np.abs(np.asarray(g, np.float64)) + EPS)
        lrs = [0.1, 0.075, 0.05]
        for i, lr_sum in enumerate(np.cumsum(lrs)):
            np.testing.assert_allclose(
                positions[(i + 1) * self.K - 1], -lr_sum * direction, rtol=1e-6
            )


# optax's schedules mix their int32 step counter with Python floats, which the
# strict dtype promotion of the test suite rejects.
@pytest.mark.usefixtures("standard_promotion")
class TestWarmup:
    def test_warmup_cosine_schedule_sets_each_step(self):
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=0.1, warmup_steps=10, decay_steps=40, end_value=1e-3
        )
        opt = ax.adamax(learning_rate=schedule)
        g = jnp.asarray([3.0, -0.2, 1e-3], jnp.float32)
        param = jnp.ones((3,), jnp.float32)
        state = opt.init(param)
        step = jax.jit(opt.update)
        path = [np.asarray(param, np.float64)]
        for _ in range(40):
            updates, state = step(g, state, param)
            param = optax.apply_updates(param, updates)
            path.append(np.asarray(param, np.float64))
        path = np.stack(path)
        # With a constant gradient m̂_t = g and u_t = |g|: step k moves by
        # -lr(k) g / (|g| + ε), lr evaluated at the count before the step.
        g64 = np.asarray(g, np.float64)
        lrs = np.array([float(schedule(k)) for k in range(40)])
        expected = 1.0 - np.concatenate([[0.0], np.cumsum(lrs)])[:, None] * (
            g64 / (np.abs(g64) + EPS)
        )
        np.testing.assert_allclose(path, expected, rtol=2e-6, atol=1e-6)
        np.testing.assert_array_equal(path[1], path[0])  # init_value 0: no first step
        assert lrs[10] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05)

    def test_warmup_training_loop_follows_float64_reference(self):
        params, x, y = _linear_problem()
        steps = 400
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=0.1, warmup_steps=50, decay_steps=steps, end_value=1e-4
        )
        opt = ax.adamax(learning_rate=schedule)

        @jax.jit
        def train(params):
            def step(carry, _):
                params, state = carry
                loss, grads = jax.value_and_grad(_linear_loss)(params, x, y)
                updates, state = opt.update(grads, state, params)
                return (optax.apply_updates(params, updates), state), loss

            (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), length=steps)
            return params, losses

        params, losses = train(params)

        # The same loop in float64 NumPy, the schedule taken at the count before each step.
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        theta = np.zeros(x64.shape[1] + 1)
        m, u = np.zeros_like(theta), np.zeros_like(theta)
        xb = np.concatenate([x64, np.ones((x64.shape[0], 1))], axis=1)
        ref_losses = []
        for t in range(1, steps + 1):
            r = xb @ theta - y64
            ref_losses.append(np.mean(r**2))
            g = 2 * xb.T @ r / len(r)
            m = 0.9 * m + 0.1 * g
            u = np.maximum(0.999 * u, np.abs(g))
            theta = theta - float(schedule(t - 1)) * m / (1 - 0.9**t) / (u + EPS)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
        np.testing.assert_allclose(params["w"], theta[:-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(params["b"], theta[-1], rtol=1e-4, atol=1e-5)
        # The noise variance is 0.01; the start is far worse.
        assert ref_losses[0] > 1.0 and losses[-1] < 0.02, (ref_losses[0], losses[-1])
