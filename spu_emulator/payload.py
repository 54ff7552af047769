"""Reading the fields of a request's payload; a field that is missing or of the wrong kind is refused.

Every command handler raises ``_Refused(status, message)`` for a request it will not carry out;
``Firmware.handle`` turns it into the reply's status and message, with nothing changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .protocol import Status


class _Refused(Exception):
    def __init__(self, status: Status, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.extra = extra


def _array(payload: Mapping[str, Any], key: str, ndim: int) -> np.ndarray:
    value = payload.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != ndim:
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be a {ndim}-d array")
    return value


def _number(payload: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be finite, got {value!r}")
    return value


def _choice(payload: Mapping[str, Any], key: str, enum: type, default: int) -> int:
    """The field as a member's value (an int, which compares equal to the member), or refused."""
    value = payload.get(key, default)
    members = _VALUES.get(enum)
    if members is None:
        members = _VALUES[enum] = frozenset(int(m) for m in enum)
    if type(value) is int and value in members:  # the common case, without constructing the member
        return value
    try:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(value)  # 1.0 and True would pass as members of an IntEnum
        return enum(value)
    except ValueError:
        allowed = ", ".join(f"{m.value} ({m.name})" for m in enum)
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} = {value!r} is not one of {allowed}") from None


_VALUES: dict[type, frozenset[int]] = {}  # the member values of each enum _choice has read


def _integer(payload: Mapping[str, Any], key: str, default: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _Refused(Status.BAD_ARGUMENT, f"payload field {key!r} must be an integer, got {value!r}")
    return int(value)
