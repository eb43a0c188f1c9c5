"""Quality of training configurations on identical batches: each configuration trains the same depth from the same
init on the same rows of a prepared corpus, for the same steps, and is scored on the same val rows.

    python benchmarks/quality.py --depth 12 --steps 300 --configs bf16:L,fp8:L,bf16:SSSL --source stdlib

A configuration is <precision>:<window pattern> (precision bf16 or fp8). The first is the baseline. Each run is the
trainer in this process (no Ray: nothing in the comparison depends on it), torch.compile included, with the dial's
plan for the depth except --total-batch-tokens (smaller than the dial's, so 300 steps fit a GPU session; the LRs
follow the batch as the dial scales them) and a horizon of --steps (so warmup and warmdown complete).

Prints one JSON line per configuration: final val loss and bpb, FLOPs per token, steady tok/s and MFU (bf16 peak),
and, for all but the baseline, the ratio of its val loss to the baseline's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.train_throughput import steady_state  # noqa: E402
from nanoray.data import DataSpec  # noqa: E402
from nanoray.dial import Horizon, plan  # noqa: E402
from nanoray.hardware import device_name, gpu_memory_gib  # noqa: E402
from nanoray.session import LocalSession  # noqa: E402
from nanoray.stream import prepare_corpus  # noqa: E402
from nanoray.train import TrainConfig, train  # noqa: E402

PRECISIONS = ("bf16", "fp8")


def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in text.split(","):
        precision, _, windows = item.strip().partition(":")
        if precision not in PRECISIONS or not windows or set(windows) - {"S", "L"}:
            raise ValueError(f"--configs: <precision>:<windows> with precision in {PRECISIONS} and windows of S and L "
                             f"(e.g. bf16:L,fp8:SSSL), got {item!r}")
        configs.append((precision, windows))
    if len(configs) < 2:
        raise ValueError(f"--configs: at least two configurations to compare, got {text!r}")
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--configs", default="bf16:L,fp8:L", help="comma-separated <precision>:<windows>; first = baseline")
    p.add_argument("--source", default="stdlib", help="corpus source (stdlib, debian-docs, files:<glob>, ...)")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the corpus allowed (default: enough for the run, from a measured sample)")
    p.add_argument("--data-dir", default="runs/data-quality", help="where the prepared corpus goes (reused)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--total-batch-tokens", type=int, default=2**17)
    p.add_argument("--eval-tokens", type=int, default=2**20, help="val tokens of the final evaluation")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=TrainConfig.model_fields["seed"].default,
                   help="model init and RNG seed, the same for every configuration (a second seed tells a real gap "
                        "from one trajectory's luck)")
    args = p.parse_args()
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        p.error(str(e))
    gpu = torch.cuda.is_available()
    if not gpu and any(precision == "fp8" for precision, _ in configs):
        p.error("--configs: fp8 configurations need a GPU with fp8 tensor cores; this machine has none")
    memory = gpu_memory_gib() if gpu else None

    def plan_of(precision: str, windows: str):
        return plan(args.depth, args.preset, Horizon(iterations=args.steps), total_batch_tokens=args.total_batch_tokens,
                    fp8=precision == "fp8", window_pattern=windows, gpu_memory_gib=memory)

    data = DataSpec(kind="corpus", source=args.source, epochs=args.epochs)
    t0 = time.perf_counter()
    corpus = prepare_corpus(plan_of(*configs[0]), data, args.eval_tokens, args.data_dir)
    print(f"corpus ready in {time.perf_counter() - t0:.0f} s", flush=True)
    baseline = None
    for precision, windows in configs:
        run = plan_of(precision, windows)
        session = LocalSession("cuda" if gpu else "cpu", corpus=corpus)
        config = TrainConfig(plan=run, data=data, log_every=args.log_every, eval_every=0,
                             eval_tokens=args.eval_tokens, checkpoint_at_end=False, seed=args.seed)
        t0 = time.perf_counter()
        last = train(config, session, corpus)
        speed = steady_state(session.history, 1)
        result = dict(depth=args.depth, config=f"{precision}:{windows}", steps=last["step"],
                      val_loss=round(last["val_loss"], 4), val_bpb=round(last["val_bpb"], 4),
                      train_loss=round(last["train_loss"], 4), flops_per_token=run.flops_per_token,
                      tok_per_s=speed["tok_per_s"], mfu=speed["mfu"], device_batch_size=run.device_batch_size,
                      total_batch_tokens=run.total_batch_tokens, seed=args.seed,
                      seconds=round(time.perf_counter() - t0, 1))
        if baseline is None:
            baseline = result
        else:
            result.update(baseline=baseline["config"], baseline_val_loss=baseline["val_loss"],
                          val_loss_ratio=round(result["val_loss"] / baseline["val_loss"], 5),
                          flops_ratio=round(run.flops_per_token / baseline["flops_per_token"], 4))
        result.update(source=args.source, gpu=device_name(torch.device("cuda")) if gpu else "cpu",
                      torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
