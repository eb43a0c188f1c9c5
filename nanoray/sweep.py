"""The depth sweep: one Ray Tune trial per depth (or depth x FLOPs budget), each a Ray Train run.

    sweep = SweepConfig(name="miniseries", preset="tiny", depths=[1, 2, 3], storage_path="runs/sweeps")
    grid = run_sweep(sweep)              # restores an interrupted sweep of the same name and storage

Two grids: `ratio` (the compute-optimal family: tokens = ratio x scaling params at every depth) and
`isoflop` (every depth at every FLOPs budget: the trials of one budget cost the same). Each trial is
a small driver function (Ray 2.60 pattern: a TorchTrainer inside a Tune function trainable) that
fits its Trial's RunPlan; Train's metrics flow to Tune through TuneReportCallback. Trial names depend
only on the grid point, so a re-submitted sweep resumes each unfinished trial from its last Train
checkpoint and never re-trains a finished one. What a family's results become (rows, CORE, fits, the
report) is nanoray.family's.
"""

import os
from typing import Literal

import ray
import ray.tune
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from nanoray.data import DataSpec
from nanoray.dial import Horizon, PlanError, RunPlan, get_preset, plan
from nanoray.storage import RunStore
from nanoray.trackers import Trackers, Tracking
from nanoray.train import TrainConfig, fit, progress_line

CHECKPOINT_MINUTES = 15  # by default a failed trial loses at most about this much training
RESERVED_NAMES = ("train", "data", "reports", "mlflow")  # the storage root's own folders (nanoray.storage)


class SweepConfig(BaseModel):
    """A whole family: which depths, how long each trains, on what data and hardware."""

    model_config = ConfigDict(frozen=True)
    name: str = Field("miniseries", description="sweep name: with storage_path, the key a re-run resumes")
    preset: str = Field("tiny", description="model family preset (gpt2, tiny)")
    depths: list[int] = Field(description="depths to train")
    grid: Literal["ratio", "isoflop"] = Field("ratio", description="ratio: one trial per depth; isoflop: one "
                                              "per depth and FLOPs budget")
    ratio: float = Field(12.0, description="ratio grid: tokens per scaling parameter")
    budgets: list[float] = Field(default_factory=list, description="isoflop grid: FLOPs budgets")
    workers: int = Field(1, description="Ray Train workers (GPUs) per trial")
    use_gpu: bool = Field(False, description="train on GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="GPU share of a Train worker: 1, or a fraction "
                                   "(0.5, 0.25) so small trials share a GPU and one compiles while another trains")
    cpus_per_worker: float = Field(1.0, description="logical CPUs per Train worker")
    data: DataSpec = Field(DataSpec(kind="corpus"), description="the tokens every trial reads")
    storage_path: str = Field("runs/sweeps", description="storage root (a local path, made absolute, or s3://...)")
    max_concurrent: int | None = Field(None, description="trials at once (default: what the cluster fits)")
    max_failures: int = Field(2, description="Train worker-group restarts per trial")
    log_every: int | None = Field(None, description="report every N steps (default: ~25 reports per trial)")
    eval_every: int | None = Field(None, description="val loss/bpb every N steps and at the end (default: ~5 per trial)")
    eval_tokens: int = Field(2**20, description="val tokens per evaluation")
    checkpoint_every: int | None = Field(None, ge=0, description="checkpoint every N steps (0: only at the end; "
                                         f"None: about every {CHECKPOINT_MINUTES} minutes of estimated training)")
    core: str | None = Field(None, description="CORE task set for each final checkpoint: core, core-lite or a "
                             "bundle-shaped directory; None: no CORE")
    core_max_per_task: int | None = Field(None, ge=1, description="CORE examples per task (None: all)")
    tracker: Trackers = Field(default_factory=list, description="experiment trackers (mlflow, tensorboard, wandb): a "
                              "run per trial and the report at the end (nanoray.trackers)")
    fp8: bool = Field(False, description="block matrices train in fp8 (nanoray.fp8; GPUs of compute capability 8.9+)")
    window_pattern: str | None = Field(None, description="per-layer attention windows, e.g. SSSL (None: the preset's)")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory of the GPUs that train, which sizes the "
                                         "device batch (None: the preset's assumption)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not name or "/" in name or name in RESERVED_NAMES or name.startswith("."):
            raise ValueError(f"name: one folder name, not {', '.join(RESERVED_NAMES)}; got {name!r}")
        return name

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[int]) -> list[int]:
        if not depths:
            raise ValueError("depths: give at least one depth")
        if any(d < 1 for d in depths) or len(set(depths)) != len(depths):
            raise ValueError(f"depths: distinct integers >= 1, got {depths}")
        return depths

    @field_validator("preset")
    @classmethod
    def _preset(cls, preset: str) -> str:
        get_preset(preset)  # raises naming the allowed presets
        return preset

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, path: str) -> str:
        return RunStore(path).root  # trial drivers and Ray Data actors run in other working directories

    @property
    def store(self) -> RunStore:
        return RunStore(self.storage_path)

    def tracking(self) -> Tracking | None:
        """The sweep's trackers, checked (TrackerError names one that cannot run here); None without any."""
        return Tracking.make(self.tracker, self.name, self.store) if self.tracker else None


