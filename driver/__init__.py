"""Host-side driver of a stochastic processing unit (SPU).

import driver
with driver.open("spu-8", seed=0) as dev:
    dev.load_matrix(A)
    dev.load_vector(b)
    dev.run(t=100.0, burn_in=50.0)
    x = dev.read_mean()          # ~ A^-1 b
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import (
    AuthenticationError,
    DeviceBusyError,
    DeviceClosedError,
    DeviceInternalError,
    DeviceStateError,
    InvalidInputError,
    LinkError,
    LinkTimeoutError,
    ProtocolError,
    RunAbortedError,
    SaturationError,
    SpecError,
    SpuError,
)

try:  # from the installed distribution's metadata (no numpy import)
    __version__: str = _installed_version("spu-emulator")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from . import linalg, ngd, tngd
    from .calibration import Calibration, calibrate
    from .device import CallRecord, Device, DeviceInfo, DeviceStatus, DeviceTime, LoadReport, RunReport
    from .ggn import GGN
    from .ranging import SettlingWarning
    from .sweeps import load_sweep, sweep
    from .tngd import TNGD
    from .transport import InProcessTransport  # noqa: F401 - driver.InProcessTransport, as before

# The rest loads on first use (PEP 562): importing a light submodule -- the pytest plugin
# driver.pytest_plugin, which pytest imports at its start-up in every project where spu-emulator
# is installed -- must not import numpy, scipy and numba (nor set BLAS threads before a conftest).
_LAZY = {
    **dict.fromkeys(
        ["CallRecord", "Device", "DeviceInfo", "DeviceStatus", "DeviceTime", "LoadReport", "RunReport"], "device"
    ),
    "GGN": "ggn",
    "load_sweep": "sweeps",
    "sweep": "sweeps",
    "TNGD": "tngd",
    "SettlingWarning": "ranging",
    "calibrate": "calibration",
    "Calibration": "calibration",
    "InProcessTransport": "transport",
}
# submodules that `import driver` used to import, still reachable as attributes (driver.codes, ...)
_SUBMODULES = {
    "codes",
    "device",
    "ggn",
    "linalg",
    "ngd",
    "protocol",
    "ranging",
    "calibration",
    "mitigation",
    "precision",
    "sampling",
    "sweeps",
    "tngd",
    "transport",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


__all__ = [
    "open",
    "Device",
    "DeviceInfo",
    "DeviceStatus",
    "LoadReport",
    "RunReport",
    "DeviceTime",
    "CallRecord",
    "GGN",
    "linalg",
    "ngd",
    "tngd",
    "TNGD",
    "sweep",
    "load_sweep",
    "calibrate",
    "Calibration",
    "SpuError",
    "InvalidInputError",
    "SpecError",
    "DeviceStateError",
    "DeviceClosedError",
    "DeviceBusyError",
    "DeviceInternalError",
    "SaturationError",
    "SettlingWarning",
    "ProtocolError",
    "LinkError",
    "LinkTimeoutError",
    "AuthenticationError",
    "RunAbortedError",
]


def open(  # noqa: A001 - the driver's verb
    spec: str | Path | dict = "spu-8",
    seed: int | None = None,
    *,
    overrides: dict | None = None,
    timeout: float | None = None,
    poll_s: float | None = None,
    token: str | bytes | None = None,
) -> Device:
    """Open an emulated SPU from a preset name (``"ideal"``, ``"spu-8"``, ``"tngd-sim"``),
    the path of a YAML spec or a mapping with the YAML's structure, or a served device
    (``spu serve``) at ``"tcp://HOST:PORT"``.

    ``overrides``: a device variant, ``{"adc.bits": 10, "noise.kappa0": 1e-3}``: dotted field
    paths of ``firmware_spec/schema.yaml``, each replacing one field of the spec before it is
    checked by the same loader as a file (a SpecError names the field).  ``dev.info.spec`` holds
    the effective values.  A served device's spec is fixed by its server (``spu serve --set``).

    ``seed`` fixes the device: its component mismatch and its noise stream.  The
    same spec, seed and calls give bit-identical results; seed=None draws fresh
    entropy (``Device.info.seed_entropy`` records it).  A served device has the seed
    it was served with: pass that seed (it is checked) or None; it is reset on open, so
    it starts at power-on like an in-process one (see firmware_spec/PROTOCOL.md).

    ``timeout`` (tcp:// only): seconds to wait for the connection and for each reply,
    default 60 (protocol.yaml ``timing.client_timeout_s``), ``math.inf`` for no limit.
    ``poll_s`` (tcp:// only): seconds to busy-poll for each reply before sleeping, default
    1 ms (``timing.polling.host_poll_s``); 0 sleeps at once and saves the CPU, for a
    few tens of microseconds more per exchange.
    ``token`` (tcp:// only): the shared secret of a server started with ``spu serve --token-file``; the
    host and the device prove to each other that they hold it (HMAC-SHA256 challenge-response, the
    token never crosses the link) before any command; a mismatch raises AuthenticationError.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}")
    if isinstance(spec, str) and spec.startswith("tcp://"):
        from .tcp import open_tcp  # imports the wire codec only when a socket is wanted

        if overrides:
            raise InvalidInputError(
                f"overrides apply to in-process devices; the spec of {spec} is fixed by its server:"
                " start it with `spu serve PRESET --set KEY=VALUE`"
            )
        return open_tcp(spec, seed=seed, timeout=timeout, poll_s=poll_s, token=token)
    if token is not None:
        raise InvalidInputError(
            f"token applies to tcp:// devices; {spec!r} is opened in this process, where there is no link to protect"
        )
    from .device import Device
    from .transport import InProcessTransport

    transport = InProcessTransport(spec, seed=seed, overrides=overrides)
    label = "a spec mapping" if isinstance(spec, dict) else str(spec)
    return Device(transport, label=f"device {label!r}")
