"""GPU fast paths for the model's hot spots, each with the plain PyTorch path as its fallback and reference.

- `flash_attention`: FlashAttention-4 (the CuTe-DSL `flash_attn.cute` package, Hopper and Blackwell) as a
  torch.library custom op, so torch.compile treats it as one opaque kernel; ~1.5x cuDNN's SDPA on an H100 at
  our shapes (benchmarks/attention_backends.py). Used only when that package imports; set NANORAY_FA4=0 to
  turn it off. It also runs sliding windows natively (SDPA needs a dense mask for those).
- `window_attention`: sliding windows without FA4: PyTorch's FlexAttention with a block mask, which skips the
  blocks outside the window (SDPA's dense mask computes them all). NANORAY_FLEX=0 turns it off.
- `linear_softcap_cross_entropy`: lm_head GEMM, softcap and mean cross-entropy, where one Triton pass over
  each row of logits computes the row's loss *and* its gradient, written over the logits in place (no fp32
  logits, no second pass in the backward); the 1/count and upstream scales are applied to the small GEMM
  outputs of the backward instead of the (tokens x vocab) gradient. In fp8 training the pass writes the
  gradient as float8 e5m2 at a fixed scale instead (half the bytes kept for the backward, and no amax pass
  and cast over it there).
- `relu_square`: ReLU² whose backward reads its output, 2·sqrt(relu(h)²) = 2·relu(h), so the pre-activation
  need not be kept for the backward (4 x width bf16 per token per layer less activation memory).

Everything here falls back to plain PyTorch on CPU (fp32, no Triton), where the tests run.
"""

import os
from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def norm_eps(dtype: torch.dtype) -> float:
    """The epsilon of `nanoray.model.norm` (F.rms_norm's default) for inputs of `dtype`: that of the type it computes
    in, fp32 for bf16 inputs too (not bf16's 2^-7), fp64 for fp64. The fused norms pass it explicitly."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# ---------------------------------------------------------------------------------------------- ReLU²

class _ReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        a = torch.relu(h).square()
        ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return grad * (2 * a.float().sqrt()).to(grad.dtype)


def relu_square(h: Tensor) -> Tensor:
    """relu(h)² that saves only its output for the backward."""
    return _ReluSquare.apply(h)


# ---------------------------------------------------------------------------------------- attention

def _load_fa4():
    """flash_attn.cute's interface module on a Hopper/Blackwell GPU, else None."""
    if os.environ.get("NANORAY_FA4", "1") == "0" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return None
    try:
        from flash_attn.cute import interface
    except Exception:  # not installed, or its CUTLASS DSL does not load here
        return None
    return interface


# Which fast paths this process has, resolved once outside torch.compile (`resolve()`; GPT's constructor
# calls it), so that the traced code only reads constants.
_FAST: dict = {}


def resolve() -> dict:
    if not _FAST:
        fa4 = _load_fa4()
        fused = triton is not None and os.environ.get("NANORAY_FUSED", "1") != "0"
        _FAST.update(fa4=fa4, flash=fa4 is not None, fused_ce=fused, mix_norm=fused, flex=_compiled_flex())
    return _FAST


def _fa4_interface():
    return resolve()["fa4"]


def flash_attention_available(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _FAST.get("flash", False)


def _window_args(window: int) -> dict:
    """Our window w (a query sees keys [pos - w, pos]) as FA's arguments; w < 0 means the whole causal past."""
    return dict(causal=True) if window < 0 else dict(causal=True, window_size_left=window, window_size_right=0)


@torch.library.custom_op("nanoray::flash_attn_fwd", mutates_args=(), device_types="cuda")
def _flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor]:
    out, lse, *_ = _fa4_interface()._flash_attn_fwd(q, k, v, return_lse=True, **_window_args(window))
    return out, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, window):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("nanoray::flash_attn_bwd", mutates_args=(), device_types="cuda")
def _flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    window: int) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, **_window_args(window))
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_setup(ctx, inputs, output):
    q, k, v, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.window = window


def _flash_backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, ctx.window)
    return dq, dk, dv, None


_flash_attn_fwd.register_autograd(_flash_backward, setup_context=_flash_setup)


