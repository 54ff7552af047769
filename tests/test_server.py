"""The device server and the TCP transport, on loopback only.

The driver's calls give the same bits over TCP as in-process; a second host gets BUSY, not a hang;
malformed frames get an error frame or a closed connection and never touch the device; a host that
stalls or goes away mid-frame or mid-run frees the device within a bounded time; client timeouts and
lost links raise, and the next call reconnects; `spu serve` logs and stops cleanly on SIGINT/SIGTERM.
Every server here listens on 127.0.0.1 on a free port and is shut down by the test that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import driver
from driver.protocol import Opcode, Status
from spu_emulator import Firmware, load_spec, wire
from spu_emulator.server import DeviceServer

SPEC, SEED = "spu-8", 5
_Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
A = _Q @ np.diag([2.0, 1.7, 1.4, 1.1]) @ _Q.T
A = 0.5 * (A + A.T)
B = 0.4 * A @ _Q[:, 0]  # the nodes settle well inside spu-8's rails
B_RAILS = A @ _Q[:, 3]  # along the weakest mode, at the DAC's full scale: beyond the rails, the run saturates


@contextlib.contextmanager
def serving(spec: str = SPEC, seed: int | None = SEED, port: int = 0, **timeouts):
    server = DeviceServer(Firmware(load_spec(spec), seed=seed), "127.0.0.1", port, **timeouts).start()
    try:
        yield server
    finally:
        server.shutdown(timeout=5.0)


@pytest.fixture
def server():
    with serving(frame_timeout=1.0, busy_timeout=1.0) as running:
        yield running


def _wait_until(condition, limit_s: float, what: str) -> float:
    """Poll ``condition`` every 10 ms for at most ``limit_s``; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            pytest.fail(f"{what} did not happen within {limit_s} s")
        time.sleep(0.01)
    return time.monotonic() - started


def _same_bits(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(_same_bits(p, q) for p, q in zip(x, y, strict=True))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_bits(x[k], y[k]) for k in x)
    if isinstance(x, float):
        return isinstance(y, float) and struct.pack("<d", x) == struct.pack("<d", y)
    return x == y


# -- the driver's calls over both transports ------------------------------------------------


@pytest.fixture(params=["in-process", "tcp"])
def open_device(request):
    """Opens a fresh device (spec, seed) over the transport of this parametrisation."""
    servers = []

    def opener(spec: str = SPEC, seed: int = SEED) -> driver.Device:
        if request.param == "in-process":
            return driver.open(spec, seed=seed)
        server = DeviceServer(Firmware(load_spec(spec), seed=seed), "127.0.0.1", 0).start()
        servers.append(server)
        return driver.open(server.url, seed=seed, timeout=30.0)

    yield opener
    for server in servers:
        server.shutdown()


def _outcome(call):
    """What a call gave: its value (dataclasses as dicts, wall time dropped), or its error class and
    the device's message without the device's label."""
    try:
        value = call()
    except driver.SpuError as exc:
        message = str(exc)
        return type(exc).__name__, message[message.find("refused") :] if "refused" in message else message
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
        value.pop("wall_time_s", None)
    return value


