"""Same spec + same seed + same calls = bit-identical results (DESIGN section 5); reset() is power-on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import driver

# spu-8 has every non-ideality on: quantisation, mismatch, offsets, injected + Johnson noise, ADC noise, rails
NOISY = "spu-8"


def _system(n: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """An SPD system whose solution stays inside spu-8's rails (b along A's top eigenvector, cond 2)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.linspace(2.0, 1.0, n)) @ q.T
    a = 0.5 * (a + a.T)
    return a, a @ (q[:, 0] + 0.1 * q[:, 1])


def _fields(report: driver.RunReport) -> dict:
    out = dataclasses.asdict(report)
    out.pop("wall_time_s")
    return out


def _session(dev: driver.Device) -> list:
    """A call sequence touching every engine and read; returns everything it read, as exact values."""
    a, b = _system()
    out = []
    dev.load_matrix(a)
    dev.load_vector(b)
    for engine, t, burn_in in [("auto", 30.0, 10.0), ("transient", 20.0, 5.0), ("exact", 40.0, 0.0)]:
        out.append(_fields(dev.run(t, burn_in, engine=engine)))
        out.append(dev.read_mean())
        out.append(dev.read_state())
    dev.load_vector(-0.5 * b)  # a second input on the same matrix, warm start from the last state
    out.append(_fields(dev.run(25.0, 5.0)))
    out.append(dev.read_mean())
    out.append(dataclasses.asdict(dev.status()))
    return out


def _digest(results: list) -> str:
    """sha256 of the exact bits of a session's results."""
    h = hashlib.sha256()
    for item in results:
        if isinstance(item, np.ndarray):
            h.update(item.dtype.str.encode() + str(item.shape).encode() + item.tobytes())
        else:
            h.update(json.dumps(item, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _assert_identical(first: list, second: list) -> None:
    assert len(first) == len(second)
    for x, y in zip(first, second, strict=True):
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
        else:
            assert x == y


def _open_session(spec, seed) -> list:
    with driver.open(spec, seed=seed) as dev:
        return _session(dev)


@pytest.mark.parametrize("spec", [NOISY, "tngd-sim", "ideal"])
def test_same_seed_same_bits(spec):
    """Two devices from the same spec and seed give the same bits for read_mean, read_state and RunReport."""
    _assert_identical(_open_session(spec, 7), _open_session(spec, 7))


def test_results_are_noisy_and_differ_between_seeds():
    """Different seeds give different devices (mismatch) and noise: the results differ."""
    first, second = _open_session(NOISY, 7), _open_session(NOISY, 8)
    means = [(x, y) for x, y in zip(first, second, strict=True) if isinstance(x, np.ndarray)]
    assert all(not np.array_equal(x, y) for x, y in means)


def test_different_seeds_give_different_parts():
    """The mismatch is drawn from the seed: the same matrix programs to different conductances."""
    a, _ = _system()
    conductances = []
    for seed in (7, 8):
        with driver.open(NOISY, seed=seed) as dev:
            dev.load_matrix(a)
            conductances.append(dev.transport.firmware.matrix.conductance.copy())
    assert not np.array_equal(*conductances)
    assert np.allclose(*conductances, rtol=0.1)  # 1 % mismatch: same nominal values


def test_spec_file_and_preset_name_give_the_same_device(tmp_path):
    """A copy of the preset's YAML opened by path is the same device as the preset name."""
    copy = tmp_path / "my-board.yaml"
    shutil.copy(Path(driver.__file__).resolve().parent.parent / "firmware_spec" / f"{NOISY}.yaml", copy)
    _assert_identical(_open_session(copy, 3), _open_session(NOISY, 3))


def test_status_and_read_mean_do_not_touch_the_noise_stream():
    """Reading status or the mean between runs does not change what later runs give."""
    a, b = _system()
    results = []
    for extra_reads in (False, True):
        with driver.open(NOISY, seed=5) as dev:
            dev.load_matrix(a)
            dev.load_vector(b)
            dev.run(20.0, 5.0, engine="transient")
            if extra_reads:
                dev.status()
                dev.read_mean()
                dev.read_mean()
            dev.run(20.0, 5.0, engine="transient")
            results.append((dev.read_mean(), dev.transport.firmware.analog_state()))
    _assert_identical(list(results[0]), list(results[1]))


def test_reset_is_power_on():
    """After reset(): nothing loaded, reads and runs refused, state 0; then the same calls give the bits of a
    freshly opened device with that seed."""
    with driver.open(NOISY, seed=9) as dev:
        _session(dev)
        dev.reset()
        status = dev.status()
        assert not (status.matrix_loaded or status.vector_loaded or status.has_run)
        assert not (status.saturated or status.adc_clipped)
        assert (status.matrix_n, status.vector_n, status.runs, status.samples) == (0, 0, 0, 0)
        assert not dev.transport.firmware.analog_state().any()
        for read in (dev.read_mean, dev.read_state):
            with pytest.raises(driver.DeviceStateError):
                read()
        with pytest.raises(driver.DeviceStateError, match="load"):
            dev.run(10.0)
        after_reset = _session(dev)
        dev.reset()
        after_second_reset = _session(dev)
    fresh = _open_session(NOISY, 9)
    _assert_identical(after_reset, fresh)
    _assert_identical(after_second_reset, fresh)


def test_reset_forgets_the_driver_scales():
    """After reset the driver refuses to run on scales of loads the device no longer has."""
    a, b = _system()
    with driver.open(NOISY, seed=9) as dev:
        dev.load_matrix(a)
        dev.load_vector(b)
        dev.reset()
        dev.load_matrix(a)
        with pytest.raises(driver.DeviceStateError, match="load"):
            dev.run(10.0)


def test_seed_none_draws_fresh_entropy_that_reproduces():
    """seed=None gives a different device each time; info.seed_entropy, passed back as the seed, repeats it."""
    with driver.open(NOISY) as first, driver.open(NOISY) as second:
        entropy = first.info.seed_entropy
        assert entropy != second.info.seed_entropy
        results = _session(first)
        assert _digest(results) != _digest(_session(second))
    assert entropy.isdigit()
    with driver.open(NOISY, seed=int(entropy)) as again:
        assert again.info.seed_entropy == entropy
        _assert_identical(_session(again), results)


def test_seeded_device_reports_its_seed():
    with driver.open(NOISY, seed=1234) as dev:
        assert dev.info.seed_entropy == "1234"


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import driver
from test_reproducibility import _digest, _session
with driver.open({spec!r}, seed=21) as dev:
    print(_digest(_session(dev)))
"""


def test_same_bits_in_another_process():
    """The bits do not depend on the process (hash seeds, numba caches, import order)."""
    expected = _digest(_open_session(NOISY, 21))
    code = _CHILD.format(tests=str(Path(__file__).parent), spec=NOISY)
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == expected
