"""AdaMax state to and from ``torch.optim.Adamax`` and ``keras.optimizers.Adamax``.

A run that moves between frameworks mid-training keeps its moments and step
count, and goes on as if it had never moved. Neither PyTorch nor Keras is
imported here unless an object of theirs is handed in; their tensors and
variables are read as NumPy arrays.

The rules, and where they come from (PyTorch 2.13 ``torch/optim/adamax.py``;
Keras 3 ``keras/src/optimizers/adamax.py`` and ``base_optimizer.py``):

- PyTorch keeps, per parameter, ``step`` (a 0-d float tensor: the steps
  taken), ``exp_avg`` (m) and ``exp_inf`` (u, ε inside the max:
  ``eps_mode="inside_max"``); a complex parameter's are complex, AdaMax run on
  ``view_as_real`` (``complex_mode="split"``). Its ``weight_decay`` is L2
  added to the gradient and ``maximize`` negates the gradient: no alias of
  this package does either.
- Keras keeps ``iterations`` (the steps taken), and ``_m`` and ``_u``, one
  per variable in the order it was built with; ε goes in the denominator
  (``eps_mode="denominator"``) and its ``weight_decay`` is decoupled
  (``adamaxw``).
- In both, the next step is step ``count + 1`` of ours, with the same m and u.
"""

import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax._transform import (
    HYPERPARAMETERS,
    adamax_state,
    convert_state,
    first_moment,
    infinity_norm,
)

_TORCH = "PyTorch"
_KERAS = "Keras"
# Where each framework places ε (docs/porting.md).
_EPS_MODE = {_TORCH: "inside_max", _KERAS: "denominator"}

_TORCH_STATE_KEYS = frozenset({"step", "exp_avg", "exp_inf"})
_TORCH_GROUP_KEYS = frozenset(
    {"params", "lr", "betas", "eps", "weight_decay", "foreach", "maximize"}
    | {"differentiable", "capturable"}
)
# Keys PyTorch adds to a group that the step does not read: the names given by
# `named_parameters()`, and what torch.optim.lr_scheduler and swa_utils keep there (the
# rate a scheduler started from; OneCycleLR's and CyclicLR's bounds of the rate and, with
# `cycle_momentum`, of β₁; SWALR's target rate). The step reads `lr` and `betas`, which
# are checked as they are now.
_TORCH_GROUP_BOOKKEEPING = frozenset(
    {"param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"} | {"swa_lr"}
)
_KERAS_MAPPING_KEYS = frozenset({"iterations", "momentums", "norms", "config"})
# Keras settings that change the step and that no alias of this package has.
_KERAS_CHAIN_ONLY = ("clipnorm", "clipvalue", "global_clipnorm", "loss_scale_factor")
# What is read of a Keras optimizer: the keys of its config, and attributes of its own.
_KERAS_CONFIG = (
    ("beta_1", "beta_2", "epsilon", "weight_decay", "use_ema", "ema_overwrite_frequency")
    + ("gradient_accumulation_steps",)
    + _KERAS_CHAIN_ONLY
)

# The largest step count a state holds: it saturates there, and so does a schedule's clock.
_COUNT_MAX = int(np.iinfo(np.int32).max)

# Two hyperparameters are the same when they agree to 8 units in the last place of
# float32: both sides compute in float32, and one may hold a value rounded to float32
# (Keras keeps its learning rate in a float32 variable) where the other has the float64.
_RTOL = 2.0**-20

FromList = Callable[[list[Any]], Any]
ToList = Callable[[Any], Sequence[Any]]


@dataclass
class _Peer:
    """A PyTorch or Keras AdaMax state, read as NumPy, in the framework's order."""

    framework: str
    names: list[str]  # per parameter, for messages
    dtypes: list[np.dtype]
    mu: list[np.ndarray]
    nu: list[np.ndarray]
    count: int
    # (where, {name: value}) per group of hyperparameters, under the framework's names.
    groups: list[tuple[str, dict[str, Any]]]
    # Keras: whether each variable has weight decay; None without weight decay.
    decays: list[bool] | None = None
    # PyTorch: the dtypes of the parameters themselves, where the optimizer was given
    # (a parameter's `.data` may have been cast since its moments were made).
    param_dtypes: list[np.dtype] | None = None


# ---------------------------------------------------------------------------------------
# Recognising the inputs


def _module(x: Any) -> str:
    return getattr(type(x), "__module__", None) or ""


def _is_torch_optimizer(x: Any) -> bool:
    return _module(x).startswith("torch.") and all(
        hasattr(x, a) for a in ("state_dict", "param_groups", "load_state_dict")
    )


def _is_torch_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and set(x.keys()) == {"state", "param_groups"}


def _is_keras_optimizer(x: Any) -> bool:
    return _module(x).startswith("keras.") and all(
        hasattr(x, a) for a in ("iterations", "get_config", "apply")
    )


def _is_keras_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) and {"iterations", "momentums", "norms"} <= set(x.keys())


def _is_peer(x: Any) -> bool:
    return (
        _is_torch_optimizer(x)
        or _is_torch_state_dict(x)
        or _is_keras_optimizer(x)
        or _is_keras_mapping(x)
    )


def is_framework_state(state: Any) -> bool:
    """Whether :func:`convert_state` should hand `state` to :func:`from_framework`."""
    if isinstance(state, tuple) and not hasattr(state, "_fields") and len(state) == 2:
        return _is_peer(state[0]) and callable(state[1])
    return _is_peer(state)


# ---------------------------------------------------------------------------------------
# Reading tensors and variables


