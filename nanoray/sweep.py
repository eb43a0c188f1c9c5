"""The depth sweep: one Ray Tune trial per depth (or depth x FLOPs budget), each a Ray Train run.

    sweep = SweepConfig(name="miniseries", preset="tiny", depths=[1, 2, 3], storage_path="runs/sweeps")
    results = run_sweep(sweep)           # restores an interrupted sweep of the same name and storage

Two grids: `ratio` (the compute-optimal family: tokens = ratio x scaling params at every depth) and
`isoflop` (every depth at every FLOPs budget: the trials of one budget cost the same). Each trial is
a small driver function (Ray 2.60 pattern: a TorchTrainer inside a Tune function trainable) that
turns its depth into a RunPlan and fits it; Train's metrics flow to Tune through TuneReportCallback.
Trial names depend only on the grid point, so a re-submitted sweep resumes each unfinished trial from
its last Train checkpoint and never re-trains a finished one.
"""

import argparse
import os

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanoray.data import DataSpec
from nanoray.dial import CostModel, Horizon, PlanError, RunPlan, get_preset, plan

GRIDS = ("ratio", "isoflop")
CHECKPOINT_MINUTES = 15  # by default a failed trial loses at most about this much training


class SweepConfig(BaseModel):
    """A whole family: which depths, how long each trains, on what data and hardware."""

    model_config = ConfigDict(frozen=True)
    name: str = Field("miniseries", description="sweep name: with storage_path, the key a re-run resumes")
    preset: str = Field("tiny", description="model family preset (gpt2, tiny)")
    depths: list[int] = Field(description="depths to train")
    grid: str = Field("ratio", description=f"one of {GRIDS}")
    ratio: float = Field(12.0, description="ratio grid: tokens per scaling parameter")
    budgets: list[float] = Field(default_factory=list, description="isoflop grid: FLOPs budgets")
    workers: int = Field(1, description="Ray Train workers (GPUs) per trial")
    use_gpu: bool = Field(False, description="train on GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="GPU share of a Train worker: 1, or a fraction "
                                   "(0.5, 0.25) so small trials share a GPU and one compiles while another trains")
    cpus_per_worker: float = Field(1.0, description="logical CPUs per Train worker")
    data: DataSpec = Field(DataSpec(kind="corpus"), description="the tokens every trial reads")
    storage_path: str = Field(os.path.abspath("runs/sweeps"), description="Tune and Train storage (local or s3://)")
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

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[int]) -> list[int]:
        if not depths:
            raise ValueError("depths: give at least one depth")
        if any(d < 1 for d in depths) or len(set(depths)) != len(depths):
            raise ValueError(f"depths: distinct integers >= 1, got {depths}")
        return depths

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: str) -> str:
        if grid not in GRIDS:
            raise ValueError(f"grid: unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
        return grid

    @field_validator("preset")
    @classmethod
    def _preset(cls, preset: str) -> str:
        get_preset(preset)  # raises naming the allowed presets
        return preset


def grid_points(sweep: SweepConfig) -> list[dict]:
    """The trials: {"trial": name, "depth": d, "flops_budget": C or None}."""
    if sweep.grid == "ratio":
        return [dict(trial=f"d{d}", depth=d, flops_budget=None) for d in sweep.depths]
    if not sweep.budgets:
        raise ValueError("budgets: the isoflop grid needs at least one FLOPs budget")
    return [dict(trial=f"d{d}-c{c:.0e}".replace("+", ""), depth=d, flops_budget=c)
            for c in sweep.budgets for d in sweep.depths]


def trial_plan(sweep: SweepConfig, point: dict) -> RunPlan:
    horizon = Horizon(flops=point["flops_budget"]) if point["flops_budget"] else Horizon(ratio=sweep.ratio)
    return plan(point["depth"], sweep.preset, horizon, num_workers=sweep.workers)


def plans(sweep: SweepConfig) -> dict[str, RunPlan]:
    """Every trial's plan, checked before anything starts: a bad flag fails here, naming it."""
    out = {}
    for point in grid_points(sweep):
        try:
            out[point["trial"]] = trial_plan(sweep, point)
        except PlanError as e:
            raise PlanError(f"trial {point['trial']}: {e}") from e
    return out


def plan_table(sweep: SweepConfig, plans_: dict[str, RunPlan]) -> str:
    """One line per trial, with what the family costs in total."""
    lines = [f"{'trial':<12}{'params':>10}{'tokens':>10}{'FLOPs':>11}{'steps':>8}{'batch':>9}"
             f"{'GPU-h':>8}{'cost $':>9}"]
    for name, p in plans_.items():
        lines.append(f"{name:<12}{p.scaling_params / 1e6:>9.2f}M{p.tokens / 1e6:>9.1f}M{p.total_flops:>11.2e}"
                     f"{p.iterations:>8}{p.total_batch_tokens:>9}{p.gpu_hours:>8.2f}{p.cost_usd:>9.2f}")
    total_flops = sum(p.total_flops for p in plans_.values())
    lines.append(f"{'total':<12}{'':>20}{total_flops:>11.2e}{'':>17}{sum(p.gpu_hours for p in plans_.values()):>8.2f}"
                 f"{sum(p.cost_usd for p in plans_.values()):>9.2f}")
    return "\n".join(lines)


def run_trial(config: dict) -> None:
    """Tune trial driver: fit one depth with Ray Train; Train's reports reach Tune via the callback."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from nanoray.train import TrainConfig, fit

    sweep = SweepConfig.model_validate(config["sweep"])
    point = config["point"]
    run = trial_plan(sweep, point)
    train_config = TrainConfig(plan=run, data=sweep.data, log_every=sweep.log_every or max(1, run.iterations // 25),
                               eval_every=sweep.eval_every or max(1, run.iterations // 5),
                               eval_tokens=sweep.eval_tokens, checkpoint_every=checkpoint_interval(sweep, run))
    fit(train_config, name=train_run_name(sweep, point["trial"]),
        storage_path=os.path.join(sweep.storage_path, "train"),
        use_gpu=sweep.use_gpu, gpus_per_worker=sweep.gpus_per_worker, cpus_per_worker=sweep.cpus_per_worker,
        max_failures=sweep.max_failures,
        callbacks=[TuneReportCallback()])


def checkpoint_interval(sweep: SweepConfig, run: RunPlan) -> int:
    """Steps between a trial's checkpoints: the sweep's, or so that a failure loses about CHECKPOINT_MINUTES
    of training by the dial's time estimate (none before the end for a trial shorter than that)."""
    if sweep.checkpoint_every is not None:
        return sweep.checkpoint_every
    minutes = run.gpu_hours / run.num_workers * 60
    return 0 if minutes <= CHECKPOINT_MINUTES else max(1, int(run.iterations * CHECKPOINT_MINUTES / minutes))


def train_run_name(sweep: SweepConfig, trial: str) -> str:
    return f"{sweep.name}-{trial}"


def train_checkpoint(sweep: SweepConfig, trial: str) -> str | None:
    """The location of a trial's latest Train checkpoint, read from Train's storage: Tune's metrics of a
    trial that an earlier (killed) driver saw finish may lack it."""
    from nanoray.train import latest_checkpoint

    checkpoint = latest_checkpoint(os.path.join(sweep.storage_path, "train"), train_run_name(sweep, trial))
    return checkpoint and storage_uri(sweep, checkpoint.path)


def storage_uri(sweep: SweepConfig, path: str | None) -> str | None:
    """A checkpoint location as a URI others can open: Train gives paths in its storage's filesystem
    without the scheme (`bucket/sweeps/...` for s3://bucket/sweeps)."""
    scheme = sweep.storage_path.split("://")[0] if "://" in sweep.storage_path else None
    if path is None or scheme is None or "://" in path:
        return path
    return f"{scheme}://{path}"


def trial_name(trial) -> str:
    """Tune trial names and folders: the grid point's name (d12, d8-c1e18), not a hash."""
    return trial.config["point"]["trial"]


def driver_resources() -> dict:
    """Trial drivers hold no real CPU: a `trial_driver` resource where the cluster has one (the head
    of cluster.yaml), else a sliver of a CPU (Tune rejects a request of nothing)."""
    import ray

    return {"CPU": 0, "trial_driver": 1} if ray.cluster_resources().get("trial_driver") else {"CPU": 0.01}


def default_concurrency(sweep: SweepConfig, num_trials: int) -> int:
    import ray

    if not sweep.use_gpu:
        return 1  # CPU trials compete for the same cores: one at a time finishes each soonest
    gpus = ray.cluster_resources().get("GPU", 0)
    fits = int(gpus / (sweep.workers * sweep.gpus_per_worker) + 1e-9)
    return max(1, fits) if gpus else num_trials  # 0 GPUs: an autoscaler will bring them


# What a re-run must repeat to resume a sweep (Tune restores trials with the config they started with),
# and the flag that sets each.
RESUME_KEYS = {"preset": "--preset", "depths": "--depths", "grid": "--grid", "ratio": "--ratio",
               "budgets": "--budgets", "workers": "--workers", "gpus_per_worker": "--gpus-per-worker",
               "use_gpu": "--gpu/--no-gpu", "source": "--source", "eval_tokens": None}


def check_resume(sweep: SweepConfig) -> None:
    """Raise, naming the flag, when `sweep` would restore an earlier sweep of the same name and storage that
    was started with other settings: Tune would go on with the old ones and print a plan that is not run."""
    import ray.tune

    path = os.path.join(sweep.storage_path, sweep.name)
    if not ray.tune.Tuner.can_restore(path):
        return
    results = ray.tune.Tuner.restore(path, trainable=run_trial).get_results()
    started = [r.config["sweep"] for r in results if r.config]  # a trial that never started has no config
    if not started:
        return
    old, new = started[0], sweep.model_dump()
    old["source"], new["source"] = old["data"]["source"], new["data"]["source"]
    for key, flag in RESUME_KEYS.items():
        if old.get(key) != new.get(key):
            raise ValueError(f"{flag or key}: sweep {sweep.name!r} in {sweep.storage_path} was started with {key} = "
                             f"{old.get(key)!r}, not {new.get(key)!r}; a re-run resumes it as it was started: give "
                             f"the same settings, or a new --name")


def run_sweep(sweep: SweepConfig, callbacks: list | None = None):
    """Run (or resume) the sweep; returns Tune's ResultGrid. `callbacks`: Tune callbacks of this driver."""
    import ray.tune

    points = grid_points(sweep)
    plans(sweep)  # fail before anything starts
    trainable = ray.tune.with_resources(run_trial, driver_resources())
    path = os.path.join(sweep.storage_path, sweep.name)
    if ray.tune.Tuner.can_restore(path):
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        if callbacks:  # this driver's callbacks replace the pickled ones (Tune has no public setter for them)
            tuner._local_tuner._run_config.callbacks = callbacks
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=dict(sweep=sweep.model_dump(), point=ray.tune.grid_search(points)),
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent
                                            or default_concurrency(sweep, len(points)),
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=ray.tune.RunConfig(name=sweep.name, storage_path=sweep.storage_path, verbose=1, callbacks=callbacks,
                                          failure_config=ray.tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()


def result_rows(sweep: SweepConfig, grid) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per trial (for the report) and each trial's metric history."""
    from nanoray.report import TIMINGS

    rows, histories = [], {}
    nan, usd_per_gpu_hour = float("nan"), CostModel().usd_per_gpu_hour
    for result in grid:
        point = result.config["point"]
        run = trial_plan(sweep, point)
        m = result.metrics or {}
        frame = result.metrics_dataframe
        history = [] if frame is None else frame.to_dict("records")
        for h in history:  # val numbers only where they were measured, not carried between evaluations
            if h.get("val_step") != h.get("step"):
                h["val_loss"] = h["val_bpb"] = nan
        wall = m.get("time_total_s", nan)
        gpu_hours = wall * sweep.workers * sweep.gpus_per_worker / 3600 if sweep.use_gpu else 0.0
        rows.append(dict(
            trial=point["trial"], depth=point["depth"], preset=sweep.preset, horizon=run.horizon_mode,
            ratio=sweep.ratio if sweep.grid == "ratio" else None, flops_budget=point["flops_budget"],
            params=run.scaling_params, total_params=run.total_params, tokens=m.get("tokens", 0),
            flops=m.get("flops", 0.0), iterations=run.iterations, steps_done=m.get("step", 0), wall_s=wall,
            train_s=m.get("train_time_s", nan),
            gpu_hours=gpu_hours, cost_usd=gpu_hours * usd_per_gpu_hour,
            train_loss=m.get("train_loss", nan), val_loss=m.get("val_loss", nan), val_bpb=m.get("val_bpb", nan),
            core=m.get("core"), tok_per_s=m.get("tok_per_s", nan), mfu=m.get("mfu", nan),
            checkpoint=storage_uri(sweep, m.get("checkpoint_path")) or train_checkpoint(sweep, point["trial"]),
            status="error" if result.error else ("done" if m.get("step") == run.iterations else "stopped"),
            **{k: m[k] for k in TIMINGS if k in m},
        ))
        histories[point["trial"]] = history
    rows.sort(key=lambda r: (r["flops_budget"] or 0, r["depth"]))
    return rows, histories


# ---------------------------------------------------------------------------------------------------
# What the jobs share (jobs/miniseries.py, jobs/scaling_laws.py)


def add_arguments(p, grid: str) -> None:
    """The flags of a sweep job. Defaults depend on whether the cluster has GPUs (resolved later)."""
    p.add_argument("--name", default=None, help="sweep name (default: the job's name); the same name resumes")
    p.add_argument("--preset", default=None, help="gpt2 or tiny (default: gpt2 with GPUs, tiny without)")
    p.add_argument("--depths", default=None, help="comma-separated depths (default: 6,8,10,12 on GPUs, 1,2,3 on CPU)")
    p.add_argument("--grid", default=grid, choices=GRIDS)
    p.add_argument("--ratio", type=float, default=None, help="ratio grid: tokens per param (default 12 GPU, 1 CPU)")
    p.add_argument("--budgets", default=None, help="isoflop grid: comma-separated FLOPs budgets")
    p.add_argument("--source", default="stdlib", help="corpus: stdlib, files:<glob>, parquet:<...>, hf:<org/name>, "
                   "debian-docs")
    p.add_argument("--workers", "--workers-per-trial", dest="workers", type=int, default=1,
                   help="Train workers (GPUs) per trial")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPU share per worker: 1, or 0.5/0.25 so small trials share a GPU")
    p.add_argument("--core", default="auto", help="CORE of each final checkpoint: core (the DCLM eval bundle, "
                   "downloaded once), core-lite (offline BIG-bench), a bundle directory, or none "
                   "(default auto: core on GPUs, core-lite on CPU, skipped with a warning when unavailable)")
    p.add_argument("--core-max-per-task", type=int, default=None,
                   help="CORE examples per task (default 500 on GPUs, 20 on CPU)")
    p.add_argument("--tokenizer-actors", type=int, default=None, help="Ray Data tokenizer actors per trial")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on GPUs (default: if the cluster has any now)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between a trial's checkpoints "
                   f"(default: about every {CHECKPOINT_MINUTES} min of estimated training; 0: only at the end)")
    p.add_argument("--out", default=None, help="report directory (default runs/<name>)")
    p.add_argument("--storage", default=None, help="Tune/Train storage: a shared path or s3:// (default runs/sweeps)")
    p.add_argument("--serve", action="store_true", help="after the report, serve every depth (Ray Serve: chat "
                   "page, /d{depth}/chat, OpenAI /v1) until stopped, and print the URLs")
    p.add_argument("--serve-host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--serve-port", type=int, default=8000)


def _numbers(flag: str, text: str | None, kind) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag}: comma-separated numbers, got {text!r}")
    return values


