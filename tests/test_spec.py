"""Device specs: the loader refuses what the schema forbids, the schema is complete, presets are as promised."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import driver
from spu_emulator import spec as spec_module
from spu_emulator.spec import DeviceSpec, SpecError, load_spec, read_yaml, spec_from_mapping

ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = ROOT / "firmware_spec"
SCHEMA = read_yaml((SPEC_DIR / "schema.yaml").read_text())
PRESETS = ["ideal", "spu-8", "spu-8-lc", "tngd-sim"]
SOURCE = "board.yaml"  # the name spec_from_mapping is told the mapping came from

PROPERTY = settings(max_examples=40, deadline=None)


def _leaves(sch: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every scalar field of the schema as (path, sub-schema)."""
    out = []
    for key, sub in sch["properties"].items():
        if sub["type"] == "object":
            out += _leaves(sub, prefix + (key,))
        else:
            out.append((prefix + (key,), sub))
    return out


def _objects(sch: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """The schema's object nodes, the root included, as (path, sub-schema)."""
    out = [(prefix, sch)]
    for key, sub in sch["properties"].items():
        if sub["type"] == "object":
            out += _objects(sub, prefix + (key,))
    return out


LEAVES = _leaves(SCHEMA)
OBJECTS = _objects(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _preset_mapping(name: str = "spu-8") -> dict:
    return read_yaml((SPEC_DIR / f"{name}.yaml").read_text())


def _with(path: tuple[str, ...], value: object, base: dict | None = None) -> dict:
    data = copy.deepcopy(base if base is not None else _preset_mapping())
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return data


def _refuse(data: object, *words: str) -> SpecError:
    """spec_from_mapping must raise SpecError naming the source and every one of ``words``."""
    with pytest.raises(SpecError) as caught:
        spec_from_mapping(data, source=SOURCE)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert SOURCE in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return caught.value


def _write(tmp: Path, text: str, name: str = "board.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _refuse_file(path: Path, *words: str) -> None:
    """load_spec and driver.open must both refuse the file, naming it and ``words``."""
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    with pytest.raises(driver.SpecError) as through_driver:
        driver.open(path, seed=0)
    assert isinstance(through_driver.value, ValueError) and isinstance(through_driver.value, driver.SpuError)
    for message in (str(caught.value), str(through_driver.value)):
        assert str(path) in message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"


# -- unknown keys, wrong types, out of range -------------------------------------------------------------

_identifier = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


@PROPERTY
@given(where=st.sampled_from(OBJECTS), key=st.one_of(_identifier, st.text(min_size=1, max_size=8)))
def test_unknown_key(where, key):
    """An unknown key at the top level or in any section is refused, naming the section and the key."""
    path, sub = where
    if key in sub["properties"]:
        key = key + "_x"
    data = _with(path + (key,), 1) if path else {**_preset_mapping(), key: 1}
    _refuse(data, key, "unknown", *path)
    assert not VALIDATOR.is_valid(data)


def _wrong_type(kind: str) -> st.SearchStrategy:
    junk = st.one_of(st.text(max_size=6), st.none(), st.lists(st.integers(), max_size=2), st.just({"a": 1}))
    if kind == "number":  # strings ("1e-9" quoted), booleans
        return st.one_of(junk, st.booleans(), st.sampled_from(["1000", "1e-9", "0.5"]))
    if kind == "integer":  # floats, integral ones (8.0) included, booleans
        return st.one_of(junk, st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.just(8.0))
    if kind == "boolean":
        return st.one_of(junk, st.integers(), st.floats(allow_nan=False), st.sampled_from(["true", "yes", 1, 0]))
    return st.one_of(
        st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.lists(st.text(), max_size=2)
    )


@PROPERTY
@given(data=st.data())
def test_wrong_type(data):
    """A value of the wrong type (string for a number, float for an integer, bool for a number, ...) is
    refused, naming the field and the value."""
    path, sub = data.draw(st.sampled_from(LEAVES), label="field")
    value = data.draw(_wrong_type(sub["type"]), label="value")
    mapping = _with(path, value)
    _refuse(mapping, ".".join(path), repr(value))
    if not (sub["type"] == "integer" and isinstance(value, float) and value.is_integer()):
        assert not VALIDATOR.is_valid(mapping)  # JSON Schema counts 8.0 as an integer; the loader does not


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("timing", "r0_ohm"), "1000", ["must be a number", "'1000'"]),
        (("cells", "count"), 8.0, ["must be an integer", "8.0"]),
        (("rails", "v_rail"), True, ["must be a number", "True"]),
        (("cells", "count"), True, ["must be an integer", "True"]),
        (("noise", "johnson"), 1, ["true or false", "1"]),
        (("name",), 5, ["must be a string", "5"]),
        (("cells", "kind"), "lc", ["not one of", "'lc'"]),
        (("timing", "r0_ohm"), math.nan, ["finite", "nan"]),
        (("timing", "r0_ohm"), math.inf, ["finite", "inf"]),
        (("cells",), 5, ["must be a mapping", "5"]),
    ],
)
def test_wrong_type_examples(path, value, words):
    _refuse(_with(path, value), ".".join(path), *words)


