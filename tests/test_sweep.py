"""The depth sweep: bad flags fail before training; a real Tune sweep trains, reports, and resumes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoray.data import DataSpec
from nanoray.dial import PlanError
from nanoray.family import FamilyCore, family_results, write_family_report
from nanoray.sweep import (CHECKPOINT_MINUTES, ResumeMismatch, SweepConfig, Trial, check_resume, checkpoint_interval,
                           run_sweep, trials)

ROOT = Path(__file__).resolve().parents[1]


def test_trials_and_their_plans():
    ratio = SweepConfig(depths=[1, 2], ratio=1.0)
    assert [t.name for t in trials(ratio)] == ["d1", "d2"]
    iso = SweepConfig(depths=[1, 2], grid="isoflop", budgets=[1e12, 4e12])
    family = trials(iso)
    assert [t.name for t in family] == ["d1-c1e12", "d2-c1e12", "d1-c4e12", "d2-c4e12"]
    for t in family:  # every trial of a column spends its budget (to within one step)
        p = t.plan
        assert t.flops_budget == (1e12 if "c1e12" in t.name else 4e12) and p.depth == t.depth
        assert abs(p.total_flops - t.flops_budget) <= p.total_batch_tokens * p.flops_per_token
    assert Trial.model_validate(family[0].model_dump()) == family[0]  # as Tune carries it: a dict and back


@pytest.mark.parametrize("kwargs, flag", [
    (dict(depths=[]), "depths"),
    (dict(depths=[2, 2]), "depths"),
    (dict(depths=[2], preset="huge"), "preset"),
    (dict(depths=[2], grid="random"), "grid"),
    (dict(depths=[2], name="train"), "name"),
    (dict(depths=[2], name="a/b"), "name"),
])
def test_bad_sweep_config_names_the_field(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SweepConfig(**kwargs)


def test_budget_too_small_fails_before_training():
    with pytest.raises(PlanError, match="trial d3-c1e06.*flops"):
        trials(SweepConfig(depths=[3], grid="isoflop", budgets=[1e6]))


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


def test_sweep_trains_scores_reports_and_resumes(ray_cluster, corpus, write_bundle, tmp_path):
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
    paths = write_family_report(sweep, family_results(sweep, grid, core), str(tmp_path / "report"))
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
    for name in ("bpb_vs_flops.png", "loss_curves.png", "core_vs_flops.png", "prediction.png", "surface.png",
                 "report.md", "report.html"):
        assert paths[name].stat().st_size > 0
    md = paths["report.md"].read_text()
    assert "d2" in md and "## What it takes" in md and "| CORE 0.2565 (GPT-2's CORE) |" in md
    assert "loss surface (Approach 3): not enough trials (need >= 6 finished trials, have 2)" in md

    # A re-run with other settings would resume the old ones: it is refused, naming the field (the jobs name
    # the flag: tests/test_cli.py).
    check_resume(sweep)
    with pytest.raises(ResumeMismatch, match="^ratio: sweep 'fam'.*ratio = 0.25, not 0.5") as e:
        check_resume(sweep.model_copy(update=dict(ratio=0.5)))
    assert e.value.field == "ratio"
    with pytest.raises(ResumeMismatch, match="^depths"):
        check_resume(sweep.model_copy(update=dict(depths=[1, 2, 3])))
    with pytest.raises(ResumeMismatch, match="^data.source"):
        check_resume(sweep.model_copy(update=dict(data=sweep.data.model_copy(update=dict(source="stdlib")))))

    # The same sweep again: Tune restores it, finished trials are neither trained nor scored again.
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "runs" / "train").rglob("model.safetensors")}
    scored = {p: p.stat().st_mtime for p in (tmp_path / "report" / "core").glob("*.json")}
    core = FamilyCore(sweep, tmp_path / "report")
    again = run_sweep(sweep, callbacks=[core.callback()])
    assert again.num_errors == 0 and sorted(r.metrics["step"] for r in again) == sorted(int(r["steps_done"])
                                                                                        for r in rows)
    assert {p: p.stat().st_mtime for p in (tmp_path / "runs" / "train").rglob("model.safetensors")} == mtimes
    assert Trial.model_validate(json.loads(json.dumps(again[0].config["trial"]))).name in ("d1", "d2")
    paths = write_family_report(sweep, family_results(sweep, again, core), str(tmp_path / "report"))
    assert not core.pending and len(scored) == 2
    assert [r["core"] for r in csv.DictReader(open(paths["results.csv"]))] == [d1["core"], d2["core"]]
    assert {p: p.stat().st_mtime for p in (tmp_path / "report" / "core").glob("*.json")} == scored


def plans(sweep: SweepConfig) -> dict:
    return {t.name: t.plan for t in trials(sweep)}


def test_long_trials_checkpoint_about_every_15_minutes_short_ones_at_the_end():
    sweep = SweepConfig(preset="gpt2", depths=[12, 20], ratio=12)
    d12, d20 = plans(sweep).values()
    assert d20.gpu_hours * 60 > 10 * CHECKPOINT_MINUTES  # hours on one GPU: a checkpoint every ~15 min
    every = checkpoint_interval(sweep, d20)
    assert every == int(d20.iterations * CHECKPOINT_MINUTES / (d20.gpu_hours * 60)) and 0 < every < d20.iterations
    eight = sweep.model_copy(update=dict(workers=8))
    assert checkpoint_interval(eight, plans(eight)["d12"]) == 0  # ~5 minutes on 8 GPUs: only the final one
    assert checkpoint_interval(sweep.model_copy(update=dict(checkpoint_every=7)), d12) == 7
