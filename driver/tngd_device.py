"""The device step of the TNGD client: load F + lambda I and g, set or keep the state, run, read.

``DeviceStep`` is the half of :class:`driver.tngd.TNGD` (a mixin) that talks to the device: what to
load (:meth:`DeviceStep._program`), the state scale r (user units of g~ per volt) that keeps the
state inside the converters (ranging), re-initialisation by a relaxation run, and the retries after
a clipped run.  It reads the optimiser's hyperparameters (``t``, ``delay``, ``burn_in``,
``readout``, ``state_scale_fixed``, ``warm_start``, ``damping``) and keeps its device-side state
(``_estimate``, ``_state_scale``, ``_previous_scale``, ``_device_holds_estimate``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import ngd
from .device import LoadReport, RunReport
from .errors import InvalidInputError, SaturationError
from .ggn import GGN
from .ranging import SettlingWarning

_RELAX_RATES = 40.0  # re-initialisation runs 40 / g_max tau: residual e^{-40} = 4e-18 of the old state
_HEADROOM = 2.0  # the state scale leaves this factor above what the gradient and state need
_FILL = 0.5  # aim the state at no more than this fraction of the ADC range / rails
_LOOSE = 32.0  # on a quantised device, re-range when the signal falls below 1/_LOOSE of the aim
_STEP_UP = 4.0  # after a clipped run, the state scale grows by this factor
_MAX_TRIES = 8


@dataclass(frozen=True)
class _Program:
    """A curvature ready to load: the array (or GGN) and the scale s it goes in at."""

    matrix: Any
    scale: float


@dataclass
class _Tally:
    """Running account of one step's device calls (their hardware time is in Device.timeline)."""

    device_time: float = 0.0
    reinitialised: int = 0
    retries: int = 0
    engine: str = ""
    loads: int = 0
    runs: int = 0
    reads: int = 0


