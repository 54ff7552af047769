"""Exact engine: the linear cell array propagated in distribution, with no time steps.

While no nonlinear effect acts (no rail reached, no ADC clipping), the array is
the linear SDE

    dV = (f - M V) dt + S dW,   M = C^-1 a,  S = diag(noise_sd),  D = S S^T,

with fixed point V* = M^-1 f and stationary covariance Sigma solving the
Lyapunov equation M Sigma + Sigma M^T = D.  Its transition over a time h is
exactly Gaussian: mean V* + e^{-M h} (V - V*), covariance Sigma - e^{-M h} Sigma
e^{-M^T h}.  That holds for any stable M, normal or not (no symmetric-part
shortcut).

A run of length t with K ADC samples at spacing Delta after burn_in is split
into three stretches: burn-in up to the last sample time before the window, the
K sample times, and the tail after the last sample.  Over the window, with
d_k = V(s_k) - V*, Phi = e^{-M Delta}, P = (I - Phi)^-1 and Q = Sigma - Phi Sigma Phi^T
(the fresh variance per sample), the pair (sum_k d_k, d_K) is jointly Gaussian:

    E[sum]        = Phi P (I - Phi^K) d_0,          E[d_K] = Phi^K d_0
    Cov(sum)      = P [K Q - A Q - Q A^T + Phi Sigma Phi^T - Phi^{K+1} Sigma Phi^{(K+1)T}] P^T
    Cov(sum, d_K) = P [Q (P (I - Phi^K))^T - Phi (Sigma - Phi^K Sigma Phi^{KT})]
    Cov(d_K)      = Sigma - Phi^K Sigma Phi^{KT},    A = Phi P (I - Phi^K)

so the accumulated mean and the final state are drawn in one go, at a cost that
does not depend on t or K.

Two forms, chosen once per programmed matrix by :func:`prepare`:
- "modal": M symmetric and every cell equally noisy (no mismatch; the TNGD and
  ideal presets).  The eigenbasis of M is orthonormal and decouples the noise,
  so each mode is a scalar OU process.  O(n^3) once (eigh), O(n^2) per run.
- "general": any stable M (mismatch makes it non-symmetric and non-normal) and
  any diagonal D.  O(n^3) once (Lyapunov), O(n^3) per run (matrix exponentials
  and a 2n x 2n Cholesky factor), still independent of t.

ADC treatment (done by the firmware): per-cell gain and offset errors are linear
and exact; ADC input noise adds N(0, noise_v^2 / K) to the mean, exactly.
Rounding to codes is modelled as an independent error, uniform over one LSB,
added to each sample (variance LSB^2 / 12, so N(0, 1 / (12 K)) in codes on the
mean).  That model is exact in the limit where the signal moves by at least
about one LSB between samples (the array's own noise dithers the converter);
``auto`` uses this engine with a quantised ADC only when the fresh noise per
sample is at least half an LSB, and never when a rail or the ADC's full scale is
within reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["LinearModel", "prepare", "propagate", "window"]


@dataclass(frozen=True)
class LinearModel:
    """Everything the exact engine needs about one programmed array (computed once per load).

    form: "modal" or "general"; stable: every eigenvalue of M has a positive real
    part; contractive: ||e^{-M h}||_2 <= 1 for all h (M + M^T positive definite),
    so the mean path never leaves the ball of radius |V(0) - V*| around V*;
    stationary_var: diag(Sigma), volts^2; rate_max: largest |eigenvalue| of M.
    """

    form: str
    drift: np.ndarray
    noise_sd: np.ndarray
    stable: bool
    contractive: bool
    stationary_var: np.ndarray
    rate_max: float
    # modal form: M = W diag(rates) W^T, scalar noise level s (V / sqrt(tau))
    rates: np.ndarray | None = None
    modes: np.ndarray | None = None
    noise_level: float = 0.0
    # general form: LU factors of M, the stationary covariance Sigma, and the
    # eigenvectors of M when they are well conditioned (else expm is used)
    lu: tuple | None = None
    stationary_cov: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    eigenvectors_inv: np.ndarray | None = None

    def transition(self, h: float) -> np.ndarray:
        """e^{-M h}, (n, n).  Cost O(n^3)."""
        if self.form == "modal":
            return (self.modes * np.exp(-self.rates * h)) @ self.modes.T
        if self.eigenvectors is None:
            return scipy.linalg.expm(-self.drift * h)
        return ((self.eigenvectors * np.exp(-self.eigenvalues * h)) @ self.eigenvectors_inv).real

    def fixed_point(self, force: np.ndarray) -> np.ndarray:
        """V* = M^-1 f.  Cost O(n^2)."""
        if self.form == "modal":
            return self.modes @ ((self.modes.T @ force) / self.rates)
        return scipy.linalg.lu_solve(self.lu, force)

    def fresh_var(self, period: float) -> np.ndarray:
        """diag(Q): variance a sample adds that the previous sample did not predict, volts^2."""
        if self.form == "modal":
            phi2 = np.exp(-2.0 * self.rates * period)
            q = self.noise_level**2 * (1.0 - phi2) / (2.0 * self.rates)
            return (self.modes**2) @ q
        phi = self.transition(period)
        sigma = self.stationary_cov
        return np.diag(sigma - phi @ sigma @ phi.T).copy()


def prepare(drift: np.ndarray, noise_sd: np.ndarray) -> LinearModel:
    """Analyse the programmed drift M (n, n) and noise_sd (n,).  Cost O(n^3), once per load."""
    n = drift.shape[0]
    symmetric = np.array_equal(drift, drift.T)
    isotropic = bool(np.all(noise_sd == noise_sd[0]))
    if symmetric and isotropic:
        rates, modes = np.linalg.eigh(drift)
        stable = bool(rates[0] > 0.0)
        s = float(noise_sd[0])
        var = (modes**2) @ (s**2 / (2.0 * rates)) if stable else np.full(n, np.inf)
        return LinearModel(
            form="modal",
            drift=drift,
            noise_sd=noise_sd,
            stable=stable,
            contractive=stable,
            stationary_var=var,
            rate_max=float(np.abs(rates).max()),
            rates=rates,
            modes=modes,
            noise_level=s,
        )
    eigenvalues, vectors = np.linalg.eig(drift)
    stable = bool(eigenvalues.real.min() > 0.0)
    # e^{-M h} through the eigenbasis loses about cond(W) * eps; beyond 1e6 use expm instead
    well_conditioned = np.linalg.cond(vectors) < 1e6
    contractive = bool(np.linalg.eigvalsh(0.5 * (drift + drift.T))[0] > 0.0)
    sigma = None
    var = np.full(n, np.inf)
    if stable:
        sigma = scipy.linalg.solve_continuous_lyapunov(drift, np.diag(noise_sd**2))
        sigma = 0.5 * (sigma + sigma.T)
        var = np.diag(sigma).copy()
    return LinearModel(
        form="general",
        drift=drift,
        noise_sd=noise_sd,
        stable=stable,
        contractive=contractive,
        stationary_var=var,
        rate_max=float(np.abs(eigenvalues).max()),
        lu=scipy.linalg.lu_factor(drift),
        stationary_cov=sigma,
        eigenvalues=eigenvalues if well_conditioned else None,
        eigenvectors=vectors if well_conditioned else None,
        eigenvectors_inv=np.linalg.inv(vectors) if well_conditioned else None,
    )


def window(t: float, burn_in: float, period: float) -> tuple[int, int]:
    """ADC sample times of a run: indices m0 < m <= m1 of the clock m * period in (burn_in, t].

    Returns (m0, m1); the number of samples is m1 - m0 (zero when the window is short).
    """
    m0 = math.floor(burn_in / period + 1e-9)
    m1 = math.floor(t / period + 1e-9)
    return m0, max(m0, m1)


def propagate(
    model: LinearModel,
    state: np.ndarray,
    fixed_point: np.ndarray,
    t: float,
    burn_in: float,
    period: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw the run's sample average and final state exactly.

    state: (n,) volts at the start; fixed_point: V*.  Samples at m * period for
    m0 < m <= m1 (see :func:`window`).  Returns (mean of V over the samples, or V*
    when there are none; final state at t; number of samples K).
    """
    m0, m1 = window(t, burn_in, period)
    count = m1 - m0
    head = m0 * period
    tail = t - m1 * period if count else t - head
    if model.form == "modal":
        total, final = _propagate_modal(model, state - fixed_point, head, count, period, tail, rng)
    else:
        total, final = _propagate_general(model, state - fixed_point, head, count, period, tail, rng)
    mean = fixed_point + total / count if count else fixed_point.copy()
    return mean, fixed_point + final, count


