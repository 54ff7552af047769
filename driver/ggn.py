"""Structured curvature for TNGD: the generalised Gauss-Newton matrix F = J^T H J + damping I.

``GGN(J, H, damping)`` holds the factors, validated; ``Device.load_matrix(GGN(...))`` programs the
device's structured arrays (TNGD App. C: J, H and J^T arrays and a damping diagonal around N
cells), and nothing here or on the device forms the N x N matrix.

How the driver programs it (``program``).  The three arrays are scaled separately so each uses its
code range: J goes in as J / s_J and H as H / s_H, with s_J = max|J| / g_max, s_H = max|H| / g_max;
the device's drift is then a = (J^T H J) / s + (damping / s) I with s = s_J^2 s_H, the one overall
scale (user units of F per g0) that ``read_mean`` undoes, exactly as the scale of a dense matrix.
When damping / s would not fit the damping element (above g_max), s grows to damping / g_max and H
takes the extra factor (its codes then use less than their full range).  The J^T array is programmed
with J's codes: the host sends them once.  Rounding H to codes can make it slightly indefinite, which
could make the drift unstable for a small damping; the driver then raises H's diagonal codes by the
fewest LSBs that make it positive semi-definite again (a change of the rounding error's size).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from .codes import Quantised, code_dtype, code_max, to_codes
from .errors import InvalidInputError
from .numbers import real

__all__ = ["GGN", "ProgrammedCodes", "program", "natural_scale"]

# |H - H.T| up to this fraction of max|H| counts as symmetric (as for a dense matrix)
SYMMETRY_RTOL = 1e-10
# an eigenvalue of H down to -PSD_RTOL * max|eigenvalue| counts as zero (round-off of H = diag(p) - p p^T)
PSD_RTOL = 1e-10
# check J for NaN a block of this many elements at a time, so no temporary is as large as J
_BLOCK = 1 << 20


@dataclass(frozen=True, eq=False)
class GGN:
    """The damped generalised Gauss-Newton matrix F = J^T H J + damping * I, kept in factored form.

    J: (m, N) Jacobian of the m model outputs of a batch (batch x d_z) with respect to the N
    parameters; H: (m, m) Hessian of the loss with respect to those outputs, symmetric positive
    semi-definite; damping: lambda > 0.  All are validated on construction (shapes, finite values,
    H symmetric to 1e-10 of max|H| and positive semi-definite to 1e-10 of its largest eigenvalue,
    damping > 0); a problem raises InvalidInputError naming the shapes and values.  The arrays are
    kept as float64, not copied when they already are: do not change them afterwards.

    Cost O(m N + sum_k d_k^3) to validate, d_k the sizes of H's diagonal blocks (m^3 for a dense H).
    ``matvec`` is O(m N); ``to_dense`` forms N x N and is for small problems and tests only.
    """

    J: np.ndarray
    H: np.ndarray
    damping: float

    def __post_init__(self) -> None:
        J = _float_array(self.J, "GGN J", 2)
        H = _float_array(self.H, "GGN H", 2)
        m, n = J.shape
        if m == 0 or n == 0:
            raise InvalidInputError(f"GGN J must be non-empty (m, N), got shape {J.shape}")
        if H.shape != (m, m):
            raise InvalidInputError(
                f"GGN H must have shape (m, m) = ({m}, {m}) to match J of shape {J.shape} (m = {m} outputs,"
                f" N = {n} parameters), got {H.shape}"
            )
        low, high, bad = _scan(J)
        if bad:
            _check_finite(J, "GGN J")  # names the count and the first position
        _check_finite(H, "GGN H")
        biggest = float(np.abs(H).max())
        asym = np.abs(H - H.T)
        where = np.unravel_index(int(np.argmax(asym)), asym.shape)
        if asym[where] > SYMMETRY_RTOL * biggest:
            raise InvalidInputError(
                f"GGN H must be symmetric: max |H - H.T| = {asym[where]:.3g} at {tuple(map(int, where))}"
                f" (max|H| = {biggest:.3g}); pass (H + H.T) / 2"
            )
        # a Cholesky factor of H + 1e-10 ||H|| I settles it at a sixth of the cost of eigvalsh
        blocks = _diagonal_blocks(H)
        if not _positive_definite(H + (PSD_RTOL * _norm_bound(H)) * np.eye(m), blocks):
            lowest, highest = _eigenvalue_range(H, blocks)
            if lowest < -PSD_RTOL * max(abs(lowest), abs(highest)):
                raise InvalidInputError(
                    f"GGN H must be positive semi-definite: its smallest eigenvalue is {lowest:.3g} (largest"
                    f" {highest:.3g}); a loss Hessian such as diag(p) - p p^T is, so check how H was formed"
                )
        damping = self.damping
        damping = real(damping, "GGN damping", "a positive number")
        if not (math.isfinite(damping) and damping > 0.0):
            raise InvalidInputError(
                f"GGN damping must be a finite number > 0, got {damping!r}: F = J^T H J + damping I needs"
                " damping > 0 to be positive definite (J^T H J has rank at most m)"
            )
        object.__setattr__(self, "J", J)
        object.__setattr__(self, "H", H)
        object.__setattr__(self, "damping", damping)
        object.__setattr__(self, "_j_extent", max(high, -low))  # max|J|, for the scale

    @property
    def m(self) -> int:
        """Rows of J: the outputs of the batch (batch x d_z), the width of the memoryless stages."""
        return self.J.shape[0]

    @property
    def n(self) -> int:
        """Columns of J: the parameters N, one cell each."""
        return self.J.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, N), the shape of F."""
        return (self.n, self.n)

    def matvec(self, v: Any) -> np.ndarray:
        """F v = J^T (H (J v)) + damping v for v (N,).  Cost O(m N)."""
        v = np.asarray(v, dtype=np.float64)
        return (self.H @ (self.J @ v)) @ self.J + self.damping * v

    def to_dense(self) -> np.ndarray:
        """F as an (N, N) array.  Forms N x N, O(N^2 m): for small problems and tests only."""
        return self.J.T @ self.H @ self.J + self.damping * np.eye(self.n)

    def __repr__(self) -> str:
        return f"GGN(m={self.m}, N={self.n}, damping={self.damping:g})"