class DeviceStep:
    """The device half of :class:`driver.tngd.TNGD` (a mixin; see the module docstring)."""

    # -- the device step -----------------------------------------------------------------------------
    def _device_step(self, g: np.ndarray, curv: ngd.Curvature, tally: _Tally) -> np.ndarray:
        fresh = self._estimate is None or not self.warm_start
        # everything that can be refused is checked before the first device call
        program = self._program(curv)
        scale = program.scale
        t_device = self.t * scale
        self._check_times(t_device, scale)
        if self.state_scale_fixed is not None:
            self._check_fits_dac(g, scale, g if fresh else None)
        if not fresh and self.delay > 0.0 and self._previous_scale is not None and self._device_holds_estimate:
            # the device keeps evolving under the previous F and g while the host computes this batch
            try:
                self._run(self.delay * self._previous_scale, 0.0, tally)
            except SaturationError:
                pass  # the delay run was discarded (state unchanged); carry on from where it was
        x_start = g if fresh else None
        if x_start is None and not self._device_holds_estimate:
            x_start = self._estimate  # a restored state: the device holds something else
        elif x_start is None and self._needs_reranging(g, scale):
            x_start = self._read_state(tally)
        if x_start is not None:
            self._state_scale = self._choose_state_scale(g, scale, x_start)
            self._relax_to(x_start, tally)
        else:
            x_start = self._estimate
        self._load_curvature(program, tally)
        self._load_gradient(g, scale, tally)
        for _ in range(_MAX_TRIES):
            if t_device == 0.0:
                break
            try:
                report = self._run(t_device, self.burn_in * scale, tally)
            except SaturationError as error:
                if error.report.get("runaway"):
                    raise
                restart = self._read_state(tally)  # a refused run changed nothing: this is the state before it
            else:
                tally.engine = report.engine
                if not report.adc_clipped:
                    break
                restart = x_start
            if self.state_scale_fixed is not None:
                raise SaturationError(
                    f"the run clipped at state_scale = {self._state_scale:g}; raise state_scale, or leave it"
                    " None so the client ranges automatically"
                )
            tally.retries += 1
            self._state_scale *= _STEP_UP
            self._relax_to(restart, tally)
            self._load_curvature(program, tally)
            self._load_gradient(g, scale, tally)
        else:
            raise SaturationError(
                f"the device clipped at every state scale up to {self._state_scale:.3g} user units per volt."
                f" Either F + lambda I is not positive definite, or the injected noise is too strong for the"
                f" converters: kappa0 = {self.device.info.kappa0:.3g} V^2 spreads the slowest mode by"
                f" sqrt(kappa0 s / lambda) = {math.sqrt(self.device.info.kappa0 * scale / self.damping):.3g} V"
                f" against an ADC range of {self.device.info.adc_range_v:g} V, whatever the state scale; lower"
                " kappa0 (or raise the damping)"
            )
        x = self._read_state(tally) if self.readout == "state" or t_device == 0.0 else self._read_mean(tally)
        self._estimate = x
        self._device_holds_estimate = True
        return x

    def _check_times(self, t_device: float, scale: float) -> None:
        info = self.device.info
        if t_device > info.max_run_time:
            raise InvalidInputError(
                f"t = {self.t:g} needs {t_device:.3g} tau on the device (matrix scale s = {scale:.3g}), more than"
                f" the {info.max_run_time:g} tau one run may take; choose t <= {info.max_run_time / scale:.3g}"
            )
        if self.delay * scale > info.max_run_time:
            raise InvalidInputError(
                f"delay = {self.delay:g} needs {self.delay * scale:.3g} tau on the device, more than the"
                f" {info.max_run_time:g} tau one run may take; choose delay <= {info.max_run_time / scale:.3g}"
            )
        if self.readout == "mean":
            period = 1.0 / info.sample_rate
            first = math.floor(self.burn_in * scale / period + 1e-9)
            last = math.floor(t_device / period + 1e-9)
            if last <= first:
                raise InvalidInputError(
                    f"readout='mean' needs at least one ADC sample in (burn_in, t]: the device samples every"
                    f" {period:g} tau, i.e. every {period / scale:.3g} in the units of t at this load's scale"
                    f" s = {scale:.3g}; lengthen t - burn_in (now {self.t - self.burn_in:g})"
                )

    def _check_fits_dac(self, g: np.ndarray, scale: float, x0: np.ndarray | None) -> None:
        """With a fixed state scale r, the gradient (and a state to set) must fit the DAC as they are."""
        info = self.device.info
        r = self.state_scale_fixed
        if float(np.abs(g).max()) > r * scale * info.dac_range_v:
            raise InvalidInputError(
                f"the gradient does not fit the DAC at state_scale = {r:g} (max|g| = {np.abs(g).max():.3g},"
                f" the DAC takes up to r s {info.dac_range_v:g} V = {r * scale * info.dac_range_v:.3g});"
                " raise state_scale or leave it None"
            )
        if x0 is not None and info.g_max * float(np.abs(x0).max()) > r * info.dac_range_v:
            raise InvalidInputError(
                f"the state to set does not fit the DAC at state_scale = {r:g} (max|x| = {np.abs(x0).max():.3g});"
                " raise state_scale or leave it None"
            )

    def _program(self, curv: ngd.Curvature) -> _Program:
        """What to load for F + lambda I and at which scale s (user units of F per g0).

        J, H go in as a ``driver.GGN`` (the structured arrays, N x N never formed) when the device has
        enough GGN rows, else as the dense F + lambda I.  s is the driver's own choice
        (``Device.matrix_scale``), passed explicitly so it is known before the load (the state may
        have to be re-initialised first).
        """
        if curv.is_ggn and self.device.info.max_ggn_rows >= curv.J.shape[0]:
            matrix = GGN(curv.J, curv.H, curv.damping)
        else:
            matrix = curv.dense()
        return _Program(matrix=matrix, scale=self.device.matrix_scale(matrix))

    def _load_curvature(self, program: _Program, tally: _Tally) -> None:
        report = self.device.load_matrix(program.matrix, scale=program.scale)
        self._account_load(report, tally)
        self._previous_scale = program.scale

    def _load_gradient(self, g: np.ndarray, scale: float, tally: _Tally) -> None:
        report = self.device.load_vector(g, scale=self._state_scale * scale)
        if report.clipped:
            raise InvalidInputError(
                f"the gradient does not fit the DAC at state_scale = {self._state_scale:g}"
                f" (max|g| = {np.abs(g).max():.3g}); raise state_scale or leave it None"
            )
        self._account_load(report, tally)

    def _relax_to(self, x0: np.ndarray, tally: _Tally) -> None:
        """Set the device state to x0 (user units): identity at full scale, input g_max x0 / r, 40 / g_max tau.

        The identity goes in as a GGN with J = 0 and damping 1 (N + 2 codes) where the device has
        structured arrays, else as a dense n x n identity.
        """
        dev = self.device
        g_max = dev.info.g_max
        n = x0.shape[0]
        r = self._state_scale
        if dev.info.max_ggn_rows >= 1:
            identity = GGN(np.zeros((1, n)), np.zeros((1, 1)), 1.0)
        else:
            identity = np.eye(n)
        self._account_load(dev.load_matrix(identity, scale=1.0 / g_max), tally)
        report = dev.load_vector(x0, scale=r / g_max)
        if report.clipped:
            raise InvalidInputError(
                f"the state to set does not fit the DAC at state_scale = {r:g} (max|x| = {np.abs(x0).max():.3g});"
                " raise state_scale or leave it None"
            )
        self._account_load(report, tally)
        self._run(_RELAX_RATES / g_max, 0.0, tally)
        tally.reinitialised += 1

    def _run(self, t_device: float, burn_in_device: float, tally: _Tally) -> RunReport:
        tally.runs += 1
        report = self.device.run(t_device, burn_in_device)
        tally.device_time += report.analog_time
        return report

    def _read_state(self, tally: _Tally) -> np.ndarray:
        tally.reads += 1
        return self.device.read_state()

    def _read_mean(self, tally: _Tally) -> np.ndarray:
        tally.reads += 1
        with warnings.catch_warnings():  # readout="mean" mixes in the transient by design (module docstring)
            warnings.simplefilter("ignore", SettlingWarning)
            return self.device.read_mean()

    def _account_load(self, report: LoadReport, tally: _Tally) -> None:
        tally.loads += 1

    # -- ranging --------------------------------------------------------------------------------------
    def _volts_full(self) -> float:
        """Largest state voltage the device converts and holds (inf for an ideal ADC without rails)."""
        info = self.device.info
        limits = []
        if info.adc_bits > 0:
            limits.append(info.adc_range_v)
        if info.rail_v is not None:
            limits.append(info.rail_v)
        return min(limits) if limits else math.inf

    def _needs(self, g: np.ndarray, scale: float, states: list[np.ndarray]) -> tuple[float, float]:
        """(smallest r the gradient's DAC allows, r that puts the given states at the aim of the ADC range)."""
        info = self.device.info
        dac = float(np.abs(g).max()) / (scale * info.dac_range_v)
        full = self._volts_full()
        biggest = max(float(np.abs(x).max()) for x in states)
        adc = biggest / (_FILL * full) if math.isfinite(full) else 0.0
        return dac, adc

    def _needs_reranging(self, g: np.ndarray, scale: float) -> bool:
        if self.state_scale_fixed is not None:
            return False
        r = self._state_scale
        dac, adc = self._needs(g, scale, [self._estimate])
        if r < dac or r < adc * _FILL / 0.9:  # gradient beyond the DAC, or the state above 90 % of full scale
            return True
        info = self.device.info
        quantised = info.adc_bits > 0 or info.dac_bits > 0
        aim = max(dac, adc)
        return quantised and aim > 0.0 and r > _LOOSE * _HEADROOM * aim

    def _choose_state_scale(self, g: np.ndarray, scale: float, x0: np.ndarray) -> float:
        if self.state_scale_fixed is not None:
            return self.state_scale_fixed
        info = self.device.info
        states = [x0] if self._estimate is None else [x0, self._estimate]
        dac, adc = self._needs(g, scale, states)
        relax = info.g_max * float(np.abs(x0).max()) / info.dac_range_v
        need = max(dac, adc, relax)
        return _HEADROOM * need if need > 0.0 else (self._state_scale or 1.0)
