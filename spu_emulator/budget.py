"""The device's memory budget (``memory.budget_bytes`` in the spec): what a load or a recording may take.

The counts are the firmware's own arrays in 8-byte values (schema.yaml ``memory.budget_bytes``), a
little above what it keeps, so a refusal comes before the allocation rather than after:

    dense load of size n:            6 n^2
    GGN load of m rows on N cells:   (c / 8 + 1) m N + 3 m^2 without element mismatch, (c / 8 + 2) m N + 3 m^2
                                     with it (J's codes of c bytes each are kept as sent; J as float64
                                     conductances, and J^T's separately with mismatch, for the transient
                                     engine; the exact engine reads the codes)
    a RUN's recording:               k n (record_samples = k) + n^2 (record_cov)
                                     + q n^2 + (largest lag + 1) n (q record_lags)

A load is checked alone (it replaces the array before it); a RUN checks the programmed array and its
recording together.  Cost O(1).
"""

from __future__ import annotations

from .payload import _Refused
from .protocol import Status
from .spec import DeviceSpec

__all__ = ["dense_bytes", "ggn_bytes", "recording_bytes", "check_budget"]

_VALUE = 8  # bytes of a float64


def dense_bytes(n: int) -> int:
    """Bytes a dense load of size n counts against the budget."""
    return _VALUE * 6 * n * n


def ggn_bytes(m: int, n: int, code_bytes: int, mismatched: bool) -> int:
    """Bytes a GGN load of m rows on n cells counts against the budget: J's codes (``code_bytes`` each), its
    float64 conductances (twice with element mismatch: J^T's parts are separate) and the m x m arrays."""
    return m * n * (code_bytes + _VALUE * (2 if mismatched else 1)) + _VALUE * 3 * m * m


def recording_bytes(record) -> int:
    """Bytes a RUN's recording (``recording._Record``) counts: its snapshot buffer, second-moment and lagged
    accumulators, and the ring of the last conversions the lagged accumulator keeps."""
    n = record.snapshots.shape[1] if record.snapshots.ndim == 2 else 0
    ring = (int(record.lags[-1]) + 1) * n if record.lags.shape[0] else 0
    return record.snapshots.nbytes + record.cov_acc.nbytes + record.lagged.nbytes + _VALUE * ring


def check_budget(spec: DeviceSpec, need: int, what: str, advice: str) -> None:
    """Refuse (BAD_ARGUMENT) when ``need`` bytes exceed the spec's memory.budget_bytes; nothing is changed."""
    budget = spec.memory.budget_bytes
    if need > budget:
        raise _Refused(
            Status.BAD_ARGUMENT,
            f"{what} needs {need / 2**20:,.1f} MiB of device memory, over the {budget / 2**20:,.0f} MiB of"
            f" {spec.name} (memory.budget_bytes); {advice}",
        )
