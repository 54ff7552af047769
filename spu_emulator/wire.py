"""The SPU wire format: frames and self-describing payloads (``firmware_spec/protocol.yaml``).

One exchange is a request frame from the host and a reply frame from the device.  A
frame is a fixed little-endian header and a payload::

    offset  size  field
         0     4  magic           b"SPUW"
         4     1  version         the sender's protocol_version
         5     1  kind            0 request, 1 reply
         6     2  opcode          u16; a reply repeats its request's
         8     2  status          u16; 0 in a request
        10     2  reserved        0
        12     4  request_id      u32, chosen by the host, repeated in the reply
        16     4  payload_length  u32, at most limits.max_payload_bytes
        20     4  payload_crc32   CRC-32 of the payload
        24     4  header_crc32    CRC-32 of bytes 0..23

The payload is a mapping of named, typed fields (u16 count; per field u8 name length,
name, u8 type tag, value), so it describes itself: ints (i64), floats (f64, exact),
bools, UTF-8 strings, nested mappings, and arrays (dtype code, ndim, u32 dims, zero
padding to the next multiple of 8 from the payload start, then the data in C order).
A new command needs no change here, only its entry under ``commands`` in the YAML.

This module is the device side's reference implementation; the driver's TCP
transport uses it too (the one place the driver reaches into ``spu_emulator``,
through a transport).  The layout, type tags, dtypes and limits are built from
the YAML at import, so the YAML is the single source of truth.

Cost: encoding and decoding are O(payload bytes) with one copy of each array on
encode (the frame is one contiguous buffer) and none on decode (arrays are views
of the received buffer, writable when it is a bytearray, 8-byte aligned when the
buffer is).  CRC-32 runs at about 3 GB/s.  A small payload laid out as one seen before (a loop's
requests and replies) is encoded and decoded with one ``struct`` call per stretch between arrays
(``_Encoder``, ``_Layout``), a few microseconds instead of about one per field.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import operator
import secrets
import socket
import struct
import time
import zlib
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from .protocol import PROTOCOL_VERSION, Status
from .spec import SPEC_DIR, read_yaml

__all__ = [
    "PROTOCOL",
    "HEADER",
    "Header",
    "MAGIC",
    "REQUEST",
    "REPLY",
    "LIMITS",
    "TIMING",
    "FrameErrorCode",
    "FrameError",
    "EncodeError",
    "LinkClosed",
    "LinkTimeout",
    "encode_payload",
    "decode_payload",
    "encode_frame",
    "parse_header",
    "open_frame",
    "decode_frame",
    "error_frame",
    "frame_error_reply",
    "FrameReader",
    "send_frame",
    "close_gracefully",
    "MIN_TOKEN_BYTES",
    "check_token",
    "new_nonce",
    "is_nonce",
    "auth_mac",
    "macs_equal",
]

PROTOCOL: dict[str, Any] = read_yaml((SPEC_DIR / "protocol.yaml").read_text())
"""The whole of ``firmware_spec/protocol.yaml``."""

_FRAMING = PROTOCOL["framing"]
_STRUCT_CODES = {"u8": "B", "u16": "H", "u32": "I", "bytes4": "4s"}
if _FRAMING["byte_order"] != "little":
    raise ImportError("protocol.yaml framing.byte_order must be 'little'")
HEADER = struct.Struct("<" + "".join(_STRUCT_CODES[field["type"]] for field in _FRAMING["header"]))
"""The header's layout, in the order of framing.header."""
if HEADER.size != _FRAMING["header_bytes"]:
    raise ImportError(
        f"protocol.yaml header fields take {HEADER.size} bytes, header_bytes says {_FRAMING['header_bytes']}"
    )

Header = namedtuple("Header", [field["name"] for field in _FRAMING["header"]])
Header.__doc__ = "A parsed frame header (fields as in protocol.yaml framing.header)."

MAGIC: bytes = _FRAMING["magic"].encode("ascii")
REQUEST: int = _FRAMING["kinds"]["request"]
REPLY: int = _FRAMING["kinds"]["reply"]
_CRC_SPAN = HEADER.size - 4  # the header CRC covers everything before it
_HEAD = struct.Struct("<" + HEADER.format[1:-1])  # the header without its CRC


@dataclass(frozen=True)
class Limits:
    """Bounds a frame must keep (protocol.yaml ``limits``)."""

    max_payload_bytes: int
    max_fields: int
    max_name_bytes: int
    max_string_bytes: int
    max_ndim: int
    max_depth: int


LIMITS = Limits(**PROTOCOL["limits"])


@dataclass(frozen=True)
class Timing:
    """Timeouts of an exchange and polling windows, in seconds (protocol.yaml ``timing``); None: no limit."""

    frame_timeout_s: float
    busy_timeout_s: float
    idle_timeout_s: float | None
    client_timeout_s: float
    device_poll_s: float
    max_run_s: float
    host_poll_s: float


TIMING = Timing(
    **{
        name: entry["value"]
        for section in ("timeouts", "polling")
        for name, entry in PROTOCOL["timing"][section].items()
    }
)

FrameErrorCode = IntEnum("FrameErrorCode", {name: entry["code"] for name, entry in PROTOCOL["frame_errors"].items()})
_CLOSES = {FrameErrorCode[name]: bool(entry["closes"]) for name, entry in PROTOCOL["frame_errors"].items()}

