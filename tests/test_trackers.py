"""Experiment trackers (nanoray/trackers.py) on real local backends, no network: a tiny sweep logged to MLflow's
file store, TensorBoard event files and W&B offline runs at once, each read back with the tracker's own reader;
a training run outside Tune likewise; and the errors a bad or missing tracker gives before anything starts."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from nanoray.data import DataSpec
from nanoray.dial import Horizon, plan
from nanoray.family import family_results, write_family_report
from nanoray.storage import RunStore
from nanoray.sweep import SweepConfig, run_sweep
from nanoray.trackers import FAMILY_TAG, TrackerError, Tracking, parse_trackers, wandb_mode
from nanoray.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
ALL = ["mlflow", "tensorboard", "wandb"]


def test_tracker_names_are_checked():
    assert parse_trackers(None) == [] and parse_trackers("mlflow, wandb,mlflow") == ["mlflow", "wandb"]
    with pytest.raises(ValueError, match="one or more of mlflow, tensorboard, wandb .*'neptune'"):
        parse_trackers("mlflow,neptune")
    with pytest.raises(ValidationError, match="tracker\n.*one or more of mlflow, tensorboard, wandb"):
        SweepConfig(depths=[1], tracker="tensorbored")
    assert SweepConfig(depths=[1], tracker="wandb,mlflow").tracker == ["wandb", "mlflow"]


def test_a_missing_package_or_store_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: find_spec gives None
    with pytest.raises(TrackerError, match=r"^tensorboard: needs the tensorboardX package.*pip install "
                                           r"'nanoray\[tensorboard\]'"):
        Tracking.make("mlflow,tensorboard", "fam", RunStore(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackerError, match="^mlflow: MLFLOW_TRACKING_URI is not set.*s3://bucket/x"):
        Tracking.make("mlflow", "fam", RunStore("s3://bucket/x"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert Tracking.make("mlflow", "fam", RunStore("s3://bucket/x")).mlflow_uri == "http://127.0.0.1:5000"


def test_wandb_is_offline_without_an_api_key(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no `wandb login` key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


@pytest.mark.parametrize("tracker, hidden, message", [
    ("neptune", None, "--tracker: one or more of mlflow, tensorboard, wandb"),
    ("tensorboard,mlflow", "mlflow", "--tracker mlflow: needs the mlflow package, which is not installed: "
                                     "pip install 'nanoray[mlflow]'"),
])
def test_job_refuses_a_tracker_before_starting(tracker, hidden, message, tmp_path):
    # RAY_ADDRESS names no cluster: reaching ray.init would fail otherwise (exit status 1, not argparse's 2).
    code = (f"import sys, runpy; sys.modules[{hidden!r}] = None; " if hidden else "import sys, runpy; ") + \
        f"sys.argv = ['jobs/miniseries.py', '--tracker', {tracker!r}, '--storage', {str(tmp_path / 's')!r}]; " \
        f"runpy.run_path({str(ROOT / 'jobs' / 'miniseries.py')!r}, run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, RAY_ADDRESS="127.0.0.1:9"))
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------------
# Read back


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B run's .wandb file (a LevelDB-style log of protobuf Records: 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header of CRC, length and type)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data, pos, records, chunk = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """A W&B offline run's name, group, config, history (key -> values in order) and logged artifacts."""
    import json

    out = dict(config={}, history={}, artifacts=[])
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            for item in r.history.item:
                out["history"].setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "artifact":
            out["artifacts"].append((r.artifact.name, sorted(e.path for e in r.artifact.manifest.contents)))
    return out


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: W&B offline, its caches in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def test_a_sweep_logs_each_trial_and_the_report_to_every_tracker(ray_cluster, offline, tmp_path):
    import mlflow

    sweep = SweepConfig(name="trk", preset="tiny", depths=[1, 2], ratio=0.1, storage_path=str(tmp_path / "runs"),
                        data=DataSpec(kind="markov"), log_every=2, eval_every=4, eval_tokens=2 * 16 * 256,
                        tracker=ALL)
    grid = run_sweep(sweep)
    assert grid.num_errors == 0
    paths = write_family_report(sweep, family_results(sweep, grid), str(tmp_path / "report"))
    steps = {"d1": 3, "d2": 8}  # a report every 2 steps and at the end, val loss every 4 and at the end
    reports = {t: sorted({*range(2, n + 1, 2), n}) for t, n in steps.items()}
    evals = {t: sorted({*range(4, n + 1, 4), n}) for t, n in steps.items()}
    sweep_dir = tmp_path / "runs" / "trk"

    # MLflow: an experiment named after the sweep; the family's run with the report's files, and a run per
    # trial nested in it, its params the trial's plan, its metrics every report at its training step.
    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path}/runs/mlflow")
    experiment = client.get_experiment_by_name("trk").experiment_id
    (family,) = client.search_runs([experiment], filter_string=f"tags.`{FAMILY_TAG}` = 'trk'")
    assert family.info.status == "FINISHED"
    assert {"results.csv", "report.md", "bpb_vs_flops.png", "config.json"} <= \
        {a.path for a in client.list_artifacts(family.info.run_id)} and set(paths) <= \
        {a.path for a in client.list_artifacts(family.info.run_id)}
    trials = {r.info.run_name: r for r in client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{family.info.run_id}'")}
    assert set(trials) == {"d1", "d2"}
    for name, run in trials.items():
        params, depth = run.data.params, int(name[1:])
        assert params["trial/plan/depth"] == str(depth) and params["trial/plan/iterations"] == str(steps[name])
        assert params["trial/plan/model/n_layer"] == str(depth) and params["sweep/name"] == "trk"
        train = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in train] == reports[name] and all(0 < m.value < 10 for m in train)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bpb")] == evals[name]
        assert run.info.status == "FINISHED"

    # TensorBoard: each trial's scalars in its Tune folder, the report as text and images beside them.
    for trial in ("d1", "d2"):
        assert [s for s, _ in scalars(sweep_dir / trial, "ray/tune/train_loss")] == reports[trial]
        assert [s for s, _ in scalars(sweep_dir / trial, "ray/tune/val_loss")] == evals[trial]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = EventAccumulator(str(sweep_dir / "report"), size_guidance={"images": 0, "tensors": 0})
    report.Reload()
    assert "bpb_vs_flops.png" in report.Tags()["images"]
    assert {"report.md/text_summary", "results.csv/text_summary"} <= set(report.Tags()["tensors"])

    # W&B: an offline run per trial (the trial's config, every report) and the report's run with its artifact.
    for trial in ("d1", "d2"):
        (run_dir,) = (sweep_dir / trial / "wandb").glob("offline-run-*")
        run = wandb_run(run_dir)
        assert run["name"] == trial and run["group"] == "trk"
        assert run["config"]["trial"]["plan"]["depth"] == int(trial[1:])
        assert run["history"]["step"] == reports[trial] and len(run["history"]["train_loss"]) == len(reports[trial])
    (run_dir,) = (sweep_dir / "report" / "wandb").glob("offline-run-*")
    report_run = wandb_run(run_dir)
    assert report_run["name"] == "trk-report" and report_run["config"]["depths"] == [1, 2]
    (name, files), = report_run["artifacts"]
    assert name == "trk-report" and set(paths) <= set(files)


def test_a_training_run_outside_tune_is_one_tracker_run(ray_cluster, offline, monkeypatch, tmp_path):
    import mlflow

    run = plan(2, "tiny", Horizon(iterations=4), device_batch_size=8)
    config = TrainConfig(plan=run, data=DataSpec(kind="markov"), log_every=2, eval_every=0, eval_tokens=2 * 8 * 256,
                         tracker=ALL)
    fit(config, "alone", str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "train" / "alone"  # the Train run's folder holds its TensorBoard and W&B files
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the controller logged; this process reads (README)
    client = mlflow.MlflowClient(tracking_uri=f"file://{tmp_path}/runs/mlflow")
    (tracked,) = client.search_runs([client.get_experiment_by_name("alone").experiment_id])
    assert tracked.info.run_name == "alone" and tracked.info.status == "FINISHED"
    assert tracked.data.params["plan/depth"] == "2" and tracked.data.params["log_every"] == "2"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "train_loss")] == [2, 4]
    assert [s for s, _ in scalars(run_dir, "ray/tune/train_loss")] == [2, 4]
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    tracked = wandb_run(offline_run)
    assert tracked["name"] == "alone" and tracked["config"]["plan"]["depth"] == 2
    assert tracked["history"]["step"] == [2, 4]
