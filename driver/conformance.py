"""Check a device that speaks the wire protocol against ``firmware_spec/PROTOCOL.md`` (``spu conformance``).

Two parts, each a list of named checks with the PROTOCOL.md section they test:

* **vectors**: the files of ``firmware_spec/vectors/`` (``common/`` and the folder named by the
  device's INFO ``spec.name``, or ``vectors=`` another), replayed frame for frame.  Every reply
  must parse with the strict reference decoder and match the vector's expectations: header
  (opcode, request_id, status, frame error), each listed field's type, dtype, shape, normative
  value and code bound, and whether the device closes the connection.  When the device's INFO
  reply is byte for byte the reference's (the same preset at seed 0), the replies the vectors
  record are compared byte for byte as well.
* **behaviour**: the session start, the state machine of commands and status bits, that refusals
  (BAD_ARGUMENT, BAD_STATE, a bad frame) change nothing, request ids repeated, BUSY for a second
  host, the device freed when its holder leaves, the same bits after RESET for the same calls,
  and the equilibrium the codes mean (a_ij = code / code_max * g_max, u = code / code_max * range_v).

It opens raw connections and builds frames itself (with the protocol's reference codec,
:mod:`spu_emulator.wire`, as the TCP transport does), so it tests the device, not the driver.
Each vector reuses the held connection; a vector that makes the device close it is followed by a
new one.  Cost: a few hundred exchanges and a handful of short runs; about a second on loopback.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# through a transport only: the wire codec is the protocol's reference implementation (as driver/tcp.py)
from spu_emulator import wire

from .errors import InvalidInputError, LinkError
from .protocol import SPEC_DIR, Opcode, Status, StatusBit
from .tcp import parse_url

__all__ = ["Check", "VECTOR_DIR", "run", "format_table", "to_json"]

VECTOR_DIR = SPEC_DIR / "vectors"
_CLOSE_WAIT_S = 5.0  # how long a device may take to close a connection it must close
_FREE_WAIT_S = 5.0  # how long a device may take to be free again after its holder left


@dataclass(frozen=True)
class Check:
    """One check: its name, the PROTOCOL.md section it tests, whether it passed, and why not."""

    name: str
    section: str
    passed: bool
    detail: str = ""


class _Failed(Exception):
    """A check's expectation that did not hold."""


class _Link:
    """One raw connection to the device: send a frame, read one reply frame (bounded by the limits)."""

    def __init__(self, host: str, port: int, timeout: float):
        self.timeout = timeout
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise LinkError(f"cannot connect to {host}:{port}: {exc}; is the device serving there?") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.open = True

    def exchange(self, frame: bytes) -> bytes:
        """Send a frame, return the raw reply frame.  Raises _Failed when no whole reply comes."""
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(frame)
            head = self._read(wire.HEADER.size, "reply header")
            (length,) = struct.unpack_from("<I", head, 16)
            if length > wire.LIMITS.max_payload_bytes:
                raise _Failed(f"reply payload_length {length} is over the limit {wire.LIMITS.max_payload_bytes}")
            return head + self._read(length, "reply payload")
        except OSError as exc:
            self.close()
            raise _Failed(f"link error: {exc}") from None

    def _read(self, count: int, what: str) -> bytes:
        data = bytearray()
        while len(data) < count:
            try:
                chunk = self.sock.recv(min(count - len(data), 1 << 20))
            except TimeoutError:
                self.close()
                raise _Failed(f"no {what} within {self.timeout:g} s ({len(data)} of {count} bytes)") from None
            if not chunk:
                self.close()
                raise _Failed(f"the device closed the connection after {len(data)} of {count} {what} bytes")
            data += chunk
        return bytes(data)

    def closed_by_device(self, wait_s: float = _CLOSE_WAIT_S) -> bool:
        """Whether the device closes the connection (EOF or reset) within ``wait_s``, sending nothing more."""
        deadline = time.monotonic() + wait_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True
        return False

    def leave(self) -> None:
        """Half-close and wait for the device to close its side (so it is free), then close."""
        if self.open:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                self.closed_by_device(_FREE_WAIT_S)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            self.sock.close()


def _request(opcode: int, payload: Mapping[str, Any] | bytes | None = None, request_id: int = 1) -> bytes:
    return wire.encode_frame(wire.REQUEST, int(opcode), 0, request_id, payload)


