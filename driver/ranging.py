"""What the host can say about a loaded array without solving it: its slowest rate, an input scale that
keeps the equilibrium inside the converters, and how far a run has settled.

Every estimate starts from lambda_min, the smallest eigenvalue of the matrix as the user gave it (user
units).  With the array programmed at a = A / s (the load's scale s, user units per g0) and ideal parts,
the slowest mode relaxes at r = lambda_min / s per tau, so after a burn-in b the transient left is
e^{-r b} of the initial offset (an oscillator array: the slower root of its mode of stiffness r,
:func:`slowest_rate`).  A^-1 b is never computed: the equilibrium is bounded through
|A^-1 b|_inf <= |A^-1 b|_2 <= |b|_2 / lambda_min.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse.linalg

from ._blas import fixed_threads
from .errors import DeviceStateError, InvalidInputError
from .ggn import GGN

_symv = scipy.linalg.blas.dsymv

__all__ = [
    "SettlingWarning",
    "smallest_eigenvalue",
    "slowest_rate",
    "equilibrium_bound",
    "settling",
    "auto_t",
    "input_scale",
]

EXACT_UP_TO = 256  # eigvalsh below this size (O(n^3), under a millisecond); Lanczos above, O(k n^2)
SETTLED = 0.01  # read_mean warns when the transient left at burn_in is above this fraction


class SettlingWarning(UserWarning):
    """The run's burn-in was too short for the array's slowest mode: read_mean still holds transient."""


def smallest_eigenvalue(matrix: np.ndarray | GGN) -> float:
    """lambda_min of a symmetric matrix (user units): exact for n <= 256, else ARPACK's Lanczos to 1 %
    from a fixed start vector (reproducible).  A GGN J^T H J + lambda I: its damping lambda, a lower bound
    (and exact when N > m).  Cost O(n^3) up to 256, O(k n^2) above, O(1) for a GGN."""
    if isinstance(matrix, GGN):
        return matrix.damping
    with fixed_threads():  # one BLAS thread: lambda_min sets the input scale, so its bits must not vary
        return _smallest_eigenvalue(matrix)


def _smallest_eigenvalue(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    if n <= EXACT_UP_TO:
        return float(scipy.linalg.eigvalsh(0.5 * (matrix + matrix.T), subset_by_index=[0, 0])[0])
    start = np.random.default_rng(0).standard_normal(n)
    # products by BLAS's symmetric dsymv, which reads one triangle (of a matrix symmetric to 1e-10, as loads
    # are checked): 1.7-2x a general product, and no symmetrised copy
    fortran = matrix.T if matrix.flags.c_contiguous else np.asfortranarray(matrix)
    operator = scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda x: _symv(1.0, fortran, np.ravel(x), lower=1), dtype=np.float64
    )
    try:
        value = scipy.sparse.linalg.eigsh(operator, k=1, which="SA", tol=1e-2, v0=start, return_eigenvectors=False)
        return float(value[0])
    except scipy.sparse.linalg.ArpackNoConvergence:
        return float(scipy.linalg.eigvalsh(0.5 * (matrix + matrix.T), subset_by_index=[0, 0])[0])


def slowest_rate(kind: str, stiffness: np.ndarray, spec: dict[str, Any]) -> float:
    """The smallest decay rate of any mode (1 / tau) for modes of stiffness k (1 / tau): k itself for RC
    cells; for oscillator cells (mass m = the spec's ``oscillator.inductance``, damping gamma) the slower
    root's real part, gamma / 2m - Re sqrt((gamma / 2m)^2 - k / m), which grows with k up to gamma / 2m."""
    k = np.asarray(stiffness, dtype=np.float64)
    if kind != "oscillator":
        return float(k.min())
    osc = spec.get("oscillator", {})
    mass = float(osc.get("inductance", 1.0))
    half_rate = float(osc.get("damping", 2.0)) / (2.0 * mass)
    root = np.sqrt((half_rate**2 - k / mass).astype(np.complex128))
    return float((half_rate - root.real).min())


def equilibrium_bound(b: np.ndarray, lambda_min: float) -> float:
    """An upper bound of max |A^-1 b| (user units) from |b|_2 / lambda_min; inf when lambda_min <= 0."""
    return float(np.linalg.norm(b)) / lambda_min if lambda_min > 0.0 else math.inf


def settling(rate: float | None, burn_in: float) -> float:
    """e^{-r burn_in}: the fraction of the initial offset left when sampling starts (NaN when r is unknown)."""
    if rate is None or not math.isfinite(rate):
        return math.nan
    return math.exp(-rate * burn_in) if rate > 0.0 else 1.0


def auto_t(rate: float, target: float, burn_fraction: float = 0.5) -> float:
    """The run time t whose burn-in (burn_fraction t) leaves the transient at ``target``: ln(1/target) / (f r)."""
    return math.log(1.0 / target) / (burn_fraction * rate)


def warn_unsettled(left: float, burn_in: float, rate: float) -> None:
    if math.isfinite(left) and left > SETTLED:
        warnings.warn(SettlingWarning(_unsettled_message(left, burn_in, rate)), stacklevel=3)


@functools.lru_cache(maxsize=64)  # a loop of equal runs warns with one message: formatted once
def _unsettled_message(left: float, burn_in: float, rate: float) -> str:
    return (
        f"the last run's burn-in of {burn_in:.3g} tau leaves e^(-r burn_in) = {left:.2g} of the initial"
        f" offset (the slowest mode relaxes at r = {rate:.3g} per tau): read_mean still holds that much"
        f" transient; run at least burn_in = {math.log(1.0 / SETTLED) / rate:.3g} tau for 1 %, or use"
        " driver.linalg.solve(..., t='auto')"
    )


def loaded_rate(dev: Any) -> float | None:
    """A Device's loaded array's slowest relaxation rate, lambda_min(A) / s per tau (ideal parts, the damping
    now set); None when unknown (nothing symmetric loaded).  lambda_min once per load, the rate once per
    (lambda_min, s, damping): a loop of runs pays a tuple compare."""
    if dev._loaded is None or dev._matrix_scale is None:
        return None
    if dev._lambda_min is None:
        dev._lambda_min = smallest_eigenvalue(dev._loaded)
    key = (dev._lambda_min, dev._matrix_scale, dev._damping)
    if dev._rate_memo is None or dev._rate_memo[0] != key:
        stiffness = np.array([dev._lambda_min / dev._matrix_scale])
        dev._rate_memo = key, slowest_rate(dev.info.cell_kind, stiffness, dev._dynamics_spec())
    return dev._rate_memo[1]


def loaded_input_scale(dev: Any, b: np.ndarray) -> float:
    """``load_vector(b, scale="auto")``'s scale for a Device's loaded matrix (:func:`input_scale`), or the
    error that says why there is none (nothing loaded, or a matrix that is not positive definite)."""
    if dev._loaded is None:
        raise DeviceStateError(
            "load_vector(b, scale='auto') ranges b for the loaded matrix: call load_matrix(A) first"
            " (a symmetric A, or a GGN)"
        )
    if loaded_rate(dev) is None or dev._lambda_min <= 0.0:
        raise InvalidInputError(
            f"the loaded matrix has smallest eigenvalue {dev._lambda_min:.3g} <= 0: it is not positive"
            " definite, so the array has no equilibrium to range b for"
        )
    return input_scale(b, dev._lambda_min, dev._matrix_scale, dev.info)


_AUTO_FILL = 0.7  # load_vector(scale="auto") aims the bound of the equilibrium at this fraction of the limit


def input_scale(b: np.ndarray, lambda_min: float, matrix_scale: float, info: Any) -> float:
    """The input scale of ``load_vector(b, scale="auto")``: user units of b per DAC volt.

    The equilibrium V* = (s_A / s_b) A^-1 b (volts) is bounded by (s_A / s_b) |b|_2 / lambda_min(A)
    (:func:`equilibrium_bound`); s_b puts that bound at 70 % of the smaller of the rails and the ADC
    range (``info``: a DeviceInfo), and never below the DAC's own limit max|b| / dac_range_v.  O(n).
    """
    limits = [info.rail_v] if info.rail_v is not None else []
    if info.adc_bits > 0:
        limits.append(info.adc_range_v)
    dac = float(np.abs(b).max()) / info.dac_range_v
    if not limits:
        return dac if dac > 0.0 else 1.0
    needed = matrix_scale * equilibrium_bound(b, lambda_min) / (_AUTO_FILL * min(limits))
    return max(needed, dac) if max(needed, dac) > 0.0 else 1.0
