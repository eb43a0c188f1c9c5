"""Serving speed of one depth through nanoray.engine: time to first token, decode tok/s of one stream and of
8/32/128 concurrent streams (continuous batching), and batch-1 memory-bandwidth utilisation (MBU).

    python benchmarks/serve_throughput.py --depth 2 --preset tiny --quick    # CPU smoke run
    python benchmarks/serve_throughput.py --depth 20                         # random-init gpt2-preset d20 on a GPU
    python benchmarks/serve_throughput.py --depth 20 --checkpoint runs/d20   # a trained checkpoint
    python benchmarks/serve_throughput.py --depth 12 --compile               # torch.compile'd decode steps

Prompts are random token ids; decoding is greedy and never stops early (no stop tokens), so every stream
runs its full length. Each measurement runs twice and the first run (decode-step compiles, CUDA-graph capture,
warm-up) is discarded. Decode tok/s counts the tokens after every stream has its first one, over the time after
that.
MBU = (weight bytes + KV bytes read at the mean context) per step / step time / the GPU's peak bandwidth.
Last line: one JSON object with depth, ttft_ms, decode_tok_s_b1, tok_s_b8/b32/b128, mbu_b1, weight_bytes, gpu, torch.
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
from nanoray.hardware import device_name  # noqa: E402
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
    for batch in (1, *CONCURRENCY):
        for _ in range(2):  # the first captures this run's graphs
            tok_s = decode_tok_s(await timed_streams(engine, random_prompts(batch, args.prompt), args.tokens))
        result["decode_tok_s_b1" if batch == 1 else f"tok_s_b{batch}"] = round(tok_s, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--preset", default="gpt2", help="model family of the random-init model (tiny: a CPU smoke run)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory to serve instead of a random model")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (clipped to half the context)")
    p.add_argument("--tokens", type=int, default=256, help="tokens generated per stream")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (each step's kernels launched one by one)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode steps (Engine compile_decode)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 16-token prompts, 8 tokens per stream")
    args = p.parse_args()
    if args.quick:
        args.prompt, args.tokens = 16, 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_batch = max(CONCURRENCY)
    if args.checkpoint:
        engine = Engine.from_checkpoint(args.checkpoint, device, max_batch, cuda_graphs=not args.no_graphs,
                                        compile_decode=args.compile)
    else:
        model = build_model(plan(args.depth, args.preset).model, device=device)
        byte_tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # a stand-in: ids only
        engine = Engine(model, byte_tokenizer, max_batch, cuda_graphs=not args.no_graphs,
                        compile_decode=args.compile)
    config = engine.model.config
    args.prompt = min(args.prompt, config.seq_len // 2)
    args.tokens = min(args.tokens, config.seq_len - args.prompt)
    try:
        result = asyncio.run(measure(engine, args, config.vocab_size))
    finally:
        engine.close()

    weights = [m.weight for m in engine.model.modules() if isinstance(m, Linear)]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    kv_bytes_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * engine.cache.k.element_size()
    step_s = 1 / result["decode_tok_s_b1"]
    bytes_per_step = weight_bytes + kv_bytes_per_token * (args.prompt + args.tokens / 2)
    gpu = device_name(engine.device)
    print(json.dumps(dict(
        depth=args.depth, **result, mbu_b1=round(bytes_per_step / step_s / peak_bandwidth(gpu), 4),
        step_ms_b1=round(1e3 * step_s, 3), weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token,
        prompt_tokens=args.prompt, decode_tokens=args.tokens, max_batch=max_batch, cuda_graphs=engine.cuda_graphs,
        compile_decode=engine.compile_decode, checkpoint=args.checkpoint, gpu=gpu, torch=torch.__version__,
        date=datetime.date.today().isoformat())))


if __name__ == "__main__":
    main()
