import io
import json
import math
import statistics
import struct
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from adamax_jax import benchmark
from tests import background
from tests.reference import adamax_numpy

ROOT = Path(__file__).resolve().parents[1]
TREES = ["one-leaf", "many-leaves", "transformer", "small-tree"]
JAX_ROWS = [
    benchmark.FLOOR,
    benchmark.OURS,
    benchmark.OURS_BF16,
    benchmark.OURS_INT8,
    benchmark.OURS_FP8,
    benchmark.OPTAX,
]
STORAGE_ROWS = {
    "float32": benchmark.OURS,
    "bfloat16": benchmark.OURS_BF16,
    "int8": benchmark.OURS_INT8,
    "float8": benchmark.OURS_FP8,
}
TORCH_ROWS = [benchmark.TORCH_FOREACH, benchmark.TORCH_LOOP]
F32_ROWS = [benchmark.FLOOR, benchmark.OURS, benchmark.OPTAX, *TORCH_ROWS]


def _torch_installed():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _require_torch_rows(report):
    """Skips, visibly, where the run could not have PyTorch rows."""
    if report["machine"]["backend"] != "cpu":
        pytest.skip(
            f"the PyTorch rows run on the CPU; the backend is {report['machine']['backend']}"
        )
    if not _torch_installed():
        pytest.skip("torch is not installed: the PyTorch rows are not checked")


@pytest.fixture(scope="module")
def quick():
    """One `--quick` run in a fresh process, as a user or CI would start it (started with
    the session, tests/background.py)."""
    out = background.result("benchmark-quick")
    report = json.loads((out / "results.json").read_text())
    return out, _completed(out), report


def _completed(out):
    """The run's exit status (0: background.result checked it), stdout and stderr."""
    return subprocess.CompletedProcess(
        "benchmark",
        0,
        (out / "worker_0.out").read_text(),
        (out / "worker_0.err").read_text(),
    )


def _rows(tree):
    return {r["optimizer"]: r for r in tree["results"]}


def test_runs_with_progress_and_a_table(quick):
    _, proc, report = quick
    for key in TREES:
        assert f"### {key}:" in proc.stdout
    assert "| optimizer | median ms | × floor |" in proc.stdout
    summary = proc.stdout.split("### summary")[1].split("###")[0]
    assert [line.split("|")[1].strip() for line in summary.splitlines()[4:8]] == TREES
    # The progress display: one line per tree and per optimizer, and the timing bar.
    assert proc.stderr.count("timing") == len(TREES)
    assert proc.stderr.count("compiled in") == len(TREES) * len(JAX_ROWS)
    assert report["quick"] is True
    assert report["command"] == "python -m adamax_jax.benchmark --quick --out " + str(quick[0])


def test_json_describes_the_trees(quick):
    _, _, report = quick
    assert [t["key"] for t in report["trees"]] == TREES
    for tree in report["trees"]:
        assert tree["n_leaves"] == len(tree["leaf_shapes"])
        assert tree["n_params"] == sum(math.prod(s) for s in tree["leaf_shapes"])
        assert tree["param_bytes"] == 4 * tree["n_params"]
    meta = report["machine"]
    for field in ("cpu", "cpu_count", "threads", "backend", "jax", "optax", "python"):
        assert meta[field]
    assert benchmark.machine_line(meta) in quick[1].stdout
    assert meta["cpu"] in benchmark.machine_line(meta)
    assert f"jax {meta['jax']} (" in benchmark.machine_line(meta)


def test_every_optimizer_is_timed(quick):
    _, _, report = quick
    assert report["steps"] >= 10
    for tree in report["trees"]:
        rows = _rows(tree)
        assert list(rows)[: len(JAX_ROWS)] == JAX_ROWS
        floor = rows[benchmark.FLOOR]["median_s"]
        optax_s = rows[benchmark.OPTAX]["median_s"]
        for r in rows.values():
            assert r["steps"] == report["steps"]
            assert 0 < r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"]
            assert math.isclose(r["x_floor"], r["median_s"] / floor)
            assert math.isclose(r["speedup_vs_optax"], optax_s / r["median_s"])
            assert math.isclose(r["gb_per_s"], r["bytes_per_step"] / r["median_s"] / 1e9)


