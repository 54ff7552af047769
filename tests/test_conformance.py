"""``spu conformance``: passes against ``spu serve`` for every preset, and catches deliberately broken
servers, each on the check that covers what it breaks."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pytest

import spu_emulator
from driver import cli, conformance
from spu_emulator import Firmware, load_spec, wire
from spu_emulator.server import DeviceServer
from spu_emulator.spec import preset_names


def _failed(checks: list[conformance.Check]) -> dict[str, str]:
    return {check.name: check.detail for check in checks if not check.passed}


def _served(preset: str, seed: int = 0) -> DeviceServer:
    return DeviceServer(Firmware(load_spec(preset), seed=seed), "127.0.0.1", 0).start()


@pytest.mark.parametrize("preset", preset_names())  # under a second each, so every preset in the default suite
def test_every_check_passes_against_spu_serve(preset):
    with _served(preset) as server:
        checks = conformance.run(server.url)
    assert not _failed(checks), conformance.format_table(checks, server.url)
    details = {check.name: check.detail for check in checks}
    assert details["vectors: reply bytes"].startswith("compared byte for byte")  # seed 0 is the reference
    names = set(details)
    assert f"vector {preset}/read_mean" in names and "vector common/frame_bad_magic" in names
    assert len(checks) > 60


def test_a_board_with_its_own_spec_passes_against_vectors_made_from_it(tmp_path):
    """A device the presets do not describe: its vectors come from its spec (python -m spu_emulator.vectors
    --spec FILE); without them only the common vectors run, and the table says so."""
    from spu_emulator import vectors
    from spu_emulator.spec import spec_to_yaml

    board = load_spec("spu-8", {"cells.count": 4, "adc.bits": 10})
    spec_file = tmp_path / "board.yaml"
    spec_file.write_text(spec_to_yaml(board).replace("name: spu-8", "name: my-board"))
    assert vectors.main(["--spec", str(spec_file), "--path", str(tmp_path / "vectors"), "--write"]) == 0
    with DeviceServer(Firmware(load_spec(spec_file), seed=0), "127.0.0.1", 0).start() as server:
        own = conformance.run(server.url, vectors=tmp_path / "vectors")
        presets_only = _failed(conformance.run(server.url))
    assert not _failed(own), conformance.format_table(own, server.url)
    assert any(check.name == "vector my-board/read_mean" for check in own)
    assert list(presets_only) == ["vectors: device set"] and "my-board" in presets_only["vectors: device set"]


def test_a_device_with_another_seed_passes_on_properties_alone():
    """Seed 5 is not the recorded reference, so replies are checked by their properties, not their bytes."""
    with _served("spu-8", seed=5) as server:
        checks = conformance.run(server.url)
    assert not _failed(checks)
    assert {c.name: c.detail for c in checks}["vectors: reply bytes"].startswith("replies checked by their properties")


def test_a_device_with_a_token_passes_with_the_token_and_fails_without(tmp_path, monkeypatch, capsys):
    token = "0123456789abcdef" * 4
    with DeviceServer(Firmware(load_spec("spu-8"), seed=0), "127.0.0.1", 0, token=token).start() as server:
        checks = conformance.run(server.url, token=token)
        assert not _failed(checks), conformance.format_table(checks, server.url)
        assert "with a token: nothing runs before the handshake" in {check.name for check in checks}
        refused = _failed(conformance.run(server.url))  # no token: the device must refuse everything
        (tmp_path / "token").write_text(token + "\n")
        monkeypatch.delenv("SPU_TOKEN", raising=False)
        code = cli.main(["conformance", server.url, "--token-file", str(tmp_path / "token")])
    assert "UNAUTHENTICATED" in refused["INFO reply"]
    assert code == 0 and "checks passed" in capsys.readouterr().out


def test_cli_prints_json_and_exits_0(capsys, monkeypatch):
    monkeypatch.delenv("SPU_TOKEN", raising=False)
    with _served("spu-8") as server:
        code = cli.main(["conformance", server.url, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["failed"] == 0 and report["passed"] == len(report["checks"])
    assert {"name", "section", "passed", "detail"} == set(report["checks"][0])


def test_cli_exit_codes_for_a_bad_address_and_an_absent_device(capsys):
    assert cli.main(["conformance", "http://127.0.0.1:1"]) == 2
    assert "tcp://HOST:PORT" in capsys.readouterr().err
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["conformance", f"tcp://127.0.0.1:{port}"]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_cli_table_names_failures_and_exits_1(monkeypatch, capsys):
    monkeypatch.delenv("SPU_TOKEN", raising=False)
    monkeypatch.setattr(wire, "_array_parts", _mis_padded)
    monkeypatch.setattr(wire, "_ENCODERS", {})  # encoders learnt before the patch would pad right
    server = _served("spu-8")
    monkeypatch.undo()
    with server:
        code = cli.main(["conformance", server.url])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL    vector spu-8/read_mean" in out and "checks passed" in out


# -- broken servers: each patch is made before the device process forks, and undone in this process -------


_original_array_parts = wire._array_parts


def _mis_padded(value: np.ndarray, at: int, name: str):
    """An array head padded from the field's own start instead of the payload's."""
    return _original_array_parts(value, 0, name)


def _run_broken(monkeypatch, patch) -> dict[str, str]:
    patch()
    monkeypatch.setattr(wire, "_ENCODERS", {})  # the codec's encoders learnt before the patch would not see it
    server = _served("spu-8")
    monkeypatch.undo()  # the conformance checker in this process uses the real codec
    with server:
        return _failed(conformance.run(server.url))


def test_a_server_that_mis_pads_arrays_fails_the_array_replies(monkeypatch):
    failed = _run_broken(monkeypatch, lambda: monkeypatch.setattr(wire, "_array_parts", _mis_padded))
    # (READ_STATE's and READ_SAMPLES' codes start at payload offset 8, where both countings agree)
    for name in ("vector spu-8/read_mean", "vector spu-8/read_cov"):
        assert "reply frame does not parse" in failed[name], failed.get(name)
    assert "vector common/frame_bad_magic" not in failed  # replies without arrays still conform


def test_a_server_that_drops_request_ids_fails_the_id_check(monkeypatch):
    encode = wire.encode_frame

    def dropped(kind, opcode, status, request_id, payload=None):
        return encode(kind, opcode, status, 0 if kind == wire.REPLY else request_id, payload)

    failed = _run_broken(monkeypatch, lambda: monkeypatch.setattr(wire, "encode_frame", dropped))
    assert "replies repeat opcode and request_id" in failed
    assert "request_id 0, expected 1" in failed["vector spu-8/load_vector"]


def test_a_server_that_accepts_out_of_range_codes_fails_the_refusal_checks(monkeypatch):
    def patch():
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith(spu_emulator.__name__) and hasattr(module, "check_codes"):
                monkeypatch.setattr(module, "check_codes", lambda *args: None)

    failed = _run_broken(monkeypatch, patch)
    assert "answered OK, expected BAD_ARGUMENT" in failed["refusals change nothing"]
    assert "status OK" in failed["vector spu-8/load_matrix_code_over_max"]
    assert "vector spu-8/load_matrix" not in failed and "vector spu-8/read_mean" not in failed


def test_check_reply_names_each_kind_of_departure():
    """check_reply on replies made to depart from a vector in one way each."""
    vector = json.loads((conformance.VECTOR_DIR / "spu-8" / "read_mean.json").read_text())
    expect = vector["steps"][-1]["expect"]  # READ_MEAN: mean_codes float64 (2,), |code| <= 2047
    good = {"mean_codes": np.array([700.0, -690.0]), "samples": 100, "hardware_time": {"link_s": 0.0}}

    def problems(payload, request_id=expect["request_id"], status=0):
        frame = wire.encode_frame(wire.REPLY, expect["opcode"], status, request_id, payload)
        return conformance.check_reply(expect, frame)

    assert problems(good) == []
    assert problems(good, request_id=0) == [f"request_id 0, expected {expect['request_id']}"]
    assert problems(good, status=2)[0].startswith("status BAD_STATE")
    assert problems({**good, "mean_codes": np.array([700.0, -690.0, 1.0])}) == [
        "array 'mean_codes' has shape [3], expected [2]"
    ]
    assert problems({**good, "mean_codes": np.array([700, -690])}) == [
        "array 'mean_codes' has dtype int64, expected float64"
    ]
    assert "beyond the code bound 2047" in problems({**good, "mean_codes": np.array([2048.5, 0.0])})[0]
    assert problems({**good, "samples": 1.5}) == ["field 'samples' is float, expected int"]
    assert problems({"mean_codes": good["mean_codes"], "samples": 100}) == ["field 'hardware_time' missing"]
    assert problems({**good, "extra": 1}) == []  # a device MAY add reply fields
