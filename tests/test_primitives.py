"""Matrix exponentials and Lyapunov solves on the device (issue 17): the lagged-moment accumulator,
its closed form in the exact engine, and driver.linalg.expnegm / expm / lyapunov.

References are independent of the code under test: a numpy loop over pairs for the accumulator,
a numpy AR(1) simulation for the closed form, scipy.linalg.expm and solve_continuous_lyapunov for
the primitives.  Tolerances are derived from each estimator's spread and written next to the check.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

import driver
from spu_emulator import _lagged
from spu_emulator.exact import _window_pair_sum, prepare, propagate_lagged


# --------------------------------------------------------------------------- the accumulator
def reference_lagged(x: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """sum_{k} x_{k+L} x_k^T for each lag, one pair at a time."""
    count, n = x.shape
    out = np.zeros((lags.shape[0], n, n))
    for which, lag in enumerate(lags):
        for k in range(count - lag):
            out[which] += np.outer(x[k + lag], x[k])
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_accumulator_matches_reference_whatever_the_chunks(chunk):
    rng = np.random.default_rng(0)
    x = np.rint(100.0 * rng.standard_normal((300, 4)))  # integer codes: the sums are exact
    lags = np.array([0, 1, 5, 17], dtype=np.int64)
    ring = np.zeros((18, 4))
    sums = np.zeros((4, 4, 4))
    for start in range(0, 300, chunk):
        _lagged._accumulate_lagged(x[start : start + chunk], start, ring, lags, sums)
    np.testing.assert_array_equal(sums, reference_lagged(x, lags))


# --------------------------------------------------------------------------- the closed form
@pytest.mark.parametrize(("c1", "c2", "n1", "n2"), [(0, 0, 300, 300), (3, 0, 297, 300), (3, -2, 297, 298)])
def test_window_pair_sum_matches_the_double_sum(c1, c2, n1, n2):
    x1, x2 = np.array([0.05, 0.3]), np.array([0.2, 0.07])
    k, kp = np.arange(1, n1 + 1)[:, None], np.arange(1, n2 + 1)[None, :]
    brute = [np.sum(np.exp(-a * np.abs(k - kp + c1) - b * np.abs(k - kp + c2))) for a, b in zip(x1, x2, strict=True)]
    np.testing.assert_allclose(_window_pair_sum(x1, x2, c1, c2, n1, n2), brute, rtol=1e-12)


def test_closed_form_lagged_sums_match_simulated_windows():
    """The exact engine's draws of sum x_{k+L} x_k^T against an AR(1) simulation of the same array.

    Both give R windows; each entry's mean and spread must agree, and so must the spread of the
    estimate C(L) C(0)^-1 built from them (which tests the correlations between the lags)."""
    rng = np.random.default_rng(1)
    n, count, replicas, period, sd = 3, 4000, 600, 1.0, 0.3
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    rates = np.array([0.05, 0.2, 0.7])
    drift = basis @ np.diag(rates) @ basis.T
    drift = 0.5 * (drift + drift.T)
    lags = np.array([0, 3], dtype=np.int64)
    model = prepare(drift, np.full(n, sd))
    assert model.form == "modal"
    lam, modes = np.linalg.eigh(drift)
    phi, var = np.exp(-lam * period), sd**2 / (2.0 * lam)
    # simulation: stationary start, exact AR(1) per mode (numpy's own eigh, no code under test)
    y = np.sqrt(var) * rng.standard_normal((replicas, n))
    path = np.empty((count, replicas, n))
    for k in range(count):
        y = phi * y + np.sqrt(var * (1.0 - phi**2)) * rng.standard_normal((replicas, n))
        path[k] = y @ modes.T
    simulated = np.stack(
        [np.einsum("kri,krj->rij", path[lag:], path[: count - lag], optimize=True) for lag in lags], axis=1
    )
    drawn = np.stack(
        [
            propagate_lagged(
                model, modes @ (np.sqrt(var) * rng.standard_normal(n)), np.zeros(n), count, 0.0, period, lags, rng
            )[3]
            for _ in range(replicas)
        ]  # fmt: skip
    )
    # means: the difference of two means of R draws has sd sqrt(2 / R) sd_entry; 4.5 sd over 18 entries
    spread = simulated.std(axis=0)
    assert np.all(np.abs(drawn.mean(axis=0) - simulated.mean(axis=0)) <= 4.5 * np.sqrt(2.0 / replicas) * spread)
    # spreads: the sd of a sample sd is about sd / sqrt(2 R) (4 %); 15 % leaves 3.5 of those
    np.testing.assert_allclose(drawn.std(axis=0), spread, rtol=0.15)

    def estimate(sums):
        return np.stack([(s[1] / (count - 3)) @ np.linalg.inv(s[0] / count) for s in sums])

    np.testing.assert_allclose(estimate(drawn).std(axis=0), estimate(simulated).std(axis=0), rtol=0.15)


# --------------------------------------------------------------------------- the device's recording
def test_lagged_sums_of_a_run_equal_the_pairs_of_its_conversions():
    """Two devices with the same seed run the same calls, one recording lagged sums, one snapshots of
    every conversion: the draws are the same, so the sums must be those of the snapshots' pairs.
    70,000 conversions span three of the accumulator's chunks of 32,768."""
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    lags = (0, 1, 5)
    runs = []
    for record in ({"record_lags": lags}, {"record_samples": 70_000}):
        with driver.open("ideal", seed=3) as dev:
            dev.load_matrix(A)
            dev.load_vector(np.zeros(2), scale=1.0)
            dev.set_noise(0.5)
            dev.run(70_000.0, 0.0, engine="transient", **record)
            runs.append(dev.read_lagged() if "record_lags" in record else dev.read_samples())
    moments, snapshots = runs
    assert moments.samples == 70_000 and moments.lags == lags
    np.testing.assert_array_equal(moments.pairs, [70_000, 69_999, 69_995])
    np.testing.assert_allclose(moments.sums, reference_lagged(snapshots, np.array(lags)), rtol=1e-10)
    np.testing.assert_allclose(moments.mean, snapshots.mean(axis=0), rtol=1e-10, atol=1e-12)


