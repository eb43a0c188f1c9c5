"""CORE for a whole family: every trial's final checkpoint is scored by its own Ray task, started the
moment its trial finishes, so the other depths keep training meanwhile.

    evals = FamilyCore(sweep, out_dir="runs/miniseries")
    run_sweep(sweep, callbacks=[evals.callback()])   # each finished trial starts its CORE task
    evals.fill(rows)                                   # waits; adds core and core_<task> to each row

A score is kept in out_dir/core/<trial>.json with the checkpoint and task set it belongs to, so a
re-submitted sweep scores only what it has not scored yet. A failed evaluation leaves `core` empty
and prints why; it never fails the sweep whose training already succeeded.
"""

import json
import os
from pathlib import Path

from ray.tune import Callback


def core_task(checkpoint: str, tasks: str, max_per_task: int | None, use_gpu: bool, gpu_share: float) -> dict:
    """Ray task body: CORE of one checkpoint (a local directory or a storage URI such as s3://...) on one
    actor holding `gpu_share` of a GPU."""
    import ray.train

    from nanoray.core_eval import evaluate_core

    with ray.train.Checkpoint(checkpoint).as_directory() as local:
        result = evaluate_core(local, tasks, num_workers=1, max_per_task=max_per_task, use_gpu=use_gpu,
                               gpu_share=gpu_share)
    result["checkpoint"] = checkpoint
    return result


class FamilyCore:
    """The CORE evaluations of one sweep's trials, keyed by trial name."""

    def __init__(self, sweep, out_dir: str | os.PathLike):
        self.sweep, self.dir = sweep, Path(out_dir) / "core"
        self.pending: dict[str, tuple[str, object]] = {}  # trial -> (checkpoint, ObjectRef)

    def _key(self, checkpoint: str) -> dict:
        return dict(checkpoint=checkpoint, tasks=self.sweep.core, max_per_task=self.sweep.core_max_per_task)

    def _cached(self, trial: str, checkpoint: str) -> dict | None:
        path = self.dir / f"{trial}.json"
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved if saved.get("key") == self._key(checkpoint) else None

    def start(self, trial: str, checkpoint: str | None) -> None:
        """Start scoring `checkpoint` unless it is scored already (or being scored)."""
        import ray

        if not checkpoint or trial in self.pending or self._cached(trial, checkpoint):
            return
        task = ray.remote(num_cpus=0.01)(core_task)
        # The evaluator takes the GPU share of one Train worker: the slot its trial just gave back. A
        # smaller share would leave the rest of that slot too small for the next trial anyway.
        ref = task.remote(checkpoint, self.sweep.core, self.sweep.core_max_per_task, self.sweep.use_gpu,
                          self.sweep.gpus_per_worker)
        self.pending[trial] = (checkpoint, ref)
        print(f"CORE: scoring {trial} ({self.sweep.core})", flush=True)

    def callback(self) -> "StartCore":
        return StartCore(self)

    def fill(self, rows: list[dict]) -> None:
        """Wait for the scores (starting any a finished trial still lacks) and put them into `rows`:
        `core` and one `core_<task>` column (centered accuracy) per task."""
        import ray

        for r in rows:
            if r["status"] == "done":
                self.start(r["trial"], r["checkpoint"])
        for trial, (checkpoint, ref) in self.pending.items():
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a failed eval must not lose the sweep's results
                print(f"CORE: {trial} failed: {e}", flush=True)
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{trial}.json.tmp"
            tmp.write_text(json.dumps(dict(key=self._key(checkpoint), result=result)))
            os.replace(tmp, self.dir / f"{trial}.json")
            print(f"CORE: {trial} {result['core']:.4f} ({result['examples']} examples, "
                  f"{result['examples_per_s']:.0f}/s)", flush=True)
        self.pending.clear()
        for r in rows:
            saved = r["status"] == "done" and self._cached(r["trial"], r["checkpoint"])
            if saved:
                r["core"] = saved["result"]["core"]
                r.update({f"core_{label}": t["centered"] for label, t in saved["result"]["tasks"].items()})


class StartCore(Callback):
    """A Tune callback that starts a trial's CORE task as soon as the trial completes. It pickles
    (with the Tuner's state) as a no-op: a restored sweep registers the live one again."""

    def __init__(self, family: FamilyCore | None):
        self.family = family

    def __getstate__(self):
        return {"family": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.family is not None and result.get("step") and result.get("step") == result.get("iterations"):
            from nanoray.sweep import storage_uri

            self.family.start(trial.config["point"]["trial"],
                              storage_uri(self.family.sweep, result.get("checkpoint_path")))
