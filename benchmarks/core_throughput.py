"""How fast CORE evaluation runs: examples/s over a task set, through Ray actors, at one depth.

    python benchmarks/core_throughput.py --depth 12 --tasks core-lite --max-per-task 500       # GPU machine
    python benchmarks/core_throughput.py --depth 1 --preset tiny --max-per-task 20 --workers 2  # CPU smoke

Without --checkpoint it scores a randomly initialized model of the depth (speed does not depend on the
weights: every example is one batched forward, LM tasks included), with a tokenizer of the preset's
vocabulary trained on the stdlib corpus (made once under runs/data/stdlib). Uses a GPU when there is
one. Last line: one JSON object with examples_per_s, examples, tasks, depth, workers, gpu, torch.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from nanoray.checkpoint import save_checkpoint  # noqa: E402
from nanoray.core_eval import evaluate_core, format_table  # noqa: E402
from nanoray.dial import plan  # noqa: E402
from nanoray.hardware import device_name  # noqa: E402
from nanoray.model import build_model  # noqa: E402
from nanoray.storage import RunStore  # noqa: E402
from nanoray.stream import prepare_data  # noqa: E402
from nanoray.tokenizer import Tokenizer  # noqa: E402


def random_checkpoint(depth: int, preset: str, out: Path) -> Path:
    """A checkpoint of a randomly initialized model with a trained tokenizer of the preset's vocabulary."""
    run = plan(depth, preset)
    _, tokenizer_dir = prepare_data("stdlib", run.model.vocab_size, RunStore("runs").data_dir("stdlib"))
    return save_checkpoint(out / f"d{depth}", build_model(run.model), None, dict(plan=run.model_dump(), step=0),
                           tokenizer=Tokenizer.load(tokenizer_dir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: random weights)")
    p.add_argument("--tasks", default="core-lite", help="core, core-lite or a bundle directory")
    p.add_argument("--max-per-task", type=int, default=500)
    p.add_argument("--workers", type=int, default=1, help="Ray actors (GPUs with --gpu)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = p.parse_args()

    import ray

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or random_checkpoint(args.depth, args.preset, Path(tmp))
        result = evaluate_core(str(ckpt), args.tasks, args.workers, args.max_per_task, use_gpu=args.gpu)
    print(format_table(result), flush=True)
    device = torch.device("cuda" if args.gpu else "cpu")
    print(json.dumps(dict(
        depth=args.depth, tasks=args.tasks, max_per_task=args.max_per_task, examples=result["examples"],
        examples_per_s=round(result["examples_per_s"], 1), seconds=round(result["seconds"], 2),
        workers=result["workers"], core=round(result["core"], 4),
        task_examples_per_s={k: round(t["examples_per_s"], 1) for k, t in result["tasks"].items()},
        gpu=device_name(device) if args.gpu else "cpu", torch=torch.__version__)))


if __name__ == "__main__":
    main()
