"""The trainer: one loop that runs inside Ray Train (DDP over its workers) or in a plain process.

`train(config, session, corpus)` builds the model and optimizers from the RunPlan, resumes from the session's
latest checkpoint (model, optimizer, step, data position, RNG), then runs grad-accumulated steps with
torch.compile on GPU, a periodic val loss, and a report every `log_every` steps with step, tokens, FLOPs
so far, train loss, tok/s and MFU. The data is a `TrainData` (nanoray.data): synthetic tokens, or a corpus
streamed by Ray Data (nanoray.stream); the session (nanoray.session) says who the worker is. `fit()` runs
the loop on Ray Train workers.

    python -m nanoray.train                                   # CPU: tiny d2 on a local Ray (~1 min)
    python -m nanoray.train --depth 4 --workers 2             # CPU: two workers, gloo DDP
    python -m nanoray.train --depth 12 --workers 8            # GPUs: gpt2 d12, one GPU per worker
"""

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from nanoray.checkpoint import LoopState, restore, save_checkpoint
from nanoray.data import SYNTHETIC_KINDS, DataSpec, SyntheticData, TrainData
from nanoray.dial import Horizon, PlanError, RunPlan, defaults, plan
from nanoray.fp8 import bf16_linears, check_fp8, enable_fp8
from nanoray.hardware import device_name, gpu_memory_gib, peak_flops, prefer_cudnn_attention
from nanoray.model import build_model
from nanoray.optim import apply_schedule, build_optimizers, lr_multiplier
from nanoray.session import RaySession, Session
from nanoray.storage import RunStore
from nanoray.stream import Corpus, CorpusData, check_fingerprint, latest_position, prepare_corpus
from nanoray.trackers import Trackers, TrackerError, Tracking, parse_trackers

GC_EVERY = 5000  # steps between the loop's garbage collections (nanochat's)


class TrainConfig(BaseModel):
    """What a training run needs besides the plan."""

    model_config = ConfigDict(frozen=True)
    plan: RunPlan
    data: DataSpec = DataSpec()
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: plan.iterations)")
    log_every: int = Field(10, ge=1, description="report metrics every N steps")
    eval_every: int = Field(250, ge=0, description="val loss (and bpb) every N steps, and at the end (0: only at the end)")
    eval_tokens: int = Field(2**20, ge=1, description="val tokens per evaluation, whatever the batch shape")
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    checkpoint_at_end: bool = Field(True, description="checkpoint after the last step")
    eval_at_end: bool = Field(True, description="val loss after the last step")
    compile: bool | None = Field(None, description="torch.compile the model (default: on GPU)")
    seed: int = Field(42, description="model init and RNG seed")
    tracker: Trackers = Field(default_factory=list, description="experiment trackers (mlflow, tensorboard, wandb) "
                              "of a run fit() trains alone; a sweep's trials are tracked by Tune (SweepConfig.tracker)")


