"""A Ray cluster of separate machines, simulated on this one (Linux, as root): a head and worker nodes that
share nothing but Ray's session files and the loopback network, and an S3 server for their storage.

    with LocalCluster("/tmp/nrc", hide=[checkout, "/tmp/runs"]) as cluster:
        cluster.add_worker("cpu")           # its own mount and UTS namespace: hostname nanoray-cpu-1
        cluster.add_worker("cpu")
        ... ray job submit --address {cluster.dashboard_url} ... (with cluster.env())
        cluster.kill(cluster.workers[0])    # the node's every process, by process group: a lost machine

    python -m nanoray.dev.cluster up --workers 2 --s3     # the same from a shell: prints the addresses
    python -m nanoray.dev.cluster down                    # and stops them

Each worker node is `ray start --block` inside `unshare --mount --uts`: a private tmpfs covers every `hide`
directory (the project's checkout, the driver's run directories, ~/.cache/nanoray), so a path that exists
only on the driver's disk cannot be read there, as on a cloud node; its hostname is its own, and so is its
Ray temp dir (logs, sockets, the job's downloaded working directory). The head has no
CPUs (as cluster.yaml's head) and the `trial_driver` resource, so Train workers, Ray Data actors, CORE tasks
and Serve replicas all land on worker nodes, while job drivers and trial drivers stay on the head. Token
auth is on, as cluster.yaml has it. Each node is a session of its own: killing it takes the raylet and
every worker process of that node.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs

from nanoray.dev.procs import train_workers

WORKER_CPUS = 2  # logical CPUs per worker node: bookkeeping (ray-notes §6), so 2 real cores carry 2 nodes
STATE = "cluster.json"


_GIVEN: set[int] = set()  # ports free_port has handed out in this process


def free_port() -> int:
    """A port free on 127.0.0.1 now and not handed out before by this process: the OS may offer a port again as
    soon as its probe socket closes (it once gave a node's node-manager and dashboard-agent the same one, and that
    Ray node refused to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def ray_executable() -> str:
    """The `ray` of this interpreter (a venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray") or "ray"


def node_ports() -> list[str]:
    """Every port of a node its own: nodes on one machine would otherwise collide on Ray's fixed defaults."""
    return [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port",
                                                   "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port")]


