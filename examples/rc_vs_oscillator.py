"""Time to a 1 % solve error against the condition number: RC cells vs oscillator (RLC) cells.

    pip install ".[plot]"
    python examples/rc_vs_oscillator.py [--conditions 10 30 100 300 1000] [--out rc_vs_oscillator.png]

For each condition number kappa an 8 x 8 symmetric positive definite matrix a (eigenvalues log-spaced in
[1 / kappa, 1], so the array's matrix is the same for every device) and a random b are loaded into
noise-free devices with ideal parts, started at rest.  The state then relaxes to a^-1 b; the script steps
it with the exact engine and reads it back (read_state) every few tau, and reports the first time after
which ||x(t) - a^-1 b|| / ||a^-1 b|| stays below 1 %:

- RC cells: every mode decays as e^{-lambda t}, so about ln(100) / lambda_min = 4.6 kappa tau;
- oscillator cells with the damping critical for the slowest mode, gamma = 2 sqrt(lambda_min m): the slow
  mode decays as (1 + w t) e^{-w t}, w = sqrt(lambda_min / m), and the faster ones, underdamped, as
  e^{-gamma t / (2 m)} = e^{-w t}: about 6.6 sqrt(kappa) tau (m = 1) -- the square-root speed-up of
  second-order dynamics (Aifer et al., arXiv 2308.05660);
- oscillator cells at a fixed damping (that of spu-8-lc, gamma = 1, damping ratio 0.5 at unit
  stiffness), for comparison: the slow modes are then overdamped and relax at about lambda / gamma,
  no faster than RC cells.

Noise is off so that the error is the relaxation alone (with noise on, the read-out's statistical error
adds sqrt(kappa0 / t)-like terms for both kinds alike).  Prints a table and saves a log-log PNG.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import driver

TOLERANCE = 0.01
STEPS = 500  # read-outs per horizon


def spec(kind: str, damping: float) -> dict:
    return {
        "spec_version": 1,
        "name": f"{kind}-{damping:g}",
        "cells": {"count": 8, "kind": kind},
        "timing": {"max_run_time": 1.0e9},
        "oscillator": {"inductance": 1.0, "damping": damping},
        "noise": {"kappa0": 0.0},
    }


def time_to_tolerance(path: Path, a: np.ndarray, b: np.ndarray, horizon: float) -> float:
    """First time (on a grid of horizon / STEPS) after which the relative error stays below TOLERANCE."""
    target = np.linalg.solve(a, b)
    step = horizon / STEPS
    errors = []
    with driver.open(path, seed=0) as dev:
        dev.load_matrix(a, scale=1.0)
        dev.load_vector(b, scale=1.0)
        for _ in range(STEPS):
            dev.run(step, engine="exact")
            errors.append(np.linalg.norm(dev.read_state() - target) / np.linalg.norm(target))
    above = np.nonzero(np.array(errors) > TOLERANCE)[0]
    if above.size and above[-1] == STEPS - 1:
        return float("inf")  # not within the horizon
    return step * (above[-1] + 2 if above.size else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", type=float, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="rc_vs_oscillator.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    b = 0.1 * rng.uniform(-1.0, 1.0, 8)
    rows = []
    started = time.perf_counter()
    header = f"{'cond':>7} {'RC (tau)':>10} {'LC critical':>12} {'speed-up':>9} {'LC gamma=1':>11} {'4.6 cond':>9}"
    print(f"time to {TOLERANCE:.0%} solve error from rest, ideal parts, noise off")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for condition in args.conditions:
            eigenvalues = np.geomspace(1.0 / condition, 1.0, 8)
            a = (q * eigenvalues) @ q.T
            a = 0.5 * (a + a.T)  # |a_ij| <= 1 = g_max: loaded at scale 1, the array's matrix is a itself
            critical = 2.0 * np.sqrt(eigenvalues[0])
            times = []
            for kind, damping, horizon in (
                ("rc", 2.0, 3.0 * np.log(100.0) * condition),
                ("oscillator", critical, 30.0 * np.sqrt(condition)),
                ("oscillator", 1.0, 3.0 * np.log(100.0) * condition),
            ):
                path = Path(folder) / f"{kind}-{damping:.6g}.yaml"
                path.write_text(yaml.safe_dump(spec(kind, float(damping))))
                times.append(time_to_tolerance(path, a, b, horizon))
            rows.append((condition, *times))
            rc, lc, fixed = times
            print(f"{condition:>7g} {rc:>10.4g} {lc:>12.4g} {rc / lc:>9.1f} {fixed:>11.4g} {4.6 * condition:>9.4g}")
    print(f"(wall time {time.perf_counter() - started:.1f} s; LC critical: damping 2 sqrt(lambda_min), m = 1)")
    if args.out:
        plot(np.array(rows), args.out)
        print(f"saved {args.out}")
    return 0


def plot(rows: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    cond = rows[:, 0]
    ax.loglog(cond, rows[:, 1], "o-", label="RC cells")
    ax.loglog(cond, rows[:, 2], "s-", label="oscillator, critical damping of the slowest mode")
    ax.loglog(cond, rows[:, 3], "^-", label="oscillator, fixed damping (spu-8-lc)")
    ax.loglog(cond, 4.6 * cond, "k:", label="4.6 cond")
    ax.loglog(cond, 6.6 * np.sqrt(cond), "k--", label="6.6 sqrt(cond)")
    ax.set_xlabel("condition number of A")
    ax.set_ylabel(f"analog time to {TOLERANCE:.0%} error (tau)")
    ax.set_title("Relaxation: RC vs oscillator arrays")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
