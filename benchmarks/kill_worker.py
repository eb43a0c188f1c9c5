"""A Train worker killed mid-trial in a real miniseries job: the trial resumes from its last checkpoint
and the job finishes. Runs jobs/miniseries.py with the given flags (plus --checkpoint-every), SIGKILLs
one Ray Train worker process once the first periodic checkpoint is on disk, waits for the job, and
checks that every trial finished.

    python benchmarks/kill_worker.py --checkpoint-every 20 -- --preset gpt2 --depths 8 --workers 8 --ratio 2
    python benchmarks/kill_worker.py --checkpoint-every 2 -- --depths 1 --workers 2 --core none   # CPU

Last line: one JSON object with killed_pid, kill_after_s, checkpoint_step (the latest registered one at
the kill), resumed_from_steps (where the restarted workers
went on), wall_s, returncode, trials, statuses, steps. Exits 1 unless a worker was killed, the trial
resumed from a checkpoint and every trial finished.
"""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoray.dev.procs import registered_checkpoint, train_workers  # noqa: E402
from nanoray.storage import RunStore  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint-every", type=int, required=True, help="steps between the trial's checkpoints")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the job may take")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then jobs/miniseries.py's flags")
    args = p.parse_args()
    job_args = [a for a in args.job_args if a != "--"]

    with tempfile.TemporaryDirectory() as tmp:
        storage, out = Path(tmp) / "storage", Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "jobs" / "miniseries.py"), *job_args, "--name", "killed",
               "--checkpoint-every", str(args.checkpoint_every), "--storage", str(storage), "--out", str(out)]
        print("running:", " ".join(cmd), flush=True)
        start = time.time()
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        killed: dict = {}
        resumed: list[int] = []

        def tee():  # the job's output through to ours, noting where restarted workers resumed
            for line in job.stdout:
                sys.stdout.write(line)
                if m := re.search(r"resumed from step (\d+) of", line):
                    resumed.append(int(m.group(1)))

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()

        def killer():  # once Train has registered a periodic checkpoint, SIGKILL one Train worker
            while job.poll() is None and not killed:
                workers = train_workers()
                step = registered_checkpoint(RunStore(storage))
                if workers and step is not None:
                    victim = workers[-1]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.update(pid=victim.pid, after_s=round(time.time() - start, 1), checkpoint_step=step)
                    print(f"killed Train worker {victim.pid} after {killed['after_s']} s (checkpoint at step {step})",
                          flush=True)
                time.sleep(0.2)

        watcher = threading.Thread(target=killer, daemon=True)
        watcher.start()
        try:
            returncode = job.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            job.kill()
            returncode = job.wait()
        watcher.join(timeout=5)
        reader.join(timeout=5)
        rows = list(csv.DictReader(open(out / "results.csv"))) if (out / "results.csv").exists() else []
        result = dict(killed_pid=killed.get("pid"), kill_after_s=killed.get("after_s"),
                      checkpoint_step=killed.get("checkpoint_step"),
                      resumed_from_steps=resumed, wall_s=round(time.time() - start, 1),
                      returncode=returncode, trials=[r["trial"] for r in rows],
                      statuses=[r["status"] for r in rows], steps=[r.get("steps_done") for r in rows])
    print(json.dumps(result))
    ok = killed and resumed and returncode == 0 and rows and all(r["status"] == "done" for r in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
