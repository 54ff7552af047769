"""Integer codes of the command set, read from ``firmware_spec/protocol.yaml`` (host side)."""

from __future__ import annotations

from enum import IntEnum, IntFlag
from pathlib import Path

import yaml

# firmware_spec/ is installed beside the packages (and sits beside them in a checkout)
SPEC_DIR = Path(__file__).resolve().parent.parent / "firmware_spec"

__all__ = ["PROTOCOL_VERSION", "Opcode", "Status", "Engine", "OnSaturation", "StatusBit"]

_doc = yaml.safe_load((SPEC_DIR / "protocol.yaml").read_text())

PROTOCOL_VERSION: int = _doc["protocol_version"]
Opcode = IntEnum("Opcode", _doc["opcodes"])
Status = IntEnum("Status", _doc["status"])
Engine = IntEnum("Engine", _doc["engines"])
OnSaturation = IntEnum("OnSaturation", _doc["on_saturation"])
StatusBit = IntFlag("StatusBit", _doc["status_bits"])