# ---------------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, session: Session, corpus: Corpus | None = None) -> dict:
    """Run (or resume) training; returns the last reported metrics. `corpus` (from prepare_corpus) is needed
    when config.data.kind is "corpus"."""
    entered = time.perf_counter()
    plan, device = config.plan, session.device
    if session.world_size != plan.num_workers:
        raise ValueError(f"plan.num_workers is {plan.num_workers} but the session has {session.world_size} workers")
    if plan.fp8:
        check_fp8(device)  # before anything is built: names --fp8 and why it cannot run here
    use_compile = setup_device(device) if config.compile is None else config.compile
    if device.type == "cpu" and (threads := session.cpu_threads()):
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = build_model(plan.model, device=device, seed=config.seed)
    if plan.fp8:
        enable_fp8(model)  # before the optimizers and torch.compile; the Parameters stay the same
    optimizers = build_optimizers(model, plan, compile=use_compile)
    state = resume(config, session, model, optimizers, corpus)
    end_step = min(config.max_steps or plan.iterations, plan.iterations)
    if state.step >= end_step and state.metrics:  # resumed after the last step (a restored sweep): report again
        session.report(state.metrics, None)
        return state.metrics

    data = open_data(config, session, corpus, state.position)
    wrapped = session.wrap(model)
    forward = torch.compile(wrapped, dynamic=False) if use_compile else wrapped
    window = Window(plan, device, session.world_size, state, entered)
    metrics: dict = {}
    with ManualGC() as collector:
        while state.step < end_step:
            window.add(train_step(forward, wrapped, model, optimizers, data, plan, state.step))
            state.step += 1
            collector.after_step(state.step)
            last = state.step == end_step
            evaluating = (last and config.eval_at_end) or (config.eval_every and state.step % config.eval_every == 0)
            saving = (last and config.checkpoint_at_end) or (
                config.checkpoint_every and state.step % config.checkpoint_every == 0)
            if not (last or saving or evaluating or state.step % config.log_every == 0):
                continue
            if evaluating:
                with bf16_linears(model):  # evaluation in bf16, also for an fp8 run
                    (state.val_loss, state.val_bpb), state.val_step = window.exclude(data.validate, model), state.step
            metrics = window.close(state) | session.placement()
            state.position = data.position() if saving else None  # every rank takes part in gathering it
            checkpoint = None
            if saving and session.rank == 0:
                state.metrics = metrics
                checkpoint = save(config, model, optimizers, state, data)
            if session.rank == 0:
                print(progress_line(metrics), flush=True)
            session.report(metrics, checkpoint and str(checkpoint))
            if checkpoint:
                shutil.rmtree(checkpoint.parent, ignore_errors=True)
            window.reopen(after_report=not saving)  # a report's own cost counts, a checkpoint's does not
    return metrics


def setup_device(device: torch.device) -> bool:
    """Device settings made before the first CUDA allocation and before torch.compile traces; returns whether
    to compile (on GPUs)."""
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # read at the first CUDA allocation
    if device.type != "cuda":
        return False
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    prefer_cudnn_attention()
    return True


def resume(config: TrainConfig, session: Session, model, optimizers, corpus: Corpus | None) -> LoopState:
    """The session's latest checkpoint restored into model and optimizers (RNG too), after checking it belongs
    to this run; a fresh LoopState when there is none."""
    with session.latest_checkpoint() as path:
        if path is None:
            return LoopState()
        state = restore(path, model, optimizers)
        check_resumable(state, config, corpus, path)
    if session.rank == 0:
        print(f"resumed from step {state.step} of {config.plan.iterations} ({path})", flush=True)
    return state


def check_resumable(state: LoopState, config: TrainConfig, corpus: Corpus | None, path) -> None:
    """Refuse a checkpoint of another run. A synthetic position counts micro-batches of this shape, so the shape
    must not change; a corpus position names rows, so any worker count and device batch can go on from it, but
    only over the same train shards."""
    plan, spec = config.plan, config.data
    rows = spec.kind == "corpus"
    keys = ("depth", "total_batch_tokens", "iterations") + (() if rows else ("num_workers", "device_batch_size"))
    for key in keys:
        if state.plan[key] != getattr(plan, key):
            raise ValueError(f"{path}: checkpoint has plan.{key} = {state.plan[key]}, this run has "
                             f"{getattr(plan, key)}; resume with the plan it was saved with")
    for key in ("kind", "seed", "source"):
        if state.data.get(key) != getattr(spec, key):
            raise ValueError(f"{path}: checkpoint read data.{key} = {state.data.get(key)!r}, this run reads "
                             f"{getattr(spec, key)!r}")
    if rows and corpus is not None:
        check_fingerprint(state.data.get("shards"), corpus.shards, spec.source)


