"""The trainer: one loop that runs inside Ray Train (DDP over its workers) or in a plain process.

`train(config, session)` builds the model and optimizers from the RunPlan, resumes from the session's
latest checkpoint (model, optimizer, step, data position, RNG), then runs grad-accumulated steps with
torch.compile on GPU, a periodic val loss, and a report every `log_every` steps with step, tokens,
FLOPs so far, train loss, tok/s and MFU. Checkpoints go through `nanoray.checkpoint`.

`train_loop_per_worker` is the Ray Train entry; `fit()` wraps it in a TorchTrainer.

    python -m nanoray.train                                   # CPU: tiny d2 on a local Ray (~2 min)
    python -m nanoray.train --depth 4 --workers 2             # CPU: two workers, gloo DDP
    python -m nanoray.train --depth 12 --workers 8            # GPUs: gpt2 d12, one GPU per worker
"""

import argparse
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from nanoray.checkpoint import load_checkpoint, read_meta, save_checkpoint
from nanoray.data import SYNTHETIC_KINDS, DataSpec, SyntheticTokens, WorkerBatches
from nanoray.dial import Horizon, RunPlan, plan
from nanoray.hardware import device_name, peak_flops, prefer_cudnn_attention
from nanoray.model import ModelConfig, build_model
from nanoray.optim import apply_schedule, build_optimizers
from nanoray.stream import (StreamBatches, StreamPosition, StreamSpec, build_dataset, check_fingerprint, epochs_for,
                            local_rows, prepare_data, rebatch, shard_fingerprint, to_device)
from nanoray.tokenizer import Tokenizer


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


class Corpus:
    """A corpus ready to stream (made on the driver by `prepare_corpus`): train and val streams, the
    tokenizer, and how many val rows every evaluation reads."""

    def __init__(self, train: StreamSpec, val: StreamSpec, tokenizer: Tokenizer, val_rows: int):
        self.train, self.val, self.tokenizer, self.val_rows = train, val, tokenizer, val_rows
        self.shards = shard_fingerprint(train)  # saved with each checkpoint's position

    def datasets(self, storage_path: str, name: str) -> dict:
        """Ray Datasets for TorchTrainer, as callables: Train calls them at every (re)start of the worker
        group, so the train stream always begins where the run's latest checkpoint left it."""
        train, val, tokenizer, rows = self.train, self.val, self.tokenizer, self.val_rows
        # The trainer's progress line reports the stream; Ray Data's own bars would only clutter the log.
        return {"train": lambda: build_dataset(train, tokenizer, latest_position(storage_path, name),
                                               progress_bars=False),
                "val": lambda: build_dataset(val, tokenizer, limit_rows=rows, progress_bars=False)}


