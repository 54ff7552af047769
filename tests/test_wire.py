"""The frame codec (spu_emulator.wire) and the protocol document: round trips, strictness, fuzzing,
and agreement between protocol.yaml, PROTOCOL.md and what the firmware actually sends."""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spu_emulator import Firmware, load_spec, protocol_doc, wire
from spu_emulator.protocol import Opcode, Status

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(max_examples=100, deadline=None)


def _same(x, y) -> bool:
    """Equal values of equal types; arrays by dtype, shape and bits."""
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(x, dict):
        return isinstance(y, dict) and list(x) == list(y) and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, float):
        return type(y) is float and struct.pack("<d", x) == struct.pack("<d", y)
    return type(x) is type(y) and x == y


def _frame(payload=None, *, opcode=int(Opcode.STATUS), request_id=1, kind=wire.REQUEST, status=0) -> bytes:
    return wire.encode_frame(kind, opcode, status, request_id, payload)


def _with_header(frame: bytes, **fields) -> bytes:
    """The frame with header fields replaced and both CRCs made right again (unless given)."""
    header = wire.Header._make(wire.HEADER.unpack_from(frame))._asdict()
    body = frame[wire.HEADER.size :]
    fix_payload_crc = "payload_crc32" not in fields
    fix_header_crc = "header_crc32" not in fields
    header.update(fields)
    if fix_payload_crc:
        header["payload_crc32"] = zlib.crc32(body)
    raw = bytearray(wire.HEADER.pack(*header.values()))
    if fix_header_crc:
        raw[-4:] = struct.pack("<I", zlib.crc32(raw[:-4]))
    return bytes(raw) + body


def _with_payload(frame: bytes, body: bytes) -> bytes:
    return _with_header(frame[: wire.HEADER.size] + body, payload_length=len(body))


# -- layout ---------------------------------------------------------------------------------


def test_header_layout_is_the_yaml_one():
    """28 bytes, little-endian, fields in the YAML's order at the offsets PROTOCOL.md shows."""
    framing = wire.PROTOCOL["framing"]
    assert wire.HEADER.size == framing["header_bytes"] == 28
    assert list(wire.Header._fields) == [field["name"] for field in framing["header"]]
    frame = _frame({"t": 1.0}, opcode=0x0102, request_id=0x0A0B0C0D)
    assert frame[:4] == b"SPUW"
    assert frame[4] == wire.PROTOCOL["protocol_version"]
    assert frame[5] == wire.REQUEST
    assert frame[6:8] == b"\x02\x01"  # opcode, little-endian
    assert frame[12:16] == b"\x0d\x0c\x0b\x0a"  # request id
    assert struct.unpack_from("<I", frame, 16)[0] == len(frame) - 28
    assert struct.unpack_from("<I", frame, 20)[0] == zlib.crc32(frame[28:])
    assert struct.unpack_from("<I", frame, 24)[0] == zlib.crc32(frame[:24])


def test_empty_payload_is_no_bytes():
    assert len(_frame(None)) == len(_frame({})) == wire.HEADER.size
    assert wire.decode_frame(_frame(None))[1] == {}


def test_array_data_is_aligned_and_zero_copy():
    """Array data starts at a multiple of 8 from the payload start; decoding gives views of the buffer."""
    payload = {"a": 1, "xyz": np.arange(5, dtype=np.int64), "m": {"q": np.ones((2, 3))}}
    body = bytearray(wire.encode_payload(payload))
    out = wire.decode_payload(body)
    for array in (out["xyz"], out["m"]["q"]):
        offset = array.__array_interface__["data"][0] - np.frombuffer(body, np.uint8).__array_interface__["data"][0]
        assert offset % 8 == 0 and array.flags.aligned and array.flags.writeable
    out["xyz"][0] = 99  # a view, not a copy
    assert wire.decode_payload(body)["xyz"][0] == 99


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_of_every_type():
    payload = {
        "i": -(2**63),
        "j": 2**63 - 1,
        "f": -0.0,
        "nan": float("nan"),
        "inf": float("-inf"),
        "tiny": 5e-324,
        "b": True,
        "s": "Grüße, τ",
        "empty_s": "",
        "codes": np.array([[1, -2], [3, -(2**63)]], dtype=np.int64),
        "values": np.array([np.nan, -0.0, np.inf, 1e-310]),
        "scalar": np.array(2.5),
        "none": np.empty((0, 4), dtype=np.int64),
        "deep": {"a": {"b": {"c": np.arange(3.0)}}},
        "empty_map": {},
    }
    header, out = wire.decode_frame(_frame(payload, opcode=9, request_id=77))
    assert (header.opcode, header.request_id, header.status, header.kind) == (9, 77, 0, wire.REQUEST)
    assert _same(out, payload)


