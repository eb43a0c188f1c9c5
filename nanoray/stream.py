"""The token stream: parquet shards -> tokenized, BOS-aligned best-fit rows -> Ray Train workers.

    corpus = prepare_corpus(plan, DataSpec(kind="corpus", source="stdlib"), eval_tokens, store.data_dir("stdlib"))
    corpus.datasets(store, run)                 # Ray Datasets for the TorchTrainer, from the latest position
    CorpusData(corpus, rows, ...)               # in a Train worker: the TrainData the loop reads

Slots and units. The train stream is a sequence of *slots*: slot s reads shard `slot_file(s)`, which
walks the shards in a fresh seeded order every epoch. A slot's *units* are its shard's row groups
(1024 documents each, as our shards are written). A Ray Data actor (`TokenizePack`) takes one slot
at a time and yields, per unit, the unit's documents tokenized (tiktoken, batched, BOS first) and
packed best-fit into rows. Packing never crosses a unit, so a unit's rows are a pure function of the
unit: the same rows whatever actor or node made them, in whatever order.

Position. Every row carries its id (slot, unit, row) and its unit's and slot's sizes. Each worker
records the ids it consumed in a `StreamPosition`; at a checkpoint the workers' positions are
merged into one (union), kept compact as ranges of finished slots plus the few slots in flight.
A resumed run builds its dataset from that position: finished slots and units are never read,
consumed rows of units in flight are dropped after packing. So it continues with exactly the rows
not yet consumed, whatever the number of workers (DESIGN.md: data position).

Validation reads the val split once, in shard order, and keeps the first `rows` rows.
"""

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from nanoray.checkpoint import read_meta
from nanoray.corpus import ROW_GROUP_DOCS, ParquetShards, parquet_shards, read_source, split_of, write_shards
from nanoray.data import DataSpec, pack_rows
from nanoray.dial import RunPlan
from nanoray.evaluate import evaluate
from nanoray.position import StreamPosition, in_ranges
from nanoray.storage import RunStore, atomic_dir, exists, join, read_bytes, upload, write_bytes
from nanoray.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # beside a prepared source's train/ and val/: what each split holds
EPOCH_MARGIN = 2.0  # default epochs: this many times the measured need, plus one (unread epochs cost nothing)


class StreamSpec(BaseModel):
    """What a token stream reads and how it cuts rows (everything but the tokenizer and position)."""

    model_config = ConfigDict(frozen=True)
    source: str = Field(description="a parquet-backed source: parquet:<dir|glob|s3://...> or hf:<org/name>")
    split: str = Field("train", description="train or val")
    seq_len: int = Field(description="tokens per row, plus one (inputs and shifted targets)")
    seed: int = Field(0, description="seed of each epoch's shard order")
    epochs: int = Field(1, description="passes over the shards the stream may make")
    split_long_docs: bool = Field(False, description="cut documents longer than a row into row-sized pieces")
    actors: int = Field(1, description="tokenizer actors")
    cpus_per_actor: float = Field(1.0, description="logical CPUs each tokenizer actor holds")

    @property
    def row_len(self) -> int:
        return self.seq_len + 1


# ---------------------------------------------------------------------------------------------------
# Slots, units and rows


def slot_file(slot: int, num_files: int, split: str, seed: int) -> int:
    """The shard a slot reads: train walks the shards in a fresh seeded order every epoch, val in order."""
    if split == "val":
        return slot
    epoch, i = divmod(slot, num_files)
    return int(_epoch_order(num_files, seed, epoch)[i])


