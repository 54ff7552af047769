"""Self-calibration from known inputs (DESIGN 7, issue 16 item 2): ``driver.calibrate(dev)``.

What a host can see.  A dense load of element codes c_ij realises conductances a_ij = c_ij w E_ij
(w = g_max / code_max volts-free unit, E_ij the element's fixed mismatch); cell i is driven by its
DAC, u_i = g_dac,i u_nom,i + o_dac,i, through gin_i, carries an op-amp offset v_os,i that enters
with the cell's total conductance gtot_i = sum_j |a_ij| + gin_i, and is read by its ADC,
r_i = g_adc,i V_i + o_adc,i.  At equilibrium a V = gin u + gtot v_os, so with G = gin g_dac and
D = g_adc (diagonal)

    a_eff (r - o_adc) = u_nom + s + R q,      a_eff = G^-1 a D^-1,  R_i = sum_j |a_ij|,
    s = (o_dac + v_os) / g_dac,   q = v_os / (gin g_dac).

Identifiability (what input/output access can and cannot separate):

* a_eff is fully identifiable: probing a known calibration matrix column by column gives
  a_eff^-1.  So is the combined trim K_ij = a_eff,ij / (c_ij w) = E_ij / (G_i D_j), which is all
  a load needs: codes c_ij = A_ij / (s w K_ij) make the device solve A exactly (to the element LSB).
* E, G and D are not separately identifiable: a row scaling P and column scaling Q, E -> P E Q,
  G -> P G, D -> D Q, leave every mean reading unchanged.  ``calibrate`` fixes the gauge so that
  log E has zero mean over every row and every column and reports ``input_gain`` = G_i exp(d - e_i.)
  and ``adc_gain`` = D_j exp(e - e_.j - d) (e_i., e_.j, e: row, column and grand means of log E;
  d: the mean of log D).  With i.i.d. element mismatch sigma these carry the row (column) mean of
  that mismatch, sigma / sqrt(n) (spu-8: 0.35 %), which is larger than the ADC's 0.1 % gain error:
  the ADC gain is not recoverable, the 1 % input gain (gin) mostly is.  None of this limits a solve,
  which needs only K.
* gin and the DAC gain enter only as their product G ("input_gain"); the DAC offset and v_os enter
  the input-referred offset s only as their sum over g_dac.
* o_adc and v_os are separable only through off-diagonal couplings: v_os enters with |a_ij| (the
  cell's noise gain), o_adc with the signed a_ij.  Diagonal matrices alone cannot tell them apart
  (both shift r by a constant), so the offsets are fitted over zero-input runs of a diagonal matrix
  at two levels and of dI + cS and dI - cS (S a fixed sign pattern): 4n readings, 3n unknowns
  (o_adc, s, q), least squares.  v_os = q G and o_dac = s - v_os then follow up to the unidentifiable
  factors (gin, g_dac: 1 % and 0.1 %) of an offset, far inside the 20 % this is checked to.
* The capacitances, inductances and damping set only the dynamics, never a mean: not measured.

GGN (structured) loads get the per-cell corrections (ADC offset on reads, the input-referred offset
s on vectors) but no element trims: their element mismatch is i.i.d. per element, so per-row or
per-column trims would remove only 1/N of its variance; the J and J^T arrays are programmed from one
code array, so a column trim cannot cancel G and D apart; and the damping diagonal is one code for
every cell.  Covariances (``read_cov``, ``linalg.inv``) are not corrected: their gain is
D a^-1 D = a_eff^-1 G^-1 D, which needs G and D apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import ranging
from .codes import Quantised, code_max, from_codes, to_codes
from .errors import InvalidInputError, SaturationError, SpuError

if TYPE_CHECKING:  # the device imports this module for its hooks
    from .device import Device, DeviceTime

__all__ = ["Calibration", "CalibrationError", "calibrate", "CORRECTED_EFFECTS"]

# spec overrides that turn off every effect a calibration corrects: a device opened with them shows the floor a
# calibration can reach (quantisation and noise are what is left); tests and benchmarks/bench_precision.py use it
CORRECTED_EFFECTS: dict[str, float] = {
    "coupling.mismatch": 0.0,
    "coupling.input_conductance_mismatch": 0.0,
    "dac.gain_error": 0.0,
    "adc.gain_error": 0.0,
    "dac.offset_v": 0.0,
    "adc.offset_v": 0.0,
    "cell.opamp_offset_v": 0.0,
}
_PATTERN_SEED = 0x5EED  # the calibration matrix's sign pattern: fixed, so every calibration probes the same loads
_LAMBDA_FRACTION = 0.5  # the calibration matrices' smallest eigenvalue, as a fraction of g_max
_FILL = 0.6  # the unit inputs drive the largest node voltage to about this fraction of the smaller limit
_TRIM_LIMIT = 0.5  # |log K| beyond this: a part far outside any tolerance (dead or shorted element)
_CONSISTENCY = 1e-2  # the two probes' diagonal trims must agree to this relative difference
_KEPT = "the device keeps the calibration it had (none if it had none)"
DEFAULT_T = 2.0e5  # tau per zero-input probe run: offsets to ~0.02 mV on spu-8 (see calibrate)
DEFAULT_CELLS = 64  # n by default: the dense block, up to 64 cells (2 n + 4 runs; pass n for more)
_UNIT_FRACTION = 0.25  # the unit-input probes run t / 4: their differences only set the trims, to ~1e-3


class CalibrationError(SpuError, RuntimeError):
    """Calibration could not be completed or its estimates fail a self-check; the device keeps the
    calibration it had before (none, if it had none) and loads as before."""


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured, for the first n cells (see the module docstring for what is identifiable).

    element_trim: (n, n) K_ij = a_eff,ij / nominal, the combined trim every dense load uses;
    element_mismatch: (n, n) E_ij in the gauge where log E has zero row and column means;
    input_gain: (n,) gin_i dac_gain_i in that gauge; adc_gain: (n,) in that gauge;
    adc_offset_v, opamp_offset_v, dac_offset_v: (n,) volts; input_offset_v: (n,) s, the
    input-referred offset (o_dac + v_os) / g_dac at zero coupling, volts; noise_gain_offset_v: (n,) q,
    volts of input-referred offset per unit of the cell's coupling sum |a_i.| (g0);
    offset_sd_v: (n, 3) standard errors of (adc offset, s, q) from the fit's residuals;
    runs, analog_time (tau), device_time: what the calibration took.
    """

    n: int
    element_trim: np.ndarray
    element_mismatch: np.ndarray
    input_gain: np.ndarray
    adc_gain: np.ndarray
    adc_offset_v: np.ndarray
    opamp_offset_v: np.ndarray
    dac_offset_v: np.ndarray
    input_offset_v: np.ndarray
    noise_gain_offset_v: np.ndarray
    offset_sd_v: np.ndarray
    runs: int
    analog_time: float
    device_time: DeviceTime

    def trims(self, m: int) -> np.ndarray:
        """K for an m x m load: the calibrated block, ones beyond it (cells not calibrated load as before)."""
        out = np.ones((m, m))
        k = min(m, self.n)
        out[:k, :k] = self.element_trim[:k, :k]
        return out

    def _per_cell(self, values: np.ndarray, m: int) -> np.ndarray:
        out = np.zeros(m)
        k = min(m, self.n)
        out[:k] = values[:k]
        return out