def _dtype_of(x: Any) -> np.dtype:
    """The dtype of a tensor, variable or array, as NumPy (with ml_dtypes) names it."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype
    name = str(dtype).removeprefix("torch.")
    try:
        return np.dtype(jnp.dtype(name))
    except TypeError as e:
        raise ValueError(f"A moment has dtype {dtype}, which NumPy cannot hold.") from e


def _numpy(x: Any) -> np.ndarray:
    """A tensor, Keras variable or array as a NumPy array of its own dtype."""
    dtype = _dtype_of(x)
    if hasattr(x, "detach"):  # a torch.Tensor
        t = x.detach().cpu().resolve_conj()
        if dtype.itemsize < 4 and not np.issubdtype(dtype, np.complexfloating):
            # NumPy cannot take torch's bfloat16; float32 holds every 16-bit value exactly.
            return t.float().numpy().astype(dtype)
        return t.numpy().copy()
    if _module(x).startswith("keras."):
        # A Keras variable: its value is the backend's own tensor (read through the
        # variable itself, NumPy 2 warns of Keras' `__array__`).
        value = x.value
        if hasattr(value, "detach"):
            return _numpy(value)
        import keras  # keras is imported already

        return np.asarray(keras.ops.convert_to_numpy(value))
    return np.asarray(x)


def _scalar(x: Any) -> float:
    if isinstance(x, numbers.Real):
        return float(x)
    return float(np.asarray(_numpy(x)).reshape(()))


def _whole(value: float, what: str) -> int:
    if not (math.isfinite(value) and value == int(value) and value >= 0):
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}.")
    return int(value)


def _torch_groups(
    groups: Any, what: str, *, way_in: bool
) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Names of the parameters, and each group's hyperparameters, checked to agree.

    `what` names the source in messages: "the PyTorch state_dict", "`optimizer`".
    """
    if not isinstance(groups, Sequence) or not groups:
        raise ValueError(f"The param groups of {what} are empty.")
    names: list[str] = []
    hypers: list[tuple[str, dict[str, Any]]] = []
    for g, group in enumerate(groups):
        unknown = sorted(set(group) - _TORCH_GROUP_KEYS - _TORCH_GROUP_BOOKKEEPING)
        if unknown:
            fix = (
                "another optimizer's state_dict (such as torch.optim.Adam's)? A key that the "
                "step does not read may be removed from the group before converting."
                if way_in
                else "a setting this version of adamax_jax does not know? A key that the step "
                "does not read may be popped from `optimizer.param_groups` before, and put "
                "back after."
            )
            raise ValueError(
                f"Param group {g} of {what} holds {unknown}, which a torch.optim.Adamax "
                f"group does not (nor an lr_scheduler's bookkeeping): {fix}"
            )
        missing = sorted({"params", "lr", "betas", "eps", "weight_decay"} - set(group))
        if missing:
            raise ValueError(f"Param group {g} of {what} lacks {missing}.")
        labels = group.get("param_names")
        if labels is not None and len(labels) != len(group["params"]):
            labels = None  # pruned without its names: numbered only
        for k in range(len(group["params"])):
            names.append(f"parameter {len(names)}" + (f" ({labels[k]!r})" if labels else ""))
        b1, b2 = group["betas"]
        hypers.append(
            (
                f" (param group {g})",
                {
                    "lr": _scalar(group["lr"]),
                    "betas[0]": _scalar(b1),
                    "betas[1]": _scalar(b2),
                    "eps": _scalar(group["eps"]),
                    "weight_decay": _scalar(group["weight_decay"]),
                    "maximize": bool(group.get("maximize", False)),
                },
            )
        )
    ours = hypers[0][1]
    for g, (_, theirs) in enumerate(hypers[1:], start=1):
        differ = [
            f"`{k}` ({ours[k]!r} against {theirs[k]!r})"
            for k in ours
            if not _same(ours[k], theirs[k])
        ]
        if differ:
            raise ValueError(
                f"Param groups 0 and {g} of {what} differ in "
                + ", ".join(differ)
                + ": one AdaMax transformation has one set of hyperparameters. Give the "
                "groups the same values, or port each group's parameters with an optimizer "
                "of their own."
            )
    return names, hypers


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _read_torch(source: Any) -> _Peer:
    param_dtypes = None
    what = "the PyTorch state_dict"
    if _is_torch_optimizer(source):
        if type(source).__name__ != "Adamax":
            raise ValueError(
                f"`state` is a {_module(source)}.{type(source).__name__}, not a "
                "torch.optim.Adamax: its state is not AdaMax's."
            )
        param_dtypes = [_dtype_of(p) for g in source.param_groups for p in g["params"]]
        source, what = source.state_dict(), "the PyTorch optimizer"
    groups, per_param = source["param_groups"], source["state"]
    names, hypers = _torch_groups(groups, what, way_in=True)
    ids = [i for group in groups for i in group["params"]]
    unlisted = sorted(set(per_param) - set(ids), key=str)
    if unlisted:
        raise ValueError(
            f"{_capital(what)} holds state for {unlisted}, which no param group lists."
        )
    if not per_param:
        raise ValueError(
            "The PyTorch optimizer holds no state yet (it has taken no step): start from "
            "`opt.init(params)`."
        )
    fresh = [names[k] for k, i in enumerate(ids) if i not in per_param]
    if fresh:
        raise ValueError(
            f"{_capital(what)} has no state for "
            + ", ".join(fresh)
            + " (no gradient has reached it: frozen, or not used yet) while the other "
            "parameters have. adamax_jax keeps one step count for all parameters, and "
            "m = u = 0 at theirs is not this state (PyTorch bias-corrects a parameter's first "
            "step as step 1). If it stays frozen, leave it out: convert a state_dict whose "
            "param groups do not list it (its id removed from `group['params']`, and its name "
            "from `group['param_names']` where present), with `params` holding the other "
            "parameters only, and keep it out of `opt` in JAX (docs/porting.md)."
        )
    mu: list[np.ndarray] = []
    nu: list[np.ndarray] = []
    steps: list[int] = []
    for name, i in zip(names, ids, strict=True):
        entry = per_param[i]
        if set(entry) != _TORCH_STATE_KEYS:
            raise ValueError(
                f"The PyTorch state of {name} holds {sorted(entry)}, not torch.optim.Adamax's "
                f"{sorted(_TORCH_STATE_KEYS)}: another optimizer's state_dict (such as "
                "torch.optim.Adam's, which holds `exp_avg_sq`)?"
            )
        m, u = _numpy(entry["exp_avg"]), _numpy(entry["exp_inf"])
        if m.shape != u.shape or m.dtype != u.dtype:
            raise ValueError(
                f"The PyTorch state of {name} has `exp_avg` of {m.dtype}{list(m.shape)} and "
                f"`exp_inf` of {u.dtype}{list(u.shape)}; they must agree."
            )
        mu.append(m)
        nu.append(u)
        steps.append(_whole(_scalar(entry["step"]), f"The `step` of {name}"))
    if len(set(steps)) > 1:
        listed = ", ".join(f"{name}: {s}" for name, s in zip(names, steps, strict=True))
        raise ValueError(
            f"The PyTorch parameters have taken different numbers of steps ({listed}); "
            "adamax_jax keeps one step count for all parameters."
        )
    dtypes = [m.dtype for m in mu]
    return _Peer(_TORCH, names, dtypes, mu, nu, steps[0], hypers, param_dtypes=param_dtypes)


