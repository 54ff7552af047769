"""Checking a call's arguments against the device before anything is sent.

Every function raises ``InvalidInputError`` (a ``ValueError``) with what was wrong and what to do, and
makes no device call, so composite calls (``linalg``, ``sampling``) check every argument first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InvalidInputError
from .numbers import real
from .reports import DeviceInfo

# |A - A.T| up to this fraction of max |A| counts as symmetric (round-off of J^T H J and the like)
SYMMETRY_RTOL = 1e-10

# as_float_array checks arrays up to this size entry by entry, larger ones through their sum
_SMALL = 4096


def checked_matrix(info: DeviceInfo, A: Any, symmetric: bool = True) -> np.ndarray:
    """A dense matrix as load_matrix takes it (float64 (n, n), n <= the dense array), or InvalidInputError.
    No device call: composite calls check every argument before their first load."""
    try:
        shape = np.shape(A)
    except ValueError:  # a ragged list: _as_float_array says so
        shape = ()
    if len(shape) == 2 and shape[0] == shape[1]:  # too large for the device: refused before any copy is made
        check_dense(info, shape[0])
    A = as_float_array(A, "matrix A", 2)
    n = A.shape[0]
    if A.shape != (n, n) or n == 0:
        raise InvalidInputError(f"matrix A must be square and non-empty, got shape {A.shape}")
    check_dense(info, n)
    if symmetric:
        largest, where, biggest = asymmetry(A)
        if largest > SYMMETRY_RTOL * biggest:
            raise InvalidInputError(
                f"matrix A must be symmetric: max |A - A.T| = {largest:.3g} at {where};"
                " symmetrise it, or pass symmetric=False to load a non-symmetric drift"
            )
    return A


_BLOCK_ROWS = 128  # asymmetry's row blocks: a block and its transposed column block stay in cache


def asymmetry(A: np.ndarray) -> tuple[float, tuple[int, int], float]:
    """(max |A - A^T|, the first (i, j) in row-major order where it is reached, max |A|) of a square float
    array, a block of rows at a time (no n x n temporary: 3x faster than the whole difference at n = 4096).
    Cost O(n^2)."""
    n = A.shape[0]
    step = n if n <= 4 * _BLOCK_ROWS else _BLOCK_ROWS  # small: one block (the loop would cost more than it saves)
    largest, where, biggest = -1.0, (0, 0), 0.0
    for first in range(0, n, step):
        rows = A[first : first + step]
        diff = np.abs(rows - A[:, first : first + step].T)
        index = int(np.argmax(diff))
        value = float(diff.flat[index])
        if value > largest or largest < 0.0:  # NaN never compares greater: as_float_array refused it
            largest, where = value, (first + index // n, index % n)
        biggest = max(biggest, float(rows.max()), -float(rows.min()))
    return largest, where, biggest


def checked_vector(info: DeviceInfo, b: Any, n: int | None = None) -> np.ndarray:
    """A vector as load_vector takes it (float64 (n,), n <= cells; of length ``n`` when given)."""
    b = as_float_array(b, "vector b", 1)
    if b.shape[0] == 0:
        raise InvalidInputError("vector b must be non-empty")
    check_fits(info, b.shape[0], "vector b")
    if n is not None and b.shape[0] != n:
        raise InvalidInputError(f"vector b has {b.shape[0]} entries but the matrix is {n} x {n}; they must match")
    return b


def checked_run(info: DeviceInfo, t: Any, burn_in: Any) -> tuple[float, float]:
    """(t, burn_in) as run() takes them, in tau, or InvalidInputError.  No device call."""
    t = as_time(t, "t")
    burn_in = as_time(burn_in, "burn_in")
    if not 0.0 < t <= info.max_run_time:
        raise InvalidInputError(
            f"t = {t!r} tau is outside (0, {info.max_run_time:g}], the run time this device allows"
            + ("; split a longer run into several" if t > 0 else "; pass a positive time")
        )
    if not 0.0 <= burn_in < t:
        raise InvalidInputError(f"burn_in = {burn_in!r} must be in [0, t) with t = {t:g}")
    return t, burn_in


def check_dense(info: DeviceInfo, n: int) -> None:
    check_fits(info, n, "matrix A")
    if n > info.max_dense_size:
        size = info.max_dense_size
        raise InvalidInputError(
            f"matrix A has size {n}, more than the largest dense matrix of {info.name}, {size} x {size}"
            " (coupling.max_dense_size); load a curvature J^T H J + damping I as driver.GGN(J, H, damping),"
            " or use a larger device spec"
        )


def check_ggn_fits(info: DeviceInfo, m: int, n: int) -> None:
    """A GGN with J (m, n) fits the device: n <= cells, m <= its structured arrays' rows."""
    check_fits(info, n, "GGN J (N parameters)")
    if m > info.max_ggn_rows:
        rows = info.max_ggn_rows
        has = f"only {rows} rows" if rows else "no structured arrays"
        raise InvalidInputError(
            f"GGN J has m = {m} rows (outputs of the batch), but {info.name} has {has}"
            " (coupling.max_ggn_rows); use a smaller batch, or a device spec with wider arrays"
        )


