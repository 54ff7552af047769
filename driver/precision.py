"""Precision beyond the device: mixed-precision iterative refinement (DESIGN 7, issue 16).

The host owns float64.  An analog solve gives x with a relative error eps of a few per cent
(``spu-8``: 1-6 %); iterative refinement (Le Gallo et al., Nature Electronics 2018) turns it
into a float64-accurate answer:

    x_0 = device solve of A x = b
    repeat  r_k = b - A x_k            (float64, on the host, O(n^2))
            d_k = device solve of A d = r_k   (A already loaded; r_k ranged to the converters)
            x_{k+1} = x_k + d_k
    until   ||r_k|| / ||b|| <= tol

If the device solves every system with relative error eps < 1 (eps of the map r -> A d_k
against A^-1 r), the residual contracts by about eps per iteration, so ``tol`` takes about
log(tol) / log(eps) device solves (spu-8, eps ~ 0.05: 8-9 solves to 1e-10).  Where eps >= 1
(e.g. cond(A) ~ 1e4 on spu-8, whose 8-bit elements then perturb A by more than its smallest
eigenvalue) the residual does not contract and the loop stops with :class:`RefinementError`.

``driver.linalg.solve(..., refine=True)`` and ``driver.linalg.inv(..., refine=True)`` call
:func:`refine_solution`; this module never talks to the device itself but through the
``device_solve`` callable it is given (the auto-ranged solve of one right-hand side on the loaded A).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ranging
from .errors import InvalidInputError, SpuError
from .numbers import real
from .reports import DeviceInfo, DeviceTime, RunReport

if TYPE_CHECKING:  # the device imports this module for set_damping's check
    from .device import Device

__all__ = [
    "RefinementReport",
    "RefinementError",
    "refine_solution",
    "check_refinement",
    "critical_damping",
    "checked_damping",
]

# a residual that has not decreased for this many device solves in a row stops the loop
_STALLED_SOLVES = 2


@dataclass(frozen=True)
class RefinementReport:
    """What iterative refinement of one right-hand side did.

    residuals: ||b - A x_k|| / ||b|| in float64 for x_0 (the plain device solve) and after each
    correction, so ``len(residuals) - 1`` corrections were made; converged: the last one is <= tol;
    tol: the target; device_solves: auto-ranged device solves (x_0 and every correction);
    runs: device runs, the auto-ranging's retries included (of the records ``dev.timeline`` holds);
    analog_time: tau of the runs whose means were used (one per solve); device_time: what the
    loads, runs and reads took on the hardware (``device_time.analog_s`` is the analog part, in
    seconds), from ``dev.timeline``'s running totals.
    """

    residuals: tuple[float, ...]
    converged: bool
    tol: float
    device_solves: int
    runs: int
    analog_time: float
    device_time: DeviceTime

    @property
    def contraction(self) -> float:
        """Geometric mean of r_{k+1} / r_k over the corrections: about the device's relative error."""
        steps = len(self.residuals) - 1
        first, last = self.residuals[0], self.residuals[-1]
        if steps < 1 or first <= 0.0 or last <= 0.0:
            return math.nan
        return (last / first) ** (1.0 / steps)


class RefinementError(SpuError, RuntimeError):
    """Iterative refinement did not reach its tolerance: the residual stopped contracting (the
    device's relative error on this A is >= 1), or max_iter corrections were not enough.

    ``x`` holds the iterate with the smallest residual, ``report`` the :class:`RefinementReport`,
    ``residual`` the last relative residual and ``contraction`` the last factor r_k / r_{k-1}.
    Every run completed cleanly, so the device holds A and the last correction's right-hand side.
    """

    def __init__(self, message: str, x: np.ndarray, report: RefinementReport, contraction: float):
        super().__init__(message)
        self.x = x
        self.report = report
        self.residual = report.residuals[-1]
        self.contraction = contraction


