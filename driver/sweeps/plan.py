"""A sweep file read and checked: the device, its grid of variants, the seeds and the workload.

    device: spu-8            # preset, path, or an inline spec mapping
    seed: 0                  # the sweep's seed (default 0)
    seeds: [0, 1, 2]         # or a count: 3 means [0, 1, 2]
    grid:                    # dotted schema paths -> values; the cartesian product
      adc.bits: [6, 8, 10, 12]
      noise.kappa0: [1.0e-6, 1.0e-4]
    # points: [{adc.bits: 6}, {adc.bits: 12, noise.kappa0: 0.0}]   # or an explicit list, instead of grid
    overrides: {}            # fixed overrides applied to every point (optional)
    paired: true             # every point at seed s sees the same problems and device draw (default)
    workload: solve          # solve, inv, sample, tngd, or module:function
    workload_args: {n: 8, cond: 10, t: 200, problems: 4}

A cell is one (point, seed).  Its randomness derives from (sweep seed, seed) and, with ``paired: false``,
the point too, through numpy's SeedSequence over a SHA-256 digest of the point (never Python's hash(),
which changes between processes): so a cell gives the same bits whichever worker runs it, and in any
order.  ``paired: true`` (the default) leaves the point out: every point at seed s gets the same problems
and the same device seed, hence the same mismatch and noise draws scaled by its own spec (common random
numbers), so the differences between points are the swept parameters' and not fresh draws'.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import InvalidInputError, SpecError
from ..transport import effective_spec
from .workloads import resolve_workload, workload_args

__all__ = ["Sweep", "Cell", "load_sweep"]

_KEYS = ("device", "seed", "seeds", "grid", "points", "overrides", "paired", "workload", "workload_args")


@dataclass(frozen=True)
class Cell:
    """One (point, seed) of a sweep: ``index`` in the sweep's order (points outer, seeds inner)."""

    index: int
    point: int
    seed: int


@dataclass(frozen=True)
class Sweep:
    """A checked sweep: ``points`` is the list of override dicts (the grid expanded), ``device_spec`` the
    base spec as plain data (``overrides`` applied), ``args`` the workload's arguments with its defaults."""

    device: Any
    device_spec: dict[str, Any]
    points: list[dict[str, Any]]
    keys: list[str]
    seeds: list[int]
    seed: int
    workload: str
    args: dict[str, Any]
    paired: bool = True
    grid: dict[str, list[Any]] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def cells(self) -> list[Cell]:
        order = itertools.product(range(len(self.points)), self.seeds)
        return [Cell(index, point, seed) for index, (point, seed) in enumerate(order)]

    def cell_seeds(self, cell: Cell) -> tuple[int, np.random.SeedSequence]:
        """(device seed, problem SeedSequence) of a cell, from (sweep seed, seed[, point]) only."""
        words = [self.seed, cell.seed]
        if not self.paired:
            words += point_words(self.points[cell.point])
        root = np.random.SeedSequence(words)
        device_seed = int(
            np.random.SeedSequence(root.entropy, spawn_key=(0,)).generate_state(2, np.uint32) @ [1, 2**32]
        )
        return device_seed & (2**63 - 1), np.random.SeedSequence(root.entropy, spawn_key=(1,))

    def definition(self) -> dict[str, Any]:
        """What makes the results: the resolved sweep, as plain data (sweep.yaml; compared on resume)."""
        out: dict[str, Any] = {"device": self.device if not isinstance(self.device, Path) else str(self.device)}
        out["seed"] = self.seed
        out["seeds"] = list(self.seeds)
        if self.grid is not None:
            out["grid"] = {key: list(values) for key, values in self.grid.items()}
        else:
            out["points"] = [dict(point) for point in self.points]
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        out["paired"] = self.paired
        out["workload"] = self.workload
        out["workload_args"] = dict(self.args)
        out["resolved"] = {
            "cells": len(self.points) * len(self.seeds),
            "points": [dict(point) for point in self.points],
            "device_spec": self.device_spec,
        }
        return out


