"""Each non-ideality alone moves the answer by the amount its model predicts.

Every test writes a spec derived from the ``ideal`` preset with ONE effect switched on
(noise off unless the effect is noise), drives the device through the public driver and
compares with a prediction computed here, with numpy, from the circuit model of README
"The circuit":

    c_i dV_i/dt = -sum_j a_ij V_j + gin_i u_i + gtot_i v_os,i + sqrt(2 kappa_i) xi_i(t),
    gtot_i = sum_j |a_ij| + gin_i,   kappa_i = kappa0 + k_B T gtot_i / C0.

The driver programs a = A / s_A and u = b / s_b (s_A = max|A| / g_max, s_b = max|b| /
dac_range_v) and reads x = V s_b / s_A, so the ideal answer in user units is A^-1 b.
Random parts of a device (its mismatch draws) are read through ``dev.transport.firmware``;
what the device should do with them is worked out here, never by the emulator's formulas.

Both engines are checked where both apply ("transient": Euler steps; "exact": the linear
circuit propagated in distribution); "auto" is used where only the transient engine models
the effect (rails, ADC rounding of an undithered signal).

Tolerance of a noiseless solve (``_NOISELESS_RTOL``, relative to max|x|): the run starts
at V = 0 and the transient decays at least as e^{-rate_min t}; ``_solve`` burns in
40 / rate_min, leaving e^-40 ~ 4e-18.  The exact engine's fixed point is a linear solve,
off by ~ cond eps ~ 1e-15.  The Euler iteration V <- V + dt (f - M V) stops moving once
dt |f - M V| is below half an ulp of V, so its fixed point is off by at most
cond(M) eps / (2 step_factor) ~ 25 * 5 * 2.2e-16 ~ 3e-14 for these matrices.  1e-9 covers
all of these with a wide margin, and every shift checked below is at least 1e4 times larger.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.special import ndtri

import driver

K_BOLTZMANN = 1.380649e-23  # J/K, exact in the SI

_NOISELESS_RTOL = 1e-9

# Statistical checks: each assert allows a false alarm with probability 1e-4 (two-sided,
# Bonferroni over the values it checks at once); with fixed seeds the outcome is fixed anyway.
_FALSE_ALARM = 1e-4


def _z_limit(checks: int = 1) -> float:
    """|z| bound of a standard normal statistic for ``checks`` simultaneous two-sided checks."""
    return float(-ndtri(_FALSE_ALARM / (2 * checks)))


# A fixed, well-conditioned SPD system (cond 4.5).  Its entries were chosen so that no
# element of A / max|A| * code_max lies within 0.016 of a rounding tie at 4, 6 or 8 bits.
A4 = np.array(
    [
        [3.0, 1.1, 0.45, 0.0],
        [1.1, 2.6, -0.65, 0.3],
        [0.45, -0.65, 2.15, 0.4],
        [0.0, 0.3, 0.4, 1.7],
    ]
)
B4 = np.array([1.0, -0.55, 0.8, 0.35])

ENGINES = ["transient", "exact"]

_spec_counter = itertools.count()


@functools.cache
def _ideal_spec() -> dict:
    """The ``ideal`` preset as plain data, every default filled in (from INFO)."""
    with driver.open("ideal", seed=0) as dev:
        return copy.deepcopy(dev.info.spec)


def _write_spec(tmp_path: Path, changes: dict | None = None, cells: int = 8) -> Path:
    """The ideal preset with ``cells`` cells and ``changes`` ({"section.field": value}) applied."""
    spec = copy.deepcopy(_ideal_spec())
    spec["name"] = "ideal-plus"
    spec["cells"]["count"] = cells
    for dotted, value in (changes or {}).items():
        section, key = dotted.split(".")
        assert key in spec[section], f"unknown spec field {dotted}"
        spec[section][key] = value
    path = tmp_path / f"spec{next(_spec_counter)}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _scales(dev: driver.Device, A: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(s_A, s_b): the driver's documented default scales, computed here."""
    s_a = float(np.abs(A).max()) / dev.info.g_max
    s_b = float(np.abs(b).max()) / dev.info.dac_range_v
    return s_a, s_b if s_b > 0 else 1.0


def _slowest_rate(dev: driver.Device, A: np.ndarray) -> float:
    """Smallest real part of the eigenvalues of C^-1 a for the nominal a = A / s_A."""
    n = A.shape[0]
    c = dev.transport.firmware.parts.capacitance[:n]
    a = A / (float(np.abs(A).max()) / dev.info.g_max)
    return float(np.linalg.eigvals(a / c[:, None]).real.min())


