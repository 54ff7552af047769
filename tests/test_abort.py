"""Abortable runs (issue 13): a transient run goes in chunks with the bits of one call, Ctrl-C stops it
in process, ABORT stops it on the wire (from the holder or a second connection of its host), and the
server's max_run_s caps its wall time.  A stopped run is discarded: the device is as before it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import driver
from driver.protocol import Opcode
from spu_emulator import Firmware, chunks, load_spec
from spu_emulator.server import DeviceServer

A = np.array([[2.0, 0.4, 0.0, 0.1], [0.4, 1.5, 0.2, 0.0], [0.0, 0.2, 1.0, 0.3], [0.1, 0.0, 0.3, 1.2]])
B = np.array([0.2, -0.1, 0.3, 0.05])
LONG = 5e5  # tau: a transient run of many seconds on spu-8


def _snapshot(firmware: Firmware) -> tuple:
    """Everything a run changes: the analog state, the noise stream, the status, the last run's reads."""
    status = firmware.handle(Opcode.STATUS)[1]
    mean = firmware.handle(Opcode.READ_MEAN)
    return firmware.analog_state().tobytes(), str(firmware.rng.bit_generator.state), status, str(mean)


def _run(spec: str, max_chunk_steps: int | None, monkeypatch) -> dict:
    """One device's transient runs (recording snapshots with a stride, second moments, lags) and its reads;
    max_chunk_steps None: each run in one kernel call."""
    monkeypatch.setattr(chunks, "_FIRST_FLOPS", 1e30 if max_chunk_steps is None else 1.0)
    out = {}
    with driver.open(spec, seed=11) as dev:
        dev.transport.firmware.max_chunk_steps = max_chunk_steps
        if spec == "tngd-sim":
            J = np.random.default_rng(0).standard_normal((6, 40)) * 0.1
            dev.load_matrix(driver.GGN(J, np.eye(6), damping=0.5))
            b = np.linspace(-0.2, 0.2, 40)
        else:
            dev.load_matrix(A)
            b = B
        dev.load_vector(b, scale="auto")
        dev.run(t=40.0, burn_in=7.3, engine="transient", record_samples=9, sample_stride=3, record_cov=True)
        out["mean"], out["samples"], out["cov"] = dev.read_mean(), dev.read_samples(), dev.read_cov()
        dev.run(t=12.0, burn_in=2.0, engine="transient")  # a second run continues the first's chain
        out["mean2"] = dev.read_mean()
        if spec == "spu-8":
            dev.run(t=20.0, burn_in=5.0, engine="transient", record_lags=[0, 2])
            lagged = dev.read_lagged()
            out["lagged"], out["lagged_mean"] = lagged.sums, lagged.mean
        out["state"] = dev.transport.firmware.analog_state()
        out["rng"] = str(dev.transport.firmware.rng.bit_generator.state)
    return out


@pytest.mark.filterwarnings("ignore::driver.SettlingWarning")  # short burn-ins: bits, not answers, matter here
@pytest.mark.parametrize("spec", ["spu-8", "spu-8-lc", "tngd-sim"])
def test_a_run_in_chunks_gives_the_bits_of_one_call(spec, monkeypatch):
    whole = _run(spec, None, monkeypatch)  # one kernel call per run
    for size in (1, 7, 64):  # chunks of one conversion period and up, rounded up to stride boundaries
        chunked = _run(spec, size, monkeypatch)
        for name, value in whole.items():
            if isinstance(value, str):
                assert chunked[name] == value, (spec, size, name)
            else:
                assert np.array_equal(np.asarray(chunked[name]), np.asarray(value)), (spec, size, name)


@contextlib.contextmanager
def _ctrl_c_in(seconds: float):
    """SIGINT to this process from another one after ``seconds``, as a terminal's Ctrl-C comes: not from a
    thread of this process, which would wait for the interpreter (held by a kernel) before it could send.
    Yields a function giving the wall-clock time (time.time) it was sent."""
    code = f"import os, signal, time; time.sleep({seconds}); print(time.time(), flush=True); os.kill({os.getpid()}, 2)"
    killer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        yield lambda: float(killer.stdout.readline())
    finally:
        killer.wait(10)


def _long_run_device() -> driver.Device:
    dev = driver.open("spu-8", seed=5)
    dev.load_matrix(A)
    dev.load_vector(B, scale="auto")
    dev.run(t=20.0, burn_in=10.0, engine="transient")
    return dev


