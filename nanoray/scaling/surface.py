"""Approach 3 of Hoffmann et al. (2022): one loss surface L(N, D) = E + A/N^alpha + B/D^beta over every trial.

Where Approach 2 (`nanoray.scaling.isoflop_minima`) reads the compute-optimal size off each budget's parabola,
the surface is fitted to all trials at once, and the compute-optimal allocation follows from it in closed form.
The fit is Hoffmann's (and OLMo-core's model ladder's): ln L̂ = LSE(a - alpha·ln N, b - beta·ln D, e) with
A = e^a, B = e^b, E = e^e (LSE: log-sum-exp), a Huber loss (delta 1e-3) on ln L̂ - ln L, minimized by scipy's
L-BFGS-B from a grid of starts (the 16 of a 144-point grid with the lowest loss at the start; the best end point wins).

    surface = fit_loss_surface(params, tokens, val_bpb, flops)   # SurfaceError when the trials cannot pin it
    surface.optimal(1e19)          # (N*, D*) at C = 1e19 FLOPs
    surface.solve(0.80)            # FLOPs whose compute-optimal run reaches loss 0.80

When the trials can pin it (the choice, `unfit_reason`): five parameters need >= 10 finished trials (two per
parameter); 6-9 trials fit four, with beta = alpha (Chinchilla's own exponents differ by 0.06, and the optimal
tokens per param then stays constant); fewer than 6, fewer than 3 model sizes, or trials that all sit on one
tokens-per-param line (a ratio grid: D = r·N makes A/N^alpha and B/D^beta one power law of N) get no surface.

Compute-optimal under C = k·N·D, with k the trials' median FLOPs / (N·D) (6 when FLOPs are 6·N·D; nanoray's
FLOPs count attention too, so k is a little more than 6 and varies with depth: the closed form is an
approximation there): N* = G·(C/k)^(beta/(alpha+beta)), G = (alpha·A / (beta·B))^(1/(alpha+beta)),
D* = (C/k) / N*, and the frontier L*(C) = E + K·(C/k)^-gamma with gamma = alpha·beta/(alpha+beta).

Intervals: a percentile bootstrap over trials (resamples that cannot pin the surface are skipped), each
refitted from the full fit's optimum; predictions also draw one run's scatter (`nanoray.scaling.run_noise`).
"""

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from nanoray.scaling import Interval, _band, _intervals, _positive_1d, run_noise

HUBER_DELTA = 1e-3  # Hoffmann et al.: ln-loss residuals beyond this count linearly (outliers weigh less)
MIN_TRIALS = 6  # below this no surface; from here to FULL_TRIALS - 1, beta = alpha
FULL_TRIALS = 10  # two trials per parameter for all five
MIN_RATIO_SPREAD = 1.5  # the largest tokens-per-param ratio must be >= 1.5x the smallest
NAMES = ("E", "A", "B", "alpha", "beta")
# Starts: each exponent, E as a fraction of the smallest loss, and the share of the reducible loss that the
# N term carries at the trials' mean size (the D term the rest).
START_EXPONENTS = (0.1, 0.3, 0.6, 1.0)
START_E = (0.2, 0.5, 0.9)
START_SHARE = (0.25, 0.5, 0.75)
OPTIMIZED_STARTS = 16  # L-BFGS-B runs from the grid's best starts only (~0.2 s instead of ~3 s for 144)


class SurfaceError(ValueError):
    """The trials cannot pin the surface; the message says why and what it needs."""


