"""`python -m adamax_jax.precision_report` runs every row the docs quote."""

import math
import re

from adamax_jax import precision_report as pr

DRIFT = re.compile(r"^(\S+) % \((\S+) %\)$")  # "largest % (median %)"


def test_every_row_of_the_report_runs_and_float32_state_has_no_drift(capsys):
    # 4096 parameters: the smallest leaf whose 8-bit moments are stored in blocks.
    pr.main(["--steps", "20", "--size", "4096"])
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith("| ---"):
            name, *cells = line.strip("| ").split(" | ")
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
