"""The miniseries on a simulated cluster (nanoray/dev/cluster.py): a head and worker nodes that share no disk,
storage in an S3 server on 127.0.0.1, the job through `ray job submit`, and one worker node lost mid-trial.
Linux, as root (mount and UTS namespaces).

    python benchmarks/cluster_sim.py                          # 2 worker nodes, depths 1,2 (~4 min on 2 cores)
    python benchmarks/cluster_sim.py --workers 3 --depths 1,2,3 --ratio 1

Last line: one JSON object with the nodes each trial ran on (hostnames in order: two after the lost node), the
node killed and the checkpoint step after which it was, where the trial resumed, the cluster's alive-node
count over time, the job's status and the wall time.
"""

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoray.dev.cluster import LocalCluster, S3Server, lose_a_training_node  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker nodes")
    p.add_argument("--depths", default="1,2")
    p.add_argument("--ratio", default="0.25")
    p.add_argument("--checkpoint-every", default="2")
    args = p.parse_args()
    work = Path(f"/tmp/nrsim-{os.getpid()}")
    start = time.time()
    with S3Server(work / "s3") as s3, LocalCluster(work, hide=[ROOT, Path.home() / ".cache" / "nanoray"],
                                                   env=s3.env) as cluster:
        for _ in range(args.workers):
            cluster.add_worker()
        up_s = time.time() - start
        sid = cluster.submit(["python", "jobs/miniseries.py", "--storage", "s3://nanoray/runs", "--depths",
                              args.depths, "--ratio", args.ratio, "--checkpoint-every", args.checkpoint_every,
                              "--core", "none"], ROOT, "cluster-sim")
        first = f"d{args.depths.split(',')[0]}"
        run = lose_a_training_node(cluster, s3.filesystem(), f"nanoray/runs/train/miniseries-{first}", sid)
        try:
            with s3.filesystem().open_input_stream("nanoray/runs/reports/miniseries/results.csv") as f:
                rows = list(csv.DictReader(io.StringIO(f.read().decode())))
        except OSError:
            rows = []
    shutil.rmtree(work, ignore_errors=True)
    if run["status"] != "SUCCEEDED":
        print(run["logs"][-3000:], file=sys.stderr)
    print(json.dumps(dict(status=run["status"], workers=args.workers, depths=args.depths,
                          nodes_per_trial={r["trial"]: r.get("hostnames", "").split(";") for r in rows},
                          statuses={r["trial"]: r["status"] for r in rows}, killed=run["killed"],
                          resumed_from=run["resumed_from"], node_count=run["timeline"], cluster_up_s=round(up_s, 1),
                          job_s=run["wall_s"], wall_s=round(time.time() - start, 1))))
    sys.exit(0 if run["status"] == "SUCCEEDED" else 1)


if __name__ == "__main__":
    main()
