"""Launching: the Ray Serve application of a family, one deployment per depth (an inference engine each)
behind one FastAPI ingress, and `serve_family`, which serves it until stopped.

    python -m serve --run-dir runs/miniseries                  # serve_family on local Ray: prints the URLs
    python jobs/miniseries.py --serve                          # the same after training the family
    serve run serve/config.yaml                                # build() through Serve's config file
    serve deploy serve/config.yaml --address http://HEAD:8265  # onto a running cluster

Why one application: the depths are discovered from the run directory when the app is built, so one
builder and one static config serve any run, behind one route table (`/d{depth}/...` and `/v1/...`).
Each depth is still its own deployment (`d1`, `d2`, ...) with its own replicas, GPU share, autoscaling
and health check; the ingress (serve/routes.py) calls them through DeploymentHandles (no second HTTP hop).
The price: a depth is not deployed or rolled back on its own (a deploy replaces the app; Serve restarts
only the deployments whose code or options changed).
"""

import logging
import signal
import time
import urllib.request

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from serve.depth import DepthModel
from serve.family import Family, find_family
from serve.routes import Gateway
from serve.schemas import MAX_BODY_BYTES

APP = "nanoray"
logger = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """What `build` takes (serve/config.yaml's `args`, `python -m serve`'s flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_dir: str | None = Field(None, description="a run directory with results.csv (runs/<name>)")
    checkpoints: list[str] = Field([], description="checkpoint directories, instead of run_dir")
    num_gpus: float | None = Field(None, ge=0, le=1, description="GPU share of each depth's replica; "
                                   "default 1/depths when the cluster has GPUs, else 0")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved for each depth's replica (its engine runs "
                            "one thread; small, so that a laptop's few CPUs hold every depth and the CORE actors)")
    max_batch: int = Field(32, ge=1, description="sequences one replica's engine decodes together")
    max_replicas: int = Field(1, ge=1, description="autoscaling ceiling per depth")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, description="largest request body taken (larger: 413)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run_dir is None) == (not self.checkpoints):
            raise ValueError("run_dir, checkpoints: give exactly one of them")
        return self

    def family(self) -> Family:
        """The checkpoints to serve (and those that cannot be); raises ValueError or FileNotFoundError naming
        the field."""
        return find_family(self.run_dir, self.checkpoints or None)


def unservable_lines(family: Family) -> list[str]:
    return [f"d{u.depth if u.depth is not None else '?':<13} NOT SERVED: {u.checkpoint}: {u.reason}"
            for u in family.unservable]


def deployments(args: ServeArgs, family: Family) -> serve.Application:
    """The bound application: a DepthModel deployment per servable member, and the Gateway over them."""
    for line in unservable_lines(family):
        logger.warning(line)
    members = family.members
    num_gpus = args.num_gpus
    if num_gpus is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        num_gpus = round(1 / len(members), 4) if has_gpus else 0
    scaling = dict(min_replicas=1, max_replicas=args.max_replicas, target_ongoing_requests=args.max_batch)
    models = {m.depth: DepthModel.options(
        name=f"d{m.depth}", ray_actor_options=dict(num_cpus=args.num_cpus, num_gpus=num_gpus),
        autoscaling_config=scaling, max_ongoing_requests=4 * args.max_batch).bind(m, args.max_batch)
        for m in members}
    return Gateway.bind(models, family, args.max_body_bytes)


def build(args: dict) -> serve.Application:
    """The application builder that serve/config.yaml names: `args` are ServeArgs' fields."""
    args = ServeArgs.model_validate(args)
    return deployments(args, args.family())


def run(args: ServeArgs, family: Family, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """Serve `family` on the running Ray cluster at host:port; returns the lines that say where. Raises when
    the family does not answer there (Serve already running on this cluster keeps its own address). The HTTP
    proxy runs on the head only (as serve/config.yaml has it): the address printed is the head's, and nodes
    that share an address (a simulated cluster) would otherwise contend for the port."""
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    serve.run(deployments(args, family), name=APP, route_prefix="/")
    base = f"http://{host}:{port}"
    probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    for attempt in range(20):
        try:
            with urllib.request.urlopen(probe, timeout=5):
                break
        except OSError as e:
            if attempt == 19:
                raise RuntimeError(f"port: the family does not answer at {probe} ({e}); Ray Serve already runs on "
                                   f"this cluster at another address? `serve shutdown -y`, or use its port") from e
            time.sleep(0.5)
    return ([f"chat page      {base}/"]
            + [f"depth {m.depth:<8} {base}/d{m.depth}/chat   (model nanoray-d{m.depth}, {m.params / 1e6:.1f}M params)"
               for m in family.members]
            + [f"OpenAI API     {base}/v1   (GET {base}/v1/models)"]
            + unservable_lines(family))


def serve_family(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve args' family at host:port on the running Ray cluster (started here if none runs), print where,
    and block until Ctrl-C or SIGTERM (`ray job stop` sends it); then take the family down: Serve's actors
    are detached and would otherwise outlive this process, holding their GPU shares. Bad args raise
    ValueError or FileNotFoundError naming the field, before Ray starts."""
    family = args.family()
    if not ray.is_initialized():
        ray.init()  # joins the cluster of this machine if one runs, else starts one

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        print("\n".join(run(args, family, host, port)), flush=True)
        print("serving until stopped (Ctrl-C, or `ray job stop`)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        take_down()


def take_down() -> None:
    """Stop serving, uninterrupted by a second signal. A cluster that ray.init() started here goes down whole,
    Serve's actors with it (a Ctrl-C in a terminal reaches its processes too, so asking its dying controller
    to delete the app waited 30 s, and the delete's checkpoint write to the GCS could fail: KVStoreError).
    On a cluster joined, the app is deleted first, at once: `ray job stop` kills us 3 s after SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    node = ray._private.worker._global_node  # no public API says whether this process started the cluster
    if node is not None and node.head:
        ray.shutdown()
        return
    try:
        serve.delete(APP, _blocking=False)
        serve.shutdown()
    except Exception as e:  # the cluster is going away as well: nothing left to take down
        print(f"serve: could not take the app down ({type(e).__name__}: {e})", flush=True)
