"""An independent float64 NumPy AdaMax, written from the paper, for the tests."""

import numpy as np


def adamax_numpy(
    params,
    grads,
    lr=0.002,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_mode="denominator",
    nesterov=False,
    weight_decay=0.0,
):
    """Runs AdaMax over a sequence of gradients; returns (params, m, u) per step.

    `params` is the initial array; `grads` an array of shape (steps, *params.shape),
    or a callable of the current params giving the gradient.
    """
    theta = np.array(params, dtype=np.float64)
    m = np.zeros_like(theta)
    u = np.zeros_like(theta)
    history = []
    steps = len(grads) if not callable(grads) else grads.steps
    for i in range(steps):
        t = i + 1
        g = np.asarray(grads(theta) if callable(grads) else grads[i], dtype=np.float64)
        m = b1 * m + (1 - b1) * g
        if eps_mode == "inside_max":
            u = np.maximum(b2 * u, np.abs(g) + eps)
        else:
            u = np.maximum(b2 * u, np.abs(g))
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        denom = u + eps if eps_mode == "denominator" else u
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.where(denom == 0, 0.0, m_hat / np.where(denom == 0, 1.0, denom))
        theta = theta - lr * (d + weight_decay * theta)
        history.append((theta.copy(), m.copy(), u.copy()))
    return history


def random_gradients(rng, steps, shape, zero_fraction=0.1):
    """Gradients for parity runs: random signs, magnitudes log-uniform over [1e-4, 10].

    A `zero_fraction` of the entries is exactly 0. Returns a float64 array of
    shape (steps, *shape).
    """
    shape = tuple(shape)
    mags = 10.0 ** rng.uniform(-4, 1, size=(steps, *shape))
    grads = mags * rng.choice([-1.0, 1.0], size=(steps, *shape))
    grads[rng.random(size=grads.shape) < zero_fraction] = 0.0
    return grads


def params_away_from_zero(rng, shape):
    """Initial parameters with |θ| in [1, 2], of random sign, as a float64 array.

    An AdaMax step moves a parameter by about the learning rate at most, so at
    a learning rate of 0.002 even 300 steps leave |θ| >= 0.4: relative
    deviations between implementations stay meaningful along the whole run.
    """
    return rng.uniform(1.0, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def adamax_numpy_complex(
    params,
    grads,
    lr=0.002,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_mode="denominator",
    nesterov=False,
    complex_mode="modulus",
):
    """AdaMax on complex parameters in complex128; returns the params after each step.

    "modulus" tracks the modulus |g| in a real u; "split" runs the real AdaMax of
    `adamax_numpy` on the real and imaginary parts as two independent parameters.
    """
    if complex_mode == "split":
        kwargs = dict(lr=lr, b1=b1, b2=b2, eps=eps, eps_mode=eps_mode, nesterov=nesterov)
        parts = [
            adamax_numpy(part(np.asarray(params)), part(np.asarray(grads)), **kwargs)
            for part in (np.real, np.imag)
        ]
        return [re[0] + 1j * im[0] for re, im in zip(*parts, strict=True)]
    theta = np.array(params, dtype=np.complex128)
    m = np.zeros_like(theta)
    u = np.zeros(theta.shape, dtype=np.float64)
    history = []
    for i, g in enumerate(np.asarray(grads, dtype=np.complex128)):
        t = i + 1
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + (eps if eps_mode == "inside_max" else 0.0))
        if nesterov:
            m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        else:
            m_hat = m / (1 - b1**t)
        denom = u + eps if eps_mode == "denominator" else u
        d = np.where(denom == 0, 0.0, m_hat / np.where(denom == 0, 1.0, denom))
        theta = theta - lr * d
        history.append(theta.copy())
    return history