def _session(dev: driver.Device) -> list:
    """A representative set of Device calls, good and bad; returns everything, as exact values."""
    out = [_outcome(lambda: {k: v for k, v in dataclasses.asdict(dev.info).items()})]
    out.append(_outcome(dev.read_mean))  # DeviceStateError from the device: no run yet
    out.append(_outcome(lambda: dev.load_matrix(np.full((3, 3), np.nan))))  # InvalidInputError, host side
    out.append(_outcome(lambda: dev.load_matrix(A)))
    out.append(_outcome(lambda: dev.load_vector(B[:3])))
    out.append(_outcome(lambda: dev.run(10.0)))  # DeviceStateError from the device: 4x4 matrix, 3 inputs
    out.append(_outcome(lambda: dev.load_vector(B_RAILS)))
    out.append(_outcome(lambda: dev.run(20.0, 5.0, engine="transient")))  # SaturationError
    out.append(_outcome(lambda: dev.run(20.0, 5.0, engine="transient", on_saturation="flag")))
    out.append(_outcome(lambda: dev.load_vector(B)))
    for engine in ("auto", "transient", "exact"):
        out.append(_outcome(lambda engine=engine: dev.run(30.0, 10.0, engine=engine)))
        out.append(_outcome(dev.read_mean))
        out.append(_outcome(dev.read_state))
    out.append(_outcome(dev.status))
    out.append(_outcome(dev.reset))
    out.append(_outcome(dev.status))
    out.append(_outcome(dev.read_state))  # DeviceStateError after reset
    out.append(_outcome(lambda: dev.load_matrix(A)))
    out.append(_outcome(lambda: dev.load_vector(-B)))
    out.append(_outcome(lambda: dev.run(25.0, 5.0)))
    out.append(_outcome(dev.read_mean))
    dev.close()
    out.append(_outcome(dev.read_mean))  # DeviceClosedError
    out.append(_outcome(dev.close))  # twice is fine
    return out


def test_driver_calls_are_bit_identical_over_either_transport(open_device):
    """load, run (every engine), read_mean, read_state, status, reset, and the errors (bad input, read
    before run, saturation, use after close) give the same values, bits and error classes over TCP as
    in-process, for the same spec and seed."""
    got = _session(open_device())
    with driver.open(SPEC, seed=SEED) as reference_device:
        reference = _session(reference_device)
    kinds = [item[0] for item in reference if isinstance(item, tuple)]
    assert kinds == ["DeviceStateError", "InvalidInputError", "DeviceStateError", "SaturationError"] + [
        "DeviceStateError",
        "DeviceClosedError",
    ]
    _assert_same_session(got, reference)


def _assert_same_session(got: list, reference: list) -> None:
    assert len(got) == len(reference)
    for i, (x, y) in enumerate(zip(got, reference, strict=True)):
        if isinstance(y, tuple) and y[0] == "DeviceClosedError":
            assert x[0] == y[0]  # its message names the device
            continue
        assert _same_bits(x, y), f"call {i}: {x!r} != {y!r}"


@pytest.mark.parametrize("spec", ["ideal", "tngd-sim"])
def test_other_presets_over_tcp(open_device, spec):
    """The continuous (float64 codes) and 16-bit presets give the in-process bits too."""
    n = 6
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))
    a = q @ np.diag(np.linspace(2.0, 1.0, n)) @ q.T
    a = 0.5 * (a + a.T)
    results = []
    for dev in (open_device(spec, 2), driver.open(spec, seed=2)):
        with dev:
            dev.load_matrix(a)
            dev.load_vector(0.3 * a @ q[:, 0])
            results.append((_outcome(lambda dev=dev: dev.run(40.0, 10.0)), dev.read_mean(), dev.read_state()))
    assert _same_bits(list(results[0]), list(results[1]))


def test_commands_added_later_cross_the_wire_unchanged(open_device):
    """LOAD_GGN (J, H, damping arrays), RUN with recording, READ_COV and READ_SAMPLES were added beside
    the codec, with no change to it: over TCP they give the in-process bits."""
    if not hasattr(driver, "GGN"):
        pytest.skip("the driver has no GGN loads yet")
    rng = np.random.default_rng(0)
    J, H = rng.standard_normal((6, 10)), np.diag(rng.uniform(0.5, 1.5, 6))
    results = []
    for dev in (open_device("tngd-sim", 1), driver.open("tngd-sim", seed=1)):
        with dev:
            dev.load_matrix(driver.GGN(J, H, 0.5))
            dev.load_vector(np.linspace(-1.0, 1.0, 10), scale=100.0)
            report = _outcome(lambda dev=dev: dev.run(30.0, 10.0, record_cov=True, record_samples=5))
            results.append([report, dev.read_mean(), dev.read_cov(), dev.read_samples(5)])
    assert _same_bits(results[0], results[1])


