"""Error mitigation by randomised rounding (driver.mitigation through linalg.solve / inv with mitigate=k).

References are numpy's float64 answers and the binomial moments of a rounding; tolerances are stated
beside each assertion.
"""

from __future__ import annotations

import numpy as np
import pytest

import driver
from driver import linalg
from driver.calibration import CORRECTED_EFFECTS
from driver.mitigation import MitigationReport, randomised_codes

# spu-8 without mismatch and converter errors: 8-bit elements, 12-bit converters, its noise
QUANTISED = CORRECTED_EFFECTS


def random_spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.geomspace(1.0, 1.0 / cond, n)) @ Q.T
    return 0.5 * (A + A.T)


def relative(x: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("rounding", ["stratified", "independent"])
def test_every_draw_is_an_unbiased_rounding(rounding):
    """P(round up) = frac(x) in every draw: over N = 4000 repetitions the frequency is within
    5 sqrt(f (1 - f) / N) (<= 0.04) of f, for each of the k draws."""
    rng = np.random.default_rng(0)
    target = np.array([-3.25, 0.5, 7.9, 12.0, -0.1, 100.75])
    k, repeats = 4, 4000
    ups = np.zeros((k, target.size))
    for _ in range(repeats):
        draws = randomised_codes(target, k, rng, rounding)
        assert np.all(np.abs(draws - target) < 1.0) and np.all(draws == np.round(draws))
        ups += draws > np.floor(target)
    frac = target - np.floor(target)
    tol = 5 * np.sqrt(frac * (1 - frac) / repeats) + 1e-12
    np.testing.assert_array_less(np.abs(ups / repeats - frac), np.broadcast_to(tol, ups.shape))


def test_stratified_mean_is_within_one_over_k_of_the_target():
    rng = np.random.default_rng(1)
    target = rng.uniform(-127, 127, (8, 8))
    for k in (1, 2, 8, 16):
        mean = randomised_codes(target, k, rng, "stratified").mean(axis=0)
        assert np.abs(mean - target).max() < 1.0 / k + 1e-12


def test_symmetric_draws_are_symmetric():
    rng = np.random.default_rng(2)
    target = rng.uniform(-127, 127, (6, 6))
    target = 0.5 * (target + target.T)
    for rounding in ("stratified", "independent"):
        draws = randomised_codes(target, 5, rng, rounding, symmetric=True)
        np.testing.assert_array_equal(draws, np.transpose(draws, (0, 2, 1)))


def test_mitigation_reduces_the_error_at_equal_analog_time():
    """Over 6 fixed systems (cond 10): the stratified mean of 8 roundings at t = 200 each against one
    nearest rounding at t = 1600, both means of the same total window.  Measured 3-5x; asserted 2x."""
    rng = np.random.default_rng(3)
    single, mitigated = [], []
    for seed in range(6):
        A, b = random_spd(rng, 8, 10.0), rng.standard_normal(8)
        exact = np.linalg.solve(A, b)
        with driver.open("spu-8", seed=seed, overrides=QUANTISED) as dev:
            single.append(relative(linalg.solve(dev, A, b, 1600.0), exact))
            x, report = linalg.solve(dev, A, b, 200.0, mitigate=8, return_report=True)
            mitigated.append(relative(x, exact))
        assert isinstance(report, MitigationReport) and report.draws == 8 and report.runs >= 8
        assert report.analog_time == pytest.approx(8 * 200.0, rel=0.01)
    assert np.mean(mitigated) < np.mean(single) / 2


def test_independent_rounding_helps_less_than_stratified():
    """Independent draws leave the mean rounding's sd at 1 / sqrt(6 k) codes, stratified at ~1 / (k sqrt 12):
    at k = 8 stratified must win on average over 4 systems."""
    rng = np.random.default_rng(4)
    errors = {"stratified": [], "independent": []}
    for seed in range(4):
        A, b = random_spd(rng, 8, 10.0), rng.standard_normal(8)
        exact = np.linalg.solve(A, b)
        for rounding in errors:
            with driver.open("spu-8", seed=seed, overrides=QUANTISED) as dev:
                errors[rounding].append(relative(linalg.solve(dev, A, b, 200.0, mitigate=8, rounding=rounding), exact))
    assert np.mean(errors["stratified"]) < np.mean(errors["independent"])


def test_mitigated_inverse_and_reproducibility():
    rng = np.random.default_rng(5)
    A = random_spd(rng, 6, 5.0)
    results = []
    for _ in range(2):
        with driver.open("spu-8", seed=1, overrides=QUANTISED) as dev:
            X, reports = linalg.inv(dev, A, 100.0, mitigate=4, return_report=True)
            results.append(X)
    np.testing.assert_array_equal(results[0], results[1])  # same spec, seed and calls: same bits
    assert len(reports) == 6 and all(r.draws == 4 for r in reports)
    assert relative(results[0], np.linalg.inv(A)) < 0.05
    with driver.open("spu-8", seed=2, overrides=QUANTISED) as dev:
        other = linalg.inv(dev, A, 100.0, mitigate=4)
    assert not np.array_equal(other, results[0])


def test_mitigation_on_a_calibrated_device():
    """Calibration trims the targets, mitigation randomises their rounding: together below either's error."""
    rng = np.random.default_rng(6)
    A, b = random_spd(rng, 8, 10.0), rng.standard_normal(8)
    exact = np.linalg.solve(A, b)
    with driver.open("spu-8", seed=4) as dev:
        dev.calibrate()
        calibrated = relative(linalg.solve(dev, A, b, 1600.0), exact)
        both = relative(linalg.solve(dev, A, b, 200.0, mitigate=8), exact)
    assert both < calibrated


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mitigate": 0},
        {"mitigate": -2},
        {"mitigate": 2.5},
        {"mitigate": True},
        {"mitigate": "8"},
        {"mitigate": 10**6},
        {"mitigate": 4, "rounding": "nearest"},
        {"mitigate": 4, "refine": True},
    ],
)
@pytest.mark.parametrize("call", ["solve", "inv"])
def test_bad_mitigation_arguments_refused_before_any_device_call(kwargs, call):
    A = random_spd(np.random.default_rng(7), 4, 3.0)
    with driver.open("spu-8", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError):
            if call == "solve":
                linalg.solve(dev, A, np.ones(4), **kwargs)
            else:
                linalg.inv(dev, A, **kwargs)
        assert dev.timeline.calls == 0 and not dev.status().matrix_loaded


def test_continuous_elements_have_nothing_to_mitigate():
    with driver.open("ideal", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError, match="continuous"):
            linalg.solve(dev, np.eye(3), np.ones(3), mitigate=4)
