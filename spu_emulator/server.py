"""Serve one emulated SPU over TCP: the emulator as a hardware-in-the-loop stand-in.

The server speaks the wire protocol of ``firmware_spec/protocol.yaml`` (see
:mod:`spu_emulator.wire`) and hands every request to :meth:`Firmware.handle`, the
same entry point the in-process transport calls, so a host sees the same
(status, payload) either way.

Two processes, so that the server always answers:

* the **device process** owns the :class:`Firmware` and serves the connection of
  the host that holds the device, one frame after another, with no hop in
  between (it receives that connection's socket from the front process);
* the **front process** accepts connections, hands the first one to the device
  process, answers every other with BUSY, and logs.  It never runs a command:
  the numba kernels hold Python's GIL for the whole of a run, so a server that ran
  them on a thread could not answer anyone while a run lasted.

Rules (PROTOCOL.md, "Sessions"):

* One host holds the device at a time: the first connection while the device is
  free.  Another connection's first request is answered BUSY (unless the device
  has been freed by the time it arrives, when it is served) and that connection
  is closed.
* The holder frees the device when its connection ends: EOF, reset, a frame that
  stops mid-way for ``frame_timeout`` s, silence for ``idle_timeout`` s (300
  by default, also before the first frame), or a header error.  A command that is running when the host goes
  away runs to its end (a run is bounded by the spec's max_run_time, and an
  analog run cannot be recalled); the device is freed as soon as it ends.
* The device's state persists across connections, as a board's would: loads,
  analog state, accumulator and noise stream stay as the last host left them.
  A host that wants power-on state sends RESET (``driver.open`` does).
* A malformed frame never reaches the firmware: it gets a BAD_FRAME reply (and,
  after a header error, the connection is closed), so the device state is
  unchanged.
* With a token (``token=``, ``spu serve --token-file F`` or ``$SPU_TOKEN``) the holder must
  prove it holds the token before any command runs: AUTH_CHALLENGE gives a fresh server
  nonce, AUTH_RESPONSE carries HMAC-SHA256(token, ...) over both sides' nonces, and the
  server answers with its own MAC, so the host knows it reached the device it meant.  Other
  commands before that are answered UNAUTHENTICATED without running; a wrong MAC, 4 refused
  commands, or no success within ``frame_timeout`` s closes the connection.  Without a token,
  a server listening beyond loopback logs and warns that any host that reaches it can use it.
* A run can be stopped (PROTOCOL.md, ABORT): the device process runs a transient run in chunks of
  about 0.1 s (``spu_emulator.chunks``) and between them checks for an ABORT from the holder on its
  connection, for one the front process took from a second connection of the holder's address
  (a flag in memory both processes share), and for the run's wall time against ``max_run_s``
  (600 s by default, ``spu serve --max-run-seconds``).  The run is then discarded and answered
  ABORTED: the device keeps the state it had before it.

POSIX only (fork and socket descriptor passing).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import mmap
import os
import selectors
import signal
import socket
import stat
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import wire
from .admission import _RUN_SLOTS, WaitingHosts, _Handshake, _host_of
from .firmware import Firmware
from .protocol import Opcode, Status
from .spec import load_spec

__all__ = ["DeviceServer", "serve", "exposure_warning", "read_token", "TOKEN_ENV"]

TOKEN_ENV = "SPU_TOKEN"
"""Environment variable ``spu serve`` reads the token from when no --token-file is given."""

log = logging.getLogger("spu_emulator.server")

_POLL_S = 0.1  # how often the front process looks for a stop request
_MESSAGE_BYTES = 4096  # control messages between the two processes
# connections past the waiting slots: the accepting thread answers them BUSY itself, without a thread
# each; past this many at once, more are closed on accept
_MAX_OVERFLOW = 1024
_MAX_UNAUTHENTICATED = 4  # commands refused before authentication, then the connection is closed


class DeviceServer(WaitingHosts):
    """A TCP server for one :class:`Firmware`, which moves to a device process of its own.

    host, port: where to listen (port 0 picks a free one; see ``address`` and ``url``).
    frame_timeout, busy_timeout, idle_timeout: seconds, defaults from protocol.yaml
    ``timing``; idle_timeout None lets the holder stay silent for ever (the default is 300 s).
    poll_s: after each reply the device process busy-polls for the next request this long
    before it sleeps (``timing.polling.device_poll_s``; 0 sleeps at once).
    max_connections: hosts waiting for their BUSY answer (or for the device) on a thread each; up to
    1,024 more are answered BUSY by the accepting thread (their first request's header read as it
    arrives, without waiting for the device to be freed); only past those is a connection closed.
    max_run_s: wall time one RUN may take before it is stopped and answered ABORTED (default protocol.yaml
    ``timing.max_run_s``, 600 s; None or 0: no limit).
    token: the shared secret (str or bytes, at least 16 bytes) a holder must prove it holds before
    any command runs (see the module docstring); None: no handshake, and a warning (logged and
    ``warnings.warn``) when the listening address is not loopback.

    The firmware object passed in is copied into the device process when the server is
    made: query the device through the protocol, not through that object.  Use as a
    context manager, or ``start()`` (a background thread) or ``serve_forever()`` (this
    thread), then ``shutdown()``.
    """

    def __init__(
        self,
        firmware: Firmware,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        frame_timeout: float = wire.TIMING.frame_timeout_s,
        busy_timeout: float = wire.TIMING.busy_timeout_s,
        idle_timeout: float | None = wire.TIMING.idle_timeout_s,
        poll_s: float = wire.TIMING.device_poll_s,
        max_connections: int = 16,
        token: str | bytes | None = None,
        max_run_s: float | None = wire.TIMING.max_run_s,
    ):
        if not hasattr(os, "fork") or not hasattr(socket, "send_fds"):
            raise RuntimeError("the device server needs POSIX fork and socket descriptor passing")
        for name, value in (("frame_timeout", frame_timeout), ("busy_timeout", busy_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be a positive number of seconds or None, got {idle_timeout!r}")
        if max_run_s is not None and not max_run_s >= 0:
            raise ValueError(f"max_run_s must be a number of seconds >= 0 (0 or None: no limit), got {max_run_s!r}")
        if not 0.0 <= poll_s <= 1.0:
            raise ValueError(f"poll_s must be between 0 and 1 s, got {poll_s!r}")
        self._token = None if token is None else wire.check_token(token)
        self.spec = firmware.spec
        self.frame_timeout = frame_timeout
        self.busy_timeout = busy_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        exposed = exposure_warning(self.address[0], self._token is not None)
        if exposed:
            log.warning("%s", exposed)
            warnings.warn(exposed, UserWarning, stacklevel=2)
        self._control, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._runs = mmap.mmap(-1, _RUN_SLOTS.size)  # anonymous and shared: both processes see one copy
        pid = os.fork()
        if pid == 0:  # the device process: never returns
            code = 1
            try:
                _leave_front_behind(keep=device_end.fileno())
                limit = max_run_s or None
                _DeviceProcess(
                    firmware, device_end, frame_timeout, idle_timeout, poll_s, self._token, self._runs, limit
                ).run()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        device_end.close()
        self._pid = pid
        self._lock = threading.Lock()
        self._holder: str | None = None
        self._holder_host: str | None = None  # its address without the port: a second connection's ABORT
        self._holder_socket: socket.socket | None = None
        self._waiting: dict[int, tuple[socket.socket, threading.Thread]] = {}
        # overflow connections, served by serve_forever's selector: socket -> [header bytes, deadline, name,
        # draining (BUSY sent, reading to EOF before closing)]
        self._overflow: dict[socket.socket, list[Any]] = {}
        self._selector: selectors.BaseSelector | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.device_failed = False  # set when the device process ended on its own

    @property
    def url(self) -> str:
        host, port = self.address
        return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    @property
    def authenticated(self) -> bool:
        """True when holders must prove the token before any command runs."""
        return self._token is not None

    @property
    def holder(self) -> str | None:
        """Address of the host that holds the device, or None when it is free."""
        return self._holder

    @property
    def device_pid(self) -> int:
        return self._pid

    # -- lifetime ------------------------------------------------------------------
    def start(self) -> DeviceServer:
        """Serve on a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"spu-server-{self.address[1]}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop` or :meth:`shutdown` (or the device process ends)."""
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._control, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(_POLL_S):
                    if key.fileobj is self._control:
                        self._device_message()
                    elif key.fileobj in self._overflow:
                        self._overflow_readable(key.fileobj)  # type: ignore[arg-type]
                    elif not self._stop.is_set():
                        try:
                            sock, peer = self._listener.accept()
                        except OSError:
                            continue
                        self._admit(sock, _peer_name(peer))
                now = time.monotonic()
                for sock, (_, deadline, _name, draining) in list(self._overflow.items()):
                    if now >= deadline:
                        self._overflow_close(sock, "" if draining else f"no request within {self.busy_timeout:g} s")
        finally:
            for sock in list(self._overflow):
                self._overflow_close(sock, "server stopped")
            selector.close()
            self._selector = None
            self._stopped.set()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return within 0.1 s (safe from a signal handler)."""
        self._stop.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, stop the device process.

        A command that is running gets ``timeout`` s to finish; then the device process
        is killed.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._stopped.wait(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            sockets = [self._holder_socket] + [sock for sock, _ in self._waiting.values()]
            threads = [thread for _, thread in self._waiting.values()]
        for sock in sockets:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # the device process sees EOF and frees itself
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            self._control.send(b"STOP")
        if not self._reap(deadline):
            log.warning("the device process did not stop within %g s (a long command?); killing it", timeout)
            os.kill(self._pid, signal.SIGKILL)
            self._reap(None)
        for sock in (self._holder_socket, self._control, self._listener):
            if sock is not None:
                sock.close()
        self._holder, self._holder_socket = None, None

    def _reap(self, deadline: float | None) -> bool:
        """Wait for the device process to end (until ``deadline``; None: for ever).  True if it did."""
        while True:
            try:
                if os.waitpid(self._pid, 0 if deadline is None else os.WNOHANG) != (0, 0):
                    return True
            except ChildProcessError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def __enter__(self) -> DeviceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the front process's side ------------------------------------------------------
    def _admit(self, sock: socket.socket, name: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        with self._lock:
            if self._holder is None:
                self._hand_over(sock, name, "")
                return
            if len(self._waiting) >= self.max_connections:
                full = True
            else:
                full = False
                thread = threading.Thread(target=self._answer_busy, args=(sock, name), daemon=True)
                self._waiting[sock.fileno()] = (sock, thread)
        if full and self._selector is not None and len(self._overflow) < _MAX_OVERFLOW:
            sock.setblocking(False)
            self._overflow[sock] = [bytearray(), time.monotonic() + self.busy_timeout, name, False]
            self._selector.register(sock, selectors.EVENT_READ)
        elif full:
            log.info("connection from %s closed: %d hosts already waiting", name, self.max_connections + _MAX_OVERFLOW)
            sock.close()
        else:
            thread.start()

    def _hand_over(self, sock: socket.socket, name: str, note: str) -> None:
        """Give the connection to the device process (hold the lock)."""
        try:
            socket.send_fds(self._control, [b"SERVE " + name.encode()], [sock.fileno()])
        except OSError as exc:
            log.error("connection from %s closed: the device process is gone (%s)", name, exc)
            sock.close()
            return
        self._holder, self._holder_socket = name, sock  # kept, to shut it down on stop
        self._holder_host = _host_of(name)
        log.info("connection from %s: holds the device%s", name, note)

    def _device_message(self) -> None:
        try:
            message = self._control.recv(_MESSAGE_BYTES)
        except OSError:
            message = b""
        if not message:
            if not self._closed:
                log.error("the device process ended unexpectedly; stopping")
                self.device_failed = True
                with self._lock:
                    sock, self._holder, self._holder_socket = self._holder_socket, None, None
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # the host sees its link drop, not a silent device
                    sock.close()
            self._stop.set()
            return
        if message.startswith(b"FREE "):
            _, requests, reason = message.decode(errors="replace").split(" ", 2)
            with self._lock:
                name, sock = self._holder, self._holder_socket
                self._holder, self._holder_socket = None, None
            if sock is not None:
                sock.close()  # the device process has closed its copy: the host sees EOF now
            log.info("connection from %s closed after %s requests (%s); the device is free", name, requests, reason)


def _leave_front_behind(keep: int) -> None:
    """In the new device process: ignore SIGINT and SIGTERM (the front process stops it, and it
    ends when the front process goes away), and let go of every socket and pipe inherited from
    the front process (its listener, other hosts' connections, other servers'), so that none of
    them stays open here.  Their descriptor numbers are pointed at /dev/null rather than closed,
    so no stale object can close a number that gets reused."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    folder = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    for entry in os.listdir(folder):
        fd = int(entry)
        if fd <= 2 or fd in (keep, null):
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            os.dup2(null, fd)