def sweep_from_args(args, job: str, cpu_budgets: list[float]) -> SweepConfig:
    """Check the flags, start (or join) Ray, and make the SweepConfig. Raises naming a bad flag, before
    anything runs."""
    import ray

    depths = _numbers("--depths", args.depths, int)
    budgets = _numbers("--budgets", args.budgets, float)
    if args.preset is not None:
        get_preset(args.preset)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints shown once, not twice
    # A trial waits for its GPUs (an autoscaler adding a node, a CORE evaluation holding a share)
    # rather than failing after Train's default 60 s. Reaches a local cluster started below; a
    # cluster's nodes set it themselves (cluster.yaml).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800")
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # `ray job submit` sets it: join that cluster
            ray.init()
        else:  # a laptop: logical CPUs are bookkeeping, so trial driver, worker and data actors coexist
            ray.init(num_cpus=max(4, os.cpu_count() or 1), resources={"trial_driver": 100})
    gpu = args.gpu if args.gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    depths = depths or ([6, 8, 10, 12] if gpu else [1, 2, 3])
    budgets = budgets or ([] if gpu else cpu_budgets)
    if args.grid == "isoflop" and not budgets:
        raise ValueError("--budgets: the isoflop grid needs FLOPs budgets, e.g. --budgets 1e17,3e17,1e18")
    actors = args.tokenizer_actors or (4 if gpu else 1)
    core = {"auto": "core" if gpu else "core-lite", "none": None}.get(args.core, args.core)
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every: must be >= 0 (0: only at the end), got {args.checkpoint_every}")
    if args.core_max_per_task is not None and args.core_max_per_task < 1:
        raise ValueError(f"--core-max-per-task: must be >= 1, got {args.core_max_per_task}")
    return SweepConfig(
        name=args.name or job, preset=args.preset or ("gpt2" if gpu else "tiny"), depths=depths, grid=args.grid,
        ratio=args.ratio or (12.0 if gpu else 1.0), budgets=budgets, workers=args.workers, use_gpu=gpu,
        gpus_per_worker=args.gpus_per_worker, core=core,
        core_max_per_task=args.core_max_per_task or (500 if gpu else 20),
        data=DataSpec(kind="corpus", source=args.source, actors=actors, cpus_per_actor=1.0 if gpu else 0.5),
        storage_path=args.storage or os.path.abspath("runs/sweeps"), max_concurrent=args.max_concurrent,
        checkpoint_every=args.checkpoint_every,
        eval_tokens=2**20 if gpu else 2**15)


