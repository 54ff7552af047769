"""Device specs: YAML files checked against ``firmware_spec/schema.yaml``.

A spec is turned into a tree of frozen dataclasses (:class:`DeviceSpec`).  The
schema is the single description of every field (unit, range, default); the
dataclasses mirror it and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

# firmware_spec/ is installed beside the packages (and sits beside them in a checkout)
SPEC_DIR = Path(__file__).resolve().parent.parent / "firmware_spec"

__all__ = [
    "SpecError",
    "DeviceSpec",
    "load_spec",
    "spec_from_mapping",
    "apply_overrides",
    "parse_override",
    "spec_to_yaml",
    "field_paths",
    "preset_names",
    "schema",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-9`` and ``1.0e12`` as floats (YAML 1.2 style), and refuses a key
    given twice in one mapping (plain YAML keeps the last silently, so a typo'd spec would load)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"""
        r"""|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"""
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text, with exponent floats such as ``1e-9`` read as numbers."""
    return yaml.load(text, Loader=_Loader)


class SpecError(ValueError):
    """A device spec could not be read: names the file, the field and the value."""


@dataclass(frozen=True)
class Cells:
    count: int = 8
    kind: str = "rc"


@dataclass(frozen=True)
class Timing:
    r0_ohm: float = 1000.0
    c0_farad: float = 1.0e-9
    max_run_time: float = 1.0e6
    link_rate_gbps: float = 1.0
    program_row_s: float = 0.0

    @property
    def tau_s(self) -> float:
        """Unit of analog time in seconds, tau = R0 * C0."""
        return self.r0_ohm * self.c0_farad


@dataclass(frozen=True)
class Coupling:
    element_bits: int = 0
    g_max: float = 1.0
    mismatch: float = 0.0
    input_conductance_mismatch: float = 0.0
    max_dense_size: int = 1048576
    max_ggn_rows: int = 1048576


@dataclass(frozen=True)
class Cell:
    capacitance_mismatch: float = 0.0
    opamp_offset_v: float = 0.0


@dataclass(frozen=True)
class Oscillator:
    inductance: float = 1.0
    inductance_mismatch: float = 0.0
    damping: float = 2.0
    damping_mismatch: float = 0.0
    damping_min: float = 0.0
    damping_max: float = 0.0


@dataclass(frozen=True)
class Noise:
    kappa0: float = 0.0
    kappa0_max: float = 0.0
    johnson: bool = False
    temperature_k: float = 300.0


@dataclass(frozen=True)
class Dac:
    bits: int = 0
    range_v: float = 1.0
    gain_error: float = 0.0
    offset_v: float = 0.0


@dataclass(frozen=True)
class Adc:
    bits: int = 0
    range_v: float = 1.0
    sample_rate: float = 1.0
    gain_error: float = 0.0
    offset_v: float = 0.0
    noise_v: float = 0.0


@dataclass(frozen=True)
class Rails:
    enabled: bool = False
    v_rail: float = 1.25


@dataclass(frozen=True)
class Integrator:
    step_factor: float = 0.02


@dataclass(frozen=True)
class Memory:
    budget_bytes: int = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """A whole device spec; see ``firmware_spec/schema.yaml`` for every field."""

    spec_version: int
    name: str
    description: str = ""
    cells: Cells = field(default_factory=Cells)
    timing: Timing = field(default_factory=Timing)
    coupling: Coupling = field(default_factory=Coupling)
    cell: Cell = field(default_factory=Cell)
    oscillator: Oscillator = field(default_factory=Oscillator)
    noise: Noise = field(default_factory=Noise)
    dac: Dac = field(default_factory=Dac)
    adc: Adc = field(default_factory=Adc)
    rails: Rails = field(default_factory=Rails)
    integrator: Integrator = field(default_factory=Integrator)
    memory: Memory = field(default_factory=Memory)
    source: str = field(default="<mapping>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (what INFO sends to the host)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


_SECTIONS = {
    "cells": Cells,
    "timing": Timing,
    "coupling": Coupling,
    "cell": Cell,
    "oscillator": Oscillator,
    "noise": Noise,
    "dac": Dac,
    "adc": Adc,
    "rails": Rails,
    "integrator": Integrator,
    "memory": Memory,
}


@cache
def schema() -> dict[str, Any]:
    """The parsed ``firmware_spec/schema.yaml``."""
    return read_yaml((SPEC_DIR / "schema.yaml").read_text())


def preset_names() -> list[str]:
    """Names of the presets shipped in ``firmware_spec/`` (``ideal``, ``spu-8``, ...)."""
    names = []
    for entry in SPEC_DIR.iterdir():
        name = entry.name
        if name.endswith(".yaml") and name not in ("schema.yaml", "protocol.yaml"):
            names.append(name[: -len(".yaml")])
    return sorted(names)


def load_spec(spec: str | Path | dict[str, Any] | DeviceSpec, overrides: dict[str, Any] | None = None) -> DeviceSpec:
    """Load a device spec, with optional dotted overrides, through the schema's checks.

    ``spec``: a preset name (``"spu-8"``), the path of a YAML file, a mapping with the YAML's
    structure, or a DeviceSpec.  ``overrides``: ``{"adc.bits": 10, "noise.kappa0": 1e-3}``, dotted
    paths of ``firmware_spec/schema.yaml``; each replaces one field before the spec is checked, so
    a variant meets exactly the checks a file would (and its errors name the field).
    """
    if isinstance(spec, DeviceSpec):
        data, source = spec.to_dict(), spec.source
    elif isinstance(spec, dict):
        data, source = spec, "<mapping>"
    elif isinstance(spec, (str, Path)):
        text, source = _read(spec)
        try:
            data = read_yaml(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{source}: not valid YAML: {exc}") from None
        except RecursionError:
            raise SpecError(f"{source}: nested too deeply to read (a spec is at most a few levels deep)") from None
    else:
        raise SpecError(f"a spec is a preset name, a YAML path, a mapping or a DeviceSpec, got {type(spec).__name__}")
    try:
        if overrides:
            data = apply_overrides(data, overrides, source)
            source = f"{source} with " + ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        elif isinstance(spec, DeviceSpec):
            return spec
        return spec_from_mapping(data, source=source)
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to read (a spec is at most a few levels deep)") from None


def field_paths() -> dict[str, dict[str, Any]]:
    """Every settable field of the schema by dotted path (``"adc.bits"``) -> its schema entry."""
    out: dict[str, dict[str, Any]] = {}

    def walk(sch: dict[str, Any], prefix: str) -> None:
        for key, sub in sch["properties"].items():
            if sub["type"] == "object":
                walk(sub, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = sub

    walk(schema(), "")
    return out


def apply_overrides(data: Any, overrides: dict[str, Any], source: str = "<mapping>") -> dict[str, Any]:
    """A copy of the spec mapping ``data`` with each dotted path of ``overrides`` set to its value.

    Paths must name a field of the schema (``"adc.bits"``, not ``"adc"`` nor ``"adc.bitz"``); the
    values are checked later, with the rest of the spec, by :func:`spec_from_mapping`.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping, got {type(data).__name__}")
    if not isinstance(overrides, dict):
        raise SpecError(f"overrides must be a mapping of dotted field paths to values, got {overrides!r}")
    out = _copy_mapping(data)
    fields = field_paths()
    for path, value in overrides.items():
        if not isinstance(path, str) or path not in fields:
            raise SpecError(f"{source}: override {path!r}: {_unknown_path(path, fields)}")
        node = out
        *parents, leaf = path.split(".")
        for where, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                here = ".".join(parents[: where + 1])
                raise SpecError(f"{source}: field {here} must be a mapping, got {child!r}")
            node = child
        node[leaf] = value
    return out


