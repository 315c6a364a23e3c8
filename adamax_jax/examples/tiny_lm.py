"""A small language model trained with float32, bfloat16 and 8-bit AdaMax state.

``python -m adamax_jax.examples.tiny_lm`` trains a character-level, decoder-only
transformer (causal self-attention, learned positional embeddings, layer norm;
plain JAX) on generated English-like text, once for each way of storing the
optimizer state: float32, bfloat16, int8 μ with uint8 ν, and float8 (e4m3) for
both. Every run starts from the same weights and sees the same batches in the
same order; only the storage of the two moments differs. It prints a Markdown
table of the final validation loss (and its difference from the float32-state
run), the bytes of optimizer state per parameter, the time per step after
compiling and the compile time, with the machine they were measured on.

The text comes from a small seeded grammar (:func:`make_text`): sentences with
subject-verb agreement, tenses that agree within a sentence, "a"/"an" before
vowels, counting sequences and questions, so that the model has structure to
learn beyond word spellings. Nothing is downloaded.

8-bit storage applies only to leaves of at least 4096 values (see the 8-bit
page); smaller leaves (the layer norms, and with an alphabet of 37 symbols
the embedding and the output layer) keep float32 moments, and their bytes
are counted.

``--quick`` trains a one-layer model for a few steps (the tests run it),
``--plot PATH`` saves the validation-loss curves (needs matplotlib, in the
``demo`` extra) and ``--json PATH`` everything measured.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamax_jax

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The model, the data and the training run.

    Attributes:
        layers: Transformer blocks.
        width: Model width (embedding size).
        heads: Attention heads (``width`` must be a multiple).
        context: Characters a sequence holds (and positional embeddings).
        batch: Sequences a step.
        steps: Training steps.
        learning_rate: Peak learning rate, reached after ``warmup`` steps and
            then decayed along a cosine to a tenth of it.
        warmup: Steps of linear warm-up from 0.
        eval_every: Steps between two measurements of the validation loss.
        train_chars: Characters of training text.
        val_chars: Characters of validation text.
    """

    layers: int
    width: int
    heads: int
    context: int
    batch: int
    steps: int
    learning_rate: float
    warmup: int
    eval_every: int
    train_chars: int
    val_chars: int


FULL = Settings(
    layers=3,
    width=96,
    heads=4,
    context=64,
    batch=16,
    steps=2000,
    learning_rate=6e-3,
    warmup=100,
    eval_every=100,
    train_chars=400_000,
    val_chars=20_000,
)
QUICK = Settings(
    layers=1,
    width=64,
    heads=2,
    context=32,
    batch=16,
    steps=60,
    learning_rate=1e-2,
    warmup=5,
    eval_every=20,
    train_chars=40_000,
    val_chars=4_000,
)

# The storage configurations, in the table's order; the first is the reference.
CONFIGS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "int8 μ, uint8 ν": {"mu_dtype": jnp.int8, "nu_dtype": jnp.uint8},
    "float8_e4m3fn": {"mu_dtype": jnp.float8_e4m3fn, "nu_dtype": jnp.float8_e4m3fn},
}
REFERENCE = "float32"

# The 8-bit configurations and the quality target they are held to (full mode).
EIGHT_BIT = ("int8 μ, uint8 ν", "float8_e4m3fn")
TARGET_PERCENT = 0.5

# ---------------------------------------------------------------------------- text

_ANIMALS = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("fox", "foxes"),
    ("owl", "owls"),
    ("horse", "horses"),
    ("mouse", "mice"),
    ("bird", "birds"),
    ("child", "children"),
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("king", "kings"),
    ("otter", "otters"),
    ("eagle", "eagles"),
]
_THINGS = [
    ("apple", "apples"),
    ("stone", "stones"),
    ("book", "books"),
    ("lamp", "lamps"),
    ("box", "boxes"),
    ("egg", "eggs"),
    ("letter", "letters"),
    ("umbrella", "umbrellas"),
    ("key", "keys"),
]
_ADJECTIVES = [
    "old",
    "small",
    "quick",
    "quiet",
    "brown",
    "happy",
    "clever",
    "tired",
    "young",
    "angry",
    "eager",
    "little",
    "red",
    "odd",
]
# (third person singular, plural, past)
_TRANSITIVE = [
    ("sees", "see", "saw"),
    ("chases", "chase", "chased"),
    ("finds", "find", "found"),
    ("follows", "follow", "followed"),
    ("watches", "watch", "watched"),
    ("likes", "like", "liked"),
    ("carries", "carry", "carried"),
    ("meets", "meet", "met"),
]
_INTRANSITIVE = [
    ("sleeps", "sleep", "slept"),
    ("runs", "run", "ran"),
    ("sings", "sing", "sang"),
    ("waits", "wait", "waited"),
    ("laughs", "laugh", "laughed"),
]
_PLACES = [
    "in the garden",
    "near the river",
    "under the old bridge",
    "by the door",
    "on the hill",
    "at night",
    "in the morning",
    "behind the barn",
]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


