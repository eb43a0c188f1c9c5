"""What it takes to reach a target val bpb or CORE: the dial's depth, tokens, FLOPs, GPU-hours and dollars.

    python -m nanoray.scaling predict --run-dir runs/miniseries                  # the default targets
    python -m nanoray.scaling predict --run-dir runs/miniseries --core 0.2565 --bpb 0.8 --usd-per-gpu-hour 3

The run directory is a family's report directory (its results.csv); the command prints the table and then one
JSON line. The same table goes into the family's report (nanoray.family).

The fits of a family (`fit_family`): the power law of val bpb in FLOPs (a ratio grid's trials), nanochat's
CORE curve (every trial with a score; an isoFLOP grid: the best CORE of each budget), the loss surface
(Approach 3, every trial, when the trials can pin it: nanoray.scaling.surface) and Approach 2's allocation
(an isoFLOP grid). C is the trials' own FLOPs (flops_per_token x tokens, attention included).

A target becomes FLOPs (`what_it_takes`): a val bpb target through the surface's compute-optimal frontier
L*(C) where there is a surface, else the power law; a CORE target through the CORE curve. FLOPs become the
dial's depth: with a surface (or Approach 2's allocation) the compute-optimal N*(C), D*(C), and the smallest
depth whose scaling params reach N*, trained on D* tokens (more params on the same tokens only lowers the
loss); without one, the family's own tokens-per-param ratio: the smallest depth whose ratio run has the
FLOPs (its tokens and FLOPs are then that run's, at or above the target's). GPU-hours and dollars are the
dial's (`CostModel`: the GPU's bf16 peak at the assumed MFU, the price of a GPU-hour). Every bootstrap
resample goes through the same steps, so FLOPs, depth, GPU-hours and cost get 95% percentile intervals.
Depths are searched up to MAX_DEPTH; a target beyond it, or below a fit's floor, reads "out of reach".
"""

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from nanoray.dial import DEFAULT_RATIO, CostModel, Horizon, PlanError, get_preset, plan, training_gpu_hours
from nanoray.scaling import (Allocation, CoreCurve, PowerLaw, fit_core_curve, fit_optimal_allocation,
                             fit_power_law, isoflop_minima)
from nanoray.scaling.surface import LossSurface, SurfaceError, fit_loss_surface

GPT2_CORE = 0.2565  # GPT-2 1558M's CORE (0.256525): nanochat's leaderboard bar
BEST_CORE_FACTOR = 1.1  # default CORE target: the family's best x 1.1
BEST_BPB_FACTOR = 0.9  # default val bpb target: the family's best x 0.9
MAX_DEPTH = 64  # deepest depth searched (nanochat's largest published model is d34)
N_BOOT = 1000  # resamples of the 1-D laws (as nanoray.family's own fits, so the report's numbers agree)
SURFACE_BOOT = 200  # at most this many for the loss surface (each a refit: ~10 ms)
LEVEL = (2.5, 97.5)
NUMERIC = ("depth", "ratio", "flops_budget", "params", "tokens", "flops", "val_bpb", "core")


# ---------------------------------------------------------------------------------------------------
# Fits


@dataclass
class FamilyFits:
    """Every fit a family's rows allow, and why the others are missing."""

    bpb: PowerLaw | None  # val bpb vs FLOPs (ratio grid)
    core: CoreCurve | None  # CORE = 1 - a·C^-b
    surface: LossSurface | None  # L(N, D), Approach 3
    allocation: Allocation | None  # N_opt, D_opt vs C, Approach 2 (isoFLOP grid)
    missing: dict[str, str] = field(default_factory=dict)  # fit name -> why it is not there

    def lines(self) -> list[str]:
        """One line per fit, or why it is missing."""
        fits = dict(bpb=("val bpb power law", self.bpb), core=("CORE curve", self.core),
                    surface=("loss surface (Approach 3)", self.surface),
                    allocation=("compute-optimal allocation (Approach 2)", self.allocation))
        return [f"{label}: {fit if fit is not None else self.missing.get(name, 'not fitted')}"
                for name, (label, fit) in fits.items() if fit is not None or name in self.missing]