class Node:
    """One simulated machine: its `ray start --block` process, leader of the node's session. Every process of
    the node is in that session: the raylet and agents in its process group, Ray's workers in groups of their
    own (the raylet starts each in a new group) but the same session."""

    def __init__(self, name: str, proc: subprocess.Popen, resources: dict):
        self.name, self.proc, self.resources = name, proc, resources
        self.killed_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> list[psutil.Process]:
        """Every process of this node still running (zombies not counted): its session's."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return found


class LocalCluster:
    """A head and worker nodes on this machine; see the module docstring."""

    def __init__(self, work_dir: str | os.PathLike, hide: list[str | os.PathLike] = (), env: dict | None = None,
                 head_resources: dict | None = None, system_config: dict | None = None,
                 autoscaling_config: dict | None = None):
        """work_dir: logs, the auth token, Ray's temp dir (kept short: socket paths). hide: directories worker
        nodes must not see. env: more environment for every node (S3 endpoint and credentials). system_config:
        Ray's, for the head (tests shorten failure detection). autoscaling_config: a fake_multinode cluster
        config (fake_autoscaling_config): the head runs an autoscaler that adds and removes worker nodes."""
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hide = [Path(h).resolve() for h in hide]
        self.token = self.dir / "auth_token"
        if not self.token.exists():
            self.token.write_text(secrets.token_hex(32))
        self.extra_env = dict(env or {})
        self.head_resources = head_resources or {"trial_driver": 100}
        self.system_config, self.autoscaling_config = system_config, autoscaling_config
        self.port, self.dashboard_port = free_port(), free_port()
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- addresses

    @property
    def address(self) -> str:
        """The GCS address a driver joins (ray.init(address=...), RAY_ADDRESS)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The job API (`ray job submit --address ...`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        """The environment of every node, and what a client (ray job, a driver) needs: token auth, the extra
        environment (S3 endpoint and credentials), Ray's test-speed knobs."""
        # A busy 2-core machine can take 15 s to start a node's dashboard agent; the raylet's default wait
        # for it is shorter, and the node dies at start (RAY_agent_register_timeout_ms).
        return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), RAY_USAGE_STATS_ENABLED="0",
                    RAY_agent_register_timeout_ms="120000", **self.extra_env)

    # ------------------------------------------------------------------------------------------- nodes

    def start(self) -> "LocalCluster":
        temp = self.dir / "ray"  # a short path of its own: Ray's socket paths must stay under 108 bytes
        cmd = [ray_executable(), "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
               "--node-ip-address=127.0.0.1",
               f"--resources={json.dumps({k: v for k, v in self.head_resources.items() if k != 'CPU'})}",
               "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}", *node_ports()]
        if self.system_config:
            cmd.append(f"--system-config={json.dumps(self.system_config)}")
        env = {}
        if self.autoscaling_config:
            config = dict(self.autoscaling_config, provider=dict(self.autoscaling_config["provider"],
                                                                 gcs_address=self.address))
            (self.dir / "autoscaling.json").write_text(json.dumps(config, indent=2))
            cmd.append(f"--autoscaling-config={self.dir / 'autoscaling.json'}")
            env = dict(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.head = Node("head", self._spawn(cmd, "head", env), self.head_resources)
        self._wait(lambda: self._dashboard_up(), f"the head's dashboard at {self.dashboard_url}", self.head)
        self._save()
        return self

    def add_worker(self, node_type: str = "cpu", cpus: float = WORKER_CPUS, resources: dict | None = None,
                   wait: bool = True) -> Node:
        """A worker node of `node_type` (a custom resource of that name marks it) in its own namespaces."""
        self._counts[node_type] = self._counts.get(node_type, 0) + 1
        name = f"nanoray-{node_type}-{self._counts[node_type]}"
        resources = {node_type: 1, **(resources or {})}
        before = self.alive_nodes()
        ray_cmd = [ray_executable(), "start", f"--address={self.address}", "--block", f"--num-cpus={cpus}",
                   "--node-ip-address=127.0.0.1",
                   f"--resources={json.dumps(resources)}", f"--temp-dir={self.dir / name}", *node_ports()]
        hide = " ".join(f"mkdir -p '{d}' && mount -t tmpfs -o size=1g tmpfs '{d}' && " for d in self.hide)
        # cd after the mounts: a working directory inside a hidden one would still reach what is under the tmpfs
        script = f"hostname {name} && {hide}cd '{self.dir}' && exec " + " ".join(f"'{a}'" for a in ray_cmd)
        node = Node(name, self._spawn(["unshare", "--mount", "--uts", "--propagation", "private", "--",
                                       "sh", "-c", script], name), resources)
        self.workers.append(node)
        if wait:
            self._wait(lambda: self.alive_nodes() > before, f"worker node {name} to join", node)
        self._save()
        return node

    def node_of(self, pid: int) -> Node | None:
        """The worker node a process runs on (the one whose session holds it), or None."""
        try:
            sid = os.getsid(pid)
        except ProcessLookupError:
            return None
        return next((n for n in self.workers if n.proc.pid == sid), None)

    def submit(self, entrypoint: list[str], working_dir: str | os.PathLike | None, submission_id: str,
               pythonpath: str | os.PathLike | None = None) -> str:
        """`ray job submit --no-wait` of `entrypoint` with `working_dir` uploaded, as a user would (the CLI, token
        auth); returns the submission id. Without a working_dir, `pythonpath` is where the job's processes import
        from (nodes that share this machine's disk). The head's job agent comes up a little after its dashboard."""
        where = [f"--working-dir={working_dir}"] if working_dir else \
            [f"--runtime-env-json={json.dumps(dict(env_vars=dict(PYTHONPATH=str(pythonpath))))}"]
        cmd = [ray_executable(), "job", "submit", f"--address={self.dashboard_url}", *where,
               f"--submission-id={submission_id}", "--no-wait", "--", *entrypoint]
        deadline = time.time() + 120
        while True:
            run = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                return submission_id
            if "No available agent" not in run.stderr or time.time() > deadline:
                raise RuntimeError(f"ray job submit failed: {run.stderr[-2000:]}")
            time.sleep(2)

    def jobs(self):
        """A JobSubmissionClient of this cluster, with its token."""
        from ray.job_submission import JobSubmissionClient  # Ray's client, only where a cluster is driven

        return JobSubmissionClient(self.dashboard_url, headers={"authorization": f"Bearer {self.token.read_text()}"})

    def kill(self, node: Node) -> None:
        """SIGKILL every process of the node at once, as a machine that is switched off: its process group
        (ray start, raylet, agents), then the workers in the rest of its session."""
        processes = node.processes()
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in processes:
            try:
                p.kill()
            except psutil.Error:
                pass
        node.proc.wait()
        node.killed_at = time.time()

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            if node.alive:
                self.kill(node)
        (self.dir / STATE).unlink(missing_ok=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- state

    def alive_nodes(self) -> int:
        """Nodes alive in the cluster, by the GCS's own count (the State API through the dashboard)."""
        return len([n for n in self.nodes() if n["state"] == "ALIVE"])

    def nodes(self) -> list[dict]:
        """Every node the GCS knows (node_id, state, node_name, resources_total...), through the State API
        (`ray list nodes`, in a process of its own: it needs the cluster's token in its environment)."""
        for attempt in range(10):  # the dashboard's State API comes up a moment after the dashboard
            out = subprocess.run([ray_executable(), "list", "nodes", f"--address={self.dashboard_url}",
                                  "--format=json", "--limit=1000"], env=self.env(), capture_output=True, text=True,
                                 timeout=60)
            try:
                return json.loads(out.stdout)
            except json.JSONDecodeError:
                if attempt == 9:
                    raise RuntimeError(f"ray list nodes: {out.stderr[-500:]}") from None
                time.sleep(1)

    def _dashboard_up(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return True
        except OSError:
            return False

    def _spawn(self, cmd: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")
        return subprocess.Popen(cmd, env=dict(self.env(), **(env or {})), cwd=self.dir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _wait(self, ready, what: str, node: Node, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if not node.alive:
                raise RuntimeError(f"{what}: its process exited ({self.dir / (node.name + '.log')})")
            if time.time() > deadline:
                raise TimeoutError(f"{what}: not ready after {timeout:.0f} s ({self.dir / (node.name + '.log')})")
            time.sleep(0.5)

    def _save(self) -> None:
        state = dict(address=self.address, dashboard_url=self.dashboard_url, token=str(self.token),
                     env=self.extra_env, pgids=[n.proc.pid for n in [self.head, *self.workers] if n])
        (self.dir / STATE).write_text(json.dumps(state, indent=2))


def registered_checkpoint(filesystem, run_dir: str):
    """The checkpoint Ray Train has registered for the run at `run_dir` (a path in `filesystem`), or None."""
    import ray.train  # Ray Train's own reader of its snapshot

    try:
        return ray.train.Result.from_path(run_dir, storage_filesystem=filesystem).checkpoint
    except Exception:  # noqa: BLE001 - no run there yet, or its snapshot caught half-written
        return None


def lose_a_training_node(cluster: LocalCluster, filesystem, run_dir: str, submission_id: str,
                         timeout: float = 900) -> dict:
    """While job `submission_id` runs: once the Train run at `run_dir` (in `filesystem`) has a registered
    checkpoint, kill the worker node its Train worker runs on; then wait for the job. Returns what happened:
    the job's status and logs, the node killed and the checkpoint step it was killed after, where the restarted
    workers resumed (their "resumed from step" lines), the alive-node count over time, and the wall time."""
    jobs, t0, timeline = cluster.jobs(), time.time(), []
    killed = None
    while not jobs.get_job_status(submission_id).is_terminal():
        if time.time() - t0 > timeout:
            jobs.stop_job(submission_id)
            break
        if killed is None and (checkpoint := registered_checkpoint(filesystem, run_dir)) is not None:
            node = next((n for n in map(cluster.node_of, (p.pid for p in train_workers())) if n), None)
            if node is not None:
                cluster.kill(node)
                killed = dict(node=node.name, after_step=int(Path(checkpoint.path).name.removeprefix("step_")),
                              at_s=round(time.time() - t0, 1))
        if not timeline or time.time() - t0 - timeline[-1][0] > 5:
            timeline.append((round(time.time() - t0, 1), cluster.alive_nodes()))
        time.sleep(0.5)
    logs = jobs.get_job_logs(submission_id)
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in logs.splitlines()
               if "resumed from step" in line]
    return dict(status=str(jobs.get_job_status(submission_id)), logs=logs, killed=killed, resumed_from=resumed,
                timeline=timeline, wall_s=round(time.time() - t0, 1))


def fake_autoscaling_config(cluster_yaml: str | os.PathLike, idle_timeout_minutes: float = 0.25,
                            cpus_per_node: float = WORKER_CPUS) -> dict:
    """cluster.yaml's node types for Ray's fake_multinode provider (the autoscaler starts worker nodes as
    processes on this machine): the same worker type names and max_workers, min_workers 0, CPUs scaled to
    this machine (logical), the other resources as declared, and a short idle timeout; the head as cluster.yaml's
    (no CPUs, trial_driver). The provider names its head type ray.head.default."""
    import yaml  # a dependency already (cluster.yaml), imported only here

    raw = yaml.safe_load(Path(cluster_yaml).read_text())
    types = raw["available_node_types"]
    workers = {name: dict(resources=dict(t.get("resources", {}), CPU=cpus_per_node), node_config={},
                          min_workers=0, max_workers=t.get("max_workers", raw["max_workers"]))
               for name, t in types.items() if name != raw["head_node_type"]}
    head = dict(types[raw["head_node_type"]].get("resources", {}))
    return dict(cluster_name=f"{raw['cluster_name']}-fake", max_workers=raw["max_workers"],
                upscaling_speed=raw.get("upscaling_speed", 1.0), idle_timeout_minutes=idle_timeout_minutes,
                provider=dict(type="fake_multinode", use_node_id_as_ip=True, disable_node_updaters=True,
                              disable_launch_config_check=True),
                available_node_types={"ray.head.default": dict(resources=head, node_config={}, max_workers=0),
                                      **workers},
                head_node_type="ray.head.default", auth={}, docker={}, file_mounts={}, cluster_synced_files=[],
                file_mounts_sync_continuously=False, rsync_exclude=[], rsync_filter=[], initialization_commands=[],
                setup_commands=[], head_setup_commands=[], worker_setup_commands=[], head_start_ray_commands=[],
                worker_start_ray_commands=[])


# ---------------------------------------------------------------------------------------------------
# Object storage


class S3Server:
    """An S3 API on 127.0.0.1 (moto's server mode) with one bucket, and the AWS environment that points
    boto3, pyarrow and Ray at it."""

    def __init__(self, work_dir: str | os.PathLike, bucket: str = "nanoray"):
        self.dir, self.bucket, self.port = Path(work_dir), bucket, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict:
        return dict(AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", AWS_ACCESS_KEY_ID="nanoray",
                    AWS_SECRET_ACCESS_KEY="nanoray-secret", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

    def start(self) -> "S3Server":
        import boto3  # moto's server and boto3 come with the dev extra, only where a cluster is simulated

        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "s3.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="nanoray", aws_secret_access_key="nanoray-secret")
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=self.bucket)
                return self
            except Exception:  # noqa: BLE001 - not listening yet
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"S3 server did not start ({self.dir / 's3.log'})")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def filesystem(self):
        """A pyarrow filesystem of this server, for a reader whose own environment points elsewhere."""
        env = self.env
        return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                                 secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.dev.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head, worker nodes (and an S3 server); stays up until Ctrl-C or down")
    up.add_argument("--workers", type=int, default=2, help="worker nodes")
    up.add_argument("--s3", action="store_true", help="also an S3 server on 127.0.0.1 with a bucket `nanoray`")
    up.add_argument("--dir", default="/tmp/nanoray-cluster", help="logs, the auth token and the cluster's state")
    up.add_argument("--hide", action="append", default=[], help="a directory worker nodes must not see "
                    "(repeatable; default: this checkout and ~/.cache/nanoray)")
    down = sub.add_parser("down", help="stop a cluster that `up` started")
    down.add_argument("--dir", default="/tmp/nanoray-cluster")
    args = p.parse_args(argv)
    if args.command == "down":
        state = json.loads((Path(args.dir) / STATE).read_text())
        for pgid in state["pgids"]:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        (Path(args.dir) / STATE).unlink()
        print("stopped")
        return
    checkout = Path(__file__).resolve().parents[2]
    hide = args.hide or [str(checkout), str(Path.home() / ".cache" / "nanoray")]
    s3 = S3Server(Path(args.dir) / "s3").start() if args.s3 else None
    cluster = LocalCluster(args.dir, hide=hide, env=s3.env if s3 else None).start()
    for _ in range(args.workers):
        cluster.add_worker()
    exports = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token), **(s3.env if s3 else {})}
    print(f"head          {cluster.address} (dashboard and job API {cluster.dashboard_url})")
    for node in cluster.workers:
        print(f"worker node   {node.name} (pid {node.proc.pid}; hides {', '.join(hide)})")
    if s3:
        print(f"S3            {s3.env['AWS_ENDPOINT_URL']}, bucket s3://{s3.bucket}")
    print("in another shell:\n  " + " ".join(f"export {k}={v}" for k, v in exports.items()))
    print(f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- python jobs/miniseries.py "
          + (f"--storage s3://{s3.bucket}/runs" if s3 else "--storage <a path every node sees>"))
    print("Ctrl-C stops the cluster", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        if s3:
            s3.stop()


if __name__ == "__main__":
    main()
