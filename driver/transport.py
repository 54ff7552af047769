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

__all__ = ["Transport", "InProcessTransport", "effective_spec"]


class Transport(Protocol):
    def request(self, opcode: int, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Send one command and return the device's (status, payload)."""

    def close(self) -> None:
        """Release the link; further requests are not allowed."""


class InProcessTransport:
    """An emulated device in this process, built from a preset name, YAML path or spec mapping,
    with optional dotted overrides (``{"adc.bits": 10}``)."""

    def __init__(
        self, spec: str | Path | dict[str, Any], seed: int | None = None, overrides: dict[str, Any] | None = None
    ):
        # the one place the driver touches the emulator: through its firmware entry point
        from spu_emulator import Firmware

        self._firmware = Firmware(_load(spec, overrides), seed=seed)

    @property
    def firmware(self):
        """The emulated device behind this link (for tests and debugging)."""
        return self._firmware

    def request(self, opcode: int, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return self._firmware.handle(opcode, payload)  # which runs its BLAS on a fixed thread count

    def close(self) -> None:
        self._firmware = None


def _load(spec: Any, overrides: dict[str, Any] | None):
    from spu_emulator import SpecError as DeviceSpecError
    from spu_emulator import load_spec

    try:
        return load_spec(spec, overrides)
    except DeviceSpecError as exc:
        raise SpecError(str(exc)) from None


def effective_spec(spec: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec an in-process device would get, as plain data, checked by the emulator's loader
    (raises :class:`driver.SpecError` naming the field).  Builds no device."""
    return _load(spec, overrides).to_dict()