@pytest.mark.parametrize("section", ["cells", "noise"])
def test_null_section_is_refused_as_the_schema_says(section):
    mapping = _with((section,), None)
    assert not VALIDATOR.is_valid(mapping)
    _refuse(mapping, section)


def _bounds() -> list[tuple[tuple[str, ...], dict, str]]:
    out = []
    for path, sub in LEAVES:
        for side in ("minimum", "maximum", "exclusiveMinimum"):
            if side in sub:
                out.append((path, sub, side))
    return out


BOUNDS = _bounds()


def _outside(sub: dict, side: str) -> st.SearchStrategy:
    bound = sub[side]
    if sub["type"] == "integer":
        return st.integers(max_value=bound - 1) if side == "minimum" else st.integers(min_value=bound + 1)
    finite = {"allow_nan": False, "allow_infinity": False}
    if side == "minimum":
        return st.floats(max_value=float(bound), **finite).filter(lambda v: v < bound)
    if side == "exclusiveMinimum":
        return st.floats(max_value=float(bound), **finite)
    return st.floats(min_value=float(bound), exclude_min=True, **finite)


def test_every_bound_is_exercised():
    """The strategy below covers every bounded field (a new field with a bound is picked up)."""
    assert {path for path, _, _ in BOUNDS} == {path for path, sub in LEAVES if sub["type"] in ("integer", "number")}


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_out_of_range(data):
    """A value outside [minimum, maximum] (or <= exclusiveMinimum) of its schema field is refused, naming
    the field and the value; the independent JSON Schema validator agrees."""
    path, sub, side = data.draw(st.sampled_from(BOUNDS), label="field")
    value = data.draw(_outside(sub, side), label="value")
    mapping = _with(path, value)
    _refuse(mapping, path[-1], repr(value))
    if len(path) > 1:
        _refuse(mapping, ".".join(path))
    assert not VALIDATOR.is_valid(mapping)


@pytest.mark.parametrize("version", [2, 3, 1000])
def test_newer_spec_version(version, tmp_path):
    """A spec written for a newer schema is refused with a message that says to upgrade."""
    _refuse(_with(("spec_version",), version), "spec_version", str(version), "newer")
    path = _write(tmp_path, yaml.safe_dump(_with(("spec_version",), version)))
    _refuse_file(path, "spec_version", str(version))


def test_current_version_is_the_schema_maximum():
    assert SCHEMA["properties"]["spec_version"]["maximum"] == SCHEMA["x-current-version"]


@pytest.mark.parametrize("field", ["spec_version", "name"])
def test_missing_required_field(field):
    data = _preset_mapping()
    del data[field]
    _refuse(data, "missing", field)