def test_numpy_scalars_and_foreign_layouts_are_sent_as_plain_values():
    payload = {
        "n": np.int64(-3),
        "u": np.uint16(7),
        "x": np.float64(0.1),
        "flag": np.bool_(True),
        "big_endian": np.arange(4, dtype=">i8"),
        "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    }
    out = wire.decode_payload(wire.encode_payload(payload))
    assert out["n"] == -3 and type(out["n"]) is int
    assert out["u"] == 7 and type(out["u"]) is int
    assert out["x"] == 0.1 and type(out["x"]) is float
    assert out["flag"] is True
    assert out["big_endian"].dtype == np.int64 and list(out["big_endian"]) == [0, 1, 2, 3]
    assert np.array_equal(out["strided"], payload["strided"])
    assert np.array_equal(out["fortran"], payload["fortran"])


_names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
_leaves = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.builds(
        lambda shape, dtype, seed: np.array(np.random.default_rng(seed).normal(size=shape) * 1000, dtype=dtype),
        st.lists(st.integers(0, 3), max_size=3).map(tuple),
        st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.float64]),
        st.integers(0, 2**32 - 1),
    ),
)
_payloads = st.recursive(
    st.dictionaries(_names, _leaves, max_size=6),
    lambda inner: st.dictionaries(_names, st.one_of(_leaves, inner), max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(payload=_payloads, opcode=st.integers(0, 0xFFFF), request_id=st.integers(0, 2**32 - 1))
def test_round_trip_property(payload, opcode, request_id):
    """Any payload of the supported types comes back with the same types and bits."""
    header, out = wire.decode_frame(wire.encode_frame(wire.REPLY, opcode, 3, request_id, payload), wire.REPLY)
    assert (header.opcode, header.request_id, header.status) == (opcode, request_id, 3)
    assert _same(out, payload)


# -- what the encoder refuses --------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, pattern",
    [
        ({"x": np.arange(3, dtype=np.uint16)}, "dtype uint16"),
        ({"x": np.ones(2, dtype=np.float32)}, "dtype float32"),
        ({"x": np.ones(2, dtype=bool)}, "dtype bool"),
        ({"x": [1, 2]}, "type list"),
        ({"x": None}, "type NoneType"),
        ({"x": 2**63}, "signed 64-bit"),
        ({"": 1}, "name"),
        ({"ü": 1}, "name"),
        ({"x" * 65: 1}, "name"),
        ({1: 1}, "name"),
        ({"x": np.zeros((1,) * 9)}, "dimensions"),
        ({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}, "deeper"),
        ({f"f{i}": i for i in range(257)}, "fields"),
    ],
)
def test_encoder_refuses_what_the_wire_cannot_carry(payload, pattern):
    with pytest.raises(wire.EncodeError, match=pattern):
        wire.encode_payload(payload)


# -- what the decoder refuses ----------------------------------------------------------------


def _code(frame: bytes, kind: int = wire.REQUEST):
    with pytest.raises(wire.FrameError) as caught:
        wire.decode_frame(frame, kind)
    return caught.value.code


def test_header_errors():
    good = _frame({"t": 1.0})
    E = wire.FrameErrorCode
    assert _code(b"GARBAGE!" + good[8:]) == E.BAD_MAGIC
    assert _code(_with_header(good, version=2)) == E.BAD_VERSION
    assert _code(_with_header(good, header_crc32=0)) == E.BAD_HEADER_CHECKSUM
    assert _code(_with_header(good, payload_length=wire.LIMITS.max_payload_bytes + 1)) == E.TOO_LONG
    assert _code(_with_header(good, kind=wire.REPLY)) == E.BAD_KIND
    assert _code(_with_header(good, status=1)) == E.BAD_KIND
    assert _code(_with_header(good, reserved=1)) == E.BAD_KIND
    assert _code(good, wire.REPLY) == E.BAD_KIND  # a host expecting a reply gets a request
    assert _code(_with_header(good, payload_crc32=1)) == E.BAD_PAYLOAD_CHECKSUM
    for cut in (0, 5, 27, 28, len(good) - 1):  # truncated header or payload: no reply possible
        assert _code(good[:cut]) is None
    assert _code(good + b"\x00") == E.BAD_PAYLOAD  # bytes after the frame
    assert all(wire.FrameError("", code).closes for code in (E.BAD_MAGIC, E.BAD_VERSION, E.TOO_LONG, None))
    assert not any(wire.FrameError("", code).closes for code in (E.BAD_KIND, E.BAD_PAYLOAD_CHECKSUM, E.BAD_PAYLOAD))


def _array_body(dtype_code=1, ndim=1, dims=(3,), pad=b"\x00", data=None) -> bytes:
    data = np.arange(int(np.prod(dims)), dtype=np.int64).tobytes() if data is None else data
    head = b"\x01\x00" + b"\x05codes" + bytes((5, dtype_code, ndim)) + struct.pack(f"<{ndim}I", *dims)
    return head + pad + data


@pytest.mark.parametrize(
    "body, pattern",
    [
        (_array_body(data=bytes(16)), "needs 24 bytes"),  # wrong size for the declared shape
        (_array_body(dims=(1 << 31,), data=bytes(8)), "needs"),  # a shape far beyond the payload
        (_array_body(ndim=2, dims=(4, 4), pad=b"\x00" * 5, data=bytes(8 * 15)), "needs 128 bytes"),
        (_array_body(dtype_code=9), "dtype code 9"),
        (_array_body(ndim=9, dims=(1,) * 9, pad=b"\x00" * 5), "dimensions"),
        (_array_body(pad=b"\x01"), "padding"),
        (_array_body() + b"\x00", "after its last field"),
        (b"\x01\x00\x01x\x63", "unknown type tag 99"),
        (b"\x01\x00\x01x\x03\x02", "not 0 or 1"),
        (b"\x01\x00\x01x\x04\x02\x00\x00\x00\xff\xfe", "UTF-8"),
        (b"\x01\x00\x01x\x04\xff\xff\xff\x7f", "str field"),
        (b"\x01\x00\x01x\x01\x00\x00", "ends inside"),
        (b"\x02\x00\x01x\x03\x00\x01x\x03\x00", "twice"),
        (b"\x01\x00\x00\x03\x00", "name"),
        (b"\x01\x00\x01\xff\x03\x00", "ASCII"),
        (b"\x05\x00", "field name"),
        (b"\xff\xff", "fields"),
        (b"\x01", "field count"),
        (b"\x01\x00\x01a\x06" * 5 + b"\x01\x00\x01f\x01" + bytes(8), "deeper"),
    ],
)
def test_payload_errors(body, pattern):
    """Malformed payloads are BAD_PAYLOAD with a message that names the problem."""
    frame = _with_payload(_frame(), body)
    with pytest.raises(wire.FrameError, match=pattern) as caught:
        wire.decode_frame(frame)
    assert caught.value.code == wire.FrameErrorCode.BAD_PAYLOAD
    assert caught.value.request_id == 1


# -- fuzzing ----------------------------------------------------------------------------------

_SEEDS = [
    _frame(None),
    _frame({"t": 10.0, "burn_in": 2.0, "engine": 0, "on_saturation": 1}, opcode=int(Opcode.RUN)),
    _frame({"codes": np.arange(-4, 5, dtype=np.int64).reshape(3, 3)}, opcode=int(Opcode.LOAD_MATRIX)),
    _frame({"spec": {"name": "x", "cells": {"count": 8}}, "ok": True}, opcode=int(Opcode.INFO)),
]


def _parse(data: bytes) -> None:
    """The parser's contract on any input: a decoded frame or FrameError, nothing else."""
    try:
        header, payload = wire.decode_frame(data)
    except wire.FrameError as exc:
        assert exc.code is None or isinstance(exc.code, wire.FrameErrorCode)
        assert str(exc)
        return
    assert isinstance(payload, dict)
    assert wire.HEADER.size + header.payload_length == len(data)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _parse(data)
    _parse(b"SPUW" + data)


@FUZZ
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 400),
    fix_crcs=st.booleans(),
)
def test_fuzz_mutated_frames(seed, edits, cut, fix_crcs):
    """Valid frames with bytes changed and cut short, with the checksums made right again half of
    the time so the mutations reach the payload parser."""
    data = bytearray(seed)
    for where, value in edits:
        data[where % len(data)] = value
    data = bytes(data[: max(cut, wire.HEADER.size)])
    if fix_crcs and data[:4] == b"SPUW" and len(data) >= wire.HEADER.size:
        body = data[wire.HEADER.size :]
        data = _with_header(data[: wire.HEADER.size] + body, payload_length=len(body))
    _parse(data)


