"""A family's results: CORE of each finished trial, one row per trial, the scaling fits, the report.

    sweep = prepare_family(sweep)                       # corpus and CORE tasks made once, before the trials
    core = FamilyCore(sweep, out_dir)                   # each finished trial's CORE, as its own Ray task
    grid = run_sweep(sweep, callbacks=[core.callback()])
    results = family_results(sweep, grid, core)         # rows (with CORE), histories, fits
    write_family_report(sweep, results, out_dir)        # results.csv, plots, report.md, report.html, with
                                                        # what the targets take (nanoray.scaling.predict)

CORE runs while the other depths train: a Tune callback starts a Ray task for a trial the moment it
completes. A score is kept in out_dir/core/<trial>.json with the checkpoint and task set it belongs to, so
a re-submitted sweep scores only what it has not scored yet. A failed evaluation leaves `core` empty and
says why; it never fails the sweep whose training already succeeded.
"""

import json
import math
import os
import tempfile
from dataclasses import dataclass

import ray
import ray.train
from ray.tune import Callback

from nanoray.core_data.bundle import BundleUnavailable, resolve_tasks
from nanoray.core_eval import CoreTasks, evaluate_core, load_tasks
from nanoray.dial import CostModel, get_preset
from nanoray.report import TIMINGS, write_report
from nanoray.scaling import PowerLaw, fit_optimal_allocation, fit_power_law, isoflop_minima
from nanoray.scaling.predict import Prediction, what_it_takes
from nanoray.storage import join, read_bytes, upload, write_bytes
from nanoray.stream import prepare_data
from nanoray.sweep import SweepConfig, Trial, trial_checkpoint


def prepare_family(sweep: SweepConfig, core_required: bool = True) -> SweepConfig:
    """Corpus shards, tokenizer and CORE tasks made once, here, so the trials and evaluations only read
    them. Returns the sweep with the data directory fixed (an absolute path or URI). A CORE task set that is
    not `core_required` and cannot be had (no network, no BIG-bench data) turns CORE off with a warning."""
    update = {}
    if sweep.core is not None:
        try:
            tasks = resolve_tasks(sweep.core)
            update["core"] = sweep.core if sweep.core in ("core", "core-lite") else str(tasks)
        except (BundleUnavailable, FileNotFoundError) as e:
            if core_required:
                raise
            print(f"warning: no CORE for this sweep ({sweep.core}): {e}", flush=True)
            update["core"] = None
    data_dir = sweep.data.data_dir or sweep.store.data_dir(sweep.data.source)
    data_dir = data_dir if "://" in data_dir else os.path.abspath(data_dir)
    prepare_data(sweep.data.source, get_preset(sweep.preset).vocab_size, data_dir)
    update["data"] = sweep.data.model_copy(update=dict(data_dir=data_dir))
    return sweep.model_copy(update=update)


# ---------------------------------------------------------------------------------------------------
# CORE of each finished trial


def core_task(checkpoint: str, tasks: CoreTasks, use_gpu: bool, gpu_share: float) -> dict:
    """Ray task body: CORE of one checkpoint (a local directory or a storage URI such as s3://...) on one
    actor holding `gpu_share` of a GPU. The tasks come read already (from the driver, through the object
    store): the node this runs on needs neither the task files nor the checkpoint's disk."""
    with ray.train.Checkpoint(checkpoint).as_directory() as local:
        result = evaluate_core(local, tasks, num_workers=1, use_gpu=use_gpu, gpu_share=gpu_share)
    result["checkpoint"] = checkpoint
    return result


# A lost node (the task's or its evaluator actor's) re-runs the evaluation elsewhere.
CORE_RETRIES = dict(max_retries=3, retry_exceptions=[ray.exceptions.RayActorError])


