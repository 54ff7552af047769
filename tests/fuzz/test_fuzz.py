"""Runs the atheris harness of ``tests/fuzz/fuzz_wire.py`` on the frame decoder and the firmware's checks.

A short run in the default suite keeps the harness working; ``-m slow`` runs each target for 60 s of
coverage-guided fuzzing (about 300,000 frames and 100,000 command sequences on 2 cores) and expects
no finding.  Needs atheris (``pip install "spu-emulator[fuzz]"``, used by CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("fuzz_wire.py")


def _fuzz(target: str, tmp_path: Path, *flags: str) -> str:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            target,
            *flags,
            f"-artifact_prefix={tmp_path}/",
            "-rss_limit_mb=2048",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    crashes = sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(("crash-", "timeout-", "oom-")))
    assert done.returncode == 0 and not crashes, f"{target}: {crashes}\n{output[-4000:]}"
    assert "Done " in output, output[-2000:]
    return output


@pytest.mark.parametrize("target", ["frame", "firmware"])
def test_the_fuzz_harness_runs(target, tmp_path):
    _fuzz(target, tmp_path, "-runs=300", "-seed=1")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["frame", "firmware"])
def test_fuzzing_for_a_minute_finds_nothing(target, tmp_path):
    output = _fuzz(target, tmp_path, "-max_total_time=60", "-timeout=20")
    runs = int(output.rsplit("Done ", 1)[1].split()[0])
    assert runs > 10_000, output[-2000:]  # it fuzzed, rather than stalling on one input