def finished(rows: list[dict]) -> list[dict]:
    """The rows a fit may use: done, with positive params, tokens and FLOPs and a finite val bpb."""
    def ok(r):
        vals = [_float(r.get(k)) for k in ("params", "tokens", "flops", "val_bpb")]
        return r.get("status") == "done" and all(v is not None and math.isfinite(v) for v in vals) and \
            min(vals[:3]) > 0
    return [r for r in rows if ok(r)]


def fit_family(rows: list[dict], *, n_boot: int = N_BOOT, seed: int = 0) -> FamilyFits:
    """The fits of a family's result rows (as the family writes them, or as read from results.csv)."""
    done = finished(rows)
    isoflop = any(_float(r.get("flops_budget")) for r in done)
    fits = FamilyFits(None, None, None, None)
    flops = [r["flops"] for r in done]
    if isoflop:
        fits.missing["bpb"] = "an isoFLOP grid: val bpb vs FLOPs is the loss surface's frontier"
    elif len(set(flops)) >= 2:
        fits.bpb = fit_power_law(flops, [r["val_bpb"] for r in done], n_boot=n_boot, seed=seed)
    else:
        fits.missing["bpb"] = f"not enough trials (need >= 2 finished trials of different FLOPs, have {len(done)})"

    scored = [r for r in done if _float(r.get("core")) is not None]
    if isoflop:  # the best CORE of each budget: the curve of what compute buys, not of every size tried
        best = {}
        for r in scored:
            best[r["flops_budget"]] = max(best.get(r["flops_budget"], r), r, key=lambda x: x["core"])
        scored = list(best.values())
    if len({r["flops"] for r in scored}) >= 2:
        fits.core = fit_core_curve([r["flops"] for r in scored], [r["core"] for r in scored], n_boot=n_boot,
                                   seed=seed)
    else:
        fits.missing["core"] = f"not enough CORE scores (need >= 2 at different FLOPs, have {len(scored)})"

    try:
        fits.surface = fit_loss_surface([r["params"] for r in done], [r["tokens"] for r in done],
                                        [r["val_bpb"] for r in done], flops, n_boot=min(n_boot, SURFACE_BOOT),
                                        seed=seed)
    except SurfaceError as e:
        fits.missing["surface"] = str(e)

    if isoflop:
        minima = isoflop_minima([dict(flops_budget=r["flops_budget"], params=r["params"], tokens=r["tokens"],
                                      loss=r["val_bpb"]) for r in done])
        try:
            fits.allocation = fit_optimal_allocation(minima, n_boot=n_boot, seed=seed)
        except ValueError as e:
            fits.missing["allocation"] = str(e)
    return fits


# ---------------------------------------------------------------------------------------------------
# Targets -> depth, tokens, FLOPs, GPU-hours, cost


@dataclass(frozen=True)
class Target:
    metric: str  # "val_bpb" or "core"
    value: float
    why: str  # where the number comes from ("GPT-2's CORE", "best x 1.1", "asked")


@dataclass(frozen=True)
class Need:
    """What one target takes. None where it cannot be said (out of reach, no fit); intervals are 95%."""

    target: Target
    law: str  # the fit that answered
    flops_needed: float | None  # C at which the law reaches the target
    flops_needed_ci: tuple
    depth: int | None
    depth_ci: tuple
    params: float | None  # the depth's scaling params
    tokens: float | None
    flops: float | None  # the depth's training FLOPs (>= flops_needed: depths are whole)
    gpu_hours: float | None
    gpu_hours_ci: tuple
    cost_usd: float | None
    cost_usd_ci: tuple
    note: str = ""


HEADER = ("target", "law", "FLOPs needed", "depth", "params", "tokens", "FLOPs", "GPU-hours", "cost")
COMPARISON = ("budget", "N* (A2)", "D* (A2)", "D/N (A2)", "N* (A3)", "D* (A3)", "D/N (A3)", "")


