"""The miniseries: a family of compute-optimal GPTs, one Ray Tune trial per depth, and its report.

    python jobs/miniseries.py                      # CPU: tiny d1-d3 on CPython's sources, local Ray, < 10 min
    python jobs/miniseries.py --preset gpt2 --depths 8,12,16,20 --source hf:karpathy/climbmix-400b-shuffle
    ray job submit --working-dir . -- python jobs/miniseries.py --storage s3://bucket/nanoray ...

Corpus and tokenizer (prepared once, reused) -> the sweep (a re-run with the same --name resumes it and
skips finished depths) -> a power-law fit of val bpb against FLOPs -> runs/<name>/: results.csv,
plots, report.md and report.html.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from nanoray.sweep import add_arguments, family_report, plan_table, plans, prepare_family, run_sweep, sweep_from_args


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="jobs/miniseries.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, grid="ratio")
    args = p.parse_args(argv)
    try:
        sweep = sweep_from_args(args, "miniseries", cpu_budgets=[])
        table = plan_table(sweep, plans(sweep))
    except ValueError as e:  # PlanError and pydantic's ValidationError are ValueErrors: name the flag, train nothing
        p.error(str(e))
    print(table, flush=True)
    sweep = prepare_family(sweep)
    grid = run_sweep(sweep)
    family_report(sweep, grid, args.out or os.path.join("runs", sweep.name))


if __name__ == "__main__":
    main()
