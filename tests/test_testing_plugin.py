"""The pytest plugin (driver/pytest_plugin.py), run through pytest's own ``pytester``.

Each test writes a small test file, runs pytest on it in this process (the plugin is active through
its ``pytest11`` entry point, as in a user's project) and checks the outcomes, the test ids and the
report.  One run is a subprocess: what pytest imports at start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import hypothesis  # noqa: F401 - loaded before the in-process runs, which unload what they import
import numpy as np
import pytest

import driver
import driver.linalg
import spu_emulator  # noqa: F401 - (hypothesis: its plugin imports it at the end of every run)
from driver.pytest_plugin import SpuCase, _timeline_text

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_my_solver.py"

# the inner runs: no cache directory, no plugins of this session's conftest
_ARGS = ("-p", "no:cacheprovider", "-q", "--strict-markers")


@pytest.fixture(scope="module", autouse=True)
def _warm_emulator():
    """Run both cell kinds once before the in-process runs: pytester unloads the modules a run imports,
    and numba's typing modules cannot be imported twice in one process."""
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    for preset in ("spu-8", "spu-8-lc"):
        with driver.open(preset, seed=0) as dev:
            driver.linalg.solve(dev, A, np.ones(2), t=60.0)


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=textwrap.dedent(source))
    return pytester.runpytest(*_ARGS, *args)


def _ids(result: pytest.RunResult) -> list[str]:
    """Test ids of the passed tests, from the summary of a run with ``-rA``."""
    return sorted(line.split("::", 1)[1] for line in result.outlines if line.startswith("PASSED "))


def test_marker_runs_each_preset_and_seed_with_readable_ids(pytester):
    """presets x seeds runs, ids preset-seedN, the device matches its id; an unmarked test is untouched."""
    result = _run(
        pytester,
        """
        import pytest

        @pytest.mark.spu(presets=["ideal", "spu-8"], seeds=2, overrides={"adc.bits": 10})
        def test_x(spu_device, spu_case, request):
            preset, seed = request.node.callspec.id.rsplit("-seed", 1)
            assert spu_device.info.name == preset == spu_case.preset
            assert spu_case.seed == int(seed) and spu_device.info.seed_entropy == seed
            assert spu_device.info.adc_bits == 10

        def test_plain(request):
            assert not hasattr(request.node, "callspec")
        """,
        "-rA",
    )
    result.assert_outcomes(passed=5)
    assert _ids(result) == [
        "test_plain",
        "test_x[ideal-seed0]",
        "test_x[ideal-seed1]",
        "test_x[spu-8-seed0]",
        "test_x[spu-8-seed1]",
    ]


def test_marker_forms_class_module_defaults_and_yaml_paths(pytester):
    """Seeds as a list, presets positional or as a YAML path (id: its stem), the closest marker wins,
    and the fixture without a marker runs once on spu-8 at seed 0."""
    pytester.makefile(".yaml", my_board="spec_version: 1\nname: my-board\ncells: {count: 4}\n")
    result = _run(
        pytester,
        """
        import pytest

        pytestmark = pytest.mark.spu("ideal", seeds=[5])

        def test_module_marker(spu_device):
            assert spu_device.info.name == "ideal"

        @pytest.mark.spu(presets="my_board.yaml", seeds=[3, 7])
        def test_path(spu_device):
            assert spu_device.info.cells == 4

        class TestClass:
            pytestmark = pytest.mark.spu(presets=["spu-8"])

            def test_in_class(self, spu_device):
                assert spu_device.info.name == "spu-8"
        """,
        "-rA",
    )
    result.assert_outcomes(passed=4)
    assert _ids(result) == [
        "TestClass::test_in_class[spu-8-seed0]",
        "test_module_marker[ideal-seed5]",
        "test_path[my_board-seed3]",
        "test_path[my_board-seed7]",
    ]
    result = _run(pytester, "def test_unmarked(spu_device):\n    assert spu_device.info.name == 'spu-8'\n", "-rA")
    result.assert_outcomes(passed=1)
    assert _ids(result) == ["test_unmarked[spu-8-seed0]"]


def test_command_line_beats_markers(pytester):
    """--spu-preset and --spu-seeds replace the marker's; --spu-set overrides on top of its overrides."""
    source = """
        import pytest

        @pytest.mark.spu(presets=["spu-8"], seeds=4, overrides={"adc.bits": 10, "noise.kappa0": 1e-4})
        def test_x(spu_device, spu_case):
            spec = spu_device.info.spec
            assert (spec["adc"]["bits"], spec["noise"]["kappa0"], spec["coupling"]["mismatch"]) == (6, 1e-4, 0.02)
            sources = {"adc.bits": "--spu-set", "noise.kappa0": "marker", "coupling.mismatch": "--spu-set"}
            assert spu_case.sources == sources
        """
    args = ("--spu-preset", "ideal,spu-8-lc", "--spu-seeds", "3,7", "--spu-set", "adc.bits=6")
    result = _run(pytester, source, *args, "--spu-set", "coupling.mismatch=2e-2", "-rA")
    result.assert_outcomes(passed=4)
    assert _ids(result) == [
        "test_x[ideal-seed3]",
        "test_x[ideal-seed7]",
        "test_x[spu-8-lc-seed3]",
        "test_x[spu-8-lc-seed7]",
    ]
    result = _run(pytester, "def test_y(spu_device):\n    pass\n", "--spu-seeds", "3", "-rA")
    assert _ids(result) == ["test_y[spu-8-seed0]", "test_y[spu-8-seed1]", "test_y[spu-8-seed2]"]