@dataclass(frozen=True)
class ProgrammedCodes:
    """What the driver sends for a GGN: the codes of each array and the scales behind them.

    scale: s, user units of F per g0 (what read-out undoes); j_scale, h_scale: s_J, s_H (user units
    per g0 of an element); h_raised: LSBs added to H's diagonal codes to keep it positive
    semi-definite; quantised: the Quantised of J, H and damping, for the load report.
    """

    j_codes: np.ndarray
    h_codes: np.ndarray
    damping_code: np.ndarray
    scale: float
    j_scale: float
    h_scale: float
    h_raised: int
    quantised: tuple[Quantised, Quantised, Quantised]


def natural_scale(ggn: GGN, g_max: float) -> float:
    """The overall scale s that ``load_matrix(ggn)`` chooses: max(s_J^2 s_H, damping / g_max)."""
    s_j, s_h = _array_scales(ggn, g_max)
    return max(s_j * s_j * s_h, ggn.damping / g_max)


def program(
    ggn: GGN, bits: int, g_max: float, scale: float | None = None, out: np.ndarray | None = None
) -> ProgrammedCodes:
    """Codes for the J, H and damping elements of a device with b-bit elements of full scale g_max.

    With ``scale`` = s given, J keeps its full range and H goes in at s / s_J^2 (values beyond full
    scale clip and are counted, as for a dense matrix).  ``out``: an array of J's shape and code dtype
    to write J's codes into (a buffer reused from load to load); it is written last, after every check
    that can raise, because an in-process device holds the codes of its current load by reference.
    Cost O(m N + m^3); no temporary as large as J.
    """
    s_j, _ = _array_scales(ggn, g_max)
    s = natural_scale(ggn, g_max) if scale is None else scale
    s_h = s / (s_j * s_j)
    qh = to_codes(ggn.H / s_h, bits, g_max)
    qd = to_codes(np.array([ggn.damping / s]), bits, g_max)
    raised = 0
    if bits > 0:
        qh, raised = _keep_psd(qh, ggn.H / s_h, bits, g_max)
        if int(qd.codes[0]) == 0:
            raise InvalidInputError(
                f"the damping {ggn.damping:g} is below the resolution of the damping element at the matrix scale"
                f" s = {s:.4g}: damping / s = {ggn.damping / s:.3g} g0 rounds to code 0 of {code_max(bits)}"
                f" (full scale {g_max:g} g0), so the programmed drift would be singular; raise the damping to"
                f" at least {0.5 * s * g_max / code_max(bits):.3g}, or scale J or H down"
            )
    # J last, once nothing can be refused: the device keeps the codes it was sent by reference
    # (spu_emulator.arrays.ProgrammedGGN), so ``out`` must not change unless a load follows
    qj = _to_codes_blocked(ggn.J, s_j, bits, g_max, out)
    return ProgrammedCodes(
        j_codes=qj.codes,
        h_codes=qh.codes,
        damping_code=qd.codes,
        scale=s,
        j_scale=s_j,
        h_scale=s_h,
        h_raised=raised,
        quantised=(qj, qh, qd),
    )


