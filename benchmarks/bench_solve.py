"""driver.linalg.solve on tngd-sim: which engine each run takes, and what that saves.

    python benchmarks/bench_solve.py                 # N = 64, 256, 1024; about half a minute
    python benchmarks/bench_solve.py --sizes 64 256  # quicker

For each N: a random SPD system (condition number 10, b ~ N(0, I)) solved with
``driver.linalg.solve(dev, A, b)`` (t = 200 tau, engine "auto").  The solver
auto-ranges: its first run drives b at the scale ``load_vector(b, scale="auto")``
picks from the bound |A^-1 b| <= |b|_2 / lambda_min, so the equilibrium lies inside
the ADC's range and "auto" can prove the run free of clipping and draw it exactly;
a second run raises the input so the answer fills about 70 % of the ADC range.
(Before, the first run went in at the DAC's full scale, clipped, and had to step
on the transient engine: 6.8 s at N = 1024 in one run against 0.37 s now.)

Columns: the engines of the solve's runs in order; its wall time; the raw exact
path a user could call by hand (load_matrix, load_vector(scale="auto"),
run(engine="exact"), read_mean, on a fresh device); solve / raw (issue 14's target:
<= 1.5); the wall time of one transient run of the same length on the same device
(forced, after the solve); the estimate of an all-transient solve (runs x that
run) over the solve ("saved": what the exact engine saved); and the relative error against
numpy.linalg.solve.  The compiled kernels are loaded by a small solve before
anything is timed.
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import driver  # noqa: E402

T = 200.0


def _system(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, 10.0, n)) @ q.T
    return 0.5 * (a + a.T), rng.standard_normal(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="N (default 64 256 1024)")
    args = parser.parse_args(argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# {os.cpu_count()} CPUs, load average {load[0]:.2f}; tngd-sim, cond 10, t = {T:g} tau, burn_in t / 2")
    head = ("N", "engines of the runs", "solve", "raw exact", "solve/raw", "1 transient run", "saved", "rel err")
    rows = []
    with driver.open("tngd-sim", seed=0) as dev:  # load the compiled kernels before timing anything
        driver.linalg.solve(dev, *_system(8, 0), t=T)
        dev.run(T, T / 2, engine="transient", on_saturation="flag")
    for n in args.sizes:
        a, b = _system(n, n)
        with driver.open("tngd-sim", seed=0) as dev:
            reports = _record_runs(dev)
            started = time.perf_counter()
            x = driver.linalg.solve(dev, a, b, t=T)
            solve_s = time.perf_counter() - started
            engines = [r.engine for r in reports]
            started = time.perf_counter()
            dev.run(T, T / 2, engine="transient", on_saturation="flag")
            transient_s = time.perf_counter() - started
        with driver.open("tngd-sim", seed=0) as dev:
            started = time.perf_counter()
            dev.load_matrix(a)
            dev.load_vector(b, scale="auto")
            dev.run(T, T / 2, engine="exact")
            dev.read_mean()
            raw_s = time.perf_counter() - started
        reference = np.linalg.solve(a, b)
        error = np.linalg.norm(x - reference) / np.linalg.norm(reference)
        estimate = len(engines) * transient_s
        rows.append(
            (
                str(n),
                ", ".join(engines),
                f"{solve_s:.3f} s",
                f"{raw_s:.3f} s",
                f"{solve_s / raw_s:.2f}",
                f"{transient_s:.3f} s",
                f"{estimate / solve_s:.1f}x",
                f"{error:.1e}",
            )
        )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _record_runs(dev: driver.Device) -> list[driver.RunReport]:
    """Keep the RunReport of every run the device makes from now on (the solver returns only its last)."""
    reports: list[driver.RunReport] = []
    run = dev.run

    def recording_run(*args, **kwargs) -> driver.RunReport:
        report = run(*args, **kwargs)
        reports.append(report)
        return report

    dev.run = recording_run
    return reports


if __name__ == "__main__":
    sys.exit(main())
