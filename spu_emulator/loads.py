"""The LOAD commands' handlers (LOAD_MATRIX, LOAD_GGN, LOAD_VECTOR): their refusals, then the programming.

``Loads`` is the part of :class:`~spu_emulator.firmware.Firmware` (a mixin) that checks a load's codes
against the spec (shape, size, memory budget, code range) before anything changes, programs the array
(``ArrayProgramming``) and answers the reply; a refused load leaves the device as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .budget import check_budget, dense_bytes, ggn_bytes
from .converters import check_codes
from .payload import _array, _Refused
from .protocol import Status, StatusBit
from .timing import load_ggn_time, load_matrix_time, load_vector_time

# the status word's bits as plain ints (see firmware.py)
_MATRIX_LOADED = int(StatusBit.MATRIX_LOADED)
_VECTOR_LOADED = int(StatusBit.VECTOR_LOADED)


class Loads:
    """The handlers of the three LOAD commands (see the module docstring)."""

    def _load_matrix(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        codes = _array(payload, "codes", 2)
        n = codes.shape[0]
        if codes.shape != (n, n) or n == 0:
            raise _Refused(Status.BAD_ARGUMENT, f"matrix codes must be square and non-empty, got shape {codes.shape}")
        self._check_size(n, "matrix")
        dense = self.spec.coupling.max_dense_size
        if n > dense:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"a dense matrix of size {n} is larger than the {dense} x {dense} dense array of {self.spec.name}"
                " (coupling.max_dense_size); load a structured curvature with LOAD_GGN, or use a larger spec",
            )
        check_budget(self.spec, dense_bytes(n), f"a dense load of size {n}", "load a smaller matrix")
        why = check_codes(codes, self.spec.coupling.element_bits, self.spec.coupling.g_max, "element")
        if why:
            raise _Refused(Status.BAD_ARGUMENT, why)
        self._forget_models()
        self._matrix = self._program(codes.copy())
        self._oscillator = self._program_oscillator()
        self._flags |= _MATRIX_LOADED
        if self._vector_codes is not None and self._vector_codes.shape[0] == n:
            self._force = self._drive(self._vector_codes)
        return {"n": n, "drift_norm": self._matrix.drift_norm, "hardware_time": load_matrix_time(self.spec, n)}

    def _load_ggn(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        j_codes = _array(payload, "j_codes", 2)
        h_codes = _array(payload, "h_codes", 2)
        damping_code = _array(payload, "damping_code", 1)
        m, n = j_codes.shape
        if m == 0 or n == 0:
            raise _Refused(Status.BAD_ARGUMENT, f"J codes must be non-empty, got shape {j_codes.shape}")
        if h_codes.shape != (m, m):
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"H codes must have shape ({m}, {m}) to match J codes of shape {j_codes.shape}, got {h_codes.shape}",
            )
        if damping_code.shape != (1,):
            raise _Refused(Status.BAD_ARGUMENT, f"damping_code must have shape (1,), got {damping_code.shape}")
        if self._lc:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"{self.spec.name} has oscillator cells, and the structured GGN arrays drive RC cells only;"
                " load the dense matrix J^T H J + damping I, or use an RC device",
            )
        self._check_size(n, "GGN")
        rows = self.spec.coupling.max_ggn_rows
        if m > rows:
            has = f"only {rows} rows" if rows else "none"
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"a GGN with m = {m} rows does not fit: the structured arrays of {self.spec.name} have {has}"
                " (coupling.max_ggn_rows); use a smaller batch, or a spec with wider arrays",
            )
        what = f"a GGN load of m = {m} rows on N = {n} cells"
        mismatched = self.spec.coupling.mismatch > 0.0
        check_budget(self.spec, ggn_bytes(m, n, j_codes.itemsize, mismatched), what, "use a smaller batch (fewer rows)")
        bits, g_max = self.spec.coupling.element_bits, self.spec.coupling.g_max
        self._check_ggn_codes(j_codes, "J element")
        for codes, what in ((h_codes, "H element"), (damping_code, "damping element")):
            why = check_codes(codes, bits, g_max, what)
            if why:
                raise _Refused(Status.BAD_ARGUMENT, why)
        self._forget_models()
        self._matrix = self._program_ggn(j_codes, h_codes, damping_code)
        self._flags |= _MATRIX_LOADED
        if self._vector_codes is not None and self._vector_codes.shape[0] == n:
            self._force = self._drive(self._vector_codes)
        return {"n": n, "m": m, "hardware_time": load_ggn_time(self.spec, m, n)}

    def _load_vector(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        codes = _array(payload, "codes", 1)
        n = codes.shape[0]
        if n == 0:
            raise _Refused(Status.BAD_ARGUMENT, "vector codes must be non-empty")
        self._check_size(n, "vector")
        why = check_codes(codes, self.spec.dac.bits, self.spec.dac.range_v, "DAC")
        if why:
            raise _Refused(Status.BAD_ARGUMENT, why)
        self._vector_codes = codes.copy()
        self._flags |= _VECTOR_LOADED
        self._force = self._drive(codes) if self._matrix is not None and self._matrix.n == n else None
        return {"n": n, "hardware_time": self._hardware_time(load_vector_time, n)}

    def _forget_models(self) -> None:
        """Drop the exact engine's model of the array being replaced, and what was memoised from it, before
        the new array is programmed: a large load then does not hold two models at its peak (each is made
        again, the same, when next needed).  Called once a load's checks have passed."""
        self._linear, self._linear_why, self._linear_for = None, "", None
        self._limits_for, self._limits, self._lowest_limits = None, {}, {}
        self._equilibrium_memo = self._target_peak = None
