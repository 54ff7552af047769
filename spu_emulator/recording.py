"""What a RUN records besides the mean: the second-moment accumulator, the snapshot buffer and the
lagged second-moment accumulators (record_lags)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .payload import _integer, _Refused
from .protocol import Engine, Status

# the snapshot buffer's capacity, in values: 256 MiB of float64, the wire's largest payload
_MAX_SNAPSHOT_VALUES = 1 << 25
# record_lags: at most this many lags; the transient engine hands conversions to the lagged
# accumulator a chunk of at most _LAG_CHUNK_VALUES values at a time
_MAX_LAGS = 8
_LAG_CHUNK_VALUES = 1 << 16


@dataclass(frozen=True)
class _Record:
    """What a RUN records besides the mean (RUN's record_cov, record_samples, sample_stride).

    cov_acc: (n, n) accumulator of code code^T over the window, or (0, 0) for off;
    snapshots: (k, n) buffer of the stride-th, 2 stride-th, ... conversion after burn_in,
    or (0, n) for off.  The kernels fill them (``_kernels._record``); off costs nothing.
    """

    cov_acc: np.ndarray
    snapshots: np.ndarray
    stride: int
    # record_lags: lags (q,) in conversions, ascending, and their accumulators (q, n, n) of
    # sum_k code_{k+L} code_k^T (``_lagged._accumulate_lagged``); (0,) and (0, n, n) for off
    lags: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lagged: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))

    @property
    def on(self) -> bool:
        """The run records its conversions one by one (the transient engine's accumulators)."""
        return self.cov_acc.size > 0 or self.snapshots.shape[0] > 0

    @property
    def lagged_on(self) -> bool:
        return self.lags.shape[0] > 0

    @classmethod
    def off(cls, n: int, stride: int = 1) -> _Record:
        """A record of nothing for n cells; one per (n, stride), shared, since its buffers are empty."""
        record = _OFF.get((n, stride))
        if record is None:
            if len(_OFF) >= 64:
                _OFF.clear()
            record = _OFF[n, stride] = cls(np.zeros((0, 0)), np.zeros((0, n)), stride)
        return record

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], n: int, engine: int) -> _Record:
        cov = _integer(payload, "record_cov", 0)
        k = _integer(payload, "record_samples", 0)
        stride = _integer(payload, "sample_stride", 1)
        if cov not in (0, 1):
            raise _Refused(Status.BAD_ARGUMENT, f"record_cov = {cov} must be 0 or 1")
        if k < 0 or k * n > _MAX_SNAPSHOT_VALUES:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_samples = {k} must be in [0, {_MAX_SNAPSHOT_VALUES // n}] for n = {n}"
                f" (the snapshot buffer holds {_MAX_SNAPSHOT_VALUES} values); split the sampling over several runs",
            )
        if stride < 1:
            raise _Refused(Status.BAD_ARGUMENT, f"sample_stride = {stride} must be at least 1")
        if (cov or k) and engine == Engine.exact:
            raise _Refused(
                Status.BAD_ARGUMENT,
                "the exact engine draws a run's average in one go, not its conversions, so it cannot record"
                " second moments or snapshots; use engine transient (or auto, which steps a recording run)",
            )
        lags = _lags(payload, n, k)
        if not (cov or k or lags.shape[0]):
            return cls.off(n, stride)
        return cls(
            np.zeros((n, n) if cov else (0, 0)),
            np.zeros((k, n)),
            stride,
            lags,
            np.zeros((lags.shape[0], n, n) if lags.shape[0] else (0, 0, 0)),
        )

    def check_window(self, conversions: int, period: float) -> None:
        """Refuse (before anything runs) a snapshot count, or a lag, the run's window cannot hold."""
        if self.lagged_on and int(self.lags[-1]) >= max(conversions, 0):
            lag = int(self.lags[-1])
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_lags has a lag of {lag} ADC conversions, but the window after burn_in holds"
                f" {max(conversions, 0)} ({period:g} tau apart), so no pair is that far apart; lengthen t by at"
                f" least {(lag + 1 - max(conversions, 0)) * period:g} tau, or shorten the lag",
            )
        k = self.snapshots.shape[0]
        need = k * self.stride
        if need > conversions:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_samples = {k} with sample_stride = {self.stride} needs {need} ADC conversions after"
                f" burn_in, but the window holds {max(conversions, 0)} ({period:g} tau apart); lengthen t by"
                f" {(need - max(conversions, 0)) * period:g} tau",
            )


_OFF: dict[tuple[int, int], _Record] = {}  # _Record.off's


def _lags(payload: Mapping[str, Any], n: int, snapshots: int) -> np.ndarray:
    """RUN's record_lags, checked: 1 to _MAX_LAGS distinct ascending lags >= 0 whose accumulators, ring
    and chunk fit the recording memory (_MAX_SNAPSHOT_VALUES values); (0,) when absent."""
    value = payload.get("record_lags")
    if value is None:
        return np.zeros(0, dtype=np.int64)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise _Refused(Status.BAD_ARGUMENT, f"record_lags must be a 1-d array of integers, got {value!r}")
    lags = value.astype(np.int64)
    q = lags.shape[0]
    if not 1 <= q <= _MAX_LAGS:
        raise _Refused(Status.BAD_ARGUMENT, f"record_lags has {q} lags; record 1 to {_MAX_LAGS} per run")
    if lags[0] < 0 or np.any(np.diff(lags) <= 0):
        raise _Refused(
            Status.BAD_ARGUMENT, f"record_lags = {lags.tolist()} must be distinct lags >= 0 in ascending order"
        )
    if snapshots:
        raise _Refused(
            Status.BAD_ARGUMENT,
            "record_lags and record_samples share the recording memory: record one of them per run",
        )
    need = q * n * n + (int(lags[-1]) + 1) * n + _LAG_CHUNK_VALUES
    if need > _MAX_SNAPSHOT_VALUES:
        fit = (_MAX_SNAPSHOT_VALUES - _LAG_CHUNK_VALUES - q * n * n) // n - 1
        what = f"the longest lag to {fit}" if fit >= int(lags[0]) and fit >= 0 else "fewer lags or a smaller array"
        raise _Refused(
            Status.BAD_ARGUMENT,
            f"record_lags = {lags.tolist()} for n = {n} cells needs {need} values of recording memory"
            f" ({q} n^2 accumulators and a ring of the last {int(lags[-1]) + 1} conversions), over the device's"
            f" {_MAX_SNAPSHOT_VALUES}; cut {what}",
        )
    return lags
