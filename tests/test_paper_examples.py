"""The TNGD paper scripts (examples/paper/): each ``--quick`` run exits 0 and writes its CSV, with the
documented columns, and its PNG.

The four quick runs together take 98 s on an otherwise idle 2-core machine (fig3 31 s, fig7 30 s, fig4 24 s,
fig5 14 s) and over 2 minutes while other jobs share the cores, so they are marked slow (``pytest -m slow``);
the default suite runs fig3_cnn.py for 2 iterations instead (11 s), which exercises the shared helper."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper"
COMMON = [
    "method",
    "seed",
    "iteration",
    "batch_loss",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "wall_time_s",
    "hardware_time_s",
    "runtime_s",
]

# script -> (its CSV's columns, the methods its quick run must have rows for)
SCRIPTS = {
    "fig3_cnn": (COMMON, {"Adam lr=1e-3", "NGD", "TNGD t=1", "TNGD t=10"}),
    "fig4_t_delay": (COMMON[:3] + ["t", "t_d"] + COMMON[3:], {"NGD", "TNGD t=1", "TNGD t=100", "TNGD t=1 t_d=5"}),
    "fig7_noise": (
        COMMON[:3] + ["kappa0", "kappa_user"] + COMMON[3:],
        {"NGD", "TNGD kappa0=1e-01", "TNGD kappa0=1e-03", "TNGD noiseless"},
    ),
    "fig5_finetune": (
        COMMON[:3] + ["t"] + COMMON[3:],
        {"Adam", "TNGD t=10", "TNGD-Adam t=0.1", "TNGD-Adam t=1", "TNGD-Adam t=10"},
    ),
}


def run_quick(name: str, out: Path, *more: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(PAPER / f"{name}.py"), "--quick", "--out", str(out), *more],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_run_writes_csv_and_png(name: str, tmp_path: Path) -> None:
    check_run(name, tmp_path)


def test_fig3_two_iterations(tmp_path: Path) -> None:
    check_run("fig3_cnn", tmp_path, "--iters", "2")


def check_run(name: str, tmp_path: Path, *more: str) -> None:
    columns, methods = SCRIPTS[name]
    result = run_quick(name, tmp_path, *more)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / f"{name}.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == columns
        rows = list(reader)
    assert {row["method"] for row in rows} >= methods
    seeds = {(row["method"], row["seed"]) for row in rows}
    for method in methods:
        assert len({seed for m, seed in seeds if m == method}) >= 3, f"{method}: fewer than 3 seeds"
    for row in rows:
        assert float(row["train_loss"]) == pytest.approx(float(row["train_loss"]))  # a number, not NaN
        assert float(row["wall_time_s"]) > 0.0
        assert float(row["runtime_s"]) > 0.0
    device_rows = [row for row in rows if row["method"].startswith("TNGD")]
    assert device_rows and all(float(row["hardware_time_s"]) > 0.0 for row in device_rows)
    png = tmp_path / f"{name}.png"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method |" in result.stdout  # the results table
