"""The TNGD client against closed forms (arXiv 2405.13817, eq. 15, 19, 22).

The references are computed here from F, g, t and t_d with scipy.linalg.expm and numpy solves, never
from the client or the emulator.  With F_k standing for F_k + lambda I (what the device holds) and
x*_k = F_k^-1 g_k, the ideal device's read-out after step k is

    g~_k = e^{-F_k t} (y_k - x*_k) + x*_k,                             (eq. 19)
    y_k  = e^{-F_{k-1} t_d} (g~_{k-1} - x*_{k-1}) + x*_{k-1}           (delay, eq. 22; y_k = g~_{k-1} if t_d = 0)

with g~_0 = g_1 (warm start from the first gradient).  On the "ideal" preset (every non-ideality
off) these hold to round-off: the re-initialisation run leaves e^{-40} of the old state, and the
exact engine propagates the linear array exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import driver
from driver.tngd import TNGD

ROUND_OFF = 1e-10  # relative; the client and engine are exact up to floating point on the ideal preset
# the exact engine's GGN form works in the eigenbasis of an m x m inner matrix (spu_emulator.exact.prepare_ggn);
# its round-off grows with the condition number of J^T H J, up to about 1e-9 on these random problems
ROUND_OFF_GGN = 1e-8


def _spd(rng: np.random.Generator, n: int, cond: float = 10.0, size: float = 1.0) -> np.ndarray:
    """size * Q diag(geomspace(1 / cond, 1)) Q^T, a PSD curvature with a known spread of rates."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return size * (q * np.geomspace(1.0 / cond, 1.0, n)) @ q.T


def _curvature(form: str, rng: np.random.Generator, n: int, cond: float = 10.0, size: float = 1.0):
    """(F dense for the reference, keyword arguments for the client): the dense F itself, or J (m, n), H (m, m)
    with F = J^T H J, m = n + 1 and H PSD with a zero eigenvalue (as a softmax Hessian has)."""
    if form == "dense":
        F = _spd(rng, n, cond, size)
        return F, {"F": F}
    m = n + 1
    J = rng.standard_normal((m, n))
    B = rng.standard_normal((m, m - 1))
    H = size * B @ B.T / m
    H = 0.5 * (H + H.T)
    return J.T @ H @ J, {"J": J, "H": H}


FORMS = ["dense", "ggn"]


def _eq19(F: np.ndarray, damping: float, g: np.ndarray, start: np.ndarray, t: float) -> np.ndarray:
    """e^{-(F + lambda I) t} (start - x*) + x*, x* = (F + lambda I)^-1 g."""
    A = F + damping * np.eye(F.shape[0])
    target = np.linalg.solve(A, g)
    return scipy.linalg.expm(-A * t) @ (start - target) + target


def _close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err <= rtol, f"relative error {err:.3g} above {rtol:g}"


# -- the limits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_t_zero_is_the_sgd_step(form):
    rng = np.random.default_rng(0)
    (_, curvature), g, theta = _curvature(form, rng, 6), rng.standard_normal(6), rng.standard_normal(6)
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.3, damping=0.1, t=0.0)
        new = opt.step(theta, g, **curvature)
    _close(new, theta - 0.3 * g, ROUND_OFF)
    assert opt.last_record.device_time == pytest.approx(40.0)  # only the initialisation ran


def test_t_zero_without_warm_start_is_sgd_at_every_step():
    rng = np.random.default_rng(1)
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=0.1, t=0.0, warm_start=False)
        for _ in range(3):
            F, g = _spd(rng, 5), rng.standard_normal(5) * 10.0 ** rng.uniform(-3, 3)
            _close(opt.natural_gradient(g, F=F), g, ROUND_OFF)


def test_t_zero_with_warm_start_keeps_the_first_gradient():
    """t -> 0 freezes the state: g~_k = g~_{k-1} = g_1 (eq. 19 at t = 0)."""
    rng = np.random.default_rng(2)
    g1 = rng.standard_normal(4)
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=0.1, t=0.0)
        opt.natural_gradient(g1, F=_spd(rng, 4))
        _close(opt.natural_gradient(rng.standard_normal(4), F=_spd(rng, 4)), g1, ROUND_OFF)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("readout", ["state", "mean"])