def _keras_hypers(config: Mapping[str, Any], learning_rate: float) -> dict[str, Any]:
    hypers = {
        "learning_rate": learning_rate,
        "beta_1": _scalar(config["beta_1"]),
        "beta_2": _scalar(config["beta_2"]),
        "epsilon": _scalar(config["epsilon"]),
        "weight_decay": _scalar(config.get("weight_decay") or 0.0),
        "gradient_accumulation_steps": config.get("gradient_accumulation_steps"),
        # A moving average of the weights, which is not carried (see `_differences`).
        "use_ema": bool(config.get("use_ema")),
        "ema_overwrite_frequency": config.get("ema_overwrite_frequency"),
    }
    hypers.update({key: config.get(key) for key in _KERAS_CHAIN_ONLY})
    return hypers


def _keras_names(optimizer: Any) -> list[str]:
    variables = optimizer._trainable_variables
    return [f"variable {i} ({getattr(v, 'path', v.name)!r})" for i, v in enumerate(variables)]


def _unwrapped(optimizer: Any) -> Any:
    """A Keras optimizer, with a LossScaleOptimizer's inner optimizer in its place.

    The inner optimizer holds the whole AdaMax state: it takes the steps, on the unscaled
    gradients, and a step skipped for a non-finite gradient is not one of its `iterations`.
    The loss scale (`dynamic_scale`, `step_counter`) is not AdaMax's, and is not carried.
    """
    while type(optimizer).__name__ == "LossScaleOptimizer" and hasattr(
        optimizer, "inner_optimizer"
    ):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _check_keras_optimizer(optimizer: Any, name: str) -> None:
    if type(optimizer).__name__ != "Adamax":
        raise ValueError(
            f"`{name}` is a {_module(optimizer)}.{type(optimizer).__name__}, not a "
            "keras.optimizers.Adamax: its state is not AdaMax's."
        )
    if not optimizer.built or not hasattr(optimizer, "_m"):
        raise ValueError(
            f"The Keras optimizer `{name}` is not built, so it holds no moments: build it "
            "over the model's variables first (`optimizer.build(model.trainable_variables)`)."
        )


def _read_keras(source: Any) -> _Peer:
    if _is_keras_optimizer(source):
        source = _unwrapped(source)
        _check_keras_optimizer(source, "state")
        names = _keras_names(source)
        # Its attributes, not `get_config()` (which reads the rate through a deprecated
        # NumPy path); the rate is the one for its next step (a schedule's at `iterations`).
        config = {key: getattr(source, key, None) for key in _KERAS_CONFIG}
        hypers = _keras_hypers(config, _scalar(source.learning_rate))
        decays = None
        if source.weight_decay:
            decays = [bool(source._use_weight_decay(v)) for v in source._trainable_variables]
        moments, count = (list(source._m), list(source._u)), source.iterations
    else:
        unknown = sorted(set(source) - _KERAS_MAPPING_KEYS)
        if unknown:
            raise ValueError(
                f"The Keras variables hold {unknown}; expected {sorted(_KERAS_MAPPING_KEYS)}."
            )
        if "config" not in source:
            raise ValueError(
                "The Keras variables come without the optimizer's hyperparameters, so they "
                "cannot be checked against `opt`'s: add the optimizer's `get_config()` under "
                "the key 'config', or pass the optimizer itself."
            )
        config = source["config"]
        while isinstance(config.get("inner_optimizer"), Mapping):  # a LossScaleOptimizer's
            config = config["inner_optimizer"].get("config", config["inner_optimizer"])
        if "beta_1" not in config or "epsilon" not in config:
            raise ValueError(
                "The Keras config has no `beta_1` or `epsilon`: it is not a "
                "keras.optimizers.Adamax's."
            )
        if config.get("weight_decay"):
            raise ValueError(
                "The Keras optimizer has weight decay, and its config does not say which "
                "variables it leaves out (`exclude_from_weight_decay`): pass the optimizer "
                "itself, so that they can be checked against `opt`'s mask."
            )
        rate = config["learning_rate"]
        if isinstance(rate, Mapping):
            import keras  # a serialized schedule: keras evaluates it

            rate = keras.optimizers.schedules.deserialize(rate)(_scalar(source["iterations"]))
        hypers = _keras_hypers(config, _scalar(rate))
        moments, count = (list(source["momentums"]), list(source["norms"])), source["iterations"]
        names = [f"variable {i}" for i in range(len(moments[0]))]
        decays = None
    if len(moments[0]) != len(moments[1]):
        raise ValueError(
            f"The Keras optimizer holds {len(moments[0])} momentums and {len(moments[1])} "
            "norms; there must be one of each per variable."
        )
    mu, nu = [], []
    for name, m, u in zip(names, *moments, strict=True):
        if m is None or u is None:
            raise ValueError(
                f"Keras keeps no moments for {name} (it is overwritten with its gradient), "
                "so it cannot be ported."
            )
        mu.append(_numpy(m))
        nu.append(_numpy(u))
    count = _whole(_scalar(count), "The Keras optimizer's `iterations`")
    dtypes = [m.dtype for m in mu]
    return _Peer(_KERAS, names, dtypes, mu, nu, count, [("", hypers)], decays)