class Trial(BaseModel):
    """One grid point and the plan it trains: computed once, when the sweep starts, and carried with the trial."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="the grid point's name: d12, or d8-c1e18 in an isoFLOP grid")
    depth: int
    flops_budget: float | None = Field(None, description="isoFLOP grid: this trial's training FLOPs")
    plan: RunPlan


def trials(sweep: SweepConfig) -> list[Trial]:
    """Every trial of the grid with its plan, checked before anything starts: a bad setting fails here,
    naming the trial and the field."""
    if sweep.grid == "ratio":
        points = [(f"d{d}", d, None) for d in sweep.depths]
    elif not sweep.budgets:
        raise ValueError("budgets: the isoflop grid needs at least one FLOPs budget")
    else:
        points = [(f"d{d}-c{c:.0e}".replace("+", ""), d, c) for c in sweep.budgets for d in sweep.depths]
    out = []
    for name, depth, budget in points:
        horizon = Horizon(flops=budget) if budget else Horizon(ratio=sweep.ratio)
        try:
            out.append(Trial(name=name, depth=depth, flops_budget=budget,
                             plan=plan(depth, sweep.preset, horizon, num_workers=sweep.workers,
                                       window_pattern=sweep.window_pattern, fp8=sweep.fp8,
                                       gpu_memory_gib=sweep.gpu_memory_gib)))
        except PlanError as e:
            raise PlanError(f"trial {name}: {e}") from e
    return out


def checkpoint_interval(sweep: SweepConfig, run: RunPlan) -> int:
    """Steps between a trial's checkpoints: the sweep's, or so that a failure loses about CHECKPOINT_MINUTES
    of training by the dial's time estimate (none before the end for a trial shorter than that)."""
    if sweep.checkpoint_every is not None:
        return sweep.checkpoint_every
    minutes = run.gpu_hours / run.num_workers * 60
    return 0 if minutes <= CHECKPOINT_MINUTES else max(1, int(run.iterations * CHECKPOINT_MINUTES / minutes))


