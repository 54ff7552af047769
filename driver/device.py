"""The host-side Device: the calls a program makes on an SPU (DESIGN section 5).

The driver validates arguments, chooses scales so A and b use the code ranges
well, converts to codes, and undoes the scales on read-out, so results are in
the user's units.  With a matrix scale s_A (user units per g0) and a vector
scale s_b (user units per volt) the array solves a V = u with a = A / s_A and
u = b / s_b, so x = A^-1 b = V * s_b / s_A.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import calibration, checks, lagged, ranging
from .codes import code_dtype, to_codes
from .errors import (
    DeviceBusyError,
    DeviceClosedError,
    DeviceInternalError,
    DeviceStateError,
    InvalidInputError,
    ProtocolError,
    RunAbortedError,
    SaturationError,
    SpuError,
)
from .ggn import GGN, natural_scale, program
from .protocol import Engine, OnSaturation, Opcode, Status
from .readout import Readout
from .reports import (
    CallRecord,
    DeviceInfo,
    DeviceStatus,
    DeviceTime,
    LoadReport,
    RunReport,
    Timeline,
    device_info,
    device_status,
    device_time,
    load_report,
)
from .settings import Settings
from .transport import Transport

__all__ = ["Device", "DeviceInfo", "RunReport", "LoadReport", "DeviceStatus", "DeviceTime", "CallRecord", "Timeline"]

SYMMETRY_RTOL = checks.SYMMETRY_RTOL  # re-exported: sampling and primitives import it from here

_ENGINE_NAMES = {int(member): member.name for member in Engine}  # RunReport.engine without an enum lookup


class Device(Readout, Settings):
    """An open SPU.  Use :func:`driver.open` to get one; close it (or use ``with``)."""

    # records kept in ``timeline`` (a :class:`Timeline`; its totals count every call); a device's own
    # ``dev.timeline.maxlen`` changes it after open, None keeps all
    timeline_length: int | None = 1000

    def __init__(self, transport: Transport, label: str = "device"):
        self._transport = transport
        self._label = label
        self._closed = False
        self._vector_scale: float | None = None  # a refusal of INFO reads it
        self.info = device_info(self._call(Opcode.INFO))
        self._calibration: calibration.Calibration | None = None  # of the parts: kept by reset()
        self._forget_scales()
        # the last loads, runs and reads, with the hardware time the device reports for each (DESIGN 4.6),
        # and exact totals over all of them (Timeline)
        self.timeline = Timeline(self.timeline_length)
        self._j_codes: np.ndarray | None = None  # J's codes of the last GGN load (the buffer is reused)

    def _forget_scales(self) -> None:
        self._matrix_scale: float | None = None
        self._vector_scale: float | None = None
        self._readout_scale: float | None = None
        self._recorded: tuple[bool, int] | None = None  # (record_cov, record_samples) of the last run
        self._recorded_lags: tuple[int, ...] | None = None  # record_lags of the last run
        self._loaded: np.ndarray | GGN | None = None  # the matrix of the last load, user units (for ranging)
        self._lambda_min: float | None = None  # its smallest eigenvalue, estimated on first need
        self._settling = (math.nan, 0.0, math.nan)  # (transient left, burn_in, rate) of the last run
        self._kappa0 = self.info.kappa0  # the injected noise level (set_noise), back to the spec's on reset
        self._damping = self.info.spec.get("oscillator", {}).get("damping")  # set_damping's, back on reset
        self._row_abs: np.ndarray | None = None  # the dense load's coupling sums, for calibrated vectors
        self._rate_memo: tuple[tuple, float] | None = None  # ranging.loaded_rate's ((lambda_min, scale, damping), rate)

    # -- plumbing ----------------------------------------------------------------
    @property
    def transport(self) -> Transport:
        return self._transport

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceClosedError(f"{self._label} is closed; open a new one with driver.open()")

    def _call(self, opcode: Opcode, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        self._check_open()
        status, reply = self._transport.request(int(opcode), payload)
        if status == Status.OK:
            return reply
        message = f"{self._label} refused {opcode.name}: {reply.get('message', 'no message')}"
        raise _refusal(status, message, reply, self._vector_scale)

    def _record(self, call: str, reply: dict[str, Any], started: float, discarded: bool = False) -> DeviceTime:
        """Append the call to the timeline; returns its device time."""
        spent = device_time(reply)
        self.timeline.append(CallRecord(call, spent, time.perf_counter() - started, discarded))
        return spent

    @property
    def last_call_time(self) -> DeviceTime:
        """Hardware time of the last load, run or read (zero before the first)."""
        return self.timeline[-1].device_time if self.timeline else DeviceTime()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Device {self.info.name!r}, {self.info.cells} {self.info.cell_kind} cells, {state}>"

    # -- loads -------------------------------------------------------------------
    def load_matrix(self, A: Any, *, symmetric: bool = True, scale: float | None = None) -> LoadReport:
        """Program the coupling array with A (n, n), n <= cells; or a ``driver.GGN(J, H, damping)``.

        The array is programmed with a = A / scale (g0); by default scale =
        max|A| / g_max, so the largest element uses the full code range.  With
        ``symmetric`` (default) A must equal A.T to round-off.  Cost O(n^2) here
        plus the transfer of n^2 codes.

        A GGN F = J^T H J + damping I, J (m, N), goes into the device's structured arrays (J, H,
        J^T and a damping diagonal, TNGD App. C) without forming N x N: N <= cells, m <= the
        device's ``max_ggn_rows``.  Each array gets its own scale so it uses its code range, and
        ``scale`` (default :meth:`matrix_scale`) is the one overall scale s of F, undone on
        read-out as for a dense matrix (see :mod:`driver.ggn`).  Cost O(m N + m^3) here plus the
        transfer of m N + m^2 + 1 codes; ``symmetric`` does not apply.
        """
        self._check_open()
        started = time.perf_counter()
        if isinstance(A, GGN):
            return self._load_ggn(A, scale, started)
        A = self._checked_matrix(A, symmetric)
        scale = checks.choose_scale(calibration.natural_scale(self, A), scale, "matrix A")
        q, row_abs = calibration.element_codes(self, A / scale)  # trimmed when calibrated
        reply = self._call(Opcode.LOAD_MATRIX, {"codes": q.codes})
        self._matrix_scale, self._row_abs = scale, row_abs
        self._loaded, self._lambda_min = (A if symmetric else None), None
        return load_report(scale, q, self._record("load_matrix", reply, started))

    def _load_ggn(self, ggn: GGN, scale: float | None, started: float) -> LoadReport:
        checks.check_ggn_fits(self.info, ggn.m, ggn.n)
        if scale is not None:
            scale = checks.choose_scale(0.0, scale, "GGN")
        # J's codes go into a buffer kept from load to load (a TNGD loop loads the same shape every step)
        dtype = code_dtype(self.info.element_bits)
        buffer = self._j_codes
        if buffer is None or buffer.shape != ggn.J.shape or buffer.dtype != dtype:
            buffer = self._j_codes = np.empty(ggn.J.shape, dtype)
        codes = program(ggn, self.info.element_bits, self.info.g_max, scale, out=buffer)
        reply = self._call(
            Opcode.LOAD_GGN,
            {"j_codes": codes.j_codes, "h_codes": codes.h_codes, "damping_code": codes.damping_code},
        )
        self._matrix_scale, self._row_abs = codes.scale, None
        self._loaded, self._lambda_min = ggn, None
        spent = self._record("load_matrix", reply, started)
        parts = codes.quantised
        return LoadReport(
            scale=codes.scale,
            clipped=sum(q.clipped for q in parts),
            zeroed=sum(q.zeroed for q in parts),
            max_error=max(q.max_error for q in parts),
            device_time=spent,
        )

    def matrix_scale(self, A: Any) -> float:
        """The scale s (user units of A per g0) that ``load_matrix(A)`` chooses when none is given.

        Dense A: max|A| / g_max.  GGN: max(s_J^2 s_H, damping / g_max) with s_J = max|J| / g_max and
        s_H = max|H| / g_max (see :mod:`driver.ggn`).  Useful to know s before loading.
        """
        if isinstance(A, GGN):
            return natural_scale(A, self.info.g_max)
        A = checks.as_float_array(A, "matrix A", 2)
        return checks.choose_scale(calibration.natural_scale(self, A), None, "matrix A")

    def load_vector(self, b: Any, *, scale: float | str | None = None) -> LoadReport:
        """Set the input DACs to u = b / scale (volts), b of shape (n,), n <= cells.

        By default scale = max|b| / dac_range_v, so the largest entry uses the
        DAC's full range (a run whose equilibrium then leaves the rails or the ADC range
        raises SaturationError saying by how much to scale b down).  ``scale="auto"``
        (after a symmetric load_matrix) picks the scale that keeps the equilibrium within
        70 % of the smaller of the rails and the ADC range, from the bound
        max|A^-1 b| <= |b|_2 / lambda_min(A) (``driver.ranging``; A^-1 b is never
        computed), and never below the DAC's own limit.  Cost O(n) plus the transfer of n
        codes; "auto" adds lambda_min once per load, O(n^3) up to n = 256, O(k n^2) above.
        """
        self._check_open()
        started = time.perf_counter()
        b = self._checked_vector(b)
        if isinstance(scale, str) and scale == "auto":
            scale = ranging.loaded_input_scale(self, b)
        peak = float(np.abs(b).max())
        scale = checks.choose_scale(peak / self.info.dac_range_v, scale, "vector b")
        if peak <= 1e200 * scale:  # b / scale and its codes stay far inside the float range
            q = to_codes(
                calibration.input_volts(self, b / scale, self._row_abs), self.info.dac_bits, self.info.dac_range_v
            )
        else:
            with np.errstate(over="ignore"):  # a tiny scale sends b beyond the DAC: clipped and counted below
                q = to_codes(
                    calibration.input_volts(self, b / scale, self._row_abs), self.info.dac_bits, self.info.dac_range_v
                )
        reply = self._call(Opcode.LOAD_VECTOR, {"codes": q.codes})
        self._vector_scale = scale
        return load_report(scale, q, self._record("load_vector", reply, started))

    def _dynamics_spec(self) -> dict[str, Any]:
        """The spec with the damping now set (set_damping), for the settling estimates."""
        if self._damping is None:
            return self.info.spec
        return {**self.info.spec, "oscillator": {**self.info.spec["oscillator"], "damping": self._damping}}

    # -- run and read-out --------------------------------------------------------
    def run(
        self,
        t: float,
        burn_in: float | None = None,
        *,
        engine: str = "auto",
        on_saturation: str = "raise",
        record_cov: bool = False,
        record_samples: int = 0,
        sample_stride: int = 1,
        record_lags: Any = None,
    ) -> RunReport:
        """Let the array evolve for analog time t (tau); accumulate ADC samples after burn_in
        (default t / 2, as in ``linalg.solve``).

        The array follows C dV/dt = -a V + gin u + noise from its present state
        (the state carries over between runs; oscillator cells, ``info.cell_kind ==
        "oscillator"``, follow the second-order dynamics of DESIGN 4.2 to the same
        stationary law).  ``read_mean`` then gives the average of the ADC samples
        taken in (burn_in, t].

        engine: "transient" steps the circuit with every effect, O(n^2) per step
        and t / dt steps; "exact" propagates the linear circuit exactly in
        distribution (rails and ADC clipping are not modelled, ADC rounding is
        modelled as uniform noise of one LSB), O(n^2) per run for a symmetric
        array with equal noise per cell and O(n^3) otherwise, after O(n^3) once
        per load, whatever t; "auto" (default) takes the exact engine only when
        it can show that no rail or ADC clipping can act and the ADC is dithered
        (see ``spu_emulator.exact``), and the transient engine otherwise.
        ``RunReport.engine`` says which ran.

        on_saturation: "raise" discards a run that hit a rail and raises
        SaturationError; "flag" keeps it and sets ``RunReport.saturated``.  A
        run-away (unstable) array always raises.

        Second moments and samples (both off by default, and free when off):
        ``record_cov=True`` also accumulates sum_k code_k code_k^T on the device over
        the same window, for :meth:`read_cov` (O(n^2) per conversion);
        ``record_samples=k`` keeps k snapshots, every ``sample_stride``-th conversion
        after burn_in (so sample_stride / sample_rate tau apart), for
        :meth:`read_samples`; t - burn_in must hold k * sample_stride conversions.
        A recording run always steps ("auto" takes the transient engine; "exact"
        is refused): the exact engine draws a window's average, not its conversions.
        ``record_lags=(L_1, ...)`` (up to 8 lags, in conversions) accumulates sum_k x_{k+L} x_k^T
        for :meth:`read_lagged` (``driver.lagged``); the exact engine draws those in closed form
        where it can (a symmetric array, equal noise, zero drive, ideal converters), else it steps.
        """
        self._check_open()
        record = checks.recording(record_cov, record_samples, sample_stride)
        t = self._checked_run(t, 0.0)[0]
        t, burn_in = self._checked_run(t, 0.5 * t if burn_in is None else burn_in)
        if record_lags is not None:
            record_lags = lagged.checked_lags(record_lags)
            lagged.check_window(self, record_lags, t, burn_in)
            record["record_lags"] = np.asarray(record_lags, dtype=np.int64)
        engine_code = checks.option(engine, Engine, "engine")
        saturation_code = checks.option(on_saturation, OnSaturation, "on_saturation")
        if self._matrix_scale is None or self._vector_scale is None:
            raise DeviceStateError("load a matrix and a vector before run(): call load_matrix(A) and load_vector(b)")
        started = time.perf_counter()
        try:
            reply = self._call(
                Opcode.RUN,
                {"t": t, "burn_in": burn_in, "engine": engine_code, "on_saturation": saturation_code, **record},
            )
        except SaturationError as error:
            if "hardware_time" in error.report:  # the run took place and took its time, then was discarded
                self._record("run", error.report, started, discarded=True)
            raise
        spent = self._record("run", reply, started)
        wall = self.timeline[-1].wall_time_s
        rate = ranging.loaded_rate(self)
        left = ranging.settling(rate, burn_in)
        self._settling = (left, burn_in, rate)
        self._readout_scale = self._vector_scale / self._matrix_scale
        self._recorded = (bool(record["record_cov"]), record["record_samples"])
        self._recorded_lags = record_lags
        return RunReport(
            analog_time=float(reply["analog_time"]),
            seconds=float(reply["analog_time"]) * self.info.tau_s,
            samples=int(reply["samples"]),
            engine=_ENGINE_NAMES.get(reply["engine"]) or Engine(reply["engine"]).name,
            saturated=bool(reply["saturated"]),
            adc_clipped=int(reply["adc_clipped"]),
            steps=int(reply["steps"]),
            dt=float(reply["dt"]),
            wall_time_s=wall,
            device_time=spent,
            settling=left,
        )

    def read_lagged(self) -> lagged.LaggedMoments:
        """The lagged sums sum_k x_{k+L} x_k^T of the last run (``record_lags``), in user units squared, with
        their pair counts and the window mean: a :class:`driver.lagged.LaggedMoments`.  Raises
        DeviceStateError when the last run recorded none."""
        return lagged.read(self)

    # -- housekeeping ------------------------------------------------------------
    def status(self) -> DeviceStatus:
        """The device's status word and counters."""
        return device_status(self._call(Opcode.STATUS))

    def reset(self) -> None:
        """Back to power-on: nothing loaded, state 0, noise stream restarted (same device)."""
        self._call(Opcode.RESET)
        self._forget_scales()

    def close(self) -> None:
        """Release the device.  Further calls raise DeviceClosedError; closing twice is fine."""
        if not self._closed:
            self._closed = True
            self._transport.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- argument checks, shared with composite calls (linalg, sampling): no device call -----------------
    def _checked_matrix(self, A: Any, symmetric: bool = True) -> np.ndarray:
        return checks.checked_matrix(self.info, A, symmetric)

    def _checked_vector(self, b: Any, n: int | None = None) -> np.ndarray:
        return checks.checked_vector(self.info, b, n)

    def _checked_run(self, t: Any, burn_in: Any) -> tuple[float, float]:
        return checks.checked_run(self.info, t, burn_in)

    def _check_fits(self, n: int, what: str) -> None:
        checks.check_fits(self.info, n, what)


def _refusal(status: int, message: str, reply: dict[str, Any], vector_scale: float | None) -> SpuError:
    """The exception for a refused command: its status code decides the class."""
    if status == Status.BAD_ARGUMENT:
        return InvalidInputError(message)
    if status == Status.BAD_STATE:
        return DeviceStateError(message)
    if status == Status.SATURATED:
        factor = reply.get("fit_factor")
        if isinstance(factor, float) and factor > 1.0 and vector_scale is not None:
            message += (
                f"; scale b down by {factor:.2g}x: load_vector(b, scale={vector_scale * factor:.3g}),"
                " or load_vector(b, scale='auto'), or let driver.linalg.solve(dev, A, b) range it"
            )
        if reply.get("keepable"):
            message += "; or pass on_saturation='flag' to keep such a run"
        return SaturationError(message, reply)
    if status == Status.BUSY:
        return DeviceBusyError(message + "; wait for the other host to close it")
    if status == Status.INTERNAL:
        return DeviceInternalError(message)
    if status == Status.ABORTED:
        return RunAbortedError(message)
    return ProtocolError(message)
