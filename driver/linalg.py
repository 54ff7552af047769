"""One-call linear algebra on an SPU: solve (the mean), inv and sample_gaussian (the second moments,
``driver.sampling``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import ranging
from .device import Device, RunReport
from .errors import InvalidInputError, SaturationError
from .mitigation import MitigationReport, check_mitigation, mitigated_solve
from .numbers import real
from .precision import RefinementError, RefinementReport, check_refinement, refine_solution
from .primitives import PrimitiveReport, expm, expnegm, lyapunov  # noqa: F401  (issue 17: e^{-A s}, e^{A s}, Lyapunov)
from .sampling import SamplingReport, sample_gaussian
from .sampling import inv as _covariance_inv

__all__ = [
    "solve",
    "inv",
    "sample_gaussian",
    "SamplingReport",
    "RefinementReport",
    "RefinementError",
    "MitigationReport",
]

# after a step down, aim the largest node voltage at this fraction of the ADC range
_TARGET_FILL = 0.7
_STEP_DOWN = 4.0
_RAISE_BELOW = 0.9  # a clean answer below this fraction of the aim is run once more at the aim
_MAX_TRIES = 8


def solve(
    dev: Device,
    A: Any,
    b: Any,
    t: float | str = 200.0,
    burn_in: float | None = None,
    *,
    tol: float = 1e-3,
    refine: bool = False,
    refine_tol: float = 1e-10,
    max_iter: int = 30,
    mitigate: int | None = None,
    rounding: str = "stratified",
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, Any]:
    """Solve A x = b on the device: A symmetric positive definite (n, n), b (n,) or B (n, k).

    Loads A and b, runs for analog time t (tau) and returns the mean of the ADC
    samples taken after ``burn_in`` (default t / 2, as ``Device.run``), in the user's units.
    The array settles as e^{-r t}, r = lambda_min(A) / s per tau the slowest rate of the
    array a = A / s (s = max|A| / g_max), so choose t >~ 10 / r, or ``t="auto"``:
    t = 2 ln(1 / tol) / r, so that the burn-in leaves tol (default 1e-3) of the initial
    offset (r from ``driver.ranging``: exact eigenvalues up to n = 256, Lanczos above).

    Auto-ranging, as on a bench instrument: b starts at the level that keeps the bound
    |b|_2 / lambda_min(A) of the answer within 70 % of the ADC range and rails (so the exact
    engine can take the run); if a node hits a rail or the ADC clips anyway, b is driven at a
    quarter of that amplitude and the run repeated (up to 8 runs); a clean answer below 63 % of
    the ADC range is run once more with the input raised so it fills about 70 %.  B of shape (n, k): A is
    loaded once and each column ranged and run in turn; the result is (n, k).
    ``return_report`` also returns the RunReport of the run whose mean is returned
    (a list of k for B).  Raises SaturationError when no input level runs cleanly
    (A not positive definite).

    ``refine=True``: iterative refinement to float64 precision (``driver.precision``): x_0 from
    the device, then r = b - A x on the host in float64, A d = r on the device (A loaded once, r
    ranged like b), x += d, until ||r|| / ||b|| <= ``refine_tol`` (default 1e-10; ``tol`` keeps
    its meaning for t="auto") or ``max_iter`` corrections.  Each correction shrinks the residual by
    about the device's relative error (spu-8, 8x8, cond 10: about 0.05, so ~8 corrections to 1e-10).
    ``return_report`` then returns a RefinementReport (a list of k for B) instead of the RunReport.
    Raises RefinementError (the last residual, the contraction factor and the best x) when the
    residual stops contracting -- the device's error on this A is not below 1 -- or max_iter runs out.

    ``mitigate=k``: error mitigation (``driver.mitigation``, after arXiv 2401.16231): A's element codes
    are rounded k times at random on the host (each draw unbiased; ``rounding`` "stratified", the
    default, spreads each element's up-roundings evenly over the draws, "independent" draws them
    apart), each rounding is loaded and b solved on it as above (t each, so k t in all), and the k
    answers are averaged: the first-order error of nearest rounding goes, leaving its O(Delta^2) part.
    The draws are seeded from the device's seed, so results repeat.  ``return_report`` then returns a
    MitigationReport (a list of k for B).  Not with ``refine`` (refinement removes rounding errors
    itself); refused on a device with continuous elements.

    Every argument is checked before the first device call (InvalidInputError, nothing
    loaded); a call that fails after that leaves A and b loaded, as its message says.
    """
    # every argument is checked before the first device call, so a refused call changes nothing
    A = dev._checked_matrix(A)
    n = A.shape[0]
    B = np.asarray(b) if not isinstance(b, np.ndarray) else b
    columns = [dev._checked_vector(column, n) for column in (B.T if B.ndim == 2 else [b])]
    if B.ndim == 2 and B.shape[1] == 0:
        raise InvalidInputError(f"B has shape {B.shape}: no right-hand side to solve for")
    matrix_scale = dev.matrix_scale(A)
    if isinstance(t, str) and t == "auto":
        t = _auto_time(dev, A, matrix_scale, tol)
    t = dev._checked_run(t, 0.0)[0]
    t, burn_in = dev._checked_run(t, 0.5 * t if burn_in is None else burn_in)
    refine, refine_tol, max_iter = check_refinement(refine, refine_tol, max_iter)
    draws = _checked_mitigation(dev, mitigate, rounding, refine)
    if draws is not None:

        def mitigated_column(v: np.ndarray) -> tuple[np.ndarray, RunReport]:
            return _solve_column(dev, v, t, burn_in, matrix_scale)

        solved = mitigated_solve(dev, A, columns, matrix_scale, draws, rounding, mitigated_column)
        if B.ndim == 2:
            x = np.column_stack([x for x, _ in solved])
            return (x, [report for _, report in solved]) if return_report else x
        return solved[0] if return_report else solved[0][0]
    dev.load_matrix(A, scale=matrix_scale)
    if refine:

        def device_solve(v: np.ndarray) -> tuple[np.ndarray, RunReport]:
            return _solve_column(dev, v, t, burn_in, matrix_scale)

        solved = [refine_solution(dev, A, column, device_solve, refine_tol, max_iter) for column in columns]
    else:
        solved = [_solve_column(dev, column, t, burn_in, matrix_scale) for column in columns]
    if B.ndim == 2:
        x = np.column_stack([x for x, _ in solved])
        return (x, [report for _, report in solved]) if return_report else x
    return solved[0] if return_report else solved[0][0]


def _checked_mitigation(dev: Device, mitigate: Any, rounding: Any, refine: bool) -> int | None:
    draws = check_mitigation(mitigate, rounding, dev)
    if draws is not None and refine:
        raise InvalidInputError(
            f"mitigate = {mitigate} and refine=True: choose one; refinement already converges past the rounding"
            " error that mitigation averages out"
        )
    return draws


def _auto_time(dev: Device, A: np.ndarray, matrix_scale: float, tol: Any) -> float:
    """t whose burn-in t / 2 leaves tol of the slowest mode's initial offset."""
    tol = real(tol, "tol", "a number in (0, 1)")
    if not 0.0 < tol < 1.0:
        raise InvalidInputError(f"tol = {tol!r} must be in (0, 1): the transient left, relative to the offset")
    lambda_min = ranging.smallest_eigenvalue(A)
    if not lambda_min > 0.0:
        raise InvalidInputError(f"t='auto' needs a positive definite A: its smallest eigenvalue is {lambda_min:.3g}")
    rate = ranging.slowest_rate(dev.info.cell_kind, np.array([lambda_min / matrix_scale]), dev._dynamics_spec())
    t = ranging.auto_t(rate, tol)
    if t > dev.info.max_run_time:
        raise InvalidInputError(
            f"t='auto' needs t = {t:.3g} tau (the slowest mode relaxes at {rate:.3g} per tau),"
            f" more than the {dev.info.max_run_time:g} tau one run may take; precondition A or relax tol"
        )
    return t