class _DeviceProcess:
    """The device process: receives one host connection at a time from the front process and
    serves it, frame after frame, until it ends; then reports and waits for the next."""

    def __init__(
        self,
        firmware: Firmware,
        control: socket.socket,
        frame_timeout: float,
        idle_timeout: float | None,
        poll_s: float,
        token: bytes | None = None,
        runs: mmap.mmap | None = None,
        max_run_s: float | None = None,
    ):
        self.firmware = firmware
        self.runs = runs if runs is not None else mmap.mmap(-1, _RUN_SLOTS.size)
        self.max_run_s = max_run_s
        self.sequence = 0  # RUNs served, numbering them for a second connection's ABORT
        self.control = control
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.poll_s = poll_s
        self.token = token

    def run(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.control, _MESSAGE_BYTES, 1)
            except OSError:
                return
            if not message.startswith(b"SERVE") or not fds:
                for fd in fds:
                    os.close(fd)
                if not message or message == b"STOP":
                    return
                continue
            sock = socket.socket(fileno=fds[0])
            requests, reason = 0, "device error"
            try:
                requests, reason = self.serve(sock, message[6:].decode(errors="replace"))
            finally:
                if reason.startswith("bad frame"):  # unread bytes may follow: let the error reply arrive
                    wire.close_gracefully(sock, min(1.0, self.frame_timeout))
                else:
                    with contextlib.suppress(OSError):
                        sock.close()
            try:
                self.control.send(f"FREE {requests} {reason}".encode()[:_MESSAGE_BYTES])
            except OSError:
                return

    def serve(self, sock: socket.socket, name: str = "") -> tuple[int, str]:
        """Serve one host until its connection ends; returns (requests executed, why it ended)."""
        reader = wire.FrameReader(sock)
        requests = 0
        handshake = _Handshake(self.token)
        # a host that has not authenticated gets frame_timeout s in all to do so, not the idle timeout
        auth_deadline = time.monotonic() + self.frame_timeout
        try:
            while True:
                wait = self.idle_timeout
                if not handshake.done:
                    wait = max(0.0, auth_deadline - time.monotonic())
                try:
                    header, payload = reader.read(wait, self.frame_timeout, self.poll_s)
                except wire.LinkClosed as exc:
                    return requests, ("stopped mid-frame: " + str(exc)) if exc.mid_frame else "closed by the host"
                except wire.LinkTimeout as exc:
                    if not exc.mid_frame and not handshake.done:
                        return requests, f"not authenticated within {self.frame_timeout:g} s"
                    return requests, ("stalled mid-frame: " if exc.mid_frame else "idle: ") + str(exc)
                except wire.FrameError as exc:
                    wire.send_frame(sock, wire.frame_error_reply(exc), self.frame_timeout)
                    return requests, f"bad frame: {exc}"
                try:
                    request = wire.open_frame(header, payload, wire.REQUEST)
                except wire.FrameError as exc:
                    wire.send_frame(sock, wire.frame_error_reply(exc), self.frame_timeout)
                    continue  # read whole: the stream is still in step
                del payload  # the request's arrays are views of it; the firmware copies what it keeps
                if header.opcode in (Opcode.AUTH_CHALLENGE, Opcode.AUTH_RESPONSE):
                    frame, failed = handshake.answer(header, request)
                    wire.send_frame(sock, frame, self.frame_timeout)
                    if failed:
                        log.warning("connection from %s: %s", name or "a host", failed)
                        return requests, failed
                    continue
                if not handshake.done:
                    wire.send_frame(sock, handshake.refusal(header), self.frame_timeout)
                    if handshake.refused >= _MAX_UNAUTHENTICATED:
                        return requests, f"{handshake.refused} commands before authentication"
                    continue
                requests += 1
                if header.opcode != Opcode.RUN:
                    wire.send_frame(sock, self._execute(header, request), self.frame_timeout)
                    continue
                frame, aborts = self._execute_run(header, request, reader)
                wire.send_frame(sock, frame, self.frame_timeout)
                for abort in aborts:  # the holder's ABORT, taken during the run, is answered after it
                    reply = wire.encode_frame(wire.REPLY, abort.opcode, Status.OK, abort.request_id, {"aborted": 1})
                    wire.send_frame(sock, reply, self.frame_timeout)
        except OSError as exc:
            return requests, f"link error: {exc}"

    def _execute_run(
        self, header: wire.Header, request: dict[str, Any], reader: wire.FrameReader
    ) -> tuple[bytes, list[wire.Header]]:
        """A RUN that can be stopped: between the run's chunks the firmware asks :meth:`interrupt`-like checks
        whether a second connection's ABORT named it, the holder sent ABORT, or max_run_s has passed.
        Returns the reply frame and the holder's ABORT headers taken meanwhile."""
        self.sequence += 1
        sequence, started, aborts = self.sequence, time.monotonic(), []
        _RUN_SLOTS.pack_into(self.runs, 0, sequence, 0)

        def interrupt() -> str:
            if _RUN_SLOTS.unpack_from(self.runs)[1] == sequence:
                return "ABORT from another connection of the holder's host"
            pending = reader.take_pending(Opcode.ABORT)
            if pending is not None:
                aborts.append(pending)
                return "ABORT from the host"
            if self.max_run_s is not None and time.monotonic() - started > self.max_run_s:
                return (
                    f"over the server's limit of {self.max_run_s:g} s of wall time per run (max_run_s,"
                    " `spu serve --max-run-seconds`); split the run, or raise the limit"
                )
            return ""

        self.firmware.interrupt = interrupt
        try:
            return self._execute(header, request), aborts
        finally:
            self.firmware.interrupt = None
            _RUN_SLOTS.pack_into(self.runs, 0, 0, 0)

    def _execute(self, header: wire.Header, request: dict[str, Any]) -> bytes:
        try:
            status, reply = self.firmware.handle(header.opcode, request)  # BLAS on a fixed thread count
        except Exception as exc:  # the firmware answers refusals itself; anything else is a bug
            log.exception("firmware failed on opcode %d", header.opcode)
            status, reply = Status.INTERNAL, {"message": f"internal error in the device: {type(exc).__name__}: {exc}"}
        try:
            return wire.encode_frame(wire.REPLY, header.opcode, status, header.request_id, reply)
        except wire.EncodeError as exc:
            log.error("reply to opcode %d cannot be sent: %s", header.opcode, exc)
            return wire.error_frame(header.opcode, header.request_id, Status.INTERNAL, f"reply not encodable: {exc}")


