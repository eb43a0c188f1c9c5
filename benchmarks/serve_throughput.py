"""Serving speed of one depth through nanoray.engine: time to first token, decode tok/s of one stream and of
8/32/128 concurrent streams (continuous batching), batch-1 memory-bandwidth utilisation (MBU), kernels per
decode step, and prompt tokens/s scored (Engine.score) one sequence at a time and batched.

    python benchmarks/serve_throughput.py --depth 2 --preset tiny --quick    # CPU smoke run
    python benchmarks/serve_throughput.py --depth 20                         # random-init gpt2-preset d20 on a GPU
    python benchmarks/serve_throughput.py --depth 20 --checkpoint runs/d20   # a trained checkpoint
    python benchmarks/serve_throughput.py --depth 12 --decode compiled       # torch.compile'd model decode step

Prompts are random token ids; decoding is greedy and never stops early (no stop tokens), so every stream
runs its full length. Each measurement runs twice and the first run (decode-step compiles, CUDA-graph capture,
warm-up) is discarded. Decode tok/s counts the tokens after every stream has its first one, over the time after
that. step_ms_b1 is its inverse at one stream (host work included); graph_step_ms_b1/b128 time the captured
decode graph alone (GPU time per step, 1 and 128 rows at mid-stream positions, CUDA events).
MBU = (weight bytes + KV bytes read at the mean context) per step / step time / the GPU's peak bandwidth.
Scoring: 512-token sequences (the --prompt length), score_tok_s_b1 one call at a time, score_tok_s_batched 64
concurrent calls (the engine batches them); score_mfu = forward FLOPs of the batched rate / peak bf16 FLOP/s;
forward_tok_s_b32 the bare model forward over 32 x 512 tokens, score_fn_tok_s_b32 the engine's scoring function
on those (no engine thread, no asyncio).
Last line: one JSON object with depth, ttft_ms, decode_tok_s_b1, tok_s_b8/b32/b128, mbu_b1, kernels_per_step,
score_tok_s_b1, score_tok_s_batched, weight_bytes, gpu, torch.
"""

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoray.dial import plan  # noqa: E402
from nanoray.engine import Engine, SamplingParams  # noqa: E402
from nanoray.fused_decode import FusedDecoder  # noqa: E402
from nanoray.hardware import device_name, peak_flops  # noqa: E402
from nanoray.model import Linear, build_model  # noqa: E402
from nanoray.tokenizer import Tokenizer  # noqa: E402

# HBM peak bytes/s from the vendors' datasheets, keyed like nanoray.hardware.PEAK_BF16_FLOPS (specific first).
PEAK_MEMORY_BANDWIDTH = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,
    "H200": 4.8e12,
    "GB200": 8.0e12,
    "B200": 8.0e12,
    "A100": 2.039e12,
    "L40S": 0.864e12,
    "4090": 1.008e12,
    "MI300X": 5.3e12,
}
CONCURRENCY = (8, 32, 128)


def peak_bandwidth(name: str) -> float:
    """Peak memory bytes/s of the device called `name`; inf when unknown (MBU then reads 0)."""
    return next((bw for key, bw in PEAK_MEMORY_BANDWIDTH.items() if key in name), float("inf"))


async def timed_streams(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[float]]:
    """Run the prompts concurrently; each stream's token arrival times (seconds, perf_counter)."""
    async def one(prompt):
        times = []
        async for _ in engine.stream(prompt, SamplingParams(max_tokens=tokens, temperature=0), stop_ids=set()):
            times.append(time.perf_counter())
        return times
    return await asyncio.gather(*(one(p) for p in prompts))


def decode_tok_s(times: list[list[float]]) -> float:
    start = max(t[0] for t in times)  # every stream is decoding from here on
    end = max(t[-1] for t in times)
    return sum(sum(x > start for x in t) for t in times) / (end - start)


async def measure(engine: Engine, args, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)

    def random_prompts(n, length):
        return torch.randint(vocab, (n, length), generator=gen).tolist()

    ttft = []
    for _ in range(4):  # the first is warm-up
        start = time.perf_counter()
        await timed_streams(engine, random_prompts(1, args.prompt), 1)
        ttft.append(time.perf_counter() - start)
    result = dict(ttft_ms=round(1e3 * statistics.median(ttft[1:]), 2))
    result["prefill_tok_s_b1"] = round(args.prompt / (result["ttft_ms"] / 1e3), 1)
    for batch in (1, *CONCURRENCY):
        for _ in range(2):  # the first captures this run's graphs
            tok_s = decode_tok_s(await timed_streams(engine, random_prompts(batch, args.prompt), args.tokens))
        result["decode_tok_s_b1" if batch == 1 else f"tok_s_b{batch}"] = round(tok_s, 1)
    one = []
    for seq in random_prompts(4, args.prompt):
        start = time.perf_counter()
        await engine.score_async(seq)
        one.append(time.perf_counter() - start)
    result["score_tok_s_b1"] = round(args.prompt / statistics.median(one[1:]), 1)
    for _ in range(2):  # the first is warm-up
        seqs = random_prompts(args.score_batch, args.prompt)
        start = time.perf_counter()
        await asyncio.gather(*(engine.score_async(seq) for seq in seqs))
        seconds = time.perf_counter() - start
    result["score_tok_s_batched"] = round(args.score_batch * args.prompt / seconds, 1)
    return result