def _solve_column(
    dev: Device, b: np.ndarray, t: float, burn_in: float, matrix_scale: float
) -> tuple[np.ndarray, RunReport]:
    """The auto-ranged solve of one right-hand side on the loaded A.

    The first run drives b at the scale ``load_vector(b, scale="auto")`` picks from the bound
    |A^-1 b| <= |b|_2 / lambda_min (the equilibrium within 70 % of the ADC range and rails, so "auto"
    can usually prove the run free of clipping and draw it exactly); an indefinite A starts at the
    DAC's full scale and saturates, as it must.  A clipped run is repeated at a quarter of the input;
    a clean answer that fills less than 63 % of the ADC range (90 % of the 70 % aim) is run once more
    with the input raised to fill about 70 % (never beyond the DAC's full scale)."""
    floor = float(np.abs(b).max()) / dev.info.dac_range_v  # the DAC's full scale: no smaller input scale
    try:
        scale = dev.load_vector(b, scale="auto").scale
    except InvalidInputError:  # not positive definite: no equilibrium to range for
        scale = dev.load_vector(b).scale
    raised = False
    best: tuple[np.ndarray, RunReport] | None = None
    for _ in range(_MAX_TRIES):
        report = dev.run(t, burn_in, on_saturation="flag")
        if report.saturated or report.adc_clipped:
            if raised:
                break  # the level before the raise was clean: keep its answer
            scale *= _STEP_DOWN
            dev.load_vector(b, scale=scale)
            continue
        x = dev.read_mean()
        best = (x, report)
        fill = float(np.abs(x).max()) * matrix_scale / scale / dev.info.adc_range_v
        if not raised and 0.0 < fill < _RAISE_BELOW * _TARGET_FILL and scale > floor:
            scale = max(floor, scale * fill / _TARGET_FILL)
            raised = True
            dev.load_vector(b, scale=scale)
            continue
        break
    if best is None:
        raise SaturationError(
            f"the array saturated at every input level down to {floor / scale:.2g} of the DAC's full scale;"
            " A is probably not positive definite (check its eigenvalues).  The device now holds A and b"
            f" (b at {floor / scale:.2g} of the DAC's full scale) and the state of the last, discarded run"
        )
    return best


