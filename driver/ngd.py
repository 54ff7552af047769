"""Digital natural-gradient solvers: the baselines TNGD is measured against (arXiv 2405.13817, Fig. 2).

Each solves the damped natural-gradient system

    (F + lambda I) x = g,     F = J^T H J  (generalised Gauss-Newton, GGN)  or a dense F,

with g (N,), J (m, N), H (m, m) symmetric positive semi-definite, lambda > 0.  Costs are
per call, N parameters, m = batch * d_z curvature rows, c CG iterations:

    solve_exact      dense Cholesky of F + lambda I        O(N^2 m + N^3) from J, H; O(N^3) from F
    solve_cg         c conjugate-gradient iterations        O(c N m + c m^2) from J, H; O(c N^2) from F
    solve_woodbury   symmetric m x m Cholesky (see below)   O(N m^2 + m^3), N x N never formed

Every function validates its arguments (shapes, finite values, symmetry, lambda > 0) and
raises :class:`driver.InvalidInputError` with what was wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from .checks import as_float_array
from .errors import InvalidInputError
from .numbers import real

__all__ = ["Curvature", "curvature", "solve_exact", "solve_cg", "solve_woodbury", "solve"]

# |X - X^T| up to this fraction of max |X| counts as symmetric (the device's rule, driver.device.SYMMETRY_RTOL)
SYMMETRY_RTOL = 1e-10
# CG stops once ||r|| <= this fraction of ||g||, whatever tol and iters say
_CG_FLOOR = 1e-15
# eigenvalues of H below -PSD_RTOL * max|eig| mean H is not positive semi-definite
PSD_RTOL = 1e-8


@dataclass(frozen=True)
class Curvature:
    """A validated damped curvature F + lambda I, dense or in GGN form (never both).

    F: (N, N) dense curvature without the damping, or None; J: (m, N) and H: (m, m) for
    F = J^T H J, or None; damping: lambda > 0.  Build one with :func:`curvature`.
    """

    damping: float
    F: np.ndarray | None = None
    J: np.ndarray | None = None
    H: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of parameters N."""
        return self.F.shape[0] if self.F is not None else self.J.shape[1]

    @property
    def is_ggn(self) -> bool:
        return self.J is not None

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """(F + lambda I) v without forming F when it is a GGN: O(N m + m^2), dense O(N^2)."""
        if self.F is not None:
            return self.F @ v + self.damping * v
        return self.J.T @ (self.H @ (self.J @ v)) + self.damping * v

    def dense(self) -> np.ndarray:
        """F + lambda I as an (N, N) array, exactly symmetric.  O(N^2 m) from J, H; O(N^2) memory."""
        if self.F is not None:
            F = self.F
        else:
            F = self.J.T @ (self.H @ self.J)
        F = 0.5 * (F + F.T)
        F[np.diag_indices_from(F)] += self.damping
        return F


def curvature(grad: Any, damping: Any, F: Any = None, J: Any = None, H: Any = None) -> tuple[np.ndarray, Curvature]:
    """Validate a gradient and a curvature; return (g as float64 (N,), Curvature).

    Pass either F (dense, (N, N), symmetric) or both J (m, N) and H (m, m), symmetric.
    Raises InvalidInputError for a wrong shape, NaN/inf, an asymmetric F or H, or lambda <= 0.
    """
    g = _array(grad, "gradient", 1)
    if g.shape[0] == 0:
        raise InvalidInputError("gradient must be non-empty")
    lam = _positive(damping, "damping")
    n = g.shape[0]
    if F is not None:
        if J is not None or H is not None:
            raise InvalidInputError("pass either F (dense) or J and H (GGN), not both")
        F = _array(F, "curvature F", 2)
        if F.shape != (n, n):
            raise InvalidInputError(
                f"curvature F has shape {F.shape} but the gradient has {n} entries; F must be ({n}, {n})"
            )
        _check_symmetric(F, "curvature F")
        return g, Curvature(damping=lam, F=F)
    if J is None or H is None:
        raise InvalidInputError("no curvature given: pass F=... (dense, (N, N)) or both J=... (m, N) and H=... (m, m)")
    J = _array(J, "Jacobian J", 2)
    H = _array(H, "output Hessian H", 2)
    m = J.shape[0]
    if m == 0:
        raise InvalidInputError(f"Jacobian J has no rows (shape {J.shape}); it must be (m, N) with m >= 1")
    if J.shape[1] != n:
        raise InvalidInputError(
            f"Jacobian J has shape {J.shape}: its {J.shape[1]} columns must match the gradient's {n} entries"
        )
    if H.shape != (m, m):
        raise InvalidInputError(f"output Hessian H has shape {H.shape} but J has {m} rows; H must be ({m}, {m})")
    _check_symmetric(H, "output Hessian H")
    return g, Curvature(damping=lam, J=J, H=H)


