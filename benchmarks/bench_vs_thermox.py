"""Wall time of one linear solve on the emulated ``tngd-sim`` SPU, beside thermox and a Cholesky solve.

    pip install ".[bench]"                           # thermox and jax, the comparison
    python benchmarks/bench_vs_thermox.py            # about two minutes, most of it thermox
    python benchmarks/bench_vs_thermox.py --quick    # smoke run: N = 64, 128, 256, 2 rounds

What it measures.  For N in 64, 256, 1024, on a random SPD matrix A (eigenvalues
log-spaced in [1, 10], random orthogonal eigenbasis, fixed seed) and b = A x
with x ~ U(-1, 1):

- SPU: ``driver.open("tngd-sim", seed=0)``, then, timed together,
  ``load_matrix(A)``, ``load_vector(b, scale=...)``, ``run(t=1000)`` (one ADC
  sample per tau, so 1000 samples; engine "auto") and ``read_mean()``.  Before
  each timed solve the device is reset (not timed), so every solve starts from
  rest, V = 0, as thermox's does.  The time includes everything the firmware
  does for a new matrix: quantising and programming the elements, the spectral
  norm estimate, the exact engine's eigendecomposition (O(N^3), on the first
  run after a load) and the run itself.
- thermox: ``thermox.linalg.solve(A, b, num_samples=1000, dt=1.0, key=...)`` on
  float64 jax arrays, ``block_until_ready`` on the result; it too
  eigendecomposes A on every call.

Each side is warmed up first (jax compiles for each N), then the two are timed
alternately for ``--repeats`` rounds (5; 2 with ``--quick``) so that load on the
shared machine hits both alike; the table gives medians and the median of the
per-round ratios, and each side's relative error ||x - x_np|| / ||x_np||
against ``numpy.linalg.solve``.  Both start at 0 and average from the first
sample (no burn-in), so both carry the same start-up bias, about
1 / (1000 lambda_min) of the solution.

The input scale.  The driver maps max|b| to the DAC's full scale by default, and
the device then solves a V = u with a = A / s_A, u = b / s_b, V = x s_A / s_b.
The firmware's "auto" takes the exact engine only when it can bound the whole
path inside the ADC range; from rest that bound is max|V*| + ||V*||_2 (the mean
path of a contractive array stays within ||V(0) - V*||_2 of V*), which the
default scale puts at several volts (above the 2 V ADC range), so "auto" would
fall back to the transient engine.  The script therefore passes ``scale=`` to
``load_vector`` so that this bound is half the ADC range (1 V), and checks that
``RunReport.engine == "exact"`` and ``adc_clipped == 0`` (engine and clip
columns).

A second table, at the largest N (1024), with the matrix and vector already
loaded (the state carries over between runs): ``run + read_mean`` at t = 10
and t = 1e5, and ``scipy.linalg.cho_factor`` + ``cho_solve`` of the same system.

Targets (PASS/MISS), at N = 1024: SPU at least 10x faster than thermox;
run + read at t = 1e5 within 2x of t = 10; run + read within 10x of the
Cholesky solve.

BLAS threads: unless already set in the environment, OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS and MKL_NUM_THREADS are set to 1 before numpy is imported.  On
a small shared machine OpenBLAS threads that spin against other load make an
eigendecomposition 10 to 100 times slower and the timings meaningless.  jax's
LAPACK calls (thermox's eig and eigh) go through the same OpenBLAS; XLA's own
thread pool for its matrix products is left as it is, which favours thermox.

If thermox (or jax) is not importable the script says so and still prints the
SPU columns.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _variable in BLAS_THREAD_VARIABLES:
    os.environ.setdefault(_variable, "1")  # before numpy / scipy / jax load their BLAS

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

import driver  # noqa: E402

PRESET = "tngd-sim"
SIZES = (64, 256, 1024)
QUICK_SIZES = (64, 128, 256)
TARGET_N = 1024
RUN_TIME = 1000.0  # tau; with one ADC sample per tau, 1000 samples as thermox's num_samples
SHORT_TIME, LONG_TIME = 10.0, 1.0e5  # second table, tau
EIGENVALUE_RANGE = (1.0, 10.0)
REACH_FRACTION = 0.5  # max|V*| + ||V*||_2 as a fraction of the ADC range

SPEEDUP_TARGET = 10.0  # thermox / SPU, at TARGET_N
LONG_RUN_TARGET = 2.0  # run+read at LONG_TIME / at SHORT_TIME
CHOLESKY_TARGET = 10.0  # run+read / Cholesky solve


@dataclass(frozen=True)
class Problem:
    """A x = b with A SPD; ``solution`` is numpy's solve, the reference for both errors."""

    matrix: np.ndarray
    vector: np.ndarray
    solution: np.ndarray


