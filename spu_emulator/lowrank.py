"""The exact engine for GGN arrays without mismatch (TNGD App. C): M = beta I + gamma J^T H J in
O(N m) per vector, N x N never formed (see :mod:`spu_emulator.exact` for the engine itself)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .exact import _path_bound, _path_grid, _per_force, _scalar_hop, _scalar_window

__all__ = ["LowRankModel", "diagonal_blocks", "prepare_ggn"]


@dataclass(frozen=True)
class LowRankModel:
    """The exact engine's view of a GGN array without mismatch (TNGD App. C); N x N is never formed.

    The drift is M = beta I + gamma j^T h j with j (m, N) the J array (the J^T array is its exact
    transpose; ``j`` is held as the device holds it, integer codes or float conductances, and the
    unit per code is folded into ``coefs``, so W = j^T A is the same either way), h (m, m)
    symmetric positive semi-definite, gamma = 1 / c and beta = gamma times the damping conductance,
    every cell alike.  With h = B B^T (a Cholesky factor, or from eigh(h) when h is singular) and
    B^T G B = P diag(mu) P^T, G = j j^T (m x m), the columns of W = j^T A, A = B P diag(mu^-1/2)
    over the mu > 0, are orthonormal eigenvectors of M with rates beta + gamma mu; on the rest of
    the space (the complement of range(W)) M acts as beta.  A function of M is then

        f(M) x = f(beta) x + W (f(rates) - f(beta)) W^T x,

    O(N m) per vector, and numerically sound even where mu is small (the error of W's normalisation
    there is multiplied by f(rates) - f(beta), which is as small).  When W spans the whole space
    (m >= N) any base rate gives the same f(M); beta is kept (for the same soundness) unless it is not
    positive, when the largest rate stands in.

    coefs: A (m, r); rates: (r,); base_rate: beta (the largest rate when the complement is empty
    and beta <= 0); complement: N - r; noise_level: the cells' common noise_sd (V / sqrt(tau));
    diagonal_bound: (N,) an upper bound of M_ii, beta + gamma ||h||_2 |j[:, i]|^2.
    """

    j: np.ndarray
    coefs: np.ndarray
    rates: np.ndarray
    base_rate: float
    complement: int
    noise_level: float
    stable: bool
    rate_max: float
    rate_min: float
    diagonal_bound: np.ndarray
    form: str = "lowrank"
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def contractive(self) -> bool:
        """M is symmetric, so contractive exactly when stable."""
        return self.stable

    @property
    def n(self) -> int:
        return self.j.shape[1]

    def project(self, x: np.ndarray) -> np.ndarray:
        """W^T x for x (N,) or (N, k).  Cost O(N m k), one read of j."""
        return self.coefs.T @ _times(self.j, x)

    def expand(self, y: np.ndarray) -> np.ndarray:
        """W y for y (r,) or (r, k).  Cost O(N m k), one read of j."""
        return _transpose_times(self.j, self.coefs @ y)

    def apply(self, values: np.ndarray, x: np.ndarray) -> np.ndarray:
        """f(M) x given values = f at (base_rate, *rates), a vector of r + 1.  Cost O(N m)."""
        return values[0] * x + self.expand((values[1:] - values[0]) * self.project(x))

    def all_rates(self) -> np.ndarray:
        """(base_rate, *rates): the rates a function of M is evaluated at."""
        return np.concatenate(([self.base_rate], self.rates))

    def fixed_point(self, force: np.ndarray) -> np.ndarray:
        """V* = M^-1 f.  Cost O(N m), once per force array (the engine choice and the run share it)."""
        return _per_force(self._memo, force, lambda f: self.apply(1.0 / self.all_rates(), f))

    def stationary_var_upper(self) -> np.ndarray:
        """Per cell, an upper bound of the stationary variance: s^2 / (2 rate_min).  O(N)."""
        return np.full(self.n, self.noise_level**2 / (2.0 * self.rate_min))

    def fresh_var_lower(self, period: float) -> np.ndarray:
        """Per cell, a lower bound of the fresh variance per sample, volts^2.  O(N).

        The fresh variance is diag q(M) with q(x) = s^2 (1 - e^{-2 x period}) / (2 x), convex and
        decreasing, so by Jensen's inequality in the eigenbasis q(M)_ii >= q(M_ii) >= q(bound_i).
        """
        x = np.minimum(self.diagonal_bound, self.rate_max)
        return self.noise_level**2 * -np.expm1(-2.0 * x * period) / (2.0 * x)

    def reach(
        self, state: np.ndarray, target: np.ndarray, start: float = 0.0, tight: bool = False, stop: float = math.inf
    ) -> np.ndarray:
        """Per cell, a bound on |V_i(s)| for start <= s <= stop along the mean path from ``state`` (s = 0) to
        ``target``.  O(N m); ``tight``: O(N m r), r the modes kept.

        V(s) = (V* + e^{-beta s} c) + W e^{-rates s} y with y = W^T d and c = d - W y, d = V(0) - V*.
        The first term is affine in e^{-beta s} in [e^{-beta stop}, e^{-beta start}], so at most its
        larger end; the second at most e^{-r start} ||y||, r the least
        of the rates (the rows of W have norm at most 1).  ``tight``: the smaller of that and the
        path followed cell by cell as in :func:`spu_emulator.exact._modal_path_bound`, the complement c one more mode of
        rate beta; the l2 bound grows as sqrt(N) for a path spread over many cells, this one does not.
        W is formed a block of rows at a time (at most 2^22 values held): O(N m r + N r G).
        """
        y, c = self._split(state, target)
        modes = math.exp(-float(self.rates.min()) * start) if self.rates.size else 0.0
        edge = np.abs(target + math.exp(-self.base_rate * start) * c)
        far = np.abs(target + math.exp(-self.base_rate * stop) * c)
        bound = np.maximum(far, edge) + modes * float(np.linalg.norm(y))
        if not tight:
            return bound
        rates = np.append(self.rates, self.base_rate)
        weights = np.append(y, 1.0)  # c's own weight: its "mode" is c itself
        decay, steps = _path_grid(rates, start, stop)  # a contractive model: every rate > 0
        size = max(1, 2**22 // weights.size)
        for first in range(0, state.shape[0], size):
            rows = slice(first, first + size)
            block = np.column_stack((_transpose_times(self.j[:, rows], self.coefs), c[rows]))
            bound[rows] = np.minimum(bound[rows], _path_bound(block, weights, decay, steps, target[rows]))
        return bound

    def draw(self, d0, head, count, period, tail, rng):
        """(sum of the window's deviations, final deviation) from d0 = V(0) - V*: see :func:`_propagate_lowrank`."""
        return _propagate_lowrank(self, d0, head, count, period, tail, rng)

    def _split(self, state: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y, c) = (W^T d, d - W y) for d = state - target, kept for the last (state, target): the engine
        choice asks ``reach`` up to four times about one run, and each split reads J twice.  O(N m)."""
        last = self._memo.get("split")
        if last is not None and last[1] is target and np.array_equal(last[0], state):
            return last[2], last[3]
        d = state - target
        y = self.project(d)
        c = d - self.expand(y)
        self._memo["split"] = (state.copy(), target, y, c)  # target kept alive: its identity stays its own
        return y, c


def diagonal_blocks(h: np.ndarray) -> list[slice]:
    """The diagonal blocks of a symmetric h: the finest contiguous slices with h zero outside them.  O(m^2)."""
    m = h.shape[0]
    if m == 0:
        return []
    nonzero = h != 0.0
    last = np.where(nonzero.any(axis=1), m - 1 - np.argmax(nonzero[:, ::-1], axis=1), 0)
    reach = np.maximum.accumulate(np.maximum(last, np.arange(m)))
    ends = np.flatnonzero(reach == np.arange(m)) + 1
    return [slice(int(start), int(end)) for start, end in zip(np.r_[0, ends[:-1]], ends, strict=True)]


def prepare_ggn(
    j: np.ndarray,
    h: np.ndarray,
    damping: np.ndarray,
    inv_c: np.ndarray,
    noise_sd: np.ndarray,
    column_norms: np.ndarray | None = None,
    unit: float = 1.0,
    row_squares: np.ndarray | None = None,
) -> tuple[LowRankModel | None, str]:
    """Analyse a GGN array for the exact engine: j (m, N) J array, as conductances in g0 or as integer
    codes of ``unit`` g0 each (the model then keeps the codes: 2 bytes a value for 16-bit parts, not 8),
    h (m, m) H array, damping (N,) damping conductances, inv_c (N,) 1 / c_i, noise_sd (N,);
    column_norms (N,) sum_k (unit j[k, i])^2 and row_squares (m,) sum_i j[k, i]^2 (integer codes) when
    the caller has them (else computed, one pass over j each).

    The Gram matrix j j^T of 16-bit codes is formed with float32 products off its diagonal, at an error
    far below that of the codes themselves (derived in :func:`_gram`), and its diagonal exactly.
    Returns (model, "") or (None, why) when the array has no exact low-rank form: the cells must be
    alike (capacitance, damping, noise) and h symmetric positive semi-definite.  Cost O(N m^2 + m^3).
    """
    m, n = j.shape
    if not (np.all(inv_c == inv_c[0]) and np.all(damping == damping[0]) and np.all(noise_sd == noise_sd[0])):
        return None, (
            "its cells differ (capacitance or damping-element mismatch, or Johnson noise that depends on each"
            " cell's conductance)"
        )
    if not np.array_equal(h, h.T):
        return None, "its H array is not symmetric"
    # h = root root^T, block by block along h's diagonal blocks (a batch's loss Hessians are d_z x d_z
    # blocks): a Cholesky factor where a block is positive definite, else from eigh; one block when dense
    blocks = diagonal_blocks(h)
    roots, lowest, h_top = [], 0.0, 0.0
    for block in blocks:
        h_block = h[block, block]
        try:
            roots.append(np.linalg.cholesky(h_block))
            h_top = max(h_top, min(float(np.linalg.norm(h_block)), float(np.abs(h_block).sum(axis=1).max())))
        except np.linalg.LinAlgError:
            values, vectors = np.linalg.eigh(h_block)
            lowest = min(lowest, float(values[0]))
            h_top = max(h_top, float(np.abs(values).max()))
            roots.append(vectors * np.sqrt(np.clip(values, 0.0, None)))
    if lowest < -1e-10 * h_top:
        return None, (
            f"its H array is not positive semi-definite (eigenvalue {lowest:.3g} against {h_top:.3g});"
            " driver.GGN loads keep H's codes positive semi-definite"
        )
    inner = _gram(j, row_squares)
    if unit != 1.0:
        inner *= unit * unit
    for block, root in zip(blocks, roots, strict=True):  # root^T (J J^T) root at O(m^2 d) for d x d blocks
        inner[block, :] = root.T @ inner[block, :]
    for block, root in zip(blocks, roots, strict=True):
        inner[:, block] = inner[:, block] @ root
    mu, rotation = np.linalg.eigh(0.5 * (inner + inner.T))
    top_mu = float(mu[-1]) if m else 0.0
    keep = np.flatnonzero(mu > m * np.finfo(float).eps * top_mu) if top_mu > 0.0 else np.zeros(0, dtype=int)
    keep = keep[-n:]  # at most N modes in N dimensions
    kept = rotation[:, keep]
    coefs = np.empty((m, keep.size))
    for block, root in zip(blocks, roots, strict=True):
        coefs[block] = root @ kept[block]
    coefs /= np.sqrt(mu[keep])
    if unit != 1.0:
        coefs *= unit  # W = (unit j)^T A = j^T (unit A): the model reads the codes as they are
    gamma = float(inv_c[0])
    beta = gamma * float(damping[0])
    rates = beta + gamma * mu[keep]
    complement = n - keep.size
    present = list(rates) + ([beta] if complement else [])
    rate_min, rate_max = float(min(present)), float(max(present))
    if column_norms is None:
        column_norms = _column_norms(j) * (unit * unit)
    return (
        LowRankModel(
            j=j,
            coefs=coefs,
            rates=rates,
            # beta even with an empty complement: then f(rates) - f(beta) is small wherever mu is
            base_rate=beta if complement or beta > 0.0 else rate_max,
            complement=complement,
            noise_level=float(noise_sd[0]),
            stable=rate_min > 0.0,
            rate_max=rate_max,
            rate_min=rate_min,
            diagonal_bound=beta + gamma * h_top * column_norms,
        ),
        "",
    )


# j is read a block of columns at a time when it is integer codes: each block is converted to float64
# (exact) and multiplied by BLAS, so no float copy of j is ever whole.  The passes (a few vectors) are
# memory-bound: blocks of about 2^18 values (2 MB) keep the converted block in cache; the Gram matrix is
# compute-bound: larger blocks (2^21 values) let BLAS run at its full rate.
_PASS_VALUES = 1 << 18
_GRAM_VALUES = 1 << 21


def _column_blocks(j: np.ndarray, values: int):
    """Slices of j's columns holding about ``values`` values each."""
    m, n = j.shape
    size = max(64, values // max(m, 1))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _times(j: np.ndarray, x: np.ndarray) -> np.ndarray:
    """j @ x for j (m, N) (float, or integer codes read in float64 blocks) and x (N,) or (N, k).  O(N m k)."""
    if j.dtype.kind == "f":
        return j @ x
    out = np.zeros((j.shape[0],) + x.shape[1:])
    for cols in _column_blocks(j, _PASS_VALUES):
        out += j[:, cols].astype(np.float64) @ x[cols]
    return out


def _transpose_times(j: np.ndarray, y: np.ndarray) -> np.ndarray:
    """j^T @ y for j (m, N) and y (m,) or (m, k), as :func:`_times`.  O(N m k)."""
    if j.dtype.kind == "f":
        return j.T @ y
    out = np.empty((j.shape[1],) + y.shape[1:])
    for cols in _column_blocks(j, _PASS_VALUES):
        np.matmul(j[:, cols].T.astype(np.float64), y, out=out[cols])
    return out


def _gram(j: np.ndarray, row_squares: np.ndarray | None = None) -> np.ndarray:
    """j j^T (m, m).  Cost O(N m^2): the one O(N m^2) step of the exact engine's analysis.

    Float j: one float64 BLAS product.  Integer codes of at most 16 bits: the off-diagonal entries are
    float32 BLAS products over blocks of K columns (each code exact in float32; the products half the
    cost of float64 ones) summed across blocks in float64, and the diagonal is ``row_squares``, the
    exact sum_i codes[k, i]^2 (computed here when not given).  Why float32 is sound here: a block's
    entry G_kl = sum_i c_ki c_li is a sum of terms of both signs off the diagonal, so its float32
    rounding is a random walk, about 2^-24 sqrt(K) |c|^2 sqrt(K) per block and 2^-24 K |c|^2
    sqrt(N / K) in all (|c| the rms code), relative to G_kk = N |c|^2 about 2^-24 sqrt(K / N); the
    codes' own rounding (+-1/2 of a code on each J element) moves G_kl by about 0.4 sqrt(N) |c|,
    relative 0.4 / (sqrt(N) |c|).  Their ratio, 2^-24 sqrt(K) |c| / 0.4, is 0.011 for K = 3300
    columns and a code range used to |c| = 5800 (max|J| at full scale, Gaussian J): measured on the
    benchmark's problem (N = 1e5, m = 640) the float32 error is 5e-9 of the mean diagonal at most and
    moves the eigenvalues by 6e-9 of it, 200 times below what rounding J to codes moved them (1.1e-6).
    The diagonal, where every term is positive and float32 would err most, is exact.  Wider codes
    (int32) and float j take float64 products."""
    if j.dtype.kind == "f" or j.dtype.itemsize > 2:
        inner = np.zeros((j.shape[0], j.shape[0]))
        if j.dtype.kind == "f":
            return j @ j.T
        for cols in _column_blocks(j, _GRAM_VALUES):
            block = j[:, cols].astype(np.float64)
            inner += block @ block.T
        return inner
    m = j.shape[0]
    inner = np.zeros((m, m))
    product = np.empty((m, m), dtype=np.float32)
    for cols in _column_blocks(j, _GRAM_VALUES):
        block = j[:, cols].astype(np.float32)
        np.matmul(block, block.T, out=product)
        inner += product
    if row_squares is None:
        row_squares = _row_squares(j)
    inner[np.diag_indices(m)] = row_squares
    return inner


def _row_squares(j: np.ndarray) -> np.ndarray:
    """sum_i j[k, i]^2 (m,) of integer codes, exact (int64 sums).  O(N m)."""
    out = np.zeros(j.shape[0], dtype=np.int64)
    for cols in _column_blocks(j, _PASS_VALUES):
        block = j[:, cols].astype(np.int64)
        out += np.einsum("ki,ki->k", block, block)
    return out.astype(np.float64)


def _column_norms(j: np.ndarray) -> np.ndarray:
    """sum_k j[k, i]^2 (N,), a block of columns at a time.  O(N m)."""
    out = np.empty(j.shape[1])
    for cols in _column_blocks(j, _PASS_VALUES):
        block = j[:, cols].astype(np.float64)
        out[cols] = np.einsum("ki,ki->i", block, block)
    return out


def _propagate_lowrank(model, d0, head, count, period, tail, rng):
    """As _propagate_modal, with the complement a single scalar OU projected off the modes.

    Draw order: when noisy, N normals for the head hop, then N for z1 and N for z2 of the window (when
    it has samples), then N for the tail hop.  Every vector on the way is kept as x a + W b, x the
    (N, k) matrix of d0 and the draws, so J is read twice in all: once to project x, once to expand
    the two results.
    """
    lam = model.all_rates()
    s2 = model.noise_level**2
    n = d0.shape[0]
    noisy = s2 > 0.0
    width = 1 + ((4 if count else 2) if noisy else 0)
    x = np.empty((n, width), order="F")  # one draw at a time into its column: no list of N-vectors held
    x[:, 0] = d0
    for column in range(1, width):
        x[:, column] = rng.standard_normal(n)
    y = model.project(x)
    basis = np.eye(width)
    zero = np.zeros(model.rates.shape[0])

    def apply(values, vector):
        """f(M) v for v = x a + W b given as (a, b), values = f at (base_rate, *rates)."""
        a, b = vector
        return values[0] * a, values[1:] * b + (values[1:] - values[0]) * (y @ a)

    def add(*vectors):
        return sum(v[0] for v in vectors), sum(v[1] for v in vectors)

    def hop(vector, h, column):
        decay, sd = _scalar_hop(model._memo, lam, s2, h)
        moved = apply(decay, vector)
        return add(moved, apply(sd, (basis[column], zero))) if noisy else moved

    d = hop((basis[0], zero), head, 1)
    total = (np.zeros(width), zero)
    if count:
        mean_sum, mean_last, l11, l21, l22 = _scalar_window(model._memo, lam, s2, period, count)
        if noisy:
            z1, z2 = (basis[2], zero), (basis[3], zero)
            total = add(apply(mean_sum, d), apply(l11, z1))
            d = add(apply(mean_last, d), apply(l21, z1), apply(l22, z2))
        else:
            total, d = apply(mean_sum, d), apply(mean_last, d)
    d = hop(d, tail, width - 1)
    out = x @ np.column_stack((total[0], d[0])) + model.expand(np.column_stack((total[1], d[1])))
    return out[:, 0], out[:, 1]
