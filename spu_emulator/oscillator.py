"""Oscillator (RLC) cells: their realised parts and the programmed state of an oscillator array.

Cell i of an oscillator array (DESIGN 4.2; the 8-cell prototype of Melanson et al.,
arXiv 2312.04836) has a node voltage x_i and an inductor flux p_i (volts * tau):

    dx_i = p_i / m_i dt
    dp_i = (f_i - sum_j a_ij x_j - gamma_i p_i / m_i) dt + sqrt(2 gamma_i kappa_i) dW_i

with m_i = c_i l_i the cell's mass (capacitance times inductance, tau^2), gamma_i =
damping_i c_i its damping (the series resistance of the inductor branch times the
cell capacitance, tau), f_i = gin_i u_i + gtot_i v_os,i the drive and kappa_i the
noise level of the RC array (injected plus Johnson), injected through the damping
branch.  Underdamped Langevin dynamics: for a symmetric a and equal kappa_i the
stationary density is proportional to exp(-(x^T a x / 2 - f^T x + sum_i p_i^2 / (2 m_i)) / kappa),
so x ~ N(a^-1 f, kappa a^-1) whatever the masses and dampings are, the RC array's
target; m and gamma set how fast it is reached.  A mode of stiffness k (eigenvalue
of a, unit mass) is critically damped at gamma = 2 sqrt(k m) and then decays as
(1 + w t) e^{-w t}, w = sqrt(k / m): for an ill-conditioned a, damping tuned to the
slowest mode relaxes in about sqrt(cond(a)) periods instead of the RC array's
cond(a) time constants (Aifer et al., arXiv 2308.05660).

As one linear SDE on the phase state s = (x, p) in R^2n, in the exact engine's form
ds = (F - G s) dt + S dW:

    G = [[0, -M^-1], [a, Gamma M^-1]],   F = (0, f),   S = diag(0, sqrt(2 gamma kappa))

(noise on p only: the diffusion is singular, which the general form of
``spu_emulator.exact`` handles; G is never symmetric, so the modal form is never chosen).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg

from .parts import DAMPING_STREAM, INDUCTANCE_STREAM, _stream
from .spec import DeviceSpec

__all__ = ["OscillatorParts", "OscillatorArray", "draw_oscillator_parts", "program_oscillator"]


@dataclass(frozen=True)
class OscillatorParts:
    """Per-cell realised parts of an oscillator array, each of shape (cells,).

    inductance: l_i in L0 = r0_ohm^2 c0_farad (nominal spec value times 1 + sigma eps);
    damping: R_d,i C0 / tau (nominal times 1 + sigma eps), before the factor c_i.
    """

    inductance: np.ndarray
    damping: np.ndarray


def draw_oscillator_parts(spec: DeviceSpec, seed: np.random.SeedSequence) -> OscillatorParts:
    """Draw the inductors and damping resistors of every cell, each from its own stream.  Cost O(cells)."""
    n = spec.cells.count
    osc = spec.oscillator

    def relative(key: int, sigma: float) -> np.ndarray:
        if sigma == 0.0:
            return np.ones(n)
        return 1.0 + sigma * _stream(seed, key).standard_normal(n)

    return OscillatorParts(
        inductance=osc.inductance * relative(INDUCTANCE_STREAM, osc.inductance_mismatch),
        damping=osc.damping * relative(DAMPING_STREAM, osc.damping_mismatch),
    )


@dataclass(frozen=True)
class OscillatorArray:
    """What LOAD_MATRIX (or SET_NOISE) leaves on an oscillator device, computed once.

    conductance: (n, n) a in g0; mass: (n,) m_i = c_i l_i; damping: (n,) gamma_i;
    kappa: (n,) noise level, volts^2; omega_max: estimate of the fastest resonance
    sqrt(||M^-1 a||_2), rad / tau, which sets the integrator's step.
    """

    conductance: np.ndarray
    mass: np.ndarray
    damping: np.ndarray
    kappa: np.ndarray
    omega_max: float

    @property
    def n(self) -> int:
        return self.mass.shape[0]

    @property
    def inv_mass(self) -> np.ndarray:
        return 1.0 / self.mass

    @property
    def friction_rate(self) -> np.ndarray:
        """gamma_i / m_i, the decay rate of p_i without coupling, 1 / tau."""
        return self.damping / self.mass

    @property
    def momentum_sd(self) -> np.ndarray:
        """sqrt(kappa_i m_i): the stationary spread of p_i that the friction and noise keep."""
        return np.sqrt(self.kappa * self.mass)

    @cached_property
    def drift(self) -> np.ndarray:
        """G = [[0, -M^-1], [a, Gamma M^-1]], (2n, 2n), of ds = (F - G s) dt + S dW."""
        n = self.n
        out = np.zeros((2 * n, 2 * n))
        out[np.arange(n), n + np.arange(n)] = -self.inv_mass
        out[n:, :n] = self.conductance
        out[n + np.arange(n), n + np.arange(n)] = self.friction_rate
        return out

    @cached_property
    def noise_sd(self) -> np.ndarray:
        """(2n,): 0 for each x_i, sqrt(2 gamma_i kappa_i) for each p_i."""
        return np.concatenate([np.zeros(self.n), np.sqrt(2.0 * self.damping * self.kappa)])

    def phase_force(self, force: np.ndarray) -> np.ndarray:
        """F = (0, f), (2n,), for a drive f (n,)."""
        return np.concatenate([np.zeros(self.n), force])

    @cached_property
    def _lyapunov_weight(self) -> np.ndarray | None:
        """P with G^T P + P G = Q, Q = diag(0, 2 Gamma M^-2) >= 0, or None when G is not stable.

        For a symmetric a, P is the energy blockdiag(a, M^-1); with mismatch it stays a valid
        (positive definite, non-increasing) weight.  O(n^3), once per load.
        """
        if np.linalg.eigvals(self.drift).real.min() <= 0.0:
            return None
        dissipation = np.diag(np.concatenate([np.zeros(self.n), 2.0 * self.damping / self.mass**2]))
        weight = scipy.linalg.solve_continuous_lyapunov(self.drift.T, dissipation)
        weight = 0.5 * (weight + weight.T)
        return weight if np.linalg.eigvalsh(weight)[0] > 0.0 else None

    def reach(self, phase_state: np.ndarray, phase_target: np.ndarray) -> np.ndarray | None:
        """Per cell, a bound on |x_i| along the mean path from ``phase_state`` to ``phase_target``.

        The mean path d(t) = e^{-G t} d(0) never increases V(d) = d^T P d (V' = -d^T Q d),
        so |d_x,i| <= sqrt(V(d(0)) (P^-1)_ii): a bound for an oscillating (not contractive)
        array, which may overshoot; for a symmetric a it is the energy bound
        sqrt(2 E(0) (a^-1)_ii).  None when G is not stable.  O(n^2) after the first call.
        """
        weight = self._lyapunov_weight
        if weight is None:
            return None
        d = phase_state - phase_target
        level = float(d @ weight @ d)
        return np.abs(phase_target[: self.n]) + np.sqrt(max(level, 0.0)) * self._level_spread

    @cached_property
    def _level_spread(self) -> np.ndarray:
        """sqrt((P^-1)_ii) over the x_i: the largest |x_i| on the level set d^T P d = 1.  O(n^3), once."""
        return np.sqrt(np.diag(np.linalg.inv(self._lyapunov_weight))[: self.n])


def program_oscillator(
    conductance: np.ndarray,
    capacitance: np.ndarray,
    parts: OscillatorParts,
    kappa: np.ndarray,
    spectral_norm,
) -> OscillatorArray:
    """The oscillator array for programmed conductances a (n, n), cell capacitances c (n,),
    realised parts and noise levels kappa (n,).  ``spectral_norm(m)`` estimates ||m||_2.  Cost O(n^2)."""
    n = conductance.shape[0]
    mass = capacitance * parts.inductance[:n]
    damping = parts.damping[:n] * capacitance
    omega_max = float(np.sqrt(spectral_norm(conductance / mass[:, None])))
    return OscillatorArray(
        conductance=np.ascontiguousarray(conductance),
        mass=mass,
        damping=damping,
        kappa=np.asarray(kappa, dtype=np.float64),
        omega_max=omega_max,
    )