# -- the document ------------------------------------------------------------------------------


def test_protocol_md_block_is_generated_from_the_yaml():
    text = protocol_doc.PROTOCOL_MD.read_text()
    block = protocol_doc.generated_block(text)
    assert block is not None, "PROTOCOL.md lost its generated-block markers"
    assert block == protocol_doc.render(), (
        "firmware_spec/PROTOCOL.md is out of date with protocol.yaml; run python -m spu_emulator.protocol_doc --write"
    )


def test_every_name_in_the_yaml_is_in_protocol_md():
    text = protocol_doc.PROTOCOL_MD.read_text()
    doc = wire.PROTOCOL
    names = set(doc["opcodes"]) | set(doc["status"]) | set(doc["frame_errors"]) | set(doc["engines"])
    names |= set(doc["on_saturation"]) | set(doc["status_bits"]) | set(doc["limits"])
    names |= set(doc["timing"]["timeouts"]) | set(doc["error_reply"]["fields"])
    names |= {field["name"] for field in doc["framing"]["header"]} | set(doc["payload_types"])
    for command in doc["commands"].values():
        names |= set(command["request"]) | set(command["reply"])
    missing = sorted(name for name in names if not re.search(rf"`{re.escape(name)}`", text))
    assert not missing, f"named in protocol.yaml but not in PROTOCOL.md: {missing}"