def check_refinement(refine: Any, tol: Any, max_iter: Any) -> tuple[bool, float, int]:
    """Validate the refinement arguments (before any device call); returns them as bool, float, int."""
    if not isinstance(refine, (bool, np.bool_)):
        raise InvalidInputError(f"refine = {refine!r} must be True or False")
    tol = real(tol, "refine_tol", "a number in (0, 1)")
    if not 0.0 < tol < 1.0:
        raise InvalidInputError(
            f"refine_tol = {tol!r} must be in (0, 1): the relative residual ||b - A x|| / ||b|| to reach"
            " (float64 reaches about 1e-15 cond(A))"
        )
    if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)):
        raise InvalidInputError(f"max_iter = {max_iter!r} must be an integer >= 1: the most corrections to run")
    if max_iter < 1:
        raise InvalidInputError(f"max_iter = {max_iter!r} must be >= 1: the most corrections to run")
    return bool(refine), tol, int(max_iter)


def refine_solution(
    dev: Device,
    A: np.ndarray,
    b: np.ndarray,
    device_solve: Callable[[np.ndarray], tuple[np.ndarray, RunReport]],
    tol: float,
    max_iter: int,
) -> tuple[np.ndarray, RefinementReport]:
    """x with ||b - A x|| / ||b|| <= tol by iterative refinement, and its report.

    A (n, n) float64 is the matrix already loaded on ``dev``; b (n,); ``device_solve(v)`` returns
    the device's auto-ranged solution of A d = v.  The residual is formed on the host in float64.
    Cost: 1 + (corrections) device solves, each O(n^2) on the host.  Stops with RefinementError
    when the residual has not decreased for two corrections in a row (contraction >= 1) or after
    max_iter corrections above tol.
    """
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    b_norm = float(np.linalg.norm(b))
    start = (dev.timeline.calls, dev.timeline.device_time)
    if b_norm == 0.0:  # A x = 0: x = 0 exactly, nothing to run
        return np.zeros_like(b), _report(dev, start, (0.0,), True, tol, 0, 0.0)

    analog_time = 0.0
    x, run = device_solve(b)
    x = np.asarray(x, dtype=np.float64)
    analog_time += run.analog_time
    solves = 1
    residual = b - A @ x
    residuals = [float(np.linalg.norm(residual)) / b_norm]
    best_x, best = x, residuals[0]
    stalled = 0
    while residuals[-1] > tol:
        if solves - 1 >= max_iter:
            report = _report(dev, start, tuple(residuals), False, tol, solves, analog_time)
            factor = _last_factor(residuals)
            raise RefinementError(
                f"iterative refinement reached a relative residual of {residuals[-1]:.3g}, not refine_tol = {tol:.3g},"
                f" in max_iter = {max_iter} corrections (contracting by {report.contraction:.3g} per correction,"
                f" last {factor:.3g}); raise max_iter, or a longer t if the contraction is close to 1",
                best_x,
                report,
                factor,
            )
        correction, run = device_solve(residual)
        analog_time += run.analog_time
        solves += 1
        x = x + np.asarray(correction, dtype=np.float64)
        residual = b - A @ x
        residuals.append(float(np.linalg.norm(residual)) / b_norm)
        if residuals[-1] < best:
            best_x, best = x, residuals[-1]
        stalled = stalled + 1 if residuals[-1] >= residuals[-2] else 0
        if stalled >= _STALLED_SOLVES and residuals[-1] > tol:
            report = _report(dev, start, tuple(residuals), False, tol, solves, analog_time)
            factor = _last_factor(residuals)
            raise RefinementError(
                f"iterative refinement is not converging: the relative residual is {residuals[-1]:.3g} after"
                f" {solves - 1} corrections (from {residuals[0]:.3g}), the last {_STALLED_SOLVES} without a decrease;"
                f" contraction factor {factor:.3g} (>= 1: the device's relative error on this A is not below 1,"
                " which happens when cond(A) is large against the element precision).  Precondition A, or solve"
                " it on the host; the error's .x holds the best iterate",
                best_x,
                report,
                factor,
            )
    return x, _report(dev, start, tuple(residuals), True, tol, solves, analog_time)


