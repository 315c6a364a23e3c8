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
