"""The `spu` command and the README example, run as a newcomer would."""

from __future__ import annotations

import os
import re
import shutil
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