def test_served_seed_is_checked(server):
    with pytest.raises(driver.InvalidInputError, match=f"seed entropy {SEED}, not 6"):
        driver.open(server.url, seed=6)
    with driver.open(server.url) as dev:  # None: take the served device as it is
        assert dev.info.seed_entropy == str(SEED)


@pytest.mark.parametrize("url", ["tcp://127.0.0.1", "tcp://:5", "tcp://127.0.0.1:x", "tcp://h:5/path"])
def test_bad_address(url):
    with pytest.raises(driver.InvalidInputError, match="tcp://HOST:PORT"):
        driver.open(url)


# -- one host at a time ---------------------------------------------------------------------


def test_second_host_gets_busy_not_a_hang(server):
    first = driver.open(server.url, seed=SEED)
    first.load_matrix(A)
    started = time.monotonic()
    with pytest.raises(driver.DeviceBusyError, match=r"held by 127\.0\.0\.1:\d+.*wait for the other host"):
        driver.open(server.url, timeout=10.0)
    assert time.monotonic() - started < 2.0
    first.load_vector(B)  # the holder is not disturbed
    first.run(10.0)
    mean = first.read_mean()
    first.close()  # returns once the device has freed itself
    assert server.holder is None
    assert _runs(server) == 1  # the device keeps its state across connections
    with driver.open(server.url, seed=SEED) as second:
        assert second.status().runs == 0  # driver.open resets it, as an in-process open gives a fresh device
    assert mean.shape == (4,)


# -- timeouts and lost links ------------------------------------------------------------------


def test_nothing_listening_raises_link_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(driver.LinkError, match="could not connect.*spu serve"):
            driver.open(f"tcp://127.0.0.1:{port}", timeout=2.0)


