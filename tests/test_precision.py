"""Iterative refinement (driver.precision through linalg.solve / inv with refine=True).

The exact answer comes from numpy in float64, never from the driver; the device's own error
(spu-8: 8-bit elements, 1 % mismatch, 1-6 % on a plain solve) sets the contraction rate.
"""

from __future__ import annotations

import numpy as np
import pytest

import driver
from driver import linalg
from driver.precision import RefinementError, RefinementReport


def random_spd(rng: np.random.Generator, n: int, eigenvalues: np.ndarray) -> np.ndarray:
    """Q diag(eigenvalues) Q^T with Q Haar-random orthogonal."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(eigenvalues) @ Q.T
    return 0.5 * (A + A.T)


@pytest.mark.parametrize("seed", range(5))
def test_refinement_reaches_1e_10_on_spu8(seed):
    rng = np.random.default_rng(seed)
    A = random_spd(rng, 8, rng.uniform(1.0, 10.0, 8))
    b = rng.standard_normal(8)
    exact = np.linalg.solve(A, b)
    with driver.open("spu-8", seed=seed) as dev:
        plain = linalg.solve(dev, A, b)
        x, report = linalg.solve(dev, A, b, refine=True, refine_tol=1e-10, max_iter=30, return_report=True)
    plain_error = np.linalg.norm(plain - exact) / np.linalg.norm(exact)
    assert 1e-3 < plain_error < 0.1  # the device alone: a few per cent
    assert isinstance(report, RefinementReport) and report.converged
    assert report.residuals[-1] <= 1e-10
    assert np.linalg.norm(b - A @ x) / np.linalg.norm(b) == pytest.approx(report.residuals[-1], rel=1e-6)
    assert np.linalg.norm(x - exact) / np.linalg.norm(exact) < 1e-10 * np.linalg.cond(A)
    assert report.device_solves == len(report.residuals) <= 31
    assert report.device_solves <= 15  # the target at cond 10
    assert report.runs >= report.device_solves
    assert report.analog_time == pytest.approx(200.0 * report.device_solves)
    assert report.device_time.analog_s > 0.0


def test_residual_contracts_by_about_the_device_error():
    """Each correction multiplies the residual by about the device's relative error (< 0.15 here),
    and every step contracts: no step of a converging run grows the residual."""
    rng = np.random.default_rng(11)
    A = random_spd(rng, 8, rng.uniform(1.0, 10.0, 8))
    b = rng.standard_normal(8)
    exact = np.linalg.solve(A, b)
    with driver.open("spu-8", seed=3) as dev:
        plain = linalg.solve(dev, A, b)
        _, report = linalg.solve(dev, A, b, refine=True, return_report=True)
    device_error = np.linalg.norm(plain - exact) / np.linalg.norm(exact)
    residuals = np.array(report.residuals)
    factors = residuals[1:] / residuals[:-1]
    assert np.all(factors < 0.3)
    # the geometric-mean factor is of the order of the device's relative error
    assert 0.1 * device_error < report.contraction < 10.0 * device_error
    assert report.contraction == pytest.approx(np.exp(np.mean(np.log(factors))))


def test_several_right_hand_sides_and_auto_time():
    rng = np.random.default_rng(4)
    A = random_spd(rng, 6, rng.uniform(1.0, 10.0, 6))
    B = rng.standard_normal((6, 3))
    with driver.open("spu-8", seed=4) as dev:
        X, reports = linalg.solve(dev, A, B, t="auto", refine=True, return_report=True)
        assert sum(1 for record in dev.timeline if record.call == "load_matrix") == 1  # A loaded once
    assert X.shape == (6, 3) and len(reports) == 3
    assert np.linalg.norm(B - A @ X, axis=0).max() / np.linalg.norm(B, axis=0).min() < 1e-9


def test_refined_inverse_by_column_solves():
    rng = np.random.default_rng(7)
    A = random_spd(rng, 6, rng.uniform(1.0, 10.0, 6))
    with driver.open("spu-8", seed=7) as dev:
        X, reports = linalg.inv(dev, A, refine=True, refine_tol=1e-11, return_report=True)
    assert len(reports) == 6 and all(report.converged for report in reports)
    assert np.abs(A @ X - np.eye(6)).max() < 1e-10
    assert np.linalg.norm(X - np.linalg.inv(A)) / np.linalg.norm(np.linalg.inv(A)) < 1e-9


def test_non_convergent_system_raises_refinement_error():
    """cond 300 on spu-8: the 8-bit elements perturb A by more than its smallest eigenvalue's
    worth, the device's error exceeds 1 and the residual grows: a RefinementError, not a loop."""
    rng = np.random.default_rng(1)
    A = random_spd(rng, 8, np.geomspace(1.0, 300.0, 8))
    b = rng.standard_normal(8)
    with driver.open("spu-8", seed=1) as dev:
        with pytest.raises(RefinementError, match="not converging") as caught:
            linalg.solve(dev, A, b, t="auto", refine=True, max_iter=30)
    error = caught.value
    assert not isinstance(error, driver.SaturationError)
    assert isinstance(error, driver.SpuError)
    assert error.contraction >= 1.0
    assert error.residual == error.report.residuals[-1] > 1e-10
    assert not error.report.converged
    assert len(error.report.residuals) < 10  # stopped after two corrections without a decrease
    assert f"{error.contraction:.3g}" in str(error) and f"{error.residual:.3g}" in str(error)
    best = np.linalg.norm(b - A @ error.x) / np.linalg.norm(b)
    assert best == pytest.approx(min(error.report.residuals), rel=1e-6)


