"""The device's analog settings, which last until reset(): the injected noise level, the oscillator
damping, and the calibration the driver applies to every load and read."""

from __future__ import annotations

from typing import Any

from . import calibration, precision
from .errors import InvalidInputError
from .numbers import real
from .protocol import Opcode


class Settings:
    """The settings half of :class:`~driver.device.Device` (a mixin): SET_NOISE, SET_DAMPING and the
    host-side calibration (``_kappa0``, ``_damping``, ``_calibration``, set by ``Device._forget_scales``)."""

    def set_noise(self, kappa0: float) -> None:
        """Set the injected noise level kappa0 (volts^2), 0 <= kappa0 <= info.kappa0_max, until reset().

        The stationary covariance of the array is then kappa0 * a^-1 in volts^2
        (plus the Johnson noise of its parts, when the spec has it).  Raises
        InvalidInputError on a device whose noise source is fixed (kappa0_max = 0).
        """
        self._check_open()
        kappa0 = real(kappa0, "kappa0", "a number of volts^2")
        if self.info.kappa0_max <= 0.0:
            raise InvalidInputError(
                f"the noise source of {self.info.name} is fixed at kappa0 = {self.info.kappa0:g} V^2"
                " (noise.kappa0_max = 0 in its spec); use a device whose noise source can be turned up"
            )
        if not 0.0 <= kappa0 <= self.info.kappa0_max:
            raise InvalidInputError(f"kappa0 = {kappa0!r} V^2 is outside [0, {self.info.kappa0_max:g}] of this device")
        self._call(Opcode.SET_NOISE, {"kappa0": kappa0})
        self._kappa0 = kappa0

    @property
    def noise_level(self) -> float:
        """The injected noise level kappa0 now set (volts^2): the spec's at open and after reset()."""
        return self._kappa0

    def set_damping(self, damping: float) -> None:
        """Set the oscillator cells' nominal damping gamma (R_d C0 / tau), within the spec's
        [oscillator.damping_min, damping_max], until reset().  A mode of stiffness k = lambda(A) / s is
        critically damped at gamma = 2 sqrt(k m), m the cells' inductance: ``driver.precision.critical_damping``
        gives the setting for A's slowest mode, which then settles in about sqrt(cond) periods, not cond.
        InvalidInputError on an RC device or one whose damping is fixed (damping_max = 0)."""
        self._check_open()
        damping = precision.checked_damping(self.info, damping)
        self._call(Opcode.SET_DAMPING, {"damping": damping})
        self._damping = damping

    @property
    def damping(self) -> float | None:
        """The oscillator cells' nominal damping now set: the spec's at open and after reset(); None for RC cells."""
        return self._damping if self.info.cell_kind == "oscillator" else None

    @property
    def calibration(self) -> calibration.Calibration | None:
        """The calibration every load and read now applies (``calibrate``), or None.  Kept by reset()."""
        return self._calibration

    def calibrate(self, **options: Any) -> calibration.Calibration:
        """Measure and install a calibration: ``driver.calibration.calibrate(self, **options)``."""
        return calibration.calibrate(self, **options)

    def clear_calibration(self) -> None:
        """Load and read without corrections again (no device call)."""
        self._calibration = None
