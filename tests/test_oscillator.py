"""Oscillator (RLC) cell arrays: the BAOAB kernel against a numpy reference, the stationary law of both
cell kinds against analytic moments, the exact engine on the phase state, and the speed-up at critical
damping on an ill-conditioned matrix.

The oscillator array (DESIGN 4.2, spu_emulator/oscillator.py) is, per cell,

    dx_i = p_i / m_i dt,   dp_i = (f_i - (a x)_i - gamma_i p_i / m_i) dt + sqrt(2 gamma_i kappa) dW_i,

whose stationary x is N(a^-1 f, kappa a^-1) for a symmetric a, whatever m and gamma are.  The references
here are built from those equations (never from the emulator's matrices): the continuous-time lagged
covariances C(s) = Cov(x(t + s), x(t)) of the linear SDE on (x, p) or on V give the variance of a
window's sample mean and sample covariance (Isserlis), and that variance sets every tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg

import driver
from spu_emulator import _kernels, _oscillator
from spu_emulator.firmware import Firmware
from spu_emulator.protocol import Opcode, Status
from spu_emulator.spec import load_spec, spec_from_mapping

Z = 5.0  # two-sided z of every statistical check: 5.7e-7 false-alarm probability per entry (seeds fixed)
RTOL, ATOL = 1e-12, 1e-13


# --------------------------------------------------------------------------- specs
def ideal_spec(
    kind: str,
    *,
    cells: int = 4,
    kappa0: float = 0.02,
    damping: float = 1.5,
    step_factor: float = 0.01,
    sample_rate: float = 2.0,
    **oscillator,
) -> dict:
    """A device with ideal parts and converters, injected noise kappa0 and no rails."""
    return {
        "spec_version": 1,
        "name": f"ideal-{kind}",
        "cells": {"count": cells, "kind": kind},
        "timing": {"max_run_time": 1.0e7},
        "oscillator": {"inductance": 1.0, "damping": damping, **oscillator},
        "noise": {"kappa0": kappa0, "kappa0_max": 10.0},
        "adc": {"sample_rate": sample_rate},
        "integrator": {"step_factor": step_factor},
    }


def open_spec(mapping: dict, tmp_path, seed: int = 0) -> driver.Device:
    import yaml

    path = tmp_path / f"{mapping['name']}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return driver.open(path, seed=seed)


def spd(eigenvalues, seed: int) -> np.ndarray:
    """A symmetric matrix with the given eigenvalues, scaled so max |A_ij| = 1 (so a = A at scale 1)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues), len(eigenvalues))))
    a = (q * np.asarray(eigenvalues)) @ q.T
    a = 0.5 * (a + a.T)
    return a / np.abs(a).max()


# --------------------------------------------------------------------------- analytic references
def phase_system(kind: str, a: np.ndarray, kappa: float, mass: float = 1.0, damping: float = 1.5):
    """(G, D) of ds = (F - G s) dt + dW, <dW dW^T> = D dt, for the cell array with ideal parts; x = s[:n]."""
    n = a.shape[0]
    if kind == "rc":
        return a, 2.0 * kappa * np.eye(n)
    g = np.block([[np.zeros((n, n)), -np.eye(n) / mass], [a, damping / mass * np.eye(n)]])
    d = np.zeros((2 * n, 2 * n))
    d[n:, n:] = 2.0 * damping * kappa * np.eye(n)
    return g, d


