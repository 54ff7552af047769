"""Running a sweep: cells on one process, local worker processes or a Dask cluster; the journal, the CSV.

Output in ``out``:
  results.csv   tidy: one row per point x seed x problem; a column per swept key (its dotted path), seed,
                problem, the workload's metrics, hardware_time_s, wall_time_s, error (text; empty if none).
                Rows in the sweep's order whatever order the cells finished in.  Rewritten whole, through a
                temporary file and an atomic rename, every few seconds and at the end: never half-written.
  cells.jsonl   the journal: one line per finished cell, appended (and flushed) as it finishes.  A killed
                sweep loses only its cells in flight; a re-run with the same ``out`` reads the journal,
                skips the finished cells and runs the rest.
  sweep.yaml    the resolved sweep (device spec, points, seeds, workload and its arguments) and the
                versions of the project, numpy and numba.  A re-run must describe the same sweep.
  plots/        PNG plots (``driver.sweeps.plot``), when matplotlib is installed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import InvalidInputError
from .plan import Cell, Sweep, load_sweep
from .workloads import resolve_workload

__all__ = ["sweep", "SweepResult", "run_cell", "read_results"]

RESULTS = "results.csv"
JOURNAL = "cells.jsonl"
DEFINITION = "sweep.yaml"
_CSV_EVERY_S = 2.0  # results.csv is rewritten at most this often while cells finish
_PLAIN_EVERY_S = 10.0  # progress line period when stderr is not a terminal


@dataclass
class SweepResult:
    """What a sweep did: ``ran`` cells this time, ``skipped`` (finished before), ``total``; ``interrupted``
    by Ctrl-C; ``errors``: rows with an error; the files written."""

    out: Path
    total: int
    ran: int
    skipped: int
    interrupted: bool
    errors: int
    wall_time_s: float
    plots: list[Path] = field(default_factory=list)

    @property
    def results(self) -> Path:
        return self.out / RESULTS

    def rows(self) -> list[dict[str, str]]:
        """results.csv as a list of dicts of text (load it with pandas for analysis)."""
        return read_results(self.out)


def read_results(out: str | Path) -> list[dict[str, str]]:
    with open(Path(out) / RESULTS, newline="") as handle:
        return list(csv.DictReader(handle))


# -- one cell (runs in a worker) ----------------------------------------------------------------------


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Run one cell: open the variant with the cell's device seed, call the workload with the cell's problem
    generator, and return ``{"cell": index, "rows": [...]}``.  Top-level and picklable, for any executor."""
    import driver

    started = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence(job["entropy"], spawn_key=tuple(job["spawn_key"])))
    try:
        function = resolve_workload(job["workload"])
        with driver.open(job["spec"], seed=job["device_seed"], overrides=job["point"]) as device:
            first = device.timeline.hardware_s
            out = function(device, rng, **job["args"])
            hardware = device.timeline.hardware_s - first
        rows = [out] if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else []
        if not rows or not all(isinstance(row, dict) for row in rows):
            raise InvalidInputError(f"workload {job['workload']!r} must return a dict or a list of dicts, got {out!r}")
        wall = time.perf_counter() - started
        rows = [dict(row) for row in rows]
        for row in rows:
            row.setdefault("hardware_time_s", hardware / len(rows))
            row.setdefault("wall_time_s", wall / len(rows))
    except Exception as exc:  # the cell's error is its result: recorded, and the sweep goes on
        rows = [{"error": f"{type(exc).__name__}: {exc}", "wall_time_s": time.perf_counter() - started}]
    return {"cell": job["cell"], "rows": [_plain(row) for row in rows]}


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (bool, int, float, str)) and value is not None:
            value = str(value)
        out[str(key)] = value
    return out


def _jobs(plan: Sweep, cells: list[Cell]) -> list[dict[str, Any]]:
    jobs = []
    for cell in cells:
        device_seed, problems = plan.cell_seeds(cell)
        jobs.append(
            {
                "cell": cell.index,
                "spec": plan.device_spec,
                "point": plan.points[cell.point],
                "device_seed": device_seed,
                "entropy": problems.entropy,
                "spawn_key": list(problems.spawn_key),
                "workload": plan.workload,
                "args": plan.args,
            }
        )
    return jobs


# -- executors: each yields the results of the jobs as they finish ------------------------------------


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Worker processes started inside inherit one BLAS thread each (N processes x M threads would
    oversubscribe the cores); the parent's environment is restored after."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _serial(jobs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for job in jobs:
        yield run_cell(job)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _processes(jobs: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    """Start ``workers`` processes now and return an iterator over the results as they finish.

    The workers are forked while this process has one thread (they inherit the imports and compiled
    kernels: start-up in milliseconds), and spawned otherwise (a fresh interpreter each, safe beside
    threads, about a second to import numpy, numba and the driver).  The results are the same bits.
    """
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with _one_blas_thread():
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(method), initializer=_ignore_sigint
        )
        futures = [pool.submit(run_cell, job) for job in jobs]
    return _collect(pool, futures)


