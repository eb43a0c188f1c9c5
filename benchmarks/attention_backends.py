"""Causal attention forward+backward through each of PyTorch's fused SDPA backends, at our shapes.

    python benchmarks/attention_backends.py            # d12 and d20 gpt2 shapes

One JSON line per (shape, backend): ms per fwd+bwd and TFLOP/s (causal work: half of 4·B·H·T²·C x 3).
"""

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"d12": (32, 6, 2048, 128), "d20": (16, 10, 2048, 128)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def bench(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    for name, (B, H, T, C) in SHAPES.items():
        q, k, v = (torch.randn(B, H, T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, H, T, C, device="cuda", dtype=torch.bfloat16)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        flops = 3 * 4 * B * H * T * T * C / 2  # fwd (2 matmuls) + bwd (4): 3x fwd; causal halves it
        for backend, kind in BACKENDS.items():
            def step():
                with sdpa_kernel([kind]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out.backward(grad)
            try:
                with sdpa_kernel([kind]):
                    err = (F.scaled_dot_product_attention(q, k, v, is_causal=True).float() - ref).norm() / ref.norm()
                ms = bench(step)
                print(json.dumps(dict(shape=name, backend=backend, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                                      rel_err=round(err.item(), 5))))
            except RuntimeError as e:
                print(json.dumps(dict(shape=name, backend=backend, error=str(e).splitlines()[0][:200])))


if __name__ == "__main__":
    main()