def point_words(point: dict[str, Any]) -> list[int]:
    """Four 32-bit words of the SHA-256 of the point's canonical JSON (keys sorted, floats by repr)."""
    text = json.dumps(point, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def load_sweep(source: str | Path | dict[str, Any]) -> Sweep:
    """Read and check a sweep (a YAML path or a mapping of the same structure); nothing runs.

    Refuses, naming the key and what is allowed: unknown keys; a device that does not load; an unknown
    spec path or a value the schema refuses at any point; an empty grid or point list; seeds that are not
    distinct non-negative integers; an unknown workload or workload argument.
    """
    if isinstance(source, (str, Path)) and not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"no sweep file {str(source)!r}")
        try:
            data = read_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise InvalidInputError(f"{path}: not valid YAML: {exc}") from None
        where = str(path)
    else:
        data, where = source, "sweep"
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}: a sweep must be a mapping with keys {', '.join(_KEYS)}")
    unknown = [key for key in data if key not in _KEYS]
    if unknown:
        raise InvalidInputError(f"{where}: unknown key {unknown[0]!r}; a sweep has {', '.join(_KEYS)}")
    for key in ("device", "workload"):
        if key not in data:
            raise InvalidInputError(f"{where}: missing {key!r}")

    device = data["device"]
    if not isinstance(device, (str, dict)):
        raise InvalidInputError(f"{where}: device must be a preset name, a spec path or a spec mapping, got {device!r}")
    if isinstance(device, str) and not device.startswith("tcp://") and where != "sweep":
        relative = Path(where).parent / device
        if relative.is_file() and not Path(device).is_file():
            device = str(relative)  # a spec path relative to the sweep file
    if isinstance(device, str) and device.startswith("tcp://"):
        raise InvalidInputError(f"{where}: device: a sweep opens its own variants; give a preset, path or mapping")
    overrides = _mapping(data.get("overrides", {}), where, "overrides")
    try:
        device_spec = effective_spec(device, overrides or None)
    except SpecError as exc:
        raise SpecError(f"{where}: device: {exc}") from None

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidInputError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise InvalidInputError(f"{where}: seeds: a count must be at least 1, got {seeds!r}")
        seeds = list(range(seeds))
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise InvalidInputError(
            f"{where}: seeds must be a count or a list of distinct non-negative integers, got {seeds!r}"
        )
    paired = data.get("paired", True)
    if not isinstance(paired, bool):
        raise InvalidInputError(f"{where}: paired must be true or false, got {paired!r}")

    grid = None
    if "grid" in data and "points" in data:
        raise InvalidInputError(f"{where}: give either grid (a cartesian product) or points (a list), not both")
    if "grid" in data:
        grid = _mapping(data["grid"], where, "grid")
        if not grid:
            raise InvalidInputError(
                f"{where}: grid is empty; map dotted spec paths to lists of values, e.g. adc.bits: [6, 8]"
            )
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise InvalidInputError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
            grid[key] = [_normal(device_spec, key, value) for value in values]
        keys = list(grid)
        points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
    elif "points" in data:
        raw = data["points"]
        if not isinstance(raw, list) or not raw or not all(isinstance(p, dict) and p for p in raw):
            raise InvalidInputError(f"{where}: points must be a non-empty list of non-empty mappings path -> value")
        points = [{key: _normal(device_spec, key, value) for key, value in point.items()} for point in raw]
        keys = list(dict.fromkeys(key for point in points for key in point))
    else:
        raise InvalidInputError(f"{where}: missing grid (dotted spec paths -> lists of values) or points")

    for point in points:  # every variant goes through the loader now, before anything runs
        try:
            effective_spec(device_spec, point)
        except SpecError as exc:
            raise SpecError(f"{where}: point {_show(point)}: {exc}") from None

    name = data["workload"]
    try:
        function = resolve_workload(name)
        args = workload_args(name, function, _mapping(data.get("workload_args", {}), where, "workload_args"))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: workload_args must be plain data (numbers, text, lists, mappings)") from None
    return Sweep(
        device=device,
        device_spec=device_spec,
        points=points,
        keys=keys,
        seeds=list(seeds),
        seed=seed,
        workload=name,
        args=args,
        paired=paired,
        grid=grid,
        overrides=overrides,
    )


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where}: {key} must be a mapping, got {value!r}")
    return dict(value)


def _normal(spec: dict[str, Any], key: str, value: Any) -> Any:
    """An integer given for a number field becomes a float (0 -> 0.0), as the loader would make it."""
    node: Any = spec
    for part in str(key).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-6`` as a float (YAML 1.2 style), like the spec loader."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"""
        r"""|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"""
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text, with exponent floats such as ``1e-6`` read as numbers."""
    return yaml.load(text, Loader=_Loader)


def _show(point: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in point.items())
