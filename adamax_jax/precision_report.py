"""Bytes of state per parameter, and drift against float32, for low-precision storage.

Run ``python -m adamax_jax.precision_report``; it prints a Markdown table.

The scenario is a gradient burst followed by small gradients. Each of
``SIZE`` parameters, starting at 0, gets ``BURST_STEPS`` steps of gradient
``σ c`` and then ``σ c r`` up to step ``STEPS``: ``σ`` a fixed sign, ``c``
log-uniform over [0.1, 10] and ``r`` over [1e-5, 0.1], one of each per
parameter. In the "steady" scenario that is the whole gradient; in the
"noisy" one every entry of every step is also multiplied by a factor drawn
uniformly from [0.5, 1.5). ``u`` decays from the burst at the rate β₂ for the
whole run where ``r`` is small, and meets the small gradients before the end
where it is not, so both regimes are measured.

Each configuration is compared with a run that keeps parameters and state in
float32 and is fed the same gradient values (the configuration's gradients,
rounded to its parameter dtype, read back in float32), so that only the
optimizer's storage differs. The drift of ``u`` is ``|u − u₃₂| / u₃₂`` at the
last step, with ``u`` from :func:`adamax_jax.infinity_norm`; that of the
displacement is ``|Δθ − Δθ₃₂| / |Δθ₃₂|`` with ``Δθ = θ_T − θ_0``; both per
parameter, the table gives the largest and the median. The stochastic-rounding
and round-to-nearest rows are ablations of this package's design, built here
from the same per-leaf equations with another rounding of the stores.
"""

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamax_jax as ax
from adamax_jax._codecs import EncodedMoment
from adamax_jax._core import adamax_leaf
from adamax_jax._precision import state_bytes

STEPS = 10_000
BURST_STEPS = 10
SIZE = 4096
LEARNING_RATE = 0.002
B1, B2, EPS = 0.9, 0.999, 1e-8
SCENARIOS = ("steady", "noisy")

Rounding = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _round_to_nearest(value: jax.Array, previous: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return value.astype(previous.dtype)


def _round_stochastically(value: jax.Array, previous: jax.Array, key: jax.Array) -> jax.Array:
    """Rounds float32 `value` to bfloat16, up with probability the fraction dropped."""
    bits = jax.lax.bitcast_convert_type(value.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, value.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    # bfloat16 is the upper half of float32: adding uniform noise below the
    # cut and truncating rounds up exactly as often as the dropped part says.
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(previous.dtype)


class AblationState(NamedTuple):
    """The state of an ablation: `dtype` moments, and ν's scale where it is scaled.

    Not a :class:`adamax_jax.ScaleByAdamaxState`: an unscaled 16-bit ν is a
    layout this package refuses to read (its decay rounds away), which is what
    the ablation measures.
    """

    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride] (a field, as in optax)
    mu: jax.Array
    nu: jax.Array
    nu_scale: jax.Array | None


def _ablation(
    mu_store: Rounding, nu_store: Rounding, scaled: bool, dtype: Any = jnp.bfloat16
) -> optax.GradientTransformation:
    """AdaMax with `dtype` state stored by the given roundings, for arrays only."""

    def init_fn(params):
        return AblationState(
            count=jnp.zeros([], jnp.int32),
            mu=jnp.zeros(params.shape, dtype),
            nu=jnp.zeros(params.shape, dtype),
            nu_scale=jnp.ones([], jnp.float32) if scaled else None,
        )

    def update_fn(updates, state, params=None):
        del params
        count = jnp.asarray(optax.safe_increment(state.count))
        # Handing the leaf float32 state makes its own stores exact, so that
        # the roundings below are the only ones.
        nu32 = state.nu.astype(jnp.float32)
        if scaled:
            nu32 = EncodedMoment(nu32, state.nu_scale)
        direction, m, v = adamax_leaf(
            updates, state.mu.astype(jnp.float32), nu32, count, b1=B1, b2=B2, eps=EPS
        )
        key_m, key_v = jax.random.split(jax.random.fold_in(jax.random.key(1), count))
        new_state = AblationState(
            count=count,
            mu=mu_store(m, state.mu, key_m),
            nu=nu_store(v.codes if scaled else v, state.nu, key_v),
            nu_scale=v.scale if scaled else None,
        )
        return direction.astype(updates.dtype), new_state

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn),  # pyright: ignore[reportArgumentType]
        optax.scale_by_learning_rate(LEARNING_RATE),
    )