@dataclass
class Prediction:
    """A family's fits and the table of what its targets take, under the cost model's assumptions."""

    fits: FamilyFits
    needs: list[Need]
    cost: CostModel
    preset: str
    allocation: str  # how FLOPs became a depth ("loss surface", "Approach 2", "ratio 12")
    comparison: list[list[str]]  # Approach 2 vs 3 per budget (cells under comparison_header)
    comparison_header: tuple = COMPARISON

    def law(self, metric: str):
        """The fit that answers a `metric` ("val_bpb" or "core") target, or None."""
        return answering(self.fits, metric)[0]

    def law_name(self, metric: str) -> str:
        return answering(self.fits, metric)[1]

    def curve(self, metric: str, flops) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(value, 95% lo, 95% hi) of `metric` at each FLOPs under the law that answers it (the surface: its
        compute-optimal frontier), or None without one."""
        law = self.law(metric)
        if law is None:
            return None
        if law is self.fits.surface:
            return (law.frontier(flops), *law.frontier_band(flops))
        return (law.predict(flops), *law.band(flops))

    def table(self) -> tuple[list[str], list[list[str]]]:
        return list(HEADER), [_cells(n) for n in self.needs]

    def assumptions(self) -> str:
        return (f"preset {self.preset}; FLOPs to depth by {self.allocation}; {self.cost.gpu} at "
                f"{self.cost.mfu:.0%} MFU, ${self.cost.usd_per_gpu_hour:g} per GPU-hour; 95% bootstrap intervals "
                "in brackets")

    def text(self) -> str:
        header, cells = self.table()
        widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *cells]]
        return "\n".join(["What it takes (" + self.assumptions() + ")", *lines]
                         + [f"- {n.target.metric} {n.target.value:g}: {n.note}" for n in self.needs if n.note])

    def to_json(self) -> dict:
        return _finite(dict(
            preset=self.preset, allocation=self.allocation, assumptions=self.cost.model_dump(),
            fits={name: str(fit) for name, fit in (("bpb", self.fits.bpb), ("core", self.fits.core),
                                                   ("surface", self.fits.surface),
                                                   ("allocation", self.fits.allocation)) if fit is not None},
            missing=self.fits.missing,
            targets=[dict(metric=n.target.metric, target=n.target.value, why=n.target.why, law=n.law,
                          flops_needed=n.flops_needed, flops_needed_ci95=list(n.flops_needed_ci), depth=n.depth,
                          depth_ci95=list(n.depth_ci), params=n.params, tokens=n.tokens, flops=n.flops,
                          gpu_hours=n.gpu_hours, gpu_hours_ci95=list(n.gpu_hours_ci), cost_usd=n.cost_usd,
                          cost_usd_ci95=list(n.cost_usd_ci), note=n.note) for n in self.needs]))


def default_targets(rows: list[dict]) -> list[Target]:
    """GPT-2's CORE and the family's best CORE x 1.1 (when positive); the best val bpb x 0.9."""
    done = finished(rows)
    out = [Target("core", GPT2_CORE, "GPT-2's CORE")]
    cores = [c for c in (_float(r.get("core")) for r in done) if c is not None]
    if cores and max(cores) > 0:
        out.append(Target("core", round(max(cores) * BEST_CORE_FACTOR, 4), f"best x {BEST_CORE_FACTOR:g}"))
    if done:
        out.insert(0, Target("val_bpb", round(min(r["val_bpb"] for r in done) * BEST_BPB_FACTOR, 4),
                             f"best x {BEST_BPB_FACTOR:g}"))
    return out


class Depths:
    """The dial's depths 1..MAX_DEPTH of a preset: scaling params, FLOPs per token, and the ratio-r run."""

    def __init__(self, preset: str, ratio: float):
        self.depth, self.params, self.fpt, self.run_flops, self.run_tokens = [], [], [], [], []
        for d in range(1, MAX_DEPTH + 1):
            try:
                p = plan(d, preset, Horizon(ratio=ratio))
            except PlanError:  # a ratio run too short for one step: still a size, with no ratio run
                p = plan(d, preset, Horizon(iterations=1))
                p = p.model_copy(update=dict(tokens=0, total_flops=0.0))
            self.depth.append(d)
            self.params.append(p.scaling_params)
            self.fpt.append(p.flops_per_token)
            self.run_flops.append(p.total_flops)
            self.run_tokens.append(p.tokens)
        self.params, self.fpt = np.array(self.params, dtype=float), np.array(self.fpt, dtype=float)
        self.run_flops = np.maximum.accumulate(np.array(self.run_flops, dtype=float))
        self.run_tokens = np.array(self.run_tokens, dtype=float)

    def by_size(self, n, d):
        """(depth index, tokens, FLOPs): the smallest depth with params >= n, trained on d tokens (index
        len(depths) where none is big enough)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        i = np.searchsorted(self.params, np.where(np.isfinite(n), n, np.inf))
        j = np.minimum(i, len(self.depth) - 1)
        ok = (i < len(self.depth)) & np.isfinite(d)
        return i, np.where(ok, d, np.nan), np.where(ok, self.fpt[j] * d, np.nan)

    def by_flops(self, c):
        """(depth index, tokens, FLOPs): the smallest depth whose ratio run has FLOPs >= c."""
        c = np.asarray(c, dtype=float)
        i = np.searchsorted(self.run_flops, np.where(np.isfinite(c), c, np.inf))
        j = np.minimum(i, len(self.depth) - 1)
        ok = i < len(self.depth)
        return i, np.where(ok, self.run_tokens[j], np.nan), np.where(ok, self.run_flops[j], np.nan)


def what_it_takes(rows: list[dict], targets: list[Target] | None = None, *, cost: CostModel | None = None,
                  n_boot: int = N_BOOT, seed: int = 0) -> Prediction:
    """The family's fits and, for each target (default: `default_targets`), what reaching it takes."""
    cost = cost or CostModel()
    done = finished(rows)
    if not done:
        raise ValueError("rows: no finished trial with params, tokens, FLOPs and val bpb to fit")
    presets = {r.get("preset") for r in done}
    if len(presets) != 1 or None in presets:
        raise ValueError(f"rows: the trials must share one preset, got {sorted(map(str, presets))}")
    preset = get_preset(presets.pop()).name
    fits = fit_family(rows, n_boot=n_boot, seed=seed)
    ratios = [_float(r.get("ratio")) for r in done if _float(r.get("ratio"))]
    ratio = float(np.median(ratios)) if ratios else DEFAULT_RATIO
    depths = Depths(preset, ratio)
    if fits.surface is not None:
        allocation = "the loss surface's N*(C), D*(C)"
    elif fits.allocation is not None:
        allocation = "Approach 2's N_opt(C), D_opt(C)"
    else:
        allocation = f"the family's ratio ({ratio:g} tokens per param)"
    needs = [_need(t, fits, depths, cost) for t in (default_targets(rows) if targets is None else targets)]
    return Prediction(fits, needs, cost, preset, allocation, _comparison(fits, done))


