"""Matrix exponentials and Lyapunov solves from the second moments of an SPU (issue 17).

The cells follow the linear SDE dV = -M V dt + sqrt(2 kappa) dW (RC cells, DESIGN 4.1: M = a, the
programmed array, with ideal parts).  At equilibrium their stationary covariance Sigma and lagged
covariance C(tau) = <V(t + tau) V(t)^T> satisfy

    M Sigma + Sigma M^T = 2 kappa I,        C(tau) = e^{-M tau} Sigma,

for any stable M, symmetric or not (Aifer et al., arXiv 2308.05660; Duffield et al., arXiv
2311.12759).  So the device gives

- :func:`expnegm`: e^{-A s} = C(tau) Sigma^-1 with a = A / s_A and tau = s s_A, from the lagged
  and lag-0 moments the device accumulates over a run (RUN's record_lags, READ_LAGGED);
- :func:`expm`: e^{A s} = expnegm(-A, s), with an optional shift alpha as thermox does;
- :func:`lyapunov`: Sigma solving A Sigma + Sigma A^T = diag(d), from the stationary covariance
  (record_cov) of the diagonally similar drift D^-1/2 A D^1/2, which needs one noise level only.

Oscillator cells (DESIGN 4.2: m x'' = -a x - gamma x' + noise) are second order.  The driver raises
their damping to the spec's damping_max (when SET_DAMPING allows it; restored afterwards) and, for
the exponential, programs a = gamma R - m R^2 with R = (A + alpha I) s / tau: then e^{-R t} solves
m x'' + gamma x' + a x = 0 exactly, the slow half of the dynamics is e^{-R t}, and for a symmetric
a the lagged covariance is e^{-R tau} P Sigma with the known factor P = (R_f - R)^-1 R_f,
R_f = gamma / m - R, which the host divides out.  What is left (mass and damping mismatch, and for a
non-symmetric A the p-x correlation the ADC cannot see) is of the order of ``overdamping`` =
m rho(R) / gamma (default 0.05) times the mismatch or the asymmetry.  The Lyapunov solve uses the
overdamped limit, gamma dx = -a x dt + ..., with the array scaled so m rho(a) / gamma^2 <= overdamping:
a bias of about that fraction, which the report states (``regime_bias``).

Every estimate comes with a :class:`PrimitiveReport`: the run time, the effective number of
independent samples, and an error estimate from batch means (the run is split into ``batches``
runs that continue one another; the spread of the per-batch estimates, linearised about the pooled
one, gives the standard error of each entry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import lagged as lagged_module
from .device import SYMMETRY_RTOL, Device, RunReport
from .errors import InvalidInputError, SaturationError
from .numbers import real

__all__ = ["PrimitiveReport", "expnegm", "expm", "lyapunov"]

# the widest cell's +- _Z sd within _FILL of the ADC's full scale (the rails, if lower), as sampling.inv
_Z = 5.0
_FILL = 0.9
# a run that clips is repeated at the noise level divided by this, at most _MAX_TRIES times
_STEP_DOWN = 4.0
_MAX_TRIES = 4
# default window: this many correlation times of the slowest mode (relative error about sqrt(2 / this))
_DEFAULT_SPANS = 4000.0
# burn-in before the first batch: this many correlation times (the variance settles as e^{-2 r t})
_BURN_SPANS = 10.0
# the fewest conversions per batch, in units of the lag (so the lagged pairs fill most of a batch)
_MIN_LAGS_PER_BATCH = 20
_MIN_SD_LSB = 4.0  # a cell's spread must cover this many LSB, or the ADC's rounding dominates it


@dataclass(frozen=True)
class PrimitiveReport:
    """How :func:`expnegm`, :func:`expm` or :func:`lyapunov` made its estimate.

    analog_time: total analog time run, burn-in included (tau); window: the time the moments were
    accumulated over (tau); lag: the lag in ADC conversions (0 for lyapunov) and lag_time the same in
    tau; batches: the runs the window was split into; effective_samples: window / (2 tau_c), about
    the number of independent samples of the slowest mode (tau_c = 1 / its rate); error: (n, n) the
    batch-means standard error of each entry of the result (user units), and error_norm its
    Frobenius norm (an estimate of the RMS Frobenius error); regime_bias: the overdamped-limit bias
    of an oscillator array (k m / gamma^2 at the stiffest mode; 0 on RC cells); kappa0: the noise
    level used (volts^2); matrix_scale: s_A (user units per g0); runs: the RunReports.
    """

    analog_time: float
    window: float
    lag: int
    lag_time: float
    batches: int
    effective_samples: float
    error: np.ndarray
    error_norm: float
    regime_bias: float
    kappa0: float
    matrix_scale: float
    runs: tuple[RunReport, ...]


# --------------------------------------------------------------------------- the estimators
def lagged_estimate(
    lagged: np.ndarray, lagged_pairs: np.ndarray, zero: np.ndarray, zero_pairs: np.ndarray, means: np.ndarray,
    samples: np.ndarray, right: np.ndarray | None = None, with_error: bool = True,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """E = C(L) C(0)^-1 from B batches of accumulated sums, with its batch-means standard error.

    lagged: (B, n, n) sum_k x_{k+L} x_k^T per batch over lagged_pairs[b] pairs; zero: (B, n, n)
    sum_k x_k x_k^T over zero_pairs[b] conversions; means: (B, n) the batch means over samples[b]
    conversions.  Pooled moments C(l) = sum_b S_b / sum_b pairs_b - m m^T (m the pooled mean);
    the deviation of batch b, linearised about E (the delta method for a ratio),
    D_b = (C_b(L) - E C_b(0)) C(0)^-1, gives the standard error std_b(D_b) / sqrt(B).  Needs B >= 2
    for an error (NaN otherwise; and without ``with_error``, which saves the O(B n^3) of the deviations).
    ``right``: return E right and its error instead (a fixed factor).
    Returns (E (n, n), error (n, n)).  Cost O(B n^3).
    """
    weights = samples / samples.sum()
    mean = weights @ means
    c_lag = lagged.sum(axis=0) / lagged_pairs.sum() - np.outer(mean, mean)
    c_zero = zero.sum(axis=0) / zero_pairs.sum() - np.outer(mean, mean)
    estimate = _right_divide(c_lag, c_zero)
    right = np.eye(estimate.shape[0]) if right is None else right
    batches = lagged.shape[0]
    if batches < 2 or not with_error:
        return estimate @ right, np.full_like(estimate, np.nan)
    outer = means[:, :, None] * means[:, None, :]
    c_lag_b = lagged / lagged_pairs[:, None, None] - outer
    c_zero_b = zero / zero_pairs[:, None, None] - outer
    # one factor for every batch: (C_b(L) - E C_b(0)) C(0)^-1 right
    deviations = (c_lag_b - estimate @ c_zero_b) @ _right_divide(right, c_zero)
    return estimate @ right, deviations.std(axis=0, ddof=1) / math.sqrt(batches)


def covariance_estimate(covs: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pooled covariance of B batches (covs (B, n, n), each over samples[b] conversions) and its
    batch-means standard error std_b(cov_b) / sqrt(B) (NaN for B < 2).  Cost O(B n^2)."""
    weights = samples / samples.sum()
    pooled = np.einsum("b,bij->ij", weights, covs)
    if covs.shape[0] < 2:
        return pooled, np.full_like(pooled, np.nan)
    return pooled, covs.std(axis=0, ddof=1) / math.sqrt(covs.shape[0])


