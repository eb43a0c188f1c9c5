"""Checkpoints that can be trusted (nanoray/checkpoint.py): nothing in one runs code, corruption is found and
named (the file and the checkpoint), and weights are finite."""

import json
import os
from pathlib import Path

import pytest
import torch

from nanoray.checkpoint import (CheckpointError, LoopState, load_for_inference, load_model, restore, save_checkpoint,
                                sha256)
from nanoray.dial import plan
from nanoray.model import build_model
from nanoray.optim import build_optimizers


@pytest.fixture
def checkpoint(tmp_path, corpus):
    """A training checkpoint of a tiny model (weights, optimizer, RNG, tokenizer): (its path, the plan)."""
    run = plan(2, "tiny")
    model = build_model(run.model, seed=3)
    tokenizer = corpus[1]
    path = save_checkpoint(tmp_path / "ckpt", model, build_optimizers(model, run), dict(plan=run.model_dump(), data={}),
                           state=LoopState(step=5, position=10, wall_time_s=3.0), tokenizer=tokenizer)
    return path, run


def fresh(run):
    model = build_model(run.model)
    return model, build_optimizers(model, run)


class Payload:
    """What a crafted pickle does when loaded: here, only touch a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_a_checkpoint_runs_nothing(checkpoint, tmp_path):
    """Issue 17, finding 7: resuming unpickled optimizer.pt and rng.pt with weights_only=False; a crafted rng.pt
    ran a command. An attacker who can write the checkpoint can also fix its checksums: that is done here too."""
    path, run = checkpoint
    for name in ("rng.pt", "optimizer.pt"):
        marker = tmp_path / f"ran-{name}"
        torch.save([Payload(str(marker))], path / name)
        meta = json.loads((path / "meta.json").read_text())
        meta["files"][name] = sha256(path / name)
        (path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=f"{path / name}: not a plain tensor file, refused"):
            restore(path, *fresh(run))
        assert not marker.exists()


def test_a_checkpoint_resumes_without_pickle(checkpoint):
    path, run = checkpoint
    model, optimizers = fresh(run)
    state = restore(path, model, optimizers)  # weights, optimizer and RNG state, all read weights_only
    assert (state.step, state.position, state.wall_time_s) == (5, 10, 3.0) and all(torch.isfinite(p).all() for p in model.parameters())


def test_garbage_in_the_weights_is_found_and_named(checkpoint):
    """Issue 17, finding 8: 4 KB of garbage inside the weights loaded silently (NaN weights)."""
    path, run = checkpoint
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # NaNs in fp32, the header intact
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{weights}: corrupt .*checkpoint {path}"):
        load_for_inference(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        restore(path, *fresh(run))
    # without checksums (a checkpoint written before them), the NaN weights themselves are refused
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{weights}: tensor .* holds NaN or infinite values"):
        load_model(path)


def test_a_truncated_file_and_a_broken_meta_name_their_file(checkpoint):
    path, run = checkpoint
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]  # the truncation itself must be named, not only a checksum
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"{weights}: unreadable"):
        load_model(path)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{path / 'meta.json'}: not valid JSON"):
        load_model(path)


def test_a_missing_file_the_meta_lists_is_named(checkpoint):
    path, run = checkpoint
    (path / "tokenizer" / "ranks.tiktoken").unlink()
    with pytest.raises(CheckpointError, match="ranks.tiktoken: missing from checkpoint"):
        load_for_inference(path)


def test_every_file_has_its_checksum(checkpoint):
    path, _ = checkpoint
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "optimizer.pt", "rng.pt", "tokenizer/ranks.tiktoken",
                          "tokenizer/nanoray_tokenizer.json", "tokenizer/tokenizer.json"}
    assert all(sha256(Path(path) / name) == digest for name, digest in files.items())
