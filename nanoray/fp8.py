"""fp8 training: the block matrices run their three GEMMs (forward, input grad, weight grad) in float8 with
dynamic tensorwise scaling, through torchao's float8 training (`torchao.float8.convert_to_float8_training`:
e4m3 inputs and weights, e5m2 gradients, one scale per tensor from its current absolute max, torch._scaled_mm).
It is the recipe nanochat's --fp8 and torchtitan use; torchao is maintained by the PyTorch team and composes
with torch.compile (the compiled trainer ran it on torch 2.11: benchmarks/RESULTS.md), so nanoray does not write
the layer itself. Attention's q, k and v stay one fused GEMM in fp8 too (the same torchao autograd function on the
concatenated weight: x is cast once, not three times), and the lm_head's three GEMMs run in fp8 inside nanoray's
fused softcap cross-entropy, their operands cast by torchao's dynamic cast (where that fused loss runs: GPUs), as
nanochat converts its lm_head; that loss writes its gradient in e5m2 itself (|grad| <= 1: a fixed scale).

What stays in bf16: the embeddings, the tiny gates (12 -> heads, 24 -> 1) and everything outside the matmuls.
Weights stay fp32 masters, so checkpoints hold ordinary weights that load without torchao; evaluation runs the same
weights through bf16 Linears (`bf16_linears`), as do CORE and serving (they never convert).

    model = build_model(config, "cuda")
    enable_fp8(model)              # before torch.compile and before the optimizers (same Parameters either way)
    with bf16_linears(model):      # evaluation in bf16
        ...
"""

import contextlib
import dataclasses
import os

import torch
import torch.nn as nn

from nanoray.model import GPT, Linear

# Which of the three GEMMs accumulate fast (in lower precision, cuBLAS's CUBLASLT_MATMUL_DESC_FAST_ACCUM): torchao's
# tensorwise recipe, "output"; an experiment (issue 14) adds "grad_input", whose reduction (over out_features) is as
# short as the forward's. "grad_weight" reduces over every token of the batch.
FAST_ACCUM = tuple(os.environ.get("NANORAY_FP8_FAST_ACCUM", "output").split(","))
MIN_FP8_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: the GPUs with fp8 tensor cores
_SWAPS = "_fp8_swaps"  # GPT attribute: [(parent, attribute, bf16 value, fp8 value)]


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


_QKV = ("attn.c_q", "attn.c_k", "attn.c_v")  # one fused GEMM in the model (Attention.qkv_linear), not modules


def converts(module: nn.Module, fqn: str) -> bool:
    """Which Linears become Float8Linears: the blocks' output projections and MLP matrices (nanochat's size rule,
    `fits`). Attention's q, k and v run as one fused fp8 GEMM instead, and the lm_head's GEMMs in fp8 inside the
    fused cross-entropy (`enable_fp8`)."""
    return type(module) is Linear and fqn.startswith("blocks.") and not fqn.endswith(_QKV) and fits(module)


def fits(linear: nn.Linear) -> bool:
    """nanochat's rule for an fp8 matrix: both dims divisible by 16, the smaller >= 128 (the small gates stay bf16)."""
    out_features, in_features = linear.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0 and min(out_features, in_features) >= 128


