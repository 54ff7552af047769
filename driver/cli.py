"""The ``spu`` command: inspect presets, solve systems, run the demo, serve a device, run a sweep.

Exit codes (as git, pip and pytest): 0 the command did its work; 1 the work failed (the device
saturated, a link dropped, a file could not be written); 2 the command line was wrong (an unknown
option, a value out of range, an unknown preset, an input file that cannot be read or is not a
valid system).  Errors go to stderr as one line, ``spu COMMAND: error: ...``; ``--json`` output
goes to stdout, and nothing is printed there when the command fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import driver

from .errors import InvalidInputError, SpuError

# the array files spu solve reads and writes, by suffix
_FORMATS = {
    ".npy": "NumPy .npy",
    ".csv": "comma-separated text",
    ".txt": "whitespace-separated text",
}
_FORMAT_LIST = ".npy, .csv (comma-separated) or .txt (whitespace-separated)"
_ENGINES = ("auto", "transient", "exact")

# the keys of --json, documented in each command's --help (the epilogs) and in the README
_RUN_KEYS = """\
  report (the RunReport of the run whose mean is x; for B (n, k) a list of
    k, one per column): analog_time (tau), seconds, samples, engine (the one
    that ran), saturated, adc_clipped, steps, dt (tau), wall_time_s,
    device_time {link_s, program_s, analog_s, convert_s, total_s},
    settling (the transient the burn-in leaves, relative to the answer)"""
_INFO_EPILOG = """\
--json prints one JSON object, the fields of driver.DeviceInfo:
  name, cells, cell_kind ("rc" or "oscillator"), tau_s, max_run_time (tau),
  element_bits, g_max (g0), dac_bits, dac_range_v, adc_bits, adc_range_v,
  sample_rate (samples per tau), kappa0 (V^2), rail_v (null: no rails),
  link_rate_gbps, seed_entropy, max_dense_size, max_ggn_rows, program_row_s,
  kappa0_max, spec (the effective spec, with the YAML's structure)
Numbers that are not finite are written as null."""
_SOLVE_EPILOG = f"""\
Inputs: A (n, n) and b (n,) as {_FORMAT_LIST}; a b file with k columns
is k right-hand sides, solved with one load of A into x (n, k).
--json prints one JSON object:
  x (a list; a list of rows for B (n, k)), device (its name), seed,
  t ("auto" or tau, as given), burn_in (tau; null: the default t/2),
  engine (as given),
{_RUN_KEYS}
Numbers that are not finite are written as null."""
_DEMO_EPILOG = f"""\
--json prints one JSON object:
  device, cells, n, cond, seed, x (the SPU's answer), reference (numpy's),
  relative_error (|x - reference| / |reference|), wall_s (host seconds),
  t ("auto" or tau, as given), burn_in (tau; null: the default t/2),
  engine (as given),
{_RUN_KEYS}
Numbers that are not finite are written as null."""


class UsageError(InvalidInputError):
    """The command line was wrong in a way argparse cannot see (a file, a format): exit code 2."""


def _ranged(
    convert: Callable[[str], Any],
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` (int or float) and a finite value within the given bounds."""
    kind = "an integer" if convert is int else "a number"
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    wanted = f"{kind} {' and '.join(bounds)}".strip()

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (above is not None and not value > above)
            or (at_least is not None and not value >= at_least)
            or (at_most is not None and not value <= at_most)
        ):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


_positive_time = _ranged(float, above=0.0)
_non_negative_time = _ranged(float, at_least=0.0)
_seed = _ranged(int, at_least=0)