def test_max_iter_exhausted_raises_with_the_best_iterate():
    rng = np.random.default_rng(2)
    A = random_spd(rng, 8, rng.uniform(1.0, 10.0, 8))
    b = rng.standard_normal(8)
    with driver.open("spu-8", seed=2) as dev:
        with pytest.raises(RefinementError, match="max_iter = 2") as caught:
            linalg.solve(dev, A, b, refine=True, max_iter=2)
    assert len(caught.value.report.residuals) == 3
    assert caught.value.residual < caught.value.report.residuals[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"refine": True, "refine_tol": 0.0},
        {"refine": True, "refine_tol": -1e-10},
        {"refine": True, "refine_tol": float("nan")},
        {"refine": True, "refine_tol": 1.5},
        {"refine": True, "max_iter": 0},
        {"refine": True, "max_iter": 2.5},
        {"refine": True, "max_iter": True},
        {"refine": 1},
        {"refine": "yes"},
        {"refine": None},
    ],
)
@pytest.mark.parametrize("call", ["solve", "inv"])
def test_bad_refinement_arguments_refused_before_any_device_call(kwargs, call):
    A = np.diag([2.0, 3.0, 4.0])
    with driver.open("ideal", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError):
            if call == "solve":
                linalg.solve(dev, A, np.ones(3), **kwargs)
            else:
                linalg.inv(dev, A, **kwargs)
        assert dev.timeline == []


def test_refine_false_is_the_plain_solve():
    rng = np.random.default_rng(0)
    A = random_spd(rng, 8, rng.uniform(1.0, 10.0, 8))
    b = rng.standard_normal(8)
    with driver.open("spu-8", seed=0) as dev:
        plain, plain_report = linalg.solve(dev, A, b, return_report=True)
    with driver.open("spu-8", seed=0) as dev:
        same, same_report = linalg.solve(dev, A, b, refine=False, return_report=True)
    np.testing.assert_array_equal(plain, same)
    assert isinstance(same_report, driver.RunReport)


def test_ideal_device_converges():
    rng = np.random.default_rng(9)
    A = random_spd(rng, 5, rng.uniform(1.0, 10.0, 5))
    b = rng.standard_normal(5)
    with driver.open("ideal", seed=0) as dev:
        x, report = linalg.solve(dev, A, b, refine=True, return_report=True)
    assert report.converged and np.linalg.norm(b - A @ x) / np.linalg.norm(b) <= 1e-10


def test_zero_right_hand_side_needs_no_run():
    with driver.open("spu-8", seed=0) as dev:
        x, report = linalg.solve(dev, np.diag([2.0, 3.0]), np.zeros(2), refine=True, return_report=True)
        assert not any(record.call == "run" for record in dev.timeline)
    np.testing.assert_array_equal(x, np.zeros(2))
    assert report.residuals == (0.0,) and report.converged


def test_readme_refinement_numbers(capsys):
    """The README's measured example: ten random 8 x 8 SPD systems on spu-8 (eigenvalues in
    [1, 10], b ~ N(0, I)); ``pytest tests/test_precision.py -k readme -s`` prints the table."""
    rows = []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        A = random_spd(rng, 8, rng.uniform(1.0, 10.0, 8))
        b = rng.standard_normal(8)
        exact = np.linalg.solve(A, b)
        with driver.open("spu-8", seed=seed) as dev:
            plain = linalg.solve(dev, A, b)
            x, report = linalg.solve(dev, A, b, refine=True, return_report=True)
        rows.append(
            (
                np.linalg.norm(plain - exact) / np.linalg.norm(exact),
                np.linalg.norm(x - exact) / np.linalg.norm(exact),
                report.residuals[-1],
                report.device_solves,
                report.contraction,
                report.analog_time,
                report.device_time.analog_s,
            )
        )
    with capsys.disabled():
        print("\nseed  plain error  refined error  residual  solves  contraction  analog tau  analog s")
        for seed, row in enumerate(rows):
            print(
                f"{seed:4d}  {row[0]:11.2%}  {row[1]:13.1e}  {row[2]:8.1e}  {row[3]:6d}  {row[4]:11.3f}"
                f"  {row[5]:10.0f}  {row[6]:8.3f}"
            )
    table = np.array(rows)
    assert np.all(table[:, 2] <= 1e-10) and np.all(table[:, 3] <= 15)