def test_large_t_is_the_exact_ngd_step(readout, form):
    """t = 40 / lambda: every mode of F + lambda I (rate >= lambda) is within e^{-40} of the fixed point."""
    rng = np.random.default_rng(3)
    damping = 0.05
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=40.0 / damping, readout=readout, burn_in=30.0 / damping)
        for _ in range(3):
            (F, curvature), g = _curvature(form, rng, 8, cond=100.0), rng.standard_normal(8)
            exact = np.linalg.solve(F + damping * np.eye(8), g)
            _close(opt.natural_gradient(g, **curvature), exact, 1e-6)
            _close(opt.natural_gradient(g, **curvature), driver.ngd.solve_exact(g, damping, **curvature), 1e-6)


# -- eq. 19 at intermediate t -----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    t=st.floats(1e-3, 20.0),
    log_size=st.floats(-3.0, 3.0),
    log_g=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**32 - 1),
    form=st.sampled_from(FORMS),
)
def test_intermediate_t_follows_eq19_step_by_step(n, t, log_size, log_g, seed, form):
    rng = np.random.default_rng(seed)
    size = 10.0**log_size
    damping = 0.1 * size
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=t / size)
        state = None
        for _ in range(3):
            (F, curvature), g = _curvature(form, rng, n, size=size), 10.0**log_g * rng.standard_normal(n)
            state = _eq19(F, damping, g, g if state is None else state, t / size)
            _close(opt.natural_gradient(g, **curvature), state, ROUND_OFF if form == "dense" else ROUND_OFF_GGN)


@pytest.mark.parametrize("form", FORMS)
def test_mean_readout_is_the_average_of_eq19_at_the_sample_times(form):
    """read_mean averages the ADC samples at m / sample_rate tau, m0 < m <= m1 (DESIGN 4.1): in the units
    of F that is every 1 / (s sample_rate), s the driver's matrix scale: max|F + lambda I| / g_max for a
    dense F, max(max|J|^2 max|H|, lambda) / g_max for a GGN (driver.ggn)."""
    rng = np.random.default_rng(4)
    damping, t, burn_in = 0.2, 6.0, 2.0
    (F, curvature), g = _curvature(form, rng, 5, size=3.0), rng.standard_normal(5)
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=t, readout="mean", burn_in=burn_in)
        got = opt.natural_gradient(g, **curvature)
        rate = dev.info.sample_rate
        if form == "dense":
            s = np.abs(F + damping * np.eye(5)).max() / dev.info.g_max
        else:
            J, H = curvature["J"], curvature["H"]
            s = max(np.abs(J).max() ** 2 * np.abs(H).max(), damping) / dev.info.g_max
    assert opt.last_record.matrix_scale == pytest.approx(s)
    m0, m1 = math.floor(burn_in * s * rate + 1e-9), math.floor(t * s * rate + 1e-9)
    want = np.mean([_eq19(F, damping, g, g, m / (s * rate)) for m in range(m0 + 1, m1 + 1)], axis=0)
    _close(got, want, ROUND_OFF if form == "dense" else ROUND_OFF_GGN)


