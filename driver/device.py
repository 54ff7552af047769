"""The host-side Device: the calls a program makes on an SPU (DESIGN section 5).

The driver validates arguments, chooses scales so A and b use the code ranges
well, converts to codes, and undoes the scales on read-out, so results are in
the user's units.  With a matrix scale s_A (user units per g0) and a vector
scale s_b (user units per volt) the array solves a V = u with a = A / s_A and
u = b / s_b, so x = A^-1 b = V * s_b / s_A.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .codes import Quantised, from_codes, to_codes
from .errors import (
    DeviceBusyError,
    DeviceClosedError,
    DeviceStateError,
    InvalidInputError,
    ProtocolError,
    SaturationError,
)
from .protocol import Engine, OnSaturation, Opcode, Status, StatusBit
from .transport import Transport

__all__ = ["Device", "DeviceInfo", "RunReport", "LoadReport", "DeviceStatus"]

# |A - A.T| up to this fraction of max |A| counts as symmetric (round-off of J^T H J and the like)
SYMMETRY_RTOL = 1e-10


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


@dataclass(frozen=True)
class LoadReport:
    """Result of a load: the scale chosen (user units per device unit) and what
    the conversion to codes lost (see :class:`driver.codes.Quantised`)."""

    scale: float
    clipped: int
    zeroed: int
    max_error: float


@dataclass(frozen=True)
class RunReport:
    """Result of a run.

    analog_time: tau actually run (t rounded to the integrator's step grid);
    seconds: the same on the device's clock; samples: ADC conversions accumulated
    per cell; engine: "transient" or "exact"; saturated: a node hit a rail;
    adc_clipped: conversions clipped at the ADC's full scale; steps, dt: the
    integrator's step count and step (tau), 0 for the exact engine;
    wall_time_s: host time for the call.
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
        )
        self._forget_scales()

    def _forget_scales(self) -> None:
        self._matrix_scale: float | None = None
        self._vector_scale: float | None = None
        self._readout_scale: float | None = None

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
            if reply.get("keepable"):
                message += "; scale b down, or pass on_saturation='flag' to keep such a run"
            raise SaturationError(message, reply)
        if status == Status.BUSY:
            raise DeviceBusyError(message + "; wait for the other host to close it")
        raise ProtocolError(message)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Device {self.info.name!r}, {self.info.cells} {self.info.cell_kind} cells, {state}>"

    # -- loads -------------------------------------------------------------------
    def load_matrix(self, A: Any, *, symmetric: bool = True, scale: float | None = None) -> LoadReport:
        """Program the coupling array with A (n, n), n <= cells.

        The array is programmed with a = A / scale (g0); by default scale =
        max|A| / g_max, so the largest element uses the full code range.  With
        ``symmetric`` (default) A must equal A.T to round-off.  Cost O(n^2) here
        plus the transfer of n^2 codes.
        """
        self._check_open()
        A = _as_float_array(A, "matrix A", 2)
        n = A.shape[0]
        if A.shape != (n, n) or n == 0:
            raise InvalidInputError(f"matrix A must be square and non-empty, got shape {A.shape}")
        self._check_fits(n, "matrix A")
        biggest = float(np.abs(A).max())
        if symmetric:
            asym = np.abs(A - A.T)
            where = np.unravel_index(int(np.argmax(asym)), asym.shape)
            if asym[where] > SYMMETRY_RTOL * biggest:
                raise InvalidInputError(
                    f"matrix A must be symmetric: max |A - A.T| = {asym[where]:.3g} at {tuple(map(int, where))};"
                    " symmetrise it, or pass symmetric=False to load a non-symmetric drift"
                )
        scale = _choose_scale(biggest / self.info.g_max, scale, "matrix A")
        q = to_codes(A / scale, self.info.element_bits, self.info.g_max)
        self._call(Opcode.LOAD_MATRIX, {"codes": q.codes})
        self._matrix_scale = scale
        return _report(scale, q)

    def load_vector(self, b: Any, *, scale: float | None = None) -> LoadReport:
        """Set the input DACs to u = b / scale (volts), b of shape (n,), n <= cells.

        By default scale = max|b| / dac_range_v, so the largest entry uses the
        DAC's full range.  Cost O(n) plus the transfer of n codes.
        """
        self._check_open()
        b = _as_float_array(b, "vector b", 1)
        if b.shape[0] == 0:
            raise InvalidInputError("vector b must be non-empty")
        self._check_fits(b.shape[0], "vector b")
        scale = _choose_scale(float(np.abs(b).max()) / self.info.dac_range_v, scale, "vector b")
        q = to_codes(b / scale, self.info.dac_bits, self.info.dac_range_v)
        self._call(Opcode.LOAD_VECTOR, {"codes": q.codes})
        self._vector_scale = scale
        return _report(scale, q)

    # -- run and read-out --------------------------------------------------------
    def run(self, t: float, burn_in: float = 0.0, *, engine: str = "auto", on_saturation: str = "raise") -> RunReport:
        """Let the array evolve for analog time t (tau); accumulate ADC samples after burn_in.

        The array follows C dV/dt = -a V + gin u + noise from its present state
        (the state carries over between runs).  ``read_mean`` then gives the
        average of the ADC samples taken in (burn_in, t].

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
        """
        self._check_open()
        t = _as_time(t, "t")
        burn_in = _as_time(burn_in, "burn_in")
        if not 0.0 < t <= self.info.max_run_time:
            raise InvalidInputError(
                f"t = {t!r} tau is outside (0, {self.info.max_run_time:g}], the run time this device allows"
                + ("; split a longer run into several" if t > 0 else "; pass a positive time")
            )
        if not 0.0 <= burn_in < t:
            raise InvalidInputError(f"burn_in = {burn_in!r} must be in [0, t) with t = {t:g}")
        engine_code = _option(engine, Engine, "engine")
        saturation_code = _option(on_saturation, OnSaturation, "on_saturation")
        if self._matrix_scale is None or self._vector_scale is None:
            raise DeviceStateError("load a matrix and a vector before run(): call load_matrix(A) and load_vector(b)")
        started = time.perf_counter()
        reply = self._call(
            Opcode.RUN, {"t": t, "burn_in": burn_in, "engine": engine_code, "on_saturation": saturation_code}
        )
        wall = time.perf_counter() - started
        self._readout_scale = self._vector_scale / self._matrix_scale
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
        )

    def read_mean(self) -> np.ndarray:
        """Average of the ADC samples of the last run, in user units: x ~ A^-1 b.  Shape (n,)."""
        reply = self._call(Opcode.READ_MEAN)
        return self._to_user(reply["mean_codes"])

    def read_state(self) -> np.ndarray:
        """One ADC snapshot of the present state, in user units.  Shape (n,)."""
        reply = self._call(Opcode.READ_STATE)
        return self._to_user(reply["codes"])

    def _to_user(self, codes: np.ndarray) -> np.ndarray:
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
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{what} must be a number of tau, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise InvalidInputError(f"{what} must be finite, got {value!r}")
    return value


def _choose_scale(natural: float, scale: float | None, what: str) -> float:
    if scale is None:
        return natural if natural > 0.0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"scale of {what} must be a positive number, got {scale!r}")
    scale = float(scale)
    if not (scale > 0.0 and np.isfinite(scale)):
        raise InvalidInputError(f"scale of {what} must be a positive finite number, got {scale!r}")
    return scale


def _option(value: str, enum: type, what: str) -> int:
    try:
        return int(enum[value])
    except (KeyError, TypeError):
        allowed = ", ".join(repr(m.name) for m in enum)
        raise InvalidInputError(f"{what} = {value!r} is not one of {allowed}") from None


def _report(scale: float, q: Quantised) -> LoadReport:
    return LoadReport(scale=scale, clipped=q.clipped, zeroed=q.zeroed, max_error=q.max_error)
