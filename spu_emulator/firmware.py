"""The device's command handler: the only entry point a host uses.

``Firmware.handle(opcode, payload) -> (status, payload)`` is a small state
machine over the commands of ``firmware_spec/protocol.yaml``.  It never raises
for a bad request: it answers a status code and a message, and a request that
fails changes nothing (loads, analog state, accumulator and noise stream stay as
they were).  Payloads are flat mappings of ints, floats, strings and numpy
arrays, so a transport can serialise them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _kernels, _oscillator
from .converters import check_codes, code_max, dac_volts, element_conductances
from .exact import LinearModel, LowRankModel, prepare, prepare_ggn, propagate, window
from .oscillator import OscillatorArray, draw_oscillator_parts, program_oscillator
from .parts import NOISE_STREAM, draw_cell_parts, element_mismatch, ggn_mismatch
from .protocol import PROTOCOL_VERSION, Engine, OnSaturation, Opcode, Status, StatusBit
from .spec import DeviceSpec
from .timing import (
    load_ggn_time,
    load_matrix_time,
    load_vector_time,
    read_cov_time,
    read_mean_time,
    read_samples_time,
    read_state_time,
    run_time,
)

__all__ = ["Firmware", "ProgrammedMatrix", "ProgrammedGGN", "K_BOLTZMANN"]

K_BOLTZMANN = 1.380649e-23  # J/K


_UNSTABLE = (
    "the drift is unstable (an eigenvalue of C^-1 a has a non-positive real part), so the array would run"
    " away: the matrix is not positive definite; the run was not started"
)


class _Refused(Exception):
    def __init__(self, status: Status, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


@dataclass(frozen=True)
class ProgrammedMatrix:
    """What LOAD_MATRIX leaves on the device, computed once per load.

    conductance: (n, n) realised a_ij in g0 (codes, scale and mismatch applied);
    drift: (n, n) M = C^-1 a; total_conductance: (n,) gtot_i = sum_j |a_ij| + gin_i;
    noise_sd: (n,) sqrt(2 kappa_i) / c_i in V / sqrt(tau); drift_norm: ||M||_2 (estimate).
    """

    codes: np.ndarray
    conductance: np.ndarray
    drift: np.ndarray
    total_conductance: np.ndarray
    noise_sd: np.ndarray
    drift_norm: float

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

    j: (m, N) J array conductances in g0 (codes, scale and mismatch applied); h: (m, m) H array;
    jt: (m, N) the J^T array in J's orientation, separate parts with their own mismatch (the very
    same array as j when mismatch is off); damping: (N,) damping conductances; inv_c: (N,) 1 / c_i;
    total_conductance: (N,) gtot_i = sum_k |jt[k, i]| + |damping_i| + gin_i, what the integrator
    input of cell i sees (for Johnson noise and the op-amp offset); noise_sd: (N,) as for a dense
    matrix; column_norms: (N,) sum_k j[k, i]^2.  drift_norm: ||M||_2, estimated by power iteration on
    the factored form when first needed (only the transient engine needs it), O(N m) per iteration.
    """

    j: np.ndarray
    h: np.ndarray
    jt: np.ndarray
    damping: np.ndarray
    inv_c: np.ndarray
    total_conductance: np.ndarray
    noise_sd: np.ndarray
    column_norms: np.ndarray | None = None
    _drift_norm: float | None = None

    @property
    def n(self) -> int:
        return self.j.shape[1]

    @property
    def m(self) -> int:
        return self.j.shape[0]

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


