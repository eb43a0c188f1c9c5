"""Where the training loop runs: who this worker is, where its rows come from, where reports and checkpoints go.

    RaySession()                        # inside a Ray Train worker: DDP, ray.train.report, get_checkpoint
    LocalSession("cpu", out_dir=...)    # a plain process: the --bare benchmark, fast unit tests

Ray's overhead on the loop is the difference between the two (DESIGN.md).
"""

import contextlib
import os
import shutil
import socket
from pathlib import Path

import torch

from nanoray.storage import atomic_dir
from nanoray.stream import Corpus, local_rows, rebatch



class Session:
    """Where the loop runs. Subclasses say who this worker is and where reports and checkpoints go."""

    rank: int = 0
    world_size: int = 1
    device: torch.device

    def placement(self) -> dict:
        """Where this worker runs, for its reports: the machine's hostname (and Ray's node id), and torch's CPU
        threads. Not `hostname`: Tune fills that key of every result with the trial driver's host."""
        return dict(worker_host=socket.gethostname(), torch_threads=torch.get_num_threads())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def cpu_threads(self) -> int | None:
        """Torch's threads for this worker when it trains on CPUs; None: torch's own default (every core)."""
        return None

    def rows(self, split: str, batch_size: int, position=None):
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

    def __init__(self):
        import ray.train  # Ray Train is imported only inside its workers: a LocalSession run needs no Ray
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def placement(self):
        import ray

        return dict(super().placement(), worker_node_id=ray.get_runtime_context().get_node_id())

    def cpu_threads(self):
        """The node's cores shared by this run's workers on it. Not Ray's default, which sets OMP_NUM_THREADS to a
        worker's logical CPUs (1 for a trial on a laptop's cluster: one core of a 2-core machine trained a tiny
        d3 at 1.6 s a step, both at 1.1 s). CPU trials run one at a time (nanoray.sweep.default_concurrency)."""
        import ray.train

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS
        return max(1, cores // ray.train.get_context().get_local_world_size())

    def rows(self, split, batch_size, position=None):
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
        self.history: list[dict] = []
        self.checkpoints: list[str] = []

    def rows(self, split, batch_size, position=None):
        if self.corpus is None:
            return super().rows(split, batch_size, position)
        if split == "train":
            return rebatch(local_rows(self.corpus.train, self.corpus.tokenizer, position), batch_size)
        return rebatch(local_rows(self.corpus.val, self.corpus.tokenizer), batch_size, drop_last=False,
                       max_rows=self.corpus.val_rows)

    def report(self, metrics, checkpoint_dir):
        self.history.append(metrics)
        if checkpoint_dir and self.out_dir:
            dest = Path(self.out_dir) / f"step_{metrics['step']:06d}"
            with atomic_dir(dest) as tmp:  # a resume never finds a half-copied step
                shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            self.checkpoints.append(str(dest))

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.resume_from