def answering(fits: FamilyFits, metric: str) -> tuple[object, str]:
    """(the fit that answers a target of `metric`, its name): CORE by the CORE curve, val bpb by the loss
    surface's frontier where there is one, else by the power law."""
    if metric == "core":
        return fits.core, "CORE curve"
    if metric != "val_bpb":
        raise ValueError(f"target.metric: core or val_bpb, got {metric!r}")
    return (fits.surface, "loss surface") if fits.surface is not None else (fits.bpb, "val bpb power law")


def _need(target: Target, fits: FamilyFits, depths: Depths, cost: CostModel) -> Need:
    nothing = (None, None)
    law, name = answering(fits, target.metric)
    if law is None:
        why = fits.missing.get("core" if target.metric == "core" else "bpb", "no fit")
        return Need(target, "–", None, nothing, None, nothing, None, None, None, None, nothing, None, nothing,
                    note=f"no {name}: {why}")
    c, draws = law.solve(target.value), law.solve_draws(target.value)

    def place(c):  # FLOPs needed -> (depth index, tokens, FLOPs of that depth)
        if fits.surface is not None:
            return depths.by_size(*fits.surface.optimal(c))
        if fits.allocation is not None:
            return depths.by_size(fits.allocation.params_at(c), fits.allocation.tokens_at(c))
        return depths.by_flops(c)

    i, tokens, flops = place(c)
    # A target the surface answers: each resample's own allocation at its own FLOPs
    bi, _, bflops = depths.by_size(*law.optimal_each(draws)) if law is fits.surface else place(draws)
    i = int(i)
    reach = i < len(depths.depth)
    bdepth = np.where(bi < len(depths.depth), bi + 1.0, np.inf)
    hours = training_gpu_hours(bflops, cost)
    hours = np.where(np.isfinite(bdepth), hours, np.inf)
    note = ""
    if not math.isfinite(c):
        note = f"out of reach under the {name}: " + _floor(target, law)
    elif not reach:
        note = f"out of reach: beyond d{MAX_DEPTH} (needs {c:.3g} FLOPs)"
    gpu_hours = float(training_gpu_hours(flops, cost)) if reach else None
    return Need(target, name, c if math.isfinite(c) else None, _ci(draws), depths.depth[i] if reach else None,
                _ci(bdepth, integer=True), float(depths.params[i]) if reach else None,
                float(tokens) if reach else None, float(flops) if reach else None, gpu_hours, _ci(hours),
                gpu_hours * cost.usd_per_gpu_hour if reach else None, _ci(hours * cost.usd_per_gpu_hour), note)


