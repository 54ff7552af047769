"""What a RUN records besides the mean: the second-moment accumulator and the snapshot buffer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .payload import _integer, _Refused
from .protocol import Engine, Status

# the snapshot buffer's capacity, in values: 256 MiB of float64, the wire's largest payload
_MAX_SNAPSHOT_VALUES = 1 << 25


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

    @property
    def on(self) -> bool:
        return self.cov_acc.size > 0 or self.snapshots.shape[0] > 0

    @classmethod
    def off(cls, n: int) -> _Record:
        return cls(np.zeros((0, 0)), np.zeros((0, n)), 1)

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
        return cls(np.zeros((n, n) if cov else (0, 0)), np.zeros((k, n)), stride)

    def check_window(self, conversions: int, period: float) -> None:
        """Refuse (before anything runs) a snapshot count the run's window cannot hold."""
        k = self.snapshots.shape[0]
        need = k * self.stride
        if need > conversions:
            raise _Refused(
                Status.BAD_ARGUMENT,
                f"record_samples = {k} with sample_stride = {self.stride} needs {need} ADC conversions after"
                f" burn_in, but the window holds {max(conversions, 0)} ({period:g} tau apart); lengthen t by"
                f" {(need - max(conversions, 0)) * period:g} tau",
            )
