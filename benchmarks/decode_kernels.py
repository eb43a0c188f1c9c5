"""GPU time of nanoray.fused_decode's kernels at one depth's shapes: each one-row GEMV (the default tiles and
a few others), the attention at 1 and 128 rows (several split lengths), and the whole decode forward (without and
with programmatic dependent launch, where the GPU has it), each timed as 20 launches captured in a CUDA graph (so
launch gaps count as they do in the engine's graphs).

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

from nanoray.dial import plan  # noqa: E402
from nanoray.fused_decode import FusedDecoder  # noqa: E402
from nanoray.model import KVCache, build_model  # noqa: E402

REPS = 20
WIDE_ROWS = 128  # the bar's concurrent streams
GEMV_TILES = [(1, 2048), (1, 8192), (2, 2048), (2, 4096), (4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 512),
              (32, 256)]
LM_HEAD_TILES = [(32, 128, 4), (32, 512, 4), (32, 256, 8), (64, 128, 4), (64, 256, 8)]
# _linear_kernel at many rows: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
GEMM_TILES = [(16, 32, 128, 4, 3), (32, 32, 128, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 32, 64, 4, 3)]
# the attention's (BLOCK_J, stages, warps)
# the attention's (BLOCK_J, stages, warps), besides the default (None), at 1 row and at 128
ATTENTION_TILES = {1: [(64, 3, 8), (32, 2, 4)], 128: [(64, 4, 8), (64, 5, 8), (64, 3, 4), (32, 4, 4)]}
ATTENTION_CHUNKS = {1: (64, 128, 256, 1024), 128: (256, 512, 1024)}
# at 128 rows also each row's window in this many equal splits (FusedDecoder.attention_splits)
ATTENTION_SPLITS = [1, 2, 3, 4, 6]


def graph_us(fn) -> float:
    """Microseconds per call of fn, as REPS calls replayed from one CUDA graph (median of 5 replays); inf, with
    the error on stderr, where a configuration does not compile or run (the sweep goes on)."""
    try:
        return _graph_us(fn)
    except Exception as e:  # noqa: BLE001 - a tiling that does not fit (shared memory, registers) is a result too
        print(f"failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        return float("inf")


def _graph_us(fn) -> float:
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
    p.add_argument("--forward-only", action="store_true", help="only the whole step (rows 1, 8, 128)")
    p.add_argument("--attention-only", action="store_true", help="only the attention sweeps")
    p.add_argument("--forward-sweep", action="store_true",
                   help="the one-row GEMV tiles chosen by the whole forward's time (coordinate descent, a shape "
                   "at a time): what the engine runs, weights from HBM and streaming under PDL")
    p.add_argument("--gemv-sweep", action="store_true",
                   help="time every GEMV at %d tilings; the whole step then also runs with each shape's fastest"
                   % len(GEMV_TILES))
    args = p.parse_args()
    config = plan(args.depth, "gpt2").model
    model = build_model(config, device="cuda").prepare_inference(torch.bfloat16)
    rows = WIDE_ROWS
    cache = KVCache(config, rows, config.seq_len, "cuda", torch.bfloat16)
    cache.k.normal_(), cache.v.normal_()
    state = torch.zeros(6, rows, dtype=torch.long, device="cuda")
    state[0], state[1], state[4], state[5] = 7, args.position, 1, 1
    fd = FusedDecoder(model, cache, state, torch.ones(2, rows, device="cuda"))
    fd.x.normal_(), fd.h.normal_(), fd.qkv.normal_(), fd.y.normal_()
    layer = fd.layers[0]
    base = dict(depth=args.depth, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    shapes = dict(qkv=(fd.x, layer["qkv"], fd.qkv, dict(PRO=1)), o=(fd.y, layer["o"], fd.x, dict(EPI=2)),
                  fc=(fd.x, layer["fc"], fd.h, dict(PRO=1, EPI=1)), proj=(fd.h, layer["proj"], fd.x, dict(EPI=2)),
                  lm_head=(fd.x, fd.lm_head, fd.logits, dict(PRO=2, EPI=3)))
    picks = {}  # (N, K) -> the fastest (BLOCK_N, BLOCK_K, warps) of the sweep
    if args.forward_sweep:
        forward_sweep(fd, shapes, config, base)
        return
    for name, (x, w, out, kw) in () if args.forward_only or args.attention_only else shapes.items():
        N, K = (config.vocab_size if name == "lm_head" else w.shape[0]), w.shape[1]
        default = fd._gemv_tiles(N, K, kw.get("EPI", 0))
        configs = [default] + [(bn, bk, 8 if bk >= 2048 else 4) for bn, bk in GEMV_TILES if args.gemv_sweep]
        times = {}
        for tiles in dict.fromkeys(configs):  # in order, once each
            us = graph_us(lambda: fd._linear(x, w, out, 1, tiles=tiles, **kw))
            times[tiles] = us
            print(json.dumps(dict(kernel=f"gemv_{name}", default=tiles == default, tiles=tiles, us=round(us, 2),
                                  gb_s=round(N * K * 2 / us / 1e3, 1), **base)), flush=True)
        picks[(N, K)] = min(times, key=times.get)
    wide = {}  # (serve_throughput option, its value, tiles) -> us, at the last row count
    for B in () if args.forward_only else (1, rows):
        wide.clear()
        kv = 2 * B * config.n_kv_head * args.position * config.head_dim * 2
        for chunk in ATTENTION_CHUNKS[B]:
            fd.chunk = lambda _, chunk=chunk: chunk
            for tiles in [None] + ATTENTION_TILES[B]:
                fd.attention_tiles = tiles
                us = graph_us(lambda: fd._attention(B, 0))
                wide[("--attention-chunk", chunk, tiles)] = us
                print(json.dumps(dict(kernel="attention", default=tiles is None, tiles=tiles, rows=B, chunk=chunk,
                                      us=round(us, 2), gb_s=round(kv / us / 1e3, 1), **base)), flush=True)
        del fd.chunk
        for splits in ATTENTION_SPLITS if B > FusedDecoder.narrow_rows else ():
            fd.attention_splits = splits
            for tiles in [None] + ATTENTION_TILES[B][:3]:
                fd.attention_tiles = tiles
                us = graph_us(lambda: fd._attention(B, 0))
                wide[("--attention-splits", splits, tiles)] = us
                print(json.dumps(dict(kernel="attention", default=False, tiles=tiles, rows=B, splits=splits,
                                      us=round(us, 2), gb_s=round(kv / us / 1e3, 1), **base)), flush=True)
        fd.attention_splits = FusedDecoder.attention_splits
    if wide:  # the fastest at 128 rows, as serve_throughput.py's options
        option, value, tiles = min(wide, key=wide.get)
        serve = f"{option} {value}" + (f" --attention-tiles {','.join(map(str, tiles))}" if tiles else "")
        print(json.dumps(dict(kernel="attention_best", rows=rows, us=round(wide[(option, value, tiles)], 2),
                              serve_args=serve, **base)), flush=True)
    pdl = fd.pdl
    # the whole step: PDL off and on, the swept GEMV tiles, and wide steps through _linear_kernel (the narrow
    # path) at several GEMM tilings
    for B in () if args.attention_only else (1, 8, rows):
        runs = [dict(pdl=False), dict(pdl=pdl)]
        runs += [dict(pdl=pdl, gemv="swept")] if picks and B == 1 else []
        runs += [dict(pdl=pdl, path="narrow", gemm=t) for t in GEMM_TILES] if B > FusedDecoder.narrow_rows else []
        for run in {json.dumps(r): r for r in runs}.values():
            fd.pdl = run["pdl"]
            fd.gemv_tuned = picks if run.get("gemv") else {}
            fd.narrow_rows = B if run.get("path") == "narrow" else FusedDecoder.narrow_rows
            fd.gemm_tiles = run.get("gemm", FusedDecoder.gemm_tiles)
            fd.attention_tiles = FusedDecoder.attention_tiles
            state[1] = args.position
            us = graph_us(lambda: fd.forward(B))
            print(json.dumps(dict(kernel="forward", rows=B, **run, us=round(us, 2), **base)), flush=True)
    if picks:
        print(json.dumps(dict(kernel="gemv_picks", picks={f"{n}x{k}": t for (n, k), t in picks.items()}, **base)))


def forward_sweep(fd: FusedDecoder, shapes: dict, config, base: dict) -> None:
    """Each GEMV shape's tiles picked by the one-row forward's time, the others held at their picks so far.

    A GEMV timed alone reads weights that 20 launches keep in L2 and nothing runs before it; in the forward each
    reads its weights from HBM, and under PDL while the previous kernel finishes, so the isolated fastest made
    the d20 forward slower (RESULTS.md). Prints every trial and the picks, as serve_throughput's --gemv-picks.
    """
    picks = {}
    best = graph_us(lambda: fd.forward(1))
    print(json.dumps(dict(kernel="forward", rows=1, gemv="default", us=round(best, 2), **base)), flush=True)
    ablate(fd, shapes, best, base)
    for name, (_, w, _, kw) in shapes.items():
        N, K = (config.vocab_size if name == "lm_head" else w.shape[0]), w.shape[1]
        # the lm_head's blocks must be >= 32 wide: its sampler stats hold V / 32 blocks a row
        candidates = LM_HEAD_TILES if name == "lm_head" else [(bn, bk, 8 if bk >= 2048 else 4) for bn, bk in GEMV_TILES]
        for tiles in candidates:
            fd.gemv_tuned = {**picks, (N, K): tiles}
            us = graph_us(lambda: fd.forward(1))
            print(json.dumps(dict(kernel="forward", rows=1, shape=name, tiles=tiles, us=round(us, 2), **base)),
                  flush=True)
            if us < best * 0.995:  # a clear gain, not noise
                best, picks[(N, K)] = us, tiles
    fd.gemv_tuned = picks
    us = graph_us(lambda: fd.forward(1))
    wide = graph_us(lambda: fd.forward(WIDE_ROWS))
    print(json.dumps(dict(kernel="forward", rows=WIDE_ROWS, us=round(wide, 2), **base)), flush=True)
    ablate(fd, shapes, wide, base, WIDE_ROWS)
    json_picks = {f"{n}x{k}": t for (n, k), t in picks.items()}
    serve_args = f"--gemv-picks '{json.dumps(json_picks, separators=(',', ':'))}'" if picks else ""
    print(json.dumps(dict(kernel="forward_sweep_best", rows=1, us=round(us, 2), picks=json_picks,
                          serve_args=serve_args, **base)), flush=True)


def ablate(fd: FusedDecoder, shapes: dict, full: float, base: dict, rows: int = 1) -> None:
    """What each kind of kernel costs inside the forward of `rows` rows (PDL, weights from HBM): the forward's
    time with every launch of that kind left out (the outputs are then garbage; the time is what counts). Above
    the narrow path's rows only the attention (the GEMMs are cuBLAS's)."""
    kinds = [("attention", (None,) * 4)] + (list(shapes.items()) if rows <= fd.narrow_rows else [])
    for name, (_, w, _, _) in kinds:
        if name == "attention":
            fd._attention = lambda B, i: None
        else:
            fd._linear = lambda x, w_, out, B, shape=w.shape, **kw: (
                fd.n_blocks if w_.shape == shape else FusedDecoder._linear(fd, x, w_, out, B, **kw))
        us = graph_us(lambda: fd.forward(rows))
        vars(fd).pop("_linear", None), vars(fd).pop("_attention", None)  # back to the class's methods
        print(json.dumps(dict(kernel="forward_without", rows=rows, left_out=name, us=round(us, 2),
                              saves_us=round(full - us, 2), **base)), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