_TAGS = {name: entry["tag"] for name, entry in PROTOCOL["payload_types"].items()}
_INT, _FLOAT, _BOOL, _STR, _ARRAY, _MAP = (_TAGS[k] for k in ("int", "float", "bool", "str", "array", "map"))
_DTYPE_OF_CODE = {entry["code"]: np.dtype(name).newbyteorder("<") for name, entry in PROTOCOL["array_dtypes"].items()}
_CODE_OF_DTYPE = {dtype.newbyteorder("="): code for code, dtype in _DTYPE_OF_CODE.items()}
for _code, _dtype in _DTYPE_OF_CODE.items():
    if _dtype.itemsize != PROTOCOL["array_dtypes"][_dtype.name]["itemsize"]:
        raise ImportError(f"protocol.yaml array_dtypes.{_dtype.name}.itemsize is not {_dtype.itemsize}")

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_ARRAY_HEAD = struct.Struct("<BB")
_TAGGED_I64 = struct.Struct("<Bq")
_TAGGED_F64 = struct.Struct("<Bd")
_TAGGED_U32 = struct.Struct("<BI")
_ZEROS = bytes(8)
_FIRST_PAYLOAD_BYTES = 1 << 20  # FrameReader.read: a large payload's buffer starts here and doubles


class FrameError(Exception):
    """A frame that breaks the protocol.

    code: the frame_errors code (None for a frame that stopped short, which gets no
    reply); closes: the byte stream can no longer be trusted, so the connection must
    close after the error reply; opcode, request_id: the request's when its header
    was readable (magic, version and header CRC good: TOO_LONG and every error after
    the header), else 0 (PROTOCOL.md, "Replies to bad frames").
    """

    def __init__(self, message: str, code: FrameErrorCode | None, request_id: int = 0, opcode: int = 0):
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.opcode = opcode

    @property
    def closes(self) -> bool:
        return self.code is None or _CLOSES[self.code]


class EncodeError(ValueError):
    """A payload value the wire cannot carry; the message names the field."""


class LinkClosed(Exception):
    """The peer closed the connection; ``mid_frame`` if it stopped inside a frame."""

    def __init__(self, message: str, mid_frame: bool):
        super().__init__(message)
        self.mid_frame = mid_frame


class LinkTimeout(Exception):
    """No byte came within the allowed time; ``mid_frame`` if inside a frame."""

    def __init__(self, message: str, mid_frame: bool):
        super().__init__(message)
        self.mid_frame = mid_frame


# -- payloads ---------------------------------------------------------------------------


def encode_payload(payload: Mapping[str, Any] | None) -> bytes:
    """Serialise a flat (or nested) mapping of ints, floats, bools, strings, arrays and
    mappings.  Arrays must have one of protocol.yaml's array_dtypes (int8, int16, int32, int64,
    float64; any shape, any byte order and stride);
    numpy scalars are sent as ints, floats and bools.  Raises EncodeError."""
    return b"".join(_payload_parts(payload))


def _payload_parts(payload: Mapping[str, Any] | None) -> list[Any]:
    """The payload as a list of byte chunks (arrays as views, not copies); none for an empty mapping.

    A dict laid out as one encoded before (the same names, the same value types, nested dicts and array
    dtypes, shapes and contiguity: ``_signature``) is packed by that one's :class:`_Encoder`."""
    parts: list[Any] = []
    if payload is None or (isinstance(payload, Mapping) and not payload):
        return parts
    signature = _signature(payload) if type(payload) is dict else None
    encoder = _ENCODERS.get(signature, _UNSEEN) if signature is not None else None
    if type(encoder) is _Encoder:
        packed = encoder.parts(payload)
        if packed is not None:
            return packed
    _encode_map({} if payload is None else payload, parts, 0, 0, "")
    if encoder is _UNSEEN and len(_ENCODERS) < _MAX_LAYOUTS:
        _ENCODERS[signature] = _Encoder.learn(payload)
    return parts


def _signature(payload: dict[str, Any]) -> tuple | None:
    """What fixes a dict's encoding but its values: names and value types, and per nested dict or array
    its names and types, or dtype, shape and contiguity."""
    types = tuple(map(type, payload.values()))
    if dict not in types and np.ndarray not in types:
        return tuple(payload), types
    nested = []
    for value in payload.values():
        if type(value) is dict:
            nested.append((tuple(value), tuple(map(type, value.values()))))
        elif type(value) is np.ndarray:
            nested.append((value.dtype, value.shape, value.flags.c_contiguous))
    return tuple(payload), types, tuple(nested)


