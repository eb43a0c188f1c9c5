"""The GPT: nanochat's modern architecture (reference/nanochat-facts.md §2), written for torch.compile.

Token embedding -> RMSNorm -> smear (bigram gate) -> L blocks with learned residual/x0 mixing
-> backout -> RMSNorm -> untied lm_head -> softcap 15 -> cross-entropy. Blocks are pre-norm,
bias-free and norm-parameter-free: attention with rotary (base 100k), QK-norm (x1.2), value
embeddings on every other layer, and a ReLU² MLP. Attention runs through FlashAttention-4 when
installed, else PyTorch's fused SDPA (full-context layers) and FlexAttention (sliding-window layers).

On a GPU, nanoray/kernels.py supplies fused paths (Triton): each layer's residual/x0 mix with its
RMSNorm, and lm_head + softcap + cross-entropy computing loss and gradient in one pass; the plain
PyTorch code below stays the CPU path and the reference the GPU tests compare against.

Dtypes: parameters stay fp32 (the master weights); on a bf16-capable GPU activations are bf16 and
each Linear casts its weight on the fly; the resid/x0 lambdas multiply in fp32 (as nanochat's do);
logits and the loss are fp32. On CPU everything is fp32.

Shape legend: B batch, T time (sequence), D model width, H heads, K kv heads, C head dim, V vocab.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanoray.hardware import compute_dtype
from nanoray import kernels
from nanoray.kernels import (flash_attention, flash_attention_available, flex_window_available,
                             fused_cross_entropy_available, fused_mix_norm_available, linear_softcap_cross_entropy,
                             mix_norm, relu_square, window_attention)

SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding
VE_GATE_CHANNELS = 12  # value-embedding gates read the first 12 channels of the block input
SOFTCAP = 15.0
ROPE_BASE = 100_000
QK_GAIN = 1.2  # "sharper attention" after QK-norm
SHORT_WINDOW_ROUND = 128  # an S layer sees ceil(T/4) tokens, rounded up to a multiple of this
VOCAB_PAD = 64  # embedding and lm_head rows are padded to a multiple of this


class ModelConfig(BaseModel):
    """The network's shape (the dial's RunPlan carries one as `plan.model`)."""

    model_config = ConfigDict(frozen=True)
    vocab_size: int = Field(description="tokenizer vocabulary, special tokens included")
    seq_len: int = Field(description="context length in tokens")
    n_layer: int = Field(description="transformer blocks (the depth)")
    n_embd: int = Field(description="model width")
    n_head: int = Field(description="query heads")
    n_kv_head: int = Field(description="key/value heads")
    head_dim: int = Field(description="channels per head")
    window_pattern: str = Field("L", description="per-layer attention window, tiled: L = full context, S = quarter")

    @field_validator("window_pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        if not pattern or set(pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern: must be a non-empty string of S and L, got {pattern!r}")
        return pattern

    @property
    def windows(self) -> tuple[int, ...]:
        """Attention window of each layer, in tokens."""
        return layer_windows(self.n_layer, self.seq_len, self.window_pattern)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab(self.vocab_size)


def layer_windows(n_layer: int, seq_len: int, pattern: str) -> tuple[int, ...]:
    """Window of each layer: the pattern tiled over layers, last layer always full context."""
    short = -(-seq_len // 4 // SHORT_WINDOW_ROUND) * SHORT_WINDOW_ROUND
    windows = [seq_len if pattern[i % len(pattern)] == "L" else min(short, seq_len) for i in range(n_layer)]
    windows[-1] = seq_len
    return tuple(windows)


def value_embedding_layers(n_layer: int) -> list[int]:
    """Layers with a value embedding: every other one, always including the last."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_PAD) * VOCAB_PAD


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free Linear whose fp32 master weight is cast to the activation dtype in forward."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x_BTHC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; cos/sin are (1, T, 1, C/2)."""
    x1, x2 = x_BTHC.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer for decoding, plus each row's last normed embedding (for the smear).

    `pos` says where the next tokens go: an int shared by all rows (prefill, single-sequence decode; forward
    advances it), or a (B,) tensor of per-row positions for a one-token step in which every row is at its own
    length (continuous batching: each row is a request's slot; the caller sets and advances it).

    The tensors are always the whole cache; `rows` and `length` say which rows and positions of them a forward
    uses, and each write and read indexes the whole tensors. So a compiled decode step mutates its inputs in
    place (a write through a view of an input, even one layer picked by an int, copies the cache each step)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.prev_emb = torch.zeros(batch_size, 1, config.n_embd, device=device, dtype=dtype)
        self.rows, self.length = slice(0, batch_size), max_len
        self.pos: int | torch.Tensor = 0
        self._masks: dict[int, torch.Tensor] = {}

    def view(self, rows: slice, length: int, pos: int | torch.Tensor) -> "KVCache":
        """Rows `rows` (a slice with start and stop) and the first `length` positions of this cache, at `pos`.
        A plain constructor call, so torch.compile traces it (torch 2.11's dynamo breaks the graph at copy.copy)."""
        return _CacheView(self.k, self.v, self.prev_emb, rows, length, pos)

    @property
    def per_row(self) -> bool:
        return isinstance(self.pos, torch.Tensor)

    def row_mask(self, window: int) -> torch.Tensor:
        """(B, 1, 1, S): the keys each row's new token sees (per-row positions); built once per window."""
        if window not in self._masks:
            self._masks[window] = window_mask(1, self.length, self.pos.view(-1, 1, 1, 1), window, self.k.device)
        return self._masks[window]


class _CacheView(KVCache):
    """A KVCache sharing another's tensors (KVCache.view)."""

    def __init__(self, k, v, prev_emb, rows: slice, length: int, pos: int | torch.Tensor):
        self.k, self.v, self.prev_emb = k, v, prev_emb
        self.rows, self.length, self.pos = rows, length, pos
        self._masks = {}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, has_value_embedding: bool):
        super().__init__()
        self.layer, self.window = layer, config.windows[layer]
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head) if has_value_embedding else None
        self.w_qkv: torch.Tensor | None = None  # set by GPT.prepare_inference
        self.qkv_linear = None  # (x, w) -> x @ w.T for the fused q/k/v GEMM: set by fp8 training (nanoray.fp8)

    def forward(self, x_BTD, ve_BTKC, cos, sin, cache: KVCache | None):
        B, T, _ = x_BTD.shape
        # One GEMM for q, k and v (wider N, one dgrad instead of three plus two adds, in fp8 one cast of x); the
        # weights stay separate parameters, so Muon orthogonalizes each matrix on its own as nanochat does.
        w_qkv = self.w_qkv if self.w_qkv is not None else \
            torch.cat([self.c_q.weight, self.c_k.weight, self.c_v.weight])
        qkv = F.linear(x_BTD, w_qkv.to(x_BTD.dtype)) if self.qkv_linear is None else self.qkv_linear(x_BTD, w_qkv)
        q, k, v = qkv.split([self.c_q.out_features, self.c_k.out_features, self.c_v.out_features], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:  # ResFormer value embedding, gated per kv head in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x_BTD[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve_BTKC
        q = norm(apply_rotary(q, cos, sin)) * QK_GAIN
        k = norm(apply_rotary(k, cos, sin)) * QK_GAIN
        if cache is None and flash_attention_available(q):  # FlashAttention-4, (B, T, H, C) layout
            y = flash_attention(q, k, v, -1 if self.window >= T - 1 else self.window)
            return self.c_proj(y.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, C) for SDPA
        gqa = self.n_head != self.n_kv_head
        if cache is None:
            if self.window >= T - 1:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            elif flex_window_available(q):  # an S layer on a GPU without FA4: skips the blocks outside the window
                y = window_attention(q, k, v, self.window)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, T, 0, self.window, q.device),
                                                   enable_gqa=gqa)
        elif cache.per_row:  # one new token per row, each row at its own position
            rows_B = torch.arange(cache.rows.start, cache.rows.stop, device=q.device)
            layer_B = torch.full_like(rows_B, self.layer)  # a tensor, not an int (a view): written in place
            cache.k[layer_B, rows_B, :, cache.pos] = k[:, :, 0]
            cache.v[layer_B, rows_B, :, cache.pos] = v[:, :, 0]
            k = cache.k[self.layer, cache.rows, :, :cache.length]
            v = cache.v[self.layer, cache.rows, :, :cache.length]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.row_mask(self.window), enable_gqa=gqa)
        else:
            start, end = cache.pos, cache.pos + T
            cache.k[self.layer, cache.rows, :, start:end] = k
            cache.v[self.layer, cache.rows, :, start:end] = v
            k, v = cache.k[self.layer, cache.rows, :, :end], cache.v[self.layer, cache.rows, :, :end]
            if T == 1 and self.window >= end - 1:  # one new token that sees the whole cache: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif start == 0 and self.window >= T - 1:  # a prefill: causal, the fused kernels need no mask
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, end, start, self.window, q.device),
                                                   enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