def _propagate_modal(model, d0, head, count, period, tail, rng):
    lam = model.rates
    s2 = model.noise_level**2
    y = model.modes.T @ d0

    def hop(y, h):
        decay = np.exp(-lam * h)
        sd = np.sqrt(s2 * -np.expm1(-2.0 * lam * h) / (2.0 * lam)) if s2 > 0.0 else 0.0
        return decay * y + sd * rng.standard_normal(lam.shape[0]) if s2 > 0.0 else decay * y

    y = hop(y, head)
    total = np.zeros_like(y)
    if count:
        phi = np.exp(-lam * period)
        one_minus = -np.expm1(-lam * period)  # 1 - phi, accurate when lam * period is small
        phi_k = phi**count
        a0 = -np.expm1(-lam * (period * count)) / one_minus  # sum_{m<K} phi^m
        mean_sum = phi * a0 * y
        mean_last = phi_k * y
        if s2 > 0.0:
            q = s2 * -np.expm1(-2.0 * lam * period) / (2.0 * lam)
            geo2 = np.expm1(-2.0 * lam * (period * count)) / np.expm1(-2.0 * lam * period)  # sum_{m<K} phi^2m
            # Cov(sum) = q / (1 - phi)^2 * sum_{m=1..K} (1 - phi^m)^2
            var_sum = q / one_minus**2 * (count - 2.0 * phi * a0 + phi**2 * geo2)
            cov = q / one_minus * (a0 - phi * geo2)
            var_last = q * geo2
            z1 = rng.standard_normal(lam.shape[0])
            z2 = rng.standard_normal(lam.shape[0])
            l11 = np.sqrt(np.maximum(var_sum, 0.0))
            l21 = np.divide(cov, l11, out=np.zeros_like(cov), where=l11 > 0.0)
            l22 = np.sqrt(np.maximum(var_last - l21**2, 0.0))
            total = mean_sum + l11 * z1
            y = mean_last + l21 * z1 + l22 * z2
        else:
            total = mean_sum
            y = mean_last
    y = hop(y, tail)
    return model.modes @ total, model.modes @ y


