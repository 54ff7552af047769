"""The `spu` command and the README example, run as a newcomer would."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import driver
from driver.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _spu_script() -> str:
    """The installed console script: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "spu"
    found = str(beside) if beside.is_file() else shutil.which("spu")
    if found is None:
        pytest.fail("the `spu` console script is not installed; run pip install -e '.[test]'")
    return found


def _demo_numbers(out: str) -> dict:
    """The table and the three summary numbers of `spu demo`'s output."""
    rows = re.findall(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s*$", out, flags=re.MULTILINE)
    error = re.search(r"relative error\s+([0-9.eE+-]+)", out)
    analog = re.search(r"analog time\s+([0-9.eE+-]+) tau", out)
    wall = re.search(r"wall time\s+([0-9.eE+-]+) s", out)
    assert error and analog and wall, out
    return {
        "rows": [(int(i), float(spu), float(ref)) for i, spu, ref in rows],
        "error": float(error.group(1)),
        "analog": float(analog.group(1)),
        "wall": float(wall.group(1)),
    }


def _check_demo(out: str, n: int, bound: float) -> None:
    numbers = _demo_numbers(out)
    assert re.search(r"\bSPU\b", out) and "numpy" in out
    assert [row[0] for row in numbers["rows"]] == list(range(n))
    spu = np.array([row[1] for row in numbers["rows"]])
    ref = np.array([row[2] for row in numbers["rows"]])
    # the printed error is the error of the printed table (to its 6 decimals)
    assert numbers["error"] == pytest.approx(np.linalg.norm(spu - ref) / np.linalg.norm(ref), rel=0.01, abs=1e-5)
    assert numbers["error"] < bound
    assert numbers["analog"] > 0 and numbers["wall"] > 0


def test_demo(capsys):
    """`spu demo`: the table beside numpy, relative error < 0.1 on spu-8, analog and wall time."""
    assert main(["demo"]) == 0
    _check_demo(capsys.readouterr().out, n=8, bound=0.1)


def test_demo_on_ideal(capsys):
    assert main(["demo", "--preset", "ideal", "--n", "16", "--cond", "10"]) == 0
    _check_demo(capsys.readouterr().out, n=16, bound=1e-5)


def test_installed_console_script_runs_the_demo():
    """The README's quick start: the `spu` entry point, in a fresh process."""
    child = subprocess.run(
        [_spu_script(), "demo"], capture_output=True, text=True, timeout=300, cwd=ROOT.parent, env=dict(os.environ)
    )
    assert child.returncode == 0, child.stderr
    _check_demo(child.stdout, n=8, bound=0.1)


def test_info(capsys):
    assert main(["info", "spu-8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spu-8:")
    assert re.search(r"^\s*cells\s+8 \(rc\)$", out, flags=re.MULTILINE), out
    assert re.search(r"^\s*rails\s+\+-2\.4 V$", out, flags=re.MULTILINE), out


def _printed_array(out: str) -> np.ndarray:
    body = out[out.index("[") + 1 : out.index("]")]
    return np.array([float(v) for v in body.split()])


def test_solve(tmp_path, capsys):
    """`spu solve` with .npy files prints x close to numpy's (spu-8 error budget: see test_ideal)."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a = q @ np.diag(np.geomspace(1.0, 4.0, 6)) @ q.T
    b = rng.standard_normal(6)
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "b.npy", b)
    out_file = tmp_path / "x.npy"
    argv = ["solve", "spu-8", "--matrix", str(tmp_path / "A.npy"), "--vector", str(tmp_path / "b.npy")]
    assert main([*argv, "--t", "200", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    x = _printed_array(out)
    reference = np.linalg.solve(a, b)
    assert np.linalg.norm(x - reference) / np.linalg.norm(reference) < 0.1
    assert np.allclose(np.load(out_file), x, rtol=1e-5, atol=1e-6)  # printed to 6 digits
    assert re.search(r"analog time 200 tau", out)


def test_solve_on_ideal_is_exact(tmp_path, capsys):
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([1.0, 0.5])
    np.save(tmp_path / "A.npy", a)
    np.save(tmp_path / "b.npy", b)
    argv = ["solve", "ideal", "--matrix", str(tmp_path / "A.npy"), "--vector", str(tmp_path / "b.npy")]
    assert main([*argv, "--out", str(tmp_path / "x.npy")]) == 0
    capsys.readouterr()
    assert np.allclose(np.load(tmp_path / "x.npy"), np.linalg.solve(a, b), rtol=1e-9)


@pytest.mark.parametrize(
    "argv", [["info", "no-such-board"], ["demo", "--preset", "no-such-board"], ["solve", "no-such-board"]]
)
def test_bad_preset_name(argv, tmp_path, capsys):
    """A bad preset name: exit code 2 and an error on stderr that names it; nothing on stdout."""
    if argv[0] == "solve":
        a, b = tmp_path / "A.npy", tmp_path / "b.npy"
        np.save(a, np.eye(2))
        np.save(b, np.ones(2))
        argv = [*argv, "--matrix", str(a), "--vector", str(b)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err and "no-such-board" in captured.err
    assert "spu-8" in captured.err  # the presets it could have been


def test_bad_preset_name_through_the_console_script():
    child = subprocess.run([_spu_script(), "info", "no-such-board"], capture_output=True, text=True, timeout=120)
    assert child.returncode == 2
    assert "no-such-board" in child.stderr and "Traceback" not in child.stderr


@pytest.mark.parametrize(
    "problem, matrix, vector",
    [
        ("missing file", None, np.ones(2)),
        ("not symmetric", np.array([[1.0, 0.5], [0.0, 1.0]]), np.ones(2)),
        ("NaN", np.array([[1.0, np.nan], [np.nan, 1.0]]), np.ones(2)),
    ],
)
def test_solve_with_bad_input(problem, matrix, vector, tmp_path, capsys):
    """Bad input to `spu solve` exits with 2 and a one-line error, never a traceback."""
    if matrix is not None:
        np.save(tmp_path / "A.npy", matrix)
    np.save(tmp_path / "b.npy", vector)
    argv = ["solve", "spu-8", "--matrix", str(tmp_path / "A.npy"), "--vector", str(tmp_path / "b.npy")]
    assert main(argv) == 2, problem
    err = capsys.readouterr().err
    assert err.startswith("spu solve: error:") and err.count("\n") == 1


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


# -- packaging: version, python -m driver, typing markers, licence -------------------------------------


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _installed_version() -> str:
    from importlib.metadata import version

    return version("spu-emulator")


def test_version_attributes_come_from_the_package_metadata():
    import spu_emulator

    assert driver.__version__ == spu_emulator.__version__ == _installed_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", driver.__version__)


@pytest.mark.parametrize("launcher", ["console script", "python -m driver"])
def test_version_option(launcher):
    """`spu --version` and `python -m driver --version`: one line, the installed version, exit 0."""
    command = [_spu_script()] if launcher == "console script" else [sys.executable, "-m", "driver"]
    child = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120, cwd=ROOT.parent)
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"spu {_installed_version()}\n"


def test_python_m_driver_runs_the_cli():
    child = subprocess.run(
        [sys.executable, "-m", "driver", "info", "ideal", "--json"], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout)["name"] == "ideal"
    usage = subprocess.run([sys.executable, "-m", "driver", "demo", "--n", "0"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--n" in usage.stderr and usage.stdout == ""


def test_typing_markers_and_licence():
    """py.typed in both packages (PEP 561), and the Apache-2.0 licence pyproject names, as metadata."""
    from importlib.metadata import metadata

    import spu_emulator

    for package in (driver, spu_emulator):
        assert (Path(package.__file__).parent / "py.typed").is_file()
    pyproject = _pyproject()
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["driver"] and "py.typed" in package_data["spu_emulator"]
    assert pyproject["project"]["license"] == "Apache-2.0" and pyproject["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    fields = metadata("spu-emulator")
    assert fields["License-Expression"] == "Apache-2.0" and "LICENSE" in fields.get_all("License-File")


def test_all_extra_unions_the_others():
    extras = _pyproject()["project"]["optional-dependencies"]
    (union,) = extras["all"]
    named = set(re.fullmatch(r"spu-emulator\[([a-z,]+)\]", union).group(1).split(","))
    assert named == set(extras) - {"all"}
    assert "torch==2.13.0" in extras["torch"]  # the exact pin (a looser one pulls a CUDA build)


# -- --json, input formats, --engine, --t auto ----------------------------------------------------------

_RUN_REPORT_KEYS = {f.name for f in dataclasses.fields(driver.RunReport)}


def _json_out(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out)


def test_info_json(capsys):
    """`spu info --json`: the fields of DeviceInfo, as the help lists them; null for 'no rails'."""
    data = _json_out(capsys, ["info", "ideal"])
    assert set(data) == {f.name for f in dataclasses.fields(driver.DeviceInfo)}
    with driver.open("ideal", seed=0) as dev:
        assert data["cells"] == dev.info.cells and data["spec"] == json.loads(json.dumps(dev.info.spec))
    assert data["rail_v"] is None
    assert _json_out(capsys, ["info", "spu-8"])["rail_v"] == 2.4
    help_text = _help(capsys, "info")
    assert all(key in help_text for key in data)  # every key documented in --help


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    return capsys.readouterr().out


def _system(tmp_path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    a = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.5]])
    b = np.array([1.0, 0.5, -0.75])
    paths = [tmp_path / f"A{suffix}", tmp_path / f"b{suffix}"]
    for path, value in zip(paths, (a, b), strict=True):
        if suffix == ".npy":
            np.save(path, value)
        else:
            np.savetxt(path, value, delimiter="," if suffix == ".csv" else " ")
    return a, b, ["--matrix", str(paths[0]), "--vector", str(paths[1])]


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".txt"])
def test_solve_reads_npy_csv_txt(suffix, tmp_path, capsys):
    """The same system from each format gives numpy's answer on ideal; --json has the documented keys."""
    a, b, files = _system(tmp_path, suffix)
    data = _json_out(capsys, ["solve", "ideal", *files, "--out", str(tmp_path / f"x{suffix}")])
    assert set(data) == {"x", "device", "seed", "t", "burn_in", "engine", "report"}
    assert set(data["report"]) == _RUN_REPORT_KEYS
    assert set(data["report"]["device_time"]) >= {"link_s", "program_s", "analog_s", "convert_s", "total_s"}
    assert (data["device"], data["seed"], data["t"], data["burn_in"], data["engine"]) == (
        "ideal",
        0,
        200.0,
        None,
        "auto",
    )
    assert np.allclose(data["x"], np.linalg.solve(a, b), rtol=1e-9)
    written = tmp_path / f"x{suffix}"
    saved = np.load(written) if suffix == ".npy" else np.loadtxt(written, delimiter="," if suffix == ".csv" else None)
    assert np.array_equal(saved, data["x"])
    help_text = _help(capsys, "solve")
    assert all(key in help_text for key in [*data, *data["report"]])


def test_solve_csv_in_one_row_and_several_right_hand_sides(tmp_path, capsys):
    a, b, files = _system(tmp_path, ".csv")
    (tmp_path / "b.csv").write_text(",".join(str(v) for v in b) + "\n")  # b as one row
    assert np.allclose(_json_out(capsys, ["solve", "ideal", *files])["x"], np.linalg.solve(a, b), rtol=1e-9)
    np.savetxt(tmp_path / "B.csv", np.column_stack([b, -2 * b]), delimiter=",")
    data = _json_out(capsys, ["solve", "ideal", "--matrix", files[1], "--vector", str(tmp_path / "B.csv")])
    assert np.allclose(data["x"], np.linalg.solve(a, np.column_stack([b, -2 * b])), rtol=1e-9)
    assert isinstance(data["report"], list) and len(data["report"]) == 2


def test_solve_engine_burn_in_and_auto_time(tmp_path, capsys):
    a, b, files = _system(tmp_path, ".txt")
    with driver.open("ideal", seed=0) as dev:
        rate = dev.info.sample_rate  # ADC samples per tau
    for engine in ("transient", "exact"):
        data = _json_out(capsys, ["solve", "ideal", *files, "--engine", engine, "--t", "40", "--burn-in", "30"])
        assert data["engine"] == data["report"]["engine"] == engine and data["burn_in"] == 30.0
        assert data["report"]["samples"] == pytest.approx(10 * rate, abs=2)  # taken in the 10 tau after burn-in
    data = _json_out(capsys, ["solve", "ideal", *files, "--t", "auto"])
    assert data["t"] == "auto" and data["report"]["analog_time"] > 0
    reference = np.linalg.solve(a, b)
    assert np.linalg.norm(data["x"] - reference) / np.linalg.norm(reference) < 2e-3  # auto: 1e-3 of the offset


def test_demo_json(capsys):
    data = _json_out(capsys, ["demo", "--preset", "ideal", "--n", "4", "--cond", "10"])
    keys = {"device", "cells", "n", "cond", "seed", "x", "reference", "relative_error", "wall_s"}
    assert set(data) == keys | {"t", "burn_in", "engine", "report"}
    assert set(data["report"]) == _RUN_REPORT_KEYS
    assert data["relative_error"] < 1e-5 and len(data["x"]) == len(data["reference"]) == data["n"] == 4
    x, reference = np.array(data["x"]), np.array(data["reference"])
    assert data["relative_error"] == pytest.approx(np.linalg.norm(x - reference) / np.linalg.norm(reference))
    help_text = _help(capsys, "demo")
    assert all(key in help_text for key in data)


def test_a_warning_is_one_line_on_stderr(tmp_path, capsys):
    """A run too short for the matrix: SettlingWarning as `spu solve: warning: ...`, exit 0."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    np.save(tmp_path / "A.npy", q @ np.diag([1.0, 10.0, 100.0, 1000.0]) @ q.T)
    np.save(tmp_path / "b.npy", np.ones(4))
    argv = ["solve", "ideal", "--matrix", str(tmp_path / "A.npy"), "--vector", str(tmp_path / "b.npy"), "--t", "10"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("spu solve: warning:") and err.count("\n") == 1


# -- exit codes and usage errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["demo", "--cond", "0.5"], "--cond"),
        (["demo", "--cond", "nan"], "--cond"),
        (["demo", "--n", "0"], "--n"),
        (["demo", "--n", "2.5"], "--n"),
        (["demo", "--t", "0"], "--t"),
        (["demo", "--t", "-inf"], "--t"),
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--engine", "fast"], "--engine"),
        (["solve", "ideal", "--matrix", "A.npy", "--vector", "b.npy", "--burn-in", "-1"], "--burn-in"),
        (["serve", "ideal", "--port", "70000"], "--port"),
        (["serve", "ideal", "--idle-timeout", "0"], "--idle-timeout"),
        (["sweep", "s.yaml", "--out", "o", "--workers", "0"], "--workers"),
        (["info", "ideal", "--json", "--yaml"], "--yaml"),
    ],
)
def test_argument_out_of_range_is_a_usage_error(argv, option, capsys):
    """A value out of range: exit 2 before any work, the option and the value seen on stderr."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and option in captured.err and "error" in captured.err


@pytest.mark.parametrize(
    "problem, text, suffix, message",
    [
        ("unknown type", "1 2", ".dat", ".npy, .csv"),
        ("not numbers", "a,b\nc,d\n", ".csv", "cannot be read"),
        ("ragged", "1 2\n3\n", ".txt", "cannot be read"),
        ("a pickle", None, ".npy", "cannot be read"),
    ],
)
def test_unreadable_input_file_exits_2(problem, text, suffix, message, tmp_path, capsys):
    matrix = tmp_path / f"A{suffix}"
    if text is None:
        np.save(matrix, np.array([{"a": 1}], dtype=object))
    else:
        matrix.write_text(text)
    np.save(tmp_path / "b.npy", np.ones(2))
    assert main(["solve", "ideal", "--matrix", str(matrix), "--vector", str(tmp_path / "b.npy")]) == 2, problem
    err = capsys.readouterr().err
    assert err.startswith("spu solve: error: --matrix") and message in err and err.count("\n") == 1


def test_out_file_is_checked_before_the_run(tmp_path, capsys):
    _, _, files = _system(tmp_path, ".npy")
    assert main(["solve", "ideal", *files, "--out", str(tmp_path / "x.json")]) == 2
    assert ".npy, .csv" in capsys.readouterr().err
    assert main(["solve", "ideal", *files, "--out", str(tmp_path / "no-dir" / "x.npy")]) == 2
    assert "no-dir" in capsys.readouterr().err


def test_device_failure_exits_1(tmp_path, capsys):
    """The work failed, not the command line: the array saturates on an indefinite A; no server listens."""
    np.save(tmp_path / "A.npy", np.diag([1.0, -1.0]))
    np.save(tmp_path / "b.npy", np.ones(2))
    argv = ["solve", "ideal", "--matrix", str(tmp_path / "A.npy"), "--vector", str(tmp_path / "b.npy")]
    assert main([*argv, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("spu solve: error:") and "positive definite" in captured.err
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["info", f"tcp://127.0.0.1:{port}"]) == 1
    assert "spu serve" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["info", "solve", "demo", "serve"])
def test_help_lists_every_preset(command, capsys):
    """The presets in --help are read from firmware_spec/, so a new preset file shows up by itself."""
    from spu_emulator.spec import preset_names

    text = " ".join(_help(capsys, command).split())  # argparse wraps lines
    assert all(name in text for name in preset_names()), text
    assert "spu-8-lc" in preset_names()


# -- the README ----------------------------------------------------------------------------------------


def _readme_block(heading: str) -> str:
    """The first ```python block under the README's ``heading`` section."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def test_readme_use_example_runs(capsys):
    """The python code under "## Use" runs as written, and its answers are what the README says."""
    code = _readme_block("## Use")
    assert "driver.open" in code
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md (## Use)", "exec"), namespace)
    assert capsys.readouterr().out  # it prints x and the report
    a, b, x = namespace["A"], namespace["b"], namespace["x"]
    assert x.shape == b.shape
    assert np.linalg.norm(x - np.linalg.solve(a, b)) / np.linalg.norm(np.linalg.solve(a, b)) < 0.1
    assert isinstance(namespace["report"], driver.RunReport)
