"""What the sweep jobs share (jobs/miniseries.py, jobs/scaling_laws.py): the flags and their defaults per
machine, starting or joining Ray, the plan table, the run, the summary and "serve when done".

A bad flag stops the job before anything starts, naming the flag (argparse's exit status 2).
"""

import argparse
import logging
import os

import ray

from nanoray.data import DataSpec
from nanoray.dial import defaults, get_preset
from nanoray.hardware import cluster_gpu_memory_gib
from nanoray.family import FamilyCore, family_results, prepare_family, write_family_report
from nanoray.storage import RunStore, StorageError, check_writable
from nanoray.sweep import CHECKPOINT_MINUTES, ResumeMismatch, SweepConfig, Trial, check_resume, run_sweep, trials
from nanoray.train import ray_train_settings
from nanoray.trackers import TRACKERS, TrackerError, Tracking, parse_trackers
from serve.app import ServeArgs, serve_family

DEFAULT_STORAGE = "runs/sweeps"

# The flag that sets each SweepConfig field a message may name.
FLAGS = {"name": "--name", "preset": "--preset", "depths": "--depths", "grid": "--grid", "ratio": "--ratio",
         "budgets": "--budgets", "workers": "--workers", "gpus_per_worker": "--gpus-per-worker",
         "use_gpu": "--gpu/--no-gpu", "data.source": "--source", "storage_path": "--storage",
         "checkpoint_every": "--checkpoint-every", "core_max_per_task": "--core-max-per-task",
         "max_concurrent": "--max-concurrent", "tracker": "--tracker", "fp8": "--fp8",
         "window_pattern": "--window-pattern", "gpu_memory_gib": "--gpu-memory-gib"}


def add_arguments(p: argparse.ArgumentParser, grid: str) -> None:
    """The flags of a sweep job. Defaults depend on whether the cluster has GPUs (nanoray.dial.defaults)."""
    cpu, gpu = defaults(False), defaults(True)
    p.add_argument("--name", default=None, help="sweep name (default: the job's name); the same name resumes")
    p.add_argument("--preset", default=None, help=f"gpt2 or tiny (default: {gpu.preset} with GPUs, {cpu.preset} "
                   "without)")
    p.add_argument("--depths", default=None, help="comma-separated depths (default: "
                   f"{','.join(map(str, gpu.depths))} on GPUs, {','.join(map(str, cpu.depths))} on CPU)")
    p.add_argument("--grid", default=grid, choices=("ratio", "isoflop"))
    p.add_argument("--ratio", type=float, default=None, help=f"ratio grid: tokens per param (default {gpu.ratio:g} "
                   f"GPU, {cpu.ratio:g} CPU)")
    p.add_argument("--budgets", default=None, help="isoflop grid: comma-separated FLOPs budgets")
    p.add_argument("--source", default="stdlib", help="corpus: stdlib, files:<glob>, parquet:<...>, hf:<org/name>, "
                   "debian-docs")
    p.add_argument("--workers", "--workers-per-trial", dest="workers", type=int, default=1,
                   help="Train workers (GPUs) per trial")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPU share per worker: 1, or 0.5/0.25 so small trials share a GPU")
    p.add_argument("--core", default="auto", help="CORE of each final checkpoint: core (the DCLM eval bundle, "
                   "downloaded once), core-lite (BIG-bench's six CORE tasks: the bigbench sdist from PyPI, downloaded "
                   "once, or $NANORAY_BIGBENCH_DIR), a bundle directory, or none (default auto: core on GPUs, "
                   "core-lite on CPU, skipped with a warning when unavailable)")
    p.add_argument("--core-max-per-task", type=int, default=None, help="CORE examples per task (default "
                   f"{gpu.core_max_per_task} on GPUs, {cpu.core_max_per_task} on CPU)")
    p.add_argument("--tokenizer-actors", type=int, default=None, help="Ray Data tokenizer actors per trial")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on GPUs (default: if the cluster has any now)")
    p.add_argument("--fp8", action="store_true", help="train the block matrices in fp8 (tensorwise dynamic scaling, "
                   "torchao: pip install 'nanoray[fp8]'); GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell). "
                   "Evaluation, CORE and serving stay bf16")
    p.add_argument("--window-pattern", default=None, help="attention windows per layer, tiled, e.g. SSSL (S: a "
                   "quarter of the context, L: all of it; the last layer is always L). Default: the preset's (L)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="memory of the GPUs that train, which sizes "
                   "the device batch (default: this machine's GPU, else the cluster's GPU type, else 80)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between a trial's checkpoints "
                   f"(default: about every {CHECKPOINT_MINUTES} min of estimated training; 0: only at the end)")
    p.add_argument("--out", default=None, help="report directory, local or s3://... (default: runs/<name>, or "
                   "<storage>/reports/<name> when the storage is an object store)")
    p.add_argument("--storage", default=os.environ.get("NANORAY_STORAGE"), help="storage root for Tune, Train "
                   "and prepared data: s3://bucket/prefix, or a path (default: $NANORAY_STORAGE, else runs/sweeps)")
    p.add_argument("--shared-storage", action="store_true", help="the --storage path is on a mount every node of "
                   "the cluster shares (NFS...): use it although the cluster has several nodes")
    p.add_argument("--tracker", default=None, help=f"experiment trackers, comma-separated: {', '.join(TRACKERS)}. A "
                   "run per trial (its plan as config, every report's metrics) and the report's files at the end; "
                   "settings from the trackers' own variables (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE...), "
                   "by default everything under --storage (README: Trackers)")
    p.add_argument("--serve", action="store_true", help="after the report, serve every depth (Ray Serve: chat "
                   "page, /d{depth}/chat, OpenAI /v1) until stopped, and print the URLs")
    p.add_argument("--serve-host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--serve-port", type=int, default=8000)


