"""pytest plugin: run a test against device variants (active once spu-emulator is installed).

    @pytest.mark.spu(presets=["ideal", "spu-8"], seeds=3, overrides={"adc.bits": 10})
    def test_solve(spu_device):           # runs 6 times: test_solve[ideal-seed0] ... [spu-8-seed2]
        x = driver.linalg.solve(spu_device, A, b)
        assert np.linalg.norm(x - x_true) < 1e-2 * np.linalg.norm(x_true)

Fixtures: ``spu_device``, an open :class:`driver.Device` for one (preset, seed) of the test's
``spu`` marker, closed after the test whatever its outcome; ``spu_case``, the :class:`SpuCase`
behind it (preset, seed, overrides; ``case.open()`` opens another device just like it).  A test
that requests either without a marker runs once on ``spu-8`` at seed 0.

Marker ``@pytest.mark.spu(presets=..., seeds=..., overrides=...)`` (on a test, class or module;
the closest one counts): presets, a preset name, YAML path or spec mapping, or a list of them
(default ``["spu-8"]``); seeds, a count N (seeds 0..N-1) or a list of seeds (default 1); overrides,
dotted fields of ``firmware_spec/schema.yaml`` (``{"adc.bits": 10}``) applied to every preset.
A marker or command-line value the schema refuses is a collection error that names the field.

Command line (beats the markers for the whole run, so a CI matrix can tighten the device):
``--spu-preset SPEC`` (repeat or comma-separate) replaces every test's presets, ``--spu-seeds N``
(or ``--spu-seeds 3,7``) its seeds, and ``--spu-set KEY=VALUE`` (repeatable; the value read as
YAML, as by ``spu info --set``) is applied over its overrides.

A failing test's report gets a section "spu device": the line that opens the same device, the seed,
the overrides and where each came from, the device's effective spec and its call timeline
(``Device.timeline``).

This module imports only pytest at start-up: numpy, numba and the emulator load when a test that
uses the plugin runs (tests without the marker and fixtures are untouched).  Hypothesis
strategies for device variants are in :mod:`driver.testing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = ["SpuCase", "spu_case", "spu_device"]

DEFAULT_PRESETS = ("spu-8",)
MARKER_HELP = (
    "spu(presets=['spu-8'], seeds=1, overrides=None): run the test once per preset x seed with the"
    " spu_device fixture (driver.pytest_plugin); --spu-preset, --spu-seeds and --spu-set beat it"
)
# calls shown at each end of a long timeline in the failure section
_TIMELINE_HEAD, _TIMELINE_TAIL = 10, 30

_CASE_KEY = pytest.StashKey["SpuCase"]()
_DEVICE_KEY = pytest.StashKey[Any]()
_OPTIONS_KEY = pytest.StashKey["_Options"]()


@dataclass(frozen=True)
class SpuCase:
    """One device a test runs on: a preset (name, YAML path or spec mapping), a seed and overrides.

    ``sources`` says where each override came from ("marker" or "--spu-set").  ``open()`` gives a new
    device equal to the one the ``spu_device`` fixture opened, call for call; ``reproduce`` is the
    same as one line of code.
    """

    preset: str | dict[str, Any]
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The test id part: ``spu-8-seed1`` (a path by its stem, a mapping by its name)."""
        return f"{_preset_label(self.preset)}-seed{self.seed}"

    @property
    def reproduce(self) -> str:
        """``driver.open('spu-8', seed=1, overrides={'adc.bits': 10})``."""
        extra = f", overrides={self.overrides!r}" if self.overrides else ""
        return f"driver.open({self.preset!r}, seed={self.seed}{extra})"

    def open(self):
        """A new open device for this case (``driver.open(preset, seed=..., overrides=...)``)."""
        import driver

        return driver.open(self.preset, seed=self.seed, overrides=self.overrides or None)

    def effective_spec(self) -> dict[str, Any]:
        """The spec the device gets, checked by the spec loader (raises driver.SpecError naming the field)."""
        from driver.transport import effective_spec

        return effective_spec(self.preset, self.overrides or None)


@dataclass(frozen=True)
class _Options:
    presets: tuple[str, ...] | None
    seeds: tuple[int, ...] | None
    overrides: dict[str, Any]


