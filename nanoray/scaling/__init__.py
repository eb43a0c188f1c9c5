"""Scaling-law fits: loss power laws, the CORE curve, isoFLOP minima and the compute-optimal allocation.

Plain numpy (no Ray), so the fits are unit-testable and run anywhere the results table is. The method is
nanochat's dev/scaling_analysis.ipynb (reference/nanochat-facts.md §6), with bootstrap intervals added:

1. `fit_power_law(x, y)`: L = E + A·x^-α by least squares in log space (E = 0 unless offset=True).
2. `fit_core_curve(flops, core)`: nanochat's CORE = 1 - a·C^-b, a power law of 1 - CORE.
3. `isoflop_minima(points)`: for each FLOPs budget C, a parabola of loss vs ln N; its vertex is N_opt(C),
   and D_opt(C) is read off the trials' own tokens, interpolated in log space (Approach 2 of Hoffmann et al.).
4. `fit_optimal_allocation(minima)`: N_opt = k_N·C^a and D_opt = k_D·C^b across budgets.

The package's other modules: `surface` (Approach 3: the loss surface L(N, D) over every trial, scipy) and
`predict` (what a target costs: depth, tokens, FLOPs, GPU-hours, dollars; `python -m nanoray.scaling predict`).

Intervals are percentile bootstraps over points (resample with replacement, refit, skip resamples with
too few distinct x). With the handful of points a sweep gives (6 depths, 3-4 budgets) they are rough:
a resample of 4 budgets often holds only 2-3 distinct ones, so treat a 95% interval as "about right",
not as exact coverage.

Predictions carry the scatter of one run as well: each resample also draws one of the fit's log-space
residuals (scaled by sqrt(n / (n - p)) for the p fitted parameters), so `band(x)` is where a new run at x
would land and `solve_draws(y)` the FLOPs at which it would reach y. On nanochat's miniseries v1 (d10-d18
fitted, tests/test_predict.py) the 95% band at d20's FLOPs holds the measured d20; in simulations with 5
points and 0.2-0.5% noise such a band held the next depth 52-77% of the time: with this few points, read
it as about a 68% band.

    fit = fit_power_law(flops, val_bpb, offset=True)
    print(fit)            # L = 0.61 + 9.8 * C^-0.071 (alpha 95% CI 0.05-0.09)
    alloc = fit_optimal_allocation(isoflop_minima(rows))
    print(alloc)          # N_opt ∝ C^0.54 ..., D_opt ∝ C^0.49 ..., tokens/param at each budget
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

Interval = tuple[float, float]
_LEVELS = {"ci68": (16.0, 84.0), "ci95": (2.5, 97.5)}  # percentile bounds of the two intervals
_E_GRID = 128  # coarse grid over E before the golden-section polish
_GOLDEN_STEPS = 40  # bracket shrinks by 0.618^40 ≈ 4e-9 of one grid cell


# --------------------------------------------------------------------------------------------------
# Power law


@dataclass(frozen=True)
class PowerLaw:
    """y = E + A·x^-alpha, fitted in log space; intervals are bootstrap percentiles (NaN if none)."""

    A: float
    alpha: float
    E: float  # irreducible loss; 0 when fitted without offset
    ci68: dict[str, Interval]  # {"A": (lo, hi), "alpha": ..., "E": ...}: 16th-84th percentiles
    ci95: dict[str, Interval]  # 2.5th-97.5th percentiles
    n_points: int
    n_boot: int  # resamples actually used (degenerate ones are skipped)
    # (n_boot, 4): A, alpha, E of each resample and the log-space residual it draws (one run's scatter)
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)), repr=False, compare=False)

    def predict(self, x):
        """E + A·x^-alpha at x (scalar or array)."""
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def draws(self, x) -> np.ndarray:
        """(n_boot, len(x)): what a new run at each x would measure under each resample."""
        A, alpha, E, noise = (self.samples[:, i:i + 1] for i in range(4))
        return (E + A * np.atleast_1d(np.asarray(x, dtype=float))[None, :] ** -alpha) * np.exp(noise)

    def band(self, x, level: str = "ci95") -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) at each x: the percentiles of `draws` (NaN without resamples)."""
        return _band(self.draws(x), level)

    def solve(self, y: float) -> float:
        """The x at which the law reaches y: inf if it never does (y <= E, or a law that does not fall)."""
        return float(_solve(self.A, self.alpha, self.E, y))

    def solve_draws(self, y: float) -> np.ndarray:
        """(n_boot,): the x at which a run reaches y under each resample (inf where it never does)."""
        A, alpha, E, noise = self.samples.T
        return _solve(A, alpha, E, y * np.exp(-noise))

    def __str__(self):
        lo, hi = self.ci95["alpha"]
        offset = f"{self.E:.3g} + " if self.E else ""
        return f"L = {offset}{self.A:.3g} * C^{-self.alpha:.2g} (alpha 95% CI {lo:.2g}-{hi:.2g})"