def _read(source: Any) -> _Peer:
    if _is_torch_optimizer(source) or _is_torch_state_dict(source):
        return _read_torch(source)
    return _read_keras(source)


# ---------------------------------------------------------------------------------------
# Matching the framework's parameters to the tree

_LAYOUT_HINT_IN = (
    "Where {fw} lays a parameter out otherwise (PyTorch keeps a Linear weight as (out, in) "
    "and a convolution kernel as OIHW, flax as (in, out) and HWIO), pass `(state, from_list)`"
    " to convert_state, with `from_list` the function that ports the parameters from {fw}'s "
    "list (docs/porting.md)."
)
_LAYOUT_HINT_OUT = (
    "Where {fw} lays a parameter out otherwise, pass `order`, the function that ports the "
    "parameters to {fw}'s list, transposing where needed (docs/porting.md)."
)


# A 64-bit dtype and the 32-bit one JAX makes of it without `jax_enable_x64`.
_NARROWER = {
    np.dtype(np.float64): np.dtype(np.float32),
    np.dtype(np.complex128): np.dtype(np.complex64),
}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _place(peer: _Peer, params: Any, from_list: FromList | None) -> tuple[Any, Any, Any]:
    """m, u and the Keras weight-decay flags as trees shaped like `params`, checked against it."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    wanted = [leaf for _, leaf in leaves]
    fw = peer.framework
    flags = None
    if peer.decays is not None:
        # Each variable's flag as an array of its shape (a view, no memory), so that the
        # function that ports the parameters can move it as it moves them.
        flags = [
            np.broadcast_to(np.asarray(d, m.dtype), m.shape)
            for d, m in zip(peer.decays, peer.mu, strict=True)
        ]
    if from_list is None:
        if len(wanted) != len(peer.mu):
            if len(wanted) < len(peer.mu):
                what = ", ".join(
                    f"{peer.names[k]} (shape {tuple(peer.mu[k].shape)})"
                    for k in range(len(wanted), len(peer.mu))
                )
                missing = f"{what} maps to no leaf of `params`"
            else:
                missing = "no parameter of it maps to " + ", ".join(
                    f"`params`{path}" for path in paths[len(peer.mu) :]
                )
            raise ValueError(
                f"The {fw} optimizer holds {len(peer.mu)} parameters and `params` "
                f"{len(wanted)} leaves: {missing}. The i-th parameter in {fw}'s order maps "
                "to the i-th leaf of `params` in `jax.tree.leaves` order, unless "
                "`(state, from_list)` maps them."
            )
        for k, (m, p) in enumerate(zip(peer.mu, wanted, strict=True)):
            if tuple(m.shape) != _shape(p):
                raise ValueError(
                    f"{fw}'s {peer.names[k]} has shape {tuple(m.shape)}, but the leaf it maps "
                    f"to, `params`{paths[k]}, has shape {_shape(p)}. "
                    + _LAYOUT_HINT_IN.format(fw=fw)
                )
        # (before, after) the moments' dtype in a message.
        labels = []
        for k in range(len(wanted)):
            note = ""
            if peer.param_dtypes is not None and peer.param_dtypes[k] != peer.mu[k].dtype:
                # Cast since its moments were made (`p.data = p.data.half()`).
                note = f" (the parameter itself is {jnp.dtype(peer.param_dtypes[k])} now)"
            labels.append((f"{fw} keeps the moments of its {peer.names[k]} in ", note))
        mapped = [None if x is None else treedef.unflatten(x) for x in (peer.mu, peer.nu, flags)]
    else:
        mapped = []
        for x in (peer.mu, peer.nu, flags):
            tree = None if x is None else from_list(list(x))
            if tree is not None and jax.tree.structure(tree) != treedef:
                raise ValueError(
                    f"`from_list` gives a tree of structure {jax.tree.structure(tree)} from "
                    f"{fw}'s list, but `params` has structure {treedef}."
                )
            mapped.append(tree)
        for path, m, p in zip(paths, jax.tree.leaves(mapped[0]), wanted, strict=True):
            if _shape(m) != _shape(p):
                raise ValueError(
                    f"`from_list` gives `params`{path} a moment of shape {_shape(m)} "
                    f"from {fw}'s list, but the parameter has shape {_shape(p)}. "
                    + _LAYOUT_HINT_IN.format(fw=fw)
                )
        labels = [(f"The moments `from_list` gives `params`{p} from {fw} are ", "") for p in paths]
    for (before, after), path, m, p in zip(
        labels, paths, jax.tree.leaves(mapped[0]), wanted, strict=True
    ):
        theirs, ours = jnp.dtype(m.dtype), jnp.dtype(p.dtype)
        if theirs != ours:
            hint = ""
            if _NARROWER.get(theirs) == ours:
                if jax.dtypes.canonicalize_dtype(theirs) != theirs:
                    hint += (
                        f" JAX keeps {theirs} only with `jax.config.update('jax_enable_x64', "
                        f"True)`; without it, `jnp.asarray` makes {ours}."
                    )
                hint += (
                    f" To go on in {ours}, pass `(state, from_list)` with a `from_list` that "
                    f"casts the moments (`lambda ps: [p.astype(np.{ours}) for p in ps]`)."
                )
            raise ValueError(
                f"{before}{theirs}{after}, but `params`{path} is {ours}. Give `params` the "
                "dtype of the moments it receives (and cast the parameters after converting, "
                "if you mean to)." + hint
            )
    return mapped[0], mapped[1], mapped[2]


# ---------------------------------------------------------------------------------------
# Hyperparameters


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    a, b = float(a), float(b)
    return a == b or abs(a - b) <= _RTOL * max(abs(a), abs(b))


def _registered(opt: Any) -> dict[str, Any] | None:
    update = getattr(opt, "update", None)
    if update is None:
        return None
    try:
        return HYPERPARAMETERS.get(update)
    except TypeError:  # not weakly referenceable, so not ours
        return None


def _unreadable(fw: str, way_in: bool) -> ValueError:
    fix = (
        "convert into the AdaMax transformation it holds (built with the same b1, b2, eps, "
        "eps_mode and complex_mode), then into `opt` with the step count as the clock of "
        "its schedule or optax.inject_hyperparams: `inner = convert_state(state, "
        "scale_by_adamax(...), params)`, then `convert_state((inner, "
        "optax.ScaleByScheduleState(adamax_state(inner).count)), opt, params)`"
        if way_in
        else "pass as `opt` the AdaMax transformation it holds: `scale_by_adamax(...)`, built "
        "with the same b1, b2, eps, eps_mode and complex_mode"
    )
    return ValueError(
        f"The hyperparameters of `opt` cannot be read, so {fw}'s cannot be checked against "
        "them: `opt` was not built by `adamax_jax.adamax`, `adamaxw`, `nadamax` or "
        "`scale_by_adamax` (an optax.chain or optax.inject_hyperparams hides them). To go on, "
        f"{fix}. The learning rate, weight decay, `maximize` and clipping are then yours to "
        "match (docs/porting.md)."
    )


def _rates_at(learning_rate: Any, count: int) -> list[float]:
    """`opt`'s rate for the step after `count`: as it runs and, for a schedule, in float64.

    A schedule is compared at the step to come, the only one the state fixes, and at the
    count the state and the schedule's clock hold (saturated at the int32 maximum).
    optax computes a schedule in float32, and a power of a rounded decay rate drifts from
    the exact value (relatively, by up to the count times float32's rounding of the
    rate: 1.3 % at a million steps of `exponential_decay` with a rate of 0.999999), where a
    framework may compute in float64 (PyTorch) or float32 (Keras). The framework's rate
    must match one of the two, each to the same fixed tolerance.
    """
    if not callable(learning_rate):
        return [float(learning_rate)]
    count = min(count, _COUNT_MAX)
    with jax.numpy_dtype_promotion("standard"):  # the schedule is not ours
        rates = [float(np.asarray(learning_rate(jnp.asarray(count, jnp.int32))))]
        try:
            with jax.enable_x64(True):
                exact = float(np.asarray(learning_rate(jnp.asarray(count, jnp.int64))))
        except Exception:  # a schedule that runs in float32 only is compared as it runs
            return rates
    return [*rates, exact]


def _differences(
    peer: _Peer,
    theirs: dict[str, Any],
    ours: dict[str, Any],
    complex_params: bool,
    decay_differs: Sequence[str],
) -> list[str]:
    """What differs between one group of `peer`'s hyperparameters and `opt`'s (`ours`)."""
    fw = peer.framework
    alias = "learning_rate" in ours
    if fw == _TORCH:
        names = {"b1": "betas[0]", "b2": "betas[1]", "eps": "eps", "learning_rate": "lr"}
    else:
        names = {"b1": "beta_1", "b2": "beta_2", "eps": "epsilon"}
        names["learning_rate"] = "learning_rate"
    diffs: list[str] = []

    def differ(key: str, our_value: Any) -> None:
        if not _same(theirs[names[key]], our_value):
            diffs.append(
                f"`{names[key]}` is {theirs[names[key]]!r} in {fw}, `{key}` is "
                f"{our_value!r} in `opt`"
            )

    for key in ("b1", "b2", "eps"):
        differ(key, float(ours[key]))
    if ours["eps_mode"] != _EPS_MODE[fw]:
        diffs.append(
            f"{fw} places ε as `eps_mode={_EPS_MODE[fw]!r}`, `opt` has "
            f"`eps_mode={ours['eps_mode']!r}`"
        )
    if ours["nesterov"]:
        diffs.append(f"`opt` is NadaMax (Nesterov momentum), which {fw}'s Adamax is not")
    # Only complex parameters in JAX make complex_mode matter: a complex PyTorch parameter
    # ported as real (..., 2) pairs (`view_as_real`) runs the same in every mode.
    if fw == _TORCH and complex_params and ours["complex_mode"] != "split":
        diffs.append(
            "PyTorch runs AdaMax on the real and imaginary parts of a complex parameter "
            f"(`complex_mode='split'`), `opt` has `complex_mode={ours['complex_mode']!r}`"
        )
    if alias:
        rate = ours["learning_rate"]
        rates = _rates_at(rate, peer.count)
        their_rate = theirs[names["learning_rate"]]
        if not any(_same(their_rate, r) for r in rates):
            ours_is = f"{rates[-1]!r}"
            if callable(rate):
                ours_is += f" (its schedule at count {min(peer.count, _COUNT_MAX)}"
                if not _same(rates[0], rates[-1]):
                    ours_is += f"; {rates[0]!r} as optax computes it, in float32"
                ours_is += ")"
            diffs.append(
                f"`{names['learning_rate']}` is {their_rate!r} in {fw}, `learning_rate` is "
                f"{ours_is} in `opt`"
            )
        our_decay = float(ours["weight_decay"] or 0.0)
        if fw == _TORCH:
            if theirs["weight_decay"]:
                diffs.append(
                    f"`weight_decay` is {theirs['weight_decay']!r} in PyTorch: L2 added "
                    "to the gradient, which no alias of adamax_jax adds (adamaxw's is "
                    "decoupled); compose `optax.add_decayed_weights` before "
                    "`scale_by_adamax` (docs/porting.md)"
                )
            elif our_decay:
                diffs.append(f"`opt` has decoupled `weight_decay` {our_decay!r}, PyTorch has none")
            if theirs["maximize"]:
                diffs.append(
                    "`maximize` is True in PyTorch, which no alias of adamax_jax does: "
                    "put `optax.scale(-1.0)` first in a chain (docs/porting.md)"
                )
        else:
            if not _same(theirs["weight_decay"], our_decay):
                diffs.append(
                    f"`weight_decay` is {theirs['weight_decay']!r} in Keras, "
                    f"{ours['weight_decay']!r} in `opt`"
                )
            if decay_differs:
                diffs.append(
                    "Keras and `opt`'s `mask` decay different parameters: "
                    + ", ".join(decay_differs)
                )
            for key in _KERAS_CHAIN_ONLY:
                if theirs[key] is not None:
                    diffs.append(
                        f"`{key}` is {theirs[key]!r} in Keras, which no alias of "
                        "adamax_jax has: chain the optax transformation that does it "
                        "before the AdaMax one (docs/porting.md)"
                    )
    if fw == _KERAS:
        if theirs["gradient_accumulation_steps"]:
            diffs.append(
                f"`gradient_accumulation_steps` is {theirs['gradient_accumulation_steps']!r} "
                "in Keras: it changes the steps, and is not carried"
            )
        if theirs["use_ema"]:
            every = theirs["ema_overwrite_frequency"]
            diffs.append(
                "`use_ema` is True in Keras: it keeps a moving average of the weights, which "
                "it writes into them "
                + (f"every {every!r} steps and " if every else "")
                + "at the end of `fit` and which adamax_jax neither keeps nor carries; to go "
                "on without it, set the optimizer's `use_ema` to False first (or the "
                "config's, for a dict of its variables)"
            )
    return diffs


def _check_hyperparameters(
    peer: _Peer,
    opt: Any,
    *,
    way_in: bool,
    complex_params: bool,
    decay_differs: Sequence[str] = (),
) -> None:
    """A ValueError naming every hyperparameter of `peer` that differs from `opt`'s.

    `complex_params`: whether JAX's parameters are complex (complex_mode then matters).
    `decay_differs` names the parameters that Keras and `opt`'s mask decay differently.
    """
    fw = peer.framework
    ours = _registered(opt)
    if ours is None:
        raise _unreadable(fw, way_in)
    for where, theirs in peer.groups:
        diffs = _differences(peer, theirs, ours, complex_params, decay_differs)
        if diffs:
            raise ValueError(
                f"The hyperparameters of {fw}{where} and of `opt` differ: "
                + "; ".join(diffs)
                + ". Build `opt` with the framework's values (docs/porting.md), rather than "
                "going on with other ones."
            )


def _mask(opt: Any, params: Any) -> Any:
    """Per leaf of `params`, whether `opt` (an alias with weight decay) decays it."""
    mask = (_registered(opt) or {}).get("mask")
    treedef = jax.tree.structure(params)
    if mask is None:
        return treedef.unflatten([True] * treedef.num_leaves)
    if callable(mask):
        mask = mask(params)
    try:
        return treedef.unflatten([bool(m) for m in treedef.flatten_up_to(mask)])
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`opt`'s weight-decay `mask` does not have the structure of the parameters: {e}"
        ) from e


def _flag(x: Any) -> bool:
    """A weight-decay flag, from the array of its variable's shape that carries it."""
    x = np.asarray(x)
    return bool(x.reshape(-1)[0]) if x.size else True