class FamilyCore:
    """The CORE evaluations of one sweep's trials, keyed by trial name."""

    def __init__(self, sweep: SweepConfig, out_dir: str | os.PathLike):
        self.sweep, self.dir = sweep, join(str(out_dir), "core")
        self.pending: dict[str, tuple[str, object]] = {}  # trial -> (checkpoint, ObjectRef)
        self._tasks = None  # the task set, read once and put in the object store at the first evaluation

    def _key(self, checkpoint: str) -> dict:
        return dict(checkpoint=checkpoint, tasks=self.sweep.core, max_per_task=self.sweep.core_max_per_task)

    def _cached(self, trial: str, checkpoint: str) -> dict | None:
        try:
            saved = json.loads(read_bytes(join(self.dir, f"{trial}.json")))
        except FileNotFoundError:
            return None
        return saved if saved.get("key") == self._key(checkpoint) else None

    def start(self, trial: str, checkpoint: str | None) -> None:
        """Start scoring `checkpoint` unless it is scored already (or being scored)."""
        if not checkpoint or trial in self.pending or self._cached(trial, checkpoint):
            return
        if self._tasks is None:
            self._tasks = ray.put(load_tasks(self.sweep.core, self.sweep.core_max_per_task))
        task = ray.remote(num_cpus=0.01, **CORE_RETRIES)(core_task)
        # The evaluator takes the GPU share of one Train worker: the slot its trial just gave back. A
        # smaller share would leave the rest of that slot too small for the next trial anyway.
        ref = task.remote(checkpoint, self._tasks, self.sweep.use_gpu, self.sweep.gpus_per_worker)
        self.pending[trial] = (checkpoint, ref)
        print(f"CORE: scoring {trial} ({self.sweep.core})", flush=True)

    def callback(self) -> "StartCore":
        return StartCore(self)

    def fill(self, rows: list[dict]) -> None:
        """Wait for the scores (starting any a finished trial still lacks) and put them into `rows`:
        `core` and one `core_<task>` column (centered accuracy) per task."""
        for r in rows:
            if r["status"] == "done":
                self.start(r["trial"], r["checkpoint"])
        for trial, (checkpoint, ref) in self.pending.items():
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a failed eval must not lose the sweep's results
                print(f"CORE: {trial} failed: {e}", flush=True)
                continue
            write_bytes(join(self.dir, f"{trial}.json"), json.dumps(dict(key=self._key(checkpoint), result=result)))
            print(f"CORE: {trial} {result['core']:.4f} ({result['examples']} examples, "
                  f"{result['examples_per_s']:.0f}/s)", flush=True)
        self.pending.clear()
        for r in rows:
            saved = r["status"] == "done" and self._cached(r["trial"], r["checkpoint"])
            if saved:
                r["core"] = saved["result"]["core"]
                r.update({f"core_{label}": t["centered"] for label, t in saved["result"]["tasks"].items()})


