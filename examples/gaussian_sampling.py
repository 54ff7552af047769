"""Gaussian sampling on the 8-cell oscillator SPU: the first demonstration of Melanson et al. (arXiv 2312.04836).

    pip install ".[plot]"
    python examples/gaussian_sampling.py [--samples 4000] [--preset spu-8-lc] [--out gaussian_sampling.png]

A random 8-dimensional Gaussian N(mean, cov) (cov with condition number 10) is programmed into the device as
its precision matrix cov^-1 and drive b = cov^-1 mean, with the injected noise turned up to suit the
converters (driver.linalg.sample_gaussian).  The device's snapshots, spaced so that consecutive ones are
nearly independent, are its samples.  The script prints how the error of the sample mean and sample
covariance falls with the number of samples, i.e. with the analog time spent (in tau and in seconds of the
board's clock), beside the error that exact independent samples would have, and saves a PNG: the error
against analog time, and a scatter of two coordinates with the target's 1- and 2-sigma ellipses.

The error falls as 1 / sqrt(time) until it meets the floor of the board's non-idealities (2 % element
mismatch, 8-bit coupling codes, offsets, converter errors; see firmware_spec/spu-8-lc.yaml).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import driver


def random_gaussian(d: int, condition: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    cov = (q * np.geomspace(1.0, 1.0 / condition, d)) @ q.T
    return rng.uniform(-1.0, 1.0, d), 0.5 * (cov + cov.T)


def independent_error(cov: np.ndarray, k: int) -> float:
    """Expected relative Frobenius error of the sample covariance of k independent samples:
    E ||S - cov||_F^2 = (||cov||_F^2 + tr(cov)^2) / (k - 1) for a Gaussian."""
    return float(np.sqrt((np.sum(cov**2) + np.trace(cov) ** 2) / (k - 1)) / np.linalg.norm(cov))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="samples to draw (default 4000)")
    parser.add_argument("--preset", default="spu-8-lc", help="device preset or YAML path (default spu-8-lc)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="gaussian_sampling.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)

    with driver.open(args.preset, seed=args.seed) as dev:
        mean, cov = random_gaussian(dev.info.cells, 10.0, args.seed)
        started = time.perf_counter()
        samples, report = driver.linalg.sample_gaussian(dev, mean, cov, args.samples, return_report=True)
        wall = time.perf_counter() - started
        tau_s = dev.info.tau_s
        print(f"{dev.info.name}: {dev.info.cells} {dev.info.cell_kind} cells, tau = {tau_s * 1e6:.3g} us")
    print(
        f"{args.samples} samples {report.spacing:g} tau apart after a burn-in of {report.burn_in:g} tau;"
        f" lag correlation <= {report.lag_correlation:.3f}, effective sample size {report.effective_samples:.0f};"
        f" noise kappa0 = {report.kappa0:.3g} V^2; analog time {report.analog_time:.4g} tau"
        f" ({report.analog_time * tau_s * 1e3:.3g} ms on the board), wall time {wall:.2f} s"
    )
    counts = np.unique(np.geomspace(10, args.samples, 12).astype(int))
    rows = []
    print(f"{'samples':>8} {'analog tau':>11} {'board ms':>9} {'mean err':>9} {'cov err':>9} {'iid cov err':>12}")
    for k in counts:
        part = samples[:k]
        analog = report.burn_in + k * report.spacing
        mean_error = float(np.linalg.norm(part.mean(axis=0) - mean) / np.sqrt(np.trace(cov)))
        cov_error = float(np.linalg.norm(np.cov(part.T) - cov) / np.linalg.norm(cov))
        rows.append((k, analog, mean_error, cov_error, independent_error(cov, k)))
        board_ms = analog * tau_s * 1e3
        print(f"{k:>8} {analog:>11.4g} {board_ms:>9.3g} {mean_error:>9.4f} {cov_error:>9.4f} {rows[-1][4]:>12.4f}")
    print("mean err: |mean_hat - mean| / sqrt(tr cov); cov err: ||cov_hat - cov||_F / ||cov||_F")
    if args.out:
        plot(rows, samples, mean, cov, args.out, dev.info.name)
        print(f"saved {args.out}")
    return 0


def plot(rows, samples, mean, cov, path: str, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.array(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.loglog(rows[:, 1], rows[:, 3], "o-", label="covariance (device)")
    left.loglog(rows[:, 1], rows[:, 4], "k--", label="covariance (independent samples)")
    left.loglog(rows[:, 1], rows[:, 2], "s-", label="mean (device)")
    left.set_xlabel("analog time (tau)")
    left.set_ylabel("relative error")
    left.set_title(f"Gaussian sampling on {name}")
    left.legend()
    i, j = 0, 1
    right.plot(samples[:, i], samples[:, j], ".", ms=2, alpha=0.4, label="device samples")
    values, vectors = np.linalg.eigh(cov[np.ix_([i, j], [i, j])])
    angle = np.linspace(0.0, 2.0 * np.pi, 200)
    circle = np.stack([np.cos(angle), np.sin(angle)])
    for radius in (1.0, 2.0):
        ellipse = vectors @ (radius * np.sqrt(values)[:, None] * circle) + mean[[i, j]][:, None]
        right.plot(ellipse[0], ellipse[1], "k-", lw=1)
    right.set_xlabel(f"x{i}")
    right.set_ylabel(f"x{j}")
    right.set_title("two coordinates, target 1 and 2 sigma")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
