"""Trust on the wire (issue 13): the shared-secret handshake, refusals before it, the exposure warning.

Every server here listens on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

import driver
from driver.protocol import Opcode, Status
from driver.tcp import TcpTransport
from spu_emulator import Firmware, load_spec, wire
from spu_emulator.server import DeviceServer, exposure_warning, read_token

TOKEN = "0123456789abcdef-a-test-token"


def _server(token: str | bytes | None = TOKEN, **options) -> DeviceServer:
    return DeviceServer(Firmware(load_spec("ideal"), seed=3), "127.0.0.1", 0, token=token, **options).start()


class _Raw:
    """A bare connection that sends frames by hand."""

    def __init__(self, address: tuple[str, int]):
        self.sock = socket.create_connection(address, timeout=5)
        self.reader = wire.FrameReader(self.sock)
        self.ids = 0

    def ask(self, opcode: int, payload: dict | None = None) -> tuple[int, dict]:
        self.ids += 1
        wire.send_frame(self.sock, wire.encode_frame(wire.REQUEST, opcode, 0, self.ids, payload), 5)
        header, body = self.reader.read(5, 5)
        return header.status, wire.open_frame(header, body, wire.REPLY)

    def closed_by_server(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def authenticate(self, token: bytes) -> tuple[int, dict, str, str]:
        status, reply = self.ask(Opcode.AUTH_CHALLENGE)
        assert status == Status.OK and reply["required"] is True and wire.is_nonce(reply["nonce"])
        host_nonce = wire.new_nonce()
        mac = wire.auth_mac(token, wire.AUTH_HOST, reply["nonce"], host_nonce)
        status, answer = self.ask(Opcode.AUTH_RESPONSE, {"mac": mac, "host_nonce": host_nonce})
        return status, answer, reply["nonce"], host_nonce

    def close(self) -> None:
        self.sock.close()


def _wait_free(server: DeviceServer) -> None:
    deadline = time.monotonic() + 5.0
    while server.holder is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.holder is None, "the device was not freed"


def test_the_right_token_opens_the_device_and_gives_the_in_process_bits():
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([0.3, -0.2])
    with _server() as server, driver.open(server.url, seed=3, token=TOKEN) as dev:
        assert server.authenticated
        dev.load_matrix(A)
        dev.load_vector(b)
        dev.run(t=40.0, burn_in=20.0)
        served = dev.read_mean()
        dev.transport._drop(graceful=True)  # a dropped link: the next call reconnects and authenticates again
        again = dev.read_mean()
    with driver.open("ideal", seed=3) as local:
        local.load_matrix(A)
        local.load_vector(b)
        local.run(t=40.0, burn_in=20.0)
        expected = local.read_mean()
    assert np.array_equal(served, expected) and np.array_equal(again, expected)


def test_commands_before_authentication_are_refused_without_running():
    token = TOKEN.encode()
    with _server() as server:
        raw = _Raw(server.address)
        status, reply = raw.ask(Opcode.LOAD_VECTOR, {"codes": np.array([5, 6], dtype=np.int16)})
        assert status == Status.UNAUTHENTICATED and "requires a token" in reply["message"]
        status, _ = raw.ask(Opcode.STATUS)
        assert status == Status.UNAUTHENTICATED
        status, answer, nonce, host_nonce = raw.authenticate(token)
        assert status == Status.OK
        assert wire.macs_equal(answer["mac"], wire.auth_mac(token, wire.AUTH_DEVICE, nonce, host_nonce))
        status, word = raw.ask(Opcode.STATUS)
        assert status == Status.OK and word["vector_n"] == 0 and word["runs"] == 0  # the LOAD_VECTOR never ran
        raw.close()


def test_without_a_token_the_host_gets_an_authentication_error_and_nothing_runs():
    with _server() as server:
        with pytest.raises(driver.AuthenticationError, match="pass the server's token"):
            driver.open(server.url)
        with pytest.raises(driver.AuthenticationError, match="differs from the server's"):
            driver.open(server.url, token="not-the-token-at-all-0000")
        _wait_free(server)
        with driver.open(server.url, token=TOKEN) as dev:  # the refused hosts freed the device
            assert dev.status().runs == 0


def test_a_wrong_mac_closes_the_connection_and_a_replayed_one_is_refused():
    token = TOKEN.encode()
    with _server() as server:
        raw = _Raw(server.address)
        status, reply = raw.ask(Opcode.AUTH_CHALLENGE)
        recorded_host_nonce = wire.new_nonce()
        recorded = {"mac": wire.auth_mac(token, wire.AUTH_HOST, reply["nonce"], recorded_host_nonce)}
        recorded["host_nonce"] = recorded_host_nonce
        status, _ = raw.ask(Opcode.AUTH_RESPONSE, recorded)  # a valid exchange, observed on the wire
        assert status == Status.OK
        raw.close()
        _wait_free(server)
        replay = _Raw(server.address)
        assert replay.ask(Opcode.AUTH_CHALLENGE)[0] == Status.OK  # a fresh nonce: the recorded MAC is stale
        status, answer = replay.ask(Opcode.AUTH_RESPONSE, recorded)
        assert status == Status.UNAUTHENTICATED and "does not match" in answer["message"]
        assert replay.closed_by_server()
        replay.close()
        early = _Raw(server.address)  # a response with no challenge before it
        _wait_free_or_held = early.ask(Opcode.AUTH_RESPONSE, recorded)
        assert (
            _wait_free_or_held[0] == Status.UNAUTHENTICATED
            and "before AUTH_CHALLENGE" in _wait_free_or_held[1]["message"]
        )
        assert early.closed_by_server()
        early.close()


def test_a_host_that_does_not_authenticate_is_dropped():
    with _server(frame_timeout=0.5) as server:
        silent = _Raw(server.address)
        started = time.monotonic()
        assert silent.closed_by_server()  # within frame_timeout, not the 300 s idle timeout
        assert time.monotonic() - started < 3.0
        silent.close()
        _wait_free(server)
        chatty = _Raw(server.address)
        for _ in range(4):
            assert chatty.ask(Opcode.INFO)[0] == Status.UNAUTHENTICATED
        assert chatty.closed_by_server()
        chatty.close()


def test_a_host_with_a_token_refuses_a_device_without_one_or_with_a_false_proof():
    with _server(token=None) as server:
        with pytest.raises(driver.AuthenticationError, match="has no token"):
            driver.open(server.url, token=TOKEN)
    # a false device: it asks for the token, accepts any proof, and answers with a MAC it cannot make
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def impostor() -> None:
        conn, _ = listener.accept()
        reader = wire.FrameReader(conn)
        for _ in range(2):
            header, body = reader.read(5, 5)
            seen.append(header.opcode)
            reply = {"nonce": wire.new_nonce(), "required": True}
            if header.opcode == Opcode.AUTH_RESPONSE:
                reply = {"mac": "0" * 64}
            conn.sendall(wire.encode_frame(wire.REPLY, header.opcode, Status.OK, header.request_id, reply))
        conn.settimeout(5)
        seen.append(len(conn.recv(65536)))  # the host sends nothing more, and closes
        conn.close()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(driver.AuthenticationError, match="could not prove"):
        TcpTransport(*listener.getsockname()[:2], timeout=5, token=TOKEN)
    thread.join(5)
    listener.close()
    assert seen == [Opcode.AUTH_CHALLENGE, Opcode.AUTH_RESPONSE, 0]


def test_tokens_must_be_long_enough_and_are_read_from_a_file_or_the_environment(tmp_path):
    with pytest.raises(ValueError, match="at least 16"):
        DeviceServer(Firmware(load_spec("ideal"), seed=0), "127.0.0.1", 0, token="short")
    with pytest.raises(driver.InvalidInputError, match="at least 16"):
        TcpTransport("127.0.0.1", 1, token="short")
    with pytest.raises(driver.InvalidInputError, match="tcp:// devices"):
        driver.open("ideal", token=TOKEN)
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert read_token(path) == TOKEN.encode()
    assert read_token(None, {"SPU_TOKEN": TOKEN}) == TOKEN.encode()
    assert read_token(None, {}) is None
    path.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_token(path)
    from driver.cli import main

    assert main(["serve", "ideal", "--token-file", str(path)]) == 2  # refused before it listens
    assert main(["serve", "ideal", "--token-file", str(tmp_path / "absent")]) == 2


@pytest.mark.parametrize(
    ("host", "warns"),
    [("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True), ("::", True), ("10.1.2.3", True)],
)
def test_serving_beyond_loopback_without_a_token_warns(host, warns):
    message = exposure_warning(host, has_token=False)
    assert bool(message) == warns
    if warns:
        assert "without a token" in message and "--token-file" in message
    assert exposure_warning(host, has_token=True) == ""
