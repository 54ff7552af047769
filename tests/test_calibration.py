"""Self-calibration from known inputs (driver.calibration, issue 16 item 2).

The estimates are compared with the emulator's realised parts through the test-only
``spu_emulator.hidden`` (calibration itself never reads them); the exact answers of solves come
from numpy.  Tolerances: the fit's own standard errors (``offset_sd_v``, from its residuals) plus
what the module docstring says is not identifiable (gin and the DAC gain, 1 % and 0.1 % of an offset).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import driver
from driver import linalg
from driver.calibration import CORRECTED_EFFECTS as CORRECTABLE_OFF
from driver.calibration import Calibration, CalibrationError
from spu_emulator.hidden import hidden_parameters


def random_spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.geomspace(1.0, 1.0 / cond, n)) @ Q.T
    return 0.5 * (A + A.T)


def relative(x: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(x - exact) / np.linalg.norm(exact))


def check_offsets(cal: Calibration, hidden, slack: float = 0.02) -> None:
    """Each offset within 5 of the fit's standard errors plus ``slack`` of its size (the unidentifiable
    gin and DAC-gain factors, 1 % and 0.1 %, and the trims' gauge, sigma / sqrt(n))."""
    sd = cal.offset_sd_v
    assert np.all(sd > 0.0)
    np.testing.assert_array_less(np.abs(cal.adc_offset_v - hidden.adc_offset_v), 5 * sd[:, 0] + 1e-9)
    # v_os = q G: q's error times G, plus G's gauge (row mean of ln E) of v_os
    vos_tol = 5 * sd[:, 2] * cal.input_gain + slack * np.abs(hidden.opamp_offset_v) + 1e-9
    np.testing.assert_array_less(np.abs(cal.opamp_offset_v - hidden.opamp_offset_v), vos_tol)
    dac_tol = 5 * (sd[:, 1] + sd[:, 2]) + slack * (np.abs(hidden.dac_offset_v) + np.abs(hidden.opamp_offset_v)) + 1e-9
    np.testing.assert_array_less(np.abs(cal.dac_offset_v - hidden.dac_offset_v), dac_tol)


@pytest.mark.parametrize("spec, seed", [("spu-8", 0), ("spu-8", 1), ("spu-8", 2), ("spu-8-lc", 0)])
def test_offsets_and_trims_match_the_hidden_parts(spec, seed):
    with driver.open(spec, seed=seed) as dev:
        cal = dev.calibrate()
        hidden = hidden_parameters(dev.transport.firmware)
        assert dev.noise_level == dev.info.kappa0  # probed quieter, the caller's level restored
    assert dev.calibration is cal and cal.n == 8 and cal.runs == 2 * 8 + 4
    check_offsets(cal, hidden)
    # the target: offsets within 20 % (as vectors: a cell whose offset is near 0 has no relative error)
    for estimate, truth in [
        (cal.adc_offset_v, hidden.adc_offset_v),
        (cal.opamp_offset_v, hidden.opamp_offset_v),
        (cal.dac_offset_v, hidden.dac_offset_v),
    ]:
        assert relative(estimate, truth) < 0.2
    # K to ~1e-3: (readings' sd ~3e-5 V over 0.5 V probes) x cond(calibration matrix) x 1/|element|
    np.testing.assert_allclose(cal.element_trim, hidden.element_trim, rtol=5e-3)


def test_injected_offsets_are_recovered():
    """Offsets 10-20x spu-8's, set through spec overrides (each cell's drawn from N(0, sigma^2))."""
    overrides = {"adc.offset_v": 0.01, "cell.opamp_offset_v": 0.005, "dac.offset_v": 0.02}
    with driver.open("spu-8", seed=7, overrides=overrides) as dev:
        cal = dev.calibrate()
        hidden = hidden_parameters(dev.transport.firmware)
    assert np.abs(hidden.adc_offset_v).max() > 5e-3  # the injection took
    check_offsets(cal, hidden)
    for estimate, truth in [(cal.adc_offset_v, hidden.adc_offset_v), (cal.opamp_offset_v, hidden.opamp_offset_v)]:
        assert relative(estimate, truth) < 0.02


def test_gauge_of_the_gains_is_as_documented():
    """E, G and D are identifiable only up to row and column scalings: the estimates carry the rows' and
    columns' mean ln E, exactly as the module docstring says (one common factor each, to ~1e-3)."""
    with driver.open("spu-8", seed=4) as dev:
        cal = dev.calibrate()
        hidden = hidden_parameters(dev.transport.firmware)
    log_e = np.log(hidden.element_mismatch)
    g_ratio = cal.input_gain / (hidden.input_gain * np.exp(-log_e.mean(axis=1)))
    d_ratio = cal.adc_gain / (hidden.adc_gain * np.exp(-log_e.mean(axis=0)))
    np.testing.assert_allclose(g_ratio, g_ratio.mean(), rtol=1e-3)
    np.testing.assert_allclose(d_ratio, d_ratio.mean(), rtol=1e-3)
    gauge = np.exp(-log_e.mean(axis=1)[:, None] - log_e.mean(axis=0)[None, :] + log_e.mean())
    np.testing.assert_allclose(cal.element_mismatch, hidden.element_mismatch * gauge, rtol=2e-3)
    # and what is not identifiable really is not: the ADC gain's error is the columns' mismatch, not noise
    d_error = np.abs(cal.adc_gain / d_ratio.mean() / hidden.adc_gain - 1.0)
    assert d_error.max() > 5e-4  # sigma / sqrt(n) = 0.35 % of column mean, far above the trims' 1e-4 noise