def _solve(
    dev: driver.Device,
    A: np.ndarray,
    b: np.ndarray,
    window: float = 8.0,
    vector_scale: float | None = None,
    **run_options,
):
    """Load A, b; run 40 / rate_min of burn-in and ``window`` tau more; return (read_mean, report)."""
    report_a = dev.load_matrix(A)
    report_b = dev.load_vector(b, scale=vector_scale)
    s_a, s_b = _scales(dev, A, b)
    assert report_a.scale == pytest.approx(s_a, rel=1e-15)
    assert report_b.scale == pytest.approx(vector_scale or s_b, rel=1e-15)
    burn_in = 40.0 / _slowest_rate(dev, A)
    report = dev.run(t=burn_in + window, burn_in=burn_in, **run_options)
    return dev.read_mean(), report


def _tol(x: np.ndarray) -> float:
    return _NOISELESS_RTOL * float(np.abs(x).max())


# ------------------------------------------------------------------------------------------
# Element quantisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_element_quantisation_solves_the_rounded_matrix(tmp_path, bits, engine):
    path = _write_spec(tmp_path, {"coupling.element_bits": bits})
    with driver.open(path, seed=1) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        s_a, _ = _scales(dev, A4, B4)
        code_max = 2 ** (bits - 1) - 1
        fraction = A4 / s_a / dev.info.g_max * code_max
        # no rounding ties, so the rounded matrix does not depend on the tie rule
        assert np.abs(np.abs(fraction - np.floor(fraction)) - 0.5).min() > 1e-3
        A_q = np.rint(fraction) / code_max * dev.info.g_max * s_a
        # the realised conductances are the rounded matrix in device units (no mismatch)
        np.testing.assert_allclose(dev.transport.firmware.matrix.conductance, A_q / s_a, rtol=1e-15)

    x = np.linalg.solve(A4, B4)
    x_q = np.linalg.solve(A_q, B4)
    tol = _tol(x)
    # the device solves A_q x = b up to the transient and round-off (module docstring)
    assert np.abs(x_dev - x_q).max() <= tol

    # Perturbation theory.  A_q x_q = b with A_q = A + dA gives A dx = -dA x_q for dx = x_q - x,
    # hence the series dx = dx1 + dx2 + ..., dx1 = -A^-1 dA x, dx2 = (A^-1 dA)^2 x, and exactly
    # dx - dx1 = (A^-1 dA)^2 x_q, so |dx - dx1| <= r^2 |x_q| with r = ||A^-1 dA||_2: the
    # first-order estimate is right to second order.
    dA = A_q - A4
    P = np.linalg.solve(A4, dA)
    r = np.linalg.norm(P, 2)
    dx = x_dev - x
    dx1 = -P @ x
    assert r < 0.5, "the perturbation is small enough for the series to converge fast"
    assert np.linalg.norm(dx) > 1e4 * tol, "quantisation moved the answer measurably"
    assert np.linalg.norm(dx - dx1) <= r**2 * np.linalg.norm(x_dev) + 2 * tol
    # the remainder is the second-order term: with x_dev = x_q + e, |e| <= tol, the residual
    # of the exact identity is e - P^2 e, at most (1 + r^2) |e|
    assert np.abs(dx - dx1 - P @ P @ x_dev).max() <= (1 + r**2) * tol
    # and the first-order estimate is worth having: it leaves at most r |dx| (r < 0.5) unexplained
    assert np.linalg.norm(dx - dx1) <= r * np.linalg.norm(dx) + 2 * tol
    # each element is off by at most half an LSB, s_A g_max / (2 code_max)
    assert np.abs(dA).max() <= 0.5 * s_a * dev.info.g_max / code_max * (1 + 1e-12)


# ------------------------------------------------------------------------------------------
# Element mismatch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_element_mismatch_solves_the_realised_matrix(tmp_path, engine):
    sigma = 0.02
    path = _write_spec(tmp_path, {"coupling.mismatch": sigma})
    with driver.open(path, seed=2) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        s_a, _ = _scales(dev, A4, B4)
        a_eff = dev.transport.firmware.matrix.conductance.copy()

    nominal = A4 / s_a
    nonzero = nominal != 0
    assert np.all(a_eff[~nonzero] == 0.0), "a zero element has no part to mismatch"
    factor = a_eff[nonzero] / nominal[nonzero]
    # each element is its own part: relative errors of order sigma, and a_ij != a_ji
    assert 0.1 * sigma < np.std(factor - 1.0) < 3.0 * sigma
    assert np.abs(a_eff - a_eff.T).max() > 0.01 * sigma

    x = np.linalg.solve(A4, B4)
    x_pred = np.linalg.solve(s_a * a_eff, B4)
    assert np.abs(x_dev - x_pred).max() <= _tol(x)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x)