def _last_factor(residuals: list[float]) -> float:
    if len(residuals) < 2 or residuals[-2] <= 0.0:
        return math.nan
    return residuals[-1] / residuals[-2]


def _report(
    dev: Device,
    start: tuple[int, DeviceTime],
    residuals: tuple[float, ...],
    converged: bool,
    tol: float,
    solves: int,
    analog: float,
) -> RefinementReport:
    timeline = dev.timeline
    calls, before = start
    new = timeline.calls - calls  # records past maxlen are dropped, their totals kept (device.Timeline)
    records = timeline[len(timeline) - min(new, len(timeline)) :] if new else []
    after = timeline.device_time
    return RefinementReport(
        residuals=residuals,
        converged=converged,
        tol=tol,
        device_solves=solves,
        runs=sum(1 for record in records if record.call == "run"),
        analog_time=analog,
        device_time=DeviceTime(
            after.link_s - before.link_s,
            after.program_s - before.program_s,
            after.analog_s - before.analog_s,
            after.convert_s - before.convert_s,
        ),
    )


# -- programmable damping (SET_DAMPING) -----------------------------------------------------------------------
def checked_damping(info: DeviceInfo, damping: Any) -> float:
    """``damping`` as set_damping takes it: > 0 and within the spec's [oscillator.damping_min, damping_max];
    InvalidInputError (before any device call) otherwise, or on a device without programmable damping."""
    damping = real(damping, "damping", "a positive number (R_d C0 / tau)")
    osc = info.spec.get("oscillator", {})
    low, high = float(osc.get("damping_min", 0.0)), float(osc.get("damping_max", 0.0))
    if info.cell_kind != "oscillator" or high <= 0.0:
        why = (
            "it has RC cells" if info.cell_kind != "oscillator" else "its damping is fixed (oscillator.damping_max = 0)"
        )
        raise InvalidInputError(
            f"{info.name} has no programmable damping: {why}; use an oscillator device whose spec gives"
            " oscillator.damping_max > 0 (e.g. spu-8-lc)"
        )
    if not (damping > 0.0 and low <= damping <= high):
        raise InvalidInputError(
            f"damping = {damping!r} is outside [{low:g}, {high:g}] of {info.name} (oscillator.damping_min, damping_max;"
            " and must be > 0); precision.critical_damping(dev, A) gives a setting within it"
        )
    return damping


def critical_damping(dev: Device, A: Any, scale: float | None = None) -> float:
    """The damping gamma = 2 sqrt(k m) that critically damps the slowest mode of A loaded at ``scale``
    (default ``dev.matrix_scale(A)``): k = lambda_min(A) / scale, m the spec's inductance (nominal parts),
    clipped to the device's [oscillator.damping_min, damping_max].  That mode then decays as
    (1 + w t) e^{-w t}, w = sqrt(k / m): about sqrt(cond) periods where the spec's damping, tuned for unit
    stiffness, leaves it overdamped (rate about k / gamma).  O(n^3) (lambda_min) up to n = 256."""
    A = dev._checked_matrix(A)
    scale = dev.matrix_scale(A) if scale is None else scale
    osc = dev.info.spec.get("oscillator", {})
    lambda_min = ranging.smallest_eigenvalue(A)
    if not lambda_min > 0.0:
        raise InvalidInputError(f"critical damping needs a positive definite A: lambda_min = {lambda_min:.3g}")
    gamma = 2.0 * math.sqrt(lambda_min / scale * float(osc.get("inductance", 1.0)))
    return float(np.clip(gamma, float(osc.get("damping_min", 0.0)), float(osc.get("damping_max", math.inf))))
