"""Host-side conversion between analog values and the integer codes on the wire.

A signed b-bit converter (sign included) has code_max = 2^(b-1) - 1 and maps
code k to k / code_max * full_scale.  b = 0 is a continuous part: the value is
sent as float64.  Codes travel in the narrowest integer type that holds them
(:func:`code_dtype`), as a board's link would carry them.  Cost O(size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = ["Quantised", "code_max", "code_dtype", "to_codes", "from_codes"]


def code_max(bits: int) -> int:
    """Largest code of a signed b-bit converter; 0 for a continuous part."""
    return (1 << (bits - 1)) - 1 if bits > 0 else 0


@functools.cache  # a few bit widths; np.dtype lookups cost a us per load
def code_dtype(bits: int) -> np.dtype:
    """The dtype of b-bit codes on the wire: the narrowest signed integer that holds +-code_max
    (int8 up to 8 bits, int16 up to 16, int32 up to 32, else int64); float64 for a continuous part."""
    if bits <= 0:
        return np.dtype(np.float64)
    for dtype in (np.int8, np.int16, np.int32):
        if bits <= 8 * np.dtype(dtype).itemsize:
            return np.dtype(dtype)
    return np.dtype(np.int64)


@dataclass(frozen=True)
class Quantised:
    """Codes for an array of analog values, with what the conversion lost.

    clipped: values beyond full scale (set to +-full scale); zeroed: non-zero
    values that became code 0; max_error: largest |value - converted value| as a
    fraction of full scale.
    """

    codes: np.ndarray
    clipped: int
    zeroed: int
    max_error: float


_CHUNK = 1 << 16  # to_codes works through large arrays this many values at a time, in cache


def to_codes(values: np.ndarray, bits: int, full_scale: float) -> Quantised:
    """Convert analog values (same unit as full_scale) to converter codes: code = rint(v / full_scale *
    code_max), clipped to +-code_max (bits = 0: the values themselves, clipped).  Element by element, so a
    large array is converted in chunks (the same numbers, 3x faster at 16.7M values).  Cost O(size)."""
    values = np.asarray(values)
    if values.size <= _CHUNK:
        return _to_codes(values, bits, full_scale)
    flat = values.reshape(-1)
    codes = np.empty(flat.shape, dtype=np.float64 if bits == 0 else code_dtype(bits))
    clipped = zeroed = 0
    error = 0.0
    for first in range(0, flat.size, _CHUNK):
        part = _to_codes(flat[first : first + _CHUNK], bits, full_scale)
        codes[first : first + _CHUNK] = part.codes
        clipped, zeroed, error = clipped + part.clipped, zeroed + part.zeroed, max(error, part.max_error)
    return Quantised(codes.reshape(values.shape), clipped, zeroed, error)


def _to_codes(values: np.ndarray, bits: int, full_scale: float) -> Quantised:
    if bits > 1 and values.ndim == 1 and values.dtype == np.float64 and values.flags.c_contiguous:
        # a vector (the DAC's): one pass in a kernel, not a dozen numpy calls (about 10 us at n = 8)
        codes = np.empty(values.shape[0], code_dtype(bits))
        clipped, zeroed, error, finite = _quantise(values, float(full_scale), code_max(bits), codes)
        if finite:
            return Quantised(codes, int(clipped), int(zeroed), float(error))
    unclipped = values / full_scale
    if unclipped.size and -1.0 <= unclipped.min() and unclipped.max() <= 1.0:
        clipped, fraction = 0, unclipped  # within full scale (NaN is not): the clip would change nothing
    else:
        clipped = int(np.count_nonzero(np.abs(unclipped) > 1.0))
        fraction = np.clip(unclipped, -1.0, 1.0)
    if bits == 0:
        codes = fraction * full_scale
        error = np.abs(unclipped - fraction)
        return Quantised(codes, clipped, 0, float(error.max(initial=0.0)))
    top = code_max(bits)
    codes = np.rint(fraction * top).astype(code_dtype(bits))
    # no code 0, nothing zeroed (one pass over the codes); else count the non-zero values that became 0
    zeroed = 0 if np.count_nonzero(codes) == codes.size else int(np.count_nonzero((codes == 0) & (values != 0)))
    error = np.abs(unclipped - codes / top)
    return Quantised(codes, clipped, zeroed, float(error.max(initial=0.0)))


@njit(cache=True)
def _quantise(values, full_scale, top, codes):  # pragma: no cover - compiled
    """_to_codes's numbers for a float64 vector, element by element in the same operations (v / full_scale,
    clipped to +-1, rint(f * top), |v / full_scale - code / top|), so the same bits; codes written into
    ``codes``.  Returns (clipped, zeroed, max error, finite): not finite (a NaN) leaves it to numpy."""
    clipped = 0
    zeroed = 0
    error = 0.0
    for i in range(values.shape[0]):
        value = values[i]
        if value != value:
            return 0, 0, 0.0, False
        unclipped = value / full_scale
        fraction = unclipped
        if fraction > 1.0:
            fraction = 1.0
            clipped += 1
        elif fraction < -1.0:
            fraction = -1.0
            clipped += 1
        code = np.rint(fraction * top)
        codes[i] = code
        if code == 0.0 and value != 0.0:
            zeroed += 1
        miss = abs(unclipped - code / top)
        if miss > error:
            error = miss
    return clipped, zeroed, error, True


def from_codes(codes: np.ndarray, bits: int, full_scale: float) -> np.ndarray:
    """Analog values of converter codes (float64; codes may be averages)."""
    codes = np.asarray(codes, dtype=np.float64)
    if bits == 0:
        return codes.copy()
    return codes * (full_scale / code_max(bits))
