"""The two engines and the choice between them.

``Engines`` is the part of :class:`~spu_emulator.firmware.Firmware` that runs the programmed array:
the transient integrator (numba; every effect, rails and ADC included), the exact linear engine
(in distribution, with no cost in t; ``spu_emulator.exact``), and the safety analysis that lets
``auto`` take the exact engine only when no nonlinear effect can act in the run
(``spu_emulator.safety``).  It reads the device state kept by ``Firmware``: ``_matrix``,
``_oscillator``, ``_force``, ``_state``, ``_momentum``, ``_rng``, ``spec`` and ``parts``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from . import _kernels, _lagged, _oscillator
from .arrays import ProgrammedGGN
from .chunks import Stopped, advance_in_chunks
from .converters import code_max
from .exact import LinearModel, prepare, propagate, propagate_lagged, window
from .krylov import KrylovModel, prepare_dense
from .lowrank import LowRankModel, prepare_ggn
from .payload import _Refused
from .protocol import Engine, OnSaturation, Status
from .recording import _LAG_CHUNK_VALUES, _Record
from .safety import SafetyAnalysis
from .timing import run_time

_UNSTABLE = (
    "the drift is unstable (an eigenvalue of C^-1 a has a non-positive real part), so the array would run"
    " away: the matrix is not positive definite; the run was not started"
)


# the exact engine draws lagged sums (central limit) only over a window of this many correlation times
_LAGGED_MIN_SPANS = 200.0


class Engines(SafetyAnalysis):
    """The run half of :class:`~spu_emulator.firmware.Firmware` (a mixin)."""

    # asked between a transient run's chunks whether to stop it ("" goes on; the server sets it for ABORT
    # and its wall-time limit), and a cap on a chunk's steps (None: about CHUNK_S of wall time; tests)
    interrupt: Callable[[], str] | None = None
    max_chunk_steps: int | None = None

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
        scratch = np.empty(n)
        rng_before = self._rng.bit_generator.state
        noise_prev = self._carried_noise(n, matrix)

        def advance(n_steps, first_sample_step, snapshots, stride):
            adc_args = (
                rail,
                self.parts.adc_gain[:n],
                self.parts.adc_offset_v[:n],
                adc.noise_v,
                self._adc_lsb(),
                float(code_max(adc.bits)),
                self._rng,
                acc,
                scratch,
                record.cov_acc,
                snapshots,
                stride,
            )
            if self._lc:
                lc = self._oscillator
                return _oscillator._run_lc(
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
            if isinstance(matrix, ProgrammedGGN):
                return _kernels._run_ggn(
                    matrix.j,
                    matrix.h,
                    matrix.jt,
                    matrix.damping,
                    matrix.inv_c,
                    self._force,
                    matrix.noise_sd,
                    state,
                    noise_prev,
                    dt,
                    n_steps,
                    steps_per_sample,
                    first_sample_step,
                    *adc_args,
                    np.empty(matrix.m),
                    np.empty(matrix.m),
                )
            return _kernels._run_rc(
                matrix.drift,
                self._force,
                matrix.noise_sd,
                state,
                noise_prev,
                dt,
                n_steps,
                steps_per_sample,
                first_sample_step,
                *adc_args,
            )

        try:  # in chunks: Ctrl-C and the server's interrupt stop the run between them (spu_emulator/chunks.py)
            if record.lagged_on:
                steps, samples, saturated, clipped, runaway = _advance_lagged(
                    advance, record, n, n_steps, steps_per_sample, first_sample_step, self.interrupt
                )
            else:
                flops = 3.0 * matrix.m * n if isinstance(matrix, ProgrammedGGN) else float(n * n)
                steps, samples, saturated, clipped, runaway = advance_in_chunks(
                    advance, record.snapshots, record.stride, n_steps, steps_per_sample, first_sample_step,
                    self.interrupt, self.max_chunk_steps, flops,
                )  # fmt: skip
        except BaseException as exc:  # KeyboardInterrupt too: the run is discarded, the device as before it
            self._rng.bit_generator.state = rng_before
            if isinstance(exc, Stopped):
                raise _Refused(
                    Status.ABORTED,
                    f"the run was stopped after {exc.steps} of {n_steps} steps ({exc.reason}); it was discarded"
                    " and the device keeps the state it had before it",
                ) from None
            raise
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

    def _linear_model(self) -> LinearModel | KrylovModel | LowRankModel | None:
        """The exact engine's model of the programmed array, made once per array; None when there is
        none (a GGN array with mismatch, or with cells that differ: ``_linear_why`` says which)."""
        matrix = self._matrix
        if self._linear_for is not matrix or (self._linear is None and not self._linear_why):
            self._linear, self._linear_why = None, ""
            if self._lc:  # the 2n phase state (x, p); its drift is never symmetric, so the general form
                self._linear = prepare(self._oscillator.drift, self._oscillator.noise_sd)
            elif isinstance(matrix, ProgrammedGGN):
                if matrix.mismatched:
                    self._linear_why = (
                        "its J and J^T arrays are separate parts with element mismatch, so its drift is not"
                        " symmetric, and the general exact form would need the N x N drift"
                    )
                else:  # from J's codes as sent: the exact engine never needs J as float64
                    self._linear, self._linear_why = prepare_ggn(
                        matrix.j_codes,
                        matrix.h,
                        matrix.damping,
                        matrix.inv_c,
                        matrix.noise_sd,
                        matrix.column_norms,
                        unit=matrix.unit,
                        row_squares=matrix.row_squares,
                    )
            else:
                self._linear = prepare_dense(matrix.drift, matrix.noise_sd, matrix.symmetric)
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

    def _carried_noise(self, n: int, matrix) -> np.ndarray:
        """The last normals z of the Leimkuhler-Matthews step (``_kernels``) for this run, a copy: the previous
        transient run's when it ended on n cells, else drawn now (none for oscillator cells or without
        noise).  Carrying them makes consecutive transient runs one chain, so a run boundary does not
        disturb the stationary variance; they are kept only with the state (``_store_state``)."""
        if self._lc or not np.any(matrix.noise_sd != 0.0):
            self._next_noise_prev = None
            return np.zeros(0 if self._lc else n)
        carried = self._noise_prev
        if carried is not None and carried.shape[0] == n:
            noise_prev = carried.copy()
        else:
            noise_prev = np.empty(n)
            _kernels._draw_normals(self._rng, noise_prev)
        self._next_noise_prev = noise_prev
        return noise_prev

    def _store_state(self, state: np.ndarray) -> None:
        """Keep a run's final state, and its carried normals (None after an exact run: the next transient
        run draws fresh ones, which are as independent of an exactly drawn state)."""
        n = self._matrix.n
        self._state[:n] = state[:n]
        if self._lc:
            self._momentum[:n] = state[n:]
        self._noise_prev, self._next_noise_prev = self._next_noise_prev, None

    def _lagged_closed_form_why(self, t: float, burn_in: float, record: _Record) -> str:
        """Why the exact engine cannot draw this run's lagged sums in closed form ("" when it can): it needs
        the modal form (a symmetric array with equal noise in every cell), zero drive (V* = 0), converters
        that pass the volts through (no bits, gain 1, offset 0, no noise), no other recording, and a window
        of at least _LAGGED_MIN_SPANS correlation times of the slowest mode (the central limit)."""
        model = _modal(self._linear_model())
        adc = self.spec.adc
        n = self._matrix.n
        if model is None or model.form != "modal":
            return "the array is not symmetric with equal noise in every cell (the modal form)"
        if np.any(self._phase_force() != 0.0):
            return "the drive is not zero (the lagged sums are drawn around V* = 0)"
        if adc.bits > 0 or adc.noise_v > 0.0 or np.any(self.parts.adc_gain[:n] != 1.0):
            return "the ADC is not ideal (bits, noise or gain)"
        if np.any(self.parts.adc_offset_v[:n] != 0.0):
            return "the ADC has offsets"
        if record.on:
            return "the run also records its covariance or snapshots"
        period = 1.0 / adc.sample_rate
        m0, m1 = window(t, burn_in, period)
        spans = (m1 - m0) * period * float(model.rates[0]) if model.stable else 0.0
        if spans < _LAGGED_MIN_SPANS:
            return (
                f"its window holds {spans:.3g} correlation times of the slowest mode, fewer than the"
                f" {_LAGGED_MIN_SPANS:g} the closed form (a central limit) needs"
            )
        return ""

    def _run_exact(self, t: float, burn_in: float, record: _Record | None = None):
        self._next_noise_prev = None
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
        self._refuse_clipped_equilibrium(model, target, n)
        if record is not None and record.lagged_on:
            why = self._lagged_closed_form_why(t, burn_in, record)
            if why:
                raise _Refused(
                    Status.BAD_ARGUMENT,
                    f"the exact engine cannot draw these lagged sums in closed form: {why}; run them with engine"
                    " transient (auto takes it)",
                )
            period = 1.0 / adc.sample_rate
            record.check_window(window(t, burn_in, period)[1] - window(t, burn_in, period)[0], period)
            mean_v, final, count, sums = propagate_lagged(
                _modal(model), self._phase_state(), target, t, burn_in, period, record.lags, self._rng
            )
            record.lagged[...] = sums
        else:
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
            "hardware_time": self._hardware_time(run_time, t),  # memoised: a loop repeats one t
        }
        return report, final, acc, count


def _modal(model):
    """The modal form of a Krylov model (for what only the modal form draws: lagged sums); others as they are."""
    return model.modal() if isinstance(model, KrylovModel) else model


def _advance_lagged(
    advance,
    record: _Record,
    n: int,
    n_steps: int,
    steps_per_sample: int,
    first_sample_step: int,
    interrupt: Callable[[], str] | None = None,
):
    """Run the transient kernel ``advance`` a chunk of conversions at a time, each chunk recorded as
    snapshots and handed to the lagged accumulator, so the recording memory is the chunk, a ring of
    the last max(lags) + 1 conversions and the q n^2 sums, whatever the run's length.  Chunks end on
    conversions, so the steps, draws and conversions are those of one call.  Returns what the kernel
    returns, summed over the chunks."""
    chunk = max(1, _LAG_CHUNK_VALUES // n)
    buffer = np.empty((chunk, n))
    ring = np.zeros((int(record.lags[-1]) + 1, n))
    done = samples = clipped = 0
    saturated = False
    while done < n_steps:
        steps_here = min(n_steps - done, chunk * steps_per_sample)
        first_here = max(1, first_sample_step - done)
        steps, taken, hit, clips, runaway = advance(steps_here, first_here, buffer, 1)
        _lagged._accumulate_lagged(buffer[:taken], samples, ring, record.lags, record.lagged)
        samples += int(taken)
        clipped += int(clips)
        saturated = saturated or bool(hit)
        if runaway:
            return done + int(steps), samples, saturated, clipped, True
        done += steps_here
        if interrupt is not None and done < n_steps:  # between chunks, as chunks.advance_in_chunks
            reason = interrupt()
            if reason:
                raise Stopped(reason, done)
    return n_steps, samples, saturated, clipped, False
