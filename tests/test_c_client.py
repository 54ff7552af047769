"""examples/c_client: a C host written from PROTOCOL.md alone gets, from ``spu serve spu-8 --seed 0``, the
READ_MEAN codes the Python driver's transport and the in-process device get for the same commands, bit for bit."""

from __future__ import annotations

import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from driver.protocol import Opcode, Status
from driver.tcp import TcpTransport, parse_url
from spu_emulator import Firmware, load_spec

CLIENT = Path(__file__).resolve().parent.parent / "examples" / "c_client" / "client.c"
GCC = shutil.which("gcc")

pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed: the C client cannot be built")


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("c_client") / "spu_client"
    build = subprocess.run(
        [GCC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(binary), str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    return binary


@pytest.fixture(scope="module")
def served():
    """``spu serve spu-8 --seed 0`` on a free loopback port; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "driver", "serve", "spu-8", "--seed", "0", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, url, log = time.monotonic() + 60.0, None, []
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stderr], [], [], 1.0)
            if ready:
                line = process.stderr.readline()
                log.append(line)
                found = re.search(r"on (tcp://\S+)", line)
                url = found.group(1) if found else None
        assert url is not None, f"spu serve did not say where it listens: {''.join(log)}"
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _parse(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in output.splitlines()}


def _same_calls(request, shown: dict[str, list[str]]) -> np.ndarray:
    """The client's commands, as it printed them, through ``request(opcode, payload)``; the mean codes."""
    matrix = np.array([int(code) for code in shown["matrix_codes"]], dtype=np.int8).reshape(2, 2)
    vector = np.array([int(code) for code in shown["vector_codes"]], dtype=np.int16)
    t, burn_in = float.fromhex(shown["run"][1]), float.fromhex(shown["run"][3])
    for opcode, payload in (
        (Opcode.RESET, None),
        (Opcode.LOAD_MATRIX, {"codes": matrix}),
        (Opcode.LOAD_VECTOR, {"codes": vector}),
        (Opcode.RUN, {"t": t, "burn_in": burn_in}),
    ):
        status, reply = request(int(opcode), payload)
        assert status == Status.OK, reply
    status, reply = request(int(Opcode.READ_MEAN), None)
    assert status == Status.OK, reply
    return np.asarray(reply["mean_codes"])


def _freed_device(host: str, port: int) -> TcpTransport:
    """A connection that holds the device: the server frees it when it sees the C client's close, which on a
    busy machine can come after our connection (then BUSY); retried for up to 10 s."""
    deadline = time.monotonic() + 10.0
    while True:
        transport = TcpTransport(host, port)
        status, reply = transport.request(int(Opcode.STATUS), None)
        if status != Status.BUSY or time.monotonic() > deadline:
            assert status == Status.OK, reply
            return transport
        transport.close()
        time.sleep(0.05)


def test_c_client_reads_the_mean_codes_the_python_driver_reads(client, served):
    host, port = parse_url(served)
    run = subprocess.run([str(client), host, str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    shown = _parse(run.stdout)
    assert shown["device"][:6] == ["spu-8", "protocol_version", "1", "element_bits", "8", "dac_bits"]
    assert shown["matrix_codes"] == ["127", "32", "32", "127"]  # round(code_max * [1, 1/4]), code_max 127
    assert shown["vector_codes"] == ["512", "-512"]  # round(2047 / 4)
    c_means = np.array([float.fromhex(value) for value in shown["mean_codes"]])

    transport = _freed_device(host, port)
    try:
        tcp_means = _same_calls(transport.request, shown)
    finally:
        transport.close()
    in_process = _same_calls(Firmware(load_spec("spu-8"), seed=0).handle, shown)

    assert c_means.tobytes() == tcp_means.tobytes() == in_process.tobytes()
    # and they mean A^-1 u: +-682 codes with ideal parts, the device's mismatch moves them a few per cent
    assert np.all(np.abs(c_means - np.array([682.3, -682.3])) < 0.05 * 2047)


def test_c_client_exits_2_on_a_bad_command_line_and_1_without_a_device(client):
    assert subprocess.run([str(client)], capture_output=True, timeout=30).returncode == 2
    refused = subprocess.run([str(client), "127.0.0.1", "1"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "cannot connect" in refused.stderr
