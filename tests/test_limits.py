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


# -- read_samples in pieces ----------------------------------------------------------------------------------
def _recorded_device(url_or_spec: str, seed: int = 4) -> driver.Device:
    dev = driver.open(url_or_spec, seed=seed) if not url_or_spec.startswith("tcp://") else driver.open(url_or_spec)
    dev.load_matrix(np.array([[2.0, 0.3, 0.0], [0.3, 1.5, 0.2], [0.0, 0.2, 1.0]]))
    dev.load_vector(np.array([0.2, -0.1, 0.3]), scale="auto")
    dev.run(t=40.0, burn_in=20.0, record_samples=10, sample_stride=2)
    return dev


@pytest.mark.parametrize("where", ["in-process", "tcp"])
def test_read_samples_reads_a_large_recording_in_pieces(where, monkeypatch):
    from spu_emulator import Firmware, load_spec
    from spu_emulator.server import DeviceServer

    with _recorded_device("spu-8") as whole_dev:
        whole = whole_dev.read_samples()
        first = whole_dev.read_samples(4)
    monkeypatch.setattr(driver.readout, "SAMPLES_REPLY_BYTES", 3 * 8 * 3)  # 3 rows of n = 3 per request
    if where == "tcp":
        server = DeviceServer(Firmware(load_spec("spu-8"), seed=4), "127.0.0.1", 0).start()
        dev = _recorded_device(server.url)
    else:
        server, dev = None, _recorded_device("spu-8")
    try:
        calls = dev.timeline.calls
        pieces = dev.read_samples()
        assert dev.timeline.calls - calls == 4  # 10 snapshots: 1 (sized by spu-8's 8 cells), then 3, 3, 3
        assert np.array_equal(pieces, whole) and np.array_equal(dev.read_samples(4), first)
    finally:
        dev.close()
        if server is not None:
            server.shutdown()


def test_read_samples_start_is_checked_on_the_device():
    from driver.protocol import Opcode, Status

    with _recorded_device("spu-8") as dev:
        firmware = dev.transport.firmware
        status, whole = firmware.handle(Opcode.READ_SAMPLES, {})
        status, part = firmware.handle(Opcode.READ_SAMPLES, {"start": 7})
        assert status == Status.OK and np.array_equal(part["codes"], whole["codes"][7:]) and part["recorded"] == 10
        status, part = firmware.handle(Opcode.READ_SAMPLES, {"start": 2, "k": 3})
        assert np.array_equal(part["codes"], whole["codes"][2:5])
        status, reply = firmware.handle(Opcode.READ_SAMPLES, {"start": 8, "k": 3})
        assert status == Status.BAD_STATE and "record_samples >= 11" in reply["message"]
        assert firmware.handle(Opcode.READ_SAMPLES, {"start": 10})[0] == Status.BAD_STATE
        status, reply = firmware.handle(Opcode.READ_SAMPLES, {"start": -1})
        assert status == Status.BAD_ARGUMENT and "start = -1" in reply["message"]


@pytest.mark.slow
def test_the_largest_recording_the_device_accepts_is_read_over_tcp():
    """2^25 snapshot values (256 MiB, the wire's largest payload) recorded on 1,024 cells and read back."""
    from spu_emulator import Firmware, load_spec
    from spu_emulator.recording import _MAX_SNAPSHOT_VALUES
    from spu_emulator.server import DeviceServer

    n = 1024
    k = _MAX_SNAPSHOT_VALUES // n
    spec = load_spec("ideal", {"adc.sample_rate": 100.0})
    with DeviceServer(Firmware(spec, seed=0), "127.0.0.1", 0).start() as server:
        with driver.open(server.url, timeout=600) as dev:
            J = np.full((1, n), 0.01)
            dev.load_matrix(driver.GGN(J, np.eye(1), damping=1.0))
            dev.load_vector(np.linspace(-0.5, 0.5, n))
            dev.run(t=k / 100.0 + 2.0, burn_in=1.0, record_samples=k)
            samples = dev.read_samples()
    assert samples.shape == (k, n) and np.all(np.isfinite(samples))
    # b sums to 0, so it is an eigenvector of J^T J + I with eigenvalue 1: the settled state is b itself
    assert np.allclose(samples[-1], np.linspace(-0.5, 0.5, n), atol=1e-6)