class _Encoder:
    """Packs the dicts of one signature (``_signature``) as ``_encode_map`` would, with one struct per stretch
    between arrays: field heads (name, type tag, an array's dtype, dims and padding, a nested dict's count)
    are the constant bytes of the dict it was learnt from, values (ints, floats, bools of exactly those types,
    nested dicts of them) are packed in their place, arrays (C-contiguous, of a wire dtype in native order,
    non-empty) are sent as byte views.  None from :meth:`parts` (an int beyond 64 bits) leaves the payload
    to ``_encode_map``, which says what is wrong."""

    __slots__ = ("_steps", "_structs")

    def __init__(self, steps: list[tuple], structs: list[struct.Struct]):
        # per field: (kind, name, head bytes, a nested dict's field heads); kind "v" value, "m" dict, "a" array
        self._steps = steps
        self._structs = structs  # one per stretch, the last after the last array

    @classmethod
    def learn(cls, payload: dict[str, Any]) -> _Encoder | None:
        steps: list[tuple] = []
        structs: list[struct.Struct] = []
        formats = ["<H"]
        size = 2
        for name, value in payload.items():
            prefix = _name_prefix(name)
            kind = type(value)
            if kind in _SCALAR_CODES:
                steps.append(("v", name, prefix + bytes((_SCALAR_TAGS[kind],)), ()))
                formats.append(f"{len(prefix) + 1}s{_SCALAR_CODES[kind]}")
                size += len(prefix) + 1 + (1 if kind is bool else 8)
            elif kind is dict and value and all(type(v) in _SCALAR_CODES for v in value.values()):
                head = prefix + bytes((_MAP,)) + _U16.pack(len(value))
                formats.append(f"{len(head)}s")
                size += len(head)
                heads = []
                for sub, item in value.items():
                    heads.append(_name_prefix(sub) + bytes((_SCALAR_TAGS[type(item)],)))
                    formats.append(f"{len(heads[-1])}s{_SCALAR_CODES[type(item)]}")
                    size += len(heads[-1]) + (1 if type(item) is bool else 8)
                steps.append(("m", name, head, tuple(heads)))
            elif kind is np.ndarray and value.size and value.ndim and value.flags.c_contiguous:
                if _CODE_OF_DTYPE.get(value.dtype) is None or value.dtype.byteorder not in "=|":
                    return None
                start = size + len(prefix)
                array_head, _ = _array_parts(value, start, name)
                formats.append(f"{len(prefix) + len(array_head)}s")
                steps.append(("a", name, prefix + array_head, ()))
                structs.append(struct.Struct("".join(formats)))
                formats = ["<"]
                size = start + len(array_head) + value.nbytes
            else:
                return None
        structs.append(struct.Struct("".join(formats)))
        return cls(steps, structs)

    def parts(self, payload: dict[str, Any]) -> list[Any] | None:
        parts: list[Any] = []
        structs = iter(self._structs)
        args: list[Any] = [len(payload)]
        try:
            for kind, name, head, heads in self._steps:
                value = payload[name]
                if kind == "v":
                    args.append(head)
                    args.append(value)
                elif kind == "m":
                    args.append(head)
                    for sub_head, item in zip(heads, value.values(), strict=True):
                        args.append(sub_head)
                        args.append(item)
                else:
                    args.append(head)
                    parts.append(next(structs).pack(*args))
                    parts.append(memoryview(value).cast("B"))
                    args = []
            parts.append(next(structs).pack(*args))
        except struct.error:  # an int beyond 64 bits: _encode_map refuses it with its message
            return None
        return parts


_ENCODERS: dict[tuple, _Encoder | None] = {}  # _payload_parts' encoders by signature (None: not learnable)
_UNSEEN = object()
_SCALAR_CODES = {float: "d", int: "q", bool: "?"}
_SCALAR_TAGS = {float: _FLOAT, int: _INT, bool: _BOOL}


_NAMES: dict[str, bytes] = {}  # field name -> u8 length + ASCII bytes, for names seen before


def _name_prefix(name: Any) -> bytes:
    prefix = _NAMES.get(name) if isinstance(name, str) else None
    if prefix is None:
        try:
            raw = name.encode("ascii") if isinstance(name, str) else b""
        except UnicodeEncodeError:
            raw = b""
        if not 0 < len(raw) <= LIMITS.max_name_bytes:
            raise EncodeError(f"payload field name {name!r} must be 1 to {LIMITS.max_name_bytes} ASCII characters")
        prefix = bytes((len(raw),)) + raw
        if len(_NAMES) < 4096:
            _NAMES[name] = prefix
    return prefix


def _encode_map(mapping: Mapping[str, Any], parts: list, size: int, depth: int, where: str) -> int:
    """Append the chunks of ``mapping`` to ``parts``; ``size`` is the payload's length so far
    (arrays are aligned from the payload start).  Returns the new length."""
    if not isinstance(mapping, Mapping):
        raise EncodeError(f"payload{where} must be a mapping, got {type(mapping).__name__}")
    if len(mapping) > LIMITS.max_fields:
        raise EncodeError(f"payload{where} has {len(mapping)} fields, more than {LIMITS.max_fields}")
    chunk = _U16.pack(len(mapping))
    for name, value in mapping.items():
        chunk += _name_prefix(name)
        kind = type(value)
        if kind is float or (kind is not bool and isinstance(value, (float, np.floating))):
            chunk += _TAGGED_F64.pack(_FLOAT, value)
        elif kind is int or (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))):
            if not -(2**63) <= value < 2**63:
                raise EncodeError(f"payload field {name!r} = {value} does not fit a signed 64-bit integer")
            chunk += _TAGGED_I64.pack(_INT, value)
        elif kind is bool or kind is np.bool_:
            chunk += bytes((_BOOL, 1 if value else 0))
        elif kind is str:
            text = value.encode("utf-8")
            if len(text) > LIMITS.max_string_bytes:
                raise EncodeError(f"payload field {name!r} is {len(text)} bytes, over {LIMITS.max_string_bytes}")
            chunk += _TAGGED_U32.pack(_STR, len(text)) + text
        elif isinstance(value, np.ndarray):
            head, data = _array_parts(value, size + len(chunk), name)
            parts.append(chunk + head)
            size += len(chunk) + len(head)
            chunk = b""
            if data is not None:
                parts.append(data)
                size += data.nbytes
        elif isinstance(value, Mapping):
            if depth + 1 > LIMITS.max_depth:
                raise EncodeError(f"payload field {name!r} nests mappings deeper than {LIMITS.max_depth}")
            parts.append(chunk + bytes((_MAP,)))
            size = _encode_map(value, parts, size + len(chunk) + 1, depth + 1, f"{where}.{name}")
            chunk = b""
        else:
            raise EncodeError(
                f"payload field {name!r} has type {kind.__name__}; the wire carries int, float, bool, str,"
                " numpy arrays (int8, int16, int32, int64, float64) and mappings"
            )
    parts.append(chunk)
    return size + len(chunk)