def test_the_pytorch_rows_are_timed_where_torch_runs(quick):
    _, _, report = quick
    _require_torch_rows(report)
    assert not any("PyTorch rows skipped" in n for n in report["notes"])
    for tree in report["trees"]:
        assert list(_rows(tree)) == JAX_ROWS + TORCH_ROWS


def test_bytes_moved_are_the_seven_streams(quick):
    _, _, report = quick
    for tree in report["trees"]:
        rows = _rows(tree)
        n = tree["n_params"]
        for name in F32_ROWS:
            if name in rows:
                assert rows[name]["bytes_per_step"] == 7 * 4 * n, name
        # θ read and written and g read in float32, m and u read and written in bfloat16.
        assert rows[benchmark.OURS_BF16]["bytes_per_step"] == (3 * 4 + 4 * 2) * n


def test_state_bytes_per_parameter(quick):
    _, _, report = quick
    for tree in report["trees"]:
        rows = _rows(tree)
        n = tree["n_params"]
        # Two float32 moments and an int32 step count.
        assert rows[benchmark.OURS]["state_bytes"] == 8 * n + 4
        assert rows[benchmark.OPTAX]["state_bytes"] == 8 * n + 4
        # Two bfloat16 moments, the step count and the float32 scale of each ν.
        assert rows[benchmark.OURS_BF16]["state_bytes"] == 4 * n + 4 + 4 * tree["n_leaves"]
        assert rows[benchmark.OURS]["state_x_params"] == pytest.approx(2.0, abs=1e-4)
        expected = (4 * n + 4 + 4 * tree["n_leaves"]) / (4 * n)
        assert rows[benchmark.OURS_BF16]["state_x_params"] == pytest.approx(expected, abs=1e-4)
        # Leaves of 4096 values or more: 8-bit μ and ν, and a float32 scale per
        # block of 256 along the last axis for each; the others in float32. With
        # any 8-bit leaf, the state holds the block size as the length of a uint8 array.
        eight_bit = 4
        for shape in tree["leaf_shapes"]:
            size = math.prod(shape)
            blocks = math.prod(shape[:-1]) * math.ceil(shape[-1] / 256) if shape else 0
            eight_bit += 2 * size + 2 * 4 * blocks if size >= 4096 else 8 * size
        if any(math.prod(shape) >= 4096 for shape in tree["leaf_shapes"]):
            eight_bit += 256
        assert rows[benchmark.OURS_INT8]["state_bytes"] == eight_bit, tree["key"]
        assert rows[benchmark.OURS_FP8]["state_bytes"] == eight_bit, tree["key"]
        for name in TORCH_ROWS:
            if name in rows:
                # Two moments and one step tensor per parameter tensor.
                assert 8 * n < rows[name]["state_bytes"] <= 8 * n + 8 * tree["n_leaves"]


def test_rows_report_their_distance_from_optax(quick):
    _, _, report = quick
    for tree in report["trees"]:
        rows = _rows(tree)
        assert rows[benchmark.FLOOR]["max_abs_diff_vs_optax"] is None
        for name in [benchmark.OURS, *TORCH_ROWS]:
            if name in rows:
                # After a dozen steps of 2e-3 each: float32 rounding only.
                assert rows[name]["max_abs_diff_vs_optax"] <= 1e-6, (tree["key"], name)
        # bfloat16 moments move each step of 2e-3 by their rounding: m by up to a unit in
        # its last place (2**-7 relative at worst, a stochastic store), u by up to one
        # too (rounded up, never below the gradient).
        bound = (report["steps"] + report["warmup"]) * 2e-3 * (2.0**-7 + 2.0**-7)
        assert 0 < rows[benchmark.OURS_BF16]["max_abs_diff_vs_optax"] <= bound


