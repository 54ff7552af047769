"""Language-neutral test vectors of the wire protocol, recorded from the reference implementation.

``firmware_spec/vectors/`` holds one JSON file per case: the request frames of a short exchange
(hex), and for each the reply a conforming device must give (its header fields, status, frame
error, the fields of its payload with their types, shapes and the values that do not depend on
the noise stream) and whether the device closes the connection after it.  Where the reference
device's reply holds no float from the noise stream, the file also gives the reply's bytes
(``reply``), which the reference (``spu serve PRESET --seed 0``) reproduces byte for byte.
``common/`` holds the cases whose expectations are the same on every device; ``<preset>/`` the
cases built from one preset's spec (its code widths, sizes and limits).  See
``firmware_spec/vectors/README.md`` for the format and how to replay them without Python.

    python -m spu_emulator.vectors            # check the files (exit 1 if stale)
    python -m spu_emulator.vectors --write    # regenerate them

The cases are data (:data:`CASES`): a new command is covered by adding a :class:`Case` of
:class:`Step` s (opcode name, payload or a function of the device spec, expected status); the
generator runs them on the reference firmware, checks the statuses it was told to expect, and
writes the files.  A test fails when an opcode of protocol.yaml has no vector.

Cost: one in-memory :class:`Firmware` per preset; a few seconds for every preset.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .converters import code_max
from .firmware import Firmware
from .protocol import Opcode, Status
from .server import _Handshake
from .spec import SPEC_DIR, DeviceSpec, load_spec, preset_names

__all__ = [
    "VECTOR_DIR",
    "SEED",
    "COMMON",
    "Step",
    "Case",
    "CASES",
    "Reference",
    "generate",
    "main",
]

VECTOR_DIR = SPEC_DIR / "vectors"
SEED = 0
COMMON = "common"  # the folder of the device-independent cases
_COMMON_PRESET = "spu-8"  # the device their reply bytes are recorded from
FORMAT = 1  # of the JSON files

Payload = Mapping[str, Any] | bytes | None
PayloadOf = Payload | Callable[[DeviceSpec], Payload]

# reply fields whose values a conforming device must reproduce (the rest depend on its noise, its
# timing model or its choice of engine, so only their type and shape are given)
_NORMATIVE = frozenset({"n", "m", "word", "matrix_n", "vector_n", "runs", "recorded", "error", "protocol_version"})
# replies whose arrays are ADC codes, so |value| <= adc code_max on a quantised ADC
_ADC_ARRAYS = {"READ_MEAN": ("mean_codes",), "READ_STATE": ("codes",), "READ_SAMPLES": ("codes",)}
_ADC_ARRAYS["READ_COV"] = _ADC_ARRAYS["READ_LAGGED"] = ("mean_codes",)
_LINK_OPCODES = (Opcode.AUTH_CHALLENGE, Opcode.AUTH_RESPONSE)


@dataclass(frozen=True)
class Step:
    """One request of a case and what the reference must answer.

    opcode: a name of protocol.yaml ``opcodes``, or a number (an unknown opcode).
    payload: the request's fields, raw payload bytes, or a function of the device spec giving either.
    status: the status the reference must answer (the generator checks it).
    error: the frame_errors name of a BAD_FRAME reply.
    frame: rewrites the encoded request frame (a broken header).
    request_id: the header's request_id (default: the step's number from 1).
    connection: 1 sends the request on a second connection while the first holds the device.
    values: reply fields whose values are normative besides the default ones.
    exact: whether the reply's bytes are recorded (default: when nothing in them comes from the noise stream).
    """

    opcode: str | int
    payload: PayloadOf = None
    status: str = "OK"
    error: str | None = None
    frame: Callable[[bytes], bytes] | None = None
    request_id: int | None = None
    connection: int = 0
    values: tuple[str, ...] = ()
    exact: bool | None = None


@dataclass(frozen=True)
class Case:
    """A named exchange: ``steps`` from a device the host holds, the spec ``section`` it checks.

    common: the expectations are the same on every device (recorded once, under common/).
    applies: for a per-preset case, whether the preset can run it (default: every preset).
    """

    name: str
    section: str
    doc: str
    steps: tuple[Step, ...]
    common: bool = False
    applies: Callable[[DeviceSpec], bool] | None = None


# -- inputs a device of a given spec accepts --------------------------------------------------


def _codes(values: np.ndarray, bits: int, full_scale: float, dtype: str | None = None) -> np.ndarray:
    """Codes of analog values (rounded to nearest), in the narrowest integer dtype unless told; float64 values
    for a continuous part."""
    if bits == 0:
        return np.asarray(values, dtype=np.float64)
    codes = np.rint(np.asarray(values) / full_scale * code_max(bits))
    if dtype is None:
        dtype = "int8" if bits <= 8 else "int16" if bits <= 16 else "int32" if bits <= 32 else "int64"
    return codes.astype(dtype)


_A = np.array([[1.0, 0.25], [0.25, 1.0]])  # in g_max: well conditioned, positive definite
_B = np.array([0.25, -0.25])  # in DAC range: the equilibrium stays well inside rails and ADC range


def _matrix(spec: DeviceSpec, dtype: str | None = None, scale: float = 1.0) -> np.ndarray:
    return _codes(scale * _A, spec.coupling.element_bits, spec.coupling.g_max, dtype)


def _at_code_max(spec: DeviceSpec, over: int) -> np.ndarray:
    """int32 codes with +-code_max (+ ``over`` on the first diagonal element) and small ones off the diagonal."""
    top = code_max(spec.coupling.element_bits)
    return np.array([[top + over, -(top // 4)], [-(top // 4), top]], dtype=np.int32)


def _vector(spec: DeviceSpec, n: int = 2) -> np.ndarray:
    return _codes(np.resize(_B, n), spec.dac.bits, spec.dac.range_v)


def _mid_damping(spec: DeviceSpec) -> float:
    return 0.5 * (spec.oscillator.damping_min + spec.oscillator.damping_max)


def _run_time(spec: DeviceSpec) -> float:
    """A run long enough to settle (A's slowest mode decays as e^-0.75 t) and take a few hundred conversions."""
    return float(max(20.0, 200.0 / spec.adc.sample_rate))


def _run(spec: DeviceSpec, **extra: Any) -> dict[str, Any]:
    t = _run_time(spec)
    return {"t": t, "burn_in": t / 2, **extra}


def _quantised(spec: DeviceSpec) -> bool:
    return spec.coupling.element_bits > 0


def _small_dense(spec: DeviceSpec) -> bool:
    """Whether a matrix one larger than the device takes is small enough for a vector file."""
    return min(spec.cells.count, spec.coupling.max_dense_size) < 64


def _loaded(spec_steps: Sequence[Step] = ()) -> tuple[Step, ...]:
    return (
        Step("RESET"),
        Step("LOAD_MATRIX", lambda s: {"codes": _matrix(s)}),
        Step("LOAD_VECTOR", lambda s: {"codes": _vector(s)}),
        *spec_steps,
    )


def _ran(**run: Any) -> tuple[Step, ...]:
    return _loaded((Step("RUN", lambda s: _run(s, **run)),))


# -- hand-written payload bytes (padding, nesting and malformed payloads) ---------------------------


def _name(name: bytes) -> bytes:
    return bytes((len(name),)) + name


def _array_field(name: bytes, codes: np.ndarray, at: int, *, pad_from: int = 0, pad_byte: int = 0) -> bytes:
    """An array field that starts at payload offset ``at``; padding counted from payload offset ``pad_from``
    (0: the payload's start, as the protocol says)."""
    code = wire.PROTOCOL["array_dtypes"][codes.dtype.name]["code"]
    head = _name(name) + bytes((wire.PROTOCOL["payload_types"]["array"]["tag"], code, codes.ndim))
    head += struct.pack(f"<{codes.ndim}I", *codes.shape)
    pad = -(at - pad_from + len(head)) % 8
    return head + bytes((pad_byte,)) * pad + codes.astype(codes.dtype.newbyteorder("<")).tobytes()


def _tag(kind: str) -> int:
    return wire.PROTOCOL["payload_types"][kind]["tag"]


def _str_field(name: bytes, text: bytes) -> bytes:
    return _name(name) + bytes((_tag("str"),)) + struct.pack("<I", len(text)) + text


def _int_field(name: bytes, value: int) -> bytes:
    return _name(name) + bytes((_tag("int"),)) + struct.pack("<q", value)


def _leading_string(length: int) -> Callable[[DeviceSpec], bytes]:
    """LOAD_VECTOR with an unknown str field of ``length`` bytes before ``codes``: the array starts at another
    offset, so its padding is 0 to 7 bytes; a device that parses it answers BAD_ARGUMENT naming the field."""

    def build(spec: DeviceSpec) -> bytes:
        body = struct.pack("<H", 2) + _str_field(b"note", b"x" * length)
        return body + _array_field(b"codes", _vector(spec), len(body))

    return build


def _nested(pad_from_map: bool) -> Callable[[DeviceSpec], bytes]:
    """LOAD_VECTOR's codes, then an unknown map field holding an array: padded from the payload's start
    (correct: BAD_ARGUMENT for the unknown field) or from the map's start (BAD_PAYLOAD)."""

    def build(spec: DeviceSpec) -> bytes:
        body = struct.pack("<H", 2) + _array_field(b"codes", _vector(spec), 2)
        body += _name(b"extra") + bytes((_tag("map"),))
        map_start = len(body)
        body += struct.pack("<H", 1)
        return body + _array_field(
            b"values", np.arange(3, dtype=np.int16), len(body), pad_from=map_start if pad_from_map else 0
        )

    return build


def _fields(count: int, *fields: bytes) -> bytes:
    return struct.pack("<H", count) + b"".join(fields)


def _deep(depth: int) -> bytes:
    """A payload whose maps nest ``depth`` deep."""
    inner = _fields(1, _int_field(b"k", 1))
    for _ in range(depth):
        inner = _fields(1, _name(b"m") + bytes((_tag("map"),)) + inner)
    return inner


def _header(**changes: int | bytes) -> Callable[[bytes], bytes]:
    """Rewrite header fields of a frame, then recompute its header CRC (unless header_crc32 is given)."""

    def rewrite(frame: bytes) -> bytes:
        fields = wire.Header._make(wire.HEADER.unpack_from(frame))._replace(**changes)
        head = bytearray(wire.HEADER.pack(*fields))
        if "header_crc32" not in changes:
            struct.pack_into("<I", head, wire.HEADER.size - 4, zlib.crc32(head[: wire.HEADER.size - 4]))
        return bytes(head) + frame[wire.HEADER.size :]

    return rewrite


def _flip_payload_byte(frame: bytes) -> bytes:
    return frame[:-1] + bytes((frame[-1] ^ 0x01,))


_MAX_FIELDS = wire.LIMITS.max_fields
_VECTOR_FIELD = lambda s: {"codes": _vector(s)}  # noqa: E731
_STATUS_AFTER = Step("STATUS")  # the stream is still in step after an error inside a frame read whole


def _frame_error(name: str, doc: str, payload: PayloadOf, error: str, opcode: str = "STATUS") -> Case:
    return Case(name, "Replies to bad frames", doc, (Step(opcode, payload, "BAD_FRAME", error), _STATUS_AFTER), True)


def _closing(name: str, doc: str, frame: Callable[[bytes], bytes], error: str) -> Case:
    return Case(
        name, "Replies to bad frames", doc, (Step("STATUS", frame=frame, status="BAD_FRAME", error=error),), True
    )


CASES: tuple[Case, ...] = (
    # -- sessions and empty payloads (device-independent) --
    Case(
        "session_start",
        "Implementing a device / session",
        "INFO then RESET, as a host starts a session; STATUS then reads power-on state",
        (Step("INFO", values=("protocol_version",)), Step("RESET"), Step("STATUS")),
    ),
    Case(
        "empty_payload_zero_count",
        "Payloads / empty payload",
        "an empty request payload sent as a 2-byte zero field count is the empty mapping too",
        (Step("RESET", b"\x00\x00"), Step("STATUS", b"\x00\x00")),
        True,
    ),
    Case(
        "request_id_max",
        "Exchanges",
        "a reply repeats any request_id, 2^32 - 1 included",
        (Step("STATUS", request_id=0xFFFFFFFF), Step("STATUS", request_id=0)),
        True,
    ),
    Case(
        "unknown_opcode",
        "Implementing a device / refusals",
        "an opcode the device does not know: UNKNOWN_OPCODE, repeating the opcode",
        (Step(0x7FFF, status="UNKNOWN_OPCODE"), _STATUS_AFTER),
        True,
    ),
    Case(
        "busy_second_host",
        "Sessions / one host at a time",
        "a second connection while the first holds the device: BUSY to its first request, then closed",
        (Step("RESET"), Step("STATUS", connection=1, status="BUSY"), Step("STATUS")),
        True,
    ),
    Case(
        "state_read_before_run",
        "Implementing a device / state machine",
        "READ_MEAN, READ_STATE, READ_COV and READ_SAMPLES before any RUN: BAD_STATE",
        (
            Step("RESET"),
            Step("READ_MEAN", status="BAD_STATE"),
            Step("READ_STATE", status="BAD_STATE"),
            Step("READ_COV", status="BAD_STATE"),
            Step("READ_SAMPLES", status="BAD_STATE"),
            Step("STATUS"),
        ),
        True,
    ),
    Case(
        "state_run_before_load",
        "Implementing a device / state machine",
        "RUN with nothing loaded: BAD_STATE, nothing changes",
        (Step("RESET"), Step("RUN", {"t": 1.0}, "BAD_STATE"), Step("STATUS")),
        True,
    ),
    Case(
        "unknown_field",
        "Payloads / unknown fields",
        "a request field the command does not define: BAD_ARGUMENT naming it, nothing changes",
        (
            Step("RESET"),
            Step("STATUS", {"verbose": 1}, "BAD_ARGUMENT"),
            Step("RUN", {"t": 1.0, "tt": 1.0}, "BAD_ARGUMENT"),
        ),
        True,
    ),
    Case(
        "wrong_field_type",
        "Implementing a device / refusals",
        "RUN with t as a string: BAD_ARGUMENT",
        (Step("RESET"), Step("RUN", {"t": "1.0"}, "BAD_ARGUMENT"), Step("STATUS")),
        True,
    ),
    Case(
        "auth_challenge_without_token",
        "Security",
        "AUTH_CHALLENGE on a device without a token: a fresh nonce and required = false",
        (Step("AUTH_CHALLENGE", values=("required",), exact=False), Step("STATUS")),
        True,
    ),
    Case(
        "auth_response_without_token",
        "Security",
        "AUTH_RESPONSE on a device without a token: BAD_STATE (nothing to prove), the connection stays",
        (Step("AUTH_RESPONSE", {"mac": "0" * 64, "host_nonce": "1" * 64}, "BAD_STATE"), Step("STATUS")),
        True,
    ),
    Case(
        "abort_idle",
        "Commands / ABORT",
        "ABORT between commands: nothing is running, aborted = 0, nothing changes",
        (Step("RESET"), Step("ABORT", values=("aborted",)), Step("STATUS")),
        True,
    ),
    # -- frame errors (device-independent) --
    _closing(
        "frame_bad_magic",
        "first 4 bytes not SPUW: BAD_MAGIC, opcode and request_id 0, closed",
        _header(magic=b"SPUX"),
        "BAD_MAGIC",
    ),
    _closing(
        "frame_bad_version",
        "another protocol version: BAD_VERSION, opcode and request_id 0, closed",
        _header(version=2),
        "BAD_VERSION",
    ),
    _closing(
        "frame_bad_header_checksum",
        "header CRC wrong: BAD_HEADER_CHECKSUM, opcode and request_id 0, closed",
        _header(header_crc32=0x12345678),
        "BAD_HEADER_CHECKSUM",
    ),
    _closing(
        "frame_too_long",
        "payload_length over the limit (no payload follows): TOO_LONG, header repeated, closed",
        _header(payload_length=wire.LIMITS.max_payload_bytes + 1),
        "TOO_LONG",
    ),
    Case(
        "frame_kind_reply",
        "Replies to bad frames",
        "a request frame of kind 1 (reply): BAD_KIND, still in step",
        (Step("STATUS", frame=_header(kind=1), status="BAD_FRAME", error="BAD_KIND"), _STATUS_AFTER),
        True,
    ),
    Case(
        "frame_status_nonzero",
        "Replies to bad frames",
        "a request with status 3: BAD_KIND",
        (Step("STATUS", frame=_header(status=3), status="BAD_FRAME", error="BAD_KIND"), _STATUS_AFTER),
        True,
    ),
    Case(
        "frame_reserved_nonzero",
        "Replies to bad frames",
        "a request with reserved 1: BAD_KIND",
        (Step("STATUS", frame=_header(reserved=1), status="BAD_FRAME", error="BAD_KIND"), _STATUS_AFTER),
        True,
    ),
    Case(
        "frame_bad_payload_checksum",
        "Replies to bad frames",
        "payload CRC wrong: BAD_PAYLOAD_CHECKSUM repeating opcode and request_id, still in step",
        (
            Step(
                "LOAD_VECTOR",
                {"codes": np.array([1, 2], np.int16)},
                "BAD_FRAME",
                "BAD_PAYLOAD_CHECKSUM",
                frame=_flip_payload_byte,
            ),
            _STATUS_AFTER,
        ),
        True,
    ),
    Case(
        "frame_empty_payload_crc",
        "Replies to bad frames",
        "payload_length 0 with payload_crc32 not 0",
        (
            Step("STATUS", frame=_header(payload_crc32=1), status="BAD_FRAME", error="BAD_PAYLOAD_CHECKSUM"),
            _STATUS_AFTER,
        ),
        True,
    ),
    _frame_error("payload_unknown_tag", "a field with type tag 9", _fields(1, _name(b"x") + b"\x09"), "BAD_PAYLOAD"),
    _frame_error(
        "payload_unknown_dtype",
        "an array with dtype code 9",
        _fields(1, _name(b"codes") + bytes((_tag("array"), 9, 1)) + struct.pack("<I", 0) + bytes(1)),
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_ndim_over_limit",
        f"an array of {wire.LIMITS.max_ndim + 1} dimensions",
        _fields(
            1,
            _name(b"codes")
            + bytes((_tag("array"), 1, wire.LIMITS.max_ndim + 1))
            + struct.pack(f"<{wire.LIMITS.max_ndim + 1}I", *[1] * (wire.LIMITS.max_ndim + 1)),
        ),
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_array_data_short",
        "an array whose data is shorter than its shape",
        _fields(1, _array_field(b"codes", np.arange(4, dtype=np.int16), 2))[:-2],
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_padding_nonzero",
        "an array whose padding bytes are not zero",
        _fields(1, _array_field(b"codes", np.arange(2, dtype=np.int16), 2, pad_byte=0xFF)),
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_padding_missing",
        "an array with no padding before its data (padding is required)",
        _fields(1, _array_field(b"codes", np.arange(4, dtype=np.int16), 2, pad_from=1)),
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_nested_padding_from_map",
        "an array inside a map padded from the map's start, not the payload's",
        _nested(True),
        "BAD_PAYLOAD",
        "LOAD_VECTOR",
    ),
    _frame_error(
        "payload_bad_utf8", "a str field that is not UTF-8", _fields(1, _str_field(b"s", b"\xff\xfe")), "BAD_PAYLOAD"
    ),
    _frame_error(
        "payload_duplicate_name",
        "a name twice in one mapping",
        _fields(2, _int_field(b"k", 1), _int_field(b"k", 2)),
        "BAD_PAYLOAD",
        "READ_SAMPLES",
    ),
    _frame_error(
        "payload_trailing_bytes",
        "bytes after the last field",
        _fields(1, _int_field(b"k", 1)) + b"\x00",
        "BAD_PAYLOAD",
        "READ_SAMPLES",
    ),
    _frame_error(
        "payload_count_short",
        "a field count larger than the fields present",
        _fields(2, _int_field(b"k", 1)),
        "BAD_PAYLOAD",
        "READ_SAMPLES",
    ),
    _frame_error(
        "payload_too_many_fields",
        f"{_MAX_FIELDS + 1} fields in one mapping (limit {_MAX_FIELDS})",
        _fields(_MAX_FIELDS + 1, *(_int_field(f"f{i}".encode(), i) for i in range(_MAX_FIELDS + 1))),
        "BAD_PAYLOAD",
    ),
    _frame_error(
        "payload_name_too_long",
        f"a name of {wire.LIMITS.max_name_bytes + 1} bytes",
        _fields(1, _int_field(b"k" * (wire.LIMITS.max_name_bytes + 1), 1)),
        "BAD_PAYLOAD",
    ),
    _frame_error(
        "payload_name_empty", "a name of 0 bytes", _fields(1, b"\x00" + bytes((_tag("int"),)) + bytes(8)), "BAD_PAYLOAD"
    ),
    _frame_error(
        "payload_too_deep",
        f"maps nested {wire.LIMITS.max_depth + 1} deep (limit {wire.LIMITS.max_depth})",
        _deep(wire.LIMITS.max_depth + 1),
        "BAD_PAYLOAD",
    ),
    _frame_error(
        "payload_bool_not_0_or_1",
        "a bool field holding 2",
        _fields(1, _name(b"b") + bytes((_tag("bool"), 2))),
        "BAD_PAYLOAD",
    ),
    Case(
        "payload_depth_at_limit",
        "Payloads / limits",
        f"maps nested {wire.LIMITS.max_depth} deep parse (BAD_ARGUMENT: the field is unknown)",
        (Step("STATUS", _deep(wire.LIMITS.max_depth), "BAD_ARGUMENT"), _STATUS_AFTER),
        True,
    ),
    # -- padding and nesting in valid frames (per preset: the codes) --
    *(
        Case(
            f"padding_offset_{length}",
            "Payloads / padding",
            f"an array after a {length}-byte string: padding counts from the payload's start, so this payload"
            " parses (BAD_ARGUMENT names the unknown field note)",
            (Step("RESET"), Step("LOAD_VECTOR", _leading_string(length), "BAD_ARGUMENT"), Step("STATUS")),
        )
        for length in range(8)
    ),
    Case(
        "padding_nested_map",
        "Payloads / padding",
        "an array inside a map, padded from the payload's start: parses (BAD_ARGUMENT names the unknown field extra)",
        (Step("RESET"), Step("LOAD_VECTOR", _nested(False), "BAD_ARGUMENT"), Step("STATUS")),
    ),
    # -- every command's valid form (per preset) --
    Case("info", "Commands / INFO", "INFO: the device spec, protocol version and seed", (Step("INFO"),)),
    Case("reset", "Commands / RESET", "RESET after loads: back to power-on", (*_ran(), Step("RESET"), Step("STATUS"))),
    Case(
        "load_matrix",
        "Commands / LOAD_MATRIX",
        "a 2 x 2 matrix in the narrowest code type",
        (Step("RESET"), Step("LOAD_MATRIX", lambda s: {"codes": _matrix(s)}), Step("STATUS")),
    ),
    *(
        Case(
            f"load_matrix_{dtype}",
            "Commands / LOAD_MATRIX",
            f"codes as {dtype}: a device takes any integer type",
            (Step("RESET"), Step("LOAD_MATRIX", lambda s, d=dtype: {"codes": _matrix(s, d)}), Step("STATUS")),
            applies=_quantised,
        )
        for dtype in ("int16", "int32", "int64")
    ),
    Case(
        "load_matrix_code_max",
        "Implementing a device / code meaning",
        "codes at +-code_max (the limit) load",
        (Step("RESET"), Step("LOAD_MATRIX", lambda s: {"codes": _at_code_max(s, 0)}), Step("STATUS")),
        applies=_quantised,
    ),
    Case(
        "load_matrix_code_over_max",
        "Implementing a device / refusals",
        "a code of code_max + 1: BAD_ARGUMENT, nothing loaded",
        (Step("RESET"), Step("LOAD_MATRIX", lambda s: {"codes": _at_code_max(s, 1)}, "BAD_ARGUMENT"), Step("STATUS")),
        applies=_quantised,
    ),
    Case(
        "load_matrix_float_codes",
        "Implementing a device / refusals",
        "float64 codes on a quantised array: BAD_ARGUMENT",
        (Step("RESET"), Step("LOAD_MATRIX", lambda s: {"codes": _A.copy()}, "BAD_ARGUMENT"), Step("STATUS")),
        applies=_quantised,
    ),
    Case(
        "load_matrix_not_square",
        "Implementing a device / refusals",
        "a 2 x 3 matrix: BAD_ARGUMENT",
        (
            Step("RESET"),
            Step("LOAD_MATRIX", lambda s: {"codes": np.resize(_matrix(s), (2, 3))}, "BAD_ARGUMENT"),
            Step("STATUS"),
        ),
    ),
    Case(
        "load_matrix_too_large",
        "Payloads / limits",
        "a matrix one larger than the device's dense array",
        (
            Step("RESET"),
            Step(
                "LOAD_MATRIX",
                lambda s: {
                    "codes": np.zeros((min(s.cells.count, s.coupling.max_dense_size) + 1,) * 2, _matrix(s).dtype)
                },
                "BAD_ARGUMENT",
            ),
            Step("STATUS"),
        ),
        applies=_small_dense,
    ),
    Case(
        "load_matrix_missing_field",
        "Implementing a device / refusals",
        "LOAD_MATRIX without codes: BAD_ARGUMENT",
        (Step("RESET"), Step("LOAD_MATRIX", None, "BAD_ARGUMENT"), Step("STATUS")),
    ),
    Case(
        "load_vector",
        "Commands / LOAD_VECTOR",
        "a vector of 2 DAC codes",
        (Step("RESET"), Step("LOAD_VECTOR", _VECTOR_FIELD), Step("STATUS")),
    ),
    Case(
        "load_vector_2d",
        "Implementing a device / refusals",
        "a (2, 1) vector: BAD_ARGUMENT",
        (
            Step("RESET"),
            Step("LOAD_VECTOR", lambda s: {"codes": _vector(s).reshape(2, 1)}, "BAD_ARGUMENT"),
            Step("STATUS"),
        ),
    ),
    Case(
        "load_vector_too_long",
        "Payloads / limits",
        "a vector one longer than the cells",
        (
            Step("RESET"),
            Step("LOAD_VECTOR", lambda s: {"codes": _vector(s, s.cells.count + 1)}, "BAD_ARGUMENT"),
            Step("STATUS"),
        ),
        applies=lambda s: s.cells.count < 64,
    ),
    Case("run", "Commands / RUN", "RUN after both loads", _ran()),
    Case(
        "run_mismatched_sizes",
        "Implementing a device / state machine",
        "a 2 x 2 matrix and a vector of 3: RUN is BAD_STATE",
        (
            Step("RESET"),
            Step("LOAD_MATRIX", lambda s: {"codes": _matrix(s)}),
            Step("LOAD_VECTOR", lambda s: {"codes": _vector(s, 3)}),
            Step("RUN", _run, "BAD_STATE"),
            Step("STATUS"),
        ),
    ),
    Case(
        "run_zero_time",
        "Implementing a device / refusals",
        "RUN with t = 0: BAD_ARGUMENT",
        _loaded((Step("RUN", {"t": 0.0}, "BAD_ARGUMENT"), Step("STATUS"))),
    ),
    Case(
        "run_over_max_time",
        "Payloads / limits",
        "RUN with t above timing.max_run_time: BAD_ARGUMENT",
        _loaded((Step("RUN", lambda s: {"t": 2.0 * s.timing.max_run_time}, "BAD_ARGUMENT"), Step("STATUS"))),
    ),
    Case(
        "run_burn_in_not_below_t",
        "Implementing a device / refusals",
        "RUN with burn_in = t: BAD_ARGUMENT",
        _loaded((Step("RUN", {"t": 2.0, "burn_in": 2.0}, "BAD_ARGUMENT"), Step("STATUS"))),
    ),
    Case(
        "run_bad_engine",
        "Implementing a device / refusals",
        "RUN with engine 7: BAD_ARGUMENT",
        _loaded((Step("RUN", {"t": 2.0, "engine": 7}, "BAD_ARGUMENT"), Step("STATUS"))),
    ),
    Case(
        "run_saturated",
        "Commands / RUN",
        "an unstable drift (A = -I/4): SATURATED, the run discarded",
        (
            Step("RESET"),
            Step("LOAD_MATRIX", lambda s: {"codes": _matrix(s, scale=-0.25) * np.eye(2, dtype=int)}),
            Step("LOAD_VECTOR", _VECTOR_FIELD),
            Step("RUN", _run, "SATURATED"),
            Step("STATUS"),
        ),
    ),
    Case("read_mean", "Commands / READ_MEAN", "the mean ADC codes of the run", (*_ran(), Step("READ_MEAN"))),
    Case("read_state", "Commands / READ_STATE", "one ADC conversion after the run", (*_ran(), Step("READ_STATE"))),
    Case(
        "status_after_run",
        "Commands / STATUS",
        "STATUS after a run: loaded, has run, runs 1",
        (*_ran(), Step("STATUS")),
    ),
    Case(
        "load_ggn",
        "Commands / LOAD_GGN",
        "J (2 x 3), H (2 x 2) and the damping code",
        (
            Step("RESET"),
            Step(
                "LOAD_GGN",
                lambda s: {
                    "j_codes": _codes(
                        np.array([[0.5, 0.0, 0.25], [0.0, 0.5, -0.25]]), s.coupling.element_bits, s.coupling.g_max
                    ),
                    "h_codes": _codes(np.eye(2) * 0.5, s.coupling.element_bits, s.coupling.g_max),
                    "damping_code": _codes(np.array([0.5]), s.coupling.element_bits, s.coupling.g_max),
                },
            ),
            Step("STATUS"),
        ),
        applies=lambda s: s.coupling.max_ggn_rows >= 2,
    ),
    Case(
        "load_ggn_unsupported",
        "Implementing a device / refusals",
        "a GGN load on a device without structured arrays (coupling.max_ggn_rows = 0): BAD_ARGUMENT",
        (
            Step("RESET"),
            Step(
                "LOAD_GGN",
                lambda s: {"j_codes": _matrix(s), "h_codes": _matrix(s), "damping_code": _matrix(s)[0, :1]},
                "BAD_ARGUMENT",
            ),
            Step("STATUS"),
        ),
        applies=lambda s: s.coupling.max_ggn_rows == 0,
    ),
    Case(
        "read_cov",
        "Commands / READ_COV",
        "RUN with record_cov = 1, then READ_COV",
        (*_ran(record_cov=1), Step("READ_COV")),
    ),
    Case(
        "read_cov_not_recorded",
        "Implementing a device / state machine",
        "READ_COV after a run that did not record: BAD_STATE",
        (*_ran(), Step("READ_COV", status="BAD_STATE")),
    ),
    Case(
        "read_samples",
        "Commands / READ_SAMPLES",
        "RUN with record_samples = 4, then the first 2",
        (*_ran(record_samples=4), Step("READ_SAMPLES", {"k": 2}), Step("READ_SAMPLES")),
    ),
    Case(
        "read_samples_too_many",
        "Implementing a device / state machine",
        "k above the recorded: BAD_STATE",
        (
            *_ran(record_samples=4),
            Step("READ_SAMPLES", {"k": 5}, "BAD_STATE"),
            Step("READ_SAMPLES", {"k": 0}, "BAD_ARGUMENT"),
        ),
    ),
    Case(
        "read_lagged",
        "Commands / READ_LAGGED",
        "RUN with record_lags = [0, 1, 4], then READ_LAGGED",
        (*_ran(record_lags=np.array([0, 1, 4], dtype=np.int8)), Step("READ_LAGGED")),
    ),
    Case(
        "read_lagged_not_recorded",
        "Implementing a device / state machine",
        "READ_LAGGED before a run, and after a run that did not record lags: BAD_STATE",
        (Step("RESET"), Step("READ_LAGGED", status="BAD_STATE"), *_ran()[1:], Step("READ_LAGGED", status="BAD_STATE")),
    ),
    Case(
        "set_noise",
        "Commands / SET_NOISE",
        "SET_NOISE to half of noise.kappa0_max, then RESET restores it",
        (
            Step("RESET"),
            Step("SET_NOISE", lambda s: {"kappa0": s.noise.kappa0_max / 2}, values=("kappa0",)),
            Step("RESET"),
        ),
        applies=lambda s: s.noise.kappa0_max > 0,
    ),
    Case(
        "set_damping",
        "Commands / SET_DAMPING",
        "SET_DAMPING to the middle of [oscillator.damping_min, damping_max], a run, then RESET restores it",
        (
            Step("RESET"),
            Step("SET_DAMPING", lambda s: {"damping": _mid_damping(s)}, values=("damping",)),
            *_ran()[1:],
            Step("RESET"),
        ),
        applies=lambda s: s.cells.kind == "oscillator" and s.oscillator.damping_max > 0,
    ),
    Case(
        "set_damping_refused",
        "Implementing a device / refusals",
        "SET_DAMPING out of range, or on a device without programmable damping: BAD_ARGUMENT",
        (
            Step("RESET"),
            Step("SET_DAMPING", lambda s: {"damping": 2 * s.oscillator.damping_max + 1}, "BAD_ARGUMENT"),
            Step("SET_DAMPING", {"damping": 0.0}, "BAD_ARGUMENT"),
            Step("STATUS"),
        ),
    ),
    Case(
        "set_noise_over_max",
        "Payloads / limits",
        "SET_NOISE above noise.kappa0_max (or on a fixed source): BAD_ARGUMENT",
        (
            Step("RESET"),
            Step("SET_NOISE", lambda s: {"kappa0": 2 * s.noise.kappa0_max + 1}, "BAD_ARGUMENT"),
            Step("STATUS"),
        ),
    ),
)


# -- the reference device, in memory ----------------------------------------------------


class Reference:
    """The reference device's answer to raw request frames, as ``spu serve`` gives it: the same
    wire checks and the same :meth:`Firmware.handle`, without a socket.  O(frame bytes) per
    exchange plus the command's own cost."""

    def __init__(self, spec: DeviceSpec, seed: int = SEED):
        self.spec = spec
        self.firmware = Firmware(spec, seed=seed)
        self.handshake = _Handshake(None)  # a server without a token

    def exchange(self, frame: bytes, connection: int = 0) -> tuple[bytes, bool]:
        """(reply frame, whether the device closes the connection after it)."""
        try:
            header = wire.parse_header(frame)
        except wire.FrameError as exc:
            return wire.frame_error_reply(exc), True
        if connection:  # another host's request while this one holds the device
            message = f"{self.spec.name} is held by another host (one host at a time)"
            return wire.error_frame(header.opcode, header.request_id, Status.BUSY, message), True
        payload = frame[wire.HEADER.size : wire.HEADER.size + header.payload_length]
        try:
            request = wire.open_frame(header, payload, wire.REQUEST)
        except wire.FrameError as exc:
            return wire.frame_error_reply(exc), exc.closes
        if header.opcode in _LINK_OPCODES:  # answered by the server, not the firmware
            return self.handshake.answer(header, request)[0], False
        status, reply = self.firmware.handle(header.opcode, request)
        return wire.encode_frame(wire.REPLY, header.opcode, status, header.request_id, reply), False


def _opcode(opcode: str | int) -> int:
    return int(wire.PROTOCOL["opcodes"][opcode]) if isinstance(opcode, str) else opcode


def _request(step: Step, spec: DeviceSpec, request_id: int) -> bytes:
    payload = step.payload(spec) if callable(step.payload) else step.payload
    frame = wire.encode_frame(wire.REQUEST, _opcode(step.opcode), 0, request_id, payload)
    return step.frame(frame) if step.frame is not None else frame


def _describe(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"type": "bool"}
    if isinstance(value, int):
        return {"type": "int"}
    if isinstance(value, float):
        return {"type": "float"}
    if isinstance(value, str):
        return {"type": "str"}
    if isinstance(value, np.ndarray):
        return {"type": "array", "dtype": value.dtype.name, "shape": list(value.shape)}
    return {"type": "map"}


def _expect(step: Step, spec: DeviceSpec, reply: bytes, closes: bool) -> dict[str, Any]:
    """What a conforming device must answer, read from the reference's reply."""
    header, payload = wire.decode_frame(reply, wire.REPLY)
    status = Status(header.status).name
    expect: dict[str, Any] = {"opcode": header.opcode, "request_id": header.request_id, "status": status}
    if status == "BAD_FRAME":
        expect["error"] = wire.FrameErrorCode(payload["error"]).name
    expect["closes"] = closes
    fields = {}
    normative = _NORMATIVE | set(step.values)
    adc = _ADC_ARRAYS.get(step.opcode, ()) if isinstance(step.opcode, str) and spec.adc.bits > 0 else ()
    for name, value in payload.items():
        field = _describe(value)
        if name in normative and not isinstance(value, np.ndarray):
            field["value"] = value
        if name in adc:
            field["max_abs"] = code_max(spec.adc.bits)
        fields[name] = field
    expect["fields"] = fields
    return expect


def _exact(after_run: bool, opcode: str | int, status: str) -> bool:
    """Whether the reply bytes hold nothing from the noise stream or float arithmetic a platform may round
    differently: no RUN before it in the case, not a LOAD's drift estimate, not a BUSY (it names the server)."""
    if status in ("BUSY", "SATURATED"):
        return False
    if status != "OK":
        return not after_run
    return not after_run and opcode not in ("LOAD_MATRIX", "LOAD_GGN")


def run_case(case: Case, spec: DeviceSpec, seed: int = SEED) -> dict[str, Any]:
    """The vector of ``case`` on the reference device of ``spec``.  Raises AssertionError when the reference
    does not answer the statuses the case expects (the vectors check themselves)."""
    device = Reference(spec, seed)
    steps, after_run = [], False
    # every vector starts from power-on whatever ran before it on the connection (INFO reads no state)
    case_steps = case.steps if case.steps[0].opcode in ("RESET", "INFO") else (Step("RESET"), *case.steps)
    for number, step in enumerate(case_steps, start=1):
        request_id = number if step.request_id is None else step.request_id
        request = _request(step, spec, request_id)
        reply, closes = device.exchange(request, step.connection)
        expect = _expect(step, spec, reply, closes)
        if (expect["status"], expect.get("error")) != (step.status, step.error):
            message = wire.decode_frame(reply, wire.REPLY)[1].get("message", "")
            raise AssertionError(
                f"vector {case.name} on {spec.name}, step {number} ({step.opcode}): the reference answered"
                f" {expect['status']} {expect.get('error') or ''}, the case expects {step.status} {step.error or ''}"
                f" ({message})"
            )
        entry: dict[str, Any] = {"opcode": step.opcode if isinstance(step.opcode, str) else None}
        if step.connection:
            entry["connection"] = step.connection
        entry["request"] = request.hex()
        entry["expect"] = expect
        if _exact(after_run, step.opcode, expect["status"]) if step.exact is None else step.exact:
            entry["reply"] = reply.hex()
        steps.append(entry)
        after_run = after_run or step.opcode == "RUN"
    return {
        "format": FORMAT,
        "name": case.name,
        "section": case.section,
        "doc": case.doc,
        "device": "any" if case.common else spec.name,
        "reference": {"preset": spec.name, "seed": seed},
        "steps": steps,
    }


def _comparable(vector: dict[str, Any]) -> list[Any]:
    """A common vector's expectations without its reply bytes (they may name the device)."""
    return [step["expect"] for step in vector["steps"]]


def generate(specs: Sequence[str | Path] | None = None, cases: Sequence[Case] = CASES) -> dict[str, str]:
    """Every vector file, as {path relative to firmware_spec/vectors: JSON text}, for the given presets or spec
    files (default: every preset), each in a folder named by its spec's ``name``.

    A common case is run on every spec and must expect the same of each (else it is not common).
    Cost: one in-memory Firmware per case and spec; a few seconds for the presets."""
    loaded = [load_spec(spec) for spec in (preset_names() if specs is None else specs)]
    by_name = {spec.name: spec for spec in loaded}
    files: dict[str, str] = {}
    for case in cases:
        if case.common:
            vector = run_case(case, by_name.get(_COMMON_PRESET) or load_spec(_COMMON_PRESET))
            for name, spec in by_name.items():
                if _comparable(run_case(case, spec)) != _comparable(vector):
                    raise AssertionError(f"common vector {case.name} expects other replies of {name}")
            files[f"{COMMON}/{case.name}.json"] = _dump(vector)
            continue
        for name, spec in by_name.items():
            if case.applies is None or case.applies(spec):
                files[f"{name}/{case.name}.json"] = _dump(run_case(case, spec))
    return files


def _dump(vector: dict[str, Any]) -> str:
    return json.dumps(vector, indent=1) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spu_emulator.vectors", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the vector folder from the cases")
    parser.add_argument("--path", type=Path, default=VECTOR_DIR, help="the vector folder (default: firmware_spec's)")
    parser.add_argument(
        "--spec",
        action="append",
        metavar="SPEC",
        help="a preset or device spec YAML to make vectors for (repeatable; default: every preset), e.g. a board's"
        " spec, for `spu conformance --vectors DIR`",
    )
    args = parser.parse_args(argv)
    files = generate(args.spec)
    folders = {path.split("/")[0] for path in files}
    stale = [p for p, text in files.items() if not (args.path / p).is_file() or (args.path / p).read_text() != text]
    extra = sorted(
        str(p.relative_to(args.path))
        for p in args.path.glob("*/*.json")
        if p.parent.name in folders and str(p.relative_to(args.path)) not in files
    )
    if not stale and not extra:
        print(f"{args.path}: {len(files)} vectors up to date")
        return 0
    if not args.write:
        print(
            f"{args.path}: {len(stale)} vectors stale or missing, {len(extra)} left over"
            f" ({', '.join((stale + extra)[:5])}...); run python -m spu_emulator.vectors --write"
        )
        return 1
    for path in extra:
        (args.path / path).unlink()
    for path in stale:
        (args.path / path).parent.mkdir(parents=True, exist_ok=True)
        (args.path / path).write_text(files[path])
    print(f"{args.path}: wrote {len(stale)} vectors, removed {len(extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