class StartCore(Callback):
    """A Tune callback that starts a trial's CORE task as soon as the trial completes. It pickles
    (with the Tuner's state) as a no-op: a restored sweep registers the live one again."""

    def __init__(self, family: FamilyCore | None):
        self.family = family

    def __getstate__(self):
        return {"family": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.family is not None and result.get("step") and result.get("step") == result.get("iterations"):
            store = self.family.sweep.store
            self.family.start(trial.config["trial"]["name"], store.uri(result.get("checkpoint_path")))


# ---------------------------------------------------------------------------------------------------
# Rows, fits, report


@dataclass
class FamilyResults:
    """One row per trial (the report's table), each trial's metric history, and the fits."""

    rows: list[dict]
    histories: dict[str, list[dict]]
    fit: PowerLaw | None  # val bpb vs FLOPs (ratio grid)
    notes: list[str]  # isoFLOP grid: each budget's minimum and the compute-optimal allocation
    prediction: Prediction | None = None  # what the default targets take (None: no finished trial)

    def summary(self) -> list[str]:
        """A line per trial, the fits and what the targets take: what a job prints at its end."""
        lines = []
        for r in self.rows:
            core = f"  CORE {r['core']:.4f}" if r.get("core") is not None else ""
            lines.append(f"{r['trial']:<12} {r['status']:<8} steps {r['steps_done']:>6}  val bpb {r['val_bpb']:.4f}"
                         f"{core}  FLOPs {r['flops']:.2e}  {r['wall_s']:.0f} s")
        lines += ([f"fit: {self.fit}"] if self.fit is not None else []) + self.notes
        return lines + ([self.prediction.text()] if self.prediction is not None else [])


def result_rows(sweep: SweepConfig, grid) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per trial (for the report) and each trial's metric history."""
    rows, histories = [], {}
    nan, usd_per_gpu_hour = float("nan"), CostModel().usd_per_gpu_hour
    for result in grid:
        trial = Trial.model_validate(result.config["trial"])
        run, m = trial.plan, result.metrics or {}
        frame = result.metrics_dataframe
        history = [] if frame is None else frame.to_dict("records")
        for h in history:  # val numbers only where they were measured, not carried between evaluations
            if h.get("val_step") != h.get("step"):
                h["val_loss"] = h["val_bpb"] = nan
        wall = trial_wall(m)
        gpu_hours = wall * sweep.workers * sweep.gpus_per_worker / 3600 if sweep.use_gpu else 0.0
        rows.append(dict(
            trial=trial.name, depth=trial.depth, preset=sweep.preset, horizon=run.horizon_mode,
            ratio=sweep.ratio if sweep.grid == "ratio" else None, flops_budget=trial.flops_budget,
            params=run.scaling_params, total_params=run.total_params, tokens=m.get("tokens", 0),
            flops=m.get("flops", 0.0), iterations=run.iterations, steps_done=m.get("step", 0), wall_s=wall,
            train_s=m.get("train_time_s", nan),
            gpu_hours=gpu_hours, cost_usd=gpu_hours * usd_per_gpu_hour,
            train_loss=m.get("train_loss", nan), val_loss=m.get("val_loss", nan), val_bpb=m.get("val_bpb", nan),
            core=m.get("core"), tok_per_s=m.get("tok_per_s", nan), mfu=m.get("mfu", nan),
            checkpoint=sweep.store.uri(m.get("checkpoint_path")) or trial_checkpoint(sweep, trial.name),
            status="error" if result.error else ("done" if m.get("step") == run.iterations else "stopped"),
            **{k: m[k] for k in TIMINGS if k in m},
            **placement(m, history),
        ))
        histories[trial.name] = history
    rows.sort(key=lambda r: (r["flops_budget"] or 0, r["depth"]))
    return rows, histories


def trial_wall(final: dict) -> float:
    """A trial's wall time: Tune's (its driver's, which a restored sweep counts from the restore only) or the
    trainer's over every worker group (wall_time_s), whichever is longer; never less than its train time."""
    walls = [final[k] for k in ("time_total_s", "wall_time_s") if isinstance(final.get(k), (int, float))]
    return max(walls) if walls else float("nan")


def placement(final: dict, history: list[dict]) -> dict:
    """Where a trial's Train worker (rank 0) ran: the node id and hostname of its last report, and every
    hostname it ran on, in order (more than one after a lost node); nothing where the reports lack them."""
    hosts = list(dict.fromkeys(h["worker_host"] for h in history if isinstance(h.get("worker_host"), str)))
    if not hosts and "worker_host" not in final:
        return {}
    return dict(node_id=final.get("worker_node_id"), hostname=final.get("worker_host"),
                hostnames=";".join(hosts or [final.get("worker_host", "")]))


def family_fits(sweep: SweepConfig, rows: list[dict]) -> tuple[PowerLaw | None, list[str]]:
    """(fit, notes): val bpb vs FLOPs as a power law for a ratio grid; for an isoFLOP grid, the loss
    minimum of each budget and the compute-optimal allocation (as lines of text)."""
    done = [r for r in rows if r["status"] == "done" and math.isfinite(r["val_bpb"])]
    if sweep.grid == "ratio":
        fit = fit_power_law([r["flops"] for r in done], [r["val_bpb"] for r in done]) \
            if len({r["flops"] for r in done}) >= 2 else None
        return fit, []
    minima = isoflop_minima([dict(flops_budget=r["flops_budget"], params=r["params"], tokens=r["tokens"],
                                  loss=r["val_bpb"]) for r in done])
    notes = [f"C = {m.flops_budget:.2e}: " + (m.skip_reason or f"N_opt {m.params:.3g}, D_opt {m.tokens:.3g}, "
                                             f"val bpb {m.loss:.4f}" + (" (at the edge of the sizes)" * m.clipped))
             for m in minima]
    if sum(m.ok for m in minima) >= 2:
        notes.append(str(fit_optimal_allocation(minima)))
    return None, notes


def family_results(sweep: SweepConfig, grid, core: FamilyCore | None = None) -> FamilyResults:
    """The rows and histories of Tune's ResultGrid (with the CORE scores of `core`, once they are in) and
    the scaling fits."""
    rows, histories = result_rows(sweep, grid)
    if core is not None:
        core.fill(rows)
    fit, notes = family_fits(sweep, rows)
    try:
        prediction = what_it_takes(rows)
    except ValueError as e:  # no finished trial: the report says so, the sweep's results stay
        print(f"no prediction: {e}", flush=True)
        prediction = None
    return FamilyResults(rows, histories, fit, notes, prediction)


def write_family_report(sweep: SweepConfig, results: FamilyResults, out_dir: str) -> dict:
    """results.csv, plots, report.md and report.html in out_dir (a local directory, or a URI of an object
    store: written here, then uploaded), and into the family run of each of the sweep's trackers; returns their
    paths (or URIs)."""
    sections = {"Compute-optimal allocation (isoFLOP minima)": results.notes} if results.notes else None
    report = dict(title=f"nanoray {sweep.name}", fit=results.fit, sections=sections, prediction=results.prediction)
    if "://" not in str(out_dir):
        paths = write_report(results.rows, results.histories, out_dir, **report)
        track_report(sweep, paths)
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_report(results.rows, results.histories, tmp, **report)
        upload(tmp, out_dir)
        track_report(sweep, paths)
    return {name: join(out_dir, name) for name in paths}


def track_report(sweep: SweepConfig, paths: dict) -> None:
    """The report's files (local) as artifacts of each tracker's family run; prints where each tracker keeps them."""
    tracking = sweep.tracking()
    for line in tracking.log_report(paths, sweep.model_dump(mode="json")) if tracking else []:
        print(line, flush=True)
