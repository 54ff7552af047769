"""What the driver reports back: the device's description, loads, runs, status and hardware time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .codes import Quantised
from .errors import InvalidInputError
from .protocol import StatusBit

__all__ = ["DeviceInfo", "RunReport", "LoadReport", "DeviceStatus", "DeviceTime", "CallRecord", "Timeline"]


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
        self._stages = [0.0, 0.0, 0.0, 0.0]  # device_time's fields, summed as DeviceTime.__add__ would
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

    @property
    def device_time(self) -> DeviceTime:
        """The summed :class:`DeviceTime` of every call recorded (made when read, not per call)."""
        return DeviceTime(*self._stages)

    def append(self, record: CallRecord) -> None:
        super().append(record)
        self.calls += 1
        spent, stages = record.device_time, self._stages
        stages[0] += spent.link_s
        stages[1] += spent.program_s
        stages[2] += spent.analog_s
        stages[3] += spent.convert_s
        self.hardware_s += spent.total_s
        self.wall_time_s += record.wall_time_s
        if self._maxlen is not None and len(self) > self._maxlen:
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


def device_info(reply: dict[str, Any]) -> DeviceInfo:
    """The DeviceInfo of an INFO reply (the device's spec as a mapping)."""
    spec = reply["spec"]
    return DeviceInfo(
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


def device_status(reply: dict[str, Any]) -> DeviceStatus:
    """The DeviceStatus of a STATUS reply (its status word and counters)."""
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


def load_report(scale: float, q: Quantised, spent: DeviceTime) -> LoadReport:
    return LoadReport(scale=scale, clipped=q.clipped, zeroed=q.zeroed, max_error=q.max_error, device_time=spent)


def device_time(reply: dict[str, Any]) -> DeviceTime:
    """The ``hardware_time`` map of a reply as a DeviceTime (NaN where the device did not report)."""
    reported = reply.get("hardware_time")
    if type(reported) is dict and len(reported) == 4:  # as the device reports it: its four floats
        try:
            return DeviceTime(
                float(reported["link_s"]),
                float(reported["program_s"]),
                float(reported["analog_s"]),
                float(reported["convert_s"]),
            )
        except (KeyError, TypeError, ValueError):
            pass  # the general reading below says NaN or raises as before
    if not isinstance(reported, dict):
        reported = {}
    return DeviceTime(
        **{name: float(reported.get(name, math.nan)) for name in ("link_s", "program_s", "analog_s", "convert_s")}
    )
