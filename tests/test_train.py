import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoray.checkpoint import load_checkpoint, load_model, read_meta, save_checkpoint
from nanoray.data import DataSpec
from nanoray.dial import Horizon, plan
from nanoray.model import build_model
from nanoray.optim import build_optimizers
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, fit, metrics_log, train

MARKOV = DataSpec(kind="markov")


def tiny_run(iterations: int, workers: int = 1, device_batch_size: int = 8, **kwargs) -> TrainConfig:
    run = plan(2, "tiny", Horizon(iterations=iterations), num_workers=workers, device_batch_size=device_batch_size)
    return TrainConfig(plan=run, data=MARKOV, **dict(dict(log_every=2, eval_every=0, eval_tokens=2 * 8 * 256), **kwargs))


def test_loss_falls_on_a_tiny_model():
    session = LocalSession("cpu")
    last = train(tiny_run(24, log_every=4, eval_every=12), session)
    losses = [m["train_loss"] for m in session.history]
    assert losses[0] > 7.5 and losses[-1] < 3.5  # ln(4096) = 8.3; the Markov stream is learnable
    assert last["val_loss"] < 3.5 and last["step"] == 24 and last["tokens"] == 24 * 4096
    assert last["flops"] == 24 * 4096 * plan(2, "tiny").flops_per_token


def test_resume_continues_exactly(tmp_path):
    straight = LocalSession("cpu", out_dir=str(tmp_path / "a"))
    train(tiny_run(6, checkpoint_every=3), straight)
    first = LocalSession("cpu", out_dir=str(tmp_path / "b"))
    train(tiny_run(6, max_steps=3, checkpoint_every=3), first)
    assert read_meta(first.checkpoints[-1])["step"] == 3
    resumed = LocalSession("cpu", out_dir=str(tmp_path / "b"), resume_from=first.checkpoints[-1])
    train(tiny_run(6, checkpoint_every=3), resumed)
    assert [m["step"] for m in resumed.history] == [4, 6]
    a, b = Path(straight.checkpoints[-1]), Path(resumed.checkpoints[-1])
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = torch.load(a / "optimizer.pt", weights_only=False), torch.load(b / "optimizer.pt", weights_only=False)
    for sa, sb in zip(oa, ob):
        for key in sa["state"]:
            for name, value in sa["state"][key].items():
                assert torch.equal(value, sb["state"][key][name]), name
    assert read_meta(b)["data"]["position"] == 6 * 2  # 2 micro-batches per step


def test_checkpoint_roundtrip_is_atomic_and_checked(tmp_path):
    run = plan(2, "tiny")
    model = build_model(run.model, seed=3)
    opts = build_optimizers(model, run)
    path = save_checkpoint(tmp_path / "ckpt", model, opts, dict(plan=run.model_dump(), step=7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directory left behind
    loaded, meta = load_model(path)
    assert meta["step"] == 7 and all(torch.equal(x, y) for x, y in zip(model.parameters(), loaded.parameters()))
    other = build_model(plan(3, "tiny").model)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, other)
    with pytest.raises(FileNotFoundError, match="not a nanoray checkpoint"):
        load_checkpoint(tmp_path, model)
    # A crash between overwriting's two renames leaves the previous checkpoint under its .old name: found.
    path.rename(tmp_path / ".ckpt.old")
    assert load_checkpoint(path, model)["step"] == 7 and (path / "meta.json").exists()


def test_ddp_on_ray_reports_checkpoints_and_resumes(ray_cluster, tmp_path):
    storage, log1, log2 = str(tmp_path / "runs"), str(tmp_path / "m1.jsonl"), str(tmp_path / "m2.jsonl")
    # 2 workers x 4 rows x 2 micro-steps: DDP's no_sync path runs on the first micro-step of each step
    result = fit(tiny_run(6, workers=2, device_batch_size=4, max_steps=4, checkpoint_every=2), "ddp", storage,
                 cpus_per_worker=1,
                 callbacks=[metrics_log(log1)])
    assert [json.loads(line)["step"] for line in open(log1)] == [2, 4]
    assert result.metrics["step"] == 4 and result.metrics["tokens"] == 4 * 4096
    assert result.metrics["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)  # two workers share the cores
    with result.checkpoint.as_directory() as d:
        assert read_meta(Path(d))["step"] == 4 and read_meta(Path(d))["data"]["position"] == 8

    # Same name and storage: Ray Train hands the step-4 checkpoint back, and the run finishes steps 5-6.
    result = fit(tiny_run(6, workers=2, device_batch_size=4, checkpoint_every=2), "ddp", storage, cpus_per_worker=1,
                 callbacks=[metrics_log(log2)])
    assert [json.loads(line)["step"] for line in open(log2)] == [6]
    with result.checkpoint.as_directory() as d:
        ddp_weights = load_file(Path(d) / "ckpt" / "model.safetensors") if (Path(d) / "ckpt").exists() \
            else load_file(Path(d) / "model.safetensors")

    # Two DDP workers with two micro-batches each == one worker accumulating all four, up to float
    # summation order (which Adam's sign-like steps on tiny grads amplify: up to ~1.3% in norm here).
    local = LocalSession("cpu", out_dir=str(tmp_path / "local"))
    train(tiny_run(6, device_batch_size=4), local)
    local_weights = load_file(Path(local.checkpoints[-1]) / "model.safetensors")
    for name, value in local_weights.items():
        assert (ddp_weights[name] - value).norm() <= 0.03 * value.norm() + 1e-6, name


def test_resuming_a_finished_run_reports_its_final_metrics(tmp_path):
    first = LocalSession("cpu", out_dir=str(tmp_path / "a"))
    final = train(tiny_run(4), first)
    again = LocalSession("cpu", out_dir=str(tmp_path / "b"), resume_from=first.checkpoints[-1])
    reported = train(tiny_run(4), again)
    assert again.history == [reported] and again.checkpoints == []  # reported once, nothing trained or saved
    assert json.dumps(reported) == json.dumps(final)  # (NaN val_bpb: compare as JSON)


def test_a_resumed_runs_wall_time_counts_every_worker_group(tmp_path):
    """Issue 17, finding 12: results.csv took a resumed trial's wall time from Tune's driver alone (61.6 s of
    wall against 70.6 s of training). The trainer's wall_time_s adds every worker group's time in train()."""
    first = LocalSession("cpu", out_dir=str(tmp_path / "a"))
    before = train(tiny_run(6, max_steps=3, checkpoint_every=3), first)
    again = LocalSession("cpu", out_dir=str(tmp_path / "a"), resume_from=first.checkpoints[-1])
    after = train(tiny_run(6, checkpoint_every=3), again)
    assert after["wall_time_s"] >= after["train_time_s"] > before["train_time_s"]
    assert after["wall_time_s"] > before["wall_time_s"] >= before["train_time_s"]