def _collect(pool: Any, futures: list[Any]) -> Iterator[dict[str, Any]]:
    from concurrent.futures import as_completed

    try:
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        # Ctrl-C (or a failure): drop the queued cells and stop the ones in flight now
        processes = list((getattr(pool, "_processes", None) or {}).values())  # private; shutdown clears it
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    else:
        pool.shutdown()


def _dask(jobs: list[dict[str, Any]], address: Any) -> Iterator[dict[str, Any]]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise InvalidInputError('--dask needs dask.distributed: pip install "spu-emulator[dask]"') from None
    cluster = None
    if isinstance(address, Client):
        client, own = address, False
    else:
        text = str(address)
        if text.startswith("local:"):
            count = int(text.split(":", 1)[1])
            with _one_blas_thread():
                cluster = LocalCluster(
                    n_workers=count,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=50,
                )
            client = Client(cluster)
        else:
            client = Client(text, timeout=30)
        own = True
    futures = []
    try:
        token = f"{time.time_ns():x}"
        keys = [f"spu-sweep-cell-{job['cell']}-{token}" for job in jobs]
        futures = client.map(run_cell, jobs, key=keys, pure=False)
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        with contextlib.suppress(Exception):
            client.cancel(futures)
        raise
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()


def _parse_dask(address: Any) -> Any:
    if isinstance(address, str):
        if address.startswith("local:"):
            count = address.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise InvalidInputError(f"--dask local:N needs a worker count N >= 1, got {address!r}")
        elif not address:
            raise InvalidInputError("--dask needs a scheduler address (tcp://HOST:PORT) or local:N")
    return address


# -- the journal and the CSV --------------------------------------------------------------------------