def numbers(flag: str, text: str | None, kind) -> list | None:
    """A comma-separated list of numbers, or None when the flag was not given."""
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"{flag}: comma-separated numbers, got {text!r}")
    return values


def init_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS), or start a local one. The workers' output stays in
    their nodes' logs (the driver prints each trial's progress itself, nanoray.sweep.ProgressLines): a
    successful run shows its plan, its progress and its summary, and Ray's own chatter stays out."""
    ray_train_settings()  # reaches a local cluster started below
    if ray.is_initialized():
        return
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):  # INFO lines of the driver's own Ray libraries
        logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:  # a laptop: logical CPUs are bookkeeping, so trial driver, worker and data actors coexist
        ray.init(num_cpus=max(4, os.cpu_count() or 1), resources={"trial_driver": 100}, log_to_driver=False)


def sweep_from_args(args, job: str) -> SweepConfig:
    """Check the flags, start (or join) Ray, and make the SweepConfig with the machine's defaults. Raises
    naming a bad flag, before anything runs."""
    depths = numbers("--depths", args.depths, int)
    budgets = numbers("--budgets", args.budgets, float)
    if args.preset is not None:
        get_preset(args.preset)
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every: must be >= 0 (0: only at the end), got {args.checkpoint_every}")
    if args.core_max_per_task is not None and args.core_max_per_task < 1:
        raise ValueError(f"--core-max-per-task: must be >= 1, got {args.core_max_per_task}")
    if args.window_pattern is not None and (not args.window_pattern or set(args.window_pattern) - {"S", "L"}):
        raise ValueError(f"--window-pattern: letters S and L only (e.g. SSSL, L), got {args.window_pattern!r}")
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib: must be > 0, got {args.gpu_memory_gib}")
    trackers = check_trackers(args.tracker, args.storage or DEFAULT_STORAGE, args.name or job)
    init_ray()
    gpu = args.gpu if args.gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    if args.fp8 and not gpu:
        raise ValueError("--fp8: fp8 training needs GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                         "Blackwell), and this run trains on CPUs (the cluster has no GPU now, or --no-gpu)")
    memory = args.gpu_memory_gib or (cluster_gpu_memory_gib(ray.cluster_resources())[0] if gpu else None)
    machine = defaults(gpu)
    budgets = budgets or machine.cpu_budgets
    if args.grid == "isoflop" and not budgets:
        raise ValueError("--budgets: the isoflop grid needs FLOPs budgets, e.g. --budgets 1e17,3e17,1e18")
    return SweepConfig(
        name=args.name or job, preset=args.preset or machine.preset, depths=depths or machine.depths,
        grid=args.grid, ratio=args.ratio or machine.ratio, budgets=budgets, workers=args.workers, use_gpu=gpu,
        gpus_per_worker=args.gpus_per_worker, core={"auto": machine.core, "none": None}.get(args.core, args.core),
        core_max_per_task=args.core_max_per_task or machine.core_max_per_task,
        data=DataSpec(kind="corpus", source=args.source, actors=args.tokenizer_actors or machine.tokenizer_actors,
                      cpus_per_actor=machine.cpus_per_actor),
        storage_path=args.storage or DEFAULT_STORAGE, max_concurrent=args.max_concurrent,
        checkpoint_every=args.checkpoint_every, eval_tokens=machine.eval_tokens, tracker=trackers, fp8=args.fp8,
        window_pattern=args.window_pattern, gpu_memory_gib=memory)


def check_trackers(text: str | None, storage: str, name: str) -> list[str]:
    """--tracker's names, each known, installed and with somewhere to write (before Ray starts)."""
    try:
        trackers = parse_trackers(text)
    except ValueError as e:
        raise ValueError(f"--tracker: {e}") from None
    try:
        Tracking.make(trackers, name, RunStore(storage))
    except TrackerError as e:
        raise ValueError(f"--tracker {e}") from None
    return trackers