def test_exact_engine_draws_lagged_sums_where_it_can_and_says_why_not():
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(A)
        dev.load_vector(np.zeros(2), scale=1.0)
        dev.set_noise(0.5)
        report = dev.run(2000.0, 100.0, record_lags=(0, 3))  # auto: closed form, 1900 conversions at rate >= 0.8
        assert report.engine == "exact"
        assert dev.read_lagged().pairs.tolist() == [1900, 1897]
        with pytest.raises(driver.InvalidInputError, match="correlation times"):
            dev.run(100.0, 0.0, engine="exact", record_lags=(0, 3))
        dev.load_vector(np.ones(2))
        with pytest.raises(driver.InvalidInputError, match="drive is not zero"):
            dev.run(2000.0, 100.0, engine="exact", record_lags=(0, 3))
        assert dev.run(2000.0, 100.0, record_lags=(0, 3)).engine == "transient"  # auto steps instead
    with driver.open("spu-8", seed=0) as dev:
        dev.load_matrix(A)
        dev.load_vector(np.zeros(2))
        with pytest.raises(driver.InvalidInputError, match="modal form"):
            dev.run(2000.0, 100.0, engine="exact", record_lags=(0, 3))


def test_recording_refusals_change_nothing():
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(A)
        dev.load_vector(np.zeros(2), scale=1.0)
        dev.run(10.0, 0.0)
        before, calls = dev.status(), dev.timeline.calls
        with pytest.raises(driver.InvalidInputError, match="lag of 20 ADC conversions"):
            dev.run(10.0, 0.0, record_lags=(0, 20))  # refused on the host
        with pytest.raises(driver.InvalidInputError, match="1 to 8 distinct"):
            dev.run(10.0, 0.0, record_lags=(0, 0))
        assert dev.timeline.calls == calls
        firmware = dev.transport._firmware
        status, reply = firmware.handle(5, {"t": 10.0, "record_lags": np.array([0, 20])})  # RUN
        assert status != 0 and "lag of 20" in reply["message"]
        status, reply = firmware.handle(5, {"t": 10.0, "record_lags": np.array([0, 1 << 24])})
        assert status != 0 and "recording memory" in reply["message"]
        status, reply = firmware.handle(5, {"t": 10.0, "record_lags": np.array([0]), "record_samples": 3})
        assert status != 0 and "record one of them" in reply["message"]
        assert dev.status() == before
        with pytest.raises(driver.DeviceStateError, match="record_lags"):
            dev.read_lagged()


# --------------------------------------------------------------------------- the primitives
THERMOX_A = np.array([[3.0, 2.0], [2.0, 4.0]])
THERMOX_EXPM = np.array([[-0.4, 0.1], [0.5, -0.3]])


