"""Regressions of the hardening issue's correctness items: every failure is a clear SpuError, and a call
that fails changes nothing on the device."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import driver
from driver.protocol import Opcode, Status
from spu_emulator import engines
from spu_emulator.spec import SPEC_DIR


def _untouched(dev: driver.Device) -> None:
    """Nothing was loaded or run: the device is as at power-on."""
    assert dev.timeline == [] and dev.status().matrix_n == 0


# -- the silent NaN -----------------------------------------------------------------------------------


def test_a_run_ending_just_below_a_sample_time_is_finite():
    """t / period rounds up past the last sample by 1e-9 periods: the tail hop must not go negative."""
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(0.5 * np.eye(2))
        dev.load_vector([0.1, 0.1])
        report = dev.run(t=100099.99999999999, engine="exact")
        assert report.engine == "exact"
        assert np.all(np.isfinite(dev.read_mean())) and np.all(np.isfinite(dev.read_state()))


def test_the_firmware_never_stores_a_non_finite_state(monkeypatch):
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(0.5 * np.eye(2))
        dev.load_vector([0.1, 0.1])
        dev.run(t=10.0, engine="exact")
        before = dev.read_state()

        def broken(model, state, fixed_point, *args):
            return np.full_like(state, np.nan), np.full_like(state, np.nan), 1

        monkeypatch.setattr(engines, "propagate", broken)
        with pytest.raises(driver.DeviceInternalError, match="non-finite state, so it was discarded"):
            dev.run(t=10.0, engine="exact")
        assert isinstance(driver.DeviceInternalError("x"), driver.SpuError)
        np.testing.assert_array_equal(dev.read_state(), before)


# -- composite calls check everything first -------------------------------------------------------------

COMPOSITE_BAD = [
    (lambda dev: driver.linalg.solve(dev, np.eye(2), [0.1, 0.1], t=-1), "t = -1.0 tau is outside"),
    (lambda dev: driver.linalg.solve(dev, np.eye(2), [0.1, 0.1], t="x"), "t must be a number of tau"),
    (lambda dev: driver.linalg.solve(dev, np.eye(2), [0.1, 0.1], t=10, burn_in=10), "burn_in = 10.0 must be in"),
    (lambda dev: driver.linalg.solve(dev, np.eye(2), np.ones(3)), "vector b has 3 entries but the matrix is 2 x 2"),
    (lambda dev: driver.linalg.solve(dev, [[1.0, 2.0], [0.0, 1.0]], [0.1, 0.1]), "must be symmetric"),
    (lambda dev: driver.linalg.inv(dev, np.eye(2), t=-5), "t = -5.0 tau is outside"),
    (lambda dev: driver.linalg.inv(dev, np.eye(2), t=10**400), "integer of 401 digits"),
    (lambda dev: driver.linalg.sample_gaussian(dev, [0.0, 0.0], np.eye(2), 0), "n = 0 samples"),
    (lambda dev: driver.linalg.sample_gaussian(dev, [0.0, 0.0], -np.eye(2), 5), "positive definite"),
]


@pytest.mark.parametrize("call, message", COMPOSITE_BAD)
def test_composite_calls_refuse_before_the_first_device_call(call, message):
    with driver.open("spu-8", seed=0) as dev:
        with pytest.raises(driver.InvalidInputError, match=message) as error:
            call(dev)
        assert isinstance(error.value, ValueError)
        _untouched(dev)


def test_solve_that_saturates_says_what_is_loaded():
    with driver.open("spu-8", seed=0) as dev:
        with pytest.raises(driver.SaturationError, match="The device now holds A and b"):
            driver.linalg.solve(dev, np.array([[1.0, 0.0], [0.0, -1.0]]), [0.5, 0.5], t=50.0)


# -- one exception type per failure ----------------------------------------------------------------------

ODD_NUMBERS = st.one_of(
    st.integers(),  # unbounded: Python ints far beyond the float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.complex_numbers(max_magnitude=10),
)


@settings(max_examples=150, deadline=None)
@given(value=ODD_NUMBERS, which=st.sampled_from(["t", "burn_in", "scale", "kappa0", "lr", "damping"]))
def test_any_scalar_is_accepted_or_refused_as_bad_input(value, which):
    """Whatever a scalar argument is, the driver takes it or raises InvalidInputError (also a ValueError)."""
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(np.eye(2))
        dev.load_vector([0.1, 0.1])
        calls = {
            "t": lambda: dev.run(t=value),
            "burn_in": lambda: dev.run(t=1.0, burn_in=value),
            "scale": lambda: dev.load_vector([0.1, 0.1], scale=value),
            "kappa0": lambda: dev.set_noise(value),
            "lr": lambda: driver.TNGD(None, lr=value, damping=1.0, solver="exact"),
            "damping": lambda: driver.GGN(np.ones((1, 2)), np.ones((1, 1)), value),
        }
        try:
            calls[which]()
        except driver.InvalidInputError as error:
            assert isinstance(error, ValueError) and str(error)


def test_engine_and_on_saturation_must_be_integers_on_the_wire():
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(np.eye(2))
        dev.load_vector([0.1, 0.1])
        for field, value in (("engine", 1.0), ("engine", True), ("on_saturation", True), ("on_saturation", 0.0)):
            status, reply = dev._transport.request(int(Opcode.RUN), {"t": 1.0, "burn_in": 0.0, field: value})
            assert status == Status.BAD_ARGUMENT, (field, value)
            assert field in reply["message"]
        assert dev.status().runs == 0


def test_an_unstable_singular_drift_raises_no_linalg_warning():
    with warnings.catch_warnings(), driver.open("tngd-sim", seed=0) as dev:
        warnings.simplefilter("error")
        dev.load_matrix(np.array([[1.0, 2.0], [0.0, 1e-14]]), symmetric=False)
        dev.load_vector([0.1, 0.1])
        with pytest.raises(driver.SaturationError, match="unstable"):
            dev.run(10.0, engine="exact")


# -- specs ------------------------------------------------------------------------------------------------


def test_kappa0_above_the_noise_sources_full_scale_is_refused():
    with pytest.raises(driver.SpecError, match=r"noise.kappa0 = 1.5 is above noise.kappa0_max = 1.0"):
        driver.open("spu-8", overrides={"noise.kappa0": 1.5})


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text((SPEC_DIR / "spu-8.yaml").read_text() + "\nname: twice\n")
    with pytest.raises(driver.SpecError, match="the key 'name' appears twice"):
        driver.open(path)


def test_a_spec_nested_too_deeply_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("spec_version: 1\nname: deep\ndescription: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(driver.SpecError, match="nested too deeply"):
        driver.open(path)


# -- determinism across BLAS thread counts -----------------------------------------------------------------

_BLAS_SCRIPT = """
import hashlib, json
import numpy as np
import driver

