"""Training throughput of one depth: tok/s, MFU, step time, peak memory. Random tokens (or a corpus streamed
through Ray Data with --data), gpt2 preset by default.

Runs nanoray's trainer through Ray Train with one GPU worker (or --workers N: DDP over N GPUs, the same
total batch, so N=1 against N=all is the scaling efficiency), or with --bare the same loop in this
process without Ray, so Ray's overhead is the difference. The first report window (torch.compile
and warm-up) is excluded; the figure is tokens / time over the remaining windows.

    python benchmarks/train_throughput.py --depth 12 --steps 25
    python benchmarks/train_throughput.py --depth 20 --steps 12 --log-every 3 --bare
    python benchmarks/train_throughput.py --depth 12 --data stdlib --tokenizer-actors 6   # real tokens
    python benchmarks/train_throughput.py --depth 12 --workers 8 --baseline-tok-per-s 548088   # scaling
    python benchmarks/train_throughput.py --depth 20 --fp8 --window-pattern SSSL   # fp8, sliding windows

The device batch is the dial's for this GPU's memory (--device-batch-size overrides it). MFU is against the
bf16 peak also for --fp8 runs (as nanochat's bf16_mfu).

Last line: one JSON object with depth, workers, tok_per_s (all workers), tok_per_s_per_gpu, mfu (per GPU),
step_s, peak_mem_gb, gpu, torch; with --baseline-tok-per-s (a 1-worker tok/s) also scaling_efficiency.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoray.data import DataSpec  # noqa: E402
from nanoray.dial import plan  # noqa: E402
from nanoray.hardware import device_name, gpu_memory_gib  # noqa: E402
from nanoray.storage import RunStore  # noqa: E402
from nanoray.stream import prepare_corpus  # noqa: E402
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, fit, metrics_log, train  # noqa: E402


def steady_state(history: list[dict], skip_windows: int) -> dict:
    windows = history[skip_windows:]
    steps = sum(m["window_steps"] for m in windows)
    seconds = sum(m["step_s"] * m["window_steps"] for m in windows)
    tokens = steps * (history[0]["tokens"] // history[0]["step"])
    tok_per_s = tokens / seconds
    mfu = windows[-1]["mfu"] / windows[-1]["tok_per_s"] * tok_per_s
    return dict(tok_per_s=round(tok_per_s), mfu=round(mfu, 4), step_s=round(seconds / steps, 4),
                measured_steps=steps, peak_mem_gb=round(max(m["peak_mem_gb"] for m in history), 2),
                last_loss=round(history[-1]["train_loss"], 4))  # random tokens: ~ln(vocab) and finite, or a broken step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--steps", type=int, default=25, help="optimizer steps in total, warm-up window included")
    p.add_argument("--log-every", type=int, default=5, help="steps per timing window")
    p.add_argument("--skip-windows", type=int, default=1, help="leading windows left out (compile, warm-up)")
    p.add_argument("--preset", default="gpt2", help="model family (tiny: a CPU smoke run)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per micro-step (default: the dial's)")
    p.add_argument("--bare", action="store_true", help="run the loop in this process, without Ray")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (GPUs), DDP")
    p.add_argument("--baseline-tok-per-s", type=float, default=None,
                   help="a 1-worker tok/s: adds scaling_efficiency = tok_per_s / (workers x baseline)")
    p.add_argument("--data", default="random", help="random, or a corpus source (stdlib, parquet:..., hf:...)")
    p.add_argument("--fp8", action="store_true", help="block matrices in fp8 (torchao, tensorwise)")
    p.add_argument("--window-pattern", default=None, help="attention windows per layer (default: the preset's, L)")
    p.add_argument("--tokenizer-actors", type=int, default=4, help="Ray Data tokenizer actors (corpus data)")
    args = p.parse_args()
    if args.steps <= args.log_every * args.skip_windows:
        p.error("--steps must leave at least one measured window after --skip-windows x --log-every")
    if args.workers < 1 or (args.bare and args.workers != 1):
        p.error(f"--workers: >= 1, and 1 with --bare (one process); got {args.workers}")

    run = plan(args.depth, args.preset, device_batch_size=args.device_batch_size, num_workers=args.workers,
               fp8=args.fp8, window_pattern=args.window_pattern,
               gpu_memory_gib=gpu_memory_gib() if torch.cuda.is_available() else None)
    data = DataSpec(kind="random") if args.data == "random" else DataSpec(kind="corpus", source=args.data,
                                                                          actors=args.tokenizer_actors)
    config = TrainConfig(plan=run, data=data, max_steps=args.steps, log_every=args.log_every,
                         eval_every=0, eval_at_end=False, checkpoint_at_end=False)
    if args.bare:
        corpus = prepare_corpus(run, data, config.eval_tokens, RunStore("runs").data_dir(data.source)) \
            if data.kind == "corpus" else None
        session = LocalSession("cuda" if torch.cuda.is_available() else "cpu", corpus=corpus)
        train(config, session, corpus)
        history = session.history
    else:
        import ray

        ray.init(log_to_driver=True)
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "metrics.jsonl")
            fit(config, name="train-throughput", store=tmp, use_gpu=torch.cuda.is_available(),
                cpus_per_worker=4 if torch.cuda.is_available() else 1, callbacks=[metrics_log(log)])
            history = [json.loads(line) for line in open(log)]
        ray.shutdown()
    measured = steady_state(history, args.skip_windows)
    per_gpu = measured["tok_per_s"] / args.workers
    scaling = {} if args.baseline_tok_per_s is None else \
        dict(scaling_efficiency=round(per_gpu / args.baseline_tok_per_s, 4))
    result = dict(depth=args.depth, mode="bare" if args.bare else "ray-train", data=args.data, workers=args.workers,
                  **measured, tok_per_s_per_gpu=round(per_gpu), **scaling,
                  fp8=run.fp8, **experiment_knobs(),
                  window_pattern=run.model.window_pattern, device_batch_size=run.device_batch_size, grad_accum=run.grad_accum, memory_estimate_gb=round(run.memory_gib, 1),
                  total_batch_tokens=run.total_batch_tokens, flops_per_token=run.flops_per_token,
                  gpu=device_name(torch.device("cuda")) if torch.cuda.is_available() else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))


def experiment_knobs() -> dict:
    """The environment variables of an A/B run (nanoray's fp8 knobs, inductor's tuning switches), for its line."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("NANORAY_FP8_")
            or (k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR")}


if __name__ == "__main__":
    main()
