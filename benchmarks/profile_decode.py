"""Where one batch-1 decode step of nanoray.engine goes: GPU kernels (count and time per class), GPU idle time
between steps (host gaps), the host's time in the engine thread's methods, and the asyncio hand-off.

    python benchmarks/profile_decode.py --depth 12                  # random-init gpt2-preset d12 on a GPU
    python benchmarks/profile_decode.py --depth 2 --preset tiny     # CPU smoke run (no kernels)

One greedy stream after a 512-token prompt, three runs of 64 tokens after a warm-up: (1) plain, for the step
time (token inter-arrival at the consumer); (2) with each engine-thread method of interest wrapped in a timer
(whichever of them the engine has: the same script profiles older engines), and the hand-off from the
engine's call_soon_threadsafe to the consumer's receipt; (3) under torch.profiler, for the kernels. Kernels
are classed by name; "sampling" also takes every kernel of a CUDA graph launched after the step's first one
(an engine that samples in a graph of its own). Last line: one JSON object.
"""

import argparse
import asyncio
import collections
import datetime
import functools
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
from nanoray.model import build_model  # noqa: E402
from nanoray.tokenizer import Tokenizer  # noqa: E402

HOST_METHODS = ("_step", "_emit", "_launch", "_collect", "_replay", "_deliver", "_to_device", "_write_rows", "_admit")
CLASSES = [  # (class, substrings of kernel names), first match wins
    ("sampling", ("topk", "sort", "radix", "_pick", "gather", "cumsum", "argmax", "scan", "log_softmax",
                  "logsumexp", "bitonic")),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "_linear_kernel", "matmul", "splitk", "cublas")),
    ("attention", ("attention", "flash", "fmha", "sdpa", "_combine", "softmax")),
    ("norm", ("norm", "_embed")),
    ("copy", ("copy", "memcpy", "memset", "cat", "index", "scatter")),
]


async def stream(engine, prompt, tokens, arrivals):
    async for _ in engine.stream(prompt, SamplingParams(max_tokens=tokens, temperature=0), stop_ids=set()):
        arrivals.append(time.perf_counter())


def run(engine, prompt, tokens) -> list[float]:
    arrivals = []
    asyncio.run(stream(engine, prompt, tokens, arrivals))
    return arrivals


def step_ms(arrivals: list[float]) -> float:
    return 1e3 * statistics.median(b - a for a, b in zip(arrivals[1:], arrivals[2:]))


def wrap(engine, totals: dict, delivered: list) -> None:
    """Time each engine-thread method in HOST_METHODS that the engine has (instance attributes shadow them)."""
    for name in HOST_METHODS:
        if not hasattr(engine, name):
            continue
        fn = getattr(engine, name)

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            if _name == "_deliver":
                delivered.append(start)
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - start
        setattr(engine, name, timed)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in CLASSES if any(k in low for k in keys)), "elementwise")


def kernels(engine, prompt, tokens: int) -> collections.Counter:
    """Totals over one profiled stream: kernels and GPU ns by class, busy ns, span ns, graph launches."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run(engine, prompt, tokens)
        torch.cuda.synchronize()
    every = prof.profiler.kineto_results.events()
    events = sorted((e for e in every if e.device_type() == torch.autograd.DeviceType.CUDA), key=lambda e: e.start_ns())
    launches = {e.correlation_id() for e in every
                if e.device_type() == torch.autograd.DeviceType.CPU and "GraphLaunch" in e.name()}
    per_launch = collections.Counter(e.correlation_id() for e in events if e.correlation_id() in launches)
    # An engine with two graphs a step (decode, then sample): the sampler's are the graphs of fewer kernels.
    sampler = {cid for cid, n in per_launch.items() if n < max(per_launch.values(), default=0) / 4}
    totals = collections.Counter(graph_launches=len(launches))
    for e in events:
        cls = "sampling" if e.correlation_id() in sampler else kernel_class(e.name())
        totals[f"ns:{cls}"] += e.duration_ns()
        totals[f"n:{cls}"] += 1
        totals["kernels"] += 1
        totals["busy"] += e.duration_ns()
    if events:
        totals["span"] = events[-1].start_ns() + events[-1].duration_ns() - events[0].start_ns()
    return totals


def per_step(long: collections.Counter, short: collections.Counter, steps: int) -> dict:
    """What `steps` more decode steps added: the profile of a stream of steps + 1 tokens less that of 1 token."""
    diff = {k: (long[k] - short[k]) / steps for k in long}
    classes = sorted((k[3:] for k in diff if k.startswith("ns:")), key=lambda c: -diff["ns:" + c])
    return dict(kernels_per_step=round(diff["kernels"], 1),
                kernel_ms_per_step={c: round(diff["ns:" + c] / 1e6, 4) for c in classes},
                kernels_by_class_per_step={c: round(diff["n:" + c], 1) for c in classes},
                gpu_busy_ms_per_step=round(diff["busy"] / 1e6, 4),
                gpu_idle_ms_per_step=round((diff["span"] - diff["busy"]) / 1e6, 4),
                graph_launches_per_step=round(diff["graph_launches"], 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--label", default="", help="a name for this engine version in the JSON")
    p.add_argument("--decode", choices=("fused", "compiled", "eager"), default=None,
                   help="the engine's decode path (default: its own default; older engines take none)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(plan(args.depth, args.preset).model, device=device)
    kwargs = {} if args.decode is None else dict(fused_decode=args.decode == "fused",
                                                 compile_decode=args.decode == "compiled")
    engine = Engine(model, Tokenizer.from_ranks({bytes([i]): i for i in range(256)}), max_batch=8, **kwargs)
    args.prompt = min(args.prompt, model.config.seq_len // 2)
    prompt = torch.randint(model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        run(engine, prompt, args.tokens)  # warm-up: graph capture, compiles
        plain = step_ms(run(engine, prompt, args.tokens))
        totals, delivered = collections.Counter(), []
        wrap(engine, totals, delivered)
        arrivals = run(engine, prompt, args.tokens)
        steps = len(arrivals) - 1  # decode steps (the first token comes from the prefill)
        handoff = [1e3 * (a - d) for d, a in zip(delivered[-len(arrivals):], arrivals)][1:]
        profile = {}
        if device == "cuda":  # the prefill's kernels cancel out
            profile = per_step(kernels(engine, prompt, args.tokens + 1), kernels(engine, prompt, 1), args.tokens)
    finally:
        engine.close()
    print(json.dumps(dict(
        depth=args.depth, label=args.label, step_ms=round(plain, 4), tok_s=round(1e3 / plain, 1),
        host_ms_per_step={k: round(1e3 * v / steps, 4) for k, v in totals.most_common()},
        handoff_ms=round(statistics.median(handoff), 4) if handoff else None, **profile,
        decode_path=getattr(engine, "decode_path", "eager (compile_decode=%s)" % getattr(engine, "compile_decode", None)),
        prompt_tokens=args.prompt, gpu=device_name(torch.device(device)), torch=torch.__version__,
        date=datetime.date.today().isoformat())))


if __name__ == "__main__":
    main()