def inv(
    dev: Device,
    A: Any,
    t: float | str | None = None,
    burn_in: float | None = None,
    *,
    refine: bool = False,
    refine_tol: float = 1e-10,
    max_iter: int = 30,
    mitigate: int | None = None,
    rounding: str = "stratified",
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, Any]:
    """A^-1 of a symmetric positive definite A (n, n).

    ``refine=False`` (default): from the device's covariance, ``driver.sampling.inv`` (t defaults
    to 2000 tau there; see it for the accuracy and the report).

    ``refine=True``: the n columns of A^-1 as solves of A x = e_j with iterative refinement
    (``solve(dev, A, I, t, burn_in, refine=True, ...)``; t defaults to 200 tau and may be "auto"),
    each column to ||e_j - A x_j|| <= ``refine_tol``; ``return_report`` returns the n
    RefinementReports.  Column solves rather than Newton-Schulz (X <- X (2I - A X) from the
    covariance estimate) because: the device then does the solving and the host only forms
    residuals (one n x n product per sweep, where Newton-Schulz needs two per step and is itself
    an O(n^3) host inverse that leaves the device only the seed); a solve's mean is far more
    accurate per tau than a covariance estimate (a few per cent needs t ~ 2000 there), and both
    need the seed's error below 1 to converge; and one loop, one stopping rule and one error
    (RefinementError) serve solve and inv alike.  Cost: A loaded once, n (1 + corrections)
    device solves, about 9 per column on spu-8 at cond 10.

    ``mitigate=k``: the n columns as solves of A x = e_j, each averaged over the same k randomised
    roundings of A (``solve(dev, A, I, t, burn_in, mitigate=k, rounding=...)``; t defaults to 200 tau
    per rounding); from means rather than the covariance because the covariance's sampling error at
    an affordable t (a few per cent at t = 2000) is larger than the rounding error mitigation removes.
    """
    refine, refine_tol, max_iter = check_refinement(refine, refine_tol, max_iter)
    if mitigate is not None:
        _checked_mitigation(dev, mitigate, rounding, refine)
        A = dev._checked_matrix(A)
        identity = np.eye(A.shape[0])
        t = 200.0 if t is None else t
        return solve(dev, A, identity, t, burn_in, mitigate=mitigate, rounding=rounding, return_report=return_report)
    if not refine:
        return _covariance_inv(dev, A, 2000.0 if t is None else t, burn_in, return_report=return_report)
    A = dev._checked_matrix(A)
    identity = np.eye(A.shape[0])
    return solve(
        dev,
        A,
        identity,
        200.0 if t is None else t,
        burn_in,
        refine=True,
        refine_tol=refine_tol,
        max_iter=max_iter,
        return_report=return_report,
    )