@functools.lru_cache(maxsize=4)
def _epoch_order(num_files: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's shard order, drawn once (not once per slot: thousands of shards, thousands of slots)."""
    return np.random.default_rng([seed, epoch]).permutation(num_files)


def split_long(docs: list[list[int]], row_len: int, bos_id: int) -> list[list[int]]:
    """Cut documents longer than a row into pieces that fit one, each starting with BOS."""
    out = []
    for doc in docs:
        if len(doc) <= row_len:
            out.append(doc)
            continue
        body = doc[1:]
        out.extend([bos_id, *body[i:i + row_len - 1]] for i in range(0, len(body), row_len - 1))
    return out


class TokenizePack:
    """Ray Data actor: one slot in, one batch of packed rows out per unit (row group) of its shard.

    `skip` (from a resumed position) names, per slot in flight, the units already finished (not read)
    and the rows already consumed (packed again, then dropped).
    """

    def __init__(self, tokenizer: Tokenizer, spec: StreamSpec, shards: ParquetShards,
                 skip: dict[int, tuple[set[int], dict[int, set[int]]]] | None = None):
        self.tokenizer, self.spec, self.shards, self.skip = tokenizer, spec, shards, skip or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for slot, path in zip(batch["slot"], batch["path"]):
            yield from self.slot_rows(int(slot), str(path))

    def slot_rows(self, slot: int, path: str) -> Iterator[dict[str, np.ndarray]]:
        try:
            shard = pq.ParquetFile(path, filesystem=self.shards.filesystem)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        if "text" not in shard.schema_arrow.names:
            raise ValueError(f"{path}: no 'text' column (columns: {', '.join(shard.schema_arrow.names)})")
        units = shard.num_row_groups
        done, consumed = self.skip.get(slot, (set(), {}))
        first_row = 0
        for unit in range(units):
            num_docs = shard.metadata.row_group(unit).num_rows
            if unit not in done:
                rows = self.unit_rows(path, shard.read_row_group(unit, columns=["text"]).column("text").to_pylist(),
                                      first_row)
                keep = [i for i in range(len(rows)) if i not in consumed.get(unit, ())]
                if keep:
                    yield dict(tokens=rows[keep], slot=np.full(len(keep), slot, dtype=np.int64),
                               unit=np.full(len(keep), unit, dtype=np.int32), row=np.asarray(keep, dtype=np.int32),
                               unit_rows=np.full(len(keep), len(rows), dtype=np.int32),
                               slot_units=np.full(len(keep), units, dtype=np.int32))
            first_row += num_docs

    def unit_rows(self, path: str, texts: list, first_row: int) -> np.ndarray:
        """One unit's documents -> packed rows, (n, row_len) int32."""
        name, docs = os.path.basename(path), []
        for i, text in enumerate(texts):
            if self.shards.row_split and split_of(f"{name}#{first_row + i}") != self.spec.split:
                continue
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    log.warning("%s row %d: not UTF-8, skipped", path, first_row + i)
                    continue
            if text and text.strip():
                docs.append(text)
        ids = self.tokenizer.encode_batch(docs, bos=True, num_threads=1)
        if self.spec.split_long_docs:
            ids = split_long(ids, self.spec.row_len, self.tokenizer.bos_id)
        rows = list(pack_rows(ids, self.spec.row_len))
        return np.stack(rows) if rows else np.empty((0, self.spec.row_len), dtype=np.int32)


def shard_fingerprint(spec: StreamSpec) -> dict:
    """What a position's slot numbers refer to: the split's shard count and a digest of their names in order.
    Slots map to shards through that list (a seeded order of its length), so a checkpoint's position
    means the same rows only over the same list."""
    names = [os.path.basename(p) for p in parquet_shards(spec.source, spec.split).paths]
    return dict(count=len(names), sha1=hashlib.sha1("\n".join(names).encode()).hexdigest()[:16])


def check_fingerprint(saved: dict | None, now: dict, source: str) -> None:
    """Raise if the train shards of `source` changed (`now`) since a checkpoint saved `saved` with its
    position (None: a checkpoint from before fingerprints: nothing to check)."""
    if saved is not None and saved != now:
        raise ValueError(f"data: the train shards of {source} changed since the checkpoint ({saved['count']} "
                         f"shards then, {now['count']} now, or other names): its data position would name other "
                         "rows. Put the shards back as they were, or train under a new run name.")


def slot_items(spec: StreamSpec, shards: ParquetShards, position: StreamPosition) -> list[dict]:
    """The slots still to read, in order, each with its shard's path."""
    n = len(shards.paths)
    total = n if spec.split == "val" else n * spec.epochs
    return [dict(slot=s, path=shards.paths[slot_file(s, n, spec.split, spec.seed)])
            for s in range(position.first_open_slot(), total) if not in_ranges(position.done_slots, s)]


def build_dataset(spec: StreamSpec, tokenizer: Tokenizer, position: StreamPosition | None = None,
                  limit_rows: int | None = None, progress_bars: bool = True):
    """The stream as a Ray Dataset of rows {tokens (row_len,) int32, slot, unit, row, unit_rows, slot_units}."""
    import ray.data

    position = position or StreamPosition()
    shards = parquet_shards(spec.source, spec.split)
    items = slot_items(spec, shards, position)
    if not items:
        raise ValueError(f"data: nothing left to read in {spec.source} ({spec.split}) after {spec.epochs} epochs")
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one slot per block: spread over actors
    ds = ds.map_batches(TokenizePack, batch_size=1, compute=ray.data.ActorPoolStrategy(size=spec.actors),
                        num_cpus=spec.cpus_per_actor, fn_constructor_kwargs=dict(
                            tokenizer=tokenizer, spec=spec, shards=shards, skip=position.skip_table()))
    ds = ds.limit(limit_rows) if limit_rows is not None else ds
    ds.context.enable_progress_bars = progress_bars
    return ds


def local_rows(spec: StreamSpec, tokenizer: Tokenizer, position: StreamPosition | None = None
               ) -> Iterator[dict[str, np.ndarray]]:
    """The same stream without Ray, slot after slot in order (tests, single-process runs)."""
    position = position or StreamPosition()
    shards = parquet_shards(spec.source, spec.split)
    packer = TokenizePack(tokenizer, spec, shards, position.skip_table())
    for item in slot_items(spec, shards, position):
        yield from packer.slot_rows(item["slot"], item["path"])


def rebatch(blocks: Iterator[dict[str, np.ndarray]], batch_size: int, drop_last: bool = True,
            max_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size batches out of variable-size blocks of rows (the first `max_rows` rows, if given)."""
    pending: list[dict[str, np.ndarray]] = []
    have = total = 0
    for block in blocks:
        if max_rows is not None:
            block = {k: v[:max_rows - total] for k, v in block.items()}
        pending.append(block)
        have += len(block["row"])
        total += len(block["row"])
        while have >= batch_size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            pending = [{k: v[batch_size:] for k, v in joined.items()}]
            have -= batch_size
        if max_rows is not None and total >= max_rows:
            break
    if have and not drop_last:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


# ---------------------------------------------------------------------------------------------------
# Preparing a source


def prepare_data(source: str, vocab_size: int, data_dir: str | os.PathLike,
                 max_chars: int = 2_000_000_000) -> tuple[str, str]:
    """Make `source` streamable: (a parquet-backed source spec, the tokenizer's directory).

    Parquet sources (parquet:, hf:) stream as they are. Others (stdlib, files:, debian-docs) are written
    once as parquet shards under data_dir/shards, with a manifest. The tokenizer (vocab_size, trained on the
    train split) is kept in data_dir/tokenizer-<vocab_size>. Both are reused when present. data_dir may be
    a local directory or a URI of an object store (s3://...), where every node of a cluster reads them.
    """
    data_dir = str(data_dir)
    if source.startswith(("parquet:", "hf:")):
        spec = source
    else:
        shards = join(data_dir, "shards")
        if not (exists(join(shards, MANIFEST)) or ("://" not in shards and Path(shards).is_dir())):
            write_source_shards(source, shards)
        spec = f"parquet:{shards}"
    tokenizer_dir = join(data_dir, f"tokenizer-{vocab_size}")
    if not Tokenizer.is_saved(tokenizer_dir):
        try:  # one saved before Hugging Face's tokenizer.json was written beside it: saved again, with it
            tokenizer = Tokenizer.load(tokenizer_dir)
        except FileNotFoundError:
            tokenizer = Tokenizer.train(read_source(spec, "train"), vocab_size, max_chars=max_chars)
        tokenizer.save(tokenizer_dir)
    return spec, tokenizer_dir


def write_source_shards(source: str, shards: str) -> None:
    """`source` as parquet shards in shards/{train,val}, and a manifest of what each split holds (written last
    on an object store: a reader trusts only a complete set). Built locally first; another process finishing
    first keeps its copy."""
    def build(out: Path) -> None:
        manifest = {}
        for split in ("train", "val"):
            skipped: list = []
            written = write_shards(read_source(source, split, skipped), out / split, docs_per_shard=ROW_GROUP_DOCS)
            if not written:
                raise ValueError(f"source {source!r}: no {split} documents")
            if skipped:
                log.warning("%s (%s): skipped %d, e.g. %s: %s", source, split, len(skipped), *skipped[0])
            manifest[split] = dict(files=len(written), text_bytes=text_bytes(map(str, written)))
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    if "://" not in shards:
        with atomic_dir(shards, replace=False) as tmp:
            build(tmp)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        manifest = (Path(tmp) / MANIFEST).read_bytes()
        (Path(tmp) / MANIFEST).unlink()
        upload(tmp, shards)
        write_bytes(join(shards, MANIFEST), manifest)


def text_bytes(paths, filesystem=None) -> int:
    """The uncompressed size of the parquet files' data (their row groups), from their footers."""
    total = 0
    for path in paths:
        meta = pq.ParquetFile(path, filesystem=filesystem).metadata
        total += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return total


def epochs_for(stream: StreamSpec, tokenizer: Tokenizer, tokens: int) -> int:
    """Epochs of the train split enough for `tokens`: its size (a prepared source's manifest, or the local shards'
    footers) times the tokens a sample yields per byte, packed as the stream packs it (the first shard's first
    row group): the yield depends on the documents, the tokenizer and the row length (stdlib sources at vocab
    4096: 5.1 bytes per kept token in rows of 2048, 25 in rows of 256, which crop most of each), so no fixed guess
    covers it. With EPOCH_MARGIN. 1 for a remote source without a manifest (thousands of files: one pass is plenty)."""
    spec = stream.source
    manifest = join(spec.removeprefix("parquet:"), MANIFEST) if spec.startswith("parquet:") else None
    shards = parquet_shards(spec, "train")
    if manifest and exists(manifest):
        size = json.loads(read_bytes(manifest))["train"]["text_bytes"]
    elif shards.filesystem is not None:
        return 1
    else:
        size = text_bytes(shards.paths)
    sample = pq.ParquetFile(shards.paths[0], filesystem=shards.filesystem)
    texts = sample.read_row_group(0, columns=["text"]).column("text").to_pylist()
    kept = TokenizePack(tokenizer, stream, shards).unit_rows(shards.paths[0], texts, 0).size
    per_byte = kept / max(sample.metadata.row_group(0).total_byte_size, 1)
    if per_byte == 0:  # the sample's documents were all of the other split, or empty: assume a poor yield
        per_byte = 1 / 64
    return math.ceil(EPOCH_MARGIN * tokens / max(1.0, size * per_byte)) + 1


class Corpus(BaseModel):
    """A corpus ready to stream (made on the driver by `prepare_corpus`): the train and val streams, the
    tokenizer, how many val rows every evaluation reads, and which train shards the positions refer to."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    train: StreamSpec
    val: StreamSpec
    tokenizer: Tokenizer
    val_rows: int = Field(description="val rows per evaluation, a whole number of batches on every worker")
    shards: dict = Field(description="the train shards' count and a digest of their names (shard_fingerprint)")

    def datasets(self, store: RunStore, run: str) -> dict:
        """Ray Datasets for TorchTrainer, as callables: Train calls them at every (re)start of the worker
        group, so the train stream always begins where run `run`'s latest checkpoint left it."""
        # The trainer's progress line reports the stream; Ray Data's own bars would only clutter the log.
        return {"train": lambda: build_dataset(self.train, self.tokenizer, latest_position(store, run),
                                               progress_bars=False),
                "val": lambda: build_dataset(self.val, self.tokenizer, limit_rows=self.val_rows, progress_bars=False)}


def prepare_corpus(plan: RunPlan, data: DataSpec, eval_tokens: int, data_dir: str | os.PathLike) -> Corpus:
    """Shards and tokenizer for `data` in data_dir (made once, then reused), and the streams over them."""
    spec, tokenizer_dir = prepare_data(data.source, plan.model.vocab_size, data_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != plan.model.vocab_size:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {tokenizer.vocab_size} tokens, plan.model.vocab_size is "
                         f"{plan.model.vocab_size}")
    train = StreamSpec(source=spec, split="train", seq_len=plan.model.seq_len, seed=data.seed,
                       epochs=data.epochs or 1, split_long_docs=plan.split_long_docs,
                       actors=data.actors, cpus_per_actor=data.cpus_per_actor)
    if not data.epochs:
        train = train.model_copy(update=dict(epochs=epochs_for(train, tokenizer, plan.tokens)))
    val = train.model_copy(update=dict(split="val", epochs=1))
    per_step = plan.device_batch_size * plan.num_workers
    val_rows = max(1, eval_tokens // (per_step * plan.model.seq_len)) * per_step
    return Corpus(train=train, val=val, tokenizer=tokenizer, val_rows=val_rows, shards=shard_fingerprint(train))


def latest_position(store: RunStore, run: str, corpus: Corpus | None = None) -> StreamPosition:
    """The data position in the latest checkpoint of Ray Train run `run` (empty for a new run). With the
    `corpus`, first checks that its train shards are the ones the position was saved over."""
    checkpoint = store.latest_checkpoint(run)
    if checkpoint is None:
        return StreamPosition()
    data = read_meta(store.uri(checkpoint.path))["data"]  # meta.json alone, not the weights
    if corpus is not None:
        check_fingerprint(data.get("shards"), corpus.shards, corpus.train.source)
    return StreamPosition.from_json(data["position"])


# ---------------------------------------------------------------------------------------------------
# In the Train worker


class CorpusData:
    """The TrainData of a corpus on one worker. `rows(split, batch_size, position)` gives this worker's
    batches of rows of a split (from its Ray Data shard, or the local stream); the val rows are read once, at
    the first evaluation, and kept on the device."""

    def __init__(self, corpus: Corpus, rows: Callable[..., Iterator[dict[str, np.ndarray]]], batch_size: int,
                 device, position: dict | None):
        position = StreamPosition.from_json(position)
        self.batches = StreamBatches(rows("train", batch_size, position), device, position)
        self.tokenizer, self.shards = corpus.tokenizer, corpus.shards
        self._rows, self._batch_size, self._device, self._source = rows, batch_size, device, corpus.train.source
        self._val: list = []
        self._token_bytes = corpus.tokenizer.token_bytes()

    def validate(self, model) -> tuple[float, float]:
        if not self._val:
            self._val.extend(to_device(b, self._device) for b in self._rows("val", self._batch_size, None))
            if len(self._val) > 1 and len(self._val[-1][0]) < self._batch_size:
                self._val.pop()  # a short last batch only when it is all there is (it costs a recompile)
            if not self._val:
                world = dist.get_world_size() if dist.is_initialized() else 1
                raise ValueError(f"data: the val split of {self._source} has fewer rows than the {world} workers; "
                                 "give it more documents")
        return evaluate(model, iter(self._val), len(self._val), self._token_bytes)

    def position(self) -> dict:
        """The union of every worker's position: what the whole run has consumed."""
        states = [self.batches.position.to_json()]
        if dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, self.batches.position.to_json())
        merged = StreamPosition()
        for state in states:
            merged = merged.merge(StreamPosition.from_json(state))
        return merged.to_json()



class StreamBatches:
    """A worker's micro-batches: (inputs, targets) on its device, and the position it has consumed.

    `position` starts as the restored one; a row that it already holds means the dataset was not
    built from this position, and is an error rather than a silent repeat.
    """

    def __init__(self, batches: Iterator[dict[str, np.ndarray]], device, position: StreamPosition | None = None):
        self._batches, self.device = iter(batches), torch.device(device)
        self.position = position or StreamPosition()
        self._restored = StreamPosition.from_json(self.position.to_json())
        self.rows = 0

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._batches)
        except StopIteration:
            raise RuntimeError(f"data: the stream ran out after {self.rows} rows on this worker; "
                               "give the data more epochs or the run fewer steps") from None
        ids = list(zip(batch["slot"].tolist(), batch["unit"].tolist(), batch["row"].tolist()))
        for slot, unit, row in ids:
            if self._restored.consumed(slot, unit, row):
                raise RuntimeError(f"data: row {(slot, unit, row)} was consumed before the checkpoint; "
                                   "the dataset was not built from the checkpoint's position")
        units: dict[tuple[int, int], list[int]] = {}
        for (slot, unit, row), unit_rows, slot_units in zip(ids, batch["unit_rows"].tolist(),
                                                            batch["slot_units"].tolist()):
            units.setdefault((slot, unit, unit_rows, slot_units), []).append(row)
        for (slot, unit, unit_rows, slot_units), rows in units.items():
            self.position.add(slot, unit, rows, unit_rows, slot_units)
        self.rows += len(ids)
        return to_device(batch, self.device)


def to_device(batch: dict[str, np.ndarray], device):
    """(inputs, targets) of a batch of rows, int64 on `device` (through pinned memory to a GPU)."""
    rows = batch["tokens"]  # read-only (Ray's zero-copy view): copied once, into pinned memory for a GPU
    tokens = torch.empty(rows.shape, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
    tokens.numpy()[:] = rows
    tokens = tokens.to(device, non_blocking=True).long()
    return tokens[:, :-1], tokens[:, 1:]
