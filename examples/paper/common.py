"""What the paper scripts share: data, models, the optimisers' steps, the training loop, CSV, tables and plots.

The scripts in this folder (``fig3_cnn.py``, ``fig4_t_delay.py``, ``fig7_noise.py``, ``fig5_finetune.py``)
reproduce the experiments of the TNGD paper (Donatella et al., arXiv 2405.13817) on the emulated ``tngd-sim``
device.  Import this module before numpy (it sets one BLAS thread, as the scripts themselves do first).

Every run is one (method, seed): the model's initial weights, the batches and the device are all seeded
from ``seed``, so each method of one seed sees the same initial model and the same batches.  A run
yields one row per iteration with the columns of :data:`COLUMNS` (cumulative times), plus the swept
value where a script sweeps one.
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy: one thread, so the measured times are reproducible

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import driver  # noqa: E402
from driver.optim import TNGD, TNGDPreconditioner  # noqa: E402

torch.set_num_threads(1)

# tidy CSV: one row per (method, seed, iteration); a script adds its swept value's column after "iteration"
COLUMNS = (
    "method",  # the optimiser, as in the plot's legend
    "seed",  # model initialisation, batch order and device seed
    "iteration",  # 1-based; the row is measured after this many updates
    "batch_loss",  # loss of the batch the step was computed on, before the update
    "train_loss",  # mean loss over the whole training set after the update
    "test_loss",  # mean loss over the held-out set after the update
    "test_accuracy",  # fraction of the held-out set classified correctly (NaN for tasks without classes)
    "wall_time_s",  # host time of the steps so far (s), evaluation excluded: what this machine took
    "hardware_time_s",  # the device's estimate of its own time for the steps so far (s); 0 for digital methods
    "runtime_s",  # estimated runtime so far (s): digital methods measured; TNGD = host time without the
    # emulator's share + the device's hardware-time estimate (the paper's "TNGD (estimated)")
)


# -- data -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A classification set split once into training and held-out parts (tensors on the CPU)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Data:
    """scikit-learn's 1,797 8 x 8 digits as (n, 1, 8, 8) float32 in [0, 1] and int64 labels; a fixed split
    (the same for every seed and method): 1,438 training and 359 held-out images."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    return Data(images[train], labels[train], images[test], labels[test])


def batches(n: int, batch: int, iters: int, seed: int) -> list[torch.Tensor]:
    """``iters`` index batches of ``batch`` samples, each drawn without replacement, from a seeded generator."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randperm(n, generator=gen)[:batch] for _ in range(iters)]


# -- models ---------------------------------------------------------------------------------------------


# the CNN of examples/tngd_torch.py (the paper's shape at digit size), one definition for both
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tngd_torch import DigitsCNN  # noqa: E402


def digits_cnn(seed: int) -> DigitsCNN:
    """A :class:`DigitsCNN` with its initial weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return DigitsCNN()


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- optimisers -----------------------------------------------------------------------------------------


@dataclass
class StepTimes:
    """What one optimiser step took: host wall time, the device's hardware-time estimate, and the
    estimated runtime (host time minus the emulator's share, plus the device estimate)."""

    wall_s: float
    hardware_s: float = 0.0
    runtime_s: float = 0.0


@dataclass
class Optimiser:
    """One method's step: ``step(inputs, targets) -> (batch loss, StepTimes)``, and the device to close."""

    step: Callable[[torch.Tensor, torch.Tensor], tuple[float, StepTimes]]
    device: Any = None
    records: list = field(default_factory=list)  # the driver's StepRecords, for device and NGD methods
    columns: Callable[[], dict[str, Any]] | None = None  # extra columns for the row of the step just taken

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None