def _parse(raw: bytes) -> tuple[wire.Header, dict[str, Any]]:
    try:
        return wire.decode_frame(raw, wire.REPLY)
    except wire.FrameError as exc:
        raise _Failed(f"the reply frame does not parse ({exc}); reply {raw[:64].hex()}...") from None


def _status_name(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return f"unknown status {code}"


def _check_field(name: str, want: Mapping[str, Any], value: Any) -> str | None:
    kinds = {bool: "bool", int: "int", float: "float", str: "str", dict: "map"}
    kind = "array" if isinstance(value, np.ndarray) else kinds.get(type(value), type(value).__name__)
    if kind != want["type"]:
        return f"field {name!r} is {kind}, expected {want['type']}"
    if kind == "array":
        if value.dtype.name != want["dtype"]:
            return f"array {name!r} has dtype {value.dtype.name}, expected {want['dtype']}"
        if list(value.shape) != want["shape"]:
            return f"array {name!r} has shape {list(value.shape)}, expected {want['shape']}"
        if "max_abs" in want and value.size and float(np.max(np.abs(value))) > want["max_abs"]:
            return f"array {name!r} holds {float(np.max(np.abs(value))):g}, beyond the code bound {want['max_abs']}"
    if "value" in want and value != want["value"]:
        return f"field {name!r} = {value!r}, expected {want['value']!r}"
    return None


def check_reply(expect: Mapping[str, Any], raw: bytes, reference: str | None = None) -> list[str]:
    """Problems of a raw reply frame against a vector step's ``expect`` (and its recorded reply bytes
    ``reference``, hex, when given); empty when it conforms."""
    header, payload = _parse(raw)
    problems = []
    for key in ("opcode", "request_id"):
        if getattr(header, key) != expect[key]:
            problems.append(f"{key} {getattr(header, key)}, expected {expect[key]}")
    status = _status_name(header.status)
    if status != expect["status"]:
        problems.append(f"status {status} ({payload.get('message', '')!s:.200}), expected {expect['status']}")
        return problems
    if "error" in expect:
        code = payload.get("error")
        names = {int(e): e.name for e in wire.FrameErrorCode}
        if names.get(code) != expect["error"]:
            problems.append(f"frame error {names.get(code, code)}, expected {expect['error']}")
    for name, want in expect["fields"].items():
        if name not in payload:
            problems.append(f"field {name!r} missing")
            continue
        problem = _check_field(name, want, payload[name])
        if problem:
            problems.append(problem)
    if reference is not None and raw.hex() != reference:
        problems.append(f"reply differs from the reference's bytes ({len(raw)} bytes, {len(reference) // 2} recorded)")
    return problems


# -- the session: one held connection, reopened when the device closes it ------------------------


class _Session:
    def __init__(self, host: str, port: int, timeout: float, token: bytes | None = None):
        self.host, self.port, self.timeout, self.token = host, port, timeout, token
        self.link: _Link | None = None

    def held(self) -> _Link:
        """The connection that holds the device (a new one, retried while the device is not yet free)."""
        if self.link is not None and self.link.open:
            return self.link
        deadline = time.monotonic() + _FREE_WAIT_S
        while True:
            link = _Link(self.host, self.port, self.timeout)
            try:
                if self.token is not None:  # the handshake may come first even while another host holds it
                    header, reply = _parse(link.exchange(_request(Opcode.AUTH_CHALLENGE, None, 1)))
                    if header.status != Status.BUSY:
                        _authenticate(link, self.token, header, reply)
                if self.token is None or header.status != Status.BUSY:
                    header, _ = _parse(link.exchange(_request(Opcode.STATUS, None, 3)))
            except _Failed:
                link.close()  # a connection that holds the device must not outlive the check that opened it
                raise
            if header.status != Status.BUSY:
                self.link = link
                return link
            link.close()
            if time.monotonic() >= deadline:
                raise _Failed(f"the device still answers BUSY {_FREE_WAIT_S:g} s after its holder left")
            time.sleep(0.02)

    def call(self, opcode: int, payload: Mapping[str, Any] | bytes | None = None, request_id: int = 1):
        """(status name, reply payload) of one exchange on the held connection (its opcode and request_id
        are the business of their own check and the vectors, so that one fault fails the checks it concerns)."""
        header, reply = _parse(self.held().exchange(_request(opcode, payload, request_id)))
        return _status_name(header.status), reply

    def ok(self, opcode: int, payload: Mapping[str, Any] | bytes | None = None) -> dict[str, Any]:
        status, reply = self.call(opcode, payload)
        if status != "OK":
            raise _Failed(f"{Opcode(opcode).name} answered {status}: {reply.get('message', '')}")
        return reply

    def refused(self, opcode: int, payload: Any, want: str, what: str) -> None:
        status, reply = self.call(opcode, payload)
        if status != want:
            raise _Failed(f"{what}: answered {status}, expected {want} ({reply.get('message', '')!s:.200})")

    def close(self) -> None:
        if self.link is not None:
            self.link.leave()
            self.link = None


def _authenticate(link: _Link, token: bytes, header: wire.Header, challenge: Mapping[str, Any]) -> None:
    """The rest of the handshake after AUTH_CHALLENGE's reply (PROTOCOL.md, Security): prove the token, check
    the device's proof."""
    nonce = challenge.get("nonce")
    if _status_name(header.status) != "OK" or not wire.is_nonce(nonce) or challenge.get("required") is not True:
        raise _Failed(
            f"AUTH_CHALLENGE answered {_status_name(header.status)} {dict(challenge)!r:.200}; a device with a"
            " token answers OK with a 64-hex-digit nonce and required = true"
        )
    host_nonce = wire.new_nonce()
    mac = wire.auth_mac(token, wire.AUTH_HOST, nonce, host_nonce)
    header, reply = _parse(link.exchange(_request(Opcode.AUTH_RESPONSE, {"mac": mac, "host_nonce": host_nonce}, 2)))
    if _status_name(header.status) != "OK":
        raise _Failed(
            f"AUTH_RESPONSE answered {_status_name(header.status)}: {reply.get('message', '')}; is the token"
            " the device's?"
        )
    proof = wire.auth_mac(token, wire.AUTH_DEVICE, nonce, host_nonce)
    if not (wire.is_nonce(reply.get("mac")) and wire.macs_equal(reply["mac"], proof)):
        raise _Failed("the device's proof (AUTH_RESPONSE mac) does not match the token")


def _handshake(session: _Session, inputs: _Inputs) -> str:
    """With a token: a command before the handshake is refused UNAUTHENTICATED, repeating opcode and request_id,
    and runs nothing; the handshake then opens the device."""
    session.held()  # authenticates
    session.ok(Opcode.RESET)
    session.close()
    deadline = time.monotonic() + _FREE_WAIT_S
    while True:
        stranger = _Link(session.host, session.port, session.timeout)
        header, reply = _parse(stranger.exchange(_request(Opcode.LOAD_VECTOR, {"codes": inputs.vector}, 31)))
        if _status_name(header.status) != "BUSY" or time.monotonic() >= deadline:
            break
        stranger.close()
        time.sleep(0.02)
    stranger.close()
    got = (_status_name(header.status), header.opcode, header.request_id)
    if got != ("UNAUTHENTICATED", Opcode.LOAD_VECTOR, 31):
        raise _Failed(f"LOAD_VECTOR before the handshake got {got}, expected UNAUTHENTICATED repeating opcode 4, id 31")
    if _word(session)["vector_n"] != 0:
        raise _Failed("a LOAD_VECTOR refused as UNAUTHENTICATED changed the device")
    return ""


# -- vectors -------------------------------------------------------------------------------------


def _vector_files(folder: Path, device: str) -> list[Path]:
    return sorted((folder / "common").glob("*.json")) + sorted((folder / device).glob("*.json"))


def _replay(session: _Session, vector: Mapping[str, Any], exact: bool) -> None:
    for number, step in enumerate(vector["steps"], start=1):
        request = bytes.fromhex(step["request"])
        expect = step["expect"]
        where = f"step {number} ({step.get('opcode') or 'opcode ' + str(expect['opcode'])})"
        if step.get("connection"):
            session.held()  # the first connection holds the device
            link = _Link(session.host, session.port, session.timeout)
        else:
            link = session.held()
        try:
            raw = link.exchange(request)
            problems = check_reply(expect, raw, step.get("reply") if exact else None)
        except _Failed as exc:
            raise _Failed(f"{where}: {exc}") from None
        if expect["closes"] and not link.closed_by_device():
            problems.append(f"the device did not close the connection within {_CLOSE_WAIT_S:g} s")
        if expect["closes"] or step.get("connection"):
            link.close()
        if problems:
            raise _Failed(f"{where}: " + "; ".join(problems))


def _vector_checks(session: _Session, folder: Path, device: str) -> Iterator[Check]:
    files = _vector_files(folder, device)
    if session.token is not None:  # these describe a device without a token
        files = [path for path in files if not (path.parent.name == "common" and path.stem.startswith("auth_"))]
    if not (folder / device).is_dir():
        yield Check(
            "vectors: device set",
            "Test vectors",
            False,
            f"no vectors for a device named {device!r} in {folder}; ran the common ones only. Make its set from"
            " its spec (python -m spu_emulator.vectors --spec SPEC.yaml --path DIR --write) and pass --vectors DIR",
        )
    reference = folder / device / "info.json"
    exact = False
    if reference.is_file():
        recorded = json.loads(reference.read_text())
        step = recorded["steps"][0]
        where = f"{recorded['reference']['preset']} at seed {recorded['reference']['seed']}"
        try:
            exact = session.held().exchange(bytes.fromhex(step["request"])).hex() == step.get("reply")
            detail = (
                f"compared byte for byte where recorded: the device's INFO reply is the reference's ({where})"
                if exact
                else f"replies checked by their properties: the device's INFO reply is not the reference's ({where})"
            )
            yield Check("vectors: reply bytes", "Test vectors and spu conformance", True, detail)
        except _Failed as exc:
            yield Check("vectors: reply bytes", "Test vectors and spu conformance", False, f"INFO: {exc}")
    for path in files:
        vector = json.loads(path.read_text())
        name = f"vector {path.parent.name}/{path.stem}"
        yield _run_check(name, vector["section"], lambda v=vector: _replay(session, v, exact))


def _run_check(name: str, section: str, body: Callable[[], Any]) -> Check:
    try:
        detail = body()
    except _Failed as exc:
        return Check(name, section, False, str(exc))
    except (wire.EncodeError, KeyError, ValueError, OSError, LinkError) as exc:
        return Check(name, section, False, f"{type(exc).__name__}: {exc}")
    return Check(name, section, True, detail or "")


# -- behaviour -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """A small problem the device takes, from its INFO spec: codes of A (2 x 2) and b (2,)."""

    matrix: np.ndarray
    vector: np.ndarray
    over: np.ndarray  # LOAD_MATRIX codes one beyond the element's full scale
    t: float
    expected_codes: np.ndarray | None  # the ideal mean ADC codes of A^-1 b, None without a quantised ADC
    adc_top: int

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> _Inputs:
        coupling, dac, adc = spec["coupling"], spec["dac"], spec["adc"]
        a = np.array([[1.0, 0.25], [0.25, 1.0]])  # in g_max
        b = np.array([0.25, -0.25])  # in DAC range_v
        matrix = _codes(a, coupling["element_bits"], coupling["g_max"])
        vector = _codes(b, dac["bits"], dac["range_v"])
        over = matrix.astype(np.int32 if coupling["element_bits"] else np.float64).copy()
        over[0, 0] = _top(coupling["element_bits"]) + 1 if coupling["element_bits"] else 2.0 * coupling["g_max"]
        # the codes mean a_ij = code / code_max * g_max (g0) and u = code / code_max * range_v (volts), rounded to
        # nearest (a continuous part takes the values themselves); the equilibrium x = A^-1 u reads back as
        # x / adc.range_v * adc code_max
        a_g0 = matrix / _top(coupling["element_bits"]) * coupling["g_max"] if coupling["element_bits"] else matrix
        u = vector / _top(dac["bits"]) * dac["range_v"] if dac["bits"] else vector
        x = np.linalg.solve(a_g0, u)
        expected = x / adc["range_v"] * _top(adc["bits"]) if adc["bits"] else x
        t = float(max(20.0, 200.0 / float(adc["sample_rate"])))
        return cls(matrix, vector, over, t, expected, _top(adc["bits"]))


def _top(bits: int) -> int:
    return (1 << (bits - 1)) - 1 if bits > 0 else 1


def _codes(fraction: np.ndarray, bits: int, scale: float) -> np.ndarray:
    """Codes of fractions of full scale, rounded to nearest, in the narrowest integer type; for a continuous
    part the values themselves, fraction * ``scale`` (the full scale)."""
    if bits == 0:
        return fraction * scale
    dtype = np.int8 if bits <= 8 else np.int16 if bits <= 16 else np.int32
    return np.rint(fraction * _top(bits)).astype(dtype)


def _word(session: _Session) -> dict[str, Any]:
    return session.ok(Opcode.STATUS)


def _load_and_run(session: _Session, inputs: _Inputs) -> None:
    session.ok(Opcode.LOAD_MATRIX, {"codes": inputs.matrix})
    session.ok(Opcode.LOAD_VECTOR, {"codes": inputs.vector})
    session.ok(Opcode.RUN, {"t": inputs.t, "burn_in": inputs.t / 2})


def _session_start(session: _Session, inputs: _Inputs) -> str:
    session.ok(Opcode.INFO)
    session.ok(Opcode.RESET)
    status = _word(session)
    got = {key: status.get(key) for key in ("word", "matrix_n", "vector_n", "runs")}
    if got != {"word": 0, "matrix_n": 0, "vector_n": 0, "runs": 0}:
        raise _Failed(f"STATUS after INFO, RESET is {got}, expected power-on (all 0)")
    return ""


def _state_machine(session: _Session, inputs: _Inputs) -> str:
    bits = StatusBit
    session.ok(Opcode.RESET)
    session.refused(Opcode.RUN, {"t": inputs.t}, "BAD_STATE", "RUN with nothing loaded")
    session.refused(Opcode.READ_MEAN, None, "BAD_STATE", "READ_MEAN before any RUN")
    steps = [
        (Opcode.LOAD_MATRIX, {"codes": inputs.matrix}, bits.MATRIX_LOADED),
        (Opcode.LOAD_VECTOR, {"codes": inputs.vector}, bits.MATRIX_LOADED | bits.VECTOR_LOADED),
    ]
    for opcode, payload, want in steps:
        session.ok(opcode, payload)
        word = _word(session)["word"]
        if word != want:
            raise _Failed(f"STATUS word after {opcode.name} is {word}, expected {int(want)}")
    session.ok(Opcode.RUN, {"t": inputs.t, "burn_in": inputs.t / 2})
    status = _word(session)
    if not status["word"] & bits.HAS_RUN or status["runs"] != 1:
        raise _Failed(f"STATUS after RUN is {status}: expected HAS_RUN set and runs 1")
    if session.ok(Opcode.READ_MEAN)["samples"] <= 0:
        raise _Failed("READ_MEAN after RUN reports no samples")
    session.ok(Opcode.RESET)
    if _word(session)["word"] != 0:
        raise _Failed("STATUS word after RESET is not 0")
    session.refused(Opcode.READ_MEAN, None, "BAD_STATE", "READ_MEAN after RESET")
    return ""


def _refusals_change_nothing(session: _Session, inputs: _Inputs) -> str:
    session.ok(Opcode.RESET)
    _load_and_run(session, inputs)
    before = (_word(session), session.ok(Opcode.READ_MEAN)["mean_codes"].tobytes())
    session.refused(Opcode.LOAD_MATRIX, {"codes": inputs.over}, "BAD_ARGUMENT", "LOAD_MATRIX beyond full scale")
    session.refused(Opcode.LOAD_MATRIX, {"codes": inputs.matrix[:1]}, "BAD_ARGUMENT", "LOAD_MATRIX of shape (1, 2)")
    session.refused(Opcode.LOAD_VECTOR, {"codes": inputs.vector[:, None]}, "BAD_ARGUMENT", "LOAD_VECTOR of 2-d codes")
    session.refused(Opcode.RUN, {"t": 0.0}, "BAD_ARGUMENT", "RUN with t = 0")
    session.refused(Opcode.RUN, {"t": inputs.t, "engine": 99}, "BAD_ARGUMENT", "RUN with engine 99")
    session.refused(Opcode.STATUS, {"no_such_field": 1}, "BAD_ARGUMENT", "STATUS with an unknown field")
    frame = bytearray(_request(Opcode.LOAD_MATRIX, {"codes": np.zeros_like(inputs.matrix)}, 5))
    frame[-1] ^= 1  # a corrupted payload: the frame is refused before the command handler
    header, reply = _parse(session.held().exchange(bytes(frame)))
    if _status_name(header.status) != "BAD_FRAME":
        raise _Failed(f"a LOAD_MATRIX frame with a corrupted payload answered {_status_name(header.status)}")
    after = (_word(session), session.ok(Opcode.READ_MEAN)["mean_codes"].tobytes())
    if after[0] != before[0]:
        raise _Failed(f"STATUS changed across refused requests: {before[0]} -> {after[0]}")
    if after[1] != before[1]:
        raise _Failed("READ_MEAN changed across refused requests")
    return "6 refusals and a corrupted frame: STATUS and READ_MEAN unchanged"


def _ids_repeated(session: _Session, inputs: _Inputs) -> str:
    link = session.held()
    for opcode, request_id in ((Opcode.STATUS, 0x12345678), (Opcode.STATUS, 0xFFFFFFFF), (Opcode.READ_SAMPLES, 0)):
        header, _ = _parse(
            link.exchange(_request(opcode, {"k": 0} if opcode == Opcode.READ_SAMPLES else None, request_id))
        )
        if (header.opcode, header.request_id) != (opcode, request_id):
            raise _Failed(
                f"request opcode {int(opcode)} id {request_id:#x}: reply has opcode {header.opcode}"
                f" id {header.request_id:#x}"
            )
    frame = bytearray(_request(Opcode.STATUS, None, 0xABCDEF01))
    struct.pack_into("<I", frame, 20, 1)  # payload CRC of an empty payload must be 0
    struct.pack_into("<I", frame, 24, zlib.crc32(frame[:24]))
    header, _ = _parse(link.exchange(bytes(frame)))
    if (header.opcode, header.request_id) != (Opcode.STATUS, 0xABCDEF01):
        raise _Failed(
            f"a BAD_PAYLOAD_CHECKSUM reply has opcode {header.opcode} id {header.request_id:#x}; its header was"
            " readable, so it must repeat opcode 8 and id 0xabcdef01"
        )
    return ""


def _busy(session: _Session, inputs: _Inputs) -> str:
    session.held()
    second = _Link(session.host, session.port, session.timeout)
    try:
        header, _ = _parse(second.exchange(_request(Opcode.STATUS, None, 77)))
        if (_status_name(header.status), header.opcode, header.request_id) != ("BUSY", Opcode.STATUS, 77):
            raise _Failed(
                f"a second host's STATUS (id 77) got {_status_name(header.status)}, opcode {header.opcode},"
                f" id {header.request_id}; expected BUSY repeating opcode 8 and id 77"
            )
        if not second.closed_by_device():
            raise _Failed("the device kept the second host's connection open after BUSY")
    finally:
        second.close()
    session.ok(Opcode.STATUS)  # the holder is still served
    return ""


def _freed(session: _Session, inputs: _Inputs) -> str:
    session.close()
    started = time.monotonic()
    session.held()  # retries BUSY for up to _FREE_WAIT_S
    return f"free again {1e3 * (time.monotonic() - started):.0f} ms after the holder left"


def _deterministic(session: _Session, inputs: _Inputs) -> str:
    means = []
    for _ in range(2):
        session.ok(Opcode.RESET)
        _load_and_run(session, inputs)
        means.append(session.ok(Opcode.READ_MEAN)["mean_codes"])
    if means[0].tobytes() != means[1].tobytes():
        raise _Failed(f"two runs after RESET with the same calls gave {means[0]} and {means[1]}")
    return ""


def _code_meaning(session: _Session, inputs: _Inputs) -> str:
    session.ok(Opcode.RESET)
    _load_and_run(session, inputs)
    mean = session.ok(Opcode.READ_MEAN)["mean_codes"]
    expected = inputs.expected_codes
    # parts mismatch and offsets of a real device move the equilibrium by a few per cent of full scale; a code
    # misread (a wrong code_max, rounding, a sign) moves it by tens
    tolerance = 0.05 * np.abs(expected).max() + 0.02 * inputs.adc_top
    error = float(np.max(np.abs(mean - expected)))
    if not error <= tolerance:
        raise _Failed(f"READ_MEAN gave {mean}, the codes mean {expected} (A^-1 b); off by {error:g} > {tolerance:g}")
    return f"max |mean - A^-1 b| = {error:.3g} codes (tolerance {tolerance:.3g})"


_BEHAVIOUR: tuple[tuple[str, str, Callable[[_Session, _Inputs], str]], ...] = (
    ("session start: INFO, RESET give power-on state", "Implementing a device / session", _session_start),
    ("state machine: commands and status bits in order", "Implementing a device / state machine", _state_machine),
    ("refusals change nothing", "Implementing a device / refusals", _refusals_change_nothing),
    ("replies repeat opcode and request_id", "Exchanges; Replies to bad frames", _ids_repeated),
    ("BUSY for a second host", "Sessions / one host at a time", _busy),
    ("freed when the holder leaves", "Sessions / freeing", _freed),
    ("same calls after RESET give the same bits", "Implementing a device / session", _deterministic),
    (
        "codes mean a = code/code_max g_max, u = code/code_max range_v",
        "Implementing a device / code meaning",
        _code_meaning,
    ),
)
_HANDSHAKE = ("with a token: nothing runs before the handshake", "Security", _handshake)


# -- entry points ---------------------------------------------------------------------------------


def run(
    url: str, *, vectors: str | Path | None = None, timeout: float = 30.0, token: str | bytes | None = None
) -> list[Check]:
    """Run every check against the device at ``url`` (tcp://HOST:PORT); returns them in order.

    vectors: the folder of vector sets (default firmware_spec/vectors).  token: the device's shared secret,
    when it has one (every connection then starts with the handshake, and a check that it is required).
    Raises InvalidInputError for a bad URL, folder or token, LinkError when the device cannot be reached."""
    host, port = parse_url(url)
    try:
        secret = None if token is None else wire.check_token(token)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    folder = VECTOR_DIR if vectors is None else Path(vectors)
    if not (folder / "common").is_dir():
        raise InvalidInputError(f"{folder} has no common/ vector set; pass the firmware_spec/vectors folder")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidInputError(f"timeout must be a positive number of seconds, got {timeout!r}")
    session = _Session(host, port, float(timeout), secret)
    checks: list[Check] = []
    try:
        try:
            info = session.ok(Opcode.INFO)
            spec = info["spec"]
            inputs = _Inputs.of(spec)
        except (_Failed, KeyError, TypeError) as exc:
            return [Check("INFO reply", "Commands / INFO", False, f"cannot read the device's spec: {exc}")]
        behaviour = _BEHAVIOUR if secret is None else (*_BEHAVIOUR, _HANDSHAKE)
        for name, section, body in behaviour:
            checks.append(_run_check(name, section, lambda b=body: b(session, inputs)))
        checks.extend(_vector_checks(session, folder, str(spec.get("name", ""))))
    finally:
        session.close()
    return checks


def format_table(checks: Sequence[Check], url: str) -> str:
    """The checks as a text table, one line each, and a summary line."""
    width = max(len(check.name) for check in checks)
    section_width = max(len(check.section) for check in checks)
    lines = [f"{'result':6}  {'check':{width}}  {'section (PROTOCOL.md)':{section_width}}  detail"]
    for check in checks:
        mark = "pass" if check.passed else "FAIL"
        detail = check.detail if len(check.detail) <= 160 else check.detail[:157] + "..."
        lines.append(f"{mark:6}  {check.name:{width}}  {check.section:{section_width}}  {detail}")
    failed = sum(not check.passed for check in checks)
    lines.append(
        f"{url}: {len(checks) - failed} of {len(checks)} checks passed" + (f", {failed} failed" if failed else "")
    )
    return "\n".join(lines)


def to_json(checks: Sequence[Check], url: str) -> str:
    """The checks as one JSON object: url, passed, failed, checks [{name, section, passed, detail}]."""
    failed = sum(not check.passed for check in checks)
    return json.dumps(
        {"url": url, "passed": len(checks) - failed, "failed": failed, "checks": [asdict(c) for c in checks]}
    )