def window_mask(n_query: int, n_key: int, offset: int, window: int, device) -> torch.Tensor:
    """Boolean (n_query, n_key) mask: query i (at position offset + i) sees keys in [pos - window, pos],
    like FlashAttention's window_size=(window, 0). A (B, 1, 1, 1) tensor offset gives a (B, 1, n_query, n_key)
    mask, one per row."""
    pos = torch.arange(n_query, device=device)[:, None] + offset
    key = torch.arange(n_key, device=device)[None, :]
    return (key <= pos) & (key >= pos - window)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        # ReLU² saving its output (bf16 c_proj reads that output anyway); fp8 training sets a plain ReLU² instead,
        # whose output only the fp8 cast reads, so the compiler fuses the two (nanoray.fp8)
        self.activation = relu_square
        self.fused = None  # (x, w_fc, w_proj) -> the MLP as one autograd function: set by fp8 training (nanoray.fp8)

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x, self.c_fc.weight, self.c_proj.weight)
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, has_value_embedding: bool):
        super().__init__()
        self.attn = Attention(config, layer, has_value_embedding)
        self.mlp = MLP(config)

    def forward(self, x, x_normed, ve, cos, sin, cache):
        x = x + self.attn(x_normed, ve, cos, sin, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        kernels.resolve()  # which GPU fast paths exist here, decided before torch.compile traces forward
        self.config = config
        L, D, V = config.n_layer, config.n_embd, padded_vocab(config.vocab_size)
        kv_dim = config.n_kv_head * config.head_dim
        self.ve_layers = value_embedding_layers(L)
        self.wte = nn.Embedding(V, D)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in self.ve_layers})
        self.blocks = nn.ModuleList(Block(config, i, i in self.ve_layers) for i in range(L))
        self.lm_head = Linear(D, V)
        self.lm_head_cast = None  # the fused cross-entropy's GEMM operands in fp8: set by fp8 training (nanoray.fp8)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.rotary_len = 10 * config.seq_len
        cos, sin = self._rotary(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary(self, length: int, device=None):
        C = self.config.head_dim
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, C, 2, dtype=torch.float32, device=device) / C)
        freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, seed: int = 42) -> "GPT":
        """nanochat's init (facts §2). Also recomputes the rotary tables (lost on meta-device builds)."""
        gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        L, D = self.config.n_layer, self.config.n_embd
        s = math.sqrt(3) / math.sqrt(D)
        self.wte.weight.normal_(0, 0.8, generator=gen)
        self.lm_head.weight.normal_(0, 0.001, generator=gen)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                lin.weight.uniform_(-s, s, generator=gen)
            block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s, generator=gen)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.uniform_(0, 0.02, generator=gen)
        for emb in self.value_embeds.values():
            emb.weight.uniform_(-s, s, generator=gen)
        depth_frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        self.smear_gate.weight.uniform_(0, 0.02, generator=gen)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        self.cos, self.sin = self._rotary(self.rotary_len, device=self.wte.weight.device)
        return self

    @torch.no_grad()
    def prepare_inference(self, dtype: torch.dtype) -> "GPT":
        """For serving, in place: matrices and embeddings cast to `dtype` once (scalars stay fp32, as in
        training's math) and each layer's q/k/v weights made views of one fused matrix, so a decode step
        reads every weight once, with no per-step cast or concatenation. Not for training afterwards."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.data = module.weight.data.to(dtype)
        for block in self.blocks:
            attn = block.attn
            parts = (attn.c_q, attn.c_k, attn.c_v)
            attn.w_qkv = torch.cat([lin.weight for lin in parts])
            for lin, w in zip(parts, attn.w_qkv.split([lin.out_features for lin in parts])):
                lin.weight.data = w
        return self.eval()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: the N of tokens = ratio x N."""
        return sum(p.numel() for p in self.blocks.parameters()) + self.lm_head.weight.numel()

    def num_matmul_params(self) -> int:
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul weight + QK^T and AV over each layer's window."""
        attn = sum(12 * self.config.n_head * self.config.head_dim * min(w, self.config.seq_len)
                   for w in self.config.windows)
        return 6 * self.num_matmul_params() + attn

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, loss_reduction: str = "mean",
                at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or the loss when targets are given (ignore_index -1). With
        `at` = (rows, positions), two index tensors of length N, only the logits there: (N, vocab)
        (scoring a few positions of long prompts skips most of the lm_head and the fp32 logits)."""
        B, T = idx_BT.shape
        dtype = compute_dtype(idx_BT.device)
        if cache is not None and cache.per_row:  # per-row positions, one token each
            cos, sin = self.cos[0, cache.pos].unsqueeze(1).to(dtype), self.sin[0, cache.pos].unsqueeze(1).to(dtype)
        else:
            start = cache.pos if cache is not None else 0
            cos = self.cos[:, start:start + T].to(dtype)
            sin = self.sin[:, start:start + T].to(dtype)

        x0 = norm(self.wte(idx_BT).to(dtype))
        # Smear: x_t += lambda * sigmoid(w . x_t[:24]) * x_{t-1}, a cheap learned bigram.
        gate = self.smear_lambda.to(dtype) * torch.sigmoid(self.smear_gate(x0[..., :SMEAR_CHANNELS]))
        prev = x0[:, :-1]
        if cache is not None:
            if cache.per_row or cache.pos > 0:
                prev = torch.cat([cache.prev_emb[cache.rows], prev], dim=1)
            cache.prev_emb[cache.rows] = x0[:, -1:]
        if prev.size(1) == T:
            x0 = x0 + gate * prev
        else:  # first position of a sequence has no predecessor
            x0 = torch.cat([x0[:, :1], x0[:, 1:] + gate[:, 1:] * prev], dim=1)

        x, backout = x0, None
        lambdas = torch.stack([self.resid_lambdas, self.x0_lambdas], dim=1)  # (L, 2), fp32 like nanochat's
        for i, block in enumerate(self.blocks):
            if fused_mix_norm_available(x):  # one pass each way, lambda grads included
                x, x_normed = mix_norm(x, x0, lambdas[i])
            else:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                x_normed = norm(x)
            ve = self.value_embeds[str(i)](idx_BT).to(dtype).view(B, T, self.config.n_kv_head, -1) \
                if str(i) in self.value_embeds else None
            x = block(x, x_normed, ve, cos, sin, cache)
            if i == self.config.n_layer // 2:
                backout = x
        x = norm(x - self.backout_lambda.to(dtype) * backout)
        if cache is not None and not cache.per_row:
            cache.pos += T

        if targets_BT is not None and loss_reduction == "mean" and torch.is_grad_enabled() \
                and fused_cross_entropy_available(x):  # one Triton pass: loss and grad, no fp32 logits
            w = self.lm_head.weight if self.lm_head_cast else self.lm_head.weight.to(dtype)  # fp8 casts the fp32
            return linear_softcap_cross_entropy(x.view(B * T, -1), w, targets_BT.reshape(-1),
                                                self.config.vocab_size, SOFTCAP, self.lm_head_cast)
        if at is not None:
            x = x[at]
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets_BT is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets_BT.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        return loss if loss_reduction == "mean" else loss.view(B, T)


def build_model(config: ModelConfig, device: torch.device | str = "cpu", seed: int = 42) -> GPT:
    """Build on the meta device (no wasted init), materialize on `device`, then initialize."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    return model.init_weights(seed)