def _adamax_float64(params, grad, steps):
    """The float64 reference of tests/reference.py, ε inside the max as every row has it."""
    grads = np.broadcast_to(np.asarray(grad, np.float64), (steps, *np.shape(grad)))
    history = adamax_numpy(
        np.asarray(params, np.float64),
        grads,
        lr=benchmark.LEARNING_RATE,
        b1=benchmark.B1,
        b2=benchmark.B2,
        eps=benchmark.EPS,
        eps_mode="inside_max",
    )
    return history[-1][0]


@pytest.fixture(scope="module")
def final_params():
    """A small tree through `run_tree`, keeping every row's runner to read its parameters."""
    spec = benchmark.TreeSpec("tiny", "tiny", (("a", (64, 3)), ("b", (5,)), ("c", ())))
    runners = []

    def keep(make):
        def wrapped(*args, **kwargs):
            runner = make(*args, **kwargs)
            runners.append(runner)
            return runner

        return wrapped

    steps, warmup = 3, 2
    with pytest.MonkeyPatch.context() as mp, jax.numpy_dtype_promotion("standard"):
        for name in ("make_runner", "torch_runner"):
            mp.setattr(benchmark, name, keep(getattr(benchmark, name)))
        tree = benchmark.run_tree(
            spec,
            steps=steps,
            warmup=warmup,
            compile_repeats=1,
            with_torch=benchmark.torch_skip_reason() is None,
            threads=1,
            progress=benchmark.Progress(io.StringIO()),
            label="tiny",
            # Each row compiled once, as --quick does: only the parameters are read here.
            dump_compiles=True,
        )
    params, grads = benchmark.tree_data(spec)
    finals = {r.name: dict(zip(params, r.params(), strict=True)) for r in runners}
    return tree, params, grads, finals, steps + warmup


@pytest.mark.parametrize(
    "name, rtol",
    [
        (benchmark.OURS, 1e-5),
        (benchmark.OPTAX, 1e-5),
        # bfloat16 moments: each step off by up to a unit in the last place of m (2**-7
        # relative at worst) and half of one of u.
        (benchmark.OURS_BF16, 2.0**-7 + 2.0**-8),
        (benchmark.TORCH_FOREACH, 1e-5),
        (benchmark.TORCH_LOOP, 1e-5),
    ],
)
def test_each_row_lands_on_the_float64_reference(final_params, name, rtol):
    tree, params, grads, finals, steps = final_params
    if name in TORCH_ROWS and name not in finals:
        _require_torch_rows({"machine": {"backend": jax.default_backend()}})
    assert [r["optimizer"] for r in tree["results"]] == list(finals)
    for key, p0 in params.items():
        want = _adamax_float64(p0, grads[key], steps)
        moved = np.abs(want - p0)
        # The displacement, not the parameter, is what a row computes: compare that.
        np.testing.assert_allclose(
            finals[name][key] - p0, want - p0, rtol=rtol, atol=1e-7, err_msg=f"{name}, {key}"
        )
        # A constant gradient: every step is lr · |g| / (|g| + ε), just under lr.
        assert np.all(moved <= steps * benchmark.LEARNING_RATE * (1 + 1e-12))
        assert np.median(moved) > 0.99 * steps * benchmark.LEARNING_RATE


def test_the_floor_row_is_its_documented_kernel(final_params):
    # θ - lr · g per step: its memory traffic is AdaMax's, its arithmetic is not.
    _, params, grads, finals, steps = final_params
    for key, p0 in params.items():
        want = np.asarray(p0, np.float64) - steps * benchmark.LEARNING_RATE * grads[key]
        np.testing.assert_allclose(finals[benchmark.FLOOR][key], want, rtol=1e-6, err_msg=key)


def test_reported_distances_are_those_of_the_final_parameters(final_params):
    tree, _, _, finals, _ = final_params
    for row in tree["results"]:
        if row["optimizer"] == benchmark.FLOOR:
            continue
        diff = max(
            float(np.max(np.abs(finals[row["optimizer"]][k] - finals[benchmark.OPTAX][k])))
            for k in finals[benchmark.OPTAX]
        )
        assert row["max_abs_diff_vs_optax"] == diff, row["optimizer"]


