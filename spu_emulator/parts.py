"""The realised parts of one device: component mismatch drawn once from the device seed.

Like a real board, every device built from a spec differs a little from the
nominal values.  The draws come from the device seed only, one independent
stream per effect, so the same seed always gives the same device, and turning
one effect on or off does not change the draws of another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spec import DeviceSpec

__all__ = ["CellParts", "GGNMismatch", "draw_cell_parts", "element_mismatch", "ggn_mismatch"]

# spawn keys of the independent streams; never reuse or renumber one
_CAPACITANCE, _INPUT_G, _OPAMP, _DAC_GAIN, _DAC_OFFSET, _ADC_GAIN, _ADC_OFFSET = range(7)
_ELEMENTS = 100
# the arrays of a GGN load (TNGD App. C): one stream per row of J, per column of J^T, per row of H
_GGN_J, _GGN_JT, _GGN_H, _GGN_DAMPING = 101, 102, 103, 104
NOISE_STREAM = 200
# the inductor and damping resistor of each oscillator cell (drawn in spu_emulator.oscillator)
INDUCTANCE_STREAM, DAMPING_STREAM = 300, 301


def _stream(seed: np.random.SeedSequence, *key: int) -> np.random.Generator:
    child = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, *key))
    return np.random.Generator(np.random.PCG64(child))


@dataclass(frozen=True)
class CellParts:
    """Per-cell realised values, each of shape (cells,).

    capacitance: c_i in units of C0 (nominal 1); input_conductance: gin_i in g0
    (nominal 1); opamp_offset_v: v_os,i in volts; dac_gain, adc_gain: relative
    (nominal 1); dac_offset_v, adc_offset_v: volts.
    """

    capacitance: np.ndarray
    input_conductance: np.ndarray
    opamp_offset_v: np.ndarray
    dac_gain: np.ndarray
    dac_offset_v: np.ndarray
    adc_gain: np.ndarray
    adc_offset_v: np.ndarray


def draw_cell_parts(spec: DeviceSpec, seed: np.random.SeedSequence) -> CellParts:
    """Draw every per-cell part of the device.  Cost O(cells)."""
    n = spec.cells.count

    def relative(key: int, sigma: float) -> np.ndarray:
        if sigma == 0.0:
            return np.ones(n)
        return 1.0 + sigma * _stream(seed, key).standard_normal(n)

    def absolute(key: int, sigma: float) -> np.ndarray:
        if sigma == 0.0:
            return np.zeros(n)
        return sigma * _stream(seed, key).standard_normal(n)

    return CellParts(
        capacitance=relative(_CAPACITANCE, spec.cell.capacitance_mismatch),
        input_conductance=relative(_INPUT_G, spec.coupling.input_conductance_mismatch),
        opamp_offset_v=absolute(_OPAMP, spec.cell.opamp_offset_v),
        dac_gain=relative(_DAC_GAIN, spec.dac.gain_error),
        dac_offset_v=absolute(_DAC_OFFSET, spec.dac.offset_v),
        adc_gain=relative(_ADC_GAIN, spec.adc.gain_error),
        adc_offset_v=absolute(_ADC_OFFSET, spec.adc.offset_v),
    )


def element_mismatch(spec: DeviceSpec, seed: np.random.SeedSequence, n: int) -> np.ndarray | None:
    """Relative factors (1 + sigma * eps_ij) of the elements of the top-left n x n block.

    Row i has its own stream, so element (i, j) is the same part whatever n is
    programmed.  Returns None when mismatch is off.  Cost O(n^2).
    """
    sigma = spec.coupling.mismatch
    if sigma == 0.0:
        return None
    out = np.empty((n, n))
    for i in range(n):
        out[i] = _stream(seed, _ELEMENTS, i).standard_normal(n)
    out *= sigma
    out += 1.0
    return out


@dataclass(frozen=True)
class GGNMismatch:
    """Relative factors (1 + sigma eps) of the elements of a GGN load's arrays.

    j: (m, n) of the J array (element (k, i) carries cell i into stage-1 output k); jt: (m, n) of the
    J^T array, stored in J's orientation (element (k, i) carries stage-2 output k into cell i): separate
    parts from J's, so the effective drift is not symmetric; h: (m, m) of the H array; damping: (n,) of
    each cell's damping element.
    """

    j: np.ndarray
    jt: np.ndarray
    h: np.ndarray
    damping: np.ndarray


def ggn_mismatch(spec: DeviceSpec, seed: np.random.SeedSequence, m: int, n: int) -> GGNMismatch | None:
    """Element mismatch of the J, J^T and H arrays and the damping diagonal for an (m, n) GGN load.

    Row k of J, column k of J^T and row k of H each have their own stream, so an element is the same
    part whatever m and n are programmed; O(m) streams in all.  None when mismatch is off.  Cost O(m n).
    """
    sigma = spec.coupling.mismatch
    if sigma == 0.0:
        return None

    def rows(key: int, count: int, width: int) -> np.ndarray:
        out = np.empty((count, width))
        for k in range(count):
            out[k] = _stream(seed, key, k).standard_normal(width)
        out *= sigma
        out += 1.0
        return out

    damping = 1.0 + sigma * _stream(seed, _GGN_DAMPING).standard_normal(n)
    return GGNMismatch(j=rows(_GGN_J, m, n), jt=rows(_GGN_JT, m, n), h=rows(_GGN_H, m, m), damping=damping)