def _run_time(text: str) -> float | str:
    """--t: "auto" (driver.linalg.solve picks t from the array's slowest rate) or a time in tau > 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_time(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a number > 0, got {text!r}") from None


def _overrides(args: argparse.Namespace) -> dict:
    """The --set KEY=VALUE options as a dict (values read as YAML: 10, 1e-3, true, rc)."""
    from spu_emulator.spec import SpecError as DeviceSpecError  # the CLI starts both sides (see _serve)
    from spu_emulator.spec import parse_override

    out = {}
    for text in args.set or []:
        try:
            key, value = parse_override(text)
        except DeviceSpecError as exc:
            raise driver.SpecError(str(exc)) from None
        out[key] = value
    return out


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses and arrays unpacked, non-finite floats as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [field.name for field in dataclasses.fields(value)]
        names += [name for name, member in vars(type(value)).items() if isinstance(member, property)]  # total_s
        value = {name: getattr(value, name) for name in names}
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_json(data: dict) -> None:
    print(json.dumps(_plain(data), indent=2, allow_nan=False))


def _info(args: argparse.Namespace) -> int:
    served = args.preset.startswith("tcp://")  # a served device has its own seed
    overrides = _overrides(args)
    with driver.open(args.preset, seed=None if served else 0, overrides=overrides or None) as dev:
        info = dev.info
    if args.json:
        _print_json(info)
        return 0
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


def _suffix(path: str, option: str) -> str:
    """The format of ``path`` by its suffix, or a UsageError that lists the formats spu solve takes."""
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise UsageError(f"{option} {path}: unknown file type {suffix or '(no suffix)'!r}; use {_FORMAT_LIST}")
    return suffix


def _read_array(path: str, option: str, ndmin: int) -> np.ndarray:
    """The array in a .npy, .csv or .txt file; a UsageError names the file and what is wrong with it."""
    suffix = _suffix(path, option)
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=ndmin, dtype=float)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except (OSError, ValueError) as exc:
        what = _FORMATS[suffix]
        raise UsageError(f"{option} {path}: cannot be read as {what} of numbers ({exc})") from None


def _write_array(path: str, x: np.ndarray) -> None:
    """x to a .npy, .csv or .txt file (text: 17 significant digits, one row of x per line)."""
    suffix = _suffix(path, "--out")
    try:
        if suffix == ".npy":
            np.save(path, x)
        else:
            np.savetxt(path, x, delimiter="," if suffix == ".csv" else " ", fmt="%.17g")
    except OSError as exc:
        raise OSError(f"--out {path}: could not write x ({exc.strerror or exc})") from None


def _solve_with(dev: driver.Device, A: np.ndarray, b: np.ndarray, args: argparse.Namespace):
    """driver.linalg.solve with the command line's t, burn_in and engine: (x, RunReport)."""
    if args.engine != "auto":
        # linalg.solve runs through dev.run; fix the engine on this device object for its runs
        dev.run = functools.partial(dev.run, engine=args.engine)  # type: ignore[method-assign]
    return driver.linalg.solve(dev, A, b, t=args.t, burn_in=args.burn_in, return_report=True)


def _run_json(args: argparse.Namespace, report: Any) -> dict:
    return {"t": args.t, "burn_in": args.burn_in, "engine": args.engine, "report": report}


def _solve(args: argparse.Namespace) -> int:
    if args.out:  # usage errors before any work
        _suffix(args.out, "--out")
        if not Path(args.out).resolve().parent.is_dir():
            raise UsageError(f"--out {args.out}: no directory {str(Path(args.out).parent)!r} to write it in")
    A = _read_array(args.matrix, "--matrix", ndmin=2)
    b = _read_array(args.vector, "--vector", ndmin=1)
    seed = args.seed if args.seed is not None else (None if args.preset.startswith("tcp://") else 0)
    with driver.open(args.preset, seed=seed) as dev:  # a served device has the seed it was served with
        x, report = _solve_with(dev, A, b, args)
        name = dev.info.name
    if args.out:
        _write_array(args.out, x)
    if args.json:
        _print_json({"x": x, "device": name, "seed": seed, **_run_json(args, report)})
        return 0
    np.set_printoptions(precision=6, suppress=False)
    print(x)
    reports = report if isinstance(report, list) else [report]  # one per column of B (n, k)
    runs = f"{len(reports)} runs, " if len(reports) > 1 else ""
    analog = sum(r.analog_time for r in reports)
    seconds = sum(r.seconds for r in reports)
    engines = "/".join(sorted({r.engine for r in reports}))
    print(f"# {runs}analog time {analog:g} tau ({seconds:.3g} s), {reports[0].samples} samples, {engines} engine")
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
        x, report = _solve_with(dev, A, b, args)
        wall = time.perf_counter() - started
        name, cells = dev.info.name, dev.info.cells
    error = float(np.linalg.norm(x - reference) / np.linalg.norm(reference))
    if args.json:
        data = {"device": name, "cells": cells, "n": n, "cond": args.cond, "seed": args.seed}
        data.update(x=x, reference=reference, relative_error=error, wall_s=wall, **_run_json(args, report))
        _print_json(data)
        return 0
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