def adam(model: torch.nn.Module, loss: Callable, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> Optimiser:
    """torch.optim.Adam on the model's trainable parameters (the digital first-order baseline)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepTimes]:
        started = time.perf_counter()
        opt.zero_grad()
        value = loss(model(inputs), targets)
        value.backward()
        opt.step()
        wall = time.perf_counter() - started
        return float(value.detach()), StepTimes(wall, 0.0, wall)

    return Optimiser(step)


def ngd(model: torch.nn.Module, loss: str, lr: float, damping: float, solver: str = "woodbury") -> Optimiser:
    """Exact damped NGD on the host: (F + lambda I)^-1 g solved directly (``solver="woodbury"``: the m x m
    Cholesky form, exact to rounding and the fastest digital solve at m < N; ``"exact"``: the N x N one)."""
    opt = TNGD(model, loss, None, lr=lr, damping=damping, solver=solver)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepTimes]:
        started = time.perf_counter()
        value = opt.step(inputs, targets)
        wall = time.perf_counter() - started
        return float(value), StepTimes(wall, 0.0, wall)

    return Optimiser(step, records=opt.records)


def open_device(seed: int, overrides: dict[str, Any] | None = None, preset: str = "tngd-sim") -> driver.Device:
    """A fresh emulated device per run, seeded like the run (its mismatch and noise draws)."""
    return driver.open(preset, seed=seed, overrides=overrides or None)


def _device_times(wall: float, record: Any) -> StepTimes:
    # the step's host time less the natural-gradient call (the emulator's work) is the digital part:
    # forward, Jacobian, H and the update; the device's own estimate replaces the emulator's time
    digital = wall - record.wall_time_s
    return StepTimes(wall, record.hardware_time_s, digital + record.hardware_time_s)


def tngd(
    model: torch.nn.Module,
    loss: str,
    lr: float,
    damping: float,
    t: float,
    seed: int,
    *,
    delay: float = 0.0,
    overrides: dict[str, Any] | None = None,
) -> Optimiser:
    """TNGD (SGD base rule) on a fresh ``tngd-sim`` device: ``driver.optim.TNGD(model, loss, dev, ...)``."""
    device = open_device(seed, overrides)
    opt = TNGD(model, loss, device, lr=lr, damping=damping, t=t, delay=delay)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepTimes]:
        started = time.perf_counter()
        value = opt.step(inputs, targets)
        return float(value), _device_times(time.perf_counter() - started, opt.records[-1])

    return Optimiser(step, device, opt.records)


def tngd_adam(
    model: torch.nn.Module, loss: str, lr: float, damping: float, t: float, seed: int, *, delay: float = 0.0
) -> Optimiser:
    """The paper's TNGD-Adam: the device's natural gradient written into ``.grad`` by
    ``TNGDPreconditioner``, then ``torch.optim.Adam(betas=(0, 0))``."""
    device = open_device(seed)
    precond = TNGDPreconditioner(model, loss, device, damping=damping, t=t, delay=delay)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.0, 0.0))

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, StepTimes]:
        started = time.perf_counter()
        value = precond.step(inputs, targets)
        opt.step()
        return float(value), _device_times(time.perf_counter() - started, precond.records[-1])

    return Optimiser(step, device, precond.records)


# -- the training loop ----------------------------------------------------------------------------------


def cross_entropy_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy of the model on (x, y)."""
    with torch.no_grad():
        logits = model(x)
        return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(
    method: str,
    seed: int,
    model: torch.nn.Module,
    optimiser: Optimiser,
    data: Data,
    *,
    batch: int,
    iters: int,
    progress: Any,
    metrics: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[float, float]] = cross_entropy_metrics,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One run of ``iters`` steps on seeded batches; returns its rows (:data:`COLUMNS` + ``extra``).

    A step that fails (the model diverged: a non-finite loss) ends the run early; its rows so far are kept
    and the failure is reported on stderr.  The optimiser's device is closed at the end."""
    rows: list[dict[str, Any]] = []
    wall = hardware = runtime = 0.0
    try:
        for iteration, index in enumerate(batches(len(data.y_train), batch, iters, seed), start=1):
            try:
                batch_loss, times = optimiser.step(data.x_train[index], data.y_train[index])
            except (driver.SpuError, ValueError) as error:
                progress.write(f"{method} seed {seed}: stopped at iteration {iteration}: {error}", file=sys.stderr)
                progress.update(iters - iteration + 1)
                break
            wall += times.wall_s
            hardware += times.hardware_s
            runtime += times.runtime_s
            train_loss, _ = metrics(model, data.x_train, data.y_train)
            test_loss, accuracy = metrics(model, data.x_test, data.y_test)
            row = dict(method=method, seed=seed, iteration=iteration)
            row.update(extra or {})
            if optimiser.columns is not None:
                row.update(optimiser.columns())
            row.update(
                batch_loss=batch_loss,
                train_loss=train_loss,
                test_loss=test_loss,
                test_accuracy=accuracy,
                wall_time_s=wall,
                hardware_time_s=hardware,
                runtime_s=runtime,
            )
            rows.append(row)
            progress.update(1)
            if not math.isfinite(train_loss):
                message = f"{method} seed {seed}: the training loss is not finite at iteration {iteration}"
                progress.write(message, file=sys.stderr)
                progress.update(iters - iteration)
                break
    finally:
        optimiser.close()
    return rows


@dataclass
class Run:
    """One (method, seed) to run: ``build()`` returns (model, optimiser); ``extra`` are swept values."""

    method: str
    seed: int
    build: Callable[[], tuple[torch.nn.Module, Optimiser]]
    extra: dict[str, Any] = field(default_factory=dict)


def run_all(
    runs: Sequence[Run],
    data: Data,
    *,
    batch: int,
    iters: int,
    csv_path: Path | None,
    columns: Sequence[str],
    metrics: Callable = cross_entropy_metrics,
) -> tuple[list[dict[str, Any]], bool]:
    """Run every (method, seed) in order with a tqdm bar on stderr; the CSV is rewritten after each run.

    Returns (rows, interrupted): Ctrl-C stops the run in progress and keeps the runs that finished."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    interrupted = False
    with tqdm(total=len(runs) * iters, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True) as progress:
        for run in runs:
            progress.set_description(f"{run.method} seed {run.seed}")
            try:
                model, optimiser = run.build()
                rows.extend(
                    train(
                        run.method,
                        run.seed,
                        model,
                        optimiser,
                        data,
                        batch=batch,
                        iters=iters,
                        progress=progress,
                        metrics=metrics,
                        extra=run.extra,
                    )
                )
            except KeyboardInterrupt:
                interrupted = True
                progress.write("interrupted: keeping the runs that finished", file=sys.stderr)
                break
            if csv_path is not None:
                write_csv(rows, csv_path, columns)
    return rows, interrupted


# -- output ---------------------------------------------------------------------------------------------


def write_csv(rows: Iterable[dict[str, Any]], path: Path, columns: Sequence[str]) -> None:
    """The rows as a tidy CSV, written to a temporary file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    partial.replace(path)


def curves(rows: Sequence[dict[str, Any]], method: str, y: str) -> np.ndarray:
    """(seeds, iterations) array of column ``y`` for one method, cut to the shortest seed's run."""
    runs: dict[int, list[float]] = {}
    for row in rows:
        if row["method"] == method:
            runs.setdefault(row["seed"], []).append(float(row[y]))
    if not runs:
        return np.zeros((0, 0))
    length = min(len(r) for r in runs.values())
    return np.array([r[:length] for r in runs.values()])


def methods_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in rows))


