"""The reference half of ``firmware_spec/PROTOCOL.md``, generated from ``protocol.yaml``.

The YAML is the single source of truth; PROTOCOL.md holds hand-written prose and,
between two marker lines, tables rendered from the YAML by :func:`render`.  A test
checks that the block in the file is what :func:`render` gives now.

    python -m spu_emulator.protocol_doc            # check (exit 1 if stale)
    python -m spu_emulator.protocol_doc --write    # rewrite the generated block
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .spec import SPEC_DIR

__all__ = ["BEGIN", "END", "PROTOCOL_MD", "render", "generated_block", "main"]

PROTOCOL_MD = SPEC_DIR / "PROTOCOL.md"
BEGIN = "<!-- BEGIN GENERATED from protocol.yaml by `python -m spu_emulator.protocol_doc --write`; do not edit -->"
END = "<!-- END GENERATED -->"

_SIZES = {"u8": 1, "u16": 2, "u32": 4, "bytes4": 4}
_EXAMPLE_SIZES = {"n": 8, "m": 4, "k": 2}  # shape symbols, for the frame sizes shown


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return lines + [""]


def _repeats(error: Mapping[str, Any]) -> str:
    """Whether the reply to a frame error repeats the request's header fields (protocol.yaml ``readable``)."""
    return "yes" if error.get("readable", True) else "no: opcode and request_id 0"


def _codes(title: str, section: Mapping[str, int]) -> list[str]:
    return [f"### {title}", ""] + _table(["name", "code"], [(f"`{name}`", code) for name, code in section.items()])


def _fields(fields: Mapping[str, Any]) -> list[str]:
    if not fields:
        return ["(empty payload)", ""]
    rows = []
    for name, field in fields.items():
        dtype = field.get("dtype", "")
        dtype = " or ".join(dtype) if isinstance(dtype, list) else dtype
        shape = field.get("shape")
        shape = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")" if shape else ""
        presence = "optional" if field.get("optional") else "required"
        if "default" in field:
            presence += f", default {field['default']}"
        rows.append((f"`{name}`", field["type"], dtype, shape, presence, field.get("doc", "")))
    return _table(["field", "type", "dtype", "shape", "presence", "meaning"], rows)