def window_variances(kind: str, a: np.ndarray, kappa: float, period: float, samples: int, **parts):
    """Variances of the sample mean (n,) and sample covariance (n, n) of K stationary samples period apart.

    With C(m) = [e^{-G m period} Sigma]_xx, G Sigma + Sigma G^T = D:
    Var(mean_i) = sum_{|m|<K} (1 - |m|/K) C_ii(m) / K and
    Var(S_ij) = sum_{|m|<K} (1 - |m|/K) (C_ii(m) C_jj(m) + C_ij(m) C_ji(m)) / K  (Isserlis; m < 0: C(m) = C(-m)^T).
    """
    n = a.shape[0]
    g, d = phase_system(kind, a, kappa, **parts)
    sigma = scipy.linalg.solve_continuous_lyapunov(g, d)
    step = scipy.linalg.expm(-g * period)
    var_mean = np.zeros(n)
    var_cov = np.zeros((n, n))
    lagged = sigma.copy()
    for m in range(samples):
        c = lagged[:n, :n]
        weight = (1.0 if m == 0 else 2.0) * (1.0 - m / samples)
        var_mean += weight * np.diag(c)
        # the m and -m terms: C_ii C_jj is even in m; C_ij(m) C_ji(m) + C_ji(m) C_ij(m) = 2 C_ij(m) C_ji(m)
        var_cov += weight * (np.outer(np.diag(c), np.diag(c)) + c * c.T)
        lagged = step @ lagged
        if np.abs(lagged).max() < 1e-14 * np.abs(sigma).max():
            break
    return var_mean / samples, var_cov / samples


