"""The model's GEMMs (forward, input-grad, weight-grad of each projection) at the d12 (64 rows) and d20
(16 rows) micro-batch shapes, through cuBLAS and through cuBLASLt (`torch.backends.cuda.preferred_blas_library`).
One JSON line per (depth, GEMM, library): TFLOP/s. Random bf16 data, median of triton's do_bench.

    python benchmarks/gemm_shapes.py
"""

import json

import torch
from triton.testing import do_bench

DEPTHS = {"d12": (64 * 2048, 768), "d20": (16 * 2048, 1280)}
V = 32768


def main() -> None:
    for depth, (M, D) in DEPTHS.items():
        total = {}
        for name, K, N in (("qkv", D, 3 * D), ("attn_proj", D, D), ("fc", D, 4 * D), ("mlp_proj", 4 * D, D),
                           ("lm_head", D, V)):
            x = torch.randn(M, K, device="cuda").bfloat16()
            w = torch.randn(N, K, device="cuda").bfloat16()
            g = torch.randn(M, N, device="cuda").bfloat16()
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                for kind, fn in (("fwd", lambda: x @ w.t()), ("dgrad", lambda: g @ w), ("wgrad", lambda: g.t() @ x)):
                    ms = do_bench(fn, warmup=50, rep=200)
                    if name != "lm_head":
                        total[lib] = total.get(lib, 0.0) + ms
                    print(json.dumps(dict(depth=depth, gemm=f"{name}.{kind}", lib=lib, ms=round(ms, 3),
                                          tflops=round(2 * M * N * K / ms / 1e9, 1))), flush=True)
            del x, w, g
        print(json.dumps(dict(depth=depth, summary="ms of one layer's GEMMs, fwd+bwd",
                              **{k: round(v, 3) for k, v in total.items()})), flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
