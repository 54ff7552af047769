"""Code <-> analog conversions of the device: coupling elements and input DACs.

A signed converter of b bits (sign included) has code_max = 2^(b-1) - 1 and
maps code k to k / code_max * full_scale.  b = 0 means a continuous
(unquantised) part: the "code" on the wire is then the analog value itself,
as a float64.  The read-out ADC lives in ``_kernels`` because the integrator
converts inside its loop.
"""

from __future__ import annotations

import numpy as np

from .parts import CellParts
from .spec import DeviceSpec

__all__ = ["code_max", "element_conductances", "dac_volts", "check_codes"]


def code_max(bits: int) -> int:
    """Largest code of a signed b-bit converter, 2^(b-1) - 1; 0 for a continuous part."""
    return (1 << (bits - 1)) - 1 if bits > 0 else 0


def check_codes(codes: np.ndarray, bits: int, full_scale: float, what: str) -> str | None:
    """Return why ``codes`` cannot be programmed into a b-bit part, or None if they can."""
    if bits > 0:
        if codes.dtype.kind not in "iu":
            return f"{what} codes must be integers for a {bits}-bit part, got dtype {codes.dtype}"
        limit = code_max(bits)
        worst = max(int(codes.max()), -int(codes.min())) if codes.size else 0  # no |codes| temporary
        if worst > limit:
            return f"{what} code {worst} is outside +-{limit} of a {bits}-bit part"
        return None
    if codes.dtype.kind != "f":
        return f"{what} values must be float64 for a continuous part, got dtype {codes.dtype}"
    if not np.all(np.isfinite(codes)):
        return f"{what} values must be finite"
    worst = max(float(codes.max()), -float(codes.min())) if codes.size else 0.0
    if worst > full_scale:
        return f"{what} value {worst:g} is outside the full scale +-{full_scale:g}"
    return None


def element_conductances(codes: np.ndarray, spec: DeviceSpec, mismatch: np.ndarray | None) -> np.ndarray:
    """Programmed conductances a_ij = code_ij / code_max * g_max * (1 + sigma eps_ij), in g0."""
    bits = spec.coupling.element_bits
    if bits > 0:
        a = codes.astype(np.float64) * (spec.coupling.g_max / code_max(bits))
    else:
        a = codes.astype(np.float64, copy=True)
    if mismatch is not None:
        a *= mismatch
    return a


def dac_volts(codes: np.ndarray, spec: DeviceSpec, parts: CellParts) -> np.ndarray:
    """DAC outputs u_i = gain_i * code_i / code_max * range_v + offset_i, in volts."""
    n = codes.shape[0]
    bits = spec.dac.bits
    if bits > 0:
        ideal = codes.astype(np.float64) * (spec.dac.range_v / code_max(bits))
    else:
        ideal = codes.astype(np.float64, copy=True)
    return parts.dac_gain[:n] * ideal + parts.dac_offset_v[:n]