def _device_help(presets: list[str], served: bool = True) -> str:
    """The help of a device argument: the presets read from firmware_spec/, never typed twice."""
    where = ", a YAML spec path or tcp://HOST:PORT (spu serve)" if served else " or a YAML spec path"
    return f"preset name ({', '.join(presets)}){where}"


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one field of the spec by its dotted path in firmware_spec/schema.yaml"
        " (e.g. --set adc.bits=10 --set noise.kappa0=1e-3); repeatable",
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
    """--t, --burn-in and --engine: how driver.linalg.solve runs the array."""
    parser.add_argument(
        "--t",
        type=_run_time,
        default=200.0,
        help="analog run time in tau, > 0, or auto: long enough that the burn-in leaves 1e-3 of the slowest"
        " mode's initial offset (default 200)",
    )
    parser.add_argument(
        "--burn-in",
        type=_non_negative_time,
        default=None,
        help="tau to let the array settle before sampling, in [0, t) (default t/2)",
    )
    parser.add_argument(
        "--engine",
        choices=_ENGINES,
        default="auto",
        help="auto: the exact engine where it can show nothing nonlinear acts, else transient (default);"
        " transient: step the circuit with every effect; exact: propagate the linear circuit exactly"
        " (rails and ADC clipping not modelled)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys below) instead of text")


def build_parser() -> argparse.ArgumentParser:
    presets = _presets()
    parser = argparse.ArgumentParser(
        prog="spu",
        description="Stochastic processing unit emulator",
        epilog=f"presets: {', '.join(presets)} (firmware_spec/*.yaml).  Exit codes: 0 done, 1 the work failed"
        " (device or runtime error), 2 the command line was wrong.",
    )
    parser.add_argument("--version", action="version", version=f"spu {driver.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter  # keeps the epilogs' key lists as written

    info = sub.add_parser(
        "info", help="describe a device preset or spec file", epilog=_INFO_EPILOG, formatter_class=raw
    )
    info.add_argument("preset", help=_device_help(presets))
    _add_set(info)
    shown = info.add_mutually_exclusive_group()
    shown.add_argument("--yaml", action="store_true", help="print the effective spec as YAML (a file spu can load)")
    shown.add_argument("--json", action="store_true", help="print one JSON object (keys below) instead of text")
    info.set_defaults(func=_info)

    solve = sub.add_parser(
        "solve",
        help="solve A x = b on an emulated device",
        description="Solve A x = b with driver.linalg.solve (auto-ranging of b) and print x.",
        epilog=_SOLVE_EPILOG,
        formatter_class=raw,
    )
    solve.add_argument("preset", help=_device_help(presets))
    solve.add_argument("--matrix", required=True, help=f"A (n, n), symmetric positive definite: {_FORMAT_LIST}")
    solve.add_argument("--vector", required=True, help=f"b (n,), or B (n, k) for k right-hand sides: {_FORMAT_LIST}")
    _add_run(solve)
    solve.add_argument(
        "--seed", type=_seed, default=None, help="device seed, >= 0 (default 0; a served device: its own)"
    )
    solve.add_argument("--out", help=f"also save x to this file: {_FORMAT_LIST}")
    solve.set_defaults(func=_solve)

    demo = sub.add_parser(
        "demo",
        help="solve a random well-conditioned system and compare with numpy",
        epilog=_DEMO_EPILOG,
        formatter_class=raw,
    )
    demo.add_argument("--preset", default="spu-8", help=_device_help(presets) + " (default spu-8)")
    demo.add_argument("--n", type=_ranged(int, at_least=1), default=8, help="system size, >= 1 (default 8)")
    demo.add_argument(
        "--cond", type=_ranged(float, at_least=1.0), default=5.0, help="condition number, >= 1 (default 5)"
    )
    _add_run(demo)
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the system and the device, >= 0 (default 0)")
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="serve one emulated device over TCP (stop with Ctrl-C or SIGTERM)")
    serve.add_argument("preset", help=_device_help(presets, served=False))
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_ranged(int, at_least=0, at_most=65535),
        default=0,
        help="TCP port (default 0: a free one, logged)",
    )
    _add_set(serve)
    serve.add_argument("--seed", type=_seed, default=None, help="device seed (default: fresh entropy)")
    serve.add_argument("--frame-timeout", type=_positive_time, default=None, help="seconds a frame may take once begun")
    serve.add_argument(
        "--idle-timeout",
        type=_positive_time,
        default=None,
        help="seconds the holder may stay silent before it is dropped and the device freed (default 300)",
    )
    serve.add_argument(
        "--poll-us",
        type=_non_negative_time,
        default=None,
        help="microseconds to busy-poll for the next request after a reply (default 500; 0: sleep at once)",
    )
    serve.add_argument(
        "--max-run-seconds",
        type=_non_negative_time,
        default=None,
        help="wall time one run may take before it is stopped and answered ABORTED (default 600; 0: no limit)",
    )
    serve.add_argument(
        "--token-file",
        default=None,
        help="file holding a shared secret (>= 16 bytes) every host must prove it holds before any command"
        " (driver.open(url, token=...)); default $SPU_TOKEN, else none",
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
        "--workers",
        type=_ranged(int, at_least=1),
        default=None,
        help="local worker processes (default: one per core; 1: serial)",
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

    conformance = sub.add_parser(
        "conformance",
        help="check a device at tcp://HOST:PORT against the wire protocol (firmware_spec/PROTOCOL.md)",
        description="Replay firmware_spec/vectors/ and a behavioural suite against any server that speaks the"
        " protocol; print a pass/fail table with the PROTOCOL.md section of each check.  Exit 0: all passed;"
        " 1: some failed (or the device could not be reached); 2: the command line was wrong.",
        epilog=_CONFORMANCE_EPILOG,
        formatter_class=raw,
    )
    conformance.add_argument("url", metavar="tcp://HOST:PORT", help="the device (spu serve PRESET, or a board)")
    conformance.add_argument("--json", action="store_true", help="print one JSON object (keys below) instead of text")
    conformance.add_argument(
        "--vectors", metavar="DIR", default=None, help="the vector folder (default firmware_spec/vectors)"
    )
    conformance.add_argument(
        "--timeout", type=_positive_time, default=30.0, help="seconds to wait for each reply (default 30)"
    )
    conformance.add_argument(
        "--token-file", metavar="FILE", default=None, help="the device's token, if it has one (default $SPU_TOKEN)"
    )
    conformance.set_defaults(func=_conformance)
    return parser


_CONFORMANCE_EPILOG = """\
--json prints one JSON object: url, passed, failed (counts), checks (a list of
  {name, section, passed, detail})."""


def _conformance(args: argparse.Namespace) -> int:
    from . import conformance  # the raw-frame checker loads only for this command

    token = os.environ.get("SPU_TOKEN") or None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"token file {args.token_file!r} cannot be read: {exc.strerror or exc}") from None
    # a malformed address, vector folder or token raises InvalidInputError (exit 2), an unreachable device LinkError
    checks = conformance.run(args.url, vectors=args.vectors, timeout=args.timeout, token=token)
    print(conformance.to_json(checks, args.url) if args.json else conformance.format_table(checks, args.url))
    return 0 if all(check.passed for check in checks) else 1


