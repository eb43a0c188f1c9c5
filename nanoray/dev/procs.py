"""Ray's processes on this machine, for fault tests and benchmarks that kill them on purpose.

    victim = train_workers()[0]                      # a Ray Train worker of a running fit()
    ray_processes("ray::core_task")                  # the workers running a task of that name
    registered_checkpoint(RunStore("runs/sweeps"))   # the step of a checkpoint Train would resume from
"""

from pathlib import Path

import psutil

from nanoray.storage import RunStore


def ray_processes(title: str) -> list[psutil.Process]:
    """Ray's processes on this machine whose title holds `title` (Ray titles a worker by its actor or task:
    "ray::RayTrainWorker", "ray::core_task")."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if title in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes running on this machine."""
    return ray_processes("RayTrainWorker")


def registered_checkpoint(store: RunStore) -> int | None:
    """The step of a checkpoint Ray Train has registered for some run of `store` (a local root), or None. A
    checkpoint directory on disk is not enough: one whose worker dies before its report is registered is not
    resumed from."""
    for snapshot in Path(store.train_root).glob("*/checkpoint_manager_snapshot.json"):
        checkpoint = store.latest_checkpoint(snapshot.parent.name)
        if checkpoint is not None:
            return int(Path(checkpoint.path).name.removeprefix("step_"))
    return None