def train_config(sweep: SweepConfig, trial: Trial) -> TrainConfig:
    run = trial.plan
    return TrainConfig(plan=run, data=sweep.data, log_every=sweep.log_every or max(1, run.iterations // 25),
                       eval_every=sweep.eval_every or max(1, run.iterations // 5), eval_tokens=sweep.eval_tokens,
                       checkpoint_every=checkpoint_interval(sweep, run))


def train_run_name(sweep: SweepConfig, trial: str) -> str:
    """The Ray Train run of a trial (under the storage's train/)."""
    return f"{sweep.name}-{trial}"


def run_trial(config: dict) -> None:
    """Tune trial driver: fit one trial with Ray Train; Train's reports reach Tune via the callback."""
    sweep, trial = SweepConfig.model_validate(config["sweep"]), Trial.model_validate(config["trial"])
    fit(train_config(sweep, trial), name=train_run_name(sweep, trial.name), store=sweep.store,
        use_gpu=sweep.use_gpu, gpus_per_worker=sweep.gpus_per_worker, cpus_per_worker=sweep.cpus_per_worker,
        max_failures=sweep.max_failures, callbacks=[TuneReportCallback()])


def trial_checkpoint(sweep: SweepConfig, trial: str) -> str | None:
    """The URI of a trial's latest Train checkpoint, read from Train's storage: Tune's metrics of a trial
    that an earlier (killed) driver saw finish may lack it."""
    checkpoint = sweep.store.latest_checkpoint(train_run_name(sweep, trial))
    return checkpoint and sweep.store.uri(checkpoint.path)


def trial_name(trial) -> str:
    """Tune trial names and folders: the grid point's name (d12, d8-c1e18), not a hash."""
    return trial.config["trial"]["name"]


def driver_resources() -> dict:
    """Trial drivers hold no real CPU: a `trial_driver` resource where the cluster has one (the head
    of cluster.yaml), else a sliver of a CPU (Tune rejects a request of nothing)."""
    return {"CPU": 0, "trial_driver": 1} if ray.cluster_resources().get("trial_driver") else {"CPU": 0.01}


def default_concurrency(sweep: SweepConfig, num_trials: int) -> int:
    if not sweep.use_gpu:
        return 1  # CPU trials compete for the same cores: one at a time finishes each soonest
    gpus = ray.cluster_resources().get("GPU", 0)
    fits = int(gpus / (sweep.workers * sweep.gpus_per_worker) + 1e-9)
    return max(1, fits) if gpus else num_trials  # 0 GPUs: an autoscaler will bring them


class ProgressLines(Callback):
    """The sweep's progress, printed by the driver: one line per report of every trial, and a line where a
    trial's worker group starts over from a checkpoint. (Jobs keep the workers' own output on their nodes.)"""

    def __init__(self):
        self.starts: dict[str, int] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "train_loss" not in result:
            return
        name, start = trial_name(trial), result.get("start_step", 0)
        prefix = "" if name == f"d{result['depth']}" else f"{name}: "  # isoFLOP trials: depth and budget
        if start and self.starts.get(name) != start:
            print(f"{prefix}d{result['depth']} resumed from step {start} of {result['iterations']}", flush=True)
        self.starts[name] = start
        print(prefix + progress_line(result), flush=True)


# What a re-run must repeat to resume a sweep: Tune restores trials with the config they started with.
RESUME_FIELDS = ("preset", "depths", "grid", "ratio", "budgets", "workers", "gpus_per_worker", "use_gpu",
                 "data.source", "eval_tokens", "fp8", "window_pattern")


class ResumeMismatch(ValueError):
    """A re-run asks for other settings than the sweep it would resume; `field` names the SweepConfig field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


def _field(config: dict, path: str):
    for key in path.split("."):
        config = (config or {}).get(key)
    return config


def check_resume(sweep: SweepConfig) -> None:
    """Raise ResumeMismatch when `sweep` would restore an earlier sweep of the same name and storage that
    was started with other settings: Tune would go on with the old ones and run another plan than asked."""
    path = sweep.store.sweep_dir(sweep.name)
    if not ray.tune.Tuner.can_restore(path):
        return
    results = ray.tune.Tuner.restore(path, trainable=run_trial).get_results()
    started = [r.config["sweep"] for r in results if r.config]  # a trial that never started has no config
    if not started:
        return
    old, new = started[0], sweep.model_dump()
    for field in RESUME_FIELDS:
        before = _field(old, field)
        if before is None and field in SweepConfig.model_fields:  # a sweep started before the field existed
            before = SweepConfig.model_fields[field].default
        if before != _field(new, field):
            raise ResumeMismatch(field, f"sweep {sweep.name!r} in {sweep.storage_path} was started with {field} = "
                                        f"{before!r}, not {_field(new, field)!r}; a re-run resumes it as "
                                        "it was started: give the same settings, or another sweep name")


def run_sweep(sweep: SweepConfig, callbacks: list | None = None):
    """Run (or resume) the sweep; returns Tune's ResultGrid. `callbacks`: more Tune callbacks of this driver
    (it always prints each trial's progress, and logs each trial to the sweep's trackers). Tune's own status
    tables stay off (verbose 0)."""
    grid = trials(sweep)  # fail before anything starts
    tracking = sweep.tracking()
    callbacks = [ProgressLines(), *(tracking.tune_callbacks() if tracking else []), *(callbacks or [])]
    trainable = ray.tune.with_resources(run_trial, driver_resources())
    # Tune's newer output engine prints a configuration box and two paths even at verbose 0; the older one is
    # silent at 0 (ProgressLines prints the progress either way). Set RAY_AIR_NEW_OUTPUT=1 to have them back.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    path = sweep.store.sweep_dir(sweep.name)
    if ray.tune.Tuner.can_restore(path):
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        # this driver's callbacks and verbosity replace the pickled ones (Tune has no public setter for them)
        tuner._local_tuner._run_config.callbacks = callbacks
        tuner._local_tuner._run_config.verbose = 0
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=dict(sweep=sweep.model_dump(), trial=ray.tune.grid_search([t.model_dump() for t in grid])),
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent
                                            or default_concurrency(sweep, len(grid)),
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=ray.tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path, verbose=0,
                                          callbacks=callbacks, failure_config=ray.tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()