def _float8_matmul(config):
    """(x, w) -> x @ w.T in float8: the autograd function torchao's Float8Linear runs, with a Float8Linear's GEMM
    settings (taken from a template module). For a weight made in forward, which no module holds: the fused q/k/v
    matrix, concatenated from three Parameters, cast to fp8 with one scale."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    mm_config = _mm_config(config)

    def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return matmul_with_hp_or_float8_args.apply(x, w.t(), mm_config, config)
    return matmul


def _mm_config(config):
    """The GEMM settings (fast accumulation or not, per GEMM) a Float8Linear of `config` runs with."""
    from torchao.float8.float8_linear import Float8Linear
    return Float8Linear.from_float(nn.Linear(16, 16, bias=False), config=config).linear_mm_config


class _Float8Operands:
    """(t, role) -> t cast to float8 with one dynamic scale, as Float8Linear casts its GEMM operands: "input" and
    "weight" to e4m3, "grad" to e5m2 (torchao's tensor subclass: `a @ b` of two runs torch._scaled_mm).
    `scaled_grad` wraps a gradient that is already e5m2 at a known scale (the fused cross-entropy writes it so)."""

    def __init__(self, config):
        from torchao.float8.float8_training_tensor import GemmInputRole
        self.mm_config = _mm_config(config)
        self.config = config
        self.roles = {"input": (config.cast_config_input.target_dtype, GemmInputRole.INPUT),
                      "weight": (config.cast_config_weight.target_dtype, GemmInputRole.WEIGHT),
                      "grad": (config.cast_config_grad_output.target_dtype, GemmInputRole.GRAD_OUTPUT)}

    def __call__(self, t: torch.Tensor, role: str) -> torch.Tensor:
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        dtype, gemm_role = self.roles[role]
        return hp_tensor_to_float8_dynamic(t, dtype, self.mm_config, gemm_input_role=gemm_role,
                                           round_scales_to_power_of_2=self.config.round_scales_to_power_of_2)

    def scaled_grad(self, data: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """The gradient whose float8 values are `data` = gradient * `scale` (results of its GEMMs in `dtype`)."""
        from torchao.float8.float8_training_tensor import Float8TrainingTensor
        fp8_dtype, gemm_role = self.roles["grad"]
        assert data.dtype == fp8_dtype, (data.dtype, fp8_dtype)
        return Float8TrainingTensor(data, torch.full((), scale, device=data.device), dtype, self.mm_config,
                                    gemm_role)


def _relu_square(h: torch.Tensor) -> torch.Tensor:
    """ReLU² as plain ops for an fp8 c_proj: its output feeds only the fp8 cast (amax, then the e4m3 values,
    which torch.compile computes from h without writing ReLU²(h) in bf16), and autograd keeps h, the GEMM output
    that exists anyway. nanoray.kernels.relu_square would write and keep ReLU²(h) besides: one more bf16 pass of
    4 x width per token per layer."""
    return torch.relu(h).square()


def enable_fp8(model: GPT) -> GPT:
    """Swap the block matrices of `model` for torchao Float8Linears (tensorwise dynamic scaling), give each
    attention an fp8 fused q/k/v GEMM, each fp8 c_proj a plain ReLU² before it (`_relu_square`) and the fused
    cross-entropy fp8 lm_head operands, in place. The new
    modules share the old Parameters, so optimizers and checkpoints see the same tensors and names."""
    float8 = _torchao()
    config = _config(float8)
    bf16 = {fqn: m for fqn, m in model.named_modules() if converts(m, fqn)}
    float8.convert_to_float8_training(model, module_filter_fn=converts, config=config)
    swaps = []
    for fqn, plain in bf16.items():
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        swaps.append((parent, name, plain, getattr(parent, name)))
    matmul = _float8_matmul(config)
    for i, block in enumerate(model.blocks):
        if f"blocks.{i}.mlp.c_proj" in bf16:  # its input is cast to fp8
            swaps.append((block.mlp, "activation", block.mlp.activation, _relu_square))
            block.mlp.activation = _relu_square
        attn = block.attn
        if all(fits(linear) for linear in (attn.c_q, attn.c_k, attn.c_v)):
            attn.qkv_linear = matmul
            swaps.append((attn, "qkv_linear", None, matmul))
    if fits(model.lm_head):
        model.lm_head_cast = _Float8Operands(config)
        swaps.append((model, "lm_head_cast", None, model.lm_head_cast))
    setattr(model, _SWAPS, swaps)
    return model


def _config(float8):
    """torchao's tensorwise recipe, fast accumulation in the GEMMs `FAST_ACCUM` names."""
    gemms = ("output", "grad_input", "grad_weight")
    if set(FAST_ACCUM) - set(gemms):
        raise Fp8Error(f"NANORAY_FP8_FAST_ACCUM: {','.join(FAST_ACCUM)!r} names GEMMs outside {gemms}")
    config = float8.Float8LinearConfig.from_recipe_name("tensorwise")
    return dataclasses.replace(config, **{f"gemm_config_{gemm}": float8.config.Float8GemmConfig(use_fast_accum=gemm in FAST_ACCUM)
                                          for gemm in gemms})


def is_fp8(model: nn.Module) -> bool:
    return bool(getattr(model, _SWAPS, None))


@contextlib.contextmanager
def bf16_linears(model: nn.Module):
    """Inside: `model`'s fp8 matrices are its original bf16 Linears (and bf16 fused q/k/v and lm_head GEMMs)
    again, same weights, for evaluation.
    A no-op for a model without fp8."""
    swaps = getattr(model, _SWAPS, None) or []
    for parent, name, plain, _ in swaps:
        setattr(parent, name, plain)
    try:
        yield model
    finally:
        for parent, name, _, fp8 in swaps:
            setattr(parent, name, fp8)
