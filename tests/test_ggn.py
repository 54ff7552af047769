"""Structured curvature loading: driver.GGN(J, H, damping) on the device's J, H, J^T arrays (TNGD App. C).

What is checked, and against what:
- the transient kernel ``_run_ggn`` against a slow numpy reference, draw for draw (as
  tests/test_kernel_reference.py does for ``_run_rc``);
- the exact engine's low-rank form against Gaussian moments computed here from the dense drift
  (scipy's expm and Lyapunov solver over the sample grid), by probing the engine with unit draws;
- a GGN load against the dense load of J^T H J + lambda I: equal on the ideal device (exactly without
  noise, trajectory for trajectory with noise at the same scale and seed), equal within quantisation on
  tngd-sim; both against numpy's solve;
- a load at N = 200000, m = 64 that runs and reads back on the exact engine with peak memory far below
  the N x N matrix (320 GB);
- mismatch: J^T's parts differ from J's, the drift is not symmetric, "auto" steps it, "exact" refuses;
- bad input, named in the message, and a refused load changes nothing.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import yaml

import driver
from driver.codes import code_max, to_codes
from driver.ggn import program
from spu_emulator import _kernels, exact, lowrank
from spu_emulator.spec import SPEC_DIR, read_yaml


def write_spec(directory: Path, name: str, changes: dict[str, object], base: str = "ideal") -> Path:
    """firmware_spec/<base>.yaml with ``{"section.field": value}`` changes, written to directory/name.yaml."""
    spec = read_yaml((SPEC_DIR / f"{base}.yaml").read_text())
    spec["name"] = name
    for key, value in changes.items():
        section, field = key.split(".")
        spec[section][field] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def random_ggn(m: int, n: int, damping: float, seed: int = 0) -> driver.GGN:
    """J with orthogonal rows of similar norm (so J^T H J has m comparable eigenvalues), H SPD."""
    gen = np.random.default_rng(seed)
    q, _ = np.linalg.qr(gen.standard_normal((n, m)))
    J = (q * np.linspace(1.0, 1.5, m)).T * math.sqrt(n / m)
    a = gen.standard_normal((m, m))
    H = a @ a.T / m + 0.5 * np.eye(m)
    return driver.GGN(J, H, damping)


def woodbury_solve(ggn: driver.GGN, g: np.ndarray) -> np.ndarray:
    """(J^T H J + lambda I)^-1 g by the push-through identity, O(N m^2): the reference at large N."""
    J, H, lam = ggn.J, ggn.H, ggn.damping
    inner = lam * np.eye(ggn.m) + H @ (J @ J.T)
    return (g - J.T @ np.linalg.solve(inner, H @ (J @ g))) / lam


def programmed_solution(ggn: driver.GGN, g: np.ndarray, info: driver.DeviceInfo, vector_scale: float) -> np.ndarray:
    """F_q^-1 g_q in user units, for the arrays and the input as the driver quantises them: what a device
    that adds no error of its own would answer.  O(N m^2)."""
    codes = program(ggn, info.element_bits, info.g_max)
    unit = info.g_max / code_max(info.element_bits)
    J = codes.j_codes * (unit * codes.j_scale)
    H = codes.h_codes * (unit * codes.h_scale)
    damping = float(codes.damping_code[0]) * unit * codes.scale
    dac = to_codes(g / vector_scale, info.dac_bits, info.dac_range_v).codes
    g_q = dac * (info.dac_range_v / code_max(info.dac_bits) * vector_scale)
    inner = damping * np.eye(ggn.m) + H @ (J @ J.T)
    return (g_q - J.T @ np.linalg.solve(inner, H @ (J @ g_q))) / damping


# --------------------------------------------------------------------------- the kernel against numpy
def reference_run_ggn(j, h, jt, damping, inv_c, force, noise_sd, state, dt, n_steps, sps, first, rail_v, adc, rng):
    """V <- V + dt (force - inv_c (jt^T h j V + damping V)) + noise_sd sqrt(dt) (z_prev + z) / 2, step by step
    (the Leimkuhler-Matthews noise term; the first z_prev is drawn before the first step).

    The same rails, run-away and ADC rules as tests/test_kernel_reference.reference_run_rc; each step draws
    one normal per cell when any cell is noisy, each conversion one per cell when the ADC is noisy.
    """
    gain, offset, noise_v, lsb, top = adc
    v = np.array(state, dtype=np.float64)
    acc = np.zeros_like(v)
    n = v.shape[0]
    step_sd = noise_sd * math.sqrt(dt)
    noisy = bool(np.any(step_sd != 0.0))
    previous = rng.standard_normal(n) if noisy else None
    samples = clipped = 0
    saturated = False
    for step in range(1, n_steps + 1):
        v = v + dt * (force - inv_c * (jt.T @ (h @ (j @ v)) + damping * v))
        if noisy:
            z = rng.standard_normal(n)
            v = v + step_sd * 0.5 * (previous + z)
            previous = z
        if rail_v > 0.0:
            saturated = saturated or bool(np.any(np.abs(v) > rail_v))
            v = np.clip(v, -rail_v, rail_v)
        elif not np.all(np.abs(v) < _kernels.RUNAWAY_V):
            return step, samples, saturated, clipped, True, v, acc
        if step >= first and step % sps == 0:
            x = v + noise_v * rng.standard_normal(n) if noise_v > 0.0 else v.copy()
            x = gain * x + offset
            if lsb > 0.0:
                codes = np.rint(x / lsb)
                clipped += int(np.count_nonzero(np.abs(codes) > top))
                x = np.clip(codes, -top, top)
            acc += x
            samples += 1
    return n_steps, samples, saturated, clipped, False, v, acc


def kernel_run_ggn(j, h, jt, damping, inv_c, force, noise_sd, state, dt, n_steps, sps, first, rail_v, adc, rng):
    gain, offset, noise_v, lsb, top = adc
    v = np.array(state, dtype=np.float64)
    acc = np.zeros_like(v)
    n, m = v.shape[0], j.shape[0]
    noise_prev = np.zeros(n)
    if np.any(noise_sd != 0.0):  # as the engine does, once per run
        _kernels._draw_normals(rng, noise_prev)
    out = _kernels._run_ggn(
        j, h, jt, damping, inv_c, force, noise_sd, v, noise_prev, float(dt), int(n_steps), int(sps), int(first),
        float(rail_v),
        gain, offset, float(noise_v), float(lsb), float(top), rng, acc, np.empty(n),
        np.zeros((0, 0)), np.zeros((0, n)), 1, np.empty(m), np.empty(m),
    )  # fmt: skip
    steps, samples, saturated, clipped, runaway = out
    return int(steps), int(samples), bool(saturated), int(clipped), bool(runaway), v, acc


def _kernel_problem(m, n, seed, *, separate_parts):
    gen = np.random.default_rng(seed)
    j = gen.standard_normal((m, n)) / math.sqrt(n)
    a = gen.standard_normal((m, m))
    h = a @ a.T / m
    jt = j * (1.0 + 0.05 * gen.standard_normal((m, n))) if separate_parts else j
    damping = 1.0 + 0.1 * gen.standard_normal(n) ** 2
    inv_c = 1.0 / (1.0 + 0.05 * gen.standard_normal(n))
    return gen, j, h, jt, damping, inv_c


KERNEL_CASES = {
    "ideal": dict(noise=0.0, rail=0.0, adc=False, separate=False),
    "noisy, quantised ADC, rails": dict(noise=0.3, rail=0.9, adc=True, separate=True),
    "noisy, no rails, ideal ADC": dict(noise=0.2, rail=0.0, adc=False, separate=True),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=list(KERNEL_CASES))
@pytest.mark.parametrize(("m", "n"), [(1, 3), (3, 7), (5, 40)])
def test_kernel_matches_numpy_reference(case, m, n):
    """States and accumulators to round-off, codes and counts exactly, and the same numbers drawn."""
    spec = KERNEL_CASES[case]
    gen, j, h, jt, damping, inv_c = _kernel_problem(m, n, 11 * m + n, separate_parts=spec["separate"])
    force = gen.standard_normal(n)
    noise_sd = np.full(n, spec["noise"]) * (1.0 + 0.1 * np.arange(n) / n)
    state = 0.3 * gen.standard_normal(n)
    if spec["adc"]:
        adc = (1.0 + 0.05 * gen.standard_normal(n), 0.01 * gen.standard_normal(n), 0.02, 0.5 / 31.0, 31.0)
    else:
        adc = (np.ones(n), np.zeros(n), 0.0, 0.0, 0.0)
    args = (j, h, jt, damping, inv_c, force, noise_sd, state, 0.01, 300, 7, 50, spec["rail"], adc)
    rng_ref, rng_kernel = np.random.default_rng(5), np.random.default_rng(5)
    ref = reference_run_ggn(*args, rng_ref)
    got = kernel_run_ggn(*args, rng_kernel)
    assert got[:5] == ref[:5]
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got[6], ref[6], rtol=1e-12, atol=1e-11)
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state


def test_kernel_runaway_matches_reference():
    """An unstable structured drift (negative damping, no rails) ends the run at the same step."""
    gen, j, h, jt, _, inv_c = _kernel_problem(2, 6, 3, separate_parts=False)
    damping = np.full(6, -0.5)
    adc = (np.ones(6), np.zeros(6), 0.0, 0.0, 0.0)
    args = (j, h, jt, damping, inv_c, np.ones(6), np.zeros(6), np.ones(6), 0.5, 5000, 1, 1, 0.0, adc)
    ref = reference_run_ggn(*args, np.random.default_rng(0))
    got = kernel_run_ggn(*args, np.random.default_rng(0))
    assert ref[4] and got[:5] == ref[:5]


def test_kernel_recording_draws_nothing():
    """Recording snapshots (the buffer of _run_rc's recording) changes neither the state nor the draws."""
    gen, j, h, jt, damping, inv_c = _kernel_problem(3, 9, 4, separate_parts=True)
    n, m = 9, 3
    common = (j, h, jt, damping, inv_c, gen.standard_normal(n), np.full(n, 0.2), np.zeros(n), 0.01, 200, 5, 1, 0.0)
    adc = (np.ones(n), np.zeros(n), 0.01, 0.0, 0.0)
    outs = []
    for k in (0, 10):
        rng = np.random.default_rng(1)
        state, acc, snaps = np.zeros(n), np.zeros(n), np.zeros((k, n))
        _kernels._run_ggn(
            *common[:7], state, np.zeros(n), *common[8:], *adc, rng, acc, np.empty(n), np.zeros((0, 0)), snaps, 2,
            np.empty(m), np.empty(m),
        )  # fmt: skip
        outs.append((state, acc, rng.bit_generator.state, snaps))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert outs[0][2] == outs[1][2]
    assert np.all(outs[1][3] != 0.0)


# --------------------------------------------------------------------------- the exact low-rank engine
class _ProbeRng:
    """Stands in for a Generator: returns a fixed vector's entries in order, so the engine's output,
    linear in its draws, can be probed with unit vectors."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)
        self.used = 0

    def standard_normal(self, size=None):
        count = 1 if size is None else int(size)
        out = self.values[self.used : self.used + count]
        if out.shape[0] < count:
            out = np.concatenate([out, np.zeros(count - out.shape[0])])
        self.used += count
        return out if size is not None else float(out[0])


def _engine_moments(model, state, target, t, burn_in, period):
    """Mean and covariance of (sum of the samples, final state) as the engine draws them (probing)."""

    def run(values):
        mean, final, count = exact.propagate(model, state, target, t, burn_in, period, _ProbeRng(values))
        return np.concatenate([mean * count, final]), _ProbeRng(values)

    dry = _ProbeRng(np.zeros(0))
    exact.propagate(model, state, target, t, burn_in, period, dry)
    draws = dry.used
    base, _ = run(np.zeros(draws))
    columns = [run(np.eye(draws)[k])[0] - base for k in range(draws)]
    factor = np.array(columns).T
    return base, factor @ factor.T


def _analytic_moments(drift, noise_sd, state, target, t, burn_in, period):
    """The same moments from the dense drift: exact transitions over the sample grid, stepped as a
    linear Gaussian recursion on (running sum, state)."""
    n = drift.shape[0]
    sigma = scipy.linalg.solve_continuous_lyapunov(drift, np.diag(noise_sd**2))
    m0, m1 = exact.window(t, burn_in, period)

    def step(mean, cov, h, add):
        phi = scipy.linalg.expm(-drift * h)
        q = sigma - phi @ sigma @ phi.T
        top = np.block([[np.eye(n), phi if add else np.zeros((n, n))], [np.zeros((n, n)), phi]])
        zero = np.zeros((n, n))
        noise = np.block([[q, q], [q, q]]) if add else np.block([[zero, zero], [zero, q]])
        return top @ mean, top @ cov @ top.T + noise

    mean = np.concatenate([np.zeros(n), state - target])
    cov = np.zeros((2 * n, 2 * n))
    mean, cov = step(mean, cov, m0 * period, add=False)
    for _ in range(m1 - m0):
        mean, cov = step(mean, cov, period, add=True)
    mean, cov = step(mean, cov, t - m1 * period, add=False)
    count = m1 - m0
    mean = mean + np.concatenate([count * target, target])
    return mean, cov


@pytest.mark.parametrize(
    ("m", "n", "rank_h"),
    [(2, 6, 2), (4, 4, 4), (6, 4, 6), (3, 9, 2), (10, 9, 9)],
    ids=["m<N", "m=N", "m>N", "singular H", "m>N, singular H"],
)
def test_lowrank_engine_has_the_analytic_moments(m, n, rank_h):
    """The low-rank form's (sum, final state) is Gaussian with the mean and covariance of the dense OU process,
    computed here with expm and the Lyapunov equation, to 1e-9.  A singular H gives modes of rate lambda
    inside range(J^T); m > N leaves no complement (then small-mu modes must still be measured from lambda)."""
    gen = np.random.default_rng(m * 10 + n)
    j = gen.standard_normal((m, n))
    a = gen.standard_normal((m, rank_h))
    h = a @ a.T / m
    gamma, damping_g, s = 1.3, 0.4, 0.7
    model, why = lowrank.prepare_ggn(j, h, np.full(n, damping_g), np.full(n, gamma), np.full(n, s))
    assert model is not None and why == ""
    drift = gamma * (j.T @ h @ j + damping_g * np.eye(n))
    force = gen.standard_normal(n)
    target = model.fixed_point(force)
    np.testing.assert_allclose(target, np.linalg.solve(drift, force), rtol=1e-10, atol=1e-12)
    state = gen.standard_normal(n)
    args = (state, target, 7.3, 2.1, 0.5)
    got_mean, got_cov = _engine_moments(model, *args)
    ref_mean, ref_cov = _analytic_moments(drift, np.full(n, s), *args)
    scale = np.abs(ref_cov).max()
    np.testing.assert_allclose(got_mean, ref_mean, rtol=1e-9, atol=1e-9 * np.abs(ref_mean).max())
    np.testing.assert_allclose(got_cov, ref_cov, rtol=0, atol=1e-9 * scale)
    # the bounds the engine choice uses hold
    var = np.diag(scipy.linalg.solve_continuous_lyapunov(drift, np.diag(np.full(n, s**2))))
    assert np.all(model.stationary_var_upper() >= var * (1 - 1e-12))
    phi = scipy.linalg.expm(-drift * 0.5)
    sigma = scipy.linalg.solve_continuous_lyapunov(drift, np.diag(np.full(n, s**2)))
    fresh = np.diag(sigma - phi @ sigma @ phi.T)
    assert np.all(model.fresh_var_lower(0.5) <= fresh * (1 + 1e-12))
    path = [target + scipy.linalg.expm(-drift * t) @ (state - target) for t in np.linspace(0.0, 20.0, 400)]
    assert np.all(np.abs(path).max(axis=0) <= model.reach(state, target) * (1 + 1e-12))


def test_lowrank_refuses_what_it_cannot_model():
    j = np.ones((2, 3))
    h = np.eye(2)
    ones = np.ones(3)
    assert lowrank.prepare_ggn(j, np.array([[1.0, 0.5], [0.0, 1.0]]), ones, ones, ones)[0] is None
    model, why = lowrank.prepare_ggn(j, -h, ones, ones, ones)
    assert model is None and "positive semi-definite" in why
    model, why = lowrank.prepare_ggn(j, h, ones, np.array([1.0, 1.1, 1.0]), ones)
    assert model is None and "differ" in why


# --------------------------------------------------------------------------- GGN load equals dense load
def test_ggn_equals_dense_on_the_ideal_device_exact():
    """No noise: the GGN and the dense load of J^T H J + lambda I both give F^-1 g to 1e-10."""
    ggn = random_ggn(4, 12, damping=0.3)
    g = np.random.default_rng(1).standard_normal(12)
    expected = np.linalg.solve(ggn.to_dense(), g)
    results = []
    for matrix in (ggn, ggn.to_dense()):
        with driver.open("ideal", seed=3) as dev:
            scale = dev.matrix_scale(matrix)
            smallest = np.linalg.eigvalsh(ggn.to_dense())[0] / scale
            dev.load_matrix(matrix)
            dev.load_vector(g)
            report = dev.run(60.0 / smallest, burn_in=40.0 / smallest)
            assert report.engine == "exact"
            results.append(dev.read_mean())
    np.testing.assert_allclose(results[0], expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_allclose(results[1], expected, rtol=1e-10, atol=1e-10 * np.abs(expected).max())


def test_ggn_equals_dense_trajectory_for_trajectory(tmp_path):
    """Noisy ideal device, same seed, same scale: the transient engine steps the factored drift and the dense
    one with the same step and the same draws, so the results agree to round-off."""
    path = write_spec(tmp_path, "noisy", {"noise.kappa0": 0.01})
    ggn = random_ggn(3, 10, damping=0.5, seed=2)
    g = np.random.default_rng(2).standard_normal(10)
    out = []
    for matrix in (ggn, ggn.to_dense()):
        with driver.open(path, seed=8) as dev:
            assert dev.load_matrix(matrix, scale=dev.matrix_scale(ggn.to_dense())).clipped == 0
            dev.load_vector(g)
            report = dev.run(30.0, burn_in=10.0, engine="transient")
            out.append((report.dt, report.steps, dev.read_mean(), dev.read_state()))
    assert out[0][:2] == out[1][:2]
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out[0][3], out[1][3], rtol=1e-9, atol=1e-10)


def test_ggn_equals_dense_within_quantisation_on_tngd_sim():
    """16-bit elements and converters: the GGN load solves the system its codes describe to 1e-3 (ADC
    rounding and noise), and the GGN and the dense load both agree with numpy's solve of the unquantised
    system to 1e-2 (16-bit element rounding, amplified by the condition number)."""
    ggn = random_ggn(6, 40, damping=2.0, seed=4)
    g = np.random.default_rng(4).standard_normal(40)
    expected = np.linalg.solve(ggn.to_dense(), g)
    vector_scale = 4.0 * np.abs(g).max()  # keep the answer well inside the ADC range
    answers = []
    for matrix in (ggn, ggn.to_dense()):
        with driver.open("tngd-sim", seed=0) as dev:
            report = dev.load_matrix(matrix)
            assert report.clipped == 0
            dev.load_vector(g, scale=vector_scale)
            smallest = ggn.damping / report.scale
            dev.run(2000.0 / smallest, burn_in=20.0 / smallest)  # a long window averages the noise out
            answers.append(dev.read_mean())
            info = dev.info
    top = np.abs(expected).max()
    programmed = programmed_solution(ggn, g, info, vector_scale)
    assert np.abs(answers[0] - programmed).max() < 1e-3 * top
    for x in answers:
        assert np.abs(x - expected).max() < 1e-2 * top
    assert np.abs(answers[0] - answers[1]).max() < 1e-2 * top


def test_exact_and_transient_agree_on_a_small_ggn():
    """No noise: both engines reach F^-1 g (Euler's fixed point is exact for a linear drift)."""
    ggn = random_ggn(2, 5, damping=1.0, seed=5)
    g = np.random.default_rng(5).standard_normal(5)
    expected = np.linalg.solve(ggn.to_dense(), g)
    means = {}
    for engine in ("exact", "transient"):
        with driver.open("ideal", seed=0) as dev:
            scale = dev.load_matrix(ggn).scale
            dev.load_vector(g)
            smallest = ggn.damping / scale
            assert dev.run(40.0 / smallest, burn_in=30.0 / smallest, engine=engine).engine == engine
            means[engine] = dev.read_mean()
    np.testing.assert_allclose(means["exact"], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(means["transient"], means["exact"], rtol=1e-6, atol=1e-8)


def test_exact_and_transient_agree_in_distribution(tmp_path):
    """Noise on: the spread of the final state over seeds matches kappa0 F_d^-1 (the stationary covariance of
    the device's drift F_d = F / s) on both engines, within 5 standard errors."""
    kappa0, runs = 0.02, 300
    path = write_spec(tmp_path, "noisy", {"noise.kappa0": kappa0})
    ggn = random_ggn(2, 4, damping=0.8, seed=6)
    g = np.array([0.3, -0.2, 0.1, 0.4])
    finals = {"exact": [], "transient": []}
    for engine in finals:
        for seed in range(runs):
            with driver.open(path, seed=seed) as dev:
                scale = dev.load_matrix(ggn).scale
                dev.load_vector(g, scale=1.0)
                dev.run(30.0 * scale / ggn.damping, engine=engine)
                finals[engine].append(dev.transport.firmware.analog_state()[:4])
    f_device = ggn.to_dense() / scale
    cov = kappa0 * np.linalg.inv(f_device)
    mean = np.linalg.solve(f_device, g)
    for engine, states in finals.items():
        states = np.array(states)
        se_mean = np.sqrt(np.diag(cov) / runs)
        assert np.all(np.abs(states.mean(axis=0) - mean) < 5 * se_mean), engine
        sample = np.cov(states.T)
        se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / runs)
        assert np.all(np.abs(sample - cov) < 5 * se_cov), engine


# --------------------------------------------------------------------------- large N, never N x N
def test_large_ggn_never_forms_n_by_n():
    """N = 200000, m = 64 on tngd-sim: load, run and read on the exact engine with the peak of traced
    allocations under 1 GB (N x N float64 would be 320 GB), and the answer right to 16-bit accuracy."""
    m, n = 64, 200_000
    gen = np.random.default_rng(0)
    J = gen.standard_normal((m, n))
    a = gen.standard_normal((m, m))
    H = a @ a.T / (4 * m)
    g = gen.standard_normal(n)
    tracemalloc.start()
    try:
        ggn = driver.GGN(J, H, 10.0)
        with driver.open("tngd-sim", seed=0) as dev:
            load = dev.load_matrix(ggn)
            dev.load_vector(g, scale=4.0 * np.abs(g).max())
            smallest = ggn.damping / load.scale
            report = dev.run(2000.0 / smallest, burn_in=20.0 / smallest, engine="exact")
            x = dev.read_mean()
            times = [record.device_time for record in dev.timeline]
            info = dev.info
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1e9, f"peak traced memory {peak / 1e9:.2f} GB"
    assert report.engine == "exact"
    top = np.abs(woodbury_solve(ggn, g)).max()
    assert np.abs(x - programmed_solution(ggn, g, info, 4.0 * np.abs(g).max())).max() < 1e-3 * top
    assert np.abs(x - woodbury_solve(ggn, g)).max() < 2e-2 * top
    # the hardware estimate: J's m N codes dominate the link
    assert times[0].link_s == pytest.approx(16 * (m * n + m * m + 1) / 50e9)


def test_the_device_keeps_j_as_the_codes_it_was_sent():
    """Without mismatch the firmware holds J's int16 codes by reference (no float64 copy of m x N), and
    J as conductances is formed only when asked for (the transient engine)."""
    ggn = random_ggn(6, 300, 0.5, seed=3)
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(ggn)
        firmware = dev.transport.firmware
        programmed = firmware.matrix
        assert programmed.j_codes.dtype == np.int16 and programmed.j_codes is dev._j_codes
        assert not programmed.mismatched and programmed._j is None and firmware._ggn_arrays == {}
        unit = programmed.unit
        np.testing.assert_array_equal(programmed.row_squares, (programmed.j_codes.astype(np.int64) ** 2).sum(axis=1))
        dev.load_vector(np.ones(300), scale="auto")
        dev.run(5.0, engine="exact")
        assert programmed._j is None  # the exact engine worked from the codes
        np.testing.assert_array_equal(programmed.j, programmed.j_codes * unit)
        assert programmed.jt is programmed.j


def test_a_refused_ggn_leaves_the_codes_of_the_last_load_alone():
    """driver.ggn.program writes J's codes (into the buffer the device holds) only after every check."""
    ggn = random_ggn(4, 50, 0.5, seed=4)
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(ggn)
        before = dev.transport.firmware.matrix.j_codes.copy()
        with pytest.raises(driver.InvalidInputError, match="code 0"):
            dev.load_matrix(driver.GGN(ggn.J * 1e3, ggn.H, 1e-9))
        np.testing.assert_array_equal(dev.transport.firmware.matrix.j_codes, before)


@pytest.mark.parametrize("n", [700, 20_000])
def test_gram_of_codes_is_far_more_accurate_than_the_codes(n):
    """lowrank._gram of 16-bit codes (float32 products off the diagonal, exact diagonal) against the exact
    integer Gram matrix: its error must be far below what rounding J to codes did to J J^T.

    Derived tolerance (lowrank._gram): float32 rounding of an off-diagonal entry is about
    2^-24 K |c|^2 sqrt(N / K) for blocks of K columns (|c| the rms code), the codes' rounding moves it by
    about 0.4 sqrt(N) |c|; 20 times the first, and at most a tenth of the second, must bound the error."""
    gen = np.random.default_rng(n)
    m = 40
    J = gen.standard_normal((m, n))
    q = to_codes(J / np.abs(J).max(), 16, 1.0)
    codes = q.codes
    exact_gram = codes.astype(np.int64) @ codes.T.astype(np.int64)  # integers, exact
    got = lowrank._gram(codes)
    assert np.array_equal(np.diag(got), np.diag(exact_gram).astype(np.float64))
    scaled = J / np.abs(J).max() * code_max(16)
    quantisation = np.abs(scaled @ scaled.T - exact_gram)
    rms_code = math.sqrt(float(np.mean(codes.astype(np.float64) ** 2)))
    k = min(n, max(64, lowrank._GRAM_VALUES // m))
    float32_scale = 2.0**-24 * k * rms_code**2 * math.sqrt(n / k)
    error = np.abs(got - exact_gram)
    off = ~np.eye(m, dtype=bool)
    assert error[off].max() <= 20 * float32_scale
    assert error[off].max() <= 0.1 * np.sqrt(np.mean(quantisation[off] ** 2))
    # and with the diagonal given (the firmware's exact row sums), the same matrix
    np.testing.assert_array_equal(lowrank._gram(codes, np.diag(exact_gram).astype(np.float64)), got)


def test_lowrank_model_from_codes_matches_the_model_from_conductances():
    """prepare_ggn(codes, unit=u) is the model of conductances u codes: the same rates and f(M) x."""
    gen = np.random.default_rng(5)
    m, n = 12, 3000
    codes = to_codes(gen.standard_normal((m, n)) / 4.0, 16, 1.0).codes
    unit = 1.0 / code_max(16)
    a = gen.standard_normal((m, m))
    h = a @ a.T / m
    cells = np.ones(n)
    from_codes, _ = lowrank.prepare_ggn(codes, h, 0.1 * cells, 2.0 * cells, 0.3 * cells, unit=unit)
    from_floats, _ = lowrank.prepare_ggn(codes * unit, h, 0.1 * cells, 2.0 * cells, 0.3 * cells)
    # the codes' Gram matrix has float32 products off its diagonal: relative error about 2^-24 sqrt(N)
    rtol = 2.0**-24 * math.sqrt(n)
    np.testing.assert_allclose(from_codes.rates, from_floats.rates, rtol=rtol)
    x = gen.standard_normal(n)
    values = np.exp(-0.7 * from_floats.all_rates())
    got, want = from_codes.apply(values, x), from_floats.apply(values, x)
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    np.testing.assert_allclose(from_codes.diagonal_bound, from_floats.diagonal_bound, rtol=1e-12)


# --------------------------------------------------------------------------- mismatch
def test_mismatch_makes_the_drift_non_symmetric_and_auto_steps_it(tmp_path):
    path = write_spec(tmp_path, "mismatched", {"coupling.mismatch": 0.02, "noise.kappa0": 1e-4})
    ggn = random_ggn(2, 6, damping=1.0, seed=7)
    g = np.random.default_rng(7).standard_normal(6)
    with driver.open(path, seed=1) as dev:
        scale = dev.load_matrix(ggn).scale
        dev.load_vector(g)
        programmed = dev.transport.firmware.matrix
        assert programmed.jt is not programmed.j
        assert not np.allclose(programmed.jt, programmed.j)  # J^T's elements are their own parts
        drift = programmed.drift_dense()
        assert np.abs(drift - drift.T).max() > 1e-4 * np.abs(drift).max()
        with pytest.raises(driver.InvalidInputError, match="exact.*separate parts.*mismatch.*transient"):
            dev.run(10.0, engine="exact")
        assert dev.status().runs == 0
        t = 40.0 * scale / ggn.damping
        report = dev.run(t, burn_in=t / 2)
        assert report.engine == "transient"
        x = dev.read_mean()
    expected = np.linalg.solve(ggn.to_dense(), g)
    assert np.abs(x - expected).max() < 0.1 * np.abs(expected).max()  # a 2 % mismatch moves it a little


def test_mismatch_parts_do_not_depend_on_the_size(tmp_path):
    """Element (k, i) of each array is the same part whatever m and N are programmed, like dense elements."""
    path = write_spec(tmp_path, "mismatched", {"coupling.mismatch": 0.05})
    parts = []
    for m, n in ((2, 5), (3, 8)):
        J = np.ones((m, n))
        with driver.open(path, seed=4) as dev:
            dev.load_matrix(driver.GGN(J, np.eye(m), 0.5))
            programmed = dev.transport.firmware.matrix
            parts.append((programmed.j.copy(), programmed.jt.copy(), programmed.h.copy(), programmed.damping.copy()))
    for small, large in zip(parts[0], parts[1], strict=True):
        if small.ndim == 2:
            np.testing.assert_array_equal(large[: small.shape[0], : small.shape[1]], small)
        else:
            np.testing.assert_array_equal(large[: small.shape[0]], small)


def test_same_seed_same_calls_same_result(tmp_path):
    path = write_spec(tmp_path, "mismatched", {"coupling.mismatch": 0.02, "noise.kappa0": 1e-3})
    ggn = random_ggn(3, 7, damping=0.7, seed=9)
    g = np.arange(7.0) - 3.0
    out = []
    for _ in range(2):
        with driver.open(path, seed=12) as dev:
            dev.load_matrix(ggn)
            dev.load_vector(g)
            dev.run(5.0, burn_in=1.0)
            out.append(dev.read_mean())
    np.testing.assert_array_equal(out[0], out[1])


# --------------------------------------------------------------------------- quantisation details
def test_quantised_h_stays_positive_semi_definite():
    """H = diag(p) - p p^T is singular; rounding it to 16-bit codes could make it indefinite.  The driver
    raises its diagonal codes just enough, so the exact engine's low-rank form (which needs H >= 0) applies."""
    gen = np.random.default_rng(3)
    blocks = []
    for _ in range(4):
        p = gen.dirichlet(np.ones(5))
        blocks.append(np.diag(p) - np.outer(p, p))
    H = scipy.linalg.block_diag(*blocks)
    J = gen.standard_normal((20, 50))
    ggn = driver.GGN(J, H, 1.0)
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(ggn)
        h_codes = dev.transport.firmware.matrix.h
        assert np.linalg.eigvalsh(h_codes)[0] >= -1e-12 * np.abs(h_codes).max()
        dev.load_vector(np.ones(50), scale=100.0)
        assert dev.run(5.0).engine == "exact"  # auto takes it: the low-rank form applies


def test_damping_below_the_element_resolution_is_refused():
    J = np.full((2, 4), 100.0)
    with driver.open("tngd-sim", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError, match=r"damping 1e-06 .*code 0.*raise the damping"):
            dev.load_matrix(driver.GGN(J, np.eye(2), 1e-6))
        assert dev.status().matrix_n == 0


def test_scale_is_undone_on_read_out():
    """An explicit scale changes the device values, not the answer in user units."""
    ggn = random_ggn(3, 8, damping=0.4, seed=10)
    g = np.random.default_rng(10).standard_normal(8)
    expected = np.linalg.solve(ggn.to_dense(), g)
    with driver.open("ideal", seed=0) as dev:
        natural = dev.matrix_scale(ggn)
        for scale in (natural, 3.0 * natural):
            assert dev.load_matrix(ggn, scale=scale).scale == scale
            dev.load_vector(g)
            lam = ggn.damping / scale
            dev.run(50.0 / lam, burn_in=40.0 / lam)
            np.testing.assert_allclose(dev.read_mean(), expected, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- bad input
def _refused_load(make, error, pattern, spec="ideal"):
    """The load raises ``error`` matching ``pattern`` and leaves the loaded matrix as it was."""
    with driver.open(spec, seed=0) as dev:
        dev.load_matrix(np.eye(3))
        with pytest.raises(error, match=pattern):
            dev.load_matrix(make())
        assert dev.status().matrix_n == 3


@pytest.mark.parametrize(
    ("J", "H", "damping", "pattern"),
    [
        (np.ones((3, 5)), np.eye(2), 1.0, r"H must have shape \(m, m\) = \(3, 3\).*J of shape \(3, 5\).*got \(2, 2\)"),
        (np.ones(5), np.eye(1), 1.0, r"J must have 2 dimension\(s\), got shape \(5,\)"),
        (np.ones((0, 5)), np.eye(0), 1.0, r"J must be non-empty"),
        (np.ones((2, 3)), np.array([[1.0, 0.5], [0.2, 1.0]]), 1.0, r"H must be symmetric: max \|H - H.T\| = 0.3 at"),
        (np.ones((2, 3)), np.diag([1.0, -0.5]), 1.0, r"H must be positive semi-definite.*-0.5"),
        (np.ones((2, 3)), np.eye(2), 0.0, r"damping must be a finite number > 0, got 0.0"),
        (np.ones((2, 3)), np.eye(2), -1.0, r"damping must be a finite number > 0, got -1.0"),
        (np.ones((2, 3)), np.eye(2), math.nan, r"damping must be a finite number > 0, got nan"),
        (np.ones((2, 3)), np.eye(2), math.inf, r"damping must be a finite number > 0, got inf"),
        (np.ones((2, 3)), np.eye(2), True, r"damping must be a positive number, got True"),
        (np.ones((2, 3)), np.eye(2), "1", r"damping must be a positive number, got '1'"),
        (np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]]), np.eye(2), 1.0, r"J has 1 NaN or infinite.*\(0, 1\)"),
        (np.ones((2, 3)), np.array([[1.0, np.inf], [np.inf, 1.0]]), 1.0, r"H has 2 NaN or infinite.*\(0, 1\)"),
        (np.array([["a", "b"]]), np.eye(1), 1.0, r"J must be real numbers"),
    ],
)
def test_bad_ggn_is_refused(J, H, damping, pattern):
    with pytest.raises(driver.InvalidInputError, match=pattern):
        driver.GGN(J, H, damping)
    assert issubclass(driver.InvalidInputError, ValueError)


def test_too_many_rows_for_the_device(tmp_path):
    path = write_spec(tmp_path, "narrow", {"coupling.max_ggn_rows": 4})
    ggn = driver.GGN(np.ones((5, 6)), np.eye(5), 1.0)
    _refused_load(lambda: ggn, driver.InvalidInputError, r"m = 5 rows.*only 4 rows.*coupling.max_ggn_rows", str(path))
    path = write_spec(tmp_path, "dense-only", {"coupling.max_ggn_rows": 0})
    _refused_load(lambda: ggn, driver.InvalidInputError, r"no structured arrays", str(path))


def test_too_many_parameters_for_the_device():
    with driver.open("ideal", seed=0) as dev:
        cells = dev.info.cells
    ggn = driver.GGN(np.ones((2, cells + 1)), np.eye(2), 1.0)
    _refused_load(lambda: ggn, driver.InvalidInputError, rf"size {cells + 1}.*{cells} cells")


def test_tngd_sim_takes_2_to_the_20_cells_and_4096_rows_but_no_huge_dense_matrix():
    with driver.open("tngd-sim", seed=0) as dev:
        assert dev.info.cells >= 2**20
        assert dev.info.max_ggn_rows >= 4096
        assert dev.info.max_dense_size == 4096
        with pytest.raises(driver.InvalidInputError, match=r"size 4097.*largest dense matrix.*4096 x 4096.*GGN"):
            dev.load_matrix(np.eye(4097))
        # a 10^6 x 10^6 dense matrix is refused from its shape, before anything of its size is made
        huge = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(10**6, 10**6), strides=(0, 0))
        with pytest.raises(driver.InvalidInputError, match=r"size 1000000.*largest dense matrix"):
            dev.load_matrix(huge)
        assert dev.status().matrix_n == 0


@pytest.mark.parametrize("bits", [0, 8, 16])
def test_blocked_quantiser_gives_to_codes_results(bits):
    """The driver's one-pass compiled quantiser of J gives exactly driver.codes.to_codes' codes and counts."""
    from driver.ggn import _to_codes_blocked

    gen = np.random.default_rng(bits)
    values = gen.standard_normal((5, 9000)) * np.array([[1.0], [2.0], [0.5], [3.0], [1e-4]])
    values[0, :7] = 0.0
    values = values.T.copy().T  # a Fortran-ordered array, as J.T of a user's (N, m) array would be
    wide = np.tile(values, (1, 250))  # 11 million elements: split over column ranges on several threads
    for array in (values, wide):
        got = _to_codes_blocked(array, 1.7, bits, 1.3)
        ref = to_codes(array / 1.7, bits, 1.3)
        np.testing.assert_array_equal(got.codes, ref.codes)
        assert got.codes.dtype == ref.codes.dtype
        assert (got.clipped, got.zeroed) == (ref.clipped, ref.zeroed) and got.clipped > 0
        assert got.max_error == ref.max_error


def test_firmware_refuses_bad_ggn_payloads():
    """Straight to the firmware: shapes, dtypes and code ranges, each named; nothing changes."""
    from spu_emulator import Firmware, load_spec
    from spu_emulator.protocol import Opcode, Status

    firmware = Firmware(load_spec("tngd-sim"), seed=0)
    good = {
        "j_codes": np.ones((2, 3), dtype=np.int64),
        "h_codes": np.eye(2, dtype=np.int64),
        "damping_code": np.array([5], dtype=np.int64),
    }
    cases = [
        ({"j_codes": np.ones(3, dtype=np.int64)}, "'j_codes' must be a 2-d array"),
        ({"h_codes": np.eye(3, dtype=np.int64)}, r"H codes must have shape \(2, 2\)"),
        ({"damping_code": np.array([1, 2])}, r"damping_code must have shape \(1,\)"),
        ({"j_codes": np.full((2, 3), 40000)}, "J element code 40000 is outside"),
        ({"h_codes": np.eye(2)}, "H element codes must be integers"),
        ({"damping_code": np.array([-40000])}, "damping element code 40000 is outside"),
    ]
    for change, pattern in cases:
        status, reply = firmware.handle(Opcode.LOAD_GGN, {**good, **change})
        assert status == Status.BAD_ARGUMENT
        assert pytest.importorskip("re").search(pattern, reply["message"]), reply["message"]
        assert firmware.matrix is None
    status, reply = firmware.handle(Opcode.LOAD_GGN, good)
    assert status == Status.OK and (reply["n"], reply["m"]) == (3, 2)


def test_readme_example_runs():
    """The python block under the README's "## Structured loading (GGN)" runs as written on a batch of
    J (32, 2000) and H = diag(p) - p p^T blocks, and gives the damped natural gradient."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Structured loading (GGN)", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    gen = np.random.default_rng(0)
    blocks = []
    for _ in range(8):
        p = gen.dirichlet(np.ones(4))
        blocks.append(np.diag(p) - np.outer(p, p))
    H = scipy.linalg.block_diag(*blocks)
    J = gen.standard_normal((32, 2000))
    g = gen.standard_normal(2000)
    namespace = {"driver": driver, "np": np, "J": J, "H": H, "g": g, "print": lambda *args: None}
    exec(compile(code, "README.md (## Structured loading)", "exec"), namespace)
    expected = woodbury_solve(driver.GGN(J, H, 0.1), g)
    assert np.abs(namespace["x"] - expected).max() < 5e-2 * np.abs(expected).max()  # injected noise and 16 bits


def test_no_n_by_n_second_moments_for_a_large_ggn():
    """record_cov would need an N x N accumulator: refused for a GGN wider than the dense array."""
    with driver.open("tngd-sim", seed=0) as dev:
        n = dev.info.max_dense_size + 1
        dev.load_matrix(driver.GGN(np.ones((2, n)), np.eye(2), 1.0))
        dev.load_vector(np.ones(n), scale=1e3)
        with pytest.raises(driver.InvalidInputError, match=rf"record_cov.*N x N.*N = {n}.*max_dense_size"):
            dev.run(1.0, record_cov=True)
        assert dev.status().runs == 0


def test_lowrank_engine_is_sound_for_nearly_singular_j():
    """m > N (no complement) and J with a singular value of 1e-6: the mode J^T H J barely lifts above lambda is
    poorly normalised in floating point, and the engine still gives M^-1 f and e^{-M h} d to 1e-9, because
    every function of M is taken relative to its value at lambda (the dense reference: solve and expm)."""
    gen = np.random.default_rng(7)
    m, n = 8, 6
    u, _ = np.linalg.qr(gen.standard_normal((m, n)))
    v, _ = np.linalg.qr(gen.standard_normal((n, n)))
    j = (u * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 1e-6])) @ v.T
    a = gen.standard_normal((m, m - 1))
    h = a @ a.T / m
    gamma, damping_g = 1.0, 0.3
    model, _ = lowrank.prepare_ggn(j, h, np.full(n, damping_g), np.full(n, gamma), np.zeros(n))
    assert model.complement == 0
    drift = gamma * (j.T @ h @ j + damping_g * np.eye(n))
    force = gen.standard_normal(n)
    np.testing.assert_allclose(model.fixed_point(force), np.linalg.solve(drift, force), rtol=1e-9, atol=1e-9)
    d = gen.standard_normal(n)
    _, final, _ = exact.propagate(model, d, np.zeros(n), 2.0, 0.0, 1.0, np.random.default_rng(0))
    np.testing.assert_allclose(final, scipy.linalg.expm(-2.0 * drift) @ d, rtol=1e-9, atol=1e-9)
