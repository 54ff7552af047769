"""Lagged second moments of a run (RUN's record_lags, READ_LAGGED): the host's half.

A run with ``record_lags=(L_1, ..., L_q)`` accumulates on the device, for each lag,
sum_{k=1}^{K-L} x_{k+L} x_k^T over the K conversions of its window (O(q n^2) per conversion,
memory q n^2 + (max L + 1) n values, whatever K); :func:`read` brings them back in user units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DeviceStateError, InvalidInputError
from .protocol import Opcode

__all__ = ["LaggedMoments", "MAX_LAGS", "RECORDING_VALUES", "checked_lags", "recording_values"]

MAX_LAGS = 8  # lags per run (protocol.yaml, RUN's record_lags)
RECORDING_VALUES = 1 << 25  # the device's recording memory, values (shared with the snapshot buffer)
_CHUNK_VALUES = 1 << 16  # what the device sets aside for handing conversions to the accumulator


@dataclass(frozen=True)
class LaggedMoments:
    """What READ_LAGGED returns, in user units.

    lags: the lags in ADC conversions; sums: (q, n, n), sums[l] = sum_{k=1}^{K-L} x_{k+L} x_k^T
    (uncentred); pairs: (q,) K - L; mean: (n,) the window mean; samples: K.
    """

    lags: tuple[int, ...]
    sums: np.ndarray
    pairs: np.ndarray
    mean: np.ndarray
    samples: int

    def covariance(self, lag: int) -> np.ndarray:
        """C(L) = sums / pairs - mean mean^T for one of the recorded lags, (n, n): the lagged covariance
        <x_{k+L} x_k^T> (centred with the whole window's mean; O(L / K) from the pairs' own means)."""
        if lag not in self.lags:
            raise InvalidInputError(f"lag {lag!r} was not recorded; the run recorded lags {list(self.lags)}")
        which = self.lags.index(lag)
        return self.sums[which] / self.pairs[which] - np.outer(self.mean, self.mean)


def recording_values(q: int, longest: int, n: int) -> int:
    """Values of recording memory q lags up to ``longest`` take for n cells: q n^2 + (longest + 1) n + chunk."""
    return q * n * n + (longest + 1) * n + _CHUNK_VALUES


def checked_lags(lags: Any) -> tuple[int, ...]:
    """record_lags as run() takes it: 1 to MAX_LAGS distinct integers >= 0, returned ascending."""
    try:
        values = [lags] if isinstance(lags, (int, np.integer)) else list(lags)
    except TypeError:
        raise InvalidInputError(f"record_lags must be a sequence of integer lags, got {lags!r}") from None
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidInputError(f"record_lags must hold integers >= 0 (ADC conversions), got {value!r}")
    if not 1 <= len(values) <= MAX_LAGS or len(set(values)) != len(values):
        raise InvalidInputError(f"record_lags = {values!r}: pass 1 to {MAX_LAGS} distinct lags")
    return tuple(sorted(int(v) for v in values))


def window_conversions(dev: Any, t: float, burn_in: float) -> int:
    """ADC conversions in a run's window (burn_in, t] (``spu_emulator.exact.window``'s count)."""
    rate = dev.info.sample_rate
    return max(0, math.floor(t * rate + 1e-9) - math.floor(burn_in * rate + 1e-9))


def check_window(dev: Any, lags: tuple[int, ...], t: float, burn_in: float) -> None:
    """InvalidInputError when the longest lag does not fit the run's window (before the device is touched)."""
    count = window_conversions(dev, t, burn_in)
    if lags[-1] >= count:
        period = 1.0 / dev.info.sample_rate
        raise InvalidInputError(
            f"record_lags has a lag of {lags[-1]} ADC conversions ({lags[-1] * period:g} tau), but the window"
            f" t - burn_in = {t - burn_in:g} tau holds {count} conversions; lengthen t by at least"
            f" {(lags[-1] + 1 - count) * period:g} tau, or shorten the lag"
        )


def read(dev: Any) -> LaggedMoments:
    """READ_LAGGED in user units (``Device.read_lagged``)."""
    dev._check_open()
    if not getattr(dev, "_recorded_lags", None):
        raise DeviceStateError(
            "read_lagged() needs the lagged sums of a run, and the last run recorded none;"
            " call run(t, burn_in, record_lags=(0, L)) first"
        )
    started = time.perf_counter()
    reply = dev._call(Opcode.READ_LAGGED)
    dev._record("read_lagged", reply, started)
    unit = dev._user_per_code()
    return LaggedMoments(
        lags=tuple(int(v) for v in reply["lags"]),
        sums=np.asarray(reply["sums"]) * unit * unit,
        pairs=np.asarray(reply["pairs"], dtype=np.int64),
        mean=np.asarray(reply["mean_codes"]) * unit,
        samples=int(reply["samples"]),
    )
