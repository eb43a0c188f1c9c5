"""Checkpoints on disk: what a checkpoint directory holds is known here and nowhere else.

    model.safetensors   the model's parameters (fp32, names of the uncompiled, unwrapped module)
    optimizer.pt        [AdamW state dict, Muon state dict]            (training checkpoints)
    rng.pt              torch (CPU and CUDA), Python and NumPy RNG states
    meta.json           {"plan": RunPlan, "model": ModelConfig, "step", "data": {..., "position"}, "loop", ...}
    tokenizer/          the tokenizer the model was trained with (nanoray.tokenizer's files; tokenizer/tokenizer.json
                        is Hugging Face's, for tools that read that format)

    save_checkpoint(path, model, optimizers, meta, state=LoopState(step=7), tokenizer=tok)
    state = restore(path, model, optimizers)           # training: weights, optimizer, RNG; where the loop was
    model, tokenizer, meta = load_for_inference(path)  # serving, CORE: the model in eval mode and its tokenizer
    meta = check_for_inference(path)                   # the same, checked without loading the weights

Writes are atomic (nanoray.storage.atomic_dir): a crash never leaves a half-written checkpoint behind a valid
name, and one caught between replacing an old checkpoint's two renames is found under its old name.
"""

import hashlib
import json
import math
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors import SafetensorError
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
    wall_time_s: float = Field(0.0, description="seconds the run's worker groups have spent in train() so far "
                               "(setup, steps, evaluations, checkpoints), over every restart")
    train_loss: float = Field(math.nan, description="mean train loss of the last report window")
    val_loss: float = Field(math.nan, description="the latest val loss")
    val_bpb: float = Field(math.nan, description="the latest val bits per byte")
    val_step: int = Field(-1, description="the step of the latest evaluation")
    metrics: dict | None = Field(None, description="the last report (a finished run reports it again)")
    plan: dict = Field({}, description="the RunPlan the checkpoint was trained with")
    data: dict = Field({}, description="the data the checkpoint read: DataSpec fields and the train shards")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file, the checkpoint and what is wrong."""


def rng_state() -> dict:
    """Every RNG's state as tensors, numbers, strings and lists only: what torch.load(weights_only=True) reads
    back (NumPy's key array as a list), so a checkpoint never needs pickle to resume."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=[name, key.tolist(), int(pos), int(has_gauss), float(cached)])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def save_checkpoint(path: str | os.PathLike, model: GPT, optimizers: list[torch.optim.Optimizer] | None,
                    meta: dict, state: LoopState | None = None, tokenizer: Tokenizer | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path. `meta` (JSON) is kept as it is, with the
    model's config, for a training checkpoint the loop `state` (step, data position, loop counters), and the
    SHA-256 of every other file (`files`), which every load checks."""
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
        if tokenizer is not None:  # serving and evaluation need it beside the weights
            tokenizer.save(tmp / TOKENIZER)
        files = {str(f.relative_to(tmp)): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / META).write_text(json.dumps(dict(meta, files=files), indent=2))
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | os.PathLike, meta: dict, names: tuple[str, ...]) -> None:
    """Check files of a local checkpoint against the checksums its meta.json records (a checkpoint from before
    checksums records none: nothing to check); CheckpointError names the file."""
    recorded = meta.get("files")
    if recorded is None:
        return
    for name in names:
        for rel in [r for r in recorded if r == name or r.startswith(name + "/")]:
            f = Path(path) / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: missing from checkpoint {path} (its meta.json lists it)")
            if sha256(f) != recorded[rel]:
                raise CheckpointError(f"{f}: corrupt (its SHA-256 is not the one checkpoint {path} recorded)")


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
    try:
        return json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike, model: GPT, optimizers: list[torch.optim.Optimizer] | None = None,
                    restore_rng: bool = False) -> dict:
    """Load weights (and optimizer/RNG state when asked) into existing objects; returns the meta. Every file is
    checked against the checksum meta.json records, weights must be finite, and nothing is unpickled beyond
    tensors, numbers and containers (torch.load weights_only): a crafted checkpoint cannot run code."""
    path = Path(path)
    meta = read_meta(path)
    if meta["model"] != model.config.model_dump():
        raise ValueError(f"{path}: checkpoint model {meta['model']} does not match {model.config.model_dump()}")
    verify(path, meta, (WEIGHTS,) + ((OPTIMIZER,) if optimizers is not None else ()) + ((RNG,) if restore_rng else ()))
    device = model.wte.weight.device
    try:
        weights = load_file(path / WEIGHTS, device=str(device))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({e})") from None
    bad = next((k for k, v in weights.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path / WEIGHTS}: tensor {bad} holds NaN or infinite values")
    model.load_state_dict(weights)
    if optimizers is not None:
        for opt, state in zip(optimizers, _load_tensors(path / OPTIMIZER, device), strict=True):
            opt.load_state_dict(state)
    if restore_rng:
        set_rng_state(_load_tensors(path / RNG, "cpu"))
    return meta


def _load_tensors(path: Path, device):
    """torch.load without arbitrary pickle (weights_only): what is not tensors, numbers and containers is an
    error naming the file, not code that runs."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a plain tensor file, refused ({str(e).splitlines()[0]})") from None


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
    verify(path, read_meta(path), (TOKENIZER,))
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
    """Check what load_for_inference would read, without loading the weights (their file's header and, for a
    local checkpoint, every file's checksum; the tokenizer's text): raises ValueError or FileNotFoundError naming
    the file and what is wrong with it (a truncated or corrupt model.safetensors, tensors that are not the
    model's); returns the meta."""
    meta = read_meta(path)
    if "://" not in str(path):  # an object store's copy is checked where it is downloaded (load_for_inference)
        verify(path, meta, (WEIGHTS, TOKENIZER))
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
