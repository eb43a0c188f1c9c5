"""The path a cluster user takes: `ray start --head`, `ray job submit -- python jobs/miniseries.py`, the
report files; a driver killed mid-sweep whose re-submitted job resumes without re-training; and the
same command with --serve, which keeps the family served over HTTP until the job is stopped."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from nanoray.dev.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def head(tmp_path_factory):
    """A Ray head of its own (not the session's cluster), with the dashboard's job API; stopped by
    ending its `ray start --block` process."""
    temp = Path(f"/tmp/nrjob-{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes
    dashboard = free_port()
    ray_bin = Path(sys.executable).with_name("ray")  # the ray of this interpreter, else the one on PATH
    ray_bin = ray_bin if ray_bin.exists() else Path(shutil.which("ray"))
    # Every port of its own: the session's cluster already holds Ray's defaults (the job agent's 52365...).
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "ray-client-server-port", "node-manager-port",
                                                    "object-manager-port")]
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", *ports, f"--dashboard-port={dashboard}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4",
                             '--resources={"trial_driver": 100}', f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(1)
    yield ray_bin, address, client
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_and_resumes_the_miniseries(head, tmp_path):
    ray_bin, address, client = head
    out, storage = tmp_path / "report", tmp_path / "runs"
    command = ["--", sys.executable, "jobs/miniseries.py", "--depths", "1,2", "--ratio", "0.25", "--out", str(out),
               "--storage", str(storage)]
    # CORE left at auto (core-lite on CPU) whose tasks cannot be had: the job goes on without CORE and says so,
    # after the plan and again after the summary (issue 17, finding 10), rather than silently
    (tmp_path / "no-bigbench").mkdir()
    no_tasks = json.dumps({"env_vars": {"NANORAY_BIGBENCH_DIR": str(tmp_path / "no-bigbench"),
                                        "NANORAY_CACHE": str(tmp_path / "cache")}})  # no core-lite built before
    submit = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(ROOT),
              "--runtime-env-json", no_tasks]

    # First submission, without waiting; once d1 is finished and d2 is training, kill the driver.
    deadline = time.time() + 180
    while True:  # the head's job agent comes up a little after the dashboard
        run = subprocess.run([*submit, "--no-wait", "--submission-id", "first", *command], capture_output=True,
                             text=True, timeout=120)
        if "No available agent" not in run.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert run.returncode == 0, run.stderr[-3000:]
    deadline = time.time() + 420
    while not list((storage / "train" / "miniseries-d2").glob("*")):
        assert client.get_job_status("first").is_terminal() is False, client.get_job_logs("first")[-3000:]
        assert time.time() < deadline, client.get_job_logs("first")[-3000:]
        time.sleep(1)
    client.stop_job("first")
    while not client.get_job_status("first").is_terminal():
        time.sleep(0.5)
    d1_weights = list((storage / "train" / "miniseries-d1").rglob("model.safetensors"))
    assert d1_weights and not (out / "results.csv").exists()
    stamps = {p: p.stat().st_mtime for p in d1_weights}

    # The same command again: the sweep resumes, d1 is not trained again, d2 finishes, the report appears.
    run = subprocess.run([*submit, "--submission-id", "second", *command], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and str(client.get_job_status("second")) == "SUCCEEDED", \
        (run.stdout + run.stderr)[-3000:]
    assert {p: p.stat().st_mtime for p in (storage / "train" / "miniseries-d1").rglob("model.safetensors")} == stamps
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["trial"], r["status"]) for r in rows] == [("d1", "done"), ("d2", "done")]
    # A run that goes well reads clean (issue 17, finding 9: 515 lines, Tune's tables, Ray's error lines): the
    # plan, one line per report, the summary; the workers' own output stays in their logs.
    logs = client.get_job_logs("second")
    assert "Trial status" not in logs and "core_worker.cc" not in logs and " ERROR " not in logs, logs[-3000:]
    assert "Configuration for experiment" not in logs and "View detailed results" not in logs, logs[-3000:]
    assert "d2 step" in logs and "report:" in logs and len(logs.splitlines()) < 120, logs[-3000:]
    assert "warning: no CORE for this sweep (core-lite)" in logs and "NANORAY_BIGBENCH_DIR" in logs, logs[-3000:]
    assert "warning: this report has no CORE" in logs.split("d2 step")[-1], logs[-3000:]
    assert all(not r.get("core") for r in rows)
    for name in ("report.md", "report.html", "bpb_vs_flops.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0

    # Once more with --serve: nothing trains, the report is rewritten, and every depth answers over HTTP.
    port = free_port()
    run = subprocess.run([*submit, "--no-wait", "--submission-id", "third", *command, "--serve", "--serve-port",
                          str(port)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    deadline = time.time() + 300
    while "serving until stopped" not in client.get_job_logs("third"):
        assert not client.get_job_status("third").is_terminal(), client.get_job_logs("third")[-3000:]
        assert time.time() < deadline, client.get_job_logs("third")[-3000:]
        time.sleep(1)
    assert f"http://127.0.0.1:{port}/d2/chat" in client.get_job_logs("third")
    models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["nanoray-d1", "nanoray-d2"]
    reply = requests.post(f"http://127.0.0.1:{port}/d2/chat", timeout=60, json=dict(
        messages=[dict(role="user", content="hello")], max_tokens=4, temperature=0, stream=False)).json()
    assert reply["usage"]["completion_tokens"] >= 1, reply
    assert {p: p.stat().st_mtime for p in (storage / "train" / "miniseries-d1").rglob("model.safetensors")} == stamps
    client.stop_job("third")
    while not client.get_job_status("third").is_terminal():
        time.sleep(0.5)
    deadline = time.time() + 60  # stopping the job takes the family down (Serve's actors are detached)
    while True:
        try:
            status = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code
        except requests.ConnectionError:
            break
        if status == 404:
            break
        assert time.time() < deadline, f"still serving {status} after the job stopped"
        time.sleep(1)
