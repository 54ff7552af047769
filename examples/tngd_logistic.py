"""TNGD on an emulated SPU against SGD, Adam and exact NGD: multinomial logistic regression on digits.

    pip install ".[examples]"
    python examples/tngd_logistic.py [--iters 100] [--t 1 10 100] [--preset tngd-sim] [--out tngd_logistic.png]

The model is softmax regression on scikit-learn's 8 x 8 digits (1797 images, 64 pixels scaled to [0, 1],
10 classes): logits z = W x + b, N = 10 * 64 + 10 = 650 parameters.  Everything is analytic, no autodiff:
per sample, the Jacobian of the logits is J_i = [I_10 (x) x_i^T, I_10] (10 x 650) and the Hessian of the
cross-entropy in the logits is H_i = diag(p_i) - p_i p_i^T, so for a batch of B = 64

    g = (1 / B) sum_i J_i^T (p_i - y_i),     F = J^T H J,   J = [J_1; ...; J_B] (640 x 650),  H = blockdiag(H_i) / B,

the generalised Gauss-Newton (here equal to the Fisher) of the batch's mean loss; m = B * d_z = 640.

Optimisers, all on the same batches: SGD, Adam (betas 0.9, 0.999), exact NGD (Cholesky of F + lambda I on the
host), and TNGD on the SPU (warm-started device state, read once per step) at several analog times t (in the
units of F, see driver.tngd), each with the SGD update on g~.

Two clocks.  "iteration" is the step count.  "time" is what one iteration would take: for the digital
methods the measured wall time of the whole step on this host (batch gradient and curvature, solve,
update); for TNGD the host part measured the same way (gradient, J and H, the driver's checks and
conversion to codes, update) plus the device's own estimate of its loads, run and read on the hardware
its spec describes (StepRecord.hardware_time_s) in place of the emulator's wall time (Device.timeline).
The emulator runs the device's physics on a CPU and is much slower than the chip it stands for.

Prints the training loss (full training set) against iteration and against time, the final test
accuracy, and saves a PNG with both curves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import driver
from driver.tngd import TNGD

BATCH = 64
CLASSES = 10


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = digits.data / 16.0
    return train_test_split(X, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)


def probabilities(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    d = X.shape[1]
    W, b = theta[: CLASSES * d].reshape(CLASSES, d), theta[CLASSES * d :]
    z = X @ W.T + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def loss(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    p = probabilities(theta, X)
    return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-300)))


def gradient(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient (N,) of the batch's mean cross-entropy: (1 / B) sum_i J_i^T (p_i - y_i)."""
    B = X.shape[0]
    residual = probabilities(theta, X)
    residual[np.arange(B), y] -= 1.0
    return np.concatenate([(residual.T @ X).ravel(), residual.sum(axis=0)]) / B


def curvature(theta: np.ndarray, X: np.ndarray):
    """J (B * 10, N) and H (B * 10, B * 10) with F = J^T H J the GGN (= Fisher) of the batch's mean cross-entropy."""
    B, d = X.shape
    p = probabilities(theta, X)
    # J_i = [I_10 (x) x_i^T, I_10]: row (i, c) holds x_i in the block of class c and a 1 at bias c
    J = np.zeros((B, CLASSES, CLASSES * d + CLASSES))
    for c in range(CLASSES):
        J[:, c, c * d : (c + 1) * d] = X
        J[:, c, CLASSES * d + c] = 1.0
    J = J.reshape(B * CLASSES, -1)
    H = np.zeros((B * CLASSES, B * CLASSES))
    for i in range(B):
        block = (np.diag(p[i]) - np.outer(p[i], p[i])) / B
        H[i * CLASSES : (i + 1) * CLASSES, i * CLASSES : (i + 1) * CLASSES] = block
    return J, H


def train(make_optimiser, X, y, batches, uses_curvature):
    """Run one optimiser over the given batches.

    Returns (losses per iteration, cumulative time in s, theta, device seconds per iteration); the time is
    host wall time, with the device's timing-model estimate in place of the emulator's wall time for TNGD.
    """
    opt = make_optimiser()
    theta = np.zeros(X.shape[1] * CLASSES + CLASSES)
    losses, clock, elapsed, device = [loss(theta, X, y)], [0.0], 0.0, []
    for index in batches:
        wall_before = opt.device.timeline.wall_time_s if opt.device is not None else 0.0
        started = time.perf_counter()
        grad = gradient(theta, X[index], y[index])
        if uses_curvature:
            J, H = curvature(theta, X[index])
            theta = opt.step(theta, grad, J=J, H=H)
        else:
            theta = opt.step(theta, grad)
        spent = time.perf_counter() - started
        record = opt.last_record
        if record.solver == "device":
            # the host's part measured (the driver's validation and conversion to codes included); the
            # device's part (loads, run, read) from its timing model instead of the emulator's wall time
            emulated = opt.device.timeline.wall_time_s - wall_before
            spent += record.hardware_time_s - emulated
            device.append(record.hardware_time_s)
        elapsed += spent
        losses.append(loss(theta, X, y))
        clock.append(elapsed)
    return np.array(losses), np.array(clock), theta, np.array(device)