def test_every_opcode_has_its_fields_documented():
    doc = wire.PROTOCOL
    missing = sorted(set(doc["opcodes"]) - set(doc["commands"]))
    assert not missing, (
        f"opcodes without a commands entry in protocol.yaml: {missing} (give request, reply, device_time)"
    )
    assert not set(doc["commands"]) - set(doc["opcodes"])
    for name, command in doc["commands"].items():
        assert set(command) >= {"request", "reply", "device_time"}, name
        for field in [*command["request"].values(), *command["reply"].values()]:
            assert field["type"] in doc["payload_types"], (name, field)
            if field["type"] == "array":
                dtypes = field["dtype"] if isinstance(field["dtype"], list) else [field["dtype"]]
                assert set(dtypes) <= set(doc["array_dtypes"]) and field["shape"], (name, field)


# -- the firmware keeps to the document ------------------------------------------------------


def _conforms(opcode: Opcode, status: int, reply: dict) -> None:
    """Every reply field is documented with its type (and array dtype and ndim)."""
    doc = wire.PROTOCOL
    if status == Status.OK:
        fields = doc["commands"][opcode.name]["reply"]
        required = {name for name, field in fields.items() if not field.get("optional")}
        assert required <= set(reply), f"{opcode.name} reply lacks {required - set(reply)}"
    else:
        fields = dict(doc["error_reply"]["fields"])
        if status == Status.SATURATED and opcode == Opcode.RUN:
            fields |= doc["commands"]["RUN"]["reply"]
        assert "message" in reply
    python_types = {"int": (int, np.integer), "float": (float, np.floating), "str": str, "map": dict}
    for name, value in reply.items():
        assert name in fields, (
            f"{opcode.name} reply field {name!r} (status {status}) is not documented in firmware_spec/protocol.yaml;"
            " add it under commands and run python -m spu_emulator.protocol_doc --write"
        )
        field = fields[name]
        if field["type"] == "array":
            dtypes = field["dtype"] if isinstance(field["dtype"], list) else [field["dtype"]]
            assert isinstance(value, np.ndarray) and value.dtype.name in dtypes, (opcode.name, name)
            assert value.ndim == len(field["shape"]), (opcode.name, name)
        elif field["type"] == "bool":
            assert isinstance(value, bool), (opcode.name, name, value)
        else:
            assert isinstance(value, python_types[field["type"]]), (opcode.name, name, value)
            assert not isinstance(value, (bool, np.bool_)), (opcode.name, name, value)


