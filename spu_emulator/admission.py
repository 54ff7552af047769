"""Who may use the device, for :class:`~spu_emulator.server.DeviceServer`: the token handshake of a
connection, the hosts that come while another holds the device (answered BUSY), and a second
connection's ABORT of the holder's run.

``WaitingHosts`` is the part of ``DeviceServer`` (a mixin) that answers connections that cannot hold the
device now: on a thread each up to ``max_connections``, past those from the accepting thread's selector
(``_overflow``); it reads the server's state (``_holder``, ``_holder_host``, ``_token``, ``_lock``,
``_waiting``, ``_overflow``, ``_selector``, ``_runs``, timeouts and ``spec``).  ``_Handshake`` is one
connection's AUTH_CHALLENGE / AUTH_RESPONSE exchange (protocol.yaml), used by the device process for its
holder and here for a waiting host.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from typing import Any

from . import wire
from .protocol import Opcode, Status

log = logging.getLogger("spu_emulator.server")

# shared between the two processes: the sequence number of the RUN in progress (0: none), and the one an
# ABORT from a second connection asks to stop
_RUN_SLOTS = struct.Struct("<qq")
_SECOND_CONNECTION = (Opcode.AUTH_CHALLENGE, Opcode.AUTH_RESPONSE, Opcode.ABORT)  # answered, not BUSY


class WaitingHosts:
    """The BUSY answers and second-connection ABORTs of :class:`~spu_emulator.server.DeviceServer` (a mixin)."""

    def _overflow_readable(self, sock: socket.socket) -> None:
        """A connection past the waiting slots sent bytes: once its first header is in, answer BUSY, then
        read to EOF (so the answer is not lost to a reset) until its deadline."""
        state = self._overflow[sock]
        header_bytes, _, name, draining = state
        try:
            data = sock.recv(65536 if draining else wire.HEADER.size - len(header_bytes))
        except BlockingIOError:
            return
        except OSError as exc:
            self._overflow_close(sock, f"link error: {exc}")
            return
        if not data:
            self._overflow_close(sock, "" if draining else "closed by the host")
            return
        if draining:
            return
        header_bytes += data
        if len(header_bytes) < wire.HEADER.size:
            return
        holder = self._holder if self._token is None else "another host"  # not named to a stranger
        try:
            header = wire.parse_header(header_bytes)
            frame = wire.error_frame(
                header.opcode,
                header.request_id,
                Status.BUSY,
                f"{self.spec.name} at {self.url} is held by {holder} (one host at a time;"
                f" {self.max_connections} hosts are waiting already)",
            )
            reason = "answered BUSY (waiting slots full)"
        except wire.FrameError as exc:
            frame, reason = wire.frame_error_reply(exc), f"refused while busy: {exc}"
        try:
            sent = sock.send(frame)  # a small frame: the socket's send buffer takes it whole
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._overflow_close(sock, f"link error: {exc}")
            return
        if sent < len(frame):
            self._overflow_close(sock, "link error: the answer did not fit the send buffer")
            return
        log.info("connection from %s refused: %s", name, reason)
        state[1] = min(state[1], time.monotonic() + self.frame_timeout)
        state[3] = True

    def _overflow_close(self, sock: socket.socket, reason: str) -> None:
        name = self._overflow.pop(sock)[2]
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        sock.close()
        if reason:
            log.info("connection from %s closed (%s)", name, reason)

    def _answer_busy(self, sock: socket.socket, name: str) -> None:
        """A host that came while the device was held: wait for its first request; serve it if the
        device is free by then, else answer BUSY and close."""
        reason, handed, drain, key = "", False, False, sock.fileno()
        try:
            sock.settimeout(self.busy_timeout)
            try:
                ready = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                reason = f"no request within {self.busy_timeout:g} s while the device was held"
                return
            with self._lock:
                if ready and self._holder is None and not self._stop.is_set():
                    handed = True  # the device process has it now, or _hand_over closed it
                    self._hand_over(sock, name, " (freed while it waited)")
                holder = self._holder if self._token is None else "another host"
            if handed:
                return
            drain = True  # the host's frame is not read further: let the answer reach it before closing
            reader, handshake = wire.FrameReader(sock), _Handshake(self._token)
            for _ in range(3):  # at most AUTH_CHALLENGE, AUTH_RESPONSE, ABORT: then BUSY
                try:
                    header, deadline = reader.read_header(self.frame_timeout, self.frame_timeout)
                    if header.opcode not in _SECOND_CONNECTION or header.payload_length > 4096:
                        break
                    request = wire.open_frame(header, reader.read_payload(header, deadline), wire.REQUEST)
                except (wire.LinkClosed, wire.LinkTimeout) as exc:
                    reason = f"refused while busy: {exc}"
                    return
                except wire.FrameError as exc:
                    wire.send_frame(sock, wire.frame_error_reply(exc, 0), self.frame_timeout)
                    reason = f"refused while busy: {exc}"
                    return
                if header.opcode == Opcode.ABORT:
                    frame, reason = self._abort_from(name, header, handshake)
                    wire.send_frame(sock, frame, self.frame_timeout)
                    return
                frame, failed = handshake.answer(header, request)
                wire.send_frame(sock, frame, self.frame_timeout)
                if failed:
                    reason = f"authentication failed: {failed}"
                    return
            message = f"{self.spec.name} at {self.url} is held by {holder} (one host at a time)"
            wire.send_frame(
                sock, wire.error_frame(header.opcode, header.request_id, Status.BUSY, message), self.frame_timeout
            )
            log.info("connection from %s refused: busy (held by %s)", name, holder)
            reason = "answered BUSY"
        except OSError as exc:
            reason = f"link error: {exc}"
        finally:
            with self._lock:
                self._waiting.pop(key, None)
            if not handed:
                if drain:
                    wire.close_gracefully(sock, self.frame_timeout)
                else:
                    sock.close()
                log.info("connection from %s closed (%s)", name, reason)

    def _abort_from(self, name: str, header: wire.Header, handshake: _Handshake) -> tuple[bytes, str]:
        """A second connection's ABORT: stop the run in progress if it comes from the holder's address (and
        has proved the token when there is one).  Returns the reply frame and a line for the log."""
        if not handshake.done:
            return handshake.refusal(header), "ABORT refused: not authenticated"
        with self._lock:
            holder_host = self._holder_host
        if holder_host is not None and _host_of(name) != holder_host:
            message = (
                f"ABORT is taken only from the address of the host that holds {self.spec.name} (one host's run is"
                " not another's to stop); send it from that host"
            )
            return wire.error_frame(header.opcode, header.request_id, Status.BUSY, message), "ABORT refused: other host"
        running, _ = _RUN_SLOTS.unpack_from(self._runs)
        if running:
            struct.pack_into("<q", self._runs, 8, running)  # its slot only: the device process owns the other
        log.info("connection from %s: ABORT (%s)", name, "the run in progress stopped" if running else "no run")
        reply = {"aborted": int(running != 0)}
        return wire.encode_frame(wire.REPLY, header.opcode, Status.OK, header.request_id, reply), "answered ABORT"


class _Handshake:
    """The shared-secret handshake of one connection (AUTH_CHALLENGE, AUTH_RESPONSE; protocol.yaml).

    ``done`` once the host has proved it holds the token (at once when the server has none)."""

    def __init__(self, token: bytes | None):
        self.token = token
        self.done = token is None
        self.nonce: str | None = None
        self.refused = 0

    def answer(self, header: wire.Header, request: dict[str, Any]) -> tuple[bytes, str]:
        """The reply frame to an AUTH_* request, and why the connection must close ("" if it need not)."""
        if header.opcode == Opcode.AUTH_CHALLENGE:
            self.nonce = wire.new_nonce()
            reply = {"nonce": self.nonce, "required": self.token is not None}
            return wire.encode_frame(wire.REPLY, header.opcode, Status.OK, header.request_id, reply), ""
        if self.token is None:
            message = "this server has no token, so there is nothing to prove: send commands directly"
            return wire.error_frame(header.opcode, header.request_id, Status.BAD_STATE, message), ""
        mac, host_nonce = request.get("mac"), request.get("host_nonce")
        if self.nonce is None:
            why = "AUTH_RESPONSE before AUTH_CHALLENGE"
        elif not (wire.is_nonce(mac) and wire.is_nonce(host_nonce)):
            why = "AUTH_RESPONSE needs mac and host_nonce, 64 hex digits each"
        elif not wire.macs_equal(mac, wire.auth_mac(self.token, wire.AUTH_HOST, self.nonce, host_nonce)):
            why = "the MAC does not match this server's token"
        else:
            self.done = True
            proof = wire.auth_mac(self.token, wire.AUTH_DEVICE, self.nonce, host_nonce)
            self.nonce = None  # one response per challenge
            return wire.encode_frame(wire.REPLY, header.opcode, Status.OK, header.request_id, {"mac": proof}), ""
        self.nonce = None
        message = f"authentication failed: {why}; pass the server's token (token= in driver.open); connection closed"
        return wire.error_frame(header.opcode, header.request_id, Status.UNAUTHENTICATED, message), why

    def refusal(self, header: wire.Header) -> bytes:
        """The UNAUTHENTICATED reply to a command sent before the handshake; the command does not run."""
        self.refused += 1
        message = (
            f"opcode {header.opcode} refused: this server requires a token and the connection has not proved it"
            " (AUTH_CHALLENGE, then AUTH_RESPONSE); pass token= to driver.open, the token of `spu serve --token-file`"
        )
        return wire.error_frame(header.opcode, header.request_id, Status.UNAUTHENTICATED, message)


def _host_of(name: str) -> str:
    """The address part of a connection's name ("host:port" or "[v6 host]:port")."""
    return name.rsplit(":", 1)[0].strip("[]")
