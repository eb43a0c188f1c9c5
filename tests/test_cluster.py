"""The cluster, proven on one machine (nanoray/dev/cluster.py): a head and worker nodes that share no disk (each
worker in its own mount and UTS namespace, the checkout and the test's directories hidden under a tmpfs), an S3
server for storage, the job submitted through `ray job submit` with token auth, a worker node lost mid-trial,
a checkpoint scored on another node, a lost CORE task run again elsewhere, bad storage refused before any
training, and an autoscaler (Ray's fake multi-node provider, cluster.yaml's node types) adding and removing
nodes."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from nanoray.dev.cluster import (LocalCluster, S3Server, fake_autoscaling_config, free_port, lose_a_training_node,
                                 registered_checkpoint)
from nanoray.dev.procs import ray_processes
from nanoray.position import StreamPosition

ROOT = Path(__file__).resolve().parents[1]
STORAGE = "s3://nanoray/runs"
REPORT = "nanoray/runs/reports/miniseries"  # the default --out beside an object-store root, as the S3 path
# Node failures detected in ~3 s, not Ray's default ~18 s (health checks every second, 3 misses).
FAST_FAILURES = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="simulated nodes need root and unshare (mount and UTS namespaces)")


def test_free_ports_are_never_handed_out_twice():
    """The OS offers a probed port again once its socket closes: 500 bare probes almost always repeat one (a node
    once got one port for two of its components and did not start). free_port never repeats within a process."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


@pytest.fixture(scope="module")
def s3():
    with S3Server(f"/tmp/nrs3-{os.getpid()}") as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """A head and two worker nodes; what the driver's disk holds (the checkout, pytest's directories, the CORE
    cache) is hidden from the workers."""
    work = Path(f"/tmp/nrc-{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    hide = [ROOT, tmp_path_factory.getbasetemp(), Path.home() / ".cache" / "nanoray"]
    with LocalCluster(work, hide=hide, env=s3.env, system_config=FAST_FAILURES) as c:
        c.add_worker()
        c.add_worker()
        yield c
    shutil.rmtree(work, ignore_errors=True)


def read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def in_cluster(cluster: LocalCluster, code: str, timeout: float = 300) -> dict:
    """Run `code` as a driver of the cluster (its token and S3 environment; the checkout uploaded as its working
    directory, since the worker nodes have no copy); the JSON its last line prints."""
    script = (f"import json, ray\nray.init(address={cluster.address!r}, log_to_driver=False, "
              f"runtime_env=dict(working_dir={str(ROOT)!r}))\n{code}")
    run = subprocess.run([sys.executable, "-c", script], env=dict(cluster.env(), PYTHONPATH=str(ROOT)), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1200)
def test_a_miniseries_through_the_front_door_survives_a_lost_node(cluster, s3, write_bundle, tmp_path):
    """ray job submit -> trials on the worker nodes, storage in S3; the node training a trial is killed after
    the trial's first registered checkpoint; the trial goes on on the other node from that checkpoint at the
    exact row, every depth finishes, and the report is complete."""
    fs = s3.filesystem()
    # CORE tasks that exist only on the driver's disk (hidden from the workers): they travel by object store
    lm = [{"context": f"{i} and {i} make", "continuation": f" {2 * i}"} for i in range(6)]
    tasks = write_bundle(tmp_path / "tasks", {"lm": ("language_modeling", 1, lm)})
    sid = cluster.submit(["python", "jobs/miniseries.py", "--storage", STORAGE, "--depths", "1,2", "--ratio", "0.25",
                          "--checkpoint-every", "2", "--core", str(tasks), "--core-max-per-task", "4"],
                         working_dir=ROOT, submission_id="miniseries")
    run = lose_a_training_node(cluster, fs, "nanoray/runs/train/miniseries-d1", sid, timeout=800)
    print(json.dumps({k: v for k, v in run.items() if k != "logs"}))
    assert run["status"] == "SUCCEEDED" and run["killed"], run["logs"][-3000:]
    node, killed_at = run["killed"]["node"], run["killed"]["after_step"]
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(read(fs, f"{REPORT}/results.csv").decode()))}
    assert [(t, r["status"]) for t, r in rows.items()] == [("d1", "done"), ("d2", "done")]
    workers = {n.name for n in cluster.workers}
    assert all(r["hostname"] in workers and r["node_id"] for r in rows.values())  # trained on worker nodes
    hostnames = rows["d1"]["hostnames"].split(";")
    assert hostnames[0] == node and hostnames[-1] != node  # d1 moved off the lost node
    assert run["resumed_from"] and min(run["resumed_from"]) >= killed_at >= 2
    # the exact row: every row of d1's steps consumed once (a repeat would have raised in the worker)
    final = registered_checkpoint(fs, "nanoray/runs/train/miniseries-d1")
    meta = json.loads(read(fs, f"{final.path}/meta.json"))
    position = StreamPosition.from_json(meta["data"]["position"])
    consumed = sum(b - a for s in position.slots.values() for r in s.rows.values() for a, b in r)
    plan = meta["plan"]
    assert meta["step"] == plan["iterations"] and position.done_slots == [] and \
        consumed == plan["iterations"] * plan["total_batch_tokens"] // plan["model"]["seq_len"]
    for name in ("report.md", "report.html", "bpb_vs_flops.png", "loss_curves.png", "core_vs_flops.png"):
        assert fs.get_file_info(f"{REPORT}/{name}").size > 0, name
    assert all(r["core"] for r in rows.values())  # CORE of each depth, scored on the worker nodes
    for trial in rows:
        scored = json.loads(read(fs, f"{REPORT}/core/{trial}.json"))["result"]
        assert scored["hostname"] in workers


