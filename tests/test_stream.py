"""The Ray Data token stream: rows, positions, and exact resume through a real Ray Train run."""

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from nanoray.checkpoint import read_meta
from nanoray.corpus import parquet_shards
from nanoray.data import DataSpec
from nanoray.dial import Horizon, plan
from nanoray.position import StreamPosition
from nanoray.stream import StreamSpec, TokenizePack, build_dataset, epochs_for, local_rows, slot_file, split_long
from nanoray.tokenizer import Tokenizer
from nanoray.train import TrainConfig, fit

SEQ = 256


def ids_of(blocks) -> list[tuple[int, int, int]]:
    return [ids for b in blocks for ids in zip(b["slot"].tolist(), b["unit"].tolist(), b["row"].tolist())]


def test_rows_are_packed_per_unit_and_pure(corpus):
    spec, tokenizer, _ = corpus
    stream = StreamSpec(source=spec, seq_len=SEQ, epochs=2, split_long_docs=True)
    blocks = list(local_rows(stream, tokenizer))
    assert [b["slot"][0] for b in blocks] == list(range(10)) and all(b["unit"][0] == 0 for b in blocks)
    for b in blocks:
        assert b["tokens"].shape[1] == SEQ + 1 and (b["tokens"][:, 0] == tokenizer.bos_id).all()
        assert b["tokens"].dtype == np.int32 and b["row"].tolist() == list(range(b["unit_rows"][0]))
    # a unit's rows do not depend on what ran before it: slot 7 alone gives the same rows
    shards = parquet_shards(spec, "train")
    alone = next(TokenizePack(tokenizer, stream, shards).slot_rows(7, _path_of(stream, shards, 7)))
    assert np.array_equal(alone["tokens"], blocks[7]["tokens"])
    # the second epoch reads the same shards in another order
    assert sorted(_path_of(stream, shards, s) for s in range(5)) == sorted(_path_of(stream, shards, s) for s in range(5, 10))
    assert [_path_of(stream, shards, s) for s in range(5)] != [_path_of(stream, shards, s) for s in range(5, 10)]


def _path_of(stream, shards, slot):
    return shards.paths[slot_file(slot, len(shards.paths), stream.split, stream.seed)]


def test_default_epochs_hold_the_plans_tokens(corpus):
    """The default epochs hold a run of 20 epochs' worth of tokens, with rows that crop most of each document
    (256) and rows that keep most (2048): the yield is measured, not guessed."""
    spec, tokenizer, _ = corpus
    for seq_len in (256, 2048):
        one = StreamSpec(source=spec, seq_len=seq_len, epochs=1)
        per_epoch = sum(b["tokens"].size for b in local_rows(one, tokenizer))
        tokens = 20 * per_epoch
        epochs = epochs_for(one, tokenizer, tokens)
        assert 20 <= epochs <= 80, (seq_len, epochs)  # every epoch yields the same rows (another shard order)


def test_split_long_docs_loses_no_token():
    docs = [[9, *range(1, n)] for n in (3, 10, 25)]
    pieces = split_long(docs, row_len=8, bos_id=9)
    assert all(len(p) <= 8 and p[0] == 9 for p in pieces)
    assert [t for p in pieces for t in p if t != 9] == [t for d in docs for t in d if t != 9]