def _floor(target: Target, law) -> str:
    if target.metric == "core":
        return "CORE does not rise with FLOPs in this family" if law.b <= 0 else "CORE < 1 always"
    floor = law.E
    return f"val bpb never falls to {target.value:g} (the fit's floor E = {floor:.4g})" if floor > 0 else \
        f"val bpb never falls to {target.value:g}"


def _comparison(fits: FamilyFits, done: list[dict]) -> list[list[str]]:
    """Approach 2's and 3's compute-optimal N, D and tokens per param at each isoFLOP budget (when both
    exist), with 95% intervals of the ratio; the last cell says whether the ratio intervals are apart."""
    a2, a3 = fits.allocation, fits.surface
    if a2 is None or a3 is None:
        return []
    budgets = np.array(a2.budgets)
    n3, d3 = a3.optimal(budgets)
    bn, bd = a3.optimal_draws(budgets)
    lo3, hi3 = np.percentile(bd / bn, LEVEL, axis=0) if len(bn) else (budgets * np.nan,) * 2
    rows = []
    for j, c in enumerate(budgets):
        (lo2, hi2), r3 = a2.ratio_ci95[j], d3[j] / n3[j]
        apart = hi2 < lo3[j] or hi3[j] < lo2
        rows.append([f"{c:.3g}", _count(a2.params_at(c)), _count(a2.tokens_at(c)),
                     f"{a2.ratio[j]:.3g} [{lo2:.3g}, {hi2:.3g}]", _count(n3[j]), _count(d3[j]),
                     f"{r3:.3g} [{lo3[j]:.3g}, {hi3[j]:.3g}]", "disagree" if apart else ""])
    rows.append(["exponents", f"C^{a2.a:.3f}", f"C^{a2.b:.3f}", "", f"C^{a3.a:.3f}", f"C^{a3.b:.3f}", "", ""])
    return rows


# ---------------------------------------------------------------------------------------------------
# Formatting


def _ci(values, integer: bool = False) -> tuple:
    """The 95% percentile interval of bootstrap values (inf: out of reach) as (lo, hi); None where unknown."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return (None, None)
    lo, hi = np.percentile(v, LEVEL, method="inverted_cdf")
    conv = (lambda x: int(x)) if integer else float
    return tuple(None if not math.isfinite(x) else conv(x) for x in (lo, hi))


def _count(x) -> str:
    x = float(x)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _span(value, ci, fmt) -> str:
    """value [lo, hi]; '–' for a missing value, '∞' for an open end (out of reach in some resamples)."""
    if value is None:
        return "–"
    lo, hi = ci
    if lo is None and hi is None:
        return fmt(value)
    return f"{fmt(value)} [{'–' if lo is None else fmt(lo)}, {'∞' if hi is None else fmt(hi)}]"


def _cells(n: Need) -> list[str]:
    label = ("val bpb " if n.target.metric == "val_bpb" else "CORE ") + f"{n.target.value:g} ({n.target.why})"
    money = (lambda x: "$" + (f"{x:,.0f}" if abs(x) >= 1000 else _hours(x)))
    return [label, n.law, _span(n.flops_needed, n.flops_needed_ci, "{:.2e}".format),
            _span(n.depth, n.depth_ci, "d{}".format), "–" if n.params is None else _count(n.params),
            "–" if n.tokens is None else _count(n.tokens), "–" if n.flops is None else f"{n.flops:.2e}",
            _span(n.gpu_hours, n.gpu_hours_ci, _hours), _span(n.cost_usd, n.cost_usd_ci, money)]


def _hours(x: float) -> str:
    return f"{x:,.2f}" if x == 0 or abs(x) >= 0.01 else f"{x:.1g}"


def _finite(obj):
    """JSON without NaN or Infinity (neither is JSON): non-finite numbers become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _float(v) -> float | None:
    """A number from a row (a CSV cell is a string; empty, None and NaN are missing)."""
    if v is None or v == "" or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# ---------------------------------------------------------------------------------------------------
