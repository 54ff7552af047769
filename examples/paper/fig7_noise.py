"""The TNGD paper's Fig. 7 on the emulated device: how much the injected noise kappa0 hurts TNGD training.

    pip install ".[torch,examples]"
    python examples/paper/fig7_noise.py [--quick] [--out paper_out] [--seeds 0 1 2] [--iters 100]
                                        [--kappa0 1e-1 1e-2 1e-3 1e-4 0] [--t 1]

Model, data and settings as fig3_cnn.py: the CNN (N = 2,530) on 8 x 8 digits, batches of 64, lambda = 0.01,
lr = 0.01 with the SGD base rule, t = 1 in the units of F (the paper's units).  Each noise level is a device
variant, ``driver.open("tngd-sim", seed=seed, overrides={"noise.kappa0": kappa0})`` (kappa0 = 0: noiseless;
tngd-sim's own level is 1e-6), beside exact NGD as the noise-free reference.

Units of the noise.  The device's kappa0 is in V^2 per tau: each cell gets sqrt(2 kappa0) dW.  In the user's
units of the natural gradient the diffusion is kappa = kappa0 r^2 s (driver.tngd's docstring: r the state
scale, s the matrix scale of the load), which is the paper's kappa0 in dx = -(F x - g) dt + N(0, 2 kappa dt).
The client chooses r and s per run; the CSV's "kappa_user" column records kappa for every step, and the
printed table its mean, so the sweep can be read in either unit.

Scaled down from the paper (MNIST, thousands of iterations): the fig3 CNN, 100 iterations, 3 seeds.  A full
run took 20 minutes on 2 cores shared with another run: with injected noise every step samples the noise on
the exact engine, about 5 times the cost of a noiseless step (the runs at kappa0 >= 1e-2 stop early).

Writes OUT/fig7_noise.csv (common.COLUMNS plus "kappa0", the device's level in V^2/tau, and "kappa_user",
kappa in the units of the natural gradient; NGD has 0 for both) and OUT/fig7_noise.png (training loss and
test accuracy against iteration: mean over seeds, band from the lowest to the highest seed), and prints a
markdown table (mean ± sd over seeds).  Ctrl-C stops and keeps the runs that finished (exit 130).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy: one BLAS thread, for reproducible timing

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402

NAME = "fig7_noise"
BATCH = 64
DAMPING = 0.01
LR = 0.01
COLUMNS = common.COLUMNS[:3] + ("kappa0", "kappa_user") + common.COLUMNS[3:]


def label(kappa0: float) -> str:
    return "TNGD noiseless" if kappa0 == 0 else f"TNGD kappa0={kappa0:.0e}"


def runs(seeds: list[int], levels: list[float], t: float) -> list[common.Run]:
    def ngd(seed: int):
        model = common.digits_cnn(seed)
        optimiser = common.ngd(model, "cross_entropy", LR, DAMPING)
        optimiser.columns = lambda: {"kappa_user": 0.0}
        return model, optimiser

    def tngd(kappa0: float, seed: int):
        model = common.digits_cnn(seed)
        optimiser = common.tngd(model, "cross_entropy", LR, DAMPING, t, seed, overrides={"noise.kappa0": kappa0})

        def kappa_user() -> dict[str, float]:
            record = optimiser.records[-1]
            return {"kappa_user": kappa0 * record.state_scale**2 * record.matrix_scale}

        optimiser.columns = kappa_user
        return model, optimiser

    out = []
    for seed in seeds:
        out.append(common.Run("NGD", seed, lambda s=seed: ngd(s), {"kappa0": 0.0}))
        for kappa0 in levels:
            out.append(common.Run(label(kappa0), seed, lambda s=seed, k=kappa0: tngd(k, s), {"kappa0": kappa0}))
    return out


def plot(rows: list[dict], path: Path, levels: list[float], t: float) -> None:
    plt = common.pyplot()
    from matplotlib import colormaps

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.6))
    noisy = sorted((k for k in levels if k > 0), reverse=True)
    for ax, y in zip(axes, ("train_loss", "test_accuracy"), strict=True):
        common.plot_band(ax, rows, "NGD", y, label="NGD (exact, no noise)", color="k", linestyle="--")
        for kappa0 in levels:
            if kappa0 == 0:
                color, style = "tab:blue", "-"
            else:
                color, style = colormaps["plasma"](0.15 + 0.7 * noisy.index(kappa0) / max(1, len(noisy) - 1)), "-"
            common.plot_band(ax, rows, label(kappa0), y, label=_legend(rows, kappa0), color=color, linestyle=style)
        ax.set_xlabel("iteration (batches of 64)")
        ax.grid(alpha=0.3)
    common.log_y(axes[0])
    axes[0].set_ylabel("training loss (cross-entropy, nats)")
    axes[1].set_ylabel("test accuracy (fraction)")
    fig.suptitle(
        rf"TNGD on tngd-sim with injected noise $\kappa_0$ (t = {t:g}, lr 0.01, $\lambda$ = 0.01): CNN on 8x8 digits",
        fontsize=9,
    )
    common.save(fig, path, common.one_legend(fig, axes[0], ncol=2))


def _legend(rows: list[dict], kappa0: float) -> str:
    if kappa0 == 0:
        return r"TNGD noiseless ($\kappa_0$ = 0)"
    user = [float(r["kappa_user"]) for r in rows if r["method"] == label(kappa0)]
    return rf"TNGD $\kappa_0$ = {kappa0:g} V$^2$/$\tau$ (user $\kappa$ ~ {np.mean(user):.1g})"


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "paper_out")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default 100; --quick: 8)")
    p.add_argument(
        "--kappa0", type=float, nargs="+", default=None, help="device noise levels, V^2/tau (default 1e-1 ... 1e-4 0)"
    )
    p.add_argument("--t", type=float, default=1.0, help="analog time per step, units of F (default 1)")
    args = p.parse_args(argv)
    iters = args.iters or (8 if args.quick else 100)
    seeds = args.seeds or [0, 1, 2]
    levels = args.kappa0 or ([1e-1, 1e-3, 0.0] if args.quick else [1e-1, 1e-2, 1e-3, 1e-4, 0.0])
    out = Path(args.out)
    rows, interrupted = common.execute(
        args, NAME, runs(seeds, levels, args.t), common.digits, batch=BATCH, iters=iters, columns=COLUMNS
    )
    if rows:
        at = [i for i in (10, 50) if i < iters]
        extra = [("test acc @ last", "test_accuracy", "last"), ("kappa (user units) @ last", "kappa_user", "last")]
        print(common.summary_table(rows, "train_loss", at, extra=extra))
        plot(rows, out / f"{NAME}.png", levels, args.t)
    return common.finish(rows, interrupted, out, NAME, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