class _Grammar:
    """Sentences drawn from a fixed grammar with a seeded generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def noun_phrase(self, nouns: Sequence[tuple[str, str]], plural: bool) -> str:
        noun = self.pick(nouns)[1 if plural else 0]
        words = [self.pick(_ADJECTIVES)] if self.chance(0.5) else []
        words.append(noun)
        if plural:
            det = self.pick(["the", "some", "many", "these", *_NUMBERS[1:5]])
        else:
            det = self.pick(["the", "a", "this", "every", "my"])
            if det == "a" and words[0][0] in "aeiou":
                det = "an"
        return " ".join([det, *words])

    def verb(self, forms: tuple[str, str, str], plural: bool, past: bool) -> str:
        return forms[2] if past else forms[1 if plural else 0]

    def clause(self, past: bool) -> str:
        plural = self.chance(0.4)
        subject = self.noun_phrase(_ANIMALS, plural)
        if self.chance(0.65):
            obj = self.noun_phrase(self.pick([_ANIMALS, _THINGS]), self.chance(0.4))
            verb = f"{self.verb(self.pick(_TRANSITIVE), plural, past)} {obj}"
        else:
            verb = self.verb(self.pick(_INTRANSITIVE), plural, past)
        place = f" {self.pick(_PLACES)}" if self.chance(0.4) else ""
        return f"{subject} {verb}{place}"

    def sentence(self) -> str:
        past = self.chance(0.5)
        kind = self.rng.random()
        if kind < 0.55:
            text = self.clause(past) + "."
        elif kind < 0.7:
            text = f"{self.clause(past)}, and {self.clause(past)}."
        elif kind < 0.8:
            text = f"when {self.clause(past)}, {self.clause(past)}."
        elif kind < 0.9:
            plural = self.chance(0.4)
            aux = "did" if past else ("do" if plural else "does")
            subject = self.noun_phrase(_ANIMALS, plural)
            verb = self.pick(_TRANSITIVE)[1]
            obj = self.noun_phrase(_THINGS, self.chance(0.4))
            text = f"{aux} {subject} {verb} {obj}?"
        else:
            start = int(self.rng.integers(len(_NUMBERS) - 3))
            stop = int(self.rng.integers(start + 3, len(_NUMBERS) + 1))
            counted = self.noun_phrase(_ANIMALS, True).split(" ", 1)[1]
            text = f"{self.pick(_ANIMALS)[0]} counts {', '.join(_NUMBERS[start:stop])} {counted}."
            text = "the " + text
        return text[0].upper() + text[1:]


def make_text(chars: int, seed: int = 0) -> str:
    """English-like text from a small grammar, the same for the same seed.

    Args:
        chars: How many characters to make.
        seed: The seed of the generator.

    Returns:
        ``chars`` characters of sentences, a few to a line.

    Examples:
        >>> from adamax_jax.examples.tiny_lm import make_text
        >>> make_text(200) == make_text(200)
        True
        >>> len(make_text(200, seed=1))
        200
    """
    grammar = _Grammar(seed)
    lines, total = [], 0
    while total < chars:
        count = int(grammar.rng.integers(2, 6))
        line = " ".join(grammar.sentence() for _ in range(count)) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)[:chars]


# --------------------------------------------------------------------------- model


def init_params(key: jax.Array, settings: Settings, vocab: int) -> Params:
    """The model's float32 weights.

    Args:
        key: A PRNG key.
        settings: The model's shape (``layers``, ``width``, ``context``).
        vocab: Symbols in the alphabet.

    Returns:
        A dict of arrays: ``embed`` (vocab, width), ``position`` (context,
        width), a list of ``blocks`` and the final layer norm and ``head``.
    """
    d, layers = settings.width, settings.layers
    keys = iter(jax.random.split(key, 3 + 4 * layers))

    def normal(shape: tuple[int, ...], std: float) -> jax.Array:
        return std * jax.random.normal(next(keys), shape, jnp.float32)

    def norm() -> Params:
        return {"scale": jnp.ones(d, jnp.float32), "offset": jnp.zeros(d, jnp.float32)}

    # Residual branches scaled down with depth (GPT-2), so that the residual
    # stream keeps its size at initialization.
    out_std = 0.02 / math.sqrt(2 * layers)
    blocks = [
        {
            "norm1": norm(),
            "qkv": normal((d, 3 * d), 0.02),
            "proj": normal((d, d), out_std),
            "norm2": norm(),
            "up": normal((d, 4 * d), 0.02),
            "down": normal((4 * d, d), out_std),
        }
        for _ in range(layers)
    ]
    return {
        "embed": normal((vocab, d), 0.02),
        "position": normal((settings.context, d), 0.02),
        "blocks": blocks,
        "norm": norm(),
        "head": normal((d, vocab), 0.02),
    }


def _layer_norm(p: Params, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"][None, None] + p["offset"][None, None]


def _attention(p: Params, x: jax.Array, heads: int) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))[None, None]
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d)
    return out @ p["proj"]


def forward(params: Params, tokens: jax.Array, heads: int) -> jax.Array:
    """The logits of the next character at each position.

    Args:
        params: The weights (:func:`init_params`).
        tokens: int32 symbols, shape (batch, time), time at most the context.
        heads: Attention heads.

    Returns:
        float32 logits, shape (batch, time, vocab).
    """
    t = tokens.shape[1]
    x = params["embed"][tokens] + params["position"][None, :t]
    for block in params["blocks"]:
        x = x + _attention(block, _layer_norm(block["norm1"], x), heads)
        h = jax.nn.gelu(_layer_norm(block["norm2"], x) @ block["up"])
        x = x + h @ block["down"]
    return _layer_norm(params["norm"], x) @ params["head"]


def loss_fn(params: Params, window: jax.Array, heads: int) -> jax.Array:
    """Mean cross-entropy (nats a character) of predicting each next character.

    Args:
        params: The weights.
        window: int32 symbols, shape (batch, time + 1).
        heads: Attention heads.

    Returns:
        A float32 scalar.
    """
    logits = forward(params, window[:, :-1], heads)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)
    return -jnp.mean(picked)


# -------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    """One storage configuration in training, and what it measured.

    Attributes:
        name: The configuration.
        step: The compiled, buffer-donating training step.
        params: The current weights.
        state: The current optimizer state.
        state_bytes_per_param: Bytes of optimizer state over parameters.
        compile_s: Time to lower and compile the step.
        steps: The steps at which the validation loss was measured (0 first).
        val_loss: The validation loss at those steps.
        train_loss: The loss of the last batch before those steps (None at 0).
        seconds: Wall time spent in training steps, compiling excluded.
    """

    name: str
    step: Callable[..., tuple[Params, optax.OptState, jax.Array]]
    params: Params
    state: optax.OptState
    state_bytes_per_param: float
    compile_s: float
    steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float | None] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def record(self, done: int) -> dict[str, Any]:
        """What it measured, ready for JSON, after `done` steps."""
        return {
            "name": self.name,
            "steps": self.steps,
            "val_loss": self.val_loss,
            "train_loss": self.train_loss,
            "state_bytes_per_param": self.state_bytes_per_param,
            "ms_per_step": 1e3 * self.seconds / done,
            "compile_s": self.compile_s,
        }


def schedule(settings: Settings) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then a cosine down to a tenth of it.

    As ``optax.warmup_cosine_decay_schedule``, written without implicit
    dtype promotion. A run cut short by ``--steps`` keeps at least half its
    steps for the decay.

    Args:
        settings: ``learning_rate`` (the peak), ``warmup`` and ``steps``.

    Returns:
        The learning rate as a function of the step count.
    """
    peak, end = settings.learning_rate, settings.learning_rate / 10
    warmup = min(settings.warmup, settings.steps // 2)
    decay = max(settings.steps - warmup, 1)

    def rate(count: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(count).astype(jnp.float32)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, peak * step / max(warmup, 1), cosine)

    return rate


def start_run(
    name: str,
    opt: optax.GradientTransformation,
    init: Params,
    settings: Settings,
    train_data: jax.Array,
    start: jax.Array,
) -> Run:
    """Compiles the training step of `opt` and starts from a copy of `init`.

    Args:
        name: The configuration's name.
        opt: The optimizer.
        init: The initial weights (copied: the step donates its inputs).
        settings: The run.
        train_data: int32 symbols of the training text.
        start: int32 offsets into `train_data` where a batch's sequences
            begin, shape (batch,).

    Returns:
        The run at step 0, nothing measured yet.
    """
    heads, offsets = settings.heads, np.arange(settings.context + 1, dtype=np.int32)

    def step(
        params: Params, state: optax.OptState, data: jax.Array, start: jax.Array
    ) -> tuple[Params, optax.OptState, jax.Array]:
        window = data[start[:, None] + jnp.asarray(offsets)[None]]
        loss, grads = jax.value_and_grad(loss_fn)(params, window, heads)
        updates, state = opt.update(grads, state, params)
        return cast(Params, optax.apply_updates(params, updates)), state, loss

    params = jax.tree.map(jnp.copy, init)
    state = opt.init(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    tick = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1)).lower(params, state, train_data, start).compile()
    )
    compile_s = time.perf_counter() - tick
    return Run(name, compiled, params, state, state_bytes / n_params, compile_s)


