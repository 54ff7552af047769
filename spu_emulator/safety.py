"""When the exact engine is exact: the safety analysis behind engine "auto", and how far to scale an input down.

``SafetyAnalysis`` is the part of :class:`~spu_emulator.engines.Engines` (a mixin) that decides, from bounds
and without running anything, whether a run can meet a rail or the ADC's full scale, and whether a
quantised ADC is dithered; it reads the linear model (``_linear_model``), the device state and the spec.
"""

from __future__ import annotations

import math

import numpy as np

from .exact import LinearModel, window
from .lowrank import LowRankModel
from .payload import _Refused
from .protocol import Status

# fit_factor aims the equilibrium at this fraction of the smaller of the rails and the ADC range
_FIT_FILL = 0.7


class SafetyAnalysis:
    """The engine choice's checks (see the module docstring)."""

    def _linear_is_safe(self, t: float, burn_in: float) -> bool:
        """True when the exact engine is exact for a run (t, burn_in) from the present state.

        The array must be stable and contractive (so the mean path stays within
        e^{-mu s} |V(0) - V*| of V*; an oscillator array, which is not contractive, is bounded by
        ``OscillatorArray.reach`` instead); every node must stay z standard deviations inside the
        rails for the whole run, and inside the ADC's full scale from the first conversion of the
        window on, with z from a union bound over cells and correlation times at probability 1e-9;
        and a quantised ADC must be dithered by at least half an LSB of fresh noise per sample.
        The mean path is bounded first in O(n), then, if that bound is too loose, cell by cell
        (``LinearModel.reach(tight=True)``).
        """
        model = self._linear_model()
        if model is None or not (model.stable and (model.contractive or self._lc)):
            return False
        n = self._matrix.n
        looks = 2.0 * n * (1.0 + t * model.rate_max)
        z = max(6.0, math.sqrt(2.0 * math.log(looks / 1e-9)))
        limits = self._reach_limits(model, z)
        if limits is None:
            return False
        rail_limit, adc_limit = limits
        period = 1.0 / self.spec.adc.sample_rate
        m0, m1 = window(t, burn_in, period)
        checks = []  # (from which time, limit)
        if rail_limit is not None:
            checks.append((0.0, rail_limit))
        if adc_limit is not None and m1 > m0:  # the ADC only converts in the window
            checks.append(((m0 + 1) * period, adc_limit))
        target = model.fixed_point(self._phase_force())
        if self._lc:  # an oscillator overshoots: bound its mean path by a Lyapunov level set instead
            reach = self._oscillator.reach(self._phase_state(), target)
            return reach is not None and not any(np.any(reach >= limit) for _, limit in checks)
        state = self._state[:n]
        if isinstance(model, LinearModel) and self._within_lowest_limit(model, state, target, z, checks):
            return True
        return not any(
            (model.reach(state, target, start, stop=t) >= limit).any()
            and (model.reach(state, target, start, tight=True, stop=t) >= limit).any()
            for start, limit in checks
        )

    def _within_lowest_limit(
        self, model: LinearModel, state: np.ndarray, target: np.ndarray, z: float, checks: list
    ) -> bool:
        """A sufficient test, O(n) with two small reductions: max |V*| + ||V(0) - V*|| below the lowest of
        the limits.  ``LinearModel.reach`` bounds cell i by |V*_i| + e^{-mu s} ||d|| (e^{-mu s} <= 1 for a
        contractive model, and ||d|| computed as there), and rounding is monotone, so when this holds
        every cell of that bound is below its limit too, and the choice is the one the full test would
        make; when it fails the full test decides."""
        if not checks:
            return True
        key = (z, len(checks))  # the ADC's check is there when the window has conversions
        lowest = self._lowest_limits.get(key)
        if lowest is None:
            lowest = self._lowest_limits[key] = min(float(limit.min()) for _, limit in checks)
        d = state - target
        return self._peak(target, state.shape[0]) + math.sqrt(float(d.dot(d))) < lowest

    def _peak(self, target: np.ndarray, n: int) -> float:
        """max |V*_i| over the node voltages (the first n entries), once per V* array (the model memoises V*
        per drive, so the engine choice and the run share it)."""
        memo = self._target_peak
        if memo is None or memo[0] is not target:
            memo = self._target_peak = (target, float(np.abs(target[:n]).max()))
        return memo[1]

    def _reach_limits(
        self, model: LinearModel | LowRankModel, z: float
    ) -> tuple[np.ndarray | None, np.ndarray | None] | None:
        """Per cell, the reach of the mean path that leaves z stationary standard deviations inside the
        rails, and inside the ADC's full scale (gain |g|, offset o: |g| (reach + z spread) + |o| < range),
        volts (n,) each, None where there are no rails or the ADC is ideal; None in all when the ADC is not
        dithered, whatever the reach.  Depends on the model and z only, so it is kept for the model's
        lifetime: a loop of equal runs pays O(n) per run."""
        if self._limits_for is not model or len(self._limits) >= 64:  # 64: runs of many lengths
            self._limits_for, self._limits, self._lowest_limits = model, {}, {}
        if z in self._limits:
            return self._limits[z]
        n = self._matrix.n
        stationary_var = model.stationary_var_upper()[:n]  # of the node voltages (x of an oscillator's (x, p))
        rail_limit = adc_limit = None
        if self.spec.rails.enabled:
            rail_limit = self.spec.rails.v_rail - z * np.sqrt(stationary_var)
        adc = self.spec.adc
        if adc.bits > 0:
            fresh = model.fresh_var_lower(1.0 / adc.sample_rate)[:n] + adc.noise_v**2
            if np.any(np.sqrt(fresh) < 0.5 * self._adc_lsb()):
                self._limits[z] = None
                return None
            spread = np.sqrt(stationary_var + adc.noise_v**2)
            with np.errstate(divide="ignore"):
                span = (adc.range_v - np.abs(self.parts.adc_offset_v[:n])) / np.abs(self.parts.adc_gain[:n])
            adc_limit = span - z * spread
        self._limits[z] = rail_limit, adc_limit
        return self._limits[z]

    def _refuse_clipped_equilibrium(self, model: LinearModel, target: np.ndarray, n: int) -> None:
        """The exact engine has no rails and no ADC full scale: refuse when the equilibrium itself
        (V* plus 3 stationary standard deviations) lies beyond either, since its answer would be impossible.
        ``target``: V* (its first n entries are the node voltages).

        Tested first with scalars, max |V*| + max 3 sd against the rails and max |g| (that) + max |o| against
        the ADC range (the maxima of the spreads and converters once per model): each cell's level below is
        at most that, rounding being monotone, so when the scalars pass no cell can fail; else cell by cell."""
        memo = self._equilibrium_memo
        if memo is None or memo[0] is not model:
            spread = 3.0 * np.sqrt(model.stationary_var_upper()[:n])
            gain, offset = np.abs(self.parts.adc_gain[:n]), np.abs(self.parts.adc_offset_v[:n])
            memo = self._equilibrium_memo = (model, float(spread.max()), float(gain.max()), float(offset.max()))
        top = self._peak(target, n) + memo[1]
        rails, adc = self.spec.rails, self.spec.adc
        if (not rails.enabled or top < rails.v_rail) and (adc.bits <= 0 or memo[2] * top + memo[3] < adc.range_v):
            return
        target = target[:n]
        reach = np.abs(target) + 3.0 * np.sqrt(model.stationary_var_upper()[:n])
        limits = []
        if self.spec.rails.enabled:
            limits.append(("the rails", self.spec.rails.v_rail, reach))
        if self.spec.adc.bits > 0:
            seen = np.abs(self.parts.adc_gain[:n]) * reach + np.abs(self.parts.adc_offset_v[:n])
            limits.append(("the ADC full scale", self.spec.adc.range_v, seen))
        for what, limit, level in limits:
            worst = int(np.argmax(level))
            if level[worst] >= limit:
                raise _Refused(
                    Status.SATURATED,
                    f"the exact engine cannot model clipping, and the equilibrium of cell {worst} reaches"
                    f" {level[worst]:.3g} V, beyond {what} at {limit:g} V; scale b down, or use"
                    " engine='transient' to run into the limit",
                    **self._fit_factor(),
                )

    def _fit_factor(self) -> dict[str, float]:
        """{"fit_factor": f}: the input scaled down by f puts the equilibrium at 70 % of the smaller of the
        rails and the ADC range (f = max |V*| / (0.7 limit)); {} without a stable linear model.  O(n^2)."""
        model = self._linear_model()
        limits = [self.spec.rails.v_rail] if self.spec.rails.enabled else []
        if self.spec.adc.bits > 0:
            limits.append(self.spec.adc.range_v)
        if model is None or not model.stable or not limits:
            return {}
        n = self._matrix.n
        level = float(np.abs(model.fixed_point(self._phase_force())[:n]).max())
        return {"fit_factor": level / (_FIT_FILL * min(limits))} if level > 0.0 else {}
