"""Serve a family on a local (or running) Ray cluster and print its URLs; blocks until Ctrl-C.

    python -m serve --run-dir runs/miniseries                            # every depth the sweep trained
    python -m serve --checkpoint runs/d2/ckpt --checkpoint runs/d4/ckpt  # explicit checkpoints
    python -m serve --run-dir runs/miniseries --host 0.0.0.0 --port 8000 --gpu-fraction 0.25
"""

import argparse

from serve.app import ServeArgs, serve_family
from serve.schemas import MAX_BODY_BYTES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a run directory with results.csv (runs/<name>)")
    p.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpu-fraction", type=float, default=None,
                   help="GPU share of each depth's replica (default 1/depths with GPUs, 0 without)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences each replica decodes together")
    p.add_argument("--max-replicas", type=int, default=1, help="autoscaling ceiling per depth")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body taken")
    args = p.parse_args(argv)
    try:
        serve_family(ServeArgs(run_dir=args.run_dir, checkpoints=args.checkpoint, num_gpus=args.gpu_fraction,
                               max_batch=args.max_batch, max_replicas=args.max_replicas,
                               max_body_bytes=args.max_body_bytes), args.host, args.port)
    except (ValueError, FileNotFoundError) as e:  # pydantic's ValidationError is a ValueError; raised before Ray
        p.error(str(e))


if __name__ == "__main__":
    main()