def prepare_family(sweep: SweepConfig, core_required: bool = True) -> SweepConfig:
    """Corpus shards, tokenizer and CORE tasks made once, here, so the trials and evaluations only read
    them. Returns the sweep with the data directory made absolute (trial drivers and Ray Data actors run
    in other working dirs). A CORE task set that is not `core_required` and cannot be had (no network,
    no BIG-bench data) turns CORE off with a warning instead of failing."""
    from nanoray.core_data.bundle import BundleUnavailable, resolve_tasks
    from nanoray.stream import default_data_dir, prepare_data

    update = {}
    if sweep.core is not None:
        try:
            tasks = resolve_tasks(sweep.core)
            update["core"] = sweep.core if sweep.core in ("core", "core-lite") else str(tasks)
        except (BundleUnavailable, FileNotFoundError) as e:
            if core_required:
                raise
            print(f"warning: no CORE for this sweep: {e}", flush=True)
            update["core"] = None
    data_dir = os.path.abspath(sweep.data.data_dir or default_data_dir(sweep.data.source))
    prepare_data(sweep.data.source, get_preset(sweep.preset).vocab_size, data_dir)
    update["data"] = sweep.data.model_copy(update=dict(data_dir=data_dir))
    return sweep.model_copy(update=update)


def family_fits(sweep: SweepConfig, rows: list[dict]):
    """(fit, notes): val bpb vs FLOPs as a power law for a ratio grid; for an isoFLOP grid, the loss
    minimum of each budget and the compute-optimal allocation (as lines of text)."""
    import math

    from nanoray.scaling import fit_optimal_allocation, fit_power_law, isoflop_minima

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


