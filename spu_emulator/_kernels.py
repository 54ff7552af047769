"""Numba kernels of the transient engine.  Private: the firmware calls them.

Every kernel takes preallocated arrays and a ``numpy.random.Generator``; the
draw order is part of the contract (tests replay it with numpy):
each step draws one normal per cell, in cell order, when any cell is noisy;
each ADC conversion draws one normal per cell, in cell order, when the ADC is noisy.
The RC kernels carry the step's previous normals in ``noise_prev`` (the
Leimkuhler-Matthews step below), which the engine draws with
:func:`_draw_normals` once per run, before the first step, when any cell is noisy.

The RC step is Euler-Maruyama with the Leimkuhler-Matthews noise term,

    V_{k+1} = V_k + dt (force - M V_k) + noise_sd sqrt(dt) (z_k + z_{k+1}) / 2,

as cheap as Euler-Maruyama (one new normal per cell per step), and for a linear array its
stationary covariance is the continuous one exactly when M is symmetric with equal noise per
cell (for one mode of rate lam: sigma^2 / (2 lam), where Euler's is sigma^2 / (2 lam (1 - lam dt / 2)),
about step_factor / 2 too large).  With V = u + (B / 2) z, B = noise_sd sqrt(dt), u is the Markov
chain u_{k+1} = F u_k + dt force + (I + F) B z_k / 2, F = I - dt M, which is how the tests
derive its exact moments for any M.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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
    noise_prev,
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
    """dV = (force - drift @ V) dt + noise_sd dW, stepped as the module docstring says (Euler-Maruyama
    with the Leimkuhler-Matthews noise term).

    drift: (n, n) M = C^-1 a; force: (n,) C^-1 (gin u + gtot v_os); noise_sd: (n,)
    sqrt(2 kappa_i) / c_i, volts per sqrt(tau); state: (n,) volts, updated in place;
    noise_prev: (n,) the last step's normals z_k, updated in place (a run split into
    several calls passes the same array on, and gets the same bits as one call).
    rail_v <= 0 means no rails.  Every ``steps_per_sample`` steps from
    ``first_sample_step`` on, each cell is converted and its code added to ``acc``;
    the conversions are also recorded into ``cov_acc`` and ``snapshots`` as
    :func:`_record` says (size-0 arrays: off, at no cost).
    Cost O(n_steps * n^2), plus O(n^2) per conversion when cov_acc is on.
    Returns (steps, samples, saturated, clipped, runaway).
    """
    n = state.shape[0]
    step_sd = noise_sd * np.sqrt(dt)
    noisy = False
    for i in range(n):
        if step_sd[i] != 0.0:
            noisy = True
    recording = cov_acc.shape[0] > 0 or snapshots.shape[0] > 0
    codes = np.empty(n if recording else 0)
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
        for i in range(n):
            work[i] = force[i] - work[i]
        hit, runaway = _advance(state, work, dt, step_sd, noisy, rail_v, rng, noise_prev)
        saturated = saturated or hit
        if runaway:
            return step, samples, saturated, clipped, True
        if step >= first_sample_step and step % steps_per_sample == 0:
            samples += 1
            clipped += _sample(
                state, adc_gain, adc_offset_v, adc_noise_v, adc_lsb, adc_code_max, rng, acc,
                codes, samples - 1, cov_acc, snapshots, snapshot_stride,
            )  # fmt: skip
    return n_steps, samples, saturated, clipped, False


@njit(cache=True)
def _record(codes, index, cov_acc, snapshots, snapshot_stride):
    """Record conversion number ``index`` (0-based within the run's window) of every cell.

    cov_acc: (n, n) gets codes codes^T added (the on-device second-moment accumulator),
    or (0, 0) for off.  snapshots: (k, n) keeps conversion (j + 1) * snapshot_stride - 1
    as row j for j < k (the snapshot buffer: the stride-th, 2 stride-th, ... conversion
    after burn-in), or (0, n) for off.  No random draws.  Cost O(n^2) with cov_acc, else O(n).
    """
    n = codes.shape[0]
    if cov_acc.shape[0] > 0:
        for i in range(n):
            ci = codes[i]
            for j in range(n):
                cov_acc[i, j] += ci * codes[j]
    if snapshots.shape[0] > 0 and (index + 1) % snapshot_stride == 0:
        row = (index + 1) // snapshot_stride - 1
        if row < snapshots.shape[0]:
            for i in range(n):
                snapshots[row, i] = codes[i]


@njit(cache=True)
def _draw_normals(rng, out):
    """out[i] = N(0, 1) for each cell in order: the first noise_prev of a run."""
    for i in range(out.shape[0]):
        out[i] = rng.standard_normal()


@njit(cache=True)
def _advance(state, rate, dt, step_sd, noisy, rail_v, rng, noise_prev):
    """One step V += rate dt + step_sd (z_prev + z) / 2 (Leimkuhler-Matthews), then the rails
    (rail_v <= 0: none); z is stored in noise_prev for the next step.

    Returns (a node hit a rail, a node ran away past RUNAWAY_V).  Draws one normal per cell when noisy."""
    saturated = False
    runaway = False
    for i in range(state.shape[0]):
        v = state[i] + dt * rate[i]
        if noisy:
            z = rng.standard_normal()
            v += step_sd[i] * 0.5 * (noise_prev[i] + z)
            noise_prev[i] = z
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
    return saturated, runaway


@njit(cache=True)
def _sample(
    state, adc_gain, adc_offset_v, adc_noise_v, adc_lsb, adc_code_max, rng, acc,
    codes, index, cov_acc, snapshots, snapshot_stride,
):  # fmt: skip
    """One ADC conversion of every cell: codes added to ``acc`` and, when ``codes`` has room
    (a recording run), recorded as conversion ``index`` by :func:`_record`.  Returns the clip count."""
    n = state.shape[0]
    recording = codes.shape[0] > 0
    clipped = 0
    for i in range(n):
        code, clip = _adc_convert(state[i], adc_gain[i], adc_offset_v[i], adc_noise_v, adc_lsb, adc_code_max, rng)
        acc[i] += code
        clipped += clip
        if recording:
            codes[i] = code
    if recording:
        _record(codes, index, cov_acc, snapshots, snapshot_stride)
    return clipped


@njit(cache=True)
def _run_ggn(
    j,
    h,
    jt,
    damping,
    inv_c,
    force,
    noise_sd,
    state,
    noise_prev,
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
    stage1,
    stage2,
):
    """The structured array of a GGN load (TNGD App. C), stepped as ``_run_rc``, never forming n x n:

        dV = (force - M V) dt + noise_sd dW,   M V = inv_c * (jt^T (h (j V)) + damping * V)

    j: (m, n) J array conductances in g0 (stage 1: y = j V, volts); h: (m, m) H array (stage 2:
    z = h y); jt: (m, n) the J^T array in J's orientation (cell i receives sum_k jt[k, i] z_k);
    damping: (n,) each cell's damping conductance; inv_c: (n,) 1 / c_i; stage1, stage2: (m,)
    scratch arrays for the two stages.  Everything else (force, noise_sd, rails, the ADC, the
    accumulators, noise_prev, the draw order and the return value) is as in ``_run_rc``.
    Cost O(n_steps * n * m), plus what recording costs as in ``_run_rc``.
    """
    n = state.shape[0]
    step_sd = noise_sd * np.sqrt(dt)
    noisy = False
    for i in range(n):
        if step_sd[i] != 0.0:
            noisy = True
    recording = cov_acc.shape[0] > 0 or snapshots.shape[0] > 0
    codes = np.empty(n if recording else 0)
    samples = 0
    clipped = 0
    saturated = False
    for step in range(1, n_steps + 1):
        np.dot(j, state, stage1)
        np.dot(h, stage1, stage2)
        np.dot(stage2, jt, work)
        for i in range(n):
            work[i] = force[i] - inv_c[i] * (work[i] + damping[i] * state[i])
        hit, runaway = _advance(state, work, dt, step_sd, noisy, rail_v, rng, noise_prev)
        saturated = saturated or hit
        if runaway:
            return step, samples, saturated, clipped, True
        if step >= first_sample_step and step % steps_per_sample == 0:
            samples += 1
            clipped += _sample(
                state, adc_gain, adc_offset_v, adc_noise_v, adc_lsb, adc_code_max, rng, acc,
                codes, samples - 1, cov_acc, snapshots, snapshot_stride,
            )  # fmt: skip
    return n_steps, samples, saturated, clipped, False


# The GGN arrays are scanned and programmed a range of columns at a time: each call is serial and
# releases the GIL, and ``in_column_ranges`` runs the ranges on a few threads.  (numba's own parallel
# layers are not safe in a forked or threaded server.)  Results do not depend on the number of threads.
_TILE = 512  # columns per inner block: the column sums of a block stay in cache


@njit(cache=True, nogil=True)
def _code_range(codes, start, stop):
    """(smallest, largest, count of non-finite) of codes[:, start:stop] as float64.  One read; no draws."""
    lo = np.inf
    hi = -np.inf
    count = 0
    for k in range(codes.shape[0]):
        for i in range(start, stop):
            v = float(codes[k, i])
            if not np.isfinite(v):
                count += 1
                continue
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    return lo, hi, count


@njit(cache=True, nogil=True)
def _program_array(codes, start, stop, unit, mismatch, out, abs_sums, square_sums):
    """Columns start:stop of out = codes * unit (* mismatch when it is not empty), the conductances of a
    GGN array (m, n) as ``converters.element_conductances`` computes them, with the column sums of |out|
    and out^2 into abs_sums and square_sums (n,).  An empty out: the sums only (a GGN array without
    mismatch stays its codes).  Returns (the row sums of codes^2 over these columns (m,), exact integers
    while n code_max^2 < 2^53 (n < 8.4e6 for 16-bit codes); the smallest and the largest code, as
    floats: for integer codes the range check comes with the same read).  One pass; no random draws."""
    m = codes.shape[0]
    mismatched = mismatch.shape[0] > 0
    writing = out.shape[0] > 0
    row_squares = np.zeros(m)
    lo = np.inf
    hi = -np.inf
    for block in range(start, stop, _TILE):
        end = min(block + _TILE, stop)
        for i in range(block, end):
            abs_sums[i] = 0.0
            square_sums[i] = 0.0
        for k in range(m):
            row = 0.0
            for i in range(block, end):
                code = float(codes[k, i])
                lo = min(lo, code)
                hi = max(hi, code)
                row += code * code
                a = code * unit
                if mismatched:
                    a *= mismatch[k, i]
                if writing:
                    out[k, i] = a
                abs_sums[i] += abs(a)
                square_sums[i] += a * a
            row_squares[k] += row
    return row_squares, lo, hi


def in_column_ranges(kernel, array, *args):
    """``kernel(array, start, stop, *args)`` over ranges of columns that cover array (m, n), on up to one
    thread per CPU when the array is large (about a million elements or more per thread); a fresh pool
    each call, so no thread outlives it.  Returns the results in column order."""
    m, n = array.shape
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(cpus, (m * n) >> 20, n))
    if workers == 1:
        return [kernel(array, 0, n, *args)]
    bounds = [n * w // workers for w in range(workers + 1)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        calls = [pool.submit(kernel, array, bounds[w], bounds[w + 1], *args) for w in range(workers)]
        return [call.result() for call in calls]