def solve_exact(grad: Any, damping: Any, *, F: Any = None, J: Any = None, H: Any = None) -> np.ndarray:
    """Exact NGD: x = (F + lambda I)^-1 g by a dense Cholesky factorisation.

    F (N, N) dense, or J (m, N) and H (m, m) from which the lower triangle of F = U U^T,
    U = J^T H^1/2, is formed by BLAS syrk (one N x N array: 8 N^2 bytes).  Cost O(N^3 / 3) for the
    factorisation plus O(N^2 m) to form F.  Returns x of shape (N,).
    """
    g, curv = curvature(grad, damping, F, J, H)
    return _exact(g, curv)


def solve_cg(
    grad: Any,
    damping: Any,
    *,
    F: Any = None,
    J: Any = None,
    H: Any = None,
    iters: int = 200,
    x0: Any = None,
    tol: float = 0.0,
) -> np.ndarray:
    """NGD-CG: ``iters`` conjugate-gradient iterations on (F + lambda I) x = g, matrix-free.

    With J, H each iteration applies v -> J^T (H (J v)) + lambda v, O(N m + m^2); with a dense
    F, O(N^2).  Starts from x0 (default 0); stops early once ||r|| <= tol ||g|| (tol = 0: run all
    ``iters`` unless the residual is down to 1e-15 ||g||, round-off level).  Returns x of shape (N,).
    Raises InvalidInputError when the system is found not positive definite (a direction of
    non-positive curvature).
    """
    g, curv = curvature(grad, damping, F, J, H)
    return _cg(g, curv, _iterations(iters), x0, tol)


def solve_woodbury(grad: Any, damping: Any, *, J: Any, H: Any) -> np.ndarray:
    """NGD-Woodbury: (J^T H J + lambda I)^-1 g through an m x m symmetric positive definite system.

    With H = L L^T (L = V diag(sqrt(w)) from H = V diag(w) V^T, which also serves a singular
    PSD H such as the softmax Hessian diag(p) - p p^T) and U = J^T L (N, m), the Woodbury identity
    gives

        (lambda I + U U^T)^-1 g = (g - U K^-1 U^T g) / lambda,   K = lambda I_m + L^T (J J^T) L,

    and K is symmetric positive definite for any lambda > 0, so it is solved by Cholesky.  The
    form lambda H^-1 + J J^T would need H invertible and K = lambda I + H J J^T is not symmetric;
    this one needs neither.  Rounding error is O(eps cond(F + lambda I)) relative, as for the dense
    Cholesky solve.  Cost O(N m^2) for J J^T plus O(m^3); N x N is never formed.  Returns (N,).
    """
    g, curv = curvature(grad, damping, None, J, H)
    return _woodbury(g, curv)


def solve(method: str, g: np.ndarray, curv: Curvature, *, iters: int = 200, x0: np.ndarray | None = None) -> np.ndarray:
    """Dispatch on an already validated Curvature: method "exact", "cg" or "woodbury"."""
    if method == "exact":
        return _exact(g, curv)
    if method == "cg":
        return _cg(g, curv, iters, x0, 0.0)
    if method == "woodbury":
        if not curv.is_ggn:
            raise InvalidInputError("the Woodbury solver needs the GGN form: pass J and H instead of a dense F")
        return _woodbury(g, curv)
    raise InvalidInputError(f"solver {method!r} is not one of 'exact', 'cg', 'woodbury'")