@dataclass(frozen=True)
class LossSurface:
    """L(N, D) = E + A/N^alpha + B/D^beta with bootstrap intervals; `tied`: beta was fixed to alpha."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    tied: bool
    flops_per_param_token: float  # k of C = k·N·D
    ci68: dict[str, Interval]  # E, A, B, alpha, beta, and a, b (the exponents of N* and D* in C)
    ci95: dict[str, Interval]
    n_points: int
    n_boot: int
    samples: np.ndarray = field(repr=False, compare=False)  # (n_boot, 6): E, A, B, alpha, beta, run noise

    @property
    def params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    @property
    def a(self) -> float:
        """N* ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D* ∝ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    def predict(self, N, D):
        return _predict(self.params, N, D)

    def optimal(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*) at FLOPs C: the loss-minimizing split of C = k·N·D."""
        return _optimal(self.params, flops, self.flops_per_param_token)

    def optimal_draws(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*), each (n_boot, len(flops)), under each resample."""
        return _optimal(self.samples[:, :5].T[..., None], np.atleast_1d(flops), self.flops_per_param_token)

    def optimal_each(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N*, D*) of each resample at its own FLOPs (`flops`: one value per resample, as `solve_draws` gives)."""
        return _optimal(self.samples[:, :5].T, flops, self.flops_per_param_token)

    def frontier(self, flops):
        """L*(C): the loss of the compute-optimal run at C."""
        return self.predict(*self.optimal(flops))

    def frontier_band(self, flops, level: str = "ci95") -> tuple[np.ndarray, np.ndarray]:
        """Where a new compute-optimal run at each C would land (percentiles over resamples and run scatter)."""
        P = self.samples[:, :5].T[..., None]
        loss = _predict(P, *_optimal(P, np.atleast_1d(flops), self.flops_per_param_token))
        return _band(loss * np.exp(self.samples[:, 5:6]), level)

    def solve(self, loss: float) -> float:
        """FLOPs whose compute-optimal run reaches `loss` (inf at or below E)."""
        return float(_solve(self.params, loss, self.flops_per_param_token))

    def solve_draws(self, loss: float) -> np.ndarray:
        """(n_boot,): the FLOPs of `solve` under each resample, its run's scatter included."""
        return _solve(self.samples[:, :5].T, loss * np.exp(-self.samples[:, 5]), self.flops_per_param_token)

    def __str__(self):
        lo, hi = self.ci95["alpha"]
        exps = f"alpha = beta = {self.alpha:.3g}" if self.tied else f"alpha {self.alpha:.3g}, beta {self.beta:.3g}"
        return (f"L(N, D) = {self.E:.3g} + {self.A:.3g}/N^{self.alpha:.3g} + {self.B:.3g}/D^{self.beta:.3g} "
                f"({exps}; alpha 95% CI {lo:.2g}-{hi:.2g}; {self.n_points} trials); N* ∝ C^{self.a:.3f}, "
                f"D* ∝ C^{self.b:.3f}")


def unfit_reason(params, tokens) -> str:
    """Why these trials cannot pin the surface ("" when they can)."""
    N, D = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
    if len(N) < MIN_TRIALS:
        return f"not enough trials (need >= {MIN_TRIALS} finished trials, have {len(N)})"
    if len(np.unique(N)) < 3:
        return f"not enough model sizes (need >= 3, have {len(np.unique(N))})"
    ratio = D / N
    if ratio.max() < MIN_RATIO_SPREAD * ratio.min():
        return (f"the trials lie on one tokens-per-param line (D/N {ratio.min():.3g}-{ratio.max():.3g}): the surface "
                f"needs ratios at least {MIN_RATIO_SPREAD}x apart, as an isoFLOP grid gives")
    return ""


def fit_loss_surface(params, tokens, loss, flops=None, *, n_boot=200, seed=0) -> LossSurface:
    """Fit E + A/N^alpha + B/D^beta to the trials (N = params, D = tokens) by Huber loss on ln L; `flops`
    (each trial's, optional) sets k of C = k·N·D (default 6). Raises SurfaceError (a ValueError) when the
    trials cannot pin it (`unfit_reason`)."""
    N, D, L = _positive_1d(params, "params"), _positive_1d(tokens, "tokens"), _positive_1d(loss, "loss")
    if not len(N) == len(D) == len(L):
        raise ValueError(f"params, tokens and loss must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    k = 6.0 if flops is None else float(np.median(_positive_1d(flops, "flops") / (N * D)))
    why = unfit_reason(N, D)
    if why:
        raise SurfaceError(why)
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    tied = len(N) < FULL_TRIALS
    u, v, y = np.log(N), np.log(D), np.log(L)
    # L-BFGS-B's tiny BLAS calls on a multi-threaded OpenBLAS spin its threads: one thread fits 10x faster.
    with threadpool_limits(limits=1, user_api="blas"):
        starts = sorted(_starts(u, v, L, tied), key=lambda theta: _objective(theta, u, v, y, tied)[0])
        best = min((_minimize(theta, u, v, y, tied) for theta in starts[:OPTIMIZED_STARTS]), key=lambda r: r.fun)
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_boot):
            i = rng.integers(0, len(N), size=len(N))
            if not unfit_reason(N[i], D[i]):
                boot.append(_params(_minimize(best.x, u[i], v[i], y[i], tied).x, tied))
    boot = np.array(boot).reshape(-1, 5)
    fitted = _params(best.x, tied)
    residuals = y - np.log(_predict(fitted, N, D))
    noise = run_noise(residuals, 4 if tied else 5, len(boot), seed)
    samples = dict(zip(NAMES, boot.T))
    samples.update(a=boot[:, 4] / boot[:, 3:5].sum(1), b=boot[:, 3] / boot[:, 3:5].sum(1))
    return LossSurface(**dict(zip(NAMES, map(float, fitted))), tied=tied, flops_per_param_token=k,
                       **_intervals(samples), n_points=len(N), n_boot=len(boot),
                       samples=np.column_stack([boot, noise]))


