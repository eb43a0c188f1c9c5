"""Prediction from a family's trials: the CORE curve and the bpb power law against nanochat's published miniseries,
the loss surface (Approach 3) recovering known Chinchilla surfaces, the dial inverted into the "what it takes"
table, the report's table and plots, and `python -m nanoray.scaling predict` on a run directory."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanoray.dial import CostModel, Horizon, plan, training_gpu_hours
from nanoray.report import write_report
from nanoray.scaling import fit_core_curve, fit_power_law
from nanoray.scaling.predict import MAX_DEPTH, Target, main, read_rows, what_it_takes
from nanoray.scaling.surface import SurfaceError, fit_loss_surface

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# nanochat's miniseries v1 (Jan 2026): depth -> params (all), tokens, val bpb, CORE. C = 6·N·D.
MINISERIES_V1 = {10: (91e6, 0.73e9, 1.0312, 0.071), 12: (135e6, 1.08e9, 0.9825, 0.1059),
                 14: (194e6, 1.55e9, 0.9437, 0.1185), 16: (268e6, 2.15e9, 0.9101, 0.1332),
                 18: (362e6, 2.90e9, 0.8817, 0.1611), 20: (477e6, 3.82e9, 0.8572, 0.1708)}
NANOCHAT_A, NANOCHAT_B = 3.7555, 0.0344  # nanochat's fit of CORE = 1 - a·C^-b to the same series

# Chinchilla's fitted surface (Hoffmann et al. 2022, Approach 3).
E0, A0, B0, ALPHA0, BETA0 = 1.69, 406.4, 410.7, 0.34, 0.28


def published():
    N, D, bpb, core = (np.array(col) for col in zip(*MINISERIES_V1.values()))
    return 6 * N * D, bpb, core


# --------------------------------------------------------------------------------------------------
# Published numbers


def test_core_curve_comes_out_near_nanochats():
    C, _, core = published()
    curve = fit_core_curve(C, core, seed=0)
    assert curve.a == pytest.approx(NANOCHAT_A, rel=0.05) and curve.b == pytest.approx(NANOCHAT_B, rel=0.05)
    lo, hi = curve.law.ci95["A"]
    assert lo < NANOCHAT_A < hi
    lo, hi = curve.law.ci95["alpha"]
    assert lo < NANOCHAT_B < hi
    # The two curves agree to 0.01 CORE (d10: 0.006) from d10 out to 10x d20's FLOPs: less than CORE's own noise
    # (seven identical nanochat d24 runs spanned 0.017). nanochat fitted all 11 depths, d11-d19 too.
    grid = np.geomspace(C.min(), 10 * C.max(), 20)
    assert np.abs(curve.predict(grid) - (1 - NANOCHAT_A * grid**-NANOCHAT_B)).max() < 0.01
    assert curve.predict(curve.solve(0.2565)) == pytest.approx(0.2565)
    assert str(curve).startswith("CORE = 1 - 3.6")


def test_power_law_on_bpb_predicts_d20_from_d10_to_d18():
    C, bpb, _ = published()
    law = fit_power_law(C[:5], bpb[:5], seed=0)  # the family's law: L = A·C^-alpha
    lo, hi = law.band(C[5])
    assert lo[0] < bpb[5] < hi[0]
    assert float(law.predict(C[5])) == pytest.approx(bpb[5], abs=0.005)
    assert law.solve(float(law.predict(C[5]))) == pytest.approx(C[5], rel=1e-9)
    reach = law.solve_draws(bpb[5])  # the FLOPs a new run needs to measure d20's bpb, under each resample
    assert np.percentile(reach, 2.5) < C[5] < np.percentile(reach, 97.5)


# --------------------------------------------------------------------------------------------------
# The loss surface


def chinchilla_trials(budgets, rng, *, sizes=5, noise=0.005, alpha=ALPHA0, beta=BETA0):
    """`sizes` models per budget around the optimum (x0.25 to x4), D = C / (6N), log-normal noise."""
    G = (alpha * A0 / (beta * B0)) ** (1 / (alpha + beta))
    N, D = [], []
    for c in budgets:
        for n in G * (c / 6) ** (beta / (alpha + beta)) * np.logspace(-0.6, 0.6, sizes):
            N.append(n)
            D.append(c / (6 * n))
    N, D = np.array(N), np.array(D)
    loss = (E0 + A0 / N**alpha + B0 / D**beta) * np.exp(noise * rng.standard_normal(len(N)))
    return N, D, loss, 6 * N * D


def test_surface_recovers_chinchilla_within_its_intervals():
    N, D, loss, C = chinchilla_trials([1e18, 1e19, 1e20, 1e21], np.random.default_rng(0))
    s = fit_loss_surface(N, D, loss, C, n_boot=100, seed=0)
    assert not s.tied and s.n_points == 20 and s.n_boot == 100 and s.flops_per_param_token == pytest.approx(6)
    for name, truth in dict(E=E0, A=A0, B=B0, alpha=ALPHA0, beta=BETA0, a=BETA0 / (ALPHA0 + BETA0)).items():
        lo, hi = s.ci95[name]
        assert lo < truth < hi, (name, lo, truth, hi)
    assert s.alpha == pytest.approx(ALPHA0, abs=0.03) and s.E == pytest.approx(E0, abs=0.1)
    # the closed forms agree with each other: C = 6·N*·D*, L*(C) = L(N*, D*), and solve inverts the frontier
    n, d = s.optimal(1e22)
    assert 6 * n * d == pytest.approx(1e22) and s.frontier(1e22) == pytest.approx(s.predict(n, d))
    assert s.solve(float(s.frontier(1e22))) == pytest.approx(1e22, rel=1e-6)
    assert s.solve(s.E * 0.99) == np.inf
    assert s.predict(2 * n, d / 2) > s.predict(n, d) < s.predict(n / 2, d * 2)  # N* is the minimum along C
    assert "N* ∝ C^0.4" in str(s)


def test_few_trials_tie_beta_to_alpha():
    N, D, loss, C = chinchilla_trials([1e18, 1e20], np.random.default_rng(1), sizes=4, alpha=0.3, beta=0.3)
    s = fit_loss_surface(N, D, loss, C, n_boot=100, seed=0)
    assert s.tied and s.alpha == s.beta and s.n_points == 8
    for name, truth in dict(E=E0, A=A0, B=B0, alpha=0.3).items():
        lo, hi = s.ci95[name]
        assert lo < truth < hi, (name, lo, truth, hi)
    assert s.a == pytest.approx(0.5)  # beta = alpha: N* and D* both grow as C^0.5


def test_surface_refuses_trials_it_cannot_pin():
    N, D, loss, _ = chinchilla_trials([1e18], np.random.default_rng(2), sizes=3)
    with pytest.raises(SurfaceError, match=r"not enough trials \(need >= 6 finished trials, have 3\)"):
        fit_loss_surface(N, D, loss)
    N = np.geomspace(1e6, 1e8, 6)  # a ratio grid: every trial at D = 12·N
    with pytest.raises(SurfaceError, match="one tokens-per-param line"):
        fit_loss_surface(N, 12 * N, E0 + A0 / N**ALPHA0 + B0 / (12 * N) ** BETA0)
    with pytest.raises(ValueError, match="same length"):
        fit_loss_surface(N, N[:5], N)


# --------------------------------------------------------------------------------------------------
# What it takes


def family_rows(grid="ratio", rng=None):
    """Rows as nanoray.family writes them, of tiny-preset trials whose val bpb follows a known surface:
    a ratio family (d1-d3 at 1 token per param) or an isoFLOP grid (d1-d4 x 3 budgets)."""
    rng = rng or np.random.default_rng(0)
    horizons = [(None, Horizon(ratio=1.0))] if grid == "ratio" else [(c, Horizon(flops=c)) for c in (1e12, 3e12, 1e13)]
    rows = []
    for budget, horizon in horizons:
        for depth in ((1, 2, 3) if grid == "ratio" else (1, 2, 3, 4)):
            p = plan(depth, "tiny", horizon)
            bpb = (0.5 + 40 / p.scaling_params**0.3 + 60 / p.tokens**0.3) * np.exp(0.003 * rng.standard_normal())
            rows.append(dict(
                trial=f"d{depth}" + (f"-c{budget:.0e}" if budget else ""), depth=depth, preset="tiny",
                horizon=p.horizon_mode, ratio=1.0 if grid == "ratio" else None, flops_budget=budget,
                params=p.scaling_params, total_params=p.total_params, tokens=p.tokens, flops=p.total_flops,
                iterations=p.iterations, steps_done=p.iterations, wall_s=10.0, train_s=9.0, gpu_hours=0.0,
                cost_usd=0.0, train_loss=bpb, val_loss=bpb, val_bpb=bpb, core=0.01 * depth + 0.005 * np.log10(
                    p.total_flops / 1e11), tok_per_s=1e4, mfu=0.01, checkpoint=f"/ckpt/{depth}", status="done"))
    return rows


def test_a_ratio_family_takes_the_smallest_depth_whose_run_reaches_the_target():
    rows = family_rows("ratio")
    cost = CostModel(mfu=0.4, usd_per_gpu_hour=3.0)
    pred = what_it_takes(rows, [Target("val_bpb", 2.3, "asked"), Target("core", 0.2565, "GPT-2's CORE")],
                         cost=cost, n_boot=300)
    assert pred.fits.surface is None and "need >= 6" in pred.fits.missing["surface"]
    bpb, core = pred.needs
    assert bpb.law == "val bpb power law" and bpb.note == ""
    c = pred.fits.bpb.solve(2.3)
    assert bpb.flops_needed == pytest.approx(c) and bpb.flops_needed_ci[0] < c < bpb.flops_needed_ci[1]
    runs = {d: plan(d, "tiny", Horizon(ratio=1.0)) for d in range(1, bpb.depth + 1)}
    assert runs[bpb.depth].total_flops >= c > runs[bpb.depth - 1].total_flops  # the smallest depth that gets there
    assert (bpb.params, bpb.tokens, bpb.flops) == (runs[bpb.depth].scaling_params, runs[bpb.depth].tokens,
                                                   runs[bpb.depth].total_flops)
    assert bpb.gpu_hours == pytest.approx(training_gpu_hours(bpb.flops, cost)) == pytest.approx(
        runs[bpb.depth].total_flops / (0.4 * 989e12) / 3600)
    assert bpb.cost_usd == pytest.approx(3.0 * bpb.gpu_hours)
    assert bpb.depth_ci[0] <= bpb.depth <= bpb.depth_ci[1] and bpb.cost_usd_ci[0] <= bpb.cost_usd <= bpb.cost_usd_ci[1]
    assert core.law == "CORE curve" and (core.depth is None) == ("out of reach" in core.note)
    assert pred.curve("val_bpb", [1e12])[0] == pytest.approx(pred.fits.bpb.predict(1e12))


def test_an_isoflop_grid_sizes_the_depth_by_the_surface_and_compares_approaches():
    rows = family_rows("isoflop")
    pred = what_it_takes(rows, [Target("val_bpb", 1.8, "asked"), Target("val_bpb", 0.4, "asked")], n_boot=100)
    s = pred.fits.surface
    assert s is not None and not s.tied and pred.fits.allocation is not None and pred.fits.bpb is None
    reach, floor = pred.needs
    n_opt, d_opt = s.optimal(reach.flops_needed)
    assert reach.law == "loss surface" and reach.tokens == pytest.approx(d_opt)
    assert reach.params >= n_opt > plan(reach.depth - 1, "tiny").scaling_params
    assert s.predict(reach.params, reach.tokens) <= 1.8 + 1e-9  # the depth, on D* tokens, reaches the target
    assert floor.depth is None and "floor E" in floor.note and floor.flops_needed is None
    # Approach 2 beside Approach 3 at every budget, then the exponents
    assert [r[0] for r in pred.comparison] == ["1e+12", "3e+12", "1e+13", "exponents"]
    json.dumps(pred.to_json(), allow_nan=False)


def test_default_targets_and_bad_input():
    rows = family_rows("ratio")
    pred = what_it_takes(rows, n_boot=50)
    targets = [(n.target.metric, n.target.why) for n in pred.needs]
    assert targets == [("val_bpb", "best x 0.9"), ("core", "GPT-2's CORE"), ("core", "best x 1.1")]
    best = max(r["core"] for r in rows)
    assert pred.needs[2].target.value == pytest.approx(1.1 * best, abs=1e-4)
    with pytest.raises(ValueError, match="no finished trial"):
        what_it_takes([dict(r, status="error") for r in rows])
    with pytest.raises(ValueError, match="target.metric"):
        what_it_takes(rows, [Target("loss", 1.0, "asked")], n_boot=10)
    far = what_it_takes(rows, [Target("val_bpb", 0.05, "asked")], n_boot=10).needs[0]
    assert far.depth is None and f"beyond d{MAX_DEPTH}" in far.note


# --------------------------------------------------------------------------------------------------
# The report and the command line


def test_report_has_the_prediction_table_and_plots(tmp_path):
    rows = family_rows("isoflop")
    paths = write_report(rows, {}, tmp_path, prediction=what_it_takes(rows, n_boot=50))
    for name in ("prediction.png", "surface.png"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "report.md").read_text()
    assert "## What it takes" in md and "](surface.png)" in md and "](prediction.png)" in md
    assert "| CORE 0.2565 (GPT-2's CORE) | CORE curve |" in md
    assert "## Compute-optimal allocation: Approach 2 vs Approach 3" in md and "| exponents |" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    page = (tmp_path / "report.html").read_text()
    assert "<h2>What it takes</h2>" in page and page.count("data:image/png;base64,") == 5
    write_report(rows, {}, tmp_path)  # no prediction: its plots go
    assert not (tmp_path / "surface.png").exists() and "What it takes" not in (tmp_path / "report.md").read_text()


def test_cli_prints_the_table_and_one_json_line(tmp_path):
    write_report(family_rows("ratio"), {}, tmp_path)  # results.csv as a family writes it
    run = subprocess.run([sys.executable, "-m", "nanoray.scaling", "predict", "--run-dir", str(tmp_path),
                          "--core", "0.2565,0.05", "--n-boot", "100"], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pass
    assert len(parsed) == 1 and lines[-1].startswith("{")
    result = parsed[0]
    assert [(t["metric"], t["target"]) for t in result["targets"]] == [("val_bpb", pytest.approx(
        0.9 * min(r["val_bpb"] for r in read_rows(str(tmp_path))), abs=1e-4)), ("core", 0.2565), ("core", 0.05)]
    assert result["assumptions"] == dict(gpu="H100", mfu=0.5, usd_per_gpu_hour=2.5)
    assert any(line.startswith("target") and "GPU-hours" in line for line in lines)
    assert any(line.startswith("CORE 0.2565 (asked)") for line in lines)


@pytest.mark.parametrize("args, flag", [
    (["--mfu", "0"], "--mfu"),
    (["--core", "1.5"], "--core"),
    (["--bpb", "-1"], "--bpb"),
    (["--bpb", "x"], "--bpb"),
    (["--n-boot", "-1"], "--n-boot"),
    (["--usd-per-gpu-hour", "-2"], "--usd-per-gpu-hour"),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, args, flag):
    write_report(family_rows("ratio"), {}, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--run-dir", str(tmp_path), *args])
    assert e.value.code == 2 and f"error: {flag}:" in capsys.readouterr().err


def test_a_run_dir_without_results_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--run-dir", str(tmp_path / "nowhere")])
    assert "error: --run-dir: no results.csv" in capsys.readouterr().err