# ---------------------------------------------------------------------------------------
# Into JAX


def from_framework(state: Any, opt: optax.GradientTransformation, params: Any) -> Any:
    """:func:`convert_state` for a PyTorch or Keras AdaMax state (see its docstring).

    The moments are read as float32 (or wider) trees shaped like `params`,
    wrapped as an ``optax.ScaleByAdamState`` with the framework's step count
    (and a schedule clock at the same count), and handed to
    :func:`convert_state`, which stores them the way ``opt.init(params)`` does.
    """
    from_list = None
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        state, from_list = state
    peer = _read(state)
    mu, nu, flags = _place(peer, params, from_list)
    differs: list[str] = []
    if flags is not None and (_registered(opt) or {}).get("weight_decay"):
        masks = _mask(opt, params)
        for (path, f), m in zip(
            jax.tree_util.tree_flatten_with_path(flags)[0], jax.tree.leaves(masks), strict=True
        ):
            if _flag(f) != m:
                differs.append(
                    f"`params`{jax.tree_util.keystr(path)} "
                    f"({'decays' if m else 'does not decay'} in `opt`)"
                )
    complex_params = any(jnp.iscomplexobj(p) for p in jax.tree.leaves(params))
    _check_hyperparameters(
        peer, opt, way_in=True, complex_params=complex_params, decay_differs=differs
    )

    def value(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.dtype.itemsize < 4 and not np.iscomplexobj(x):
            x = x.astype(np.float32)  # read in float32 at least, as ours are computed
        return jnp.asarray(x)

    count = jnp.asarray(min(peer.count, _COUNT_MAX), jnp.int32)
    source = (
        optax.ScaleByAdamState(count=count, mu=jax.tree.map(value, mu), nu=jax.tree.map(value, nu)),
        # The learning rate's clock: the next step is the framework's next.
        optax.ScaleByScheduleState(count=count),
    )
    return convert_state(source, opt, params)


# ---------------------------------------------------------------------------------------
# Out of JAX


def _ordered(tree: Any, order: ToList | None) -> tuple[list[Any], list[str]]:
    """The leaves of `tree` in the framework's order, with a label for each."""
    if order is None:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        labels = [f"The moment of `state` at {jax.tree_util.keystr(p)}" for p, _ in leaves]
        return [x for _, x in leaves], labels
    out = list(order(tree))
    return out, [f"Entry {k} of `order(...)`" for k in range(len(out))]


def _check_moments(
    values: list[Any], labels: list[str], peer: _Peer, shapes: list[tuple[int, ...]]
) -> None:
    fw = peer.framework
    if len(values) != len(shapes):
        which = (
            ", ".join(peer.names[len(values) :]) + f" of {fw} gets no moment"
            if len(values) < len(shapes)
            else ", ".join(labels[len(shapes) :]) + f" maps to no parameter of {fw}"
        )
        raise ValueError(
            f"The {fw} optimizer holds {len(shapes)} parameters and `state` {len(values)} "
            f"moments: {which}."
        )
    for label, name, x, shape, dtype in zip(
        labels, peer.names, values, shapes, peer.dtypes, strict=True
    ):
        if tuple(np.shape(x)) != tuple(shape):
            raise ValueError(
                f"{label} has shape {tuple(np.shape(x))}, but {fw}'s {name} has shape "
                f"{tuple(shape)}. " + _LAYOUT_HINT_OUT.format(fw=fw)
            )
        if jnp.iscomplexobj(x) != np.issubdtype(dtype, np.complexfloating):
            raise ValueError(
                f"{label} is {jnp.dtype(x.dtype)}, but {fw}'s {name} is {jnp.dtype(dtype)}: "
                "one is complex and the other is not."
            )


def _count(state: Any) -> int:
    return int(np.asarray(adamax_state(state).count))


def _complex(state: Any) -> bool:
    """Whether `state` is of complex parameters (whose first moments are complex)."""
    return any(jnp.iscomplexobj(m) for m in jax.tree.leaves(first_moment(state)))


def to_torch_state_dict(
    state: Any,
    opt: optax.GradientTransformation,
    optimizer: Any,
    order: ToList | None = None,
) -> dict[str, Any]:
    """A ``torch.optim.Adamax`` state dict holding an AdaMax state of this package.

    The way back from :func:`convert_state`: after
    ``optimizer.load_state_dict(...)`` PyTorch takes the next step as `opt`
    would have. Each parameter gets ``step`` (the step count, a 0-d float
    tensor), ``exp_avg`` (``m_t``, as :func:`first_moment` reads it) and
    ``exp_inf`` (``u_t``, as :func:`infinity_norm` reads it, ε included as
    ``eps_mode="inside_max"`` keeps it), in the parameter's dtype and on its
    device; the param groups are `optimizer`'s. A complex parameter's moments
    are complex, their parts those of the real and imaginary parts
    (``complex_mode="split"``), as PyTorch keeps them.

    `optimizer`'s hyperparameters are checked against `opt`'s, as
    :func:`convert_state` checks them on the way in: ``betas``, ``eps`` (with
    ``eps_mode="inside_max"``), complex parameters in JAX
    (``complex_mode="split"``; real pairs that `order` makes complex take any
    mode) and, where `opt` is an alias, ``lr`` (a schedule at the state's step
    count, which the next step uses), ``weight_decay`` and ``maximize``
    (neither of which an alias has: they must be 0 and False). Where `opt` is
    ``scale_by_adamax``, the building block of a chain, the learning rate,
    weight decay and ``maximize`` are the chain's and are not compared.

    Args:
        state: A state of `opt` (anything holding one
            :class:`ScaleByAdamaxState`), of any storage dtypes.
        opt: The optimizer of `state`: ``adamax(...)``, ``adamaxw(...)`` or
            ``scale_by_adamax(...)`` of this package.
        optimizer: The ``torch.optim.Adamax`` to go on with, over the same
            parameters in PyTorch's layout.
        order: None, if the leaves of the parameters (in ``jax.tree.leaves``
            order) are PyTorch's parameters in its order (the param groups',
            one after another); or a function from a tree shaped like the
            parameters to the list of PyTorch's: the function that ports the
            parameters themselves, transposing where PyTorch's layout differs
            (a Linear weight is (out, in), a flax kernel (in, out)).

    Returns:
        A dict with ``"state"`` and ``"param_groups"``, as
        ``optimizer.state_dict()`` gives one, for ``optimizer.load_state_dict``.

    Raises:
        ValueError: If `optimizer` is not a ``torch.optim.Adamax``, its
            hyperparameters differ from `opt`'s (each is named, with both
            values), `opt`'s cannot be read (an ``optax.chain``: pass its
            ``scale_by_adamax``), or a moment is missing or does not fit its
            parameter (another shape, or complex against real: both named).

    Examples:
        >>> import jax.numpy as jnp
        >>> import pytest
        >>> torch = pytest.importorskip("torch")
        >>> import adamax_jax as ax
        >>> opt = ax.adamax(2e-3, eps_mode="inside_max")
        >>> params = [jnp.ones(3)]
        >>> state = opt.init(params)
        >>> _, state = opt.update([jnp.full(3, 0.5)], state, params)
        >>> weights = [torch.nn.Parameter(torch.ones(3))]
        >>> optimizer = torch.optim.Adamax(weights, lr=2e-3)
        >>> optimizer.load_state_dict(ax.to_torch_state_dict(state, opt, optimizer))
        >>> print(optimizer.state[weights[0]]["exp_inf"])
        tensor([0.5000, 0.5000, 0.5000])
    """
    if not _is_torch_optimizer(optimizer) or type(optimizer).__name__ != "Adamax":
        raise ValueError(
            f"`optimizer` must be a torch.optim.Adamax, got {type(optimizer).__name__}."
        )
    import torch  # `optimizer` is PyTorch's: torch is imported already

    described = optimizer.state_dict()
    names, hypers = _torch_groups(described["param_groups"], "`optimizer`", way_in=False)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    count = _count(state)
    peer = _Peer(_TORCH, names, [_dtype_of(p) for p in tensors], [], [], count, hypers)
    mus, labels = _ordered(first_moment(state), order)
    nus, _ = _ordered(infinity_norm(state), order)
    _check_moments(mus, labels, peer, [tuple(p.shape) for p in tensors])
    _check_hyperparameters(peer, opt, way_in=False, complex_params=_complex(state))
    # The dtype PyTorch gives `step` (torch.optim.optimizer._get_scalar_dtype).
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    groups = [g for g in optimizer.param_groups for _ in g["params"]]
    ids = [i for group in described["param_groups"] for i in group["params"]]
    per_param: dict[Any, dict[str, Any]] = {}
    for i, p, m, u, group in zip(ids, tensors, mus, nus, groups, strict=True):
        # A capturable optimizer keeps `step` on the parameter's device, others on the CPU.
        device = p.device if group.get("capturable") else "cpu"
        per_param[i] = {
            "step": torch.tensor(float(count), dtype=step_dtype, device=device),
            "exp_avg": _tensor(torch, m, p),
            "exp_inf": _tensor(torch, u, p),
        }
    return {"state": per_param, "param_groups": copy.deepcopy(described["param_groups"])}


def _tensor(torch: Any, x: Any, like: Any) -> Any:
    return torch.from_numpy(np.array(x)).to(dtype=like.dtype, device=like.device)


def assign_to_keras(
    state: Any,
    opt: optax.GradientTransformation,
    optimizer: Any,
    order: ToList | None = None,
) -> None:
    """Writes an AdaMax state of this package into a built ``keras.optimizers.Adamax``.

    The way back from :func:`convert_state`: afterwards Keras takes the next
    step as `opt` would have. ``iterations`` becomes the step count, and each
    variable's momentum and norm ``m_t`` and ``u_t`` (as :func:`first_moment`
    and :func:`infinity_norm` read them), cast to the variable's dtype.

    `optimizer`'s hyperparameters are checked against `opt`'s first:
    ``beta_1``, ``beta_2``, ``epsilon`` (with ``eps_mode="denominator"``) and,
    where `opt` is an alias, ``learning_rate`` (Keras' rate for its next step
    against `opt`'s, a schedule's at the state's step count),
    ``weight_decay`` (decoupled: `opt` is then ``adamaxw``, whose `mask` must
    leave out the variables Keras leaves out) and the clipping settings,
    which no alias has. Where `opt` is ``scale_by_adamax``, those are the
    chain's and are not compared. Gradient accumulation and a moving average
    of the weights (``use_ema``) are refused: neither is carried.

    Args:
        state: A state of `opt`, of any storage dtypes.
        opt: The optimizer of `state`: ``adamax``, ``adamaxw`` or
            ``scale_by_adamax`` of this package.
        optimizer: A ``keras.optimizers.Adamax``, built over the variables
            that the parameters are ported to (``optimizer.build(variables)``),
            or a ``LossScaleOptimizer`` around one (its inner optimizer gets
            the state; the loss scale is left as it is).
        order: None, if the leaves of the parameters (in ``jax.tree.leaves``
            order) are the variables in the order the optimizer was built
            with; or a function from a tree shaped like the parameters to that
            list (the function that ports the parameters).

    Raises:
        ValueError: If `optimizer` is not a built ``keras.optimizers.Adamax``,
            its hyperparameters differ from `opt`'s (each is named, with both
            values), `opt`'s cannot be read, or a moment is missing or does not
            fit its variable (both named). `optimizer` is then left as it was.
    """
    if not _is_keras_optimizer(optimizer):
        raise ValueError(
            f"`optimizer` must be a keras.optimizers.Adamax, got {type(optimizer).__name__}."
        )
    optimizer = _unwrapped(optimizer)
    _check_keras_optimizer(optimizer, "optimizer")
    count = _count(state)
    m_tree, u_tree = first_moment(state), infinity_norm(state)
    mus, labels = _ordered(m_tree, order)
    nus, _ = _ordered(u_tree, order)
    targets = list(optimizer._m), list(optimizer._u)
    peer = _read_keras(optimizer)
    _check_moments(mus, labels, peer, [tuple(m.shape) for m in peer.mu])
    differs: list[str] = []
    if peer.decays is not None and (_registered(opt) or {}).get("weight_decay"):
        masks = jax.tree.map(
            lambda f, m: np.broadcast_to(np.asarray(f), np.shape(m)), _mask(opt, m_tree), m_tree
        )
        listed, _ = _ordered(masks, order)
        differs = [
            f"{name} ({'decays' if d else 'does not decay'} in Keras)"
            for name, d, f in zip(peer.names, peer.decays, listed, strict=True)
            if _flag(f) != d
        ]
    # Keras' rate for its next step is read at the new `iterations`; on refusal the old
    # count is put back.
    previous = optimizer.iterations.value
    optimizer.iterations.assign(count)
    try:
        peer.count = count
        peer.groups[0][1]["learning_rate"] = _scalar(optimizer.learning_rate)
        _check_hyperparameters(
            peer, opt, way_in=False, complex_params=_complex(state), decay_differs=differs
        )
    except ValueError:
        optimizer.iterations.assign(previous)
        raise
    for m, u, m_var, u_var in zip(mus, nus, *targets, strict=True):
        m_var.assign(_cast(m, m_var))
        u_var.assign(_cast(u, u_var))


def _cast(x: Any, like: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(_dtype_of(like)))
