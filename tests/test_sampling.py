"""Second moments and samples: driver.linalg.inv and sample_gaussian against their estimators' variance,
read_cov / read_samples / set_noise, their refusals, and the new commands on the wire.

Statistical checks run on devices with ideal parts (so the only error is the estimator's) and use the
analytic lagged covariances of the linear SDE (test_oscillator.window_variances) or the report's effective
sample size for their tolerances, at z = 5 per entry (fixed seeds: deterministic).  A hardware-like board
(spu-8-lc) gets a check with a stated bias budget on top.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from test_oscillator import Z, ideal_spec, open_spec, spd, window_variances

import driver
from driver.sampling import lag_correlation
from spu_emulator import wire
from spu_emulator.firmware import Firmware
from spu_emulator.protocol import Opcode, Status
from spu_emulator.spec import load_spec, spec_from_mapping

A4 = spd([0.25, 0.5, 0.9, 1.4], seed=21)
A8 = spd(np.geomspace(0.1, 1.0, 8), seed=22)


def device(kind: str, tmp_path, *, seed: int = 0, cells: int = 8, **extra) -> driver.Device:
    return open_spec(ideal_spec(kind, cells=cells, kappa0=0.0, **extra), tmp_path, seed=seed)


# --------------------------------------------------------------------------- inv
@pytest.mark.parametrize("kind", ["rc", "oscillator"])
def test_inv_within_its_estimator_variance(kind, tmp_path):
    """inv(A) = read_cov at kappa = 1 / (r^2 s_A): every entry within Z sd of A^-1, sd from the lagged
    covariances of the array a = A / s_A (user units: noise 1 / s_A), K = the run's samples."""
    dev = device(kind, tmp_path, cells=4, seed=1, step_factor=0.005)
    estimate, report = driver.linalg.inv(dev, A4, t=40000.0, return_report=True)
    scale = float(np.abs(A4).max())  # load_matrix's scale at g_max = 1
    _, var = window_variances(kind, A4 / scale, 1.0 / scale, 1.0 / dev.info.sample_rate, report.samples)
    exact = np.linalg.inv(A4)
    z = (estimate - exact) / np.sqrt(var)
    assert np.all(np.abs(z) <= Z), z
    assert np.all(Z * np.sqrt(np.diag(var)) < 0.1 * np.diag(exact))  # the tolerance is under 10 %
    assert dev.noise_level == 0.0  # the noise is put back as it was


def test_inv_on_the_oscillator_board():
    """spu-8-lc: 2 % element mismatch, 8-bit elements, offsets and 12-bit converters on top of the estimator's
    error.  Budget: about 5 % from the parts (mismatch 2 %, 8-bit elements 0.4 % of full scale, amplified by
    cond(A) = 10) plus the statistical error of t = 20000 tau (about 3 % relative): 15 % in Frobenius norm."""
    with driver.open("spu-8-lc", seed=0) as dev:
        estimate = driver.linalg.inv(dev, A8, t=20000.0)
    exact = np.linalg.inv(A8)
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 0.15


# --------------------------------------------------------------------------- sample_gaussian
def target(d: int, seed: int):
    gen = np.random.default_rng(seed)
    cov = np.linalg.inv(spd(np.geomspace(0.2, 1.0, d), seed=seed)) * 0.3
    mean = gen.uniform(-1.0, 1.0, d)
    return mean, cov


@pytest.mark.parametrize("kind", ["rc", "oscillator"])
def test_sample_gaussian_moments_and_fit(kind, tmp_path):
    """n = 3000 samples of N(mean, cov) on ideal parts: the sample mean within Z sqrt(cov_ii / n_eff), the sample
    covariance within Z sqrt((S_ii S_jj + S_ij^2) / n_eff) entry by entry (n_eff the report's effective
    sample size, a lower bound for both), the Mahalanobis distances chi-squared(d) by a KS test (p > 1e-3),
    and the lag-1 autocorrelation of every coordinate below max_correlation + Z / sqrt(n)."""
    d, n = 6, 3000
    mean, cov = target(d, seed=3)
    dev = device(kind, tmp_path, seed=2)
    samples, report = driver.linalg.sample_gaussian(dev, mean, cov, n, return_report=True)
    assert samples.shape == (n, d)
    assert report.effective_samples >= n * (1 - 0.05) / (1 + 0.05) and report.lag_correlation <= 0.05
    assert report.spacing * dev.info.sample_rate == pytest.approx(round(report.spacing * dev.info.sample_rate))
    n_eff = report.effective_samples
    assert np.all(np.abs(samples.mean(axis=0) - mean) <= Z * np.sqrt(np.diag(cov) / n_eff))
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n_eff)
    assert np.all(np.abs(np.cov(samples.T) - cov) <= Z * sd)
    whitened = np.linalg.solve(np.linalg.cholesky(cov), (samples - mean).T)
    distances = np.sum(whitened**2, axis=0)
    assert scipy.stats.kstest(distances, scipy.stats.chi2(d).cdf).pvalue > 1e-3
    centred = samples - samples.mean(axis=0)
    lag1 = np.sum(centred[1:] * centred[:-1], axis=0) / np.sum(centred**2, axis=0)
    assert np.all(np.abs(lag1) <= 0.05 + Z / np.sqrt(n)), lag1
    assert dev.noise_level == 0.0