# -- the device's hooks: each is the plain conversion when the device is not calibrated -------------------
def natural_scale(dev: Device, A: np.ndarray) -> float:
    """max |A_ij / K_ij| / g_max: the matrix scale that puts the largest trimmed code at full scale."""
    cal = _installed(dev)
    square = A.ndim == 2 and A.shape[0] == A.shape[1] and A.size > 0
    peak = (
        float(np.abs(A / cal.trims(A.shape[0])).max())
        if cal is not None and square
        else (max(float(A.max()), -float(A.min())) if A.size else 0.0)  # max |A| without an |A| temporary
    )
    return peak / dev.info.g_max


def element_codes(dev: Device, a: np.ndarray) -> tuple[Quantised, np.ndarray]:
    """The codes of a dense load a = A / scale (g0), pre-distorted by the trims, and the row sums
    sum_j |a_ij| (g0) the offset correction of later vectors needs.  O(m^2)."""
    cal = _installed(dev)
    bits, g_max = dev.info.element_bits, dev.info.g_max
    if cal is None:
        q = to_codes(a, bits, g_max)
        return q, np.zeros(a.shape[0])
    m = a.shape[0]
    q = to_codes(a / cal.trims(m), bits, g_max)
    realised = from_codes(q.codes, bits, g_max) * _mismatch(cal, m)  # the physical conductances, nominally
    return q, np.abs(realised).sum(axis=1)


