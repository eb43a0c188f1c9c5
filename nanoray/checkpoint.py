"""Checkpoints on disk: what a checkpoint directory holds is known here and nowhere else.

    model.safetensors   the model's parameters (fp32, names of the uncompiled, unwrapped module)
    optimizer.pt        [AdamW state dict, Muon state dict]            (training checkpoints)
    rng.pt              torch (CPU and CUDA), Python and NumPy RNG states
    meta.json           {"plan": RunPlan, "model": ModelConfig, "step", "data": {..., "position"}, "loop", ...}
    tokenizer/          the tokenizer the model was trained with (nanoray.tokenizer's two text files)

    save_checkpoint(path, model, optimizers, meta, state=LoopState(step=7), tokenizer=tok)
    state = restore(path, model, optimizers)           # training: weights, optimizer, RNG; where the loop was
    model, tokenizer, meta = load_for_inference(path)  # serving, CORE: the model in eval mode and its tokenizer
    meta = check_for_inference(path)                   # the same, checked without loading the weights

Writes are atomic (nanoray.storage.atomic_dir): a crash never leaves a half-written checkpoint behind a valid
name, and one caught between replacing an old checkpoint's two renames is found under its old name.
"""

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from nanoray.model import GPT, ModelConfig, build_model
from nanoray.storage import atomic_dir, download, filesystem, join, read_bytes, recover
from nanoray.tokenizer import Tokenizer

WEIGHTS, OPTIMIZER, RNG, META, TOKENIZER = "model.safetensors", "optimizer.pt", "rng.pt", "meta.json", "tokenizer"


