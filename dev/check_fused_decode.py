"""Check nanoray.fused_decode's Triton kernels without a GPU, under Triton's CPU interpreter:

- the tensor-core attention (dot) against the lane attention on the same inputs (cache writes bit-identical, y
  within the bf16 rounding of P), over kv-group sizes, split lengths, windows, value embeddings and tilings;
- the whole step through _linear_kernel (the narrow path) against the cuBLAS-style path (torch.mm), at 20 rows.

The GPU tests (tests/test_gpu.py) compare the kernels with the model; this catches indexing and masking mistakes
before a device call. Needs Triton and a numpy the interpreter works with (numpy 2.3+ breaks its loop bounds):

    python -m venv --system-site-packages /tmp/tri && /tmp/tri/bin/pip install triton==3.6.0 "numpy<2.3"
    TRITON_INTERPRET=1 PYTHONPATH=$PWD /tmp/tri/bin/python dev/check_fused_decode.py      # ~2 min
"""

import math
import os
import types
from unittest import mock

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (module docstring)"

from nanoray import fused_decode  # noqa: E402
from nanoray.model import QK_GAIN, KVCache, ModelConfig, build_model  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention(kind, tiles, H, KVH, window, chunk, has_ve, C=32, T=256, positions=(0, 5, 63, 64, 70, 130, 200, 255)):
    """One layer's attention of len(positions) rows through FusedDecoder._attention on a stand-in decoder:
    (y, k cache, v cache)."""
    torch.manual_seed(0)
    B, D, bf = len(positions), 64, torch.bfloat16
    angles = torch.arange(T)[:, None] * (1.0 / 100 ** (torch.arange(C // 2) / (C // 2)))[None]
    k = torch.randn(1, B, KVH, T, C)
    fd = types.SimpleNamespace(
        H=H, KVH=KVH, C=C, D=D, seq_len=T, qkv=torch.randn(B, (H + 2 * KVH) * C).to(bf),
        cos=angles.cos().to(bf), sin=angles.sin().to(bf), state=torch.zeros(6, B, dtype=torch.long),
        xn=torch.randn(B, D).to(bf), o=torch.zeros(B, H, fused_decode.MAX_SPLITS, C),
        l=torch.zeros(B, H, fused_decode.MAX_SPLITS), count=torch.zeros(B, H, dtype=torch.int32),
        y=torch.zeros(B, H * C, dtype=bf), eps=torch.finfo(bf).eps, bound=QK_GAIN ** 2 * math.sqrt(C) * 1.01,
        pdl=False, attention_kernel=kind, attention_tiles=tiles, chunk=lambda rows: chunk,
        cache=types.SimpleNamespace(k=(k / k.norm(dim=-1, keepdim=True) * QK_GAIN * math.sqrt(C) * 0.9).to(bf),
                                    v=torch.randn(1, B, KVH, T, C).to(bf)),
        layers=[dict(window=window, ve=torch.randn(16, KVH * C).to(bf) if has_ve else None,
                     gate=torch.randn(KVH, 12).to(bf) if has_ve else None)])
    fd.state[0], fd.state[1] = torch.arange(B) + 3, torch.tensor(positions)
    fused_decode.FusedDecoder._attention(fd, B, 0)
    assert int(fd.count.abs().sum()) == 0, "a split counter was not reset"
    return fd.y, fd.cache.k, fd.cache.v


def check_attention() -> None:
    worst = 0.0
    for H, KVH in ((4, 4), (4, 2), (4, 1)):
        for chunk in (64, 128):
            for window, has_ve in ((256, False), (100, True)):
                lanes = attention("lanes", None, H, KVH, window, chunk, has_ve)
                for tiles in ((32, 1, 4), (64, 1, 4), (128, 1, 8)):
                    y, k, v = attention("dot", tiles, H, KVH, window, chunk, has_ve)
                    assert torch.equal(k, lanes[1]) and torch.equal(v, lanes[2]), (H, KVH, chunk, window, tiles)
                    worst = max(worst, rel(y, lanes[0]))
    assert worst < 5e-3, worst
    print(f"attention: dot against lanes, cache writes identical, y within {worst:.1e}")


def check_narrow_path(B: int = 20) -> None:
    config = ModelConfig(vocab_size=512, seq_len=256, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, head_dim=32,
                         window_pattern="SL")
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model = model.eval().prepare_inference(torch.bfloat16)

    def step(narrow_rows, tiles):
        cache = KVCache(config, B, config.seq_len, "cpu", torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
        state = torch.zeros(6, B, dtype=torch.long)
        state[0], state[1] = torch.randint(512, (B,), generator=gen), torch.randint(1, 200, (B,), generator=gen)
        state[4:] = 1
        with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):  # no PDL
            fd = fused_decode.FusedDecoder(model, cache, state, torch.ones(2, B))
        fd.narrow_rows, fd.gemm_tiles = narrow_rows, tiles
        with torch.no_grad():
            return fd.forward(B).clone(), cache.k, cache.v

    wide = step(0, None)
    for tiles in ((16, 32, 128, 4, 3), (32, 64, 64, 4, 3), (64, 32, 64, 4, 3)):
        errors = [rel(a, b) for a, b in zip(step(B, tiles), wide)]
        assert errors[0] < 2e-2 and max(errors[1:]) < 2e-3, (tiles, errors)
        print(f"narrow path at {B} rows, tiles {tiles}: logits, k, v within " + ", ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    with torch.no_grad():
        check_attention()
        check_narrow_path()
