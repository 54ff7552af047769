"""A CNN on 8 x 8 digits trained with Adam, TNGD on an emulated SPU and TNGD-Adam, through driver.optim.

    pip install ".[torch,examples]"
    python examples/tngd_torch.py [--iters 60] [--t 1 10] [--seeds 0 1] [--preset tngd-sim] [--out tngd_torch]

The model is the TNGD paper's MNIST CNN shape (arXiv 2405.13817, Sec. 5) at digit size: one 3 x 3 convolution
with 4 channels, ReLU, a fully connected layer of 16 tanh units and a 10-way output; N = 2,530 parameters.
Data: scikit-learn's digits (1,797 images of 8 x 8 pixels, shipped with the package, scaled to [0, 1]),
batches of 64, so the GGN has m = 64 x 10 = 640 rows.

Optimisers, on the same batches for each seed:
    Adam            torch.optim.Adam(lr=0.01), the digital baseline
    TNGD t=T        driver.optim.TNGD on the device, SGD base rule, one warm-started device run of analog time T
                    (in the units of F) per step, for each --t
    TNGD-Adam       driver.optim.TNGDPreconditioner on the device (t = the last --t) writing the natural
                    gradient into .grad, then torch.optim.Adam(betas=(0, 0)): the paper's TNGD-Adam

Writes OUT.csv (method, seed, iteration, training loss of the batch before the step, full training-set loss
after the step, device time in tau) and OUT.png (full training loss against iteration: mean over seeds and a
band from the lowest to the highest seed).  Progress shows on stderr; Ctrl-C stops and keeps what finished.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
import torch

import driver
from driver.optim import TNGD, TNGDPreconditioner

BATCH = 64
DAMPING = 0.01


class DigitsCNN(torch.nn.Module):
    """Conv(1 -> 4, 3 x 3) + ReLU, FC(144 -> 16) + tanh, FC(16 -> 10): N = 40 + 2,320 + 170 = 2,530."""

    def __init__(self, channels: int = 4, hidden: int = 16, classes: int = 10):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, channels, 3)
        self.fc1 = torch.nn.Linear(channels * 6 * 6, hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (n, 1, 8, 8) float32 in [0, 1] and (n,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def batches(n: int, iters: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen)[:BATCH] for _ in range(iters)]


def make_model(seed: int) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN()


def train(method: str, t: float, seed: int, args, X, y, progress) -> list[dict]:
    """One run; returns a row per iteration.  The device is opened here and closed at the end."""
    model = make_model(seed)
    rows = []
    dev = driver.open(args.preset, seed=seed) if method != "Adam" else None
    try:
        if method == "Adam":
            adam = torch.optim.Adam(model.parameters(), lr=0.01)

            def step(inputs, targets):
                adam.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(inputs), targets)
                loss.backward()
                adam.step()
                return loss.detach(), 0.0

        elif method.startswith("TNGD t="):
            opt = TNGD(model, "cross_entropy", dev, lr=args.lr, damping=DAMPING, t=t)

            def step(inputs, targets):
                return opt.step(inputs, targets), opt.records[-1].device_time

        else:
            precond = TNGDPreconditioner(model, "cross_entropy", dev, damping=DAMPING, t=t)
            adam = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.0))

            def step(inputs, targets):
                loss = precond.step(inputs, targets)
                adam.step()
                return loss, precond.records[-1].device_time

        for iteration, index in enumerate(batches(len(y), args.iters, seed), start=1):
            batch_loss, device_time = step(X[index], y[index])
            with torch.no_grad():
                full = float(torch.nn.functional.cross_entropy(model(X), y))
            rows.append(
                dict(
                    method=method,
                    seed=seed,
                    iteration=iteration,
                    batch_loss=float(batch_loss),
                    train_loss=full,
                    device_time_tau=device_time,
                )
            )
            progress.update(1)
    finally:
        if dev is not None:
            dev.close()
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(row["method"] for row in rows):
        runs = {}
        for row in rows:
            if row["method"] == method:
                runs.setdefault(row["seed"], []).append(row["train_loss"])
        length = min(len(r) for r in runs.values())
        losses = np.array([r[:length] for r in runs.values()])
        iterations = np.arange(1, length + 1)
        (line,) = ax.plot(iterations, losses.mean(axis=0), label=f"{method} ({len(runs)} seeds)")
        ax.fill_between(iterations, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration (batches of 64)")
    ax.set_ylabel("training loss (cross-entropy, nats)")
    ax.set_yscale("log")
    ax.set_title("CNN on 8x8 digits: mean over seeds, band min to max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=60, help="training iterations per run (default 60)")
    parser.add_argument("--t", type=float, nargs="+", default=[1.0, 10.0], help="TNGD analog times t (default 1 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="model, batch and device seeds")
    parser.add_argument("--lr", type=float, default=0.5, help="TNGD learning rate (default 0.5)")
    parser.add_argument("--preset", default="tngd-sim", help="device spec (default tngd-sim)")
    parser.add_argument("--out", default="tngd_torch", help="writes OUT.csv and OUT.png ('' for neither)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    X, y = load_digits_tensors()
    methods = [("Adam", 0.0)] + [(f"TNGD t={t:g}", t) for t in args.t] + [("TNGD-Adam", args.t[-1])]
    rows: list[dict] = []
    total = len(methods) * len(args.seeds) * args.iters
    with tqdm(total=total, unit="step", file=sys.stderr, disable=None) as progress:
        try:
            for seed in args.seeds:
                for method, t in methods:
                    progress.set_description(f"{method} seed {seed}")
                    rows.extend(train(method, t, seed, args, X, y, progress))
        except KeyboardInterrupt:
            print("\ninterrupted: keeping the runs that finished", file=sys.stderr)
    if not rows:
        return 1
    print(f"{'method':<12}{'seeds':>6}{'loss it 1':>11}{'loss end':>11}{'device tau/it':>15}")
    for method, _ in methods:
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue
        last = max(row["iteration"] for row in mine)
        first_loss = np.mean([row["train_loss"] for row in mine if row["iteration"] == 1])
        end_loss = np.mean([row["train_loss"] for row in mine if row["iteration"] == last])
        device = np.mean([row["device_time_tau"] for row in mine])
        seeds = len({row["seed"] for row in mine})
        print(f"{method:<12}{seeds:>6}{first_loss:>11.4f}{end_loss:>11.4f}{device:>15.1f}")
    if args.out:
        with open(f"{args.out}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, f"{args.out}.png")
        print(f"wrote {args.out}.csv and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