def test_sample_gaussian_fit_has_teeth(tmp_path):
    """The same checks reject samples of a covariance 10 % too wide (the KS test alone, at n = 3000)."""
    d, n = 6, 3000
    mean, cov = target(d, seed=3)
    dev = device("rc", tmp_path, seed=2)
    samples = driver.linalg.sample_gaussian(dev, mean, 1.1 * cov, n)
    whitened = np.linalg.solve(np.linalg.cholesky(cov), (samples - mean).T)
    assert scipy.stats.kstest(np.sum(whitened**2, axis=0), scipy.stats.chi2(d).cdf).pvalue < 1e-3


def test_sample_gaussian_on_the_oscillator_board():
    """spu-8-lc: the prototype's demonstration.  Budget on top of the statistics: the parts bias the
    covariance by a few per cent (element mismatch 2 %, quantisation) and the mean by about 1 % of the
    spread (offsets of about 1 mV against volts): covariance within 12 % (Frobenius), mean within
    0.1 sd + Z sd / sqrt(n_eff)."""
    d, n = 8, 2000
    mean, cov = target(d, seed=4)
    with driver.open("spu-8-lc", seed=1) as dev:
        samples, report = driver.linalg.sample_gaussian(dev, mean, cov, n, return_report=True)
        assert dev.noise_level == dev.info.kappa0  # restored
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(samples.mean(axis=0) - mean) <= (0.1 + Z / np.sqrt(report.effective_samples)) * sd)
    assert np.linalg.norm(np.cov(samples.T) - cov) / np.linalg.norm(cov) < 0.12
    assert all(not run.saturated for run in report.runs)


def test_sample_gaussian_is_reproducible(tmp_path):
    """Same spec, seed and calls: bit-identical samples."""
    mean, cov = target(3, seed=5)
    draws = []
    for _ in range(2):
        dev = device("oscillator", tmp_path, seed=7, cells=3)
        draws.append(driver.linalg.sample_gaussian(dev, mean, cov, 50))
    np.testing.assert_array_equal(draws[0], draws[1])


def test_lag_correlation_is_the_damped_oscillator():
    """The spacing model: at critical damping (1 + w s) e^{-w s}; RC e^{-k s}; underdamped it oscillates."""
    s = np.linspace(0.0, 20.0, 41)
    k = np.array([0.25])
    critical = lag_correlation("oscillator", k, s, {"oscillator": {"inductance": 1.0, "damping": 1.0}})
    np.testing.assert_allclose(critical[0], (1 + 0.5 * s) * np.exp(-0.5 * s), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lag_correlation("rc", k, s, {})[0], np.exp(-0.25 * s))
    under = lag_correlation("oscillator", np.array([4.0]), s, {"oscillator": {"inductance": 1.0, "damping": 0.2}})
    assert under[0].min() < -0.5 and under[0, 0] == pytest.approx(1.0)


# --------------------------------------------------------------------------- bad input and state
def test_cov_not_symmetric_positive_definite(tmp_path):
    dev = device("oscillator", tmp_path, cells=3)
    mean = np.zeros(3)
    with pytest.raises(driver.InvalidInputError, match="symmetric"):
        driver.linalg.sample_gaussian(dev, mean, np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), 10)
    with pytest.raises(driver.InvalidInputError, match="positive definite.*-1"):
        driver.linalg.sample_gaussian(dev, mean, np.diag([1.0, -1.0, 2.0]), 10)
    with pytest.raises(driver.InvalidInputError, match="positive definite"):
        driver.linalg.sample_gaussian(dev, mean, np.ones((3, 3)), 10)  # singular
    with pytest.raises(driver.InvalidInputError, match="NaN"):
        driver.linalg.sample_gaussian(dev, mean, np.diag([1.0, np.nan, 1.0]), 10)
    with pytest.raises(driver.InvalidInputError, match="match"):
        driver.linalg.sample_gaussian(dev, mean, np.eye(4), 10)
    assert not dev.status().matrix_loaded  # refused before anything reached the device


