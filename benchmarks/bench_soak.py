"""Soak: many solves on one open device, in-process and over TCP; memory and latency must not grow.

    python benchmarks/bench_soak.py                                  # 100,000 + 10,000 solves, ~6 minutes
    python benchmarks/bench_soak.py --in-process 5000 --tcp 1000     # a quick look

Each solve is ``driver.linalg.solve(dev, A, b, t=20)`` on spu-8 (every non-ideality on) with a fresh
8 x 8 SPD system (eigenvalues near 1..2) and input per solve, so per-load state (scales, the exact
engine's model, the timeline) turns over every time: load_matrix, load_vector, run, read_mean, with the
driver's auto-ranging.  The TCP device is served by ``DeviceServer`` on 127.0.0.1 from this process
(the device in a process of its own, as ``spu serve`` runs it).

Rows: per transport, the median and 99th percentile of the solve latency over the first window (after
a warm-up) and over the last, the resident memory (RSS) of this process and, over TCP, of the device
process, at the end of the first window and at the end, and the length of ``Device.timeline`` (kept to
the last 1,000 calls).  ``--check`` exits 1 when RSS grew by more than 10 MB or the median latency by
more than 30 % (a busy machine can do the latter; rerun).
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy loads its BLAS; the device process inherits it

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

import driver  # noqa: E402
from spu_emulator import Firmware, load_spec  # noqa: E402
from spu_emulator.server import DeviceServer  # noqa: E402

SPEC = "spu-8"
SEED = 0
N = 8
RSS_GROWTH_LIMIT_MB = 10.0
LATENCY_GROWTH_LIMIT = 1.3


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (1e6 bytes), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A fresh SPD system: diag(1..2) plus a symmetric perturbation of row sums below 0.4 (Gershgorin)."""
    perturbation = rng.uniform(-0.05, 0.05, (N, N))
    a = np.diag(np.linspace(1.0, 2.0, N)) + 0.5 * (perturbation + perturbation.T)
    return a, 0.4 * rng.uniform(-1.0, 1.0, N)


@dataclass
class Window:
    median_us: float
    p99_us: float
    rss_mb: float
    device_rss_mb: float


def soak(dev: driver.Device, count: int, window: int, device_pid: int | None) -> tuple[Window, Window, int]:
    """``count`` solves after ``window`` warm-up solves; the first and the last ``window`` summarised."""
    rng = np.random.default_rng(SEED)
    warmup = window
    latencies = np.empty(count)
    first = None
    for index in range(-warmup, count):
        a, b = _system(rng)
        started = time.perf_counter()
        driver.linalg.solve(dev, a, b, t=20.0)
        elapsed = time.perf_counter() - started
        if index >= 0:
            latencies[index] = elapsed
        if index == window - 1:
            gc.collect()
            first = _summary(latencies[:window], device_pid)
        if index > 0 and index % max(1, count // 10) == 0:
            print(f"  {index:,} of {count:,} solves", file=sys.stderr)
    gc.collect()
    return first, _summary(latencies[count - window :], device_pid), len(dev.timeline)


def _summary(seconds: np.ndarray, device_pid: int | None) -> Window:
    device = rss_mb(device_pid) if device_pid is not None else float("nan")
    return Window(float(np.median(seconds)) * 1e6, float(np.percentile(seconds, 99)) * 1e6, rss_mb(), device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-process", type=int, default=100_000, help="in-process solves (default 100,000)")
    parser.add_argument("--tcp", type=int, default=10_000, help="solves over TCP (default 10,000)")
    parser.add_argument("--window", type=int, default=1000, help="solves per summarised window (default 1,000)")
    parser.add_argument("--check", action="store_true", help="exit 1 if RSS or latency grew past the limits")
    args = parser.parse_args(argv)
    for name in ("in_process", "tcp"):
        if getattr(args, name) < args.window:
            parser.error(f"--{name.replace('_', '-')} must be at least --window ({args.window})")

    load = os.getloadavg()
    print(f"# bench_soak: {SPEC}, n = {N}, linalg.solve(t=20) per solve; {platform.processor() or platform.machine()},")
    print(f"# {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; window {args.window}")
    rows = []
    started = time.perf_counter()
    with driver.open(SPEC, seed=SEED) as dev:
        rows.append(("in-process", args.in_process, *soak(dev, args.in_process, args.window, None)))
    in_process_s = time.perf_counter() - started
    started = time.perf_counter()
    with DeviceServer(Firmware(load_spec(SPEC), seed=SEED), "127.0.0.1", 0) as server:
        with driver.open(server.url, seed=SEED) as dev:
            rows.append(("tcp", args.tcp, *soak(dev, args.tcp, args.window, server.device_pid)))
    tcp_s = time.perf_counter() - started
    print()
    head = (
        "| transport | solves | median us first / last | p99 us first / last | host RSS MB first / last"
        " | device RSS MB first / last | timeline |"
    )
    print(head)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    grew = False
    for name, count, first, last, timeline in rows:
        device = f"{first.device_rss_mb:.1f} / {last.device_rss_mb:.1f}" if not np.isnan(first.device_rss_mb) else "-"
        print(
            f"| {name} | {count:,} | {first.median_us:.0f} / {last.median_us:.0f}"
            f" | {first.p99_us:.0f} / {last.p99_us:.0f} | {first.rss_mb:.1f} / {last.rss_mb:.1f}"
            f" | {device} | {timeline:,} |"
        )
        growth = [last.rss_mb - first.rss_mb]
        if not np.isnan(first.device_rss_mb):
            growth.append(last.device_rss_mb - first.device_rss_mb)
        grew |= max(growth) > RSS_GROWTH_LIMIT_MB or last.median_us > LATENCY_GROWTH_LIMIT * first.median_us
    print(f"\nwall time: in-process {in_process_s:.0f} s, tcp {tcp_s:.0f} s")
    if grew:
        print(
            f"growth past the limits (RSS +{RSS_GROWTH_LIMIT_MB:g} MB, median x{LATENCY_GROWTH_LIMIT:g})",
            file=sys.stderr,
        )
    return 1 if (grew and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