def _copy_mapping(data: dict[str, Any]) -> dict[str, Any]:
    return {key: _copy_mapping(value) if isinstance(value, dict) else value for key, value in data.items()}


def _unknown_path(path: Any, fields: dict[str, dict[str, Any]]) -> str:
    text = str(path)
    sections = sorted({key.split(".")[0] for key in fields if "." in key})
    head = text.split(".")[0]
    if head in sections:
        inside = [key for key in fields if key.startswith(head + ".")]
        if text == head:
            return f"{head} is a section; set one of its fields: {', '.join(inside)}"
        return f"no such field; the fields of {head} are {', '.join(inside)}"
    top = [key for key in fields if "." not in key]
    return f"no such field; the sections are {', '.join(sections)} and the top-level fields {', '.join(top)}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"adc.bits=10"`` -> ``("adc.bits", 10)``: the value is read as YAML (``1e-3`` a number,
    ``true`` a boolean, ``rc`` a string).  Raises SpecError for text without ``=``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"--set takes KEY=VALUE with a dotted field path, e.g. adc.bits=10; got {text!r}")
    try:
        parsed = read_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, (dict, list)) or parsed is None:
        parsed = value
    return key, parsed


def spec_to_yaml(spec: DeviceSpec) -> str:
    """The spec as YAML text in the layout of the preset files; :func:`load_spec` reads it back equal."""
    header = f"# effective spec of {spec.source}\n"
    return header + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=False)


