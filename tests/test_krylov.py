"""The exact engine's Krylov form (``spu_emulator.krylov``) against its modal form and brute force.

The Krylov form applies the run's scalar functions of M by Lanczos; the modal form applies the same
functions through a full eigendecomposition.  Fed the same normals (the fallback of ``KrylovModel.draw``
is the modal form itself), both must give the same (sum, final) to the Lanczos tolerance: that, with the
modal form's own tests in test_exact_engine.py (against expm, Lyapunov and the transient engine), is the
claim that the law is unchanged.  The bounds of the engine choice are checked against the stationary
variance of the modal form and against the mean path computed on a fine time grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import driver
from spu_emulator import exact, krylov

N = krylov.MIN_CELLS  # the smallest array that takes the Krylov form


def _spd(n: int, cond: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T
    return 0.5 * (a + a.T)


@pytest.fixture(scope="module")
def model() -> krylov.KrylovModel:
    made = krylov.prepare_dense(_spd(N, 10.0, 0), np.full(N, 0.3))
    assert isinstance(made, krylov.KrylovModel)
    return made


def _modal_reference(monkeypatch, model, *args, seed):
    """The draw with Lanczos turned off, so the modal form applies the same functions to the same normals."""
    with monkeypatch.context() as patch:
        patch.setattr(krylov, "_lanczos", lambda *a, **k: None)
        return model.draw(*args, np.random.default_rng(seed))


@pytest.mark.parametrize(
    "head, count, period, tail",
    [(5.0, 10, 1.0, 0.3), (0.0, 0, 1.0, 2.0), (100.0, 100, 1.0, 0.0), (0.5, 3, 0.2, 0.0), (0.0, 1000, 0.01, 0.0)],
)
def test_draw_matches_the_modal_form(monkeypatch, model, head, count, period, tail):
    """Short and long hops, no window, a long window of short periods: Lanczos meets the eigendecomposition
    to about 1e-14 of the result here (tolerance 1e-11: the convergence test is an estimate)."""
    d0 = np.random.default_rng(1).standard_normal(N)
    total, final = model.draw(d0, head, count, period, tail, np.random.default_rng(7))
    ref_total, ref_final = _modal_reference(monkeypatch, model, d0, head, count, period, tail, seed=7)
    scale = np.linalg.norm(ref_final) + np.linalg.norm(ref_total)
    assert np.linalg.norm(total - ref_total) <= 1e-11 * scale
    assert np.linalg.norm(final - ref_final) <= 1e-11 * scale


def test_noiseless_draw_is_deterministic_and_matches(monkeypatch):
    """Without noise the draw uses no normals at all and is the mean path alone, to 1e-11 of |d0|."""
    quiet = krylov.prepare_dense(_spd(N, 30.0, 2), np.zeros(N))
    d0 = np.random.default_rng(3).standard_normal(N)
    rng = np.random.default_rng(0)
    total, final = quiet.draw(d0, 2.0, 20, 0.5, 0.25, rng)
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state
    ref_total, ref_final = _modal_reference(monkeypatch, quiet, d0, 2.0, 20, 0.5, 0.25, seed=0)
    assert np.linalg.norm(total - ref_total) <= 1e-11 * np.linalg.norm(d0)
    assert np.linalg.norm(final - ref_final) <= 1e-11 * np.linalg.norm(d0)


def test_lanczos_gives_way_to_the_modal_form_when_it_does_not_converge(monkeypatch, model):
    """With too few steps allowed the draw and the reach fall back to the modal form: its numbers, not an error."""
    d0 = np.random.default_rng(1).standard_normal(N)
    monkeypatch.setattr(krylov, "_MAX_STEPS", 6)
    total, final = model.draw(d0, 1.0, 5, 1.0, 0.5, np.random.default_rng(7))
    ref_total, ref_final = _modal_reference(monkeypatch, model, d0, 1.0, 5, 1.0, 0.5, seed=7)
    np.testing.assert_array_equal(total, ref_total)
    np.testing.assert_array_equal(final, ref_final)
    target = np.full(N, 0.1)
    modal_bound = model.modal().reach(d0, target, 0.0, tight=True, stop=3.0)
    bound = model.reach(d0, target, 0.0, tight=True, stop=3.0)
    np.testing.assert_array_equal(bound, np.minimum(model.reach(d0, target, 0.0, stop=3.0), modal_bound))


def test_variance_and_rate_bounds(model):
    """The floor of lambda_min is below the true one and within the 4x its slack allows (a converged Ritz
    value); the stationary variance bound is above the modal form's exact diag(Sigma); the fresh variance
    bound below its exact diag(Q) for every cell; the Gershgorin rate above the largest eigenvalue."""
    modal = model.modal()
    floor = model.contraction_rate
    assert 0.25 * modal.rates[0] * (1.0 - 1e-9) <= floor <= modal.rates[0]
    assert np.all(model.stationary_var_upper() >= modal.stationary_var * (1.0 - 1e-12))
    for period in (0.01, 1.0, 100.0):
        assert np.all(model.fresh_var_lower(period) <= modal.fresh_var(period) * (1.0 + 1e-12))
    assert model.rate_max >= modal.rate_max


@pytest.mark.parametrize("start, stop", [(0.0, math.inf), (0.0, 3.0), (10.0, 200.0), (0.5, 0.7)])
def test_reach_bounds_the_mean_path(model, start, stop):
    """From rest to a random target: the cell-by-cell bound is at least the path's largest |V_i(s)| (on a grid
    of 3000 times, with the modal form's eigendecomposition) and at most the l2 bound; from rest to a target
    spread over 512 cells the l2 bound is several times too large and the Krylov bound is not."""
    rng = np.random.default_rng(5)
    modal = model.modal()
    target = model.fixed_point(rng.standard_normal(N))
    state = np.zeros(N)
    times = np.linspace(start, min(stop, start + 60.0), 3000)
    y = modal.modes.T @ (state - target)
    truth = np.abs(target[:, None] + modal.modes @ (np.exp(-np.outer(modal.rates, times)) * y[:, None])).max(axis=1)
    loose = model.reach(state, target, start, stop=stop)
    tight = model.reach(state, target, start, tight=True, stop=stop)
    assert np.all(tight >= truth * (1.0 - 1e-9)) and np.all(tight <= loose)
    if start == 0.0 and stop == math.inf:
        assert loose.max() > 5.0 * truth.max() and tight.max() < 1.5 * truth.max()


def test_prepare_dense_chooses_the_form():
    """Krylov for symmetric positive definite arrays of MIN_CELLS or more with equal noise; the modal form
    below that or for an indefinite array (which it reports unstable); the general form for unequal noise."""
    a = _spd(N, 10.0, 0)
    assert isinstance(krylov.prepare_dense(a, np.full(N, 0.1)), krylov.KrylovModel)
    small = krylov.prepare_dense(a[:8, :8], np.full(8, 0.1))
    assert isinstance(small, exact.LinearModel) and small.form == "modal"
    shifted = krylov.prepare_dense(a - 2.0 * np.eye(N), np.full(N, 0.1))
    assert shifted.form == "modal" and not shifted.stable
    assert krylov.prepare_dense(a, np.linspace(0.1, 0.2, N)).form == "general"


def test_device_solves_a_large_array_on_the_krylov_form():
    """On the ideal preset (no noise, no codes) a 600-cell solve through the driver takes the exact engine by
    auto and the Krylov form, and its answer is numpy's to 1e-9; on tngd-sim (rails, 16-bit ADC) the bounds
    let auto take the exact engine too, and the answer is right to the codes' 1e-3."""
    n = 600
    a = _spd(n, 10.0, 4)
    b = np.random.default_rng(4).standard_normal(n)
    reference = np.linalg.solve(a, b)
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(a)
        dev.load_vector(b, scale="auto")
        report = dev.run(200.0, 100.0)
        x = dev.read_mean()
        assert isinstance(dev.transport.firmware._linear_model(), krylov.KrylovModel)
    assert report.engine == "exact"
    assert np.linalg.norm(x - reference) <= 1e-9 * np.linalg.norm(reference)
    with driver.open("tngd-sim", seed=0) as dev:
        x, report = driver.linalg.solve(dev, a, b, return_report=True)
    assert report.engine == "exact" and not report.adc_clipped
    assert np.linalg.norm(x - reference) <= 1e-3 * np.linalg.norm(reference)