def test_element_mismatch_rms_shift_matches_first_order(tmp_path):
    """E|dx|^2 = sigma^2 sum_ij |A^-1 e_i|^2 A_ij^2 x_j^2 to first order, over devices.

    dA_ij = A_ij sigma eps_ij with independent standard normal eps, so the first-order
    shift dx1 = -A^-1 dA x = -sigma W eps with W[k, (i, j)] = (A^-1)_ki A_ij x_j.  Then
    |dx1|^2 = sigma^2 eps^T W^T W eps has mean sigma^2 ||W||_F^2 and variance
    2 sigma^4 ||W W^T||_F^2 (a Gaussian quadratic form).
    """
    sigma, n, seeds = 1e-3, 24, 400
    rng = np.random.default_rng(20240611)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (q * rng.uniform(1.0, 4.0, n)) @ q.T
    A = 0.5 * (A + A.T)
    b = rng.uniform(-1.0, 1.0, n)
    x = np.linalg.solve(A, b)
    A_inv = np.linalg.inv(A)
    W = (A_inv[:, :, None] * (A * x[None, :])[None, :, :]).reshape(n, n * n)
    predicted = sigma**2 * np.linalg.norm(W) ** 2
    rel_se = math.sqrt(2.0) * np.linalg.norm(W @ W.T) / np.linalg.norm(W) ** 2 / math.sqrt(seeds)

    path = _write_spec(tmp_path, {"coupling.mismatch": sigma}, cells=n)
    squares, ratios, eps = [], [], []
    tol = _tol(x)
    for seed in range(seeds):
        with driver.open(path, seed=seed) as dev:
            x_dev, _ = _solve(dev, A, b)
            s_a, _ = _scales(dev, A, b)
            a_eff = dev.transport.firmware.matrix.conductance.copy()
        eps.append((a_eff / (A / s_a) - 1.0).ravel() / sigma)
        dA = s_a * a_eff - A
        dx = x_dev - x
        dx1 = -A_inv @ (dA @ x)
        r = np.linalg.norm(A_inv @ dA, 2)
        # per device, the measured shift is the first-order one up to second order (see quantisation)
        assert np.linalg.norm(dx - dx1) <= r * np.linalg.norm(dx) + 2 * tol
        assert np.linalg.norm(dx) > 1e4 * tol
        squares.append(float(dx @ dx))
        ratios.append(r)

    # the element draws are standard normal times sigma: N = n^2 seeds = 230400 values,
    # mean within z / sqrt(N), standard deviation within z / sqrt(2 N) of 1
    eps = np.concatenate(eps)
    assert abs(eps.mean()) < _z_limit() / math.sqrt(eps.size)
    assert abs(eps.std() - 1.0) < _z_limit() / math.sqrt(2.0 * eps.size)
    # i->j and j->i are separate parts: their draws are uncorrelated
    e = eps.reshape(seeds, n, n)
    upper = np.triu_indices(n, 1)
    pairs = e[:, upper[0], upper[1]].ravel(), e[:, upper[1], upper[0]].ravel()
    assert abs(np.corrcoef(*pairs)[0, 1]) < _z_limit() / math.sqrt(pairs[0].size)

    # mean |dx|^2 over devices against the first-order prediction.  Statistical error: z rel_se
    # (a mean of 400 quadratic forms is close to normal).  Higher orders: dx = dx1 + dx2 + dx3 ...
    # with dx_k of order k in the draws; E[dx1 . dx2] is an odd moment of the Gaussian draws and
    # vanishes, so E|dx|^2 / E|dx1|^2 - 1 is of order r^2 (E|dx2|^2 + 2 E[dx1 . dx3]);
    # 5 r_max^2 bounds it.
    r_max = max(ratios)
    assert r_max < 0.2
    measured = float(np.mean(squares))
    assert measured / predicted - 1.0 == pytest.approx(0.0, abs=_z_limit() * rel_se + 5.0 * r_max**2)


# ------------------------------------------------------------------------------------------
# Per-cell parts: their statistics, and what each does to the answer
# ------------------------------------------------------------------------------------------

# spec field, its value, the CellParts field it draws, the nominal value
_CELL_PARTS = [
    ("coupling.input_conductance_mismatch", 0.05, "input_conductance", 1.0),
    ("cell.capacitance_mismatch", 0.05, "capacitance", 1.0),
    ("cell.opamp_offset_v", 1e-3, "opamp_offset_v", 0.0),
    ("dac.gain_error", 0.01, "dac_gain", 1.0),
    ("dac.offset_v", 2e-3, "dac_offset_v", 0.0),
    ("adc.gain_error", 0.01, "adc_gain", 1.0),
    ("adc.offset_v", 2e-3, "adc_offset_v", 0.0),
]
_PART_NOMINAL = {part: nominal for _, _, part, nominal in _CELL_PARTS}