def test_gauge_transformed_parts_read_the_same():
    """Scaling the hidden element rows by P and columns by Q, the input gains by P and the ADC gains by Q
    leaves the device's readings the same in distribution: the calibrations of the two agree within
    noise, so no calibration from means can tell them apart."""
    P = np.linspace(0.98, 1.02, 8)
    Q = np.linspace(1.015, 0.985, 8)
    cals = []
    for transformed in (False, True):
        overrides = {"cell.opamp_offset_v": 0.0, "dac.offset_v": 0.0, "cell.capacitance_mismatch": 0.0}
        with driver.open("spu-8", seed=5, overrides=overrides) as dev:
            firmware = dev.transport.firmware
            if transformed:
                hidden = hidden_parameters(firmware)
                parts = firmware.parts
                gain = parts.dac_gain.copy()
                gain[:8] *= P
                adc = parts.adc_gain.copy()
                adc[:8] *= Q
                firmware.parts = dataclasses.replace(parts, dac_gain=gain, adc_gain=adc)
                firmware._mismatch_cache = (8, hidden.element_mismatch * np.outer(P, Q))
            cals.append(dev.calibrate())
    plain, moved = cals
    np.testing.assert_allclose(moved.element_trim, plain.element_trim, rtol=3e-3)
    np.testing.assert_allclose(moved.adc_offset_v, plain.adc_offset_v, atol=5 * plain.offset_sd_v[:, 0].max())


def test_calibration_corrects_solves_down_to_the_quantisation_floor():
    """spu-8 with continuous elements: the calibration leaves only noise, > 5x better (measured ~15x).
    With its 8-bit elements it reaches the error of a device without the effects it corrects
    (benchmarks/bench_precision.py: about 1.7x; the 8-bit rounding is the floor)."""
    rng = np.random.default_rng(11)
    before, after, floor = [], [], []
    for seed in range(4):
        A, b = random_spd(rng, 8, 10.0), rng.standard_normal(8)
        exact = np.linalg.solve(A, b)
        with driver.open("spu-8", seed=seed, overrides={"coupling.element_bits": 0}) as dev:
            before.append(relative(linalg.solve(dev, A, b), exact))
            dev.calibrate()
            after.append(relative(linalg.solve(dev, A, b), exact))
        with driver.open("spu-8", seed=seed, overrides={"coupling.element_bits": 0, **CORRECTABLE_OFF}) as dev:
            floor.append(relative(linalg.solve(dev, A, b), exact))
    assert np.median(before) > 5 * np.median(after)
    assert np.median(after) < 3 * np.median(floor) + 1e-3


def test_corrections_apply_to_loads_and_reads_and_clear():
    with driver.open("spu-8", seed=2) as dev:
        firmware = dev.transport.firmware
        A = random_spd(np.random.default_rng(0), 8, 5.0)
        dev.load_matrix(A)
        plain = firmware.matrix.codes.copy()
        cal = dev.calibrate()
        dev.load_matrix(A)
        trimmed = firmware.matrix.codes.copy()
        scale = dev.matrix_scale(A)
        np.testing.assert_array_equal(trimmed, np.rint(A / scale / cal.element_trim * 127))
        assert not np.array_equal(trimmed, plain)
        dev.reset()  # the calibration is of the parts: it survives a reset
        assert dev.calibration is cal
        dev.clear_calibration()
        assert dev.calibration is None
        dev.load_matrix(A)
        np.testing.assert_array_equal(firmware.matrix.codes, plain)


@pytest.mark.parametrize(
    "overrides, why",
    [({"cell.opamp_offset_v": 1.0}, "saturated"), ({"coupling.mismatch": 0.5}, "far outside any part tolerance")],
)
def test_failed_calibration_leaves_the_device_uncalibrated_and_its_loads_as_they_were(overrides, why):
    """Op-amp offsets of ~1 V drive the probes into the rails; 50 % element mismatch gives trims no part
    could have: CalibrationError, nothing installed, loads unchanged."""
    A = random_spd(np.random.default_rng(1), 8, 5.0)
    with driver.open("spu-8", seed=3, overrides=overrides) as dev:
        dev.load_matrix(A)
        before = dev.transport.firmware.matrix.codes.copy()
        with pytest.raises(CalibrationError, match=why):
            dev.calibrate()
        assert dev.calibration is None
        dev.load_matrix(A)
        np.testing.assert_array_equal(dev.transport.firmware.matrix.codes, before)