# -- delay and warm start, by hand on two parameters -----------------------------------------------------
def test_delay_and_warm_start_two_parameters():
    """Three steps of eq. 19 / 22 with t = 0.7, t_d = 0.3 on 2 x 2 curvatures, each step written out."""
    damping, t, td = 0.5, 0.7, 0.3
    Fs = [np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]]), np.array([[4.0, 1.0], [1.0, 0.5]])]
    gs = [np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-3.0, 1.0])]
    A = [F + damping * np.eye(2) for F in Fs]
    star = [np.linalg.solve(a, g) for a, g in zip(A, gs, strict=True)]

    def flow(k: int, start: np.ndarray, time: float) -> np.ndarray:  # evolve under F_k, g_k
        return scipy.linalg.expm(-A[k] * time) @ (start - star[k]) + star[k]

    # step 1: state set to g_1, run t under (F_1, g_1); no delay before the first load
    step1 = flow(0, gs[0], t)
    # step 2: t_d more under (F_1, g_1), then t under (F_2, g_2)
    step2 = flow(1, flow(0, step1, td), t)
    # step 3: t_d under (F_2, g_2), then t under (F_3, g_3)
    step3 = flow(2, flow(1, step2, td), t)
    # without the delay the state goes straight on
    plain2 = flow(1, step1, t)
    plain3 = flow(2, plain2, t)

    with driver.open("ideal", seed=0) as dev:
        delayed = TNGD(dev, lr=0.1, damping=damping, t=t, delay=td)
        got = [delayed.natural_gradient(g, F=F) for F, g in zip(Fs, gs, strict=True)]
    for have, want in zip(got, [step1, step2, step3], strict=True):
        _close(have, want, ROUND_OFF)
    with driver.open("ideal", seed=0) as dev:
        plain = TNGD(dev, lr=0.1, damping=damping, t=t)
        got = [plain.natural_gradient(g, F=F) for F, g in zip(Fs, gs, strict=True)]
    for have, want in zip(got, [step1, plain2, plain3], strict=True):
        _close(have, want, ROUND_OFF)
    # and the delay really changed something
    assert np.linalg.norm(step3 - plain3) > 1e-2 * np.linalg.norm(plain3)


def test_warm_start_false_restarts_from_each_gradient():
    damping, t = 0.5, 0.7
    Fs = [np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])]
    gs = [np.array([1.0, -2.0]), np.array([0.5, 0.25])]
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=t, warm_start=False)
        for F, g in zip(Fs, gs, strict=True):
            _close(opt.natural_gradient(g, F=F), _eq19(F, damping, g, g, t), ROUND_OFF)
            assert opt.last_record.reinitialised == 1


def test_reset_starts_again_from_the_gradient():
    rng = np.random.default_rng(5)
    F1, F2, g1, g2 = _spd(rng, 3), _spd(rng, 3), rng.standard_normal(3), rng.standard_normal(3)
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=0.1, t=1.0)
        opt.natural_gradient(g1, F=F1)
        opt.reset()
        _close(opt.natural_gradient(g2, F=F2), _eq19(F2, 0.1, g2, g2, 1.0), ROUND_OFF)


def test_state_survives_a_change_of_scale():
    """Gradients that grow by 10^4 over the steps (and curvatures that shrink) force the client to re-range
    (new state scale, state re-set through a relaxation run); eq. 19 must hold across it."""
    rng = np.random.default_rng(6)
    damping, t = 0.1, 0.5
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=t)
        state, scales = None, []
        for k in range(5):
            F, g = _spd(rng, 4, size=10.0**-k), 10.0 ** (k - 2) * rng.standard_normal(4)
            state = _eq19(F, damping, g, g if state is None else state, t)
            _close(opt.natural_gradient(g, F=F), state, ROUND_OFF)
            scales.append(opt.state_scale)
    assert len(set(scales)) > 1, "the test meant to exercise re-ranging"


