"""The exact engine for large symmetric arrays without an eigendecomposition: Cholesky and Lanczos.

For a symmetric positive definite drift M (n, n) with equal noise s in every cell (the modal form of
:mod:`spu_emulator.exact`), a run needs V* = M^-1 f and, for the vectors it moves, a few scalar functions
of M: the hop e^{-M h}, its noise sd(M) = s ((I - e^{-2 M h}) / (2 M))^{1/2}, and the window's sums
(``exact._window_coefficients``).  The modal form finds them from a full ``eigh`` (O(n^3), about 12x a
Cholesky at n = 1024); this form instead factors M once (Cholesky, n^3 / 3) and applies each function
to the vectors of the run by the Lanczos method:

    f(M) v ~= |v| Q_k f(T_k) e_1,     T_k = Q_k^T M Q_k  (k x k tridiagonal),

with full reorthogonalisation, all the run's vectors (its starting deviation and two vectors of normals)
in lockstep, each product reading one triangle of M (BLAS's dsymv).  Convergence is monitored the
standard way (the change of the result between checks 6 steps apart, against |v| max |f| over the Ritz
values) down to 1e-13 relative, the accuracy of the modal form's own ``eigh``; the number of steps grows
with sqrt(cond M) (about 50 at cond 10).  When it does not converge in :data:`_MAX_STEPS`, or for anything
the form does not answer (lagged sums), the model falls back to the modal form, made once on demand
(:meth:`KrylovModel.modal`).

The normals are drawn in the cells' basis, not the modes': f(M) z with z ~ N(0, I) has the law of
W f(L) z' (W orthogonal), so the run's law is the modal form's, its bits are not.

The engine choice's questions (see ``spu_emulator.safety``) get bounds: lambda_min(M) from below by a
few block Lanczos steps on M^-1 (Cholesky solves) with a probabilistic guarantee (:func:`_rate_floor`), so the
stationary variance from above by s^2 / (2 lambda_min); the fresh variance per sample from below by
Jensen's inequality on the diagonal (as ``lowrank.LowRankModel``); the largest rate from above by
Gershgorin; the mean path in l2 by ||e^{-M s}|| <= e^{-lambda_min s}, then cell by cell along the path in
the Lanczos basis of d = V(0) - V* (:meth:`KrylovModel.reach`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import scipy.linalg

from .exact import (
    LinearModel,
    _hop_coefficients,
    _memoised,
    _path_bound,
    _path_grid,
    _per_force,
    _window_coefficients,
    prepare,
)

__all__ = ["KrylovModel", "is_symmetric", "prepare_dense", "symmetric_norm"]

MIN_CELLS = 512  # below this eigh costs little, and the modal form (bit-identical to before) is kept
_MAX_STEPS = 240  # Lanczos steps before the modal form is cheaper (eigh ~ 250 n x 5 products at n = 1024)
_CHECK_EVERY = 6  # Lanczos steps between convergence checks
_TOLERANCE = 1e-13  # relative change between checks at which a Lanczos result counts as converged
_REACH_MARGIN = 10.0  # the reach bound adds this many times the Lanczos error estimate of the path
_FLOOR_SLACK = 0.75  # epsilon of _rate_floor: lambda_min is bounded by (1 - epsilon) / theta
_FLOOR_FAILURE = 1e-12  # the probability, over the start vectors, that _rate_floor's bound fails
_FLOOR_BLOCK = 4  # start vectors of _rate_floor's block Lanczos
_potrf = scipy.linalg.lapack.dpotrf
_potrs = scipy.linalg.lapack.dpotrs
_symv = scipy.linalg.blas.dsymv


@dataclass(frozen=True)
class KrylovModel:
    """The exact engine's view of a symmetric positive definite array with equal noise in every cell.

    factor: (L, True), L the lower Cholesky factor of M (``scipy.linalg.cho_solve``'s form); noise_level: s
    (V / sqrt(tau)); rate_max: an upper bound of M's largest eigenvalue (Gershgorin, 1 / tau).
    """

    drift: np.ndarray
    noise_sd: np.ndarray
    factor: tuple
    noise_level: float
    rate_max: float
    form: str = "krylov"
    stable: bool = True
    contractive: bool = True
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def contraction_rate(self) -> float:
        """A lower bound of lambda_min(M) (see :func:`_rate_floor`), so ||e^{-M s}||_2 <= e^{-rate s}.  Memoised."""
        return _memoised(self._memo, ("rate_floor",), lambda: _rate_floor(self.factor))

    def modal(self) -> LinearModel:
        """The modal form of the same array (one eigh, O(n^3), made once on first use)."""
        return _memoised(self._memo, ("modal",), lambda: prepare(self.drift, self.noise_sd))

    def fixed_point(self, force: np.ndarray) -> np.ndarray:
        """V* = M^-1 f by the Cholesky factor.  O(n^2), once per force array."""
        return _per_force(self._memo, force, lambda f: scipy.linalg.cho_solve(self.factor, f, check_finite=False))

    def stationary_var_upper(self) -> np.ndarray:
        """Per cell, an upper bound of the stationary variance: s^2 / (2 lambda) for lambda the lower bound of
        lambda_min(M) in :attr:`contraction_rate`, volts^2.  O(n^2) once (8 Cholesky solves of 4 vectors).

        (diag(Sigma) = s^2 / 2 diag(M^-1) itself would cost a triangular inverse, as much again as the
        Cholesky factor, for a margin that matters only when the noise reaches the rails.)"""
        return np.full(self.drift.shape[0], 0.5 * self.noise_level**2 / self.contraction_rate)

    def fresh_var_lower(self, period: float) -> np.ndarray:
        """Per cell, a lower bound of the fresh variance per sample, volts^2.  O(n).

        diag q(M) with q(x) = s^2 (1 - e^{-2 x period}) / (2 x), convex: by Jensen's inequality in the
        eigenbasis q(M)_ii >= q(M_ii)."""
        x = np.diagonal(self.drift)
        return self.noise_level**2 * -np.expm1(-2.0 * x * period) / (2.0 * x)

    def reach(
        self, state: np.ndarray, target: np.ndarray, start: float = 0.0, tight: bool = False, stop: float = math.inf
    ) -> np.ndarray:
        """Per cell, a bound on |V_i(s)| for start <= s <= stop along the mean path V* + e^{-M s} d,
        d = state - target.

        |V*_i| + e^{-mu start} ||d||, mu = :attr:`contraction_rate`: O(n).  ``tight``: the smaller of that and
        the path followed cell by cell in the Lanczos basis of d: with T_k = S diag(theta) S^T,
        V(s) ~= V* + (Q_k S) e^{-theta s} (S^T |d| e_1), bounded over each stretch of a time grid as in
        ``exact._modal_path_bound`` (rigorous for that path), plus _REACH_MARGIN times the Lanczos error
        estimate of the path.  O(n^2 k).  The modal form's bound when Lanczos does not converge.
        """
        d = state - target
        norm = float(np.linalg.norm(d))
        bound = np.abs(target) + math.exp(-self.contraction_rate * start) * norm
        if not tight or norm == 0.0:
            return bound
        span = stop - start
        times = start + np.concatenate(([0.0], np.geomspace(0.02, 1e6, 48) / self.rate_max))
        times = np.minimum(times, stop) if math.isfinite(span) else times

        def path(theta):
            return np.exp(-np.outer(theta, times))

        run = _lanczos(self.drift, d[None, :], [path], floor=float(np.abs(target).max()), rate_max=self.rate_max)
        if run is None:
            return np.minimum(bound, self.modal().reach(state, target, start, tight=True, stop=stop))
        (basis, theta, rotation, error) = run[0]
        weights = norm * rotation[0]  # S^T |d| e_1
        decay, steps = _path_grid(theta, start, stop)
        path_bound = _path_bound(basis.T @ rotation, weights, decay, steps, target)
        return np.minimum(bound, path_bound + _REACH_MARGIN * error + 1e-13 * norm)

    def draw(self, d0, head, count, period, tail, rng):
        """(sum of the window's deviations, final deviation) from d0 = V(0) - V*, in the law of the modal form
        (``exact._propagate_modal``), every function of M applied by Lanczos.

        The modal form chains a head hop, the window and a tail hop, each adding its own normals; per mode
        the pair (sum, final) is then (f_sum, f_final)(lam) d0 plus a Gaussian whose 2 x 2 covariance C(lam)
        sums the outer products of the normals' coefficients.  With its Cholesky factor R(lam) per mode,
        (sum, final) = (f_sum d0 + R11 u1, f_final d0 + R21 u1 + R22 u2) for u1, u2 ~ N(0, I): three
        Lanczos columns (d0, u1, u2) whatever the run.  Draw order: when noisy, n normals u1, then n u2.
        Cost O(n^2 k) for k Lanczos steps, k independent of t and K.
        """
        s2 = self.noise_level**2
        n = d0.shape[0]
        # after a long head hop d0 leaves at most e^-40 / K of itself in the run: its column is left out.
        # Only with the floor of lambda_min already made (the engine choice's checks make it with rails or
        # a quantised ADC): making it for this alone costs more than the column it may save
        rate_floor = self._memo.get(("rate_floor",), 0.0)
        if head * rate_floor > math.log(max(count, 1)) + 40.0:
            d0 = np.zeros_like(d0)
        starts = [d0]
        if s2 > 0.0:
            starts += [rng.standard_normal(n), rng.standard_normal(n)]
            if not count:  # no window: u1's coefficients (R11, R21) are zero, its column is left out
                starts[1] = np.zeros(n)
        columns = [
            partial(_run_functions, column=c, s2=s2, head=head, count=count, period=period, tail=tail)
            for c in range(len(starts))
        ]
        starts = np.stack(starts)
        floor = float(np.linalg.norm(d0)) + self.noise_level
        run = _lanczos(self.drift, starts, columns, floor=floor, rate_max=self.rate_max)
        if run is None:  # the modal form (one eigh) applies the same functions
            modal = self.modal()
            out = sum(
                modal.modes @ (f(modal.rates) * (modal.modes.T @ v)[:, None])
                for f, v in zip(columns, starts, strict=True)
            )
        else:
            out = _combine(run, starts, columns)
        return out[:, 0], out[:, 1]


def _run_functions(lam, column, s2, head, count, period, tail) -> np.ndarray:
    """(k, 2): the (sum, final) coefficients at rates lam of column 0 (the deviation d0), 1 (u1) or 2 (u2)
    of :meth:`KrylovModel.draw`: the modal form's chain of scalar maps, its normals folded into R(lam)."""
    decay_h, sd_h = _hop_coefficients(lam, s2, head)
    decay_t, sd_t = _hop_coefficients(lam, s2, tail)
    if count:
        mean_sum, mean_last, l11, l21, l22 = _window_coefficients(lam, s2, period, count)
    else:
        zero = np.zeros_like(lam)
        mean_sum, mean_last, l11, l21, l22 = zero, np.ones_like(lam), zero, zero, zero
    if column == 0:
        return np.stack((mean_sum * decay_h, decay_t * mean_last * decay_h), axis=1)
    # the normals' (sum, final) coefficients: head hop, window (z1, z2), tail hop
    noise = [
        (mean_sum * sd_h, decay_t * mean_last * sd_h),
        (l11, decay_t * l21),
        (np.zeros_like(lam), decay_t * l22),
        (np.zeros_like(lam), sd_t),
    ]
    c11 = sum(a * a for a, _ in noise)
    c21 = sum(a * b for a, b in noise)
    c22 = sum(b * b for _, b in noise)
    r11 = np.sqrt(c11)
    r21 = np.divide(c21, r11, out=np.zeros_like(c21), where=r11 > 0.0)
    if column == 1:
        return np.stack((r11, r21), axis=1)
    return np.stack((np.zeros_like(lam), np.sqrt(np.maximum(c22 - r21**2, 0.0))), axis=1)


def prepare_dense(drift: np.ndarray, noise_sd: np.ndarray, symmetric: bool | None = None) -> KrylovModel | LinearModel:
    """The exact engine's model of a dense array (n, n) with noise_sd (n,): this module's form for a symmetric
    positive definite array of at least MIN_CELLS cells with equal noise (one Cholesky, n^3 / 3),
    else ``exact.prepare`` (the modal or general form, O(n^3) with an eigendecomposition).  ``symmetric``:
    whether drift == drift^T exactly, when the caller knows (else checked here, O(n^2))."""
    n = drift.shape[0]
    if n < MIN_CELLS or not np.all(noise_sd == noise_sd[0]):
        return prepare(drift, noise_sd)
    if not (is_symmetric(drift) if symmetric is None else symmetric):
        return prepare(drift, noise_sd)
    # drift.T: the same symmetric matrix in Fortran order, which LAPACK copies without a transpose (half the time)
    lower, info = _potrf(drift.T, lower=1)
    if info != 0:  # not positive definite: the modal form says how unstable
        return prepare(drift, noise_sd)
    factor = (lower, True)
    return KrylovModel(
        drift=drift,
        noise_sd=noise_sd,
        factor=factor,
        noise_level=float(noise_sd[0]),
        rate_max=_row_sum_bound(drift),
    )


def is_symmetric(m: np.ndarray, tile: int = 128) -> bool:
    """m == m^T exactly, compared tile by tile (each tile against its mirror, both in cache; 2x faster than
    np.array_equal(m, m.T) at n = 1024, 8x at 4096).  O(n^2)."""
    n = m.shape[0]
    return all(
        np.array_equal(m[i : i + tile, j : j + tile], m[j : j + tile, i : i + tile].T)
        for i in range(0, n, tile)
        for j in range(i, n, tile)
    )


def _row_sum_bound(m: np.ndarray, rows: int = 256) -> float:
    """max_i sum_j |m_ij| (Gershgorin's bound of every |eigenvalue|), a block of rows at a time (no n x n
    temporary).  O(n^2)."""
    return max(float(np.abs(m[i : i + rows]).sum(axis=1).max()) for i in range(0, m.shape[0], rows))


def symmetric_norm(m: np.ndarray, steps: int = 30) -> float:
    """||m||_2 of a symmetric m (n, n): max |theta| over the Ritz values of ``steps`` Lanczos steps (full
    reorthogonalisation) from a fixed start, times 1.1, capped by the Frobenius norm, like
    ``arrays._spectral_norm``'s power iteration (30 steps of m^T m, 60 products) at half its products;
    Lanczos' extreme Ritz values converge faster than the power method's (Kuczynski and Wozniakowski 1992).
    Cost O(n^2 steps)."""
    n = m.shape[0]
    steps = min(steps, n)
    basis = np.zeros((steps + 1, n))
    start = 1.0 + np.arange(n) / n  # deterministic: no device randomness used
    basis[0] = start / np.linalg.norm(start)
    alpha, beta = np.zeros(steps), np.zeros(steps)
    k = steps
    for j in range(steps):
        w = _products(m, basis[j][None, :])[0]
        alpha[j] = basis[j] @ w
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        if beta[j] <= 1e-14 * (abs(alpha[j]) + 1e-300):  # an invariant subspace
            k = j + 1
            break
        basis[j + 1] = w / beta[j]
    theta = scipy.linalg.eigvalsh_tridiagonal(alpha[:k], beta[: k - 1])
    estimate = max(abs(float(theta[0])), abs(float(theta[-1])))
    return min(1.1 * estimate, float(np.linalg.norm(m)))


def _rate_floor(factor: tuple) -> float:
    """A lower bound of lambda_min(M), M = L L^T (factor = (L, True)), 1 / tau: (1 - eps) / theta, theta the
    largest Ritz value of M^-1 on the block Krylov space of p = _FLOOR_BLOCK Gaussian start vectors (fixed
    seed) after k block steps (Cholesky solves with p right-hand sides, one pass over L for all p).

    For one start uniform on the sphere, P(theta_1 < (1 - eps) lambda_max(M^-1)) <= delta = 1.648 sqrt(n)
    e^{-sqrt(eps) (2k - 1)} after k steps (Kuczynski and Wozniakowski, SIAM J. Matrix Anal. Appl. 13, 1992,
    Thm 4.2).  The block space holds each start's own Krylov space, so its theta is at least each of theirs,
    and it fails only when all p independent starts fail: probability at most delta^p.  k is the least
    that makes this at most _FLOOR_FAILURE (8 at n = 4096), below the engine choice's own union bound
    (1e-9).  Cost O(n^2 p k).
    """
    lower, _ = factor
    n = lower.shape[0]
    p = min(_FLOOR_BLOCK, n)
    per_start = _FLOOR_FAILURE ** (1.0 / p)
    steps = math.ceil((math.log(1.648 * math.sqrt(n) / per_start) / math.sqrt(_FLOOR_SLACK) + 1.0) / 2.0)
    steps = max(1, min(steps, n // p))
    block, _ = np.linalg.qr(np.random.default_rng(0x5EED).standard_normal((n, p)))
    basis, images = [], []
    for j in range(steps):
        image, info = _potrs(lower, block, lower=1)
        if info != 0:
            raise ValueError(f"dpotrs failed with info {info}")
        basis.append(block)
        images.append(image)
        if j + 1 == steps:
            break
        span = np.hstack(basis)
        w = image.copy()
        for _ in range(2):  # against every block so far, twice
            w -= span @ (span.T @ w)
        block, triangle = np.linalg.qr(w)
        if np.abs(np.diagonal(triangle)).min() <= 1e-12 * np.abs(triangle).max():  # (nearly) invariant
            break
    span = np.hstack(basis)
    rayleigh = span.T @ np.hstack(images)
    theta = float(np.linalg.eigvalsh(0.5 * (rayleigh + rayleigh.T))[-1])
    return (1.0 - _FLOOR_SLACK) / theta


def _products(drift: np.ndarray, q: np.ndarray) -> np.ndarray:
    """q M for q (p, n) and M symmetric, row by row with BLAS's symmetric product (dsymv), which reads one
    triangle of M: 1.7x a general product at n = 4096 and 2x at 1024, and faster than one product of all
    rows (OpenBLAS's gemm with 2-5 columns) at either size.  Cost O(n^2 p)."""
    fortran = drift.T if drift.flags.c_contiguous else np.asfortranarray(drift)  # M^T = M, in BLAS's order
    w = np.empty_like(q)
    for i in range(q.shape[0]):
        w[i] = _symv(1.0, fortran, q[i], lower=1)
    return w


def _combine(run, starts, per_column) -> np.ndarray:
    """sum over the columns c of |v_c| Q_c S_c f_c(theta_c) S_c^T e_1, (n, r)."""
    total = None
    for (basis, theta, rotation, _), start, f in zip(run, starts, per_column, strict=True):
        if basis.shape[0] == 0:
            continue
        coefficients = rotation @ (f(theta) * (float(np.linalg.norm(start)) * rotation[0])[:, None])
        part = basis.T @ coefficients
        total = part if total is None else total + part
    if total is None:
        n = starts.shape[1]
        r = per_column[0](np.ones(1)).shape[1]
        return np.zeros((n, r))
    return total


def _lanczos(drift: np.ndarray, starts: np.ndarray, functions, floor: float, rate_max: float) -> list | None:
    """Lanczos with full reorthogonalisation from each row of ``starts`` (p, n), all in one batch.

    functions[c](theta) -> (k, r) values of column c's functions at Ritz values theta.  The columns' results
    |v| S f(theta) S^T e_1 are summed by the caller, so each must settle (change between checks
    _CHECK_EVERY steps apart) to _TOLERANCE times the largest of the columns' |v| max |f| and ``floor``
    (the scale of what they are added to), or its Krylov space become invariant (a step's norm below
    1e-14 rate_max, an upper bound of ||M||).  Returns per column (basis Q (k, n), theta (k,), S (k, k),
    the last change, l2 in the cells' basis), or None when _MAX_STEPS did not suffice.
    Cost O(n^2 p k + n p k^2).
    """
    p, n = starts.shape
    norms = np.linalg.norm(starts, axis=1)
    limit = min(n, _MAX_STEPS)
    basis = np.zeros((p, limit + 1, n))
    alpha = np.zeros((p, limit))
    beta = np.zeros((p, limit))
    results: list = [None] * p
    previous: list = [None] * p
    sizes = np.zeros(p)
    active = list(np.flatnonzero(norms > 0.0))
    for c in range(p):
        if norms[c] > 0.0:
            basis[c, 0] = starts[c] / norms[c]
        else:
            results[c] = (np.zeros((0, n)), np.zeros(0), np.zeros((0, 0)), 0.0)
    for j in range(limit):
        if not active:
            return results
        rows = slice(None) if len(active) == p else np.array(active)  # a view while every column runs
        q = basis[rows, j]
        w = _products(drift, q)
        alpha[rows, j] = np.einsum("pn,pn->p", w, q)
        # the three-term recurrence first (most of w's length along the basis), then classical Gram-Schmidt
        # against the whole basis, repeated when it still cancelled much ("twice is enough")
        w -= alpha[rows, j, None] * q
        if j:
            w -= beta[rows, j - 1, None] * basis[rows, j - 1]
        span = basis[rows, : j + 1]  # (a, j+1, n)
        before = np.linalg.norm(w, axis=1)
        for _ in range(2):
            w -= np.matmul(span.transpose(0, 2, 1), np.matmul(span, w[:, :, None]))[:, :, 0]
            after = np.linalg.norm(w, axis=1)
            if np.all(after > 0.7 * before):
                break
            before = after
        beta[rows, j] = after
        invariant = after <= 1e-14 * rate_max
        basis[rows, j + 1] = np.divide(w, after[:, None], out=np.zeros_like(w), where=~invariant[:, None])
        if (j + 1) % _CHECK_EVERY and j + 1 < limit and not invariant.any():
            continue
        k = j + 1
        settled = []
        for index, c in enumerate(active):
            if not (invariant[index] or k % _CHECK_EVERY == 0 or k == limit):
                continue
            theta, rotation = scipy.linalg.eigh_tridiagonal(alpha[c, :k], beta[c, : k - 1])
            values = functions[c](theta)
            coefficients = rotation @ (values * (norms[c] * rotation[0])[:, None])  # (k, r)
            sizes[c] = norms[c] * float(np.abs(values).max())
            last = previous[c]
            change = np.inf
            if last is not None:
                change = math.hypot(
                    float(np.linalg.norm(coefficients[: last.shape[0]] - last)),
                    float(np.linalg.norm(coefficients[last.shape[0] :])),
                )
            previous[c] = coefficients
            settled.append((c, invariant[index], change, k, theta, rotation))
        level = _TOLERANCE * max(float(sizes.max()), floor)
        for c, invariant_c, change, k, theta, rotation in settled:
            if invariant_c or change <= level:
                results[c] = (basis[c, :k].copy(), theta, rotation, 0.0 if invariant_c else change)
                active.remove(c)
    return results if not active else None
