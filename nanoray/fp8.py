"""fp8 training: the block matrices run their three GEMMs (forward, input grad, weight grad) in float8 with
dynamic tensorwise scaling, through torchao's float8 training (`torchao.float8.convert_to_float8_training`:
e4m3 inputs and weights, e5m2 gradients, one scale per tensor from its current absolute max, torch._scaled_mm).
It is the recipe nanochat's --fp8 and torchtitan use; torchao is maintained by the PyTorch team and composes
with torch.compile (the compiled trainer ran it on torch 2.11: benchmarks/RESULTS.md), so nanoray does not write
the layer itself.

What stays in bf16: the lm_head (nanoray's fused softcap cross-entropy computes it), the embeddings, the tiny
gates (12 -> heads, 24 -> 1) and everything outside the matmuls. Weights stay fp32 masters, so checkpoints
hold ordinary weights that load without torchao; evaluation runs the same weights through bf16 Linears
(`bf16_linears`), as do CORE and serving (they never convert).

    model = build_model(config, "cuda")
    enable_fp8(model)              # before torch.compile and before the optimizers (same Parameters either way)
    with bf16_linears(model):      # evaluation in bf16
        ...
"""

import contextlib

import torch
import torch.nn as nn

from nanoray.model import GPT, Linear

MIN_FP8_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: the GPUs with fp8 tensor cores
_SWAPS = "_fp8_swaps"  # GPT attribute: [(parent, name, bf16 Linear, fp8 Linear)]


class Fp8Error(ValueError):
    """fp8 asked for where it cannot run; the message names the flag and why."""


def check_fp8(device: torch.device) -> None:
    """Raise Fp8Error unless `device` can train in fp8 (an NVIDIA GPU of compute capability >= 8.9, torchao)."""
    if device.type != "cuda":
        raise Fp8Error(f"--fp8: fp8 training needs an NVIDIA GPU with fp8 tensor cores (compute capability >= 8.9: "
                       f"Ada, Hopper, Blackwell); this worker trains on {device.type}. Leave out --fp8 (plan.fp8)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FP8_CAPABILITY:
        raise Fp8Error(f"--fp8: {torch.cuda.get_device_name(device)} (compute capability "
                       f"{capability[0]}.{capability[1]}) has no fp8 tensor cores; fp8 training needs >= 8.9 "
                       "(Ada, Hopper, Blackwell). Leave out --fp8 (plan.fp8)")
    _torchao()


def _torchao():
    try:  # lazy: torchao is an optional dependency (the fp8 extra)
        import torchao.float8
    except ImportError as e:
        raise Fp8Error(f"--fp8: needs torchao (pip install 'nanoray[fp8]'): {e}") from None
    return torchao.float8


def converts(module: nn.Module, fqn: str) -> bool:
    """Which Linears train in fp8: the blocks' matrices (dims divisible by 16, the smaller >= 128: nanochat's rule),
    not the lm_head, whose GEMM lives inside the fused cross-entropy."""
    if type(module) is not Linear or not fqn.startswith("blocks."):
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0 and min(out_features, in_features) >= 128


def enable_fp8(model: GPT) -> GPT:
    """Swap the block matrices of `model` for torchao Float8Linears (tensorwise dynamic scaling), in place. The
    new modules share the old Parameters, so optimizers and checkpoints see the same tensors and names."""
    float8 = _torchao()
    bf16 = {fqn: m for fqn, m in model.named_modules() if converts(m, fqn)}
    float8.convert_to_float8_training(model, module_filter_fn=converts,
                                      config=float8.Float8LinearConfig.from_recipe_name("tensorwise"))
    swaps = []
    for fqn, plain in bf16.items():
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        swaps.append((parent, name, plain, getattr(parent, name)))
    setattr(model, _SWAPS, swaps)
    return model


def is_fp8(model: nn.Module) -> bool:
    return bool(getattr(model, _SWAPS, None))


@contextlib.contextmanager
def bf16_linears(model: nn.Module):
    """Inside: `model`'s fp8 matrices are its original bf16 Linears again (same weights), for evaluation.
    A no-op for a model without fp8."""
    swaps = getattr(model, _SWAPS, None) or []
    for parent, name, plain, _ in swaps:
        setattr(parent, name, plain)
    try:
        yield model
    finally:
        for parent, name, _, fp8 in swaps:
            setattr(parent, name, fp8)
