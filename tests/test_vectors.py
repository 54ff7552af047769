"""firmware_spec/vectors/: the checked-in files are what the reference implementation gives now, every
opcode, status and frame error is covered, and the generator refuses a case the reference contradicts."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from spu_emulator import vectors, wire
from spu_emulator.spec import load_spec

_REGENERATE = "python -m spu_emulator.vectors --write"


def _files() -> dict[str, dict]:
    return {
        str(path.relative_to(vectors.VECTOR_DIR)): json.loads(path.read_text())
        for path in sorted(vectors.VECTOR_DIR.glob("*/*.json"))
    }


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return vectors.generate()


def test_checked_in_vectors_are_current(generated):
    on_disk = {path: (vectors.VECTOR_DIR / path).read_text() for path in _files()}
    missing = sorted(set(generated) - set(on_disk))
    extra = sorted(set(on_disk) - set(generated))
    stale = sorted(path for path in set(generated) & set(on_disk) if generated[path] != on_disk[path])
    assert not (missing or extra or stale), (
        f"firmware_spec/vectors/ is out of date with the reference implementation: missing {missing[:5]},"
        f" left over {extra[:5]}, stale {stale[:5]}; run {_REGENERATE} and commit the files"
    )


def _requests(files: dict[str, dict]):
    for path, vector in files.items():
        for step in vector["steps"]:
            yield path, bytes.fromhex(step["request"]), step["expect"]


def test_every_opcode_of_protocol_yaml_has_a_vector():
    sent = {struct.unpack_from("<H", request, 6)[0] for _, request, _ in _requests(_files())}
    missing = [name for name, code in wire.PROTOCOL["opcodes"].items() if code not in sent]
    assert not missing, (
        f"opcodes {missing} have no test vector: add a Case (its valid form, and its refusals) to CASES in"
        f" spu_emulator/vectors.py and run {_REGENERATE}"
    )


# statuses no vector can provoke on a reference device without a token, and why
_UNPROVOKED = {
    "INTERNAL": "a bug in the device; nothing a host sends must cause it",
    "UNAUTHENTICATED": "only a server with a token answers it (tests/test_auth.py)",
    "ABORTED": "only a run stopped while it runs gets it, which depends on timing (tests/test_abort.py)",
}


def test_every_status_and_frame_error_is_covered():
    answered = {expect["status"] for _, _, expect in _requests(_files())}
    missing = set(wire.PROTOCOL["status"]) - answered - set(_UNPROVOKED)
    assert not missing, f"statuses {sorted(missing)} have no vector; add one to spu_emulator/vectors.py CASES"
    errors = {expect.get("error") for _, _, expect in _requests(_files())}
    assert not set(wire.PROTOCOL["frame_errors"]) - errors


def test_every_preset_has_the_valid_form_of_every_device_command():
    files = _files()
    for preset in ("spu-8", "ideal", "spu-8-lc", "tngd-sim"):
        ok = {
            struct.unpack_from("<H", request, 6)[0]
            for path, request, expect in _requests(files)
            if path.startswith(preset + "/") and expect["status"] == "OK"
        }
        want = {"INFO", "RESET", "LOAD_MATRIX", "LOAD_VECTOR", "RUN", "READ_MEAN", "READ_STATE", "STATUS"}
        want |= {"READ_COV", "READ_SAMPLES"}
        assert {wire.PROTOCOL["opcodes"][name] for name in want} <= ok, preset


def test_frame_error_replies_repeat_a_readable_header():
    """Issue 19 item 1: a readable header's opcode and request_id come back; an unreadable one's are 0."""
    readable = {name for name, entry in wire.PROTOCOL["frame_errors"].items() if entry["readable"]}
    assert readable == {"TOO_LONG", "BAD_KIND", "BAD_PAYLOAD_CHECKSUM", "BAD_PAYLOAD"}  # protocol.yaml's rule
    seen = set()
    for _, request, expect in _requests(_files()):
        if expect["status"] != "BAD_FRAME":
            continue
        opcode, request_id = struct.unpack_from("<H", request, 6)[0], struct.unpack_from("<I", request, 12)[0]
        want = (opcode, request_id) if expect["error"] in readable else (0, 0)
        assert (expect["opcode"], expect["request_id"]) == want, expect
        assert request_id != 0 and opcode != 0  # else the check above could not tell
        seen.add(expect["error"])
    assert seen == set(wire.PROTOCOL["frame_errors"])


def test_replies_with_recorded_bytes_match_their_expectations():
    """The recorded reply bytes and the expectations are two views of one reply: they must agree."""
    from driver.conformance import check_reply

    count = 0
    for path, vector in _files().items():
        for step in vector["steps"]:
            if "reply" in step:
                assert check_reply(step["expect"], bytes.fromhex(step["reply"])) == [], (path, step["opcode"])
                count += 1
    assert count > 100


def test_the_generator_refuses_a_case_the_reference_contradicts():
    case = vectors.Case("wrong", "x", "RESET is not refused", (vectors.Step("RESET", status="BAD_ARGUMENT"),))
    with pytest.raises(AssertionError, match="the reference answered OK"):
        vectors.run_case(case, load_spec("spu-8"))


def test_padding_counts_from_the_payload_start_in_a_nested_map():
    """The two nested-padding payloads differ only in where their padding counts from; the reference
    parses the one padded from the payload's start and refuses the other."""
    spec = load_spec("spu-8")
    right, wrong = vectors._nested(False)(spec), vectors._nested(True)(spec)
    assert len(right) != len(wrong)
    decoded = wire.decode_payload(right)
    assert np.array_equal(decoded["extra"]["values"], np.arange(3))
    with pytest.raises(wire.FrameError) as caught:
        wire.decode_payload(wrong)
    assert caught.value.code == wire.FrameErrorCode.BAD_PAYLOAD


def test_check_mode_reports_stale_files(tmp_path, capsys):
    assert vectors.main(["--path", str(tmp_path)]) == 1
    assert _REGENERATE in capsys.readouterr().out