# -- implementations (arguments already validated) ---------------------------------------------------
def _exact(g: np.ndarray, curv: Curvature) -> np.ndarray:
    if curv.is_ggn:
        # only the lower triangle of F = U U^T, U = J^T H^1/2, is formed (BLAS syrk) and factorised in place:
        # one N x N array in memory, exactly symmetric by construction
        U = curv.J.T @ _psd_sqrt(curv.H)
        A = scipy.linalg.blas.dsyrk(1.0, U, lower=True)
        A[np.diag_indices_from(A)] += curv.damping
    else:
        A = curv.F + curv.damping * np.eye(curv.n)
    try:
        factor = scipy.linalg.cho_factor(A, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise InvalidInputError(
            f"F + lambda I (lambda = {curv.damping:g}) is not positive definite; F must be positive"
            " semi-definite (check H and F), or raise the damping"
        ) from None
    return scipy.linalg.cho_solve(factor, g, check_finite=False)


def _cg(g: np.ndarray, curv: Curvature, iters: int, x0: Any, tol: float) -> np.ndarray:
    if x0 is None:
        x = np.zeros_like(g)
        r = g.copy()
    else:
        x = _array(x0, "CG start x0", 1).copy()
        if x.shape != g.shape:
            raise InvalidInputError(f"CG start x0 has shape {x.shape}; it must match the gradient, {g.shape}")
        r = g - curv.matvec(x)
    p = r.copy()
    rr = float(r @ r)
    # below a residual of 1e-15 ||g|| CG has nothing left to gain in float64 (and p would shrink to underflow)
    stop = (max(tol, _CG_FLOOR) * float(np.linalg.norm(g))) ** 2
    for _ in range(iters):
        if rr <= stop:
            break
        q = curv.matvec(p)
        pq = float(p @ q)
        if not pq > 0.0:
            raise InvalidInputError(
                f"CG met a direction of non-positive curvature (p^T (F + lambda I) p = {pq:.3g});"
                " F must be positive semi-definite: check H"
            )
        alpha = rr / pq
        x += alpha * p
        r -= alpha * q
        rr_new = float(r @ r)
        p *= rr_new / rr
        p += r
        rr = rr_new
    return x


def _woodbury(g: np.ndarray, curv: Curvature) -> np.ndarray:
    J, lam = curv.J, curv.damping
    L = _psd_sqrt(curv.H)
    gram = J @ J.T  # (m, m), the O(N m^2) part
    K = L.T @ gram @ L
    K = 0.5 * (K + K.T)
    K[np.diag_indices_from(K)] += lam
    factor = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)
    y = scipy.linalg.cho_solve(factor, L.T @ (J @ g), check_finite=False)
    return (g - J.T @ (L @ y)) / lam


def _psd_sqrt(H: np.ndarray) -> np.ndarray:
    """L with L L^T = H for symmetric PSD H (eigen-decomposition, negative round-off set to 0).  O(m^3)."""
    w, V = np.linalg.eigh(0.5 * (H + H.T))
    top = float(np.abs(w).max(initial=0.0))
    if w.size and w[0] < -PSD_RTOL * top:
        raise InvalidInputError(
            f"output Hessian H is not positive semi-definite: smallest eigenvalue {w[0]:.3g}"
            f" (largest {top:.3g}); a GGN needs H >= 0"
        )
    return V * np.sqrt(np.clip(w, 0.0, None))


# -- validation helpers --------------------------------------------------------------------------------
def _array(value: Any, what: str, ndim: int) -> np.ndarray:
    return as_float_array(value, what, ndim, copy=False)


def _check_symmetric(X: np.ndarray, what: str) -> None:
    asym = np.abs(X - X.T)
    where = np.unravel_index(int(np.argmax(asym)), asym.shape)
    if asym[where] > SYMMETRY_RTOL * float(np.abs(X).max()):
        raise InvalidInputError(
            f"{what} must be symmetric: max |X - X^T| = {asym[where]:.3g} at {tuple(map(int, where))};"
            " symmetrise it, e.g. 0.5 * (X + X.T)"
        )


def _positive(value: Any, what: str) -> float:
    value = real(value, what, "a positive number")
    if not (np.isfinite(value) and value > 0.0):
        raise InvalidInputError(f"{what} must be positive and finite, got {value!r}")
    return value


def _iterations(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidInputError(f"iters must be a non-negative integer, got {value!r}")
    return int(value)