class Firmware:
    """One emulated SPU.  ``seed`` fixes the device (its mismatch) and its noise stream."""

    def __init__(self, spec: DeviceSpec, seed: int | None = None):
        self.spec = spec
        self._seed = np.random.SeedSequence(seed)
        self.parts = draw_cell_parts(spec, self._seed)
        self._lc = spec.cells.kind == "oscillator"
        self.oscillator_parts = draw_oscillator_parts(spec, self._seed) if self._lc else None
        self._mismatch_cache: tuple[int, np.ndarray | None] | None = None
        self._ggn_mismatch_cache: tuple[tuple[int, int], Any] | None = None
        # the J and J^T arrays' memory, reprogrammed in place by the next GGN load of the same shape
        self._ggn_arrays: dict[str, np.ndarray] = {}
        self._handlers: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            Opcode.INFO: self._info,
            Opcode.RESET: self._reset,
            Opcode.LOAD_MATRIX: self._load_matrix,
            Opcode.LOAD_VECTOR: self._load_vector,
            Opcode.RUN: self._run,
            Opcode.READ_MEAN: self._read_mean,
            Opcode.READ_STATE: self._read_state,
            Opcode.STATUS: self._status,
            Opcode.LOAD_GGN: self._load_ggn,
            Opcode.READ_COV: self._read_cov,
            Opcode.READ_SAMPLES: self._read_samples,
            Opcode.SET_NOISE: self._set_noise,
        }
        self._power_on()

    # -- the one entry point -------------------------------------------------
    def handle(self, opcode: int, payload: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Execute one command; returns (status code, reply payload)."""
        handler = self._handlers.get(opcode)
        if handler is None:
            return Status.UNKNOWN_OPCODE, {"message": f"unknown opcode {opcode!r}"}
        try:
            return Status.OK, handler(payload or {})
        except _Refused as refusal:
            return refusal.status, {"message": str(refusal), **refusal.extra}

    # -- state ---------------------------------------------------------------
    def _power_on(self) -> None:
        noise_seed = np.random.SeedSequence(self._seed.entropy, spawn_key=(NOISE_STREAM,))
        self._rng = np.random.Generator(np.random.PCG64(noise_seed))
        self._state = np.zeros(self.spec.cells.count)
        self._momentum = np.zeros(self.spec.cells.count)  # inductor flux p of oscillator cells
        self._oscillator: OscillatorArray | None = None
        self._kappa0 = self.spec.noise.kappa0  # SET_NOISE changes it until the next RESET
        self._cov_acc: np.ndarray | None = None  # sum of code code^T over the last run, if it recorded
        self._snapshots: np.ndarray | None = None  # (k, n) codes of the last run, if it recorded
        self._matrix: ProgrammedMatrix | None = None
        self._linear: LinearModel | LowRankModel | None = None
        self._linear_why = ""  # why there is no exact model, when there is none
        self._linear_for: object | None = None  # the programmed array _linear was made for
        self._limits_for: object | None = None  # the model _limits were computed for
        self._limits: dict[float, tuple | None] = {}  # _reach_limits per z
        self._vector_codes: np.ndarray | None = None
        self._force: np.ndarray | None = None
        self._acc: np.ndarray | None = None
        self._samples = 0
        self._runs = 0
        self._flags = StatusBit(0)

    @property
    def rng(self) -> np.random.Generator:
        """The noise stream (tests replay it)."""
        return self._rng

    def analog_state(self) -> np.ndarray:
        """A copy of the node voltages of every cell (volts); for tests and debugging."""
        return self._state.copy()

    @property
    def matrix(self) -> ProgrammedMatrix | ProgrammedGGN | None:
        return self._matrix

    # -- commands --------------------------------------------------------------
    def _info(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "protocol_version": PROTOCOL_VERSION,
            "seed_entropy": str(self._seed.entropy),
        }

    def _reset(self, _: Mapping[str, Any]) -> dict[str, Any]:
        self._power_on()
        return {}

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
        why = check_codes(codes, self.spec.coupling.element_bits, self.spec.coupling.g_max, "element")
        if why:
            raise _Refused(Status.BAD_ARGUMENT, why)
        self._matrix = self._program(codes.copy())
        self._oscillator = self._program_oscillator()
        self._linear = None
        self._flags |= StatusBit.MATRIX_LOADED
        if self._vector_codes is not None and self._vector_codes.shape[0] == n:
            self._force = self._drive(self._vector_codes)
        return {"n": n, "drift_norm": self._matrix.drift_norm, "hardware_time": load_matrix_time(self.spec, n)}

    def _dense_size(self) -> int:
        """Largest n of a dense matrix: min(cells.count, coupling.max_dense_size)."""
        return min(self.spec.cells.count, self.spec.coupling.max_dense_size)

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
        bits, g_max = self.spec.coupling.element_bits, self.spec.coupling.g_max
        self._check_ggn_codes(j_codes, "J element")
        for codes, what in ((h_codes, "H element"), (damping_code, "damping element")):
            why = check_codes(codes, bits, g_max, what)
            if why:
                raise _Refused(Status.BAD_ARGUMENT, why)
        self._matrix = self._program_ggn(j_codes, h_codes, damping_code)
        self._flags |= StatusBit.MATRIX_LOADED
        if self._vector_codes is not None and self._vector_codes.shape[0] == n:
            self._force = self._drive(self._vector_codes)
        return {"n": n, "m": m, "hardware_time": load_ggn_time(self.spec, m, n)}

    def _ggn_array(self, name: str, codes: np.ndarray, mismatch: np.ndarray | None):
        """``element_conductances(codes, spec, mismatch)`` written into the array's memory of the last load
        when the shape is the same (the arrays are reprogrammed in place: no fresh m x N buffer per load),
        with the column sums of |a| and a^2.  One pass, over column ranges on a few threads.
        Returns (a, abs sums, square sums)."""
        bits = self.spec.coupling.element_bits
        unit = self.spec.coupling.g_max / code_max(bits) if bits > 0 else 1.0
        out = self._ggn_arrays.get(name)
        if out is None or out.shape != codes.shape:
            out = self._ggn_arrays[name] = np.empty(codes.shape)
        n = codes.shape[1]
        abs_sums, square_sums = np.empty(n), np.empty(n)
        factors = mismatch if mismatch is not None else np.empty((0, 0))
        _kernels.in_column_ranges(_kernels._program_array, codes, unit, factors, out, abs_sums, square_sums)
        return out, abs_sums, square_sums

    def _check_ggn_codes(self, codes: np.ndarray, what: str) -> None:
        """``check_codes`` for a large array, in one read over column ranges (same rules, same messages)."""
        bits, g_max = self.spec.coupling.element_bits, self.spec.coupling.g_max
        if (codes.dtype.kind not in "iu") if bits > 0 else (codes.dtype.kind != "f"):
            why = check_codes(codes[:0], bits, g_max, what)  # the dtype message
            raise _Refused(Status.BAD_ARGUMENT, why)
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
        j, abs_sums, square_sums = self._ggn_array("j", j_codes, mismatch.j if mismatch else None)
        if mismatch:
            jt, abs_sums, _ = self._ggn_array("jt", j_codes, mismatch.jt)
        else:
            jt = j
        h = element_conductances(h_codes, self.spec, mismatch.h if mismatch else None)
        d = float(element_conductances(damping_code, self.spec, None)[0])
        damping = d * mismatch.damping if mismatch else np.full(n, d)
        c = self.parts.capacitance[:n]
        gtot = abs_sums + np.abs(damping) + self.parts.input_conductance[:n]
        return ProgrammedGGN(
            j=j,
            h=h,
            jt=jt,
            damping=damping,
            inv_c=1.0 / c,
            total_conductance=gtot,
            noise_sd=np.sqrt(2.0 * self._kappa(gtot)) / c,
            column_norms=square_sums,
        )

    def _program(self, codes: np.ndarray) -> ProgrammedMatrix:
        n = codes.shape[0]
        if self._mismatch_cache is None or self._mismatch_cache[0] != n:
            self._mismatch_cache = (n, element_mismatch(self.spec, self._seed, n))
        a = element_conductances(codes, self.spec, self._mismatch_cache[1])
        c = self.parts.capacitance[:n]
        gin = self.parts.input_conductance[:n]
        gtot = np.abs(a).sum(axis=1) + gin
        drift = np.ascontiguousarray(a / c[:, None])
        kappa = self._kappa(gtot)
        return ProgrammedMatrix(
            codes=codes,
            conductance=a,
            drift=drift,
            total_conductance=gtot,
            noise_sd=np.sqrt(2.0 * kappa) / c,
            drift_norm=_spectral_norm(drift),
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
        self._flags |= StatusBit.VECTOR_LOADED
        self._force = self._drive(codes) if self._matrix is not None and self._matrix.n == n else None
        return {"n": n, "hardware_time": load_vector_time(self.spec, n)}

    def _run(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        t = _number(payload, "t")
        burn_in = _number(payload, "burn_in", 0.0)
        limit = self.spec.timing.max_run_time
        if not 0.0 < t <= limit:
            raise _Refused(Status.BAD_ARGUMENT, f"run time t = {t!r} tau must be in (0, {limit:g}]")
        if not 0.0 <= burn_in < t:
            raise _Refused(Status.BAD_ARGUMENT, f"burn_in = {burn_in!r} tau must be in [0, t = {t:g})")
        engine = _choice(payload, "engine", Engine, Engine.auto)
        on_saturation = _choice(payload, "on_saturation", OnSaturation, OnSaturation["raise"])
        matrix = self._matrix
        if matrix is None or self._vector_codes is None:
            raise _Refused(Status.BAD_STATE, "load a matrix and a vector before RUN")
        if self._vector_codes.shape[0] != matrix.n:
            raise _Refused(
                Status.BAD_STATE,
                f"the matrix is {matrix.n}x{matrix.n} but the vector has {self._vector_codes.shape[0]} entries",
            )
        if isinstance(matrix, ProgrammedGGN) and _integer(payload, "record_cov", 0) and matrix.n > self._dense_size():
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_cov needs an N x N second-moment accumulator, and this GGN array has N = {matrix.n} cells,"
                f" more than the {self._dense_size()} of the dense array (coupling.max_dense_size); record"
                " snapshots (record_samples) instead",
            )
        record = _Record.from_payload(payload, matrix.n, engine)
        model = self._linear_model()
        if not self.spec.rails.enabled and model is not None and not model.stable:
            # with no rails to stop it the state would grow without bound; refuse before running
            raise _Refused(Status.SATURATED, _UNSTABLE, runaway=1)
        # the exact engine draws the window's sum, not its conversions: a recording run steps
        if engine == Engine.transient or (
            engine == Engine.auto and (record.on or not self._linear_is_safe(t, burn_in))
        ):
            report, state, acc, samples = self._run_transient(t, burn_in, on_saturation, record)
        else:
            report, state, acc, samples = self._run_exact(t, burn_in)
        if not (np.all(np.isfinite(state)) and np.all(np.isfinite(acc))):
            # never keep a state no later read could use; the run is discarded, the state as before it
            raise _Refused(
                Status.INTERNAL,
                f"the run of t = {t!r} tau (burn_in {burn_in!r}) produced a non-finite state, so it was discarded"
                " and the device keeps the state it had; please report this with the spec, seed and calls",
            )
        self._store_state(state)
        self._acc = acc
        self._cov_acc = record.cov_acc if record.cov_acc.size else None
        self._snapshots = record.snapshots if record.snapshots.shape[0] else None
        self._samples = samples
        self._runs += 1
        self._flags |= StatusBit.HAS_RUN
        self._flags &= ~(StatusBit.SATURATED | StatusBit.ADC_CLIPPED)
        if report["saturated"]:
            self._flags |= StatusBit.SATURATED
        if report["adc_clipped"]:
            self._flags |= StatusBit.ADC_CLIPPED
        return report

    def _adc_lsb(self) -> float:
        adc = self.spec.adc
        return adc.range_v / code_max(adc.bits) if adc.bits > 0 else 0.0

    def _run_transient(self, t: float, burn_in: float, on_saturation: int, record: _Record | None = None):
        matrix = self._matrix
        n = matrix.n
        record = record if record is not None else _Record.off(n)
        period = 1.0 / self.spec.adc.sample_rate
        # RC: the fastest decay rate ||C^-1 a||; oscillator: the fastest resonance (BAOAB's O step is exact)
        rate = self._oscillator.omega_max if self._lc else matrix.drift_norm
        dt_max = self.spec.integrator.step_factor / rate if rate > 0 else period
        steps_per_sample = max(1, math.ceil(period / dt_max - 1e-9))
        dt = period / steps_per_sample
        n_steps = max(1, round(t / dt))
        m0 = window(t, burn_in, period)[0]
        first_sample_step = (m0 + 1) * steps_per_sample
        record.check_window(n_steps // steps_per_sample - m0, period)
        adc = self.spec.adc
        rail = self.spec.rails.v_rail if self.spec.rails.enabled else 0.0

        state = self._phase_state()
        acc = np.zeros(n)
        adc_args = (
            rail,
            self.parts.adc_gain[:n],
            self.parts.adc_offset_v[:n],
            adc.noise_v,
            self._adc_lsb(),
            float(code_max(adc.bits)),
            self._rng,
            acc,
            np.empty(n),
            record.cov_acc,
            record.snapshots,
            record.stride,
        )
        rng_before = self._rng.bit_generator.state
        if self._lc:
            lc = self._oscillator
            steps, samples, saturated, clipped, runaway = _oscillator._run_lc(
                lc.conductance,
                self._force,
                lc.inv_mass,
                lc.friction_rate,
                lc.momentum_sd,
                state[:n],  # views: the kernel updates x and p of the phase state in place
                state[n:],
                dt,
                n_steps,
                steps_per_sample,
                first_sample_step,
                *adc_args,
            )
        elif isinstance(matrix, ProgrammedGGN):
            steps, samples, saturated, clipped, runaway = _kernels._run_ggn(
                matrix.j,
                matrix.h,
                matrix.jt,
                matrix.damping,
                matrix.inv_c,
                self._force,
                matrix.noise_sd,
                state,
                dt,
                n_steps,
                steps_per_sample,
                first_sample_step,
                *adc_args,
                np.empty(matrix.m),
                np.empty(matrix.m),
            )
        else:
            steps, samples, saturated, clipped, runaway = _kernels._run_rc(
                matrix.drift,
                self._force,
                matrix.noise_sd,
                state,
                dt,
                n_steps,
                steps_per_sample,
                first_sample_step,
                *adc_args,
            )
        report = {
            "analog_time": n_steps * dt,
            "steps": int(steps),
            "dt": dt,
            "samples": int(samples),
            "engine": int(Engine.transient),
            "saturated": int(bool(saturated)),
            "adc_clipped": int(clipped),
            "runaway": int(bool(runaway)),
            "hardware_time": run_time(self.spec, n_steps * dt),
        }
        if runaway or (saturated and on_saturation == OnSaturation["raise"]):
            self._rng.bit_generator.state = rng_before
            if runaway:
                why = (
                    f"the array ran away (|V| above {_kernels.RUNAWAY_V:g} V after {steps} of {n_steps} steps):"
                    " the drift is unstable, so the matrix is not positive definite"
                )
            else:
                why = (
                    f"a node hit the rails at +-{rail:g} V: the matrix may not be positive definite,"
                    " or the solution is beyond the rails for this input"
                )
            # a rail-limited run can be kept with on_saturation=flag; a run-away cannot
            fit = {} if runaway else self._fit_factor()
            raise _Refused(
                Status.SATURATED, why + "; the run was discarded", keepable=int(not runaway), **fit, **report
            )
        return report, state, acc, int(samples)

    def _linear_model(self) -> LinearModel | LowRankModel | None:
        """The exact engine's model of the programmed array, made once per array; None when there is
        none (a GGN array with mismatch, or with cells that differ: ``_linear_why`` says which)."""
        matrix = self._matrix
        if self._linear_for is not matrix or (self._linear is None and not self._linear_why):
            self._linear, self._linear_why = None, ""
            if self._lc:  # the 2n phase state (x, p); its drift is never symmetric, so the general form
                self._linear = prepare(self._oscillator.drift, self._oscillator.noise_sd)
            elif isinstance(matrix, ProgrammedGGN):
                if matrix.jt is not matrix.j:
                    self._linear_why = (
                        "its J and J^T arrays are separate parts with element mismatch, so its drift is not"
                        " symmetric, and the general exact form would need the N x N drift"
                    )
                else:
                    self._linear, self._linear_why = prepare_ggn(
                        matrix.j, matrix.h, matrix.damping, matrix.inv_c, matrix.noise_sd, matrix.column_norms
                    )
            else:
                self._linear = prepare(matrix.drift, matrix.noise_sd)
            self._linear_for = matrix
        return self._linear

    def _phase_state(self) -> np.ndarray:
        """A copy of the dynamical state of the programmed cells: V (n,) for RC cells, (x, p) (2n,) for oscillators."""
        n = self._matrix.n
        if self._lc:
            return np.concatenate([self._state[:n], self._momentum[:n]])
        return self._state[:n].copy()

    def _phase_force(self) -> np.ndarray:
        """The drive of the exact engine's form, (n,) or (2n,) like :meth:`_phase_state`."""
        return self._oscillator.phase_force(self._force) if self._lc else self._force

    def _store_state(self, state: np.ndarray) -> None:
        n = self._matrix.n
        self._state[:n] = state[:n]
        if self._lc:
            self._momentum[:n] = state[n:]

    def _linear_is_safe(self, t: float, burn_in: float) -> bool:
        """True when the exact engine is exact for a run (t, burn_in) from the present state.

        The array must be stable and contractive (so the mean path stays within
        e^{-mu s} |V(0) - V*| of V*; an oscillator array, which is not contractive, is bounded by
        ``OscillatorArray.reach`` instead); every node must stay z standard deviations inside the
        rails for the whole run, and inside the ADC's full scale from the first conversion of the
        window on, with z from a union bound over cells and correlation times at probability 1e-9;
        and a quantised ADC must be dithered by at least half an LSB of fresh noise per sample.
        The mean path is bounded first in O(n), then, if that bound is too loose, cell by cell
        (``LinearModel.reach(tight=True)``).
        """
        model = self._linear_model()
        if model is None or not (model.stable and (model.contractive or self._lc)):
            return False
        n = self._matrix.n
        looks = 2.0 * n * (1.0 + t * model.rate_max)
        z = max(6.0, math.sqrt(2.0 * math.log(looks / 1e-9)))
        limits = self._reach_limits(model, z)
        if limits is None:
            return False
        rail_limit, adc_limit = limits
        period = 1.0 / self.spec.adc.sample_rate
        m0, m1 = window(t, burn_in, period)
        checks = []  # (from which time, limit)
        if rail_limit is not None:
            checks.append((0.0, rail_limit))
        if adc_limit is not None and m1 > m0:  # the ADC only converts in the window
            checks.append(((m0 + 1) * period, adc_limit))
        target = model.fixed_point(self._phase_force())
        if self._lc:  # an oscillator overshoots: bound its mean path by a Lyapunov level set instead
            reach = self._oscillator.reach(self._phase_state(), target)
            return reach is not None and not any(np.any(reach >= limit) for _, limit in checks)
        state = self._state[:n]
        return not any(
            np.any(model.reach(state, target, start, stop=t) >= limit)
            and np.any(model.reach(state, target, start, tight=True, stop=t) >= limit)
            for start, limit in checks
        )

    def _reach_limits(
        self, model: LinearModel | LowRankModel, z: float
    ) -> tuple[np.ndarray | None, np.ndarray | None] | None:
        """Per cell, the reach of the mean path that leaves z stationary standard deviations inside the
        rails, and inside the ADC's full scale (gain |g|, offset o: |g| (reach + z spread) + |o| < range),
        volts (n,) each, None where there are no rails or the ADC is ideal; None in all when the ADC is not
        dithered, whatever the reach.  Depends on the model and z only, so it is kept for the model's
        lifetime: a loop of equal runs pays O(n) per run."""
        if self._limits_for is not model or len(self._limits) >= 64:  # 64: runs of many lengths
            self._limits_for, self._limits = model, {}
        if z in self._limits:
            return self._limits[z]
        n = self._matrix.n
        stationary_var = model.stationary_var_upper()[:n]  # of the node voltages (x of an oscillator's (x, p))
        rail_limit = adc_limit = None
        if self.spec.rails.enabled:
            rail_limit = self.spec.rails.v_rail - z * np.sqrt(stationary_var)
        adc = self.spec.adc
        if adc.bits > 0:
            fresh = model.fresh_var_lower(1.0 / adc.sample_rate)[:n] + adc.noise_v**2
            if np.any(np.sqrt(fresh) < 0.5 * self._adc_lsb()):
                self._limits[z] = None
                return None
            spread = np.sqrt(stationary_var + adc.noise_v**2)
            with np.errstate(divide="ignore"):
                span = (adc.range_v - np.abs(self.parts.adc_offset_v[:n])) / np.abs(self.parts.adc_gain[:n])
            adc_limit = span - z * spread
        self._limits[z] = rail_limit, adc_limit
        return self._limits[z]

    def _refuse_clipped_equilibrium(self, model: LinearModel, target: np.ndarray) -> None:
        """The exact engine has no rails and no ADC full scale: refuse when the equilibrium itself
        (V* plus 3 stationary standard deviations) lies beyond either, since its answer would be impossible."""
        n = target.shape[0]
        reach = np.abs(target) + 3.0 * np.sqrt(model.stationary_var_upper()[:n])
        limits = []
        if self.spec.rails.enabled:
            limits.append(("the rails", self.spec.rails.v_rail, reach))
        if self.spec.adc.bits > 0:
            seen = np.abs(self.parts.adc_gain[:n]) * reach + np.abs(self.parts.adc_offset_v[:n])
            limits.append(("the ADC full scale", self.spec.adc.range_v, seen))
        for what, limit, level in limits:
            worst = int(np.argmax(level))
            if level[worst] >= limit:
                raise _Refused(
                    Status.SATURATED,
                    f"the exact engine cannot model clipping, and the equilibrium of cell {worst} reaches"
                    f" {level[worst]:.3g} V, beyond {what} at {limit:g} V; scale b down, or use"
                    " engine='transient' to run into the limit",
                    **self._fit_factor(),
                )

    def _fit_factor(self) -> dict[str, float]:
        """{"fit_factor": f}: the input scaled down by f puts the equilibrium at 70 % of the smaller of the
        rails and the ADC range (f = max |V*| / (0.7 limit)); {} without a stable linear model.  O(n^2)."""
        model = self._linear_model()
        limits = [self.spec.rails.v_rail] if self.spec.rails.enabled else []
        if self.spec.adc.bits > 0:
            limits.append(self.spec.adc.range_v)
        if model is None or not model.stable or not limits:
            return {}
        n = self._matrix.n
        level = float(np.abs(model.fixed_point(self._phase_force())[:n]).max())
        return {"fit_factor": level / (_FIT_FILL * min(limits))} if level > 0.0 else {}

    def _run_exact(self, t: float, burn_in: float):
        model = self._linear_model()
        if model is None:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"engine 'exact' cannot run this GGN array: {self._linear_why}; run it with engine 'transient'"
                " (or 'auto', which then takes it)",
            )
        if not model.stable:
            raise _Refused(Status.SATURATED, _UNSTABLE, runaway=1)
        n = self._matrix.n
        adc = self.spec.adc
        target = model.fixed_point(self._phase_force())
        self._refuse_clipped_equilibrium(model, target[:n])
        mean_v, final, count = propagate(
            model,
            self._phase_state(),
            target,
            t,
            burn_in,
            1.0 / adc.sample_rate,
            self._rng,
        )
        mean_v = mean_v[:n]  # the ADCs see the node voltages only
        gain, offset = self.parts.adc_gain[:n], self.parts.adc_offset_v[:n]
        acc = np.zeros(n)
        if count:
            if adc.noise_v > 0.0:
                mean_v = mean_v + adc.noise_v / math.sqrt(count) * self._rng.standard_normal(n)
            mean_code = gain * mean_v + offset
            lsb = self._adc_lsb()
            if lsb > 0.0:
                # rounding as independent uniform errors of one LSB: variance 1/12 code^2 per sample
                mean_code = mean_code / lsb + math.sqrt(1.0 / (12.0 * count)) * self._rng.standard_normal(n)
            acc = mean_code * count
        report = {
            "analog_time": t,
            "steps": 0,
            "dt": 0.0,
            "samples": count,
            "engine": int(Engine.exact),
            "saturated": 0,
            "adc_clipped": 0,
            "runaway": 0,
            "hardware_time": run_time(self.spec, t),
        }
        return report, final, acc, count

    def _read_mean(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & StatusBit.HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN before READ_MEAN")
        if self._samples == 0:
            raise _Refused(
                Status.BAD_STATE,
                "the last run took no ADC samples: its window t - burn_in was shorter than one"
                f" sample period ({1.0 / self.spec.adc.sample_rate:g} tau)",
            )
        return {
            "mean_codes": self._acc / self._samples,
            "samples": self._samples,
            "hardware_time": read_mean_time(self.spec, self._acc.shape[0], self._samples),
        }

    def _read_state(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & StatusBit.HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN before READ_STATE")
        n = self._matrix.n
        adc = self.spec.adc
        out = np.empty(n)
        clipped = _kernels._adc_snapshot(
            self._state[:n].copy(),
            self.parts.adc_gain[:n],
            self.parts.adc_offset_v[:n],
            adc.noise_v,
            adc.range_v / code_max(adc.bits) if adc.bits > 0 else 0.0,
            float(code_max(adc.bits)),
            self._rng,
            out,
        )
        return {"codes": out, "clipped": int(clipped), "hardware_time": read_state_time(self.spec, n)}

    def _status(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "word": int(self._flags),
            "matrix_n": self._matrix.n if self._matrix is not None else 0,
            "vector_n": self._vector_codes.shape[0] if self._vector_codes is not None else 0,
            "runs": self._runs,
            "samples": self._samples,
        }

    def _read_cov(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & StatusBit.HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN with record_cov = 1 before READ_COV")
        if self._cov_acc is None:
            raise _Refused(
                Status.BAD_STATE, "the last run did not record second moments; RUN with record_cov = 1 before READ_COV"
            )
        count = self._samples
        if count < 2:
            raise _Refused(
                Status.BAD_STATE,
                f"the last run took {count} ADC sample(s) and a covariance needs 2; lengthen its window t - burn_in"
                f" beyond {2.0 / self.spec.adc.sample_rate:g} tau",
            )
        mean = self._acc / count
        cov = (self._cov_acc - count * np.outer(mean, mean)) / (count - 1)
        return {
            "cov_codes": 0.5 * (cov + cov.T),
            "mean_codes": mean,
            "samples": count,
            "hardware_time": read_cov_time(self.spec, mean.shape[0], count),
        }

    def _read_samples(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        k = _integer(payload, "k", -1) if "k" in payload else None
        if k is not None and k <= 0:
            raise _Refused(Status.BAD_ARGUMENT, f"k = {k} snapshots: ask for at least 1 (or leave k out for all)")
        if not self._flags & StatusBit.HAS_RUN:
            raise _Refused(
                Status.BAD_STATE, "no run since power-on or reset; RUN with record_samples = k before READ_SAMPLES"
            )
        if self._snapshots is None:
            raise _Refused(
                Status.BAD_STATE, "the last run recorded no snapshots; RUN with record_samples = k before READ_SAMPLES"
            )
        recorded = self._snapshots.shape[0]
        if k is not None and k > recorded:
            raise _Refused(
                Status.BAD_STATE,
                f"the last run recorded {recorded} snapshots and {k} were asked for; RUN with record_samples >= {k}",
            )
        codes = self._snapshots[: recorded if k is None else k].copy()
        return {
            "codes": codes,
            "recorded": recorded,
            "hardware_time": read_samples_time(self.spec, codes.shape[1], codes.shape[0]),
        }

    def _set_noise(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        kappa0 = _number(payload, "kappa0")
        top = self.spec.noise.kappa0_max
        if top <= 0.0:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"the noise source of {self.spec.name} is fixed at kappa0 = {self.spec.noise.kappa0:g} V^2"
                " (its spec has noise.kappa0_max = 0); use a device whose noise source can be turned up",
            )
        if not 0.0 <= kappa0 <= top:
            raise _Refused(Status.BAD_ARGUMENT, f"kappa0 = {kappa0!r} V^2 is outside the noise source's [0, {top:g}]")
        self._kappa0 = kappa0
        matrix = self._matrix
        if matrix is not None:  # re-derive the noise of the programmed array
            noise_sd = np.sqrt(2.0 * self._kappa(matrix.total_conductance)) / self.parts.capacitance[: matrix.n]
            self._matrix = dataclasses.replace(matrix, noise_sd=noise_sd)
            self._oscillator = self._program_oscillator()
            self._linear = None
        return {"kappa0": kappa0}

    def _check_size(self, n: int, what: str) -> None:
        if n > self.spec.cells.count:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"{what} of size {n} does not fit the {self.spec.cells.count} cells of {self.spec.name}",
            )


def _array(payload: Mapping[str, Any], key: str, ndim: int) -> np.ndarray:
    value = payload.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != ndim:
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be a {ndim}-d array")
    return value


def _number(payload: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be finite, got {value!r}")
    return value


def _choice(payload: Mapping[str, Any], key: str, enum: type, default: int) -> int:
    value = payload.get(key, default)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(value)  # 1.0 and True would pass as members of an IntEnum
        return enum(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum)
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} = {value!r} is not one of {allowed}") from None


def _integer(payload: Mapping[str, Any], key: str, default: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be an integer, got {value!r}")
    return int(value)


# fit_factor aims the equilibrium at this fraction of the smaller of the rails and the ADC range
_FIT_FILL = 0.7

# the snapshot buffer's capacity, in values: 256 MiB of float64, the wire's largest payload
_MAX_SNAPSHOT_VALUES = 1 << 25


@dataclass(frozen=True)
class _Record:
    """What a RUN records besides the mean (RUN's record_cov, record_samples, sample_stride).

    cov_acc: (n, n) accumulator of code code^T over the window, or (0, 0) for off;
    snapshots: (k, n) buffer of the stride-th, 2 stride-th, ... conversion after burn_in,
    or (0, n) for off.  The kernels fill them (``_kernels._record``); off costs nothing.
    """

    cov_acc: np.ndarray
    snapshots: np.ndarray
    stride: int

    @property
    def on(self) -> bool:
        return self.cov_acc.size > 0 or self.snapshots.shape[0] > 0

    @classmethod
    def off(cls, n: int) -> _Record:
        return cls(np.zeros((0, 0)), np.zeros((0, n)), 1)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], n: int, engine: int) -> _Record:
        cov = _integer(payload, "record_cov", 0)
        k = _integer(payload, "record_samples", 0)
        stride = _integer(payload, "sample_stride", 1)
        if cov not in (0, 1):
            raise _Refused(Status.BAD_ARGUMENT, f"record_cov = {cov} must be 0 or 1")
        if k < 0 or k * n > _MAX_SNAPSHOT_VALUES:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_samples = {k} must be in [0, {_MAX_SNAPSHOT_VALUES // n}] for n = {n}"
                f" (the snapshot buffer holds {_MAX_SNAPSHOT_VALUES} values); split the sampling over several runs",
            )
        if stride < 1:
            raise _Refused(Status.BAD_ARGUMENT, f"sample_stride = {stride} must be at least 1")
        if (cov or k) and engine == Engine.exact:
            raise _Refused(
                Status.BAD_ARGUMENT,
                "the exact engine draws a run's average in one go, not its conversions, so it cannot record"
                " second moments or snapshots; use engine transient (or auto, which steps a recording run)",
            )
        return cls(np.zeros((n, n) if cov else (0, 0)), np.zeros((k, n)), stride)

    def check_window(self, conversions: int, period: float) -> None:
        """Refuse (before anything runs) a snapshot count the run's window cannot hold."""
        k = self.snapshots.shape[0]
        need = k * self.stride
        if need > conversions:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_samples = {k} with sample_stride = {self.stride} needs {need} ADC conversions after"
                f" burn_in, but the window holds {max(conversions, 0)} ({period:g} tau apart); lengthen t by"
                f" {(need - max(conversions, 0)) * period:g} tau",
            )
