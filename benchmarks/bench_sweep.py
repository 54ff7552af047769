"""Sweep throughput: one process, 2 local worker processes and a Dask LocalCluster(2), on a 200-cell sweep.

    python benchmarks/bench_sweep.py               # 200 cells, about 2 minutes on 2 cores
    python benchmarks/bench_sweep.py --quick       # 40 cells, smoke run

The sweep: spu-8, adc.bits x noise.kappa0 (5 x 4 points) x 10 seeds, workload ``solve`` with
``--problems`` random SPD systems per cell (n = 8, cond 10, t = 200 tau).  Each executor runs it from an
empty output directory, so every row includes its own start-up: spawning the worker processes (each
imports numpy, numba and the driver) or starting the LocalCluster (scheduler and 2 nannies on
127.0.0.1), and the journal and CSV writes.  The three results.csv must be identical (wall-time
columns aside); the benchmark checks it.

Rows: cells/s (total cells / wall time of ``driver.sweep``); 1st cell s: when the first cell finished
(start-up plus one cell); efficiency = (cells/s) / (workers x the
serial cells/s); Dask overhead = Dask's wall time / the local processes' - 1, for a LocalCluster started by
the sweep (``--dask local:2``, its start-up in the row) and for a cluster already running with warm workers
(``--dask ADDRESS``: a fourth row, the cluster started and warmed before the clock).  Targets: efficiency >= 0.85
at 2 local workers; Dask overhead <= 15 %.  On a shared machine the parallel rows depend on what else
runs: the table prints the load average before each row.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: tiny matrices, one thread

import argparse  # noqa: E402
import csv  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import driver  # noqa: E402


def plan(problems: int, seeds: int) -> dict:
    return {
        "device": "spu-8",
        "seed": 0,
        "seeds": seeds,
        "grid": {"adc.bits": [6, 8, 10, 12, 14], "noise.kappa0": [1e-6, 1e-5, 1e-4, 1e-3]},
        "workload": "solve",
        "workload_args": {"n": 8, "cond": 10, "t": 200, "problems": problems},
    }


def table(out: Path) -> list[list[str]]:
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    keep = [i for i, name in enumerate(rows[0]) if "wall" not in name]
    return [[row[i] for i in keep] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 cells instead of 200")
    parser.add_argument("--problems", type=int, default=12, help="solves per cell (default 12)")
    args = parser.parse_args()
    seeds = 2 if args.quick else 10
    sweep = plan(args.problems, seeds)
    cells = 20 * seeds
    # warm the numba cache and the imports in this process, so the serial row is not charged for compiling
    driver.sweep({**sweep, "seeds": 1, "grid": {"adc.bits": [8]}}, tempfile.mkdtemp(), workers=1, progress=False)
    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    runs = [
        ("1 process", {"workers": 1}, 1),
        ("2 local processes", {"workers": 2}, 2),
        ("Dask LocalCluster(2)", {"dask": "local:2"}, 2),
    ]
    rows = []
    cluster = None
    try:
        # a user's --dask ADDRESS names a scheduler that is already up, its workers warm: start one, warm it
        # with a one-cell sweep, and time the same sweep on it as a fourth row
        from dask.distributed import LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None)
        warm = {**sweep, "seeds": 1, "grid": {"adc.bits": [8]}}
        driver.sweep(warm, tempfile.mkdtemp(), dask=cluster.scheduler_address, progress=False, plots=False)
        runs.append(("Dask, running cluster", {"dask": cluster.scheduler_address}, 2))
        for name, options, workers in runs:
            out = root / name.split()[0].lower().replace("(", "")
            load = os.getloadavg()[0]
            first: list[float] = []
            started = time.perf_counter()
            result = driver.sweep(
                sweep,
                out,
                progress=False,
                plots=False,
                on_cell=lambda _, first=first: first.append(time.perf_counter()),
                **options,
            )
            wall = time.perf_counter() - started
            assert result.ran == cells
            rows.append((name, workers, wall, cells / wall, load, out, first[0] - started))
        reference = table(rows[0][5])
        same = all(table(row[5]) == reference for row in rows[1:])
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if cluster is not None:
            cluster.close()
    serial_rate = rows[0][3]
    print(f"sweep: {cells} cells of {args.problems} solves (spu-8, n = 8) on {os.cpu_count()} cores")
    print(f"{'executor':<22} {'wall s':>8} {'cells/s':>8} {'efficiency':>10} {'1st cell s':>10} {'load avg':>8}")
    for name, workers, wall, rate, load, _, first_s in rows:
        efficiency = rate / (workers * serial_rate)
        print(f"{name:<22} {wall:>8.2f} {rate:>8.2f} {efficiency:>10.2f} {first_s:>10.2f} {load:>8.2f}")
    cold, running = rows[2][2] / rows[1][2] - 1.0, rows[3][2] / rows[1][2] - 1.0
    print(f"Dask overhead over local processes: {100 * cold:+.1f} % starting a LocalCluster (its start-up included),")
    print(f"  {100 * running:+.1f} % on a running cluster, as --dask ADDRESS uses one   (target <= 15 %)")
    print(f"results.csv identical across the four (wall time aside): {same}")


if __name__ == "__main__":
    main()