def _ours() -> optax.GradientTransformation:
    return ax.adamax(LEARNING_RATE, B1, B2, EPS)


@dataclasses.dataclass(frozen=True)
class Config:
    """One row of the report."""

    name: str
    param_dtype: Any
    make: Callable[[], optax.GradientTransformation]
    reference: Callable[[], optax.GradientTransformation] = _ours


def configs() -> list[Config]:
    """The rows of the report, in its order."""
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    e4m3, e5m2 = jnp.float8_e4m3fn, jnp.float8_e5m2
    return [
        Config("f32 params, f32 state", f32, _ours),
        Config(
            "f32 params, bf16 mu and nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=bf16, nu_dtype=bf16),
        ),
        Config("bf16 params, bf16 state", bf16, _ours),
        Config(
            "bf16 params, bf16 state, compensated",
            bf16,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, compensated=True),
        ),
        Config("f16 params, f16 state", f16, _ours),
        Config(
            "f16 params, f16 state, compensated",
            f16,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, compensated=True),
        ),
        Config(
            "`optax.adamax`, bf16 params (and state)",
            bf16,
            lambda: optax.adamax(LEARNING_RATE, B1, B2, EPS),
            reference=lambda: optax.adamax(LEARNING_RATE, B1, B2, EPS),
        ),
        Config(
            "f32 params, int8 mu, uint8 nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=jnp.int8, nu_dtype=jnp.uint8),
        ),
        Config(
            "f32 params, int8 mu and nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=jnp.int8, nu_dtype=jnp.int8),
        ),
        Config(
            "f32 params, float8_e4m3fn mu and nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=e4m3, nu_dtype=e4m3),
        ),
        Config(
            "f32 params, float8_e5m2 mu and nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=e5m2, nu_dtype=e5m2),
        ),
        Config(
            "f32 params, bf16 mu, uint8 nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=bf16, nu_dtype=jnp.uint8),
        ),
        Config(
            "f32 params, int8 mu, bf16 nu",
            f32,
            lambda: ax.adamax(LEARNING_RATE, B1, B2, EPS, mu_dtype=jnp.int8, nu_dtype=bf16),
        ),
        Config(
            "ablation: f32 params, bf16 mu and nu by stochastic rounding, unscaled",
            f32,
            lambda: _ablation(_round_stochastically, _round_stochastically, scaled=False),
        ),
        Config(
            "ablation: f32 params, bf16 mu rounded to nearest, scaled nu",
            f32,
            lambda: _ablation(_round_to_nearest, _round_to_nearest, scaled=True),
        ),
    ]


def gradients(scenario: str, key: jax.Array, size: int = SIZE) -> Callable[[jax.Array], jax.Array]:
    """The scenario's float32 gradient as a function of the 1-based step."""
    k_scale, k_ratio, k_sign, k_noise = jax.random.split(key, 4)
    scale = 10.0 ** jax.random.uniform(k_scale, (size,), jnp.float32, -1.0, 1.0)
    ratio = 10.0 ** jax.random.uniform(k_ratio, (size,), jnp.float32, -5.0, -1.0)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (size,)), 1.0, -1.0).astype(jnp.float32)

    def at(t: jax.Array) -> jax.Array:
        g = sign * jnp.where(t <= BURST_STEPS, scale, scale * ratio)
        if scenario == "noisy":
            key_t = jax.random.fold_in(k_noise, t)
            g = g * jax.random.uniform(key_t, (size,), jnp.float32, 0.5, 1.5)
        return g

    return at


def _adamax_state(state: Any) -> Any:
    """The AdaMax state inside an optax chain's state."""
    for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu")):
        if hasattr(s, "nu"):
            return s
    raise ValueError(f"No AdaMax state in {type(state)!r}.")


def _infinity_norm(state: Any) -> jax.Array:
    inner = _adamax_state(state)
    if isinstance(inner, ax.ScaleByAdamaxState):
        return jnp.asarray(ax.infinity_norm(inner), jnp.float32)
    u = jnp.asarray(inner.nu, jnp.float32)
    # An ablation's scaled ν holds u / scale (optax's holds u itself).
    scale = getattr(inner, "nu_scale", None)
    return u if scale is None else u * scale