def test_ctrl_c_stops_an_in_process_run_within_half_a_second_and_discards_it():
    with _long_run_device() as dev:
        firmware = dev.transport.firmware
        before = _snapshot(firmware)
        with _ctrl_c_in(1.0) as sent, pytest.raises(KeyboardInterrupt):
            dev.run(t=LONG, burn_in=1.0, engine="transient")
        stopped = time.time() - sent()
        assert stopped < 0.5, f"Ctrl-C took {stopped:.2f} s to stop the run"
        assert _snapshot(firmware) == before  # discarded: state, noise stream, counters and reads as before
        # and the device goes on as if the run had never been asked for
        dev.run(t=20.0, burn_in=10.0, engine="transient")
        after = dev.read_mean()
    with _long_run_device() as twin:
        twin.run(t=20.0, burn_in=10.0, engine="transient")
        assert np.array_equal(twin.read_mean(), after)


# -- over the wire -------------------------------------------------------------------------------------------
def _served(**options) -> DeviceServer:
    return DeviceServer(Firmware(load_spec("spu-8"), seed=5), "127.0.0.1", 0, **options).start()


def _prepared(url: str, **options) -> driver.Device:
    dev = driver.open(url, timeout=120, **options)
    dev.load_matrix(A)
    dev.load_vector(B, scale="auto")
    dev.run(t=20.0, burn_in=10.0, engine="transient")
    return dev


def _device_snapshot(dev: driver.Device) -> tuple:
    """What a run changes, read through the protocol: counters, flags, the window's mean codes."""
    status = dev.transport.request(int(Opcode.STATUS))[1]
    mean = dev.transport.request(int(Opcode.READ_MEAN))[1]["mean_codes"]
    return status["runs"], status["word"], status["samples"], mean.tobytes()


def test_abort_from_a_second_connection_stops_the_run_and_discards_it():
    with _served() as server, _prepared(server.url) as dev:
        before = _device_snapshot(dev)
        outcome: list[object] = []

        def run() -> None:
            try:
                dev.run(t=LONG, burn_in=1.0, engine="transient")
                outcome.append("finished")
            except BaseException as exc:  # noqa: BLE001 - the test reads what it was
                outcome.append(exc)
            outcome.append(time.perf_counter())

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(1.0)
        sent = time.perf_counter()
        assert driver.tcp.abort(server.url) is True
        thread.join(10)
        assert isinstance(outcome[0], driver.RunAbortedError), outcome
        assert "another connection" in str(outcome[0]) and "state it had before" in str(outcome[0])
        assert outcome[1] - sent < 0.5
        assert _device_snapshot(dev) == before
        assert driver.tcp.abort(server.url) is False  # nothing running now


def test_ctrl_c_over_tcp_aborts_the_run_on_the_device_and_keeps_the_link():
    with _served() as server, _prepared(server.url) as dev:
        before = _device_snapshot(dev)
        with _ctrl_c_in(1.0) as sent, pytest.raises(KeyboardInterrupt):
            dev.run(t=LONG, burn_in=1.0, engine="transient")
        stopped = time.time() - sent()
        assert stopped < 0.5, f"Ctrl-C took {stopped:.2f} s to stop the served run"
        assert dev.transport.connected  # the link stayed in step: ABORTED, then the ABORT's reply, were read
        assert _device_snapshot(dev) == before


def test_the_server_stops_a_run_past_max_run_s():
    with _served(max_run_s=0.5) as server, _prepared(server.url) as dev:
        before = _device_snapshot(dev)
        started = time.perf_counter()
        with pytest.raises(driver.RunAbortedError, match=r"limit of 0.5 s .*max-run-seconds"):
            dev.run(t=LONG, burn_in=1.0, engine="transient")
        assert time.perf_counter() - started < 2.0
        assert _device_snapshot(dev) == before
        dev.run(t=20.0, burn_in=10.0, engine="transient")  # a run within the limit is served


def test_abort_from_a_second_connection_needs_the_token_when_there_is_one():
    token = "0123456789abcdef-abort-token"
    with _served(token=token) as server, _prepared(server.url, token=token) as dev:
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(_catch(dev)))
        thread.start()
        time.sleep(1.0)
        with pytest.raises(driver.AuthenticationError):
            driver.tcp.abort(server.url)  # no token: refused, and the run goes on
        assert thread.is_alive()
        assert driver.tcp.abort(server.url, token=token) is True
        thread.join(10)
        assert isinstance(outcome[0], driver.RunAbortedError)


def _catch(dev: driver.Device) -> object:
    try:
        return dev.run(t=LONG, burn_in=1.0, engine="transient")
    except driver.SpuError as exc:
        return exc