def test_firmware_replies_are_documented_and_cross_the_wire():
    """Drive every command (and its refusals) in-process; every reply conforms to protocol.yaml and
    survives the codec bit for bit."""
    firmware = Firmware(load_spec("spu-8"), seed=2)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    a = q @ np.diag([2.0, 1.8, 1.5, 1.2]) @ q.T
    codes = np.rint(127 * a / np.abs(a).max()).astype(np.int64)
    calls = [
        (Opcode.INFO, {}),
        (Opcode.READ_MEAN, {}),  # BAD_STATE
        (Opcode.LOAD_MATRIX, {"codes": np.zeros((2, 3), np.int64)}),  # BAD_ARGUMENT
        (Opcode.LOAD_MATRIX, {"codes": codes}),
        (Opcode.LOAD_VECTOR, {"codes": np.array([2047, 2047, 2047, 2047])}),
        (Opcode.RUN, {"t": 20.0, "burn_in": 5.0, "engine": 1}),  # saturates on spu-8's rails
        (Opcode.LOAD_VECTOR, {"codes": np.array([100, -50, 20, 0])}),
        (Opcode.RUN, {"t": 20.0, "burn_in": 5.0}),
        (Opcode.READ_MEAN, {}),
        (Opcode.READ_STATE, {}),
        (Opcode.STATUS, {}),
        (Opcode.RESET, {}),
    ]
    seen = set()
    for opcode, request in calls:
        request = wire.decode_frame(_frame(request, opcode=int(opcode)))[1]
        status, reply = firmware.handle(int(opcode), request)
        seen.add(Status(status).name)
        _conforms(opcode, status, reply)
        back = wire.decode_frame(wire.encode_frame(wire.REPLY, int(opcode), status, 1, reply), wire.REPLY)[1]
        assert _same(back, {k: (int(v) if isinstance(v, np.integer) else v) for k, v in reply.items()})
    assert {"OK", "BAD_ARGUMENT", "BAD_STATE", "SATURATED"} <= seen


# -- reading with a polling window ------------------------------------------------------------


def _later(delay_s: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), action()), daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("delay_s", [0.0, 0.02, 0.2], ids=["waiting", "within-the-window", "after-the-window"])
def test_frame_reader_takes_a_frame_whenever_it_comes(delay_s):
    """A frame already there, one that comes while the reader polls (window 0.1 s), and one that comes
    after it went to sleep are all read whole, and the socket then has its blocking timeout again."""
    host, device = socket.socketpair()
    with host, device:
        frame = _frame({"x": np.arange(5)}, request_id=7)
        sender = _later(delay_s, lambda: host.sendall(frame))
        header, payload = wire.FrameReader(device).read(5.0, 5.0, poll_s=0.1)
        sender.join()
        assert header.request_id == 7
        assert _same(wire.open_frame(header, payload, wire.REQUEST), {"x": np.arange(5)})


