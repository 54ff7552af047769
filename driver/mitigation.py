"""Error mitigation by randomised rounding of the element codes (after Aifer et al., arXiv 2401.16231).

An element code is the rounding of a real target x_ij = a_ij / w (w = g_max / code_max).  Rounding to
the nearest code leaves a fixed error Delta (|Delta_ij| <= 1/2 code), and the device solves
(a + w Delta) x = u, wrong to first order in Delta: x - a^-1 u = -a^-1 w Delta a^-1 u + O(Delta^2).

``linalg.solve(..., mitigate=k)`` instead loads k randomised roundings Delta^(r), r = 1..k, of the same
targets, each unbiased (E Delta^(r) = 0: x rounds up with probability frac(x)), runs each, and averages
the k answers.  The first-order error becomes that of the mean rounding, (1/k) sum_r Delta^(r), and only
the O(Delta^2) term remains biased: epsilon -> about epsilon^2 as k grows.

Two schemes (``rounding``):
* "independent": every draw rounds every element up with probability frac(x) on its own.  The mean
  rounding then has sd sqrt(frac (1 - frac) / k) codes; averaged over frac that is 1 / sqrt(6 k) against
  nearest rounding's 1 / sqrt(12): sqrt(k / 2) better at most (k = 8: 2x).
* "stratified" (default): the k draws of one element round up floor(k frac) + Bernoulli(frac(k frac))
  times, on a random subset of the draws (systematic sampling).  Each draw is still an unbiased
  stochastic rounding, but the mean rounding is within 1 / k code of x (sd about 1 / (k sqrt(12))): k
  times better than nearest rounding to first order.

The draws come from a generator seeded by the device's seed entropy and the number of calls the device
has made (``dev.timeline.calls``), so the same spec, seed and calls give the same bits.  Cost: k loads
and k solves on the device; O(k n^2 log k) on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import calibration
from .codes import code_max
from .errors import InvalidInputError

if TYPE_CHECKING:
    from .device import Device, DeviceTime, RunReport

__all__ = ["MitigationReport", "check_mitigation", "randomised_codes", "mitigated_solve", "ROUNDINGS"]

ROUNDINGS = ("stratified", "independent")
_STREAM = 0x2401_16231  # spawn key of the rounding draws (arXiv 2401.16231)
_MAX_DRAWS = 4096


@dataclass(frozen=True)
class MitigationReport:
    """What a mitigated solve did.

    draws: k roundings; rounding: the scheme; spread: (n,) the sd of the k answers per entry over
    sqrt(k), an error bar of the mean's random part (rounding and noise; not the O(Delta^2) bias);
    runs: device runs (the auto-ranging's retries included); analog_time: tau of the runs whose means
    were averaged; device_time: what the whole call's loads, runs and reads took on the hardware (the
    same for every column of a B: the k loads are shared).
    """

    draws: int
    rounding: str
    spread: np.ndarray
    runs: int
    analog_time: float
    device_time: DeviceTime


def check_mitigation(mitigate: Any, rounding: Any, dev: Device | None = None) -> int | None:
    """Validate ``mitigate`` (None, or an integer k >= 1 of randomised roundings) and ``rounding``;
    returns k or None.  Before any device call."""
    if rounding not in ROUNDINGS:
        raise InvalidInputError(f"rounding = {rounding!r} is not one of {', '.join(map(repr, ROUNDINGS))}")
    if mitigate is None:
        return None
    if isinstance(mitigate, (bool, np.bool_)) or not isinstance(mitigate, (int, np.integer)):
        raise InvalidInputError(
            f"mitigate = {mitigate!r} must be None or an integer number of randomised roundings, 1 to {_MAX_DRAWS}"
            " (8 is a good start)"
        )
    if not 1 <= mitigate <= _MAX_DRAWS:
        raise InvalidInputError(
            f"mitigate = {mitigate!r} randomised roundings is outside 1 to {_MAX_DRAWS}; pass None for the plain solve"
        )
    if dev is not None and dev.info.element_bits <= 0:
        raise InvalidInputError(
            f"mitigate = {mitigate} randomises the rounding of element codes, but {dev.info.name} has continuous"
            " elements (coupling.element_bits = 0): there is no rounding to randomise; pass mitigate=None"
        )
    return int(mitigate)


def randomised_codes(
    target: np.ndarray, k: int, rng: np.random.Generator, rounding: str = "stratified", *, symmetric: bool = False
) -> np.ndarray:
    """k randomised roundings of real-valued codes ``target`` (any shape): (k, *target.shape) float64 of
    integers, each draw unbiased (E code = target).  ``symmetric`` (square target): the upper triangle is
    drawn and mirrored, so every draw is symmetric.  Cost O(k size log k)."""
    floor = np.floor(target)
    frac = target - floor
    if symmetric:
        rows, cols = np.triu_indices(target.shape[0])
        frac = frac[rows, cols]
    if rounding == "independent":
        up = rng.random((k, *frac.shape)) < frac
    else:  # stratified: draw j of an element rounds up iff perm_j + U < k frac (systematic sampling)
        order = np.argsort(rng.random((k, *frac.shape)), axis=0)
        shift = rng.random(frac.shape)
        up = order + shift < k * frac
    if symmetric:
        full = np.zeros((k, *target.shape), dtype=bool)
        full[:, rows, cols] = up
        full[:, cols, rows] = up
        up = full
    return floor + up


def rounding_generator(dev: Device) -> np.random.Generator:
    """The generator of a mitigated call's draws: from the device's seed entropy and its calls so far."""
    try:
        entropy = int(dev.info.seed_entropy)
    except ValueError:  # a device that does not report an integer entropy: hash what it reports
        entropy = int.from_bytes(dev.info.seed_entropy.encode()[:32].ljust(32, b"\0"), "little")
    sequence = np.random.SeedSequence(entropy, spawn_key=(_STREAM, dev.timeline.calls))
    return np.random.Generator(np.random.PCG64(sequence))


def mitigated_solve(
    dev: Device,
    A: np.ndarray,
    columns: list[np.ndarray],
    matrix_scale: float,
    k: int,
    rounding: str,
    solve_column: Callable[[np.ndarray], tuple[np.ndarray, RunReport]],
) -> list[tuple[np.ndarray, MitigationReport]]:
    """The mean over k randomised roundings of A (loaded at ``matrix_scale``) of ``solve_column(b)`` for
    every b in ``columns``; one report per column.  A (n, n) symmetric, already checked."""
    from .device import DeviceTime

    info = dev.info
    unit = info.g_max / code_max(info.element_bits)
    target = calibration.target_codes(dev, A / matrix_scale)
    cal = calibration._installed(dev)
    symmetric = cal is None  # trimmed targets are not symmetric (E_ij != E_ji)
    if symmetric:
        target = 0.5 * (target + target.T)
    draws = randomised_codes(target, k, rounding_generator(dev), rounding, symmetric=symmetric)
    top = float(code_max(info.element_bits))
    np.clip(draws, -top, top, out=draws)
    # the user-unit matrix whose load gives exactly these codes (the trims, if any, are undone by the load)
    trims = 1.0 if cal is None else cal.trims(A.shape[0])
    answers: list[list[np.ndarray]] = [[] for _ in columns]
    runs, analog = [0] * len(columns), [0.0] * len(columns)
    start = dev.timeline.device_time
    for codes in draws:
        dev.load_matrix(codes * unit * matrix_scale * trims, scale=matrix_scale, symmetric=symmetric)
        if not symmetric:  # trimmed codes are not symmetric; ranging (scale="auto") uses A, < 1 code away
            dev._loaded, dev._lambda_min = A, None
        for c, column in enumerate(columns):
            calls = dev.timeline.calls
            x, report = solve_column(column)
            answers[c].append(np.asarray(x, dtype=np.float64))
            runs[c] += _runs_since(dev, calls)
            analog[c] += report.analog_time
    after = dev.timeline.device_time
    spent = DeviceTime(
        after.link_s - start.link_s,
        after.program_s - start.program_s,
        after.analog_s - start.analog_s,
        after.convert_s - start.convert_s,
    )
    out = []
    for c in range(len(columns)):
        stack = np.array(answers[c])
        spread = stack.std(axis=0, ddof=1) / np.sqrt(k) if k > 1 else np.full(stack.shape[1], np.nan)
        out.append((stack.mean(axis=0), MitigationReport(k, rounding, spread, runs[c], analog[c], spent)))
    return out


def _runs_since(dev: Device, calls: int) -> int:
    """Runs among the calls recorded since the timeline counted ``calls``."""
    timeline = dev.timeline
    new = min(timeline.calls - calls, len(timeline))
    return sum(1 for record in timeline[len(timeline) - new :] if record.call == "run") if new else 0