@pytest.mark.parametrize("field, sigma, part, nominal", _CELL_PARTS, ids=[p[2] for p in _CELL_PARTS])
def test_cell_part_draws_have_the_spec_spread(tmp_path, field, sigma, part, nominal):
    cells = 4096
    with driver.open(_write_spec(tmp_path, {field: sigma}, cells=cells), seed=3) as dev:
        parts = dev.transport.firmware.parts
    z = (getattr(parts, part) - nominal) / sigma
    assert z.shape == (cells,)
    # standard normal: mean within z / sqrt(N), standard deviation within z / sqrt(2 N) of 1
    assert abs(z.mean()) < _z_limit() / math.sqrt(cells)
    assert abs(z.std() - 1.0) < _z_limit() / math.sqrt(2.0 * cells)
    # every other part stays exactly nominal: one switch per effect
    for other, other_nominal in _PART_NOMINAL.items():
        if other != part:
            assert np.all(getattr(parts, other) == other_nominal), other


def test_cell_part_draws_are_independent_of_each_other(tmp_path):
    """With every part drawn at once, the normalised draws of any two kinds are uncorrelated."""
    cells = 4096
    changes = {field: sigma for field, sigma, _, _ in _CELL_PARTS}
    with driver.open(_write_spec(tmp_path, changes, cells=cells), seed=3) as dev:
        parts = dev.transport.firmware.parts
    z = np.array([(getattr(parts, part) - nominal) / sigma for _, sigma, part, nominal in _CELL_PARTS])
    corr = np.corrcoef(z)[np.triu_indices(len(_CELL_PARTS), 1)]
    # each sample correlation of independent draws is ~ N(0, 1 / N)
    assert np.all(np.abs(corr) < _z_limit(corr.size) / math.sqrt(cells))