def graph_step_ms(engine: Engine, rows: int, position: int) -> tuple[float, dict] | None:
    """GPU ms per decode step of the captured greedy graph over `rows` slots, each at `position` (CUDA events
    around 50 replays), and its kernels' ms per step by name (profiler, 3 replays); None without CUDA graphs or
    if that graph was not captured."""
    keys = [k for k in engine._graphs if k[0] == rows and k[2] == 1 and k[3] == 0]
    if not keys:
        return None
    key = keys[0]
    state = engine._state
    state[0, :rows], state[1, :rows], state[5, :rows] = 7, position, 1
    graph = engine._graphs[key]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    state[1, :rows] = position
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:40]] = by_name.get(e.name[:40], 0) + e.device_time / 1e3 / (3 * key[1])
    top = dict(sorted(((k, round(v, 4)) for k, v in by_name.items()), key=lambda kv: -kv[1])[:8])
    return start.elapsed_time(end) / (50 * key[1]), top


def forward_tok_s(engine: Engine, rows: int, length: int) -> float:
    """Prompt tokens/s of the bare model forward (logits at every position) over rows x length random ids."""
    ids = torch.randint(engine.vocab_size, (rows, length), device=engine.device)
    for _ in range(2):
        engine.model(ids)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        engine.model(ids)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return 3 * rows * length / (time.perf_counter() - start)