def check_storage(storage: str, shared: bool) -> None:
    """--storage must be reachable and writable, and on a cluster whose work runs on other machines, a place
    every node reads: an object store, or a path the user says is shared (--shared-storage, file://)."""
    try:
        check_writable(storage)
    except StorageError as e:
        raise ValueError(f"--storage {e}") from None
    store = RunStore(storage)
    if store.shared or shared:
        return
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) > 1 or not ray.cluster_resources().get("CPU"):
        where = f"{len(nodes)} nodes" if len(nodes) > 1 else "a head without CPUs (its work runs on nodes an " \
                                                                "autoscaler adds)"
        raise ValueError(f"--storage: {storage} is a path on this machine, but the cluster has {where}: trials on "
                         "other nodes could not read it. Give an object store (s3://bucket/prefix), or a path on a "
                         "mount every node shares with --shared-storage (or as file:///...)")


def out_dir(args, sweep: SweepConfig) -> str:
    """Where the report goes: --out, else beside the runs in an object store, else runs/<name>."""
    if args.out:
        return args.out
    return sweep.store.join("reports", sweep.name) if not sweep.store.is_local else os.path.join("runs", sweep.name)


def plan_table(grid: list[Trial]) -> str:
    """One line per trial, with what the family costs in total."""
    lines = [f"{'trial':<12}{'params':>10}{'tokens':>10}{'FLOPs':>11}{'steps':>8}{'batch':>9}{'rows':>6}"
             f"{'mem GiB':>9}{'GPU-h':>8}{'cost $':>9}"]
    for t in grid:
        p = t.plan
        lines.append(f"{t.name:<12}{p.scaling_params / 1e6:>9.2f}M{p.tokens / 1e6:>9.1f}M{p.total_flops:>11.2e}"
                     f"{p.iterations:>8}{p.total_batch_tokens:>9}{p.device_batch_size:>6}{p.memory_gib:>9.1f}"
                     f"{p.gpu_hours:>8.2f}{p.cost_usd:>9.2f}")
    total_flops = sum(t.plan.total_flops for t in grid)
    lines.append(f"{'total':<12}{'':>20}{total_flops:>11.2e}{'':>32}{sum(t.plan.gpu_hours for t in grid):>8.2f}"
                 f"{sum(t.plan.cost_usd for t in grid):>9.2f}")
    first = grid[0].plan
    sized = f"{first.gpu_memory_gib:g} GiB GPUs" if first.gpu_memory_gib else "no memory limit"
    lines.append(f"matmuls {'fp8 (block matrices) + bf16' if first.fp8 else 'bf16'}, windows "
                 f"{first.model.window_pattern}, rows per micro-step sized for {sized} (mem: estimated peak)")
    return "\n".join(lines)


def flag_message(e: ResumeMismatch) -> str:
    """A resume mismatch in the words of the command line: the flag instead of the config field."""
    return f"{FLAGS.get(e.field, e.field)}: {e.detail.replace('another sweep name', 'a new --name')}"


def job_main(argv: list[str] | None, *, prog: str, doc: str, job: str, grid: str) -> None:
    """A sweep job from flags to report: check the flags (a bad one stops here, naming it), print every
    trial's plan, prepare the data once, run or resume the sweep, fit and write the report (and serve)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, grid=grid)
    args = p.parse_args(argv)
    try:
        sweep = sweep_from_args(args, job)
        table = plan_table(trials(sweep))
        check_storage(sweep.storage_path, args.shared_storage)  # the first thing written: after every other check
        check_resume(sweep)
    except ResumeMismatch as e:
        p.error(flag_message(e))
    except ValueError as e:  # PlanError and pydantic's ValidationError are ValueErrors
        p.error(str(e))
    print(table, flush=True)
    core_wanted = sweep.core
    try:
        sweep = prepare_family(sweep, core_required=args.core != "auto")
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # a bad source or task set, before any training
        p.error(str(e))
    no_core = core_wanted is not None and sweep.core is None  # auto's tasks could not be had: prepare_family said why
    report = out_dir(args, sweep)
    core = FamilyCore(sweep, report) if sweep.core is not None else None
    results = family_results(sweep, run_sweep(sweep, callbacks=core and [core.callback()]), core)
    paths = write_family_report(sweep, results, report)
    print("\n".join(results.summary()), flush=True)
    if no_core:
        print(f"warning: this report has no CORE: the {core_wanted} tasks could not be had (the warning after the "
              "plan says why and what to set; --core none skips CORE without a warning)", flush=True)
    print(f"report: {paths.get('report.md', report)}", flush=True)
    if args.serve:
        serve_family(ServeArgs(run_dir=report), args.serve_host, args.serve_port)