def exposure_warning(host: str, has_token: bool) -> str:
    """The warning for a server listening on ``host`` (an address) with no token, or "" when there is
    nothing to warn of (a loopback address, or a token set)."""
    if has_token:
        return ""
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a name: only "localhost" is known to stay on this machine
        loopback = host == "localhost"
    if loopback:
        return ""
    return (
        f"serving on {host}, beyond loopback, without a token: any host that can reach this port can load,"
        " run and read the device; start it with --token-file F (or $SPU_TOKEN), or serve on 127.0.0.1"
    )


def read_token(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The token of ``spu serve``: the contents of the file at ``path`` (whitespace at either end removed),
    else ``$SPU_TOKEN``, else None.  Raises ValueError for an unreadable file or a token under 16 bytes.
    Logs a warning when the file can be read by other users (as ssh does for a key)."""
    if path is not None:
        path = Path(path)
        try:
            raw = path.read_bytes()
            mode = path.stat().st_mode
        except OSError as exc:
            raise ValueError(f"token file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s can be read by other users: chmod 600 it", path)
        return wire.check_token(raw, f"the token in {str(path)!r}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    if value:
        return wire.check_token(value, f"${TOKEN_ENV}")
    return None


def _peer_name(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)


def serve(
    spec: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int | None = None,
    *,
    frame_timeout: float = wire.TIMING.frame_timeout_s,
    idle_timeout: float | None = wire.TIMING.idle_timeout_s,
    poll_s: float = wire.TIMING.device_poll_s,
    token: str | bytes | None = None,
    max_run_s: float | None = wire.TIMING.max_run_s,
) -> int:
    """Serve one emulated device until SIGINT or SIGTERM (``spu serve``); returns 0, or 1 if
    the device process failed.

    Logs one line when listening (with the address, so port 0 can be used), one per
    connection and one on shutdown, to stderr unless logging is configured already.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s spu serve: %(message)s")
    server = DeviceServer(
        Firmware(load_spec(spec), seed=seed),
        host,
        port,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        poll_s=poll_s,
        token=token,
        max_run_s=max_run_s,
    )

    def stop(signum: int, _frame: Any) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        server.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        seed_text = "fresh entropy" if seed is None else f"seed {seed}"
        log.info("serving %s (%s, %s) on %s", server.spec.name, server.spec.cells.kind, seed_text, server.url)
        if server.authenticated:
            log.info("a token is required: hosts must prove it before any command")
        server.serve_forever()
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped")
    return 1 if server.device_failed else 0