def test_inv_of_an_indefinite_matrix_saturates():
    """An indefinite A pushes the cells into the rails at every noise level: SaturationError, noise restored."""
    with driver.open("spu-8-lc", seed=0) as dev:
        with pytest.raises(driver.SaturationError, match="positive definite"):
            driver.linalg.inv(dev, np.diag([1.0, -0.5, 0.8]), t=400.0)
        assert dev.noise_level == dev.info.kappa0


def test_size_above_the_cell_count():
    with driver.open("spu-8-lc", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError, match="9.*8 cells"):
            driver.linalg.sample_gaussian(dev, np.zeros(9), np.eye(9), 10)
        with pytest.raises(driver.InvalidInputError, match="9.*8 cells"):
            driver.linalg.inv(dev, np.eye(9))


@pytest.mark.parametrize("n", [0, -3, 2.5, True, None])
def test_bad_sample_count(n, tmp_path):
    dev = device("rc", tmp_path, cells=2)
    with pytest.raises(driver.InvalidInputError, match="samples"):
        driver.linalg.sample_gaussian(dev, np.zeros(2), np.eye(2), n)


@pytest.mark.parametrize("k", [0, -1, 2.0, "3"])
def test_read_samples_bad_k(k, tmp_path):
    """k <= 0 (or not an integer) is bad input, before and after a recording run."""
    dev = device("rc", tmp_path, cells=2)
    with pytest.raises(driver.InvalidInputError):
        dev.read_samples(k)
    dev.load_matrix(np.eye(2))
    dev.load_vector(np.ones(2))
    dev.run(20.0, 5.0, record_samples=4)
    with pytest.raises(driver.InvalidInputError):
        dev.read_samples(k)
    assert dev.read_samples(4).shape == (4, 2)


def test_read_cov_and_read_samples_need_a_recording_run(tmp_path):
    dev = device("oscillator", tmp_path, cells=2)
    with pytest.raises(driver.DeviceStateError, match="record_cov=True"):
        dev.read_cov()  # before any run
    with pytest.raises(driver.DeviceStateError, match="record_samples"):
        dev.read_samples(1)
    dev.load_matrix(np.eye(2))
    dev.load_vector(np.ones(2))
    dev.run(20.0)
    with pytest.raises(driver.DeviceStateError, match="did not record"):
        dev.read_cov()  # after a run that did not record
    dev.run(20.0, 5.0, record_cov=True, record_samples=3, sample_stride=2)
    assert dev.read_cov().shape == (2, 2) and dev.read_samples().shape == (3, 2)
    with pytest.raises(driver.DeviceStateError, match="recorded 3"):
        dev.read_samples(4)
    dev.reset()
    with pytest.raises(driver.DeviceStateError):
        dev.read_cov()
    # the device says the same to a host that skips the driver's checks
    firmware = dev.transport.firmware
    status, reply = firmware.handle(int(Opcode.READ_COV))
    assert status == Status.BAD_STATE and "record_cov = 1" in reply["message"]


def test_run_recording_arguments(tmp_path):
    dev = device("rc", tmp_path, cells=2)
    dev.load_matrix(np.eye(2))
    dev.load_vector(np.ones(2))
    for kwargs in ({"record_cov": 1}, {"record_samples": -1}, {"sample_stride": 0}, {"record_samples": 1.5}):
        with pytest.raises(driver.InvalidInputError):
            dev.run(10.0, **kwargs)
    with pytest.raises(driver.InvalidInputError, match="exact engine"):
        dev.run(10.0, engine="exact", record_cov=True)
    with pytest.raises(driver.InvalidInputError, match="lengthen t"):
        dev.run(10.0, 5.0, record_samples=11)  # the window (5, 10] holds 10 conversions at 2 per tau
    assert not dev.status().has_run  # nothing ran