def digest(x):
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()

rng = np.random.default_rng(7)
out = {}
with driver.open("tngd-sim", seed=0) as dev:
    n = 256  # the sizes where OpenBLAS on 1 and on 2 threads rounded differently (issue 13)
    q = rng.standard_normal((n, n))
    A = np.einsum("ik,jk->ij", q, q) / n + np.eye(n)  # einsum, not @: this script's own input must not vary
    dev.load_matrix(A)
    dev.load_vector(rng.standard_normal(n) * 0.1, scale="auto")
    out["dense_engine"] = dev.run(t=50.0, burn_in=25.0).engine
    out["dense"] = digest(dev.read_mean())
    m, big = 256, 2048
    J = rng.standard_normal((m, big)) / np.sqrt(big)
    dev.load_matrix(driver.GGN(J, np.eye(m), damping=1.0))
    dev.load_vector(rng.standard_normal(big) * 0.1, scale="auto")
    out["ggn_engine"] = dev.run(t=20.0, burn_in=10.0).engine
    out["ggn"] = digest(dev.read_mean())
print(json.dumps(out))
"""


def test_results_do_not_depend_on_the_blas_thread_count():
    """The same calls under OPENBLAS_NUM_THREADS=1 and 2 give the same bits (both failed before the
    emulator and the host's lambda_min ran their LAPACK on one thread)."""
    import json
    import os
    import subprocess
    import sys

    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, PYTHONWARNINGS="ignore")
        env.pop("SPU_EMULATOR_BLAS_THREADS", None)
        done = subprocess.run(
            [sys.executable, "-c", _BLAS_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results[0]["dense_engine"] == results[0]["ggn_engine"] == "exact"
    assert results[0] == results[1]


def test_the_fixed_blas_thread_count_is_restored_after_each_command():
    from threadpoolctl import threadpool_info, threadpool_limits

    from spu_emulator import blas

    with threadpool_limits(limits=2, user_api="blas"):
        before = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
        with blas.fixed_threads():
            inside = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
            with blas.fixed_threads():  # nested: still fixed, and the outer exit restores
                pass
            again = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
        after = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    assert before and set(before) == {2}
    assert set(inside) == set(again) == {blas.BLAS_THREADS} == {1}
    assert after == before