def _read(name_or_path: str | Path) -> tuple[str, str]:
    text_name = str(name_or_path)
    if text_name in preset_names():
        entry = SPEC_DIR / f"{text_name}.yaml"
        return entry.read_text(), f"preset {text_name!r}"
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), str(path)
    raise SpecError(
        f"no preset or file named {text_name!r}; presets are {', '.join(preset_names())},"
        " or pass the path of a YAML spec"
    )


def spec_from_mapping(data: Any, source: str = "<mapping>") -> DeviceSpec:
    """Check ``data`` against the schema, fill defaults, and build a DeviceSpec."""
    sch = schema()
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping, got {type(data).__name__}")
    version = data.get("spec_version")
    current = sch["x-current-version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > current:
        raise SpecError(
            f"{source}: spec_version {version} is newer than this emulator understands"
            f" ({current}); upgrade spu-emulator or write the spec for version {current}"
        )
    values = _check_object(data, sch, source, "")
    noise = values["noise"]
    if noise["kappa0_max"] > 0.0 and noise["kappa0"] > noise["kappa0_max"]:
        raise SpecError(
            f"{source}: field noise.kappa0 = {noise['kappa0']!r} is above noise.kappa0_max = {noise['kappa0_max']!r},"
            " the full scale of the noise source; raise kappa0_max or lower kappa0"
        )
    osc = values["oscillator"]
    if osc["damping_max"] > 0.0 and not osc["damping_min"] <= osc["damping"] <= osc["damping_max"]:
        raise SpecError(
            f"{source}: field oscillator.damping = {osc['damping']!r} is outside [oscillator.damping_min,"
            f" oscillator.damping_max] = [{osc['damping_min']!r}, {osc['damping_max']!r}], the range SET_DAMPING"
            " programmes; widen the range or change damping"
        )
    sections = {key: cls(**values[key]) for key, cls in _SECTIONS.items()}
    top = {k: v for k, v in values.items() if k not in _SECTIONS}
    return DeviceSpec(**top, **sections, source=source)


def _check_object(data: dict, sch: dict, source: str, prefix: str) -> dict[str, Any]:
    props = sch["properties"]
    for key in data:
        if key not in props:
            raise SpecError(f"{source}: unknown field {prefix}{key}; allowed here: {', '.join(props)}")
    for key in sch.get("required", []):
        if key not in data:
            raise SpecError(f"{source}: missing required field {prefix}{key}")
    out = {}
    for key, sub in props.items():
        where = f"{prefix}{key}"
        value = data.get(key, sub.get("default"))
        if sub["type"] == "object":
            if not isinstance(value, dict):
                raise SpecError(f"{source}: field {where} must be a mapping, got {value!r}")
            out[key] = _check_object(value, sub, source, where + ".")
        else:
            out[key] = _check_scalar(value, sub, source, where)
    return out


def _check_scalar(value: Any, sub: dict, source: str, where: str) -> Any:
    kind = sub["type"]
    unit = sub.get("x-unit", "-")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{source}: field {where} must be an integer, got {value!r}")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{source}: field {where} must be a number ({unit}), got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(f"{source}: field {where} must be finite, got {value!r}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise SpecError(f"{source}: field {where} must be true or false, got {value!r}")
    elif kind == "string":
        if not isinstance(value, str):
            raise SpecError(f"{source}: field {where} must be a string, got {value!r}")
    if "not" in sub and value == sub["not"]["const"]:
        raise SpecError(f"{source}: field {where} = {value!r} is not allowed: {sub['not']['description']}")
    if "enum" in sub and value not in sub["enum"]:
        raise SpecError(f"{source}: field {where} = {value!r} is not one of {', '.join(map(str, sub['enum']))}")
    low, high = sub.get("minimum"), sub.get("maximum")
    if low is not None and value < low:
        raise SpecError(f"{source}: field {where} = {value!r} is below its minimum {low} ({unit})")
    if high is not None and value > high:
        raise SpecError(f"{source}: field {where} = {value!r} is above its maximum {high} ({unit})")
    low = sub.get("exclusiveMinimum")
    if low is not None and value <= low:
        raise SpecError(f"{source}: field {where} = {value!r} must be greater than {low} ({unit})")
    return value