def target_codes(dev: Device, a: np.ndarray) -> np.ndarray:
    """The real-valued codes a dense load a = A / scale (g0) would round (trimmed when calibrated), for
    ``driver.mitigation``'s randomised roundings.  Continuous parts (0 bits): the values themselves."""
    cal = _installed(dev)
    trimmed = a if cal is None else a / cal.trims(a.shape[0])
    bits = dev.info.element_bits
    return trimmed * (code_max(bits) / dev.info.g_max) if bits > 0 else trimmed


def input_volts(dev: Device, u: np.ndarray, row_abs: np.ndarray | None) -> np.ndarray:
    """DAC volts to send for a wanted input u (volts): u - s - R q, the input-referred offset of the
    loaded matrix removed (R its coupling sums, zero for a GGN load).  O(n)."""
    cal = _installed(dev)
    if cal is None:
        return u
    m = u.shape[0]
    offset = cal._per_cell(cal.input_offset_v, m)
    if row_abs is not None and row_abs.shape[0] == m:
        offset = offset + row_abs * cal._per_cell(cal.noise_gain_offset_v, m)
    return u - offset


def output_codes(dev: Device, codes: np.ndarray) -> np.ndarray:
    """ADC codes (or their averages; last axis the cells) with the ADC offset removed.  O(size)."""
    cal = _installed(dev)
    if cal is None:
        return codes
    m = codes.shape[-1]
    lsb = float(from_codes(np.ones(1), dev.info.adc_bits, dev.info.adc_range_v)[0])
    return codes - cal._per_cell(cal.adc_offset_v, m) / lsb


def _installed(dev: Device) -> Calibration | None:
    return getattr(dev, "_calibration", None)


def _mismatch(cal: Calibration, m: int) -> np.ndarray:
    out = np.ones((m, m))
    k = min(m, cal.n)
    out[:k, :k] = cal.element_mismatch[:k, :k]
    return out


# -- the measurement ---------------------------------------------------------------------------------------
def calibrate(dev: Device, *, n: int | None = None, t: float | None = None) -> Calibration:
    """Measure the device's offsets, converter gains and element trims from known inputs; the driver then
    applies them to every later load and read (``dev.calibration``; ``dev.clear_calibration()`` undoes).

    Probes (all codes known; no hidden part is read): two dense calibration matrices dI +- cS
    (d = g_max, S a fixed symmetric sign pattern, c so that lambda_min = g_max / 2), each with zero
    input and a unit input on every cell in turn (column by column: a_eff^-1 e_j); and a diagonal
    matrix at g_max and g_max / 2 with zero input.  4 zero-input runs of t tau (default 2e5 tau) and 2 n
    unit-input runs of t / 4 (burn-in 30 slowest time constants), n cells (default: the dense block up to
    64; a larger block costs 2 n + 4 runs and O(n^3) here): 8 t in all for n = 8 (spu-8, tau = 10 us:
    16 s of hardware time).  Precision: a reading's mean
    has sd about sqrt(4 kappa0 tau_c / t) volts, so the probes run with the injected noise lowered to
    4 ADC LSB^2 where it is programmable and higher (enough to keep the ADC dithered; the caller's level
    is restored after), spu-8: ~0.01 mV at t = 2e5; the offsets then to ~0.01-0.02 mV, the trims to
    ~1e-3.  Host cost O(n^3).

    Returns the :class:`Calibration` and installs it on ``dev``.  Raises InvalidInputError for bad
    arguments (before any device call) and CalibrationError when a probe saturates or clips, a trim is
    implausible (|ln K| > 0.5) or the two probes disagree; the device then keeps its previous
    calibration.  Either way the last probe stays loaded: load your own matrix and vector after it.
    """
    n, t = _checked(dev, n, t)
    previous = _installed(dev)
    noise = dev.noise_level
    quiet = _quiet_noise(dev)
    dev._calibration = None  # probe through the plain conversions
    try:
        if quiet < noise:
            dev.set_noise(quiet)
        result = _measure(dev, n, t)
    except SaturationError as error:
        dev._calibration = previous
        raise CalibrationError(
            f"calibration failed: a probe saturated ({error}); the device's offsets or gains are far outside"
            f" its spec, or the rails are too close to the converter ranges; {_KEPT}"
        ) from error
    except BaseException:
        dev._calibration = previous
        raise
    finally:
        if quiet < noise and not dev.closed:
            dev.set_noise(noise)  # the level the caller had
    dev._calibration = result
    return result


