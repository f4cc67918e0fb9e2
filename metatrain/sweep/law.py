"""Fitting L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).

As in the paper, the fit minimises the Huber loss (delta = 1e-3) between the predicted
and the observed *log* loss, with the law written as a log-sum-exp of its three terms,

    log L = LSE(a - alpha log N,  b - beta log D,  e),   A = exp(a), B = exp(b), E = exp(e),

by L-BFGS (scipy's L-BFGS-B, with the analytic gradient) from a grid of starting
points: the paper's grid (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
a, b in {0, 5, ..., 25}) is evaluated in one vectorised pass and the best `starts` of
its 4,500 points are refined; the lowest objective wins. Confidence intervals come
from the bootstrap: runs are resampled with replacement and refitted.

N is the non-embedding parameter count and D the training tokens; the functions here
take plain arrays and know nothing of manifests.

The fits run with BLAS limited to one thread (threadpoolctl, where installed): L-BFGS-B
makes thousands of BLAS calls on 5-vectors, and OpenBLAS waking its thread pool for
each is 10-30x slower than the arithmetic on a CPU busy with other work (a training
run, other tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import numpy as np
from scipy.optimize import minimize

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # the fit is right without it, only slower on a busy CPU
    threadpool_limits = None

HUBER_DELTA = 1e-3
PARAMS: tuple[str, ...] = ("E", "A", "B", "alpha", "beta")

_GRID = np.array(
    list(
        itertools.product(
            np.arange(0, 30, 5.0),  # a
            np.arange(0, 30, 5.0),  # b
            np.arange(-1, 1.5, 0.5),  # e
            np.arange(0, 2.5, 0.5),  # alpha
            np.arange(0, 2.5, 0.5),  # beta
        )
    )
)
# a, b, e in log space; exponents kept positive (a negative one is no scaling law).
_BOUNDS = [(-30.0, 60.0), (-30.0, 60.0), (-20.0, 20.0), (0.0, 5.0), (0.0, 5.0)]


@dataclasses.dataclass(frozen=True)
class Law:
    """The parameters of L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray:
        """Predicted loss at non-embedding parameters N and training tokens D."""
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in PARAMS}

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> "Law":
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


@dataclasses.dataclass(frozen=True)
class LawFit:
    """A fitted law, its objective and (optionally) bootstrap intervals.

    Attributes:
        law: the best parameters.
        objective: Huber loss at the optimum, in units of delta (sum over points).
        rms_log_residual: root-mean-square of log(predicted) - log(observed).
        intervals: parameter -> (low, high) bootstrap percentile interval.
        level: coverage of the intervals (e.g. 0.95).
        resamples: bootstrap resamples that could be fitted (degenerate ones are skipped).
    """

    law: Law
    objective: float
    rms_log_residual: float
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    level: float | None = None
    resamples: int = 0


def _lse3(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """log(exp(x) + exp(y) + exp(z)), elementwise and overflow-safe."""
    m = np.maximum(np.maximum(x, y), z)
    return m + np.log(np.exp(x - m) + np.exp(y - m) + np.exp(z - m))


def _predict_log(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L for parameter vectors theta [..., 5] at points [P] -> [..., P]."""
    a, b, e, alpha, beta = (theta[..., i : i + 1] for i in range(5))
    return _lse3(a - alpha * log_n, b - beta * log_d, e)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss divided by delta (so its slope is at most 1, well scaled for L-BFGS)."""
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2 / delta, np.abs(r) - 0.5 * delta)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Huber objective and its gradient with respect to theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    pred = _lse3(t_n, t_d, e)
    w_n, w_d, w_e = np.exp(t_n - pred), np.exp(t_d - pred), np.exp(e - pred)  # d pred / d term
    r = pred - log_l
    dr = np.clip(r / delta, -1.0, 1.0)  # d huber / d r
    grad = np.array(
        [
            np.dot(dr, w_n),
            np.dot(dr, w_d),
            np.dot(dr, w_e),
            -np.dot(dr, w_n * log_n),
            -np.dot(dr, w_d * log_d),
        ]
    )
    return float(np.sum(_huber(r, delta))), grad


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """BLAS on one thread for the block (see the module docstring)."""
    if threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _refine(theta0: np.ndarray, args: tuple, maxiter: int) -> tuple[np.ndarray, float]:
    result = minimize(
        _objective,
        theta0,
        args=args,
        jac=True,
        method="L-BFGS-B",
        bounds=_BOUNDS,
        options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-10},
    )
    return result.x, float(result.fun)


