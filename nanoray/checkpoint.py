"""Checkpoints on disk: safetensors weights, optimizer state, RNG state and a JSON meta with the RunPlan.

Layout of one checkpoint directory:

    model.safetensors   the model's parameters (fp32, names of the uncompiled, unwrapped module)
    optimizer.pt        [AdamW state dict, Muon state dict]
    rng.pt              torch (CPU and CUDA), Python and NumPy RNG states
    meta.json           {"plan": RunPlan, "model": ModelConfig, "step": ..., "data": {...}, ...}

Writes are atomic: everything goes into a sibling temp directory that is renamed into place, so a
crash never leaves a half-written checkpoint behind a valid name.
"""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanoray.model import GPT, ModelConfig, build_model

WEIGHTS, OPTIMIZER, RNG, META = "model.safetensors", "optimizer.pt", "rng.pt", "meta.json"


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
                    meta: dict) -> Path:
    """Write a checkpoint directory atomically; returns its path. `meta` must be JSON-serializable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
        if optimizers is not None:
            torch.save([opt.state_dict() for opt in optimizers], tmp / OPTIMIZER)
        torch.save(rng_state(), tmp / RNG)
        meta = dict(meta, model=model.config.model_dump())
        (tmp / META).write_text(json.dumps(meta, indent=2))
        for f in [*tmp.iterdir(), tmp]:  # on disk before the rename makes them the checkpoint
            _fsync(f)
        old = None
        if path.exists():  # move the old one aside first: there is always a complete checkpoint on disk
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(path: Path) -> Path:
    """A checkpoint that a crash caught between its two renames is still whole under its `.old` name."""
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and (old / META).exists():
        os.replace(old, path)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = _recover(Path(path)) / META
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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A model ready for inference from a checkpoint directory, and the checkpoint's meta."""
    meta = read_meta(path)
    model = build_model(ModelConfig(**meta["model"]), device=device)
    load_checkpoint(path, model)
    return model.eval(), meta