def prepare_corpus(config: "TrainConfig") -> Corpus:
    """Shards and tokenizer for `config.data` (made once, then reused), and the streams over them."""
    plan, data = config.plan, config.data
    spec, tokenizer_dir = prepare_data(data.source, plan.model.vocab_size, data.data_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != plan.model.vocab_size:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {tokenizer.vocab_size} tokens, plan.model.vocab_size is "
                         f"{plan.model.vocab_size}")
    train = StreamSpec(source=spec, split="train", seq_len=plan.model.seq_len, seed=data.seed,
                       epochs=data.epochs or epochs_for(spec, plan.tokens), split_long_docs=plan.split_long_docs,
                       actors=data.actors, cpus_per_actor=data.cpus_per_actor)
    val = train.model_copy(update=dict(split="val", epochs=1))
    per_step = plan.device_batch_size * plan.num_workers
    return Corpus(train, val, tokenizer, val_rows=max(1, config.eval_tokens // (per_step * plan.model.seq_len)) * per_step)


def latest_checkpoint(storage_path: str, name: str):
    """The latest ray.train.Checkpoint of Ray Train run `name`, or None (no run there yet, or no checkpoint)."""
    import ray.train

    try:
        return ray.train.Result.from_path(os.path.join(storage_path, name)).checkpoint
    except (RuntimeError, FileNotFoundError):  # no run there yet
        return None


def latest_position(storage_path: str, name: str, corpus: Corpus | None = None) -> StreamPosition:
    """The data position in the latest checkpoint of Ray Train run `name` (empty for a new run). With the
    `corpus`, first checks that its train shards are the ones the position was saved over."""
    checkpoint = latest_checkpoint(storage_path, name)
    if checkpoint is None:
        return StreamPosition()
    with checkpoint.as_directory() as path:
        data = read_meta(path)["data"]
    if corpus is not None:
        check_fingerprint(data.get("shards"), corpus.shards, corpus.train.source)
    return StreamPosition.from_json(data["position"])


class Session:
    """Where the loop runs. Subclasses say who this worker is and where reports and checkpoints go."""

    rank: int = 0
    world_size: int = 1
    device: torch.device
    tokenizer: Tokenizer | None = None  # with a corpus

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def batches(self, split: str, batch_size: int, position: StreamPosition | None = None):
        """This worker's rows of a corpus split, as numpy batches {tokens, slot, unit, row, ...}; the last
        batch of val may be short (a small val split still evaluates)."""
        raise ValueError("data.kind 'corpus' needs a session with a corpus (fit(), or LocalSession(corpus=...))")

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None


class RaySession(Session):
    """Inside a Ray Train worker: DDP through ray.train.torch, reports and checkpoints through ray.train."""

    def __init__(self, tokenizer: Tokenizer | None = None, shards: dict | None = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.tokenizer, self.shards = tokenizer, shards

    def batches(self, split, batch_size, position=None):
        import ray.train  # the dataset was built from the checkpoint's position already (Corpus.datasets)

        return ray.train.get_dataset_shard(split).iter_batches(batch_size=batch_size, batch_format="numpy",
                                                              drop_last=split == "train", prefetch_batches=4)

    def wrap(self, model):
        import ray.train.torch

        ddp_options = dict(gradient_as_bucket_view=True, broadcast_buffers=False)  # the only buffers: rotary tables
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_options)

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{metrics['step']:06d}"
                         if checkpoint else None)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as path:
                yield path


class LocalSession(Session):
    """A single plain process: metrics kept in `history`, checkpoints copied under `out_dir`."""

    def __init__(self, device: str | torch.device, out_dir: str | None = None, resume_from: str | None = None,
                 corpus: Corpus | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.out_dir, self.resume_from, self.corpus = device, out_dir, resume_from, corpus
        self.tokenizer, self.shards = corpus and corpus.tokenizer, corpus and corpus.shards
        self.history: list[dict] = []
        self.checkpoints: list[str] = []

    def batches(self, split, batch_size, position=None):
        if self.corpus is None:
            return super().batches(split, batch_size, position)
        if split == "train":
            return rebatch(local_rows(self.corpus.train, self.corpus.tokenizer, position), batch_size)
        return rebatch(local_rows(self.corpus.val, self.corpus.tokenizer), batch_size, drop_last=False,
                       max_rows=self.corpus.val_rows)

    def report(self, metrics, checkpoint_dir):
        self.history.append(metrics)
        if checkpoint_dir and self.out_dir:
            dest = Path(self.out_dir) / f"step_{metrics['step']:06d}"
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)  # a resume never finds a half-copied step
            self.checkpoints.append(str(dest))

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.resume_from


@torch.no_grad()
def evaluate(model, batches, num_batches: int, token_bytes: torch.Tensor | None = None,
             max_logits: int = 2**29) -> tuple[float, float]:
    """(loss, bpb) over the first `num_batches` (inputs, targets) of `batches` on each worker, summed
    across workers, in one forward pass per batch (chunks of rows keep the fp32 logits under
    `max_logits` elements). loss: mean nats per target token (ignored targets count none). bpb: nats
    summed over targets that stand for bytes (special tokens count none) over ln 2 x those bytes; NaN
    without `token_bytes`. Independent of the tokenizer's vocab.

    Meant for the plain (eager) model: a compiled one would compile another graph for it, which costs
    more than the few evaluations of a run save."""
    sums = None  # nats, target tokens, nats over byte tokens, bytes
    for x, y in itertools.islice(batches, num_batches):
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=x.device)
            if token_bytes is not None:
                token_bytes = token_bytes.to(x.device)
        rows = max(1, max_logits // (x.size(1) * model.config.vocab_size))
        for xc, yc in zip(x.split(rows), y.split(rows)):
            nats = model(xc, yc, loss_reduction="none").double()
            sums[0] += nats[yc >= 0].sum()
            sums[1] += (yc >= 0).sum()
            if token_bytes is not None:
                nbytes = torch.where(yc >= 0, token_bytes[yc.clamp(min=0)], 0)
                sums[2] += nats[nbytes > 0].sum()
                sums[3] += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return loss, (sums[2] / (math.log(2) * sums[3])).item() if token_bytes is not None else float("nan")


def progress_line(m: dict) -> str:
    eta = (m["iterations"] - m["step"]) * m["step_s"]
    return (f"d{m['depth']} step {m['step']}/{m['iterations']} ({m['step'] / m['iterations']:.0%}) | "
            f"loss {m['train_loss']:.4f} | val {m['val_loss']:.4f}"
            + (f" ({m['val_bpb']:.4f} bpb)" if not math.isnan(m.get("val_bpb", math.nan)) else "")
            + f" | {m['tok_per_s']:,.0f} tok/s | "
            f"MFU {m['mfu']:.1%} | {m['step_s']:.3f} s/step | ETA {eta / 60:.1f} min")


def train(config: TrainConfig, session: Session) -> dict:
    """Run (or resume) training; returns the last reported metrics."""
    entered = time.perf_counter()
    plan, device = config.plan, session.device
    if session.world_size != plan.num_workers:
        raise ValueError(f"plan.num_workers is {plan.num_workers} but the session has {session.world_size} workers")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # read at the first CUDA allocation
    end_step = min(config.max_steps or plan.iterations, plan.iterations)
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        prefer_cudnn_attention()
    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    model = build_model(plan.model, device=device, seed=config.seed)
    optimizers = build_optimizers(model, plan, compile=use_compile)

    corpus = config.data.kind == "corpus"
    step, position, train_time, val_loss, val_bpb, finished = 0, None, 0.0, float("nan"), float("nan"), None
    val_step = -1  # the step of the latest evaluation
    with session.latest_checkpoint() as path:
        if path is not None:
            meta = load_checkpoint(path, model, optimizers, restore_rng=True)
            # A synthetic position counts micro-batches of this shape, so the shape must not change; a
            # corpus position names rows, so any worker count and device batch can go on from it.
            keys = ("depth", "total_batch_tokens", "iterations") + (() if corpus else ("num_workers", "device_batch_size"))
            for key in keys:
                if meta["plan"][key] != getattr(plan, key):
                    raise ValueError(f"{path}: checkpoint has plan.{key} = {meta['plan'][key]}, this run has "
                                     f"{getattr(plan, key)}; resume with the plan it was saved with")
            for key in ("kind", "seed", "source"):
                if meta["data"].get(key) != getattr(config.data, key):
                    raise ValueError(f"{path}: checkpoint read data.{key} = {meta['data'].get(key)!r}, this run "
                                     f"reads {getattr(config.data, key)!r}")
            if corpus and session.shards is not None:
                check_fingerprint(meta["data"].get("shards"), session.shards, config.data.source)
            step, position = meta["step"], meta["data"]["position"]
            train_time, val_loss = meta["loop"]["train_time_s"], meta["loop"]["val_loss"]
            val_bpb = meta["loop"].get("val_bpb", float("nan"))
            val_step = meta["loop"].get("val_step", -1)
            finished = meta["loop"].get("metrics")
            if session.rank == 0:
                print(f"resumed from step {step} of {plan.iterations} ({path})", flush=True)
    if step >= end_step and finished:  # resumed after the last step (a restored sweep, say): report it again
        session.report(finished, None)
        return finished

    wrapped = session.wrap(model)
    forward = torch.compile(wrapped, dynamic=False) if use_compile else wrapped
    is_ddp = wrapped is not model
    eval_batches = max(1, config.eval_tokens // (plan.device_batch_size * plan.model.seq_len * session.world_size))
    if corpus:
        position = StreamPosition.from_json(position)
        batches = StreamBatches(session.batches("train", plan.device_batch_size, position), device, position)
        token_bytes = session.tokenizer.token_bytes()
        val_set: list = []  # read once, at the first evaluation, then kept on the device

        def validate() -> tuple[float, float]:
            if not val_set:
                val_set.extend(to_device(b, device) for b in session.batches("val", plan.device_batch_size))
                if len(val_set) > 1 and len(val_set[-1][0]) < plan.device_batch_size:
                    val_set.pop()  # a short last batch only when it is all there is (it costs a recompile)
                if not val_set:
                    raise ValueError(f"data: the val split of {config.data.source} has fewer rows than the "
                                     f"{session.world_size} workers; give it more documents")
            return evaluate(model, iter(val_set), len(val_set), token_bytes)
    else:
        source = dict(vocab_size=plan.model.vocab_size, seq_len=plan.model.seq_len, kind=config.data.kind, seed=config.data.seed)
        batches = WorkerBatches(SyntheticTokens(**source, split="train"), plan.device_batch_size,
                                session.rank, session.world_size, device, position or 0)

        def validate() -> tuple[float, float]:
            val = WorkerBatches(SyntheticTokens(**source, split="val"), plan.device_batch_size,
                                session.rank, session.world_size, device)
            return evaluate(model, val, eval_batches)

    def data_position():
        """Where the whole run is in its data: for a corpus, the union of every worker's position."""
        if not corpus:
            return batches.position
        states = [batches.position.to_json()]
        if dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, batches.position.to_json())
        merged = StreamPosition()
        for state in states:
            merged = merged.merge(StreamPosition.from_json(state))
        return merged.to_json()

    peak = peak_flops(device_name(device)) * session.world_size
    tokens_per_step = plan.total_batch_tokens
    loss_sum, window_steps, excluded = torch.zeros((), device=device), 0, 0.0
    start_step = step  # where this worker group began: > 0 after a restart or resume
    window_start = time.perf_counter()
    # Where a trial's wall time goes besides training steps (the first window includes torch.compile).
    overhead = dict(setup_s=window_start - entered, first_window_s=None, eval_time_s=0.0)
    metrics: dict = {}
    try:
        while step < end_step:
            for micro in range(plan.grad_accum):
                x, y = next(batches)
                sync = micro == plan.grad_accum - 1 or not is_ddp
                with contextlib.nullcontext() if sync else wrapped.no_sync():
                    loss = forward(x, y)
                    (loss / plan.grad_accum).backward()
                loss_sum += loss.detach()
            lr_mult = apply_schedule(optimizers, step, plan)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            if gc.isenabled():  # nanochat: GC pauses cost ~500 ms; after the first step, collect by hand, rarely
                gc.collect()
                gc.freeze()
                gc.disable()
            elif step % GC_EVERY == 0:  # what a step leaves in cycles (iterator futures, tracebacks) goes now
                gc.collect()

            last = step == end_step
            evaluating = (last and config.eval_at_end) or (config.eval_every and step % config.eval_every == 0)
            save = (last and config.checkpoint_at_end) or (
                config.checkpoint_every and step % config.checkpoint_every == 0)
            if not (last or save or evaluating or step % config.log_every == 0):
                continue
            if evaluating:
                t0 = time.perf_counter()
                (val_loss, val_bpb), val_step = validate(), step
                spent = time.perf_counter() - t0
                excluded += spent
                overhead["eval_time_s"] += spent
            train_loss = loss_sum.item() / (window_steps * plan.grad_accum)  # syncs with the device
            now = time.perf_counter()
            dt = now - window_start - excluded
            train_time += dt
            if overhead["first_window_s"] is None:
                overhead["first_window_s"] = dt
            tok_per_s = window_steps * tokens_per_step / dt
            metrics = dict(
                step=step, iterations=plan.iterations, depth=plan.depth, tokens=step * tokens_per_step,
                flops=float(step * tokens_per_step * plan.flops_per_token), train_loss=train_loss, val_loss=val_loss,
                val_bpb=val_bpb, val_step=val_step, start_step=start_step,
                tok_per_s=tok_per_s, mfu=tok_per_s * plan.flops_per_token / peak, lr_mult=lr_mult,
                step_s=dt / window_steps, train_time_s=train_time, window_steps=window_steps,
                peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                **overhead,
            )
            checkpoint_dir = None
            where = data_position() if save else None  # every rank takes part in gathering it
            if save and session.rank == 0:
                checkpoint_dir = tempfile.mkdtemp(prefix="nanoray-ckpt-")
                saved = save_checkpoint(Path(checkpoint_dir) / "ckpt", model, optimizers, dict(
                    plan=plan.model_dump(), step=step, data=dict(config.data.model_dump(), position=where,
                                                                shards=session.shards),
                    loop=dict(train_time_s=train_time, val_loss=val_loss, val_bpb=val_bpb, val_step=val_step,
                              train_loss=train_loss,
                              metrics=metrics),
                    config=config.model_dump()))
                if session.tokenizer is not None:  # serving and evaluation need it beside the weights
                    session.tokenizer.save(Path(saved) / "tokenizer")
            if session.rank == 0:
                print(progress_line(metrics), flush=True)
            session.report(metrics, checkpoint_dir and str(Path(checkpoint_dir) / "ckpt"))
            if checkpoint_dir:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            loss_sum.zero_()
            window_steps, excluded = 0, 0.0
            window_start = time.perf_counter() if save else now  # a report's own cost counts, a checkpoint's does not
    finally:
        gc.unfreeze()
        gc.enable()
    return metrics


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `TorchTrainer(train_loop_per_worker, train_loop_config=TrainConfig(...).model_dump())`,
    plus the tokenizer under "_tokenizer" when the data is a corpus."""
    from ray.train.v2._internal.execution import context

    # Train logs each report's whole metrics dict at INFO, under its file's path; the progress line says it.
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # NVLink multicast (NVLS) off unless the environment says otherwise: on shared multi-GPU hosts a program
    # using it can take the GPUs out of service. NCCL reads these at its first collective, after this point.
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    config = dict(config)
    tokenizer, shards = config.pop("_tokenizer", None), config.pop("_shards", None)
    train(TrainConfig.model_validate(config), RaySession(tokenizer, shards))


def fit(config: TrainConfig, name: str, storage_path: str, use_gpu: bool = False, gpus_per_worker: float = 1,
        cpus_per_worker: float = 1, max_failures: int = 0, callbacks: list | None = None):
    """Run `config` on `config.plan.num_workers` Ray Train workers; returns the ray.train.Result.

    Re-running with the same (name, storage_path) resumes from that run's latest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from nanoray.train import train_loop_per_worker  # by reference, also when this file runs as __main__

    resources = dict(CPU=cpus_per_worker, GPU=gpus_per_worker) if use_gpu else dict(CPU=cpus_per_worker)
    loop_config, datasets, dataset_config = config.model_dump(), None, None
    if config.data.kind == "corpus":
        corpus = prepare_corpus(config)
        loop_config["_tokenizer"], loop_config["_shards"] = corpus.tokenizer, corpus.shards
        latest_position(storage_path, name, corpus)  # other shards than the checkpoint's: fail here, before Train
        datasets = corpus.datasets(storage_path, name)
        # Rows in the order the stream makes them: a run and its resumption read the same sequence.
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True
        dataset_config = ray.train.DataConfig(datasets_to_split=["train", "val"], execution_options=ingest)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=dataset_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.plan.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
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
    p = argparse.ArgumentParser(prog="python -m nanoray.train", description="Train one depth with Ray Train.")
    p.add_argument("--depth", type=int, default=12 if gpu else 2)
    p.add_argument("--preset", default="gpt2" if gpu else "tiny")
    p.add_argument("--ratio", type=float, default=12.0 if gpu else 2.0, help="tokens : scaling params")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (default: the plan's horizon)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    p.add_argument("--data", default="stdlib", help="a corpus source (stdlib, files:<glob>, parquet:<dir|glob|"
                   "s3://...>, hf:<org/name>, debian-docs) or synthetic tokens (random, markov)")
    p.add_argument("--data-dir", default=None, help="where the corpus's shards and tokenizer go (default "
                   "runs/data/<source>)")
    p.add_argument("--tokenizer-actors", type=int, default=1, help="Ray Data actors tokenizing the corpus")
    p.add_argument("--name", default=None, help="run name (default d<depth>-<preset>); the same name resumes")
    p.add_argument("--storage", default=os.path.abspath("runs/train"), help="Ray Train storage path")
    args = p.parse_args(argv)
    run = plan(args.depth, args.preset, Horizon(ratio=args.ratio), num_workers=args.workers)
    print(run.table(), flush=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints shown once, not twice
    data = (DataSpec(kind=args.data) if args.data in SYNTHETIC_KINDS else
            DataSpec(kind="corpus", source=args.data, data_dir=args.data_dir, actors=args.tokenizer_actors))
    config = TrainConfig(plan=run, data=data, max_steps=args.steps, log_every=10 if gpu else 20,
                         eval_tokens=2**20 if gpu else 2**16)
    result = fit(config, args.name or f"d{args.depth}-{args.preset}", args.storage, use_gpu=gpu)
    print(json.dumps(dict(result.metrics or {}, checkpoint=result.checkpoint and result.checkpoint.path)))


if __name__ == "__main__":
    main()
