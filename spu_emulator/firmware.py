"""The device's command handler: the only entry point a host uses.

``Firmware.handle(opcode, payload) -> (status, payload)`` is a small state
machine over the commands of ``firmware_spec/protocol.yaml``.  It never raises
for a bad request: it answers a status code and a message, and a request that
fails changes nothing (loads, analog state, accumulator and noise stream stay as
they were).  Payloads are flat mappings of ints, floats, strings and numpy
arrays, so a transport can serialise them as they are.  Its parts, each a mixin: ``loads`` (the LOAD
commands), ``arrays`` (programming), ``engines`` and ``safety`` (running, and which engine may),
``readout`` (the READ commands).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .arrays import K_BOLTZMANN, ArrayProgramming, ProgrammedGGN, ProgrammedMatrix
from .blas import fixed_threads
from .budget import check_budget, dense_bytes, ggn_bytes, recording_bytes
from .engines import _UNSTABLE, Engines
from .exact import LinearModel
from .loads import Loads
from .lowrank import LowRankModel
from .oscillator import OscillatorArray, draw_oscillator_parts
from .parts import NOISE_STREAM, draw_cell_parts
from .payload import _choice, _integer, _number, _Refused
from .protocol import PROTOCOL_VERSION, Engine, OnSaturation, Opcode, Status, StatusBit
from .readout import Readout
from .recording import _Record
from .spec import DeviceSpec
from .wire import PROTOCOL as _WIRE_PROTOCOL

# the request fields of each command (protocol.yaml ``commands``): any other field is refused
_REQUEST_FIELDS: dict[int, frozenset[str]] = {
    int(Opcode[name]): frozenset(command["request"])
    for name, command in _WIRE_PROTOCOL["commands"].items()
    if name in Opcode.__members__
}

__all__ = ["Firmware", "ProgrammedMatrix", "ProgrammedGGN", "K_BOLTZMANN"]

# the status word's bits as plain ints: the word is kept as an int (IntFlag arithmetic costs a few us a
# command, and a loop of small calls pays it several times per round)
_HAS_RUN = int(StatusBit.HAS_RUN)
_SATURATED = int(StatusBit.SATURATED)
_ADC_CLIPPED = int(StatusBit.ADC_CLIPPED)


# commands whose handlers make no BLAS or LAPACK call (elementwise numpy and the ADC kernel only), so they
# skip fixed_threads and its cost (about 15 us when the host runs BLAS on more threads): the small calls of
# a loop, load_vector + run + read_mean, pay it once
_WITHOUT_BLAS = frozenset(
    {Opcode.INFO, Opcode.RESET, Opcode.LOAD_VECTOR, Opcode.READ_MEAN, Opcode.READ_STATE, Opcode.STATUS}
    | {Opcode.READ_SAMPLES}
)


class Firmware(Loads, ArrayProgramming, Engines, Readout):
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
        self._times: dict[tuple, dict[str, float]] = {}  # _hardware_time's memo
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
            Opcode.READ_LAGGED: self._read_lagged,
            Opcode.SET_DAMPING: self._set_damping,
            Opcode.ABORT: self._abort,
        }
        self._power_on()

    # -- the one entry point -------------------------------------------------
    def handle(self, opcode: int, payload: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Execute one command; returns (status code, reply payload)."""
        handler = self._handlers.get(opcode)
        if handler is None:
            return Status.UNKNOWN_OPCODE, {"message": f"unknown opcode {opcode!r}"}
        payload = payload or {}
        allowed = _REQUEST_FIELDS.get(opcode)
        if allowed is not None and not allowed.issuperset(payload):
            # refused, not ignored: a misspelt or newer option must not be dropped silently (PROTOCOL.md)
            unknown = ", ".join(repr(name) for name in payload if name not in allowed)
            known = ", ".join(sorted(allowed)) or "none"
            return Status.BAD_ARGUMENT, {
                "message": f"{Opcode(opcode).name} has no request field {unknown} (its fields: {known}); remove it"
            }
        try:
            if opcode in _WITHOUT_BLAS:
                return Status.OK, handler(payload)
            with fixed_threads():  # the device's BLAS on a fixed thread count: its bits do not depend on the host's
                return Status.OK, handler(payload)
        except _Refused as refusal:
            return refusal.status, {"message": str(refusal), **refusal.extra}

    # -- state ---------------------------------------------------------------
    def _power_on(self) -> None:
        noise_seed = np.random.SeedSequence(self._seed.entropy, spawn_key=(NOISE_STREAM,))
        self._rng = np.random.Generator(np.random.PCG64(noise_seed))
        self._state = np.zeros(self.spec.cells.count)
        self._momentum = np.zeros(self.spec.cells.count)  # inductor flux p of oscillator cells
        # the last normals of the transient RC step, carried between runs with the state (engines)
        self._noise_prev: np.ndarray | None = None
        self._next_noise_prev: np.ndarray | None = None
        self._oscillator: OscillatorArray | None = None
        self._kappa0 = self.spec.noise.kappa0  # SET_NOISE changes it until the next RESET
        # RESET frees the caches of the last loads too (mismatch factors and array memory: redrawn when needed)
        self._mismatch_cache = self._ggn_mismatch_cache = None
        self._ggn_arrays = {}
        if self._lc:  # SET_DAMPING changes the damping resistors until the next RESET: redraw the spec's
            self.oscillator_parts = draw_oscillator_parts(self.spec, self._seed)
        self._cov_acc: np.ndarray | None = None  # sum of code code^T over the last run, if it recorded
        self._snapshots: np.ndarray | None = None  # (k, n) codes of the last run, if it recorded
        self._lagged: tuple[np.ndarray, np.ndarray] | None = None  # (lags, sums) of the last run, if it recorded
        self._matrix: ProgrammedMatrix | None = None
        self._linear: LinearModel | LowRankModel | None = None
        self._linear_why = ""  # why there is no exact model, when there is none
        self._linear_for: object | None = None  # the programmed array _linear was made for
        self._limits_for: object | None = None  # the model _limits were computed for
        self._limits: dict[float, tuple | None] = {}  # _reach_limits per z
        self._lowest_limits: dict[tuple, float] = {}  # the lowest of those limits per (z, checks)
        self._target_peak: tuple[np.ndarray, float] | None = None  # (V*, max |V*|) of the last drive
        self._vector_codes: np.ndarray | None = None
        self._force: np.ndarray | None = None
        self._acc: np.ndarray | None = None
        self._samples = 0
        self._runs = 0
        self._flags = 0  # the status word (StatusBit bits), an int
        # (model, max 3 sd, max |ADC gain|, max |ADC offset|): _refuse_clipped_equilibrium's scalars
        self._equilibrium_memo: tuple | None = None

    def _hardware_time(self, model: Callable[..., dict[str, float]], *arguments: Any) -> dict[str, float]:
        """model(spec, *arguments) of ``timing``, memoised per arguments (the spec is fixed): a loop of small
        calls asks for the same few; a fresh dict each time, since a reply is the caller's to keep."""
        key = (model, *arguments)
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= 64:  # runs of many lengths
                self._times.clear()
            times = self._times[key] = model(self.spec, *arguments)
        return dict(times)

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
        record = _Record.from_payload(payload, matrix.n, engine)  # zeroed buffers: no page is touched yet
        if record.on or record.lagged_on:
            if isinstance(matrix, ProgrammedGGN):
                loaded = ggn_bytes(matrix.m, matrix.n, matrix.j_codes.itemsize, matrix.mismatched)
            else:
                loaded = dense_bytes(matrix.n)
            check_budget(
                self.spec,
                loaded + recording_bytes(record),
                f"this run's recording with the programmed array (n = {matrix.n})",
                "record fewer snapshots or lags per run",
            )
        model = self._linear_model()
        if not self.spec.rails.enabled and model is not None and not model.stable:
            # with no rails to stop it the state would grow without bound; refuse before running
            raise _Refused(Status.SATURATED, _UNSTABLE, runaway=1)
        # the exact engine draws the window's sum, not its conversions: a recording run steps, unless it
        # records lagged sums only and the exact engine can draw them in closed form
        lagged_exact = record.lagged_on and not self._lagged_closed_form_why(t, burn_in, record)
        if engine == Engine.transient or (
            engine == Engine.auto
            and (record.on or (record.lagged_on and not lagged_exact) or not self._linear_is_safe(t, burn_in))
        ):
            report, state, acc, samples = self._run_transient(t, burn_in, on_saturation, record)
        else:
            report, state, acc, samples = self._run_exact(t, burn_in, record)
        if not (np.isfinite(state).all() and np.isfinite(acc).all()):
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
        self._lagged = (record.lags, record.lagged) if record.lagged_on else None
        self._samples = samples
        self._runs += 1
        flags = (self._flags | _HAS_RUN) & ~(_SATURATED | _ADC_CLIPPED)
        if report["saturated"]:
            flags |= _SATURATED
        if report["adc_clipped"]:
            flags |= _ADC_CLIPPED
        self._flags = flags
        return report

    def _abort(self, _: Mapping[str, Any]) -> dict[str, Any]:
        """ABORT reaching the command handler comes between commands, when no run is in progress: the
        server stops a running one itself (between the run's chunks, through ``interrupt``)."""
        return {"aborted": 0}

    def _status(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "word": int(self._flags),
            "matrix_n": self._matrix.n if self._matrix is not None else 0,
            "vector_n": self._vector_codes.shape[0] if self._vector_codes is not None else 0,
            "runs": self._runs,
            "samples": self._samples,
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

    def _set_damping(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Programme every oscillator cell's damping resistor: nominal damping (R_d C0 / tau) within the spec's
        [oscillator.damping_min, damping_max], each cell keeping its own mismatch factor; until RESET."""
        damping = _number(payload, "damping")
        osc = self.spec.oscillator
        if not self._lc or osc.damping_max <= 0.0:
            why = "its damping resistors are fixed (oscillator.damping_max = 0)" if self._lc else "it has RC cells"
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"{self.spec.name} has no programmable damping: {why}; use an oscillator device whose spec"
                " gives oscillator.damping_max > 0 (e.g. spu-8-lc)",
            )
        if not (damping > 0.0 and osc.damping_min <= damping <= osc.damping_max):
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"damping = {damping!r} is outside [{osc.damping_min:g}, {osc.damping_max:g}] (and must be > 0),"
                " the range of the damping resistors (oscillator.damping_min, damping_max)",
            )
        drawn = draw_oscillator_parts(self.spec, self._seed).damping  # the realised resistors at the spec's damping
        self.oscillator_parts = dataclasses.replace(self.oscillator_parts, damping=drawn * (damping / osc.damping))
        if self._matrix is not None:  # re-derive the programmed oscillator array
            self._oscillator = self._program_oscillator()
            self._linear = None
        return {"damping": damping}