def flash_attention(q_BTHC: Tensor, k_BTKC: Tensor, v_BTKC: Tensor, window: int) -> Tensor:
    """Causal attention in (B, T, heads, C) layout, softmax scale 1/sqrt(C); window < 0: no window."""
    return _flash_attn_fwd(q_BTHC.contiguous(), k_BTKC.contiguous(), v_BTKC.contiguous(), window)[0]


# ------------------------------------------------------------------------- sliding-window attention

def _compiled_flex():
    """PyTorch's FlexAttention, compiled (eager FlexAttention is a slow reference), on GPUs; else None."""
    if os.environ.get("NANORAY_FLEX", "1") == "0" or not torch.cuda.is_available():
        return None
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)  # compiles at its first call; inlined in compiled models


def flex_window_available(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _FAST.get("flex") is not None


def window_attention(q_BHTC: Tensor, k_BKTC: Tensor, v_BKTC: Tensor, window: int) -> Tensor:
    """Causal attention where a query at position p sees keys [p - window, p] (window_mask's rule), through
    FlexAttention with a block mask: blocks wholly outside the window are skipped, not masked, so an S layer
    (window T/4) does under half of an L layer's attention work. (B, heads, T, C) layout."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    T = q_BHTC.size(-2)
    # Built per call (it evaluates the rule over T x T positions and reduces it to 128-token blocks); inside a
    # compiled model it is traced into the graph. Its share of an SSSL step is not measured yet (fp8_windows.sh).
    block_mask = create_block_mask(in_window, None, None, T, T, device=q_BHTC.device)
    return _FAST["flex"](q_BHTC, k_BKTC, v_BKTC, block_mask=block_mask,
                         enable_gqa=q_BHTC.size(1) != k_BKTC.size(1))


# ---------------------------------------------------------------------------- softcap cross-entropy

if triton is not None:
    @triton.jit
    def _softcap_ce_kernel(logits_ptr, targets_ptr, loss_ptr, grad_ptr, stride, grad_stride, vocab, padded, softcap,
                           grad_scale, BLOCK: tl.constexpr):
        """One row: loss = logsumexp(z) - z[target] with z = softcap·tanh(l / softcap), and the row's
        gradient d loss / d l = (softmax(z) - onehot) · (1 - tanh²), times grad_scale, written to grad's row in
        grad's dtype (0 for an ignored target and for padded columns; grad may be the logits themselves). With
        r = 1 - tanh = 2 / (exp(2l / softcap) + 1): z = softcap - softcap·r and 1 - tanh² = r·(2 - r); |z| <=
        softcap, so exp(z - softcap) needs no running max. The first pass keeps the row in L2 for the second."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        out = grad_ptr + row * grad_stride
        target = tl.load(targets_ptr + row)
        k2 = 2 * 1.4426950408889634 / softcap  # exp(2l / softcap) = exp2(l * k2)
        kz = softcap * 1.4426950408889634
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, padded, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < padded, other=0.0, eviction_policy="evict_last").to(tl.float32)
            r = tl.fdiv(2.0, tl.exp2(x * k2) + 1)
            acc += tl.where(cols < vocab, tl.exp2(-kz * r), 0.0)  # exp(z - softcap)
        lse = softcap + tl.log(tl.sum(acc, axis=0))
        valid = target >= 0
        xt = tl.load(ptr + tl.where(valid, target, 0)).to(tl.float32)
        zt = softcap - softcap * tl.fdiv(2.0, tl.exp2(xt * k2) + 1)
        tl.store(loss_ptr + row, tl.where(valid, lse - zt, 0.0))
        base = (softcap - lse) * 1.4426950408889634
        for start in range(0, padded, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < padded, other=0.0, eviction_policy="evict_first").to(tl.float32)
            r = tl.fdiv(2.0, tl.exp2(x * k2) + 1)
            p = tl.exp2(base - kz * r) - tl.where(cols == target, 1.0, 0.0)
            g = tl.where((cols < vocab) & valid, p * r * (2 - r), 0.0)
            tl.store(out + cols, (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=cols < padded)


def _softcap_ce_launch(logits: Tensor, targets: Tensor, grad: Tensor, vocab: int, softcap: float,
                       grad_scale: float) -> Tensor | None:
    """The Triton kernel where it runs (CUDA): per-row losses, the scaled gradient written to `grad`; else None."""
    if not (logits.is_cuda and triton is not None):
        return None
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _softcap_ce_kernel[(logits.shape[0],)](logits, targets, loss, grad, logits.stride(0), grad.stride(0), vocab,
                                           logits.shape[1], softcap, grad_scale, BLOCK=4096, num_warps=16)
    return loss


def _softcap_ce_reference(logits: Tensor, targets: Tensor, vocab: int, softcap: float) -> tuple[Tensor, Tensor]:
    """The kernel's computation in PyTorch (the CPU path, and the kernel's reference): fp32 per-row losses and
    gradients."""
    padded = logits.shape[1]
    t = torch.tanh(logits.float() / softcap)
    z = (softcap * t).masked_fill(torch.arange(padded, device=logits.device) >= vocab, float("-inf"))
    lse = z.logsumexp(dim=-1)
    valid = targets >= 0
    safe = targets.clamp(min=0)[:, None]
    loss = torch.where(valid, lse - z.gather(1, safe)[:, 0], 0.0)
    p = (z - lse[:, None]).exp().scatter_add(1, safe, -valid[:, None].float())
    return loss, torch.where(valid[:, None], p * (1 - t * t), 0.0)


@torch.library.custom_op("nanoray::softcap_ce_", mutates_args=("logits",))
def _softcap_ce_(logits: Tensor, targets: Tensor, vocab: int, softcap: float) -> Tensor:
    """Per-row losses (fp32); the logits (rows x padded vocab) are overwritten with the per-row gradients."""
    loss = _softcap_ce_launch(logits, targets, logits, vocab, softcap, 1.0)
    if loss is None:
        loss, grad = _softcap_ce_reference(logits, targets, vocab, softcap)
        logits.copy_(grad)
    return loss


@_softcap_ce_.register_fake
def _(logits, targets, vocab, softcap):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


# |d loss / d logit| <= 1 (a probability difference times 1 - tanh²), so a fixed power-of-two scale takes the
# gradient to float8 e5m2 without the amax pass a dynamic cast needs: 2^15 maps 1 below e5m2's largest finite
# 57344, as a dynamic scale does for an amax near 1 (the usual one: some target always has p ~ 0), and scaling by
# a power of two adds no rounding of its own.
E5M2_GRAD_SCALE = 2.0 ** 15


@torch.library.custom_op("nanoray::softcap_ce_e5m2", mutates_args=())
def _softcap_ce_e5m2(logits: Tensor, targets: Tensor, vocab: int, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row losses (fp32) and the per-row gradients times E5M2_GRAD_SCALE in float8 e5m2: half the bytes of
    the bf16 logits they replace (which the caller frees), and the lm_head's backward GEMMs take them as they are."""
    grad = torch.empty(logits.shape, dtype=torch.float8_e5m2, device=logits.device)
    loss = _softcap_ce_launch(logits, targets, grad, vocab, softcap, E5M2_GRAD_SCALE)
    if loss is None:
        loss, g = _softcap_ce_reference(logits, targets, vocab, softcap)
        grad.copy_(g * E5M2_GRAD_SCALE)
    return loss, grad


@_softcap_ce_e5m2.register_fake
def _(logits, targets, vocab, softcap):
    return (logits.new_empty(logits.shape[0], dtype=torch.float32),
            logits.new_empty(logits.shape, dtype=torch.float8_e5m2))


def _same(t: Tensor, role: str) -> Tensor:
    return t


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, w_VD: Tensor, targets_N: Tensor, vocab: int, softcap: float,
                cast: Callable[[Tensor, str], Tensor] | None) -> Tensor:
        c = cast or _same
        logits_NV = c(x_ND, "input") @ c(w_VD, "weight").t()
        scaled_grad = getattr(cast, "scaled_grad", None)
        if scaled_grad is not None:  # fp8: the kernel writes the gradient in e5m2, no cast in the backward
            loss_N, grad_NV = torch.ops.nanoray.softcap_ce_e5m2(logits_NV, targets_N, vocab, softcap)
            ctx.grad_dtype = logits_NV.dtype  # the dtype the backward GEMMs return
        else:
            loss_N = torch.ops.nanoray.softcap_ce_(logits_NV, targets_N, vocab, softcap)  # logits now hold grads
            grad_NV = logits_NV
        count = (targets_N >= 0).sum()
        ctx.save_for_backward(x_ND, w_VD, grad_NV, count)
        ctx.cast = c
        ctx.scaled_grad = scaled_grad
        return loss_N.sum() / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_ND, w_VD, grad_NV, count = ctx.saved_tensors
        c, scale = ctx.cast, grad / count
        if ctx.scaled_grad is not None:
            g_NV = ctx.scaled_grad(grad_NV, E5M2_GRAD_SCALE, ctx.grad_dtype)
        else:
            g_NV = c(grad_NV, "grad")
        dx = ((g_NV @ c(w_VD, "weight")) * scale).to(x_ND.dtype)
        dw = ((g_NV.t() @ c(x_ND, "input")) * scale).to(w_VD.dtype)
        return dx, dw, None, None, None, None


def fused_cross_entropy_available(x: Tensor) -> bool:
    return x.is_cuda and _FAST.get("fused_ce", False)


def linear_softcap_cross_entropy(x_ND: Tensor, w_VD: Tensor, targets_N: Tensor, vocab: int,
                                 softcap: float, cast: Callable[[Tensor, str], Tensor] | None = None) -> Tensor:
    """mean over targets >= 0 of cross_entropy(softcap·tanh((x @ wᵀ)[:, :vocab] / softcap), targets).
    `cast(t, role)`, role "input", "weight" or "grad", gives each GEMM operand in another format (fp8 training's:
    nanoray.fp8); the GEMMs then run in it, dw comes back in w's dtype. A cast with a `scaled_grad(data, scale,
    dtype)` method takes the gradient as float8 e5m2 data times `scale` (which the loss kernel writes directly)."""
    return _LinearSoftcapCE.apply(x_ND, w_VD, targets_N, vocab, softcap, cast)


# ------------------------------------------------------------------ residual mix + RMSNorm (per layer)

if triton is not None:
    @triton.jit
    def _mix_norm_fwd_kernel(xp_ptr, x0_ptr, lam_ptr, x_ptr, xn_ptr, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        a, b = tl.load(lam_ptr), tl.load(lam_ptr + 1)
        xp = tl.load(xp_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        x = (a * xp + b * x0).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        tl.store(xn_ptr + row + cols, (xf * rstd).to(xn_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mix_norm_bwd_kernel(gx_ptr, gxn_ptr, xp_ptr, x0_ptr, lam_ptr, gxp_ptr, gx0_ptr, part_ptr, D, N, eps,
                             BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        row = pid * D
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        a, b = tl.load(lam_ptr), tl.load(lam_ptr + 1)
        xp = tl.load(xp_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        x = (a * xp + b * x0).to(gx_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded x
        rstd = 1 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        xhat = x * rstd
        gxn = tl.load(gxn_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gx_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)
        g += rstd * (gxn - xhat * (tl.sum(gxn * xhat, axis=0) / D))
        tl.store(gxp_ptr + row + cols, (a * g).to(gxp_ptr.dtype.element_ty), mask=mask)
        tl.store(gx0_ptr + row + cols, (b * g).to(gx0_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + pid, tl.sum(g * xp, axis=0))
        tl.store(part_ptr + N + pid, tl.sum(g * x0, axis=0))


def _acc(t: Tensor) -> Tensor:
    """t in its accumulation dtype: fp32 for bf16/fp16/fp32, fp64 for fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _mix(x_prev: Tensor, x0: Tensor, lam: Tensor) -> Tensor:
    return (lam[0] * _acc(x_prev) + lam[1] * _acc(x0)).to(x_prev.dtype)


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and triton is not None


@torch.library.custom_op("nanoray::mix_norm_fwd", mutates_args=())
def _mix_norm_fwd(x_prev: Tensor, x0: Tensor, lam: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if _use_triton(x_prev):
        D = x_prev.shape[-1]
        x, xn = torch.empty_like(x_prev), torch.empty_like(x_prev)
        _mix_norm_fwd_kernel[(x_prev.numel() // D,)](x_prev, x0, lam, x, xn, D, eps,
                                                     BLOCK=triton.next_power_of_2(D), num_warps=4)
        return x, xn
    x = _mix(x_prev, x0, lam)
    xf = _acc(x)
    return x, (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


@_mix_norm_fwd.register_fake
def _(x_prev, x0, lam, eps):
    return torch.empty_like(x_prev), torch.empty_like(x_prev)


@torch.library.custom_op("nanoray::mix_norm_bwd", mutates_args=())
def _mix_norm_bwd(g_x: Tensor, g_xn: Tensor, x_prev: Tensor, x0: Tensor, lam: Tensor,
                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if _use_triton(x_prev):
        D = x_prev.shape[-1]
        N = x_prev.numel() // D
        g_prev, g_x0 = torch.empty_like(x_prev), torch.empty_like(x0)
        partial = torch.empty(2, N, dtype=torch.float32, device=x_prev.device)
        _mix_norm_bwd_kernel[(N,)](g_x.contiguous(), g_xn.contiguous(), x_prev, x0, lam, g_prev, g_x0, partial,
                                   D, N, eps, BLOCK=triton.next_power_of_2(D), num_warps=4)
        return g_prev, g_x0, partial.sum(dim=1)
    x = _acc(_mix(x_prev, x0, lam))
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat, gxn = x * rstd, _acc(g_xn)
    g = _acc(g_x) + rstd * (gxn - xhat * (gxn * xhat).mean(-1, keepdim=True))
    g_lam = torch.stack([(g * _acc(x_prev)).sum(), (g * _acc(x0)).sum()]).to(lam.dtype)
    return (lam[0] * g).to(x_prev.dtype), (lam[1] * g).to(x0.dtype), g_lam


@_mix_norm_bwd.register_fake
def _(g_x, g_xn, x_prev, x0, lam, eps):
    return torch.empty_like(x_prev), torch.empty_like(x0), lam.new_empty(2)


def _mix_norm_setup(ctx, inputs, output):
    x_prev, x0, lam, eps = inputs
    ctx.save_for_backward(x_prev, x0, lam)
    ctx.eps = eps


def _mix_norm_backward(ctx, g_x, g_xn):
    x_prev, x0, lam = ctx.saved_tensors
    g_prev, g_x0, g_lam = _mix_norm_bwd(g_x, g_xn, x_prev, x0, lam, ctx.eps)
    return g_prev, g_x0, g_lam, None


_mix_norm_fwd.register_autograd(_mix_norm_backward, setup_context=_mix_norm_setup)


def mix_norm(x_prev: Tensor, x0: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """x = lam[0]·x_prev + lam[1]·x0 (fp32 math, one rounding) and rms_norm(x), as one pass forward and
    one pass backward (the rms_norm backward, both input grads and both lambda grads: the per-layer
    resid/x0 lambda reductions ride on the pass that reads those tensors anyway). lam: fp32 (2,)."""
    return _mix_norm_fwd(x_prev.contiguous(), x0.contiguous(), lam, norm_eps(x_prev.dtype))


def fused_mix_norm_available(x: Tensor) -> bool:
    return x.is_cuda and _FAST.get("mix_norm", False)


# ------------------------------------------------------------- fp8 MLP backward: ReLU² gradient + casts
# In an fp8 MLP's backward one pass over the (tokens x 4·width) tensors gives the three fp8 operands the weight and
# input gradients' GEMMs read: grad_h = grad_r · 2·relu(h) in e5m2, row-major (for grad x) and transposed (for
# grad W_fc), and relu(h)² in e4m3 transposed (for grad W_proj), each at a scale computed before (grad_h's from
# its amax pass, relu²'s from the forward). The transposed tiles go through shared memory (tl.trans), so every
# store is coalesced; torch.compile's fusion of the same work writes the transposes 1 byte at a stride.
E5M2_MAX, E4M3_MAX = torch.finfo(torch.float8_e5m2).max, torch.finfo(torch.float8_e4m3fn).max
# Who writes the two transposed operands: the kernel ("triton": one pass) or torch's fp8 copies after a kernel that
# writes both row-major ("torch": two more passes over 1-byte data, no transposes in Triton). An A/B while the fused
# fp8 MLP's GPU NaN (nanoray.fp8.MLP) is open: if it is Triton's transposed fp8 stores, "torch" trains.
RELU2_TRANSPOSES = os.environ.get("NANORAY_FP8_MLP_TRANSPOSES", "triton")

if triton is not None:
    @triton.jit
    def _relu2_fp8_bwd_kernel(grad_r_ptr, h_ptr, grad_scale_ptr, r_scale_ptr, gh_ptr, gh_t_ptr, r_t_ptr, M, N,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
        """TRANSPOSED: gh_t and r_t are (N, M), written through tl.trans; else r_t is r, (M, N), and gh_t unused."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        at = rows[:, None].to(tl.int64) * N + cols[None, :]
        g = tl.load(grad_r_ptr + at, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
        a = tl.where(h > 0, h, 0.0)
        # No clamps: the GPU's fp32 -> fp8 conversions saturate (cvt.rn.satfinite), as torchao's clamp does, and
        # min/max beside a transposed fp8 store is what trips Triton's store miscompile (triton-lang/triton#11111).
        # (The ReLU's select still compiles to max.f32, not the max.NaN of that issue: sm_90, Triton 3.6.)
        gh = g * (2.0 * a) * tl.load(grad_scale_ptr)
        r = a * a * tl.load(r_scale_ptr)
        tl.store(gh_ptr + at, gh.to(gh_ptr.dtype.element_ty), mask=mask)
        if TRANSPOSED:
            at_t = cols[:, None].to(tl.int64) * M + rows[None, :]
            mask_t = (cols[:, None] < N) & (rows[None, :] < M)
            # (casting before or after tl.trans compiles to the same PTX: sm_90, Triton 3.6)
            tl.store(gh_t_ptr + at_t, tl.trans(gh.to(gh_t_ptr.dtype.element_ty)), mask=mask_t)
            tl.store(r_t_ptr + at_t, tl.trans(r.to(r_t_ptr.dtype.element_ty)), mask=mask_t)
        else:
            tl.store(r_t_ptr + at, r.to(r_t_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("nanoray::relu2_fp8_bwd", mutates_args=())
def _relu2_fp8_bwd(grad_r: Tensor, h: Tensor, grad_scale: Tensor, r_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    M, N = h.shape
    gh = torch.empty(M, N, dtype=torch.float8_e5m2, device=h.device)
    gh_t = torch.empty(N, M, dtype=torch.float8_e5m2, device=h.device)
    r_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=h.device)
    if _use_triton(h):
        grid = (triton.cdiv(M, 128), triton.cdiv(N, 64))
        if RELU2_TRANSPOSES not in ("triton", "torch"):
            raise ValueError(f"NANORAY_FP8_MLP_TRANSPOSES: 'triton' or 'torch', got {RELU2_TRANSPOSES!r}")
        if RELU2_TRANSPOSES == "triton":
            _relu2_fp8_bwd_kernel[grid](grad_r, h, grad_scale, r_scale, gh, gh_t, r_t, M, N,
                                        BLOCK_M=128, BLOCK_N=64, TRANSPOSED=True, num_warps=8)
        else:
            r = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=h.device)
            _relu2_fp8_bwd_kernel[grid](grad_r, h, grad_scale, r_scale, gh, gh, r, M, N,
                                        BLOCK_M=128, BLOCK_N=64, TRANSPOSED=False, num_warps=8)
            gh_t.copy_(gh.t())
            r_t.copy_(r.t())
        return gh, gh_t, r_t
    a = torch.relu(h.float())
    gh.copy_((grad_r.float() * (2 * a) * grad_scale).clamp(-E5M2_MAX, E5M2_MAX))
    gh_t.copy_(gh.t())
    r_t.copy_((a * a * r_scale).clamp(max=E4M3_MAX).t())
    return gh, gh_t, r_t


@_relu2_fp8_bwd.register_fake
def _(grad_r, h, grad_scale, r_scale):
    M, N = h.shape
    return (h.new_empty(M, N, dtype=torch.float8_e5m2), h.new_empty(N, M, dtype=torch.float8_e5m2),
            h.new_empty(N, M, dtype=torch.float8_e4m3fn))


def relu2_fp8_backward(grad_r: Tensor, h: Tensor, grad_scale: Tensor, r_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For an fp8 MLP's backward, from grad_r = d loss / d relu(h)² and h (both (M, N), bf16) and two fp32 scalar
    scales: grad_h·grad_scale in e5m2 as (M, N) and as its (N, M) transpose, and relu(h)²·r_scale in e4m3 as
    (N, M), each clamped to its format's range (torchao's cast). One pass, a Triton kernel on CUDA."""
    return _relu2_fp8_bwd(grad_r.contiguous(), h.contiguous(), grad_scale, r_scale)
