"""Numba kernel of the transient engine for oscillator (RLC) cells.  Private: the firmware calls it.

Same conventions as ``_kernels``: preallocated arrays, a ``numpy.random.Generator``,
and a draw order that is part of the contract (tests replay it with numpy):
each step draws one normal per cell, in cell order, when any cell is noisy;
each ADC conversion draws one normal per cell, in cell order, when the ADC is noisy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._kernels import _BLAS_MIN_CELLS, RUNAWAY_V, _sample


@njit(cache=True)
def _force_of(conductance, position, work):
    """work = conductance @ position: a plain loop below _BLAS_MIN_CELLS cells, BLAS from there."""
    n = position.shape[0]
    if n < _BLAS_MIN_CELLS:
        for i in range(n):
            s = 0.0
            for j in range(n):
                s += conductance[i, j] * position[j]
            work[i] = s
    else:
        np.dot(conductance, position, work)


@njit(cache=True)
def _run_lc(
    conductance,
    force,
    inv_mass,
    friction_rate,
    momentum_sd,
    position,
    momentum,
    dt,
    n_steps,
    steps_per_sample,
    first_sample_step,
    rail_v,
    adc_gain,
    adc_offset_v,
    adc_noise_v,
    adc_lsb,
    adc_code_max,
    rng,
    acc,
    work,
    cov_acc,
    snapshots,
    snapshot_stride,
):
    """BAOAB splitting (Leimkuhler and Matthews 2013) of the oscillator array

        dx = inv_mass * p dt,   dp = (force - conductance @ x - friction_rate * p) dt + sqrt(2 gamma kappa) dW

    with friction_rate = gamma / m and momentum_sd = sqrt(kappa m), the stationary spread of p.
    One step of length dt: B  p += dt/2 (force - a x);  A  x += dt/2 p / m;
    O  p = e^{-friction_rate dt} p + momentum_sd sqrt(1 - e^{-2 friction_rate dt}) z  (the
    friction and the noise solved exactly, one normal per cell); A; rails; B with the new a x.
    One matrix-vector product per step (a x is carried from one step's last B to the next's
    first).  For a symmetric a the stationary x of these steps is exactly N(a^-1 force,
    kappa a^-1) at any stable dt (omega_max dt < 2); the dynamics (frequencies, decay) are
    off by O((omega dt)^2), and with mismatch (a not symmetric) so is the stationary x.

    conductance: (n, n) a in g0; force: (n,) gin u + gtot v_os; inv_mass, friction_rate,
    momentum_sd: (n,); position (volts), momentum: (n,), updated in place.  Rails
    (rail_v > 0) clip x and stop the flux that pushes a clipped node outwards (an inelastic
    wall); without rails a step after which |x| or |p| reaches RUNAWAY_V ends the run.
    Sampling, ``acc``, ``cov_acc``, ``snapshots`` and the return value are as in
    ``_kernels._run_rc``; work: (n,) scratch.  Cost O(n_steps * n^2).
    """
    n = position.shape[0]
    half = 0.5 * dt
    decay = np.exp(-friction_rate * dt)
    kick = momentum_sd * np.sqrt(-np.expm1(-2.0 * friction_rate * dt))
    noisy = False
    for i in range(n):
        if kick[i] != 0.0:
            noisy = True
    recording = cov_acc.shape[0] > 0 or snapshots.shape[0] > 0
    codes = np.empty(n if recording else 0)
    samples = 0
    clipped = 0
    saturated = False
    _force_of(conductance, position, work)
    for step in range(1, n_steps + 1):
        for i in range(n):
            p = momentum[i] + half * (force[i] - work[i])
            x = position[i] + half * inv_mass[i] * p
            p = decay[i] * p
            if noisy:
                p += kick[i] * rng.standard_normal()
            x += half * inv_mass[i] * p
            if rail_v > 0.0:
                if x > rail_v:
                    x = rail_v
                    saturated = True
                    if p > 0.0:
                        p = 0.0
                elif x < -rail_v:
                    x = -rail_v
                    saturated = True
                    if p < 0.0:
                        p = 0.0
            position[i] = x
            momentum[i] = p
        _force_of(conductance, position, work)
        runaway = False
        for i in range(n):
            momentum[i] += half * (force[i] - work[i])
            if rail_v <= 0.0 and not (abs(position[i]) < RUNAWAY_V and abs(momentum[i]) < RUNAWAY_V):
                runaway = True
        if runaway:
            return step, samples, saturated, clipped, True
        if step >= first_sample_step and step % steps_per_sample == 0:
            samples += 1
            clipped += _sample(
                position, adc_gain, adc_offset_v, adc_noise_v, adc_lsb, adc_code_max, rng, acc,
                codes, samples - 1, cov_acc, snapshots, snapshot_stride,
            )  # fmt: skip
    return n_steps, samples, saturated, clipped, False