def _quiet_noise(dev: Device) -> float:
    """The injected noise level to probe at: 4 ADC LSB^2 (about 2 LSB rms at unit stiffness: the ADC stays
    dithered, so the means have no rounding bias and the exact engine may run), where the source is
    programmable and the present level is higher; else the present level.  Less noise, less averaging."""
    info = dev.info
    if info.kappa0_max <= 0.0 or info.adc_bits <= 0:
        return dev.noise_level
    lsb = float(from_codes(np.ones(1), info.adc_bits, info.adc_range_v)[0])
    return min(dev.noise_level, 4.0 * lsb**2)


def _checked(dev: Device, n: Any, t: Any) -> tuple[int, float]:
    dense = dev.info.max_dense_size
    if n is None:
        n = min(dense, DEFAULT_CELLS)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InvalidInputError(f"n = {n!r} must be an integer number of cells to calibrate, 2 to {dense}")
    if not 2 <= n <= dense:
        raise InvalidInputError(
            f"n = {n} cells is outside 2 to {dense} (the dense array of {dev.info.name}); offsets need at least"
            " two coupled cells to be told apart"
        )
    if t is None:
        t = min(DEFAULT_T, dev.info.max_run_time)
    t = dev._checked_run(t, 0.0)[0]
    return int(n), t


@dataclass
class _Probe:
    """Runs the probes and keeps count."""

    dev: Device
    t: float
    burn_in: float
    runs: int = 0
    analog_time: float = 0.0

    def read(self, volts: np.ndarray, fraction: float = 1.0) -> np.ndarray:
        dev = self.dev
        dev.load_vector(volts, scale=1.0)  # volts in, volts out: vector and matrix scale 1
        report = dev.run(max(fraction * self.t, 2.0 * self.burn_in), self.burn_in, on_saturation="flag")
        self.runs += 1
        self.analog_time += report.analog_time
        if report.saturated or report.adc_clipped:
            raise SaturationError(
                f"a calibration probe {'hit a rail' if report.saturated else 'clipped the ADC'}"
                f" ({report.adc_clipped} clipped conversions)"
            )
        return dev.read_mean()


