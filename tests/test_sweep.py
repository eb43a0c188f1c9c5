"""The depth sweep: bad flags fail before training; a real Tune sweep trains, reports, and resumes."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanoray.data import DataSpec
from nanoray.dial import PlanError
from nanoray.sweep import SweepConfig, check_resume, family_report, grid_points, plans, run_sweep, storage_uri

from conftest import write_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_grid_points_and_plans():
    ratio = SweepConfig(depths=[1, 2], ratio=1.0)
    assert [p["trial"] for p in grid_points(ratio)] == ["d1", "d2"]
    iso = SweepConfig(depths=[1, 2], grid="isoflop", budgets=[1e12, 4e12])
    assert [p["trial"] for p in grid_points(iso)] == ["d1-c1e12", "d2-c1e12", "d1-c4e12", "d2-c4e12"]
    family = plans(iso)
    for name, p in family.items():  # every trial of a column spends its budget (to within one step)
        budget = 1e12 if "c1e12" in name else 4e12
        assert abs(p.total_flops - budget) <= p.total_batch_tokens * p.flops_per_token


@pytest.mark.parametrize("kwargs, flag", [
    (dict(depths=[]), "depths"),
    (dict(depths=[2, 2]), "depths"),
    (dict(depths=[2], preset="huge"), "preset"),
    (dict(depths=[2], grid="random"), "grid"),
])
def test_bad_sweep_config_names_the_field(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SweepConfig(**kwargs)


def test_budget_too_small_fails_before_training():
    with pytest.raises(PlanError, match="trial d3-c1e06.*flops"):
        plans(SweepConfig(depths=[3], grid="isoflop", budgets=[1e6]))


@pytest.mark.parametrize("args, flag", [
    (["--depths", ""], "--depths"),
    (["--depths", "2,x"], "--depths"),
    (["--preset", "huge"], "preset"),
    (["--grid", "isoflop", "--budgets", "1e3"], "flops"),
    (["--core", "no/such/bundle"], "tasks"),
    (["--gpus-per-worker", "1.5"], "gpus_per_worker"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
])
def test_job_rejects_bad_flags_before_starting(args, flag, tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "miniseries.py"), *args, "--out", str(tmp_path),
                          "--storage", str(tmp_path / "s")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RAY_ADDRESS=""), cwd=tmp_path)
    assert run.returncode == 2 and flag in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "s").exists()  # nothing trained, nothing written


def test_sweep_trains_scores_reports_and_resumes(ray_cluster, corpus, tmp_path):
    from nanoray.family_core import FamilyCore

    spec, _, data_dir = corpus
    lm = [{"context": f"{i} and {i} make", "continuation": f" {2 * i}"} for i in range(6)]
    mc = [{"query": f"Is {i} even?", "choices": [" yes", " no"], "gold": i % 2} for i in range(6)]
    tasks = write_bundle(tmp_path / "tasks", {"lm": ("language_modeling", 1, lm), "mc": ("multiple_choice", 1, mc)},
                         baselines={"mc": 50})
    sweep = SweepConfig(name="fam", preset="tiny", depths=[1, 2], ratio=0.25, storage_path=str(tmp_path / "runs"),
                        data=DataSpec(kind="corpus", source=spec, data_dir=str(data_dir), cpus_per_actor=0.5),
                        eval_tokens=8 * 256, core=str(tasks), core_max_per_task=4)
    core = FamilyCore(sweep, tmp_path / "report")
    grid = run_sweep(sweep, callbacks=[core.callback()])
    assert grid.num_errors == 0
    assert set(core.pending) == {"d1", "d2"}  # each trial's CORE task started as the trial ended
    paths = family_report(sweep, grid, str(tmp_path / "report"), core)
    rows = list(csv.DictReader(open(paths["results.csv"])))
    assert [r["trial"] for r in rows] == ["d1", "d2"] and all(r["status"] == "done" for r in rows)
    d1, d2 = rows
    assert float(d2["flops"]) > float(d1["flops"]) > 0 and 0 < float(d2["val_bpb"]) < 8
    assert all(Path(r["checkpoint"]).exists() for r in rows)
    for r in rows:  # where the wall time went: seconds, none of them more than the trial's wall time
        timings = [float(r[k]) for k in ("setup_s", "first_window_s", "eval_time_s")]
        assert all(0 <= t <= float(r["wall_s"]) for t in timings) and timings[1] > 0
    for r in rows:  # CORE = mean centered accuracy of the two tasks, each known to be in its range
        lm_c, mc_c = float(r["core_lm"]), float(r["core_mc"])
        assert 0 <= lm_c <= 1 and -1 <= mc_c <= 1 and float(r["core"]) == pytest.approx((lm_c + mc_c) / 2)
    for name in ("bpb_vs_flops.png", "loss_curves.png", "core_vs_flops.png", "report.md", "report.html"):
        assert paths[name].stat().st_size > 0
    assert "d2" in paths["report.md"].read_text()

    # A re-run with other settings would resume the old ones: it is refused, naming the flag.
    check_resume(sweep)
    with pytest.raises(ValueError, match="--ratio: sweep 'fam'.*ratio = 0.25, not 0.5"):
        check_resume(sweep.model_copy(update=dict(ratio=0.5)))
    with pytest.raises(ValueError, match="--depths"):
        check_resume(sweep.model_copy(update=dict(depths=[1, 2, 3])))

    # The same sweep again: Tune restores it, finished trials are neither trained nor scored again.
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "train").rglob("model.safetensors")}
    scored = {p: p.stat().st_mtime for p in (tmp_path / "report" / "core").glob("*.json")}
    core = FamilyCore(sweep, tmp_path / "report")
    again = run_sweep(sweep, callbacks=[core.callback()])
    assert again.num_errors == 0 and sorted(r.metrics["step"] for r in again) == sorted(int(r["steps_done"])
                                                                                        for r in rows)
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs" / "train").rglob("model.safetensors")} == mtimes
    assert json.loads(json.dumps(again[0].config["point"]))["trial"] in ("d1", "d2")
    paths = family_report(sweep, again, str(tmp_path / "report"), core)
    assert not core.pending and len(scored) == 2
    assert [r["core"] for r in csv.DictReader(open(paths["results.csv"]))] == [d1["core"], d2["core"]]
    assert {p: p.stat().st_mtime for p in (tmp_path / "report" / "core").glob("*.json")} == scored


def test_long_trials_checkpoint_about_every_15_minutes_short_ones_at_the_end():
    from nanoray.sweep import CHECKPOINT_MINUTES, checkpoint_interval, plans

    sweep = SweepConfig(preset="gpt2", depths=[12, 20], ratio=12)
    d12, d20 = plans(sweep).values()
    assert d20.gpu_hours * 60 > 10 * CHECKPOINT_MINUTES  # hours on one GPU: a checkpoint every ~15 min
    every = checkpoint_interval(sweep, d20)
    assert every == int(d20.iterations * CHECKPOINT_MINUTES / (d20.gpu_hours * 60)) and 0 < every < d20.iterations
    eight = sweep.model_copy(update=dict(workers=8))
    assert checkpoint_interval(eight, plans(eight)["d12"]) == 0  # ~5 minutes on 8 GPUs: only the final one
    assert checkpoint_interval(sweep.model_copy(update=dict(checkpoint_every=7)), d12) == 7


def test_checkpoint_locations_keep_their_storage_scheme():
    s3 = SweepConfig(depths=[1], storage_path="s3://bucket/sweeps")
    assert storage_uri(s3, "bucket/sweeps/train/x/checkpoint_1") == "s3://bucket/sweeps/train/x/checkpoint_1"
    assert storage_uri(s3, "s3://bucket/a") == "s3://bucket/a" and storage_uri(s3, None) is None
    assert storage_uri(SweepConfig(depths=[1], storage_path="/runs"), "/runs/train/x") == "/runs/train/x"


def test_isoflop_fits_from_rows():
    from nanoray.sweep import family_fits

    sweep = SweepConfig(depths=[1, 2, 3, 4], grid="isoflop", budgets=[1e12, 1e13, 1e14])
    rows = []
    for c in sweep.budgets:  # a loss surface whose optimum moves with C: E + A/N^0.34 + B/D^0.28, D = C/(6N)
        for n in (1e5, 3e5, 1e6, 3e6, 1e7):
            d = c / (6 * n)
            rows.append(dict(flops_budget=c, params=n, tokens=d, flops=c, status="done",
                             val_bpb=1.7 + 400 / n**0.34 + 410 / d**0.28))
    fit, notes = family_fits(sweep, rows)
    assert fit is None and len(notes) == 4 and notes[0].startswith("C = 1.00e+12: N_opt")
    exponent = float(re.search(r"N_opt = [0-9.]+ \* C\^([0-9.]+)", notes[-1]).group(1))
    assert exponent == pytest.approx(0.28 / (0.34 + 0.28), abs=0.03)  # N_opt ~ C^(beta / (alpha + beta))
