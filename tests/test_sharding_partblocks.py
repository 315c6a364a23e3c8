"""8-bit state under every sharding the docs allow: as on one device, or refused at init.

Shards that cut blocks and last axes that end in a part block, for every
8-bit storage dtype, on Auto and Explicit mesh axes, FSDP-style and with ZeRO-1 state
(``zero1_state_shardings``): after 5 jitted steps, with a steady gradient of 1 and
with random ones, the parameters, ``infinity_norm`` and ``first_moment`` are those of
the same steps on one device, bit for bit, or ``init`` refused the leaf, naming it.
The runs are in tests/_partblock_worker.py, one subprocess on 8 host devices; the
tests read only what the public API gives back, whatever the state's layout.
"""

import json

import numpy as np
import pytest

from tests import _partblock_worker as worker
from tests import background

WHAT = ("params", "nu", "mu")
HOW = ("sharded", "single")
CASES = [
    (dtype, run, kind) for dtype in worker.DTYPES for run in worker.RUNS for kind in worker.KINDS
]


@pytest.fixture(scope="module")
def runs():
    # tests._partblock_worker on 8 devices, started with the session (tests/background.py).
    out = background.result("partblocks")
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "arrays.npz") as arrays:
        return results, dict(arrays)


def _record(runs, dtype, run):
    record = runs[0][f"{dtype}/{run}"]
    assert record["error"] is None, f"{dtype} {run}: {record['error']}"
    return record


def _mismatch(got, want, what, run):
    """How `got` differs from the single-device `want`, or None where it may not.

    Bit for bit: the step is elementwise and its reductions are maxima, which no
    partitioning reorders. One exception: under ZeRO-1 on Explicit axes the updates
    are resharded to the parameters' layout before they are added, so the sharded
    program rounds each update to float32 before the add, where the whole one may
    fuse it into the add unrounded; u and m stay bit for bit, and each step can move
    a parameter one unit in the last place apart (so `STEPS` units after the run,
    units of the largest magnitude the parameter passed through).
    """
    if got.shape != want.shape:
        return f"shape {got.shape}, not {want.shape}"
    if what == "params" and run == "explicit-zero1":
        # A step moves a parameter by at most about the learning rate (twice it, to
        # be safe): the units are those of the largest magnitude it passed through.
        passed = np.maximum(np.abs(got), np.abs(want)) + 2 * worker.STEPS * worker.LEARNING_RATE
        bound = worker.STEPS * np.spacing(passed.astype(np.float32)).astype(np.float64)
        bad = ~(np.abs(got.astype(np.float64) - want) <= bound)
    else:
        bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
        # The bits too: 0.0 and -0.0 compare equal.
        bad |= np.signbit(got) != np.signbit(want)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return (
        f"{int(bad.sum())} of {bad.size} values differ; first at {index}: "
        f"{got[index]!r} (sharded) vs {want[index]!r} (one device)"
    )


@pytest.mark.parametrize("dtype, run, kind", CASES)
def test_sharded_8_bit_steps_equal_one_device_or_init_refuses(runs, dtype, run, kind):
    record = _record(runs, dtype, run)
    trained, refused = set(record["trained"]), set(record["refused"])
    assert trained | refused == set(record["leaves"]) and not trained & refused, record
    arrays = runs[1]
    wrong = []
    for leaf in sorted(trained):
        for what in WHAT:
            got, want = (arrays[f"{dtype}/{run}/{kind}/{how}/{what}/{leaf}"] for how in HOW)
            problem = _mismatch(got, want, what, run)
            if problem is not None:
                wrong.append(f"{what}['{leaf}'] {worker.LAYOUT[leaf]}: {problem}")
    assert not wrong, f"{dtype}, {run}, gradients {kind}, against one device:\n" + "\n".join(wrong)


@pytest.mark.parametrize("dtype, run", [(d, r) for d in worker.DTYPES for r in worker.RUNS])
def test_a_steady_gradient_moves_every_parameter_about_the_learning_rate_a_step(runs, dtype, run):
    # With g = 1 a part block's ν scale saturated on a sharded step, and its
    # parameters stopped after the first (or, with a non-finite peak, went NaN). Five
    # steps of about the learning rate each, whatever one device does.
    record = _record(runs, dtype, run)
    arrays = runs[1]
    least = 0.8 * worker.STEPS * worker.LEARNING_RATE
    start = worker.host_params({k: worker.LAYOUT[k][0] for k in record["trained"]})
    for leaf in record["trained"]:
        moved = np.abs(
            arrays[f"{dtype}/{run}/ones/sharded/params/{leaf}"].astype(np.float64) - start[leaf]
        )
        assert np.all(moved >= least), (
            f"params['{leaf}'] {worker.LAYOUT[leaf]}: {int(np.sum(~(moved >= least)))} values "
            f"moved less than {least} in {worker.STEPS} steps (least {np.nanmin(moved)}, "
            f"NaN: {int(np.isnan(moved).sum())})"
        )


@pytest.mark.parametrize("dtype", worker.DTYPES)
def test_auto_axes_place_every_8_bit_layout_and_explicit_axes_refuse_cut_blocks(runs, dtype):
    # The documented rule: on Auto axes the compiler places blocks cut by shards; on
    # Explicit axes a leaf whose shards of the last axis do not hold whole blocks is
    # refused at init with a ValueError naming it, and every other leaf is trained.
    auto = _record(runs, dtype, "auto")
    assert auto["refused"] == {}, sorted(auto["refused"])
    explicit = _record(runs, dtype, "explicit")
    cut = {k for k in explicit["leaves"] if worker.cuts_blocks(*worker.LAYOUT[k])}
    assert cut and set(explicit["refused"]) == cut, (sorted(explicit["refused"]), sorted(cut))
    for leaf, message in explicit["refused"].items():
        assert f"params['{leaf}']" in message and "whole blocks" in message, message


@pytest.mark.parametrize("dtype", worker.DTYPES)
@pytest.mark.parametrize("run", worker.RUNS)
def test_steps_keep_the_parameters_and_the_state_where_they_were(runs, dtype, run):
    # A step's outputs are laid out as its inputs: the parameters, and every array of
    # the state, scales included, on every layout of these leaves.
    record = _record(runs, dtype, run)
    assert record["trained"], record
    assert record["relaid"] == [], record["relaid"]


@pytest.mark.parametrize("dtype", worker.DTYPES)
def test_zero1_on_explicit_axes_refuses_what_the_parameters_layout_refuses(runs, dtype):
    # ZeRO-1 splits the state further than the parameters: it may refuse more, never less.
    record = _record(runs, dtype, "explicit-zero1")
    cut = {k for k in record["leaves"] if worker.cuts_blocks(*worker.LAYOUT[k])}
    assert cut and set(record["refused"]) >= cut, sorted(record["refused"])