def _example_payload(fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """A payload with the documented types and shapes at _EXAMPLE_SIZES, or None if its size is not fixed."""
    example: dict[str, Any] = {}
    for name, field in fields.items():
        kind = field["type"]
        if kind == "array":
            dtype = field["dtype"][0] if isinstance(field["dtype"], list) else field["dtype"]
            if not all(isinstance(dim, int) or dim in _EXAMPLE_SIZES for dim in field["shape"]):
                return None
            shape = tuple(_EXAMPLE_SIZES.get(dim, dim) for dim in field["shape"])
            example[name] = np.zeros(shape, dtype=dtype)
        elif kind in ("int", "float", "bool"):
            example[name] = {"int": 0, "float": 0.0, "bool": False}[kind]
        else:
            return None
    return example


def _frame_size(fields: Mapping[str, Any]) -> str:
    example = _example_payload(fields)
    if example is None:
        return "size varies"
    return f"{wire.HEADER.size + len(wire.encode_payload(example))} bytes"


def render(doc: Mapping[str, Any] | None = None) -> str:
    """The generated block (without its marker lines) for the given protocol document."""
    doc = wire.PROTOCOL if doc is None else doc
    framing = doc["framing"]
    out = [f"Protocol version {doc['protocol_version']}.", ""]

    out += ["### Frame header", ""]
    out += [
        f"{framing['header_bytes']} bytes, {framing['byte_order']}-endian, no padding; magic `{framing['magic']}`;"
        f" kinds {', '.join(f'{name} = {code}' for name, code in framing['kinds'].items())};"
        f" checksum {framing['checksum']}.",
        "",
    ]
    rows, offset = [], 0
    for field in framing["header"]:
        rows.append((offset, _SIZES[field["type"]], field["type"], f"`{field['name']}`", field["doc"]))
        offset += _SIZES[field["type"]]
    out += _table(["offset", "bytes", "type", "field", "meaning"], rows)

    out += ["### Payload types", ""]
    out += _table(
        ["type", "tag", "layout"],
        [(f"`{name}`", entry["tag"], entry["layout"]) for name, entry in doc["payload_types"].items()],
    )
    out += _table(
        ["array dtype", "code", "itemsize"],
        [(f"`{name}`", entry["code"], entry["itemsize"]) for name, entry in doc["array_dtypes"].items()],
    )

    out += ["### Limits", ""]
    out += _table(["limit", "value"], [(f"`{name}`", value) for name, value in doc["limits"].items()])

    out += _codes("Opcodes", doc["opcodes"])
    out += _codes("Status codes", doc["status"])
    out += ["### Frame errors (the `error` field of a BAD_FRAME reply)", ""]
    out += _table(
        ["name", "code", "closes the connection", "reply repeats opcode, request_id", "meaning"],
        [
            (
                f"`{name}`",
                e["code"],
                "yes" if e["closes"] else "no",
                _repeats(e),
                e["doc"],
            )
            for name, e in doc["frame_errors"].items()
        ],
    )
    if "rules" in doc:
        out += ["### Rules (normative)", ""]
        out += ["MUST, SHOULD and MAY as in RFC 2119.", ""]
        for name, text in doc["rules"].items():
            out += [f'- <a id="rule-{name.replace("_", "-")}"></a>**{name}**: {" ".join(text.split())}']
        out += [""]
    out += _codes("Engines (RUN `engine`)", doc["engines"])
    out += _codes("On saturation (RUN `on_saturation`)", doc["on_saturation"])
    out += _codes("Status bits (STATUS `word`)", doc["status_bits"])

    out += ["### Timing", "", " ".join(doc["timing"]["exchange"].split()), ""]
    out += _table(
        ["timeout", "seconds", "meaning"],
        [
            (f"`{name}`", "none" if entry["value"] is None else entry["value"], entry["doc"])
            for name, entry in doc["timing"]["timeouts"].items()
        ],
    )
    out += _table(
        ["polling window", "seconds", "meaning"],
        [(f"`{name}`", entry["value"], entry["doc"]) for name, entry in doc["timing"]["polling"].items()],
    )

    out += ["### Commands", ""]
    sizes = ", ".join(f"{symbol} = {size}" for symbol, size in _EXAMPLE_SIZES.items())
    out += [f"Frame sizes are for {sizes} and the first dtype listed.", ""]
    for name, command in doc["commands"].items():
        code = doc["opcodes"].get(name, "?")
        out += [f"#### {name} (opcode {code})", ""]
        out += [
            f"Request ({_frame_size(command['request'])}):",
            "",
            *_fields(command["request"]),
            f"Reply ({_frame_size(command['reply'])}):",
            "",
            *_fields(command["reply"]),
            f"Device time: {command['device_time']}.",
            "",
        ]
    out += ["#### Error replies (status not OK)", ""]
    out += _fields(doc["error_reply"]["fields"])
    out += [doc["error_reply"]["note"], ""]
    out += _example()
    return "\n".join(out).rstrip() + "\n"


def _example() -> list[str]:
    """A worked example: the bytes of one LOAD_VECTOR request, as the reference codec writes them."""
    codes = np.array([1, -2, 3], dtype=np.int16)
    frame = wire.encode_frame(wire.REQUEST, int(wire.PROTOCOL["opcodes"]["LOAD_VECTOR"]), 0, 1, {"codes": codes})
    lines = ["### Example", "", "LOAD_VECTOR with `codes` = [1, -2, 3] (int16), request_id 1, as hex:", "", "```"]
    lines.append(f"header  {frame[: wire.HEADER.size].hex(' ')}")
    body = frame[wire.HEADER.size :]
    for start in range(0, len(body), 16):
        lines.append(f"+{start:<6d} {body[start : start + 16].hex(' ')}")
    lines += [
        "```",
        "",
        "The payload: field count 1; name length 5, `codes`; tag 5 (array), dtype 4 (int16), ndim 1, dim 3;"
        " zero padding to offset 16; three little-endian int16.",
        "",
    ]
    return lines


def generated_block(text: str) -> str | None:
    """The block between the markers of a PROTOCOL.md text, or None if the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN) : end].strip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spu_emulator.protocol_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the generated block of PROTOCOL.md")
    parser.add_argument("--path", type=Path, default=PROTOCOL_MD, help="the Markdown file (default: firmware_spec's)")
    args = parser.parse_args(argv)
    text = args.path.read_text()
    block = render()
    current = generated_block(text)
    if current is None:
        print(f"{args.path}: the markers {BEGIN!r} and {END!r} are missing", file=sys.stderr)
        return 1
    if current == block:
        print(f"{args.path}: up to date")
        return 0
    if not args.write:
        print(f"{args.path}: out of date with protocol.yaml; run python -m spu_emulator.protocol_doc --write")
        return 1
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    args.path.write_text(text[:start] + "\n" + block + text[end:])
    print(f"{args.path}: rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
