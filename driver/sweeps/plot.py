"""PNG plots of a sweep's results.csv: each metric against each swept key.

For each x value the line is the mean over seeds of each seed's mean over problems, and the band spans
those per-seed means (minimum to maximum).  One line per combination of the other swept keys, one legend.
A log axis where the positive values span two decades or more.  Axis labels carry units: the schema's
``x-unit`` for spec fields, the workload's ``UNITS`` (or a user function's ``units`` attribute) for metrics.
Needs matplotlib (``pip install "spu-emulator[plot]"``); without it no plots are made.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..protocol import SPEC_DIR
from .plan import Sweep
from .workloads import UNITS, resolve_workload

__all__ = ["plot_results"]

_FIXED = ("seed", "problem", "error")


@cache
def _schema_units() -> dict[str, str]:
    out: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if sub.get("type") == "object":
                walk(sub, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = str(sub.get("x-unit", "-"))

    walk(yaml.safe_load((SPEC_DIR / "schema.yaml").read_text()), "")
    return out


def _number(text: str) -> float:
    if text in ("True", "False"):
        return 1.0 if text == "True" else 0.0
    try:
        return float(text)
    except ValueError:
        return math.nan


def _label(name: str, unit: str | None) -> str:
    return f"{name} ({unit})" if unit and unit != "-" else name


def _log_scale(values: np.ndarray) -> bool:
    positive = values[np.isfinite(values) & (values > 0)]
    return positive.size > 1 and positive.size == np.isfinite(values).sum() and positive.max() >= 100 * positive.min()


def plot_results(plan: Sweep, out: str | Path) -> list[Path]:
    """Write ``out/plots/METRIC_vs_KEY.png`` for every numeric metric and swept key; returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print('spu sweep: no plots: matplotlib is not installed (pip install "spu-emulator[plot]")', file=sys.stderr)
        return []
    from .run import read_results

    rows = read_results(out)
    if not rows:
        return []
    metric_units = dict(UNITS)
    if plan.workload not in ("solve", "inv", "sample", "tngd"):
        metric_units.update(getattr(resolve_workload(plan.workload), "units", {}) or {})
    key_units = _schema_units()
    keys = list(plan.keys)
    metrics = [c for c in rows[0] if c not in keys and c not in _FIXED]
    metrics = [m for m in metrics if any(math.isfinite(_number(row[m])) for row in rows)]
    folder = Path(out) / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    device = plan.device_spec.get("name", "device")
    for metric, key in itertools.product(metrics, keys):
        xs_text = list(dict.fromkeys(row[key] for row in rows))
        if len(xs_text) < 2:
            continue
        numeric = all(math.isfinite(_number(x)) for x in xs_text)
        others = [k for k in keys if k != key]
        # (group, x) -> seed -> values over problems
        table: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for row in rows:
            group = tuple(row[k] for k in others)
            table[group][row[key]][row["seed"]].append(_number(row[metric]))
        many = len(table) > 4  # the legend goes beside the axes
        figure, axes = plt.subplots(figsize=(9.6 if many else 6.4, 4.8))
        colours = plt.get_cmap("tab20" if len(table) > 10 else "tab10")
        all_values = []
        for number, (group, by_x) in enumerate(table.items()):
            xs = sorted(by_x, key=_number) if numeric else [x for x in xs_text if x in by_x]
            position = [_number(x) if numeric else xs_text.index(x) for x in xs]
            means, lows, highs = [], [], []
            for x in xs:
                per_seed = [np.nanmean(v) if np.isfinite(v).any() else np.nan for v in map(np.array, by_x[x].values())]
                per_seed = np.array([v for v in per_seed if np.isfinite(v)])
                means.append(per_seed.mean() if per_seed.size else np.nan)
                lows.append(per_seed.min() if per_seed.size else np.nan)
                highs.append(per_seed.max() if per_seed.size else np.nan)
            all_values += lows + highs
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group, strict=True)) or "mean over seeds"
            (line,) = axes.plot(position, means, marker="o", label=label, color=colours(number % colours.N))
            axes.fill_between(position, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        if numeric and _log_scale(np.array([_number(x) for x in xs_text])):
            axes.set_xscale("log")
        if not numeric:
            axes.set_xticks(range(len(xs_text)), xs_text)
        if _log_scale(np.array(all_values, dtype=float)):
            axes.set_yscale("log")
        axes.set_xlabel(_label(key, key_units.get(key)))
        axes.set_ylabel(_label(metric, metric_units.get(metric)))
        seeds = len(plan.seeds)
        axes.set_title(f"{plan.workload} on {device}: mean, band = min..max over {seeds} seed{'s' * (seeds > 1)}")
        axes.grid(True, which="both", alpha=0.3)
        if many:
            axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            axes.legend(fontsize="small")
        figure.tight_layout()
        path = folder / f"{metric}_vs_{key}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
