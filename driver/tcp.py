"""The TCP transport: the same (opcode, payload) -> (status, payload) as in-process, over a socket.

``driver.open("tcp://HOST:PORT")`` reaches a device served by ``spu serve`` (or a
board that speaks ``firmware_spec/PROTOCOL.md``).  Frames are built and parsed by
:mod:`spu_emulator.wire`, the protocol's reference codec: the one place the
driver uses ``spu_emulator`` code, as a transport (DESIGN section 2).

Timeouts: ``timeout`` seconds for the connection and for each reply (default
protocol.yaml ``timing.client_timeout_s``; ``math.inf`` waits for ever).  A reply
that does not come in time raises LinkTimeoutError, a dropped link LinkError; the
connection is then closed and the next call reconnects.  On reconnection the
transport checks with INFO that it reaches the same device (spec and seed); the
device keeps its state across connections, so a warm start survives a dropped
link.

Polling: after sending a request the transport busy-polls for the reply for
``poll_s`` seconds (default ``timing.polling.host_poll_s``, 1 ms) before it sleeps
in the kernel, so a short command's reply is taken without a wake-up, as a GPU
driver spins on a short kernel.  ``poll_s=0`` sleeps at once.

Authentication: with ``token`` (a server started with ``spu serve --token-file``) every
connection, the first and each reconnection, opens with the handshake of protocol.yaml's
AUTH_CHALLENGE and AUTH_RESPONSE: the host proves it holds the token with an HMAC-SHA256
over the server's fresh nonce and its own, and checks the device's HMAC in return, so
neither side sends the token and neither accepts a peer that lacks it.  A mismatch raises
AuthenticationError.
"""

from __future__ import annotations

import itertools
import math
import socket
from typing import Any
from urllib.parse import urlsplit

# through a transport only: the wire codec is the protocol's reference implementation
from spu_emulator import wire

from .errors import (
    AuthenticationError,
    DeviceBusyError,
    DeviceClosedError,
    InvalidInputError,
    LinkError,
    LinkTimeoutError,
    ProtocolError,
)
from .protocol import Opcode, Status

