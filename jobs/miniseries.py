"""The miniseries: a family of compute-optimal GPTs, one Ray Tune trial per depth, and its report.

    python jobs/miniseries.py                      # CPU: tiny d1-d3 on CPython's sources, local Ray, < 10 min
    python jobs/miniseries.py --preset gpt2 --depths 8,12,16,20 --source hf:karpathy/climbmix-400b-shuffle
    ray job submit --working-dir . -- python jobs/miniseries.py --storage s3://bucket/nanoray ...
    python jobs/miniseries.py --serve              # then keep every depth served: chat page + OpenAI API
    python jobs/miniseries.py --tracker mlflow,tensorboard   # a tracker run per trial (README: Trackers)

Corpus and tokenizer (prepared once, reused) -> the sweep (a re-run with the same --name resumes it and
skips finished depths) -> CORE of each final checkpoint (a Ray task per depth, as it finishes) -> a power-law fit of val bpb
against FLOPs -> runs/<name>/: results.csv, plots, report.md and report.html (-> with --serve, Ray Serve).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jobs._cli import job_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    job_main(argv, prog="jobs/miniseries.py", doc=__doc__, job="miniseries", grid="ratio")


if __name__ == "__main__":
    main()