def _serve(args: argparse.Namespace) -> int:
    # The device side.  The CLI is the one place that starts both sides, so it imports the
    # emulator's server here, lazily; the driver package itself never does.
    from spu_emulator.server import read_token, serve
    from spu_emulator.spec import SpecError as DeviceSpecError
    from spu_emulator.spec import load_spec

    poll_s = None if args.poll_us is None else args.poll_us * 1e-6
    options = {"frame_timeout": args.frame_timeout, "idle_timeout": args.idle_timeout, "poll_s": poll_s}
    options["max_run_s"] = args.max_run_seconds
    try:
        spec = load_spec(args.preset, _overrides(args) or None)
    except DeviceSpecError as exc:
        raise driver.SpecError(str(exc)) from None
    options = {k: v for k, v in options.items() if v is not None}
    try:
        token = read_token(args.token_file)
    except ValueError as exc:
        raise driver.InvalidInputError(str(exc)) from None
    return serve(spec, args.host, args.port, args.seed, token=token, **options)


def _show_warning(command: str, message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
    """A warning (SettlingWarning, ...) as one line on stderr, as the errors are."""
    print(f"spu {command}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spu`` command line; returns the exit code (0 done, 1 the work failed, 2 a usage error)."""
    args = build_parser().parse_args(argv)  # a usage error argparse sees exits 2 here
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.showwarning = functools.partial(_show_warning, args.command)
            return args.func(args)
    except InvalidInputError as exc:  # an argument, a file or a spec the command cannot take
        print(f"spu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (SpuError, OSError, ValueError, RuntimeError) as exc:  # the work failed (device, link, disk)
        print(f"spu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
