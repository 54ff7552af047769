"""Matrix inversion on the 8-cell oscillator SPU: the second demonstration of Melanson et al. (arXiv 2312.04836).

    pip install ".[plot]"
    python examples/matrix_inverse.py [--times 300 1000 3000 10000 30000] [--out matrix_inverse.png]

A random 8 x 8 symmetric positive definite A (condition number 5) is loaded as the coupling, with zero
drive and the injected noise turned up to fill the converters; at equilibrium the cells' covariance is
kappa a^-1, so the on-device covariance accumulator, read back in user units, is A^-1
(driver.linalg.inv).  For a range of analog run times t the script prints the relative error
||A^-1_hat - A^-1||_F / ||A^-1||_F on spu-8-lc and on the same board with ideal parts (no mismatch,
quantisation, offsets or converter errors), and saves a PNG of both against t.

With ideal parts the error is the estimator's, falling as 1 / sqrt(t); the board's non-idealities set a
floor of a few per cent, which t cannot lower (the prototype's reported accuracy is of that order too).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

import driver
from spu_emulator.spec import SPEC_DIR, read_yaml


def random_spd(d: int, condition: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (q * np.geomspace(1.0, condition, d)) @ q.T
    return 0.5 * (a + a.T)


def ideal_parts(preset: str, folder: Path) -> Path:
    """The preset with every part ideal (mismatch, quantisation, offsets, converter errors, rails off),
    keeping its cells, time base, oscillator and noise source: the estimator's error alone."""
    spec = read_yaml((SPEC_DIR / f"{preset}.yaml").read_text())
    spec["name"] = f"{preset}-ideal-parts"
    spec["coupling"] = {"element_bits": 0, "g_max": spec["coupling"].get("g_max", 1.0)}
    spec["cell"] = {}
    spec["oscillator"] = {k: v for k, v in spec.get("oscillator", {}).items() if not k.endswith("mismatch")}
    spec["noise"] = {k: v for k, v in spec["noise"].items() if k in ("kappa0", "kappa0_max")}
    spec["dac"] = {"range_v": spec["dac"]["range_v"]}
    spec["adc"] = {"range_v": spec["adc"]["range_v"], "sample_rate": spec["adc"]["sample_rate"]}
    spec["rails"] = {"enabled": False}
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=float, nargs="+", default=[300, 1000, 3000, 10000, 30000, 100000])
    parser.add_argument("--preset", default="spu-8-lc", help="a preset name (default spu-8-lc)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="matrix_inverse.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        devices = {"board": args.preset, "ideal parts": ideal_parts(args.preset, Path(folder))}
        with driver.open(args.preset, seed=args.seed) as probe:
            d, tau_s = probe.info.cells, probe.info.tau_s
            print(f"{probe.info.name}: {d} {probe.info.cell_kind} cells, tau = {tau_s * 1e6:.3g} us")
        A = random_spd(d, 5.0, args.seed)
        exact = np.linalg.inv(A)
        errors = {label: [] for label in devices}
        print(f"{'t (tau)':>9} {'board ms':>9} {'err board':>10} {'err ideal':>10} {'wall s':>7}")
        for t in args.times:
            started = time.perf_counter()
            for label, spec in devices.items():
                with driver.open(spec, seed=args.seed) as dev:
                    estimate = driver.linalg.inv(dev, A, t=t)
                errors[label].append(float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact)))
            wall = time.perf_counter() - started
            board, ideal = errors["board"][-1], errors["ideal parts"][-1]
            print(f"{t:>9.4g} {t * tau_s * 1e3:>9.3g} {board:>10.4f} {ideal:>10.4f} {wall:>7.2f}")
    print("err: ||inv(A)_hat - A^-1||_F / ||A^-1||_F; analog time per call 1.125 t (a t / 8 pilot sets the noise)")
    if args.out:
        plot(args.times, errors, args.out, args.preset)
        print(f"saved {args.out}")
    return 0


def plot(times, errors, path: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, values in errors.items():
        ax.loglog(times, values, "o-", label=f"{name} ({label})")
    times = np.asarray(times, dtype=float)
    reference = errors["ideal parts"][0] * np.sqrt(times[0] / times)
    ax.loglog(times, reference, "k--", label="1 / sqrt(t)")
    ax.set_xlabel("analog run time t (tau)")
    ax.set_ylabel("relative error of A^-1 (Frobenius)")
    ax.set_title("Matrix inversion through the covariance")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
