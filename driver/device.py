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
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ranging
from .codes import Quantised, code_dtype, from_codes, to_codes
from .errors import (
    DeviceBusyError,
    DeviceClosedError,
    DeviceInternalError,
    DeviceStateError,
    InvalidInputError,
    ProtocolError,
    SaturationError,
)
from .ggn import GGN, natural_scale, program
from .numbers import real
from .protocol import Engine, OnSaturation, Opcode, Status, StatusBit
from .transport import Transport

__all__ = ["Device", "DeviceInfo", "RunReport", "LoadReport", "DeviceStatus", "DeviceTime", "CallRecord"]

# |A - A.T| up to this fraction of max |A| counts as symmetric (round-off of J^T H J and the like)
SYMMETRY_RTOL = 1e-10
_AUTO_FILL = 0.7  # load_vector(scale="auto") aims the bound of the equilibrium at this fraction of the limit


@dataclass(frozen=True)
class DeviceInfo:
    """What the device says about itself (from INFO).  Times in tau unless named."""

    name: str
    cells: int
    cell_kind: str
    tau_s: float
    max_run_time: float
    element_bits: int
    g_max: float
    dac_bits: int
    dac_range_v: float
    adc_bits: int
    adc_range_v: float
    sample_rate: float
    kappa0: float
    rail_v: float | None
    link_rate_gbps: float
    seed_entropy: str
    spec: dict[str, Any]
    max_dense_size: int = 0
    max_ggn_rows: int = 0
    program_row_s: float = 0.0
    kappa0_max: float = 0.0  # full scale of a programmable noise source (set_noise); 0 = fixed at kappa0


@dataclass(frozen=True)
class DeviceTime:
    """What a call would take on the hardware the device's spec describes, in seconds (DESIGN 4.6).

    The device's timing model (``spu_emulator/timing.py``) reports it with every load, run and read:
    link_s, codes over the host link (bits per code x codes / link rate); program_s, writing element
    codes into the arrays (rows x timing.program_row_s); analog_s, the analog run (t x tau);
    convert_s, ADC conversions outside a run (read_state's snapshot).  total_s is their sum (the
    stages run one after another).  Records add up: ``sum(r.device_time for r in dev.timeline)``.
    NaN where a device did not report.
    """

    link_s: float = 0.0
    program_s: float = 0.0
    analog_s: float = 0.0
    convert_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.link_s + self.program_s + self.analog_s + self.convert_s

    def __add__(self, other: DeviceTime) -> DeviceTime:
        if not isinstance(other, DeviceTime):
            return NotImplemented
        return DeviceTime(
            self.link_s + other.link_s,
            self.program_s + other.program_s,
            self.analog_s + other.analog_s,
            self.convert_s + other.convert_s,
        )

    def __radd__(self, other: Any) -> DeviceTime:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented


@dataclass(frozen=True)
class CallRecord:
    """One entry of ``Device.timeline``: a load, run or read and what it took.

    call: "load_matrix", "load_vector", "run", "read_mean" or "read_state"; device_time: the timing
    model's estimate on the hardware; wall_time_s: host time of the call, the driver's conversions
    included (the emulator's own cost);
    discarded: a run that hit a rail or ran away and raised SaturationError (its time was spent).
    """

    call: str
    device_time: DeviceTime
    wall_time_s: float
    discarded: bool = False


