"""Transports carry command messages between the driver and a device.

A transport has one method that matters, ``request(opcode, payload) -> (status,
payload)``, plus ``close()``.  The in-process transport hands the messages to an
emulated device's firmware in this process; the socket transport
(:class:`driver.tcp.TcpTransport`, ``driver.open("tcp://HOST:PORT")``) serialises the
same messages, so the driver has a single code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .errors import SpecError

__all__ = ["Transport", "InProcessTransport"]


class Transport(Protocol):
    def request(self, opcode: int, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Send one command and return the device's (status, payload)."""

    def close(self) -> None:
        """Release the link; further requests are not allowed."""


class InProcessTransport:
    """An emulated device in this process, built from a preset name or YAML path."""

    def __init__(self, spec: str | Path, seed: int | None = None):
        # the one place the driver touches the emulator: through its firmware entry point
        from spu_emulator import Firmware, load_spec
        from spu_emulator import SpecError as DeviceSpecError

        try:
            device_spec = load_spec(spec)
        except DeviceSpecError as exc:
            raise SpecError(str(exc)) from None
        self._firmware = Firmware(device_spec, seed=seed)

    @property
    def firmware(self):
        """The emulated device behind this link (for tests and debugging)."""
        return self._firmware

    def request(self, opcode: int, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return self._firmware.handle(opcode, payload)

    def close(self) -> None:
        self._firmware = None
