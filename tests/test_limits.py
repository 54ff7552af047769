"""Bounds on what one client or one call can make the driver, the device or its server hold (issue 13:
availability and memory): the bounded call timeline with exact totals, sample_gaussian's n, and the
server's idle timeout, BUSY when the waiting slots are full and its per-request wall-time cap."""

from __future__ import annotations

import numpy as np
import pytest

import driver
from driver import InvalidInputError
from driver.sampling import MAX_SAMPLE_VALUES


# -- Device.timeline ---------------------------------------------------------------------------------
def _calls(dev, count):
    for _ in range(count):
        dev.load_vector([0.1, 0.2])


def test_timeline_keeps_the_last_calls_and_exact_totals():
    with driver.open("ideal", seed=1) as dev:
        assert dev.timeline.maxlen == driver.Device.timeline_length == 1000
        dev.timeline.maxlen = 5
        dev.load_matrix(np.eye(2))
        _calls(dev, 4)
        held = list(dev.timeline)
        assert len(held) == 5 and dev.timeline.calls == 5 and dev.timeline.dropped == 0
        # with nothing dropped, the totals are the sums over the records, bit for bit
        assert dev.timeline.device_time == sum(r.device_time for r in held)
        assert dev.timeline.hardware_s == sum(r.device_time.total_s for r in held)
        _calls(dev, 7)
        assert len(dev.timeline) == 5 and dev.timeline.calls == 12 and dev.timeline.dropped == 7
        assert [r.call for r in dev.timeline] == ["load_vector"] * 5
        one = held[-1].device_time.total_s
        assert dev.timeline.hardware_s == pytest.approx(held[0].device_time.total_s + 11 * one, rel=1e-12)
        dev.timeline.maxlen = 2
        assert len(dev.timeline) == 2 and dev.timeline.calls == 12
        with pytest.raises(InvalidInputError, match="maxlen"):
            dev.timeline.maxlen = -1


def test_a_tngd_step_times_its_own_calls_when_the_timeline_has_dropped_them():
    from driver.tngd import TNGD

    F = np.array([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]])
    grads = np.random.default_rng(3).normal(size=(3, 3)) * 0.1
    steps = {}
    for maxlen in (1000, 1):  # the same device and steps; with maxlen=1 every step outlives its records
        with driver.open("ideal", seed=2) as dev:
            dev.timeline.maxlen = maxlen
            opt = TNGD(dev, lr=0.1, damping=0.5, t=4.0)
            steps[maxlen] = []
            for grad in grads:
                opt.natural_gradient(grad, F=F)
                steps[maxlen].append(opt.last_record.hardware_time_s)
            assert (dev.timeline.dropped > 0) == (maxlen == 1)
            full = dev.timeline.hardware_s
    assert all(s > 0 for s in steps[1000])
    assert steps[1] == pytest.approx(steps[1000], rel=1e-12)
    assert sum(steps[1]) == pytest.approx(full, rel=1e-12)


# -- sample_gaussian's n -----------------------------------------------------------------------------
def test_sample_gaussian_refuses_an_n_over_the_buffer_naming_n_before_any_call():
    with driver.open("ideal", seed=1) as dev:
        too_many = MAX_SAMPLE_VALUES // 2 + 1
        with pytest.raises(InvalidInputError, match=r"n = \d+ .*limit of 33554432") as caught:
            driver.sampling.sample_gaussian(dev, np.zeros(2), np.eye(2), n=too_many)
        assert "record_samples" not in str(caught.value)
        assert f"n <= {MAX_SAMPLE_VALUES // 2}" in str(caught.value)
        assert dev.timeline.calls == 0
        with pytest.raises(InvalidInputError, match=r"n = 1000000000 "):
            driver.sampling.sample_gaussian(dev, np.zeros(2), np.eye(2), n=10**9)


# -- the server ------------------------------------------------------------------------------------
def test_the_server_drops_a_silent_holder_by_default_and_answers_busy_past_the_waiting_slots():
    import socket
    import time

    from spu_emulator import Firmware, load_spec, wire
    from spu_emulator.server import DeviceServer

    assert wire.TIMING.idle_timeout_s == 300.0
    firmware = Firmware(load_spec("ideal"), seed=1)
    assert DeviceServer.__init__.__kwdefaults__["idle_timeout"] == 300.0
    with DeviceServer(firmware, "127.0.0.1", 0, max_connections=2, busy_timeout=3.0, idle_timeout=0.5) as server:
        silent = [socket.create_connection(server.address, timeout=5) for _ in range(4)]  # holder + 2 slots + 1
        try:
            deadline = time.monotonic() + 3.0
            while server.holder is None and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(driver.DeviceBusyError, match="held by"):
                driver.open(server.url, timeout=5)
        finally:
            for sock in silent:
                sock.close()
        deadline = time.monotonic() + 5.0  # the silent holder is dropped after 0.5 s
        while time.monotonic() < deadline:
            try:
                with driver.open(server.url, timeout=5) as dev:
                    assert dev.info.name
                break
            except driver.DeviceBusyError:
                time.sleep(0.1)
        else:
            pytest.fail("the device was not freed")