def test_compile_time_and_memory_of_the_jax_rows(quick):
    _, _, report = quick
    for tree in report["trees"]:
        for name, r in _rows(tree).items():
            if name in TORCH_ROWS:
                assert r["compile_s"] is None and r["temp_bytes"] is None
                continue
            assert r["compile_s"] > 0
            assert math.isclose(r["compile_s"], r["lower_s"] + r["xla_compile_s"])
            assert len(r["compile_runs_s"]) == report["compile_repeats"]
            assert r["compile_s"] == statistics.median_low(r["compile_runs_s"])
            assert r["compile_timed_out"] is False and r["compile_in_subprocess"] is False
            assert r["compile_error"] is None and r["compile_peak_rss_bytes"] is None
            assert r["temp_bytes"] is not None
            assert r["no_full_size_temp"] == (r["temp_bytes"] < r["full_size_bytes"])
            assert r["temp_x_largest_leaf"] == r["temp_bytes"] / tree["largest_leaf_bytes"]
            # Donated: every parameter and state buffer is reused for the output.
            assert r["alias_bytes"] == tree["param_bytes"] + r["state_bytes"], (tree["key"], name)


@pytest.mark.parametrize("name", [benchmark.FLOOR, benchmark.OURS, benchmark.OPTAX])
def test_float32_steps_allocate_no_full_size_buffer(quick, name):
    _, _, report = quick
    for tree in report["trees"]:
        r = _rows(tree)[name]
        assert r["full_size_bytes"] == 4 * max(math.prod(s) for s in tree["leaf_shapes"])
        assert r["no_full_size_temp"] is True, (tree["key"], r["temp_bytes"])
        assert r["leaf_sized_temp"] is False, (tree["key"], r["temp_buffers"])


def test_bfloat16_state_step_allocates_no_full_size_buffer(quick):
    _, _, report = quick
    for tree in report["trees"]:
        r = _rows(tree)[benchmark.OURS_BF16]
        assert r["full_size_bytes"] == 2 * max(math.prod(s) for s in tree["leaf_shapes"])
        assert r["no_full_size_temp"] is True, (tree["key"], r["temp_bytes"])
        assert r["leaf_sized_temp"] is False, (tree["key"], r["temp_buffers"])


def test_temp_buffers_are_read_where_a_leaf_would_fit(quick):
    _, _, report = quick
    read = 0
    for tree in report["trees"]:
        shapes = [s for s in tree["leaf_shapes"] if math.prod(s) > 1]
        smallest = min(math.prod(s) for s in shapes)
        for name in JAX_ROWS:
            r = _rows(tree)[name]
            buffers = r["temp_buffers"]
            if r["temp_bytes"] < smallest:
                assert buffers is None and r["leaf_sized_temp"] is False, (tree["key"], name)
                continue
            read += 1
            # XLA's buffer assignment counts the temporaries that memory_analysis does.
            assert buffers["temp_allocation_bytes"] == r["temp_bytes"], (tree["key"], name)
            assert 0 < buffers["largest_bytes"] <= r["temp_bytes"]
            assert buffers["leaf_sized_bytes"] <= r["temp_bytes"]
            assert r["leaf_sized_temp"] == (buffers["leaf_sized_count"] > 0)
    # The 8-bit steps of the trees with 8-bit leaves at least.
    assert read >= 2 * (len(TREES) - 1)


BUFFER_ASSIGNMENT = """BufferAssignment:
allocation 0: size 65536, parameter 1, shape |f32[64,256]| at ShapeIndex {}, maybe-live-out:
 value: <478 p__w__.1 @0> (size=65536,offset=0): f32[64,256]{1,0}
 value: <487 multiply_add_fusion @0> (size=65536,offset=0): f32[64,256]{1,0}
allocation 8: size 16, output shape is |(f32[64,256], s32[])|, maybe-live-out:
 value: <488 tuple.4{} @0> (size=16,offset=0): (f32[64,256]{1,0}, s32[])
allocation 9: size 1, thread-local:
 value: <500 compare.3 @0> (size=1,offset=0): pred[]
allocation 10: size 16, constant:
 value: <501 constant.2 @0> (size=16,offset=0): f32[4]{0}
allocation 12: size 16528, preallocated-temp:
 value: <467 copy.7 @0> (size=4,offset=0): f32[]
 value: <474 copy.8 @0> (size=16384,offset=64): u8[64,256]{1,0}
 value: <480 reduce_fusion @0> (size=64,offset=16448): f32[64,1]{1,0}
"""