@pytest.mark.parametrize(
    "field, value",
    [
        ("coupling.input_conductance_mismatch", 0.05),
        ("cell.opamp_offset_v", 1e-3),
        ("dac.gain_error", 0.01),
        ("dac.offset_v", 2e-3),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_input_side_parts_shift_the_answer_as_the_model_says(tmp_path, field, value, engine):
    """Steady state of the model: a V = gin (g_dac u + o_dac) + gtot v_os, so in user units
    x = A^-1 (gin (g_dac b + s_b o_dac) + s_b gtot v_os), gtot_i = sum_j |A_ij| / s_A + gin_i."""
    n = A4.shape[0]
    with driver.open(_write_spec(tmp_path, {field: value}), seed=4) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        s_a, s_b = _scales(dev, A4, B4)
        parts = dev.transport.firmware.parts
        gin = parts.input_conductance[:n].copy()
        v_os = parts.opamp_offset_v[:n].copy()
        g_dac, o_dac = parts.dac_gain[:n].copy(), parts.dac_offset_v[:n].copy()
    gtot = np.abs(A4).sum(axis=1) / s_a + gin
    x_pred = np.linalg.solve(A4, gin * (g_dac * B4 + s_b * o_dac) + s_b * gtot * v_os)
    x = np.linalg.solve(A4, B4)
    assert np.abs(x_dev - x_pred).max() <= _tol(x)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x), "the effect moved the answer measurably"


@pytest.mark.parametrize("engine", ENGINES)
def test_all_static_effects_at_once_follow_the_full_model(tmp_path, engine):
    """Every mismatch and offset on together (noise, quantisation and rails off).  Steady state
    a_eff V = gin (g_dac u + o_dac) + gtot v_os with gtot_i = sum_j |a_eff,ij| + gin_i; c_i
    drops out; the ADC reads g_adc V + o_adc.  In user units x = (g_adc V + o_adc) s_b / s_A."""
    n = A4.shape[0]
    changes = {field: sigma for field, sigma, _, _ in _CELL_PARTS}
    changes["coupling.mismatch"] = 0.02
    with driver.open(_write_spec(tmp_path, changes), seed=17) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        s_a, s_b = _scales(dev, A4, B4)
        firmware = dev.transport.firmware
        p = {name: getattr(firmware.parts, name)[:n].copy() for name in _PART_NOMINAL}
        a_eff = firmware.matrix.conductance.copy()
    u = B4 / s_b
    gtot = np.abs(a_eff).sum(axis=1) + p["input_conductance"]
    drive = p["input_conductance"] * (p["dac_gain"] * u + p["dac_offset_v"]) + gtot * p["opamp_offset_v"]
    v = np.linalg.solve(a_eff, drive)
    x_pred = (p["adc_gain"] * v + p["adc_offset_v"]) * s_b / s_a
    x = np.linalg.solve(A4, B4)
    assert np.abs(x_dev - x_pred).max() <= _tol(x)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_dac_quantisation_solves_with_the_rounded_input(tmp_path, engine):
    bits = 6
    with driver.open(_write_spec(tmp_path, {"dac.bits": bits}), seed=5) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        _, s_b = _scales(dev, A4, B4)
        full_scale = dev.info.dac_range_v
    code_max = 2 ** (bits - 1) - 1
    fraction = B4 / s_b / full_scale * code_max
    assert np.abs(np.abs(fraction - np.floor(fraction)) - 0.5).min() > 1e-3  # no rounding ties
    u_q = np.rint(fraction) / code_max * full_scale
    x = np.linalg.solve(A4, B4)
    assert np.abs(x_dev - np.linalg.solve(A4, s_b * u_q)).max() <= _tol(x)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_capacitance_mismatch_leaves_the_mean_and_sets_the_relaxation_rates(tmp_path, engine):
    # the mean: c_i only scales dV_i/dt, so the steady state a V = u does not move
    sigma = 0.1
    with driver.open(_write_spec(tmp_path, {"cell.capacitance_mismatch": sigma}), seed=6) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        c = dev.transport.firmware.parts.capacitance[:4]
    assert np.abs(c - 1.0).max() > sigma / 2, "the parts really differ from nominal"
    x = np.linalg.solve(A4, B4)
    assert np.abs(x_dev - x).max() <= _tol(x)

    # the dynamics: for diagonal A the cells decouple, V_i(t) = V*_i (1 - exp(-a_ii t / c_i))
    sigma, n = 0.2, 8
    A = np.diag(np.linspace(0.5, 1.0, n))
    b = np.ones(n)
    with driver.open(_write_spec(tmp_path, {"cell.capacitance_mismatch": sigma}), seed=6) as dev:
        dev.load_matrix(A)
        dev.load_vector(b)
        report = dev.run(t=1.0, engine=engine)
        x_t = dev.read_state()  # ideal ADC: the node voltages now, in user units
        c = dev.transport.firmware.parts.capacitance[:n].copy()
    s_a = float(np.abs(A).max())
    rate_pred = np.diag(A) / s_a / c
    rate_meas = -np.log1p(-x_t / np.linalg.solve(A, b)) / report.analog_time
    # Euler multiplies the error by (1 - h) per step, h = rate dt, which is the rate
    # -ln(1 - h) / dt = rate (1 + h/2 + h^2/3 + ...); h^2 bounds the tail for h <= 0.5
    h = report.dt * rate_pred.max()
    assert h <= 0.5
    tol = h / 2 + h**2 + 1e-9
    np.testing.assert_allclose(rate_meas, rate_pred, rtol=tol)
    # and the nominal rates (c = 1) are clearly rejected
    assert np.abs(rate_meas / (np.diag(A) / s_a) - 1.0).max() > 5 * tol


# ------------------------------------------------------------------------------------------
# Read-out: ADC gain, offset, quantisation, noise
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("adc.gain_error", 0.01), ("adc.offset_v", 2e-3)])
@pytest.mark.parametrize("engine", ENGINES)
def test_adc_gain_and_offset_act_on_the_read_out_only(tmp_path, field, value, engine):
    """read = g V + o (volts), so x_read = g x + o s_b / s_A; the analog state is untouched."""
    n = A4.shape[0]
    with driver.open(_write_spec(tmp_path, {field: value}), seed=7) as dev:
        x_dev, _ = _solve(dev, A4, B4, engine=engine)
        s_a, s_b = _scales(dev, A4, B4)
        parts = dev.transport.firmware.parts
        gain, offset = parts.adc_gain[:n].copy(), parts.adc_offset_v[:n].copy()
        state = dev.transport.firmware.analog_state()[:n]
    x = np.linalg.solve(A4, B4)
    assert np.abs(state * s_b / s_a - x).max() <= _tol(x)
    assert np.abs(x_dev - (gain * x + offset * s_b / s_a)).max() <= _tol(x)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x)


