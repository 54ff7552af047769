"""The device's command handler: the only entry point a host uses.

``Firmware.handle(opcode, payload) -> (status, payload)`` is a small state
machine over the commands of ``firmware_spec/protocol.yaml``.  It never raises
for a bad request: it answers a status code and a message, and a request that
fails changes nothing (loads, analog state, accumulator and noise stream stay as
they were).  Payloads are flat mappings of ints, floats, strings and numpy
arrays, so a transport can serialise them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _kernels
from .converters import check_codes, code_max, dac_volts, element_conductances
from .exact import LinearModel, prepare, propagate, window
from .parts import NOISE_STREAM, draw_cell_parts, element_mismatch
from .protocol import PROTOCOL_VERSION, Engine, OnSaturation, Opcode, Status, StatusBit
from .spec import DeviceSpec

__all__ = ["Firmware", "ProgrammedMatrix", "K_BOLTZMANN"]

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


class Firmware:
    """One emulated SPU.  ``seed`` fixes the device (its mismatch) and its noise stream."""

    def __init__(self, spec: DeviceSpec, seed: int | None = None):
        self.spec = spec
        self._seed = np.random.SeedSequence(seed)
        self.parts = draw_cell_parts(spec, self._seed)
        self._mismatch_cache: tuple[int, np.ndarray | None] | None = None
        self._handlers: dict[int, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            Opcode.INFO: self._info,
            Opcode.RESET: self._reset,
            Opcode.LOAD_MATRIX: self._load_matrix,
            Opcode.LOAD_VECTOR: self._load_vector,
            Opcode.RUN: self._run,
            Opcode.READ_MEAN: self._read_mean,
            Opcode.READ_STATE: self._read_state,
            Opcode.STATUS: self._status,
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
        self._matrix: ProgrammedMatrix | None = None
        self._linear: LinearModel | None = None
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
    def matrix(self) -> ProgrammedMatrix | None:
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
        why = check_codes(codes, self.spec.coupling.element_bits, self.spec.coupling.g_max, "element")
        if why:
            raise _Refused(Status.BAD_ARGUMENT, why)
        self._matrix = self._program(codes.copy())
        self._linear = None
        self._flags |= StatusBit.MATRIX_LOADED
        if self._vector_codes is not None and self._vector_codes.shape[0] == n:
            self._force = self._drive(self._vector_codes)
        return {"n": n, "drift_norm": self._matrix.drift_norm}

    def _program(self, codes: np.ndarray) -> ProgrammedMatrix:
        n = codes.shape[0]
        if self._mismatch_cache is None or self._mismatch_cache[0] != n:
            self._mismatch_cache = (n, element_mismatch(self.spec, self._seed, n))
        a = element_conductances(codes, self.spec, self._mismatch_cache[1])
        c = self.parts.capacitance[:n]
        gin = self.parts.input_conductance[:n]
        gtot = np.abs(a).sum(axis=1) + gin
        drift = np.ascontiguousarray(a / c[:, None])
        kappa = np.full(n, self.spec.noise.kappa0)
        if self.spec.noise.johnson:
            kt_over_c = K_BOLTZMANN * self.spec.noise.temperature_k / self.spec.timing.c0_farad
            kappa = kappa + kt_over_c * gtot
        return ProgrammedMatrix(
            codes=codes,
            conductance=a,
            drift=drift,
            total_conductance=gtot,
            noise_sd=np.sqrt(2.0 * kappa) / c,
            drift_norm=_spectral_norm(drift),
        )

    def _drive(self, codes: np.ndarray) -> np.ndarray:
        """Node forcing C^-1 (gin u + gtot v_os) for the present matrix; (n,) volts per tau."""
        n = codes.shape[0]
        u = dac_volts(codes, self.spec, self.parts)
        force = self.parts.input_conductance[:n] * u
        if self.spec.cell.opamp_offset_v > 0.0:
            force = force + self._matrix.total_conductance * self.parts.opamp_offset_v[:n]
        return force / self.parts.capacitance[:n]

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
        return {"n": n}

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
        if not self.spec.rails.enabled and not self._linear_model().stable:
            # with no rails to stop it the state would grow without bound; refuse before running
            raise _Refused(Status.SATURATED, _UNSTABLE, runaway=1)
        if engine == Engine.transient or (engine == Engine.auto and not self._linear_is_safe(t)):
            report, state, acc, samples = self._run_transient(t, burn_in, on_saturation)
        else:
            report, state, acc, samples = self._run_exact(t, burn_in)
        self._state[: matrix.n] = state
        self._acc = acc
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

    def _run_transient(self, t: float, burn_in: float, on_saturation: int):
        matrix = self._matrix
        n = matrix.n
        period = 1.0 / self.spec.adc.sample_rate
        dt_max = self.spec.integrator.step_factor / matrix.drift_norm if matrix.drift_norm > 0 else period
        steps_per_sample = max(1, math.ceil(period / dt_max - 1e-9))
        dt = period / steps_per_sample
        n_steps = max(1, round(t / dt))
        first_sample_step = (window(t, burn_in, period)[0] + 1) * steps_per_sample
        adc = self.spec.adc
        rail = self.spec.rails.v_rail if self.spec.rails.enabled else 0.0

        state = self._state[:n].copy()
        acc = np.zeros(n)
        rng_before = self._rng.bit_generator.state
        steps, samples, saturated, clipped, runaway = _kernels._run_rc(
            matrix.drift,
            self._force,
            matrix.noise_sd,
            state,
            dt,
            n_steps,
            steps_per_sample,
            first_sample_step,
            rail,
            self.parts.adc_gain[:n],
            self.parts.adc_offset_v[:n],
            adc.noise_v,
            self._adc_lsb(),
            float(code_max(adc.bits)),
            self._rng,
            acc,
            np.empty(n),
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
            raise _Refused(Status.SATURATED, why + "; the run was discarded", keepable=int(not runaway), **report)
        return report, state, acc, int(samples)

    def _linear_model(self) -> LinearModel:
        if self._linear is None:
            self._linear = prepare(self._matrix.drift, self._matrix.noise_sd)
        return self._linear

    def _linear_is_safe(self, t: float) -> bool:
        """True when the exact engine is exact for a run of length t from the present state.

        The array must be stable and contractive (so the mean path stays within
        |V(0) - V*| of V*), every node must stay z standard deviations inside the
        rails and the ADC's full scale, with z from a union bound over cells and
        correlation times at probability 1e-9, and a quantised ADC must be
        dithered by at least half an LSB of fresh noise per sample.
        """
        model = self._linear_model()
        if not (model.stable and model.contractive):
            return False
        n = self._matrix.n
        target = model.fixed_point(self._force)
        reach = np.abs(target) + float(np.linalg.norm(self._state[:n] - target))
        looks = 2.0 * n * (1.0 + t * model.rate_max)
        z = max(6.0, math.sqrt(2.0 * math.log(looks / 1e-9)))
        if self.spec.rails.enabled and np.any(reach + z * np.sqrt(model.stationary_var) >= self.spec.rails.v_rail):
            return False
        adc = self.spec.adc
        if adc.bits > 0:
            spread = np.sqrt(model.stationary_var + adc.noise_v**2)
            seen = np.abs(self.parts.adc_gain[:n]) * (reach + z * spread) + np.abs(self.parts.adc_offset_v[:n])
            if np.any(seen >= adc.range_v):
                return False
            fresh = model.fresh_var(1.0 / adc.sample_rate) + adc.noise_v**2
            if np.any(np.sqrt(fresh) < 0.5 * self._adc_lsb()):
                return False
        return True

    def _refuse_clipped_equilibrium(self, model: LinearModel, target: np.ndarray) -> None:
        """The exact engine has no rails and no ADC full scale: refuse when the equilibrium itself
        (V* plus 3 stationary standard deviations) lies beyond either, since its answer would be impossible."""
        n = target.shape[0]
        reach = np.abs(target) + 3.0 * np.sqrt(model.stationary_var)
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
                )

    def _run_exact(self, t: float, burn_in: float):
        model = self._linear_model()
        if not model.stable:
            raise _Refused(Status.SATURATED, _UNSTABLE, runaway=1)
        n = self._matrix.n
        adc = self.spec.adc
        target = model.fixed_point(self._force)
        self._refuse_clipped_equilibrium(model, target)
        mean_v, final, count = propagate(
            model,
            self._state[:n],
            target,
            t,
            burn_in,
            1.0 / adc.sample_rate,
            self._rng,
        )
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
        return {"mean_codes": self._acc / self._samples, "samples": self._samples}

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
        return {"codes": out, "clipped": int(clipped)}

    def _status(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "word": int(self._flags),
            "matrix_n": self._matrix.n if self._matrix is not None else 0,
            "vector_n": self._vector_codes.shape[0] if self._vector_codes is not None else 0,
            "runs": self._runs,
            "samples": self._samples,
        }

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
        return enum(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum)
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} = {value!r} is not one of {allowed}") from None