def check_fits(info: DeviceInfo, n: int, what: str) -> None:
    if n > info.cells:
        raise InvalidInputError(
            f"{what} has size {n}, more than the {info.cells} cells of {info.name};"
            " use a larger device spec or a smaller problem"
        )


def as_float_array(value: Any, what: str, ndim: int, copy: bool = True) -> np.ndarray:
    """``value`` as a float64 array of ``ndim`` dimensions with finite entries (a copy unless ``copy=False``
    and it is float64 already), or InvalidInputError naming ``what``.  O(size): one pass when all is well."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"{what} could not be read as an array: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=copy)
    if array.ndim != ndim:
        raise InvalidInputError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size <= _SMALL:  # a small temporary costs less than the errstate the sum needs
        finite = bool(np.isfinite(array).all())
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            finite = bool(np.isfinite(array.sum()))  # one pass, no temporary: a NaN or inf entry makes the sum so
    if not finite:  # (or finite entries overflowed it: then the scan below finds nothing)
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidInputError(
                f"{what} has {int(bad.sum())} NaN or infinite entries (first at {first}); pass finite values"
            )
    return array


def as_time(value: Any, what: str) -> float:
    if type(value) is not float:  # a float is already what real() makes of it
        value = real(value, what, "a number of tau")
    if not math.isfinite(value):
        raise InvalidInputError(f"{what} must be finite, got {value!r}")
    return value


def choose_scale(natural: float, scale: float | None, what: str) -> float:
    if scale is None:
        return natural if natural > 0.0 else 1.0
    scale = real(scale, f"scale of {what}", "a positive number")
    if not (scale > 0.0 and np.isfinite(scale)):
        raise InvalidInputError(f"scale of {what} must be a positive finite number, got {scale!r}")
    return scale


def recording(record_cov: Any, record_samples: Any, sample_stride: Any) -> dict[str, int]:
    """RUN's recording fields, checked: record_cov a bool, record_samples >= 0, sample_stride >= 1."""
    if record_cov is False and record_samples == 0 and sample_stride == 1 and type(record_samples) is int:
        if type(sample_stride) is int:  # run()'s defaults: nothing recorded
            return {"record_cov": 0, "record_samples": 0, "sample_stride": 1}
    if not isinstance(record_cov, (bool, np.bool_)):
        raise InvalidInputError(f"record_cov must be True or False, got {record_cov!r}")
    for value, what, low in ((record_samples, "record_samples", 0), (sample_stride, "sample_stride", 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidInputError(f"{what} must be an integer, got {value!r}")
        if value < low:
            raise InvalidInputError(f"{what} = {value} must be at least {low}")
    return {"record_cov": int(record_cov), "record_samples": int(record_samples), "sample_stride": int(sample_stride)}


def option(value: str, enum: type, what: str) -> int:
    try:
        return int(enum[value])
    except (KeyError, TypeError):
        allowed = ", ".join(repr(m.name) for m in enum)
        raise InvalidInputError(f"{what} = {value!r} is not one of {allowed}") from None
