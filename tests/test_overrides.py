"""Device variants in code: driver.open(spec, overrides=...), dict specs, `spu info --set --yaml`, `spu serve --set`."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import driver
from driver.cli import main
from spu_emulator.spec import (
    SpecError,
    apply_overrides,
    field_paths,
    load_spec,
    parse_override,
    preset_names,
    read_yaml,
    spec_from_mapping,
    spec_to_yaml,
)

FIELDS = field_paths()


def _via_file(tmp_path, preset: str, overrides: dict) -> object:
    """The YAML route: the preset's file with the overridden values written in, loaded from disk."""
    data = read_yaml(load_spec_text(preset))
    for path, value in overrides.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def load_spec_text(preset: str) -> str:
    from spu_emulator.spec import SPEC_DIR

    return (SPEC_DIR / f"{preset}.yaml").read_text()


def _message(exc: Exception) -> str:
    """An error message without its source (file path or preset name): the field and value part."""
    return str(exc).split(": ", 1)[1]


def test_overrides_match_the_yaml_route(tmp_path):
    overrides = {"adc.bits": 10, "noise.kappa0": 1e-3, "coupling.mismatch": 0.02, "rails.enabled": False}
    assert load_spec("spu-8", overrides) == _via_file(tmp_path, "spu-8", overrides)
    with driver.open("spu-8", seed=0, overrides=overrides) as dev:
        assert dev.info.adc_bits == 10 and dev.info.kappa0 == 1e-3 and dev.info.rail_v is None
        assert dev.info.spec == load_spec("spu-8", overrides).to_dict()


# values of every kind the schema may meet: in range, out of range, wrong type
_values = st.one_of(
    st.integers(-5, 40),
    st.floats(-1e3, 1e13, allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 2, 0.5, 1e-9, True, False, "rc", "oscillator", "x", float("nan"), float("inf")]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    preset=st.sampled_from(preset_names()),
    overrides=st.dictionaries(st.sampled_from(sorted(FIELDS)), _values, min_size=1, max_size=3),
)
def test_override_validation_is_the_files(tmp_path, preset, overrides):
    """Any override either gives the DeviceSpec the YAML file gives, or the same error (naming the field)."""
    try:
        expected = _via_file(tmp_path, preset, overrides)
    except SpecError as exc:
        with pytest.raises(SpecError) as caught:
            load_spec(preset, overrides)
        assert _message(caught.value) == _message(exc)
        assert any(path in _message(exc) for path in overrides), exc  # it names the overridden field
    else:
        assert load_spec(preset, overrides) == expected


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("adc.bitz", ["adc.bitz", "adc.bits", "adc.range_v"]),
        ("adc", ["adc is a section", "adc.bits"]),
        ("nosuch", ["nosuch", "the sections are", "adc"]),
        ("adc.bits.x", ["adc.bits.x", "the fields of adc"]),
        (3, ["3", "no such field"]),
    ],
)
def test_unknown_paths_name_the_allowed_fields(path, words):
    with pytest.raises(driver.SpecError) as caught:
        driver.open("spu-8", seed=0, overrides={path: 1})
    for word in words:
        assert word in str(caught.value)


def test_refused_values_name_the_field_and_value():
    with pytest.raises(driver.SpecError, match=r"adc\.bits = 1 is not allowed"):
        driver.open("spu-8", overrides={"adc.bits": 1})
    with pytest.raises(driver.SpecError, match=r"noise\.kappa0 = -1\.0 is below its minimum"):
        driver.open("spu-8", overrides={"noise.kappa0": -1.0})
    with pytest.raises(driver.SpecError, match=r"cells\.kind = 'lc' is not one of rc, oscillator"):
        driver.open("spu-8", overrides={"cells.kind": "lc"})


def test_overrides_do_not_touch_the_callers_mapping():
    data = read_yaml(load_spec_text("spu-8"))
    before = yaml.safe_dump(data)
    out = apply_overrides(data, {"adc.bits": 6, "integrator.step_factor": 0.01})
    assert yaml.safe_dump(data) == before
    assert out["adc"]["bits"] == 6 and out["integrator"]["step_factor"] == 0.01


def test_dict_spec_opens_like_the_file():
    data = read_yaml(load_spec_text("spu-8"))
    A = np.diag(np.linspace(1.0, 2.0, 8))
    b = np.ones(8)
    results = []
    for spec in ("spu-8", data):
        with driver.open(spec, seed=3) as dev:
            results.append(driver.linalg.solve(dev, A, b, t=50.0))
    np.testing.assert_array_equal(results[0], results[1])
    with pytest.raises(driver.SpecError, match="missing required field name"):
        driver.open({"spec_version": 1})
    with pytest.raises(driver.SpecError, match="a spec is a preset name"):
        driver.open(42)


def test_overrides_are_refused_for_a_served_device():
    with pytest.raises(driver.InvalidInputError, match="spu serve PRESET --set"):
        driver.open("tcp://127.0.0.1:1", overrides={"adc.bits": 10})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("adc.bits=10", ("adc.bits", 10)),
        ("noise.kappa0=1e-3", ("noise.kappa0", 1e-3)),
        ("rails.enabled=false", ("rails.enabled", False)),
        ("cells.kind=oscillator", ("cells.kind", "oscillator")),
        ("name=a=b", ("name", "a=b")),
        (" adc.bits = 8", ("adc.bits", 8)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["adc.bits", "=3", ""])
def test_parse_override_refuses_text_without_key_and_value(text):
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_override(text)


@pytest.mark.parametrize("preset", preset_names())
def test_yaml_round_trip(preset):
    spec = load_spec(preset, {"adc.bits": 9})
    assert spec_from_mapping(read_yaml(spec_to_yaml(spec))) == spec


def test_spu_info_set_yaml(capsys, tmp_path):
    assert main(["info", "spu-8", "--set", "adc.bits=10", "--set", "noise.kappa0=1e-3", "--yaml"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "variant.yaml"
    path.write_text(text)
    assert load_spec(path) == load_spec("spu-8", {"adc.bits": 10, "noise.kappa0": 1e-3})
    assert main(["info", "spu-8", "--set", "adc.bits=10"]) == 0
    assert re.search(r"ADC\s+10 bits", capsys.readouterr().out)


def test_spu_info_set_errors_exit_2(capsys):
    assert main(["info", "spu-8", "--set", "adc.bitz=10"]) == 2
    err = capsys.readouterr().err
    assert "adc.bitz" in err and "adc.bits" in err
    assert main(["info", "spu-8", "--set", "adc.bits"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_spu_serve_set():
    """`spu serve --set` serves the variant: its INFO over TCP shows the overridden fields."""
    command = [sys.executable, "-m", "driver.cli", "serve", "spu-8", "--port", "0", "--seed", "1"]
    command += ["--set", "adc.bits=10", "--set", "noise.kappa0=2e-4"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            found = re.search(r"(tcp://127\.0\.0\.1:\d+)", line)
            url = found.group(1) if found else None
        assert url, "the server did not log its address"
        with driver.open(url, seed=1) as dev:
            assert dev.info.adc_bits == 10 and dev.info.kappa0 == 2e-4
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_spu_serve_set_refuses_a_bad_override(capsys):
    assert main(["serve", "spu-8", "--set", "adc.bits=1"]) == 2
    assert "adc.bits = 1" in capsys.readouterr().err