def test_resume_from_a_position_yields_exactly_the_unseen_rows(corpus):
    spec, tokenizer, _ = corpus
    stream = StreamSpec(source=spec, seq_len=SEQ, epochs=2, split_long_docs=True)
    everything = ids_of(local_rows(stream, tokenizer))
    position = StreamPosition()
    consumed = everything[:len(everything) // 3] + everything[len(everything) // 2:len(everything) // 2 + 7]
    for slot, unit, row in consumed:  # a finished slot, a unit in flight, and rows out of order
        block_rows = sum(1 for s, u, _ in everything if (s, u) == (slot, unit))
        position.add(slot, unit, [row], unit_rows=block_rows, slot_units=1)
    rest = ids_of(local_rows(stream, tokenizer, position))
    assert rest == [i for i in everything if i not in set(consumed)]


def test_ray_data_stream_equals_the_local_stream(ray_cluster, corpus):
    spec, tokenizer, _ = corpus
    stream = StreamSpec(source=spec, seq_len=SEQ, epochs=1, actors=2, cpus_per_actor=0.5, split_long_docs=True)
    local = {i: row for b in local_rows(stream, tokenizer) for i, row in zip(ids_of([b]), b["tokens"])}
    rows = {}
    for b in build_dataset(stream, tokenizer).iter_batches(batch_size=64, batch_format="numpy"):
        rows.update(zip(ids_of([b]), b["tokens"]))
    assert rows.keys() == local.keys()
    assert all(np.array_equal(rows[i], local[i]) for i in local)


def corpus_run(data_dir: Path, workers: int, **kwargs) -> TrainConfig:
    run = plan(2, "tiny", Horizon(iterations=4), num_workers=workers, device_batch_size=8)
    data = DataSpec(kind="corpus", source="parquet:" + str(data_dir / "shards"), data_dir=str(data_dir),
                    cpus_per_actor=0.5)
    return TrainConfig(plan=run, data=data, **dict(dict(log_every=2, eval_every=0, eval_tokens=8 * SEQ,
                                                         checkpoint_every=2), **kwargs))


def position_of(result) -> StreamPosition:
    with result.checkpoint.as_directory() as d:
        return StreamPosition.from_json(read_meta(Path(d))["data"]["position"])


def weights_of(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return load_file(Path(d) / "model.safetensors")


def test_training_on_the_stream_resumes_at_the_next_row(ray_cluster, corpus, tmp_path):
    _, tokenizer, data_dir = corpus
    storage = str(tmp_path / "runs")
    rows_per_step = 4096 // SEQ
    # One worker: the stream's order is fixed, so a run stopped at step 2 and resumed must end exactly
    # where an uninterrupted run ends: same rows consumed, same weights.
    straight = fit(corpus_run(data_dir, 1), "straight", storage, cpus_per_worker=1)
    fit(corpus_run(data_dir, 1, max_steps=2), "resumed", storage, cpus_per_worker=1)
    resumed = fit(corpus_run(data_dir, 1), "resumed", storage, cpus_per_worker=1)
    assert straight.metrics["step"] == resumed.metrics["step"] == 4
    assert straight.metrics["torch_threads"] == len(os.sched_getaffinity(0))  # the node's cores, not Ray's 1
    assert position_of(resumed) == position_of(straight)
    a, b = weights_of(straight), weights_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isfinite(resumed.metrics["val_bpb"]) and 0 < resumed.metrics["val_bpb"] < 8
    with resumed.checkpoint.as_directory() as d:  # the checkpoint carries its tokenizer
        assert Tokenizer.load(Path(d) / "tokenizer").encode("def f(x):") == tokenizer.encode("def f(x):")

    # Two workers go on from the one-worker checkpoint at step 2: the position names rows, not
    # per-worker offsets, so the new workers split what is left, and nothing is read twice (a row
    # already consumed would raise in StreamBatches).
    fit(corpus_run(data_dir, 1, max_steps=2), "regrown", storage, cpus_per_worker=1)
    regrown = fit(corpus_run(data_dir, 2), "regrown", storage, cpus_per_worker=1)
    assert regrown.metrics["step"] == 4
    consumed = position_of(regrown)
    count = sum(b - a for s in consumed.slots.values() for ranges in s.rows.values() for a, b in ranges)
    assert consumed.done_slots == [] and count == 4 * rows_per_step


def test_resume_over_other_shards_is_refused_before_training(ray_cluster, corpus, tmp_path):
    """A position names slots, and slots name shards through the shard list: resuming after shards were
    added (a download still writing, say) would read other rows than it claims; it stops, saying why."""
    import shutil

    import pytest

    data_dir = tmp_path / "data"
    shutil.copytree(corpus[2], data_dir)
    storage = str(tmp_path / "runs")
    fit(corpus_run(data_dir, 1, max_steps=2), "grown", storage, cpus_per_worker=1)
    train_dir = data_dir / "shards" / "train"
    first = sorted(train_dir.glob("*.parquet"))[0]
    shutil.copy(first, train_dir / ("zz-" + first.name))
    with pytest.raises(ValueError, match=r"train shards of parquet:.* changed since the checkpoint \(5 shards then, 6"):
        fit(corpus_run(data_dir, 1), "grown", storage, cpus_per_worker=1)
    (train_dir / ("zz-" + first.name)).unlink()
    assert fit(corpus_run(data_dir, 1), "grown", storage, cpus_per_worker=1).metrics["step"] == 4
