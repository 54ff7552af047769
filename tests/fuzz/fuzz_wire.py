"""Coverage-guided fuzzing (atheris, libFuzzer) of the frame decoder and the firmware's payload checks.

    python tests/fuzz/fuzz_wire.py frame    [libFuzzer flags, e.g. -max_total_time=60 CORPUS_DIR]
    python tests/fuzz/fuzz_wire.py firmware [libFuzzer flags]

``frame``: the bytes are a frame, or (first byte odd) a payload wrapped in a valid header, so the
checksums pass and the payload decoder is reached.  :func:`spu_emulator.wire.decode_frame` must
return or raise ``FrameError``; nothing else.

``firmware``: the bytes are turned into a short sequence of commands (opcode and a payload of
field names from protocol.yaml with values of every wire type, arrays of every dtype and shape,
edge values: NaN, inf, -0, huge ints), each sent through the wire codec and then to
``Firmware.handle`` of a small spu-8 or ideal device, from power-on.  handle must return a status
and an encodable reply, never raise, and a command that fails must leave the device's status
(loads, runs, flags) as it was.

A finding is an uncaught exception: libFuzzer prints it and exits 1 (``tests/fuzz/test_fuzz.py``
runs both for a bounded time, ``-m slow``).  Runs are bounded: the devices' max_run_time is
lowered to 200 tau, so a RUN costs at most a few milliseconds.
"""

from __future__ import annotations

import math
import sys

import atheris
import numpy as np

# numba compiles the kernels from their bytecode: instrumented bytecode does not compile, so they stay out
_KERNELS = [f"spu_emulator.{name}" for name in ("_kernels", "_oscillator", "_lagged")]
with atheris.instrument_imports(include=["spu_emulator"], exclude=_KERNELS):
    from spu_emulator import Firmware, load_spec, wire
    from spu_emulator.protocol import Opcode, Status

_FIELDS = sorted(
    {name for command in wire.PROTOCOL["commands"].values() for name in command["request"]} | {"x", "codes2"}
)
_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.float64]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, math.inf, -math.inf, math.nan, 2.0**53, 200.0, 1e9]
_INTS = [0, 1, -1, 2, 7, 8, 9, 2**31, -(2**63), 2**63 - 1, 2**25, 127, -128, 32767]
_LIMIT_RUN = {"timing.max_run_time": 200.0}


def frame_target(data: bytes) -> None:
    if data and data[0] & 1:  # a payload in a valid frame: past the header and the checksums
        frame = wire.encode_frame(wire.REQUEST, data[1] if len(data) > 1 else 0, 0, 7, data[1:])
    else:
        frame = data[1:]
    try:
        header, payload = wire.decode_frame(frame, wire.REQUEST)
    except wire.FrameError as exc:
        assert exc.code is None or exc.code in set(wire.FrameErrorCode), exc
        return
    assert isinstance(payload, dict)
    wire.encode_payload(payload)  # whatever decodes encodes again


_DEVICES: dict[int, Firmware] = {}