def kernels_per_step(engine: Engine, position: int) -> int:
    """GPU kernels one greedy batch-1 decode step launches (run eagerly under the profiler); on a CPU, the
    operators it runs (so the CPU smoke test exercises this path too)."""
    state, length = engine._state, min(engine.seq_len, 1 << position.bit_length())
    state[0, 0], state[1, 0], state[5, 0] = 7, position, 1
    out = torch.zeros(1, 1, 2, device=engine.device)
    engine._decode_steps(1, 1, 1, 0, length, False, out)  # warm-up (compiles)
    cuda = engine.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        engine._decode_steps(1, 1, 1, 0, length, False, out)
        if cuda:
            torch.cuda.synchronize()
    if not cuda:
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--preset", default="gpt2", help="model family of the random-init model (tiny: a CPU smoke run)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory to serve instead of a random model")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (clipped to half the context)")
    p.add_argument("--tokens", type=int, default=256, help="tokens generated per stream")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (each step's kernels launched one by one)")
    p.add_argument("--decode", choices=("auto", "fused", "compiled", "eager"), default="auto",
                   help="decode path (auto: the engine's default, fused Triton kernels on a GPU)")
    p.add_argument("--steps-per-launch", type=int, default=None, help="Engine steps_per_launch (default: by batch)")
    p.add_argument("--score-batch", type=int, default=64, help="concurrent score calls of the batched measurement")
    p.add_argument("--quick", action="store_true", help="a smoke run: 16-token prompts, 8 tokens per stream")
    p.add_argument("--narrow-rows", type=int, default=FusedDecoder.narrow_rows,
                   help="the fused path's widest step with every GEMM in _linear_kernel (wider: cuBLAS)")
    p.add_argument("--attention-splits", type=int, default=FusedDecoder.attention_splits,
                   help="wide steps: each row's attention window in this many equal splits (default: fixed-length)")
    p.add_argument("--attention-chunk", type=int, default=FusedDecoder.wide_chunk,
                   help="positions per attention split from 64 rows up (without --attention-splits)")
    p.add_argument("--attention-tiles", default=None,
                   help="the attention's BLOCK_J,stages,warps above 16 rows, e.g. 64,4,8 (default: the kernel's)")
    p.add_argument("--gemv-picks", default=None,
                   help='one-row GEMV tiles by weight shape, JSON {"NxK": [BLOCK_N, BLOCK_K, warps]} '
                   "(decode_kernels.py --forward-sweep prints them)")
    args = p.parse_args()
    if args.gemv_picks:
        try:
            picks = {tuple(int(n) for n in shape.split("x")): tuple(int(t) for t in tiles)
                     for shape, tiles in json.loads(args.gemv_picks).items()}
        except (ValueError, AttributeError, TypeError):
            picks = None
        if not picks or any(len(shape) != 2 or len(tiles) != 3 for shape, tiles in picks.items()):
            p.error(f'--gemv-picks: JSON {{"NxK": [BLOCK_N, BLOCK_K, warps], ...}}; got {args.gemv_picks!r}')
        FusedDecoder.gemv_tuned = picks
    FusedDecoder.narrow_rows, FusedDecoder.attention_splits = args.narrow_rows, args.attention_splits
    FusedDecoder.wide_chunk = args.attention_chunk
    if args.attention_tiles:
        try:
            tiles = tuple(int(t) for t in args.attention_tiles.split(","))
        except ValueError:
            tiles = ()
        if len(tiles) != 3:
            p.error(f"--attention-tiles: three integers BLOCK_J,stages,warps, e.g. 64,4,8; "
                    f"got {args.attention_tiles!r}")
        FusedDecoder.wide_attention_tiles = tiles
    if args.quick:
        args.prompt, args.tokens, args.score_batch = 16, 8, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_batch = max(CONCURRENCY)
    kwargs = dict(cuda_graphs=not args.no_graphs, steps_per_launch=args.steps_per_launch,
                  fused_decode=None if args.decode == "auto" else args.decode == "fused",
                  compile_decode=args.decode == "compiled")
    if args.checkpoint:
        engine = Engine.from_checkpoint(args.checkpoint, device, max_batch, **kwargs)
    else:
        model = build_model(plan(args.depth, args.preset).model, device=device)
        byte_tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # a stand-in: ids only
        engine = Engine(model, byte_tokenizer, max_batch, **kwargs)
    config = engine.model.config
    args.prompt = min(args.prompt, config.seq_len // 2)
    args.tokens = min(args.tokens, config.seq_len - args.prompt)
    try:
        result = asyncio.run(measure(engine, args, config.vocab_size))
    finally:
        engine.close()
    mid = args.prompt + args.tokens // 2
    with torch.no_grad():
        if engine.cuda_graphs:
            for rows in (1, max_batch):
                timed = graph_step_ms(engine, rows, mid)
                result[f"graph_step_ms_b{rows}"] = None if timed is None else round(timed[0], 4)
                result[f"graph_kernel_ms_b{rows}"] = None if timed is None else timed[1]
        kernels = kernels_per_step(engine, mid)
        result["forward_tok_s_b32"] = round(forward_tok_s(engine, 32, args.prompt), 1)
        seqs = torch.randint(engine.vocab_size, (32, args.prompt)).tolist()
        engine._score(seqs, 0)  # the engine's scoring function alone, on this thread
        start = time.perf_counter()
        engine._score(seqs, 0)
        result["score_fn_tok_s_b32"] = round(32 * args.prompt / (time.perf_counter() - start), 1)

    weights = [m.weight for m in engine.model.modules() if isinstance(m, Linear)]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    kv_bytes_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * engine.cache.k.element_size()
    step_s = 1 / result["decode_tok_s_b1"]
    bytes_per_step = weight_bytes + kv_bytes_per_token * (args.prompt + args.tokens / 2)
    gpu = device_name(engine.device)
    bandwidth = peak_bandwidth(gpu)
    graph_ms = result.get("graph_step_ms_b1")
    # forward FLOPs per scored token: 2 per matmul weight + QK^T and AV over the causal past (T/2 keys on average)
    flops = (2 * engine.model.num_matmul_params()
             + 4 * config.n_layer * config.n_head * config.head_dim * args.prompt / 2)
    print(json.dumps(dict(
        depth=args.depth, **result, mbu_b1=round(bytes_per_step / step_s / bandwidth, 4),
        step_ms_b1=round(1e3 * step_s, 3),
        graph_mbu_b1=None if graph_ms is None else round(bytes_per_step / (graph_ms / 1e3) / bandwidth, 4),
        kernels_per_step=kernels, score_mfu=round(flops * result["score_tok_s_batched"] / peak_flops(gpu), 4),
        weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token,
        peak_bandwidth=None if bandwidth == float("inf") else bandwidth,
        prompt_tokens=args.prompt, decode_tokens=args.tokens, max_batch=max_batch, cuda_graphs=engine.cuda_graphs,
        decode_path=engine.decode_path, narrow_rows=args.narrow_rows, attention_splits=args.attention_splits,
        attention_chunk=args.attention_chunk, attention_tiles=args.attention_tiles, gemv_picks=args.gemv_picks,
        steps_per_launch=args.steps_per_launch, checkpoint=args.checkpoint, gpu=gpu,
        torch=torch.__version__, date=datetime.date.today().isoformat())))


if __name__ == "__main__":
    main()