def test_frame_reader_polling_keeps_the_stream_in_step():
    """A header split across the polling window (10 bytes in it, the rest 50 ms later) and two frames
    sent back to back are read as they were sent."""
    host, device = socket.socketpair()
    with host, device:
        first, second = _frame({"k": 1}, request_id=1), _frame({"k": 2}, request_id=2)
        host.sendall(first[:10])
        sender = _later(0.05, lambda: host.sendall(first[10:] + second))
        reader = wire.FrameReader(device)
        got = [reader.read(5.0, 5.0, poll_s=0.01) for _ in range(2)]
        sender.join()
        assert [h.request_id for h, _ in got] == [1, 2]
        assert [wire.open_frame(h, p, wire.REQUEST)["k"] for h, p in got] == [1, 2]


def test_frame_reader_polling_sees_eof_and_keeps_its_timeout():
    """EOF during the window is LinkClosed; silence past the window and then first_timeout is LinkTimeout."""
    host, device = socket.socketpair()
    with device:
        host.close()
        with pytest.raises(wire.LinkClosed):
            wire.FrameReader(device).read(5.0, 5.0, poll_s=0.5)
    host, device = socket.socketpair()
    with host, device:
        started = time.monotonic()
        with pytest.raises(wire.LinkTimeout, match="no frame within 0.1 s"):
            wire.FrameReader(device).read(0.1, 5.0, poll_s=0.05)
        assert 0.14 <= time.monotonic() - started < 3.0  # the window, then the timeout


# -- integer codes at their width ---------------------------------------------------------------


def test_codes_travel_in_the_narrowest_integer_type():
    """b-bit codes go as int8 up to 8 bits, int16 up to 16, int32 up to 32: each holds +-code_max, and
    the next narrower type does not; a continuous part sends float64."""
    from driver.codes import code_dtype, code_max, to_codes

    assert code_dtype(0) == np.float64
    for bits in range(2, 33):  # 1 bit has code_max 0: no codes but zero
        dtype = code_dtype(bits)
        assert dtype.kind == "i" and np.iinfo(dtype).max >= code_max(bits), bits
        narrower = {1: None, 2: np.int8, 4: np.int16, 8: np.int32}[dtype.itemsize]
        assert narrower is None or np.iinfo(narrower).max < code_max(bits), bits
        codes = to_codes(np.array([-2.0, -1.0, 0.3, 1.0]), bits, 1.0).codes
        assert codes.dtype == dtype and list(codes[[0, 1, 3]]) == [-code_max(bits), -code_max(bits), code_max(bits)]


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_device_takes_narrow_codes_with_the_bits_of_int64(dtype):
    """The same codes sent as int8, int16 or int32 program the same array as int64 codes: a load, a run
    and a read through the codec give the same bits."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    codes = np.rint(127 * q @ np.diag([1.0, 0.8, 0.6, 0.5]) @ q.T).astype(np.int64)
    vector = np.array([100, -50, 20, 0])
    results = []
    for kind in (np.int64, dtype):
        firmware = Firmware(load_spec("spu-8"), seed=4)
        for opcode, request in (
            (Opcode.LOAD_MATRIX, {"codes": codes.astype(kind)}),
            (Opcode.LOAD_VECTOR, {"codes": vector.astype(kind)}),
            (Opcode.RUN, {"t": 20.0, "burn_in": 5.0}),
            (Opcode.READ_MEAN, {}),
        ):
            header, decoded = wire.decode_frame(_frame(request, opcode=int(opcode)))
            if "codes" in decoded:
                assert decoded["codes"].dtype == kind
            status, reply = firmware.handle(int(opcode), decoded)
            assert status == Status.OK, reply
        results.append(reply["mean_codes"])
    assert results[0].tobytes() == results[1].tobytes()
    assert len(_frame({"codes": codes.astype(np.int8)})) < len(_frame({"codes": codes}))
