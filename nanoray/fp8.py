"""fp8 training: the block matrices run their three GEMMs (forward, input grad, weight grad) in float8 with
dynamic tensorwise scaling, on torchao's float8 training parts (its casts: e4m3 inputs and weights, e5m2 gradients,
one scale per tensor from its current absolute max; its tensor subclass, whose products run torch._scaled_mm; its
GEMM settings). It is the recipe nanochat's --fp8 and torchtitan use; torchao is maintained by the PyTorch team and
composes with torch.compile (the compiled trainer ran it on torch 2.11: benchmarks/RESULTS.md). nanoray's own part
is the autograd function around those parts (`_Float8Matmul`: torchao's, keeping each input's forward scale for
the weight gradient) and the module swap. Attention's q, k and v stay one fused GEMM in fp8 too (the same autograd
function on the concatenated weight: x is cast once, not three times), and the lm_head's three GEMMs run in fp8 inside nanoray's
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

from nanoray.kernels import relu2_fp8_backward
from nanoray.model import GPT, Linear

# Which of the three GEMMs accumulate fast (in lower precision, cuBLAS's CUBLASLT_MATMUL_DESC_FAST_ACCUM): torchao's
# tensorwise recipe, "output"; an experiment (issue 14) adds "grad_input", whose reduction (over out_features) is as
# short as the forward's. "grad_weight" reduces over every token of the batch.
FAST_ACCUM = tuple(os.environ.get("NANORAY_FP8_FAST_ACCUM", "output").split(","))
# Issue 14's A/B: "0" runs torchao's own autograd function (an amax of each input again in backward)
KEEP_INPUT_SCALE = os.environ.get("NANORAY_FP8_KEEP_INPUT_SCALE", "1") == "1"
# "fused": each MLP as one autograd function (`_Float8MLP`, its backward's middle one Triton pass); "modules": two
# Float8Linears with a ReLU² between. Off: on an H100 its training loss went NaN (dev/debug_fused_mlp.py; issue 14;
# NANORAY_FP8_MLP_TRANSPOSES=torch has torch write the transposed operands instead: nanoray.kernels).
MLP = os.environ.get("NANORAY_FP8_MLP", "modules")
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


class _Float8Matmul(torch.autograd.Function):
    """x @ w.T with its three GEMMs in float8: torchao's Float8Linear autograd function (the same casts, tensor
    subclass and GEMM settings, so the same numbers), except that the weight gradient's e4m3 cast of x reuses the
    scale of x's forward cast. torchao's takes a fresh amax of x in backward, and torch.compile keeps that pass
    (it shares the weights' amaxes between forward and backward, not the inputs': seen in the AOT graphs), a read
    of every input again, the MLP's 4 x width ReLU² among them. Arguments as torchao's (w transposed: `w_t`)."""

    @staticmethod
    def forward(ctx, x, w_t, mm_config, config):
        x8 = _cast(x.reshape(-1, x.size(-1)), "input", mm_config, config)
        out = torch.mm(x8, _cast(w_t, "weight", mm_config, config))
        ctx.save_for_backward(x, x8._scale, w_t)
        ctx.mm_config, ctx.config = mm_config, config
        return out.reshape(*x.shape[:-1], out.size(-1))

    @staticmethod
    def backward(ctx, grad):
        x, x_scale, w_t = ctx.saved_tensors
        mm_config, config = ctx.mm_config, ctx.config
        g8 = _cast(grad.reshape(-1, grad.size(-1)), "grad", mm_config, config)
        grad_x = torch.mm(g8, _cast(w_t, "weight", mm_config, config).t())
        grad_w = torch.mm(g8.t(), _cast(x.reshape(-1, x.size(-1)), "input", mm_config, config, scale=x_scale))
        return grad_x.reshape(x.shape), grad_w.t(), None, None


class _Float8MLP(torch.autograd.Function):
    """c_proj(relu(c_fc(x))²) with its six GEMMs in float8, torchao's casts and GEMM settings as `_Float8Matmul`'s,
    as one autograd function so that the backward's middle is one pass (`kernels.relu2_fp8_backward`): grad_h in
    e5m2 in both layouts its two GEMMs read and relu(h)² in e4m3 transposed, written coalesced, where torch.compile
    fuses the same casts with transposed 1-byte stores (1.45 ms a call at d12, 64 rows on an H100, for ~0.9 ms of
    traffic). Saves x, h and the two input scales, as the two `_Float8Matmul`s with a ReLU² between them do."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, mm_config, config):
        x2 = x.reshape(-1, x.size(-1))
        x8 = _cast(x2, "input", mm_config, config)
        h = torch.mm(x8, _cast(w_fc.t(), "weight", mm_config, config))
        r8 = _cast(torch.relu(h).square(), "input", mm_config, config)
        y = torch.mm(r8, _cast(w_proj.t(), "weight", mm_config, config))
        ctx.save_for_backward(x, x8._scale, h, r8._scale, w_fc, w_proj)
        ctx.mm_config, ctx.config = mm_config, config
        return y.reshape(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole
        from torchao.float8.float8_utils import amax_to_scale
        x, x_scale, h, r_scale, w_fc, w_proj = ctx.saved_tensors
        mm_config, config = ctx.mm_config, ctx.config
        grad_dtype = config.cast_config_grad_output.target_dtype
        g8 = _cast(grad.reshape(-1, grad.size(-1)), "grad", mm_config, config)
        grad_r = torch.mm(g8, _cast(w_proj.t(), "weight", mm_config, config).t())
        amax = (grad_r.float() * (2 * torch.relu(h.float()))).abs().max()  # the one pass before the cast
        grad_scale = amax_to_scale(amax, grad_dtype, config.round_scales_to_power_of_2)
        gh, gh_t, r_t = relu2_fp8_backward(grad_r, h, grad_scale, r_scale)

        def fp8(data, scale, role):
            return Float8TrainingTensor(data, scale, grad.dtype, mm_config, role)
        grad_h = fp8(gh, grad_scale, GemmInputRole.GRAD_OUTPUT)
        grad_w_proj = torch.mm(g8.t(), fp8(r_t, r_scale, GemmInputRole.INPUT).t())  # r_t.t(): column-major r
        grad_x = torch.mm(grad_h, _cast(w_fc.t(), "weight", mm_config, config).t())
        x8 = _cast(x.reshape(-1, x.size(-1)), "input", mm_config, config, scale=x_scale)
        grad_w_fc = torch.mm(fp8(gh_t, grad_scale, GemmInputRole.GRAD_OUTPUT), x8)
        return grad_x.reshape(x.shape), grad_w_fc, grad_w_proj, None, None


def _cast(t: torch.Tensor, role: str, mm_config, config, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`t` in float8 with one dynamic scale (or `scale`, one computed before), as torchao's Float8Linear casts its
    GEMM operands: "input" and "weight" to e4m3, "grad" to e5m2 (torchao's tensor subclass: `a @ b` of two runs
    torch._scaled_mm)."""
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole, hp_tensor_and_scale_to_float8
    cast_config, gemm_role = {"input": (config.cast_config_input, GemmInputRole.INPUT),
                              "weight": (config.cast_config_weight, GemmInputRole.WEIGHT),
                              "grad": (config.cast_config_grad_output, GemmInputRole.GRAD_OUTPUT)}[role]
    if scale is not None:
        return hp_tensor_and_scale_to_float8(t, scale, cast_config.target_dtype, mm_config, gemm_role)
    return hp_tensor_to_float8_dynamic(t, cast_config.target_dtype, mm_config, gemm_input_role=gemm_role,
                                       round_scales_to_power_of_2=config.round_scales_to_power_of_2)


def _float8_matmul(config):
    """(x, w) -> x @ w.T in float8 (`_Float8Matmul`) with a torchao Float8Linear's GEMM settings. For the block
    matrices (`Float8Linear`) and for a weight made in forward, which no module holds: the fused q/k/v matrix,
    concatenated from three Parameters, cast to fp8 with one scale."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    mm_config = _mm_config(config)
    function = _Float8Matmul if KEEP_INPUT_SCALE else matmul_with_hp_or_float8_args

    def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return function.apply(x, w.t(), mm_config, config)
    return matmul


def _float8_mlp(config):
    """(x, w_fc, w_proj) -> relu(x @ w_fc.T)² @ w_proj.T in float8 (`_Float8MLP`)."""
    mm_config = _mm_config(config)

    def mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
        return _Float8MLP.apply(x, w_fc, w_proj, mm_config, config)
    return mlp


class Float8Linear(Linear):
    """A block matrix whose GEMMs run in float8 (`_float8_matmul`): holds the very weight Parameter of the Linear it
    replaces, so optimizers, checkpoints and parameter names see no change."""

    def __init__(self, linear: Linear, matmul):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight)


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
        return _cast(t, role, self.mm_config, self.config)

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


def enable_fp8(model: GPT, mlp: str | None = None) -> GPT:
    """Swap the block matrices of `model` for Float8Linears (torchao's tensorwise dynamic scaling), give each
    attention an fp8 fused q/k/v GEMM, each fp8 c_proj a plain ReLU² before it (`_relu_square`) and the fused
    cross-entropy fp8 lm_head operands, in place. The new modules hold the old Parameters, so optimizers and
    checkpoints see the same tensors and names. `mlp`: "modules" or "fused" (default `MLP`)."""
    mlp = mlp or MLP
    if mlp not in ("fused", "modules"):
        raise Fp8Error(f"NANORAY_FP8_MLP: {mlp!r} is neither 'fused' nor 'modules'")
    config = _config(_torchao())
    matmul, fused_mlp = _float8_matmul(config), _float8_mlp(config)
    swaps = []
    for fqn, plain in [(fqn, m) for fqn, m in model.named_modules() if converts(m, fqn)]:
        parent_name, _, name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, name, Float8Linear(plain, matmul))
        swaps.append((parent, name, plain, getattr(parent, name)))
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp.c_proj, Float8Linear):  # its input is cast to fp8
            swaps.append((block.mlp, "activation", block.mlp.activation, _relu_square))
            block.mlp.activation = _relu_square
            if mlp == "fused" and isinstance(block.mlp.c_fc, Float8Linear):
                block.mlp.fused = fused_mlp
                swaps.append((block.mlp, "fused", None, fused_mlp))
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