def test_failure_section_reproduces_the_failing_device(pytester, tmp_path):
    """A failing test's report names the device, seed, overrides, effective spec and call timeline; its
    one-line driver.open(...) gives a device that repeats the failing run bit for bit."""
    out = tmp_path / "x.json"
    result = _run(
        pytester,
        f"""
        import json
        import numpy as np
        import pytest
        import driver

        @pytest.mark.spu(presets=["ideal", "spu-8"], seeds=2, overrides={{"adc.bits": 9}})
        def test_solve(spu_device, spu_case):
            A = np.array([[2.0, 0.5], [0.5, 1.0]])
            x = driver.linalg.solve(spu_device, A, np.array([1.0, -0.5]), t=60.0)
            if spu_case.id == "spu-8-seed1":
                open({str(out)!r}, "w").write(json.dumps(x.tolist()))
                assert np.allclose(x, np.linalg.solve(A, [1.0, -0.5]), rtol=1e-9)
        """,
        "--spu-set",
        "noise.kappa0=2e-5",
    )
    result.assert_outcomes(passed=3, failed=1)
    text = result.stdout.str()
    section = text[text.index("- spu device -") :]
    expected = "driver.open('spu-8', seed=1, overrides={'adc.bits': 9, 'noise.kappa0': 2e-05})"
    assert f"reproduce: {expected}" in section
    assert "seed: 1" in section
    assert "overrides: adc.bits=9 (marker), noise.kappa0=2e-05 (--spu-set)" in section
    assert "adc: {bits: 9, range_v: 2.048" in section and "noise: {kappa0: 2.0e-05" in section
    assert "call timeline: " in section
    for call in ("load_matrix", "load_vector", "run", "read_mean"):
        assert f"  {call} " in section
    assert text.count("- spu device -") == 1  # passing tests get no section
    with eval(expected, {"driver": driver}) as dev:
        x = driver.linalg.solve(dev, np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([1.0, -0.5]), t=60.0)
    assert x.tolist() == json.loads(out.read_text())


def test_devices_are_closed_after_failures_and_errors(pytester):
    """The fixture closes its device when the test fails or raises, and when a later fixture fails."""
    result = _run(
        pytester,
        """
        import pytest

        OPENED = []

        @pytest.fixture
        def broken(spu_device):
            OPENED.append(spu_device)
            raise RuntimeError("a user's fixture fails after the device opened")

        @pytest.mark.spu(presets=["ideal"], seeds=2)
        def test_fails(spu_device):
            OPENED.append(spu_device)
            assert False

        @pytest.mark.spu(presets=["ideal"])
        def test_raises(spu_device):
            OPENED.append(spu_device)
            raise KeyError("boom")

        @pytest.mark.spu(presets=["ideal"])
        def test_setup_error(broken):
            pass

        def test_all_closed():
            assert len(OPENED) == 4 and all(dev.closed for dev in OPENED)
        """,
    )
    result.assert_outcomes(passed=1, failed=3, errors=1)
    assert result.stdout.str().count("- spu device -") == 4


