"""Numba kernels of the transient engine.  Private: the firmware calls them.

Every kernel takes preallocated arrays and a ``numpy.random.Generator``; the
draw order is part of the contract (tests replay it with numpy):
each step draws one normal per cell, in cell order, when any cell is noisy;
each ADC conversion draws one normal per cell, in cell order, when the ADC is noisy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# From this size on the matrix-vector product goes to BLAS; below it a plain loop
# avoids the call overhead (about 40 ns from numba), which dominates a small array.
# The loop does not vectorise, so BLAS wins early: the crossover measured with
# benchmarks/bench_integrator.py --sizes 16 20 24 32 was about 20 cells; 24 leaves margin.
_BLAS_MIN_CELLS = 24

# A state this large means the array ran away (no rails to stop it).
RUNAWAY_V = 1.0e150


@njit(cache=True)
def _adc_convert(v, gain, offset_v, noise_v, lsb, code_max, rng):
    """One conversion: code = round((gain * (v + noise) + offset) / lsb), clipped.

    lsb == 0 is an ideal converter: returns the volts, never clips.
    Returns (code as float, 1 if clipped else 0).
    """
    x = v
    if noise_v > 0.0:
        x += noise_v * rng.standard_normal()
    x = gain * x + offset_v
    if lsb == 0.0:
        return x, 0
    code = np.rint(x / lsb)
    if code > code_max:
        return float(code_max), 1
    if code < -code_max:
        return -float(code_max), 1
    return code, 0


@njit(cache=True)
def _adc_snapshot(state, gain, offset_v, noise_v, lsb, code_max, rng, out):
    """Convert every cell once into ``out``; returns the number of clipped cells."""
    clipped = 0
    for i in range(state.shape[0]):
        code, clip = _adc_convert(state[i], gain[i], offset_v[i], noise_v, lsb, code_max, rng)
        out[i] = code
        clipped += clip
    return clipped


@njit(cache=True)
def _run_rc(
    drift,
    force,
    noise_sd,
    state,
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
):
    """Euler-Maruyama on dV = (force - drift @ V) dt + noise_sd * sqrt(dt) * N(0, 1).

    drift: (n, n) M = C^-1 a; force: (n,) C^-1 (gin u + gtot v_os); noise_sd: (n,)
    sqrt(2 kappa_i) / c_i, volts per sqrt(tau); state: (n,) volts, updated in place.
    rail_v <= 0 means no rails.  Every ``steps_per_sample`` steps from
    ``first_sample_step`` on, each cell is converted and its code added to ``acc``.
    Cost O(n_steps * n^2).  Returns (steps, samples, saturated, clipped, runaway).
    """
    n = state.shape[0]
    step_sd = noise_sd * np.sqrt(dt)
    noisy = False
    for i in range(n):
        if step_sd[i] != 0.0:
            noisy = True
    samples = 0
    clipped = 0
    saturated = False
    for step in range(1, n_steps + 1):
        if n < _BLAS_MIN_CELLS:
            for i in range(n):
                s = 0.0
                for j in range(n):
                    s += drift[i, j] * state[j]
                work[i] = s
        else:
            np.dot(drift, state, work)
        runaway = False
        for i in range(n):
            v = state[i] + dt * (force[i] - work[i])
            if noisy:
                v += step_sd[i] * rng.standard_normal()
            if rail_v > 0.0:
                if v > rail_v:
                    v = rail_v
                    saturated = True
                elif v < -rail_v:
                    v = -rail_v
                    saturated = True
            elif not abs(v) < RUNAWAY_V:
                runaway = True
            state[i] = v
        if runaway:
            return step, samples, saturated, clipped, True
        if step >= first_sample_step and step % steps_per_sample == 0:
            samples += 1
            for i in range(n):
                code, clip = _adc_convert(
                    state[i], adc_gain[i], adc_offset_v[i], adc_noise_v, adc_lsb, adc_code_max, rng
                )
                acc[i] += code
                clipped += clip
    return n_steps, samples, saturated, clipped, False
