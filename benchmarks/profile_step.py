"""Where one training step's GPU time goes: torch.profiler over one optimizer step after warm-up.

    python benchmarks/profile_step.py --depth 12
    python benchmarks/profile_step.py --depth 20 --fp8 --window-pattern SSSL

Prints the top kernels by GPU time, then one JSON line with the step's GPU time split into
matmul / attention / optimizer / other.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from nanoray.data import SyntheticTokens, WorkerBatches  # noqa: E402
from nanoray.dial import plan  # noqa: E402
from nanoray.fp8 import enable_fp8  # noqa: E402
from nanoray.hardware import gpu_memory_gib, prefer_cudnn_attention  # noqa: E402
from nanoray.model import build_model  # noqa: E402
from nanoray.optim import apply_schedule, build_optimizers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--device-batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=40, help="kernels listed")
    p.add_argument("--fp8", action="store_true", help="block matrices in fp8 (torchao)")
    p.add_argument("--window-pattern", default=None, help="attention windows per layer (default: L)")
    args = p.parse_args()
    run = plan(args.depth, "gpt2", device_batch_size=args.device_batch_size, fp8=args.fp8,
               window_pattern=args.window_pattern, gpu_memory_gib=gpu_memory_gib())
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    prefer_cudnn_attention()
    model = build_model(run.model, device=device)
    if run.fp8:
        enable_fp8(model)
    optimizers = build_optimizers(model, run, compile=True)
    forward = torch.compile(model, dynamic=False)
    batches = WorkerBatches(SyntheticTokens(run.model.vocab_size, run.model.seq_len), run.device_batch_size, 0, 1, device)

    def step(i: int) -> None:
        for _ in range(run.grad_accum):
            x, y = next(batches)
            (forward(x, y) / run.grad_accum).backward()
        apply_schedule(optimizers, i, run)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(args.warmup)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    groups = dict(matmul=0.0, attention=0.0, optimizer=0.0, other=0.0)
    for e in events:
        name = e.key.lower()
        if any(s in name for s in ("cudnn", "flash", "fmha", "attention", "sdpa")):
            groups["attention"] += e.self_device_time_total
        elif any(s in name for s in ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul")):
            groups["matmul"] += e.self_device_time_total
        elif any(s in name for s in ("adam", "foreach", "muon", "lerp")):
            groups["optimizer"] += e.self_device_time_total
        else:
            groups["other"] += e.self_device_time_total
    for e in events[:args.top]:
        print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:120]}")
    print(json.dumps(dict(depth=args.depth, fp8=run.fp8, window_pattern=run.model.window_pattern,
                          device_batch_size=run.device_batch_size, step_gpu_ms=round(total / 1e3, 1),
                          **{k + "_ms": round(v / 1e3, 1) for k, v in groups.items()})))


if __name__ == "__main__":
    main()