# -- the update rules ---------------------------------------------------------------------------------------
def test_sgd_momentum_and_adam_updates():
    rng = np.random.default_rng(7)
    damping = 0.3
    F, theta = _spd(rng, 5), rng.standard_normal(5)
    g1, g2 = rng.standard_normal(5), rng.standard_normal(5)
    x1, x2 = (driver.ngd.solve_exact(g, damping, F=F) for g in (g1, g2))

    opt = TNGD(None, lr=0.1, damping=damping, solver="exact", momentum=0.9)
    theta1 = opt.step(theta, g1, F=F)
    theta2 = opt.step(theta1, g2, F=F)
    _close(theta1, theta - 0.1 * x1, 1e-12)
    _close(theta2, theta1 - 0.1 * (0.9 * x1 + x2), 1e-12)

    # TNGD-Adam: Adam with beta1 = beta2 = 0 is lr * g~ / (|g~| + eps)
    opt = TNGD(None, lr=0.1, damping=damping, solver="exact", base="adam")
    _close(opt.step(theta, g1, F=F), theta - 0.1 * x1 / (np.abs(x1) + 1e-8), 1e-12)

    # Adam with the usual betas, two steps by hand
    b1, b2, eps = 0.9, 0.999, 1e-8
    opt = TNGD(None, lr=0.1, damping=damping, solver="none", base="adam", betas=(b1, b2), eps=eps)
    m, v = (1 - b1) * g1, (1 - b2) * g1**2
    want1 = theta - 0.1 * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    m, v = b1 * m + (1 - b1) * g2, b2 * v + (1 - b2) * g2**2
    want2 = want1 - 0.1 * (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    got1 = opt.step(theta, g1)
    _close(got1, want1, 1e-12)
    _close(opt.step(got1, g2), want2, 1e-12)


def test_step_does_not_touch_its_inputs():
    rng = np.random.default_rng(8)
    F, g, theta = _spd(rng, 3), rng.standard_normal(3), rng.standard_normal(3)
    copies = (F.copy(), g.copy(), theta.copy())
    with driver.open("ideal", seed=0) as dev:
        new = TNGD(dev, lr=0.1, damping=0.1, t=1.0).step(theta, g, F=F)
    assert new is not theta
    for before, after in zip(copies, (F, g, theta), strict=True):
        np.testing.assert_array_equal(before, after)


# -- records ------------------------------------------------------------------------------------------------
def test_record_accounts_for_the_analog_time():
    """Device time = the initialisation (40 / g_max tau) + s t, s = max|F + lambda I| / g_max; then s t (+ s t_d)."""
    rng = np.random.default_rng(9)
    damping, t, td = 0.2, 1.5, 0.5
    F = _spd(rng, 4, size=2.0)
    s = np.abs(F + damping * np.eye(4)).max()  # g_max = 1 on the ideal preset
    with driver.open("ideal", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=t, delay=td)
        opt.natural_gradient(rng.standard_normal(4), F=F)
        first = opt.last_record
        opt.natural_gradient(1.01 * np.ones(4) * first.state_scale * s / 4, F=F)
        second = opt.last_record
    assert first.device_time == pytest.approx(40.0 + s * t)
    assert (first.loads, first.runs, first.reads, first.reinitialised) == (4, 2, 1, 1)
    assert second.device_time == pytest.approx(s * (t + td))
    assert (second.loads, second.runs, second.reads, second.reinitialised) == (2, 2, 1, 0)
    assert second.engine == "exact"
    assert second.hardware_time_s >= second.device_time * dev.info.tau_s


# -- a realistic device ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_tngd_sim_reaches_ngd_within_its_noise_and_precision(form):
    """On the paper's 16-bit device the time-averaged read-out sits within 2e-2 of the exact NGD step.

    What is left: the 16-bit codes of F (or of J and H, each rounded, H's diagonal raised to keep it PSD)
    times cond(F + lambda I) (up to ~300 here), about 1e-3; and the injected noise, kappa0 = 1e-6 V^2 / tau:
    the slowest mode (rate lambda / s ~ 0.01 / tau) has a stationary spread of ~0.01 V against a state of
    ~0.5 V, so one snapshot is off by a few percent, which averaging over the last 40 / lambda (~4000 tau)
    brings down to a few 1e-3.
    """
    rng = np.random.default_rng(10)
    damping = 0.1
    with driver.open("tngd-sim", seed=0) as dev:
        opt = TNGD(dev, lr=0.1, damping=damping, t=80.0 / damping, readout="mean", burn_in=40.0 / damping)
        for _ in range(3):
            (_, curvature), g = _curvature(form, rng, 6), rng.standard_normal(6)
            _close(opt.natural_gradient(g, **curvature), driver.ngd.solve_exact(g, damping, **curvature), 2e-2)


# -- noise ----------------------------------------------------------------------------------------------------
NOISY = """\
spec_version: 1
name: noisy-ideal
description: ideal parts and converters, injected noise only (written by tests/test_tngd.py)
cells: {count: 4, kind: rc}
timing: {max_run_time: 1.0e6}
coupling: {element_bits: 0, g_max: 1.0, mismatch: 0.0, input_conductance_mismatch: 0.0}
cell: {capacitance_mismatch: 0.0, opamp_offset_v: 0.0}
noise: {kappa0: 1.0e-3, johnson: false}
dac: {bits: 0, range_v: 1.0, gain_error: 0.0, offset_v: 0.0}
adc: {bits: 0, range_v: 1.0, sample_rate: 1.0, gain_error: 0.0, offset_v: 0.0, noise_v: 0.0}
rails: {enabled: false}
integrator: {step_factor: 0.02}
"""


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("t", [0.3, 2.0])
def test_noise_is_unbiased_with_the_ou_spread_per_eigendirection(tmp_path, t, form):
    """Mean over repetitions = eq. 19; variance per eigendirection of F + lambda I as derived here.

    Scales: the client fixes r (state_scale, user units per volt) and the driver programs
    a = (F + lambda I) / s, input u = g / (r s); x = r V.  s is the driver's matrix scale: max|F + lambda I|
    / g_max for a dense F, max(max|J|^2 max|H|, lambda) / g_max for a GGN (driver.ggn); the GGN's J, H
    and J^T arrays realise the same drift (J^T H J + lambda I) / s, so the derivation is the same.
    Initialisation: a = g_max I, u = g_max g / r for 40 / g_max tau, so V ~ N(g / r, kappa0 / g_max)
    (the OU stationary spread of rate g_max; e^{-40} of the previous repetition is left).
    Run: tau = s t with rates lambda_i / s; each eigendirection of a is a scalar OU process,
    Var V_i(tau) = e^{-2 lambda_i tau / s} kappa0 / g_max + kappa0 s (1 - e^{-2 lambda_i tau / s}) / lambda_i.
    In user units (times r^2), with e_i = e^{-2 lambda_i t}:

        Var g~_i = r^2 kappa0 [e_i / g_max + s (1 - e_i) / lambda_i],

    i.e. kappa (1 - e^{-2 lambda_i t}) / lambda_i with the user-unit diffusion kappa = kappa0 r^2 s, plus
    the decayed spread of the initial state.  The ideal ADC reads V exactly.

    Tolerance: R repetitions on one device (its noise stream runs on, so they are independent).  Each
    projection is Gaussian, so its mean is within 5 sd / sqrt(R) and (R - 1) s^2 / Var is chi-squared with
    R - 1 degrees of freedom: 5 sd of that is a relative 5 sqrt(2 / (R - 1)).
    """
    path = tmp_path / "noisy.yaml"
    path.write_text(NOISY)
    rng = np.random.default_rng(11)
    damping, n, reps = 0.25, 3, 1500
    F, curvature = _curvature(form, rng, n, cond=8.0, size=2.0)
    g = rng.standard_normal(n)
    A = F + damping * np.eye(n)
    rates, modes = np.linalg.eigh(A)
    if form == "dense":
        s = float(np.abs(A).max())  # g_max = 1
    else:
        s = max(np.abs(curvature["J"]).max() ** 2 * np.abs(curvature["H"]).max(), damping)
    r = 4.0 * float(np.abs(g).max()) / min(1.0, s)  # fits the DAC for both the initialisation and the run
    kappa0 = 1e-3
    with driver.open(str(path), seed=0) as dev:
        draws = np.array(
            [
                TNGD(dev, lr=0.1, damping=damping, t=t, state_scale=r).natural_gradient(g, **curvature)
                for _ in range(reps)
            ]
        )
    decay = np.exp(-2.0 * rates * t)
    var = r**2 * kappa0 * (decay + s * (1.0 - decay) / rates)
    mean = modes.T @ _eq19(F, damping, g, g, t)
    projected = draws @ modes
    z_mean = (projected.mean(axis=0) - mean) / np.sqrt(var / reps)
    assert np.all(np.abs(z_mean) < 5.0), z_mean
    ratio = projected.var(axis=0, ddof=1) / var
    assert np.all(np.abs(ratio - 1.0) < 5.0 * math.sqrt(2.0 / (reps - 1))), ratio


# -- the example ------------------------------------------------------------------------------------------------
def test_logistic_example_runs(capsys):
    """examples/tngd_logistic.py end to end, three iterations (needs scikit-learn: pip install ".[examples]")."""
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "tngd_logistic.py"
    spec = importlib.util.spec_from_file_location("tngd_logistic", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--iters", "3", "--t", "1", "--out", ""])
    printed = capsys.readouterr().out
    assert "training loss against iteration" in printed and "TNGD t=1" in printed