def fit_law(
    N: np.ndarray,
    D: np.ndarray,
    L: np.ndarray,
    *,
    delta: float = HUBER_DELTA,
    starts: int = 8,
    extra_starts: np.ndarray | None = None,
) -> LawFit:
    """Fit L(N, D) to observed losses (see the module docstring).

    Args:
        N: [P] non-embedding parameter counts.
        D: [P] training tokens.
        L: [P] losses (finite, > 0).
        delta: Huber threshold on log-loss residuals.
        starts: grid points refined with L-BFGS (the best by objective).
        extra_starts: [S, 5] further starting thetas (a, b, e, alpha, beta).

    Returns:
        The fit with the lowest objective (no intervals; see `bootstrap_law`).
    """
    with single_threaded_blas():
        return _fit(N, D, L, delta=delta, starts=starts, extra_starts=extra_starts)


def _fit(N, D, L, *, delta: float, starts: int, extra_starts: np.ndarray | None, maxiter: int = 2000) -> LawFit:
    log_n, log_d, log_l = (np.log(np.asarray(x, np.float64)) for x in (N, D, L))
    args = (log_n, log_d, log_l, delta)
    grid_loss = np.sum(_huber(_predict_log(_GRID, log_n, log_d) - log_l, delta), axis=-1)
    candidates = _GRID[np.argsort(grid_loss)[:starts]]
    if extra_starts is not None:
        candidates = np.concatenate([candidates, np.atleast_2d(extra_starts)])
    best_theta, best = None, math.inf
    for theta0 in candidates:
        theta, value = _refine(theta0, args, maxiter)
        if value < best:
            best_theta, best = theta, value
    residual = _predict_log(best_theta, log_n, log_d) - log_l
    return LawFit(
        law=Law.from_theta(best_theta),
        objective=best,
        rms_log_residual=float(np.sqrt(np.mean(residual**2))),
    )


def _theta(law: Law) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap_law(
    N: np.ndarray,
    D: np.ndarray,
    L: np.ndarray,
    fit: LawFit,
    *,
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
    delta: float = HUBER_DELTA,
) -> LawFit:
    """`fit` with percentile intervals from refits on runs resampled with replacement.

    Each refit starts from `fit`'s optimum and the best grid point of the resample, and
    stops after 500 L-BFGS iterations (well-posed fits converge in 50-300; on data that
    cannot pin the law down the optimizer would crawl along flat valleys for thousands,
    and the interval is wide either way).
    Resamples with fewer than 2 distinct N or D cannot identify the law and are skipped.
    """
    N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
    rng = np.random.default_rng(seed)
    thetas = []
    with single_threaded_blas():  # once here, not per refit: entering it costs ~1 ms
        for _ in range(resamples):
            idx = rng.integers(0, len(L), len(L))
            if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
                continue
            refit = _fit(N[idx], D[idx], L[idx], delta=delta, starts=1, extra_starts=_theta(fit.law), maxiter=500)
            thetas.append([getattr(refit.law, p) for p in PARAMS])
    if not thetas:
        return fit
    samples = np.array(thetas)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    intervals = {p: (float(lo), float(hi)) for p, lo, hi in zip(PARAMS, low, high)}
    return dataclasses.replace(fit, intervals=intervals, level=level, resamples=len(thetas))