def test_temp_buffers_are_parsed_from_the_buffer_assignment():
    total, buffers = benchmark.temp_buffers(BUFFER_ASSIGNMENT)
    assert total == 16528
    assert buffers == [
        (4, (), "f32[]"),
        (16384, (64, 256), "u8[64,256]"),
        (64, (64, 1), "f32[64,1]"),
    ]


def test_one_line_per_tree_and_storage_kind(quick):
    _, proc, report = quick
    assert report["storage"] == list(STORAGE_ROWS)
    section = proc.stdout.split("### storage")[1].split("\n###")[0]
    lines = [
        line.split("|")[1:-1]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    header, body = lines[0], lines[1:]
    assert [c.strip() for c in header][:6] == [
        "tree",
        "storage",
        "step ms",
        "× float32 step",
        "compile s",
        "× float32 compile",
    ]
    assert [(c[0].strip(), c[1].strip()) for c in body] == [
        (t, kind) for t in TREES for kind in STORAGE_ROWS
    ]
    by_line = {(c[0].strip(), c[1].strip()): [x.strip() for x in c] for c in body}
    for tree in report["trees"]:
        rows = _rows(tree)
        assert [r["storage"] for r in rows.values()][: len(JAX_ROWS)] == [
            None,
            *STORAGE_ROWS,
            None,
        ]
        for kind, name in STORAGE_ROWS.items():
            r, cells = rows[name], by_line[(tree["key"], kind)]
            assert cells[2] == f"{r['median_s'] * 1e3:.2f}"
            assert cells[3] == f"{r['x_float32_state']:.2f}"
            assert cells[4] == f"{r['compile_s']:.2f}"
            assert cells[5] == f"{r['compile_x_float32_state']:.2f}"
            assert cells[6] == "-"  # the peak memory of a compile in a fresh process
            assert cells[7] == f"{r['state_bytes_per_param']:.2f}"


def test_ratios_to_float32_state_are_paired_by_round(quick):
    _, _, report = quick
    for tree in report["trees"]:
        rows = _rows(tree)
        base = rows[benchmark.OURS]
        assert base["x_float32_state"] == 1.0
        assert base["compile_x_float32_state"] == 1.0
        for name, r in rows.items():
            assert len(r["times_s"]) == report["steps"]
            assert r["median_s"] == statistics.median(r["times_s"])
            paired = [t / b for t, b in zip(r["times_s"], base["times_s"], strict=True)]
            assert r["x_float32_state"] == pytest.approx(statistics.median(paired))
            if name not in TORCH_ROWS:
                want = r["compile_s"] / base["compile_s"]
                assert r["compile_x_float32_state"] == pytest.approx(want)


@pytest.fixture(scope="module")
def fresh():
    """A `--compile-timeout` run: each compile in a fresh process, two of each (started with
    the session, tests/background.py)."""
    out = background.result("benchmark-fresh")
    return _completed(out), json.loads((out / "results.json").read_text())


def test_compiles_in_fresh_processes(fresh):
    proc, report = fresh
    assert report["storage"] == ["float32", "int8"]
    assert any("float32 state was added" in n for n in report["notes"])
    assert report["compile_timeout_s"] == 300
    (tree,) = report["trees"]
    assert (tree["key"], tree["n_leaves"], tree["n_params"]) == ("leaves-2", 2, 2 * 16_384)
    rows = _rows(tree)
    names = [benchmark.FLOOR, benchmark.OURS, benchmark.OURS_INT8, benchmark.OPTAX]
    assert list(rows) == names
    # Interleaved: every row's first compile, then every row's second.
    compiled = [line for line in proc.stderr.splitlines() if "compiled in" in line]
    assert [line.split("] ", 2)[2].split(":")[0] for line in compiled] == names * 2
    assert all("fresh process" in line for line in compiled)
    for name, r in rows.items():
        assert r["compile_in_subprocess"] is True and r["compile_timed_out"] is False
        assert r["compile_timeout_s"] == 300
        assert len(r["compile_runs_s"]) == 2
        assert r["compile_s"] == statistics.median_low(r["compile_runs_s"]) > 0
        assert r["steps"] == 3 and r["median_s"] > 0
        assert r["compile_error"] is None and r["compile_peak_rss_bytes"] > 0
        # The executable compiled in the worker is the one timed here.
        assert r["alias_bytes"] == tree["param_bytes"] + r["state_bytes"], name
        if r["temp_buffers"] is not None:
            assert r["temp_buffers"]["temp_allocation_bytes"] == r["temp_bytes"], name
    assert rows[benchmark.OURS_INT8]["temp_buffers"] is not None
    section = proc.stdout.split("### storage")[1].split("\n###")[0]
    assert "| leaves-2 | float32 |" in section and "| leaves-2 | int8 |" in section


def test_a_compile_past_the_timeout_is_stopped():
    assert benchmark.compile_in_subprocess("floor", benchmark.leaves(1), 1e-3) is None


def test_a_compile_worker_that_dies_is_reported():
    # 256 MiB of address space: not enough to start JAX's compiler.
    result = benchmark.compile_in_subprocess("floor", benchmark.leaves(1), 60, 1 << 28)
    assert set(result) == {"error"}
    assert result["error"].startswith(("killed by SIG", "exit status")), result


@pytest.mark.parametrize(
    ("returncode", "stderr", "ready", "why"),
    [
        (-9, "", True, "killed by SIGKILL (the kernel's OOM killer?)"),
        (-6, "terminate called: std::bad_alloc\n", True, "killed by SIGABRT: out of memory"),
        (
            1,
            "Traceback:\nKeyError: 'x'\n\n",
            False,
            "exit status 1 before it was ready: KeyError: 'x'",
        ),
    ],
)
def test_why_a_compile_worker_died(returncode, stderr, ready, why):
    assert benchmark._failure(returncode, stderr, ready) == why


def test_rows_whose_compile_ran_out_of_time_or_failed(monkeypatch, standard_promotion):
    calls = []

    def compile_in_subprocess(kind, spec, timeout, memory_limit=None):
        assert memory_limit == 1 << 30
        calls.append(kind)
        if kind == "int8":
            return None
        if kind == "float8":
            return {"error": "killed by SIGKILL (the kernel's OOM killer?)"}
        args = benchmark._abstract_args(kind, spec)
        return {
            **benchmark.compile_here(benchmark.step_setup(kind), args)[1],
            "compile_peak_rss_bytes": 7,
        }

    monkeypatch.setattr(benchmark, "compile_in_subprocess", compile_in_subprocess)
    stream = io.StringIO()
    tree = benchmark.run_tree(
        benchmark.leaves(1),
        steps=2,
        warmup=1,
        compile_repeats=2,
        with_torch=False,
        threads=1,
        progress=benchmark.Progress(stream),
        label="t",
        storage=("float32", "int8", "float8"),
        compile_timeout=5.0,
        compile_memory=1 << 30,
    )
    # Not tried again once it ran out of time or failed.
    first = ["floor", "float32", "int8", "float8", "optax"]
    assert calls == [*first, "floor", "float32", "optax"]
    progress = stream.getvalue()
    assert "adamax_jax, int8/uint8 state: compile > 5 s (1/2, fresh process)" in progress
    assert "float8_e4m3fn state: compile failed: killed by SIGKILL" in progress
    rows = _rows(tree)
    names = [benchmark.FLOOR, benchmark.OURS, benchmark.OURS_INT8, benchmark.OURS_FP8]
    assert list(rows) == [*names, benchmark.OPTAX]
    late, failed = rows[benchmark.OURS_INT8], rows[benchmark.OURS_FP8]
    assert late["compile_timed_out"] is True and late["compile_timeout_s"] == 5.0
    assert late["compile_error"] is None
    assert failed["compile_timed_out"] is False
    assert failed["compile_error"] == "killed by SIGKILL (the kernel's OOM killer?)"
    for r in (late, failed):
        assert r["compile_s"] is None and r["compile_runs_s"] == []
        assert r["steps"] == 0 and r["median_s"] is None and r["x_float32_state"] is None
        assert r["temp_bytes"] is None and r["max_abs_diff_vs_optax"] is None
        assert r["compile_peak_rss_bytes"] is None
        # Its sizes still come from the shapes: one (128, 128) leaf in 8 bits.
        assert r["state_bytes"] == 4 + 2 * 128 * 128 + 2 * 4 * 128 + 256
    for name in (benchmark.FLOOR, benchmark.OURS, benchmark.OPTAX):
        r = rows[name]
        assert r["compile_timed_out"] is False and r["compile_error"] is None
        assert r["steps"] == 2 and len(r["compile_runs_s"]) == 2
        assert r["compile_peak_rss_bytes"] == 7
    report = {
        "command": "python -m adamax_jax.benchmark",
        "quick": True,
        "steps": 2,
        "warmup": 1,
        "machine": benchmark.machine(),
        "trees": [tree],
        "notes": [],
        "targets": benchmark.targets([tree]),
    }
    text = benchmark.table(report)
    bound = 5.0 / rows[benchmark.OURS]["compile_s"]
    assert f"| leaves-1 | int8 | - (not compiled in time) | - | > 5 | > {bound:.1f} | - |" in text
    assert (
        "| leaves-1 | float8 | - (compile failed: killed by SIGKILL (the kernel's OOM killer?)) "
        "| - | failed | - | - |"
    ) in text


def test_targets_are_checked_from_the_rows(quick):
    _, proc, report = quick
    by_text = {t["target"]: t for t in report["targets"]}
    for tree in report["trees"]:
        check = by_text[f"{tree['key']}: speed of {benchmark.OURS} / {benchmark.OPTAX}"]
        assert check["value"] == _rows(tree)[benchmark.OURS]["speedup_vs_optax"]
        assert check["met"] == (check["value"] >= 1.0)
    many = _rows(report["trees"][1])
    check = by_text[f"many-leaves: compile time of {benchmark.OURS} / {benchmark.OPTAX}"]
    ratio = many[benchmark.OURS]["compile_s"] / many[benchmark.OPTAX]["compile_s"]
    assert check["value"] == pytest.approx(ratio)
    # Each storage kind against float32 state: step time, compile time of many leaves,
    # and no temporary buffer of a leaf's shape.
    limits = {
        benchmark.OURS_BF16: (1.0, 1.5),
        benchmark.OURS_INT8: (2.0, 3.0),
        benchmark.OURS_FP8: (2.0, 3.0),
    }
    seen = 0
    for tree in report["trees"]:
        rows = _rows(tree)
        for name, (step_limit, compile_limit) in limits.items():
            ratio = rows[name]["median_s"] / rows[benchmark.OURS]["median_s"]
            text = f"{tree['key']}: step time of {name} / {benchmark.OURS}"
            if tree["key"] in ("one-leaf", "transformer"):
                assert by_text[text]["value"] == pytest.approx(ratio)
                assert by_text[text]["threshold"] == step_limit
                assert by_text[text]["met"] == (ratio <= step_limit)
                seen += 1
            else:
                assert text not in by_text
            ratio = rows[name]["compile_s"] / rows[benchmark.OURS]["compile_s"]
            text = f"{tree['key']}: compile time of {name} / {benchmark.OURS}"
            if tree["key"] == "many-leaves":
                assert by_text[text]["value"] == pytest.approx(ratio)
                assert by_text[text]["met"] == (ratio <= compile_limit)
                seen += 1
        for name in (benchmark.OURS, *limits):
            r = rows[name]
            check = by_text[f"{tree['key']}: leaf-sized temp buffers of {name}"]
            count = r["temp_buffers"]["leaf_sized_count"] if r["temp_buffers"] else 0
            assert check["value"] == count
            assert check["met"] == (count == 0) == (not r["leaf_sized_temp"])
            verdict = "met" if count == 0 else "NOT met"
            assert f"{check['target']}: {count} (<= 0: {verdict})" in proc.stdout
    assert seen == 3 * 3


def test_writes_a_png(quick):
    out, _, _ = quick
    data = (out / "results.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert (length, kind) == (13, b"IHDR")
    assert width >= 600 and height >= 200
    assert data[-8:-4] == b"IEND"


def test_full_trees_have_the_sizes_the_readme_quotes():
    specs = {s.key: s for s in benchmark.tree_specs(quick=False)}
    assert list(specs) == TREES
    assert (specs["one-leaf"].n_leaves, specs["one-leaf"].n_params) == (1, 1 << 24)
    assert (specs["many-leaves"].n_leaves, specs["many-leaves"].n_params) == (1000, 16_384_000)
    blocks, width, vocab = 12, 384, 8192
    per_block = 12 * width * width + 13 * width
    assert specs["transformer"].n_params == blocks * per_block + vocab * width + 2 * width
    assert specs["transformer"].n_leaves == 1 + 16 * blocks + 2
    assert (specs["small-tree"].n_leaves, specs["small-tree"].n_params) == (100, 131_200)
    for n in (100, 1000):
        spec = benchmark.tree_spec(f"leaves-{n}", quick=False)
        assert (spec.key, spec.n_leaves, spec.n_params) == (f"leaves-{n}", n, n * 16_384)
        assert benchmark.tree_spec(f"leaves-{n}", quick=True) == spec
    assert benchmark.tree_spec("leaves-1000", quick=False).leaves == specs["many-leaves"].leaves
    assert benchmark.tree_spec("nope", quick=False) is None


@pytest.mark.parametrize("small", [False, True])
def test_the_stacked_transformer_holds_the_transformers_parameters_in_19_leaves(small):
    flat = next(s for s in benchmark.tree_specs(small) if s.key == "transformer")
    stacked = benchmark.tree_spec("transformer-stacked", small)
    assert stacked.key == "transformer-stacked"
    assert (stacked.n_leaves, stacked.n_params) == (19, flat.n_params)
    blocks = 12 if not small else 2
    shapes = dict(flat.leaves)
    for name, shape in stacked.leaves:
        if name.startswith("blocks/"):
            # One leaf per parameter of a block, with the blocks on a leading axis.
            assert shape[0] == blocks, name
            assert shapes[f"block00/{name.removeprefix('blocks/')}"] == shape[1:], name
        else:
            assert shapes[name] == shape, name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trees", "one-leaf,nope"], "`--trees` must name some of"),
        (["--steps", "1"], "`--steps` must be at least 2, got 1."),
        (["--warmup", "0"], "`--warmup` must be at least 1, got 0."),
        (["--trees", "leaves-0"], "`--trees` must name some of"),
        (
            ["--storage", "float32,float16"],
            "`--storage` must name some of float32, bfloat16, int8, float8, got 'float32,float16'.",
        ),
        (["--compile-timeout", "0"], "`--compile-timeout` must be positive, got 0."),
        (["--compile-memory", "4"], "`--compile-memory` needs `--compile-timeout`"),
        (
            ["--compile-timeout", "5", "--compile-memory", "-1"],
            "`--compile-memory` must be positive, got -1.",
        ),
    ],
)
def test_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_without_torch_or_out_prints_the_table_only(
    capsys, monkeypatch, standard_promotion, tmp_path
):
    monkeypatch.chdir(tmp_path)
    argv = ["--quick", "--no-torch", "--trees", "small-tree", "--steps", "2", "--warmup", "1"]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    assert "### small-tree:" in captured.out
    assert "PyTorch rows skipped: --no-torch was given" in captured.out
    assert "torch Adamax" not in captured.out.split("### small-tree:")[1].split("### targets")[0]
    assert list(tmp_path.iterdir()) == []