# -- files: bad YAML, non-mappings, missing files ------------------------------------------------------------


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "42\n", "just words\n", "", "null\n"])
def test_yaml_that_is_not_a_mapping(text, tmp_path):
    _refuse_file(_write(tmp_path, text), "mapping")


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b: c\n", "spec_version: 1\n  name: x\n", "{{\n"])
def test_invalid_yaml(text, tmp_path):
    _refuse_file(_write(tmp_path, text), "YAML")


def test_missing_file(tmp_path):
    _refuse_file(tmp_path / "no-such-board.yaml")


def test_unknown_preset_name_lists_the_presets():
    with pytest.raises(driver.SpecError) as caught:
        driver.open("spu-9", seed=0)
    assert "'spu-9'" in str(caught.value)
    for name in PRESETS:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "path, value, words",
    [
        (("cells", "bogus"), 1, ["bogus", "cells"]),
        (("bogus",), 1, ["bogus"]),
        (("timing", "r0_ohm"), "1 kOhm", ["timing.r0_ohm", "1 kOhm"]),
        (("adc", "bits"), 40, ["adc.bits", "40"]),
        (("cells", "count"), 2.5, ["cells.count", "2.5"]),
    ],
)
def test_file_errors_name_file_field_and_value(path, value, words, tmp_path):
    """Through load_spec and driver.open, an error in a file names the file, the field and the value."""
    _refuse_file(_write(tmp_path, yaml.safe_dump(_with(path, value))), *words)


def test_exponent_floats_load_as_numbers(tmp_path):
    """1e-9, 1E3, 5e+1 and 1.0e6 are numbers (YAML 1.2), not the strings PyYAML's 1.1 rules make of them."""
    text = (SPEC_DIR / "ideal.yaml").read_text()
    text = text.replace("c0_farad: 1.0e-9", "c0_farad: 1e-9").replace("r0_ohm: 1000.0", "r0_ohm: 1E3")
    text = text.replace("link_rate_gbps: 50.0", "link_rate_gbps: 5e+1").replace(
        "max_run_time: 1.0e9", "max_run_time: 1e6"
    )
    assert "1e-9" in text and "1E3" in text and "5e+1" in text and "1e6" in text
    spec = load_spec(_write(tmp_path, text))
    timing = spec.timing
    assert (timing.c0_farad, timing.r0_ohm, timing.link_rate_gbps, timing.max_run_time) == (1e-9, 1e3, 50.0, 1e6)
    assert all(isinstance(v, float) for v in (timing.c0_farad, timing.r0_ohm, timing.max_run_time))
    with driver.open(tmp_path / "board.yaml", seed=0) as dev:
        assert dev.info.tau_s == pytest.approx(1e-6)


# -- the schema, the dataclasses and the presets -------------------------------------------------------------


def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_field_is_documented():
    """Every leaf has description, x-unit, and a default unless it is required; every object is closed."""
    required = set(SCHEMA.get("required", []))
    for path, sub in LEAVES:
        assert sub.get("description"), path
        assert "x-unit" in sub, path
        assert "default" in sub or (len(path) == 1 and path[0] in required), path
        if "default" in sub:
            assert VALIDATOR.evolve(schema=sub).is_valid(sub["default"]), path
    for path, sub in OBJECTS:
        assert sub.get("additionalProperties") is False, path
        if path:
            assert sub.get("description"), path


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_with_jsonschema(name):
    """Each preset, as written and as loaded (defaults filled in), is valid under the independent validator."""
    VALIDATOR.validate(_preset_mapping(name))
    VALIDATOR.validate(load_spec(name).to_dict())


def test_preset_names():
    assert spec_module.preset_names() == PRESETS


def _dataclass_tree(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":  # where the spec came from: not part of the spec
            continue
        kind = hints[f.name]
        out[f.name] = _dataclass_tree(kind) if dataclasses.is_dataclass(kind) else (kind, f.default)
    return out


def _schema_tree(sch: dict) -> dict:
    python = {"integer": int, "number": float, "boolean": bool, "string": str}
    out = {}
    for key, sub in sch["properties"].items():
        if sub["type"] == "object":
            out[key] = _schema_tree(sub)
        else:
            out[key] = (python[sub["type"]], sub.get("default", dataclasses.MISSING))
    return out


def test_dataclasses_mirror_the_schema():
    """DeviceSpec has exactly the schema's fields, recursively, with the same types and defaults."""
    assert _dataclass_tree(DeviceSpec) == _schema_tree(SCHEMA)


def test_minimal_spec_gets_the_schema_defaults(tmp_path):
    spec = load_spec(_write(tmp_path, "spec_version: 1\nname: bare\n"))
    assert spec.name == "bare"
    expected = {"spec_version": 1, "name": "bare", **_flatten(_schema_defaults(SCHEMA))}
    assert _flatten(spec.to_dict()) == expected
    VALIDATOR.validate(spec.to_dict())


def _schema_defaults(sch: dict) -> dict:
    out = {}
    for key, sub in sch["properties"].items():
        if sub["type"] == "object":
            out[key] = _schema_defaults(sub)
        elif "default" in sub:
            out[key] = sub["default"]
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_ideal_preset_has_every_non_ideality_off():
    spec = load_spec("ideal")
    assert spec.cells.count >= 1024
    assert spec.coupling.element_bits == spec.dac.bits == spec.adc.bits == 0
    assert spec.coupling.mismatch == spec.coupling.input_conductance_mismatch == 0.0
    assert spec.cell.capacitance_mismatch == spec.cell.opamp_offset_v == 0.0
    assert spec.noise.kappa0 == 0.0 and not spec.noise.johnson
    assert spec.dac.gain_error == spec.dac.offset_v == 0.0
    assert spec.adc.gain_error == spec.adc.offset_v == spec.adc.noise_v == 0.0
    assert not spec.rails.enabled


def test_spu8_preset_has_every_non_ideality_on():
    spec = load_spec("spu-8")
    assert (spec.cells.count, spec.cells.kind) == (8, "rc")
    assert min(spec.coupling.element_bits, spec.dac.bits, spec.adc.bits) > 0
    assert min(spec.coupling.mismatch, spec.coupling.input_conductance_mismatch, spec.cell.capacitance_mismatch) > 0
    assert min(spec.cell.opamp_offset_v, spec.dac.offset_v, spec.adc.offset_v) > 0
    assert min(spec.dac.gain_error, spec.adc.gain_error) > 0
    assert spec.noise.kappa0 > 0 and spec.adc.noise_v > 0
    assert spec.noise.johnson
    assert spec.rails.enabled


def test_tngd_sim_preset_is_the_papers_device():
    spec = load_spec("tngd-sim")
    assert spec.coupling.element_bits == spec.dac.bits == spec.adc.bits == 16
    assert spec.timing.r0_ohm == 1000.0 and spec.timing.c0_farad == 1e-9
    assert spec.timing.tau_s == pytest.approx(1e-6)
    assert spec.timing.link_rate_gbps == 50.0
    assert spec.cells.count >= 2**20 and spec.coupling.max_ggn_rows >= 4096  # GGN loads up to N = 2^20, m = 4096
    assert spec.coupling.max_dense_size == 4096


# -- finding the YAML when installed ----------------------------------------------------------------------------

_INSTALLED_CHECK = """
import importlib.resources, json, sys
import driver, spu_emulator.spec
names = sorted(entry.name for entry in importlib.resources.files("firmware_spec").iterdir())
with driver.open("tngd-sim", seed=0) as dev:
    cells = dev.info.cells
print(json.dumps({"driver": driver.__file__, "spec": spu_emulator.spec.__file__, "names": names,
                  "presets": spu_emulator.spec.preset_names(), "cells": cells}))
"""


def test_non_editable_install_ships_the_yaml(tmp_path):
    """`pip install .` (not editable) into a fresh target: importlib.resources and the loader find the presets.

    The sources are copied first so the build leaves no build/ or egg-info in the checkout; the check runs
    with -S so this environment's editable install is not on the path.
    """
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("driver", "spu_emulator", "firmware_spec"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.nb?"))
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    offline = ("No matching distribution", "Could not find a version", "NewConnectionError", "Network is unreachable")
    if pip.returncode != 0 and any(sign in pip.stderr for sign in offline):
        pytest.skip(f"pip cannot fetch the build backend (setuptools>=68) here: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stderr
    site_packages = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site_packages])}
    child = subprocess.run(
        [sys.executable, "-S", "-c", _INSTALLED_CHECK],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["driver"].startswith(str(target)) and found["spec"].startswith(str(target))
    assert {f"{name}.yaml" for name in PRESETS} | {"schema.yaml", "protocol.yaml"} <= set(found["names"])
    assert found["presets"] == PRESETS
    assert found["cells"] == 1048576  # tngd-sim: N up to 2^20 in a GGN load


def test_excluded_values_are_refused():
    """A value a field's schema excludes (``not: {const: ...}``, e.g. 1-bit converters, which have no code
    but zero) is refused with the schema's reason, naming the field; the JSON Schema validator agrees."""
    excluded = [(path, sub) for path, sub in LEAVES if "not" in sub]
    assert {path[-1] for path, _ in excluded} == {"element_bits", "bits"} and len(excluded) == 3
    for path, sub in excluded:
        mapping = _with(path, sub["not"]["const"])
        _refuse(mapping, ".".join(path), "no code but zero")
        assert not VALIDATOR.is_valid(mapping)
        assert VALIDATOR.is_valid(_with(path, 2))
