"""Scaling fits recover known laws from synthetic data, and refuse input they cannot fit."""

import re

import numpy as np
import pytest

from nanoray.scaling import IsoflopMinimum, fit_optimal_allocation, fit_power_law, isoflop_minima

# Chinchilla's fitted loss surface L(N, D) = E + A/N^a + B/D^b (Hoffmann et al. 2022, approach 3).
# Under C = 6ND its optimum is N_opt = G·(C/6)^(b/(a+b)), D_opt = (C/6)/N_opt, G = (aA/(bB))^(1/(a+b)).
E0, A0, B0, a0, b0 = 1.69, 406.4, 410.7, 0.34, 0.28
G0 = (a0 * A0 / (b0 * B0)) ** (1 / (a0 + b0))


def chinchilla_loss(N, D):
    return E0 + A0 / N**a0 + B0 / D**b0


def n_opt(C):
    return G0 * (C / 6) ** (b0 / (a0 + b0))


def isoflop_grid(budgets, centers, rng, noise=1e-3, sizes=5, flops_per_param=6):
    """`sizes` log-spaced models per budget (x0.25 to x4 around the center), tokens = C / (fpp·N)."""
    pts = []
    for C, center in zip(budgets, centers):
        for N in center * np.logspace(-0.6, 0.6, sizes):
            D = C / (flops_per_param * N)
            loss = chinchilla_loss(N, C / (6 * N)) * (1 + noise * rng.standard_normal())
            pts.append(dict(flops_budget=C, params=N, tokens=D, loss=loss, depth=0))
    return pts


# --------------------------------------------------------------------------------------------------
# fit_power_law


def test_exact_power_law_is_recovered():
    x = np.logspace(0, 15, 6)
    fit = fit_power_law(x, 40 * x**-0.08, n_boot=0)
    assert (fit.A, fit.alpha, fit.E) == (pytest.approx(40, rel=1e-9), pytest.approx(0.08, rel=1e-9), 0)
    fit = fit_power_law(x, 2 + 40 * x**-0.08, offset=True, n_boot=0)
    assert fit.E == pytest.approx(2, rel=1e-5)
    assert fit.A == pytest.approx(40, rel=1e-5) and fit.alpha == pytest.approx(0.08, rel=1e-5)
    assert np.isnan(fit.ci95["alpha"]).all() and fit.n_boot == 0
    np.testing.assert_allclose(fit.predict([1e3, 1e20]), 2 + 40 * np.array([1e3, 1e20]) ** -0.08, rtol=1e-6)


def test_noisy_offset_law_alpha_inside_its_interval():
    x = np.logspace(0, 15, 6)
    y = (2 + 40 * x**-0.08) * (1 + 0.03 * np.random.default_rng(0).standard_normal(6))
    fit = fit_power_law(x, y, offset=True, seed=0)
    lo95, hi95 = fit.ci95["alpha"]
    lo68, hi68 = fit.ci68["alpha"]
    assert 0 < lo95 <= 0.08 <= hi95  # covers the truth and excludes zero
    assert lo95 <= lo68 <= hi68 <= hi95
    assert abs(fit.alpha - 0.08) < 0.01 and 0 <= fit.E < y.min()
    assert 900 < fit.n_boot <= 1000  # a few resamples with < 3 distinct x are skipped
    assert fit.predict(x) == pytest.approx(y, rel=0.1)


def test_interval_coverage_without_offset():
    """Over 40 noisy data sets the 95% interval should cover alpha most of the time (measured: ~91%)."""
    x = np.logspace(17, 20, 6)
    covered = 0
    for seed in range(40):
        y = 9.8 * x**-0.071 * (1 + 0.03 * np.random.default_rng(seed).standard_normal(6))
        lo, hi = fit_power_law(x, y, n_boot=200, seed=seed).ci95["alpha"]
        covered += lo <= 0.071 <= hi
    assert covered >= 32


def test_str_reads_like_the_law():
    x = np.logspace(0, 15, 6)
    y = (2 + 40 * x**-0.08) * (1 + 0.03 * np.random.default_rng(0).standard_normal(6))
    s = str(fit_power_law(x, y, offset=True, n_boot=200))
    assert re.fullmatch(r"L = 2\.\d+ \+ \d\d\.?\d* \* C\^-0\.0\d+ \(alpha 95% CI 0\.0\d+-0\.\d+\)", s), s
    assert str(fit_power_law(x, 40 * x**-0.08, n_boot=0)).startswith("L = 40 * C^-0.08 ")


@pytest.mark.parametrize("x, y, kw, match", [
    ([1e18, 1e18, 1e18], [3.0, 2.9, 2.8], {}, r"x needs >= 2 distinct"),
    ([1e18, 1e19, 1e19], [3.0, 2.9, 2.8], {"offset": True}, r"x needs >= 3 distinct.*offset"),
    ([1e18, 1e19], [3.0, 2.9, 2.8], {}, r"same length"),
    ([0.0, 1e19, 1e20], [3.0, 2.9, 2.8], {}, r"^x must be finite and > 0"),
    ([1e18, 1e19, 1e20], [3.0, -1.0, 2.8], {}, r"^y must be finite and > 0"),
    ([1e18, 1e19, 1e20], [3.0, np.nan, 2.8], {}, r"^y must be finite"),
    ([[1e18, 1e19]], [[3.0, 2.9]], {}, r"^x must be 1-D"),
    ([1e18, 1e19, 1e20], [3.0, 2.9, 2.8], {"n_boot": -1}, r"n_boot must be >= 0"),
])
def test_power_law_rejects_degenerate_input(x, y, kw, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, **kw)


