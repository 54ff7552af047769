"""Reading results back from the device in the user's units: the window mean, a snapshot, the
window covariance and the recorded snapshots."""

from __future__ import annotations

import time

import numpy as np

from . import calibration, ranging
from .codes import from_codes
from .errors import DeviceStateError, InvalidInputError
from .protocol import Opcode

# read_samples asks for at most this many bytes of codes per READ_SAMPLES, so the largest recording a
# device accepts (2^25 values, 256 MiB) crosses a link whose frames hold 256 MiB in pieces
SAMPLES_REPLY_BYTES = 64 << 20


class Readout:
    """The read-out half of :class:`~driver.device.Device` (a mixin): it undoes the scales of the last run
    (``_readout_scale``, set by ``run``) and records each read on the timeline."""

    def read_mean(self) -> np.ndarray:
        """Average of the ADC samples of the last run, in user units: x ~ A^-1 b.  Shape (n,).

        Warns (``driver.SettlingWarning``) when the run's ``settling`` is above 1 %: its burn-in was
        too short for the array's slowest mode, so the average still holds that much transient."""
        ranging.warn_unsettled(*self._settling)
        started = time.perf_counter()
        reply = self._call(Opcode.READ_MEAN)
        self._record("read_mean", reply, started)
        return self._to_user(reply["mean_codes"])

    def read_state(self) -> np.ndarray:
        """One ADC snapshot of the present state, in user units.  Shape (n,)."""
        started = time.perf_counter()
        reply = self._call(Opcode.READ_STATE)
        self._record("read_state", reply, started)
        return self._to_user(reply["codes"])

    def read_cov(self) -> np.ndarray:
        """Sample covariance of the cells over the last run's window, in user units squared.  Shape (n, n).

        The device accumulates sum_k code_k code_k^T during a run with ``record_cov=True``
        and returns (S - K m m^T) / (K - 1) for its K conversions; here codes become
        user units (scale^2).  With the array at equilibrium it estimates
        kappa s_A A^-1 scaled to the readout (``driver.linalg.inv`` makes that A^-1); its
        relative error is about sqrt(2 tau_c / (t - burn_in)), tau_c the array's
        correlation time.  Raises DeviceStateError before any run, or when the last
        run did not record.
        """
        self._check_open()
        if self._recorded is None or not self._recorded[0]:
            did = "no run since open or reset" if self._recorded is None else "the last run did not record it"
            raise DeviceStateError(
                f"read_cov() needs the second moments of a run, and there are none ({did});"
                " call run(t, burn_in, record_cov=True) first"
            )
        started = time.perf_counter()
        reply = self._call(Opcode.READ_COV)
        self._record("read_cov", reply, started)
        return reply["cov_codes"] * self._user_per_code() ** 2

    def read_samples(self, k: int | None = None) -> np.ndarray:
        """The first k snapshots of the last run (all of them when k is None), in user units.  Shape (k, n).

        Snapshot j is the ADC conversion (j + 1) * sample_stride after burn_in of a run
        with ``record_samples >= k``.  Raises InvalidInputError for k <= 0 and
        DeviceStateError when the last run recorded fewer than k (or none).  Read in requests of at
        most 64 MiB of codes (READ_SAMPLES with ``start``), each on the timeline.
        """
        self._check_open()
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise InvalidInputError(f"k must be a positive integer number of snapshots, got {k!r}")
            if k <= 0:
                raise InvalidInputError(f"k = {k} snapshots: ask for at least 1 (or pass None for all)")
        recorded = 0 if self._recorded is None else self._recorded[1]
        if recorded == 0 or (k is not None and k > recorded):
            did = "no run since open or reset" if self._recorded is None else f"the last run recorded {recorded}"
            raise DeviceStateError(
                f"read_samples({k}) needs that many snapshots ({did}); call run(t, burn_in,"
                f" record_samples={k or 1}, sample_stride=...) first"
            )
        codes = _read_snapshots(self, recorded if k is None else int(k))
        return calibration.output_codes(self, codes) * self._user_per_code()

    def _user_per_code(self) -> float:
        """User units per ADC code of the last run's readout: volts per code times the readout scale."""
        return float(from_codes(np.ones(1), self.info.adc_bits, self.info.adc_range_v)[0]) * self._readout_scale

    def _to_user(self, codes: np.ndarray) -> np.ndarray:
        if self._readout_scale is None:
            raise DeviceStateError(
                f"{self._label} holds a run this host did not make, so its scales are unknown;"
                " load the matrix and vector and run again"
            )
        volts = from_codes(calibration.output_codes(self, codes), self.info.adc_bits, self.info.adc_range_v)
        return volts * self._readout_scale


def _read_snapshots(device: Readout, k: int) -> np.ndarray:
    """Snapshots 0..k-1 of the last run as codes (k, n): one READ_SAMPLES when they fit SAMPLES_REPLY_BYTES,
    else consecutive pieces (``start``, ``k``) written into one array, so the host holds them once."""
    rows = max(1, SAMPLES_REPLY_BYTES // (8 * device.info.cells))  # n <= cells; refined from the first reply
    codes = None
    start = 0
    while start < k:
        count = min(rows, k - start)
        request = {"k": count} if start == 0 else {"k": count, "start": start}  # start only where needed
        started = time.perf_counter()
        reply = device._call(Opcode.READ_SAMPLES, request)
        device._record("read_samples", reply, started)
        piece = reply["codes"]
        if codes is None:
            if piece.shape[0] == k:
                return piece
            codes = np.empty((k, piece.shape[1]))
            rows = max(1, SAMPLES_REPLY_BYTES // (8 * piece.shape[1]))  # the next pieces at the size that fits
        codes[start : start + piece.shape[0]] = piece
        start += piece.shape[0]
    return codes