def test_failed_recalibration_keeps_the_previous_one(monkeypatch):
    with driver.open("spu-8", seed=3) as dev:
        first = dev.calibrate()
        calls = {"n": 0}
        run = dev.run

        def failing_run(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise driver.LinkError("the link dropped (simulated)")
            return run(*args, **kwargs)

        monkeypatch.setattr(dev, "run", failing_run)
        with pytest.raises(driver.LinkError):
            dev.calibrate()
        assert dev.calibration is first


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 1}, {"n": 9}, {"n": 2.5}, {"n": True}, {"t": -1.0}, {"t": 0.0}, {"t": float("nan")}, {"t": 1e9}],
)
def test_bad_arguments_refused_before_any_device_call(kwargs):
    with driver.open("spu-8", seed=0) as dev:
        calls = dev.timeline.calls
        with pytest.raises(driver.InvalidInputError):
            dev.calibrate(**kwargs)
        assert dev.timeline.calls == calls and dev.calibration is None


def test_same_seed_same_calibration_bits():
    results = []
    for _ in range(2):
        with driver.open("spu-8", seed=9) as dev:
            results.append(driver.calibrate(dev, t=2000.0))
    np.testing.assert_array_equal(results[0].element_trim, results[1].element_trim)
    np.testing.assert_array_equal(results[0].adc_offset_v, results[1].adc_offset_v)


def test_smaller_loads_use_the_calibrated_block():
    with driver.open("spu-8", seed=6) as dev:
        cal = dev.calibrate(n=4)
        A = random_spd(np.random.default_rng(2), 6, 3.0)
        dev.load_matrix(A)
        codes = dev.transport.firmware.matrix.codes
        trims = np.ones((6, 6))
        trims[:4, :4] = cal.element_trim
        np.testing.assert_array_equal(codes, np.rint(A / dev.matrix_scale(A) / trims * 127))
        b = np.ones(6)
        x = linalg.solve(dev, A, b)
        assert relative(x, np.linalg.solve(A, b)) < 0.1


def test_reads_subtract_the_adc_offset():
    """The same run read with and without the calibration differs by the ADC offset, in user units."""
    with driver.open("spu-8", seed=8) as dev:
        cal = dev.calibrate(t=5000.0)
        A = random_spd(np.random.default_rng(3), 8, 3.0)
        dev.load_matrix(A)
        dev.load_vector(np.ones(8), scale="auto")
        dev.run(400.0, record_samples=4)
        corrected, samples = dev.read_mean(), dev.read_samples()
        scale = dev._readout_scale
        dev.clear_calibration()
        np.testing.assert_allclose(corrected, dev.read_mean() - cal.adc_offset_v * scale, rtol=0, atol=1e-12)
        np.testing.assert_allclose(samples, dev.read_samples() - cal.adc_offset_v * scale, rtol=0, atol=1e-12)


def test_ggn_loads_get_the_per_cell_corrections():
    """A GGN load gets no element trims (see the module docstring) but the offsets still go: on spu-8
    with only offsets as errors (continuous elements), the calibrated GGN solve is > 3x better."""
    rng = np.random.default_rng(12)
    J, H = rng.standard_normal((6, 8)), np.eye(6)
    ggn = driver.GGN(J, H, 1.0)
    F = J.T @ J + np.eye(8)
    b = rng.standard_normal(8)
    exact = np.linalg.solve(F, b)
    overrides = {**CORRECTABLE_OFF, "coupling.element_bits": 0, "adc.offset_v": 0.005, "dac.offset_v": 0.005}
    errors = []
    for calibrated in (False, True):
        with driver.open("spu-8", seed=1, overrides=overrides) as dev:
            if calibrated:
                dev.calibrate(t=20000.0)
            dev.load_matrix(ggn)
            dev.load_vector(b, scale="auto")
            dev.run(400.0)
            errors.append(relative(dev.read_mean(), exact))
    assert errors[1] < errors[0] / 3


def test_calibration_and_damping_over_tcp_give_the_in_process_bits():
    """Calibration uses only public calls, so a served device calibrates to the same bits; SET_DAMPING
    crosses the wire (spu-8-lc)."""
    from served import open_device

    results = []
    for transport in ("in-process", "tcp"):
        with open_device("spu-8", 4, transport) as dev:
            cal = dev.calibrate(t=2000.0)
            A = random_spd(np.random.default_rng(5), 8, 3.0)
            results.append((cal.element_trim, cal.adc_offset_v, linalg.solve(dev, A, np.ones(8))))
    for in_process, served in zip(*results, strict=True):
        np.testing.assert_array_equal(in_process, served)
    with open_device("spu-8-lc", 1, "tcp") as dev:
        dev.set_damping(0.3)
        assert dev.damping == 0.3
        with pytest.raises(driver.InvalidInputError, match="outside"):
            dev.set_damping(10.0)