# -- hooks ---------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("spu", "SPU device variants (driver.pytest_plugin; beat @pytest.mark.spu)")
    group.addoption(
        "--spu-preset",
        action="append",
        default=None,
        metavar="SPEC",
        help="run every spu test on this device instead of its marker's presets: a preset name"
        " (ideal, spu-8, ...) or a YAML path; repeat or comma-separate for several",
    )
    group.addoption(
        "--spu-seeds",
        default=None,
        metavar="N|LIST",
        help="device seeds of every spu test instead of its marker's: a count N (seeds 0..N-1) or a comma list (3,7)",
    )
    group.addoption(
        "--spu-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one spec field by its dotted path in firmware_spec/schema.yaml for every spu test,"
        " over its marker's overrides (repeatable), e.g. --spu-set adc.bits=10",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.stash[_OPTIONS_KEY] = _Options(
        presets=_parse_presets(config.getoption("spu_preset")),
        seeds=_parse_seeds(config.getoption("spu_seeds")),
        overrides=_parse_sets(config.getoption("spu_set")),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("spu")
    uses = "spu_case" in metafunc.fixturenames
    if marker is None and not uses:
        return
    if not uses:
        _refuse(
            f"{metafunc.definition.nodeid}: @pytest.mark.spu needs the test to take the spu_device (or spu_case)"
            " fixture; without it the marker does nothing"
        )
    cases = _cases(marker, metafunc.config.stash[_OPTIONS_KEY], metafunc.definition.nodeid)
    metafunc.parametrize("spu_case", cases, indirect=True, ids=[case.id for case in cases])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    case = item.stash.get(_CASE_KEY, None)
    if not report.failed or case is None:
        return
    text = _failure_section(case, item.stash.get(_DEVICE_KEY, None))
    if hasattr(report.longrepr, "addsection"):
        report.longrepr.addsection("spu device", text)  # printed under the traceback, kept in junit XML
    else:
        report.sections.append(("spu device", text))


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def spu_case(request: pytest.FixtureRequest) -> SpuCase:
    """The (preset, seed, overrides) this run of the test is for: the ``spu`` marker's, as changed
    by ``--spu-preset``, ``--spu-seeds`` and ``--spu-set``."""
    case = getattr(request, "param", None)
    if case is None:  # requested by getfixturevalue: not parametrised, take the first case
        marker = request.node.get_closest_marker("spu")
        case = _cases(marker, request.config.stash[_OPTIONS_KEY], request.node.nodeid)[0]
    request.node.stash[_CASE_KEY] = case
    return case


@pytest.fixture
def spu_device(spu_case: SpuCase, request: pytest.FixtureRequest):
    """An open :class:`driver.Device` for ``spu_case``; closed after the test, passed or failed."""
    device = spu_case.open()
    request.node.stash[_DEVICE_KEY] = device
    try:
        yield device
    finally:
        device.close()


# -- cases ---------------------------------------------------------------------------------------
def _cases(marker: pytest.Mark | None, options: _Options, where: str) -> list[SpuCase]:
    kwargs = dict(marker.kwargs) if marker is not None else {}
    args = tuple(marker.args) if marker is not None else ()
    unknown = sorted(set(kwargs) - {"presets", "seeds", "overrides"})
    if unknown or (args and "presets" in kwargs):
        _refuse(
            f"{where}: @pytest.mark.spu takes presets=, seeds= and overrides= (presets may be given"
            f" positionally instead), got {', '.join(unknown) or 'presets twice'}"
        )
    presets = kwargs.get("presets", list(args) or list(DEFAULT_PRESETS))
    if isinstance(presets, (str, Path, dict)):
        presets = [presets]
    presets = [str(p) if isinstance(p, Path) else p for p in presets]
    if options.presets is not None:
        presets = list(options.presets)
    seeds = _marker_seeds(kwargs.get("seeds", 1), where) if options.seeds is None else options.seeds
    marked = kwargs.get("overrides") or {}
    if not isinstance(marked, dict):
        _refuse(f"{where}: @pytest.mark.spu overrides= must be a dict of dotted paths, got {marked!r}")
    overrides = {**marked, **options.overrides}
    sources = {key: "--spu-set" if key in options.overrides else "marker" for key in overrides}
    if not presets or not seeds:
        _refuse(f"{where}: @pytest.mark.spu needs at least one preset and one seed")
    for preset in presets:
        _check_spec(preset, overrides, where)
    return [SpuCase(preset, seed, dict(overrides), dict(sources)) for preset in presets for seed in seeds]


def _check_spec(preset: Any, overrides: dict[str, Any], where: str) -> None:
    """Refuse at collection a preset or override the spec loader refuses (its message names the field)."""
    if isinstance(preset, str) and preset.startswith("tcp://"):
        return  # a served device's spec is its server's; driver.open refuses overrides for it
    from driver import SpecError
    from driver.transport import effective_spec

    try:
        effective_spec(preset, overrides or None)
    except SpecError as exc:
        _refuse(f"{where}: spu device {_preset_label(preset)!r}: {exc}")


def _marker_seeds(seeds: Any, where: str) -> tuple[int, ...]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            _refuse(f"{where}: @pytest.mark.spu seeds={seeds}: give a count >= 1 or a list of seeds")
        return tuple(range(seeds))
    try:
        out = tuple(seeds)
    except TypeError:
        out = ()
    if not out or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in out):
        _refuse(
            f"{where}: @pytest.mark.spu seeds={seeds!r}: give a count N (seeds 0..N-1) or a list of"
            " non-negative integer seeds"
        )
    return out


def _refuse(message: str) -> NoReturn:
    """A marker the plugin cannot use: a collection error with just the message (no traceback)."""
    pytest.fail(message, pytrace=False)


def _preset_label(preset: Any) -> str:
    if isinstance(preset, dict):
        return str(preset.get("name", "spec"))
    text = str(preset)
    if text.endswith((".yaml", ".yml")):
        return Path(text).stem
    return text


# -- command line --------------------------------------------------------------------------------
def _parse_presets(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    out = tuple(part.strip() for value in values for part in value.split(",") if part.strip())
    if not out:
        raise pytest.UsageError(f"--spu-preset {values!r}: give a preset name or YAML path")
    return out


def _parse_seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        parts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parts = []
    if "," not in text and len(parts) == 1:
        parts = list(range(parts[0])) if parts[0] >= 1 else []
    if not parts or any(seed < 0 for seed in parts):
        raise pytest.UsageError(
            f"--spu-seeds {text!r}: give a count N >= 1 (seeds 0..N-1) or a comma list of seeds (3,7)"
        )
    return tuple(parts)


def _parse_sets(values: list[str]) -> dict[str, Any]:
    """``["adc.bits=10", "noise.kappa0=1e-3"]`` -> ``{"adc.bits": 10, "noise.kappa0": 0.001}``; the
    paths are checked against the schema here (the values by the spec loader at collection)."""
    if not values:
        return {}
    import yaml

    fields = _schema_fields()
    out: dict[str, Any] = {}
    for text in values:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise pytest.UsageError(
                f"--spu-set takes KEY=VALUE with a dotted field path, e.g. adc.bits=10; got {text!r}"
            )
        if key not in fields:
            near = [name for name in fields if name.split(".")[0] == key.split(".")[0]] or fields
            raise pytest.UsageError(
                f"--spu-set {text!r}: no field {key!r} in the spec schema; fields: {', '.join(near)}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as text; the spec loader reads it as a number
            try:
                value = float(value)
            except ValueError:
                pass
        elif isinstance(value, (dict, list)) or value is None:
            value = raw
        out[key] = value
    return out


def _schema_fields() -> list[str]:
    """Dotted paths of the settable fields of ``firmware_spec/schema.yaml`` (read without the emulator)."""
    import yaml

    from driver.protocol import SPEC_DIR

    schema = yaml.safe_load((SPEC_DIR / "schema.yaml").read_text())
    out: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, sub in node["properties"].items():
            if sub.get("type") == "object":
                walk(sub, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}")

    walk(schema, "")
    return out


# -- the failure section -------------------------------------------------------------------------
def _failure_section(case: SpuCase, device: Any) -> str:
    lines = [f"reproduce: {case.reproduce}"]
    seed_note = f"seed: {case.seed}"
    if device is not None and device.info.seed_entropy != str(case.seed):
        seed_note += f" (device seed entropy {device.info.seed_entropy})"
    lines.append(seed_note)
    if case.overrides:
        lines.append(
            "overrides: "
            + ", ".join(f"{key}={value!r} ({case.sources.get(key, 'marker')})" for key, value in case.overrides.items())
        )
    spec = None
    if device is not None:
        spec = device.info.spec
    else:
        lines.append("the device did not open (see the error above)")
        try:
            spec = case.effective_spec()
        except Exception:  # noqa: BLE001 - the report must not fail; the error above says why
            spec = None
    if spec is not None:
        lines.append("effective spec:")
        lines.extend("    " + line for line in _spec_text(spec).splitlines())
    if device is not None:
        lines.extend(_timeline_text(device.timeline))
    return "\n".join(lines)


def _spec_text(spec: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100).rstrip()


def _timeline_text(timeline: list[Any]) -> list[str]:
    if not timeline:
        return ["call timeline: no calls"]
    device_s = sum(record.device_time.total_s for record in timeline)
    wall_s = sum(record.wall_time_s for record in timeline)
    lines = [
        f"call timeline: {len(timeline)} calls, {_seconds(device_s)} on the hardware (timing model),"
        f" {_seconds(wall_s)} in the emulator"
    ]
    shown = list(enumerate(timeline, 1))
    if len(shown) > _TIMELINE_HEAD + _TIMELINE_TAIL:
        skipped = len(shown) - _TIMELINE_HEAD - _TIMELINE_TAIL
        shown = shown[:_TIMELINE_HEAD] + [(None, skipped)] + shown[-_TIMELINE_TAIL:]
    for index, record in shown:
        if index is None:
            lines.append(f"    ... {record} calls not shown ...")
            continue
        flag = "  (discarded: saturated)" if record.discarded else ""
        lines.append(
            f"    {index:>4}  {record.call:<12} device {_seconds(record.device_time.total_s):>9}"
            f"  wall {_seconds(record.wall_time_s):>9}{flag}"
        )
    return lines


def _seconds(value: float) -> str:
    if value != value:  # NaN: the device did not report
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns" if value else "0 s"
