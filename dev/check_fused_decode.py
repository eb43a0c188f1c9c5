"""Check nanoray.fused_decode's Triton kernels without a GPU, under Triton's CPU interpreter: the whole decode step
against the model's per-row cache forward (nanoray.engine.decode_step, bf16 on the CPU), as tests/test_gpu.py does
on a GPU:

- the attention kernel alone against the model's math in torch (nanoray.model's rotary and norm, the gated
  value embedding, attention over each row's window): over kv-group sizes (G = 1, 2, 4), split lengths, windows,
  value embeddings on and off and tilings, rows at positions 0 to 255. The keys and values it writes within
  1.5e-2 and its output within 2e-2 (relative): measured <= 1e-2, a few bf16 roundings, since the interpreter
  truncates fp32 to bf16 where a GPU rounds to nearest; a window 8 keys too long gives 4-6e-2;
- the whole step, through _linear_kernel (the narrow path) and through torch.mm (the wide path) at 20 rows and
  at the attention's tilings at 8 rows, and with balanced attention splits at 20 rows: logits within 2e-2, the
  caches within 2e-3.

Catches indexing and masking mistakes before a device call. Needs Triton and a numpy the interpreter works with
(numpy 2.3+ breaks its loop bounds):

    python -m venv --system-site-packages /tmp/tri && /tmp/tri/bin/pip install triton==3.6.0 "numpy<2.3"
    TRITON_INTERPRET=1 PYTHONPATH=$PWD /tmp/tri/bin/python dev/check_fused_decode.py      # ~2 min
"""

import math
import os
import types
from unittest import mock

import torch
import torch.nn.functional as F
import triton

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (module docstring)"

