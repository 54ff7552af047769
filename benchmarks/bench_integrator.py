"""Seconds per integration step of the numba transient engine, beside a numpy ``A @ x``.

    python benchmarks/bench_integrator.py            # about half a minute
    python benchmarks/bench_integrator.py --quick    # smoke run, a few seconds

For N in 8, 64, 256, 1024 it calls the engine's kernel ``spu_emulator._kernels._run_rc``
directly, as ``Firmware._run`` does, on a realistic load: a random SPD coupling
matrix (condition number 10) behind 5 % capacitor mismatch, so the drift
M = C^-1 a is the non-symmetric matrix the firmware integrates; the step
dt = step_factor / ||M||_2 with step_factor 0.02; injected noise on
(kappa0 = 1e-5, one normal per cell per step); a 12-bit ADC with gain/offset
error and input noise converting every cell 10 times per tau; rails on at
+-2.4 V, with the state started at the equilibrium A^-1 b so that no rail is hit.

In the same run, interleaved with the engine so that load on the machine hits
both alike, it times a numpy matrix-vector product of the same size in a Python
loop, both ``A @ x`` and ``np.dot(A, x, out=y)`` with x and y preallocated, and
takes the faster of the two as the reference.  Every timing is calibrated to
last about ``--seconds`` (0.3 s; 0.03 s with ``--quick``), after a warm-up call
that compiles the kernel; the table gives the best (shortest) of ``--repeats``
(5) interleaved rounds, since load from other processes only ever adds time, and
the ratio is best engine step / best numpy matvec.  The header prints the load
average: on a busy machine, rerun or raise ``--repeats``.

Targets (PASS/MISS column): engine step / numpy matvec <= 1.5 for N >= 256, and at
least 1e6 steps per second at N = 8.  A last line times the public driver end to
end at N = 8 (``driver.open("ideal")``, load, one long ``run`` on the transient
engine), so the cost of the command layer shows beside the kernel's; "ideal" has
no noise, so it steps faster than the table's noisy N = 8 row, and a second line
does the same on "spu-8" (noise, rails, 12-bit converters).  The last line measures the
stationary variance of the stiffest mode at the default step (issue 14's target: within
0.2 % of kappa0 / lam, where Euler-Maruyama's is about step_factor / 2 = 1 % high).

BLAS threads: unless already set in the environment, this script sets
OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS to 1 before numpy is
imported, so the engine's ``np.dot`` (scipy's BLAS, called from numba) and
numpy's ``A @ x`` both run on one thread.  On a machine with few cores that is
the fair comparison and the steadiest one: extra BLAS threads compete with
everything else that runs.  Set the variables yourself to use more threads, e.g.
``OPENBLAS_NUM_THREADS=2 python benchmarks/bench_integrator.py``.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _variable in BLAS_THREAD_VARIABLES:
    os.environ.setdefault(_variable, "1")  # before numpy / scipy load their BLAS

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

import driver  # noqa: E402
from spu_emulator import _kernels  # noqa: E402

SIZES = (8, 64, 256, 1024)
RATIO_TARGET = 1.5  # engine step / numpy matvec, for N >= RATIO_TARGET_MIN_N
RATIO_TARGET_MIN_N = 256
RATE_TARGET = 1.0e6  # steps per second at N = RATE_TARGET_N
RATE_TARGET_N = 8

# The load: a board like spu-8, scaled to N cells.
STEP_FACTOR = 0.02
CONDITION = 10.0
CAPACITANCE_MISMATCH = 0.05
KAPPA0 = 1.0e-5  # injected noise, V^2 / tau
ADC_BITS = 12
ADC_RANGE_V = 2.048
ADC_NOISE_V = 3.0e-4
ADC_GAIN_ERROR = 1.0e-3
ADC_OFFSET_V = 5.0e-4
SAMPLE_RATE = 10.0  # conversions per tau
RAIL_V = 2.4
NO_COV = np.zeros((0, 0))  # the kernel's second-moment accumulator, off


@dataclass
class EngineLoad:
    """The arguments of one ``_run_rc`` call, built once per N and reused."""

    drift: np.ndarray
    force: np.ndarray
    noise_sd: np.ndarray
    state: np.ndarray
    dt: float
    steps_per_sample: int
    adc_gain: np.ndarray
    adc_offset_v: np.ndarray
    adc_lsb: float
    adc_code_max: float
    rng: np.random.Generator
    acc: np.ndarray
    work: np.ndarray
    noise_prev: np.ndarray | None = None  # the Leimkuhler-Matthews step's last normals, kept across calls

    @property
    def no_snapshots(self) -> np.ndarray:
        """The snapshot buffer of a run that keeps none: (0, n)."""
        return np.zeros((0, self.state.shape[0]))

    def run(self, n_steps: int) -> float:
        """Integrate n_steps from the present state; returns the wall time (s) of the kernel call."""
        self.acc[:] = 0.0
        if self.noise_prev is None:
            self.noise_prev = np.zeros(self.state.shape[0])
            _kernels._draw_normals(self.rng, self.noise_prev)
        started = time.perf_counter()
        steps, _, saturated, _, runaway = _kernels._run_rc(
            self.drift,
            self.force,
            self.noise_sd,
            self.state,
            self.noise_prev,
            self.dt,
            n_steps,
            self.steps_per_sample,
            self.steps_per_sample,
            RAIL_V,
            self.adc_gain,
            self.adc_offset_v,
            ADC_NOISE_V,
            self.adc_lsb,
            self.adc_code_max,
            self.rng,
            self.acc,
            self.work,
            NO_COV,  # recording off (size-0 buffers), as in a run that only reads the mean
            self.no_snapshots,
            1,
        )
        wall = time.perf_counter() - started
        if steps != n_steps or saturated or runaway:
            raise RuntimeError(f"the benchmark load left its range: steps {steps}, saturated {saturated}")
        return wall


def make_load(n: int, seed: int) -> EngineLoad:
    """A random SPD coupling with eigenvalues log-spaced in [1, CONDITION], mismatched capacitors,
    the drive that puts the equilibrium at x* ~ U(-0.5, 0.5) V, and the ADC of a 12-bit board."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    coupling = (q * np.geomspace(1.0, CONDITION, n)) @ q.T
    coupling = 0.5 * (coupling + coupling.T)
    capacitance = 1.0 + CAPACITANCE_MISMATCH * rng.standard_normal(n)
    drift = np.ascontiguousarray(coupling / capacitance[:, None])
    equilibrium = rng.uniform(-0.5, 0.5, n)
    period = 1.0 / SAMPLE_RATE
    steps_per_sample = max(1, math.ceil(period * np.linalg.norm(drift, 2) / STEP_FACTOR - 1e-9))
    code_max = float(2 ** (ADC_BITS - 1) - 1)
    return EngineLoad(
        drift=drift,
        force=drift @ equilibrium,
        noise_sd=np.sqrt(2.0 * KAPPA0) / capacitance,
        state=equilibrium.copy(),
        dt=period / steps_per_sample,
        steps_per_sample=steps_per_sample,
        adc_gain=1.0 + ADC_GAIN_ERROR * rng.standard_normal(n),
        adc_offset_v=ADC_OFFSET_V * rng.standard_normal(n),
        adc_lsb=ADC_RANGE_V / code_max,
        adc_code_max=code_max,
        rng=np.random.default_rng(seed + 1),
        acc=np.zeros(n),
        work=np.empty(n),
    )