def mean_sd(values: np.ndarray) -> str:
    """'mean ± sd' over seeds (sample sd, ddof = 1; '' for one seed)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return "-"
    spec = ".3f" if values.mean() == 0 or abs(values.mean()) >= 0.01 else ".2e"
    if values.size == 1:
        return f"{values[0]:{spec}}"
    return f"{values.mean():{spec}} ± {values.std(ddof=1):{spec}}"


def summary_table(
    rows: Sequence[dict[str, Any]], y: str, at: Sequence[int], *, extra: Sequence[tuple[str, str, str]] = ()
) -> str:
    """A markdown table: per method, column ``y`` at the given iterations and at the last, mean ± sd over
    seeds; ``extra`` adds (header, column, how) with how "last" (value at the last iteration) or "per_it"
    (the last cumulative value / iterations, e.g. time per iteration)."""
    header = ["method", "seeds"] + [f"{y} @ {i}" for i in at] + [f"{y} @ last"] + [h for h, _, _ in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods_of(rows):
        values = curves(rows, method, y)
        if values.size == 0:
            continue
        cells = [method, str(values.shape[0])]
        for i in at:
            cells.append(mean_sd(values[:, i - 1]) if i <= values.shape[1] else "-")
        cells.append(f"{mean_sd(values[:, -1])} (it {values.shape[1]})")
        for _, column, how in extra:
            other = curves(rows, method, column)
            if how == "per_it":
                cells.append(_seconds(other[:, -1] / other.shape[1]))
            else:
                cells.append(mean_sd(other[:, -1]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_to(rows: Sequence[dict[str, Any]], y: str, target: float, x: str = "runtime_s") -> str:
    """A markdown table: per method, the first ``x`` (a time) at which ``y`` falls to ``target`` or below,
    mean ± sd over the seeds that reach it ("n of m seeds" when not all do)."""
    lines = [f"| method | {x} to {y} <= {target:g} |", "|---|---|"]
    for method in methods_of(rows):
        values, xs = curves(rows, method, y), curves(rows, method, x)
        hits = [float(xs[i, np.argmax(values[i] <= target)]) for i in range(len(values)) if (values[i] <= target).any()]
        cell = _seconds(np.array(hits)) if hits else "not reached"
        if hits and len(hits) < len(values):
            cell += f" ({len(hits)} of {len(values)} seeds)"
        lines.append(f"| {method} | {cell} |")
    return "\n".join(lines)


def _seconds(values: np.ndarray) -> str:
    """mean ± sd of times, in ms or us as fits."""
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    scale, unit = (1, "s") if mean >= 1 else (1e3, "ms") if mean >= 1e-3 else (1e6, "us")
    return f"{mean * scale:.3g} ± {sd * scale:.2g} {unit}".replace("e+0", "e")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8})
    return plt


def plot_band(
    ax: Any,
    rows: Sequence[dict[str, Any]],
    method: str,
    y: str,
    *,
    x: str = "iteration",
    label: str | None = None,
    color: Any = None,
    linestyle: str = "-",
) -> Any:
    """Mean over seeds of ``y`` against ``x`` (x averaged over seeds where it is a time), and a band from the
    lowest to the highest seed.  Returns the line."""
    values = curves(rows, method, y)
    if values.size == 0:
        return None
    xs = curves(rows, method, x).mean(axis=0)[: values.shape[1]]
    (line,) = ax.plot(xs, values.mean(axis=0), label=label or method, color=color, linestyle=linestyle, lw=1.4)
    ax.fill_between(xs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.18, lw=0)
    return line


def log_y(ax: Any) -> None:
    """A log y axis with plain tick labels (0.1, 0.5, 2) rather than powers of ten."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    low, high = ax.get_ylim()
    if high < 10 * low:  # within a decade: label the minor ticks too, or there may be none
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def one_legend(fig: Any, ax: Any, ncol: int = 5, title: str | None = None) -> int:
    """One legend for the whole figure, below the axes, from one axes' lines; returns its rows."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = min(len(labels), ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, title=title)
    return -(-len(labels) // ncol) + (1 if title else 0)


def save(fig: Any, path: Path, legend_rows: int = 1) -> None:
    """tight_layout above the legend's rows (inches of the figure), then a 150 dpi PNG."""
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, min(0.4, (0.12 + 0.2 * legend_rows) / height), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


