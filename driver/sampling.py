"""Gaussian sampling and matrix inversion through the second moments of an SPU.

The two demonstrations of the 8-cell prototype (Melanson et al., arXiv 2312.04836).
At equilibrium the node voltages of either cell kind are Gaussian,

    V ~ N(a^-1 u, kappa a^-1)      (RC: DESIGN 4.1; oscillator: 4.2, the same x marginal)

with a = P / s_A the programmed matrix (P in the user's units, s_A the element scale),
u = b / s_b the DAC inputs and kappa the injected noise level.  Reading V in user units
x = r V, r = s_b / s_A, gives x ~ N(s_A r a^-1 u / ..., r^2 kappa s_A P^-1): choosing
the noise kappa = 1 / (r^2 s_A) and b = P mu makes the device draw exactly N(mu, P^-1) in
the user's units, whatever readout scale r suits the converters.  So

- :func:`sample_gaussian` programs the precision P = cov^-1 and b = P mean, picks r so
  that mean +- 5 sd fills 90 % of the ADC (within the DAC range and the noise source's
  full scale), sets kappa, and keeps snapshots far enough apart to be nearly independent;
- :func:`inv` programs A as the precision with mean 0 and reads the on-device covariance
  accumulator: A^-1 = cov(x).

Both need a noise source that can be turned up (``dev.info.kappa0_max > 0``; SET_NOISE),
or a fixed one whose level happens to suit the problem.  The Johnson noise of the parts
(k_B T gtot / C0, about 1e-11 V^2 on the shipped boards) is neglected beside kappa.
Element mismatch, quantisation, offsets and converter errors act as on any run: on a
board like ``spu-8`` or ``spu-8-lc`` they bias the result by about their own size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .device import SYMMETRY_RTOL, Device, RunReport
from .errors import InvalidInputError, SaturationError
from .ranging import SettlingWarning, slowest_rate

__all__ = ["SamplingReport", "sample_gaussian", "inv", "lag_correlation"]

# sample_gaussian: mean +- _Z sd within _FILL of the ADC's full scale (the rails, if lower)
_Z = 5.0
_FILL = 0.9
# inv: the same margin; the pilot run that measures the spread takes this fraction of t
_PILOT_FRACTION = 0.125
_STEP_DOWN = 16.0
_MAX_TRIES = 8
# a sample must be at least this many LSB wide, or the ADC's rounding dominates it
_MIN_SD_LSB = 2.0
# the most values (n x d) one sample_gaussian call returns: the device's snapshot buffer
# (PROTOCOL.md, RUN's record_samples: k n <= 2^25), 256 MiB of float64 on the host
MAX_SAMPLE_VALUES = 1 << 25


@dataclass(frozen=True)
class SamplingReport:
    """How :func:`sample_gaussian` drew its samples.

    spacing: analog time between consecutive samples (tau), a multiple of the ADC period;
    burn_in: analog time run before the first sample (tau); lag_correlation: the largest
    |autocorrelation| of any mode of the nominal array at a lag of one spacing or more;
    effective_samples: effective sample size of the samples' mean in the worst mode,
    n / (1 + 2 sum_j (1 - j / n) rho(j spacing)); kappa0: the injected noise level used
    (volts^2); readout_scale: user units per volt; runs: the RunReports (one per run; a long
    draw is split to respect the device's max_run_time).
    """

    spacing: float
    burn_in: float
    lag_correlation: float
    effective_samples: float
    kappa0: float
    readout_scale: float
    runs: tuple[RunReport, ...]

    @property
    def analog_time(self) -> float:
        """Total analog time of the draw, tau."""
        return sum(run.analog_time for run in self.runs)


def lag_correlation(kind: str, stiffness: np.ndarray, lag: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Stationary autocorrelation of the node voltage of each mode at the given lags, (modes, lags).

    kind "rc": a mode of stiffness k (eigenvalue of a, unit capacitance) decays as e^{-k s}.
    kind "oscillator": a mode of stiffness k, mass m = l (the spec's inductance, unit
    capacitance) and damping gamma (the spec's damping) follows x'' + (gamma / m) x' + (k / m) x = 0
    from x = 1, x' = 0: (l1 e^{-l2 s} - l2 e^{-l1 s}) / (l1 - l2) with l1, l2 the roots of
    l^2 - (gamma / m) l + k / m (complex when underdamped; (1 + l s) e^{-l s} when critical).
    Nominal parts: mismatch moves these by its own few per cent.
    """
    k = np.asarray(stiffness, dtype=np.float64)[:, None]
    s = np.asarray(lag, dtype=np.float64)[None, :]
    if kind != "oscillator":
        return np.exp(-k * s)
    osc = spec.get("oscillator", {})
    mass = float(osc.get("inductance", 1.0))
    half_rate = float(osc.get("damping", 2.0)) / (2.0 * mass)
    root = np.sqrt((half_rate**2 - k / mass).astype(np.complex128))
    l1, l2 = half_rate + root, half_rate - root
    near = np.abs(root) < 1e-6 * half_rate  # critical damping: the limit of the general form
    with np.errstate(invalid="ignore", divide="ignore"):
        general = (l1 * np.exp(-l2 * s) - l2 * np.exp(-l1 * s)) / (l1 - l2)
    critical = (1.0 + half_rate * s) * np.exp(-half_rate * s)
    return np.where(near, critical, general.real)


def _envelope(kind: str, stiffness: np.ndarray, lag: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A decreasing bound of |lag_correlation| per mode (max over all lags >= each lag), (modes, lags)."""
    rho = np.abs(lag_correlation(kind, stiffness, lag, spec))
    return np.maximum.accumulate(rho[:, ::-1], axis=1)[:, ::-1]


def _spacing(dev: Device, stiffness: np.ndarray, max_correlation: float) -> tuple[int, float]:
    """(stride in ADC conversions, worst |correlation| at that lag and beyond) for independent-enough samples."""
    period = 1.0 / dev.info.sample_rate
    spec = dev.info.spec
    horizon = 50.0 / slowest_rate(dev.info.cell_kind, stiffness, spec)  # every envelope is below 1e-19 there
    strides = np.unique(np.ceil(np.geomspace(1.0, max(horizon / period, 2.0), 400)).astype(np.int64))
    env = _envelope(dev.info.cell_kind, stiffness, strides * period, spec).max(axis=0)
    ok = np.nonzero(env <= max_correlation)[0]
    stride = int(strides[ok[0]]) if ok.size else int(strides[-1])
    worst = float(_envelope(dev.info.cell_kind, stiffness, np.array([stride * period]), spec).max())
    return stride, worst


def _effective_samples(dev: Device, stiffness: np.ndarray, n: int, spacing: float) -> float:
    """n / (1 + 2 sum_{j<n} (1 - j/n) rho(j spacing)), worst (smallest) over the modes."""
    lags = np.arange(1, min(n, 10_000))
    if lags.size == 0:
        return float(n)
    rho = lag_correlation(dev.info.cell_kind, stiffness, lags * spacing, dev.info.spec)
    factor = 1.0 + 2.0 * (rho * (1.0 - lags / n)).sum(axis=1)
    return float(n / factor.max())


def _limit_v(dev: Device) -> float:
    """Largest node voltage the readout can take: the ADC's full scale, or the rails when lower."""
    limit = dev.info.adc_range_v
    return min(limit, dev.info.rail_v) if dev.info.rail_v is not None else limit


def _lsb_v(dev: Device) -> float:
    bits = dev.info.adc_bits
    return dev.info.adc_range_v / ((1 << (bits - 1)) - 1) if bits > 0 else 0.0


def _noise_for(dev: Device, matrix_scale: float, readout_low: float, what: str) -> tuple[float, float]:
    """(kappa, readout scale r) with kappa = 1 / (r^2 s_A) and r >= readout_low, r as small as the noise
    source allows.  A fixed source forces r; raises InvalidInputError when that r is below readout_low."""
    if dev.info.kappa0_max > 0.0:
        r = max(readout_low, 1.0 / math.sqrt(dev.info.kappa0_max * matrix_scale))
        return 1.0 / (r * r * matrix_scale), r
    kappa = dev.info.kappa0
    if kappa <= 0.0:
        raise InvalidInputError(
            f"{dev.info.name} has no noise to sample with (kappa0 = 0 and noise.kappa0_max = 0);"
            " use a device whose noise source can be turned up (kappa0_max > 0), such as spu-8-lc"
        )
    r = 1.0 / math.sqrt(kappa * matrix_scale)
    if r < readout_low * (1.0 - 1e-12):
        raise InvalidInputError(
            f"the noise of {dev.info.name} is fixed at kappa0 = {kappa:g} V^2, which would spread {what} over"
            f" {readout_low / r:.3g} times the converters' range; scale the problem down by that factor squared,"
            " or use a device whose noise source can be turned up (kappa0_max > 0)"
        )
    return kappa, r


def _check_spd(matrix: np.ndarray, what: str) -> np.ndarray:
    """Symmetric (to round-off) and positive definite, else InvalidInputError; returns its Cholesky factor."""
    biggest = float(np.abs(matrix).max())
    asym = np.abs(matrix - matrix.T)
    where = np.unravel_index(int(np.argmax(asym)), asym.shape)
    if asym[where] > SYMMETRY_RTOL * biggest:
        raise InvalidInputError(
            f"{what} must be symmetric positive definite: max |C - C.T| = {asym[where]:.3g} at"
            f" {tuple(map(int, where))}; symmetrise it, (C + C.T) / 2"
        )
    try:
        return np.linalg.cholesky(0.5 * (matrix + matrix.T))
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh(0.5 * (matrix + matrix.T))[0])
        raise InvalidInputError(
            f"{what} must be symmetric positive definite; its smallest eigenvalue is {smallest:.3g}"
            " (a covariance of a non-degenerate Gaussian has only positive eigenvalues)"
        ) from None


def _as_array(value: Any, what: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} could not be read as an array of numbers: {exc}") from None
    if array.ndim != ndim:
        raise InvalidInputError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{what} has NaN or infinite entries; pass finite values")
    return array


def _check_fits(dev: Device, d: int, what: str) -> None:
    if d > dev.info.cells:
        raise InvalidInputError(
            f"{what} has dimension {d}, more than the {dev.info.cells} cells of {dev.info.name};"
            " use a larger device spec or a smaller problem"
        )


def sample_gaussian(
    dev: Device,
    mean: Any,
    cov: Any,
    n: int,
    *,
    max_correlation: float = 0.05,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, SamplingReport]:
    """Draw n samples of N(mean, cov) from the device, in the user's units.  Shape (n, d).

    mean (d,), cov (d, d) symmetric positive definite, d <= cells, on either cell kind.
    Programs the precision P = cov^-1 (scaled to the element codes) and b = P mean, and a
    readout scale and noise level (SET_NOISE) that put mean +- 5 sd within 90 % of the
    ADC's full scale, within the DAC range and the noise source's full scale; the previous
    noise level is restored afterwards.  Then runs with a snapshot buffer.

    Spacing: samples are spacing = stride / sample_rate tau apart, the smallest multiple of
    the ADC period after which every mode's autocorrelation stays below max_correlation
    (0.05) for the nominal parts: about 3 / lambda_min(a) on an RC array, and about
    3 sqrt(m / lambda_min) at critical damping of the slowest mode on an oscillator array
    (longer when it is far over- or underdamped).  The first sample comes after
    burn_in = 4 spacings (the initial state's influence below 0.05^4 of it, envelope).
    Effective sample size: the samples' mean has the variance of about
    effective_samples >= n (1 - rho) / (1 + rho) independent draws, rho = max_correlation,
    i.e. >= 0.9 n; ``return_report=True`` also returns a :class:`SamplingReport` with the
    spacing, burn-in, the worst lag correlation and the effective sample size.

    Cost: O(d^3) on the host (the precision and its eigenvalues), and analog time
    burn_in + n spacing, run by the transient engine (a recording run steps),
    O(d^2) per step.  Raises InvalidInputError for a cov that is not symmetric positive
    definite, d above the cell count, n < 1, n d above MAX_SAMPLE_VALUES (2^25, the device's
    snapshot buffer), or a device whose noise cannot suit the problem.
    """
    mean = _as_array(mean, "mean", 1)
    cov = _as_array(cov, "cov", 2)
    d = mean.shape[0]
    if cov.shape != (d, d) or d == 0:
        raise InvalidInputError(f"cov must be ({d}, {d}) to match mean of shape {mean.shape}, got {cov.shape}")
    _check_fits(dev, d, "the Gaussian")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInputError(f"n = {n!r} samples: pass a positive integer")
    if n * d > MAX_SAMPLE_VALUES:
        raise InvalidInputError(
            f"n = {n} samples of dimension {d} is {n * d} values, over the limit of {MAX_SAMPLE_VALUES}"
            f" (2^25: the device's snapshot buffer, 256 MiB of float64): pass n <= {MAX_SAMPLE_VALUES // d}"
            " and draw more in further calls"
        )
    if not 0.0 < max_correlation < 1.0:
        raise InvalidInputError(f"max_correlation = {max_correlation!r} must be in (0, 1)")
    factor = _check_spd(cov, "cov")
    identity = np.eye(d)
    inverse_factor = np.linalg.solve(factor, identity)
    precision = inverse_factor.T @ inverse_factor
    precision = 0.5 * (precision + precision.T)
    b = precision @ mean

    matrix_scale = dev.matrix_scale(precision)
    stiffness = np.linalg.eigvalsh(precision) / matrix_scale
    sd = np.sqrt(np.diag(cov))
    limit = _FILL * _limit_v(dev)
    readout_low = max(
        float(np.max(np.abs(mean) + _Z * sd)) / limit,  # fill
        float(np.max(np.abs(b))) / (matrix_scale * dev.info.dac_range_v),  # DAC range: |b| / (r s_A) <= range
    )
    kappa, readout = _noise_for(dev, matrix_scale, readout_low, "the samples")
    lsb = _lsb_v(dev)
    narrowest = float(sd.min())
    if lsb > 0.0 and narrowest / readout < _MIN_SD_LSB * lsb:
        raise InvalidInputError(
            f"the coordinate with the smallest spread (sd {narrowest:.3g}) would span {narrowest / readout / lsb:.2g}"
            f" LSB of the {dev.info.adc_bits}-bit ADC, so rounding would dominate it: the sds of cov (and |mean|)"
            " range too widely for these converters; sample a rescaled problem and scale back"
        )
    stride, worst = _spacing(dev, stiffness, max_correlation)
    period = 1.0 / dev.info.sample_rate
    spacing = stride * period
    burn_conversions = 4 * stride
    if int((dev.info.max_run_time / period - burn_conversions - 1.0) // stride) < 1:  # the first run is the longest
        raise InvalidInputError(
            f"one sample needs {(burn_conversions + stride) * period:g} tau, more than the device's max_run_time"
            f" {dev.info.max_run_time:g}; raise max_correlation or condition cov better"
        )
    dev.load_matrix(precision, scale=matrix_scale)
    previous = dev.noise_level
    runs: list[RunReport] = []
    chunks: list[np.ndarray] = []
    try:
        if dev.info.kappa0_max > 0.0:
            dev.set_noise(kappa)
        dev.load_vector(b, scale=readout * matrix_scale)
        left = int(n)
        first = True
        while left:
            head = burn_conversions if first else 0
            room = int((dev.info.max_run_time / period - head - 1.0) // stride)
            k = min(left, room)
            t = (head + k * stride + 0.5) * period
            report = dev.run(t, head * period, on_saturation="flag", record_samples=k, sample_stride=stride)
            runs.append(report)
            chunks.append(dev.read_samples(k))
            left -= k
            first = False
    finally:
        if dev.info.kappa0_max > 0.0 and dev.noise_level != previous:
            dev.set_noise(previous)
    samples = np.concatenate(chunks)
    if not return_report:
        return samples
    return samples, SamplingReport(
        spacing=spacing,
        burn_in=burn_conversions * period,
        lag_correlation=worst,
        effective_samples=_effective_samples(dev, stiffness, int(n), spacing),
        kappa0=kappa,
        readout_scale=readout,
        runs=tuple(runs),
    )


def inv(
    dev: Device,
    A: Any,
    t: float = 2000.0,
    burn_in: float | None = None,
    *,
    return_report: bool = False,
) -> np.ndarray | tuple[np.ndarray, RunReport]:
    """A^-1 from the device's covariance: A symmetric positive definite (n, n), n <= cells.

    Loads A as the precision with zero input, so the cells settle to N(0, kappa a^-1),
    a = A / s_A, and reads the on-device covariance accumulator over the window
    (burn_in, t] (default burn_in = t / 10): with the noise level kappa and readout
    scale r = 1 / sqrt(kappa s_A), the covariance in user units is A^-1 itself.
    The noise level that suits the converters is found like solve's auto-ranging: a
    pilot run of t / 8 (noise lowered 16-fold while it clips) measures the spread, and
    kappa is set so that the widest cell spans +-5 sd within 90 % of the ADC; a run that
    still clips is repeated at a quarter of the noise.  The previous level is restored.

    Accuracy: entry (i, j) has variance about (S_ii S_jj + S_ij^2) 2 tau_c / (t - burn_in),
    S = A^-1 and tau_c the correlation time of the modes involved (1 / (k_i + k_j) for
    modes of stiffness k on an RC array, so the slowest mode, k = lambda_min(A) / s_A,
    dominates; oscillators at good damping decorrelate faster, in about
    sqrt(m / lambda_min) tau).  So choose t of a few hundred correlation times for a few
    per cent; on a board with mismatch and quantisation that bias is added.
    ``return_report`` also returns the RunReport of the run whose covariance is returned.
    Raises InvalidInputError (shape, symmetry, size) and SaturationError when no noise
    level runs cleanly (A not positive definite).  Cost O(n^2) per step of the transient
    engine over the analog time 1.125 t (recording runs step).
    """
    # every argument is checked before the first device call, so a refused call changes nothing
    t = dev._checked_run(t, 0.0)[0]
    t, burn_in = dev._checked_run(t, 0.1 * t if burn_in is None else burn_in)
    A = dev._checked_matrix(A)
    n = A.shape[0]
    _check_fits(dev, n, "matrix A")
    matrix_scale = dev.matrix_scale(A)
    limit = _FILL * _limit_v(dev)
    programmable = dev.info.kappa0_max > 0.0
    # first guess: the spread if A^-1 had diagonal 1 / A_ii (a lower bound of (A^-1)_ii)
    guess = float(np.max(1.0 / np.clip(np.diag(A), 1e-300, None)))
    kappa, readout = _noise_for(dev, matrix_scale, _Z * math.sqrt(guess) / limit, "the cells")
    dev.load_matrix(A, scale=matrix_scale)
    previous = dev.noise_level
    zeros = np.zeros(n)
    try:
        if programmable:
            pilot = _PILOT_FRACTION * t
            for _ in range(_MAX_TRIES):
                dev.set_noise(kappa)
                dev.load_vector(zeros, scale=readout * matrix_scale)
                report = dev.run(pilot, 0.25 * pilot, on_saturation="flag", record_cov=True)
                if not (report.saturated or report.adc_clipped):
                    break
                kappa /= _STEP_DOWN
                readout *= math.sqrt(_STEP_DOWN)
            else:
                raise SaturationError(
                    f"the array clipped at every noise level down to kappa0 = {kappa * _STEP_DOWN:.3g} V^2 with zero"
                    " input; A is probably not positive definite (check its eigenvalues)"
                )
            # in user units the spread is that of A^-1 whatever the readout r; in volts it is spread / r
            with warnings.catch_warnings():  # the pilot's mean only bounds the spread: its transient is fine
                warnings.simplefilter("ignore", SettlingWarning)
                spread = _Z * np.sqrt(np.clip(np.diag(dev.read_cov()), 0.0, None)) + np.abs(dev.read_mean())
            if float(spread.max()) > 0.0:
                readout = max(float(spread.max()) / limit, 1.0 / math.sqrt(dev.info.kappa0_max * matrix_scale))
                kappa = 1.0 / (readout * readout * matrix_scale)
        best: tuple[np.ndarray, RunReport] | None = None
        for _ in range(_MAX_TRIES if programmable else 1):
            if programmable:
                dev.set_noise(kappa)
            dev.load_vector(zeros, scale=readout * matrix_scale)
            report = dev.run(t, burn_in, on_saturation="flag", record_cov=True)
            if report.saturated or report.adc_clipped:
                kappa /= 4.0
                readout *= 2.0
                continue
            best = (dev.read_cov(), report)
            break
    finally:
        if programmable and dev.noise_level != previous:
            dev.set_noise(previous)
    if best is None:
        raise SaturationError(
            "the array clipped at every noise level tried; A is probably not positive definite"
            " (check its eigenvalues), or the device's noise cannot be turned down far enough"
        )
    return best if return_report else best[0]
