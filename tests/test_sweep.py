"""Robustness sweeps (driver.sweep, `spu sweep`): the science, the bits, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import driver
from driver.cli import main
from driver.sweeps import load_sweep, run_cell
from driver.sweeps.plan import point_words
from driver.sweeps.run import _jobs

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# the ADC is the one imperfection: an ideal array read through an N-bit ADC, no noise to dither it
ADC_SWEEP = {
    "device": "ideal",
    "seeds": [0, 1, 2],
    "grid": {"adc.bits": [6, 8, 10, 12]},
    "workload": "solve",
    "workload_args": {"n": 8, "cond": 4, "t": 300, "problems": 2},
}

# spu-8 with every imperfection on: noise, mismatch, converters; two keys, unpaired (the point's hash counts)
NOISY_SWEEP = {
    "device": "spu-8",
    "seed": 7,
    "seeds": [0, 1],
    "paired": False,
    "grid": {"noise.kappa0": [1e-5, 1e-3], "adc.bits": [8, 12]},
    "workload": "solve",
    "workload_args": {"t": 40, "problems": 1},
}


def _table(out: Path) -> list[list[str]]:
    """results.csv without its wall-time columns (the one thing that differs between runs)."""
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    keep = [i for i, name in enumerate(rows[0]) if "wall" not in name]
    return [[row[i] for i in keep] for row in rows]


def test_adc_bits_error_falls_2x_per_bit(tmp_path):
    """The solve error of an ADC-limited device halves per bit: slope of log2(error) per bit in [-1.3, -0.7]."""
    result = driver.sweep(ADC_SWEEP, tmp_path, workers=1, progress=False, plots=False)
    assert (result.total, result.ran, result.errors) == (12, 12, 0)
    rows = result.rows()
    assert len(rows) == 4 * 3 * 2
    bits = np.array([int(row["adc.bits"]) for row in rows])
    error = np.array([float(row["rel_error"]) for row in rows])
    levels = np.unique(bits)
    mean = [error[bits == b].mean() for b in levels]
    slope = np.polyfit(levels, np.log2(mean), 1)[0]
    assert -1.3 <= slope <= -0.7, (levels, mean, slope)


def test_results_csv_is_tidy_and_sweep_yaml_resolved(tmp_path):
    result = driver.sweep(NOISY_SWEEP, tmp_path, workers=1, progress=False)
    with open(tmp_path / "results.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:4] == ["noise.kappa0", "adc.bits", "seed", "problem"]
    for column in ("rel_error", "analog_time", "hardware_time_s", "wall_time_s", "saturated", "error"):
        assert column in header
    assert header[-1] == "error"
    rows = result.rows()
    assert len(rows) == 2 * 2 * 2 * 1
    # rows in the sweep's order: points (grid order) outer, seeds inner
    assert [(r["noise.kappa0"], r["adc.bits"], r["seed"]) for r in rows[:3]] == [
        ("1e-05", "8", "0"),
        ("1e-05", "8", "1"),
        ("1e-05", "12", "0"),
    ]
    assert all(float(r["hardware_time_s"]) > 0 and r["error"] == "" for r in rows)
    written = yaml.safe_load((tmp_path / "sweep.yaml").read_text())
    assert written["resolved"]["cells"] == 8 and len(written["resolved"]["points"]) == 4
    assert written["resolved"]["device_spec"]["name"] == "spu-8"
    assert written["workload_args"] == {"n": None, "cond": 10.0, "t": 40, "problems": 1}  # defaults filled in
    assert {"spu-emulator", "numpy", "numba", "python"} <= set(written["versions"])
    # one PNG per metric and swept key
    plots = sorted(p.name for p in result.plots)
    assert "rel_error_vs_adc.bits.png" in plots and "rel_error_vs_noise.kappa0.png" in plots
    for path in result.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_same_bits_for_one_two_workers_and_dask(tmp_path):
    """results.csv is identical (wall time aside) for 1 worker, 2 local processes and a Dask LocalCluster(2)."""
    pytest.importorskip("distributed")
    serial = driver.sweep(NOISY_SWEEP, tmp_path / "serial", workers=1, progress=False, plots=False)
    local = driver.sweep(NOISY_SWEEP, tmp_path / "local", workers=2, progress=False, plots=False)
    dask = driver.sweep(NOISY_SWEEP, tmp_path / "dask", dask="local:2", progress=False, plots=False)
    assert serial.ran == local.ran == dask.ran == 8
    reference = _table(tmp_path / "serial")
    assert len(reference) == 9
    assert _table(tmp_path / "local") == reference
    assert _table(tmp_path / "dask") == reference


def test_a_cell_does_not_depend_on_order_or_company(tmp_path):
    """One cell run alone, last, gives the row it gave inside the full sweep."""
    plan = load_sweep(NOISY_SWEEP)
    jobs = _jobs(plan, plan.cells)
    alone = [run_cell(job)["rows"] for job in reversed(jobs[-3:])][::-1]
    driver.sweep(plan, tmp_path, workers=1, progress=False, plots=False)
    journal = {}
    for line in (tmp_path / "cells.jsonl").read_text().splitlines():
        entry = json.loads(line)
        journal[entry["cell"]] = entry["rows"]
    for rows, job in zip(alone, jobs[-3:], strict=True):
        strip = [{k: v for k, v in row.items() if "wall" not in k} for row in rows]
        assert strip == [{k: v for k, v in row.items() if "wall" not in k} for row in journal[job["cell"]]]


def test_seeds_derive_from_sweep_seed_point_and_seed_only():
    plan = load_sweep(NOISY_SWEEP)
    cells = plan.cells
    unpaired = {(c.point, c.seed): plan.cell_seeds(c)[0] for c in cells}
    assert len(set(unpaired.values())) == len(cells)  # unpaired: every cell its own device
    paired = load_sweep({**NOISY_SWEEP, "paired": True})
    by_seed = {}
    for c in paired.cells:
        by_seed.setdefault(c.seed, set()).add(paired.cell_seeds(c)[0])
    assert all(len(seeds) == 1 for seeds in by_seed.values()) and len(by_seed) == 2  # paired: one device per seed
    other = load_sweep({**NOISY_SWEEP, "seed": 8})
    assert other.cell_seeds(other.cells[0])[0] != plan.cell_seeds(cells[0])[0]
    # a stable digest of the point (SHA-256 of its canonical JSON), not Python's salted hash()
    assert point_words({"adc.bits": 8, "noise.kappa0": 1e-05}) == point_words({"noise.kappa0": 1e-05, "adc.bits": 8})
    code = "from driver.sweeps.plan import point_words; print(point_words({'adc.bits': 8, 'name': 'x'}))"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    }
    assert runs == {f"{point_words({'adc.bits': 8, 'name': 'x'})}\n"}


def _sweep_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SLOW_SWEEP = {
    "device": "spu-8",
    "seeds": 4,
    "grid": {"adc.bits": [8, 10, 12]},
    "workload": "sweep_helpers:noisy_mean",
    "workload_args": {"pause_s": 0.25},
}


def _spu_sweep(sweep: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "driver.cli", "sweep", str(sweep), "--out", str(out), "--workers", "1"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_cells(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    journal = out / "cells.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the sweep did not finish {count} cells: {process.poll()} {process.stderr.read()}")


def test_resume_after_a_kill(tmp_path, monkeypatch):
    """SIGKILL mid-sweep: results.csv is whole, the re-run skips the finished cells, the end result is the same."""
    monkeypatch.syspath_prepend(str(TESTS))
    sweep = _sweep_file(tmp_path, SLOW_SWEEP)
    process = _spu_sweep(sweep, tmp_path / "killed")
    try:
        _wait_for_cells(tmp_path / "killed", 4, process)
    finally:
        process.kill()
        process.wait()
    finished = len((tmp_path / "killed" / "cells.jsonl").read_text().splitlines())
    assert 4 <= finished < 12
    with open(tmp_path / "killed" / "cells.jsonl", "a") as journal:
        journal.write('{"cell": 11, "rows": [{"x0": 1.')  # a line torn by the kill
    if (tmp_path / "killed" / "results.csv").exists():  # never half-written: every row has every column
        rows = list(csv.reader(open(tmp_path / "killed" / "results.csv")))
        assert all(len(row) == len(rows[0]) for row in rows)
    fast = {**SLOW_SWEEP, "workload_args": {"pause_s": 0.25}}
    resumed = driver.sweep(sweep, tmp_path / "killed", workers=1, progress=False, plots=False)
    assert resumed.skipped == finished and resumed.ran == 12 - finished
    fresh = driver.sweep(fast, tmp_path / "fresh", workers=2, progress=False, plots=False)
    assert fresh.ran == 12
    assert _table(tmp_path / "killed") == _table(tmp_path / "fresh")
    again = driver.sweep(sweep, tmp_path / "killed", workers=1, progress=False, plots=False)
    assert (again.ran, again.skipped) == (0, 12)


def test_ctrl_c_keeps_the_finished_cells(tmp_path):
    sweep = _sweep_file(tmp_path, SLOW_SWEEP)
    process = _spu_sweep(sweep, tmp_path / "out")
    try:
        _wait_for_cells(tmp_path / "out", 2, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err and "cells kept" in err
    kept = len((tmp_path / "out" / "cells.jsonl").read_text().splitlines())
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert 2 <= kept < 12 and len(rows) == kept


def test_user_workload_units_and_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    data = {"device": "spu-8", "seeds": [0], "grid": {"adc.bits": [6, 8]}, "workload": "sweep_helpers:failing"}
    result = driver.sweep(data, tmp_path / "a", workers=2, progress=False)
    rows = result.rows()
    assert rows[0]["error"] == "RuntimeError: no luck at 6 bits" and rows[0]["bits"] == ""
    assert rows[1]["error"] == "" and rows[1]["bits"] == "8"
    assert result.errors == 1
    bad = driver.sweep({**data, "workload": "sweep_helpers:not_rows"}, tmp_path / "b", workers=1, progress=False)
    assert "must return a dict or a list of dicts" in bad.rows()[0]["error"]


@pytest.mark.parametrize(
    ("workload", "args", "metrics"),
    [
        ("inv", {"n": 4, "t": 500, "problems": 1}, ["rel_error", "analog_time"]),
        ("sample", {"n": 3, "samples": 200, "problems": 1}, ["mean_error", "cov_error", "effective_samples"]),
        ("tngd", {"steps": 6, "samples": 128, "batch": 16}, ["final_loss", "exact_ngd_loss", "initial_loss"]),
    ],
)
def test_builtin_workloads(tmp_path, workload, args, metrics):
    data = {"device": "spu-8", "seeds": [0], "grid": {"adc.bits": [12]}, "workload": workload, "workload_args": args}
    rows = driver.sweep(data, tmp_path, workers=1, progress=False, plots=False).rows()
    for row in rows:
        assert row["error"] == "", row["error"]
        values = {m: float(row[m]) for m in metrics}
        assert all(np.isfinite(v) for v in values.values())
    if workload == "inv":
        assert float(rows[0]["rel_error"]) < 0.3
    if workload == "sample":
        assert float(rows[0]["mean_error"]) < 0.5 and float(rows[0]["cov_error"]) < 0.5
    if workload == "tngd":
        assert values["final_loss"] < values["initial_loss"]
        assert values["final_loss"] == pytest.approx(values["exact_ngd_loss"], rel=0.2)


GOOD = {"device": "spu-8", "seeds": [0], "grid": {"adc.bits": [8]}, "workload": "solve"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"grid": {"adc.bitz": [8]}}, ["adc.bitz", "adc.bits", "adc.range_v"]),
        ({"grid": {"adc.bits": [8, 1]}}, ["adc.bits=1", "adc.bits = 1 is not allowed"]),
        ({"grid": {"noise.kappa0": [-1.0]}}, ["noise.kappa0", "below its minimum"]),
        ({"workload": "solvee"}, ["unknown workload 'solvee'", "solve, inv, sample, tngd", "module:function"]),
        ({"workload": "no_such_module:f"}, ["cannot import module 'no_such_module'"]),
        ({"grid": {}}, ["grid is empty"]),
        ({"grid": {"adc.bits": []}}, ["grid.adc.bits must be a non-empty list"]),
        ({"workload_args": {"size": 3}}, ["workload_args.size", "it takes n, cond, t, problems"]),
        ({"seeds": [0, 0]}, ["seeds must be"]),
        ({"seeds": -1}, ["seeds"]),
        ({"device": "spu-9"}, ["no preset or file named 'spu-9'", "spu-8"]),
        ({"device": "tcp://127.0.0.1:5"}, ["a sweep opens its own variants"]),
        ({"gird": {"adc.bits": [8]}}, ["unknown key 'gird'", "grid"]),
        ({"points": [{"adc.bits": 8}]}, ["either grid", "or points"]),
        ({"overrides": {"rails.v_rail": 0.0}}, ["rails.v_rail"]),
    ],
)
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, capsys, change, words):
    path = _sweep_file(tmp_path, {**GOOD, **change})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not out.exists()
    with pytest.raises(driver.InvalidInputError):
        driver.sweep(path, out)


def test_bad_command_lines(tmp_path, capsys):
    path = _sweep_file(tmp_path, GOOD)
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no sweep file" in capsys.readouterr().err
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--dask", "local:x"]) == 2
    assert "local:N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["sweep", str(path), "--out", str(tmp_path / "o"), "--workers", "2", "--dask", "local:2"])
    assert stopped.value.code == 2


def test_a_different_sweep_in_the_same_dir_is_refused(tmp_path, capsys):
    path = _sweep_file(tmp_path, GOOD)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--workers", "1", "--no-plots"]) == 0
    assert "1 cells (1 run, 0 already done)" in capsys.readouterr().out
    other = _sweep_file(tmp_path, {**GOOD, "seeds": [0, 1]})
    assert main(["sweep", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "different sweep" in capsys.readouterr().err


def test_points_list_and_fixed_overrides(tmp_path):
    data = {
        "device": "spu-8",
        "seeds": [0],
        "overrides": {"noise.kappa0": 0},
        "points": [{"adc.bits": 8}, {"adc.bits": 12, "dac.bits": 10}],
        "workload": "sweep_helpers:noisy_mean",
    }
    sys.path.insert(0, str(TESTS))
    try:
        rows = driver.sweep(data, tmp_path, workers=1, progress=False, plots=False).rows()
    finally:
        sys.path.remove(str(TESTS))
    # a point that does not set a key shows the base spec's value
    assert [(r["adc.bits"], r["dac.bits"], r["kappa0"]) for r in rows] == [("8", "12", "0.0"), ("12", "10", "0.0")]


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    driver.sweep(GOOD, tmp_path, workers=1, plots=False)
    err = capsys.readouterr().err
    assert "spu sweep: 1/1 cells (100%)" in err and "cells/s" in err


def test_robustness_example_is_a_valid_sweep():
    plan = load_sweep(ROOT / "examples" / "robustness.yaml")
    assert plan.device_spec["name"] == "spu-8" and set(plan.keys) == {"adc.bits", "noise.kappa0", "coupling.mismatch"}


def test_readme_overrides_example(capsys):
    """The python block under the README's "## Robustness studies" runs as written and prints what it says."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Robustness studies", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (## Robustness studies)", "exec"), {})
    assert capsys.readouterr().out.split() == ["10", "0.001", "4"]