# --------------------------------------------------------------------------------------------------
# The fit


def _params(theta, tied: bool) -> np.ndarray:
    """(E, A, B, alpha, beta) from the optimizer's (a, b, e, alpha[, beta])."""
    a, b, e, alpha = theta[:4]
    return np.array([math.exp(e), math.exp(a), math.exp(b), alpha, alpha if tied else theta[4]])


def _objective(theta, u, v, y, tied):
    """Huber loss of ln L̂ - ln L (in units of delta², so L-BFGS-B's tolerances see numbers near 1) and its
    gradient in (a, b, e, alpha[, beta])."""
    a, b, e, alpha = theta[:4]
    beta = alpha if tied else theta[4]
    terms = np.stack([a - alpha * u, b - beta * v, np.full_like(u, e)])
    top = terms.max(axis=0)  # log-sum-exp of the three terms, inline: scipy's costs 5x this whole function
    share = np.exp(terms - top)
    total = share.sum(axis=0)
    r = top + np.log(total) - y
    share /= total  # d lse / d term
    d = HUBER_DELTA
    f = np.where(np.abs(r) <= d, 0.5 * r**2, d * (np.abs(r) - 0.5 * d)).sum() / d**2
    psi = np.clip(r, -d, d) / d**2
    g = [(psi * share[0]).sum(), (psi * share[1]).sum(), (psi * share[2]).sum(), -(psi * share[0] * u).sum()]
    g_beta = -(psi * share[1] * v).sum()
    return f, np.array(g[:3] + [g[3] + g_beta] if tied else g + [g_beta])


def _minimize(theta, u, v, y, tied):
    top = float(y.min())  # E <= the smallest loss
    bounds = [(-30.0, 100.0), (-30.0, 100.0), (top - 10.0, top), (1e-3, 4.0)] + ([] if tied else [(1e-3, 4.0)])
    return minimize(_objective, theta, args=(u, v, y, tied), jac=True, method="L-BFGS-B", bounds=bounds,
                    options=dict(ftol=1e-12, gtol=1e-9, maxiter=2000))


def _starts(u, v, L, tied):
    """The grid of starting points, in the optimizer's coordinates."""
    mean_L, min_L = L.mean(), L.min()
    for alpha, beta, e_frac, share in itertools.product(START_EXPONENTS, (None,) if tied else START_EXPONENTS,
                                                        START_E, START_SHARE):
        beta = alpha if beta is None else beta
        E = e_frac * min_L
        a = math.log(share * (mean_L - E)) + alpha * u.mean()
        b = math.log((1 - share) * (mean_L - E)) + beta * v.mean()
        yield np.array([a, b, math.log(E), alpha] + ([] if tied else [beta]))


# --------------------------------------------------------------------------------------------------
# Closed forms (each takes the parameters as the rows of P: E, A, B, alpha, beta; arrays broadcast)


def _predict(P, N, D):
    E, A, B, alpha, beta = P
    return E + A * np.asarray(N, dtype=float) ** -alpha + B * np.asarray(D, dtype=float) ** -beta


def _optimal(P, C, k):
    _, A, B, alpha, beta = P
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    C = np.asarray(C, dtype=float)
    n = G * (C / k) ** (beta / (alpha + beta))
    with np.errstate(invalid="ignore"):  # C = inf (a target at or below the floor E): D* = inf/inf, inf too
        return n, np.where(np.isinf(C), np.inf, C / k / n)


def _solve(P, loss, k):
    """C with L*(C) = loss: L* - E = K·(C/k)^-gamma is one power law in C."""
    E, A, B, alpha, beta = (np.asarray(p, dtype=float) for p in P)
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    K = A * G**-alpha + B * G**beta
    gamma = alpha * beta / (alpha + beta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        C = k * (K / (loss - E)) ** (1 / gamma)
    return np.where(loss > E, C, np.inf)
