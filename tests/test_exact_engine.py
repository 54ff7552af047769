"""The exact engine against the transient integrator and against independent references.

The exact engine (``spu_emulator.exact``) claims to draw a run's sample average
and final state exactly in distribution, for any stable drift, normal or not.
Three kinds of check, none against the engine's own formulas:

- exact vs transient: the same runs on both engines (``run(..., engine=...)``)
  over many seeds; the two-sample differences of the means and covariances of
  ``read_mean`` and ``read_state`` must lie within Z standard errors, plus the
  the step bias of the transient engine (see below);
- exact vs references computed here with ``scipy.linalg.expm`` and
  ``scipy.linalg.solve_continuous_lyapunov`` (cross-checked by Van Loan's block
  exponential): the not yet stationary mean and covariance of the state from
  the power-on state V = 0, for the non-normal drift [[3, 2.5], [2, 4]], where
  the symmetric-part shortcut is shown to be wrong by more than the tolerance;
- the engine choice of ``auto``, the cost that does not grow with t, and bit
  reproducibility.

Statistics.  Every statistical assertion uses Z = 4 standard errors of the
estimator, written next to it (two-sided 6e-5 per assertion; seeds are fixed, so
a run that passes keeps passing).  For S independent draws of a Gaussian vector
with covariance C: the sample mean has standard error sqrt(C_ii / S); a sample
covariance entry has variance (C_ij^2 + C_ii C_jj) / S.

Step bias.  The transient engine steps with dt = RunReport.dt (Euler-Maruyama with
the Leimkuhler-Matthews noise term, spu_emulator._kernels): its stationary
covariance is exact for a symmetric drift with equal noise per cell, and otherwise,
like its lagged covariances (which decay as (1 - lam dt)^m, not e^{-lam Delta}),
off by at most about lam dt / 2 relative, which dt <= step_factor / ||M||_2 keeps at
or below step_factor / 2 = 1 %.  Its means are unbiased (the fixed point of the
step is V*).  Exact-vs-transient covariance checks therefore allow
lam_max dt / 2 * sqrt(C_ii C_jj) on top of the statistical tolerance, with lam_max
from the programmed drift.

Replicas.  To get many independent draws per (costly) ``driver.open``, a small
matrix is loaded as R copies on the block diagonal: with diagonal noise the
blocks are independent copies of the small system, so one device yields R draws
(``test_replicas_are_independent`` checks that the engine keeps them
independent).  Devices of fewer than 24 cells keep the transient kernel on its
plain loop (no BLAS threads), and 50 cells keep the exact engine's matrices small.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import driver
from spu_emulator import exact, lowrank
from spu_emulator.spec import SPEC_DIR, read_yaml

Z = 4.0  # standard errors allowed in every statistical assertion


# --------------------------------------------------------------------------- helpers
def write_spec(directory: Path, name: str, changes: dict[str, object]) -> Path:
    """firmware_spec/ideal.yaml with ``{"section.field": value}`` changes, written to directory/name.yaml."""
    spec = read_yaml((SPEC_DIR / "ideal.yaml").read_text())
    spec["name"] = name
    for key, value in changes.items():
        section, field = key.split(".")
        spec[section][field] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def replicate(small: np.ndarray, copies: int) -> np.ndarray:
    """``copies`` copies of a matrix on the block diagonal, or of a vector end to end."""
    if small.ndim == 1:
        return np.tile(small, copies)
    return scipy.linalg.block_diag(*[small] * copies)


def linear_form(dev: driver.Device) -> str:
    """Which form ("modal" or "general") the exact engine takes for the loaded array."""
    matrix = dev.transport.firmware.matrix
    return exact.prepare(matrix.drift, matrix.noise_sd).form


def sample_cov_tolerance(cov: np.ndarray, count: int) -> np.ndarray:
    """Z standard errors of each entry of a sample covariance of ``count`` draws with covariance ``cov``."""
    d = np.diag(cov)
    return Z * np.sqrt((cov**2 + np.outer(d, d)) / count)


# --------------------------------------------------------------------------- references
def stationary_cov(drift: np.ndarray, diffusion: np.ndarray) -> np.ndarray:
    """Sigma solving M Sigma + Sigma M^T = D (scipy's Bartels-Stewart solver)."""
    return scipy.linalg.solve_continuous_lyapunov(drift, diffusion)


def state_moments(drift, diffusion, target, t):
    """Mean and covariance at time t of dV = -M (V - V*) dt + sqrt(D) dW from V(0) = 0.

    mean = (I - e^{-M t}) V*, cov = Sigma - e^{-M t} Sigma e^{-M^T t}.
    """
    phi = scipy.linalg.expm(-drift * t)
    sigma = stationary_cov(drift, diffusion)
    return target - phi @ target, sigma - phi @ sigma @ phi.T


def van_loan_cov(drift, diffusion, t):
    """int_0^t e^{-M s} D e^{-M^T s} ds from one block exponential (Van Loan 1978), no Lyapunov solve."""
    n = drift.shape[0]
    block = np.block([[drift, diffusion], [np.zeros((n, n)), -drift.T]]) * t
    e = scipy.linalg.expm(block)
    return e[n:, n:].T @ e[:n, n:]


def window_moments(drift, diffusion, target, times, end):
    """Joint mean (2n,) and covariance (2n, 2n) of the sample average (1/K) sum_k V(s_k) and the state V(end),
    for sample times s_1 < ... < s_K <= end, from V(0) = 0.

    Cov(V(s), V(r)) = e^{-M (s - r)} Cov(V(r)) for s >= r, summed over all pairs.
    """
    moments = [state_moments(drift, diffusion, target, s) for s in times]
    end_mean, end_cov = state_moments(drift, diffusion, target, end)
    average = np.zeros_like(drift)
    with_end = np.zeros_like(drift)  # Cov(V(end), average)
    for k, s in enumerate(times):
        for j, r in enumerate(times[: k + 1]):
            cross = scipy.linalg.expm(-drift * (s - r)) @ moments[j][1]
            average += cross if j == k else cross + cross.T
        with_end += scipy.linalg.expm(-drift * (end - s)) @ moments[k][1]
    count = len(times)
    average /= count**2
    with_end /= count
    mean = np.concatenate([np.mean([m for m, _ in moments], axis=0), end_mean])
    return mean, np.block([[average, with_end.T], [with_end, end_cov]])


# --------------------------------------------------------------------------- exact engine vs references
# dV = (b - M V) dt + sqrt(2 kappa0) dW with M = [[3, 2.5], [2, 4]] and kappa0 = 0.5 (D = I).  With
# g_max = 4 and max|A| = 4 the driver programs a = A / s_A = A (s_A = 1); with max|b| = 1 = dac.range_v,
# u = b (s_b = 1); so read_state gives V itself.
NON_NORMAL = np.array([[3.0, 2.5], [2.0, 4.0]])
PAIR_B = np.array([1.0, -0.5])
PAIR_D = np.eye(2)
PAIR_COPIES = 25  # 50 cells per device
PAIR_SEEDS = 800  # 800 * 25 = 20000 draws: a variance is known to Z sqrt(2 / 20000) = 4 %
SAMPLE_RATE = 4.0  # ADC period 0.25 tau
# successive runs (t, burn_in) from power-on: the state is read at the cumulative times 0.1, 0.3, 1, 3;
# runs 3 and 4 take ADC samples (after a burn-in in run 4), so head, window and tail are all exercised
SCHEDULE = [(0.1, 0.0), (0.2, 0.0), (0.7, 0.0), (2.0, 0.6)]


def sample_times(start: float, t: float, burn_in: float) -> np.ndarray:
    """Absolute times of the ADC samples of a run: the clock m / rate (from the run's start) in (burn_in, t]."""
    m0 = math.floor(burn_in * SAMPLE_RATE + 1e-9)
    m1 = math.floor(t * SAMPLE_RATE + 1e-9)
    return start + np.arange(m0 + 1, m1 + 1) / SAMPLE_RATE


@pytest.fixture(scope="module")
def non_normal_draws(tmp_path_factory):
    """Per run of SCHEDULE: the states (S, 2) read after it, and the read_means (S, 2) of runs with samples."""
    path = write_spec(
        tmp_path_factory.mktemp("spec"),
        "non-normal",
        {"cells.count": 2 * PAIR_COPIES, "coupling.g_max": 4.0, "noise.kappa0": 0.5, "adc.sample_rate": SAMPLE_RATE},
    )
    matrix = replicate(NON_NORMAL, PAIR_COPIES)
    vector = replicate(PAIR_B, PAIR_COPIES)
    states = [[] for _ in SCHEDULE]
    means = [[] for _ in SCHEDULE]
    for seed in range(PAIR_SEEDS):
        with driver.open(path, seed=seed) as dev:
            assert dev.load_matrix(matrix, symmetric=False).scale == 1.0
            assert dev.load_vector(vector).scale == 1.0
            if seed == 0:
                assert linear_form(dev) == "general"
            start = 0.0
            for k, (t, burn_in) in enumerate(SCHEDULE):
                report = dev.run(t, burn_in, engine="exact")
                assert report.engine == "exact"
                assert report.samples == len(sample_times(start, t, burn_in))
                states[k].append(dev.read_state().reshape(PAIR_COPIES, 2))
                if report.samples:
                    means[k].append(dev.read_mean().reshape(PAIR_COPIES, 2))
                start += t
    states = [np.concatenate(s) for s in states]
    means = [np.concatenate(m) if m else None for m in means]
    return states, means


def test_references_agree():
    """The Lyapunov-based reference covariance equals Van Loan's quadrature, so the reference is itself checked."""
    for t in (0.1, 1.0, 3.0):
        _, cov = state_moments(NON_NORMAL, PAIR_D, np.zeros(2), t)
        np.testing.assert_allclose(cov, van_loan_cov(NON_NORMAL, PAIR_D, t), rtol=1e-10, atol=1e-13)


def test_state_moments_match_reference(non_normal_draws):
    """Mean and covariance of read_state at t = 0.1, 0.3, 1, 3 from V = 0 match expm / Lyapunov references."""
    states, _ = non_normal_draws
    target = np.linalg.solve(NON_NORMAL, PAIR_B)
    t = 0.0
    for (run_t, _), draws in zip(SCHEDULE, states, strict=True):
        t += run_t
        mean, cov = state_moments(NON_NORMAL, PAIR_D, target, t)
        count = draws.shape[0]
        # the sample mean of S draws has standard error sqrt(C_ii / S)
        np.testing.assert_array_less(np.abs(draws.mean(axis=0) - mean), Z * np.sqrt(np.diag(cov) / count))
        # a sample covariance entry has variance (C_ij^2 + C_ii C_jj) / S
        np.testing.assert_array_less(np.abs(np.cov(draws.T) - cov), sample_cov_tolerance(cov, count))


def test_symmetric_part_shortcut_is_detectably_wrong(non_normal_draws):
    """Using (M + M^T) / 2 for the covariance misses the reference by more than the tolerance, the engine does not."""
    states, _ = non_normal_draws
    symmetric_part = 0.5 * (NON_NORMAL + NON_NORMAL.T)
    zero = np.zeros(2)
    t = 0.0
    for (run_t, _), draws in zip(SCHEDULE, states, strict=True):
        t += run_t
        if t < 1.0:
            continue  # early on the two differ by less than 2 %: no contrast to show
        _, cov = state_moments(NON_NORMAL, PAIR_D, zero, t)
        _, shortcut = state_moments(symmetric_part, PAIR_D, zero, t)
        tolerance = sample_cov_tolerance(cov, draws.shape[0])  # Z sqrt((C_ij^2 + C_ii C_jj) / S)
        assert np.any(np.abs(shortcut - cov) > tolerance), (t, shortcut, cov, tolerance)
        assert np.all(np.abs(np.cov(draws.T) - cov) < tolerance)
        # the largest miss is cell 1's variance, about 5 % at t = 1 and 6 % at t = 3
        assert abs(shortcut[1, 1] / cov[1, 1] - 1.0) > 0.045


def test_read_mean_matches_reference(non_normal_draws):
    """read_mean (the average of the ADC samples in the window) and read_state after the same run match the
    reference joint law: means, covariances and their cross-covariance."""
    states, means = non_normal_draws
    target = np.linalg.solve(NON_NORMAL, PAIR_B)
    start = 0.0
    checked = 0
    for (t, burn_in), average, state in zip(SCHEDULE, means, states, strict=True):
        times = sample_times(start, t, burn_in)
        start += t
        if average is None:
            continue
        mean, cov = window_moments(NON_NORMAL, PAIR_D, target, times, start)
        draws = np.hstack([average, state])
        count = draws.shape[0]
        np.testing.assert_array_less(np.abs(draws.mean(axis=0) - mean), Z * np.sqrt(np.diag(cov) / count))
        np.testing.assert_array_less(np.abs(np.cov(draws.T) - cov), sample_cov_tolerance(cov, count))
        checked += 1
    assert checked == 2


def test_replicas_are_independent(non_normal_draws):
    """Neighbouring blocks of one device are uncorrelated, as they must be with diagonal noise."""
    states, _ = non_normal_draws
    mean, cov = state_moments(NON_NORMAL, PAIR_D, np.linalg.solve(NON_NORMAL, PAIR_B), 3.0)
    blocks = (states[-1] - mean).reshape(PAIR_SEEDS, PAIR_COPIES, 2)
    # products of cell i of block k with cell j of block k + 1 have mean 0 and variance C_ii C_jj, and
    # are uncorrelated with each other, so their average over seeds and pairs has that variance / count
    products = np.einsum("skc,skd->cd", blocks[:, :-1], blocks[:, 1:]) / (PAIR_SEEDS * (PAIR_COPIES - 1))
    d = np.diag(cov)
    np.testing.assert_array_less(np.abs(products), Z * np.sqrt(np.outer(d, d) / (PAIR_SEEDS * (PAIR_COPIES - 1))))


# --------------------------------------------------------------------------- exact engine vs transient engine
SPD_3 = np.array([[4.0, 1.0, 0.5], [1.0, 3.0, -1.0], [0.5, -1.0, 2.0]])  # eigenvalues 1.06, 3.32, 4.62
# non-normal, complex eigenvalues 1.73 +- 0.59i and 5.54, symmetric part positive definite (contractive)
NON_NORMAL_3 = np.array([[3.0, 2.5, 0.0], [2.0, 4.0, 1.0], [0.0, -1.5, 2.0]])
TRIPLE_B = np.array([1.0, -0.5, 0.25])
TRIPLE_COPIES = 7  # 21 cells: below the transient kernel's BLAS threshold (24), so no BLAS threads
STATIONARY_T, STATIONARY_BURN_IN = 12.0, 6.0  # e^{-1.06 * 6} < 2e-3 of the start is left after burn-in

ENGINE_CASES = {
    # symmetric drift, equal noise per cell: the modal form
    "modal": (SPD_3, True, {}, "modal"),
    # a non-symmetric matrix: the general form
    "non-symmetric": (NON_NORMAL_3, False, {}, "general"),
    # mismatch: every seed is another device (the draws are over devices and noise alike, the same
    # mixture for both engines); unequal capacitances give unequal noise per cell: the general form
    "mismatch": (
        SPD_3,
        True,
        {"coupling.mismatch": 0.05, "cell.capacitance_mismatch": 0.05, "coupling.input_conductance_mismatch": 0.05},
        "general",
    ),
}


def engine_draws(path, matrix, symmetric, engine, seeds, form):
    """read_mean and read_state side by side (S, 6) over seeds, and the largest step bias lam_max * dt / 2 seen."""
    means, states, bias = [], [], 0.0
    for seed in seeds:
        with driver.open(path, seed=seed) as dev:
            dev.load_matrix(replicate(matrix, TRIPLE_COPIES), symmetric=symmetric)
            dev.load_vector(replicate(TRIPLE_B, TRIPLE_COPIES))
            if seed == seeds[0]:
                assert linear_form(dev) == form
            report = dev.run(STATIONARY_T, STATIONARY_BURN_IN, engine=engine)
            assert report.engine == engine
            means.append(dev.read_mean().reshape(TRIPLE_COPIES, 3))
            states.append(dev.read_state().reshape(TRIPLE_COPIES, 3))
            if engine == "transient":
                rate = np.abs(np.linalg.eigvals(dev.transport.firmware.matrix.drift)).max()
                bias = max(bias, 0.5 * rate * report.dt)
    return np.hstack([np.concatenate(means), np.concatenate(states)]), bias


def assert_same_distribution(exact_draws, transient_draws, bias):
    """Two-sample check of means and covariances; covariances may differ by the relative step bias too."""
    count = exact_draws.shape[0]
    assert transient_draws.shape[0] == count
    cov_e, cov_t = np.cov(exact_draws.T), np.cov(transient_draws.T)
    d_e, d_t = np.diag(cov_e), np.diag(cov_t)
    # difference of two independent sample means: standard error sqrt((C_e,ii + C_t,ii) / S)
    gap = np.abs(exact_draws.mean(axis=0) - transient_draws.mean(axis=0))
    np.testing.assert_array_less(gap, Z * np.sqrt((d_e + d_t) / count), err_msg="means")
    # difference of two sample covariances: variance (C_ij^2 + C_ii C_jj) / S from each sample; plus the
    # transient engine's step bias of at most about lam dt / 2 relative
    spread = np.sqrt((cov_e**2 + np.outer(d_e, d_e) + cov_t**2 + np.outer(d_t, d_t)) / count)
    scale = np.sqrt(np.outer(d_e + d_t, d_e + d_t)) / 2.0
    np.testing.assert_array_less(np.abs(cov_e - cov_t), Z * spread + bias * scale, err_msg="covariances")


@pytest.mark.parametrize(
    "seeds", [pytest.param(1400, id="1400-seeds"), pytest.param(7000, id="7000-seeds", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_exact_matches_transient(tmp_path, case, seeds):
    """(read_mean, read_state) has the same mean and covariance on both engines (stationary runs)."""
    matrix, symmetric, changes, form = ENGINE_CASES[case]
    path = write_spec(
        tmp_path,
        case,
        {
            "cells.count": 3 * TRIPLE_COPIES,
            "coupling.g_max": 4.0,
            "noise.kappa0": 0.5,
            "adc.sample_rate": SAMPLE_RATE,
            **changes,
        },
    )
    # disjoint seeds: the two samples are independent
    exact_draws, _ = engine_draws(path, matrix, symmetric, "exact", range(seeds), form)
    transient_draws, bias = engine_draws(path, matrix, symmetric, "transient", range(seeds, 2 * seeds), form)
    assert 0.0 < bias <= 0.011  # dt <= step_factor / ||M||_2 keeps lam_max dt / 2 at or below about 1 %
    assert_same_distribution(exact_draws, transient_draws, bias)


# --------------------------------------------------------------------------- the choice of "auto"
# a = A (g_max = 1, max|A| = 1) and u = dac.range_v * (1, 1), so V* = a^-1 u = 0.8 * dac.range_v per cell
AUTO_A = np.array([[1.0, 0.25], [0.25, 1.0]])
AUTO_B = np.array([1.0, 1.0])
RAILS = {"cells.count": 2, "rails.enabled": True, "rails.v_rail": 1.25}

AUTO_CASES = {
    # no rails and an ideal ADC: nothing nonlinear can act
    "ideal": ({"cells.count": 2, "noise.kappa0": 1e-4}, "exact"),
    # V* = 0.2 V, noise 0.01 V rms: the rails at 1.25 V are out of reach
    "rails far": ({**RAILS, "dac.range_v": 0.25, "noise.kappa0": 1e-4}, "exact"),
    # V* = 1.6 V is beyond the rails: they are hit
    "rails hit": ({**RAILS, "dac.range_v": 2.0, "noise.kappa0": 1e-4}, "transient"),
    # V* = 0.2 V but 0.23 V rms of noise: the rails are within a few standard deviations
    "rails within the noise": ({**RAILS, "dac.range_v": 0.25, "noise.kappa0": 0.05}, "transient"),
    # a 12-bit ADC (LSB 0.5 mV) dithered by about 10 mV of fresh noise per sample
    "dithered ADC": ({"cells.count": 2, "adc.bits": 12, "dac.range_v": 0.25, "noise.kappa0": 1e-4}, "exact"),
    # the same ADC with no noise at all (array and ADC): rounding is not dithered
    "undithered ADC": ({"cells.count": 2, "adc.bits": 12, "dac.range_v": 0.25}, "transient"),
    # V* = 0.8 V beyond the ADC's full scale of 0.5 V: conversions clip
    "ADC clips": ({"cells.count": 2, "adc.bits": 12, "adc.range_v": 0.5, "noise.kappa0": 1e-4}, "transient"),
}


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_chooses_engine(tmp_path, case):
    """auto takes the exact engine only when no rail, ADC clipping or undithered rounding can act."""
    changes, expected = AUTO_CASES[case]
    path = write_spec(tmp_path, "auto", changes)
    with driver.open(path, seed=1) as dev:
        dev.load_matrix(AUTO_A)
        dev.load_vector(AUTO_B)
        report = dev.run(20.0, 5.0, on_saturation="flag")
        assert report.engine == expected
        assert (report.steps > 0) == (expected == "transient")
        if case == "rails hit":
            assert report.saturated
        if case == "ADC clips":
            assert report.adc_clipped > 0
        if expected == "exact":  # and the answer is right (the noise on read_mean is about 2 % rms)
            np.testing.assert_allclose(dev.read_mean(), np.linalg.solve(AUTO_A, AUTO_B), rtol=0.1)


def test_auto_raises_when_rails_are_hit(tmp_path):
    """With on_saturation="raise", the transient run that auto picks near the rails raises and is discarded."""
    path = write_spec(tmp_path, "rails", AUTO_CASES["rails hit"][0])
    with driver.open(path, seed=1) as dev:
        dev.load_matrix(AUTO_A)
        dev.load_vector(AUTO_B)
        with pytest.raises(driver.SaturationError, match="rails") as caught:
            dev.run(20.0, 5.0)
        assert caught.value.report["engine"] == 1  # transient, in firmware_spec/protocol.yaml
        assert dev.status().runs == 0


def test_auto_takes_transient_for_a_non_contractive_drift():
    """Stable but M + M^T indefinite: the mean path may leave the ball the rail check assumes, so auto steps it."""
    matrix = np.array([[1.0, 4.0], [0.0, 1.0]])  # eigenvalues 1, 1; symmetric part has eigenvalues 3, -1
    with driver.open("ideal", seed=1) as dev:
        dev.load_matrix(matrix, symmetric=False)
        dev.load_vector(AUTO_B)
        assert dev.run(200.0, 100.0).engine == "transient"
        auto = dev.read_mean()
        assert dev.run(200.0, 100.0, engine="exact").engine == "exact"  # it is stable: exact may run it
        np.testing.assert_allclose(dev.read_mean(), np.linalg.solve(matrix, AUTO_B), rtol=1e-6)
        np.testing.assert_allclose(auto, np.linalg.solve(matrix, AUTO_B), rtol=1e-3)


UNSTABLE = np.array([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1: symmetric, not positive definite


@pytest.mark.parametrize("rails", [False, True], ids=["no-rails", "rails"])
def test_unstable_matrix_raises(tmp_path, rails):
    """auto runs an unstable array with rails on the transient engine, which hits a rail and raises; without
    rails the device refuses it before running; engine="exact" refuses it outright.  No run is kept."""
    changes = {"cells.count": 2, "rails.enabled": rails, "rails.v_rail": 1.25}
    path = write_spec(tmp_path, "unstable", changes)
    with driver.open(path, seed=1) as dev:
        dev.load_matrix(UNSTABLE)
        dev.load_vector(np.array([1.0, 0.0]))  # has a component along the growing mode (1, -1)
        with pytest.raises(driver.SaturationError) as caught:
            dev.run(100.0)
        report = caught.value.report
        if rails:  # auto stepped it on the transient engine until a node hit a rail
            assert report["engine"] == 1 and report["saturated"] == 1 and report["steps"] > 0
        else:  # with nothing to stop the growth the device refuses before running
            assert report["runaway"] == 1
        with pytest.raises(driver.SaturationError, match="not positive definite"):
            dev.run(2000.0, engine="exact")
        assert dev.status().runs == 0


# --------------------------------------------------------------------------- cost and reproducibility
@pytest.mark.parametrize(("matrix", "symmetric"), [(SPD_3, True), (NON_NORMAL_3, False)], ids=["modal", "general"])
def test_exact_run_length_is_free(matrix, symmetric):
    """t = 1e6 tau on "ideal" takes 1e6 samples in one exact run (tens of millions of Euler steps on the transient).

    No timing here (that is for benchmarks/): the run returning at all, with every sample counted and the
    deterministic answer right, is the check.  "ideal" has no noise, so read_mean is exactly the average of
    x(s) = (I - e^{-a s}) x over s = 1 .. K, with a = A / 4 and x = A^-1 b; the reference sums the
    transient term explicitly until it underflows.
    """
    t = 1e6
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(matrix, symmetric=symmetric)
        dev.load_vector(TRIPLE_B)
        report = dev.run(t, burn_in=0.0, engine="exact")
        assert report.engine == "exact"
        assert report.samples == round(t * dev.info.sample_rate) == 1_000_000
        assert report.steps == 0 and report.dt == 0.0 and report.analog_time == t
        x = np.linalg.solve(matrix, TRIPLE_B)
        phi = scipy.linalg.expm(-matrix / 4.0)
        transient, term = np.zeros(3), x.copy()
        for _ in range(1000):  # |e^{-a k}| < e^{-0.26 k}: gone well before k = 1000
            term = phi @ term
            transient += term
        np.testing.assert_allclose(dev.read_mean(), x - transient / report.samples, rtol=1e-9, atol=1e-12)
        assert dev.run(t).engine == "exact"  # and auto takes it


def reproducible_calls(preset: str, seed: int, matrix: np.ndarray) -> list[np.ndarray]:
    """Open, load, two exact runs with read-outs, reset, the same again; everything read back.

    b is loaded at u = b / 4 volts, so the equilibrium (about 0.35 V) is well inside the rails and ADC range.
    """
    out = []
    with driver.open(preset, seed=seed) as dev:
        for _ in range(2):
            dev.load_matrix(matrix)
            dev.load_vector(TRIPLE_B, scale=4.0)
            for t, burn_in in ((50.0, 10.0), (5.5, 0.0)):
                dev.run(t, burn_in, engine="exact")
                out += [dev.read_mean(), dev.read_state()]
            dev.reset()
    return out


@pytest.mark.parametrize(("preset", "form"), [("tngd-sim", "modal"), ("spu-8", "general")])
def test_exact_engine_is_reproducible(preset, form):
    """Same seed and calls give identical bits; reset replays the noise stream; another seed differs."""
    with driver.open(preset, seed=3) as dev:
        dev.load_matrix(SPD_3)
        dev.load_vector(TRIPLE_B)
        assert linear_form(dev) == form
    first = reproducible_calls(preset, 3, SPD_3)
    again = reproducible_calls(preset, 3, SPD_3)
    other = reproducible_calls(preset, 4, SPD_3)
    assert [a.tobytes() for a in first] == [a.tobytes() for a in again]
    assert [a.tobytes() for a in first[:4]] == [a.tobytes() for a in first[4:]]  # after reset
    assert all(a.tobytes() != b.tobytes() for a, b in zip(first, other, strict=True))


def _fresh_models(form: str):
    """A model of each form, made afresh on every call (so its memo is empty)."""
    rng = np.random.default_rng(11)
    if form == "lowrank":
        j = rng.standard_normal((3, 6))
        h = np.diag([1.0, 0.5, 0.25])
        cells = np.ones(6)
        model, why = lowrank.prepare_ggn(j, h, 0.1 * cells, 2.0 * cells, 0.3 * cells)
        assert model is not None, why
        return model
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    drift = q @ np.diag([0.5, 1.0, 2.0, 3.0, 4.0]) @ q.T
    if form == "modal":
        return exact.prepare(0.5 * (drift + drift.T), np.full(5, 0.3))
    return exact.prepare(drift + 0.2 * np.triu(rng.standard_normal((5, 5)), 1), np.linspace(0.2, 0.4, 5))


@pytest.mark.parametrize("form", ["modal", "general", "lowrank"])
def test_memoised_runs_give_the_bits_of_fresh_ones(form):
    """Runs that reuse a model's memoised coefficients (the same length again, and so many lengths that the
    memo is cleared on the way) draw exactly what a model made afresh for each run draws, from one stream."""
    kept = _fresh_models(form)
    assert kept.form == form
    lengths = [(10.0, 0.0), (10.0, 0.0), (3.3, 1.1), (10.0, 0.0)] + [(1.0 + 0.1 * k, 0.5) for k in range(70)]
    lengths += [(10.0, 0.0), (3.3, 1.1)]
    n = kept.n if form == "lowrank" else kept.drift.shape[0]
    state = np.linspace(-1.0, 1.0, n)
    force = np.ones(n)
    memo_rng, fresh_rng = np.random.default_rng(5), np.random.default_rng(5)
    for t, burn_in in lengths:
        fresh = _fresh_models(form)
        got = exact.propagate(kept, state, kept.fixed_point(force), t, burn_in, 0.25, memo_rng)
        want = exact.propagate(fresh, state, fresh.fixed_point(force), t, burn_in, 0.25, fresh_rng)
        assert got[2] == want[2]
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()
        state = got[1]
    assert len(kept._memo) <= exact._MEMO_ENTRIES


def reference_is_safe(firmware, t: float, burn_in: float) -> bool:
    """auto's test for the exact engine written out directly (DESIGN 4.5): contractive (or an oscillator's
    level set); reach + z sd inside the rails over the whole run; |gain| (reach + z spread) + |offset|
    inside the ADC's full scale from the window's first conversion on; fresh noise of at least half an
    LSB per sample.  The reach is the tightest bound the model offers (its path bounds are tested below)."""
    model = firmware._linear_model()
    if model is None or not (model.stable and (model.contractive or firmware._lc)):
        return False
    n = firmware.matrix.n
    spec, parts = firmware.spec, firmware.parts
    target = model.fixed_point(firmware._phase_force())
    period = 1.0 / spec.adc.sample_rate
    first = (math.floor(burn_in / period + 1e-9) + 1) * period  # the window's first conversion

    def reach(start):
        if firmware._lc:
            return firmware._oscillator.reach(firmware._phase_state(), target)
        return model.reach(firmware.analog_state()[:n], target, start, tight=True)

    if reach(0.0) is None:
        return False
    z = max(6.0, math.sqrt(2.0 * math.log(2.0 * n * (1.0 + t * model.rate_max) / 1e-9)))
    var = model.stationary_var_upper()[:n]
    if spec.rails.enabled and np.any(reach(0.0) + z * np.sqrt(var) >= spec.rails.v_rail):
        return False
    if spec.adc.bits > 0:
        lsb = spec.adc.range_v / (2 ** (spec.adc.bits - 1) - 1)
        fresh = model.fresh_var_lower(period)[:n] + spec.adc.noise_v**2
        if np.any(np.sqrt(fresh) < 0.5 * lsb):
            return False
        spread = np.sqrt(var + spec.adc.noise_v**2)
        seen = np.abs(parts.adc_gain[:n]) * (reach(first) + z * spread) + np.abs(parts.adc_offset_v[:n])
        if first <= t + 1e-9 and np.any(seen >= spec.adc.range_v):
            return False
    return True


@pytest.mark.parametrize("preset", ["spu-8", "spu-8-lc"])
def test_auto_choice_matches_its_definition(preset):
    """The firmware keeps auto's per-cell limits for the life of a model; its choice equals the direct test
    over inputs from well inside to beyond the limits, several run lengths, a new matrix and new noise."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    decisions = {}
    with driver.open(preset, seed=4) as dev:
        firmware = dev.transport.firmware
        # the second matrix is softer (a larger V* per volt in), the third load has 10 times the noise
        for trial, (weakest, kappa0) in enumerate([(1.0, None), (0.7, None), (0.7, 10.0 * dev.info.kappa0)]):
            dev.load_matrix(q @ np.diag(np.linspace(weakest, 2.0, 6)) @ q.T)
            if kappa0 is not None:
                dev.set_noise(kappa0)
            for fraction in np.linspace(0.05, 1.0, 20):
                dev.load_vector(q[:, 0], scale=1.0 / (fraction * dev.info.dac_range_v))
                dev.run(40.0, engine="transient", on_saturation="flag")  # settle near V*: the reach is about |V*|
                for t, burn_in in ((1.0, 0.0), (1e4, 0.0), (1e4, 50.0)):
                    decision = firmware._linear_is_safe(t, burn_in)
                    assert decision == reference_is_safe(firmware, t, burn_in), (trial, fraction, t, burn_in)
                    decisions.setdefault(trial, []).append(decision)
    # each load has inputs on both sides of its limit, and the limits differ from load to load
    assert all(any(d) and not all(d) for d in decisions.values()), decisions
    assert len({sum(d) for d in decisions.values()}) == 3, decisions


# --------------------------------------------------------------------------- bounds of the mean path
def _true_path_max(
    drift: np.ndarray, d: np.ndarray, target: np.ndarray, start: float, stop: float = math.inf
) -> np.ndarray:
    """max over start <= s <= stop of |V*_i + (e^{-M s} d)_i|, from e^{-M s} (scipy's expm) on a fine grid of s."""
    slowest = float(np.min(np.linalg.eigvals(drift).real))
    times = start + np.concatenate(([0.0], np.geomspace(1e-3, min(60.0 / slowest, stop - start), 400)))
    path = [scipy.linalg.expm(-drift * times[0]) @ d]
    for gap in np.diff(times):
        path.append(scipy.linalg.expm(-drift * gap) @ path[-1])
    return np.abs(target[:, None] + np.array(path).T).max(axis=1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 6),
    form=st.sampled_from(["modal", "general", "lowrank"]),
    start=st.sampled_from([0.0, 0.3, 2.0]),
    span=st.sampled_from([math.inf, 0.5, 3.0]),
)
def test_path_bounds_hold(seed, n, form, start, span):
    """Every reach bound (the O(n) one and the cell-by-cell one) is at least the largest |V_i(s)|,
    start <= s <= stop = start + span (the end of a run), of the mean path from a random state to a random
    target, for each form of the exact engine."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    drift = q @ np.diag(np.geomspace(0.3, rng.uniform(1.0, 30.0), n)) @ q.T
    drift = 0.5 * (drift + drift.T)
    if form == "general":  # non-normal, still contractive (its symmetric part is drift's)
        skew = rng.standard_normal((n, n))
        drift = drift + 0.5 * (skew - skew.T)
        model = exact.prepare(drift, np.linspace(0.1, 0.2, n))
    elif form == "modal":
        model = exact.prepare(drift, np.full(n, 0.1))
    else:
        j = rng.standard_normal((max(1, n - 1), n))
        h = np.eye(j.shape[0])
        cells = np.ones(n)
        model, why = lowrank.prepare_ggn(j, h, 0.3 * cells, cells, 0.1 * cells)
        assert model is not None, why
        drift = 0.3 * np.eye(n) + j.T @ h @ j
    assert model.form == form and model.contractive
    state, target = rng.standard_normal(n), rng.standard_normal(n)
    truth = _true_path_max(drift, state - target, target, start, start + span)
    for tight in (False, True):
        bound = model.reach(state, target, start, tight=tight, stop=start + span)
        assert np.all(bound >= truth * (1.0 - 1e-9) - 1e-12), (tight, bound - truth)


def test_tight_path_bound_follows_each_cell():
    """From rest on a dense 256-cell array, the l2 bound exceeds the largest |V*_i| several times over (it
    grows as sqrt(n)); the cell-by-cell bound stays within 10 % of the path's true maximum."""
    rng = np.random.default_rng(3)
    n = 256
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    drift = q @ np.diag(np.geomspace(0.2, 2.0, n)) @ q.T
    model = exact.prepare(0.5 * (drift + drift.T), np.full(n, 0.01))
    target = rng.standard_normal(n)
    state = np.zeros(n)
    rates, modes = model.rates, model.modes
    times = np.concatenate(([0.0], np.geomspace(1e-3, 300.0, 3000)))
    path = target[:, None] + modes @ ((modes.T @ (state - target))[:, None] * np.exp(-np.outer(rates, times)))
    truth = np.abs(path).max()
    loose = model.reach(state, target).max()
    tight = model.reach(state, target, tight=True).max()
    assert loose > 5.0 * truth
    assert truth <= tight <= 1.1 * truth


def test_tight_low_rank_bound_follows_each_cell():
    """A GGN array (400 cells, m = 40): from a state off the target along range(J^T) the l2 bound of the
    modes' part grows as sqrt(N); the cell-by-cell one, which follows each cell's path, does not.  Measured:
    the true maximum 1.21 V, the l2 bound 8.1 V, the cell-by-cell 1.23 V."""
    rng = np.random.default_rng(4)
    n, m = 400, 40
    j = rng.standard_normal((m, n)) / np.sqrt(n)
    cells = np.ones(n)
    model, why = lowrank.prepare_ggn(j, np.eye(m), 0.2 * cells, cells, 0.01 * cells)
    assert model is not None, why
    rates, vectors = np.linalg.eigh(0.2 * np.eye(n) + j.T @ j)
    target = 0.1 * rng.standard_normal(n)
    state = target + j.T @ rng.standard_normal(m)
    times = np.concatenate(([0.0], np.geomspace(1e-3, 300.0, 2000)))
    path = target[:, None] + vectors @ ((vectors.T @ (state - target))[:, None] * np.exp(-np.outer(rates, times)))
    truth = np.abs(path).max(axis=1)
    loose, tight = model.reach(state, target), model.reach(state, target, tight=True)
    assert np.all(tight >= truth * (1.0 - 1e-9)) and np.all(tight <= loose * (1.0 + 1e-12))
    assert loose.max() > 5.0 * truth.max() and tight.max() < 1.1 * truth.max()
    # a run of 0.05 tau from rest covers about 0.05 x the fastest rate (1.9 / tau) of the way to a far target
    far = 10.0 * target
    assert model.reach(np.zeros(n), far, tight=True, stop=0.05).max() < 0.2 * np.abs(far).max()


def test_solve_on_a_large_array_runs_exact_after_ranging():
    """linalg.solve on tngd-sim (256 cells): the full-scale run clips the ADC and steps, as it must; the runs
    after the input is turned down start near the old equilibrium, which the l2 bound cannot clear and the
    cell-by-cell bound can, so auto takes the exact engine for them; the answer is right to 1e-3."""
    rng = np.random.default_rng(0)
    n = 256
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, 10.0, n)) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.standard_normal(n)
    with driver.open("tngd-sim", seed=0) as dev:
        x, report = driver.linalg.solve(dev, a, b, return_report=True)
        engines = [record.call for record in dev.timeline]
        runs = [r for r in dev.timeline if r.call == "run"]
    assert report.engine == "exact" and not report.adc_clipped and not report.saturated
    assert len(runs) >= 2 and engines.count("run") == len(runs)
    reference = np.linalg.solve(a, b)
    # 16-bit codes (3e-5 of full scale) times cond 10, and noise averaged over 100 samples: about 3e-4
    assert np.linalg.norm(x - reference) / np.linalg.norm(reference) < 1e-3