def test_a_device_that_does_not_open_still_gets_the_section(pytester):
    result = _run(
        pytester,
        """
        import pytest

        @pytest.mark.spu(presets=["tcp://127.0.0.1:9"], seeds=[4])
        def test_x(spu_device):
            pass
        """,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*LinkError*", "*- spu device -*", "reproduce: driver.open('tcp://127.0.0.1:9', seed=4)"]
    )
    result.stdout.fnmatch_lines(["the device did not open (see the error above)"])


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('presets=["spu-8"], overrides={"adc.bits": 99}', "*field adc.bits = 99 is above its maximum 32*"),
        ('overrides={"adc.bitz": 9}', "*override 'adc.bitz': no such field; the fields of adc are*"),
        ('presets=["no-such-preset"]', "*no preset or file named 'no-such-preset'*"),
        ("seeds=0", "*seeds=0: give a count >= 1 or a list of seeds*"),
        ("seeds=[-1]", "*: give a count N (seeds 0..N-1) or a list of non-negative integer seeds*"),
        ("sedes=3", "*@pytest.mark.spu takes presets=, seeds= and overrides=*got sedes*"),
    ],
)
def test_bad_markers_are_collection_errors_that_say_why(pytester, marker, message):
    result = _run(pytester, f"import pytest\n\n@pytest.mark.spu({marker})\ndef test_x(spu_device):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
    assert "Traceback" not in result.stdout.str()


def test_a_marker_without_the_fixture_is_an_error(pytester):
    result = _run(pytester, "import pytest\n\n@pytest.mark.spu(seeds=2)\ndef test_x():\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.spu needs the test to take the spu_device (or spu_case) fixture*"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--spu-set", "adc.bitz=3"),
            "*--spu-set 'adc.bitz=3': no field 'adc.bitz' in the spec schema; fields: adc.*",
        ),
        (("--spu-set", "adc.bits"), "*--spu-set takes KEY=VALUE*"),
        (("--spu-seeds", "0"), "*--spu-seeds '0': give a count N >= 1*"),
        (("--spu-seeds", "x"), "*--spu-seeds 'x'*"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, message):
    result = _run(pytester, "def test_x():\n    pass\n", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_value_the_schema_refuses_from_the_command_line(pytester):
    result = _run(pytester, "def test_x(spu_device):\n    pass\n", "--spu-set", "noise.kappa0=-1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*field noise.kappa0 = -1.0 is below its minimum 0*"])


def test_start_up_imports_no_numpy_and_the_marker_is_registered(pytester):
    """pytest's start-up with the plugin loaded imports neither numpy nor torch (a conftest may still set
    BLAS threads before numpy loads), and the marker is known to --strict-markers."""
    pytester.makeconftest("import sys\nAT_START = sorted({'numpy', 'torch', 'driver.device'} & set(sys.modules))\n")
    pytester.makepyfile(
        test_user="""
        import pytest
        from conftest import AT_START

        def test_start_up(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("spu")
            assert AT_START == []

        @pytest.mark.spu(presets=["ideal"])
        def test_marked(spu_device):
            pass
        """
    )
    result = pytester.runpytest_subprocess(*_ARGS, "-W", "error::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=2)
    result = pytester.runpytest(*_ARGS, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.spu(presets=*"])


def test_the_example_runs_its_three_tests_and_finds_the_adc_width(pytester):
    """examples/test_my_solver.py as a user runs it: 9 + 2 device cases and the hypothesis search,
    which prints the shrunk counterexample; then tightened from the command line, where the absolute
    tolerance fails on some devices and the relative property holds."""
    result = pytester.runpytest_subprocess(*_ARGS, str(EXAMPLE), "-rA")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["shrunk counterexample: SpecVariant('spu-8', overrides={'adc.bits': 4})*"])
    assert "test_my_solver.py::test_refined_solve_meets_its_tolerance[spu-8-lc-seed2]" in result.stdout.str()
    tight = ("--spu-set", "coupling.mismatch=0.05", "--spu-set", "adc.bits=8", "-k", "not adc_width")
    result = pytester.runpytest(*_ARGS, str(EXAMPLE), *tight)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] + outcomes["failed"] == 11 and outcomes["failed"] >= 1
    assert "test_refinement_gains_a_factor_of_ten" not in "".join(line for line in result.outlines if "FAILED" in line)
    result.stdout.fnmatch_lines(["overrides: coupling.mismatch=0.05 (--spu-set), adc.bits=8 (--spu-set)"])


def test_long_timelines_are_cut_in_the_middle():
    class Record:
        call, wall_time_s, discarded = "run", 1e-3, False
        device_time = driver.DeviceTime(analog_s=2e-3)

    lines = _timeline_text([Record()] * 100)
    assert lines[0] == "call timeline: 100 calls, 200 ms on the hardware (timing model), 100 ms in the emulator"
    assert len(lines) == 1 + 10 + 1 + 30 and lines[11] == "    ... 60 calls not shown ..."
    assert lines[1].split() == ["1", "run", "device", "2", "ms", "wall", "1", "ms"]
    assert lines[-1].split()[0] == "100"


def test_case_reproduce_line_and_open():
    case = SpuCase("spu-8", 3, {"adc.bits": 9})
    assert case.id == "spu-8-seed3"
    assert case.reproduce == "driver.open('spu-8', seed=3, overrides={'adc.bits': 9})"
    with case.open() as dev:
        assert dev.info.adc_bits == 9 and dev.info.seed_entropy == "3"
    assert SpuCase({"spec_version": 1, "name": "mine"}, 0).id == "mine-seed0"


def test_the_plugin_is_registered_by_the_installed_package():
    """The pytest11 entry point (pyproject.toml) names this module."""
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("spu") == "driver.pytest_plugin"
    code = (
        "import sys, driver.pytest_plugin; print(sorted({'numpy', 'torch', 'hypothesis', 'yaml'} & set(sys.modules)))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
