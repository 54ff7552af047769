"""The one reading of a scalar argument as a float, shared by every validator of the driver."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError

__all__ = ["real"]


def real(value: Any, what: str, expected: str = "a number") -> float:
    """``value`` as a float; InvalidInputError for a bool, a non-number, or an int beyond the float range.

    NaN and inf pass: the caller's range check says what range it needs.  ``expected`` words the message
    ("a number of tau", "a positive number", ...).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"{what} must be {expected}, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        digits = len(str(abs(int(value))))
        raise InvalidInputError(
            f"{what} is an integer of {digits} digits, beyond the range of a float (about 1.8e308);"
            f" pass {expected} in range"
        ) from None