def _measure(dev: Device, n: int, t: float) -> Calibration:
    info = dev.info
    bits, g_max = info.element_bits, info.g_max
    unit = g_max / code_max(bits) if bits > 0 else 1.0
    full = code_max(bits) if bits > 0 else g_max
    pattern = _pattern(n)
    spread = float(np.abs(np.linalg.eigvalsh(pattern)).max())
    off = (1.0 - _LAMBDA_FRACTION) * full / spread
    off = max(1.0, float(np.floor(off))) if bits > 0 else off
    diagonal = np.eye(n) * full
    plus, minus = diagonal + off * pattern, diagonal - off * pattern
    half = np.eye(n) * (np.floor(full / 2) if bits > 0 else full / 2)
    lam = min(float(np.linalg.eigvalsh(m * unit)[0]) for m in (plus, minus, half))
    rate = ranging.slowest_rate(info.cell_kind, np.array([lam]), info.spec)
    burn_in = min(0.5 * t, 30.0 / rate)
    limits = [info.adc_range_v] + ([info.rail_v] if info.rail_v is not None else [])
    level = min(info.dac_range_v, _FILL * min(limits) * lam)
    step = float(from_codes(to_codes(np.array([level]), info.dac_bits, info.dac_range_v).codes, info.dac_bits, 1.0)[0])
    level = step * info.dac_range_v  # the nominal DAC volts its code stands for
    probe = _Probe(dev, t, burn_in)
    before = dev.timeline.device_time
    zeros = np.zeros(n)

    trims, zero_reads = [], {}
    for name, codes in (("plus", plus), ("minus", minus)):
        dev.load_matrix(codes * unit, scale=1.0)
        zero_reads[name] = probe.read(zeros)
        inverse = np.empty((n, n))
        for j in range(n):
            inverse[:, j] = (probe.read(level * np.eye(n)[j], _UNIT_FRACTION) - zero_reads[name]) / level
        a_eff = np.linalg.inv(inverse)
        trims.append(a_eff / (codes * unit))
    for name, codes in (("diagonal", diagonal), ("half", half)):
        dev.load_matrix(codes * unit, scale=1.0)
        zero_reads[name] = probe.read(zeros)

    k_plus, k_minus = trims
    if not (np.all(np.isfinite(k_plus)) and np.all(np.isfinite(k_minus))):
        raise CalibrationError(f"calibration failed: a probe gave non-finite readings; {_KEPT}")
    worst = float(np.max(np.abs(np.diag(k_plus) / np.diag(k_minus) - 1.0)))
    if worst > _CONSISTENCY:
        raise CalibrationError(
            f"calibration failed its self-check: the diagonal trims of the two probe matrices differ by up to"
            f" {worst:.2%} (more than {_CONSISTENCY:.0%}), so the array is not linear in its codes (drift, or a"
            f" sign-dependent element); {_KEPT}"
        )
    trim = 0.5 * (k_plus + k_minus)
    bad = np.abs(np.log(np.clip(trim, 1e-300, None))) > _TRIM_LIMIT
    if np.any(bad | (trim <= 0.0)):
        i, j = (int(v) for v in np.argwhere(bad | (trim <= 0.0))[0])
        raise CalibrationError(
            f"calibration failed: element ({i}, {j}) realises {trim[i, j]:.3g} of its nominal value through the"
            f" converters, far outside any part tolerance (a dead or shorted element?); {_KEPT}"
        )
    mismatch, input_gain, adc_gain = _gauge(trim)

    # offsets: r^k = o + a_k^-1 s + a_k^-1 diag(R_k) q over the four zero-input probes
    rows, readings = [], []
    for name, codes in (("plus", plus), ("minus", minus), ("diagonal", diagonal), ("half", half)):
        a_k = trim * codes * unit
        inv_k = np.linalg.inv(a_k)
        row_abs = np.abs(codes * unit * mismatch).sum(axis=1)
        rows.append(np.hstack([np.eye(n), inv_k, inv_k * row_abs[None, :]]))
        readings.append(zero_reads[name])
    design, observed = np.vstack(rows), np.concatenate(readings)
    solution, _, rank, _ = np.linalg.lstsq(design, observed, rcond=None)
    if rank < 3 * n:
        raise CalibrationError(f"calibration failed: the offset fit has rank {rank} of {3 * n}; {_KEPT}")
    residual = observed - design @ solution
    dof = design.shape[0] - 3 * n
    sigma2 = float(residual @ residual) / dof if dof > 0 else math.nan
    sd = np.sqrt(np.clip(np.diag(np.linalg.inv(design.T @ design)) * sigma2, 0.0, None)).reshape(3, n).T
    adc_offset, input_offset, per_gain = solution[:n], solution[n : 2 * n], solution[2 * n :]
    opamp = per_gain * input_gain
    after = dev.timeline.device_time
    from .device import DeviceTime

    return Calibration(
        n=n,
        element_trim=trim,
        element_mismatch=mismatch,
        input_gain=input_gain,
        adc_gain=adc_gain,
        adc_offset_v=adc_offset,
        opamp_offset_v=opamp,
        dac_offset_v=input_offset - opamp,
        input_offset_v=input_offset,
        noise_gain_offset_v=per_gain,
        offset_sd_v=sd,
        runs=probe.runs,
        analog_time=probe.analog_time,
        device_time=DeviceTime(
            after.link_s - before.link_s,
            after.program_s - before.program_s,
            after.analog_s - before.analog_s,
            after.convert_s - before.convert_s,
        ),
    )


def _pattern(n: int) -> np.ndarray:
    """A fixed symmetric +-1 pattern with zero diagonal (the calibration matrices' off-diagonal signs)."""
    signs = np.where(np.random.default_rng(_PATTERN_SEED).random((n, n)) < 0.5, -1.0, 1.0)
    upper = np.triu(signs, 1)
    return upper + upper.T


def _gauge(trim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split K = E / (G D^T) in the gauge where log E has zero row and column means (two-way decomposition
    of log K); the grand mean goes to G.  Returns (E, G, D)."""
    log_k = np.log(trim)
    grand = float(log_k.mean())
    row = log_k.mean(axis=1) - grand
    column = log_k.mean(axis=0) - grand
    log_e = log_k - grand - row[:, None] - column[None, :]
    return np.exp(log_e), np.exp(-row - grand), np.exp(-column)
