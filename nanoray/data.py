"""Token sources for the trainer, and BOS-aligned best-fit packing of documents into rows.

`TrainData` is what the training loop reads: its micro-batches, a validation, and its position (what the
run has consumed, saved in every checkpoint, so a resumed run continues with the next unseen batch). Real
text streams through Ray Data (`nanoray.stream.CorpusData`); this module holds what needs no Ray:
`SyntheticData` and the packer. Rows are seq_len + 1 tokens (inputs = row[:-1], targets = row[1:]).

`SyntheticTokens` is the in-process source: deterministic rows computed from (seed, split, batch
index), so any position can be resumed exactly with no I/O (`random` rows are drawn on the target
device, so a CPU and a GPU run see different streams). `random` rows are
uniform tokens (throughput benchmarks); `markov` rows follow a fixed random permutation with
probability 0.9, so a model can learn them and the loss visibly falls (tests, demos).
"""

import bisect
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanoray.evaluate import evaluate
from nanoray.tokenizer import Tokenizer

SYNTHETIC_KINDS = ("random", "markov")
DATA_KINDS = (*SYNTHETIC_KINDS, "corpus")


class DataSpec(BaseModel):
    """Which tokens the trainer reads: a synthetic stream, or a corpus through the Ray Data stream."""

    model_config = ConfigDict(frozen=True)
    kind: str = Field("random", description=f"one of {DATA_KINDS}")
    seed: int = Field(0, description="seed of the synthetic stream, or of the corpus's shard order")
    source: str = Field("stdlib", description="corpus source (kind corpus): stdlib, files:<glob>, "
                        "parquet:<dir|glob|s3://...>, hf:<org/name>, debian-docs")
    data_dir: str | None = Field(None, description="where a prepared corpus lives (default runs/data/<source>)")
    epochs: int | None = Field(None, description="passes over the corpus allowed (default: enough for the plan)")
    actors: int = Field(1, description="tokenizer actors feeding the workers")
    cpus_per_actor: float = Field(1.0, description="logical CPUs per tokenizer actor")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in DATA_KINDS:
            raise ValueError(f"data.kind: unknown kind {kind!r}; allowed: {', '.join(DATA_KINDS)}")
        return kind


class TrainData(Protocol):
    """What the training loop reads, on one worker."""

    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # this worker's train micro-batches (inputs, targets)
    tokenizer: Tokenizer | None  # saved beside the weights (None: synthetic tokens)
    shards: dict | None  # which train shards a corpus position refers to, saved with it (None: synthetic)

    def validate(self, model) -> tuple[float, float]:
        """(val loss, val bpb) of `model`, summed over every worker."""

    def position(self) -> Any:
        """What the whole run has consumed, as JSON (a collective: every worker calls it)."""


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
        gen = torch.Generator(device=gen_device).manual_seed((self.seed << 40) + index)  # disjoint per stream
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


class SyntheticData:
    """TrainData over SyntheticTokens. The position is the number of micro-batches each worker has consumed,
    so a resume needs the same worker count and device batch; validation reads `eval_batches` val batches."""

    tokenizer, shards = None, None

    def __init__(self, spec: DataSpec, vocab_size: int, seq_len: int, batch_size: int, rank: int,
                 world_size: int, device, position: int | None, eval_batches: int):
        def tokens(split):
            return SyntheticTokens(vocab_size, seq_len, kind=spec.kind, seed=spec.seed, split=split)

        self.batches = WorkerBatches(tokens("train"), batch_size, rank, world_size, device, position or 0)
        self._val = lambda: WorkerBatches(tokens("val"), batch_size, rank, world_size, device)
        self.eval_batches = eval_batches

    def validate(self, model) -> tuple[float, float]:
        return evaluate(model, self._val(), self.eval_batches)

    def position(self) -> int:
        return self.batches.position


class BestFitPacker:
    """Packs tokenized documents (each starting with BOS) into rows of exactly `row_len` tokens.

    nanochat's BOS-aligned best fit: keep at least `buffer_docs` documents; fill a row with the longest
    buffered document that still fits whole, again and again; when none fits, crop the shortest one to
    fill the row exactly and drop its tail. No padding, every row starts at a document start (so with
    BOS), and only the dropped tails are lost (`cropped_tokens`).
    """

    def __init__(self, row_len: int, buffer_docs: int = 1000):
        self.row_len, self.buffer_docs = row_len, buffer_docs
        self._lengths: list[int] = []  # sorted; _docs[i] has length _lengths[i]
        self._docs: list[list[int]] = []
        self.docs_in = self.tokens_in = self.tokens_out = self.cropped_tokens = 0

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, doc: list[int]) -> None:
        if not doc:
            return
        i = bisect.bisect_right(self._lengths, len(doc))
        self._lengths.insert(i, len(doc))
        self._docs.insert(i, doc)
        self.docs_in += 1
        self.tokens_in += len(doc)

    def buffered_tokens(self) -> int:
        return self.tokens_in - self.tokens_out - self.cropped_tokens

    def ready(self) -> bool:
        """Enough documents to choose from, and enough tokens for a whole row (1000 one-token documents
        are not one)."""
        return len(self._docs) >= self.buffer_docs and self.buffered_tokens() >= self.row_len

    def pop_row(self) -> np.ndarray:
        """One row from the buffer (call while ready(), or to drain at the end of a stream)."""
        row, space = [], self.row_len
        while space and self._docs:
            i = bisect.bisect_right(self._lengths, space) - 1
            if i >= 0:  # the longest document that fits whole
                del self._lengths[i]
                doc = self._docs.pop(i)
            else:  # none fits: crop the shortest to fill the row exactly
                del self._lengths[0]
                doc = self._docs.pop(0)
                self.cropped_tokens += len(doc) - space
                doc = doc[:space]
            row.extend(doc)
            space -= len(doc)
        self.tokens_out += len(row)
        return np.asarray(row, dtype=np.int32)


def pack_rows(docs: Iterable[list[int]], row_len: int, buffer_docs: int = 1000,
              packer: BestFitPacker | None = None) -> Iterator[np.ndarray]:
    """Stream full rows of `row_len` tokens out of a stream of tokenized documents.

    At the end of the stream the buffer is drained; a last row that cannot be filled is dropped.
    """
    packer = BestFitPacker(row_len, buffer_docs) if packer is None else packer
    for doc in docs:
        packer.add(doc)
        while packer.ready():
            yield packer.pop_row()
    while packer.buffered_tokens() >= row_len:
        yield packer.pop_row()