def _array_scales(ggn: GGN, g_max: float) -> tuple[float, float]:
    top_j = ggn._j_extent
    top_h = float(np.abs(ggn.H).max())
    return (top_j / g_max if top_j > 0.0 else 1.0), (top_h / g_max if top_h > 0.0 else 1.0)


def _scan(values: np.ndarray) -> tuple[float, float, int]:
    """(smallest finite value, largest finite value, count of NaN or inf) of a 2-d array, in one pass."""
    ranges = _in_column_ranges(_scan_columns, values)
    return min(r[0] for r in ranges), max(r[1] for r in ranges), sum(r[2] for r in ranges)


@njit(cache=True, nogil=True)
def _scan_columns(values, start, stop):
    lo = np.inf
    hi = -np.inf
    count = 0
    for row in range(values.shape[0]):
        for col in range(start, stop):
            v = values[row, col]
            if not np.isfinite(v):
                count += 1
            else:
                lo = min(lo, v)
                hi = max(hi, v)
    return lo, hi, count


def _to_codes_blocked(
    values: np.ndarray, scale: float, bits: int, full_scale: float, out: np.ndarray | None = None
) -> Quantised:
    """``to_codes(values / scale, bits, full_scale)`` in one compiled pass (the same codes and counts,
    with no temporary as large as ``values``), into ``out`` when given.  O(m N)."""
    codes = np.empty(values.shape, dtype=code_dtype(bits)) if out is None else out
    args = (float(scale), float(full_scale), float(code_max(bits)), codes)
    ranges = _in_column_ranges(_quantise_columns, values, *args)
    return Quantised(codes, sum(r[0] for r in ranges), sum(r[1] for r in ranges), max(r[2] for r in ranges))


@njit(cache=True, nogil=True)
def _quantise_columns(values, start, stop, scale, full_scale, top, codes):
    """to_codes' arithmetic element by element over columns start:stop: f = (v / scale) / full_scale,
    clipped to +-1, then rint(f top) (top > 0) or f full_scale (top = 0, a continuous part).  Returns
    (clipped, zeroed, the largest |f - converted value| as a fraction of full scale).

    The same bits as to_codes with one division per element instead of three (divisions, not memory,
    bound this loop): / full_scale is skipped when it is 1 (exact either way), and the error
    |f - k / top| is divided out only for candidates, elements whose |f top - k| comes within a margin
    of the largest so far (|f top - k| and top |f - k / top| differ by a few rounding errors of f top,
    far inside a margin of 1e-9 (|f| top + 1)), so the maximum is the one to_codes finds."""
    clipped = 0
    zeroed = 0
    worst = 0.0
    bar = 0.0  # worst * top: candidates are the elements with |f top - k| above bar less the margin
    divide = full_scale != 1.0
    for row in range(values.shape[0]):
        for col in range(start, stop):
            v = values[row, col] / scale
            f = v / full_scale if divide else v
            if abs(f) > 1.0:
                clipped += 1
            g = min(max(f, -1.0), 1.0)
            if top > 0.0:
                k = np.rint(g * top)
                codes[row, col] = k
                if k == 0.0 and v != 0.0:
                    zeroed += 1
                if abs(f * top - k) + 1e-9 * (abs(f) * top + 1.0) >= bar:
                    e = abs(f - k / top)
                    if e > worst:
                        worst = e
                        bar = worst * top
            else:
                codes[row, col] = g * full_scale
                e = abs(f - g)
                if e > worst:
                    worst = e
    return clipped, zeroed, worst