@pytest.mark.parametrize("preset", ["ideal", "spu-8-lc"])
def test_thermox_cases(preset):
    """thermox's own tests: expnegm([[3, 2], [2, 4]]) within 0.1 of expm(-A), expm([[-0.4, 0.1],
    [0.5, -0.3]]) within 0.1 of its exponential.  The default window (4000 correlation times) leaves a
    standard error of about 0.01 per entry (the report's), so 0.1 is 10 of those; spu-8-lc's mismatch
    and quantisation add a bias of a few per cent of |E|."""
    with driver.open(preset, seed=0) as dev:
        E, report = driver.linalg.expnegm(dev, THERMOX_A, return_report=True)
        assert np.abs(E - scipy.linalg.expm(-THERMOX_A)).max() < 0.1
        assert report.error_norm < 0.05 and report.effective_samples == pytest.approx(2000.0)
        E = driver.linalg.expm(dev, THERMOX_EXPM)
        assert np.abs(E - scipy.linalg.expm(THERMOX_EXPM)).max() < 0.1
        assert dev.noise_level == dev.info.kappa0  # restored
        if preset == "spu-8-lc":
            assert dev.damping == dev.info.spec["oscillator"]["damping"]


def test_expnegm_with_a_shift_and_a_lag_s():
    """e^{-A s} at s = 0.5 for an A with a negative eigenvalue, through alpha = 2 (thermox's shift)."""
    A = np.array([[0.5, 1.5], [1.5, 0.5]])  # eigenvalues 2 and -1
    with driver.open("ideal", seed=1) as dev:
        with pytest.raises(driver.InvalidInputError, match="pass alpha > 1"):
            driver.linalg.expnegm(dev, A, 0.5)
        E, report = driver.linalg.expnegm(dev, A, 0.5, alpha=2.0, return_report=True)
    # the report's errors are standard errors; 5 of them in the Frobenius norm over 4 entries
    assert np.linalg.norm(E - scipy.linalg.expm(-0.5 * A)) < 5.0 * report.error_norm


def test_lyapunov_of_a_non_normal_drift_within_the_stated_error():
    """A Sigma + Sigma A^T = diag(d) for a non-normal 4 x 4 drift, against solve_continuous_lyapunov.

    The report's error is the batch-means standard error of each entry; the squared Frobenius error
    over 16 entries is then about chi^2_16 times their mean square, which exceeds 3^2 = 9 times its
    mean with probability below 1e-6 (the check is at 3 x error_norm)."""
    rng = np.random.default_rng(7)
    A = np.diag([1.0, 2.0, 3.0, 4.0]) + np.triu(rng.uniform(0.5, 1.5, (4, 4)), 1)  # upper triangular: non-normal
    d = np.array([1.0, 0.5, 2.0, 1.5])
    reference = scipy.linalg.solve_continuous_lyapunov(A, np.diag(d))
    with driver.open("ideal", seed=2) as dev:
        sigma, report = driver.linalg.lyapunov(dev, A, d, return_report=True)
    np.testing.assert_allclose(sigma, sigma.T)
    assert np.linalg.norm(sigma - reference) < 3.0 * report.error_norm
    assert report.error_norm < 0.05 * np.linalg.norm(reference)  # and the error is small


def _untouched(dev):
    return dev.timeline.calls, dev.status(), dev.noise_level


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda dev: driver.linalg.expnegm(dev, -THERMOX_A), "positive real part"),
        (lambda dev: driver.linalg.expm(dev, THERMOX_A), "positive real part"),
        (lambda dev: driver.linalg.lyapunov(dev, np.array([[1.0, 3.0], [0.0, -0.5]]), [1.0, 1.0]), "stable"),
        (lambda dev: driver.linalg.lyapunov(dev, THERMOX_A, [1.0, -1.0]), "positive"),
        (lambda dev: driver.linalg.lyapunov(dev, THERMOX_A, [1.0]), "shape"),
        (lambda dev: driver.linalg.expnegm(dev, THERMOX_A, t=10.0), "per batch"),  # lag longer than a batch
        (lambda dev: driver.linalg.expnegm(dev, THERMOX_A, s=1e7), "recording memory"),
        (lambda dev: driver.linalg.expnegm(dev, THERMOX_A, s=-1.0), "positive"),
        (lambda dev: driver.linalg.expnegm(dev, THERMOX_A, batches=1), "batches"),
        (lambda dev: driver.linalg.expnegm(dev, [[1.0, np.nan], [0.0, 1.0]]), "NaN"),
    ],
)
def test_bad_input_is_refused_before_the_device_is_touched(call, match):
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(THERMOX_A)
        dev.load_vector(np.ones(2))
        dev.run(5.0)
        before = _untouched(dev)
        with pytest.raises(driver.InvalidInputError, match=match):
            call(dev)
        assert _untouched(dev) == before