def time_matmul(a: np.ndarray, x: np.ndarray, calls: int) -> float:
    """Wall time (s) of ``calls`` evaluations of ``a @ x`` in a Python loop."""
    started = time.perf_counter()
    for _ in range(calls):
        a @ x
    return time.perf_counter() - started


def time_dot_out(a: np.ndarray, x: np.ndarray, y: np.ndarray, calls: int) -> float:
    """Wall time (s) of ``calls`` evaluations of ``np.dot(a, x, out=y)`` in a Python loop."""
    started = time.perf_counter()
    for _ in range(calls):
        np.dot(a, x, out=y)
    return time.perf_counter() - started


def calibrate(timed, seconds: float) -> int:
    """How many repetitions of ``timed(count) -> wall seconds`` last about ``seconds``."""
    count = 16
    while True:
        wall = timed(count)
        if wall >= 0.02 or count >= 1 << 30:
            return max(1, round(count * seconds / wall))
        count *= 8


@dataclass(frozen=True)
class Row:
    n: int
    steps: int
    engine_s: float  # per step, best round
    matmul_s: float  # per ``A @ x``, best round
    dot_out_s: float  # per ``np.dot(A, x, out=y)``, best round

    @property
    def numpy_s(self) -> float:
        return min(self.matmul_s, self.dot_out_s)

    @property
    def ratio(self) -> float:
        return self.engine_s / self.numpy_s

    @property
    def verdict(self) -> str:
        if self.n >= RATIO_TARGET_MIN_N:
            return "PASS" if self.ratio <= RATIO_TARGET else "MISS"
        if self.n == RATE_TARGET_N:
            return "PASS" if 1.0 / self.engine_s >= RATE_TARGET else "MISS"
        return "-"


def measure(n: int, seconds: float, repeats: int, seed: int) -> Row:
    """Time the engine and the numpy matvec at size n, interleaved, ``repeats`` rounds."""
    load = make_load(n, seed)
    load.run(load.steps_per_sample + 1)  # compiles on the first size (or loads the cache)
    x = load.state.copy()
    y = np.empty(n)
    steps = calibrate(load.run, seconds)
    matmul_calls = calibrate(lambda count: time_matmul(load.drift, x, count), seconds)
    dot_calls = calibrate(lambda count: time_dot_out(load.drift, x, y, count), seconds)
    engine, matmul, dot_out = [], [], []
    for _ in range(repeats):
        engine.append(load.run(steps) / steps)
        matmul.append(time_matmul(load.drift, x, matmul_calls) / matmul_calls)
        dot_out.append(time_dot_out(load.drift, x, y, dot_calls) / dot_calls)
    return Row(n=n, steps=steps, engine_s=min(engine), matmul_s=min(matmul), dot_out_s=min(dot_out))