from nanoray import fused_decode, kernels  # noqa: E402
from nanoray.engine import decode_step  # noqa: E402
from nanoray.model import QK_GAIN, KVCache, ModelConfig, apply_rotary, build_model, norm  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def attention(tiles, H, KVH, window, chunk, has_ve, C=32, T=256, positions=(0, 5, 63, 64, 70, 130, 200, 255),
              splits=None):
    """One layer's attention of len(positions) rows through FusedDecoder._attention on a stand-in decoder, and
    the same in torch: ((y, new keys, new values) of the kernel, the same of the reference)."""
    torch.manual_seed(0)
    B, D, bf = len(positions), 64, torch.bfloat16
    angles = torch.arange(T)[:, None] * (1.0 / 100 ** (torch.arange(C // 2) / (C // 2)))[None]
    k = torch.randn(1, B, KVH, T, C)
    fd = types.SimpleNamespace(
        H=H, KVH=KVH, C=C, D=D, seq_len=T, qkv=torch.randn(B, (H + 2 * KVH) * C).to(bf),
        cos=angles.cos().to(bf), sin=angles.sin().to(bf), state=torch.zeros(6, B, dtype=torch.long),
        xn=torch.randn(B, D).to(bf), o=torch.zeros(B, H, fused_decode.MAX_SPLITS, C),
        l=torch.zeros(B, H, fused_decode.MAX_SPLITS), count=torch.zeros(B, KVH, dtype=torch.int32),
        y=torch.zeros(B, H * C, dtype=bf), eps=kernels.norm_eps(bf), bound=QK_GAIN ** 2 * math.sqrt(C) * 1.01,
        pdl=False, attention_tiles=tiles, attention_splits=splits, chunk=lambda rows: chunk,
        wide_attention_tiles=fused_decode.FusedDecoder.wide_attention_tiles,
        cache=types.SimpleNamespace(k=(k / k.norm(dim=-1, keepdim=True) * QK_GAIN * math.sqrt(C) * 0.9).to(bf),
                                    v=torch.randn(1, B, KVH, T, C).to(bf)),
        layers=[dict(window=window, ve=torch.randn(B + 3, KVH * C).to(bf) if has_ve else None,
                     gate=torch.randn(KVH, 12).to(bf) if has_ve else None)])
    pos = torch.tensor(positions)
    fd.state[0], fd.state[1] = torch.arange(B) + 3, pos
    k_cache, v_cache = fd.cache.k[0].clone(), fd.cache.v[0].clone()
    fused_decode.FusedDecoder._attention(fd, B, 0)
    assert int(fd.count.abs().sum()) == 0, "a split counter was not reset"
    rows = torch.arange(B)
    got = fd.y, fd.cache.k[0, rows, :, pos], fd.cache.v[0, rows, :, pos]

    # the reference: nanoray.model's Attention on one token per row (its per-row cache path), in bf16
    q, k, v = fd.qkv.view(B, 1, H + 2 * KVH, C).split([H, KVH, KVH], dim=2)
    cos, sin = fd.cos[pos][:, None, None], fd.sin[pos][:, None, None]
    q, k = norm(apply_rotary(q, cos, sin)) * QK_GAIN, norm(apply_rotary(k, cos, sin)) * QK_GAIN
    if has_ve:
        layer = fd.layers[0]
        gate = 3 * torch.sigmoid(F.linear(fd.xn[:, :12], layer["gate"]))
        v = v + gate[:, None, :, None] * layer["ve"][fd.state[0]].view(B, 1, KVH, C)
    k_cache[rows, :, pos], v_cache[rows, :, pos] = k[:, 0], v[:, 0]
    keys = torch.arange(T)
    mask = (keys[None] <= pos[:, None]) & (keys[None] >= pos[:, None] - window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k_cache.float(), v_cache.float(),
                                       attn_mask=mask[:, None, None], enable_gqa=H != KVH)
    return got, (y.transpose(1, 2).reshape(B, H * C), k[:, 0], v[:, 0])


def check_attention() -> None:
    worst = [0.0, 0.0, 0.0]
    for H, KVH in ((4, 4), (4, 2), (4, 1)):
        for chunk in (64, 128):
            for window, has_ve in ((256, False), (100, True)):
                for tiles in (None, (32, 1, 4), (128, 1, 8)):
                    got, ref = attention(tiles, H, KVH, window, chunk, has_ve)
                    errors = [rel(a, b) for a, b in zip(got, ref)]
                    assert errors[0] < 2e-2 and max(errors[1:]) < 1.5e-2, (H, KVH, chunk, window, tiles, errors)
                    worst = [max(w, e) for w, e in zip(worst, errors)]
    # balanced splits (above NARROW rows): each row's window in `splits` equal parts, rows at 20 positions
    positions = tuple(range(0, 256, 13)) + (255,)
    assert len(positions) > fused_decode.NARROW
    for H, KVH in ((4, 4), (4, 2)):
        for splits, window, has_ve in ((1, 256, False), (3, 256, False), (7, 100, True)):
            got, ref = attention(None, H, KVH, window, 64, has_ve, positions=positions, splits=splits)
            errors = [rel(a, b) for a, b in zip(got, ref)]
            assert errors[0] < 2e-2 and max(errors[1:]) < 1.5e-2, (H, KVH, splits, window, errors)
            worst = [max(w, e) for w, e in zip(worst, errors)]
    print("attention against the model's math: y, new keys, new values within " + ", ".join(f"{e:.1e}" for e in worst))


def check_softcap() -> None:
    """The wide path's lm_head epilogue (NB blocks a program) against torch: logits, each 32-wide block's max,
    sum-exp and argmax, at vocabularies that do and do not fill the last program or the last block."""
    gen = torch.Generator().manual_seed(0)
    for V, B in ((512, 3), (1000, 2), (32768, 2)):
        n_blocks = triton.cdiv(V, 32)
        logits_bf = (20 * torch.randn(B, V, generator=gen)).bfloat16()
        out, stats = torch.zeros(B, V), torch.zeros(B, n_blocks, 3)
        fused_decode._softcap_kernel[(triton.cdiv(n_blocks, 64), B)](logits_bf, V, out, stats, V, n_blocks, 15.0,
                                                                     BLOCK_N=32, NB=64)
        z = 15.0 * torch.tanh(logits_bf.float() / 15.0)
        blocks = torch.full((B, n_blocks * 32), -float("inf"))
        blocks[:, :V] = z
        top, arg = blocks.view(B, n_blocks, 32).max(-1)
        sum_exp = (blocks.view(B, n_blocks, 32) - top[..., None]).exp().sum(-1)
        assert (out - z).abs().max() < 1e-5 and (stats[..., 0] - top).abs().max() < 1e-5, V
        assert ((stats[..., 1] - sum_exp).abs() / sum_exp).max() < 1e-5, V
        assert torch.equal(stats[..., 2].long(), arg + 32 * torch.arange(n_blocks)), V
    print("softcap epilogue: logits and block stats match torch")


def served_model(n_kv_head: int):
    """A 2-layer bf16 model, layer 0 a short window (pattern SL), value embeddings where the model puts them,
    weights perturbed off their init (zero-initialized projections would hide mistakes)."""
    config = ModelConfig(vocab_size=512, seq_len=256, n_layer=2, n_embd=128, n_head=4, n_kv_head=n_kv_head,
                         head_dim=32, window_pattern="SL")
    torch.manual_seed(0)
    model = build_model(config, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model.eval().prepare_inference(torch.bfloat16)


def steps(model, B: int, **settings) -> list[tuple[torch.Tensor, ...]]:
    """(logits, k cache, v cache) of one fused step of B rows at random positions (the first at 0, the last at
    255), with FusedDecoder `settings`, and of the model's cache forward on the same inputs."""
    config, gen = model.config, torch.Generator().manual_seed(B)
    caches = [KVCache(config, B, config.seq_len, "cpu", torch.bfloat16) for _ in range(2)]
    k, v = torch.randn(caches[0].k.shape, generator=gen), torch.randn(caches[0].v.shape, generator=gen)
    for cache in caches:
        cache.k.copy_(k), cache.v.copy_(v)
    state = torch.zeros(6, B, dtype=torch.long)
    state[0], state[1] = torch.randint(512, (B,), generator=gen), torch.randint(1, 255, (B,), generator=gen)
    state[1, 0], state[1, -1] = 0, 255
    state[4:] = 1
    tokens, positions = state[0].clone(), state[1].clone()
    with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):  # no PDL
        fd = fused_decode.FusedDecoder(model, caches[0], state, torch.ones(2, B))
    for name, value in settings.items():
        setattr(fd, name, value)
    with torch.no_grad(), mock.patch("nanoray.model.compute_dtype", return_value=torch.bfloat16):  # as on a GPU
        got = fd.forward(B).clone()
        ref = decode_step(model, caches[1], tokens, positions, config.seq_len)
    assert int(fd.count.abs().sum()) == 0, "a split counter was not reset"
    return [(got, caches[0].k, caches[0].v), (ref, caches[1].k, caches[1].v)]


def check(label: str, model, B: int, **settings) -> None:
    got, ref = steps(model, B, **settings)
    errors = [rel(a, b) for a, b in zip(got, ref)]
    assert errors[0] < 2e-2 and max(errors[1:]) < 2e-3, (label, settings, errors)
    print(f"{label}: logits, k, v within " + ", ".join(f"{e:.1e}" for e in errors), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        check_softcap()
        check_attention()
    for n_kv_head in (4, 2, 1):
        model = served_model(n_kv_head)
        for chunk in (64, 128):
            for tiles in (None, (32, 1, 4), (128, 1, 8)):
                label = f"step at 8 rows, G {4 // n_kv_head}, chunk {chunk}, attention tiles {tiles or 'default'}"
                check(label, model, 8, chunk=lambda rows, chunk=chunk: chunk, attention_tiles=tiles)
    model = served_model(2)
    check("wide path (torch.mm) at 20 rows", model, 20)
    check("wide path at 20 rows, 3 balanced attention splits", model, 20, attention_splits=3)
    for tiles in ((16, 32, 128, 4, 3), (32, 64, 64, 4, 3), (64, 32, 64, 4, 3)):
        check(f"narrow path at 20 rows, tiles {tiles}", model, 20, narrow_rows=20, gemm_tiles=tiles)