def open_data(config: TrainConfig, session: Session, corpus: Corpus | None, position) -> TrainData:
    """This worker's TrainData, continuing from `position` (None: the start)."""
    plan = config.plan
    if config.data.kind == "corpus":
        if corpus is None:
            raise ValueError("data.kind 'corpus' needs a corpus: train(config, session, prepare_corpus(...))")
        return CorpusData(corpus, session.rows, plan.device_batch_size, session.device, position)
    eval_batches = max(1, config.eval_tokens // (plan.device_batch_size * plan.model.seq_len * session.world_size))
    return SyntheticData(config.data, plan.model.vocab_size, plan.model.seq_len, plan.device_batch_size,
                         session.rank, session.world_size, session.device, position, eval_batches)


def train_step(forward, wrapped, model, optimizers, data: TrainData, plan: RunPlan, step: int) -> torch.Tensor:
    """One optimizer step over plan.grad_accum micro-batches (DDP syncs gradients on the last one only);
    returns the summed micro-batch losses (on the device: no sync)."""
    is_ddp, loss_sum = wrapped is not model, 0
    for micro in range(plan.grad_accum):
        x, y = next(data.batches)
        sync = micro == plan.grad_accum - 1 or not is_ddp
        with contextlib.nullcontext() if sync else wrapped.no_sync():
            loss = forward(x, y)
            (loss / plan.grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    apply_schedule(optimizers, step, plan)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum


def save(config: TrainConfig, model, optimizers, state: LoopState, data: TrainData) -> Path:
    """A checkpoint of this run in a fresh temp directory (Train copies it into storage); returns its path."""
    meta = dict(plan=config.plan.model_dump(), config=config.model_dump(),
                data=dict(config.data.model_dump(), shards=data.shards))
    return save_checkpoint(Path(tempfile.mkdtemp(prefix="nanoray-ckpt-")) / "ckpt", model, optimizers, meta,
                           state=state, tokenizer=data.tokenizer)


class Window:
    """The steps between two reports: their loss, their time (evaluation and checkpoints excluded), and what
    the run's metrics say at the window's end. The first window includes torch.compile."""

    def __init__(self, plan: RunPlan, device: torch.device, world_size: int, state: LoopState, entered: float):
        """`state`: where the loop starts (step > 0 after a restart); `entered`: when this worker entered train()."""
        self.plan, self.device, self.start_step = plan, device, state.step
        # the run's wall time: what earlier worker groups spent, plus this one's since it entered train()
        self.entered, self.wall_before = entered, state.wall_time_s
        setup_s = time.perf_counter() - entered
        self.peak = peak_flops(device_name(device)) * world_size
        self.loss_sum, self.steps, self.excluded = torch.zeros((), device=device), 0, 0.0
        self.overhead = dict(setup_s=setup_s, first_window_s=None, eval_time_s=0.0)
        self.start = time.perf_counter()
        self.train_time = None

    def add(self, loss_sum: torch.Tensor) -> None:
        self.loss_sum += loss_sum
        self.steps += 1

    def exclude(self, fn, *args):
        """fn(*args), its time kept out of the window (an evaluation)."""
        t0 = time.perf_counter()
        out = fn(*args)
        spent = time.perf_counter() - t0
        self.excluded += spent
        self.overhead["eval_time_s"] += spent
        return out

    def close(self, state: LoopState) -> dict:
        """The metrics of a report at this window's end; adds the window's time to the run's."""
        plan = self.plan
        state.train_loss = self.loss_sum.item() / (self.steps * plan.grad_accum)  # syncs with the device
        self.end = time.perf_counter()
        dt = self.end - self.start - self.excluded
        state.train_time_s += dt
        state.wall_time_s = self.wall_before + (self.end - self.entered)
        if self.overhead["first_window_s"] is None:
            self.overhead["first_window_s"] = dt
        tok_per_s = self.steps * plan.total_batch_tokens / dt
        return dict(
            step=state.step, iterations=plan.iterations, depth=plan.depth, tokens=state.step * plan.total_batch_tokens,
            flops=float(state.step * plan.total_batch_tokens * plan.flops_per_token), train_loss=state.train_loss,
            val_loss=state.val_loss, val_bpb=state.val_bpb, val_step=state.val_step, start_step=self.start_step,
            tok_per_s=tok_per_s, mfu=tok_per_s * plan.flops_per_token / self.peak,
            lr_mult=lr_multiplier(state.step - 1, plan), step_s=dt / self.steps,
            train_time_s=state.train_time_s, wall_time_s=state.wall_time_s, window_steps=self.steps,
            peak_mem_gb=torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0,
            **self.overhead)

    def reopen(self, after_report: bool) -> None:
        """Start the next window: at the end of this one (the report's cost counts), or now."""
        self.loss_sum.zero_()
        self.steps, self.excluded = 0, 0.0
        self.start = self.end if after_report else time.perf_counter()


class ManualGC:
    """nanochat's rule: GC pauses cost ~500 ms, so after the first step everything alive is frozen out of the
    collector and it runs by hand every GC_EVERY steps (what a step leaves in cycles: iterator futures,
    tracebacks). The collector is back to normal when the loop ends."""

    def __enter__(self) -> "ManualGC":
        return self

    def after_step(self, step: int) -> None:
        if gc.isenabled():
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % GC_EVERY == 0:
            gc.collect()

    def __exit__(self, *exc) -> None:
        gc.unfreeze()
        gc.enable()


def progress_line(m: dict) -> str:
    eta = (m["iterations"] - m["step"]) * m["step_s"]
    return (f"d{m['depth']} step {m['step']}/{m['iterations']} ({m['step'] / m['iterations']:.0%}) | "
            f"loss {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
            + (f" ({m['val_bpb']:.4f} bpb)" if not math.isnan(m.get("val_bpb", math.nan)) else "")
            + f" | {m['tok_per_s']:,.0f} tok/s | "
            f"MFU {m['mfu']:.1%} | {m['step_s']:.3f} s/step | ETA {eta / 60:.1f} min")


# ---------------------------------------------------------------------------------------------------
# On Ray Train


def ray_train_settings() -> None:
    """Ray Train's settings for a local cluster this process starts: its workers inherit the environment (a
    cluster's nodes set their own: cluster.yaml). Call before Ray starts; a variable already set wins.
    - Worker prints shown once, not twice.
    - A trial waits for its GPUs (an autoscaler adding a node, a CORE evaluation holding a share) rather than
      failing after Train's default 60 s.
    - The controller takes each report within 0.5 s, not Train's 2 s: a worker's report waits until the
      controller has taken the one before (Train's result queue holds one), so reports closer together than the
      controller's poll stall training. A tiny CPU run reporting every 0.4 s of steps stepped at 2 s."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "1800")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def cpu_worker_env() -> dict:
    """A CPU worker's runtime env: its OpenMP threads sleep when idle instead of spinning (OpenMP reads this when
    torch loads, so it must be in the worker process's environment; the caller's own setting wins). Spinning threads
    starve the rest of the node (the data stream, Ray's reports) on few cores: a tiny d1 on 2 cores stepped at
    1.0-1.3 s spinning, 0.55 s passive; d3 at 1.07 s either way."""
    return {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}}


def train_loop_per_worker(config: TrainConfig, corpus: Corpus | None) -> None:
    """Ray Train entry point (bound with functools.partial by fit())."""
    from ray.train.v2._internal.execution import context  # Ray only in Train workers (see RaySession)

    # Train logs each report's whole metrics dict at INFO, under its file's path; the progress line says it.
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # NVLink multicast (NVLS) off unless the environment says otherwise: on shared multi-GPU hosts a program
    # using it can take the GPUs out of service. NCCL reads these at its first collective, after this point.
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    train(config, RaySession(), corpus)


def fit(config: TrainConfig, name: str, store: RunStore | str, use_gpu: bool = False, gpus_per_worker: float = 1,
        cpus_per_worker: float = 1, max_failures: int = 0, callbacks: list | None = None):
    """Run `config` on `config.plan.num_workers` Ray Train workers as run `name` of `store` (a RunStore or
    its root); returns the ray.train.Result. Re-running the same name resumes from its latest checkpoint."""
    import ray.train  # the driver's side of Ray Train
    from ray.train.torch import TorchTrainer

    store = store if isinstance(store, RunStore) else RunStore(store)
    if config.tracker:  # checked (TrackerError) before anything starts
        end_step = min(config.max_steps or config.plan.iterations, config.plan.iterations)
        tracking = Tracking.make(config.tracker, name, store)
        callbacks = [*(callbacks or []), tracking.train_callback(config.model_dump(mode="json"), end_step)]
    resources = dict(CPU=cpus_per_worker, GPU=gpus_per_worker) if use_gpu else dict(CPU=cpus_per_worker)
    corpus, datasets, dataset_config = None, None, None
    if config.data.kind == "corpus":
        data_dir = config.data.data_dir or store.data_dir(config.data.source)
        corpus = prepare_corpus(config.plan, config.data, config.eval_tokens, data_dir)
        latest_position(store, name, corpus)  # other shards than the checkpoint's: fail here, before Train
        datasets = corpus.datasets(store, name)
        # Rows in the order the stream makes them: a run and its resumption read the same sequence.
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True
        dataset_config = ray.train.DataConfig(datasets_to_split=["train", "val"], execution_options=ingest)
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, config, corpus),
        datasets=datasets,
        dataset_config=dataset_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.plan.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=store.train_root, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       worker_runtime_env=None if use_gpu else cpu_worker_env()),
    )
    return trainer.fit()


def metrics_log(path: str):
    """A Ray Train callback that appends rank 0's metrics of every report to the JSONL file `path`.

    It runs in the Train controller, which sits on the node that called fit(), so `path` is local there.
    """
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    return MetricsLog()


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    machine = defaults(gpu)
    p = argparse.ArgumentParser(prog="python -m nanoray.train", description="Train one depth with Ray Train.")
    p.add_argument("--depth", type=int, default=machine.depth)
    p.add_argument("--preset", default=machine.preset)
    p.add_argument("--ratio", type=float, default=machine.ratio, help="tokens : scaling params")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (default: the plan's horizon)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    p.add_argument("--data", default="stdlib", help="a corpus source (stdlib, files:<glob>, parquet:<dir|glob|"
                   "s3://...>, hf:<org/name>, debian-docs) or synthetic tokens (random, markov)")
    p.add_argument("--data-dir", default=None, help="where the corpus's shards and tokenizer go (default "
                   "<storage>/data/<source>)")
    p.add_argument("--tokenizer-actors", type=int, default=machine.tokenizer_actors,
                   help="Ray Data actors tokenizing the corpus")
    p.add_argument("--name", default=None, help="run name (default d<depth>-<preset>); the same name resumes")
    p.add_argument("--storage", default="runs", help="storage root: Train runs go to <storage>/train/<name>")
    p.add_argument("--tracker", default=None, help="experiment trackers, comma-separated: mlflow, tensorboard, wandb "
                   "(README: Trackers)")
    p.add_argument("--fp8", action="store_true", help="block matrices in fp8 (torchao; GPUs of compute capability 8.9+)")
    p.add_argument("--window-pattern", default=None, help="attention windows per layer, e.g. SSSL (default: the "
                   "preset's)")
    args = p.parse_args(argv)
    if args.fp8 and not gpu:
        p.error("--fp8: fp8 training needs an NVIDIA GPU with fp8 tensor cores (compute capability 8.9+); this "
                "machine has none")
    name = args.name or f"d{args.depth}-{args.preset}"
    try:
        tracker = parse_trackers(args.tracker)
        Tracking.make(tracker, name, RunStore(args.storage))
    except TrackerError as e:
        p.error(f"--tracker {e}")
    except ValueError as e:
        p.error(f"--tracker: {e}")
    try:
        run = plan(args.depth, args.preset, Horizon(ratio=args.ratio), num_workers=args.workers, fp8=args.fp8,
                   window_pattern=args.window_pattern, gpu_memory_gib=gpu_memory_gib() if gpu else None)
    except PlanError as e:
        p.error(str(e).replace("window_pattern:", "--window-pattern:"))
    print(run.table(), flush=True)
    ray_train_settings()
    data = (DataSpec(kind=args.data) if args.data in SYNTHETIC_KINDS else
            DataSpec(kind="corpus", source=args.data, data_dir=args.data_dir, actors=args.tokenizer_actors,
                     cpus_per_actor=machine.cpus_per_actor))
    config = TrainConfig(plan=run, data=data, max_steps=args.steps, log_every=machine.log_every,
                         eval_tokens=machine.eval_tokens, tracker=tracker)
    result = fit(config, name, args.storage, use_gpu=gpu)
    print(json.dumps(dict(result.metrics or {}, checkpoint=result.checkpoint and result.checkpoint.path)))


if __name__ == "__main__":
    main()
