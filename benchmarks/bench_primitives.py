"""expnegm on the emulated ``ideal`` SPU beside thermox's ``expnegm``: accuracy and wall time.

    pip install ".[bench]"                          # thermox and jax, the comparison
    python benchmarks/bench_primitives.py           # n = 8, 64, 256, 3 rounds
    python benchmarks/bench_primitives.py --quick   # n = 8, 64, 1 round

What it measures.  For n in 8, 64, 256, a random symmetric A with eigenvalues evenly spaced in [1, 3]
and a random orthogonal eigenbasis (fixed seed); both compute e^{-A} (s = 1) from num_samples = 10,000
samples of the process taken s apart, i.e. from the same window of 10,000 lags:

- SPU: ``driver.linalg.expnegm(dev, A, samples=num_samples)`` on ``driver.open("ideal", seed=r)``: a
  window of num_samples lags of s (the driver picks the lag, L conversions).  The ideal device's exact
  engine draws the lagged sums of each of the 10 batches in closed form
  (``spu_emulator.exact.propagate_lagged``), so the cost does not grow with the window; the time
  includes loading, the stability check and everything the firmware does, not the report.
- thermox: ``thermox.linalg.expnegm(A, num_samples=10000, dt=1.0, key=...)`` on float64 jax arrays,
  ``block_until_ready``; jax compiles it on the first call for each n (not timed: the script warms up).

Accuracy: the relative Frobenius error ||E - expm(-A)||_F / ||expm(-A)||_F and the largest entry
error, against ``scipy.linalg.expm``, median over the rounds (each round a new seed and key).
Time: median over the rounds, and the median of the per-round ratios thermox / SPU.

Target (PASS/MISS) at n = 256: at least as accurate (relative Frobenius error no larger) and 10x
faster.  BLAS threads: OPENBLAS/OMP/MKL_NUM_THREADS = 1 and XLA's CPU to one thread, set before numpy
and jax are imported.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

import driver  # noqa: E402

NUM_SAMPLES = 10_000


def problem(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (basis * np.linspace(1.0, 3.0, n)) @ basis.T
    return 0.5 * (A + A.T)


def errors(estimate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    return (
        float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference)),
        float(np.abs(estimate - reference).max()),
    )


def spu(A: np.ndarray, seed: int) -> tuple[np.ndarray, float, str]:
    """Timed: expnegm without its report (the report's batch-means error costs O(batches n^3) more on the
    host); the engine that ran is read from a second, untimed call with the report."""
    with driver.open("ideal", seed=seed) as dev:
        started = time.perf_counter()
        E = driver.linalg.expnegm(dev, A, samples=NUM_SAMPLES)
        seconds = time.perf_counter() - started
        engine = driver.linalg.expnegm(dev, A, samples=NUM_SAMPLES, return_report=True)[1].runs[-1].engine
    return E, seconds, engine


def thermox_call(A: np.ndarray, seed: int):
    import jax
    import thermox

    key = jax.random.PRNGKey(seed)
    started = time.perf_counter()
    E = thermox.linalg.expnegm(jax.numpy.asarray(A), num_samples=NUM_SAMPLES, dt=1.0, key=key)
    E = np.asarray(E.block_until_ready())
    return E, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 8 and 64, one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = (8, 64) if args.quick else (8, 64, 256)
    rounds = 1 if args.quick else args.rounds
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
        import thermox  # noqa: F401

        have_thermox = True
    except ImportError as exc:
        print(f"thermox not importable ({exc}); SPU columns only", file=sys.stderr)
        have_thermox = False
    print(f"expnegm(A), s = 1, {NUM_SAMPLES} samples s apart; medians of {rounds} round(s); 1 BLAS thread")
    head = "    n | SPU time s | SPU rel err | SPU max err | engine    | thermox s | thermox rel | thermox max | ratio"
    print(head)
    print("-" * len(head))
    verdict = []
    for n in sizes:
        A = problem(n)
        reference = scipy.linalg.expm(-A)
        if have_thermox:
            print(f"  (n = {n}: compiling thermox)", file=sys.stderr)
            thermox_call(A, 10_000)  # jax compiles for this n
        rows = []
        for r in range(rounds):
            E, seconds, engine = spu(A, r)
            row = [seconds, *errors(E, reference), engine]
            if have_thermox:
                T, tx_seconds = thermox_call(A, r)
                row += [tx_seconds, *errors(T, reference)]
            rows.append(row)
        med = [statistics.median(row[i] for row in rows) for i in (0, 1, 2)]
        line = f"{n:5d} | {med[0]:10.3f} | {med[1]:11.3f} | {med[2]:11.3f} | {rows[0][3]:9s}"
        if have_thermox:
            tx = [statistics.median(row[i] for row in rows) for i in (4, 5, 6)]
            ratio = statistics.median(row[4] / row[0] for row in rows)
            line += f" | {tx[0]:9.3f} | {tx[1]:11.3f} | {tx[2]:11.3f} | {ratio:7.1f}x"
            if n == max(sizes):
                verdict.append(("at least as accurate", med[1] <= tx[1], f"{med[1]:.3f} vs {tx[1]:.3f}"))
                verdict.append(("10x faster", ratio >= 10.0, f"{ratio:.1f}x"))
        print(line)
    for what, ok, value in verdict:
        print(f"target at n = {max(sizes)}, {what}: {'PASS' if ok else 'MISS'} ({value})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
