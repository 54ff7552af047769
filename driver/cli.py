"""The ``spu`` command: inspect presets, solve systems, run the demo."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

import driver

from .errors import SpuError


def _overrides(args: argparse.Namespace) -> dict:
    """The --set KEY=VALUE options as a dict (values read as YAML: 10, 1e-3, true, rc)."""
    from spu_emulator.spec import parse_override  # the CLI starts both sides (see _serve)

    out = {}
    for text in args.set or []:
        key, value = parse_override(text)
        out[key] = value
    return out


def _info(args: argparse.Namespace) -> int:
    served = args.preset.startswith("tcp://")  # a served device has its own seed
    overrides = _overrides(args)
    with driver.open(args.preset, seed=None if served else 0, overrides=overrides or None) as dev:
        info = dev.info
        if args.yaml:
            from spu_emulator.spec import spec_from_mapping, spec_to_yaml

            source = args.preset + "".join(f" --set {text}" for text in args.set or [])
            print(spec_to_yaml(spec_from_mapping(info.spec, source=source)), end="")
            return 0
        rail = f"+-{info.rail_v:g} V" if info.rail_v is not None else "off"
        print(f"{info.name}: {info.spec['description']}")
        rows = [
            ("cells", f"{info.cells} ({info.cell_kind})"),
            ("tau", f"{info.tau_s:.3g} s"),
            ("max run time", f"{info.max_run_time:g} tau"),
            ("element codes", _bits(info.element_bits) + f", full scale {info.g_max:g} g0"),
            ("DAC", _bits(info.dac_bits) + f", +-{info.dac_range_v:g} V"),
            ("ADC", _bits(info.adc_bits) + f", +-{info.adc_range_v:g} V, {info.sample_rate:g} samples/tau"),
            ("noise kappa0", f"{info.kappa0:g} V^2"),
            ("rails", rail),
            ("link", f"{info.link_rate_gbps:g} Gbit/s"),
        ]
        for key, value in rows:
            print(f"  {key:<14} {value}")
    return 0


def _bits(bits: int) -> str:
    return f"{bits} bits" if bits else "continuous"


def _solve(args: argparse.Namespace) -> int:
    A = np.load(args.matrix)
    b = np.load(args.vector)
    with driver.open(args.preset, seed=args.seed) as dev:
        x, report = driver.linalg.solve(dev, A, b, t=args.t, return_report=True)
    np.set_printoptions(precision=6, suppress=False)
    print(x)
    print(f"# analog time {report.analog_time:g} tau ({report.seconds:.3g} s), {report.samples} samples")
    if args.out:
        np.save(args.out, x)
    return 0


def _demo(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    n = args.n
    # a random symmetric positive definite system with condition number args.cond
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = q @ np.diag(np.geomspace(1.0, args.cond, n)) @ q.T
    b = rng.standard_normal(n)
    reference = np.linalg.solve(A, b)
    with driver.open(args.preset, seed=args.seed) as dev:
        started = time.perf_counter()
        x, report = driver.linalg.solve(dev, A, b, t=args.t, return_report=True)
        wall = time.perf_counter() - started
        name, cells = dev.info.name, dev.info.cells
    error = np.linalg.norm(x - reference) / np.linalg.norm(reference)
    print(f"Solving a random {n}x{n} SPD system (condition number {args.cond:g}) on {name} ({cells} cells)")
    print(f"{'i':>3} {'SPU':>12} {'numpy':>12}")
    for i in range(n):
        print(f"{i:>3} {x[i]:>12.6f} {reference[i]:>12.6f}")
    print(f"relative error  {error:.3e}")
    print(f"analog time     {report.analog_time:g} tau = {report.seconds * 1e3:.3g} ms on the device")
    print(f"wall time       {wall:.3f} s (emulator, {report.engine} engine, {report.steps} steps)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweeps import SweepInterrupted, load_sweep, sweep

    plan = load_sweep(args.sweep)  # checked before anything runs: errors exit 2
    try:
        result = sweep(
            plan, args.out, workers=args.workers, dask=args.dask, progress=not args.quiet, plots=not args.no_plots
        )
    except SweepInterrupted as stopped:
        kept = stopped.result.skipped + stopped.result.ran
        print(
            f"spu sweep: interrupted; {kept} of {stopped.result.total} cells kept in {stopped.result.results}"
            f" (run the same command again to finish)",
            file=sys.stderr,
        )
        return 130
    print(
        f"{result.total} cells ({result.ran} run, {result.skipped} already done) in {result.wall_time_s:.1f} s:"
        f" {result.results}"
    )
    if result.errors:
        print(f"  {result.errors} rows have an error (see the error column)")
    for path in result.plots:
        print(f"  plot {path}")
    return 0


def _presets() -> list[str]:
    from spu_emulator.spec import preset_names

    return preset_names()


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one field of the spec by its dotted path in firmware_spec/schema.yaml"
        " (e.g. --set adc.bits=10 --set noise.kappa0=1e-3); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spu", description="Stochastic processing unit emulator")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe a device preset or spec file")
    info.add_argument("preset", help=f"preset name ({', '.join(_presets())}) or YAML path")
    _add_set(info)
    info.add_argument("--yaml", action="store_true", help="print the effective spec as YAML (a file spu can load)")
    info.set_defaults(func=_info)

    solve = sub.add_parser("solve", help="solve A x = b on an emulated device")
    solve.add_argument("preset", help="preset name or YAML path")
    solve.add_argument("--matrix", required=True, help=".npy file with A (n, n), symmetric positive definite")
    solve.add_argument("--vector", required=True, help=".npy file with b (n,)")
    solve.add_argument("--t", type=float, default=200.0, help="analog run time in tau (default 200)")
    solve.add_argument("--seed", type=int, default=0, help="device seed (default 0)")
    solve.add_argument("--out", help="save x to this .npy file")
    solve.set_defaults(func=_solve)

    demo = sub.add_parser("demo", help="solve a random well-conditioned system and compare with numpy")
    demo.add_argument("--preset", default="spu-8", help="device (default spu-8)")
    demo.add_argument("--n", type=int, default=8, help="system size (default 8)")
    demo.add_argument("--cond", type=float, default=5.0, help="condition number (default 5)")
    demo.add_argument("--t", type=float, default=200.0, help="analog run time in tau (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the system and the device (default 0)")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="serve one emulated device over TCP (stop with Ctrl-C or SIGTERM)")
    serve.add_argument("preset", help="preset name or YAML path")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="TCP port (default 0: a free one, logged)")
    _add_set(serve)
    serve.add_argument("--seed", type=int, default=None, help="device seed (default: fresh entropy)")
    serve.add_argument("--frame-timeout", type=float, default=None, help="seconds a frame may take once begun")
    serve.add_argument("--idle-timeout", type=float, default=None, help="seconds the holder may stay silent")
    serve.add_argument(
        "--poll-us",
        type=float,
        default=None,
        help="microseconds to busy-poll for the next request after a reply (default 500; 0: sleep at once)",
    )
    serve.set_defaults(func=_serve)
    sweep = sub.add_parser(
        "sweep",
        help="run a robustness study: a grid of device variants x seeds x a workload",
        description="Run the sweep described by SWEEP.yaml (see examples/robustness.yaml) into DIR:"
        " results.csv, sweep.yaml and plots/.  Re-running with the same DIR skips the finished cells.",
    )
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    sweep.add_argument("--out", required=True, metavar="DIR", help="output directory (created; resumed if it exists)")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument(
        "--workers", type=int, default=None, help="local worker processes (default: one per core; 1: serial)"
    )
    where.add_argument(
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="run on a dask.distributed scheduler at ADDRESS (tcp://HOST:PORT), or local:N for a LocalCluster of N"
        ' workers (pip install "spu-emulator[dask]")',
    )
    sweep.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    sweep.add_argument("--quiet", action="store_true", help="no progress on stderr")
    sweep.set_defaults(func=_sweep)
    return parser


def _serve(args: argparse.Namespace) -> int:
    # The device side.  The CLI is the one place that starts both sides, so it imports the
    # emulator's server here, lazily; the driver package itself never does.
    from spu_emulator.server import serve
    from spu_emulator.spec import SpecError as DeviceSpecError
    from spu_emulator.spec import load_spec

    poll_s = None if args.poll_us is None else args.poll_us * 1e-6
    options = {"frame_timeout": args.frame_timeout, "idle_timeout": args.idle_timeout, "poll_s": poll_s}
    try:
        spec = load_spec(args.preset, _overrides(args) or None)
    except DeviceSpecError as exc:
        raise driver.SpecError(str(exc)) from None
    return serve(spec, args.host, args.port, args.seed, **{k: v for k, v in options.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpuError, OSError, ValueError) as exc:
        print(f"spu {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
