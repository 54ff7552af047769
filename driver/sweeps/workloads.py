"""The workloads a sweep runs on each device variant: ``solve``, ``inv``, ``sample``, ``tngd``, or a user's
``module:function``.

A workload is a function ``f(device, rng, **args) -> dict | list[dict]``: ``device`` an open
:class:`driver.Device` (the variant, seeded for the cell), ``rng`` a numpy Generator for the problems
(seeded for the cell), ``args`` the sweep file's ``workload_args``.  It returns one row of metrics, or
one row per problem; the values are numbers, booleans or text.  Rows without a ``wall_time_s`` or
``hardware_time_s`` get the call's own (host wall time; the device's timing-model estimate of its loads,
runs and reads, summed over ``device.timeline``).  An exception becomes an ``error`` row.

The built-ins draw their problems from ``rng`` and solve each problem separately: an error in one
problem (say a SaturationError) is recorded in its row and the next problem runs.  Their metrics and
units (``UNITS``) label the plots; a user function may carry its own ``units`` attribute, a dict
metric -> unit.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import linalg
from ..device import Device
from ..errors import InvalidInputError
from ..tngd import TNGD

__all__ = ["WORKLOADS", "UNITS", "resolve_workload", "solve", "inv", "sample", "tngd", "spd_problem"]

UNITS = {
    "rel_error": "relative, ||x - x*|| / ||x*||",
    "mean_error": "relative, ||m - mu|| / sqrt(tr cov)",
    "cov_error": "relative, Frobenius",
    "analog_time": "tau",
    "hardware_time_s": "s",
    "wall_time_s": "s",
    "saturated": "fraction of problems",
    "final_loss": "nats",
    "exact_ngd_loss": "nats",
    "initial_loss": "nats",
    "effective_samples": "samples",
}


def spd_problem(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """A random symmetric positive definite (n, n) matrix with eigenvalues geomspace(1, cond, n) in a
    Haar-random basis."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    A = q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T
    return 0.5 * (A + A.T)


def _size(device: Device, n: int | None) -> int:
    return device.info.max_dense_size if n is None else int(n)