def _device(which: int) -> Firmware:
    if which not in _DEVICES:
        if which == 0:
            spec = load_spec("spu-8", _LIMIT_RUN)
        else:
            spec = load_spec("ideal", {**_LIMIT_RUN, "cells.count": 16, "coupling.max_ggn_rows": 16})
        _DEVICES[which] = Firmware(spec, seed=0)
    return _DEVICES[which]


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0):
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.PickValueInList(_INTS) if fdp.ConsumeBool() else fdp.ConsumeInt(8)
    if kind == 1:
        return fdp.PickValueInList(_FLOATS) if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 2:
        return fdp.ConsumeBool()
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 16))
    if kind == 4 and depth < 2:
        return {fdp.PickValueInList(_FIELDS): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 2))}
    dtype = fdp.PickValueInList(_DTYPES)
    shape = tuple(fdp.ConsumeIntInRange(0, 9) for _ in range(fdp.ConsumeIntInRange(0, 3)))
    count = math.prod(shape)
    if fdp.ConsumeBool():  # small values: codes a device may take
        values = np.array([fdp.ConsumeIntInRange(-130, 130) for _ in range(count)], dtype=np.int64)
        if dtype is np.float64 and fdp.ConsumeBool():
            values = values / 100.0
        return values.astype(dtype).reshape(shape)
    raw = fdp.ConsumeBytes(count * np.dtype(dtype).itemsize)
    raw += bytes(count * np.dtype(dtype).itemsize - len(raw))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _array_of(fdp: atheris.FuzzedDataProvider, field: dict, sizes: dict[str, int]) -> np.ndarray:
    """An array for a documented field: one of its dtypes, its shape from the command's sizes (n, m, k),
    small codes, made symmetric and diagonally dominant (a stable array) half of the time."""
    dtypes = field["dtype"] if isinstance(field["dtype"], list) else [field["dtype"]]
    dtype = np.dtype(fdp.PickValueInList(dtypes))
    for dim in field["shape"]:  # a symbol other commands may add (protocol.yaml) gets its size on first use
        if not isinstance(dim, int) and dim not in sizes:
            sizes[dim] = fdp.ConsumeIntInRange(0, 9)
    shape = tuple(dim if isinstance(dim, int) else sizes[dim] for dim in field["shape"])
    values = np.array([fdp.ConsumeIntInRange(-40, 40) for _ in range(math.prod(shape))], dtype=np.float64)
    values = values.reshape(shape)
    if len(shape) == 2 and shape[0] == shape[1] and fdp.ConsumeBool():
        values = 0.5 * (values + values.T)
        values[np.diag_indices(shape[0])] = np.abs(values).sum(axis=1) + 1.0
    if dtype.kind == "f" and fdp.ConsumeBool():
        values = values / 64.0
    return np.clip(values, -127, 127).astype(dtype)


def _typed(fdp: atheris.FuzzedDataProvider, field: dict, sizes: dict[str, int]):
    kind = field["type"]
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return _value(fdp)  # now and then a value of the wrong type
    if kind == "int":
        return fdp.PickValueInList(_INTS) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 12)
    if kind == "float":
        return fdp.PickValueInList(_FLOATS) if fdp.ConsumeBool() else fdp.ConsumeFloatInRange(0.0, 200.0)
    if kind == "array":
        return _array_of(fdp, field, sizes)
    return _value(fdp)


_COMMANDS = {int(Opcode[name]): command["request"] for name, command in wire.PROTOCOL["commands"].items()}


def _payload(fdp: atheris.FuzzedDataProvider, opcode: int) -> dict:
    if opcode not in _COMMANDS or fdp.ConsumeIntInRange(0, 3) == 0:  # fields picked at random
        return {fdp.PickValueInList(_FIELDS): _value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 5))}
    sizes = {symbol: fdp.ConsumeIntInRange(0, 9) for symbol in ("n", "m", "k")}  # mostly as documented
    return {
        name: _typed(fdp, field, sizes)
        for name, field in _COMMANDS[opcode].items()
        if not field.get("optional") or fdp.ConsumeBool()
    }


def _status(firmware: Firmware) -> dict:
    status, reply = firmware.handle(Opcode.STATUS)
    assert status == Status.OK
    return reply


def firmware_target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    firmware = _device(fdp.ConsumeIntInRange(0, 1))
    firmware.handle(Opcode.RESET)
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        opcode = fdp.PickValueInList(_OPCODES) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 65535)
        payload = _payload(fdp, opcode)
        try:
            encoded = wire.encode_payload(payload)
        except wire.EncodeError:
            continue  # the host's codec refuses it: it never reaches a device
        request = wire.decode_payload(bytearray(encoded))  # what the server hands the firmware
        before = _status(firmware)
        status, reply = firmware.handle(opcode, request)
        assert status in set(Status), status
        assert isinstance(reply, dict) and (status == Status.OK or reply.get("message")), (opcode, status, reply)
        wire.encode_frame(wire.REPLY, opcode, status, 1, reply)  # the server could send it
        if status != Status.OK:
            assert _status(firmware) == before, (opcode, status, reply.get("message"))


_OPCODES = sorted(_COMMANDS) + [int(Opcode.LOAD_MATRIX), int(Opcode.LOAD_VECTOR), int(Opcode.RUN)] * 2


def main() -> None:
    targets = {"frame": frame_target, "firmware": firmware_target}
    if len(sys.argv) < 2 or sys.argv[1] not in targets:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    target = targets[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