class LoopState(BaseModel):
    """Where a training loop stands, beyond weights and optimizer state: what a resumed run goes on from."""

    step: int = Field(0, description="optimizer steps done")
    position: Any = Field(None, description="the data position (JSON): what the run has consumed")
    train_time_s: float = Field(0.0, description="seconds spent in training steps so far")
    train_loss: float = Field(math.nan, description="mean train loss of the last report window")
    val_loss: float = Field(math.nan, description="the latest val loss")
    val_bpb: float = Field(math.nan, description="the latest val bits per byte")
    val_step: int = Field(-1, description="the step of the latest evaluation")
    metrics: dict | None = Field(None, description="the last report (a finished run reports it again)")
    plan: dict = Field({}, description="the RunPlan the checkpoint was trained with")
    data: dict = Field({}, description="the data the checkpoint read: DataSpec fields and the train shards")


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_checkpoint(path: str | os.PathLike, model: GPT, optimizers: list[torch.optim.Optimizer] | None,
                    meta: dict, state: LoopState | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path. `meta` (JSON) is kept as it is, with the
    model's config and, for a training checkpoint, the loop `state` (step, data position, loop counters)."""
    path = Path(path)
    meta = dict(meta, model=model.config.model_dump())
    if state is not None:
        loop = state.model_dump(exclude={"step", "position", "plan", "data"})
        meta.update(step=state.step, loop=loop, data=dict(meta.get("data", {}), position=state.position))
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        if optimizers is not None:
            torch.save([opt.state_dict() for opt in optimizers], tmp / OPTIMIZER)
        torch.save(rng_state(), tmp / RNG)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:  # serving and evaluation need it beside the weights
            tokenizer.save(tmp / TOKENIZER)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's meta.json (a local directory, or a URI such as s3://...: read without the weights)."""
    if "://" in str(path):
        try:
            return json.loads(read_bytes(join(str(path), META)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not a nanoray checkpoint (no {META})") from None
    meta_file = recover(path, META) / META
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a nanoray checkpoint (no {META})")
    return json.loads(meta_file.read_text())


def load_checkpoint(path: str | os.PathLike, model: GPT, optimizers: list[torch.optim.Optimizer] | None = None,
                    restore_rng: bool = False) -> dict:
    """Load weights (and optimizer/RNG state when asked) into existing objects; returns the meta."""
    path = Path(path)
    meta = read_meta(path)
    if meta["model"] != model.config.model_dump():
        raise ValueError(f"{path}: checkpoint model {meta['model']} does not match {model.config.model_dump()}")
    device = model.wte.weight.device
    model.load_state_dict(load_file(path / WEIGHTS, device=str(device)))
    if optimizers is not None:
        states = torch.load(path / OPTIMIZER, map_location=device, weights_only=False)
        for opt, state in zip(optimizers, states, strict=True):
            opt.load_state_dict(state)
    if restore_rng:
        set_rng_state(torch.load(path / RNG, weights_only=False))
    return meta


def restore(path: str | os.PathLike, model: GPT, optimizers: list[torch.optim.Optimizer]) -> LoopState:
    """Resume training from a checkpoint: weights, optimizer and RNG state into the objects given; returns
    where the loop stood, with the plan and data the checkpoint was trained with."""
    meta = load_checkpoint(path, model, optimizers, restore_rng=True)
    loop = meta.get("loop", {})
    return LoopState(**{k: v for k, v in loop.items() if k in LoopState.model_fields}, step=meta["step"],
                     position=meta["data"].get("position"), plan=meta["plan"], data=meta["data"])


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The checkpoint's tokenizer (a local directory or a URI), checked against the model's vocabulary."""
    meta = read_meta(path)
    tokenizer = Tokenizer.load(join(str(path), TOKENIZER))
    if tokenizer.vocab_size != meta["model"]["vocab_size"]:
        raise ValueError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{meta['model']['vocab_size']}; they must come from the same run")
    return tokenizer


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A model ready for inference (eval mode, fp32 master weights) and the checkpoint's meta."""
    meta = read_meta(path)
    model = build_model(ModelConfig(**meta["model"]), device=device)
    load_checkpoint(path, model)
    return model.eval(), meta


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, its tokenizer, meta): what serving and evaluation need from a checkpoint, a local
    directory or a URI of an object store (downloaded to a temp directory first)."""
    if "://" in str(path):
        with tempfile.TemporaryDirectory(prefix="nanoray-ckpt-") as local:
            download(str(path), local)
            return load_for_inference(local, device)
    tokenizer = load_tokenizer(path)  # a missing or mismatched tokenizer fails before the weights load
    model, meta = load_model(path, device)
    return model, tokenizer, meta


def safetensors_shapes(uri: str) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header (a local path or a URI: only the header and the
    file's size are read); ValueError when the header is malformed or the file is shorter than it says."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        size = f.size()
        if size < 8:
            raise ValueError(f"{size} bytes: shorter than a safetensors header")
        length = int.from_bytes(f.read(8), "little")
        if length > size - 8:
            raise ValueError(f"{size} bytes, but its header alone claims {length}")
        header = json.loads(f.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(f"{size} bytes, but its tensors end at byte {8 + length + end}: truncated")
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


def check_for_inference(path: str | os.PathLike) -> dict:
    """Check what load_for_inference would read, without loading the weights (their file's header, the
    tokenizer's text): raises ValueError or FileNotFoundError naming the file and what is wrong with it (a
    truncated model.safetensors, tensors that are not the model's); returns the meta."""
    meta = read_meta(path)
    load_tokenizer(path)
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {k: tuple(v.shape) for k, v in GPT(ModelConfig(**meta["model"])).state_dict().items()}
    weights = join(str(path), WEIGHTS)
    try:
        found = safetensors_shapes(weights)
    except (OSError, ValueError) as e:
        raise ValueError(f"{weights}: unreadable ({e})") from None
    if found != expected:
        name = next(k for k in sorted(expected.keys() | found.keys()) if found.get(k) != expected.get(k))
        raise ValueError(f"{weights}: tensor {name} has shape {found.get(name)}, the model's is {expected.get(name)}")
    return meta