__all__ = ["TcpTransport", "open_tcp", "parse_url", "abort", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S: float = wire.TIMING.client_timeout_s
DEFAULT_POLL_S: float = wire.TIMING.host_poll_s
_CLOSE_WAIT_S = 2.0  # close() waits this long at most for the device to confirm it is free
_ABORT_WAIT_S = 5.0  # after Ctrl-C during a RUN: wait this long for the device to stop it and answer


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of ``tcp://HOST:PORT`` (IPv6 hosts in brackets)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise InvalidInputError(f"device address must be tcp://HOST:PORT, got {url!r}")
    return parts.hostname, port


class TcpTransport:
    """A device at the other end of a TCP connection."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        poll_s: float | None = None,
        token: str | bytes | None = None,
    ):
        if timeout is None:
            timeout = DEFAULT_TIMEOUT_S
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidInputError(f"timeout must be a positive number of seconds (math.inf: none), got {timeout!r}")
        if poll_s is None:
            poll_s = DEFAULT_POLL_S
        if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not 0.0 <= poll_s <= 1.0:
            raise InvalidInputError(f"poll_s must be a number of seconds in [0, 1] (0: no polling), got {poll_s!r}")
        self.poll_s = float(poll_s)
        self._token: bytes | None = None
        if token is not None:
            try:
                self._token = wire.check_token(token)
            except ValueError as exc:
                raise InvalidInputError(str(exc)) from None
        self.host, self.port = host, port
        self.timeout: float | None = None if math.isinf(timeout) else float(timeout)
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._identity: tuple[Any, ...] | None = None
        self._closed = False
        self._connect()

    @property
    def url(self) -> str:
        return f"tcp://[{self.host}]:{self.port}" if ":" in self.host else f"tcp://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except TimeoutError:
            raise LinkTimeoutError(
                f"no answer from {self.url} within {self.timeout:g} s while connecting; is the device reachable?"
            ) from None
        except OSError as exc:
            raise LinkError(
                f"could not connect to {self.url}: {exc.strerror or exc}; is `spu serve` running there?"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._reader = wire.FrameReader(sock)
        if self._token is not None:
            try:
                self._authenticate(self._token)
            except BaseException:
                self._drop()
                raise

    def _authenticate(self, token: bytes) -> None:
        """The handshake: prove the token to the device and check its proof in return (protocol.yaml)."""
        status, reply = self._exchange(Opcode.AUTH_CHALLENGE, None)
        nonce = reply.get("nonce")
        if status != Status.OK or not wire.is_nonce(nonce):
            raise AuthenticationError(
                f"{self.url} did not answer the authentication challenge ({reply.get('message', status)});"
                " is it an SPU server that supports tokens?"
            )
        if not reply.get("required"):
            raise AuthenticationError(
                f"{self.url} has no token, so it cannot prove it is the device you meant; open it without token="
                " if you trust the network to it, or start the server with --token-file"
            )
        host_nonce = wire.new_nonce()
        mac = wire.auth_mac(token, wire.AUTH_HOST, nonce, host_nonce)
        status, reply = self._exchange(Opcode.AUTH_RESPONSE, {"mac": mac, "host_nonce": host_nonce})
        if status != Status.OK:  # UNAUTHENTICATED is raised by _exchange; anything else is a protocol breach
            raise AuthenticationError(f"{self.url} refused the token: {reply.get('message', status)}")
        proof = reply.get("mac")
        if not (
            wire.is_nonce(proof) and wire.macs_equal(proof, wire.auth_mac(token, wire.AUTH_DEVICE, nonce, host_nonce))
        ):
            raise AuthenticationError(
                f"{self.url} accepted the host but could not prove it holds the same token: it is not the device"
                " you meant (or the link is tampered with); nothing was sent to it"
            )

    def _drop(self, graceful: bool = False) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if graceful:
                wire.close_gracefully(sock, _close_wait(self.timeout))
            else:
                sock.close()

    def request(self, opcode: int, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        if self._closed:
            raise DeviceClosedError(f"the link to {self.url} is closed; open the device again with driver.open()")
        if self._sock is None:
            self._connect()
            if self._identity is not None and opcode != Opcode.INFO:
                status, reply = self._exchange(Opcode.INFO, None)
                if status != Status.OK:
                    return status, reply  # BUSY most likely: the Device raises it
        return self._exchange(opcode, payload)

    def _exchange(self, opcode: int, payload: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        request_id = next(self._ids) & 0xFFFFFFFF
        try:
            frame = wire.encode_frame(wire.REQUEST, opcode, 0, request_id, payload)
        except wire.EncodeError as exc:
            raise InvalidInputError(f"request {_name(opcode)} cannot be sent: {exc}") from None
        try:
            try:
                wire.send_frame(self._sock, frame, self.timeout)
            except KeyboardInterrupt:
                self._drop()  # a frame sent in part: the stream is out of step
                raise
            try:
                header, body = self._reader.read(self.timeout, self.timeout, self.poll_s)
            except KeyboardInterrupt:
                self._stop_in_flight(opcode, request_id)  # Ctrl-C while the device works: stop a run there too
                raise
            reply = wire.open_frame(header, body, wire.REPLY)
        except (TimeoutError, wire.LinkTimeout):
            what = self._what(opcode)  # made only on the way out: a us per exchange otherwise
            self._drop()
            raise LinkTimeoutError(
                f"no reply to {what} within {self.timeout:g} s; the connection was dropped (the device may still be"
                " working on it); pass a larger timeout= to driver.open for long runs; the next call reconnects"
            ) from None
        except wire.LinkClosed as exc:
            what = self._what(opcode)
            self._drop()
            raise LinkError(
                f"the device closed the connection during {what} ({exc}); the command may or may not have run;"
                " the next call reconnects"
            ) from None
        except wire.FrameError as exc:
            what = self._what(opcode)
            self._drop()
            raise ProtocolError(f"unreadable reply to {what}: {exc}; the connection was dropped") from None
        except OSError as exc:
            self._drop()
            raise LinkError(
                f"the link to {self.url} failed during {_name(opcode)}: {exc.strerror or exc}; the next call reconnects"
            ) from None
        status = header.status
        unreadable = status == Status.BAD_FRAME and header.request_id == 0  # the device could not read our header
        if not unreadable and (header.opcode != opcode or header.request_id != request_id):
            what = self._what(opcode)
            self._drop()
            raise ProtocolError(
                f"reply to {what} (request {request_id}) is for opcode {header.opcode}, request {header.request_id};"
                " the connection was dropped"
            )
        if status == Status.UNAUTHENTICATED:
            self._drop()
            hint = (
                "the token differs from the server's"
                if self._token is not None
                else "pass the server's token: driver.open(url, token=...)"
            )
            raise AuthenticationError(f"{self.url} refused {_name(opcode)}: {reply.get('message', '')}; {hint}")
        if status == Status.BUSY:
            self._drop()  # the device closes the connection after BUSY
        elif status == Status.BAD_FRAME:
            self._drop(graceful=True)  # start afresh (after a header error the device closes it anyway)
        if status == Status.OK and opcode == Opcode.INFO:
            self._check_identity(reply)
        return status, reply

    def _what(self, opcode: int) -> str:
        return f"{_name(opcode)} to {self.url}"

    def _stop_in_flight(self, opcode: int, request_id: int) -> None:
        """After Ctrl-C while waiting for a reply: for a RUN, send ABORT on this connection (the device stops
        the run between its chunks and discards it) and read the two replies, within _ABORT_WAIT_S, so the
        link stays in step; for anything else, or if that fails, drop the connection (the next call
        reconnects)."""
        if opcode != Opcode.RUN or self._sock is None:
            self._drop()
            return
        abort_id = next(self._ids) & 0xFFFFFFFF
        waiting = {request_id, abort_id}
        try:
            wire.send_frame(self._sock, wire.encode_frame(wire.REQUEST, Opcode.ABORT, 0, abort_id, None), _ABORT_WAIT_S)
            while waiting:
                header, _ = self._reader.read(_ABORT_WAIT_S, _ABORT_WAIT_S, 0.0)
                waiting.discard(header.request_id)
        except (OSError, wire.LinkClosed, wire.LinkTimeout, wire.FrameError, KeyboardInterrupt):
            self._drop()

    def _check_identity(self, reply: dict[str, Any]) -> None:
        identity = (reply.get("seed_entropy"), reply.get("spec"))
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            self._drop()
            raise LinkError(
                f"reconnected to {self.url}, but it is another device now (spec or seed changed since it was opened);"
                " open it again with driver.open()"
            )

    def close(self) -> None:
        """Close the link and wait (briefly) until the device has seen it, so that it is free."""
        if not self._closed:
            self._closed = True
            self._drop(graceful=True)


def _close_wait(timeout: float | None) -> float:
    return _CLOSE_WAIT_S if timeout is None else min(_CLOSE_WAIT_S, timeout)


def _name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"


def abort(url: str, token: str | bytes | None = None, timeout: float = 5.0) -> bool:
    """Stop the run in progress on the device at ``url`` from a new connection (another thread or process
    of the host that holds it, e.g. a watchdog): ABORT as that connection's first request (after the
    handshake when ``token`` is given).  The holder's RUN then fails with RunAbortedError; the run is
    discarded.  Returns True if a run was stopped, False if none was in progress.  Raises DeviceBusyError
    when the device is held from another address, AuthenticationError, LinkError.  Cost: one connection."""
    host, port = parse_url(url)
    transport = TcpTransport(host, port, timeout=timeout, poll_s=0.0, token=token)
    try:
        status, reply = transport.request(int(Opcode.ABORT))
    finally:
        transport.close()
    if status == Status.OK:
        return bool(reply.get("aborted"))
    message = f"{transport.url} refused ABORT: {reply.get('message', status)}"
    if status == Status.BUSY:
        raise DeviceBusyError(message)
    raise ProtocolError(message)


def open_tcp(
    url: str,
    seed: int | None = None,
    timeout: float | None = None,
    poll_s: float | None = None,
    token: str | bytes | None = None,
):
    """``driver.open("tcp://HOST:PORT")``: a Device over a TcpTransport (see :func:`driver.open`).

    The device is reset on open (power-on state, noise stream restarted), as opening an
    in-process device gives a fresh one: the Device's host-side scales then match what is
    loaded, and the same spec, seed and calls give the in-process bits.  (The served device
    itself keeps its state across connections; ``Device(TcpTransport(host, port))`` attaches
    without resetting.)
    """
    from .device import Device

    host, port = parse_url(url)
    transport = TcpTransport(host, port, timeout=timeout, poll_s=poll_s, token=token)
    try:
        device = Device(transport, label=f"device at {transport.url}")
        if seed is not None and device.info.seed_entropy != str(seed):
            raise InvalidInputError(
                f"the device at {transport.url} was served with seed entropy {device.info.seed_entropy}, not {seed};"
                " pass that seed, or seed=None to take the served device as it is (`spu serve --seed S` sets it)"
            )
        device.reset()
    except BaseException:
        transport.close()
        raise
    return device