def _propagate_general(model, d0, head, count, period, tail, rng):
    m = model.drift
    n = m.shape[0]
    sigma = model.stationary_cov
    noisy = bool(np.any(model.noise_sd > 0.0))

    def hop(d, h):
        if h == 0.0:
            return d
        f = model.transition(h)
        d = f @ d
        if noisy:
            d = d + _gaussian(sigma - f @ sigma @ f.T, rng)
        return d

    d = hop(d0, head)
    total = np.zeros(n)
    if count:
        eye = np.eye(n)
        phi = model.transition(period)
        phi_k = model.transition(period * count)
        inv = np.linalg.inv(eye - phi)
        a0 = inv @ (eye - phi_k)  # sum_{m<K} Phi^m
        a1 = phi @ a0  # sum_{1<=m<=K} Phi^m
        mean_sum = a1 @ d
        mean_last = phi_k @ d
        if noisy:
            q = sigma - phi @ sigma @ phi.T
            phi_k1 = phi @ phi_k
            cov_sum = inv @ (count * q - a1 @ q - q @ a1.T + phi @ sigma @ phi.T - phi_k1 @ sigma @ phi_k1.T) @ inv.T
            cov_last = sigma - phi_k @ sigma @ phi_k.T
            cross = inv @ (q @ a0.T - phi @ cov_last)
            joint = np.block([[cov_sum, cross], [cross.T, cov_last]])
            draw = _gaussian(joint, rng)
            total = mean_sum + draw[:n]
            d = mean_last + draw[n:]
        else:
            total, d = mean_sum, mean_last
    return total, hop(d, tail)


def _gaussian(cov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw of N(0, cov) for a covariance that may be singular to round-off."""
    cov = 0.5 * (cov + cov.T)
    z = rng.standard_normal(cov.shape[0])
    try:
        return np.linalg.cholesky(cov) @ z
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(cov)
        return vectors @ (np.sqrt(np.clip(values, 0.0, None)) * z)