def advance(run: Run, train_data: jax.Array, starts: Sequence[jax.Array]) -> None:
    """Takes one step of `run` a batch, timing them.

    Args:
        run: The run, updated in place.
        train_data: int32 symbols of the training text.
        starts: Each batch's offsets into `train_data`, shape (batch,).
    """
    params, state, loss = run.params, run.state, jnp.full((), jnp.nan, jnp.float32)
    tick = time.perf_counter()
    for start in starts:
        params, state, loss = run.step(params, state, train_data, start)
    run.train_loss.append(float(jax.block_until_ready(loss)))
    run.seconds += time.perf_counter() - tick
    run.params, run.state = params, state


def _evaluator(params: Params, text: np.ndarray, settings: Settings) -> Callable[[Params], float]:
    """The mean loss over the validation text, cut into windows of context + 1."""
    t = settings.context
    count = (text.size - 1) // t
    # Windows overlap by one character: each character but the first is predicted once.
    index = np.arange(count)[:, None] * t + np.arange(t + 1)[None]
    chunk = min(count, 64)
    if chunk == 0:
        raise ValueError(f"The validation text is too short for a context of {t}.")
    count -= count % chunk
    windows = jnp.asarray(text[index[:count]].reshape(count // chunk, chunk, t + 1))

    def mean_loss(params: Params, windows: jax.Array) -> jax.Array:
        losses = jax.lax.map(lambda w: loss_fn(params, w, settings.heads), windows)
        return jnp.mean(losses)

    compiled = jax.jit(mean_loss).lower(params, windows).compile()
    return lambda p: float(compiled(p, windows))


def machine() -> str:
    """The CPU model and core count, and JAX's version and backend."""
    from adamax_jax.benchmark import cpu_model

    cpu = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    device = backend if kind.lower() == backend.lower() else f"{backend} ({kind})"
    return f"{cpu}, {cores} cores, jax {jax.__version__} on {device}, optax {optax.__version__}"


def run(settings: Settings, seed: int = 0, out: Any = None) -> dict[str, Any]:
    """Trains every configuration of :data:`CONFIGS` from the same start.

    The configurations take their steps in turn, ``eval_every`` steps each,
    so that a change of load on the machine falls on all of them alike.

    Args:
        settings: The model, data and run.
        seed: Seeds the text, the initial weights and the batches.
        out: Where progress goes (a text stream), or None for silence.

    Returns:
        A JSON-ready dict: ``settings``, ``seed``, ``machine``, ``vocab``,
        ``n_params`` and ``runs``, one per configuration (``name``,
        ``steps``, ``val_loss``, ``train_loss``, ``state_bytes_per_param``,
        ``ms_per_step``, ``compile_s``).
    """

    def say(text: str) -> None:
        if out is not None:
            print(text, file=out, flush=True)

    text = make_text(settings.train_chars + settings.val_chars, seed)
    alphabet = sorted(set(text))
    lookup = {c: i for i, c in enumerate(alphabet)}
    symbols = np.array([lookup[c] for c in text], np.int32)
    train_text, val_text = symbols[: settings.train_chars], symbols[settings.train_chars :]
    vocab = len(alphabet)

    init = init_params(jax.random.key(seed), settings, vocab)
    n_params = sum(x.size for x in jax.tree.leaves(init))
    rng = np.random.default_rng(seed)
    high = train_text.size - settings.context - 1
    starts = rng.integers(0, high, size=(settings.steps, settings.batch), dtype=np.int32)
    train_data = jnp.asarray(train_text)
    evaluate = _evaluator(init, val_text, settings)

    say(
        f"a character-level transformer: {settings.layers} layers, width {settings.width}, "
        f"{settings.heads} heads, context {settings.context}, {n_params:,} parameters"
    )
    say(
        f"text: {train_text.size:,} training and {val_text.size:,} validation characters "
        f"of generated sentences, {vocab} symbols (ln {vocab} = {math.log(vocab):.3f})"
    )
    say(
        f"{settings.steps} steps of {settings.batch} × {settings.context} characters, "
        f"adamax with learning rate {settings.learning_rate:g} (warm-up {settings.warmup} "
        f"steps, cosine to {settings.learning_rate / 10:g}), seed {seed}"
    )
    say(f"machine: {machine()}")
    runs = []
    for name, dtypes in CONFIGS.items():
        opt = adamax_jax.adamax(schedule(settings), **dtypes)
        runs.append(start_run(name, opt, init, settings, train_data, jnp.asarray(starts[0])))
        runs[-1].steps.append(0)
        runs[-1].val_loss.append(evaluate(runs[-1].params))
        runs[-1].train_loss.append(None)
    done = 0
    while done < settings.steps:
        chunk = [jnp.asarray(s) for s in starts[done : done + settings.eval_every]]
        done += len(chunk)
        for r in runs:
            advance(r, train_data, chunk)
            r.steps.append(done)
            r.val_loss.append(evaluate(r.params))
        say(
            f"  step {done}: validation loss "
            + ", ".join(f"{r.val_loss[-1]:.4f} ({r.name})" for r in runs)
        )
    return {
        "settings": dataclasses.asdict(settings),
        "seed": seed,
        "machine": machine(),
        "vocab": vocab,
        "n_params": n_params,
        "runs": [r.record(done) for r in runs],
    }


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table.

    Args:
        report: What :func:`run` returned.

    Returns:
        One row a configuration.
    """
    runs = report["runs"]
    reference = next(r for r in runs if r["name"] == REFERENCE)["val_loss"][-1]
    lines = [
        "| optimizer state | validation loss | vs float32 state | state bytes / param "
        "| ms / step | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        final = r["val_loss"][-1]
        lines.append(
            f"| {r['name']} | {final:.4f} | {100 * (final - reference) / reference:+.2f} % "
            f"| {r['state_bytes_per_param']:.2f} | {r['ms_per_step']:.1f} "
            f"| {r['compile_s']:.2f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Saves the validation-loss curves, and their differences from float32 state.

    Args:
        report: What :func:`run` returned.
        path: Where to save the figure (PNG).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_diff = fig.subplots(1, 2)
    runs = report["runs"]
    reference = np.asarray(next(r for r in runs if r["name"] == REFERENCE)["val_loss"])
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(runs):
        steps, loss = np.asarray(r["steps"]), np.asarray(r["val_loss"])
        ax_loss.plot(steps, loss, ls=styles[i % 4], color=f"C{i}", label=f"{r['name']} state")
        diff = 100 * (loss - reference) / reference
        ax_diff.plot(steps[1:], diff[1:], ls=styles[i % 4], color=f"C{i}", marker=".")
    ax_loss.axhline(math.log(report["vocab"]), color="0.6", lw=1, ls="--")
    ax_loss.set_yscale("log")
    ax_loss.set(title="validation loss (nats a character)", xlabel="step")
    ax_loss.legend()
    ax_diff.axhspan(-TARGET_PERCENT, TARGET_PERCENT, color="0.9")
    ax_diff.axhline(0, color="0.6", lw=1)
    ax_diff.set(title="difference from float32 state (%)", xlabel="step")
    fig.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the example; see the module docstring.

    Args:
        argv: The command-line arguments; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0, or 1 if a loss is not finite.
    """
    parser = argparse.ArgumentParser(
        prog="python -m adamax_jax.examples.tiny_lm",
        description=(__doc__ or "").splitlines()[0],
    )
    parser.add_argument("--quick", action="store_true", help="a one-layer model, a few steps")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (default: {FULL.steps}, {QUICK.steps} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="text, weights and batches")
    parser.add_argument("--plot", metavar="PATH", help="save the loss curves (PNG) to PATH")
    parser.add_argument("--json", metavar="PATH", help="save the results as JSON to PATH")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"`--steps` must be >= 1, got {args.steps}.")
        settings = dataclasses.replace(settings, steps=args.steps)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                '`--plot` needs matplotlib: python -m pip install "adamax_jax[demo]"',
                file=sys.stderr,
            )
            return 2

    start = time.perf_counter()
    report = run(settings, args.seed, out=sys.stdout)
    print()
    print(table(report))
    print()
    runs = {r["name"]: r for r in report["runs"]}
    reference = runs[REFERENCE]["val_loss"][-1]
    for name in EIGHT_BIT:
        gap = 100 * abs(runs[name]["val_loss"][-1] - reference) / reference
        verdict = "within" if gap <= TARGET_PERCENT else "NOT within"
        print(f"{name} state: {gap:.2f} % from float32 state, {verdict} {TARGET_PERCENT} %")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"results saved to {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"figure saved to {args.plot}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    finite = all(math.isfinite(v) for r in report["runs"] for v in r["val_loss"])
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