# The driver's "auto" engine may answer a linear run in closed form; these lines time the stepper.
TRANSIENT = {"engine": "transient", "on_saturation": "flag"}


def driver_end_to_end(preset: str, n: int, steps: int, seed: int) -> str:
    """One line: steps per second of ``Device.run`` (transient engine) on a preset, and the fixed
    cost of one call, timed on one-step runs (validation, command layer, copies, report)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.geomspace(1.0, CONDITION, n)) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.uniform(-1.0, 1.0, n)
    with driver.open(preset, seed=seed) as device:
        device.load_matrix(a)
        device.load_vector(b)
        first = device.run(t=10.0, **TRANSIENT)  # warm-up; gives dt
        one_step = min(device.run(t=first.dt, **TRANSIENT).wall_time_s for _ in range(20))
        report = device.run(t=steps * first.dt, **TRANSIENT)
    return (
        f"driver end to end ({preset!r}, N={n}): {report.steps:,} steps in {report.wall_time_s:.3f} s"
        f" = {report.steps / report.wall_time_s:.3g} steps/s;"
        f" fixed cost of one run() call {one_step * 1e6:.0f} us"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short timings, 2 rounds")
    parser.add_argument("--seconds", type=float, help="length of each timing, s (default 0.3, quick 0.03)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per size (default 5, quick 2)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="cell counts N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (0.03 if args.quick else 0.3)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)

    threads = ", ".join(f"{name}={os.environ[name]}" for name in BLAS_THREAD_VARIABLES)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"numba engine _run_rc vs numpy matvec; {threads}; {os.cpu_count()} CPUs, load {load_average:.1f}")
    print(f"noise on, {ADC_BITS}-bit ADC {SAMPLE_RATE:g}x/tau, rails +-{RAIL_V} V; best of {repeats} rounds")
    header = (
        f"{'N':>5} {'steps timed':>12} {'s/step':>10} {'steps/s':>10}"
        f" {'s A@x':>10} {'s dot(out)':>10} {'ratio':>6}  target"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        row = measure(n, seconds, repeats, args.seed + n)
        print(
            f"{row.n:>5} {row.steps:>12,} {row.engine_s:>10.3e} {1.0 / row.engine_s:>10.3e}"
            f" {row.matmul_s:>10.3e} {row.dot_out_s:>10.3e} {row.ratio:>6.2f}  {row.verdict}"
        )
    print(
        f"ratio = engine s/step / min(s A@x, s dot(out)); targets: ratio <= {RATIO_TARGET:g} at"
        f" N >= {RATIO_TARGET_MIN_N}, >= {RATE_TARGET:.0e} steps/s at N = {RATE_TARGET_N}"
    )
    driver_steps = 1_000_000 if args.quick else 10_000_000
    for preset in ("ideal", "spu-8"):
        print(driver_end_to_end(preset, 8, driver_steps, args.seed))
    print(stationary_variance(1 if args.quick else 8, args.seed))
    return 0


def stationary_variance(runs: int, seed: int) -> str:
    """The transient engine's stationary variance of its stiffest mode at the default step, against kappa0 / lam.

    One cell of rate lam = 1 on "ideal" with kappa0 = 0.01 V^2 / tau: dt = step_factor / lam = 0.02 tau, the
    case where Euler-Maruyama's variance kappa0 / (lam (1 - lam dt / 2)) is 1 % high.  ``runs`` consecutive runs
    of 2.5e5 tau (1.25e7 steps each; the state and the step's noise carry over) record the covariance of their
    conversions, one per tau; their spread gives the standard error of the mean ratio.
    """
    kappa0, t = 0.01, 2.5e5
    ratios = []
    with driver.open("ideal", seed=seed, overrides={"noise.kappa0": kappa0}) as dev:
        dev.load_matrix(np.eye(1), scale=1.0)
        dev.load_vector(np.zeros(1), scale=1.0)
        dev.run(100.0, engine="transient")  # from 0 to the stationary law
        started = time.perf_counter()
        for _ in range(runs):
            report = dev.run(t, 0.0, engine="transient", record_cov=True)
            ratios.append(float(dev.read_cov()[0, 0]) / kappa0)
        wall = time.perf_counter() - started
    mean = float(np.mean(ratios))
    error = float(np.std(ratios, ddof=1) / math.sqrt(runs)) if runs > 1 else float("nan")
    euler = 1.0 / (1.0 - report.dt / 2.0)
    return (
        f"stationary variance, one cell of rate 1 at dt = {report.dt:g} tau (default step_factor): measured /"
        f" kappa0 / lam = {mean:.5f} +- {error:.5f} (standard error over {runs} runs of {t:g} tau,"
        f" {runs * report.steps / wall:.3g} steps/s); target within 0.2 %; plain Euler-Maruyama's would be"
        f" {euler:.5f} (analytic, 1 / (1 - lam dt / 2))"
    )


if __name__ == "__main__":
    raise SystemExit(main())