def family_report(sweep: SweepConfig, grid, out_dir: str, core=None) -> dict:
    """Rows and histories from the ResultGrid (with the CORE scores of `core`, a FamilyCore, once they
    are in), the scaling fits, and the report files; returns their paths."""
    from nanoray.report import write_report

    rows, histories = result_rows(sweep, grid)
    if core is not None:
        core.fill(rows)
    fit, notes = family_fits(sweep, rows)
    paths = write_report(rows, histories, out_dir, title=f"nanoray {sweep.name}", fit=fit)
    if notes:
        with open(os.path.join(out_dir, "report.md"), "a") as f:
            f.write("\n## Compute-optimal allocation (isoFLOP minima)\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    for r in rows:
        core_text = f"  CORE {r['core']:.4f}" if r.get("core") is not None else ""
        print(f"{r['trial']:<12} {r['status']:<8} steps {r['steps_done']:>6}  val bpb {r['val_bpb']:.4f}{core_text}  "
              f"FLOPs {r['flops']:.2e}  {r['wall_s']:.0f} s", flush=True)
    for line in ([f"fit: {fit}"] if fit is not None else []) + notes:
        print(line, flush=True)
    print(f"report: {paths.get('report.md', out_dir)}", flush=True)
    return paths


def job_main(argv: list[str] | None, *, prog: str, doc: str, job: str, grid: str, cpu_budgets: list[float]) -> None:
    """A sweep job from flags to report: check the flags (a bad one stops here, naming it), print every
    trial's plan, prepare the data once, run or resume the sweep, fit and write the report."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, grid=grid)
    args = p.parse_args(argv)
    try:
        sweep = sweep_from_args(args, job, cpu_budgets)
        table = plan_table(sweep, plans(sweep))
        check_resume(sweep)
    except ValueError as e:  # PlanError and pydantic's ValidationError are ValueErrors
        p.error(str(e))
    print(table, flush=True)
    try:
        sweep = prepare_family(sweep, core_required=args.core != "auto")
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a bad source or task set, before any training
        p.error(str(e))
    out_dir = args.out or os.path.join("runs", sweep.name)
    core = None
    if sweep.core is not None:
        from nanoray.family_core import FamilyCore

        core = FamilyCore(sweep, out_dir)
    family_report(sweep, run_sweep(sweep, callbacks=core and [core.callback()]), out_dir, core)
    if args.serve:
        serve_forever(out_dir, args.serve_host, args.serve_port)


def serve_forever(run_dir: str, host: str, port: int) -> None:
    """Serve the family the report lists (serve/ app) until Ctrl-C or `ray job stop`, then take it down."""
    from serve.app import ServeArgs, serve_family

    serve_family(ServeArgs(run_dir=run_dir), host, port)
