"""Causal attention forward+backward through each of PyTorch's fused SDPA backends and FlashAttention-4.

    python benchmarks/attention_backends.py            # d12 and d20 gpt2 shapes

One JSON line per (shape, backend): ms per fwd+bwd and TFLOP/s (causal work: half of 4·B·H·T²·C x 3).
`fa4` (flash_attn.cute, see benchmarks/fa4_bundle.sh) runs in the (B, T, H, C) layout the model feeds it.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from nanoray.kernels import _fa4_interface, flash_attention  # noqa: E402

SHAPES = {"d12": (64, 6, 2048, 128), "d20": (16, 10, 2048, 128)}
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
        runs = {}
        for backend, kind in BACKENDS.items():
            def sdpa(kind=kind):
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            runs[backend] = (sdpa, lambda out: out.backward(grad))
        if _fa4_interface() is not None:  # the model's layout: (B, T, H, C)
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            gt = grad.transpose(1, 2).contiguous()
            runs["fa4"] = (lambda: flash_attention(qt, kt, vt, -1).transpose(1, 2), lambda out: out.backward(gt.transpose(1, 2)))
        for backend, (fwd, bwd) in runs.items():
            try:
                with torch.no_grad():
                    err = (fwd().float() - ref).norm() / ref.norm()
                ms = bench(lambda: bwd(fwd()))
                fwd_ms = bench(lambda: fwd())
                print(json.dumps(dict(shape=name, backend=backend, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                                      fwd_tflops=round(flops / 3 / fwd_ms / 1e9, 1), rel_err=round(err.item(), 5))),
                      flush=True)
            except Exception as e:  # a backend that does not support this shape or GPU
                print(json.dumps(dict(shape=name, backend=backend, error=str(e).splitlines()[0][:200])), flush=True)


if __name__ == "__main__":
    main()
