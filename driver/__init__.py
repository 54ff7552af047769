"""Host-side driver of a stochastic processing unit (SPU).

import driver
with driver.open("spu-8", seed=0) as dev:
    dev.load_matrix(A)
    dev.load_vector(b)
    dev.run(t=100.0, burn_in=50.0)
    x = dev.read_mean()          # ~ A^-1 b
"""

from __future__ import annotations

from pathlib import Path

from . import linalg
from .device import Device, DeviceInfo, DeviceStatus, LoadReport, RunReport
from .errors import (
    DeviceBusyError,
    DeviceClosedError,
    DeviceStateError,
    InvalidInputError,
    ProtocolError,
    SaturationError,
    SpecError,
    SpuError,
)
from .transport import InProcessTransport

__all__ = [
    "open",
    "Device",
    "DeviceInfo",
    "DeviceStatus",
    "LoadReport",
    "RunReport",
    "linalg",
    "SpuError",
    "InvalidInputError",
    "SpecError",
    "DeviceStateError",
    "DeviceClosedError",
    "DeviceBusyError",
    "SaturationError",
    "ProtocolError",
]


def open(spec: str | Path = "spu-8", seed: int | None = None) -> Device:  # noqa: A001 - the driver's verb
    """Open an emulated SPU from a preset name (``"ideal"``, ``"spu-8"``, ``"tngd-sim"``)
    or the path of a YAML spec.

    ``seed`` fixes the device: its component mismatch and its noise stream.  The
    same spec, seed and calls give bit-identical results; seed=None draws fresh
    entropy (``Device.info.seed_entropy`` records it).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}")
    transport = InProcessTransport(spec, seed=seed)
    return Device(transport, label=f"device {str(spec)!r}")