@pytest.mark.slow
def test_errors_fall_as_one_over_the_square_root_of_the_run_time():
    """expnegm's and lyapunov's RMS errors over 6 seeds at t, 4 t and 16 t: each quadrupling should halve
    them.  The slope of log(error) against log(t) is -1/2; with 6 seeds the RMS of each level is known to
    about 1 / sqrt(2 * 6 * 4) = 14 %, so the fitted slope is within 0.15 of -1/2 (about 3 of its sds)."""
    A = np.array([[2.0, 0.6, 0.0], [-0.4, 1.5, 0.3], [0.2, 0.0, 1.0]])
    d = np.array([1.0, 2.0, 0.5])
    references = scipy.linalg.expm(-A), scipy.linalg.solve_continuous_lyapunov(A, np.diag(d))
    base = 2.0e4
    for which, reference in enumerate(references):
        rms = []
        for factor in (1, 4, 16):
            errors = []
            for seed in range(6):
                with driver.open("ideal", seed=seed) as dev:
                    if which == 0:
                        estimate = driver.linalg.expnegm(dev, A, t=base * factor)
                    else:
                        estimate = driver.linalg.lyapunov(dev, A, d, t=base * factor)
                errors.append(np.linalg.norm(estimate - reference) ** 2)
            rms.append(np.sqrt(np.mean(errors)))
        slope = np.polyfit(np.log([1.0, 4.0, 16.0]), np.log(rms), 1)[0]
        assert abs(slope + 0.5) < 0.15, (which, rms, slope)


def test_readme_example_runs():
    """The python block under the README's "## Matrix exponentials and Lyapunov solves" runs as written,
    and its answers are as close as the README says (within 0.1 each; the Lyapunov solve within 10 %)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Matrix exponentials and Lyapunov solves\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (primitives)", "exec"), namespace)
    E, A, F, G = namespace["E"], namespace["A"], namespace["F"], namespace["G"]
    assert np.abs(E - scipy.linalg.expm(-A)).max() < 0.1
    assert np.abs(F - scipy.linalg.expm(G)).max() < 0.1
    S, B = namespace["S"], namespace["B"]
    reference = scipy.linalg.solve_continuous_lyapunov(B, np.diag([1.0, 0.5]))
    assert np.abs(S - reference).max() < 0.1 * np.abs(reference).max()


def test_both_engines_give_the_same_lagged_estimates_in_distribution():
    """C(2) C(0)^-1 from 60 windows of 1000 tau (400 correlation times) on each engine, same device:
    means within 4 standard errors of their difference (4 entries), spreads within 35 % (the sd of a
    sample sd of 60 is about 9 %)."""
    A = np.array([[2.0, 0.5], [0.5, 1.0]])

    def estimates(engine: str) -> np.ndarray:
        out = []
        with driver.open("ideal", seed=5) as dev:
            dev.load_matrix(A)
            dev.load_vector(np.zeros(2), scale=1.0)
            dev.set_noise(0.5)
            dev.run(50.0, 0.0, engine="transient")
            for _ in range(60):
                assert dev.run(1000.0, 0.0, engine=engine, record_lags=(0, 2)).engine == engine
                moments = dev.read_lagged()
                out.append(moments.covariance(2) @ np.linalg.inv(moments.covariance(0)))
        return np.array(out)

    stepped, drawn = estimates("transient"), estimates("exact")
    error = np.sqrt((stepped.var(axis=0) + drawn.var(axis=0)) / 60)
    assert np.all(np.abs(stepped.mean(axis=0) - drawn.mean(axis=0)) < 4.0 * error)
    np.testing.assert_allclose(stepped.std(axis=0), drawn.std(axis=0), rtol=0.35)
    # and both estimate e^{-A} (a = A / 2 programmed, a lag of 2 tau): 4 standard errors of a mean of 60,
    # plus the ratio's O(tau_c / t) bias, 2 tau_c / t = 2 * 2.5 / 1000 = 0.005 (tau_c = 2 / lambda_min(A))
    assert np.all(np.abs(drawn.mean(axis=0) - scipy.linalg.expm(-A)) < 4.0 * drawn.std(axis=0) / np.sqrt(60) + 0.005)


def test_same_bits_over_tcp_as_in_process():
    """record_lags and READ_LAGGED travel the wire: expnegm over loopback TCP equals the in-process one
    bit for bit (same spec, seed and calls)."""
    from served import open_device

    results = []
    for transport in ("in-process", "tcp"):
        with open_device("spu-8-lc", 4, transport) as dev:
            results.append(driver.linalg.expnegm(dev, THERMOX_A, t=2e4))
    np.testing.assert_array_equal(results[0], results[1])