def make_problem(n: int, seed: int) -> Problem:
    """A with eigenvalues log-spaced in EIGENVALUE_RANGE in a random orthogonal basis; b = A x, x ~ U(-1, 1)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    matrix = (q * np.geomspace(*EIGENVALUE_RANGE, n)) @ q.T
    matrix = 0.5 * (matrix + matrix.T)
    vector = matrix @ rng.uniform(-1.0, 1.0, n)
    return Problem(matrix, vector, np.linalg.solve(matrix, vector))


def relative_error(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def vector_scale(device: driver.Device, problem: Problem) -> float:
    """The load_vector scale s_b (user units per volt) that puts max|V*| + ||V*||_2 at REACH_FRACTION
    of the ADC range, V* = x s_A / s_b with the driver's default matrix scale s_A = max|A| / g_max;
    never below max|b| / dac_range_v, so no DAC code clips."""
    info = device.info
    x = problem.solution
    matrix_scale = float(np.abs(problem.matrix).max()) / info.g_max
    reach = float(np.abs(x).max() + np.linalg.norm(x))
    scale = matrix_scale * reach / (REACH_FRACTION * info.adc_range_v)
    return max(scale, float(np.abs(problem.vector).max()) / info.dac_range_v)


@dataclass(frozen=True)
class SpuResult:
    seconds: float
    solution: np.ndarray
    report: driver.RunReport


def spu_solve(device: driver.Device, problem: Problem, scale: float) -> SpuResult:
    """Reset (untimed), then time load_matrix + load_vector + run(t=RUN_TIME) + read_mean."""
    device.reset()
    started = time.perf_counter()
    device.load_matrix(problem.matrix)
    loaded = device.load_vector(problem.vector, scale=scale)
    report = device.run(t=RUN_TIME)
    x = device.read_mean()
    seconds = time.perf_counter() - started
    if loaded.clipped:
        raise RuntimeError(f"{loaded.clipped} DAC codes clipped: the vector scale {scale:g} is too small")
    return SpuResult(seconds, x, report)


def spu_run_read(device: driver.Device, t: float) -> SpuResult:
    """Time run(t) + read_mean on the loaded device."""
    started = time.perf_counter()
    report = device.run(t=t)
    x = device.read_mean()
    return SpuResult(time.perf_counter() - started, x, report)


def cholesky_solve(problem: Problem) -> tuple[float, np.ndarray]:
    """Time scipy.linalg.cho_factor + cho_solve; returns (seconds, x)."""
    started = time.perf_counter()
    x = scipy.linalg.cho_solve(scipy.linalg.cho_factor(problem.matrix), problem.vector)
    return time.perf_counter() - started, x


class Thermox:
    """thermox.linalg.solve on float64 jax arrays with a fixed key; None-like when thermox is missing."""

    def __init__(self, seed: int):
        try:
            import jax

            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp
            import thermox
        except ImportError as exc:
            self.available = False
            self.why = str(exc)
            return
        self.available = True
        self.why = ""
        self._jnp = jnp
        self._solve = thermox.linalg.solve
        self._key = jax.random.PRNGKey(seed)
        version = importlib.metadata.version("thermox")
        self.versions = f"thermox {version}, jax {jax.__version__} on {jax.default_backend()}"

    def prepare(self, problem: Problem) -> tuple:
        """The problem as float64 jax arrays (converted once, outside the timing)."""
        return self._jnp.asarray(problem.matrix), self._jnp.asarray(problem.vector)

    def solve(self, arrays: tuple) -> tuple[float, np.ndarray]:
        """Time one thermox.linalg.solve(A, b, num_samples=RUN_TIME, dt=1); returns (seconds, x)."""
        matrix, vector = arrays
        started = time.perf_counter()
        x = self._solve(matrix, vector, num_samples=int(RUN_TIME), dt=1.0, key=self._key).block_until_ready()
        return time.perf_counter() - started, np.asarray(x)


@dataclass(frozen=True)
class Row:
    n: int
    spu_s: float
    thermox_s: float | None
    ratio: float | None  # median over rounds of thermox / SPU
    spu_error: float
    thermox_error: float | None
    engine: str
    adc_clipped: int

    @property
    def verdict(self) -> str:
        if self.n != TARGET_N or self.ratio is None:
            return "-"
        return "PASS" if self.ratio >= SPEEDUP_TARGET else "MISS"


def measure(device: driver.Device, reference: Thermox, n: int, repeats: int, seed: int) -> Row:
    """Warm up both sides at size n, then time them alternately for ``repeats`` rounds."""
    problem = make_problem(n, seed + n)
    scale = vector_scale(device, problem)
    spu = spu_solve(device, problem, scale)  # warm-up
    arrays = None
    if reference.available:
        arrays = reference.prepare(problem)
        reference.solve(arrays)  # warm-up: jax compiles for this shape
    spu_times, thermox_times, ratios = [], [], []
    thermox_x = None
    for _ in range(repeats):
        spu = spu_solve(device, problem, scale)
        spu_times.append(spu.seconds)
        if arrays is not None:
            seconds, thermox_x = reference.solve(arrays)
            thermox_times.append(seconds)
            ratios.append(seconds / spu.seconds)
    return Row(
        n=n,
        spu_s=statistics.median(spu_times),
        thermox_s=statistics.median(thermox_times) if thermox_times else None,
        ratio=statistics.median(ratios) if ratios else None,
        spu_error=relative_error(spu.solution, problem.solution),
        thermox_error=relative_error(thermox_x, problem.solution) if thermox_x is not None else None,
        engine=spu.report.engine,
        adc_clipped=spu.report.adc_clipped,
    )


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table_one(rows: list[Row]) -> list[str]:
    """The SPU vs thermox table; returns warnings about runs that were not exact or clipped."""
    header = (
        f"{'N':>5} {'SPU load+run+read s':>20} {'thermox s':>10} {'thermox/SPU':>12}"
        f" {'SPU rel err':>12} {'thermox rel err':>15} {'engine':>7} {'clip':>5}  target"
    )
    print(header)
    print("-" * len(header))
    warnings = []
    for row in rows:
        print(
            f"{row.n:>5} {row.spu_s:>20.4g} {_cell(row.thermox_s, 10, '.4g')} {_cell(row.ratio, 12, '.1f')}"
            f" {row.spu_error:>12.2e} {_cell(row.thermox_error, 15, '.2e')} {row.engine:>7} {row.adc_clipped:>5}"
            f"  {row.verdict}"
        )
        if row.engine != "exact" or row.adc_clipped:
            warnings.append(f"N = {row.n}: engine {row.engine!r}, {row.adc_clipped} ADC conversions clipped")
    print(f"target: thermox/SPU >= {SPEEDUP_TARGET:g} at N = {TARGET_N}")
    return warnings


def measure_table_two(device: driver.Device, n: int, rounds: int, seed: int) -> list[str]:
    """run+read at SHORT_TIME and LONG_TIME on the loaded device, and a Cholesky solve, interleaved."""
    problem = make_problem(n, seed + n)
    device.reset()
    device.load_matrix(problem.matrix)
    device.load_vector(problem.vector, scale=vector_scale(device, problem))
    spu_run_read(device, RUN_TIME)  # warm-up: the exact engine's eigendecomposition, state to equilibrium
    cholesky_solve(problem)
    times: dict[str, list[float]] = {"short": [], "long": [], "cholesky": []}
    results: dict[str, SpuResult] = {}
    cholesky_x = problem.solution
    for _ in range(rounds):
        for label, t in (("short", SHORT_TIME), ("long", LONG_TIME)):
            results[label] = spu_run_read(device, t)
            times[label].append(results[label].seconds)
        seconds, cholesky_x = cholesky_solve(problem)
        times["cholesky"].append(seconds)
    median = {label: statistics.median(values) for label, values in times.items()}

    print(f"\nN = {n}, matrix and vector loaded, the state carrying over between runs; median of {rounds} rounds")
    header = f"{'':<28} {'s':>10} {'engine':>7} {'clip':>5} {'rel err':>10} {'/ Cholesky':>11}"
    print(header)
    print("-" * len(header))
    warnings = []
    for label, t in (("short", SHORT_TIME), ("long", LONG_TIME)):
        report = results[label].report
        print(
            f"{f'SPU run+read t = {t:g}':<28} {median[label]:>10.4g} {report.engine:>7} {report.adc_clipped:>5}"
            f" {relative_error(results[label].solution, problem.solution):>10.2e}"
            f" {median[label] / median['cholesky']:>11.2f}"
        )
        if report.engine != "exact" or report.adc_clipped:
            warnings.append(f"t = {t:g}: engine {report.engine!r}, {report.adc_clipped} ADC conversions clipped")
    print(
        f"{'scipy cho_factor+cho_solve':<28} {median['cholesky']:>10.4g} {'-':>7} {'-':>5}"
        f" {relative_error(cholesky_x, problem.solution):>10.2e} {1.0:>11.2f}"
    )
    long_over_short = median["long"] / median["short"]
    over_cholesky = max(median["short"], median["long"]) / median["cholesky"]
    note = "" if n == TARGET_N else f"  (smoke run: the targets are set at N = {TARGET_N})"
    print(
        f"t = {LONG_TIME:g} / t = {SHORT_TIME:g}: {long_over_short:.2f} (target <= {LONG_RUN_TARGET:g})"
        f"  {'PASS' if long_over_short <= LONG_RUN_TARGET else 'MISS'}{note}"
    )
    print(
        f"run+read / Cholesky, slower t: {over_cholesky:.2f} (target <= {CHOLESKY_TARGET:g})"
        f"  {'PASS' if over_cholesky <= CHOLESKY_TARGET else 'MISS'}{note}"
    )
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: N = {QUICK_SIZES}, 2 rounds")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"matrix sizes N (default {SIZES})")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per size (default 5, quick 2)")
    parser.add_argument("--seed", type=int, default=0, help="problem seed and thermox PRNG key")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)

    reference = Thermox(args.seed)
    threads = ", ".join(f"{name}={os.environ[name]}" for name in BLAS_THREAD_VARIABLES)
    print(f"SPU {PRESET!r} (driver, engine auto) vs thermox.linalg.solve; {threads}; {os.cpu_count()} CPUs")
    if reference.available:
        print(reference.versions)
    else:
        print(
            f'thermox is not importable ({reference.why}); install the bench extra, pip install ".[bench]",'
            " for the thermox columns.  SPU columns only."
        )
    print(
        f"t = {RUN_TIME:g} tau, 1 ADC sample per tau vs num_samples = {RUN_TIME:g}, dt = 1; A SPD, eigenvalues in"
        f" {list(EIGENVALUE_RANGE)}; median of {repeats} interleaved rounds\n"
    )
    warnings = []
    rows = []
    with driver.open(PRESET, seed=0) as device:
        for n in sizes:
            rows.append(measure(device, reference, n, repeats, args.seed))
        warnings += print_table_one(rows)
        warnings += measure_table_two(device, max(sizes), max(5, 5 * repeats), args.seed)
    for warning in warnings:
        print(f"warning: {warning}; the exact engine was expected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