def _read_journal(path: Path, total: int) -> dict[int, list[dict[str, Any]]]:
    """Finished cells from the journal; a torn last line (a kill mid-write) is dropped."""
    done: dict[int, list[dict[str, Any]]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            cell, rows = int(entry["cell"]), entry["rows"]
        except (ValueError, KeyError, TypeError):
            continue
        if 0 <= cell < total and isinstance(rows, list):
            done[cell] = rows
    return done


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back to the same bits
    return str(value)


def _csv_text(plan: Sweep, done: dict[int, list[dict[str, Any]]]) -> str:
    cells = plan.cells
    fixed = [*plan.keys, "seed", "problem"]
    metrics: dict[str, None] = {}
    table = []
    for index in sorted(done):
        cell = cells[index]
        point = plan.points[cell.point]
        for number, row in enumerate(done[index]):
            for key in row:
                if key not in fixed and key != "error":
                    metrics.setdefault(key, None)
            head = {key: point.get(key, _spec_value(plan.device_spec, key)) for key in plan.keys}
            table.append({**head, "seed": cell.seed, "problem": row.get("problem", number), **row})
    columns = [*fixed, *metrics, "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in table:
        writer.writerow([_text(row.get(column)) for column in columns])
    return buffer.getvalue()


def _spec_value(spec: dict[str, Any], key: str) -> Any:
    """The base spec's value at a dotted path (the value a point that does not set the key has)."""
    node: Any = spec
    for part in key.split("."):
        node = node[part]
    return node


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("spu-emulator", "numpy", "numba", "scipy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_out(plan: Sweep, out: Path) -> dict[str, Any]:
    """The sweep.yaml to write; refuses a directory that holds a different sweep."""
    definition = plan.definition()
    existing = out / DEFINITION
    if existing.exists():
        from .plan import read_yaml

        old = read_yaml(existing.read_text()) or {}
        old.pop("versions", None)
        if _canonical(old) != _canonical(definition):
            raise InvalidInputError(
                f"{out} holds the results of a different sweep ({existing} differs from this one); pass a new --out"
                " directory, or delete the old one to start over"
            )
    elif (out / JOURNAL).exists() or (out / RESULTS).exists():
        raise InvalidInputError(f"{out} holds results without a {DEFINITION}; pass a new --out directory")
    return {**definition, "versions": _versions()}


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, default=str)


# -- progress -----------------------------------------------------------------------------------------


class _Progress:
    """Cells done / total, rate and ETA: a tqdm bar on a terminal, a plain line every 10 s otherwise."""

    def __init__(self, total: int, done: int, enabled: bool, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.start_done = total, done, done
        self.started = self.last = time.perf_counter()
        self.bar = None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="cell", file=self.stream, desc="spu sweep", smoothing=0.1)
        elif enabled:
            self._line()

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last >= _PLAIN_EVERY_S:
            self._line()

    def _line(self) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.started
        ran = self.done - self.start_done
        rate = ran / elapsed if elapsed > 0 and ran else 0.0
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 else ""
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"spu sweep: {self.done}/{self.total} cells ({percent:.0f}%), {rate:.3g} cells/s{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.start_done:
            self._line()


# -- the sweep ----------------------------------------------------------------------------------------


def sweep(
    source: str | Path | dict[str, Any] | Sweep,
    out: str | Path,
    *,
    workers: int | None = None,
    dask: Any = None,
    progress: bool = True,
    plots: bool = True,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Run a sweep (a YAML path, a mapping of the same structure, or a loaded :class:`Sweep`) into ``out``.

    ``workers``: 1 runs the cells in this process; N > 1 in N local worker processes; default: one per
    core.  ``dask``: a ``dask.distributed`` scheduler address (``"tcp://HOST:PORT"``), a ``Client``, or
    ``"local:N"`` (a LocalCluster of N single-threaded worker processes on 127.0.0.1); overrides
    ``workers``.  Results are the same bits whichever is used (wall_time_s aside).  A re-run with the same
    ``out`` skips the finished cells.  Ctrl-C stops the run: the finished cells are kept (results.csv
    written), the ones in flight are lost, and KeyboardInterrupt is raised after.  ``progress``: a bar on
    stderr (plain lines when it is not a terminal); ``plots``: PNG plots when the sweep completes.
    ``on_cell``: called with each finished cell's result (for tests and monitors).
    The sweep is checked before anything runs (:func:`load_sweep`).
    """
    plan = source if isinstance(source, Sweep) else load_sweep(source)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidInputError(f"workers must be a positive integer, got {workers!r}")
    dask = _parse_dask(dask) if dask is not None else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    header = _check_out(plan, out)
    _write_atomic(
        out / DEFINITION,
        "# the resolved sweep: written by spu sweep; a re-run must match it\n"
        + yaml.safe_dump(header, sort_keys=False),
    )
    cells = plan.cells
    journal_path = out / JOURNAL
    done = _read_journal(journal_path, len(cells))
    # rewrite the journal without a torn line, then append to it
    _write_atomic(journal_path, "".join(_journal_line(index, rows) for index, rows in sorted(done.items())))
    skipped = len(done)
    todo = [cell for cell in cells if cell.index not in done]
    jobs = _jobs(plan, todo)
    started = time.perf_counter()
    interrupted = False
    last_csv = 0.0
    ran = 0
    if jobs:
        if dask is not None:
            results = _dask(jobs, dask)
        elif (workers or _cores()) == 1 or len(jobs) == 1:
            results = _serial(jobs)
        else:
            results = _processes(jobs, min(workers or _cores(), len(jobs)))
        bar = _Progress(len(cells), skipped, progress)
        try:
            with open(journal_path, "a") as journal:
                for result in results:
                    done[result["cell"]] = result["rows"]
                    journal.write(_journal_line(result["cell"], result["rows"]))
                    journal.flush()
                    ran += 1
                    bar.update()
                    if on_cell is not None:
                        on_cell(result)
                    if time.perf_counter() - last_csv >= _CSV_EVERY_S:
                        _write_atomic(out / RESULTS, _csv_text(plan, done))
                        last_csv = time.perf_counter()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with _no_sigint() if interrupted else contextlib.nullcontext():  # a second Ctrl-C waits for the CSV
                bar.close()
                _write_atomic(out / RESULTS, _csv_text(plan, done))
    else:
        _Progress(len(cells), skipped, progress).close()
        _write_atomic(out / RESULTS, _csv_text(plan, done))
    errors = sum(1 for rows in done.values() for row in rows if row.get("error"))
    result = SweepResult(
        out=out,
        total=len(cells),
        ran=ran,
        skipped=skipped,
        interrupted=interrupted,
        errors=errors,
        wall_time_s=time.perf_counter() - started,
    )
    if interrupted:
        raise SweepInterrupted(result)
    if plots and len(done) == len(cells):
        from .plot import plot_results

        result.plots = plot_results(plan, out)
    return result


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; ``result`` says what was kept (the finished cells are in results.csv)."""

    def __init__(self, result: SweepResult):
        super().__init__(
            f"sweep interrupted: {result.skipped + result.ran} of {result.total} cells kept in {result.out}"
        )
        self.result = result


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """Hold off further Ctrl-C while the finished cells are written (main thread only)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _journal_line(cell: int, rows: list[dict[str, Any]]) -> str:
    return json.dumps({"cell": cell, "rows": rows}, allow_nan=True) + "\n"


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