@pytest.mark.parametrize("spectrum", ["spd", "indefinite", "two at the top"])
def test_symmetric_norm_bounds_the_norm(spectrum):
    """Lanczos' estimate of ||M||_2 for a symmetric array, with its 10 % margin, lies between the true norm and
    1.1 times it (the power method it replaces for large symmetric arrays gave the same)."""
    n = 600
    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = {
        "spd": np.geomspace(1.0, 10.0, n),
        "indefinite": np.linspace(-5.0, 3.0, n),
        "two at the top": np.r_[np.zeros(n - 2), 7.0, -7.0001],
    }[spectrum]
    m = q @ np.diag(values) @ q.T
    m = 0.5 * (m + m.T)
    true = float(np.abs(values).max())
    assert true <= krylov.symmetric_norm(m) <= 1.1 * true * (1.0 + 1e-12)


def test_is_symmetric_finds_any_asymmetric_pair():
    """The tiled check agrees with numpy's whole comparison: symmetric, and one element off in any tile
    (diagonal tile, off-diagonal tile, the ragged last tile)."""
    n = 300
    m = np.random.default_rng(9).standard_normal((n, n))
    m = m + m.T
    assert krylov.is_symmetric(m)
    for i, j in [(3, 5), (10, 200), (299, 0), (130, 290)]:
        broken = m.copy()
        broken[i, j] += 1e-15 * abs(broken[i, j]) + 1e-300
        assert not krylov.is_symmetric(broken)


def test_the_load_knows_whether_its_drift_is_symmetric():
    """From 512 cells a load records whether M is exactly symmetric (from the codes when no mismatch can
    break it): symmetric codes on an ideal array yes, non-symmetric codes no, symmetric codes with element
    mismatch no (M's elements are then different parts)."""
    a = _spd(600, 10.0, 5)
    with driver.open("ideal", seed=0) as dev:
        dev.load_matrix(a)
        assert dev.transport.firmware.matrix.symmetric is True
        skew = a.copy()
        skew[0, 1] += 0.1
        dev.load_matrix(skew, symmetric=False)
        assert dev.transport.firmware.matrix.symmetric is False
    with driver.open("tngd-sim", seed=0, overrides={"coupling.mismatch": 0.01}) as dev:
        dev.load_matrix(a)
        assert dev.transport.firmware.matrix.symmetric is False
