"""Experiment trackers (MLflow, TensorBoard, W&B) through Ray's own logger callbacks: each trial of a sweep is
one tracker run, with the trial's config (its plan) and every report's metrics at its training step, and the
family's report files go to a family-level run at the end.

    tracking = Tracking.make(["mlflow", "tensorboard"], "miniseries", RunStore("runs/sweeps"))  # checked here
    ray.tune.RunConfig(callbacks=tracking.tune_callbacks(), ...)    # what run_sweep does (SweepConfig.tracker)
    tracking.log_report(paths, config)                              # what write_family_report does
    fit(..., callbacks=[tracking.train_callback(config, end_step)])  # a run outside Tune (TrainConfig.tracker)

The jobs take `--tracker mlflow,tensorboard,wandb`. Each tracker reads its settings from its usual variables and
by default writes under the storage root, so nothing needs a server:

    mlflow       MLFLOW_TRACKING_URI (default: the file store <storage>/mlflow); MLFLOW_EXPERIMENT_NAME (default:
                 the sweep's name). A parent run named after the sweep holds the report's files (found again when
                 the sweep is re-run); each trial is a run nested in it, its params the trial's config.
    tensorboard  each trial's event file in its Tune folder <storage>/<sweep>/<trial>/ (scalars ray/tune/<metric>);
                 the report as text and images in <storage>/<sweep>/report/. tensorboard --logdir <storage>/<sweep>
    wandb        WANDB_PROJECT (default nanoray); WANDB_MODE (default: online where an API key is set, by
                 WANDB_API_KEY or `wandb login`, else offline). A run per trial, grouped by sweep, kept in
                 <storage>/<sweep>/<trial>/wandb/; the report an artifact of a run in <storage>/<sweep>/report/wandb/.
                 Upload offline runs with `wandb sync <dir>/wandb/offline-run-*`.
"""

import contextlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from nanoray.storage import RunStore, upload

