"""The realised parts of an emulated device, for tests only (like aihwkit's ``get_hidden_parameters``).

A host never sees these: a real board's mismatch and converter errors are not readable, and
``driver.calibrate`` estimates them from known inputs alone.  Tests reach the in-process
:class:`~spu_emulator.firmware.Firmware` (``dev.transport.firmware``) and compare the estimates
with what this module reads.  Nothing in ``driver`` may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .parts import element_mismatch

__all__ = ["HiddenParameters", "hidden_parameters"]


@dataclass(frozen=True)
class HiddenParameters:
    """The realised parts of the first n cells and their dense n x n array.

    element_mismatch: (n, n) relative factor of element (i, j) (ones when mismatch is off);
    input_conductance, dac_gain, adc_gain: (n,) relative (nominal 1); dac_offset_v, adc_offset_v,
    opamp_offset_v: (n,) volts; capacitance: (n,) in C0.
    """

    element_mismatch: np.ndarray
    input_conductance: np.ndarray
    dac_gain: np.ndarray
    dac_offset_v: np.ndarray
    adc_gain: np.ndarray
    adc_offset_v: np.ndarray
    opamp_offset_v: np.ndarray
    capacitance: np.ndarray

    @property
    def input_gain(self) -> np.ndarray:
        """gin_i * dac_gain_i: volts of force at cell i per nominal DAC volt (what a host can see of both)."""
        return self.input_conductance * self.dac_gain

    @property
    def element_trim(self) -> np.ndarray:
        """K_ij = E_ij / (input_gain_i adc_gain_j): the realised element, as a host sees it through the
        converters, per nominal element (``driver.calibration``)."""
        return self.element_mismatch / np.outer(self.input_gain, self.adc_gain)


def hidden_parameters(firmware, n: int | None = None) -> HiddenParameters:
    """The hidden parts of ``firmware`` (a :class:`~spu_emulator.firmware.Firmware`) for its first n cells
    (default: the largest dense block).  Reads the parts drawn at power-on; changes nothing.  O(n^2)."""
    spec = firmware.spec
    if n is None:
        n = min(spec.cells.count, spec.coupling.max_dense_size)
    parts = firmware.parts
    mismatch = element_mismatch(spec, firmware._seed, n)
    return HiddenParameters(
        element_mismatch=np.ones((n, n)) if mismatch is None else mismatch,
        input_conductance=parts.input_conductance[:n].copy(),
        dac_gain=parts.dac_gain[:n].copy(),
        dac_offset_v=parts.dac_offset_v[:n].copy(),
        adc_gain=parts.adc_gain[:n].copy(),
        adc_offset_v=parts.adc_offset_v[:n].copy(),
        opamp_offset_v=parts.opamp_offset_v[:n].copy(),
        capacitance=parts.capacitance[:n].copy(),
    )
