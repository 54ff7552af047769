"""Exact engine: the linear cell array propagated in distribution, with no time steps.

While no nonlinear effect acts (no rail reached, no ADC clipping), the array is
the linear SDE

    dV = (f - M V) dt + S dW,   M = C^-1 a,  S = diag(noise_sd),  D = S S^T,

with fixed point V* = M^-1 f and stationary covariance Sigma solving the
Lyapunov equation M Sigma + Sigma M^T = D.  Its transition over a time h is
exactly Gaussian: mean V* + e^{-M h} (V - V*), covariance Sigma - e^{-M h} Sigma
e^{-M^T h}.  That holds for any stable M, normal or not (no symmetric-part
shortcut).

A run of length t with K ADC samples at spacing Delta after burn_in is split
into three stretches: burn-in up to the last sample time before the window, the
K sample times, and the tail after the last sample.  Over the window, with
d_k = V(s_k) - V*, Phi = e^{-M Delta}, P = (I - Phi)^-1 and Q = Sigma - Phi Sigma Phi^T
(the fresh variance per sample), the pair (sum_k d_k, d_K) is jointly Gaussian:

    E[sum]        = Phi P (I - Phi^K) d_0,          E[d_K] = Phi^K d_0
    Cov(sum)      = P [K Q - A Q - Q A^T + Phi Sigma Phi^T - Phi^{K+1} Sigma Phi^{(K+1)T}] P^T
    Cov(sum, d_K) = P [Q (P (I - Phi^K))^T - Phi (Sigma - Phi^K Sigma Phi^{KT})]
    Cov(d_K)      = Sigma - Phi^K Sigma Phi^{KT},    A = Phi P (I - Phi^K)

so the accumulated mean and the final state are drawn in one go, at a cost that
does not depend on t or K.

Two forms, chosen once per programmed matrix by :func:`prepare`:
- "modal": M symmetric and every cell equally noisy (no mismatch; the TNGD and
  ideal presets).  The eigenbasis of M is orthonormal and decouples the noise,
  so each mode is a scalar OU process.  O(n^3) once (eigh), O(n^2) per run.
- "general": any stable M (mismatch makes it non-symmetric and non-normal) and
  any diagonal D.  O(n^3) once (Lyapunov), O(n^3) per run (matrix exponentials
  and a 2n x 2n Cholesky factor), still independent of t.
- "lowrank" (:class:`~spu_emulator.lowrank.LowRankModel`, from :func:`~spu_emulator.lowrank.prepare_ggn`): a GGN array
  M = gamma (J^T H J + d I) without mismatch and with equal noise per cell (TNGD
  App. C).  Its modes are the range of J^T H J (at most m of them, found from
  m x m matrices) and a complement with the single rate gamma d, handled as one
  scalar OU process projected off those modes.  O(N m^2 + m^3) once, O(N m) per
  run; N x N is never formed.

Lagged sums (RUN's record_lags): :func:`propagate_lagged` draws sum_k V_{k+L} V_k^T over the window in
closed form for the modal form around V* = 0 (exact mean, the stationary covariance by Isserlis'
theorem, Gaussian shape), at a cost that does not depend on the window; the firmware uses it only
with ideal converters and a window of at least 200 correlation times, and steps otherwise.

ADC treatment (done by the firmware): per-cell gain and offset errors are linear
and exact; ADC input noise adds N(0, noise_v^2 / K) to the mean, exactly.
Rounding to codes is modelled as an independent error, uniform over one LSB,
added to each sample (variance LSB^2 / 12, so N(0, 1 / (12 K)) in codes on the
mean).  That model is exact in the limit where the signal moves by at least
about one LSB between samples (the array's own noise dithers the converter);
``auto`` uses this engine with a quantised ADC only when the fresh noise per
sample is at least half an LSB, and never when a rail or the ADC's full scale is
within reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

__all__ = ["LinearModel", "prepare", "propagate", "propagate_lagged", "window"]


@dataclass(frozen=True)
class LinearModel:
    """Everything the exact engine needs about one programmed array (computed once per load).

    form: "modal" or "general"; stable: every eigenvalue of M has a positive real
    part; contractive: ||e^{-M h}||_2 <= 1 for all h (M + M^T positive definite),
    so the mean path never leaves the ball of radius |V(0) - V*| around V*;
    contraction_rate: mu, the least eigenvalue of (M + M^T) / 2, so that
    ||e^{-M h}||_2 <= e^{-mu h} (1 / tau); stationary_var: diag(Sigma), volts^2;
    rate_max: largest |eigenvalue| of M.
    """

    form: str
    drift: np.ndarray
    noise_sd: np.ndarray
    stable: bool
    contractive: bool
    stationary_var: np.ndarray
    rate_max: float
    contraction_rate: float = 0.0
    # modal form: M = W diag(rates) W^T, scalar noise level s (V / sqrt(tau))
    rates: np.ndarray | None = None
    modes: np.ndarray | None = None
    noise_level: float = 0.0
    # general form: LU factors of M, the stationary covariance Sigma, and the
    # eigenvectors of M when they are well conditioned (else expm is used)
    lu: tuple | None = None
    stationary_cov: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    eigenvectors_inv: np.ndarray | None = None
    # what runs of the same length reuse (a TNGD loop repeats one t): see _memoised
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def transition(self, h: float) -> np.ndarray:
        """e^{-M h}, (n, n).  Cost O(n^3), once per h (memoised)."""
        return _memoised(self._memo, ("transition", h), lambda: self._transition(h))

    def _transition(self, h: float) -> np.ndarray:
        if self.form == "modal":
            return (self.modes * np.exp(-self.rates * h)) @ self.modes.T
        if self.eigenvectors is None:
            return scipy.linalg.expm(-self.drift * h)
        return ((self.eigenvectors * np.exp(-self.eigenvalues * h)) @ self.eigenvectors_inv).real

    def fixed_point(self, force: np.ndarray) -> np.ndarray:
        """V* = M^-1 f.  Cost O(n^2), once per force array (the engine choice and the run share it)."""
        return _per_force(self._memo, force, self._solve)

    def _solve(self, force: np.ndarray) -> np.ndarray:
        if self.form == "modal":
            return self.modes @ ((self.modes.T @ force) / self.rates)
        # LAPACK's getrs itself, as lu_solve calls it, without the wrapper's checks (tens of us at small n)
        target, info = _getrs(*self.lu, force)
        if info != 0:
            raise ValueError(f"getrs failed with info {info}")
        return target

    def fresh_var(self, period: float) -> np.ndarray:
        """diag(Q): variance a sample adds that the previous sample did not predict, volts^2.  Memoised."""
        return _memoised(self._memo, ("fresh_var", period), lambda: self._fresh_var(period))

    def _fresh_var(self, period: float) -> np.ndarray:
        if self.form == "modal":
            phi2 = np.exp(-2.0 * self.rates * period)
            q = self.noise_level**2 * (1.0 - phi2) / (2.0 * self.rates)
            return (self.modes**2) @ q
        phi = self.transition(period)
        sigma = self.stationary_cov
        return np.diag(sigma - phi @ sigma @ phi.T).copy()

    # the three checks of the firmware's engine choice; exact here, bounds in LowRankModel
    def stationary_var_upper(self) -> np.ndarray:
        """Per cell, an upper bound of the stationary variance (here diag(Sigma) itself), volts^2."""
        return self.stationary_var

    def fresh_var_lower(self, period: float) -> np.ndarray:
        """Per cell, a lower bound of the fresh variance per sample (here diag(Q) itself), volts^2."""
        return self.fresh_var(period)

    def reach(
        self, state: np.ndarray, target: np.ndarray, start: float = 0.0, tight: bool = False, stop: float = math.inf
    ) -> np.ndarray:
        """Per cell, a bound on |V_i(s)| for start <= s <= stop along the mean path V(s) = V* + e^{-M s} d
        from ``state`` (s = 0) to ``target`` V*, d = state - target (contractive M).

        ||e^{-M s} d|| <= e^{-mu s} ||d|| (mu = contraction_rate), so |V*_i| + e^{-mu start} ||d||: O(n).
        ``tight`` (modal form): the smaller of that and :func:`_modal_path_bound`, which follows each
        cell's own path up to ``stop`` (the end of the run), O(n^2 G) with G = 64 time points; the l2
        bound grows as sqrt(n) for a path spread over many cells, this one does not.
        """
        d = state - target
        bound = np.abs(target) + math.exp(-self.contraction_rate * start) * float(np.linalg.norm(d))
        if tight and self.form == "modal":
            bound = np.minimum(bound, _modal_path_bound(self.modes, self.rates, d, target, start, stop))
        return bound


def prepare(drift: np.ndarray, noise_sd: np.ndarray) -> LinearModel:
    """Analyse the programmed drift M (n, n) and noise_sd (n,).  Cost O(n^3), once per load."""
    n = drift.shape[0]
    symmetric = np.array_equal(drift, drift.T)
    isotropic = bool(np.all(noise_sd == noise_sd[0]))
    if symmetric and isotropic:
        rates, modes = np.linalg.eigh(drift)
        stable = bool(rates[0] > 0.0)
        s = float(noise_sd[0])
        var = (modes**2) @ (s**2 / (2.0 * rates)) if stable else np.full(n, np.inf)
        return LinearModel(
            form="modal",
            drift=drift,
            noise_sd=noise_sd,
            stable=stable,
            contractive=stable,
            stationary_var=var,
            rate_max=float(np.abs(rates).max()),
            contraction_rate=float(rates[0]),
            rates=rates,
            modes=modes,
            noise_level=s,
        )
    eigenvalues, vectors = np.linalg.eig(drift)
    stable = bool(eigenvalues.real.min() > 0.0)
    # e^{-M h} through the eigenbasis loses about cond(W) * eps; beyond 1e6 use expm instead
    well_conditioned = np.linalg.cond(vectors) < 1e6
    contraction_rate = float(np.linalg.eigvalsh(0.5 * (drift + drift.T))[0])
    contractive = contraction_rate > 0.0
    sigma = None
    var = np.full(n, np.inf)
    if stable:
        sigma = scipy.linalg.solve_continuous_lyapunov(drift, np.diag(noise_sd**2))
        sigma = 0.5 * (sigma + sigma.T)
        var = np.diag(sigma).copy()
    return LinearModel(
        form="general",
        drift=drift,
        noise_sd=noise_sd,
        stable=stable,
        contractive=contractive,
        stationary_var=var,
        rate_max=float(np.abs(eigenvalues).max()),
        contraction_rate=contraction_rate,
        lu=scipy.linalg.lu_factor(drift) if stable else None,  # singular when unstable: no fixed point
        stationary_cov=sigma,
        eigenvalues=eigenvalues if well_conditioned else None,
        eigenvectors=vectors if well_conditioned else None,
        eigenvectors_inv=np.linalg.inv(vectors) if well_conditioned else None,
    )


_PATH_POINTS = 64  # time points of _modal_path_bound


def _modal_path_bound(
    modes: np.ndarray, rates: np.ndarray, d: np.ndarray, target: np.ndarray, start: float, stop: float = math.inf
) -> np.ndarray:
    """Per cell, a bound on |V_i(s)| for start <= s <= stop, V(s) = V* + W e^{-L s} y with y = W^T d, for
    symmetric positive definite M = W L W^T.  O(n^2 G).

    Each term W_ik y_k e^{-l_k s} is monotone in s, so over [a, b] cell i moves from its value at a
    by at most sum_k |W_ik y_k| (e^{-l_k a} - e^{-l_k b}).  The path is evaluated at G points s_j
    from start (start + 0.02 / l_max geometrically up to start + 40 / l_min, or to stop if sooner)
    and each stretch [s_j, s_j+1] (the last to stop) gets its value at s_j plus that increment; the
    bound is the largest over the stretches, rigorous whatever the spacing.
    """
    decay, steps = _path_grid(rates, start, stop)
    return _path_bound(modes, modes.T @ d, decay, steps, target)


def _path_grid(rates: np.ndarray, start: float, stop: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
    """(e^{-l_k s_j}, its drop over each stretch [s_j, s_j+1], the last to stop), both (k, G)."""
    span = stop - start
    if not span > 0.0:
        decay = np.exp(-rates * start)[:, None]
        return decay, np.zeros_like(decay)
    high = min(40.0 / float(rates.min()), span)
    low = min(0.02 / float(rates.max()), 0.5 * high)
    times = start + np.concatenate(([0.0], np.geomspace(low, max(high, 2.0 * low), _PATH_POINTS - 1)))
    decay = np.exp(-np.outer(rates, times))
    end = np.exp(-rates * stop)[:, None]  # 0 for a path followed to infinity
    return decay, np.concatenate((decay[:, :-1] - decay[:, 1:], decay[:, -1:] - end), axis=1)


def _path_bound(
    modes: np.ndarray, y: np.ndarray, decay: np.ndarray, steps: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """max over the stretches of |V*_i + sum_k W_ik y_k e^{-l_k s_j}| + sum_k |W_ik y_k| drop_kj (see above)."""
    values = target[:, None] + modes @ (y[:, None] * decay)
    increments = np.abs(modes) @ (np.abs(y)[:, None] * steps)
    return (np.abs(values) + increments).max(axis=1)


_getrs = scipy.linalg.lapack.get_lapack_funcs("getrs", (np.zeros(1),))
_MEMO_ENTRIES = 64  # a model forgets its memo past this many entries (runs of many different lengths)


def _memoised(memo: dict, key: tuple, make):
    """memo[key], made by make() on first use.  The memo lives on a model, which is made afresh
    whenever the array, its noise or its parts change, so nothing stale is ever read."""
    try:
        return memo[key]
    except KeyError:
        pass
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    value = memo[key] = make()
    return value


def _per_force(memo: dict, force: np.ndarray, solve) -> np.ndarray:
    """solve(force), kept for the last force array (by identity: the firmware makes a new array per load)."""
    if memo.get("force") is not force:
        memo.update(force=force, target=solve(force))
    return memo["target"]


def window(t: float, burn_in: float, period: float) -> tuple[int, int]:
    """ADC sample times of a run: indices m0 < m <= m1 of the clock m * period in (burn_in, t].

    Returns (m0, m1); the number of samples is m1 - m0 (zero when the window is short).
    """
    m0 = math.floor(burn_in / period + 1e-9)
    m1 = math.floor(t / period + 1e-9)
    return m0, max(m0, m1)


def propagate(
    model: LinearModel,
    state: np.ndarray,
    fixed_point: np.ndarray,
    t: float,
    burn_in: float,
    period: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Draw the run's sample average and final state exactly.

    state: (n,) volts at the start; fixed_point: V*.  Samples at m * period for
    m0 < m <= m1 (see :func:`window`).  Returns (mean of V over the samples, or V*
    when there are none; final state at t; number of samples K).
    """
    m0, m1 = window(t, burn_in, period)
    count = m1 - m0
    head = m0 * period
    # the window counts a sample up to 1e-9 periods past t (rounding of t / period): never a negative hop
    tail = max(0.0, t - m1 * period if count else t - head)
    if model.form == "modal":
        total, final = _propagate_modal(model, state - fixed_point, head, count, period, tail, rng)
    elif model.form == "general":
        total, final = _propagate_general(model, state - fixed_point, head, count, period, tail, rng)
    else:  # a structured model (lowrank.LowRankModel) draws its own
        total, final = model.draw(state - fixed_point, head, count, period, tail, rng)
    mean = fixed_point + total / count if count else fixed_point.copy()
    return mean, fixed_point + final, count


