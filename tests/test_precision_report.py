"""`python -m adamax_jax.precision_report` runs every row the docs quote, and reads u right."""

import math
import re

from adamax_jax import precision_report as pr

DRIFT = re.compile(r"^(\S+) % \((\S+) %\)$")  # "largest % (median %)"


def _at_most(cell, bound):
    """Whether a drift cell's largest value is at most `bound` (a fraction), as printed."""
    largest = float(DRIFT.match(cell).group(1))
    return largest <= float(f"{100 * bound:.3g}")


def test_every_row_of_the_report_runs_and_reads_u_within_its_storage_bound(capsys):
    # 4096 parameters: the smallest leaf whose 8-bit moments are stored in blocks.
    pr.main(["--steps", "20", "--size", "4096"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            name, *cells = line.strip("| ").split(" | ")
            assert name not in rows, f"two rows named {name!r}"
            rows[name] = cells
    for config in pr.configs():
        cells = rows[config.name]
        assert len(cells) == 5, cells
        assert float(cells[0]) > 0, cells
        for cell in cells[1:]:
            match = DRIFT.match(cell)
            assert match, cell
            assert all(math.isfinite(float(x)) for x in match.groups()), cells
    assert rows["f32 params, f32 state"][1:] == ["0 % (0 %)"] * 4
    # u as each storage holds it, against float32's: a bfloat16 ν rounded up is at most one
    # unit in the last place above (2^-7 of it), one rounded to nearest half a unit (2^-8),
    # and a uint8 ν one code above (1/14). Reading ν without its scale, or divided by it,
    # is off by the scale (1.9 here), far past these.
    for name, bound in (
        ("f32 params, bf16 mu and nu", 2.0**-7),
        ("ablation: f32 params, bf16 mu rounded to nearest, scaled nu", 2.0**-8),
        ("f32 params, int8 mu, uint8 nu", 1 / 14),
    ):
        assert all(_at_most(cell, bound) for cell in rows[name][1:3]), (name, rows[name])
