"""The dense exact engine against a Cholesky solve: load + run + read at N = 1024 and 4096 (issue 14, item 1).

    python benchmarks/bench_exact_dense.py                  # N = 1024, 4096; about three minutes
    python benchmarks/bench_exact_dense.py --sizes 1024     # quicker

For each N: a random SPD system (condition number 10, b ~ N(0, I)) on tngd-sim, timed as a user calls it:
``load_matrix(A)``, ``load_vector(b, scale=s)``, ``run(t=200, burn_in=100, engine="exact")``,
``read_mean()`` on one device (s fixed beforehand by ``scale="auto"``: the driver's own smallest-eigenvalue
estimate, not the engine's, is left out of the timing), beside ``scipy.linalg.cho_factor + cho_solve`` of
the same system, interleaved round by round, medians.  Two forms of the exact engine:

* krylov: ``spu_emulator.krylov`` (a Cholesky factor, Lanczos for the run's functions of M, a bound of
  lambda_min from block Lanczos on M^-1 for the engine's rail and ADC checks), the default from 512 cells;
* modal: the full eigendecomposition the engine used before (forced by raising ``krylov.MIN_CELLS``).

Columns: the medians (Cholesky; the Krylov form's whole call sequence and the part of it spent inside
the emulated device, ``Firmware.handle``, the rest being the driver's argument checks, quantisation and
settling estimate; the modal form), the ratios to Cholesky (issue 14's target: krylov / Cholesky <= 3), and
each form's relative error against numpy.linalg.solve (the device's own: 16-bit codes and noise, one pass
at the auto scale, without ``linalg.solve``'s second, better-ranged run).  One BLAS thread; the ratios
are what to quote, absolute times move with the machine's load.
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

import driver  # noqa: E402
from spu_emulator import krylov  # noqa: E402

T, BURN_IN = 200.0, 100.0


def _system(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, 10.0, n)) @ q.T
    return 0.5 * (a + a.T), rng.standard_normal(n)


class _TimedLink:
    """The in-process link with the time spent inside the emulated device (Firmware.handle) summed up."""

    def __init__(self, link) -> None:
        self.link, self.seconds = link, 0.0
        self._request = link.request
        link.request = self.request

    def request(self, opcode, payload=None):
        start = time.perf_counter()
        try:
            return self._request(opcode, payload)
        finally:
            self.seconds += time.perf_counter() - start


def _device_solve(dev, link: _TimedLink, a, b, scale) -> tuple[float, float, np.ndarray]:
    """(wall time of load + run + read, the part spent in the device, the answer)."""
    link.seconds = 0.0
    start = time.perf_counter()
    dev.load_matrix(a)
    dev.load_vector(b, scale=scale)
    report = dev.run(T, BURN_IN, engine="exact")
    x = dev.read_mean()
    seconds = time.perf_counter() - start
    assert report.engine == "exact"
    return seconds, link.seconds, np.asarray(x)


def _cholesky(a, b) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    x = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), b)
    return time.perf_counter() - start, x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {os.cpu_count()} CPUs, load average {load:.2f}; tngd-sim, cond 10, t = {T:g}, burn_in {BURN_IN:g} tau")
    head = ("N", "cholesky", "krylov", "in device", "modal", "krylov/chol", "device/chol", "modal/chol")
    head += ("err krylov", "err modal")
    print(" ".join(f"{h:>12}" for h in head))
    worst = 0.0
    default_min = krylov.MIN_CELLS
    for n in args.sizes:
        a, b = _system(n, n)
        reference = np.linalg.solve(a, b)
        with driver.open("tngd-sim", seed=0) as dev:
            dev.load_matrix(a)
            scale = dev.load_vector(b, scale="auto").scale
            link = _TimedLink(dev.transport)
            times: dict[str, list[float]] = {"cholesky": [], "krylov": [], "modal": [], "krylov device": []}
            answers = {}
            try:
                for _ in range(args.repeats):
                    seconds, _x = _cholesky(a, b)
                    times["cholesky"].append(seconds)
                    for form, minimum in (("krylov", default_min), ("modal", n + 1)):
                        krylov.MIN_CELLS = minimum
                        seconds, inside, answers[form] = _device_solve(dev, link, a, b, scale)
                        times[form].append(seconds)
                        if form == "krylov":
                            times["krylov device"].append(inside)
            finally:
                krylov.MIN_CELLS = default_min
        median = {key: statistics.median(value) for key, value in times.items()}
        error = {key: float(np.linalg.norm(x - reference) / np.linalg.norm(reference)) for key, x in answers.items()}
        ratios = [median[key] / median["cholesky"] for key in ("krylov", "krylov device", "modal")]
        worst = max(worst, ratios[0])
        cells = [median[key] for key in ("cholesky", "krylov", "krylov device", "modal")]
        print(
            f"{n:>12d} "
            + " ".join(f"{c * 1e3:>10.1f}ms" for c in cells)
            + " "
            + " ".join(f"{c:>12.2f}" for c in ratios)
            + f" {error['krylov']:>12.2e} {error['modal']:>12.2e}"
        )
    print(f"krylov / Cholesky: at most {worst:.2f}x (issue 14's target: <= 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
