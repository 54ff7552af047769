"""Hypothesis strategies for device variants: let hypothesis search for the device that breaks your code.

    from hypothesis import given, settings
    import driver
    from driver.testing import device_specs, devices, spd_matrices

    @settings(max_examples=25, deadline=None)     # the device is the slow part: keep the count small
    @given(spec=device_specs("spu-8", vary={"adc.bits": (6, 16), "noise.kappa0": (1e-8, 1e-3)}),
           A=spd_matrices(8, cond=(1.0, 100.0)))
    def test_my_solver(spec, A):
        with driver.open(spec, seed=0) as dev:
            ...

A failing example prints as the line that rebuilds it: ``SpecVariant('spu-8', overrides={'adc.bits': 7})``
for a spec, ``driver.open('spu-8', seed=0, overrides={'adc.bits': 7})`` for a device.

Shrinking: every varied field shrinks toward the base spec's value (a field whose value does not
matter to the failure goes back to it and leaves ``overrides``); a field that matters shrinks to the
failing value nearest the base, i.e. to the edge of the region where the code fails (ADC bits from
12 down to the widest width that still fails).  Seeds shrink toward 0, matrices toward the lowest
condition number and the smallest size that still fail.

Cost: each example opens a device (about a millisecond for spu-8) and runs what the test runs, so
the test's device time times ``max_examples`` (default 100) is the bill.  Use
``@settings(max_examples=10..30, deadline=None)`` (a device run's wall time varies, so a deadline
flakes), a short analog time ``t``, small matrices, the exact engine (the default while no
nonlinear effect is on), and mark longer searches ``@pytest.mark.slow``.  Fix the device seed
(``seeds=0``) when a search is about the spec, so the property is deterministic for hypothesis.

For tests that run on fixed presets and seeds, the pytest plugin (:mod:`driver.pytest_plugin`:
``@pytest.mark.spu`` and the ``spu_device`` fixture) is the simpler tool; function-scoped fixtures
do not mix with ``@given``, so use :func:`devices` there.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.control import cleanup

from .device import Device
from .errors import InvalidInputError, SpecError
from .protocol import SPEC_DIR
from .transport import InProcessTransport, effective_spec

__all__ = ["SpecVariant", "device_specs", "devices", "spd_matrices"]

# a range spanning this ratio or more (lower end > 0) is drawn evenly in log space
_LOG_RATIO = 100.0
# a float field moves from its base toward an end of its range in steps of 1 / _STEPS of the way: an
# integer count shrinks by bisection to the smallest step that still fails (a float fraction would
# shrink to 1.0, the far end, which hypothesis counts as simpler)
_STEPS = 2**20
_MAX_SEED = 2**32 - 1


class SpecVariant(dict):
    """A device spec drawn by :func:`device_specs`: the effective spec as a mapping (``driver.open``
    takes it as it is), with ``base`` and the ``overrides`` (the fields that differ from it) it came from.

    Its repr is the short form, ``SpecVariant('spu-8', overrides={'adc.bits': 7})``;
    ``variant.open(seed)`` is ``driver.open(base, seed=seed, overrides=overrides)``.
    """

    def __init__(self, base: Any, overrides: dict[str, Any], spec: dict[str, Any]):
        super().__init__(spec)
        self.base = base
        self.overrides = dict(overrides)

    def open(self, seed: int | None = 0) -> Device:
        import driver

        return driver.open(self.base, seed=seed, overrides=self.overrides or None)

    def __repr__(self) -> str:
        return f"SpecVariant({self.base!r}, overrides={self.overrides!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints examples with this
        printer.text(repr(self))

    def __reduce__(self):
        return (SpecVariant, (self.base, self.overrides, dict(self)))


class _DrawnDevice(Device):
    """A device opened by :func:`devices`; its repr is the line that opens it again."""

    def __init__(self, base: Any, seed: int, overrides: dict[str, Any]):
        label = "a spec mapping" if isinstance(base, dict) else str(base)
        super().__init__(InProcessTransport(base, seed=seed, overrides=overrides or None), label=f"device {label!r}")
        self.reproduce = f"driver.open({base!r}, seed={seed}" + (f", overrides={overrides!r})" if overrides else ")")

    def __repr__(self) -> str:
        return self.reproduce

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def device_specs(base: str | Path | dict[str, Any] = "spu-8", vary: dict[str, Any] | None = None) -> st.SearchStrategy:
    """Device specs that differ from ``base`` in the fields of ``vary``, each drawn inside its range.

    ``base``: a preset name, YAML path or spec mapping.  ``vary``: dotted paths of
    ``firmware_spec/schema.yaml`` to how they vary:

    - ``(low, high)``: a range, integers for an integer field (``"adc.bits": (8, 16)``), floats for a
      number (``"coupling.mismatch": (0.0, 0.05)``); evenly in log space when low > 0 and high / low
      >= 100 (``"noise.kappa0": (1e-8, 1e-3)``); a value the schema forbids inside it (a 1-bit
      converter) is never drawn;
    - a list: these values (booleans, ``cells.kind``, a few widths);
    - a hypothesis strategy: its values, as they come.

    Draws :class:`SpecVariant`: every draw has passed the spec loader.  Shrinks toward ``base``: each
    field toward its base value (clamped into its range), then out of ``overrides``.
    Raises SpecError for an unknown path, or a range or value the schema refuses (names the field).
    """
    base_spec = effective_spec(base)
    parts: dict[str, st.SearchStrategy] = {}
    base_values: dict[str, Any] = {}
    for path, how in (vary or {}).items():
        if path not in _fields():
            effective_spec(base_spec, {path: None})  # the loader's message: no such field, or the fields near it
        entry = _fields()[path]
        base_values[path] = _get(base_spec, path)
        parts[path] = _field_strategy(base_spec, path, entry, base_values[path], how)

    def build(values: dict[str, Any]) -> SpecVariant:
        overrides = {path: values[path] for path in base_values if values[path] != base_values[path]}
        return SpecVariant(base, overrides, effective_spec(base_spec, overrides))

    return st.fixed_dictionaries(parts).map(build)


def devices(
    base: str | Path | dict[str, Any] = "spu-8",
    vary: dict[str, Any] | None = None,
    seeds: int | list[int] | st.SearchStrategy | None = None,
) -> st.SearchStrategy:
    """Open devices: a spec from ``device_specs(base, vary)`` and a seed, each closed when its example ends.

    ``seeds``: None for any seed (shrinking toward 0), an int for that one seed, a list to pick from,
    or a strategy.  A device's repr is the line that opens it again, so a failing example prints
    ``driver.open('spu-8', seed=3, overrides={'adc.bits': 7})``.
    """
    specs = device_specs(base, vary)
    if seeds is None:
        seed_strategy = st.integers(0, _MAX_SEED)
    elif isinstance(seeds, st.SearchStrategy):
        seed_strategy = seeds
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        seed_strategy = st.just(_seed(seeds))
    else:
        seed_strategy = st.sampled_from([_seed(seed) for seed in seeds])

    @st.composite
    def opened(draw: Any) -> Device:
        spec = draw(specs)
        seed = _seed(draw(seed_strategy))
        device = _DrawnDevice(spec.base, seed, spec.overrides)
        cleanup(device.close)
        return device

    return opened()


def spd_matrices(
    n: int | tuple[int, int] | st.SearchStrategy = 8,
    cond: float | tuple[float, float] | st.SearchStrategy = 10.0,
) -> st.SearchStrategy:
    """Random symmetric positive definite (n, n) float64 matrices of condition number ``cond``.

    A = Q diag(geomspace(1, cond, n)) Q^T, Q a random orthogonal matrix (the convention of the
    ``solve`` sweep workload): eigenvalues from 1 to cond, exactly symmetric.  ``n`` and ``cond``: a
    value, a ``(low, high)`` range (cond drawn in log space) or a strategy.  Q comes from a drawn seed,
    so an example shrinks as a whole: toward the smallest n, the lowest condition number and seed 0.
    Cost O(n^3) per draw.
    """
    if isinstance(n, st.SearchStrategy):
        sizes = n
    elif isinstance(n, tuple):
        sizes = st.integers(*_int_range(n, n))
    else:
        sizes = st.just(_int_range((n, n), n)[0])
    if isinstance(cond, st.SearchStrategy):
        conds = cond
    else:
        low, high = (cond, cond) if not isinstance(cond, tuple) else cond
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 1.0 <= low <= high < math.inf):
            raise InvalidInputError(f"spd_matrices cond={cond!r}: give a number >= 1 or a range (low, high), 1 <= low")
        conds = st.just(float(low)) if low == high else _float_toward(float(low), float(high), float(low))

    def build(args: tuple[int, float, int]) -> np.ndarray:
        size, kappa, seed = args
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((size, size)))
        q = q * np.sign(np.diag(r))  # the Haar measure's sign convention
        A = (q * np.geomspace(1.0, kappa, size)) @ q.T
        return 0.5 * (A + A.T)

    return st.tuples(sizes, conds, st.integers(0, _MAX_SEED)).map(build)


# -- fields ----------------------------------------------------------------------------------------
def _field_strategy(base_spec: dict[str, Any], path: str, entry: dict[str, Any], base: Any, how: Any):
    if isinstance(how, st.SearchStrategy):
        return how
    if isinstance(how, list):
        if not how:
            raise SpecError(f"vary {path!r}: an empty list of values")
        for value in how:
            effective_spec(base_spec, {path: value})  # each value through the loader: its message names the field
        # nearest the base first: sampled_from shrinks toward the first element
        ordered = sorted(how, key=lambda value: (value != base, _distance(value, base)))
        return st.sampled_from(ordered)
    kind = entry.get("type")
    if not (isinstance(how, tuple) and len(how) == 2) or kind not in ("integer", "number"):
        what = "a (low, high) range, a list of values or a strategy" if kind in ("integer", "number") else "a list"
        raise SpecError(f"vary {path!r}: {how!r}; a {kind} field varies by {what}")
    low, high = how
    for end in (low, high):
        effective_spec(base_spec, {path: end})  # both ends inside the schema's range (the loader's message)
    if not low <= high:
        raise SpecError(f"vary {path!r}: range {how!r} has low > high")
    forbidden = entry.get("not", {}).get("const")
    if kind == "integer":
        if not all(isinstance(end, int) and not isinstance(end, bool) for end in how):
            raise SpecError(f"vary {path!r}: {path} is an integer field; give integer ends, got {how!r}")
        center = min(max(base, low), high)
        if center == forbidden:
            center = center + 1 if center + 1 <= high else center - 1
        values = st.integers(low - center, high - center).map(lambda step: center + step)
        return values.filter(lambda value: value != forbidden) if forbidden is not None else values
    low, high = float(low), float(high)
    return _float_toward(low, high, min(max(float(base), low), high))


def _float_toward(low: float, high: float, center: float) -> st.SearchStrategy:
    """Floats in [low, high] that shrink toward ``center``: a side, then a fraction of the way to its end
    (in log space when the range spans two decades or more above 0)."""
    log = low > 0.0 and high / low >= _LOG_RATIO

    def place(args: tuple[bool, int]) -> float:
        downward, step = args
        end = low if downward else high
        fraction = step / _STEPS
        if step == 0 or end == center:
            return center
        if log:
            value = math.exp(math.log(center) + fraction * (math.log(end) - math.log(center)))
        else:
            value = center + fraction * (end - center)
        return min(max(value, low), high)

    sides = st.booleans() if low < center < high else st.just(center == high)
    return st.tuples(sides, st.integers(0, _STEPS)).map(place)


def _distance(value: Any, base: Any) -> float:
    try:
        return abs(float(value) - float(base))
    except (TypeError, ValueError):
        return 0.0


def _get(spec: dict[str, Any], path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        node = node[part]
    return node


@cache
def _fields() -> dict[str, dict[str, Any]]:
    """Every settable field of ``firmware_spec/schema.yaml`` by dotted path -> its schema entry."""
    import yaml

    out: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in node["properties"].items():
            if sub.get("type") == "object":
                walk(sub, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = sub

    walk(yaml.safe_load((SPEC_DIR / "schema.yaml").read_text()), "")
    return out


def _int_range(bounds: tuple[Any, ...], given: Any) -> tuple[int, int]:
    if len(bounds) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in bounds):
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise InvalidInputError(f"spd_matrices n={given!r}: give a size >= 1 or a range (low, high) of sizes")
    return bounds[0], bounds[1]


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise InvalidInputError(f"devices: a seed is an integer in [0, 2^32 - 1], got {seed!r}")
    return seed
