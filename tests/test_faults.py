"""Fault tolerance for real: a Train worker killed with SIGKILL mid-run is restarted by Ray Train and
the run resumes from its last checkpoint at the exact data position, alone or as one of two DDP workers."""

import os
import signal
import threading
from pathlib import Path

import pytest

from nanoray.checkpoint import read_meta
from nanoray.data import DataSpec
from nanoray.dev.procs import train_workers
from nanoray.dial import Horizon, plan
from nanoray.storage import RunStore
from nanoray.position import StreamPosition
from nanoray.train import TrainConfig, fit


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_worker_restarts_and_resumes_at_the_exact_row(ray_cluster, corpus, tmp_path, workers):
    spec, _, data_dir = corpus
    run = plan(2, "tiny", Horizon(iterations=12), device_batch_size=8 // workers, num_workers=workers)
    config = TrainConfig(plan=run, data=DataSpec(kind="corpus", source=spec, data_dir=str(data_dir),
                                                 cpus_per_actor=0.5),
                         log_every=1, eval_every=0, eval_tokens=8 * 256, checkpoint_every=2)
    store = RunStore(tmp_path / "runs")
    seen, killed, done = set(), [], threading.Event()

    def killer():  # once Train has registered a checkpoint (not merely written it), SIGKILL a worker
        while not done.is_set():
            workers = train_workers()
            seen.update(p.pid for p in workers)
            if not killed and workers and store.latest_checkpoint("killed") is not None:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed.append(workers[0].pid)
            done.wait(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = fit(config, "killed", store, cpus_per_worker=1, max_failures=1)
    finally:
        done.set()
        thread.join()
    assert killed and len(seen) > workers  # one worker died, a new group took over
    assert result.metrics["step"] == 12 and result.metrics["start_step"] >= 2  # went on from a checkpoint
    with result.checkpoint.as_directory() as d:
        position = StreamPosition.from_json(read_meta(Path(d))["data"]["position"])
    # every row consumed exactly once: 12 steps x 16 rows (a repeated row would have raised in the worker)
    consumed = sum(b - a for s in position.slots.values() for ranges in s.rows.values() for a, b in ranges)
    assert position.done_slots == [] and consumed == 12 * run.total_batch_tokens // run.model.seq_len