# -- the memory budget -----------------------------------------------------------------------------------------
def test_loads_and_recordings_over_the_memory_budget_are_refused_naming_it():
    from driver.protocol import Opcode, Status

    small = {"memory.budget_bytes": 2**20}  # 1 MiB: 131,072 values
    with driver.open("spu-8", seed=0, overrides=small) as dev:
        firmware = dev.transport.firmware
        rows = 300  # 8 (4 * 300 * 8 + 3 * 300^2) bytes = 2.2 MB
        request = {
            "j_codes": np.ones((rows, 8), dtype=np.int8),
            "h_codes": np.eye(rows, dtype=np.int8),
            "damping_code": np.array([5], dtype=np.int8),
        }
        status, reply = firmware.handle(Opcode.LOAD_GGN, request)
        assert status == Status.BAD_ARGUMENT and "memory.budget_bytes" in reply["message"], reply
        assert "m = 300 rows" in reply["message"] and "smaller batch" in reply["message"]
        assert firmware.handle(Opcode.STATUS)[1]["matrix_n"] == 0 and firmware._ggn_arrays == {}
        dev.load_matrix(np.diag([2.0, 1.5, 1.0]))
        dev.load_vector(np.array([0.1, 0.2, -0.1]), scale="auto")
        runs = dev.status().runs
        with pytest.raises(InvalidInputError, match=r"recording .*memory\.budget_bytes"):
            dev.run(t=2e4, burn_in=10.0, record_samples=50_000)  # 8 * 3 * 50,000 = 1.2 MB
        assert dev.status().runs == runs
        dev.run(t=2e4, burn_in=10.0, record_samples=4000)  # 96 kB: fits
    with pytest.raises(driver.SpecError, match="memory.budget_bytes"):
        driver.open("spu-8", overrides={"memory.budget_bytes": 1000})  # below the schema's 1 MiB minimum
    with driver.open("ideal", seed=0, overrides=small) as dev:
        with pytest.raises(InvalidInputError, match=r"dense load of size 200 .*memory\.budget_bytes"):
            dev.load_matrix(np.eye(200))  # 6 * 8 * 200^2 = 1.9 MB


def test_reset_frees_the_caches_of_the_last_loads():
    from driver.protocol import Opcode

    with driver.open("spu-8", seed=0) as dev:
        firmware = dev.transport.firmware
        dev.load_matrix(driver.GGN(np.ones((50, 8)) * 0.1, np.eye(50), damping=0.5))
        dev.load_matrix(np.eye(4) * 2.0)
        assert firmware._ggn_arrays and firmware._ggn_mismatch_cache is not None
        assert firmware._mismatch_cache is not None
        firmware.handle(Opcode.RESET)
        assert firmware._ggn_arrays == {} and firmware._ggn_mismatch_cache is None
        assert firmware._mismatch_cache is None


def test_a_load_drops_the_model_of_the_array_it_replaces():
    """A load that passes its checks drops the exact engine's model of the old array before programming the
    new one (so a large load never holds two); a refused load keeps it; the next run makes the new one."""
    a = np.diag([2.0, 1.5, 1.0])
    b = np.array([0.1, 0.2, -0.1])
    with driver.open("ideal", seed=0) as dev:
        firmware = dev.transport.firmware
        dev.load_matrix(a)
        dev.load_vector(b)
        dev.run(t=50.0, burn_in=25.0)
        model = firmware._linear
        assert model is not None
        with pytest.raises(InvalidInputError):
            dev.load_matrix(np.full((2, 3), 1.0))
        assert firmware._linear is model
        dev.load_matrix(a)
        assert firmware._linear is None and firmware._linear_for is None and firmware._limits == {}
        dev.load_vector(b)
        dev.run(t=50.0, burn_in=25.0)
        assert firmware._linear is not None and firmware._linear is not model
        np.testing.assert_allclose(dev.read_mean(), np.linalg.solve(a, b), rtol=1e-9)


def test_the_server_allocates_a_payload_as_its_bytes_arrive():
    """A header that declares 200 MiB and sends 1 kB leaves the device process about 1 MiB larger, not 200."""
    import socket
    import struct
    import time
    import zlib

    from spu_emulator import Firmware, load_spec, wire
    from spu_emulator.protocol import PROTOCOL_VERSION
    from spu_emulator.server import DeviceServer

    def rss_mb(pid: int) -> float:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    with DeviceServer(Firmware(load_spec("ideal"), seed=0), "127.0.0.1", 0).start() as server:
        with driver.open(server.url) as dev:  # the device process's first commands: its imports are warm
            dev.status()
        time.sleep(0.2)
        before = rss_mb(server.device_pid)
        head = struct.pack("<4sBBHHHIII", wire.MAGIC, PROTOCOL_VERSION, 0, 8, 0, 0, 1, 200 << 20, 0)
        sock = socket.create_connection(server.address, timeout=5)
        try:
            sock.sendall(head + struct.pack("<I", zlib.crc32(head)) + bytes(1024))
            time.sleep(0.5)
            grew = rss_mb(server.device_pid) - before
        finally:
            sock.close()
    assert grew < 20.0, f"the device process grew by {grew:.0f} MiB for 1 kB of a declared 200 MiB payload"
