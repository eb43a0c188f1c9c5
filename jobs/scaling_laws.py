"""Scaling laws from an isoFLOP grid: every depth at every FLOPs budget, then optimal N and D vs compute.

    python jobs/scaling_laws.py                                  # CPU: tiny d1-d3 x 2 budgets
    python jobs/scaling_laws.py --preset gpt2 --depths 8,10,12,14,16 --budgets 1e17,3e17,1e18

Each budget's trials cost the same FLOPs; the loss minimum over model size at each budget gives the
compute-optimal params and tokens, and their power laws in C (with bootstrap intervals) go into
runs/<name>/report.md beside the usual tables and plots.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jobs._cli import job_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    job_main(argv, prog="jobs/scaling_laws.py", doc=__doc__, job="scaling-laws", grid="isoflop")


if __name__ == "__main__":
    main()
