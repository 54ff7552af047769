"""The TNGD paper's Fig. 3 on the emulated device: a CNN trained with Adam, exact NGD and TNGD, against
iteration and against estimated runtime.

    pip install ".[torch,examples]"
    python examples/paper/fig3_cnn.py [--quick] [--out paper_out] [--seeds 0 1 2] [--iters 200] [--t 1 10]

Model and data: the paper's CNN shape (one convolution, two fully connected layers) at digit size,
Conv(1 -> 4, 3 x 3) + ReLU, FC(144 -> 16) + tanh, FC(16 -> 10), N = 2,530 parameters, on scikit-learn's
8 x 8 digits (1,438 training, 359 held-out images), batches of 64 (m = 640 GGN rows).

Methods, each for every seed on the same initial weights and batches:
    Adam lr=1e-3      torch.optim.Adam, the paper's learning rate
    Adam lr=1e-2      the same, at the learning rate that is best for this small problem (not in the paper)
    NGD               exact damped NGD, (F + lambda I)^-1 g by the m x m Woodbury Cholesky on the host, lr 0.01
    TNGD t=T          driver.optim.TNGD on tngd-sim (SGD base rule, lr 0.01, lambda 0.01), warm-started
                      device, analog time T per step in the units of F, for each --t

Runtime (the x axis of the right-hand panels): measured host time per step for Adam and NGD; for TNGD the
host time of the digital part (forward, Jacobian J by torch.func, H, the update) plus the device's own
hardware-time estimate (StepRecord.hardware_time_s: 16-bit codes over a 50 Gb/s link, row programming,
t x tau of analog time, the read-out) in place of the emulator's time: the paper's "TNGD (estimated)".

Scaled down from the paper (MNIST 28 x 28, a wider CNN, thousands of iterations) so a full run takes about
7 minutes on 2 cores (measured while another run shared them): 8 x 8 digits, N = 2,530, 200 iterations,
3 seeds.  The emulator's cost per TNGD step (~0.12 s, an exact O(N m^2) analysis of the GGN array) is what
limits the size.

Writes OUT/fig3_cnn.csv (columns: see common.COLUMNS) and OUT/fig3_cnn.png (training loss and test accuracy
against iteration and against estimated runtime; mean over seeds, band from the lowest to the highest seed),
and prints markdown tables of the training loss and of the estimated runtime to a training loss of 0.7
(mean ± sd over seeds).  --replot redraws the PNG and tables from OUT's CSV.  Ctrl-C stops and keeps the runs
that finished (exit 130).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy: one BLAS thread, for reproducible timing

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402
import torch  # noqa: E402

NAME = "fig3_cnn"
BATCH = 64
DAMPING = 0.01
LR_NGD = 0.01  # the paper's TNGD learning rate, used for NGD too
COLUMNS = common.COLUMNS
TARGET = 0.7  # the printed runtime-to-loss table: the training loss Adam at the paper's lr reaches in 200 steps


def runs(seeds: list[int], ts: list[float]) -> list[common.Run]:
    ce = torch.nn.functional.cross_entropy

    def adam(lr: float, seed: int):
        model = common.digits_cnn(seed)
        return model, common.adam(model, ce, lr)

    def ngd(seed: int):
        model = common.digits_cnn(seed)
        return model, common.ngd(model, "cross_entropy", LR_NGD, DAMPING)

    def tngd(t: float, seed: int):
        model = common.digits_cnn(seed)
        return model, common.tngd(model, "cross_entropy", LR_NGD, DAMPING, t, seed)

    out = []
    for seed in seeds:
        out.append(common.Run("Adam lr=1e-3", seed, lambda s=seed: adam(1e-3, s)))
        out.append(common.Run("Adam lr=1e-2", seed, lambda s=seed: adam(1e-2, s)))
        out.append(common.Run("NGD", seed, lambda s=seed: ngd(s)))
        for t in ts:
            out.append(common.Run(f"TNGD t={t:g}", seed, lambda s=seed, t=t: tngd(t, s)))
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(7.0, 5.4), sharex="col")
    styles = {"Adam lr=1e-3": "--", "Adam lr=1e-2": ":"}
    for method in common.methods_of(rows):
        style = styles.get(method, "-")
        line = common.plot_band(axes[0, 0], rows, method, "train_loss", linestyle=style)
        color = line.get_color()
        common.plot_band(axes[0, 1], rows, method, "train_loss", x="runtime_s", color=color, linestyle=style)
        common.plot_band(axes[1, 0], rows, method, "test_accuracy", color=color, linestyle=style)
        common.plot_band(axes[1, 1], rows, method, "test_accuracy", x="runtime_s", color=color, linestyle=style)
    for ax in axes[0]:
        common.log_y(ax)
        ax.set_ylabel("training loss (cross-entropy, nats)")
    for ax in axes[1]:
        ax.set_ylabel("test accuracy (fraction)")
    for ax in axes[:, 1]:
        ax.set_xscale("log")
    axes[1, 0].set_xlabel("iteration (batches of 64)")
    axes[1, 1].set_xlabel("estimated runtime (s)")
    axes[0, 0].set_title("against iteration")
    axes[0, 1].set_title("against estimated runtime")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle("CNN (N = 2,530) on 8x8 digits, tngd-sim: mean over seeds, band min to max", fontsize=9)
    common.save(fig, path, common.one_legend(fig, axes[0, 0]))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "paper_out")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default 200; --quick: 12)")
    p.add_argument("--t", type=float, nargs="+", default=[1.0, 10.0], help="TNGD analog times (default 1 10)")
    args = p.parse_args(argv)
    iters = args.iters or (12 if args.quick else 200)
    seeds = args.seeds or [0, 1, 2]
    out = Path(args.out)
    rows, interrupted = common.execute(
        args, NAME, runs(seeds, args.t), common.digits, batch=BATCH, iters=iters, columns=COLUMNS
    )
    if rows:
        at = [i for i in (10, 100) if i < iters]
        print(
            common.summary_table(
                rows,
                "train_loss",
                at,
                extra=[
                    ("test acc @ last", "test_accuracy", "last"),
                    ("runtime / it", "runtime_s", "per_it"),
                    ("device estimate / it", "hardware_time_s", "per_it"),
                    ("host wall / it", "wall_time_s", "per_it"),
                ],
            )
        )
        print(common.time_to(rows, "train_loss", TARGET))
        plot(rows, out / f"{NAME}.png")
    return common.finish(rows, interrupted, out, NAME, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