def warm_up(preset: str, X, y, lam: float) -> None:
    """One TNGD step on a throwaway device, so numba compiles the emulator's and the driver's kernels
    before anything is timed (a first call compiles them; numba caches them on disk where it can)."""
    J, H = curvature(np.zeros(X.shape[1] * CLASSES + CLASSES), X[:BATCH])
    with driver.open(preset, seed=0) as dev:
        TNGD(dev, lr=1.0, damping=lam, t=1.0).natural_gradient(np.ones(J.shape[1]), J=J, H=H)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=100, help="training iterations (default 100)")
    parser.add_argument("--t", type=float, nargs="+", default=[1.0, 3.0, 100.0], help="TNGD analog times t")
    parser.add_argument("--preset", default="tngd-sim", help="device spec for TNGD (default tngd-sim)")
    parser.add_argument("--damping", type=float, default=0.05, help="lambda for NGD and TNGD (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="tngd_logistic.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)

    X_train, X_test, y_train, y_test = load_data(args.seed)
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(len(y_train), BATCH, replace=False) for _ in range(args.iters)]
    lam = args.damping

    # learning rates: the best of a factor-2 grid over 100 iterations for each baseline (SGD 0.5 ... 8,
    # Adam 0.005 ... 0.4, NGD 0.25 ... 2); TNGD takes NGD's
    runs = {
        "SGD": (lambda: TNGD(None, lr=4.0, damping=lam, solver="none"), False),
        "Adam": (lambda: TNGD(None, lr=0.2, damping=lam, solver="none", base="adam", betas=(0.9, 0.999)), False),
        "NGD (exact)": (lambda: TNGD(None, lr=1.0, damping=lam, solver="exact"), True),
    }
    devices = []
    for t in args.t:

        def make(t=t):
            dev = driver.open(args.preset, seed=args.seed)
            devices.append(dev)
            return TNGD(dev, lr=1.0, damping=lam, t=t)

        runs[f"TNGD t={t:g}"] = (make, True)

    results, device_time = {}, {}
    wall = time.perf_counter()
    warm_up(args.preset, X_train, y_train, lam)
    for name, (make, uses_curvature) in runs.items():
        started = time.perf_counter()
        losses, clock, theta, device = train(make, X_train, y_train, batches, uses_curvature)
        accuracy = float(np.mean(probabilities(theta, X_test).argmax(axis=1) == y_test))
        results[name] = (losses, clock, accuracy)
        device_time[name] = device
        print(f"  ran {name:<14} in {time.perf_counter() - started:6.1f} s of wall time", flush=True)
    for dev in devices:
        dev.close()
    print(f"(all runs: {time.perf_counter() - wall:.1f} s; device {args.preset!r}, lambda = {lam:g}, batch {BATCH})")

    marks = [i for i in (0, 5, 10, 25, 50, 100, 200, 500) if i <= args.iters]
    print("\ntraining loss against iteration")
    print(f"{'method':<14}" + "".join(f"{'it ' + str(i):>10}" for i in marks) + f"{'test acc':>10}")
    for name, (losses, _, accuracy) in results.items():
        print(f"{name:<14}" + "".join(f"{losses[i]:>10.4f}" for i in marks) + f"{accuracy:>10.3f}")

    budgets = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    print("\ntraining loss against time (host wall time; TNGD: host part + the device's estimated time)")
    print(f"{'method':<14}" + "".join(f"{_seconds(b):>10}" for b in budgets) + f"{'per it':>10}")
    for name, (losses, clock, _) in results.items():
        cells = [losses[np.searchsorted(clock, b, side="right") - 1] for b in budgets]
        per_iteration = clock[-1] / max(1, len(clock) - 1)
        print(f"{name:<14}" + "".join(f"{c:>10.4f}" for c in cells) + f"{_seconds(per_iteration):>10}")
    for name, device in device_time.items():
        if device.size:
            per_iteration = results[name][1][-1] / device.size
            print(
                f"  {name}: per iteration {_seconds(per_iteration)} = host {_seconds(per_iteration - device.mean())}"
                f" (gradient, J and H, the driver's checks and codes, update) + device {_seconds(device.mean())}"
                f" (estimated: loads, run, read; the first step {_seconds(device[0])} with the state's initialisation)"
            )

    if args.out:
        plot(results, args.out)
        print(f"\nsaved {args.out}")


def _seconds(value: float) -> str:
    if value >= 1.0:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} us"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_iteration, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (losses, clock, _) in results.items():
        style = "-" if name.startswith("TNGD") else "--"
        by_iteration.plot(np.arange(len(losses)), losses, style, label=name)
        by_time.plot(clock[1:], losses[1:], style, label=name)
    by_iteration.set(xlabel="iteration", ylabel="training loss", yscale="log", title="loss against iteration")
    by_time.set(
        xlabel="time (s): host wall time; TNGD host + estimated device time",
        ylabel="training loss",
        xscale="log",
        yscale="log",
        title="loss against time",
    )
    by_iteration.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