# -- programmable damping (SET_DAMPING, issue 16 item 4) ------------------------------------------------------
def _set_damping(dev, damping):
    from driver.protocol import Opcode

    return dev.transport.request(int(Opcode.SET_DAMPING), {"damping": damping})


def test_set_damping_scales_every_cell_and_reset_restores_it():
    from driver.protocol import Status

    with driver.open("spu-8-lc", seed=3) as dev:
        firmware = dev.transport.firmware
        drawn = firmware.oscillator_parts.damping.copy()
        nominal = dev.info.spec["oscillator"]["damping"]
        status, reply = _set_damping(dev, 0.25)
        assert status == Status.OK and reply["damping"] == 0.25
        # each cell keeps its own mismatch factor: the realised resistors scale by 0.25 / nominal
        np.testing.assert_allclose(firmware.oscillator_parts.damping, drawn * 0.25 / nominal, rtol=1e-15)
        dev.reset()
        np.testing.assert_array_equal(firmware.oscillator_parts.damping, drawn)


@pytest.mark.parametrize("spec, damping", [("spu-8-lc", 0.0), ("spu-8-lc", -1.0), ("spu-8-lc", 4.5), ("spu-8", 1.0)])
def test_set_damping_outside_the_spec_is_refused_and_changes_nothing(spec, damping):
    from driver.protocol import Status

    with driver.open(spec, seed=0) as dev:
        firmware = dev.transport.firmware
        before = None if firmware.oscillator_parts is None else firmware.oscillator_parts.damping.copy()
        status, reply = _set_damping(dev, damping)
        assert status == Status.BAD_ARGUMENT
        assert "damping" in reply["message"]
        if before is not None:
            np.testing.assert_array_equal(firmware.oscillator_parts.damping, before)


def test_spec_refuses_a_damping_outside_its_programmable_range():
    with pytest.raises(driver.SpecError, match="oscillator.damping"):
        driver.open("spu-8-lc", overrides={"oscillator.damping": 5.0})


def test_critical_damping_settles_in_about_sqrt_cond_on_spu8_lc():
    """cond(A) = 100 on spu-8-lc: at the spec's damping (1, tuned for unit stiffness) the slowest mode is
    overdamped and relaxes at about k / gamma; critically damped (precision.critical_damping) at sqrt(k).
    t='auto' follows the damping now set, so the critical solve runs > 3x shorter (predicted ~7x) and is
    as accurate: had the emulator kept the old damping, its burn-in would leave ~37 % of the transient."""
    from driver.precision import critical_damping

    rng = np.random.default_rng(8)
    A = random_spd(rng, 8, np.geomspace(1.0, 0.01, 8))
    b = rng.standard_normal(8)
    exact = np.linalg.solve(A, b)
    results = {}
    for setting in ("spec", "critical"):
        with driver.open("spu-8-lc", seed=2, overrides={"coupling.mismatch": 0.0}) as dev:
            if setting == "critical":
                gamma = critical_damping(dev, A)
                assert 0.01 <= gamma < dev.info.spec["oscillator"]["damping"]
                dev.set_damping(gamma)
                assert dev.damping == gamma
            x, report = linalg.solve(dev, A, b, t="auto", return_report=True)
        results[setting] = (np.linalg.norm(x - exact) / np.linalg.norm(exact), report.analog_time)
    (spec_error, spec_t), (critical_error, critical_t) = results["spec"], results["critical"]
    assert critical_t < spec_t / 3
    assert critical_error < 2 * spec_error + 0.02


def test_set_damping_checks_and_reset():
    with driver.open("spu-8", seed=0) as dev:
        assert dev.damping is None
        with pytest.raises(driver.InvalidInputError, match="RC cells"):
            dev.set_damping(1.0)
    with driver.open("spu-8-lc", seed=0) as dev:
        calls = dev.timeline.calls
        for bad in (0.0, -1.0, 4.5, float("nan"), "1", True):
            with pytest.raises(driver.InvalidInputError):
                dev.set_damping(bad)
        assert dev.timeline.calls == calls
        dev.set_damping(0.5)
        assert dev.damping == 0.5
        dev.reset()
        assert dev.damping == dev.info.spec["oscillator"]["damping"]