# -- command line ---------------------------------------------------------------------------------------


def parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    """The options every script takes: --quick, --out, --seeds."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run (< 60 s on 2 cores): few iterations")
    p.add_argument("--out", default=default_out, help=f"output folder for the CSV and PNG (default {default_out})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0 1 2)")
    p.add_argument("--replot", action="store_true", help="run nothing: redraw the PNG and table from OUT's CSV")
    return p


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A CSV written by :func:`write_csv`, numbers as floats (seed and iteration as ints)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in ("seed", "iteration"):
                    row[key] = int(value)
                elif key != "method":
                    row[key] = float(value)
            rows.append(row)
    return rows


def execute(args: argparse.Namespace, name: str, runs: Sequence[Run], data: Callable[[], Data], **kwargs: Any):
    """run_all into OUT/NAME.csv, or with --replot read that CSV back; returns (rows, interrupted)."""
    path = Path(args.out) / f"{name}.csv"
    if args.replot:
        return read_csv(path), False
    return run_all(runs, data(), csv_path=path, **kwargs)


def finish(rows: list[dict[str, Any]], interrupted: bool, out: Path, name: str, columns: Sequence[str]) -> int:
    """Write the CSV (again) and say where; the exit code: 0, 1 when nothing ran, 130 when interrupted."""
    if not rows:
        print("no run finished", file=sys.stderr)
        return 130 if interrupted else 1
    write_csv(rows, out / f"{name}.csv", columns)
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.png')}")
    return 130 if interrupted else 0
