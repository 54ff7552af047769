"""The TNGD paper's Fig. 4 on the emulated device: (a) TNGD approaches exact NGD as the analog time t grows;
(b) at a small t, a delay t_d (the device keeps evolving under the previous curvature while the host computes
the next) acts like momentum.

    pip install ".[torch,examples]"
    python examples/paper/fig4_t_delay.py [--quick] [--out paper_out] [--seeds 0 1 2] [--iters 100]
                                          [--t 0.1 1 10 100] [--delay-t 1] [--delay 0 1 5 20]

Model, data and settings as fig3_cnn.py: the CNN (N = 2,530) on 8 x 8 digits, batches of 64, lambda = 0.01,
lr = 0.01 with the SGD base rule, a fresh warm-started tngd-sim device per run.  t and t_d are in the units
of F (driver.tngd's docstring: a mode of F + lambda I with eigenvalue l relaxes as e^{-l t}).

    (a) TNGD at each --t, beside NGD (the exact damped natural gradient, the limit t -> infinity)
    (b) TNGD at t = --delay-t with each --delay t_d (t_d = 0 is the run of panel (a) when --delay-t is in --t)

Scaled down from the paper (MNIST, thousands of iterations) for a full run of about 6 minutes on 2 cores
(14 measured while two other runs shared them): the fig3 CNN, 100 iterations, 3 seeds, 4 values of t and 4 of t_d.

Writes OUT/fig4_t_delay.csv (common.COLUMNS plus the swept values "t" and "t_d"; NGD has t = inf, t_d = 0)
and OUT/fig4_t_delay.png (training loss against iteration: mean over seeds, band from the lowest to the
highest seed), and prints a markdown table of the training loss (mean ± sd over seeds).  Ctrl-C stops and
keeps the runs that finished (exit 130).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy: one BLAS thread, for reproducible timing

import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402

NAME = "fig4_t_delay"
BATCH = 64
DAMPING = 0.01
LR = 0.01
COLUMNS = common.COLUMNS[:3] + ("t", "t_d") + common.COLUMNS[3:]


def label(t: float, delay: float) -> str:
    return f"TNGD t={t:g}" + (f" t_d={delay:g}" if delay > 0 else "")


def runs(seeds: list[int], ts: list[float], delay_t: float, delays: list[float]) -> list[common.Run]:
    def ngd(seed: int):
        model = common.digits_cnn(seed)
        return model, common.ngd(model, "cross_entropy", LR, DAMPING)

    def tngd(t: float, delay: float, seed: int):
        model = common.digits_cnn(seed)
        return model, common.tngd(model, "cross_entropy", LR, DAMPING, t, seed, delay=delay)

    points = [(t, 0.0) for t in ts] + [(delay_t, d) for d in delays if (delay_t, d) not in [(t, 0.0) for t in ts]]
    out = []
    for seed in seeds:
        out.append(common.Run("NGD", seed, lambda s=seed: ngd(s), {"t": math.inf, "t_d": 0.0}))
        for t, d in points:
            out.append(common.Run(label(t, d), seed, lambda s=seed, t=t, d=d: tngd(t, d, s), {"t": t, "t_d": d}))
    return out


def plot(rows: list[dict], path: Path, ts: list[float], delay_t: float, delays: list[float]) -> None:
    plt = common.pyplot()
    from matplotlib import colormaps

    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.6), sharey=True)
    blues, reds = colormaps["viridis"], colormaps["plasma"]
    common.plot_band(axes[0], rows, "NGD", "train_loss", label="NGD (exact, t = inf)", color="k", linestyle="--")
    common.plot_band(axes[1], rows, "NGD", "train_loss", label="NGD (exact, t = inf)", color="k", linestyle="--")
    colors = {}
    for i, t in enumerate(ts):
        colors[t] = blues(0.1 + 0.75 * i / max(1, len(ts) - 1))
        common.plot_band(axes[0], rows, label(t, 0.0), "train_loss", label=f"TNGD t={t:g}", color=colors[t])
    delayed = [d for d in delays if d > 0]
    for d in delays:
        if d == 0:  # the run of panel (a), in its colour and under its name
            color, text = colors.get(delay_t, "0.5"), f"TNGD t={delay_t:g}"
        else:
            color = reds(0.35 + 0.5 * delayed.index(d) / max(1, len(delayed) - 1))
            text = f"TNGD t={delay_t:g}, t_d={d:g}"
        common.plot_band(axes[1], rows, label(delay_t, d), "train_loss", label=text, color=color)
    axes[0].set_title("(a) analog time t per step (t_d = 0)")
    axes[1].set_title(f"(b) delay t_d at t = {delay_t:g}")
    common.log_y(axes[0])
    axes[0].set_ylabel("training loss (cross-entropy, nats)")
    for ax in axes:
        ax.set_xlabel("iteration (batches of 64)")
        ax.grid(alpha=0.3)
    # one legend for both panels: NGD once, then the t sweep, then the delay sweep
    handles, labels = {}, []
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            if text not in handles:
                handles[text] = handle
                labels.append(text)
    ncol = 4
    fig.legend([handles[t] for t in labels], labels, loc="lower center", ncol=ncol, frameon=False)
    fig.suptitle("CNN (N = 2,530) on 8x8 digits, tngd-sim, lr 0.01, lambda 0.01 (t, t_d in units of F)", fontsize=9)
    common.save(fig, path, -(-len(labels) // ncol))


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, "paper_out")
    p.add_argument("--iters", type=int, default=None, help="iterations per run (default 100; --quick: 8)")
    p.add_argument("--t", type=float, nargs="+", default=None, help="(a) analog times (default 0.1 1 10 100)")
    p.add_argument("--delay-t", type=float, default=1.0, help="(b) the analog time t of the delay sweep (default 1)")
    p.add_argument("--delay", type=float, nargs="+", default=None, help="(b) delays t_d (default 0 1 5 20)")
    args = p.parse_args(argv)
    iters = args.iters or (8 if args.quick else 100)
    seeds = args.seeds or [0, 1, 2]
    ts = args.t or ([1.0, 100.0] if args.quick else [0.1, 1.0, 10.0, 100.0])
    delays = args.delay or ([0.0, 5.0] if args.quick else [0.0, 1.0, 5.0, 20.0])
    out = Path(args.out)
    rows, interrupted = common.execute(
        args, NAME, runs(seeds, ts, args.delay_t, delays), common.digits, batch=BATCH, iters=iters, columns=COLUMNS
    )
    if rows:
        at = [i for i in (10, 50) if i < iters]
        print(common.summary_table(rows, "train_loss", at, extra=[("test acc @ last", "test_accuracy", "last")]))
        plot(rows, out / f"{NAME}.png", ts, args.delay_t, delays)
    return common.finish(rows, interrupted, out, NAME, COLUMNS)


if __name__ == "__main__":
    sys.exit(main())