def test_silent_device_times_out():
    """A peer that accepts but never answers: LinkTimeoutError after the timeout, not a hang."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(driver.LinkTimeoutError, match=r"no reply to INFO .* within 0\.3 s") as caught:
            driver.open(f"tcp://127.0.0.1:{port}", timeout=0.3)
        assert 0.25 < time.monotonic() - started < 3.0
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, driver.LinkError)


class _Proxy:
    """A TCP forwarder on loopback whose connections can be cut, as a network fault would cut them."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.links: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                host_side, _ = self.listener.accept()
            except OSError:
                return
            device_side = socket.create_connection(self.target)
            self.links += [host_side, device_side]
            for source, sink in ((host_side, device_side), (device_side, host_side)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.links = []

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_lost_connection_raises_then_the_next_call_reconnects(server):
    """The link is cut: the next call raises LinkError; the call after reconnects to the same device,
    whose state was kept (the same mean, and a warm start goes on)."""
    proxy = _Proxy(server.address)
    try:
        dev = driver.open(proxy.url, seed=SEED)
        dev.load_matrix(A)
        dev.load_vector(B)
        dev.run(20.0, 5.0)
        mean = dev.read_mean()
        proxy.cut()
        _wait_until(lambda: server.holder is None, 3.0, "freeing the device")
        with pytest.raises(driver.LinkError, match="the next call reconnects"):
            dev.read_mean()
        assert _same_bits(dev.read_mean(), mean)
        dev.run(5.0)
        assert dev.status().runs == 2
        dev.close()
    finally:
        proxy.close()


def test_server_gone_then_back():
    """The server goes away: calls raise LinkError (could not connect) until one is back on the port;
    a server of the same spec and seed is taken for the same device."""
    with serving() as first:
        port = first.address[1]
        dev = driver.open(first.url, seed=SEED)
        dev.status()
    with pytest.raises(driver.LinkError, match="the next call reconnects"):
        dev.status()
    with pytest.raises(driver.LinkError, match="could not connect"):
        dev.status()
    with serving(port=port):
        assert dev.status().runs == 0
        dev.close()


def test_device_process_failure_is_reported():
    server = DeviceServer(Firmware(load_spec(SPEC), seed=SEED)).start()
    try:
        dev = driver.open(server.url, seed=SEED, timeout=30.0)
        os.kill(server.device_pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(driver.LinkError) as caught:
            dev.status()
        assert not isinstance(caught.value, driver.LinkTimeoutError)
        assert time.monotonic() - started < 3.0
        _wait_until(lambda: server.device_failed, 3.0, "noticing the device process is gone")
        dev.close()
    finally:
        server.shutdown()


def test_reconnecting_to_another_device_is_refused():
    with serving(seed=SEED) as first:
        port = first.address[1]
        dev = driver.open(first.url)
        dev.status()
    with serving(seed=SEED + 1, port=port):
        with pytest.raises(driver.LinkError):
            dev.status()  # the link dropped
        with pytest.raises(driver.LinkError, match="another device now"):
            dev.status()
    dev.close()


# -- malformed frames -----------------------------------------------------------------------------


def _request(opcode=Opcode.STATUS, payload=None, request_id=1) -> bytes:
    return wire.encode_frame(wire.REQUEST, int(opcode), 0, request_id, payload)


def _patched(frame: bytes, **fields) -> bytes:
    """The frame with header fields replaced; the header CRC made right unless given."""
    header = wire.Header._make(wire.HEADER.unpack_from(frame))._asdict()
    header.update(fields)
    raw = bytearray(wire.HEADER.pack(*header.values()))
    if "header_crc32" not in fields:
        raw[-4:] = struct.pack("<I", zlib.crc32(raw[:-4]))
    return bytes(raw) + frame[wire.HEADER.size :]


def _wrong_size_for_shape() -> bytes:
    """LOAD_MATRIX whose codes say (4, 4) but carry 15 elements, with right checksums."""
    body = bytearray(wire.encode_payload({"codes": np.zeros((4, 4), dtype=np.int64)}))[:-8]
    frame = _request(Opcode.LOAD_MATRIX, bytes(body))
    return frame


_LOAD = _request(Opcode.LOAD_MATRIX, {"codes": np.arange(16, dtype=np.int64).reshape(4, 4)})
_E = wire.FrameErrorCode
# name: (bytes sent, then half-close?, expected reply (status, frame error) or None, connection stays open?)
MALFORMED = {
    "bad magic": (b"SPUX" + _request()[4:], True, (Status.BAD_FRAME, _E.BAD_MAGIC), False),
    "garbage": (np.random.default_rng(0).bytes(300), True, (Status.BAD_FRAME, _E.BAD_MAGIC), False),
    "other version": (_patched(_request(), version=2), True, (Status.BAD_FRAME, _E.BAD_VERSION), False),
    "header checksum": (_patched(_request(), header_crc32=5), True, (Status.BAD_FRAME, _E.BAD_HEADER_CHECKSUM), False),
    "length over the limit": (
        _patched(_request(), payload_length=wire.LIMITS.max_payload_bytes + 1),
        False,
        (Status.BAD_FRAME, _E.TOO_LONG),
        False,
    ),
    "unknown opcode": (_request(999), False, (Status.UNKNOWN_OPCODE, None), True),
    "wrong size for the shape": (_wrong_size_for_shape(), False, (Status.BAD_FRAME, _E.BAD_PAYLOAD), True),
    "payload checksum": (_patched(_LOAD, payload_crc32=1), False, (Status.BAD_FRAME, _E.BAD_PAYLOAD_CHECKSUM), True),
    "reply kind": (_patched(_request(), kind=wire.REPLY), False, (Status.BAD_FRAME, _E.BAD_KIND), True),
    "bad arguments": (
        _request(Opcode.LOAD_MATRIX, {"codes": np.ones((2, 3), np.int64)}),
        False,
        (Status.BAD_ARGUMENT, None),
        True,
    ),
    "truncated header": (_request()[:10], True, None, False),
    "truncated payload": (_LOAD[: len(_LOAD) // 2], True, None, False),
}


def _read_reply(sock: socket.socket, limit_s: float = 3.0):
    """The next reply frame, or None if the device closed the connection."""
    sock.settimeout(limit_s)
    reader = wire.FrameReader(sock)
    try:
        header, payload = reader.read(limit_s, limit_s)
    except wire.LinkClosed:
        return None
    except ConnectionResetError:
        return None
    return header, wire.open_frame(header, payload, wire.REPLY)


def _closed(sock: socket.socket, limit_s: float = 3.0) -> bool:
    sock.settimeout(limit_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _prepare(dev: driver.Device) -> None:
    dev.load_matrix(A)
    dev.load_vector(B)
    dev.run(20.0, 5.0, engine="transient")


def _follow_up(dev: driver.Device) -> list:
    out = [_outcome(dev.status)]
    dev.load_matrix(A)  # the Device's host-side scales; the same codes as before
    dev.load_vector(-B)
    out += [_outcome(lambda: dev.run(15.0, 5.0, engine="transient")), dev.read_mean(), dev.read_state()]
    return out


def _runs(server: DeviceServer) -> int:
    """Runs since power-on, as the device says without being reset."""
    with _attach(server) as dev:
        return dev.status().runs


def _attach(server: DeviceServer) -> driver.Device:
    """A Device on the served device as it is: no reset on open."""
    from driver.tcp import TcpTransport

    return driver.Device(TcpTransport(*server.address, timeout=30.0))


def _snapshot(server: DeviceServer) -> list:
    """What the device says of its state without changing it: STATUS, and READ_MEAN's codes."""
    from driver.tcp import TcpTransport

    transport = TcpTransport(*server.address, timeout=10.0)
    try:
        return [transport.request(int(Opcode.STATUS)), transport.request(int(Opcode.READ_MEAN))]
    finally:
        transport.close()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_leaves_the_device_alone(server, case):
    """The server answers with an error frame or closes that connection, keeps serving the next host, and
    the device state is unchanged: a following session gives the bits of a twin that never saw the frame."""
    data, half_close, expected, stays_open = MALFORMED[case]
    with driver.open(server.url, seed=SEED) as dev:
        _prepare(dev)
    before = _snapshot(server)
    with socket.create_connection(server.address, timeout=5.0) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        reply = _read_reply(sock)
        if expected is None:
            assert reply is None, f"expected no reply, got {reply}"
        else:
            assert reply is not None, "expected an error frame"
            header, payload = reply
            assert header.status == expected[0], payload
            assert payload["message"]
            if expected[1] is not None:
                assert payload["error"] == expected[1]
        if stays_open:  # the stream is still in step: the next frame is served on the same connection
            sock.sendall(_request(Opcode.STATUS, request_id=2))
            header, payload = _read_reply(sock)
            assert (header.status, header.request_id) == (Status.OK, 2)
        else:
            assert _closed(sock)
    _wait_until(lambda: server.holder is None, 3.0, "freeing the device")
    assert _same_bits(_snapshot(server), before)
    with _attach(server) as dev:  # warm: the follow-up starts from the state the frame must not have touched
        got = _follow_up(dev)
    with driver.open(SPEC, seed=SEED) as twin:
        _prepare(twin)
        expected_bits = _follow_up(twin)
    assert _same_bits(got, expected_bits)


def test_random_frames_do_not_disturb_the_server(server):
    """A bounded fuzz run against the live server: valid frames with random bytes changed or cut short.
    Each gets an error frame, an answer, or a closed connection within the frame timeout; afterwards the
    device is free and in the state it was."""
    with driver.open(server.url, seed=SEED) as dev:
        _prepare(dev)
    before = _snapshot(server)
    rng = np.random.default_rng(7)
    seeds = [_request(), _request(Opcode.READ_MEAN), _LOAD, _request(Opcode.RUN, {"t": 1.0, "engine": 9})]
    for _ in range(40):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for where in rng.integers(0, len(data), rng.integers(1, 4)):
            data[where] = rng.integers(256)
        if rng.random() < 0.3:
            data = data[: rng.integers(1, len(data))]
        if len(data) >= wire.HEADER.size and data[:4] == b"SPUW":
            if data[6:8] not in (b"\x01\x00", b"\x06\x00"):  # only INFO and READ_MEAN leave no trace
                data[6:8] = b"\x08\x00"  # STATUS; everything else that may run would change the state
            fields = {"header_crc32": wire.Header._make(wire.HEADER.unpack_from(data)).header_crc32}
            if rng.random() < 0.5:  # right checksums half of the time, so the payload parser is reached
                body = bytes(data[wire.HEADER.size :])
                fields = {"payload_length": len(body), "payload_crc32": zlib.crc32(body)}
            data = bytearray(_patched(bytes(data), **fields))
        with socket.create_connection(server.address, timeout=5.0) as sock:
            sock.sendall(bytes(data))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(3.0)
            while sock.recv(65536):  # whatever comes back, then EOF: never a hang
                pass
        _wait_until(lambda: server.holder is None, 3.0, "freeing the device")
    assert _same_bits(_snapshot(server), before)
    with driver.open(server.url, seed=SEED) as dev:  # and it still serves
        assert dev.status().runs == 0


# -- hosts that stall or go away --------------------------------------------------------------------


@pytest.mark.parametrize("cut", [10, wire.HEADER.size + 5])
def test_host_that_stalls_mid_frame_is_dropped(cut):
    """Half a header (or a header and part of its payload), then silence: the device is free again
    within the frame timeout, and the stalled connection is closed."""
    with serving(frame_timeout=0.3) as server:
        with socket.create_connection(server.address, timeout=5.0) as sock:
            sock.sendall(_LOAD[:cut])
            _wait_until(lambda: server.holder is not None, 2.0, "holding the device")
            took = _wait_until(lambda: server.holder is None, 3.0, "freeing the device")
            assert took < 2.0
            assert _closed(sock)
        with driver.open(server.url, seed=SEED) as dev:
            assert dev.status().runs == 0


def _long_run_t(seconds: float) -> float:
    """A transient run time (tau) that takes about ``seconds`` on this machine (after _prepare)."""
    with driver.open(SPEC, seed=SEED) as dev:
        _prepare(dev)
        report = dev.run(2000.0, engine="transient")
    return 2000.0 * seconds / max(report.wall_time_s, 1e-4)


def test_host_that_goes_away_mid_run_frees_the_device():
    """The host sends a long RUN and disconnects: the run completes (its state is kept), then the device is
    free; meanwhile another host gets BUSY, not a hang."""
    t = min(_long_run_t(0.6), 9.0e5)
    with serving(busy_timeout=1.0) as server:
        with driver.open(server.url, seed=SEED) as dev:
            _prepare(dev)
        with socket.create_connection(server.address, timeout=5.0) as sock:
            sock.sendall(_request(Opcode.RUN, {"t": t, "engine": 1}, request_id=9))
            _wait_until(lambda: server.holder is not None, 2.0, "holding the device")
        started = time.monotonic()
        with pytest.raises(driver.DeviceBusyError):
            driver.open(server.url, timeout=5.0)
        _wait_until(lambda: server.holder is None, 10.0, "freeing the device after the run")
        assert _runs(server) == 2  # the run completed and its state is kept
        with driver.open(server.url, seed=SEED) as dev:
            assert dev.status().runs == 0
        assert time.monotonic() - started < 10.0


def test_client_timeout_mid_run_then_reconnect():
    """A reply slower than the client's timeout raises LinkTimeoutError; the device finishes the run; the
    next call reconnects (BUSY until the run is over)."""
    t = min(_long_run_t(1.2), 9.0e5)
    with serving(busy_timeout=1.0) as server:
        dev = driver.open(server.url, seed=SEED, timeout=0.4)
        _prepare(dev)
        with pytest.raises(driver.LinkTimeoutError, match="no reply to RUN"):
            dev.run(t, engine="transient")

        def answered() -> bool:
            try:
                return dev.status().runs == 2
            except driver.DeviceBusyError:
                return False

        _wait_until(answered, 10.0, "reconnecting after the run")
        dev.close()


def test_idle_timeout_frees_the_device():
    with serving(idle_timeout=0.2) as server:
        dev = driver.open(server.url, seed=SEED)
        _wait_until(lambda: server.holder is None, 3.0, "dropping the idle host")
        with driver.open(server.url, seed=SEED) as other:
            other.status()
        with pytest.raises(driver.LinkError):
            dev.status()  # its connection was closed
        assert dev.status().runs == 0  # and the next call reconnects
        dev.close()


def test_shutdown_with_a_host_connected():
    server = DeviceServer(Firmware(load_spec(SPEC), seed=SEED)).start()
    dev = driver.open(server.url, seed=SEED)
    started = time.monotonic()
    server.shutdown(timeout=5.0)
    assert time.monotonic() - started < 3.0
    with pytest.raises(driver.LinkError):
        dev.status()
    dev.close()


# -- `spu serve` ------------------------------------------------------------------------------------


class _Lines:
    """Collects a subprocess's stderr lines on a thread (so reading never blocks the test)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def find(self, pattern: str, limit_s: float) -> re.Match:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.02)
        pytest.fail(f"no line matching {pattern!r} within {limit_s} s; got {self.lines}")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_spu_serve(stop, capsys):
    """`spu serve PRESET --host --port --seed`: logs where it listens and one line per connection, serves
    the in-process bits, answers a second host BUSY, and exits 0 on SIGTERM or SIGINT."""
    command = [sys.executable, "-m", "driver.cli", "serve", SPEC, "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(command + ["--seed", str(SEED)], stderr=subprocess.PIPE, text=True)
    try:
        log = _Lines(process.stderr)
        url = log.find(r"serving spu-8 \(rc, seed 5\) on (tcp://127\.0\.0\.1:\d+)", 60.0).group(1)
        with driver.open(url, seed=SEED) as dev:
            got = _session_results(dev)
            with pytest.raises(driver.DeviceBusyError):
                driver.open(url)
        with driver.open(SPEC, seed=SEED) as reference:
            assert _same_bits(got, _session_results(reference))
        from driver.cli import main

        assert main(["info", url]) == 0
        assert "spu-8" in capsys.readouterr().out
        log.find(r"connection from 127\.0\.0\.1:\d+: holds the device", 5.0)
        log.find(r"connection from 127\.0\.0\.1:\d+ refused: busy", 5.0)
        log.find(r"closed after \d+ requests \(closed by the host\); the device is free", 5.0)
        process.send_signal(stop)
        assert process.wait(timeout=15.0) == 0
        log.find(rf"{stop.name}: shutting down", 5.0)
        log.find(r"stopped$", 5.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _session_results(dev: driver.Device) -> list:
    _prepare(dev)
    return [dev.read_mean(), dev.read_state(), _outcome(lambda: dev.run(10.0, 2.0)), dev.read_mean()]


def test_spu_serve_bad_preset_is_a_clear_error(capsys):
    from driver.cli import main

    assert main(["serve", "no-such-preset", "--port", "0"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_timeout_argument_is_checked(server):
    for bad in (0, -1.0, "5", True):
        with pytest.raises(driver.InvalidInputError, match="timeout"):
            driver.open(server.url, timeout=bad)
    with driver.open(server.url, timeout=math.inf) as dev:
        assert dev.transport.timeout is None


def test_poll_arguments_are_checked(server):
    for bad in (-1e-6, 2.0, "0", True, math.nan):
        with pytest.raises(driver.InvalidInputError, match="poll_s"):
            driver.open(server.url, poll_s=bad)
    for bad in (-1.0, 2.0, math.nan):
        with pytest.raises(ValueError, match="poll_s"):
            DeviceServer(Firmware(load_spec(SPEC), seed=SEED), "127.0.0.1", 0, poll_s=bad)


@pytest.mark.parametrize("poll_s", [0.0, 0.05], ids=["sleeping", "polling"])
def test_polling_changes_no_result(poll_s):
    """With both ends sleeping at once, or both polling for 50 ms, the session gives the in-process bits."""
    with serving(poll_s=poll_s) as running, driver.open(running.url, seed=SEED, poll_s=poll_s) as dev:
        assert dev.transport.poll_s == poll_s
        got = _session(dev)
    _assert_same_session(got, _session(driver.open(SPEC, seed=SEED)))
