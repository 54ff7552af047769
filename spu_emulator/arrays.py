"""Programming the coupling arrays: element codes -> realised conductances, drift, noise and drive.

``ProgrammedMatrix`` (a dense array) and ``ProgrammedGGN`` (the structured J, H, J^T arrays of TNGD
App. C) are what a load leaves on the device, computed once per load.  ``ArrayProgramming`` is the
part of ``Firmware`` that makes them; it reads the device's spec, realised parts, seed and injected
noise level (``spec``, ``parts``, ``oscillator_parts``, ``_seed``, ``_kappa0``, ``_lc``, ``_matrix``)
and keeps the per-shape mismatch caches and the GGN arrays' memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _kernels, krylov
from .converters import check_codes, code_max, dac_volts, element_conductances
from .oscillator import OscillatorArray, program_oscillator
from .parts import element_mismatch, ggn_mismatch
from .payload import _Refused
from .protocol import Status

K_BOLTZMANN = 1.380649e-23  # J/K


@dataclass(frozen=True)
class ProgrammedMatrix:
    """What LOAD_MATRIX leaves on the device, computed once per load.

    conductance: (n, n) realised a_ij in g0 (codes, scale and mismatch applied);
    drift: (n, n) M = C^-1 a; total_conductance: (n,) gtot_i = sum_j |a_ij| + gin_i;
    noise_sd: (n,) sqrt(2 kappa_i) / c_i in V / sqrt(tau); drift_norm: ||M||_2 (estimate); symmetric:
    whether M == M^T exactly (None: not checked, below ``krylov.MIN_CELLS`` cells).
    """

    codes: np.ndarray
    conductance: np.ndarray
    drift: np.ndarray
    total_conductance: np.ndarray
    noise_sd: np.ndarray
    drift_norm: float
    symmetric: bool | None = None

    @property
    def n(self) -> int:
        return self.codes.shape[0]


def _spectral_norm(m: np.ndarray, iterations: int = 30) -> float:
    """||m||_2 by power iteration on m^T m, capped by the Frobenius norm.  Cost O(iterations n^2)."""
    n = m.shape[0]
    x = 1.0 + np.arange(n) / max(n, 1)  # deterministic start: no device randomness used
    x /= np.linalg.norm(x)
    estimate = 0.0
    for _ in range(iterations):
        y = m.T @ (m @ x)
        norm = float(np.linalg.norm(y))
        if norm == 0.0:
            break
        estimate = math.sqrt(norm)
        x = y / norm
    # power iteration approaches from below; 10 % margin, never above a true bound
    return min(1.1 * estimate, float(np.linalg.norm(m)))


@dataclass
class ProgrammedGGN:
    """What LOAD_GGN leaves on the device (TNGD App. C), computed once per load; N x N is never formed.

    N dynamical cells and two memoryless stages of width m: stage 1 forms y = j V (m outputs, volts),
    stage 2 z = h y, and cell i receives sum_k jt[k, i] z_k through the J^T array plus damping_i V_i
    through its damping element, so the drift is

        M V = inv_c * (jt^T h j V + damping * V),   M = C^-1 (a_J^T a_H a_J + diag(d)).

    j_codes: (m, N) J's codes as they arrived, kept as they are (no copy: the codes are the data; the
    sender must not change them while this load is current, and the driver rewrites its buffer only
    for its next load); unit: g0 per code of an element (1 for continuous parts, whose "codes" are
    conductances); h: (m, m) H array; damping: (N,) damping conductances; inv_c: (N,) 1 / c_i;
    total_conductance: (N,) gtot_i = sum_k |jt[k, i]| + |damping_i| + gin_i, what the integrator
    input of cell i sees (for Johnson noise and the op-amp offset); noise_sd: (N,) as for a dense
    matrix; column_norms: (N,) sum_k j[k, i]^2; row_squares: (m,) sum_i j_codes[k, i]^2, exact (the
    diagonal of the codes' Gram matrix, see :func:`spu_emulator.lowrank.prepare_ggn`); realised:
    (j, jt) float64 (m, N) conductances in g0 when the elements have mismatch (J^T's parts separate
    from J's), else None.

    j: (m, N) the J array's conductances in g0 (codes, scale and mismatch applied); jt: the J^T array
    in J's orientation (the very same array as j without mismatch).  Without mismatch j is formed
    from the codes on first use (only the transient engine and small-array helpers need it; the
    exact engine works from the codes), so a load holds 2 m N bytes of int16 codes, not 8 m N.
    drift_norm: ||M||_2, estimated by power iteration on the factored form when first needed (only
    the transient engine needs it), O(N m) per iteration.
    """

    j_codes: np.ndarray
    unit: float
    h: np.ndarray
    damping: np.ndarray
    inv_c: np.ndarray
    total_conductance: np.ndarray
    noise_sd: np.ndarray
    column_norms: np.ndarray
    row_squares: np.ndarray
    realised: tuple[np.ndarray, np.ndarray] | None = None
    _j: np.ndarray | None = None
    _drift_norm: float | None = None

    @property
    def n(self) -> int:
        return self.j_codes.shape[1]

    @property
    def m(self) -> int:
        return self.j_codes.shape[0]

    @property
    def mismatched(self) -> bool:
        """Whether J and J^T are separate parts with their own mismatch (then the drift is not symmetric)."""
        return self.realised is not None

    @property
    def j(self) -> np.ndarray:
        """(m, N) J array conductances in g0.  Without mismatch formed from the codes on first use, O(m N)
        and 8 m N bytes kept (``unit`` 1 and float codes: the codes themselves)."""
        if self.realised is not None:
            return self.realised[0]
        if self._j is None:
            codes = self.j_codes
            if codes.dtype == np.float64 and self.unit == 1.0:
                self._j = codes
            else:
                self._j = np.multiply(codes, self.unit, dtype=np.float64)
        return self._j

    @property
    def jt(self) -> np.ndarray:
        """(m, N) the J^T array in J's orientation: ``j`` itself without mismatch."""
        return self.realised[1] if self.realised is not None else self.j

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """M x.  Cost O(N m)."""
        return self.inv_c * ((self.h @ (self.j @ x)) @ self.jt + self.damping * x)

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        """M^T y.  Cost O(N m)."""
        w = self.inv_c * y
        return (self.h.T @ (self.jt @ w)) @ self.j + self.damping * w

    @property
    def drift_norm(self) -> float:
        if self._drift_norm is None:
            # ||M|| <= max|1/c| (||jt||_F ||h||_F ||j||_F + max|d|) caps it, as the Frobenius norm caps a dense one
            cap = float(np.abs(self.inv_c).max()) * (
                _frobenius(self.jt) * float(np.linalg.norm(self.h)) * _frobenius(self.j)
                + float(np.abs(self.damping).max())
            )
            self._drift_norm = _power_norm(lambda x: self.rmatvec(self.matvec(x)), self.n, cap)
        return self._drift_norm

    def drift_dense(self) -> np.ndarray:
        """M as an (N, N) array.  Forms N x N: for tests on small arrays only."""
        return self.inv_c[:, None] * (self.jt.T @ self.h @ self.j + np.diag(self.damping))


def _frobenius(a: np.ndarray) -> float:
    """||a||_F without a temporary of a's size."""
    return math.sqrt(float(np.einsum("ij,ij->", a, a)))


def _power_norm(mtm: Callable[[np.ndarray], np.ndarray], n: int, cap: float, iterations: int = 30) -> float:
    """||M||_2 by power iteration on M^T M, given as a function, capped by a true bound (as _spectral_norm)."""
    x = 1.0 + np.arange(n) / max(n, 1)  # deterministic start: no device randomness used
    x /= np.linalg.norm(x)
    estimate = 0.0
    for _ in range(iterations):
        y = mtm(x)
        norm = float(np.linalg.norm(y))
        if norm == 0.0:
            break
        estimate = math.sqrt(norm)
        x = y / norm
    return min(1.1 * estimate, cap)


class ArrayProgramming:
    """The array-programming half of :class:`~spu_emulator.firmware.Firmware` (a mixin)."""

    # (J codes, _ggn_array's sums of them) from the last _check_ggn_codes, for _program_ggn to take
    _checked_ggn: tuple | None = None

    def _dense_size(self) -> int:
        """Largest n of a dense matrix: min(cells.count, coupling.max_dense_size)."""
        return min(self.spec.cells.count, self.spec.coupling.max_dense_size)

    def _check_size(self, n: int, what: str) -> None:
        if n > self.spec.cells.count:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"{what} of size {n} does not fit the {self.spec.cells.count} cells of {self.spec.name}",
            )

    def _element_unit(self) -> float:
        """g0 per code of a coupling element (1 for continuous parts: their codes are conductances)."""
        bits = self.spec.coupling.element_bits
        return self.spec.coupling.g_max / code_max(bits) if bits > 0 else 1.0

    def _ggn_array(self, name: str, codes: np.ndarray, mismatch: np.ndarray | None):
        """``element_conductances(codes, spec, mismatch)`` written into the array's memory of the last load
        when the shape is the same (the arrays are reprogrammed in place: no fresh m x N buffer per load),
        with the column sums of |a| and a^2.  One pass, over column ranges on a few threads.
        ``mismatch`` None: only the column sums (a stays the codes).  Returns (a or None, abs sums, square sums,
        row sums of codes^2 (m,), exact: the diagonal of the codes' Gram matrix, smallest code, largest code)."""
        unit = self._element_unit()
        n = codes.shape[1]
        abs_sums, square_sums = np.empty(n), np.empty(n)
        if mismatch is None:
            out = factors = np.empty((0, 0))
        else:
            out = self._ggn_arrays.get(name)
            if out is None or out.shape != codes.shape:
                out = self._ggn_arrays[name] = np.empty(codes.shape)
            factors = mismatch
        ranges = _kernels.in_column_ranges(_kernels._program_array, codes, unit, factors, out, abs_sums, square_sums)
        rows = sum(r[0] for r in ranges)
        low, high = min(r[1] for r in ranges), max(r[2] for r in ranges)
        return (out if mismatch is not None else None), abs_sums, square_sums, rows, low, high

    def _check_ggn_codes(self, codes: np.ndarray, what: str) -> None:
        """``check_codes`` for a large array, in one read over column ranges (same rules, same messages)."""
        bits, g_max = self.spec.coupling.element_bits, self.spec.coupling.g_max
        if (codes.dtype.kind not in "iu") if bits > 0 else (codes.dtype.kind != "f"):
            why = check_codes(codes[:0], bits, g_max, what)  # the dtype message
            raise _Refused(Status.BAD_ARGUMENT, why)
        self._checked_ggn = None
        if bits > 0:
            # integer codes are finite: their range comes with the column sums, in the one read that
            # _program_ggn then takes (as long as these very codes are programmed, without mismatch)
            sums = self._ggn_array("j", codes, None)
            self._checked_ggn = (codes, sums)
            worst = max(sums[5], -sums[4])
        else:
            ranges = _kernels.in_column_ranges(_kernels._code_range, codes)
            if sum(bad for _, _, bad in ranges):
                raise _Refused(Status.BAD_ARGUMENT, f"{what} values must be finite")
            worst = max(max(high for _, high, _ in ranges), -min(low for low, _, _ in ranges))
        if bits > 0 and worst > code_max(bits):
            raise _Refused(
                Status.BAD_ARGUMENT, f"{what} code {int(worst)} is outside +-{code_max(bits)} of a {bits}-bit part"
            )
        if bits == 0 and worst > g_max:
            raise _Refused(Status.BAD_ARGUMENT, f"{what} value {worst:g} is outside the full scale +-{g_max:g}")

    def _program_ggn(self, j_codes: np.ndarray, h_codes: np.ndarray, damping_code: np.ndarray) -> ProgrammedGGN:
        """The arrays of a GGN load with their element mismatch (J^T's parts separate from J's).  O(m N)."""
        m, n = j_codes.shape
        if self._ggn_mismatch_cache is None or self._ggn_mismatch_cache[0] != (m, n):
            self._ggn_mismatch_cache = ((m, n), ggn_mismatch(self.spec, self._seed, m, n))
        mismatch = self._ggn_mismatch_cache[1]
        # without mismatch J stays its codes (no float copy); with it, J and J^T are realised separately
        checked, self._checked_ggn = self._checked_ggn, None
        if not mismatch and checked is not None and checked[0] is j_codes:
            j, abs_sums, square_sums, row_squares = checked[1][:4]  # summed when the codes were checked
        else:
            sums = self._ggn_array("j", j_codes, mismatch.j if mismatch else None)
            j, abs_sums, square_sums, row_squares = sums[:4]
        realised = None
        if mismatch:
            jt, abs_sums, _, _, _, _ = self._ggn_array("jt", j_codes, mismatch.jt)
            realised = (j, jt)
        h = element_conductances(h_codes, self.spec, mismatch.h if mismatch else None)
        d = float(element_conductances(damping_code, self.spec, None)[0])
        damping = d * mismatch.damping if mismatch else np.full(n, d)
        c = self.parts.capacitance[:n]
        gtot = abs_sums + np.abs(damping) + self.parts.input_conductance[:n]
        return ProgrammedGGN(
            j_codes=j_codes,
            unit=self._element_unit(),
            h=h,
            damping=damping,
            inv_c=1.0 / c,
            total_conductance=gtot,
            noise_sd=np.sqrt(2.0 * self._kappa(gtot)) / c,
            column_norms=square_sums,
            row_squares=row_squares,
            realised=realised,
        )

    def _program(self, codes: np.ndarray) -> ProgrammedMatrix:
        n = codes.shape[0]
        if self._mismatch_cache is None or self._mismatch_cache[0] != n:
            self._mismatch_cache = (n, element_mismatch(self.spec, self._seed, n))
        a = element_conductances(codes, self.spec, self._mismatch_cache[1])
        c = self.parts.capacitance[:n]
        gin = self.parts.input_conductance[:n]
        gtot = np.abs(a).sum(axis=1) + gin
        # equal unit capacitances (no capacitance mismatch): M = a exactly (x / 1 = x), so no n x n copy
        drift = a if np.all(c == 1.0) else np.ascontiguousarray(a / c[:, None])
        kappa = self._kappa(gtot)
        # a large symmetric array: Lanczos for its norm (half the products of the power method), and the
        # exact engine's Krylov form is told it is symmetric.  Without element mismatch and with equal
        # capacitances M_ij is one function of code_ij, so M is symmetric exactly when the codes are (a
        # quarter of the bytes to compare for 16-bit codes)
        uniform = self._mismatch_cache[1] is None and np.all(c == c[0])
        symmetric = krylov.is_symmetric(codes if uniform else drift) if n >= krylov.MIN_CELLS else None
        return ProgrammedMatrix(
            codes=codes,
            conductance=a,
            drift=drift,
            total_conductance=gtot,
            noise_sd=np.sqrt(2.0 * kappa) / c,
            drift_norm=krylov.symmetric_norm(drift) if symmetric else _spectral_norm(drift),
            symmetric=symmetric,
        )

    def _kappa(self, gtot: np.ndarray) -> np.ndarray:
        """Noise level of each cell: the injected kappa0 (SET_NOISE) plus Johnson noise k_B T gtot_i / C0."""
        kappa = np.full(gtot.shape[0], self._kappa0)
        if self.spec.noise.johnson:
            kt_over_c = K_BOLTZMANN * self.spec.noise.temperature_k / self.spec.timing.c0_farad
            kappa = kappa + kt_over_c * gtot
        return kappa

    def _program_oscillator(self) -> OscillatorArray | None:
        """The oscillator array of the programmed matrix (None for RC cells); see ``spu_emulator.oscillator``."""
        if not self._lc:
            return None
        matrix = self._matrix
        return program_oscillator(
            matrix.conductance,
            self.parts.capacitance[: matrix.n],
            self.oscillator_parts,
            self._kappa(matrix.total_conductance),
            _spectral_norm,
        )

    def _drive(self, codes: np.ndarray) -> np.ndarray:
        """Node forcing for the present matrix, (n,): C^-1 (gin u + gtot v_os) in volts per tau for RC
        cells; gin u + gtot v_os in volts for oscillator cells (their capacitance is in the mass)."""
        n = codes.shape[0]
        u = dac_volts(codes, self.spec, self.parts)
        force = self.parts.input_conductance[:n] * u
        if self.spec.cell.opamp_offset_v > 0.0:
            force = force + self._matrix.total_conductance * self.parts.opamp_offset_v[:n]
        return force if self._lc else force / self.parts.capacitance[:n]
