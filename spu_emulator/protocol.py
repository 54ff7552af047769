"""Integer codes of the command set, read from ``firmware_spec/protocol.yaml``."""

from __future__ import annotations

from enum import IntEnum, IntFlag

from .spec import SPEC_DIR, read_yaml

__all__ = ["PROTOCOL_VERSION", "Opcode", "Status", "Engine", "OnSaturation", "StatusBit"]

_doc = read_yaml((SPEC_DIR / "protocol.yaml").read_text())

PROTOCOL_VERSION: int = _doc["protocol_version"]
Opcode = IntEnum("Opcode", _doc["opcodes"])
Status = IntEnum("Status", _doc["status"])
Engine = IntEnum("Engine", _doc["engines"])
OnSaturation = IntEnum("OnSaturation", _doc["on_saturation"])
StatusBit = IntFlag("StatusBit", _doc["status_bits"])