# tracker -> (the module it needs, the pip extra that installs it)
TRACKERS = {"mlflow": ("mlflow", "mlflow"), "tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}
FAMILY_TAG = "nanoray.family"  # MLflow: marks a sweep's parent run, and finds it again on a re-run


def parse_trackers(value) -> list[str]:
    """None, a name, comma-separated names or a list of names -> the names, each once; an unknown one raises
    ValueError naming the allowed ones."""
    if value is None:
        return []
    names = [str(n).strip() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"one or more of {', '.join(TRACKERS)} (comma-separated), got {', '.join(map(repr, unknown))}")
    return list(dict.fromkeys(names))


# A config field of tracker names: None, "mlflow,wandb" or a list.
Trackers = Annotated[list[str], BeforeValidator(parse_trackers)]


class TrackerError(ValueError):
    """A tracker that cannot run here: the message starts with its name and says what to do."""


def wandb_mode() -> str:
    """WANDB_MODE where set; else online with an API key (WANDB_API_KEY, or the one `wandb login` saved) and
    offline without, so that a run without an account keeps its W&B runs to `wandb sync` later."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import wandb

    return "online" if wandb.login(prompt=False, verify=False) else "offline"


class Tracking(BaseModel):
    """Which trackers one sweep (or training run) logs to, and where: resolved once on the driver, from the
    environment, then carried as it is (to Train's controller too)."""

    model_config = ConfigDict(frozen=True)
    trackers: list[str]
    name: str = Field(description="the sweep's (or training run's) name: MLflow experiment, W&B group, run names")
    storage: str = Field(description="the storage root (nanoray.storage.RunStore)")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI")
    mlflow_experiment: str | None = None
    wandb_project: str | None = None
    wandb_mode: str | None = Field(None, description="online, offline or disabled")

    @classmethod
    def make(cls, trackers, name: str, store: RunStore) -> "Tracking":
        """Check that every tracker can run here (its package installed, somewhere to write) and read its
        settings. Raises TrackerError, naming the tracker and what to do, before anything starts."""
        trackers = parse_trackers(trackers)
        for tracker in trackers:
            module, extra = TRACKERS[tracker]
            if importlib.util.find_spec(module) is None:
                raise TrackerError(f"{tracker}: needs the {module} package, which is not installed: "
                                   f"pip install 'nanoray[{extra}]'")
        settings = {}
        if "mlflow" in trackers:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or store.mlflow_uri
            if uri is None:
                raise TrackerError(f"mlflow: MLFLOW_TRACKING_URI is not set, and MLflow's file store cannot live in "
                                   f"{store.root}: set MLFLOW_TRACKING_URI to a tracking server (or a local path)")
            settings.update(mlflow_uri=uri, mlflow_experiment=os.environ.get("MLFLOW_EXPERIMENT_NAME") or name)
        if "wandb" in trackers:
            settings.update(wandb_project=os.environ.get("WANDB_PROJECT") or "nanoray", wandb_mode=wandb_mode())
        return cls(trackers=trackers, name=name, storage=store.root, **settings)

    @property
    def store(self) -> RunStore:
        return RunStore(self.storage)

    # -----------------------------------------------------------------------------------------------
    # One run per trial

    def tune_callbacks(self) -> list:
        """Ray's logger callbacks for a sweep's Tuner: a run per trial, named after it. MLflow's are nested in
        the sweep's parent run."""
        parent = None
        if "mlflow" in self.trackers:
            client, experiment = self._mlflow()
            parent = _family_run(client, experiment, self.name)
            client.update_run(parent, status="RUNNING")
        return self._loggers(parent)

    def _loggers(self, mlflow_parent: str | None = None) -> list:
        loggers = []
        if "mlflow" in self.trackers:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            self._allow_file_store()
            tags = {"nanoray.name": self.name} | ({"mlflow.parentRunId": mlflow_parent} if mlflow_parent else {})
            loggers.append(_at_training_steps(MLflowLoggerCallback)(
                self.mlflow_uri, experiment_name=self.mlflow_experiment, tags=tags))
        if "tensorboard" in self.trackers:
            from ray.tune.logger import TBXLoggerCallback

            loggers.append(_at_training_steps(TBXLoggerCallback)())
        if "wandb" in self.trackers:
            from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor

            os.environ.setdefault("WANDB_MODE", self.wandb_mode)  # Ray's callback asks for an API key unless offline
            actor = type("WandbLoggingActor", (_WandbFlushed, _WandbLoggingActor), {})
            wandb = type("WandbLoggerCallback", (_WandbTrialEnd, WandbLoggerCallback), {"_logger_actor_cls": actor})
            loggers.append(_at_training_steps(wandb)(project=self.wandb_project, group=self.name, mode=self.wandb_mode))
        return loggers

    def _allow_file_store(self) -> None:
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless told; mlflow-skinny has no
        # database backend (sqlite:// needs the full mlflow), so the file store is what works with no server.
        if self.mlflow_uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    def _mlflow(self):
        """An MlflowClient and the id of this tracking's experiment (made if new)."""
        import mlflow

        self._allow_file_store()
        client = mlflow.MlflowClient(tracking_uri=self.mlflow_uri)
        experiment = client.get_experiment_by_name(self.mlflow_experiment)
        return client, experiment.experiment_id if experiment else client.create_experiment(self.mlflow_experiment)

    def train_callback(self, config: dict, end_step: int):
        """A Ray Train callback (it runs in Train's controller) that drives the same loggers for a training run
        outside Tune: one tracker run named after it, started at its first report and ended at the report of
        step `end_step`. Its TensorBoard and W&B files go to the Train run's folder."""
        import ray.train

        tracking = self

        class TrackReports(ray.train.UserCallback):
            def __init__(self):
                self.loggers, self.run, self.reports = None, None, 0

            def after_report(self, run_context, metrics, checkpoint):
                if self.loggers is None:
                    self.run = _RunAsTrial(tracking.name, config, tracking._run_dir())
                    self.loggers = tracking._loggers()
                    for logger in self.loggers:
                        logger.setup()
                        logger.log_trial_start(self.run)
                self.reports += 1
                result = dict(metrics[0], training_iteration=self.reports)
                for logger in self.loggers:
                    logger.log_trial_result(self.reports, self.run, result)
                if result.get("step", 0) >= end_step:
                    for logger in self.loggers:
                        logger.log_trial_end(self.run)
                        logger.on_experiment_end(trials=[self.run])
                    if not tracking.store.is_local:
                        upload(self.run.local_path, tracking.store.train_run(tracking.name))

        return TrackReports()

    def _run_dir(self) -> str:
        """Where a training run's tracker files are written: its Train folder, or a local one uploaded there."""
        store = self.store
        return store.train_run(self.name) if store.is_local else tempfile.mkdtemp(prefix="nanoray-trackers-")

    # -----------------------------------------------------------------------------------------------
    # The family's report

    def log_report(self, paths: dict, config: dict) -> list[str]:
        """The report's files (`paths`: name -> local file) into each tracker's family-level run, with the
        sweep's `config`; returns a line per tracker saying where to look."""
        files = {name: str(p) for name, p in paths.items() if os.path.isfile(p)}
        return [{"mlflow": self._mlflow_report, "tensorboard": self._tensorboard_report,
                 "wandb": self._wandb_report}[tracker](files, config) for tracker in self.trackers]

    def _mlflow_report(self, files: dict, config: dict) -> str:
        client, experiment = self._mlflow()
        run = _family_run(client, experiment, self.name)
        client.log_dict(run, config, "config.json")
        for path in files.values():
            client.log_artifact(run, path)
        client.set_terminated(run, "FINISHED")
        return f"mlflow: experiment {self.mlflow_experiment!r}, run {run} (the report) at {self.mlflow_uri}"

    def _tensorboard_report(self, files: dict, config: dict) -> str:
        import matplotlib.image
        from tensorboardX import SummaryWriter

        with local_dir(self.store.family_dir(self.name)) as out:
            writer = SummaryWriter(out)
            writer.add_text("config", _code(json.dumps(config, indent=1)))
            for name, path in sorted(files.items()):
                if name.endswith(".png"):  # RGBA floats in [0, 1]
                    writer.add_image(name, matplotlib.image.imread(path)[..., :3], dataformats="HWC")
                elif name.endswith(".md"):
                    writer.add_text(name, Path(path).read_text())
                elif name.endswith((".csv", ".json")):
                    writer.add_text(name, _code(Path(path).read_text()))
            writer.close()
        return f"tensorboard: tensorboard --logdir {self.store.sweep_dir(self.name)}"

    def _wandb_report(self, files: dict, config: dict) -> str:
        import wandb

        with local_dir(self.store.family_dir(self.name)) as out:
            run = wandb.init(project=self.wandb_project, group=self.name, name=f"{self.name}-report",
                             job_type="report", config=config, dir=out, mode=self.wandb_mode,
                             settings=wandb.Settings(silent=True))
            artifact = wandb.Artifact(f"{self.name}-report", type="report")
            for name, path in files.items():
                artifact.add_file(path, name=name)
            run.log_artifact(artifact)
            run.finish()
        where = f"offline runs in {self.store.sweep_dir(self.name)}/*/wandb (upload: wandb sync <dir>/offline-run-*)"
        return f"wandb: project {self.wandb_project!r}, group {self.name!r}" + \
            (f", {where}" if self.wandb_mode == "offline" else "")


def _family_run(client, experiment: str, name: str) -> str:
    """The id of a sweep's parent MLflow run: found by its tag when the sweep ran before, else made."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{FAMILY_TAG}` = '{name}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    return client.create_run(experiment, run_name=name, tags={FAMILY_TAG: name}).info.run_id


def _code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown's code block, as TensorBoard shows text


@contextlib.contextmanager
def local_dir(uri: str):
    """A local directory whose files end up at `uri`: the directory itself when local, else a temporary one
    uploaded there at the end."""
    if "://" not in uri:
        os.makedirs(uri, exist_ok=True)
        yield uri
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        upload(tmp, uri)


class _AtTrainingSteps:
    """Mixed into Ray's logger callbacks. A result is logged at its training step (Tune's loggers use
    timesteps_total where a result has it, else the count of reports), without the config every result repeats,
    and val numbers only where they were measured, not carried between evaluations (as in the report). The
    callback pickles (with the Tuner's state) as a plain Callback that does nothing: a restored sweep registers
    live ones again, and restores where the tracker is not installed."""

    def log_trial_result(self, iteration, trial, result):
        result = {k: v for k, v in result.items() if k != "config"}
        if "step" in result:
            result["timesteps_total"] = result["step"]
            if result.get("val_step") != result["step"]:
                result.pop("val_loss", None)
                result.pop("val_bpb", None)
        super().log_trial_result(iteration, trial, result)

    def __reduce__(self):
        from ray.tune import Callback

        return Callback, ()


class _WandbFlushed:
    """Ray's W&B logging actor, returning only once W&B's own service process has written the run out. Its
    `wandb.finish()` can return while that process (a child of the actor) still holds the run's records; Ray
    kills the actor next, and the run's .wandb file was left a 7-byte header (seen in CI, on a loaded box)."""

    def run(self):
        super().run()
        self._wandb.teardown()  # waits for the service process to flush and exit


class _WandbTrialEnd:
    """Ray's W&B callback, waiting at a trial's end until that trial's W&B run is written. Ray's own waits only
    at the experiment's end, after Tune's last copy of the trial folders to storage: the last trial's run would
    reach the storage cut short."""

    def log_trial_end(self, trial, failed: bool = False):
        import ray

        future = self._trial_logging_futures.get(trial)
        if future is None:
            return
        self._signal_logging_actor_stop(trial)
        ray.wait([future], timeout=self._upload_timeout)
        self._cleanup_logging_actors()  # what Ray's log_trial_end does after the signal


def _at_training_steps(logger: type) -> type:
    return type(logger.__name__, (_AtTrainingSteps, logger), {})


class _RunAsTrial:
    """What Ray's logger callbacks read of a Tune trial, for a training run outside Tune."""

    def __init__(self, name: str, config: dict, local_path: str):
        self.trial_id = self.experiment_dir_name = name
        self.config = self.evaluated_params = config
        self.local_path = local_path

    def init_local_path(self) -> None:
        os.makedirs(self.local_path, exist_ok=True)

    def __str__(self) -> str:
        return self.trial_id
