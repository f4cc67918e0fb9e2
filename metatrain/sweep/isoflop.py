"""IsoFLOP analysis (Hoffmann et al. 2022, approach 2).

For each compute budget C, the runs of that budget (different sizes, tokens = C /
FLOPs-per-token) trace a valley of loss against log N. A parabola in log N through them
puts the valley's floor at N_opt(C); a parabola in log D gives D_opt(C). Across budgets,
least squares in log-log space gives the power laws

    N_opt(C) = k_N * C^a,    D_opt(C) = k_D * C^b      (Chinchilla: a ~ b ~ 0.5)

with bootstrap intervals on a and b (runs resampled within each budget). A budget with
fewer than 3 sizes, or whose parabola opens downward, cannot place a minimum; it is
left out with a note saying why, and so is one whose floor lies further outside the
sizes tried than their span (a nearly flat curve). Functions take plain arrays.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Parabola:
    """loss = c2 * x^2 + c1 * x + c0 with x = ln(N) (or ln(D))."""

    c2: float
    c1: float
    c0: float

    @property
    def argmin(self) -> float:
        return -self.c1 / (2 * self.c2)

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return self.c2 * x**2 + self.c1 * x + self.c0


@dataclasses.dataclass(frozen=True)
class BudgetMinimum:
    """The floor of one IsoFLOP curve.

    Attributes:
        budget: compute C of the curve.
        n_opt, d_opt: parameters and tokens at the floor.
        loss: loss at the floor (from the parabola in log N).
        bracketed: whether N_opt lies inside the sizes tried (else it is extrapolated).
        in_n, in_d: the parabolas in ln N and ln D (for plots).
        points: runs on the curve.
    """

    budget: float
    n_opt: float
    d_opt: float
    loss: float
    bracketed: bool
    in_n: Parabola
    in_d: Parabola
    points: int


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * C^exponent, with an optional bootstrap interval on the exponent."""

    exponent: float
    coefficient: float
    interval: tuple[float, float] | None = None

    def __call__(self, C: np.ndarray | float) -> np.ndarray:
        return self.coefficient * np.asarray(C, np.float64) ** self.exponent


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Minima per budget, the N_opt(C) and D_opt(C) laws (None with < 2 minima), notes."""

    minima: tuple[BudgetMinimum, ...]
    n_opt: PowerLaw | None
    d_opt: PowerLaw | None
    notes: tuple[str, ...]


def fit_parabola(x: np.ndarray, y: np.ndarray) -> Parabola:
    """Least-squares parabola; ValueError saying why when it has no minimum."""
    if len(np.unique(x)) < 3:
        raise ValueError(f"{len(np.unique(x))} distinct sizes; a parabola needs 3")
    c2, c1, c0 = np.polyfit(x, y, 2)
    if not c2 > 0:
        raise ValueError("the loss is not convex in log size here (no valley); widen the sizes around the optimum")
    return Parabola(float(c2), float(c1), float(c0))


def _check_near(argmin: float, x: np.ndarray) -> None:
    """A floor further than the span of the sizes tried beyond them is no estimate."""
    span = x.max() - x.min()
    if not (x.min() - span <= argmin <= x.max() + span):
        raise ValueError(
            "the curve is nearly flat, its parabola's minimum lies far outside the sizes tried; "
            "widen the sizes or lower the noise (more eval batches)"
        )


def budget_minima(budget: np.ndarray, N: np.ndarray, D: np.ndarray, L: np.ndarray) -> tuple[list[BudgetMinimum], list[str]]:
    """The floor of each budget's curve, and a note for each budget that has none."""
    minima, notes = [], []
    for c in np.unique(budget):
        on = budget == c
        x_n, x_d = np.log(N[on]), np.log(D[on])
        try:
            in_n, in_d = fit_parabola(x_n, L[on]), fit_parabola(x_d, L[on])
            _check_near(in_n.argmin, x_n)
            _check_near(in_d.argmin, x_d)
        except ValueError as e:
            notes.append(f"budget {c:.3g} FLOPs left out: {e}")
            continue
        minima.append(
            BudgetMinimum(
                budget=float(c),
                n_opt=math.exp(in_n.argmin),
                d_opt=math.exp(in_d.argmin),
                loss=float(in_n(in_n.argmin)),
                bracketed=bool(x_n.min() <= in_n.argmin <= x_n.max()),
                in_n=in_n,
                in_d=in_d,
                points=int(on.sum()),
            )
        )
    return minima, notes


def _power_law(budgets: list[float], values: list[float]) -> PowerLaw:
    exponent, log_k = np.polyfit(np.log(budgets), np.log(values), 1)
    return PowerLaw(exponent=float(exponent), coefficient=float(math.exp(log_k)))


def fit_isoflop(
    budget: np.ndarray,
    N: np.ndarray,
    D: np.ndarray,
    L: np.ndarray,
    *,
    resamples: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> IsoFlopFit:
    """Approach 2 on runs given as arrays of budget, N, D and loss (see module docstring)."""
    budget, N, D, L = (np.asarray(x, np.float64) for x in (budget, N, D, L))
    minima, notes = budget_minima(budget, N, D, L)
    for m in minima:
        if not m.bracketed:
            notes.append(
                f"budget {m.budget:.3g} FLOPs: the minimum (N_opt {m.n_opt:.3g}) lies outside the sizes "
                "tried, so it is extrapolated; add sizes on that side"
            )
    if len(minima) < 2:
        notes.append(f"N_opt(C) and D_opt(C) need minima at 2 or more budgets; got {len(minima)}")
        return IsoFlopFit(tuple(minima), None, None, tuple(notes))
    budgets = [m.budget for m in minima]
    n_law = _power_law(budgets, [m.n_opt for m in minima])
    d_law = _power_law(budgets, [m.d_opt for m in minima])
    exponents = _bootstrap_exponents(budget, N, D, L, resamples, seed)
    if len(exponents) >= 2:
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(np.array(exponents), [tail, 100 - tail], axis=0)
        n_law = dataclasses.replace(n_law, interval=(float(low[0]), float(high[0])))
        d_law = dataclasses.replace(d_law, interval=(float(low[1]), float(high[1])))
    return IsoFlopFit(tuple(minima), n_law, d_law, tuple(notes))


def _bootstrap_exponents(
    budget: np.ndarray, N: np.ndarray, D: np.ndarray, L: np.ndarray, resamples: int, seed: int
) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(budget == c) for c in np.unique(budget)]
    out = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        minima, _ = budget_minima(budget[idx], N[idx], D[idx], L[idx])
        if len(minima) < 2:
            continue
        budgets = [m.budget for m in minima]
        out.append(
            (
                _power_law(budgets, [m.n_opt for m in minima]).exponent,
                _power_law(budgets, [m.d_opt for m in minima]).exponent,
            )
        )
    return out
