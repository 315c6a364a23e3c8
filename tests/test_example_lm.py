"""The small language model example: every storage configuration trains from the same start.

The quick mode (a one-layer model, 60 steps) runs once, in this process, so that the strict
dtype and rank promotion of conftest.py applies to the model and the optimizer alike.
"""

import contextlib
import importlib.util
import io
import json
import math

import pytest

from adamax_jax.examples import tiny_lm

EIGHT_BIT = ["int8 μ, uint8 ν", "float8_e4m3fn"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_lm")
    argv = ["--quick", "--json", str(out / "report.json")]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(out / "loss.png")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = tiny_lm.main(argv)
    report = json.loads((out / "report.json").read_text())
    return status, stdout.getvalue(), report, out


def _runs(report):
    return {r["name"]: r for r in report["runs"]}


def test_the_quick_mode_exits_0_and_prints_a_row_per_configuration(quick):
    status, text, report, _ = quick
    assert status == 0, text
    assert list(_runs(report)) == list(tiny_lm.CONFIGS)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| optimizer state | validation loss | vs float32 state")
    for name in tiny_lm.CONFIGS:
        (row,) = [r for r in rows if r.startswith(f"| {name} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6, row
        assert math.isfinite(float(cells[1])), row
    assert "machine: " in text and report["machine"] in text
    assert "cores" in report["machine"]


def test_every_configuration_starts_from_the_same_loss_near_ln_vocab(quick):
    _, _, report, _ = quick
    initial = {name: r["val_loss"][0] for name, r in _runs(report).items()}
    assert len(set(initial.values())) == 1, initial
    (first,) = set(initial.values())
    # Small initial logits: the first prediction is close to uniform over the alphabet.
    assert abs(first - math.log(report["vocab"])) < 0.1, (first, report["vocab"])


@pytest.mark.parametrize("name", list(tiny_lm.CONFIGS))
def test_losses_are_finite_and_fall_below_the_initial_loss(quick, name):
    _, _, report, _ = quick
    run = _runs(report)[name]
    losses = run["val_loss"]
    assert run["steps"][0] == 0 and run["steps"][-1] == tiny_lm.QUICK.steps
    assert len(losses) == len(run["steps"]) >= 3
    assert all(math.isfinite(v) for v in losses), losses
    assert run["train_loss"][0] is None
    assert all(math.isfinite(v) for v in run["train_loss"][1:]), run["train_loss"]
    # Well below uniform guessing, and lower at the end than at the first measurement.
    assert losses[-1] < 0.8 * math.log(report["vocab"]), losses
    assert losses[-1] < losses[1] < losses[0], losses
    assert run["ms_per_step"] > 0 and run["compile_s"] > 0


def test_state_bytes_fall_from_float32_to_bfloat16_to_8_bits(quick):
    _, _, report, _ = quick
    per_param = {name: r["state_bytes_per_param"] for name, r in _runs(report).items()}
    # Two float32 moments a parameter, and a step count.
    assert 8 <= per_param["float32"] < 8.01, per_param
    assert per_param["float32"] > per_param["bfloat16"], per_param
    for name in EIGHT_BIT:
        assert per_param["bfloat16"] > per_param[name], per_param


@pytest.mark.parametrize("name", ["bfloat16", *EIGHT_BIT])
def test_low_precision_state_trains_about_as_well_as_float32(quick, name):
    # A loose bound for 60 steps of a tiny model; the full run's numbers are in the docs.
    _, _, report, _ = quick
    runs = _runs(report)
    reference = runs["float32"]["val_loss"][-1]
    assert abs(runs[name]["val_loss"][-1] - reference) < 0.05 * reference


def test_the_plot_is_saved(quick):
    pytest.importorskip("matplotlib")
    _, text, _, out = quick
    assert (out / "loss.png").stat().st_size > 10_000
    assert f"figure saved to {out / 'loss.png'}" in text


def test_the_table_reports_the_difference_from_float32_state():
    report = {
        "runs": [
            {
                "name": name,
                "val_loss": [3.6, loss],
                "state_bytes_per_param": 8.0,
                "ms_per_step": 1.0,
                "compile_s": 1.0,
            }
            for name, loss in (("float32", 1.0), ("bfloat16", 1.01), ("int8 μ, uint8 ν", 0.98))
        ]
    }
    rows = tiny_lm.table(report).splitlines()
    assert "| bfloat16 | 1.0100 | +1.00 % |" in rows[3]
    assert "| int8 μ, uint8 ν | 0.9800 | -2.00 % |" in rows[4]


def test_the_text_is_the_same_for_a_seed_and_differs_between_seeds():
    text = tiny_lm.make_text(5000, seed=3)
    assert text == tiny_lm.make_text(5000, seed=3)
    assert text != tiny_lm.make_text(5000, seed=4)
    assert len(text) == 5000
    # Sentences: capitalised, ended, and agreeing in number.
    assert text[0].isupper() and text.count(".") > 50 and "?" in text
    assert " an old " in text or " an angry " in text or " an eager " in text
    assert " a old " not in text and " a eager " not in text


def test_steps_below_one_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tiny_lm.main(["--quick", "--steps", "0"])
    assert exit_info.value.code == 2
    assert "`--steps` must be >= 1, got 0." in capsys.readouterr().err