def run(
    opt: optax.GradientTransformation,
    param_dtype: Any,
    grad_at: Callable[[jax.Array], jax.Array],
    grad_dtype: Any,
    steps: int = STEPS,
    size: int = SIZE,
) -> tuple[jax.Array, jax.Array, Any]:
    """Runs `steps` steps of `opt` from zero parameters of `param_dtype`.

    The gradient of each step is ``grad_at(t)`` rounded to `grad_dtype` and
    handed over in `param_dtype`.

    Returns:
        The displacement and ``u`` at the last step, in float32, and the state.
    """

    def body(carry, t):
        p, s = carry
        g = grad_at(t).astype(grad_dtype).astype(param_dtype)
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    @jax.jit
    def loop(p, s):
        (p, s), _ = jax.lax.scan(body, (p, s), jnp.arange(1, steps + 1, dtype=jnp.int32))
        return p, s

    # optax's own transformations promote dtypes implicitly.
    with jax.numpy_dtype_promotion("standard"):
        params = jnp.zeros(size, param_dtype)
        params, state = loop(params, opt.init(params))
    return params.astype(jnp.float32), _infinity_norm(state), state


def relative_error(x: jax.typing.ArrayLike, reference: jax.typing.ArrayLike) -> np.ndarray:
    """Per-entry ``|x − reference| / |reference|``, in float64."""
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    return np.abs(x - reference) / np.abs(reference)


def measure(
    config: Config,
    scenario: str,
    steps: int = STEPS,
    size: int = SIZE,
    seed: int = 0,
    cache: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Bytes of state per parameter and drift against the float32 run for `config`.

    Args:
        config: The configuration.
        scenario: "steady" or "noisy".
        steps: The number of steps.
        size: The number of parameters.
        seed: The seed of the gradients.
        cache: A dict that keeps reference runs between calls.

    Returns:
        A dict with ``bytes`` (per parameter), ``u`` and ``displacement`` (the
        per-parameter relative errors) and ``finite`` (whether every parameter
        stayed finite).
    """
    cache = {} if cache is None else cache
    grad_at = gradients(scenario, jax.random.key(seed), size)
    disp, u, state = run(
        config.make(), config.param_dtype, grad_at, config.param_dtype, steps, size
    )
    ref_key = (config.reference, jnp.dtype(config.param_dtype), scenario, steps, size, seed)
    if ref_key not in cache:
        cache[ref_key] = run(
            config.reference(), jnp.float32, grad_at, config.param_dtype, steps, size
        )[:2]
    ref_disp, ref_u = cache[ref_key]
    return {
        "bytes": state_bytes(state) / size,
        "u": relative_error(u, ref_u),
        "displacement": relative_error(disp, ref_disp),
        "finite": bool(np.all(np.isfinite(np.asarray(disp)))),
    }


def _percent(errors: np.ndarray) -> str:
    return f"{100 * np.max(errors):.3g} % ({100 * np.median(errors):.2g} %)"


def table(rows: list[tuple[str, dict[str, dict[str, Any]]]]) -> str:
    """The Markdown table of ``(name, {scenario: measure(...)})`` rows."""
    header = ["configuration", "state bytes / param"]
    for quantity in ("u", "displacement"):
        header += [f"{quantity} drift, {scenario}" for scenario in SCENARIOS]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for name, by_scenario in rows:
        cells = [name, f"{by_scenario[SCENARIOS[0]]['bytes']:.2f}"]
        for quantity in ("u", "displacement"):
            cells += [_percent(by_scenario[s][quantity]) for s in SCENARIOS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prints the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", default=None, help="Run only the rows whose name contains this text."
    )
    args = parser.parse_args(argv)
    cache: dict = {}
    rows = [
        (c.name, {s: measure(c, s, args.steps, args.size, args.seed, cache) for s in SCENARIOS})
        for c in configs()
        if args.only is None or args.only in c.name
    ]
    print(
        f"{args.steps} steps, {args.size} parameters, seed {args.seed}; "
        "drift: largest (median) over the parameters.\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