def _array_parts(value: np.ndarray, at: int, name: str) -> tuple[bytes, memoryview | None]:
    """The head (tag, dtype, ndim, dims, padding) of an array that starts at payload offset
    ``at``, and its data as a byte view (None when empty)."""
    code = _CODE_OF_DTYPE.get(value.dtype.newbyteorder("="))
    if code is None:
        allowed = ", ".join(dtype.name for dtype in _DTYPE_OF_CODE.values())
        raise EncodeError(f"array field {name!r} has dtype {value.dtype}; the wire carries {allowed}; convert it")
    if value.ndim > LIMITS.max_ndim:
        raise EncodeError(f"array field {name!r} has {value.ndim} dimensions, more than {LIMITS.max_ndim}")
    if any(dim >= 2**32 for dim in value.shape):
        raise EncodeError(f"array field {name!r} has shape {value.shape}; each dimension must be below 2^32")
    head = bytes((_ARRAY, code, value.ndim)) + struct.pack(f"<{value.ndim}I", *value.shape)
    head += _ZEROS[: -(at + len(head)) % 8]
    if value.size == 0:
        return head, None
    data = np.ascontiguousarray(value, dtype=_DTYPE_OF_CODE[code])
    return head, memoryview(data.reshape(-1)).cast("B")


def decode_payload(buffer: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse a payload.  Arrays are views of ``buffer`` (copy them to keep them beyond
    it); the payload must be exactly consumed.  Raises FrameError(BAD_PAYLOAD).

    A payload laid out as one decoded before (the same names, types and array shapes, so the same
    length: a loop's requests and replies) is read with one struct unpack (:class:`_Layout`)."""
    view = memoryview(buffer).cast("B")
    size = len(view)
    if size == 0:
        return {}
    for layout in _LAYOUTS.get(size, ()):
        value = layout.read(view)
        if value is not None:
            return value
    try:
        value, end = _decode_map(view, 0, 0)
    except (struct.error, IndexError, ValueError) as exc:  # the checks above should leave none of these
        raise _bad(f"payload does not parse: {exc}") from None
    if end != size:
        raise _bad(f"payload has {size - end} bytes after its last field (payload_length {size})")
    known = _LAYOUTS.get(size, ())
    if size <= _LAYOUT_MAX_BYTES and len(known) < _LAYOUTS_PER_SIZE and len(_LAYOUTS) < _MAX_LAYOUTS:
        layout = _Layout.learn(view)
        if layout is not None:
            _LAYOUTS[size] = (*known, layout)  # a new tuple: threads that read the old one are not disturbed
    return value


# decode_payload's layouts, by payload length: at most _MAX_LAYOUTS lengths (then no more are learnt), of
# payloads up to _LAYOUT_MAX_BYTES (past that the arrays' bytes, not the fields, are the cost)
_LAYOUTS: dict[int, tuple[_Layout, ...]] = {}
_MAX_LAYOUTS = 256
_LAYOUTS_PER_SIZE = 4
_LAYOUT_MAX_BYTES = 1 << 16


class _Layout:
    """Where every field of one valid payload lies, as one ``struct`` format over all its bytes.

    Learnt (:meth:`learn`) from a payload the field-by-field decoder accepted; a payload of the same
    length is read (:meth:`read`) with one unpack when its constant parts (field counts, names, type
    tags, array dtype codes, dims and padding) equal the learnt ones.  Then it passes every check of
    ``_decode_map`` that the learnt one passed (the values of those checks are the same bytes), bools
    are checked for 0 or 1 as there, and it decodes to what ``_decode_map`` would give: ints, floats
    and bools from the same bytes, arrays as views of the same buffer.  Payloads with strings are not
    learnt (their lengths vary).
    """

    __slots__ = ("_struct", "_constants", "_expected", "_bools", "_fields")

    def __init__(self, formats: list[str], items: list[Any], bools: list[int], fields: list[tuple]):
        self._struct = struct.Struct("<" + "".join(formats))
        constant = [i for i, item in enumerate(items) if item is not _VALUE]
        self._constants = operator.itemgetter(*constant)
        self._expected = tuple(items[i] for i in constant)
        self._bools = tuple(bools)
        self._fields = fields

    @classmethod
    def learn(cls, view: memoryview) -> _Layout | None:
        formats: list[str] = []
        items: list[Any] = []  # per struct item: its expected value, or _VALUE for a field's value
        bools: list[int] = []
        try:
            fields, end = _learn_map(view, 0, formats, items, bools)
        except _NotLearnt:
            return None
        layout = cls(formats, items, bools, fields)
        return layout if end == len(view) == layout._struct.size and len(layout._expected) > 1 else None

    def read(self, view: memoryview) -> dict[str, Any] | None:
        """The payload decoded, or None when it is not laid out as the learnt one."""
        values = self._struct.unpack_from(view)
        if self._constants(values) != self._expected:
            return None
        for index in self._bools:
            if values[index] > 1:
                return None  # the field-by-field decoder refuses it, with its message
        return _build(self._fields, values, view)


_VALUE = object()  # _Layout: a struct item that holds a value, not a constant


class _NotLearnt(Exception):
    pass


def _learn_map(view: memoryview, at: int, formats: list, items: list, bools: list) -> tuple[list[tuple], int]:
    """The fields of the (valid) mapping at ``at``: (kind, name, ...) for :func:`_build`; appends the
    struct formats and items of its bytes."""
    (count,) = _U16.unpack_from(view, at)
    formats.append("H")
    items.append(count)
    at += 2
    fields: list[tuple] = []
    for _ in range(count):
        size = view[at]
        raw = bytes(view[at + 1 : at + 1 + size])
        tag = view[at + 1 + size]
        formats.append(f"B{size}sB")
        items.extend((size, raw, tag))
        name = raw.decode("ascii")
        at += 2 + size
        if tag in (_FLOAT, _INT, _BOOL):
            formats.append("d" if tag == _FLOAT else "q" if tag == _INT else "B")
            if tag == _BOOL:
                bools.append(len(items))
            fields.append((tag, name, len(items)))
            items.append(_VALUE)
            at += 1 if tag == _BOOL else 8
        elif tag == _ARRAY:
            code, ndim = _ARRAY_HEAD.unpack_from(view, at)
            shape = struct.unpack_from(f"<{ndim}I", view, at + 2)
            at += 2 + 4 * ndim
            pad = -at % 8
            formats.append(f"BB{ndim}I{pad}s")
            items.extend((code, ndim, *shape, bytes(pad)))
            dtype = _DTYPE_OF_CODE[code]
            count_ = math.prod(shape)
            at += pad
            fields.append((_ARRAY, name, dtype, shape, at, count_))
            formats.append(f"{count_ * dtype.itemsize}x")
            at += count_ * dtype.itemsize
        elif tag == _MAP:
            sub, at = _learn_map(view, at, formats, items, bools)
            fields.append((_MAP, name, sub))
        else:
            raise _NotLearnt
    return fields, at


def _build(fields: list[tuple], values: tuple, view: memoryview) -> dict[str, Any]:
    """The mapping of a payload read by a _Layout, as ``_decode_map`` builds it."""
    out: dict[str, Any] = {}
    for field in fields:
        tag, name = field[0], field[1]
        if tag == _FLOAT or tag == _INT:
            out[name] = values[field[2]]
        elif tag == _BOOL:
            out[name] = bool(values[field[2]])
        elif tag == _MAP:
            out[name] = _build(field[2], values, view)
        else:
            dtype, shape, at, count = field[2], field[3], field[4], field[5]
            if count == 0:
                out[name] = np.empty(shape, dtype=dtype.newbyteorder("="))
            else:
                array = np.frombuffer(view, dtype=dtype, count=count, offset=at).reshape(shape)
                out[name] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
    return out


def _bad(message: str) -> FrameError:
    return FrameError(message, FrameErrorCode.BAD_PAYLOAD)


def _decode_map(view: memoryview, at: int, depth: int) -> tuple[dict[str, Any], int]:
    end = len(view)
    if at + 2 > end:
        raise _bad(f"payload ends at offset {end} where a field count should start")
    (count,) = _U16.unpack_from(view, at)
    at += 2
    if count > LIMITS.max_fields:
        raise _bad(f"payload mapping has {count} fields, more than {LIMITS.max_fields}")
    out: dict[str, Any] = {}
    for _ in range(count):
        size = view[at] if at < end else 0
        if not 0 < size <= LIMITS.max_name_bytes or at + size + 2 > end:
            raise _bad(
                f"field name of length {size} at offset {at} is not 1..{LIMITS.max_name_bytes} bytes in the payload"
            )
        try:
            name = str(view[at + 1 : at + 1 + size], "ascii")
        except UnicodeDecodeError:
            raise _bad(f"field name at offset {at + 1} is not ASCII") from None
        at += 1 + size
        if name in out:
            raise _bad(f"field {name!r} appears twice")
        tag = view[at]
        at += 1
        try:
            if tag == _FLOAT:
                (value,) = _F64.unpack_from(view, at)
                at += 8
            elif tag == _INT:
                (value,) = _I64.unpack_from(view, at)
                at += 8
            elif tag == _BOOL:
                value = view[at]
                if value > 1:
                    raise _bad(f"bool field {name!r} is {value}, not 0 or 1")
                value = bool(value)
                at += 1
            elif tag == _STR:
                (size,) = _U32.unpack_from(view, at)
                at += 4
                if size > LIMITS.max_string_bytes or at + size > end:
                    raise _bad(f"str field {name!r} of {size} bytes is over the limit or past the payload's end")
                value = str(view[at : at + size], "utf-8")
                at += size
            elif tag == _ARRAY:
                value, at = _decode_array(view, at, name)
            elif tag == _MAP:
                if depth + 1 > LIMITS.max_depth:
                    raise _bad(f"map field {name!r} nests deeper than {LIMITS.max_depth}")
                value, at = _decode_map(view, at, depth + 1)
            else:
                raise _bad(f"field {name!r} has unknown type tag {tag}")
        except (struct.error, IndexError):
            raise _bad(f"payload ends inside field {name!r} (type tag {tag})") from None
        except UnicodeDecodeError:
            raise _bad(f"str field {name!r} is not UTF-8") from None
        out[name] = value
    return out, at


def _decode_array(view: memoryview, at: int, name: str) -> tuple[np.ndarray, int]:
    code, ndim = _ARRAY_HEAD.unpack_from(view, at)
    at += 2
    dtype = _DTYPE_OF_CODE.get(code)
    if dtype is None:
        raise _bad(f"array field {name!r} has unknown dtype code {code}")
    if ndim > LIMITS.max_ndim:
        raise _bad(f"array field {name!r} has {ndim} dimensions, more than {LIMITS.max_ndim}")
    shape = struct.unpack_from(f"<{ndim}I", view, at)
    at += 4 * ndim
    pad = -at % 8
    if at + pad > len(view) or any(view[at : at + pad]):
        raise _bad(f"array field {name!r} lacks its {pad} zero padding bytes")
    at += pad
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if at + nbytes > len(view):
        raise _bad(
            f"array field {name!r} of shape {shape} needs {nbytes} bytes of {dtype.name} data,"
            f" only {len(view) - at} are left in the payload"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype.newbyteorder("=")), at
    array = np.frombuffer(view, dtype=dtype, count=count, offset=at).reshape(shape)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    return array, at + nbytes


# -- frames -----------------------------------------------------------------------------


def encode_frame(
    kind: int, opcode: int, status: int, request_id: int, payload: Mapping[str, Any] | bytes | None = None
) -> bytes:
    """A whole frame: header + payload (a mapping, or payload bytes already encoded).

    The frame is built with one copy of the payload's arrays.  Raises EncodeError.
    """
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else _payload_parts(payload)
    length, crc = 0, 0
    for part in parts:
        length += len(part) if not isinstance(part, memoryview) else part.nbytes
        crc = zlib.crc32(part, crc)
    if length > LIMITS.max_payload_bytes:
        raise EncodeError(f"payload of {length} bytes is over the limit of {LIMITS.max_payload_bytes}")
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, kind, opcode, status, 0, request_id, length, crc)
    return b"".join((head, _U32.pack(zlib.crc32(head)), *parts))


def error_frame(opcode: int, request_id: int, status: int, message: str, **fields: Any) -> bytes:
    """A reply frame that refuses a request with ``status`` and a message."""
    return encode_frame(REPLY, opcode, status, request_id, {"message": message, **fields})


def frame_error_reply(error: FrameError, opcode: int | None = None) -> bytes:
    """The BAD_FRAME reply to a frame that broke the protocol; it repeats the request's opcode and
    request_id when its header was readable (``error.opcode``, ``error.request_id``), else 0."""
    opcode = error.opcode if opcode is None else opcode
    return error_frame(opcode, error.request_id, Status.BAD_FRAME, str(error), error=int(error.code))


def parse_header(raw: bytes | bytearray | memoryview) -> Header:
    """Check and parse the fixed header.  Raises FrameError for what makes the byte
    stream untrustworthy (magic, version, header CRC, length); kind, status and
    reserved are checked by :func:`open_frame`."""
    if len(raw) < HEADER.size:
        raise FrameError(f"frame stops after {len(raw)} of the {HEADER.size} header bytes", None)
    header = Header._make(HEADER.unpack_from(raw))
    if header.magic != MAGIC:
        raise FrameError(
            f"frame starts with {header.magic!r}, not the magic {MAGIC!r}: garbage, or the stream is out of step",
            FrameErrorCode.BAD_MAGIC,
        )
    if header.version != PROTOCOL_VERSION:
        raise FrameError(
            f"frame is protocol version {header.version}; this side speaks version {PROTOCOL_VERSION}",
            FrameErrorCode.BAD_VERSION,
        )
    if zlib.crc32(memoryview(raw)[:_CRC_SPAN]) != header.header_crc32:
        raise FrameError("header checksum does not match: the header was corrupted", FrameErrorCode.BAD_HEADER_CHECKSUM)
    if header.payload_length > LIMITS.max_payload_bytes:
        raise FrameError(
            f"payload_length {header.payload_length} is over the limit of {LIMITS.max_payload_bytes} bytes",
            FrameErrorCode.TOO_LONG,
            header.request_id,
            header.opcode,
        )
    return header


def open_frame(header: Header, payload: bytes | bytearray | memoryview, kind: int) -> dict[str, Any]:
    """Check the parts of a frame that leave the stream in step (kind, status, reserved,
    payload CRC, payload encoding) and decode its payload."""
    if header.kind != kind or header.reserved != 0 or (kind == REQUEST and header.status != 0):
        expected = "request" if kind == REQUEST else "reply"
        raise FrameError(
            f"expected a {expected} frame; got kind {header.kind}, status {header.status}, reserved {header.reserved}",
            FrameErrorCode.BAD_KIND,
            header.request_id,
            header.opcode,
        )
    if zlib.crc32(payload) != header.payload_crc32:
        raise FrameError(
            "payload checksum does not match: the payload was corrupted",
            FrameErrorCode.BAD_PAYLOAD_CHECKSUM,
            header.request_id,
            header.opcode,
        )
    try:
        return decode_payload(payload)
    except FrameError as exc:
        exc.request_id, exc.opcode = header.request_id, header.opcode
        raise


def decode_frame(data: bytes | bytearray | memoryview, kind: int = REQUEST) -> tuple[Header, dict[str, Any]]:
    """Parse one whole frame held in memory (tests, fuzzing, non-socket links).

    ``data`` must be exactly one frame.  Raises FrameError (code None when it stops short).
    """
    header = parse_header(data)
    end = HEADER.size + header.payload_length
    if len(data) < end:
        raise FrameError(f"frame stops after {len(data)} of its {end} bytes", None, header.request_id, header.opcode)
    if len(data) > end:
        raise FrameError(
            f"{len(data) - end} bytes follow the frame", FrameErrorCode.BAD_PAYLOAD, header.request_id, header.opcode
        )
    return header, open_frame(header, memoryview(data)[HEADER.size : end], kind)


# -- sockets ----------------------------------------------------------------------------


class FrameReader:
    """Reads frames from one stream socket.

    Bytes are taken in chunks of up to ``chunk`` bytes, so a small frame costs one
    ``recv``; a large payload is received straight into its own buffer.  Bytes that
    follow a frame (a host that sends its next request early) wait for the next read.
    """

    def __init__(self, sock: socket.socket, chunk: int = 65536):
        self.sock = sock
        self._buffer = bytearray(chunk)
        self._view = memoryview(self._buffer)
        self._start = 0  # unread bytes are _buffer[_start:_end]
        self._end = 0
        self.polling = AdaptivePolling()

    def read(
        self, first_timeout: float | None, frame_timeout: float | None, poll_s: float = 0.0
    ) -> tuple[Header, bytearray]:
        """One frame: wait up to ``first_timeout`` s for its first byte (None: for ever),
        then up to ``frame_timeout`` s for the rest.  Returns the checked header and the
        raw payload (pass both to :func:`open_frame`).

        poll_s: busy-poll the socket for up to this many seconds before sleeping in the
        kernel (see protocol.yaml ``timing.polling``): a frame that comes within it is
        taken without a wake-up, which on a virtual machine costs tens of microseconds
        per exchange; the price is a core kept busy for that long.  The window adapts
        below poll_s (:class:`AdaptivePolling`): polls that time out shrink it, down to
        sleeping at once, so a loaded machine is not made slower by spinning.
        ``first_timeout`` counts from the end of the window.

        Raises LinkClosed (EOF), LinkTimeout, FrameError (header errors: the stream is
        out of step, the connection should close) or OSError.
        """
        header, deadline = self.read_header(first_timeout, frame_timeout, poll_s)
        return header, self.read_payload(header, deadline)

    def read_payload(self, header: Header, deadline: float | None) -> bytearray:
        """The payload of the frame whose header :meth:`read_header` just returned (by ``deadline``)."""
        length = header.payload_length
        have = min(length, self._end - self._start)
        if have == length:
            payload = bytearray(self._view[self._start : self._start + have])
        else:
            # the buffer grows as the bytes arrive (doubling from 1 MiB), so a header that declares 256 MiB
            # and sends little holds little; each growth is one realloc (mremap for large blocks: no copy)
            payload = bytearray(min(length, max(have, _FIRST_PAYLOAD_BYTES)))
            payload[:have] = self._view[self._start : self._start + have]
            got = have
            while got < length:
                if got == len(payload):
                    payload.extend(bytes(min(length, 2 * len(payload)) - len(payload)))
                got += _recv_at_least(
                    self.sock, memoryview(payload)[got:], len(payload) - got, deadline, f"payload of {length} bytes"
                )
        self._start += have
        return payload

    def take_pending(self, opcode: int) -> Header | None:
        """Without blocking: if the next frame on the link is a whole, bodiless request with ``opcode``
        (ABORT, sent while another request runs), consume it and return its header; else leave every byte
        where it is and return None.  One non-blocking receive (a few microseconds)."""
        if self._end - self._start < HEADER.size:
            if self._start + HEADER.size > len(self._buffer):  # make room at the front
                left = self._end - self._start
                self._buffer[:left] = self._buffer[self._start : self._end]
                self._start, self._end = 0, left
            _set_timeout(self.sock, 0.0)
            try:
                self._end += self.sock.recv_into(self._view[self._end :])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return None  # the link's error shows on the next read
            if self._end - self._start < HEADER.size:
                return None
        try:
            header = parse_header(self._view[self._start : self._start + HEADER.size])
        except FrameError:
            return None  # not ours to judge here: the next read reports it
        if header.opcode != opcode or header.kind != REQUEST or header.payload_length != 0:
            return None
        self._start += HEADER.size
        return header

    def read_header(
        self, first_timeout: float | None, frame_timeout: float | None, poll_s: float = 0.0
    ) -> tuple[Header, float | None]:
        """The next frame's header only (its payload is left unread), and the deadline for the
        rest of the frame.  Timeouts, polling and errors as :meth:`read`."""
        if self._start == self._end:
            self._start = self._end = 0
            window = self.polling.window(poll_s)
            count = _recv_polling(self.sock, self._view, window) if window > 0.0 else None
            if window > 0.0:
                self.polling.record(count is not None)
            if count is None:
                _set_timeout(self.sock, first_timeout)
                try:
                    count = self.sock.recv_into(self._view)
                except TimeoutError:
                    raise LinkTimeout(f"no frame within {first_timeout:g} s", False) from None
            if count == 0:
                raise LinkClosed("the connection closed", False)
            self._end = count
        deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
        if self._end - self._start < HEADER.size:
            if self._start + HEADER.size > len(self._buffer):  # move the partial header to the front
                left = self._end - self._start
                self._buffer[:left] = self._buffer[self._start : self._end]
                self._start, self._end = 0, left
            self._end += _recv_at_least(
                self.sock, self._view[self._end :], HEADER.size - (self._end - self._start), deadline, "frame header"
            )
        header = parse_header(self._view[self._start : self._start + HEADER.size])
        self._start += HEADER.size
        return header, deadline


class AdaptivePolling:
    """How long a reader busy-polls before it sleeps: a window that adapts to whether polling pays.

    A poll that times out (the frame came later, so the core spun for nothing while the peer, or the
    rest of the machine, may have needed it) halves the window; one that catches its frame doubles it,
    up to the caller's ``poll_s``.  Below 1/16 of poll_s the reader sleeps at once, and every 32nd
    read then polls again with that smallest window to see whether the peer got fast again.  On a
    quiet machine every poll hits and the window stays at poll_s; on a loaded one it falls to zero
    within a few misses, so a loaded exchange costs no more than with polling off.
    """

    FLOOR_FRACTION = 1.0 / 16.0
    PROBE_EVERY = 32

    def __init__(self) -> None:
        self.fraction = 1.0  # of the caller's poll_s; 0: sleep at once
        self._skipped = 0

    def window(self, poll_s: float) -> float:
        """The window, seconds, to poll for now (0: sleep at once)."""
        if poll_s <= 0.0:
            return 0.0
        if self.fraction > 0.0:
            return self.fraction * poll_s
        self._skipped += 1
        if self._skipped < self.PROBE_EVERY:
            return 0.0
        self._skipped = 0
        return self.FLOOR_FRACTION * poll_s

    def record(self, hit: bool) -> None:
        """Whether the last poll caught its frame within the window."""
        if hit:
            self.fraction = min(1.0, max(2.0 * self.fraction, self.FLOOR_FRACTION))
        else:
            half = 0.5 * self.fraction
            self.fraction = half if half >= self.FLOOR_FRACTION else 0.0


def _recv_polling(sock: socket.socket, view: memoryview, window_s: float) -> int | None:
    """Non-blocking receives into ``view`` for up to ``window_s`` s; the byte count (0: EOF), or
    None when nothing came in that time."""
    _set_timeout(sock, 0.0)
    clock = time.perf_counter
    end = clock() + window_s
    while True:
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            if clock() >= end:
                return None


def _recv_at_least(sock: socket.socket, view: memoryview, need: int, deadline: float | None, what: str) -> int:
    """Receive into ``view`` until at least ``need`` bytes came; returns how many did."""
    got = 0
    while got < need:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0.0:
                raise LinkTimeout(f"{what}: stalled after {got} of {need} bytes", True)
            sock.settimeout(left)
        else:
            _set_timeout(sock, None)
        try:
            count = sock.recv_into(view[got:])
        except TimeoutError:
            raise LinkTimeout(f"{what}: stalled after {got} of {need} bytes", True) from None
        if count == 0:
            raise LinkClosed(f"{what}: the connection closed after {got} of {need} bytes", True)
        got += count
    return got


def send_frame(sock: socket.socket, frame: bytes, timeout: float | None) -> None:
    """Send one whole frame within ``timeout`` s (None: for ever).  Raises OSError / TimeoutError."""
    _set_timeout(sock, timeout)
    sock.sendall(frame)


def close_gracefully(sock: socket.socket, limit_s: float | None) -> None:
    """Half-close, discard what the peer still sends for up to ``limit_s`` s, then close.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the last frame before the peer reads it; draining first lets it arrive."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = None if limit_s is None else time.monotonic() + limit_s
        scratch = bytearray(65536)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0.0:
                break
            sock.settimeout(left)
            if sock.recv_into(scratch) == 0:
                break
    except OSError:
        pass
    finally:
        sock.close()


def _set_timeout(sock: socket.socket, timeout: float | None) -> None:
    if sock.gettimeout() != timeout:  # settimeout costs two fcntl calls even when nothing changes
        sock.settimeout(timeout)


# -- the shared-secret handshake (AUTH_CHALLENGE / AUTH_RESPONSE) ---------------------------------

MIN_TOKEN_BYTES = 16
"""A token shorter than this (128 bits) is refused: it could be guessed."""
AUTH_HOST = b"SPUW-auth-host"  # the two roles' MACs differ, so one side's proof cannot be reflected as the other's
AUTH_DEVICE = b"SPUW-auth-device"
_NONCE_HEX = 64


def check_token(token: str | bytes | bytearray, where: str = "token") -> bytes:
    """The token as bytes (a str as UTF-8), with surrounding whitespace removed (a file's newline).

    Raises ValueError for another type, or fewer than MIN_TOKEN_BYTES bytes."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray)):
        raise ValueError(f"{where} must be a str or bytes, got {type(token).__name__}")
    token = bytes(token).strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"{where} is {len(token)} bytes; it must be at least {MIN_TOKEN_BYTES} so it cannot be guessed:"
            " make one with  python -c 'import secrets; print(secrets.token_hex(32))'"
        )
    return token


def new_nonce() -> str:
    """32 fresh random bytes from the OS's CSPRNG, as 64 lowercase hex digits."""
    return secrets.token_hex(_NONCE_HEX // 2)


def is_nonce(value: Any) -> bool:
    """True for a str of 64 hex digits (the form of a nonce and of a MAC)."""
    if not isinstance(value, str) or len(value) != _NONCE_HEX:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def auth_mac(token: bytes, role: bytes, nonce: str, host_nonce: str) -> str:
    """HMAC-SHA256(token, role + nonce + host_nonce) as 64 hex digits; role is AUTH_HOST or AUTH_DEVICE.

    Both nonces enter, so a recorded exchange cannot be replayed (the server draws a fresh nonce per
    connection) and a device's proof cannot be replayed to a host (the host draws its own)."""
    return hmac.new(token, role + nonce.encode("ascii") + host_nonce.encode("ascii"), hashlib.sha256).hexdigest()


def macs_equal(a: str, b: str) -> bool:
    """Compare two MACs in constant time (a timing side channel would leak a valid MAC byte by byte)."""
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))
