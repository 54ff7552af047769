"""The numba kernels of the transient engine against slow, obvious numpy references.

Each reference is a Python loop over steps with numpy operations per step, fed a
``numpy.random.Generator`` built from the same seed as the kernel's.  The kernel's
documented draw order (``spu_emulator._kernels``) is what lets the two agree draw
for draw: each step draws one standard normal per cell, in cell order, when any
cell's noise_sd is nonzero; each ADC conversion draws one normal per cell, in cell
order, when the ADC's noise_v > 0.  Both generators must end in the same state, so
the kernel drew exactly as many numbers as the reference.

States and float accumulators agree to round-off (the kernel's matrix-vector product
sums in another order than numpy's); integer ADC codes agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from spu_emulator import _kernels

RTOL = 1e-12
ATOL = 1e-13  # volts: states are O(1), so this is round-off of a few hundred steps


# --------------------------------------------------------------------------- references
def reference_adc(v, gain, offset_v, noise_v, lsb, code_max, rng):
    """Convert every cell once: code = rint((gain (v + noise) + offset) / lsb), clipped to +-code_max.

    lsb == 0 is the ideal converter (returns volts, never clips).  Returns (codes, clipped count).
    """
    x = np.array(v, dtype=np.float64)
    if noise_v > 0.0:
        x = x + noise_v * rng.standard_normal(x.shape[0])  # one draw per cell, in cell order
    x = gain * x + offset_v
    if lsb == 0.0:
        return x, 0
    codes = np.rint(x / lsb)
    clipped = int(np.count_nonzero(np.abs(codes) > code_max))
    return np.clip(codes, -code_max, code_max), clipped


@dataclass
class Adc:
    gain: np.ndarray
    offset_v: np.ndarray
    noise_v: float
    lsb: float
    code_max: float


@dataclass
class Outcome:
    steps: int
    samples: int
    saturated: bool
    clipped: int
    runaway: bool
    state: np.ndarray
    acc: np.ndarray
    cov_acc: np.ndarray | None = None  # the second-moment accumulator, when recorded
    snapshots: np.ndarray | None = None  # the snapshot buffer, when recorded


def reference_record(codes, index, cov_acc, snapshots, stride):
    """Record conversion ``index`` (0-based): cov_acc += codes codes^T; row j of snapshots is
    conversion (j + 1) * stride - 1.  Either may be None (off)."""
    if cov_acc is not None:
        cov_acc += np.outer(codes, codes)
    if snapshots is not None and (index + 1) % stride == 0 and (index + 1) // stride - 1 < snapshots.shape[0]:
        snapshots[(index + 1) // stride - 1] = codes


def recording_buffers(n, cov_acc, snapshots):
    """The kernel's arguments for the reference's optional buffers: size-0 arrays mean off."""
    cov = np.zeros((0, 0)) if cov_acc is None else np.array(cov_acc, dtype=np.float64)
    snaps = np.zeros((0, n)) if snapshots is None else np.array(snapshots, dtype=np.float64)
    return cov, snaps


def reference_run_rc(
    drift,
    force,
    noise_sd,
    state,
    dt,
    n_steps,
    steps_per_sample,
    first_sample_step,
    rail_v,
    adc,
    rng,
    acc,
    cov_acc=None,
    snapshots=None,
    stride=1,
):
    """V <- V + dt (force - drift V) + noise_sd sqrt(dt) (z_prev + z) / 2, one step at a time (Euler-Maruyama
    with the Leimkuhler-Matthews noise term); the first z_prev is drawn before the first step.

    Rails (rail_v > 0) clip V and set ``saturated``; without rails a step after which some
    |V_i| >= RUNAWAY_V (or is NaN) ends the run, the whole step done, with ``runaway``.  From
    ``first_sample_step`` on, every ``steps_per_sample``-th step converts each cell and
    adds its code to ``acc``, and records it (:func:`reference_record`) into ``cov_acc`` and
    ``snapshots`` when they are given.  Recording draws nothing.
    """
    v = np.array(state, dtype=np.float64)
    acc = np.array(acc, dtype=np.float64)
    cov_acc = None if cov_acc is None else np.array(cov_acc, dtype=np.float64)
    snapshots = None if snapshots is None else np.array(snapshots, dtype=np.float64)
    n = v.shape[0]
    step_sd = noise_sd * np.sqrt(dt)
    noisy = bool(np.any(step_sd != 0.0))
    previous = rng.standard_normal(n) if noisy else None
    samples = clipped = 0
    saturated = False
    for step in range(1, n_steps + 1):
        v = v + dt * (force - drift @ v)
        if noisy:
            z = rng.standard_normal(n)  # every cell draws, even a noiseless one
            v = v + step_sd * 0.5 * (previous + z)
            previous = z
        if rail_v > 0.0:
            saturated = saturated or bool(np.any(np.abs(v) > rail_v))
            v = np.clip(v, -rail_v, rail_v)
        elif not np.all(np.abs(v) < _kernels.RUNAWAY_V):
            return Outcome(step, samples, saturated, clipped, True, v, acc, cov_acc, snapshots)
        if step >= first_sample_step and step % steps_per_sample == 0:
            codes, c = reference_adc(v, adc.gain, adc.offset_v, adc.noise_v, adc.lsb, adc.code_max, rng)
            acc += codes
            clipped += c
            reference_record(codes, samples, cov_acc, snapshots, stride)
            samples += 1
    return Outcome(n_steps, samples, saturated, clipped, False, v, acc, cov_acc, snapshots)


def kernel_run_rc(
    drift,
    force,
    noise_sd,
    state,
    dt,
    n_steps,
    steps_per_sample,
    first_sample_step,
    rail_v,
    adc,
    rng,
    acc,
    cov_acc=None,
    snapshots=None,
    stride=1,
):
    """Call ``_kernels._run_rc`` on copies, the way the firmware does; same Outcome as the reference."""
    state = np.array(state, dtype=np.float64)
    acc = np.array(acc, dtype=np.float64)
    cov, snaps = recording_buffers(state.shape[0], cov_acc, snapshots)
    noise_prev = np.zeros(state.shape[0])
    if np.any(noise_sd != 0.0):  # as the engine does, once per run
        _kernels._draw_normals(rng, noise_prev)
    steps, samples, saturated, clipped, runaway = _kernels._run_rc(
        drift,
        force,
        noise_sd,
        state,
        noise_prev,
        float(dt),
        int(n_steps),
        int(steps_per_sample),
        int(first_sample_step),
        float(rail_v),
        adc.gain,
        adc.offset_v,
        float(adc.noise_v),
        float(adc.lsb),
        float(adc.code_max),
        rng,
        acc,
        np.empty(state.shape[0]),
        cov,
        snaps,
        int(stride),
    )
    return Outcome(
        int(steps),
        int(samples),
        bool(saturated),
        int(clipped),
        bool(runaway),
        state,
        acc,
        None if cov_acc is None else cov,
        None if snapshots is None else snaps,
    )


# --------------------------------------------------------------------------- problems
def ideal_adc(n):
    return Adc(np.ones(n), np.zeros(n), 0.0, 0.0, 0.0)


def quantised_adc(n, gen, *, bits=6, range_v=0.5, noise_v=0.02):
    """A b-bit ADC with gain/offset errors and input noise; a small range so that some samples clip."""
    code_max = float(2 ** (bits - 1) - 1)
    return Adc(
        1.0 + 0.05 * gen.standard_normal(n),
        0.01 * gen.standard_normal(n),
        noise_v,
        range_v / code_max,
        code_max,
    )


def stable_drift(n, gen):
    """A non-symmetric drift with eigenvalues of real part in about [1, 2.5] (contiguous, as the firmware's)."""
    m = np.diag(np.linspace(1.5, 2.5, n)) + 0.3 * gen.standard_normal((n, n)) / np.sqrt(n)
    assert np.linalg.eigvals(m).real.min() > 0.5
    return np.ascontiguousarray(m)


@dataclass
class Case:
    id: str
    n: int
    noise: str = "off"  # "off", "all" or "one" (only cell 1 noisy: every cell still draws)
    adc: str = "ideal"  # "ideal" or "quantised"
    rail_v: float = 0.0
    force_scale: float = 1.0
    n_steps: int = 300
    steps_per_sample: int = 1
    first_sample_step: int = 1
    dt: float = 0.02
    adc_range_v: float = 0.5
    record_cov: bool = False  # the second-moment accumulator
    snapshots: int = 0  # rows of the snapshot buffer (0: off)
    stride: int = 1


CASES = [
    Case("loop-quiet-ideal", n=5),
    Case("loop-single-cell", n=1, noise="all", steps_per_sample=3),
    Case("loop-noisy-ideal", n=5, noise="all"),
    Case("loop-one-noisy-cell", n=6, noise="one", steps_per_sample=2),
    Case("loop-noisy-quantised-burn-in", n=7, noise="all", adc="quantised", steps_per_sample=4, first_sample_step=37),
    Case("loop-23-noisy-quantised", n=23, noise="all", adc="quantised", n_steps=200, steps_per_sample=5),
    Case("blas-24-quiet-ideal", n=24, n_steps=200, steps_per_sample=2, first_sample_step=50),
    Case("blas-64-noisy-ideal", n=64, noise="all", n_steps=200, steps_per_sample=3),
    Case("blas-64-noisy-quantised", n=64, noise="all", adc="quantised", n_steps=200, steps_per_sample=5),
    Case("loop-rails", n=4, noise="all", rail_v=0.4, force_scale=3.0, steps_per_sample=2),
    Case("loop-rails-quantised", n=5, noise="all", adc="quantised", rail_v=0.4, force_scale=3.0, adc_range_v=0.3),
    Case("blas-rails", n=50, noise="all", adc="quantised", rail_v=0.4, force_scale=3.0, n_steps=150, adc_range_v=0.3),
    Case("no-sample-after-burn-in", n=3, noise="all", adc="quantised", n_steps=100, first_sample_step=101),
    Case("first-sample-off-grid", n=3, noise="all", n_steps=100, steps_per_sample=7, first_sample_step=30),
    # recording: the cov accumulator and the snapshot buffer (more rows than conversions: the rest stay as given)
    Case("record-loop-quantised", n=5, noise="all", adc="quantised", steps_per_sample=3, record_cov=True, snapshots=7),
    Case("record-snapshots-stride", n=4, noise="all", first_sample_step=20, snapshots=50, stride=4),
    Case(
        "record-blas-rails",
        n=30,
        noise="all",
        adc="quantised",
        rail_v=0.4,
        force_scale=3.0,
        n_steps=120,
        adc_range_v=0.3,
        record_cov=True,
        snapshots=200,
        stride=1,
    ),
]


def test_cases_cover_both_matvec_paths():
    """The cases straddle the kernel's switch from the loop matvec to BLAS."""
    sizes = {case.n for case in CASES}
    assert min(sizes) < _kernels._BLAS_MIN_CELLS - 1 and _kernels._BLAS_MIN_CELLS - 1 in sizes
    assert _kernels._BLAS_MIN_CELLS in sizes and max(sizes) > _kernels._BLAS_MIN_CELLS


def build(case, seed):
    """Inputs of one case, drawn from a generator that is not the noise stream."""
    gen = np.random.default_rng([seed, 12345])
    n = case.n
    drift = stable_drift(n, gen)
    force = case.force_scale * gen.uniform(-1.0, 1.0, n)
    if case.noise == "off":
        noise_sd = np.zeros(n)
    elif case.noise == "all":
        noise_sd = gen.uniform(0.2, 0.6, n)
    else:
        noise_sd = np.zeros(n)
        noise_sd[min(1, n - 1)] = 0.5
    adc = ideal_adc(n) if case.adc == "ideal" else quantised_adc(n, gen, range_v=case.adc_range_v)
    state = 0.1 * gen.standard_normal(n)
    acc = gen.standard_normal(n).round()  # the kernel adds to what is there
    return drift, force, noise_sd, state, adc, acc


def assert_same(kernel, ref, *, exact_acc):
    assert kernel.steps == ref.steps
    assert kernel.samples == ref.samples
    assert kernel.saturated == ref.saturated
    assert kernel.clipped == ref.clipped
    assert kernel.runaway == ref.runaway
    np.testing.assert_allclose(kernel.state, ref.state, rtol=RTOL, atol=ATOL)
    if exact_acc:
        # integer codes summed: no round-off anywhere, so equality is exact
        np.testing.assert_array_equal(kernel.acc, ref.acc)
    else:
        np.testing.assert_allclose(kernel.acc, ref.acc, rtol=RTOL, atol=ATOL * max(ref.samples, 1))
    assert (kernel.cov_acc is None) == (ref.cov_acc is None) and (kernel.snapshots is None) == (ref.snapshots is None)
    if ref.cov_acc is not None:
        if exact_acc:  # products of integer codes below 2^26: exact in float64
            np.testing.assert_array_equal(kernel.cov_acc, ref.cov_acc)
        else:
            np.testing.assert_allclose(kernel.cov_acc, ref.cov_acc, rtol=RTOL, atol=ATOL * max(ref.samples, 1))
    if ref.snapshots is not None:
        np.testing.assert_allclose(kernel.snapshots, ref.snapshots, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_run_rc_matches_reference(case):
    """_run_rc gives the reference's state, accumulator, counters and flags, and draws as many normals."""
    seed = 7
    drift, force, noise_sd, state, adc, acc = build(case, seed)
    args = (drift, force, noise_sd, state, case.dt, case.n_steps, case.steps_per_sample, case.first_sample_step)
    rng_kernel, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)
    fresh = rng_kernel.bit_generator.state

    # buffers start non-zero: the kernel adds to the accumulator, and leaves snapshot rows it does not reach
    cov = np.full((case.n, case.n), 3.0) if case.record_cov else None
    snaps = np.full((case.snapshots, case.n), np.nan) if case.snapshots else None
    record = (cov, snaps, case.stride)

    kernel = kernel_run_rc(*args, case.rail_v, adc, rng_kernel, acc, *record)
    ref = reference_run_rc(*args, case.rail_v, adc, rng_ref, acc, *record)

    assert_same(kernel, ref, exact_acc=case.adc == "quantised")
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state
    if case.snapshots:
        kept = min(case.snapshots, ref.samples // case.stride)
        assert 0 < kept and np.all(np.isnan(ref.snapshots[kept:])) and np.all(np.isfinite(ref.snapshots[:kept]))
    # the case exercises what its name says
    expected_samples = sum(
        1 for s in range(1, case.n_steps + 1) if s >= case.first_sample_step and s % case.steps_per_sample == 0
    )
    assert ref.samples == expected_samples
    assert not ref.runaway
    assert ref.saturated == (case.rail_v > 0.0)
    if case.rail_v > 0.0:
        assert np.abs(kernel.state).max() <= case.rail_v
    if case.noise == "off" and case.adc == "ideal":
        assert rng_kernel.bit_generator.state == fresh  # nothing noisy: no draw at all
    if case.adc == "quantised" and ref.samples > 0:
        assert ref.clipped > 0  # the small ADC range clips some conversions


def test_run_rc_noise_off_matches_closed_form():
    """Noise off, ideal ADC: the kernel's state is the Euler map (I - dt M)^k V0 + sum (I - dt M)^j dt f."""
    gen = np.random.default_rng(3)
    n, dt, n_steps = 4, 0.05, 120
    drift = stable_drift(n, gen)
    force = gen.uniform(-1.0, 1.0, n)
    state0 = gen.standard_normal(n)
    kernel = kernel_run_rc(
        drift, force, np.zeros(n), state0, dt, n_steps, 1, 1, 0.0, ideal_adc(n), np.random.default_rng(0), np.zeros(n)
    )
    step = np.eye(n) - dt * drift
    v, total = state0.copy(), np.zeros(n)
    for _ in range(n_steps):
        v = step @ v + dt * force
        total += v
    np.testing.assert_allclose(kernel.state, v, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(kernel.acc, total, rtol=1e-11, atol=1e-10)
    assert kernel.samples == n_steps


@pytest.mark.parametrize("n", [3, 48], ids=["loop", "blas"])
@pytest.mark.parametrize("adc_kind", ["ideal", "quantised"])
def test_run_rc_runaway_returns_early(n, adc_kind):
    """Unstable drift without rails: the kernel stops at the step that crosses RUNAWAY_V, like the reference."""
    seed = 11
    gen = np.random.default_rng([seed, 99])
    # eigenvalues about -4: each step multiplies V by about 1 + 4 dt = 3, so |V| passes 1e150 near step 315
    drift = np.ascontiguousarray(-4.0 * np.eye(n) + 0.1 * gen.standard_normal((n, n)) / np.sqrt(n))
    force = gen.uniform(-1.0, 1.0, n)
    noise_sd = np.full(n, 0.3)
    adc = ideal_adc(n) if adc_kind == "ideal" else quantised_adc(n, gen)
    state = gen.standard_normal(n)
    args = (drift, force, noise_sd, state, 0.5, 1000, 10, 50, 0.0, adc)
    rng_kernel, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)

    kernel = kernel_run_rc(*args, rng_kernel, np.zeros(n))
    ref = reference_run_rc(*args, rng_ref, np.zeros(n))

    assert ref.runaway and kernel.runaway
    assert 200 < ref.steps < 1000
    assert kernel.steps == ref.steps
    assert kernel.samples == ref.samples == len(range(50, ref.steps, 10))
    assert kernel.clipped == ref.clipped
    # The kernel also returns saturated=True for a runaway (rails off); that is left unasserted here:
    # whether a runaway should count as "a node hit a rail" is the firmware's call, not the kernel's math.
    np.testing.assert_allclose(kernel.state, ref.state, rtol=1e-10)
    assert np.abs(kernel.state).max() >= _kernels.RUNAWAY_V
    np.testing.assert_allclose(kernel.acc, ref.acc, rtol=1e-10, atol=ATOL * ref.samples)
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state


def test_run_rc_rails_stop_a_runaway():
    """The same unstable drift with rails on: it saturates at the rails and runs every step, no runaway."""
    seed = 5
    n = 4
    gen = np.random.default_rng([seed, 1])
    drift = np.ascontiguousarray(-4.0 * np.eye(n) + 0.1 * gen.standard_normal((n, n)))
    args = (drift, gen.uniform(-1, 1, n), np.full(n, 0.3), gen.standard_normal(n), 0.5, 400, 10, 1, 1.25)
    rng_kernel, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)

    kernel = kernel_run_rc(*args, ideal_adc(n), rng_kernel, np.zeros(n))
    ref = reference_run_rc(*args, ideal_adc(n), rng_ref, np.zeros(n))

    assert_same(kernel, ref, exact_acc=False)
    assert kernel.steps == 400 and kernel.saturated and not kernel.runaway
    np.testing.assert_array_equal(np.abs(kernel.state), 1.25)  # pushed out to a rail on every cell
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state


ADC_CASES = {
    "ideal": dict(noise_v=0.0, bits=0),
    "ideal-noisy": dict(noise_v=0.05, bits=0),
    "quantised": dict(noise_v=0.0, bits=8),
    "quantised-noisy-clipping": dict(noise_v=0.05, bits=6),
}


@pytest.mark.parametrize("name", list(ADC_CASES))
@pytest.mark.parametrize("n", [1, 9, 64])
def test_adc_snapshot_matches_reference(name, n):
    """_adc_snapshot converts every cell like the reference, counts clipping, draws one normal per cell."""
    seed = 21
    gen = np.random.default_rng([seed, n])
    noise_v, bits = ADC_CASES[name]["noise_v"], ADC_CASES[name]["bits"]
    if bits == 0:
        adc = Adc(1.0 + 0.05 * gen.standard_normal(n), 0.01 * gen.standard_normal(n), noise_v, 0.0, 0.0)
    else:
        adc = quantised_adc(n, gen, bits=bits, range_v=0.5, noise_v=noise_v)
    state = gen.uniform(-0.8, 0.8, n)  # beyond the 0.5 V range for some cells
    state[0] = 0.75  # at least one cell clips on a quantised converter
    before = state.copy()
    rng_kernel, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)
    out = np.full(n, np.nan)

    clipped = _kernels._adc_snapshot(state, adc.gain, adc.offset_v, adc.noise_v, adc.lsb, adc.code_max, rng_kernel, out)
    codes, ref_clipped = reference_adc(before, adc.gain, adc.offset_v, adc.noise_v, adc.lsb, adc.code_max, rng_ref)

    np.testing.assert_array_equal(state, before)  # a snapshot does not disturb the state
    assert clipped == ref_clipped
    if bits == 0:
        assert clipped == 0
        np.testing.assert_allclose(out, codes, rtol=RTOL, atol=ATOL)
    else:
        assert clipped >= 1
        np.testing.assert_array_equal(out, codes)
        assert np.all(out == np.rint(out)) and np.abs(out).max() <= adc.code_max
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state
    if noise_v == 0.0:
        assert rng_kernel.bit_generator.state == np.random.default_rng(seed).bit_generator.state