def test_set_noise(tmp_path):
    dev = device("rc", tmp_path, cells=2)
    dev.set_noise(0.5)
    assert dev.noise_level == 0.5
    with pytest.raises(driver.InvalidInputError, match="outside"):
        dev.set_noise(11.0)
    assert dev.noise_level == 0.5
    dev.reset()
    assert dev.noise_level == 0.0
    fixed = open_spec({**ideal_spec("rc", cells=2), "name": "fixed", "noise": {"kappa0": 0.5}}, tmp_path)
    assert fixed.info.kappa0_max == 0.0
    with pytest.raises(driver.InvalidInputError, match="fixed"):
        fixed.set_noise(0.02)
    # a = P / max|P| has unit diagonal, so the cells spread sqrt(0.5) V: 5 sd is beyond 90 % of the 1 V ADC
    mean, cov = np.zeros(2), np.eye(2)
    with pytest.raises(driver.InvalidInputError, match="fixed"):
        driver.linalg.sample_gaussian(fixed, mean, cov, 5)
    silent = open_spec({**ideal_spec("rc", cells=2), "name": "silent", "noise": {"kappa0": 0.0}}, tmp_path)
    with pytest.raises(driver.InvalidInputError, match="no noise"):
        driver.linalg.sample_gaussian(silent, mean, np.eye(2), 5)


# --------------------------------------------------------------------------- the wire
def _documented(opcode: Opcode, reply: dict) -> None:
    fields = wire.PROTOCOL["commands"][opcode.name]["reply"]
    assert {name for name, f in fields.items() if not f.get("optional")} <= set(reply), opcode.name
    for name, value in reply.items():
        assert name in fields, (opcode.name, name)
        kind = fields[name]["type"]
        if kind == "array":
            assert isinstance(value, np.ndarray) and value.ndim == len(fields[name]["shape"])
        else:
            assert isinstance(value, {"int": int, "float": float, "map": dict}[kind]), (opcode.name, name, value)


def test_new_commands_are_documented_and_cross_the_wire():
    """READ_COV, READ_SAMPLES, SET_NOISE and RUN's recording fields: replies as protocol.yaml says, bit for bit
    through the frame codec."""
    firmware = Firmware(load_spec("spu-8-lc"), seed=3)
    codes = np.rint(127 * A4 / np.abs(A4).max()).astype(np.int64)
    calls = [
        (Opcode.SET_NOISE, {"kappa0": 0.01}),
        (Opcode.LOAD_MATRIX, {"codes": codes}),
        (Opcode.LOAD_VECTOR, {"codes": np.array([100, -50, 20, 0])}),
        (Opcode.RUN, {"t": 200.0, "burn_in": 20.0, "record_cov": 1, "record_samples": 5, "sample_stride": 3}),
        (Opcode.READ_COV, {}),
        (Opcode.READ_SAMPLES, {"k": 2}),
        (Opcode.READ_SAMPLES, {}),
    ]
    for opcode, request in calls:
        request = wire.decode_frame(wire.encode_frame(wire.REQUEST, int(opcode), 0, 1, request))[1]
        status, reply = firmware.handle(int(opcode), request)
        assert status == Status.OK, reply
        _documented(opcode, reply)
        back = wire.decode_frame(wire.encode_frame(wire.REPLY, int(opcode), status, 1, reply), wire.REPLY)[1]
        for name, value in reply.items():
            if isinstance(value, np.ndarray):
                assert value.tobytes() == back[name].tobytes()
    assert firmware.handle(int(Opcode.READ_SAMPLES), {})[1]["codes"].shape == (5, 4)


def test_oscillator_spec_fields_are_validated():
    base = ideal_spec("oscillator")
    for field, value in (("damping", 0.0), ("inductance", -1.0), ("inductance_mismatch", 0.6)):
        with pytest.raises(Exception, match=field):
            spec_from_mapping({**base, "oscillator": {field: value}})


# --------------------------------------------------------------------------- the README
def test_readme_oscillator_example_runs():
    """The python block under the README's "## Oscillator cells, sampling and inversion" runs as written, and
    its answers are what its comments say: A^-1 to a few per cent (board floor plus statistics: 10 % budget),
    samples and snapshots of the stated shapes, and the by-hand covariance near kappa0 s_A a^-1 in volts."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Oscillator cells, sampling and inversion", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (## Oscillator cells)", "exec"), namespace)
    A = namespace["A"]
    exact = np.linalg.inv(A)
    assert np.linalg.norm(namespace["A_inv"] - exact) / np.linalg.norm(exact) < 0.1
    assert namespace["x"].shape == (1000, 2) and namespace["snapshots"].shape == (100, 2)
    # by hand: a = A / s_A with s_A = max|A| = 2, so cov(V) = kappa0 a^-1 = 0.02 A^-1 volts^2, read in user units
    # x = V s_b / s_A = V / 2: cov(x) = 0.005 A^-1.  Window 4900 tau: about 5 % statistics, plus the parts
    np.testing.assert_allclose(namespace["cov"], 0.005 * exact, rtol=0.25, atol=0.0005)