def propagate_lagged(
    model: LinearModel,
    state: np.ndarray,
    fixed_point: np.ndarray,
    t: float,
    burn_in: float,
    period: float,
    lags: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """As :func:`propagate`, plus the window's lagged sums, for the modal form around V* = 0.

    sums[l] = sum_{k=1}^{K-L} V_{k+L} V_k^T, L = lags[l], over the K samples of the window (volts^2),
    drawn in closed form at a cost that does not depend on K (RUN's record_lags on the exact engine).
    In the eigenbasis of M the modes are independent AR(1) sequences y_i(k) = phi_i y_i(k-1) + noise,
    phi_i = e^{-r_i period}, stationary variance sigma_i^2 = s^2 / (2 r_i).  Given the modes a at the
    window's start, the mean is exact:

        E[T^L_ij] = a_i a_j phi_i^L G(phi_i phi_j, N) + [i = j] sigma_i^2 phi_i^L (N - G(phi_i^2, N)),

    N = K - L, G(rho, N) = sum_{k=1}^N rho^k.  By Isserlis' theorem only the entries (i, j) and (j, i)
    of the lags are correlated, with the stationary covariances (N = the smaller pair count)

        Cov(T^L_ij, T^L'_ij) = sigma_i^2 sigma_j^2 N S(phi_i, phi_j, |L - L'|),
        Cov(T^L_ij, T^L'_ji) = sigma_i^2 sigma_j^2 N S(phi_i, phi_j, L + L'),
        S(r1, r2, c) = sum_{d in Z} r1^|d| r2^|d + c|,

    (for i = j the two terms add), so the sums are drawn as a Gaussian with that mean and covariance,
    pair by pair, and rotated back, sums[l] = W T^L W^T.  Approximations, both of relative size
    tau_c / (K period) (tau_c the slowest correlation time): the covariance is the stationary one,
    and the sums' correlation with the window mean and the final state (nonzero only through the
    start's offset a) is left out; the shape is the central limit's (a window of many tau_c).
    Draw order: as :func:`propagate`, then one normal per variable of each pair i < j in row-major
    order (2q per pair, 2q - 1 when lag 0 is among the q lags), then q per mode.
    Cost O(n^3 q + n^2 q^3 + n^2 max(lags)), independent of K.
    """
    if model.form != "modal":
        raise ValueError("propagate_lagged needs the modal form")
    m0, m1 = window(t, burn_in, period)
    count = m1 - m0
    head = m0 * period
    tail = max(0.0, t - m1 * period if count else t - head)
    start: list[np.ndarray] = []
    total, final = _propagate_modal(model, state - fixed_point, head, count, period, tail, rng, start)
    mean = fixed_point + total / count if count else fixed_point.copy()
    sums = _lagged_sums_modal(model, start[0], period, count, np.asarray(lags, dtype=np.int64), rng)
    return mean, fixed_point + final, count, sums


def _geometric(x: np.ndarray, count: int) -> np.ndarray:
    """G(e^-x, N) = sum_{k=1}^N e^{-x k}, accurate for small x (N for x = 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.exp(-x) * np.expm1(-x * count) / np.expm1(-x)
    return np.where(x > 0.0, value, float(count))


def _pair_sum(x1: np.ndarray, x2: np.ndarray, c: int) -> np.ndarray:
    """S(e^-x1, e^-x2, c) = sum_{d in Z} e^{-x1 |d|} e^{-x2 |d + c|} for c >= 0 (symmetric in x1, x2; even in c).

    d >= 0 gives r2^c / (1 - r1 r2); d < -c gives r1^(c+1) r2 / (1 - r1 r2); -c <= d < 0 gives
    sum_{e=1}^c r1^e r2^(c-e), summed term by term (c is a lag: small), so no cancellation."""
    both = -np.expm1(-(x1 + x2))  # 1 - r1 r2
    value = (np.exp(-x2 * c) + np.exp(-x1 * (c + 1) - x2)) / both
    for e in range(1, c + 1):
        value = value + np.exp(-x1 * e - x2 * (c - e))
    return value


def _weighted_tail(x1: np.ndarray, x2: np.ndarray, b1: int, b2: int) -> np.ndarray:
    """H = sum_{e >= 1} e e^{-x1 |e + b1|} e^{-x2 |e + b2|}: the terms below e0 = max(1, -b1, -b2) one by one,
    the rest, e^{-x1 b1 - x2 b2} sum_{e >= e0} e R^e with R = e^{-(x1 + x2)}, in closed form."""
    e0 = max(1, -b1, -b2)
    value = np.zeros(np.broadcast(x1, x2).shape)
    for e in range(1, e0):
        value = value + e * np.exp(-x1 * abs(e + b1) - x2 * abs(e + b2))
    rate = x1 + x2
    one_minus = -np.expm1(-rate)  # 1 - R
    tail = np.exp(-rate * e0) * (e0 * one_minus + np.exp(-rate)) / one_minus**2
    return value + np.exp(-x1 * b1 - x2 * b2) * tail


def _window_pair_sum(x1: np.ndarray, x2: np.ndarray, c1: int, c2: int, n1: int, n2: int) -> np.ndarray:
    """F = sum_{k=1}^{n1} sum_{k'=1}^{n2} e^{-x1 |k - k' + c1|} e^{-x2 |k - k' + c2|}, the finite-window sum.

    With d = k - k', the pairs with that d number m(d) = n1 - relu(n1 - n2 - d) - relu(d) while |d| is below
    the windows (beyond them the terms are below e^{-x n}, which the caller keeps negligible), so
    F = n1 S(|c1 - c2|) - H(c1, c2) - H(-(delta + c1), -(delta + c2)), delta = n1 - n2 (:func:`_weighted_tail`)."""
    delta = n1 - n2
    full = n1 * _pair_sum(x1, x2, abs(c1 - c2)) if c1 >= c2 else n1 * _pair_sum(x2, x1, abs(c1 - c2))
    return full - _weighted_tail(x1, x2, c1, c2) - _weighted_tail(x1, x2, -(delta + c1), -(delta + c2))


def _lagged_sums_modal(model, a, period, count, lags, rng):
    """The lagged sums of a modal model's window from the modes a at its start (see propagate_lagged).
    Everything but the draws and a is memoised per (period, count, lags): O(n^2 q + q n^3) per run."""
    n = model.rates.shape[0]
    q = lags.shape[0]
    coefs = _memoised(
        model._memo,
        ("lagged", period, count, tuple(lags.tolist())),
        lambda: _lagged_coefficients(model, period, count, lags),
    )
    decay_sums, diagonal_means, pair_root, diagonal_root, targets = coefs
    sums = decay_sums * np.outer(a, a)  # (q, n, n): E[T^L_ij] given a, without the noise's own part
    flat = sums.reshape(q, n * n)
    flat[:, :: n + 1] += diagonal_means
    if pair_root is not None:
        pairs = pair_root.shape[0]
        draws = np.einsum("pab,pb->pa", pair_root, rng.standard_normal((pairs, pair_root.shape[1])))
        for column, (which, places) in enumerate(targets):
            for index in places:
                flat[which, index] += draws[:, column]
        diagonal_draws = np.einsum("iab,ib->ia", diagonal_root, rng.standard_normal((n, q)))
        flat[:, :: n + 1] += diagonal_draws.T
    return model.modes @ sums @ model.modes.T


def _lagged_coefficients(model, period, count, lags):
    """(decay sums (q, n, n), diagonal means (q, n), pair roots (P, v, v) or None, diagonal roots (n, q, q),
    targets) of :func:`_lagged_sums_modal`; targets: for each pair variable, (lag index, flat indices)."""
    lam = model.rates
    n = lam.shape[0]
    q = lags.shape[0]
    x = lam * period  # phi = e^-x
    s2 = model.noise_level**2
    var = s2 / (2.0 * lam)  # sigma_i^2
    pairs = np.maximum(count - lags, 0)
    decay_sums = np.empty((q, n, n))
    diagonal_means = np.empty((q, n))
    for which, lag in enumerate(lags):
        pairs_l = int(pairs[which])
        decay_sums[which] = np.exp(-x * lag)[:, None] * _geometric(x[:, None] + x[None, :], pairs_l)
        diagonal_means[which] = var * np.exp(-x * lag) * (pairs_l - _geometric(2.0 * x, pairs_l))
    if s2 <= 0.0 or count == 0:
        return decay_sums, diagonal_means, None, None, []
    # the variables of a pair i < j: (lag, orientation) with orientation 0 for T_ij, 1 for T_ji; lag 0 once
    variables = [(which, int(lag), o) for which, lag in enumerate(lags) for o in ((0,) if lag == 0 else (0, 1))]
    rows, cols = np.triu_indices(n, 1)
    xi, xj = x[rows], x[cols]
    scale = var[rows] * var[cols]
    v = len(variables)
    cov = np.empty((rows.shape[0], v, v))
    for p, (which_p, lag_p, o_p) in enumerate(variables):
        for r, (which_r, lag_r, o_r) in enumerate(variables[: p + 1]):
            # Cov(T^L_ij, T^L'_ij) = sigma_i^2 sigma_j^2 F(x_i, x_j, L - L', 0); T^L'_ji instead: F(., ., L, -L')
            first, second = (xi, xj) if o_p == 0 else (xj, xi)
            c2 = 0 if o_p == o_r else -lag_r
            c1 = lag_p - lag_r if o_p == o_r else lag_p
            n_p, n_r = int(pairs[which_p]), int(pairs[which_r])
            cov[:, p, r] = cov[:, r, p] = scale * _window_pair_sum(first, second, c1, c2, n_p, n_r)
    # the diagonal: Cov(T^L_ii, T^L'_ii) = sigma_i^4 [F(L - L', 0) + F(L, -L')]
    diagonal = np.empty((n, q, q))
    for p, lag_p in enumerate(lags):
        for r, lag_r in enumerate(lags[: p + 1]):
            lag_p, lag_r, n_p, n_r = int(lag_p), int(lag_r), int(pairs[p]), int(pairs[r])
            both = _window_pair_sum(x, x, lag_p - lag_r, 0, n_p, n_r) + _window_pair_sum(x, x, lag_p, -lag_r, n_p, n_r)
            diagonal[:, p, r] = diagonal[:, r, p] = var**2 * both
    upper, lower = rows * n + cols, cols * n + rows
    targets = []
    for which, lag, orientation in variables:
        if lag == 0:  # T^0 is symmetric: one draw for both entries
            targets.append((which, (upper, lower)))
        else:
            targets.append((which, (upper if orientation == 0 else lower,)))
    return decay_sums, diagonal_means, _batched_root(cov), _batched_root(diagonal), targets


def _batched_root(cov: np.ndarray) -> np.ndarray:
    """R (..., v, v) with R R^T = cov for a stack of covariances (eigh where Cholesky fails)."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(cov)
        return vectors * np.sqrt(np.clip(values, 0.0, None))[..., None, :]


def _hop_coefficients(lam, s2, h):
    """Scalar OU of rates lam over a time h: y -> decay y + sd z.  sd is None without noise."""
    decay = np.exp(-lam * h)
    sd = np.sqrt(s2 * -np.expm1(-2.0 * lam * h) / (2.0 * lam)) if s2 > 0.0 else None
    return decay, sd


def _window_coefficients(lam, s2, period, count):
    """Scalar OU of rates lam sampled K = count times at spacing period, from y at the window's start.

    (sum of the samples, last sample) = (mean_sum y + l11 z1, mean_last y + l21 z1 + l22 z2), z1, z2
    independent standard normals; the l's are None without noise.
    """
    phi = np.exp(-lam * period)
    one_minus = -np.expm1(-lam * period)  # 1 - phi, accurate when lam * period is small
    phi_k = phi**count
    a0 = -np.expm1(-lam * (period * count)) / one_minus  # sum_{m<K} phi^m
    mean_sum = phi * a0
    mean_last = phi_k
    if s2 <= 0.0:
        return mean_sum, mean_last, None, None, None
    q = s2 * -np.expm1(-2.0 * lam * period) / (2.0 * lam)
    geo2 = np.expm1(-2.0 * lam * (period * count)) / np.expm1(-2.0 * lam * period)  # sum_{m<K} phi^2m
    # Cov(sum) = q / (1 - phi)^2 * sum_{m=1..K} (1 - phi^m)^2
    var_sum = q / one_minus**2 * (count - 2.0 * phi * a0 + phi**2 * geo2)
    cov = q / one_minus * (a0 - phi * geo2)
    var_last = q * geo2
    l11 = np.sqrt(np.maximum(var_sum, 0.0))
    l21 = np.divide(cov, l11, out=np.zeros_like(cov), where=l11 > 0.0)
    l22 = np.sqrt(np.maximum(var_last - l21**2, 0.0))
    return mean_sum, mean_last, l11, l21, l22


def _scalar_hop(memo, lam, s2, h):
    return _memoised(memo, ("hop", h), lambda: _hop_coefficients(lam, s2, h))


def _scalar_window(memo, lam, s2, period, count):
    return _memoised(memo, ("window", period, count), lambda: _window_coefficients(lam, s2, period, count))


def _propagate_modal(model, d0, head, count, period, tail, rng, start=None):
    """Draw order: n normals for the head hop, 2n for the window, n for the tail hop (none without
    noise).  ``start``, a list: the modal deviation y at the window's start is appended to it."""
    lam = model.rates
    s2 = model.noise_level**2
    y = model.modes.T @ d0

    def hop(y, h):
        decay, sd = _scalar_hop(model._memo, lam, s2, h)
        return decay * y + sd * rng.standard_normal(lam.shape[0]) if s2 > 0.0 else decay * y

    y = hop(y, head)
    if start is not None:
        start.append(y.copy())
    total = np.zeros_like(y)
    if count:
        mean_sum, mean_last, l11, l21, l22 = _scalar_window(model._memo, lam, s2, period, count)
        if s2 > 0.0:
            z1 = rng.standard_normal(lam.shape[0])
            z2 = rng.standard_normal(lam.shape[0])
            total = mean_sum * y + l11 * z1
            y = mean_last * y + l21 * z1 + l22 * z2
        else:
            total = mean_sum * y
            y = mean_last * y
    y = hop(y, tail)
    return model.modes @ total, model.modes @ y


def _propagate_general(model, d0, head, count, period, tail, rng):
    """Draw order: n normals for the head hop (when head > 0), 2n for the window (when it has samples),
    n for the tail hop (when tail > 0); none without noise.  O(n^2) per run once the coefficients of
    its (head, count, period, tail) are memoised, O(n^3) before."""
    n = model.drift.shape[0]
    noisy = bool(np.any(model.noise_sd > 0.0))

    def hop(d, h):
        if h == 0.0:
            return d
        f, root = _memoised(model._memo, ("hop", h), lambda: _general_hop(model, h, noisy))
        d = f @ d
        if noisy:
            d = d + root @ rng.standard_normal(n)
        return d

    d = hop(d0, head)
    total = np.zeros(n)
    if count:
        a1, phi_k, root = _memoised(
            model._memo, ("window", period, count), lambda: _general_window(model, period, count, noisy)
        )
        total = a1 @ d
        d = phi_k @ d
        if noisy:
            draw = root @ rng.standard_normal(2 * n)
            total = total + draw[:n]
            d = d + draw[n:]
    return total, hop(d, tail)


def _general_hop(model, h, noisy):
    """(e^{-M h}, a square root of the hop's covariance Sigma - e^{-M h} Sigma e^{-M h}^T, None without noise)."""
    f = model.transition(h)
    sigma = model.stationary_cov
    return f, _covariance_root(sigma - f @ sigma @ f.T) if noisy else None


def _general_window(model, period, count, noisy):
    """(sum_{1<=m<=K} Phi^m, Phi^K, a square root of the joint covariance of (sum, d_K); None without noise)."""
    n = model.drift.shape[0]
    sigma = model.stationary_cov
    eye = np.eye(n)
    phi = model.transition(period)
    phi_k = model.transition(period * count)
    inv = np.linalg.inv(eye - phi)
    a0 = inv @ (eye - phi_k)  # sum_{m<K} Phi^m
    a1 = phi @ a0  # sum_{1<=m<=K} Phi^m
    if not noisy:
        return a1, phi_k, None
    q = sigma - phi @ sigma @ phi.T
    phi_k1 = phi @ phi_k
    cov_sum = inv @ (count * q - a1 @ q - q @ a1.T + phi @ sigma @ phi.T - phi_k1 @ sigma @ phi_k1.T) @ inv.T
    cov_last = sigma - phi_k @ sigma @ phi_k.T
    cross = inv @ (q @ a0.T - phi @ cov_last)
    return a1, phi_k, _covariance_root(np.block([[cov_sum, cross], [cross.T, cov_last]]))


def _covariance_root(cov: np.ndarray) -> np.ndarray:
    """R with R R^T = cov, for a covariance that may be singular to round-off (N(0, cov) is R z)."""
    cov = 0.5 * (cov + cov.T)
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(cov)
        return vectors * np.sqrt(np.clip(values, 0.0, None))