@pytest.mark.parametrize("range_v", [2.0, 1.0])
def test_adc_quantisation_reads_the_rounded_code(tmp_path, range_v):
    """A noiseless constant state converts to the same code every sample, so the mean is
    that code: round(V / lsb), lsb = range_v / code_max, clipped to +-code_max."""
    bits = 8
    code_max = 2 ** (bits - 1) - 1
    with driver.open(_write_spec(tmp_path, {"adc.bits": bits, "adc.range_v": range_v}), seed=8) as dev:
        x_dev, report = _solve(dev, A4, B4)
        s_a, s_b = _scales(dev, A4, B4)
        clipped_flag = dev.status().adc_clipped
    x = np.linalg.solve(A4, B4)
    v_star = x * s_a / s_b
    lsb = range_v / code_max
    ratio = v_star / lsb
    assert np.abs(np.abs(ratio - np.floor(ratio)) - 0.5).min() > 1e-3  # no ties: the code is sure
    codes = np.clip(np.rint(ratio), -code_max, code_max)
    np.testing.assert_allclose(x_dev, codes * lsb * s_b / s_a, rtol=1e-12, atol=0)
    n_clipped = int(np.count_nonzero(np.abs(ratio) > code_max))
    # auto must step an undithered quantised ADC (the exact engine models rounding as noise)
    assert report.engine == "transient"
    assert report.adc_clipped == n_clipped * report.samples
    assert clipped_flag == (n_clipped > 0)
    if n_clipped == 0:
        # rounding moved the answer by at most half an LSB, and by something
        assert np.abs(x_dev - x).max() <= 0.5 * lsb * s_b / s_a * (1 + 1e-9)
    assert np.abs(x_dev - x).max() > 1e4 * _tol(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_adc_noise_spread_and_unbiased_mean(tmp_path, engine):
    """Every conversion adds fresh N(0, noise_v^2) volts: a snapshot of a noiseless steady
    state has spread noise_v, and the mean of m samples is unbiased with spread noise_v / sqrt(m)."""
    noise_v, seeds, snapshots, window = 0.01, 100, 20, 100.0
    n = A4.shape[0]
    path = _write_spec(tmp_path, {"adc.noise_v": noise_v})
    x = np.linalg.solve(A4, B4)
    z_state, z_mean = [], []
    for seed in range(seeds):
        with driver.open(path, seed=seed) as dev:
            x_mean, report = _solve(dev, A4, B4, window=window, engine=engine)
            s_a, s_b = _scales(dev, A4, B4)
            volts = s_a / s_b
            z_mean.append((x_mean - x) * volts / (noise_v / math.sqrt(report.samples)))
            for _ in range(snapshots):
                z_state.append((dev.read_state() - x) * volts / noise_v)
            state = dev.transport.firmware.analog_state()[:n]
        assert np.abs(state - x * volts).max() <= _tol(x), "ADC noise does not reach the cells"
    for z in (np.concatenate(z_state), np.concatenate(z_mean)):
        # standard normal: N values, mean within z / sqrt(N), variance within z sqrt(2 / N) of 1
        assert abs(z.mean()) < _z_limit() / math.sqrt(z.size)
        assert abs(z.var() - 1.0) < _z_limit() * math.sqrt(2.0 / z.size)


# ------------------------------------------------------------------------------------------
# Noise in the cells: injected (kappa0) and Johnson
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["kappa0", "johnson"])
@pytest.mark.parametrize("engine", ENGINES)
def test_stationary_variance_of_decoupled_cells(tmp_path, source, engine):
    """For diagonal a the cells decouple into OU processes dV = -a_ii (V - V*) dt + sqrt(2 kappa_i) dW
    (c_i = 1), whose stationary variance is kappa_i / a_ii.  kappa_i = kappa0 for the
    injected source; for Johnson noise kappa_i = k_B T gtot_i / C0 with gtot_i = a_ii + gin_i
    = a_ii + 1 (in g0, C0 in farads), so var_i = k_B T (a_ii + 1) / (C0 a_ii)."""
    n, reads, spacing = 16, 3000, 12.0
    diag = np.linspace(0.25, 1.0, n)
    A = np.diag(diag)
    b = 0.5 * np.ones(n)
    changes = {"noise.kappa0": 1e-4} if source == "kappa0" else {"noise.johnson": True}
    path = _write_spec(tmp_path, changes, cells=n)
    with driver.open(path, seed=9) as dev:
        spec = dev.info.spec
        dev.load_matrix(A)
        dev.load_vector(b)
        s_a, s_b = _scales(dev, A, b)
        a = diag / s_a
        v_star = np.linalg.solve(A, b) * s_a / s_b
        # burn in from V = 0: the mean relaxes at rates >= a_min, 40 / a_min leaves e^-40 of V*
        dev.run(t=40.0 / a.min(), engine=engine)
        samples = np.empty((reads, n))
        for k in range(reads):
            dev.run(t=spacing, engine=engine)
            samples[k] = dev.read_state() * s_a / s_b - v_star
    if source == "kappa0":
        kappa = np.full(n, spec["noise"]["kappa0"])
    else:
        k_t_over_c0 = K_BOLTZMANN * spec["noise"]["temperature_k"] / spec["timing"]["c0_farad"]
        kappa = k_t_over_c0 * (a + 1.0)
    var_pred = kappa / a
    # the cells' variances differ as predicted (a factor 4 for kappa0, 2.5 for Johnson)
    assert var_pred.max() / var_pred.min() > 2.0

    # Reads `spacing` apart are AR(1) with rho_i <= exp(-a_i spacing) <= e^-3: the variance of
    # the mean of K reads is var (1 + rho) / (1 - rho) / K and that of the mean of their
    # squares 2 var^2 (1 + rho^2) / (1 - rho^2) / K.  The transient step keeps a decoupled cell's
    # stationary variance exact (the Leimkuhler-Matthews noise term; plain Euler-Maruyama would inflate
    # it by 1 / (1 - h / 2), h = a dt), and the exact engine is exact: no bias on either.
    rho = np.exp(-a * spacing)
    bias = 0.0
    ratio = np.mean(samples**2, axis=0) / var_pred  # the mean V* is known exactly
    se_ratio = np.sqrt(2.0 * (1 + rho**2) / (1 - rho**2) / reads)
    assert np.all(np.abs(ratio - 1.0 - bias) < _z_limit(n) * se_ratio)
    pooled = np.mean(ratio - 1.0 - bias) / (np.sqrt(np.sum(se_ratio**2)) / n)
    assert abs(pooled) < _z_limit()
    # and the mean stays at the solution
    z_mean = samples.mean(axis=0) / np.sqrt(var_pred * (1 + bias) * (1 + rho) / (1 - rho) / reads)
    assert np.all(np.abs(z_mean) < _z_limit(n))