def fit_power_law(x, y, *, offset=False, n_boot=1000, seed=0) -> PowerLaw:
    """Fit y = A·x^-alpha (+ E with offset=True) by least squares on ln y.

    Without offset this is linear regression of ln y on ln x. With offset, E is a bounded 1-D search
    over [0, min y): for each E, (A, alpha) come from a weighted regression of ln(y - E) on ln x, and
    E minimizes the log-space residual sum Σ (ln y - ln(E + A·x^-alpha))². Needs >= 2 distinct x
    (>= 3 with offset).

    Measured on 6 points with 3% noise, the 95% interval for alpha covers the truth ~91% of the time
    without offset but only ~60% with it (E and alpha trade off, and resamples that repeat points
    favour a larger E), so read offset intervals as optimistic.
    """
    x, y = _positive_1d(x, "x"), _positive_1d(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    need = 3 if offset else 2
    if len(np.unique(x)) < need:
        raise ValueError(f"x needs >= {need} distinct values{' with offset=True' if offset else ''}, "
                         f"got {len(np.unique(x))}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")

    # Row 0 is the data itself, rows 1.. are bootstrap resamples; all are fitted in one batch.
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    idx = idx[[len(np.unique(x[i])) >= need for i in idx]]  # skip degenerate resamples
    idx = np.concatenate([np.arange(len(x))[None], idx])
    logA, alpha, E = _fit_batch(np.log(x[idx]), y[idx], offset)
    params = dict(A=np.exp(logA), alpha=alpha, E=E)
    residuals = np.log(y) - np.log(E[0] + params["A"][0] * x ** -alpha[0])
    noise = run_noise(residuals, need, len(idx) - 1, seed)
    return PowerLaw(A=float(params["A"][0]), alpha=float(alpha[0]), E=float(E[0]),
                    **_intervals({k: v[1:] for k, v in params.items()}),
                    n_points=len(x), n_boot=len(idx) - 1,
                    samples=np.stack([params["A"][1:], alpha[1:], E[1:], noise], axis=1))


def _fit_batch(logx, y, offset):
    """Fit every row of (logx, y), each (B, n): returns ln A, alpha, E, each of shape (B,)."""
    if not offset:
        logA, alpha, _ = _weighted_fit(logx, y, np.zeros((len(y), 1)))
        return logA[:, 0], alpha[:, 0], np.zeros(len(y))
    # E = t·min(y), t in [0, 1): coarse grid, then golden-section inside the best cell's neighbours.
    ymin = y.min(axis=1, keepdims=True)
    t = np.linspace(0.0, 1.0, _E_GRID + 1)[:-1]
    sse = _weighted_fit(logx, y, t[None, :] * ymin)[2]
    k = sse.argmin(axis=1)
    edges = np.append(t, 1 - 1e-9)  # E stays strictly below min(y)
    lo, hi = edges[np.maximum(k - 1, 0)], edges[k + 1]
    g = (math.sqrt(5) - 1) / 2

    def cost(tt):
        return _weighted_fit(logx, y, tt[:, None] * ymin)[2][:, 0]

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = cost(a), cost(b)
    for _ in range(_GOLDEN_STEPS):
        left = fa < fb  # the minimum lies in [lo, b]: move hi down; else in [a, hi]: move lo up
        hi, lo = np.where(left, b, hi), np.where(left, lo, a)
        a, b = np.where(left, hi - g * (hi - lo), b), np.where(left, a, lo + g * (hi - lo))
        new = cost(np.where(left, a, b))
        fa, fb = np.where(left, new, fb), np.where(left, fa, new)
    E = (lo + hi) / 2 * ymin
    logA, alpha, _ = _weighted_fit(logx, y, E)
    return logA[:, 0], alpha[:, 0], E[:, 0]


def _weighted_fit(logx, y, E):
    """For each row and each candidate E (shape (B, G)): (ln A, alpha, log-space SSE), each (B, G).

    ln(y - E) = ln A - alpha·ln x, weighted by w = ((y - E)/y)², which makes the linear fit minimize the
    log-space residuals ln y - ln(E + A·x^-alpha) to first order (d ln y = (y - E)/y · d ln(y - E)).
    """
    lx, yy, EE = logx[:, None, :], y[:, None, :], E[:, :, None]
    z = np.log(np.maximum(yy - EE, 1e-300))
    w = ((yy - EE) / yy) ** 2 + 1e-300  # the point at y = E (upper end of the search) gets ~0 weight
    mx = (w * lx).sum(-1) / w.sum(-1)
    mz = (w * z).sum(-1) / w.sum(-1)
    dx = lx - mx[..., None]
    slope = (w * dx * (z - mz[..., None])).sum(-1) / (w * dx**2).sum(-1)
    logA = mz - slope * mx
    pred = EE + np.exp(logA[..., None] + slope[..., None] * lx)
    sse = ((np.log(yy) - np.log(pred)) ** 2).sum(-1)
    return logA, -slope, sse


def _solve(A, alpha, E, y):
    """x with E + A·x^-alpha = y, elementwise; inf where no x > 0 reaches y."""
    A, alpha, E, y = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (A, alpha, E, y)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = (A / (y - E)) ** (1 / alpha)
    return np.where((y > E) & (alpha > 0) & (A > 0), x, np.inf)


# --------------------------------------------------------------------------------------------------
# CORE curve


@dataclass(frozen=True)
class CoreCurve:
    """nanochat's CORE curve, CORE = 1 - a·C^-b: `law` is the power law of 1 - CORE in FLOPs (A = a, alpha = b)."""

    law: PowerLaw

    @property
    def a(self) -> float:
        return self.law.A

    @property
    def b(self) -> float:
        return self.law.alpha

    def predict(self, flops):
        return 1 - self.law.predict(flops)

    def band(self, flops, level: str = "ci95") -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.law.band(flops, level)
        return 1 - hi, 1 - lo

    def solve(self, core: float) -> float:
        """FLOPs at which the curve reaches `core` (inf if it never does: core >= 1, or a curve that falls)."""
        return self.law.solve(1 - core)

    def solve_draws(self, core: float) -> np.ndarray:
        return self.law.solve_draws(1 - core)

    def __str__(self):
        (alo, ahi), (blo, bhi) = self.law.ci95["A"], self.law.ci95["alpha"]
        return (f"CORE = 1 - {self.a:.4g} * C^-{self.b:.4g} (a 95% CI {alo:.3g}-{ahi:.3g}, "
                f"b 95% CI {blo:.3g}-{bhi:.3g})")


def fit_core_curve(flops, core, *, n_boot=1000, seed=0) -> CoreCurve:
    """Fit CORE = 1 - a·C^-b (nanochat's form) as ln(1 - CORE) = ln a - b·ln C, least squares with the power
    law's bootstrap. C is the FLOPs the caller measures (nanoray: the trial's FLOPs, flops_per_token x tokens;
    for a published table giving only N and D, 6·N·D). CORE values must be < 1; needs >= 2 distinct C."""
    core = np.asarray(core, dtype=float)
    if core.ndim != 1 or not np.all(np.isfinite(core)) or np.any(core >= 1):
        raise ValueError(f"core must be 1-D, finite and < 1, got {core.tolist()}")
    return CoreCurve(fit_power_law(flops, 1 - core, n_boot=n_boot, seed=seed))


# --------------------------------------------------------------------------------------------------
# IsoFLOP minima


@dataclass(frozen=True)
class IsoflopMinimum:
    """The loss-optimal model size at one FLOPs budget (NaNs and a skip_reason when not fitted)."""

    flops_budget: float
    params: float  # N_opt: vertex of the parabola loss(ln N), clipped to the sampled range
    tokens: float  # D_opt: the trials' tokens, interpolated in log space at N_opt
    loss: float  # the parabola's value at N_opt
    n_points: int
    clipped: bool = False  # vertex outside the sampled sizes (or the parabola opens downward)
    skip_reason: str = ""  # non-empty: too few points, nothing was fitted

    @property
    def ok(self) -> bool:
        """A usable interior minimum: fitted and not clipped."""
        return not self.skip_reason and not self.clipped


POINT_KEYS = ("flops_budget", "params", "tokens", "loss")


def isoflop_minima(points) -> list[IsoflopMinimum]:
    """One IsoflopMinimum per FLOPs budget in `points`, sorted by budget.

    `points` are dicts with flops_budget, params, tokens and loss (one per trial; extra keys ignored).
    Budgets group by exact value. Per budget: fit loss = p2·u² + p1·u + p0 with u = ln N; the vertex
    u* = -p1 / (2·p2) is N_opt, clipped to [min N, max N] and flagged when it falls outside (or p2 <= 0).
    D_opt is interpolated from the trials' tokens (ln D linear in ln N between neighbours) rather than
    C / (6·N_opt): nanochat sets tokens = C / flops_per_token, whose attention term and excluded
    embeddings make 6·N·D ≠ C, and the trials already record what was trained. Budgets with < 3
    distinct sizes are returned with a skip_reason.
    """
    by_budget = defaultdict(list)
    for i, p in enumerate(points):
        missing = [k for k in POINT_KEYS if k not in p]
        if missing:
            raise ValueError(f"points[{i}] lacks {missing}; each point needs {list(POINT_KEYS)}")
        vals = [float(p[k]) for k in POINT_KEYS]
        if not all(math.isfinite(v) for v in vals) or min(vals[:3]) <= 0:
            raise ValueError(f"points[{i}]: flops_budget, params, tokens must be > 0 and loss finite, got {p}")
        by_budget[vals[0]].append(vals[1:])
    return [_minimum(c, np.array(rows)) for c, rows in sorted(by_budget.items())]


def _minimum(budget, rows):
    logN, logD, loss = np.log(rows[:, 0]), np.log(rows[:, 1]), rows[:, 2]
    sizes = np.unique(logN)
    if len(sizes) < 3:
        return IsoflopMinimum(budget, math.nan, math.nan, math.nan, len(rows),
                              skip_reason=f"{len(sizes)} distinct model sizes, a parabola needs >= 3")
    p2, p1, p0 = np.polyfit(logN, loss, 2)
    lo, hi = sizes[0], sizes[-1]
    if p2 > 0:
        u = -p1 / (2 * p2)
    else:  # concave or flat: no interior minimum, take the better end of the fitted curve
        u = lo if np.polyval([p2, p1, p0], lo) <= np.polyval([p2, p1, p0], hi) else hi
    clipped = not (p2 > 0 and lo <= u <= hi)
    u = float(np.clip(u, lo, hi))
    # Mean ln D per distinct size (repeated sizes, e.g. seeds), then linear interpolation in log-log.
    logD_at = np.array([logD[logN == s].mean() for s in sizes])
    return IsoflopMinimum(budget, params=math.exp(u), tokens=math.exp(np.interp(u, sizes, logD_at)),
                          loss=float(np.polyval([p2, p1, p0], u)), n_points=len(rows), clipped=clipped)


# --------------------------------------------------------------------------------------------------
# Compute-optimal allocation


@dataclass(frozen=True)
class Allocation:
    """N_opt = k_N·C^a and D_opt = k_D·C^b across budgets, with bootstrap intervals over budgets."""

    a: float  # params exponent
    b: float  # tokens exponent
    k_N: float
    k_D: float
    ci68: dict[str, Interval]  # {"a", "b", "k_N", "k_D"}: 16th-84th percentiles
    ci95: dict[str, Interval]
    budgets: tuple[float, ...]  # the budgets fitted (usable minima only)
    ratio: tuple[float, ...]  # implied tokens per param at each budget: (k_D/k_N)·C^(b-a)
    ratio_ci95: tuple[Interval, ...]
    excluded: tuple[tuple[float, str], ...]  # (budget, why) for minima left out
    n_boot: int

    def params_at(self, flops):
        return self.k_N * np.asarray(flops, dtype=float) ** self.a

    def tokens_at(self, flops):
        return self.k_D * np.asarray(flops, dtype=float) ** self.b

    def __str__(self):
        (alo, ahi), (blo, bhi) = self.ci95["a"], self.ci95["b"]
        ratios = ", ".join(f"{r:.3g} at {c:.3g}" for c, r in zip(self.budgets, self.ratio))
        return (f"N_opt = {self.k_N:.3g} * C^{self.a:.3f} (95% CI {alo:.2f}-{ahi:.2f}), "
                f"D_opt = {self.k_D:.3g} * C^{self.b:.3f} (95% CI {blo:.2f}-{bhi:.2f}); tokens/param {ratios}")


def fit_optimal_allocation(minima, n_boot=1000, seed=0) -> Allocation:
    """Fit N_opt ∝ C^a and D_opt ∝ C^b (log-log least squares) over the usable isoFLOP minima.

    Skipped and clipped minima are left out (a clipped vertex is a range edge, not an optimum) and
    listed in `excluded`. Chinchilla (Hoffmann et al. 2022) found a ≈ b ≈ 0.5, i.e. a constant
    tokens-per-param ratio (~20 counting all params). nanochat's jan26 sweep found a = 0.54, b = 0.49
    with its Kaplan-style N (transformer matrices + lm_head), tokens/param ≈ 10-11 at 1e18-1e19 FLOPs.
    If every run obeyed C = 6·N·D exactly, a + b = 1; nanochat's FLOPs include attention, so not quite.
    Needs >= 2 distinct usable budgets; the bootstrap resamples budgets (a rough interval with 3-4).
    """
    used = [m for m in minima if m.ok]
    excluded = tuple((m.flops_budget, m.skip_reason or "vertex clipped to the sampled sizes")
                     for m in minima if not m.ok)
    C = np.array([m.flops_budget for m in used])
    if len(np.unique(C)) < 2:
        raise ValueError(f"minima need >= 2 distinct usable budgets, got {len(np.unique(C))} "
                         f"(excluded: {list(excluded)})")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    N, D = np.array([m.params for m in used]), np.array([m.tokens for m in used])

    idx = np.random.default_rng(seed).integers(0, len(C), size=(n_boot, len(C)))
    idx = idx[[len(np.unique(C[i])) >= 2 for i in idx]]
    idx = np.concatenate([np.arange(len(C))[None], idx])
    zeros = np.zeros((len(idx), 1))
    # N = k_N·C^a is y = A·x^-alpha with alpha = -a: reuse the log-space fit.
    logkN, negA, _ = _weighted_fit(np.log(C[idx]), N[idx], zeros)
    logkD, negB, _ = _weighted_fit(np.log(C[idx]), D[idx], zeros)
    params = dict(a=-negA[:, 0], b=-negB[:, 0], k_N=np.exp(logkN[:, 0]), k_D=np.exp(logkD[:, 0]))
    # ln ratio(C) = ln(k_D/k_N) + (b - a)·ln C, for every resample (rows) at every budget (columns).
    ratio = np.exp(logkD - logkN + (params["b"] - params["a"])[:, None] * np.log(C)[None, :])
    if len(idx) > 1:
        ratio_ci95 = tuple(map(tuple, np.percentile(ratio[1:], _LEVELS["ci95"], axis=0).T.tolist()))
    else:
        ratio_ci95 = ((math.nan, math.nan),) * len(C)
    return Allocation(**{k: float(v[0]) for k, v in params.items()},
                      **_intervals({k: v[1:] for k, v in params.items()}),
                      budgets=tuple(C.tolist()), ratio=tuple(ratio[0].tolist()), ratio_ci95=ratio_ci95,
                      excluded=excluded, n_boot=len(idx) - 1)


# --------------------------------------------------------------------------------------------------
# Helpers


def run_noise(residuals, n_params: int, n_draws: int, seed: int) -> np.ndarray:
    """`n_draws` log-space residuals drawn with replacement, scaled by sqrt(n / (n - p)) (a fit of p parameters
    leaves residuals smaller than the noise): one run's scatter per resample. Zeros when n <= p."""
    n = len(residuals)
    if n <= n_params or n_draws == 0:
        return np.zeros(n_draws)
    scaled = np.asarray(residuals, dtype=float) * math.sqrt(n / (n - n_params))
    return np.random.default_rng([seed, 1]).choice(scaled, size=n_draws)


def _band(draws: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {list(_LEVELS)}, got {level!r}")
    if not len(draws):
        nan = np.full(draws.shape[1:], math.nan)
        return nan, nan
    lo, hi = np.percentile(draws, _LEVELS[level], axis=0)
    return lo, hi


def _intervals(samples):
    """{"ci68": {name: (lo, hi)}, "ci95": {...}} from bootstrap samples (NaN when there are none)."""
    out = {}
    for level, q in _LEVELS.items():
        out[level] = {k: tuple(float(b) for b in np.percentile(v, q)) if len(v) else (math.nan, math.nan)
                      for k, v in samples.items()}
    return out


def _positive_1d(v, name):
    arr = np.asarray(v, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0 (the fit is in log space), got {arr.tolist()}")
    return arr