# --------------------------------------------------------------------------- the kernel against numpy
def reference_run_lc(
    a,
    force,
    inv_mass,
    friction_rate,
    momentum_sd,
    x,
    p,
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
    """BAOAB one step at a time with numpy: B p += dt/2 (f - a x); A x += dt/2 p / m;
    O p = e^{-r dt} p + sd sqrt(1 - e^{-2 r dt}) z (one normal per cell, when any cell is noisy); A;
    rails clip x and zero an outward p; B with the new a x.  Sampling as in the RC reference."""
    from test_kernel_reference import Outcome, reference_adc, reference_record

    x, p, acc = np.array(x, float), np.array(p, float), np.array(acc, float)
    cov_acc = None if cov_acc is None else np.array(cov_acc, float)
    snapshots = None if snapshots is None else np.array(snapshots, float)
    n = x.shape[0]
    decay = np.exp(-friction_rate * dt)
    kick = momentum_sd * np.sqrt(1.0 - decay**2)
    noisy = bool(np.any(kick != 0.0))
    samples = clipped = 0
    saturated = False
    for step in range(1, n_steps + 1):
        p = p + 0.5 * dt * (force - a @ x)
        x = x + 0.5 * dt * inv_mass * p
        p = decay * p + (kick * rng.standard_normal(n) if noisy else 0.0)
        x = x + 0.5 * dt * inv_mass * p
        if rail_v > 0.0:
            high, low = x > rail_v, x < -rail_v
            saturated = saturated or bool(np.any(high | low))
            p = np.where((high & (p > 0)) | (low & (p < 0)), 0.0, p)
            x = np.clip(x, -rail_v, rail_v)
        p = p + 0.5 * dt * (force - a @ x)
        if rail_v <= 0.0 and not (np.all(np.abs(x) < _kernels.RUNAWAY_V) and np.all(np.abs(p) < _kernels.RUNAWAY_V)):
            return Outcome(step, samples, saturated, clipped, True, np.concatenate([x, p]), acc, cov_acc, snapshots)
        if step >= first_sample_step and step % steps_per_sample == 0:
            codes, c = reference_adc(x, adc.gain, adc.offset_v, adc.noise_v, adc.lsb, adc.code_max, rng)
            acc += codes
            clipped += c
            reference_record(codes, samples, cov_acc, snapshots, stride)
            samples += 1
    return Outcome(n_steps, samples, saturated, clipped, False, np.concatenate([x, p]), acc, cov_acc, snapshots)


def kernel_run_lc(
    a,
    force,
    inv_mass,
    friction_rate,
    momentum_sd,
    x,
    p,
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
    from test_kernel_reference import Outcome, recording_buffers

    x, p, acc = np.array(x, float), np.array(p, float), np.array(acc, float)
    cov, snaps = recording_buffers(x.shape[0], cov_acc, snapshots)
    steps, samples, saturated, clipped, runaway = _oscillator._run_lc(
        np.ascontiguousarray(a),
        force,
        inv_mass,
        friction_rate,
        momentum_sd,
        x,
        p,
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
        np.empty(x.shape[0]),
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
        np.concatenate([x, p]),
        acc,
        None if cov_acc is None else cov,
        None if snapshots is None else snaps,
    )


@dataclass
class LcCase:
    id: str
    n: int
    noise: str = "all"  # "off", "all" or "one"
    adc: str = "ideal"
    rail_v: float = 0.0
    force_scale: float = 1.0
    n_steps: int = 300
    steps_per_sample: int = 2
    first_sample_step: int = 1
    dt: float = 0.05
    record: bool = False


LC_CASES = [
    LcCase("loop-quiet", n=4, noise="off"),
    LcCase("loop-single", n=1, steps_per_sample=3),
    LcCase("loop-noisy", n=6),
    LcCase("loop-one-noisy", n=5, noise="one"),
    LcCase("loop-quantised-burn-in", n=7, adc="quantised", first_sample_step=41, steps_per_sample=4),
    LcCase("loop-23-quantised", n=23, adc="quantised", n_steps=150),
    LcCase("blas-24", n=24, n_steps=150),
    LcCase("blas-48-quantised", n=48, adc="quantised", n_steps=120, steps_per_sample=3),
    LcCase("loop-rails", n=5, rail_v=0.5, force_scale=3.0),
    LcCase("blas-rails-quantised", n=30, adc="quantised", rail_v=0.5, force_scale=3.0, n_steps=120),
    LcCase("loop-recording", n=5, adc="quantised", record=True, steps_per_sample=1),
    LcCase("blas-recording", n=26, record=True, n_steps=100),
]


def build_lc(case: LcCase, seed: int):
    from test_kernel_reference import ideal_adc, quantised_adc

    gen = np.random.default_rng([seed, 4242])
    n = case.n
    q, _ = np.linalg.qr(gen.standard_normal((n, n)))
    a = (q * np.linspace(0.5, 2.0, n)) @ q.T + 0.05 * gen.standard_normal((n, n)) / np.sqrt(n)  # mismatched
    inv_mass = 1.0 / gen.uniform(0.8, 1.2, n)
    friction_rate = gen.uniform(0.5, 2.0, n)
    if case.noise == "off":
        momentum_sd = np.zeros(n)
    elif case.noise == "all":
        momentum_sd = gen.uniform(0.1, 0.4, n)
    else:
        momentum_sd = np.zeros(n)
        momentum_sd[min(1, n - 1)] = 0.3
    adc = ideal_adc(n) if case.adc == "ideal" else quantised_adc(n, gen)
    x, p = 0.1 * gen.standard_normal(n), 0.1 * gen.standard_normal(n)
    force = case.force_scale * gen.uniform(-1.0, 1.0, n)
    acc = gen.standard_normal(n).round()
    return a, force, inv_mass, friction_rate, momentum_sd, x, p, adc, acc


@pytest.mark.parametrize("case", LC_CASES, ids=[c.id for c in LC_CASES])
def test_run_lc_matches_reference(case):
    """_run_lc gives the reference's phase state, accumulators, counters and flags, and draws as many normals."""
    from test_kernel_reference import assert_same

    seed = 13
    a, force, inv_mass, friction_rate, momentum_sd, x, p, adc, acc = build_lc(case, seed)
    args = (
        a,
        force,
        inv_mass,
        friction_rate,
        momentum_sd,
        x,
        p,
        case.dt,
        case.n_steps,
        case.steps_per_sample,
        case.first_sample_step,
        case.rail_v,
        adc,
    )
    record = (np.ones((case.n, case.n)), np.full((40, case.n), np.nan), 3) if case.record else ()
    rng_kernel, rng_ref = np.random.default_rng(seed), np.random.default_rng(seed)
    fresh = rng_kernel.bit_generator.state

    kernel = kernel_run_lc(*args, rng_kernel, acc, *record)
    ref = reference_run_lc(*args, rng_ref, acc, *record)

    assert_same(kernel, ref, exact_acc=case.adc == "quantised")
    assert rng_kernel.bit_generator.state == rng_ref.bit_generator.state
    assert not ref.runaway
    assert ref.saturated == (case.rail_v > 0.0)
    if case.rail_v > 0.0:
        assert np.abs(kernel.state[: case.n]).max() <= case.rail_v
    if case.noise == "off" and case.adc == "ideal":
        assert rng_kernel.bit_generator.state == fresh  # nothing noisy: no draw at all
    if case.record:
        assert np.all(np.isfinite(ref.snapshots[: ref.samples // 3])) and ref.samples // 3 >= 1


def test_run_lc_noise_off_is_the_baoab_map():
    """Noise off, no friction noise: after k steps the phase state is T^k s0 + sum_j T^j c, T the BAOAB matrix
    built from its five sub-steps, c its constant part; and with friction the array converges to (a^-1 f, 0)."""
    gen = np.random.default_rng(5)
    n, dt, steps = 3, 0.1, 2000
    q, _ = np.linalg.qr(gen.standard_normal((n, n)))
    a = (q * np.array([0.5, 1.0, 2.0])) @ q.T
    force, inv_mass, rate = gen.uniform(-1, 1, n), 1.0 / gen.uniform(0.8, 1.2, n), gen.uniform(0.5, 1.5, n)
    eye, zero = np.eye(n), np.zeros((n, n))
    kick_b = np.block([[eye, zero], [-0.5 * dt * a, eye]])
    drift_a = np.block([[eye, 0.5 * dt * np.diag(inv_mass)], [zero, eye]])
    friction_o = np.block([[eye, zero], [zero, np.diag(np.exp(-rate * dt))]])
    step = kick_b @ drift_a @ friction_o @ drift_a @ kick_b
    const = (
        kick_b @ drift_a @ friction_o @ drift_a @ np.r_[np.zeros(n), 0.5 * dt * force]
        + np.r_[np.zeros(n), 0.5 * dt * force]
    )
    s = np.r_[gen.standard_normal(n), gen.standard_normal(n)]
    expected = s.copy()
    for _ in range(steps):
        expected = step @ expected + const
    from test_kernel_reference import ideal_adc

    out = kernel_run_lc(
        a,
        force,
        inv_mass,
        rate,
        np.zeros(n),
        s[:n],
        s[n:],
        dt,
        steps,
        1,
        1,
        0.0,
        ideal_adc(n),
        np.random.default_rng(0),
        np.zeros(n),
    )
    np.testing.assert_allclose(out.state, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.state[:n], np.linalg.solve(a, force), atol=1e-8)  # 200 tau at decay rates >= 0.25


def test_run_lc_runaway_returns_early():
    """A negative-definite a without rails runs away; the kernel stops at the reference's step."""
    from test_kernel_reference import ideal_adc

    n = 3
    a = -2.0 * np.eye(n)
    args = (
        a,
        np.zeros(n),
        np.ones(n),
        np.ones(n),
        np.full(n, 0.1),
        np.full(n, 0.1),
        np.zeros(n),
        0.5,
        5000,
        5,
        1,
        0.0,
        ideal_adc(n),
    )
    kernel = kernel_run_lc(*args, np.random.default_rng(1), np.zeros(n))
    ref = reference_run_lc(*args, np.random.default_rng(1), np.zeros(n))
    assert kernel.runaway and ref.runaway and kernel.steps == ref.steps < 5000
    np.testing.assert_allclose(kernel.state, ref.state, rtol=1e-10)


# --------------------------------------------------------------------------- stationary law, both kinds
A4 = spd([0.3, 0.55, 0.8, 1.2], seed=11)
B4 = np.array([0.3, -0.2, 0.1, 0.25])
KAPPA = 0.02


@pytest.mark.parametrize("kind", ["rc", "oscillator"])
def test_stationary_mean_and_covariance(kind, tmp_path):
    """Over a long window, read_mean ~ A^-1 b and read_cov ~ kappa0 A^-1 within Z standard deviations of
    the estimators (window_variances), entry by entry, for both cell kinds.

    Both steps keep the stationary covariance of a symmetric array exact: RC by the Leimkuhler-Matthews noise
    term (equal noise per cell, as here; plain Euler-Maruyama would add lam dt / 2), oscillator (BAOAB) for x.
    """
    step_factor = 0.005
    dev = open_spec(ideal_spec(kind, kappa0=KAPPA, step_factor=step_factor), tmp_path, seed=3)
    dev.load_matrix(A4, scale=1.0)
    dev.load_vector(B4, scale=1.0)
    burn_in, window = 100.0, 100000.0
    report = dev.run(burn_in + window, burn_in, record_cov=True)
    assert report.engine == "transient"  # a recording run steps
    mean, cov = dev.read_mean(), dev.read_cov()
    var_mean, var_cov = window_variances(kind, A4, KAPPA, 1.0 / 2.0, report.samples)
    target_mean, target_cov = np.linalg.solve(A4, B4), KAPPA * np.linalg.inv(A4)
    assert np.all(np.abs(mean - target_mean) <= Z * np.sqrt(var_mean)), (mean - target_mean) / np.sqrt(var_mean)
    z_cov = np.abs(cov - target_cov) / np.sqrt(var_cov)
    assert np.all(z_cov <= Z), z_cov
    # the check has teeth: its tolerance is under 5 % of every variance, so a 5 % error would show
    assert np.all(Z * np.sqrt(np.diag(var_cov)) < 0.05 * np.diag(target_cov))


def test_mass_and_damping_mismatch_do_not_move_the_target(tmp_path):
    """With 20 % mismatch of the inductors and damping resistors (a still symmetric), x is still
    N(A^-1 b, kappa0 A^-1): the masses and dampings set the speed, not the law."""
    mapping = ideal_spec("oscillator", kappa0=KAPPA, inductance_mismatch=0.2, damping_mismatch=0.2)
    dev = open_spec(mapping, tmp_path, seed=9)
    parts = dev.transport.firmware.oscillator_parts
    assert np.std(parts.inductance[:4]) > 0.05 and np.std(parts.damping[:4]) > 0.05  # the mismatch is real
    dev.load_matrix(A4, scale=1.0)
    dev.load_vector(B4, scale=1.0)
    report = dev.run(20100.0, 100.0, record_cov=True)
    # tolerance from the nominal array: the variances move by the mismatch (20 %), so the margin is kept at Z
    var_mean, var_cov = window_variances("oscillator", A4, KAPPA, 0.5, report.samples)
    assert np.all(np.abs(dev.read_mean() - np.linalg.solve(A4, B4)) <= Z * 1.3 * np.sqrt(var_mean))
    assert np.all(np.abs(dev.read_cov() - KAPPA * np.linalg.inv(A4)) <= Z * 1.3 * np.sqrt(var_cov))


def test_exact_engine_on_the_phase_state(tmp_path):
    """The exact engine propagates (x, p) in distribution: "auto" takes it for an oscillator array near
    equilibrium, and its window mean is A^-1 b within the estimator's Z standard deviations, over a window
    so long (1e6 tau) that the transient engine could not afford it."""
    dev = open_spec(ideal_spec("oscillator", kappa0=KAPPA), tmp_path, seed=4)
    dev.load_matrix(A4, scale=1.0)
    dev.load_vector(B4, scale=1.0)
    dev.run(200.0, engine="exact")  # settle from rest
    report = dev.run(1.0e6, 0.0)
    assert report.engine == "exact" and report.steps == 0
    var_mean, _ = window_variances("oscillator", A4, KAPPA, 0.5, report.samples)
    error = dev.read_mean() - np.linalg.solve(A4, B4)
    assert np.all(np.abs(error) <= Z * np.sqrt(var_mean)), error / np.sqrt(var_mean)
    # read_state after the exact run: one draw of N(A^-1 b, kappa A^-1)
    state = dev.read_state()
    z = np.linalg.solve(np.linalg.cholesky(KAPPA * np.linalg.inv(A4)), state - np.linalg.solve(A4, B4))
    assert np.all(np.abs(z) < Z)


def test_exact_and_transient_agree_on_the_oscillator_mean_path(tmp_path):
    """Noise off: from rest, both engines give the damped oscillation of the mean x(t) (the transient one to
    the BAOAB error O((omega dt)^2) = 4e-4 relative, step_factor 0.02), which overshoots A^-1 b."""
    mapping = ideal_spec("oscillator", kappa0=0.0, damping=0.4, step_factor=0.02)
    paths = {}
    for engine in ("exact", "transient"):
        dev = open_spec(mapping, tmp_path, seed=0)
        dev.load_matrix(A4, scale=1.0)
        dev.load_vector(B4, scale=1.0)
        path = []
        for _ in range(30):
            dev.run(1.0, engine=engine)
            path.append(dev.read_state())
        paths[engine] = np.array(path)
    target = np.linalg.solve(A4, B4)
    scale = np.abs(target).max()
    assert np.abs(paths["exact"] - paths["transient"]).max() < 2e-3 * scale
    assert np.abs(paths["exact"] - target).max(axis=1).max() > 0.2 * scale  # it oscillates about the target


# --------------------------------------------------------------------------- speed: oscillator vs RC
def time_to_tolerance(dev: driver.Device, target: np.ndarray, tolerance: float, step: float, horizon: float) -> float:
    """First time on a grid of ``step`` after which ||x(t) - x*|| / ||x*|| stays <= tolerance (to ``horizon``)."""
    errors = []
    for _ in range(int(horizon / step)):
        dev.run(step, engine="exact")
        errors.append(np.linalg.norm(dev.read_state() - target) / np.linalg.norm(target))
    errors = np.array(errors)
    above = np.nonzero(errors > tolerance)[0]
    assert above.size < errors.size, "never reached the tolerance within the horizon"
    return step * (above[-1] + 2 if above.size else 1)


def test_critically_damped_oscillator_beats_rc_on_an_ill_conditioned_matrix(tmp_path):
    """cond(A) = 100, noise off, ideal parts: relaxing from rest to 1 % error takes the RC array about
    ln(100) / lambda_min = 460 tau (lambda_min = 0.01); the oscillator with its damping critical for the
    slowest mode (gamma = 2 sqrt(lambda_min m) = 0.2) about 66 tau ((1 + w t) e^{-w t} = 0.01 at w t = 6.6,
    w = 0.1), the fast modes underdamped and decaying as e^{-gamma t / 2} as fast.  Asserted with a margin of 3x
    on the predicted 7x (Aifer et al., arXiv 2308.05660)."""
    eigenvalues = np.geomspace(0.01, 1.0, 6)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((6, 6)))
    a = (q * eigenvalues) @ q.T
    assert np.abs(a).max() <= 1.0  # within g_max: loaded at scale 1, so the array's matrix is a itself
    b = np.random.default_rng(3).uniform(-1.0, 1.0, 6)
    target = np.linalg.solve(a, b * 0.1)
    times = {}
    for kind, damping in (("rc", 2.0), ("oscillator", 2.0 * np.sqrt(eigenvalues[0]))):
        dev = open_spec(ideal_spec(kind, cells=6, kappa0=0.0, damping=float(damping)), tmp_path)
        dev.load_matrix(a, scale=1.0)
        dev.load_vector(b * 0.1, scale=1.0)
        times[kind] = time_to_tolerance(dev, target, 0.01, step=2.0, horizon=1200.0)
    assert 300.0 < times["rc"] < 700.0, times  # the prediction, 460 tau, within the grid's reach
    assert times["oscillator"] < times["rc"] / 3.0, times


# --------------------------------------------------------------------------- firmware details
def test_oscillator_preset_and_parts():
    """spu-8-lc loads as an oscillator board; its inductors and damping resistors are drawn from their own
    streams (the same device for the same seed, other parts unchanged by them)."""
    spec = load_spec("spu-8-lc")
    assert spec.cells.kind == "oscillator" and spec.cells.count == 8
    one, two = Firmware(spec, seed=5), Firmware(spec, seed=5)
    np.testing.assert_array_equal(one.oscillator_parts.inductance, two.oscillator_parts.inductance)
    assert np.std(one.oscillator_parts.inductance) > 0.0 and np.std(one.oscillator_parts.damping) > 0.0
    rc = Firmware(dataclasses.replace(spec, cells=dataclasses.replace(spec.cells, kind="rc")), seed=5)
    np.testing.assert_array_equal(rc.parts.capacitance, one.parts.capacitance)  # no stream renumbered
    np.testing.assert_array_equal(rc.parts.adc_offset_v, one.parts.adc_offset_v)
    assert rc.oscillator_parts is None


def test_set_noise_and_recording_refusals_change_nothing():
    """Refused SET_NOISE and RUN requests leave the device as it was (state, noise stream, recordings)."""
    fw = Firmware(spec_from_mapping(ideal_spec("oscillator")), seed=1)
    fw.handle(Opcode.LOAD_MATRIX, {"codes": A4.copy()})
    fw.handle(Opcode.LOAD_VECTOR, {"codes": B4.copy()})
    assert fw.handle(Opcode.RUN, {"t": 50.0, "record_cov": 1, "record_samples": 3})[0] == Status.OK
    before = (fw.analog_state(), fw.rng.bit_generator.state, fw.handle(Opcode.READ_COV)[1]["cov_codes"])
    for opcode, payload in [
        (Opcode.SET_NOISE, {"kappa0": 11.0}),  # above kappa0_max = 10
        (Opcode.SET_NOISE, {"kappa0": -1.0}),
        (Opcode.RUN, {"t": 10.0, "record_samples": 100, "sample_stride": 1}),  # 20 conversions in the window
        (Opcode.RUN, {"t": 10.0, "record_cov": 1, "engine": 2}),  # exact cannot record
        (Opcode.RUN, {"t": 10.0, "record_cov": 2}),
        (Opcode.RUN, {"t": 10.0, "sample_stride": 0, "record_samples": 1}),
        (Opcode.READ_SAMPLES, {"k": 0}),
    ]:
        status, reply = fw.handle(opcode, payload)
        assert status == Status.BAD_ARGUMENT, (opcode, payload, reply)
    assert fw.handle(Opcode.READ_SAMPLES, {"k": 4})[0] == Status.BAD_STATE  # 3 recorded
    after = (fw.analog_state(), fw.rng.bit_generator.state, fw.handle(Opcode.READ_COV)[1]["cov_codes"])
    np.testing.assert_array_equal(before[0], after[0])
    assert before[1] == after[1]
    np.testing.assert_array_equal(before[2], after[2])
    fixed = Firmware(spec_from_mapping({**ideal_spec("rc"), "noise": {"kappa0": 0.01}}), seed=1)
    status, reply = fixed.handle(Opcode.SET_NOISE, {"kappa0": 0.001})
    assert status == Status.BAD_ARGUMENT and "fixed" in reply["message"]