# ------------------------------------------------------------------------------------------
# Rails
# ------------------------------------------------------------------------------------------

A3 = np.array([[1.0, 0.4, 0.0], [0.4, 1.0, 0.3], [0.0, 0.3, 0.6]])
B3 = np.array([0.2, -0.3, 1.0])


def test_rails_raise_by_default_and_clip_the_mean_when_flagged(tmp_path):
    """Unclipped, A3 x = B3 puts cells 1 and 2 beyond 1.25 V.  With clipping, the array
    settles where cell 2 sits at the rail and cells 0, 1 solve their rows with V_2 = rail:
    for symmetric a and c = 1 the clipped dynamics is projected gradient descent on
    V^T a V / 2 - u^T V over the box |V| <= rail, whose minimiser is that point (checked by KKT)."""
    path = _write_spec(tmp_path, {"rails.enabled": True})
    with driver.open(path, seed=10) as dev:
        rail = dev.info.rail_v
        s_a, s_b = _scales(dev, A3, B3)
        a, u = A3 / s_a, B3 / s_b
        v_free = np.linalg.solve(a, u)
        assert np.abs(v_free[1]) > rail and np.abs(v_free[2]) > rail
        v_clip = np.empty(3)
        v_clip[2] = rail * np.sign(v_free[2])
        v_clip[:2] = np.linalg.solve(a[:2, :2], u[:2] - a[:2, 2] * v_clip[2])
        # KKT: the free cells are inside the rails and the clipped one is pushed outwards
        assert np.all(np.abs(v_clip[:2]) < rail)
        assert (u - a @ v_clip)[2] * np.sign(v_clip[2]) > 0

        with pytest.raises(driver.SaturationError):
            _solve(dev, A3, B3)
        assert not dev.status().has_run, "a run that raised was discarded"

        x_dev, report = _solve(dev, A3, B3, on_saturation="flag")
        assert report.engine == "transient", "auto must not take the exact engine with a rail in reach"
        assert report.saturated
        assert dev.status().saturated
    np.testing.assert_allclose(x_dev, v_clip * s_b / s_a, rtol=0, atol=_tol(v_clip))


def test_rails_leave_a_solution_inside_them_alone(tmp_path):
    b = B4  # the driver scales u to the DAC's full 1 V, so V* = a^-1 u peaks at 1.41 V < 1.5 V
    with driver.open(_write_spec(tmp_path, {"rails.enabled": True, "rails.v_rail": 1.5}), seed=10) as dev:
        s_a, s_b = _scales(dev, A4, b)
        x = np.linalg.solve(A4, b)
        assert np.abs(x * s_a / s_b).max() < dev.info.rail_v
        x_dev, report = _solve(dev, A4, b)
        assert not report.saturated
        assert not dev.status().saturated
    assert np.abs(x_dev - x).max() <= _tol(x)


# ------------------------------------------------------------------------------------------
# Device identity: the seed is the device
# ------------------------------------------------------------------------------------------

_ALL_ON = {
    "coupling.mismatch": 0.01,
    "coupling.input_conductance_mismatch": 0.01,
    "cell.capacitance_mismatch": 0.05,
    "cell.opamp_offset_v": 5e-4,
    "noise.kappa0": 1e-5,
    "noise.johnson": True,
    "dac.gain_error": 1e-3,
    "dac.offset_v": 1e-3,
    "adc.gain_error": 1e-3,
    "adc.offset_v": 5e-4,
    "adc.noise_v": 3e-4,
}
_PART_NAMES = [part for _, _, part, _ in _CELL_PARTS]


def _device_snapshot(path, seed: int) -> tuple[dict, np.ndarray]:
    """(realised parts incl. conductance, read_mean) of a fresh device after one solve of A4, B4.

    The vector scale puts u at half the DAC range, so V* stays well inside spu-8's rails
    (|V*| <= 1.41 * 1.024 V against 2.4 V)."""
    with driver.open(path, seed=seed) as dev:
        vector_scale = 2.0 * np.abs(B4).max() / dev.info.dac_range_v
        x_dev, _ = _solve(dev, A4, B4, window=20.0, vector_scale=vector_scale)
        firmware = dev.transport.firmware
        parts = {name: getattr(firmware.parts, name).copy() for name in _PART_NAMES}
        parts["conductance"] = firmware.matrix.conductance.copy()
    return parts, x_dev


