"""Reading results back: the window mean, one snapshot, the window covariance and the recorded snapshots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _kernels
from .converters import code_max
from .payload import _integer, _Refused
from .protocol import Status, StatusBit
from .timing import _sum_bits, _times, read_cov_time, read_mean_time, read_samples_time, read_state_time

_HAS_RUN = int(StatusBit.HAS_RUN)  # the firmware keeps its status word as an int


class Readout:
    """The read commands of :class:`~spu_emulator.firmware.Firmware` (a mixin); they change nothing but
    the noise stream (READ_STATE draws ADC noise)."""

    def _read_mean(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & _HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN before READ_MEAN")
        if self._samples == 0:
            raise _Refused(
                Status.BAD_STATE,
                "the last run took no ADC samples: its window t - burn_in was shorter than one"
                f" sample period ({1.0 / self.spec.adc.sample_rate:g} tau)",
            )
        return {
            "mean_codes": self._acc / self._samples,
            "samples": self._samples,
            "hardware_time": self._hardware_time(read_mean_time, self._acc.shape[0], self._samples),
        }

    def _read_state(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & _HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN before READ_STATE")
        n = self._matrix.n
        adc = self.spec.adc
        out = np.empty(n)
        clipped = _kernels._adc_snapshot(
            self._state[:n].copy(),
            self.parts.adc_gain[:n],
            self.parts.adc_offset_v[:n],
            adc.noise_v,
            adc.range_v / code_max(adc.bits) if adc.bits > 0 else 0.0,
            float(code_max(adc.bits)),
            self._rng,
            out,
        )
        return {"codes": out, "clipped": int(clipped), "hardware_time": read_state_time(self.spec, n)}

    def _read_cov(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & _HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN with record_cov = 1 before READ_COV")
        if self._cov_acc is None:
            raise _Refused(
                Status.BAD_STATE, "the last run did not record second moments; RUN with record_cov = 1 before READ_COV"
            )
        count = self._samples
        if count < 2:
            raise _Refused(
                Status.BAD_STATE,
                f"the last run took {count} ADC sample(s) and a covariance needs 2; lengthen its window t - burn_in"
                f" beyond {2.0 / self.spec.adc.sample_rate:g} tau",
            )
        mean = self._acc / count
        cov = (self._cov_acc - count * np.outer(mean, mean)) / (count - 1)
        return {
            "cov_codes": 0.5 * (cov + cov.T),
            "mean_codes": mean,
            "samples": count,
            "hardware_time": read_cov_time(self.spec, mean.shape[0], count),
        }

    def _read_samples(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        k = _integer(payload, "k", -1) if "k" in payload else None
        if k is not None and k <= 0:
            raise _Refused(Status.BAD_ARGUMENT, f"k = {k} snapshots: ask for at least 1 (or leave k out for all)")
        start = _integer(payload, "start", 0)
        if start < 0:
            raise _Refused(Status.BAD_ARGUMENT, f"start = {start} must be a snapshot index >= 0")
        if not self._flags & _HAS_RUN:
            raise _Refused(
                Status.BAD_STATE, "no run since power-on or reset; RUN with record_samples = k before READ_SAMPLES"
            )
        if self._snapshots is None:
            raise _Refused(
                Status.BAD_STATE, "the last run recorded no snapshots; RUN with record_samples = k before READ_SAMPLES"
            )
        recorded = self._snapshots.shape[0]
        if start >= recorded or (k is not None and start + k > recorded):
            asked = f"{k} from snapshot {start} on" if start else f"{k}"
            raise _Refused(
                Status.BAD_STATE,
                f"the last run recorded {recorded} snapshots and {asked if k is not None else f'snapshot {start} on'}"
                f" were asked for; RUN with record_samples >= {start + (k or 1)}",
            )
        codes = self._snapshots[start : recorded if k is None else start + k].copy()
        return {
            "codes": codes,
            "recorded": recorded,
            "hardware_time": read_samples_time(self.spec, codes.shape[1], codes.shape[0]),
        }

    def _read_lagged(self, _: Mapping[str, Any]) -> dict[str, Any]:
        if not self._flags & _HAS_RUN:
            raise _Refused(Status.BAD_STATE, "no run since power-on or reset; RUN with record_lags before READ_LAGGED")
        if self._lagged is None:
            raise _Refused(
                Status.BAD_STATE, "the last run did not record lagged sums; RUN with record_lags before READ_LAGGED"
            )
        lags, sums = self._lagged
        count = self._samples
        n = sums.shape[1]
        adc_bits = self.spec.adc.bits
        # q n^2 sums of products of two codes and n sums of codes over the link
        link = lags.shape[0] * n * n * _sum_bits(adc_bits, 2, count) + n * _sum_bits(adc_bits, 1, count)
        return {
            "lags": lags.copy(),
            "sums": sums.copy(),
            "pairs": np.maximum(count - lags, 0).astype(np.int64),
            "mean_codes": self._acc / count if count else np.zeros(n),
            "samples": count,
            "hardware_time": _times(self.spec, link_bits=link),
        }
