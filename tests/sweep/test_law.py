"""Recovering known scaling laws: L(N, D) (approach 3) and IsoFLOP minima (approach 2).

Losses are generated from Chinchilla's fitted law (Hoffmann et al. 2022: E=1.69,
A=406.4, B=410.7, alpha=0.34, beta=0.28) with multiplicative log-normal noise.
"""

import numpy as np
import pytest

from metatrain.sweep.isoflop import fit_isoflop, fit_parabola
from metatrain.sweep.law import Law, bootstrap_law, fit_law

TRUE = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def grid(sizes: int = 6, budgets: int = 6) -> tuple[np.ndarray, np.ndarray]:
    N, D = np.meshgrid(np.geomspace(1e6, 1e9, sizes), np.geomspace(1e8, 1e11, budgets))
    return N.ravel(), D.ravel()


def noisy(N, D, sigma: float, seed: int, law: Law = TRUE) -> np.ndarray:
    return law(N, D) * np.exp(np.random.default_rng(seed).normal(0.0, sigma, np.shape(N)))


def test_noise_free_losses_give_back_the_law():
    N, D = grid()
    fit = fit_law(N, D, TRUE(N, D)).law
    assert fit.alpha == pytest.approx(TRUE.alpha, abs=2e-3)
    assert fit.beta == pytest.approx(TRUE.beta, abs=2e-3)
    assert fit.E == pytest.approx(TRUE.E, rel=1e-2)
    assert fit.A == pytest.approx(TRUE.A, rel=5e-2) and fit.B == pytest.approx(TRUE.B, rel=5e-2)


@pytest.mark.parametrize("seed", [0, 1])
def test_noisy_losses_recover_alpha_beta_and_e(seed):
    """1% noise on 36 runs: exponents within 0.03, E within 6% (errors seen: <= 0.015, 5%).

    A and B are not checked tightly: they trade off against the exponents (A / N^alpha
    barely changes when both move), which is why papers compare exponents and E.
    """
    N, D = grid()
    L = noisy(N, D, sigma=0.01, seed=seed)
    fit = bootstrap_law(N, D, L, fit_law(N, D, L), resamples=20, seed=seed)
    law = fit.law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert law.E == pytest.approx(TRUE.E, rel=0.06)
    assert 0.005 < fit.rms_log_residual < 0.02  # the fit sees the noise, no more
    assert fit.resamples == 20 and fit.level == 0.95
    for name in ("E", "alpha", "beta"):
        low, high = fit.intervals[name]
        assert low <= getattr(law, name) <= high
        assert high - low < 0.5 * getattr(TRUE, name)  # intervals are informative


def test_the_huber_loss_shrugs_off_an_outlier():
    N, D = grid()
    L = noisy(N, D, sigma=0.005, seed=3)
    L[7] *= 1.5  # one diverged run
    law = fit_law(N, D, L).law
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.03)


def test_different_laws_give_different_fits():
    """The fit follows the data: a steeper size exponent is found as steeper."""
    steep = Law(E=1.69, A=406.4 * 10, B=410.7, alpha=0.5, beta=0.28)
    N, D = grid()
    assert fit_law(N, D, noisy(N, D, 0.005, seed=4, law=steep)).law.alpha == pytest.approx(0.5, abs=0.03)


def isoflop_runs(sigma: float, seed: int):
    """7 sizes around the true optimum (x e^-1.5 .. x e^1.5) at 4 budgets, C = 6 N D."""
    a = TRUE.beta / (TRUE.alpha + TRUE.beta)
    G = (TRUE.alpha * TRUE.A / (TRUE.beta * TRUE.B)) ** (1 / (TRUE.alpha + TRUE.beta))
    C, N = [], []
    for budget in (1e18, 1e19, 1e20, 1e21):
        n_opt = G * (budget / 6) ** a
        for k in np.linspace(-1.5, 1.5, 7):
            C.append(budget)
            N.append(n_opt * np.exp(k))
    C, N = np.array(C), np.array(N)
    D = C / (6 * N)
    return C, N, D, noisy(N, D, sigma, seed), (lambda c: G * (c / 6) ** a)


@pytest.mark.parametrize("seed", [0, 1])
def test_isoflop_parabolas_recover_the_compute_optimal_exponents(seed):
    """Chinchilla's law gives N_opt ~ C^0.452, D_opt ~ C^0.548. With 0.5% noise the
    exponents come back within 0.03 (errors seen: <= 0.015) and each N_opt within 20%
    (the parabola in log N only approximates the valley)."""
    C, N, D, L, n_opt = isoflop_runs(sigma=0.005, seed=seed)
    fit = fit_isoflop(C, N, D, L, resamples=50, seed=seed)
    assert fit.notes == ()
    assert fit.n_opt.exponent == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), abs=0.03)
    assert fit.d_opt.exponent == pytest.approx(TRUE.alpha / (TRUE.alpha + TRUE.beta), abs=0.03)
    for m in fit.minima:
        assert m.bracketed
        assert m.n_opt == pytest.approx(n_opt(m.budget), rel=0.2)
        assert m.n_opt * m.d_opt * 6 == pytest.approx(m.budget, rel=0.2)
    low, high = fit.n_opt.interval
    assert low < fit.n_opt.exponent < high


def test_isoflop_budgets_that_cannot_place_a_minimum_are_left_out_with_a_note():
    C, N, D, L, _ = isoflop_runs(sigma=0.0, seed=0)
    keep = ~((C == 1e21) & (N > np.median(N[C == 1e21])))  # only one side of the valley...
    keep &= ~((C == 1e21) & (N < np.sort(N[C == 1e21])[2]))  # ...and just 2 sizes left
    fit = fit_isoflop(C[keep], N[keep], D[keep], L[keep], resamples=0)
    assert [m.budget for m in fit.minima] == [1e18, 1e19, 1e20]
    assert fit.notes == ("budget 1e+21 FLOPs left out: 2 distinct sizes; a parabola needs 3",)
    with pytest.raises(ValueError, match="not convex"):
        fit_parabola(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 1.0]))
    only_one = fit_isoflop(C[C == 1e18], N[C == 1e18], D[C == 1e18], L[C == 1e18], resamples=0)
    assert only_one.n_opt is None and "need minima at 2 or more budgets; got 1" in only_one.notes[-1]


def test_an_unbracketed_minimum_is_flagged():
    C, N, D, L, _ = isoflop_runs(sigma=0.0, seed=0)
    keep = (C != 1e20) | (N < np.sort(N[C == 1e20])[3])  # at 1e20, only the 3 sizes below the optimum
    C, N, D, L = C[keep], N[keep], D[keep], L[keep]
    fit = fit_isoflop(C, N, D, L, resamples=0)
    flagged = [m.budget for m in fit.minima if not m.bracketed]
    assert flagged == [1e20]
    assert any("1e+20" in n and "extrapolated" in n for n in fit.notes)