def _in_column_ranges(kernel, array, *args):
    """``kernel(array, start, stop, *args)`` over ranges of columns that cover array (m, n), on up to one
    thread per CPU when the array is large (about a million elements or more per thread; the kernels
    release the GIL); a fresh pool each call, so no thread outlives it.  Results in column order, and
    the same whatever the number of threads."""
    m, n = array.shape
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(cpus, (m * n) >> 20, n))
    if workers == 1:
        return [kernel(array, 0, n, *args)]
    bounds = [n * w // workers for w in range(workers + 1)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        calls = [pool.submit(kernel, array, bounds[w], bounds[w + 1], *args) for w in range(workers)]
        return [call.result() for call in calls]


def _keep_psd(q: Quantised, values: np.ndarray, bits: int, full_scale: float) -> tuple[Quantised, int]:
    """Raise the diagonal codes of H by the fewest LSBs that make the code matrix positive semi-definite.

    The unrounded H is positive semi-definite, so the rounding error E bounds the deficit:
    lambda_min(codes) >= -||E||_2; the raise is ceil(-lambda_min) LSBs, at most the rounding's size.
    A diagonal code already at full scale cannot rise (H's largest entry is on its diagonal, so this
    is common): that row's off-diagonal codes shrink toward zero by the missing LSBs instead, which
    lowers its Gershgorin radius as the raise would have raised its centre.  Checked after each of at
    most 4 rounds; a code matrix still indefinite goes to the device as it is (its exact engine then
    refuses the array and ``auto`` steps it in the transient engine).
    """
    codes = q.codes
    as_float = codes.astype(np.float64)
    blocks = _diagonal_blocks(as_float)
    if _positive_definite(as_float, blocks):  # the common case, at a sixth of the cost of eigvalsh
        return q, 0
    lowest = _eigenvalue_range(as_float, blocks)[0]
    if lowest >= 0.0:
        return q, 0
    raised = math.ceil(-lowest)
    top = code_max(bits)
    work = codes.astype(np.int64)
    diagonal = np.diag_indices_from(work)
    for _ in range(4):
        room = np.minimum(raised, top - work[diagonal])
        work[diagonal] += room
        short = raised - room
        for i in np.flatnonzero(short):
            for line in (work[i, :], work[:, i]):  # row and column alike: the codes stay symmetric
                off = line.copy()
                off[i] = 0
                line -= np.sign(off) * np.minimum(np.abs(off), short[i])
        if _positive_definite(work.astype(np.float64), blocks):
            break
    codes = work.astype(codes.dtype)
    error = np.abs(values / full_scale - codes / top)
    return Quantised(codes, q.clipped, q.zeroed, float(error.max(initial=0.0))), raised


def _diagonal_blocks(a: np.ndarray) -> list[slice]:
    """The diagonal blocks of a symmetric a: the finest contiguous slices with a zero outside them.  O(m^2).

    A batch's H is block-diagonal (one d_z x d_z loss Hessian per sample), so its checks cost O(m d_z^2)."""
    m = a.shape[0]
    nonzero = a != 0.0
    last = np.where(nonzero.any(axis=1), m - 1 - np.argmax(nonzero[:, ::-1], axis=1), 0)
    reach = np.maximum.accumulate(np.maximum(last, np.arange(m)))  # farthest column any row so far touches
    ends = np.flatnonzero(reach == np.arange(m)) + 1
    return [slice(int(start), int(end)) for start, end in zip(np.r_[0, ends[:-1]], ends, strict=True)]


def _positive_definite(a: np.ndarray, blocks: list[slice]) -> bool:
    """Whether the symmetric a has a Cholesky factor (is positive definite to round-off), block by block.
    O(sum d^3) for blocks of size d."""
    try:
        for block in blocks:
            np.linalg.cholesky(a[block, block])
    except np.linalg.LinAlgError:
        return False
    return True


def _eigenvalue_range(a: np.ndarray, blocks: list[slice]) -> tuple[float, float]:
    """(smallest, largest) eigenvalue of the symmetric a from its diagonal blocks."""
    values = [np.linalg.eigvalsh(a[block, block]) for block in blocks]
    return min(float(v[0]) for v in values), max(float(v[-1]) for v in values)


def _norm_bound(a: np.ndarray) -> float:
    """An upper bound of ||a||_2: the smaller of the Frobenius norm and the largest absolute row sum."""
    return min(float(np.linalg.norm(a)), float(np.abs(a).sum(axis=1).max(initial=0.0)))


def _float_array(value: Any, what: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"{what} could not be read as an array: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must be real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise InvalidInputError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    return np.asarray(array, dtype=np.float64)


def _check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN or inf, naming the first position; checks a block of rows at a time."""
    rows = max(1, _BLOCK // max(array.shape[1], 1))
    for start in range(0, array.shape[0], rows):
        bad = ~np.isfinite(array[start : start + rows])
        if bad.any():
            total = int(
                sum(np.count_nonzero(~np.isfinite(array[s : s + rows])) for s in range(0, array.shape[0], rows))
            )
            first = np.argwhere(bad)[0]
            position = (int(first[0]) + start, int(first[1]))
            raise InvalidInputError(
                f"{what} has {total} NaN or infinite entries (first at {position}); pass finite values"
            )
