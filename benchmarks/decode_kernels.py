"""GPU time of nanoray.fused_decode's kernels at one depth's shapes: each one-row GEMV (several tile choices),
the attention at 1 and 128 rows, and the whole decode forward, each timed as 20 launches captured in a CUDA
graph (so launch gaps count as they do in the engine's graphs).

    python benchmarks/decode_kernels.py --depth 12        # GPU only

GB/s counts the weight bytes a GEMV reads (or the K/V bytes the attention reads). One JSON line per kernel
and configuration.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoray import fused_decode  # noqa: E402
from nanoray.dial import plan  # noqa: E402
from nanoray.fused_decode import FusedDecoder, _gemv_blocks  # noqa: E402
from nanoray.model import KVCache, ModelConfig, build_model  # noqa: E402

REPS = 20


def graph_us(fn) -> float:
    """Microseconds per call of fn, as REPS calls replayed from one CUDA graph (median of 5 replays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    return sorted(times)[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--position", type=int, default=640, help="each row's position (context) in the attention")
    args = p.parse_args()
    config = ModelConfig(**plan(args.depth, "gpt2").model_kwargs())
    model = build_model(config, device="cuda").prepare_inference(torch.bfloat16)
    rows = 128
    cache = KVCache(config, rows, config.seq_len, "cuda", torch.bfloat16)
    cache.k.normal_(), cache.v.normal_()
    state = torch.zeros(6, rows, dtype=torch.long, device="cuda")
    state[0], state[1], state[4], state[5] = 7, args.position, 1, 1
    fd = FusedDecoder(model, cache, state, torch.ones(2, rows, device="cuda"))
    fd.x.normal_(), fd.h.normal_(), fd.qkv.normal_()
    layer = fd.layers[0]
    base = dict(depth=args.depth, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    shapes = dict(qkv=(fd.x, layer["qkv"], fd.qkv, dict(PRO=1)), fc=(fd.x, layer["fc"], fd.h, dict(PRO=1, EPI=1)),
                  proj=(fd.h, layer["proj"], fd.x, dict(EPI=2)), lm_head=(fd.x, fd.lm_head, fd.logits, dict(PRO=2, EPI=3)))
    for name, (x, w, out, kw) in shapes.items():
        N, K = (config.vocab_size if name == "lm_head" else w.shape[0]), w.shape[1]
        default = _gemv_blocks(N, K)
        configs = {"default": (default, 4), "tile8k": (_gemv_blocks(N, K, 8192), 4),
                   "tile8k_w8": (_gemv_blocks(N, K, 8192), 8), "tile2k": (_gemv_blocks(N, K, 2048), 4),
                   "bn_x2": ((min(64, default[0] * 2), max(16, default[1] // 2)), 4),
                   "bn_half": ((max(2, default[0] // 2), min(4096, default[1] * 2)), 4)}
        for label, (blocks, warps) in configs.items():
            us = graph_us(lambda: fd._linear(x, w, out, 1, blocks=blocks, warps=warps, **kw))
            print(json.dumps(dict(kernel=f"gemv_{name}", config=label, blocks=blocks, warps=warps, us=round(us, 2),
                                  gb_s=round(N * K * 2 / us / 1e3, 1), **base)), flush=True)
    for B in (1, rows):
        for chunk in sorted({fd.chunk(B), 64, 128, 256}):
            kv = 2 * B * config.n_kv_head * args.position * config.head_dim * 2

            def attention():
                fused_decode._attention_kernel[(B, fd.H, triton.cdiv(config.seq_len, chunk))](
                    fd.qkv, fd.cos, fd.sin, state[1], state[0], fd.xn, fd.xn, fd.xn, cache.k[0], cache.v[0], fd.o,
                    fd.lse, cache.k.stride(1), cache.k.stride(2), fd.D, config.seq_len, chunk,
                    fused_decode.MAX_SPLITS, fd.eps, 1.2, 0.1, H=fd.H, KVH=fd.KVH, C=fd.C, HAS_VE=False, VE_CH=12,
                    BLOCK_J=min(chunk, 64), BLOCK_VE=16, num_warps=4)
            us = graph_us(attention)
            print(json.dumps(dict(kernel="attention", rows=B, chunk=chunk, us=round(us, 2),
                                  gb_s=round(kv / us / 1e3, 1), **base)), flush=True)
    for B in (1, 8, rows):
        state[1] = args.position
        us = graph_us(lambda: fd.forward(B))
        print(json.dumps(dict(kernel="forward", rows=B, us=round(us, 2), **base)), flush=True)


if __name__ == "__main__":
    triton = fused_decode.triton
    main()