def _problems(device: Device, problems: int, one: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``one(problem)`` per problem, with its wall and hardware time; an exception becomes its error row."""
    rows = []
    for problem in range(int(problems)):
        first = device.timeline.hardware_s
        started = time.perf_counter()
        try:
            row = {"problem": problem, **one(problem)}
        except Exception as exc:  # recorded in the row: the sweep goes on
            row = {"problem": problem, "error": f"{type(exc).__name__}: {exc}"}
        row["hardware_time_s"] = device.timeline.hardware_s - first
        row["wall_time_s"] = time.perf_counter() - started
        rows.append(row)
    return rows


def solve(
    device: Device,
    rng: np.random.Generator,
    n: int | None = None,
    cond: float = 10.0,
    t: float = 200.0,
    problems: int = 4,
) -> list[dict[str, Any]]:
    """``linalg.solve`` on random SPD systems: A (n, n) of condition number ``cond`` (default n = the dense
    array's size), b ~ N(0, I); t analog time in tau.  Metrics: rel_error = ||x - A^-1 b|| / ||A^-1 b||,
    analog_time (tau, the run whose mean was returned), saturated (that run hit a rail)."""
    size = _size(device, n)

    def one(_: int) -> dict[str, Any]:
        A = spd_problem(rng, size, cond)
        b = rng.standard_normal(size)
        reference = np.linalg.solve(A, b)
        x, report = linalg.solve(device, A, b, t=t, return_report=True)
        error = float(np.linalg.norm(x - reference) / np.linalg.norm(reference))
        return {"rel_error": error, "analog_time": report.analog_time, "saturated": bool(report.saturated)}

    return _problems(device, problems, one)


def inv(
    device: Device,
    rng: np.random.Generator,
    n: int | None = None,
    cond: float = 10.0,
    t: float = 2000.0,
    problems: int = 2,
) -> list[dict[str, Any]]:
    """``linalg.inv`` (A^-1 from the device's covariance) of random SPD A (n, n) of condition number ``cond``.
    Metrics: rel_error = ||A^-1~ - A^-1||_F / ||A^-1||_F, analog_time (tau), saturated."""
    size = _size(device, n)

    def one(_: int) -> dict[str, Any]:
        A = spd_problem(rng, size, cond)
        reference = np.linalg.inv(A)
        estimate, report = linalg.inv(device, A, t=t, return_report=True)
        error = float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))
        return {"rel_error": error, "analog_time": report.analog_time, "saturated": bool(report.saturated)}

    return _problems(device, problems, one)


def sample(
    device: Device,
    rng: np.random.Generator,
    n: int | None = None,
    cond: float = 10.0,
    samples: int = 2000,
    problems: int = 2,
) -> list[dict[str, Any]]:
    """``linalg.sample_gaussian``: ``samples`` draws of N(mu, cov), cov SPD of condition number ``cond``,
    mu ~ N(0, I / 4).  Metrics (moment errors): mean_error = ||mean - mu|| / sqrt(tr cov),
    cov_error = ||cov~ - cov||_F / ||cov||_F, effective_samples, analog_time (tau), saturated."""
    size = _size(device, n)

    def one(_: int) -> dict[str, Any]:
        cov = spd_problem(rng, size, cond) / cond
        mu = 0.5 * rng.standard_normal(size)
        draws, report = linalg.sample_gaussian(device, mu, cov, samples, return_report=True)
        mean_error = float(np.linalg.norm(draws.mean(axis=0) - mu) / np.sqrt(np.trace(cov)))
        cov_error = float(np.linalg.norm(np.cov(draws, rowvar=False) - cov) / np.linalg.norm(cov))
        return {
            "mean_error": mean_error,
            "cov_error": cov_error,
            "effective_samples": float(report.effective_samples),
            "analog_time": float(report.analog_time),
            "saturated": any(run.saturated for run in report.runs),
        }

    return _problems(device, problems, one)


def _logistic_loss(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    z = X @ theta
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def tngd(
    device: Device,
    rng: np.random.Generator,
    n: int | None = None,
    samples: int = 256,
    batch: int = 32,
    steps: int = 20,
    lr: float = 1.0,
    damping: float = 0.1,
    t: float = 5.0,
    separation: float = 2.0,
) -> dict[str, Any]:
    """A short TNGD training run (the numpy client :class:`driver.TNGD`, SGD base) on logistic regression.

    Dataset, drawn from ``rng``: ``samples`` points with n - 1 standard normal features and a bias column,
    labels y ~ Bernoulli(sigmoid(X w*)), |w*| = ``separation``; model: theta (n,) (default n = the dense
    array's size), mean cross-entropy; curvature per batch: the GGN J^T H J with J = X_batch,
    H = diag(p (1 - p)) / batch.  ``steps`` steps of ``batch`` points (the same batches for both runs), lr,
    damping lambda, analog time t per step (units of F).  Metrics: final_loss (full dataset), and
    exact_ngd_loss, the same run with the damped natural gradient solved exactly on the host (the
    digital baseline), and initial_loss.
    """
    size = _size(device, n)
    X = np.hstack([rng.standard_normal((samples, size - 1)), np.ones((samples, 1))])
    w_true = rng.standard_normal(size)
    w_true *= separation / np.linalg.norm(w_true)
    y = (rng.random(samples) < 1.0 / (1.0 + np.exp(-X @ w_true))).astype(float)
    batches = [rng.choice(samples, size=batch, replace=False) for _ in range(steps)]

    def train(opt: TNGD) -> float:
        theta = np.zeros(size)
        for index in batches:
            Xb, yb = X[index], y[index]
            p = 1.0 / (1.0 + np.exp(-Xb @ theta))
            grad = Xb.T @ (p - yb) / len(index)
            H = np.diag(p * (1.0 - p)) / len(index)
            theta = opt.step(theta, grad, J=Xb, H=H)
        return _logistic_loss(theta, X, y)

    final = train(TNGD(device, lr=lr, damping=damping, t=t))
    exact = train(TNGD(None, lr=lr, damping=damping, solver="exact"))
    return {"final_loss": final, "exact_ngd_loss": exact, "initial_loss": _logistic_loss(np.zeros(size), X, y)}


WORKLOADS: dict[str, Callable[..., Any]] = {"solve": solve, "inv": inv, "sample": sample, "tngd": tngd}


def resolve_workload(name: Any) -> Callable[..., Any]:
    """A built-in workload by name, or a user's ``"module:function"`` (imported; the module must be importable
    where the cells run: on the path of the local worker processes or of every Dask worker)."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"workload must be one of {', '.join(WORKLOADS)} or 'module:function', got {name!r}")
    if name in WORKLOADS:
        return WORKLOADS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidInputError(
            f"unknown workload {name!r}: the built-ins are {', '.join(WORKLOADS)}; or give a Python callable"
            " f(device, rng, **args) -> dict as 'module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInputError(f"workload {name!r}: cannot import module {module_name!r}: {exc}") from None
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise InvalidInputError(f"workload {name!r}: module {module_name!r} has no callable {attribute!r}")
    return function


def workload_args(name: str, function: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """``args`` checked against the workload's signature, with its defaults filled in (what sweep.yaml records)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return dict(args)
    params = list(signature.parameters.values())[2:]  # after device, rng
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in args:
        if key not in named and not takes_any:
            allowed = ", ".join(named) or "none"
            raise InvalidInputError(
                f"workload_args.{key}: workload {name!r} takes no argument {key!r}; it takes {allowed}"
            )
    missing = [key for key, p in named.items() if p.default is p.empty and key not in args]
    if missing:
        raise InvalidInputError(f"workload {name!r} needs workload_args {', '.join(missing)}")
    out = {key: p.default for key, p in named.items() if p.default is not p.empty}
    out.update(args)
    return out