# A run directory and the command line


def read_rows(run_dir: str) -> list[dict]:
    """The rows of `run_dir`/results.csv, numbers as floats (missing ones None)."""
    path = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run-dir: no results.csv in {run_dir} (give a family's report directory)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ("preset", "params", "tokens", "flops", "val_bpb", "status")
    missing = [k for k in need if rows and k not in rows[0]]
    if not rows or missing:
        raise ValueError(f"--run-dir: {path} has no trials" if not rows else
                         f"--run-dir: {path} lacks the columns {missing}")
    for r in rows:
        r.update({k: _float(r.get(k)) for k in NUMERIC})
    return rows


def _numbers(flag: str, text: str, ok, allowed: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and ok(v) for v in values):
        raise ValueError(f"{flag}: comma-separated numbers {allowed}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("predict", help="what a target val bpb or CORE takes: depth, tokens, FLOPs, GPU-hours, "
                       "cost", description=__doc__.split("\n\n")[0])
    defaults = CostModel()
    q.add_argument("--run-dir", required=True, help="a family's report directory (with results.csv)")
    q.add_argument("--bpb", default=None, help="comma-separated val bpb targets, > 0 (default: the family's best "
                   f"x {BEST_BPB_FACTOR:g})")
    q.add_argument("--core", default=None, help="comma-separated CORE targets, < 1 (default: GPT-2's "
                   f"{GPT2_CORE} and the family's best x {BEST_CORE_FACTOR:g})")
    q.add_argument("--gpu", default=defaults.gpu, help=f"GPU of the estimate (default {defaults.gpu})")
    q.add_argument("--mfu", type=float, default=defaults.mfu, help=f"assumed MFU, in (0, 1] (default {defaults.mfu})")
    q.add_argument("--usd-per-gpu-hour", type=float, default=defaults.usd_per_gpu_hour,
                   help=f"price of a GPU-hour, >= 0 (default {defaults.usd_per_gpu_hour})")
    q.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap resamples, >= 0 (default {N_BOOT}; the loss surface: at most {SURFACE_BOOT})")
    q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu: must be in (0, 1], got {args.mfu}")
        if not args.usd_per_gpu_hour >= 0:
            raise ValueError(f"--usd-per-gpu-hour: must be >= 0, got {args.usd_per_gpu_hour}")
        if args.n_boot < 0:
            raise ValueError(f"--n-boot: must be >= 0, got {args.n_boot}")
        bpb = args.bpb and _numbers("--bpb", args.bpb, lambda v: v > 0, "> 0")
        core = args.core and _numbers("--core", args.core, lambda v: v < 1, "< 1")
        rows = read_rows(args.run_dir)
        targets = default_targets(rows)
        if bpb:
            targets = [t for t in targets if t.metric != "val_bpb"] + [Target("val_bpb", v, "asked") for v in bpb]
        if core:
            targets = [t for t in targets if t.metric != "core"] + [Target("core", v, "asked") for v in core]
        prediction = what_it_takes(rows, targets, cost=CostModel(gpu=args.gpu, mfu=args.mfu,
                                                                 usd_per_gpu_hour=args.usd_per_gpu_hour),
                                   n_boot=args.n_boot, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e) if str(e).startswith("--") else f"--run-dir: {e}")
    print("\n".join(prediction.fits.lines()))
    print(prediction.text())
    print(json.dumps(prediction.to_json()))
