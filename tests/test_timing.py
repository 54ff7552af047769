"""The hardware timing model (DESIGN 4.6, spu_emulator/timing.py): every load, run and read reports what
it would take on the device its spec describes.

The expected numbers are worked out by hand here from the spec's fields (bits, link rate, tau, row
programming time, sample rate), not taken from the model's code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import driver
from spu_emulator.spec import SPEC_DIR, read_yaml


def write_spec(directory: Path, name: str, changes: dict[str, object], base: str = "ideal") -> Path:
    spec = read_yaml((SPEC_DIR / f"{base}.yaml").read_text())
    spec["name"] = name
    for key, value in changes.items():
        section, field = key.split(".")
        spec[section][field] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# a small board: 8-bit elements, 12-bit DAC, 10-bit ADC, 2 Gb/s, tau = 10 kOhm * 1 nF = 10 us, 4 us a row,
# 4 conversions per tau
BOARD = {
    "cells.count": 64,
    "coupling.element_bits": 8,
    "dac.bits": 12,
    "adc.bits": 10,
    "adc.range_v": 4.0,
    "adc.sample_rate": 4.0,
    "timing.link_rate_gbps": 2.0,
    "timing.r0_ohm": 10_000.0,
    "timing.c0_farad": 1e-9,
    "timing.program_row_s": 4e-6,
}


def test_each_call_follows_the_formula(tmp_path):
    """n = 5, a dense load, a vector, a run of 30 tau with 100 samples, a mean and a snapshot."""
    path = write_spec(tmp_path, "board", BOARD)
    n = 5
    A = 2.0 * np.eye(n) + 0.1
    with driver.open(path, seed=0) as dev:
        load = dev.load_matrix(A)
        vector = dev.load_vector(np.linspace(-1.0, 1.0, n))
        run = dev.run(30.0, burn_in=5.0, engine="exact")
        dev.read_mean()
        dev.read_state()
        timeline = list(dev.timeline)
    rate = 2e9  # bits per second
    tau = 1e-5
    assert load.device_time == driver.DeviceTime(link_s=25 * 8 / rate, program_s=5 * 4e-6)
    assert vector.device_time == driver.DeviceTime(link_s=5 * 12 / rate)
    assert run.samples == 100  # (30 - 5) tau at 4 per tau
    assert run.device_time == driver.DeviceTime(analog_s=pytest.approx(30.0 * tau, rel=1e-15))
    assert run.device_time.analog_s == pytest.approx(run.seconds, rel=1e-15)
    # the mean: 5 sums of 100 ten-bit codes, 10 + ceil(log2 100) = 17 bits each
    assert [record.call for record in timeline] == ["load_matrix", "load_vector", "run", "read_mean", "read_state"]
    assert timeline[3].device_time == driver.DeviceTime(link_s=5 * 17 / rate)
    # the snapshot: one conversion (1/4 tau) and 5 ten-bit codes
    assert timeline[4].device_time == driver.DeviceTime(link_s=5 * 10 / rate, convert_s=pytest.approx(tau / 4))
    total = sum(record.device_time for record in timeline)
    assert total.total_s == pytest.approx(
        (25 * 8 + 5 * 12 + 5 * 17 + 5 * 10) / rate + 5 * 4e-6 + 30 * tau + tau / 4, rel=1e-12
    )
    assert all(record.wall_time_s > 0 for record in timeline)


def test_ggn_load_follows_the_formula(tmp_path):
    """J (3, 40): m N + m^2 + 1 = 130 eight-bit codes over the link; 2m + N + 1 = 47 rows programmed."""
    path = write_spec(tmp_path, "board", BOARD)
    ggn = driver.GGN(np.ones((3, 40)), np.eye(3), 0.5)
    with driver.open(path, seed=0) as dev:
        report = dev.load_matrix(ggn)
        assert dev.last_call_time == report.device_time
    assert report.device_time == driver.DeviceTime(link_s=130 * 8 / 2e9, program_s=pytest.approx(47 * 4e-6))


def test_doubling_n_doubles_the_link_time_of_a_ggn_load():
    """tngd-sim (16 bits, 50 Gb/s): the link carries 16 (m N + m^2 + 1) bits, so going from N to 2N adds
    exactly the time of N more columns of J: link(2N) - link(N) = link(N) - link(0-column part), and the
    ratio is 2 up to the H and damping codes."""
    m = 8
    times = {}
    for n in (1000, 2000, 4000):
        ggn = driver.GGN(np.ones((m, n)), np.eye(m), 1.0)
        with driver.open("tngd-sim", seed=0) as dev:
            times[n] = dev.load_matrix(ggn).device_time
    fixed = 16 * (m * m + 1) / 50e9
    for n in (1000, 2000):
        assert times[2 * n].link_s - fixed == pytest.approx(2 * (times[n].link_s - fixed), rel=1e-12)
        assert times[2 * n].link_s / times[n].link_s == pytest.approx(2.0, rel=(m * m + 1) / (m * n))
        assert times[n].link_s == pytest.approx(16 * (m * n + m * m + 1) / 50e9, rel=1e-12)
        assert times[n].program_s == pytest.approx((2 * m + n + 1) * 1e-9, rel=1e-12)


@pytest.mark.parametrize("engine", ["exact", "transient"])
def test_run_time_is_t_times_tau(engine):
    """On tngd-sim (tau = 1 us) a run of t tau takes t us of analog time (t as run, on the integrator's step
    grid for the transient engine) and nothing else."""
    with driver.open("tngd-sim", seed=0) as dev:
        dev.load_matrix(np.diag([1.0, 0.8, 0.6]))
        dev.load_vector(np.array([0.1, 0.2, -0.1]))
        report = dev.run(37.5, engine=engine)
    assert report.analog_time == pytest.approx(37.5, abs=report.dt)  # the transient rounds t to its step grid
    assert report.device_time.analog_s == pytest.approx(report.analog_time * 1e-6, rel=1e-12)
    assert report.device_time.link_s == report.device_time.program_s == report.device_time.convert_s == 0.0


def test_tngd_step_estimate_is_linear_in_n():
    """The paper's Fig. 2 'TNGD (estimated)': load F (GGN) and g, run t, read the mean; for fixed m the
    summed device time is a + b N exactly (three sizes on one line)."""
    m, t = 4, 50.0
    totals = []
    sizes = (500, 1000, 3000)
    for n in sizes:
        gen = np.random.default_rng(n)
        ggn = driver.GGN(gen.standard_normal((m, n)), np.eye(m), 1.0)
        with driver.open("tngd-sim", seed=0) as dev:
            scale = dev.load_matrix(ggn).scale
            dev.load_vector(gen.standard_normal(n), scale=100.0)
            dev.run(t, burn_in=t - 10.0)  # 10 samples: 16 + 4 bits a sum
            dev.read_mean()
            totals.append(sum(record.device_time for record in dev.timeline).total_s)
            assert scale > 0
    slope = (totals[1] - totals[0]) / (sizes[1] - sizes[0])
    assert totals[2] == pytest.approx(totals[0] + slope * (sizes[2] - sizes[0]), rel=1e-12)
    per_column = 16 * m / 50e9 + 16 / 50e9 + 1e-9 + 20 / 50e9  # J column, g code, a J^T row, a mean sum
    assert slope == pytest.approx(per_column, rel=1e-12)


def test_a_discarded_run_is_on_the_timeline(tmp_path):
    """A run that hits a rail raises, and its analog time still went by: the timeline keeps it, marked."""
    path = write_spec(tmp_path, "railed", {"rails.enabled": True, "rails.v_rail": 0.5, "cells.count": 2})
    with driver.open(path, seed=0) as dev:
        dev.load_matrix(np.eye(2))
        dev.load_vector(np.array([1.0, 1.0]))
        with pytest.raises(driver.SaturationError):
            dev.run(10.0, engine="transient")
        record = dev.timeline[-1]
    assert record.call == "run" and record.discarded
    assert record.device_time.analog_s == pytest.approx(10.0 * 1e-6)


def test_device_time_adds_up():
    a = driver.DeviceTime(1.0, 2.0, 3.0, 4.0)
    b = driver.DeviceTime(0.5, 0.0, 0.25, 0.0)
    assert a + b == driver.DeviceTime(1.5, 2.0, 3.25, 4.0)
    assert sum([a, b]).total_s == pytest.approx(10.75)
    assert driver.DeviceTime().total_s == 0.0
    assert math.isnan(driver.DeviceTime(link_s=math.nan).total_s)


def test_presets_give_a_row_time():
    """Every preset states its row programming time (0 for the ideal device)."""
    for name in ("ideal", "spu-8", "tngd-sim"):
        with driver.open(name, seed=0) as dev:
            assert dev.info.program_row_s >= 0.0
    with driver.open("spu-8", seed=0) as dev:
        report = dev.load_matrix(np.eye(8))
    assert report.device_time.program_s == pytest.approx(8 * 1.6e-5)
    assert report.device_time.link_s == pytest.approx(64 * 8 / 0.48e9)