# --------------------------------------------------------------------------------------------------
# isoflop_minima + fit_optimal_allocation


def test_isoflop_grid_recovers_chinchilla_allocation():
    budgets = [1e18, 1e19, 1e20]
    # Grids deliberately off-center (0.7x, 1x, 1.5x the true optimum): the parabola must still find it.
    pts = isoflop_grid(budgets, [0.7 * n_opt(1e18), n_opt(1e19), 1.5 * n_opt(1e20)], np.random.default_rng(0))
    minima = isoflop_minima(pts)
    assert [m.flops_budget for m in minima] == budgets and all(m.ok for m in minima)
    for m in minima:
        assert m.params == pytest.approx(n_opt(m.flops_budget), rel=0.1)
        assert m.tokens == pytest.approx(m.flops_budget / (6 * m.params), rel=1e-9)  # 6ND = C in this grid
    alloc = fit_optimal_allocation(minima, seed=0)
    a_true = b0 / (a0 + b0)  # 0.452
    assert alloc.a == pytest.approx(a_true, abs=0.02)
    assert alloc.b == pytest.approx(1 - a_true, abs=0.02) and alloc.a + alloc.b == pytest.approx(1, abs=1e-9)
    lo, hi = alloc.ci95["a"]
    assert lo < hi and abs(lo - a_true) < 0.03 and abs(hi - a_true) < 0.03
    assert alloc.budgets == tuple(budgets) and alloc.excluded == ()
    # D/N grows with C because b > a; every fitted ratio sits near the measured one and inside its interval.
    assert alloc.ratio[0] < alloc.ratio[1] < alloc.ratio[2]
    for m, r, (rlo, rhi) in zip(minima, alloc.ratio, alloc.ratio_ci95):
        assert r == pytest.approx(m.tokens / m.params, rel=0.05) and rlo <= r <= rhi
    assert alloc.params_at(1e19) == pytest.approx(minima[1].params, rel=0.05)
    assert "N_opt = " in str(alloc) and "tokens/param" in str(alloc)


def test_tokens_come_from_the_points_not_6nd():
    """With 8 FLOPs per param-token (attention), D_opt = C / (8 N_opt), which C / (6 N_opt) would miss."""
    pts = isoflop_grid([1e19], [n_opt(1e19)], np.random.default_rng(1), flops_per_param=8)
    (m,) = isoflop_minima(pts)
    assert m.tokens == pytest.approx(1e19 / (8 * m.params), rel=1e-9)


def test_clipped_and_skipped_budgets_are_flagged_and_excluded():
    rng = np.random.default_rng(2)
    pts = (isoflop_grid([1e18], [n_opt(1e18)], rng)
           + isoflop_grid([1e19], [20 * n_opt(1e19)], rng)  # every size far too big: vertex below the range
           + isoflop_grid([1e20], [n_opt(1e20)], rng, sizes=2)
           + isoflop_grid([1e21], [n_opt(1e21)], rng))
    ok, clipped, skipped, ok2 = isoflop_minima(pts)
    assert ok.ok and ok2.ok
    assert clipped.clipped and not clipped.ok
    assert clipped.params == pytest.approx(min(p["params"] for p in pts if p["flops_budget"] == 1e19))
    assert skipped.skip_reason.startswith("2 distinct model sizes") and np.isnan(skipped.params)
    alloc = fit_optimal_allocation([ok, clipped, skipped, ok2], n_boot=100)
    assert alloc.budgets == (1e18, 1e21)
    assert [c for c, _ in alloc.excluded] == [1e19, 1e20]


def test_allocation_exact_power_laws():
    C = np.array([1e18, 2.15e18, 4.64e18, 1e19])
    minima = [IsoflopMinimum(c, params=0.1 * c**0.54, tokens=2.0 * c**0.49, loss=1.0, n_points=6) for c in C]
    alloc = fit_optimal_allocation(minima, n_boot=200)
    assert (alloc.a, alloc.b) == (pytest.approx(0.54), pytest.approx(0.49))
    assert (alloc.k_N, alloc.k_D) == (pytest.approx(0.1), pytest.approx(2.0))
    np.testing.assert_allclose(alloc.ratio, 20 * C**-0.05)
    assert alloc.ci95["a"] == pytest.approx((0.54, 0.54))  # noiseless: every resample agrees
    assert np.isnan(fit_optimal_allocation(minima, n_boot=0).ratio_ci95).all()


def test_isoflop_and_allocation_reject_bad_input():
    with pytest.raises(ValueError, match=r"points\[1\] lacks \['loss'\]"):
        isoflop_minima([dict(flops_budget=1e18, params=1e8, tokens=1e9, loss=3.0),
                        dict(flops_budget=1e18, params=2e8, tokens=5e8)])
    with pytest.raises(ValueError, match=r"points\[0\].*> 0"):
        isoflop_minima([dict(flops_budget=1e18, params=0, tokens=1e9, loss=3.0)])
    one = isoflop_minima(isoflop_grid([1e18], [n_opt(1e18)], np.random.default_rng(3)))
    with pytest.raises(ValueError, match=r"minima need >= 2 distinct usable budgets, got 1"):
        fit_optimal_allocation(one)
