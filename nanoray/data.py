"""Token sources for the trainer.

A source hands each worker batches of rows of seq_len + 1 tokens (inputs = row[:-1], targets = row[1:])
and a position: the number of micro-batches this worker has consumed. The position goes into every
checkpoint, so a resumed run continues with the next unseen batch.

`SyntheticTokens` is the in-process source: deterministic rows computed from (seed, split, batch
index), so any position can be resumed exactly, on any device, with no I/O. `random` rows are
uniform tokens (throughput benchmarks); `markov` rows follow a fixed random permutation with
probability 0.9, so a model can learn them and the loss visibly falls (tests, demos).
"""

import torch
from pydantic import BaseModel, ConfigDict, Field

SYNTHETIC_KINDS = ("random", "markov")


class DataSpec(BaseModel):
    """Which token source the trainer reads."""

    model_config = ConfigDict(frozen=True)
    kind: str = Field("random", description=f"one of {SYNTHETIC_KINDS}")
    seed: int = Field(0, description="seed of the synthetic stream")


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_len: int, kind: str = "random", seed: int = 0, split: str = "train"):
        if kind not in SYNTHETIC_KINDS:
            raise ValueError(f"data.kind: unknown synthetic kind {kind!r}; allowed: {', '.join(SYNTHETIC_KINDS)}")
        self.vocab_size, self.seq_len, self.kind = vocab_size, seq_len, kind
        self.seed = seed * 2 + (split == "val")  # disjoint streams for train and val
        self.perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))

    def batch(self, index: int, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` as (inputs, targets), each (batch_size, seq_len) int64 on `device`."""
        gen_device = torch.device(device) if self.kind == "random" else torch.device("cpu")
        gen = torch.Generator(device=gen_device).manual_seed(self.seed * 1_000_003 + index)
        shape = (batch_size, self.seq_len + 1)
        if self.kind == "random":
            rows = torch.randint(self.vocab_size, shape, generator=gen, device=gen_device)
        else:
            noise = torch.randint(self.vocab_size, shape, generator=gen)
            follow = torch.rand(shape, generator=gen) < 0.9
            rows = noise.clone()
            for t in range(1, shape[1]):
                rows[:, t] = torch.where(follow[:, t], self.perm[rows[:, t - 1]], noise[:, t])
            rows = rows.pin_memory() if torch.device(device).type == "cuda" else rows
        rows = rows.to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


class WorkerBatches:
    """The batches of one data-parallel worker: global batch indices rank, rank + W, rank + 2W, ..."""

    def __init__(self, source: SyntheticTokens, batch_size: int, rank: int, world_size: int,
                 device: torch.device | str, position: int = 0):
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.device, self.position = device, position

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.position * self.world_size + self.rank
        self.position += 1
        return self.source.batch(index, self.batch_size, self.device)