class Timeline(list):
    """``Device.timeline``: the last ``maxlen`` calls' :class:`CallRecord` (oldest dropped first), and
    exact running totals over every call since the device was opened.

    maxlen: how many records are kept, default ``Device.timeline_length`` (1,000); set
    ``dev.timeline.maxlen = N`` to keep more or fewer (the oldest beyond N go at once), ``None``
    for all.  The totals do not depend on it: calls, every load, run and read recorded;
    device_time, their summed :class:`DeviceTime`; hardware_s, the running sum of each call's
    ``device_time.total_s`` in call order (so ``timeline.hardware_s - before`` gives the hardware
    time of the calls since ``before`` was read, whatever was dropped; with nothing dropped it equals
    ``sum(r.device_time.total_s for r in timeline)`` bit for bit); wall_time_s, their summed host time.
    """

    def __init__(self, maxlen: int | None = 1000):
        super().__init__()
        self.calls = 0
        self.device_time = DeviceTime()
        self.hardware_s = 0.0
        self.wall_time_s = 0.0
        self._maxlen: int | None = None
        self.maxlen = maxlen

    @property
    def maxlen(self) -> int | None:
        return self._maxlen

    @maxlen.setter
    def maxlen(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidInputError(f"timeline maxlen must be a non-negative integer or None, got {value!r}")
        self._maxlen = value
        self._trim()

    @property
    def dropped(self) -> int:
        """Calls recorded in the totals whose records are no longer held."""
        return self.calls - len(self)

    def append(self, record: CallRecord) -> None:
        super().append(record)
        self.calls += 1
        self.device_time = self.device_time + record.device_time
        self.hardware_s += record.device_time.total_s
        self.wall_time_s += record.wall_time_s
        self._trim()

    def _trim(self) -> None:
        if self._maxlen is not None and len(self) > self._maxlen:
            del self[: len(self) - self._maxlen]

    def __repr__(self) -> str:
        return f"Timeline({list.__repr__(self)}, maxlen={self._maxlen}, calls={self.calls})"


@dataclass(frozen=True)
class LoadReport:
    """Result of a load: the scale chosen (user units per device unit) and what
    the conversion to codes lost (see :class:`driver.codes.Quantised`)."""

    scale: float
    clipped: int
    zeroed: int
    max_error: float
    device_time: DeviceTime = DeviceTime()


@dataclass(frozen=True)
class RunReport:
    """Result of a run.

    analog_time: tau actually run (t rounded to the integrator's step grid);
    seconds: the same on the device's clock; samples: ADC conversions accumulated
    per cell; engine: "transient" or "exact"; saturated: a node hit a rail;
    adc_clipped: conversions clipped at the ADC's full scale; steps, dt: the
    integrator's step count and step (tau), 0 for the exact engine;
    wall_time_s: host time for the call; device_time: what the run takes on the hardware (its
    analog_s is ``seconds``; see :class:`DeviceTime`); settling: e^{-r burn_in}, the estimated
    fraction of the initial offset still in the state when sampling began, r = lambda_min(A) / s the
    slowest rate of the loaded array (``driver.ranging``; NaN for a non-symmetric load).
    """

    analog_time: float
    seconds: float
    samples: int
    engine: str
    saturated: bool
    adc_clipped: int
    steps: int
    dt: float
    wall_time_s: float
    device_time: DeviceTime = DeviceTime()
    settling: float = math.nan


@dataclass(frozen=True)
class DeviceStatus:
    """The device's status word and counters."""

    matrix_loaded: bool
    vector_loaded: bool
    has_run: bool
    saturated: bool
    adc_clipped: bool
    matrix_n: int
    vector_n: int
    runs: int
    samples: int


class Device:
    """An open SPU.  Use :func:`driver.open` to get one; close it (or use ``with``)."""

    # records kept in ``timeline`` (a :class:`Timeline`; its totals count every call); a device's own
    # ``dev.timeline.maxlen`` changes it after open, None keeps all
    timeline_length: int | None = 1000

    def __init__(self, transport: Transport, label: str = "device"):
        self._transport = transport
        self._label = label
        self._closed = False
        reply = self._call(Opcode.INFO)
        spec = reply["spec"]
        self.info = DeviceInfo(
            name=spec["name"],
            cells=spec["cells"]["count"],
            cell_kind=spec["cells"]["kind"],
            tau_s=spec["timing"]["r0_ohm"] * spec["timing"]["c0_farad"],
            max_run_time=spec["timing"]["max_run_time"],
            element_bits=spec["coupling"]["element_bits"],
            g_max=spec["coupling"]["g_max"],
            dac_bits=spec["dac"]["bits"],
            dac_range_v=spec["dac"]["range_v"],
            adc_bits=spec["adc"]["bits"],
            adc_range_v=spec["adc"]["range_v"],
            sample_rate=spec["adc"]["sample_rate"],
            kappa0=spec["noise"]["kappa0"],
            rail_v=spec["rails"]["v_rail"] if spec["rails"]["enabled"] else None,
            link_rate_gbps=spec["timing"]["link_rate_gbps"],
            seed_entropy=reply["seed_entropy"],
            spec=spec,
            max_dense_size=min(spec["cells"]["count"], spec["coupling"]["max_dense_size"]),
            max_ggn_rows=spec["coupling"]["max_ggn_rows"],
            program_row_s=spec["timing"]["program_row_s"],
            kappa0_max=spec["noise"].get("kappa0_max", 0.0),
        )
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
        self._loaded: np.ndarray | GGN | None = None  # the matrix of the last load, user units (for ranging)
        self._lambda_min: float | None = None  # its smallest eigenvalue, estimated on first need
        self._settling = (math.nan, 0.0, math.nan)  # (transient left, burn_in, rate) of the last run
        self._kappa0 = self.info.kappa0  # the injected noise level (set_noise), back to the spec's on reset

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
        if status == Status.BAD_ARGUMENT:
            raise InvalidInputError(message)
        if status == Status.BAD_STATE:
            raise DeviceStateError(message)
        if status == Status.SATURATED:
            factor = reply.get("fit_factor")
            if isinstance(factor, float) and factor > 1.0 and self._vector_scale is not None:
                message += (
                    f"; scale b down by {factor:.2g}x: load_vector(b, scale={self._vector_scale * factor:.3g}),"
                    " or load_vector(b, scale='auto'), or let driver.linalg.solve(dev, A, b) range it"
                )
            if reply.get("keepable"):
                message += "; or pass on_saturation='flag' to keep such a run"
            raise SaturationError(message, reply)
        if status == Status.BUSY:
            raise DeviceBusyError(message + "; wait for the other host to close it")
        if status == Status.INTERNAL:
            raise DeviceInternalError(message)
        raise ProtocolError(message)

    def _record(self, call: str, reply: dict[str, Any], started: float, discarded: bool = False) -> DeviceTime:
        """Append the call to the timeline; returns its device time."""
        spent = _device_time(reply)
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
        scale = _choose_scale(float(np.abs(A).max()) / self.info.g_max, scale, "matrix A")
        q = to_codes(A / scale, self.info.element_bits, self.info.g_max)
        reply = self._call(Opcode.LOAD_MATRIX, {"codes": q.codes})
        self._matrix_scale = scale
        self._loaded, self._lambda_min = (A if symmetric else None), None
        return _report(scale, q, self._record("load_matrix", reply, started))

    def _checked_matrix(self, A: Any, symmetric: bool = True) -> np.ndarray:
        """A dense matrix as load_matrix takes it (float64 (n, n), n <= the dense array), or InvalidInputError.
        No device call: composite calls check every argument before their first load."""
        try:
            shape = np.shape(A)
        except ValueError:  # a ragged list: _as_float_array says so
            shape = ()
        if len(shape) == 2 and shape[0] == shape[1]:  # too large for the device: refused before any copy is made
            self._check_dense(shape[0])
        A = _as_float_array(A, "matrix A", 2)
        n = A.shape[0]
        if A.shape != (n, n) or n == 0:
            raise InvalidInputError(f"matrix A must be square and non-empty, got shape {A.shape}")
        self._check_dense(n)
        if symmetric:
            asym = np.abs(A - A.T)
            where = np.unravel_index(int(np.argmax(asym)), asym.shape)
            if asym[where] > SYMMETRY_RTOL * float(np.abs(A).max()):
                raise InvalidInputError(
                    f"matrix A must be symmetric: max |A - A.T| = {asym[where]:.3g} at {tuple(map(int, where))};"
                    " symmetrise it, or pass symmetric=False to load a non-symmetric drift"
                )
        return A

    def _checked_vector(self, b: Any, n: int | None = None) -> np.ndarray:
        """A vector as load_vector takes it (float64 (n,), n <= cells; of length ``n`` when given)."""
        b = _as_float_array(b, "vector b", 1)
        if b.shape[0] == 0:
            raise InvalidInputError("vector b must be non-empty")
        self._check_fits(b.shape[0], "vector b")
        if n is not None and b.shape[0] != n:
            raise InvalidInputError(f"vector b has {b.shape[0]} entries but the matrix is {n} x {n}; they must match")
        return b

    def _checked_run(self, t: Any, burn_in: Any) -> tuple[float, float]:
        """(t, burn_in) as run() takes them, in tau, or InvalidInputError.  No device call."""
        t = _as_time(t, "t")
        burn_in = _as_time(burn_in, "burn_in")
        if not 0.0 < t <= self.info.max_run_time:
            raise InvalidInputError(
                f"t = {t!r} tau is outside (0, {self.info.max_run_time:g}], the run time this device allows"
                + ("; split a longer run into several" if t > 0 else "; pass a positive time")
            )
        if not 0.0 <= burn_in < t:
            raise InvalidInputError(f"burn_in = {burn_in!r} must be in [0, t) with t = {t:g}")
        return t, burn_in

    def _load_ggn(self, ggn: GGN, scale: float | None, started: float) -> LoadReport:
        m, n = ggn.m, ggn.n
        self._check_fits(n, "GGN J (N parameters)")
        if m > self.info.max_ggn_rows:
            rows = self.info.max_ggn_rows
            has = f"only {rows} rows" if rows else "no structured arrays"
            raise InvalidInputError(
                f"GGN J has m = {m} rows (outputs of the batch), but {self.info.name} has {has}"
                " (coupling.max_ggn_rows); use a smaller batch, or a device spec with wider arrays"
            )
        if scale is not None:
            scale = _choose_scale(0.0, scale, "GGN")
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
        self._matrix_scale = codes.scale
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
        A = _as_float_array(A, "matrix A", 2)
        return _choose_scale(float(np.abs(A).max(initial=0.0)) / self.info.g_max, None, "matrix A")

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
            scale = self._auto_input_scale(b)
        scale = _choose_scale(float(np.abs(b).max()) / self.info.dac_range_v, scale, "vector b")
        with np.errstate(over="ignore"):  # a tiny scale sends b beyond the DAC: clipped and counted below
            q = to_codes(b / scale, self.info.dac_bits, self.info.dac_range_v)
        reply = self._call(Opcode.LOAD_VECTOR, {"codes": q.codes})
        self._vector_scale = scale
        return _report(scale, q, self._record("load_vector", reply, started))

    def _slowest_rate(self) -> float | None:
        """The loaded array's slowest relaxation rate, lambda_min(A) / s per tau (ideal parts); None when unknown."""
        if self._loaded is None or self._matrix_scale is None:
            return None
        if self._lambda_min is None:
            self._lambda_min = ranging.smallest_eigenvalue(self._loaded)
        stiffness = np.array([self._lambda_min / self._matrix_scale])
        return ranging.slowest_rate(self.info.cell_kind, stiffness, self.info.spec)

    def _auto_input_scale(self, b: np.ndarray) -> float:
        if self._loaded is None:
            raise DeviceStateError(
                "load_vector(b, scale='auto') ranges b for the loaded matrix: call load_matrix(A) first"
                " (a symmetric A, or a GGN)"
            )
        if self._slowest_rate() is None or self._lambda_min <= 0.0:
            raise InvalidInputError(
                f"the loaded matrix has smallest eigenvalue {self._lambda_min:.3g} <= 0: it is not positive"
                " definite, so the array has no equilibrium to range b for"
            )
        limits = [self.info.rail_v] if self.info.rail_v is not None else []
        if self.info.adc_bits > 0:
            limits.append(self.info.adc_range_v)
        dac = float(np.abs(b).max()) / self.info.dac_range_v
        if not limits:
            return dac if dac > 0.0 else 1.0
        # V* = (s / scale) A^-1 b in volts; aim its bound at _AUTO_FILL of the smaller limit
        bound = ranging.equilibrium_bound(b, self._lambda_min)
        needed = self._matrix_scale * bound / (_AUTO_FILL * min(limits))
        return max(needed, dac) if max(needed, dac) > 0.0 else 1.0

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
        """
        self._check_open()
        record = _recording(record_cov, record_samples, sample_stride)
        t = self._checked_run(t, 0.0)[0]
        t, burn_in = self._checked_run(t, 0.5 * t if burn_in is None else burn_in)
        engine_code = _option(engine, Engine, "engine")
        saturation_code = _option(on_saturation, OnSaturation, "on_saturation")
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
        rate = self._slowest_rate()
        left = ranging.settling(rate, burn_in)
        self._settling = (left, burn_in, rate)
        self._readout_scale = self._vector_scale / self._matrix_scale
        self._recorded = (bool(record["record_cov"]), record["record_samples"])
        return RunReport(
            analog_time=float(reply["analog_time"]),
            seconds=float(reply["analog_time"]) * self.info.tau_s,
            samples=int(reply["samples"]),
            engine=Engine(reply["engine"]).name,
            saturated=bool(reply["saturated"]),
            adc_clipped=int(reply["adc_clipped"]),
            steps=int(reply["steps"]),
            dt=float(reply["dt"]),
            wall_time_s=wall,
            device_time=spent,
            settling=left,
        )

    def read_mean(self) -> np.ndarray:
        """Average of the ADC samples of the last run, in user units: x ~ A^-1 b.  Shape (n,).

        Warns (``driver.SettlingWarning``) when the run's ``settling`` is above 1 %: its burn-in was
        too short for the array's slowest mode, so the average still holds that much transient."""
        ranging.warn_unsettled(*self._settling)
        started = time.perf_counter()
        reply = self._call(Opcode.READ_MEAN)
        self._record("read_mean", reply, started)
        return self._to_user(reply["mean_codes"])

    def read_state(self) -> np.ndarray:
        """One ADC snapshot of the present state, in user units.  Shape (n,)."""
        started = time.perf_counter()
        reply = self._call(Opcode.READ_STATE)
        self._record("read_state", reply, started)
        return self._to_user(reply["codes"])

    def read_cov(self) -> np.ndarray:
        """Sample covariance of the cells over the last run's window, in user units squared.  Shape (n, n).

        The device accumulates sum_k code_k code_k^T during a run with ``record_cov=True``
        and returns (S - K m m^T) / (K - 1) for its K conversions; here codes become
        user units (scale^2).  With the array at equilibrium it estimates
        kappa s_A A^-1 scaled to the readout (``driver.linalg.inv`` makes that A^-1); its
        relative error is about sqrt(2 tau_c / (t - burn_in)), tau_c the array's
        correlation time.  Raises DeviceStateError before any run, or when the last
        run did not record.
        """
        self._check_open()
        if self._recorded is None or not self._recorded[0]:
            did = "no run since open or reset" if self._recorded is None else "the last run did not record it"
            raise DeviceStateError(
                f"read_cov() needs the second moments of a run, and there are none ({did});"
                " call run(t, burn_in, record_cov=True) first"
            )
        started = time.perf_counter()
        reply = self._call(Opcode.READ_COV)
        self._record("read_cov", reply, started)
        return reply["cov_codes"] * self._user_per_code() ** 2

    def read_samples(self, k: int | None = None) -> np.ndarray:
        """The first k snapshots of the last run (all of them when k is None), in user units.  Shape (k, n).

        Snapshot j is the ADC conversion (j + 1) * sample_stride after burn_in of a run
        with ``record_samples >= k``.  Raises InvalidInputError for k <= 0 and
        DeviceStateError when the last run recorded fewer than k (or none).
        """
        self._check_open()
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise InvalidInputError(f"k must be a positive integer number of snapshots, got {k!r}")
            if k <= 0:
                raise InvalidInputError(f"k = {k} snapshots: ask for at least 1 (or pass None for all)")
        recorded = 0 if self._recorded is None else self._recorded[1]
        if recorded == 0 or (k is not None and k > recorded):
            did = "no run since open or reset" if self._recorded is None else f"the last run recorded {recorded}"
            raise DeviceStateError(
                f"read_samples({k}) needs that many snapshots ({did}); call run(t, burn_in,"
                f" record_samples={k or 1}, sample_stride=...) first"
            )
        started = time.perf_counter()
        reply = self._call(Opcode.READ_SAMPLES, {} if k is None else {"k": int(k)})
        self._record("read_samples", reply, started)
        return reply["codes"] * self._user_per_code()

    def set_noise(self, kappa0: float) -> None:
        """Set the injected noise level kappa0 (volts^2), 0 <= kappa0 <= info.kappa0_max, until reset().

        The stationary covariance of the array is then kappa0 * a^-1 in volts^2
        (plus the Johnson noise of its parts, when the spec has it).  Raises
        InvalidInputError on a device whose noise source is fixed (kappa0_max = 0).
        """
        self._check_open()
        kappa0 = real(kappa0, "kappa0", "a number of volts^2")
        if self.info.kappa0_max <= 0.0:
            raise InvalidInputError(
                f"the noise source of {self.info.name} is fixed at kappa0 = {self.info.kappa0:g} V^2"
                " (noise.kappa0_max = 0 in its spec); use a device whose noise source can be turned up"
            )
        if not 0.0 <= kappa0 <= self.info.kappa0_max:
            raise InvalidInputError(f"kappa0 = {kappa0!r} V^2 is outside [0, {self.info.kappa0_max:g}] of this device")
        self._call(Opcode.SET_NOISE, {"kappa0": kappa0})
        self._kappa0 = kappa0

    @property
    def noise_level(self) -> float:
        """The injected noise level kappa0 now set (volts^2): the spec's at open and after reset()."""
        return self._kappa0

    def _user_per_code(self) -> float:
        """User units per ADC code of the last run's readout: volts per code times the readout scale."""
        return float(from_codes(np.ones(1), self.info.adc_bits, self.info.adc_range_v)[0]) * self._readout_scale

    def _to_user(self, codes: np.ndarray) -> np.ndarray:
        if self._readout_scale is None:
            raise DeviceStateError(
                f"{self._label} holds a run this host did not make, so its scales are unknown;"
                " load the matrix and vector and run again"
            )
        volts = from_codes(codes, self.info.adc_bits, self.info.adc_range_v)
        return volts * self._readout_scale

    # -- housekeeping ------------------------------------------------------------
    def status(self) -> DeviceStatus:
        """The device's status word and counters."""
        reply = self._call(Opcode.STATUS)
        word = StatusBit(reply["word"])
        return DeviceStatus(
            matrix_loaded=bool(word & StatusBit.MATRIX_LOADED),
            vector_loaded=bool(word & StatusBit.VECTOR_LOADED),
            has_run=bool(word & StatusBit.HAS_RUN),
            saturated=bool(word & StatusBit.SATURATED),
            adc_clipped=bool(word & StatusBit.ADC_CLIPPED),
            matrix_n=int(reply["matrix_n"]),
            vector_n=int(reply["vector_n"]),
            runs=int(reply["runs"]),
            samples=int(reply["samples"]),
        )

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

    def _check_dense(self, n: int) -> None:
        self._check_fits(n, "matrix A")
        if n > self.info.max_dense_size:
            size = self.info.max_dense_size
            raise InvalidInputError(
                f"matrix A has size {n}, more than the largest dense matrix of {self.info.name}, {size} x {size}"
                " (coupling.max_dense_size); load a curvature J^T H J + damping I as driver.GGN(J, H, damping),"
                " or use a larger device spec"
            )

    def _check_fits(self, n: int, what: str) -> None:
        if n > self.info.cells:
            raise InvalidInputError(
                f"{what} has size {n}, more than the {self.info.cells} cells of {self.info.name};"
                " use a larger device spec or a smaller problem"
            )


def _as_float_array(value: Any, what: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"{what} could not be read as an array: {exc}") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim != ndim:
        raise InvalidInputError(f"{what} must have {ndim} dimension(s), got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidInputError(
            f"{what} has {int(bad.sum())} NaN or infinite entries (first at {first}); pass finite values"
        )
    return array


def _as_time(value: Any, what: str) -> float:
    value = real(value, what, "a number of tau")
    if not np.isfinite(value):
        raise InvalidInputError(f"{what} must be finite, got {value!r}")
    return value


def _choose_scale(natural: float, scale: float | None, what: str) -> float:
    if scale is None:
        return natural if natural > 0.0 else 1.0
    scale = real(scale, f"scale of {what}", "a positive number")
    if not (scale > 0.0 and np.isfinite(scale)):
        raise InvalidInputError(f"scale of {what} must be a positive finite number, got {scale!r}")
    return scale


def _recording(record_cov: Any, record_samples: Any, sample_stride: Any) -> dict[str, int]:
    """RUN's recording fields, checked: record_cov a bool, record_samples >= 0, sample_stride >= 1."""
    if not isinstance(record_cov, (bool, np.bool_)):
        raise InvalidInputError(f"record_cov must be True or False, got {record_cov!r}")
    for value, what, low in ((record_samples, "record_samples", 0), (sample_stride, "sample_stride", 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidInputError(f"{what} must be an integer, got {value!r}")
        if value < low:
            raise InvalidInputError(f"{what} = {value} must be at least {low}")
    return {"record_cov": int(record_cov), "record_samples": int(record_samples), "sample_stride": int(sample_stride)}


def _option(value: str, enum: type, what: str) -> int:
    try:
        return int(enum[value])
    except (KeyError, TypeError):
        allowed = ", ".join(repr(m.name) for m in enum)
        raise InvalidInputError(f"{what} = {value!r} is not one of {allowed}") from None


def _report(scale: float, q: Quantised, spent: DeviceTime) -> LoadReport:
    return LoadReport(scale=scale, clipped=q.clipped, zeroed=q.zeroed, max_error=q.max_error, device_time=spent)


def _device_time(reply: dict[str, Any]) -> DeviceTime:
    """The ``hardware_time`` map of a reply as a DeviceTime (NaN where the device did not report)."""
    reported = reply.get("hardware_time")
    if not isinstance(reported, dict):
        reported = {}
    return DeviceTime(
        **{name: float(reported.get(name, math.nan)) for name in ("link_s", "program_s", "analog_s", "convert_s")}
    )