def _right_divide(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x y^-1 by a solve, not an inverse."""
    return np.linalg.solve(y.T, x.T).T


# --------------------------------------------------------------------------- how the device is driven
@dataclass(frozen=True)
class _Regime:
    """How the cells' node voltages follow the drift.  RC cells: dV = -a V dt + ..., time_factor 1.
    Oscillator cells: mass m, damping gamma (time_factor; the damping set for the primitive)."""

    oscillator: bool
    mass: float = 1.0
    time_factor: float = 1.0


def _regime(dev: Device) -> _Regime:
    """The regime of the device, with the damping the primitive will set (damping_max when programmable)."""
    if dev.info.cell_kind != "oscillator":
        return _Regime(False)
    osc = dev.info.spec.get("oscillator", {})
    top = float(osc.get("damping_max", 0.0))
    gamma = top if top > 0.0 else float(dev.damping if dev.damping is not None else osc.get("damping", 2.0))
    return _Regime(True, float(osc.get("inductance", 1.0)), gamma)


class _DampingRestored:
    """Set an oscillator device's damping for the duration of a primitive and restore it after."""

    def __init__(self, dev: Device, regime: _Regime):
        self.dev = dev
        self.previous = dev.damping
        self.wanted = regime.time_factor if regime.oscillator else None

    def __enter__(self) -> _DampingRestored:
        programmable = float(self.dev.info.spec.get("oscillator", {}).get("damping_max", 0.0)) > 0.0
        if self.wanted is not None and programmable and self.dev.damping != self.wanted:
            self.dev.set_damping(self.wanted)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None and self.dev.damping != self.previous and not self.dev.closed:
            self.dev.set_damping(self.previous)


def _exponential_program(
    dev: Device, B: np.ndarray, values: np.ndarray, s: float, regime: _Regime, overdamping: float
) -> tuple[np.ndarray, float, int, np.ndarray | None]:
    """(matrix to load, its scale, lag L in conversions, host correction or None) for e^{-B s}.

    RC: a = B / s_A with s_A = L Delta / s, L the fewest conversions with s_A >= max|B| / g_max.
    Oscillator: a = gamma R - m R^2 (loaded at scale 1), R = B s / (L Delta), L the fewest with
    m rho(R) / gamma <= overdamping and max|a| <= g_max; correction (R_f - R)^-1... as E P^-1 with
    P^-1 = R_f^-1 (R_f - R), R_f = gamma / m - R."""
    period = 1.0 / dev.info.sample_rate
    g_max = dev.info.g_max
    if not regime.oscillator:
        lag = max(1, math.ceil(s * float(np.abs(B).max()) / g_max / period - 1e-9))
        return B, lag * period / s, lag, None
    m, gamma = regime.mass, regime.time_factor
    radius = float(np.abs(values).max())
    lag = max(1, math.ceil(radius * s * m / (gamma * overdamping) / period - 1e-9))
    square = B @ B
    for _ in range(200):  # max|a| falls as 1 / L for long lags: a geometric search ends in a few steps
        rate = s / (lag * period)
        a = gamma * rate * B - m * rate * rate * square
        if float(np.abs(a).max()) <= g_max:
            break
        lag = max(lag + 1, math.ceil(1.1 * lag))
    R = B * (s / (lag * period))
    fast = (gamma / m) * np.eye(B.shape[0]) - R
    correction = np.linalg.solve(fast, fast - R)  # R_f^-1 (R_f - R): all are functions of R, so they commute
    return a, 1.0, lag, correction


def _checked_positive(value: Any, what: str) -> float:
    value = real(value, what, "a positive number")
    if not (value > 0.0 and math.isfinite(value)):
        raise InvalidInputError(f"{what} = {value!r} must be a positive finite number")
    return value


def _checked_batches(batches: Any) -> int:
    if isinstance(batches, bool) or not isinstance(batches, (int, np.integer)) or batches < 2:
        raise InvalidInputError(f"batches = {batches!r}: pass an integer >= 2 (batch means need two batches)")
    return int(batches)


def _checked_overdamping(value: Any) -> float:
    value = _checked_positive(value, "overdamping")
    if value >= 0.25:
        raise InvalidInputError(
            f"overdamping = {value!r} must be below 0.25 (k m / gamma^2 = 1/4 is critical damping); the default"
            " 0.05 leaves a bias of a few per cent on oscillator cells, smaller values less at coarser codes"
        )
    return value


def _eigenvalues(B: np.ndarray) -> np.ndarray:
    """The eigenvalues of B: eigvalsh when B is symmetric (several times faster), else eigvals.  O(n^3)."""
    if np.array_equal(B, B.T):
        return np.linalg.eigvalsh(B).astype(np.complex128)
    return np.linalg.eigvals(B)


def _stable(B: np.ndarray, what: str, hint: Callable[[], str]) -> np.ndarray:
    """The eigenvalues of B, or InvalidInputError when one has a non-positive real part (``hint()`` says
    what to do; it is called only then)."""
    values = _eigenvalues(B)
    worst = int(np.argmin(values.real))
    if not values.real[worst] > 0.0:
        raise InvalidInputError(
            f"{what} must have eigenvalues of positive real part (a stable drift dx = -{what} x dt + noise),"
            f" but one is {complex(values[worst]):.3g}; {hint()}"
        )
    return values


def _spread_per_kappa(B: np.ndarray, matrix_scale: float) -> float | None:
    """An upper bound of the largest stationary variance per unit kappa (volts^2 / volts^2) when the
    array is a = B / s_A: ||Sigma|| <= kappa s_A / mu, mu = lambda_min((B + B^T) / 2) > 0; None when
    mu <= 0 (not contractive: a pilot run measures the spread instead)."""
    mu = float(np.linalg.eigvalsh(0.5 * (B + B.T))[0])
    return matrix_scale / mu if mu > 0.0 else None


def _limit_v(dev: Device) -> float:
    limit = dev.info.adc_range_v
    return min(limit, dev.info.rail_v) if dev.info.rail_v is not None else limit


def _lsb_v(dev: Device) -> float:
    bits = dev.info.adc_bits
    return dev.info.adc_range_v / ((1 << (bits - 1)) - 1) if bits > 0 else 0.0


def _noise_level(dev: Device, per_kappa: float) -> float:
    """kappa that puts the widest cell's +- 5 sd within 90 % of the ADC, within the noise source's range;
    InvalidInputError when a fixed source would clip or the spread would be below a few LSB."""
    limit = _FILL * _limit_v(dev)
    wanted = (limit / _Z) ** 2 / per_kappa
    if dev.info.kappa0_max > 0.0:
        kappa = min(wanted, dev.info.kappa0_max)
    else:
        kappa = dev.info.kappa0
        if kappa <= 0.0:
            raise InvalidInputError(
                f"{dev.info.name} has no noise to measure moments with (kappa0 = 0 and noise.kappa0_max = 0);"
                " use a device whose noise source can be turned up (kappa0_max > 0)"
            )
        if kappa > wanted:
            raise InvalidInputError(
                f"the noise of {dev.info.name} is fixed at kappa0 = {kappa:g} V^2, which would spread the cells"
                f" over {math.sqrt(kappa / wanted):.3g} times the converters' range; use a device whose noise"
                " source can be turned down (noise.kappa0_max > 0)"
            )
    lsb = _lsb_v(dev)
    if lsb > 0.0 and math.sqrt(kappa * per_kappa) < _MIN_SD_LSB * lsb * _Z:
        # the bound is of the widest cell; a narrow one would be rounding noise
        raise InvalidInputError(
            f"at the largest noise level the device allows ({kappa:g} V^2) the cells would spread over only"
            f" {math.sqrt(kappa * per_kappa) / lsb:.3g} LSB of its {dev.info.adc_bits}-bit ADC; use a device with"
            " a stronger noise source, or precondition A"
        )
    return kappa


def _batch_plan(dev: Device, window: float, batches: int, least: float) -> tuple[int, float]:
    """(batches, analog time per batch): the window split into at least ``batches`` runs, each at least
    ``least`` tau and within the device's max_run_time."""
    per = window / batches
    if per > dev.info.max_run_time:
        batches = math.ceil(window / dev.info.max_run_time)
        per = window / batches
    if per < least:
        raise InvalidInputError(
            f"t = {window:.4g} tau split into {batches} batches gives {per:.3g} tau per batch, less than the"
            f" {least:.3g} tau one batch needs (the lag times {_MIN_LAGS_PER_BATCH}); raise t or lower batches"
        )
    return batches, per


def _window(t: Any, default: float, what: str) -> float:
    if t is None:
        return default
    return _checked_positive(t, what)


class _NoiseRestored:
    """Set the noise level for the duration of a primitive and restore the previous one after it."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.previous = dev.noise_level

    def set(self, kappa: float) -> None:
        if self.dev.info.kappa0_max > 0.0:
            self.dev.set_noise(kappa)

    def __enter__(self) -> _NoiseRestored:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev.info.kappa0_max > 0.0 and self.dev.noise_level != self.previous and not self.dev.closed:
            self.dev.set_noise(self.previous)


def _pilot_spread(dev: Device, n: int, matrix_scale: float, kappa: float, t: float) -> float:
    """The largest variance per unit kappa measured by a pilot run (record_cov) at noise level kappa."""
    dev.load_vector(np.zeros(n), scale=matrix_scale)
    for _ in range(_MAX_TRIES):
        report = dev.run(t, 0.25 * t, on_saturation="flag", record_cov=True)
        if not (report.saturated or report.adc_clipped):
            break
        kappa /= 16.0
        dev.set_noise(kappa)
    else:
        raise SaturationError(f"the pilot run clipped at every noise level down to {kappa:.3g} V^2")
    spread = float(np.max(np.diag(dev.read_cov())))
    return 2.0 * spread / kappa  # a factor 2 of margin: the pilot's estimate is itself noisy


# --------------------------------------------------------------------------- the primitives
def expnegm(
    dev: Device,
    A: Any,
    s: float = 1.0,
    t: float | None = None,
    *,
    alpha: float = 0.0,
    samples: int | None = None,
    batches: int = 10,
    overdamping: float = 0.05,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, PrimitiveReport]:
    """e^{-A s} from the device's lagged second moments: A (n, n), symmetric or not, s > 0.

    A + alpha I must have eigenvalues of positive real part (a stable drift); the result is
    e^{alpha s} e^{-(A + alpha I) s}, so a shift alpha (thermox's regulariser) lets any A through at
    the price of an error multiplied by e^{alpha s}.  The driver loads a = (A + alpha I) / s_A
    (non-symmetric A as ``load_matrix(A, symmetric=False)``) with zero input, sets the noise so the
    cells fill 90 % of the ADC at +- 5 sd, and records the sums of x_{k+L} x_k^T and x_k x_k^T over
    the window (RUN's record_lags = (0, L), READ_LAGGED).  At equilibrium C(L) = e^{-M L Delta} Sigma,
    so on RC cells

        E = C(L) C(0)^-1 = e^{-(A + alpha I) s}     with L Delta = s s_A,

    Delta = 1 / adc.sample_rate the conversion period (tau); L is the fewest conversions for which
    s_A = L Delta / s is at least max|A| / g_max.  Oscillator cells: a = gamma R - m R^2 and the host
    factor, as the module says (L the fewest with m rho(R) / gamma <= ``overdamping`` and max|a| <= g_max).

    t: the window in tau (default 4000 tau_c, tau_c = L Delta / (lambda_min s) the correlation time of
    the slowest mode; or ``samples`` lags of s, thermox's num_samples at dt = s: t = samples L Delta),
    split into ``batches`` runs (10) after a burn-in of 10 tau_c.  Bias: O(tau_c / t) from the ratio
    and the centring, e^{-20} from the burn-in, the device's own errors (mismatch, quantisation: about
    their size on spu-8 or spu-8-lc), on oscillator cells about ``overdamping`` times their mismatch.
    Variance: each entry's standard error falls as sqrt(2 tau_c / t) (times |E| and the conditioning
    of Sigma); the report states it from batch means.  Cost: O(n^3) on the host (eigenvalues, for the
    stability check; with the report, O(batches n^3) for its error); on the device, analog time
    t + 10 tau_c, stepped at O(n^2) per integrator step plus O(n^2) per conversion and lag, or, where
    the exact engine draws the lagged sums in closed form (a symmetric A on the ideal preset), O(n^3)
    per run whatever t.

    ``return_report`` also returns a :class:`PrimitiveReport`.  Raises InvalidInputError before any
    device call for a non-square or non-finite A, an unstable A + alpha I, s or t not positive, a lag
    over the device's recording memory, or a device whose noise cannot suit the problem;
    SaturationError when the cells clip at every noise level tried.  The previous noise level (and
    damping) is restored; the loaded matrix is the scaled A + alpha I.
    """
    A = dev._checked_matrix(A, symmetric=False)
    n = A.shape[0]
    s = _checked_positive(s, "s")
    alpha = real(alpha, "alpha", "a number")
    if not math.isfinite(alpha):
        raise InvalidInputError(f"alpha = {alpha!r} must be finite")
    batches = _checked_batches(batches)
    overdamping = _checked_overdamping(overdamping)
    B = A + alpha * np.eye(n)
    values = _stable(
        B, "A + alpha I", lambda: f"pass alpha > {alpha - float(_eigenvalues(B).real.min()):.3g} (now {alpha:g})"
    )
    regime = _regime(dev)
    loaded, scale, lag, correction = _exponential_program(dev, B, values, s, regime, overdamping)
    _check_memory(dev, n, lag)
    lag_time = lag / dev.info.sample_rate
    correlation = lag_time / (float(values.real.min()) * s)  # e^{-r lag_time} = e^{-lambda_min s}
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise InvalidInputError(f"samples = {samples!r}: pass a positive integer (the window in lags of s)")
        if t is not None:
            raise InvalidInputError(f"pass t (tau) or samples (lags of s), not both: t = {t!r}, samples = {samples}")
        t = samples * lag_time
    window = _window(t, _DEFAULT_SPANS * correlation, "t")
    batches, per_batch = _batch_plan(dev, window, batches, _MIN_LAGS_PER_BATCH * lag_time)
    burn_in = min(_BURN_SPANS * correlation, dev.info.max_run_time - per_batch)
    moments, kappa = _measure(dev, loaded, scale, regime, correlation, batches, per_batch, burn_in, (0, lag))
    runs, lagged, lagged_pairs, zero, zero_pairs, means, samples = moments
    estimate, error = lagged_estimate(
        lagged, lagged_pairs, zero, zero_pairs, means, samples, correction, with_error=return_report
    )
    factor = math.exp(alpha * s)
    estimate, error = factor * estimate, factor * error
    if not return_report:
        return estimate
    bias = overdamping if regime.oscillator else 0.0
    return estimate, _report(runs, window, lag, lag_time, correlation, error, bias, kappa, scale)


def expm(
    dev: Device,
    A: Any,
    s: float = 1.0,
    t: float | None = None,
    *,
    alpha: float = 0.0,
    samples: int | None = None,
    batches: int = 10,
    overdamping: float = 0.05,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, PrimitiveReport]:
    """e^{A s} = expnegm(dev, -A, s, ...): A (n, n) with eigenvalues of negative real part.

    With a shift alpha > max Re eig(A): e^{A s} = e^{alpha s} e^{-(alpha I - A) s}, as thermox's
    expm(A, alpha) (its default alpha = 1); the error then grows by e^{alpha s}.  Everything else
    (estimator, bias, variance, cost, report, errors) as :func:`expnegm`.
    """
    A = dev._checked_matrix(A, symmetric=False)
    return expnegm(
        dev, -A, s, t, alpha=alpha, samples=samples, batches=batches, overdamping=overdamping,
        return_report=return_report,
    )  # fmt: skip


def lyapunov(
    dev: Device,
    A: Any,
    d: Any,
    t: float | None = None,
    *,
    batches: int = 10,
    overdamping: float = 0.05,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, PrimitiveReport]:
    """Sigma (n, n) solving A Sigma + Sigma A^T = diag(d), from the device's stationary covariance.

    A (n, n), symmetric or not, with eigenvalues of positive real part (the drift of dx = -A x dt +
    noise; scipy's solve_continuous_lyapunov(A, diag(d)) solves the same equation); d (n,) > 0.
    With D = diag(sqrt(d)) the similar drift A' = D^-1 A D has A' S + S A'^T = I for S = D^-1 Sigma D^-1,
    so one noise level serves any d (the spec's noise source has one level, noise.kappa0: no per-cell
    SET_NOISE is needed).  The driver loads a = A' / s_A (s_A = max|A'| / g_max, larger on oscillator
    cells to keep them overdamped), zero input and noise kappa, and records the covariance over the
    window; at equilibrium a Sigma_V + Sigma_V a^T = 2 kappa I, so S = Sigma_V / (2 kappa s_A) and
    Sigma = D S D.

    t: the window in tau (default 4000 tau_c, tau_c = s_A / min Re eig(A') the slowest correlation
    time), in ``batches`` runs (10) after a burn-in of 10 tau_c.  Bias: O(tau_c / t) (centring), the
    device's own errors (on spu-8: mismatch of C and a, a few per cent), on oscillator cells about
    ``overdamping``.  Variance: entry (i, j) has variance about (S_ii S_jj + S_ij^2) 2 tau_c / t
    (times d_i d_j); the report's error is its batch-means estimate.  Cost: O(n^3) on the host (the
    stability check), analog time t + 10 tau_c, O(n^2) per step and per conversion on the device.

    Raises InvalidInputError before any device call for a non-square or non-finite A, an unstable A,
    d of the wrong shape or not positive, or a device whose noise cannot suit the problem.
    """
    A = dev._checked_matrix(A, symmetric=False)
    n = A.shape[0]
    try:
        d = np.asarray(d, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"d could not be read as an array of numbers: {exc}") from None
    if d.shape != (n,):
        raise InvalidInputError(f"d must have shape ({n},) to match A of shape {A.shape}, got {d.shape}")
    if not np.all(np.isfinite(d)) or not np.all(d > 0.0):
        worst = int(np.argmin(np.where(np.isfinite(d), d, -np.inf)))
        raise InvalidInputError(
            f"d must be finite and positive (the noise intensities of diag(d)); d[{worst}] = {d[worst]!r}"
        )
    batches = _checked_batches(batches)
    overdamping = _checked_overdamping(overdamping)
    root = np.sqrt(d)
    similar = A * (root[None, :] / root[:, None])  # D^-1 A D
    values = _stable(A, "A", lambda: "lyapunov needs a stable drift (negate A if it is stable in the other convention)")
    regime = _regime(dev)
    scale = float(np.abs(similar).max()) / dev.info.g_max
    if regime.oscillator:  # overdamped: m rho(a) / gamma^2 <= overdamping, rho(a) = rho(A) / s_A
        scale = max(scale, float(np.abs(values).max()) * regime.mass / (overdamping * regime.time_factor**2))
    correlation = scale * regime.time_factor / float(values.real.min())
    window = _window(t, _DEFAULT_SPANS * correlation, "t")
    batches, per_batch = _batch_plan(dev, window, batches, _MIN_LAGS_PER_BATCH / dev.info.sample_rate)
    burn_in = min(_BURN_SPANS * correlation, dev.info.max_run_time - per_batch)
    moments, kappa = _measure(dev, similar, scale, regime, correlation, batches, per_batch, burn_in, None)
    runs, covs, samples = moments
    pooled, error = covariance_estimate(covs, samples)
    # Sigma_V in volts^2 (readout scale 1): a Sigma_V + Sigma_V a^T = 2 kappa I with a = A' / s_A, so
    # S = Sigma_V / (2 kappa s_A), Sigma = D S D
    unit = np.outer(root, root) / (2.0 * kappa * scale)
    estimate = pooled * unit
    estimate = 0.5 * (estimate + estimate.T)
    error = error * unit
    if not return_report:
        return estimate
    bias = overdamping if regime.oscillator else 0.0
    return estimate, _report(runs, window, 0, 0.0, correlation, error, bias, kappa, scale)


def _check_memory(dev: Device, n: int, lag: int) -> None:
    """InvalidInputError when lags (0, lag) for n cells would not fit the device's recording memory."""
    need = lagged_module.recording_values(2, lag, n)
    if need > lagged_module.RECORDING_VALUES:
        raise InvalidInputError(
            f"the lag of {lag} ADC conversions ({lag / dev.info.sample_rate:.4g} tau) for n = {n} needs {need} values"
            f" of the device's recording memory, over its {lagged_module.RECORDING_VALUES}: use a smaller s (the lag"
            " grows with s max|A|), or compute e^{-A s} as (e^{-A s / k})^k"
        )


def _measure(dev, matrix, scale, regime, correlation, batches, per_batch, burn_in, lags):
    """Load ``matrix`` at ``scale`` (readout in volts), set the damping and a noise level that fills the
    ADC, and run the batches; a run that clips is repeated at a quarter of the noise.  The previous noise
    level and damping are restored.  Returns (what _run_batches returns, kappa)."""
    n = matrix.shape[0]
    per_kappa = _spread_per_kappa(matrix, scale)
    kappa = _noise_level(dev, per_kappa) if per_kappa is not None else None
    if kappa is None and dev.info.kappa0_max <= 0.0:
        kappa = _noise_level(dev, 1.0)  # the fixed source's own level; no pilot
    symmetric = bool(np.abs(matrix - matrix.T).max() <= SYMMETRY_RTOL * float(np.abs(matrix).max()))
    # every argument is checked: the device is touched from here on
    with _DampingRestored(dev, regime), _NoiseRestored(dev) as noise:
        dev.load_matrix(matrix, symmetric=symmetric, scale=scale)
        if kappa is None:
            trial = 0.01 * dev.info.kappa0_max
            noise.set(trial)
            pilot = min(dev.info.max_run_time, 50.0 * correlation)
            kappa = _noise_level(dev, _pilot_spread(dev, n, scale, trial, pilot))
        for _ in range(_MAX_TRIES):
            noise.set(kappa)
            dev.load_vector(np.zeros(n), scale=scale)
            moments = _run_batches(dev, batches, per_batch, burn_in, lags)
            if moments is not None:
                return moments, kappa
            kappa /= _STEP_DOWN
    raise SaturationError(
        f"the cells clipped at every noise level tried, down to kappa0 = {kappa * _STEP_DOWN:.3g} V^2;"
        " the matrix is probably not stable on this device (its mismatch moved an eigenvalue)"
    )


def _run_batches(dev: Device, batches: int, per_batch: float, burn_in: float, lags: tuple[int, ...] | None):
    """Run the batches back to back (each continues from the last one's state); None when one clipped.

    lags: record (0, L) lagged sums (READ_LAGGED); None: record the covariance (READ_COV).
    Returns (runs, lagged, lagged_pairs, zero, zero_pairs, means, samples) or (runs, covs, samples)."""
    runs: list[RunReport] = []
    lagged, lagged_pairs, zero, zero_pairs, means, covs, samples = [], [], [], [], [], [], []
    for b in range(batches):
        head = burn_in if b == 0 else 0.0
        if lags is None:
            report = dev.run(head + per_batch, head, on_saturation="flag", record_cov=True)
        else:
            report = dev.run(head + per_batch, head, on_saturation="flag", record_lags=lags)
        runs.append(report)
        if report.saturated or report.adc_clipped:
            return None
        samples.append(report.samples)
        if lags is None:
            covs.append(dev.read_cov())
            continue
        moments = dev.read_lagged()
        zero.append(moments.sums[0])
        zero_pairs.append(moments.pairs[0])
        lagged.append(moments.sums[1])
        lagged_pairs.append(moments.pairs[1])
        means.append(moments.mean)
    samples = np.asarray(samples, dtype=np.float64)
    if lags is None:
        return tuple(runs), np.stack(covs), samples
    return (
        tuple(runs),
        np.stack(lagged),
        np.asarray(lagged_pairs, dtype=np.float64),
        np.stack(zero),
        np.asarray(zero_pairs, dtype=np.float64),
        np.stack(means),
        samples,
    )


def _report(
    runs: tuple[RunReport, ...], window: float, lag: int, lag_time: float, correlation: float, error: np.ndarray,
    bias: float, kappa: float, matrix_scale: float,
) -> PrimitiveReport:  # fmt: skip
    return PrimitiveReport(
        analog_time=sum(run.analog_time for run in runs),
        window=window,
        lag=lag,
        lag_time=lag_time,
        batches=len(runs),
        effective_samples=window / (2.0 * correlation),
        error=error,
        error_norm=float(np.linalg.norm(error)),
        regime_bias=bias,
        kappa0=kappa,
        matrix_scale=matrix_scale,
        runs=runs,
    )
