"""The digital NGD solvers (driver.ngd) against a plain dense solve, and bad input refused everywhere.

Reference: numpy.linalg.solve on F + lambda I formed here (F = J^T H J).  CG in exact arithmetic
converges in at most N iterations; with N iterations plus a few for round-off and a condition
number of at most 1e4 it is within 1e-7.  Woodbury and Cholesky are backward stable, so their
relative error is about eps * cond <= 1e-12; the tolerance 1e-8 leaves room.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import driver
from driver import ngd
from driver.tngd import TNGD


def _problem(seed: int, n: int, m: int, kind: str, log_damping: float):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((m, n))
    if kind == "softmax":  # H = diag(p) - p p^T: PSD and singular (rows sum to 0)
        p = rng.dirichlet(np.ones(m))
        H = np.diag(p) - np.outer(p, p)
    elif kind == "low-rank":
        B = rng.standard_normal((m, max(1, m // 2)))
        H = B @ B.T
    else:
        B = rng.standard_normal((m, m))
        H = B @ B.T / m + 0.1 * np.eye(m)
    g = rng.standard_normal(n)
    damping = 10.0**log_damping * max(1.0, float(np.linalg.eigvalsh(J.T @ H @ J).max()))
    return g, J, H, damping


def _reference(g, J, H, damping):
    F = J.T @ H @ J
    return np.linalg.solve(F + damping * np.eye(g.shape[0]), g)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 30),
    m=st.integers(1, 12),
    kind=st.sampled_from(["softmax", "low-rank", "full"]),
    log_damping=st.floats(-4.0, 1.0),
)
def test_cg_and_woodbury_agree_with_exact_ngd(seed, n, m, kind, log_damping):
    g, J, H, damping = _problem(seed, n, m, kind, log_damping)
    want = _reference(g, J, H, damping)
    exact = ngd.solve_exact(g, damping, J=J, H=H)
    assert _rel(exact, want) < 1e-8
    assert _rel(ngd.solve_woodbury(g, damping, J=J, H=H), exact) < 1e-8
    assert _rel(ngd.solve_cg(g, damping, J=J, H=H, iters=n + 10), exact) < 1e-7
    F = J.T @ H @ J
    F = 0.5 * (F + F.T)
    assert _rel(ngd.solve_exact(g, damping, F=F), exact) < 1e-8
    assert _rel(ngd.solve_cg(g, damping, F=F, iters=n + 10), exact) < 1e-7


def test_cg_with_few_iterations_is_between_zero_and_the_solution():
    """c CG iterations from 0 minimise the F-norm error over a Krylov space of dimension c: the error falls
    monotonically in c (in the F + lambda I norm) and c = 0 returns 0."""
    g, J, H, damping = _problem(1, 40, 8, "full", -2.0)
    exact = ngd.solve_exact(g, damping, J=J, H=H)
    A = J.T @ H @ J + damping * np.eye(40)
    errors = []
    for c in range(0, 12):
        e = ngd.solve_cg(g, damping, J=J, H=H, iters=c) - exact
        errors.append(float(e @ A @ e))
    assert errors[0] == pytest.approx(float(exact @ A @ exact))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:], strict=False))
    # the GGN has rank <= m = 8, so F + lambda I has at most 9 distinct eigenvalues: exact after 9 steps
    assert errors[9] < 1e-16 * errors[0]


def test_cg_warm_start_and_tolerance():
    g, J, H, damping = _problem(2, 30, 60, "full", -4.0)  # full rank: 30 distinct eigenvalues
    exact = ngd.solve_exact(g, damping, J=J, H=H)
    assert _rel(ngd.solve_cg(g, damping, J=J, H=H, iters=0, x0=exact), exact) < 1e-12
    loose = ngd.solve_cg(g, damping, J=J, H=H, iters=100, tol=1e-3)
    assert 1e-12 < _rel(loose, exact) < 1e-1


@pytest.mark.parametrize("solver", ["exact", "cg", "woodbury"])
def test_tngd_digital_solvers(solver):
    g, J, H, damping = _problem(3, 25, 6, "softmax", -2.0)
    opt = TNGD(None, lr=0.5, damping=damping, solver=solver, cg_iters=40)
    theta = np.zeros(25)
    assert _rel(opt.natural_gradient(g, J=J, H=H), _reference(g, J, H, damping)) < 1e-7
    assert _rel(opt.step(theta, g, J=J, H=H), -0.5 * _reference(g, J, H, damping)) < 1e-7
    assert opt.last_record.solver == solver and opt.last_record.wall_time_s > 0.0


def test_woodbury_needs_the_ggn_form_and_psd_h():
    g, J, H, damping = _problem(4, 6, 3, "full", -1.0)
    with pytest.raises(driver.InvalidInputError, match="GGN form"):
        TNGD(None, lr=0.1, damping=damping, solver="woodbury").natural_gradient(g, F=J.T @ H @ J)
    with pytest.raises(driver.InvalidInputError, match="not positive semi-definite"):
        ngd.solve_woodbury(g, damping, J=J, H=-H)


def test_exact_and_cg_refuse_an_indefinite_curvature():
    g = np.ones(3)
    F = np.diag([1.0, -5.0, 2.0])
    with pytest.raises(driver.InvalidInputError, match="not positive definite"):
        ngd.solve_exact(g, 0.1, F=F)
    with pytest.raises(driver.InvalidInputError, match="non-positive curvature"):
        ngd.solve_cg(g, 0.1, F=F, iters=10)


# -- bad input: each a clear InvalidInputError, from the solvers and from the client ------------------------------
def _good():
    rng = np.random.default_rng(5)
    J = rng.standard_normal((3, 4))
    B = rng.standard_normal((3, 3))
    return rng.standard_normal(4), J, B @ B.T, 0.1


def _nan(a, where, value=np.nan):
    a = np.array(a, dtype=float)
    a[where] = value
    return a


_g, _J, _H, _lam = _good()
BAD = {
    "J columns != len(g)": (dict(grad=_g, J=_J[:, :3], H=_H), "columns must match"),
    "H not (m, m)": (dict(grad=_g, J=_J, H=np.eye(4)), r"H must be \(3, 3\)"),
    "H not square": (dict(grad=_g, J=_J, H=np.ones((3, 2))), r"H must be \(3, 3\)"),
    "H not symmetric": (dict(grad=_g, J=_J, H=_H + np.triu(np.ones((3, 3)), 1)), "must be symmetric"),
    "gradient wrong length (F)": (dict(grad=_g[:3], F=np.eye(4)), r"F must be \(3, 3\)"),
    "gradient 2-d": (dict(grad=_g[None, :], J=_J, H=_H), "gradient must have 1 dimension"),
    "NaN in g": (dict(grad=_nan(_g, 1), J=_J, H=_H), "gradient has 1 NaN"),
    "inf in J": (dict(grad=_g, J=_nan(_J, (0, 2), np.inf), H=_H), r"Jacobian J has 1 NaN or infinite .* \(0, 2\)"),
    "NaN in J": (dict(grad=_g, J=_nan(_J, (2, 3)), H=_H), r"Jacobian J has 1 NaN .* \(2, 3\)"),
    "NaN in H": (dict(grad=_g, J=_J, H=_nan(_H, (1, 1))), "output Hessian H has 1 NaN"),
    "NaN in F": (dict(grad=_g, F=_nan(np.eye(4), (0, 0))), "curvature F has 1 NaN"),
    "F and J both": (dict(grad=_g, F=np.eye(4), J=_J, H=_H), "not both"),
    "no curvature": (dict(grad=_g, J=_J), "no curvature given"),
    "F not symmetric": (dict(grad=_g, F=np.triu(np.ones((4, 4)))), "must be symmetric"),
    "strings": (dict(grad=np.array(["a", "b", "c", "d"]), J=_J, H=_H), "must be real numbers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_by_every_solver(case):
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    grad = kwargs.pop("grad")
    with pytest.raises(driver.InvalidInputError, match=message):
        ngd.curvature(grad, _lam, kwargs.get("F"), kwargs.get("J"), kwargs.get("H"))
    with pytest.raises(driver.InvalidInputError, match=message):
        ngd.solve_exact(grad, _lam, **kwargs)
    with pytest.raises(driver.InvalidInputError, match=message):
        ngd.solve_cg(grad, _lam, **kwargs)
    for solver in ("exact", "cg"):
        with pytest.raises(driver.InvalidInputError, match=message):
            TNGD(None, lr=0.1, damping=_lam, solver=solver).natural_gradient(grad, **kwargs)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_the_device_untouched(case):
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    grad = kwargs.pop("grad")
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=_lam, t=1.0)
        with pytest.raises(driver.InvalidInputError, match=message):
            opt.natural_gradient(grad, **kwargs)
        status = dev.status()
        assert not status.matrix_loaded and not status.vector_loaded and status.runs == 0


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf"), "1", None, True])
def test_damping_must_be_positive(damping):
    with pytest.raises(driver.InvalidInputError, match="damping must be"):
        ngd.solve_exact(_g, damping, J=_J, H=_H)
    with pytest.raises(driver.InvalidInputError, match="damping must be"):
        ngd.solve_woodbury(_g, damping, J=_J, H=_H)
    with pytest.raises(driver.InvalidInputError, match="damping must be"):
        TNGD(None, lr=0.1, damping=damping, solver="exact")


def test_gradient_length_must_stay_the_same_and_match_params():
    opt = TNGD(None, lr=0.1, damping=0.1, solver="exact")
    opt.natural_gradient(_g, J=_J, H=_H)
    with pytest.raises(driver.InvalidInputError, match="previous steps had 4"):
        opt.natural_gradient(np.ones(5), F=np.eye(5))
    with pytest.raises(driver.InvalidInputError, match="params have shape"):
        opt.step(np.zeros(3), _g, J=_J, H=_H)
    with pytest.raises(driver.InvalidInputError, match="params has 1 NaN"):
        opt.step(_nan(np.zeros(4), 0), _g, J=_J, H=_H)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="gpu"), "solver = 'gpu' is not one of"),
        (dict(base="rmsprop"), "base = 'rmsprop' is not one of"),
        (dict(readout="median"), "readout = 'median' is not one of"),
        (dict(t=-1.0), "t must be non-negative"),
        (dict(t=float("nan")), "t must be non-negative"),
        (dict(t=None), "needs the analog time t"),
        (dict(delay=-0.1), "delay must be non-negative"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(cg_iters=-3), "cg_iters must be a non-negative integer"),
        (dict(readout="mean", t=0.0), "readout='mean' averages"),
        (dict(delay=1.0, warm_start=False), "warm_start=False discards"),
        (dict(state_scale=0.0), "state_scale must be positive"),
        (dict(device=None), "needs an open driver.Device"),
    ],
)
def test_bad_options(kwargs, message):
    with driver.open("ideal", seed=0) as dev:
        options = dict(device=dev, lr=0.1, damping=0.1, t=1.0) | kwargs
        with pytest.raises(driver.InvalidInputError, match=message):
            TNGD(**options)


def test_delay_needs_the_device():
    with pytest.raises(driver.InvalidInputError, match="delay is a property"):
        TNGD(None, lr=0.1, damping=0.1, solver="exact", delay=1.0)


def test_fixed_state_scale_too_small_for_the_gradient():
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=0.1, t=1.0, state_scale=1e-3)
        with pytest.raises(driver.InvalidInputError, match="does not fit the DAC"):
            opt.natural_gradient(np.full(4, 10.0), F=np.eye(4))
        assert dev.status().runs == 0 and not dev.status().matrix_loaded


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(t=1e-3, readout="mean"), "needs at least one ADC sample"),  # s t = 1.1e-3 tau < one sample period
        (dict(t=1e9), "more than the"),
    ],
)
def test_run_times_are_checked_before_the_device_is_touched(options, message):
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=0.1, **options)
        with pytest.raises(driver.InvalidInputError, match=message):
            opt.natural_gradient(np.ones(4), F=np.eye(4))
        assert dev.status().runs == 0 and not dev.status().matrix_loaded