@pytest.mark.parametrize("spec", ["spu-8", "all-on"])
def test_same_seed_same_device_other_seed_other_device(tmp_path, spec):
    path = spec if spec == "spu-8" else _write_spec(tmp_path, _ALL_ON)
    parts_a, x_a = _device_snapshot(path, seed=11)
    parts_b, x_b = _device_snapshot(path, seed=11)
    parts_c, x_c = _device_snapshot(path, seed=12)
    for name in parts_a:
        assert np.array_equal(parts_a[name], parts_b[name]), name
        # continuous draws: a second device differs in every part (a zero element has none)
        real = parts_a[name] != 0.0
        assert np.all(parts_a[name][real] != parts_c[name][real]), name
    assert x_a.tobytes() == x_b.tobytes(), "same spec, seed and calls give bit-identical results"
    assert not np.array_equal(x_a, x_c)


def test_reset_keeps_the_device_and_restarts_the_noise(tmp_path):
    with driver.open(_write_spec(tmp_path, _ALL_ON), seed=13) as dev:
        before = copy.deepcopy(dev.transport.firmware.parts)
        x_first, _ = _solve(dev, A4, B4, window=20.0)
        dev.reset()
        assert not dev.status().has_run
        x_again, _ = _solve(dev, A4, B4, window=20.0)
        after = dev.transport.firmware.parts
    for name in _PART_NAMES:
        assert np.array_equal(getattr(before, name), getattr(after, name)), name
    assert x_first.tobytes() == x_again.tobytes()


def test_one_effect_does_not_change_the_draws_of_another(tmp_path):
    seed = 14
    all_parts, _ = _device_snapshot(_write_spec(tmp_path, _ALL_ON), seed)
    for field, sigma, part, _ in _CELL_PARTS:
        alone, _ = _device_snapshot(_write_spec(tmp_path, {field: _ALL_ON[field]}), seed)
        assert sigma > 0
        assert np.array_equal(alone[part], all_parts[part]), part
    # the element factors a_eff / a depend on the element mismatch draws only
    alone, _ = _device_snapshot(_write_spec(tmp_path, {"coupling.mismatch": _ALL_ON["coupling.mismatch"]}), seed)
    assert np.array_equal(alone["conductance"], all_parts["conductance"])


def test_element_parts_do_not_depend_on_the_programmed_size(tmp_path):
    """Element (i, j) is the same part whether a 3x3 or a 4x4 matrix is programmed."""
    path = _write_spec(tmp_path, {"coupling.mismatch": 0.01})
    with driver.open(path, seed=15) as dev:
        factors = []
        for n in (3, 4):
            A = A4[:n, :n]  # same max|A|, so the same scale
            dev.load_matrix(A)
            nominal = A / (np.abs(A).max() / dev.info.g_max)
            with np.errstate(invalid="ignore", divide="ignore"):
                factors.append(dev.transport.firmware.matrix.conductance / nominal)
    small, big = factors
    mask = np.isfinite(small)
    np.testing.assert_allclose(big[:3, :3][mask], small[mask], rtol=1e-15)


@pytest.mark.parametrize("engine", ENGINES)
def test_noise_stream_does_not_depend_on_the_parts(tmp_path, engine):
    """With the same seed, switching on the op-amp offsets leaves the noise path as it was:
    the model is linear, so the two read_means differ by exactly the offset's steady shift
    s_b A^-1 (gtot v_os), gtot_i = sum_j |A_ij| / s_A + 1, even with kappa0 on."""
    noisy = {"noise.kappa0": 1e-4}
    seed, n = 16, A4.shape[0]
    with driver.open(_write_spec(tmp_path, noisy), seed=seed) as dev:
        x_plain, _ = _solve(dev, A4, B4, window=50.0, engine=engine)
    with driver.open(_write_spec(tmp_path, {**noisy, "cell.opamp_offset_v": 1e-3}), seed=seed) as dev:
        x_offset, _ = _solve(dev, A4, B4, window=50.0, engine=engine)
        s_a, s_b = _scales(dev, A4, B4)
        v_os = dev.transport.firmware.parts.opamp_offset_v[:n].copy()
    shift = s_b * np.linalg.solve(A4, (np.abs(A4).sum(axis=1) / s_a + 1.0) * v_os)
    x = np.linalg.solve(A4, B4)
    # the noise (std sqrt(1e-4) ~ 1e-2 V) cancels exactly; only round-off is left
    assert np.abs(x_offset - x_plain - shift).max() <= _tol(x)
    assert np.abs(shift).max() > 1e4 * _tol(x)