@pytest.mark.timeout(600)
def test_a_checkpoint_is_scored_on_another_node_and_a_lost_core_task_runs_again(cluster, s3, write_bundle,
                                                                                tmp_path):
    """d1's final checkpoint, written by the node that trained it, is scored by a node that did not (the same
    score as the job's); then the node running a CORE task is killed and the task runs again elsewhere."""
    fs = s3.filesystem()
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO(read(fs, f"{REPORT}/results.csv").decode()))}
    trained_on = rows["d1"]["hostname"]
    spare = cluster.add_worker()  # a replacement for the node the first test lost, as an autoscaler would add
    lm = [{"context": f"{i} and {i} make", "continuation": f" {2 * i}"} for i in range(6)]
    small = write_bundle(tmp_path / "small", {"lm": ("language_modeling", 1, lm)})
    long = write_bundle(tmp_path / "long", {"lm": ("language_modeling", 0, [
        {"context": f"count {' '.join(map(str, range(i, i + 40)))}", "continuation": f" {i + 40}"}
        for i in range(600)])})
    checkpoint = rows["d1"]["checkpoint"]
    other = next(n.name for n in cluster.workers if n.alive and n.name != trained_on)
    scored = in_cluster(cluster, f"""
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from nanoray.core_eval import load_tasks
from nanoray.family import core_task
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerHostname"] == {other!r})
pinned = ray.remote(num_cpus=0.01)(core_task).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, False))
print(json.dumps(ray.get(pinned.remote({checkpoint!r}, load_tasks({str(small)!r}, 4), False, 1.0))))
""")
    assert scored["hostname"] == other != trained_on
    assert scored["core"] == pytest.approx(float(rows["d1"]["core"]))  # the same checkpoint, the same score

    # A CORE task on the spare node (soft affinity: a retry may go anywhere); kill that node while it runs.
    driver = subprocess.Popen([sys.executable, "-c", f"""
import json, ray
ray.init(address={cluster.address!r}, log_to_driver=False, runtime_env=dict(working_dir={str(ROOT)!r}))
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from nanoray.core_eval import load_tasks
from nanoray.family import CORE_RETRIES, core_task
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerHostname"] == {spare.name!r})
task = ray.remote(num_cpus=0.01, **CORE_RETRIES)(core_task)
ref = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, True)).remote(
    {checkpoint!r}, load_tasks({str(long)!r}), False, 1.0)
print(json.dumps(ray.get(ref)))
"""], env=dict(cluster.env(), PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not any(cluster.node_of(p.pid) is spare for p in ray_processes("ray::core_task")):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        assert time.time() < deadline, "the CORE task never ran on the spare node"
        time.sleep(0.2)
    cluster.kill(spare)
    out, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["hostname"] != spare.name and result["examples"] == 600


@pytest.mark.timeout(600)
def test_the_family_is_served_from_object_storage(cluster, s3):
    """The same job with --serve: nothing trains again, the report (in S3) lists checkpoints in S3, and replicas
    on the worker nodes load them: every depth answers over HTTP at the head; stopping the job stops serving."""
    port = free_port()
    sid = cluster.submit(["python", "jobs/miniseries.py", "--storage", STORAGE, "--depths", "1,2", "--ratio", "0.25",
                          "--checkpoint-every", "2", "--core", "none", "--serve", "--serve-port", str(port)],
                         working_dir=ROOT, submission_id="served")
    jobs, deadline = cluster.jobs(), time.time() + 400
    while "serving until stopped" not in jobs.get_job_logs(sid):
        assert not jobs.get_job_status(sid).is_terminal(), jobs.get_job_logs(sid)[-3000:]
        assert time.time() < deadline, jobs.get_job_logs(sid)[-3000:]
        time.sleep(2)
    base = f"http://127.0.0.1:{port}"
    models = requests.get(f"{base}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["nanoray-d1", "nanoray-d2"]
    for depth in (1, 2):
        reply = requests.post(f"{base}/d{depth}/chat", timeout=120, json=dict(
            messages=[dict(role="user", content="hello")], max_tokens=4, temperature=0, stream=False)).json()
        assert reply["usage"]["completion_tokens"] >= 1, reply
    assert "resumed from step" not in jobs.get_job_logs(sid)  # finished trials were not trained again
    jobs.stop_job(sid)
    deadline = time.time() + 60
    while True:
        try:
            requests.get(f"{base}/v1/models", timeout=5)
        except requests.ConnectionError:
            break
        assert time.time() < deadline, "still serving after the job stopped"
        time.sleep(1)


@pytest.mark.timeout(300)
def test_bad_storage_stops_the_job_before_anything_runs(cluster, s3):
    """Each names --storage and the location, and nothing is trained or written."""
    def job(storage: str, **env) -> subprocess.CompletedProcess:
        environ = dict(cluster.env(), RAY_ADDRESS=cluster.address, **env)
        for key in [k for k, v in env.items() if v is None]:
            environ.pop(key)
        return subprocess.run([sys.executable, str(ROOT / "jobs" / "miniseries.py"), "--storage", storage,
                               "--depths", "1", "--core", "none"], env=environ, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)

    cases = [("s3://no-such-bucket/runs", {}, "the bucket 'no-such-bucket' does not exist"),
             (STORAGE, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, "cannot reach the object store"),
             (STORAGE, {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "access denied"),
             ("/tmp/nanoray-not-shared", {}, "is a path on this machine, but the cluster has")]
    for storage, env, reason in cases:
        run = job(storage, **{k: v for k, v in env.items()})
        assert run.returncode == 2 and f"--storage {storage}" in run.stderr.replace("--storage: ", "--storage ") \
            and reason in run.stderr, run.stderr[-2000:]
    assert not Path("/tmp/nanoray-not-shared/train").exists()
    # --shared-storage (or a file:// URI) says every node sees the path: accepted
    accepted = in_cluster(cluster, """
from jobs._cli import check_storage
for storage, shared in (("/tmp/nanoray-shared", True), ("file:///tmp/nanoray-shared", False)):
    check_storage(storage, shared)
print(json.dumps(dict(ok=True)))
""")
    assert accepted == {"ok": True}


@pytest.mark.timeout(600)
def test_the_autoscaler_adds_nodes_for_the_trials_and_removes_them_when_idle(tmp_path):
    """cluster.yaml's node types, started with no workers by Ray's fake multi-node provider: the job's trial
    makes the autoscaler add a node, and it is removed after the (shortened) idle timeout."""
    config = fake_autoscaling_config(ROOT / "cluster.yaml", idle_timeout_minutes=0.25)
    assert set(config["available_node_types"]) == {"ray.head.default", "h100x8", "h100x1"}
    work = Path(f"/tmp/nra-{os.getpid()}")
    with LocalCluster(work, autoscaling_config=config, system_config=FAST_FAILURES,
                      head_resources=config["available_node_types"]["ray.head.default"]["resources"]) as c:
        t0, timeline = time.time(), []

        def sample():
            timeline.append((round(time.time() - t0, 1), c.alive_nodes()))

        sample()
        # The checkout in place, not uploaded: the fake provider's nodes share the head's Ray session directory,
        # and an uploaded working directory (the job driver's cwd) was deleted under the driver when they went.
        sid = c.submit(["python", str(ROOT / "jobs" / "miniseries.py"), "--storage", str(tmp_path / "runs"),
                        "--shared-storage", "--depths", "1", "--ratio", "0.25", "--core", "none", "--no-gpu"],
                       None, "autoscaled", pythonpath=ROOT)
        jobs = c.jobs()
        while not jobs.get_job_status(sid).is_terminal():
            sample()
            assert time.time() - t0 < 400, jobs.get_job_logs(sid)[-3000:]
            time.sleep(3)
        assert str(jobs.get_job_status(sid)) == "SUCCEEDED", jobs.get_job_logs(sid)[-3000:]
        while timeline[-1][1] > 1 and time.time() - t0 < 540:
            time.sleep(3)
            sample()
    shutil.rmtree(work, ignore_errors=True)
    print("node count over time (s, alive nodes):", timeline)
    counts = [n for _, n in timeline]
    assert counts[0] == 1 and max(counts) >= 2 and counts[-1] == 1  # rose for the trial, fell when idle
