"""cluster.yaml, checked offline: no network, no AWS credentials, no Ray cluster (about a second).

What `ray up` and the autoscaler on the head do with the file before any cloud call is run here
with Ray's own code: AutoscalingConfig (prepare_config, which merges the AWS provider's defaults.yaml,
then validate_config against ray-schema.json) and the v2 autoscaler's ResourceDemandScheduler, which
decides which node types to launch for a demand. The rest checks what nanoray relies on.
"""

import re
from pathlib import Path

import pytest
import yaml

import ray
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"

# vCPUs and GPUs per instance type (AWS docs), for the node types cluster.yaml may use: declared
# resources must match the hardware, since the autoscaler plans with them.
INSTANCE_SPECS = {
    "m7i.2xlarge": (8, 0),
    "m7i.4xlarge": (16, 0),
    "m7i.8xlarge": (32, 0),
    "p5.4xlarge": (16, 1),
    "p5.48xlarge": (192, 8),
    "p5e.48xlarge": (192, 8),
    "p5en.48xlarge": (192, 8),
}


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw):
    # The same calls the v2 autoscaler makes on the head (and `ray up` before touching AWS):
    # prepare_config(raw) merges ray/autoscaler/aws/defaults.yaml, then validate_config checks the
    # schema, head_node_type, the min/max worker sums, and the docker section.
    return AutoscalingConfig(raw, skip_content_hash=True)


@pytest.fixture(scope="module")
def config(prepared):
    return prepared.get_raw_config_mutable()


def worker_types(config):
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def docker_env(config) -> dict:
    env = {}
    for opt in config["docker"].get("run_options", []):
        m = re.fullmatch(r"-e\s+(\w+)=(\S+)", opt.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def test_ray_validates_it_for_aws(config, prepared):
    assert config["provider"]["type"] == "aws"
    assert prepared.get_head_node_type() == config["head_node_type"]
    assert 0 < config["idle_timeout_minutes"] <= 30
    # `ray up` keeps the autoscaler only with this flag on the head's ray start.
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in config["head_start_ray_commands"])


def test_head_has_no_gpus_and_hosts_trial_drivers(config):
    head = config["available_node_types"][config["head_node_type"]]
    vcpus, gpus = INSTANCE_SPECS[head["node_config"]["InstanceType"]]
    assert gpus == 0 and head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    # nanoray.sweep.driver_resources asks for {CPU: 0, trial_driver: 1}; only the head offers it.
    assert head["resources"]["trial_driver"] >= 1
    assert head["resources"]["CPU"] == 0
    assert not any("trial_driver" in t["resources"] for t in worker_types(config).values())


def test_gpu_workers_scale_from_zero_with_declared_resources(config):
    workers = worker_types(config)
    assert "p5.48xlarge" in {t["node_config"]["InstanceType"] for t in workers.values()}
    for name, t in workers.items():
        vcpus, gpus = INSTANCE_SPECS[t["node_config"]["InstanceType"]]
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= config["max_workers"], name
        assert gpus > 0 and t["resources"]["GPU"] == gpus, name
        assert 0 < t["resources"]["CPU"] <= vcpus, name
        # S3 storage: the launcher gives an instance profile only to the head.
        assert "IamInstanceProfile" in t["node_config"], name
        assert t["node_config"].get("ImageId"), name  # the launcher's default AMI predates H100s


def test_image_matches_installed_ray(config):
    image = config["docker"]["image"]
    assert "ray-ml" not in image
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py3\d+-(gpu|cu\d+)", image)
    assert m, image
    assert m.group(1, 2) == tuple(ray.__version__.split(".")[:2])
    pin = re.search(r'"ray\[[^\]]*\]==(\d+)\.(\d+)\.\*"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1, 2) == m.group(1, 2)


def test_setup_installs_cuda_torch_then_the_project(config):
    for cmds in (config["head_setup_commands"], config["worker_setup_commands"]):
        joined = "\n".join(cmds)
        torch_i = next((i for i, c in enumerate(cmds) if re.search(r"pip install .*\btorch\b", c)), None)
        project_i = next((i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/nanoray" in c), None)
        assert torch_i is not None and project_i is not None and torch_i < project_i, cmds
        assert re.search(r"download\.pytorch\.org/whl/cu\d+", cmds[torch_i]), cmds[torch_i]
        assert "/whl/cpu" not in joined and "requirements_compiled" not in joined
    assert config["file_mounts"]["~/nanoray"] == "."
    assert ".gitignore" in config["rsync_filter"]
    assert any("boto3" in c for c in config["head_setup_commands"])  # the autoscaler's EC2 client


def test_token_auth_and_s3_storage(config):
    env = docker_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"].startswith("/home/ray/")
    token_mount = "~/" + env["RAY_AUTH_TOKEN_PATH"].removeprefix("/home/ray/")
    assert config["file_mounts"][token_mount] == "~/.ray/auth_token"
    assert env["NANORAY_STORAGE"].startswith("s3://")


def _launches(prepared, num_workers, cpus_per_worker=1, strict_pack=False):
    """Node types the v2 autoscaler launches, from nothing, for one Train worker group's placement group."""
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import GangResourceRequest

    # How the GCS reports a pending placement group: STRICT_PACK bundles share an affinity label.
    constraints = [(ResourceRequestUtil.PlacementConstraintType.AFFINITY, "_PG_test", "")] if strict_pack else None
    bundle = {"CPU": cpus_per_worker, "GPU": 1}
    gang = GangResourceRequest(requests=[ResourceRequestUtil.make(bundle, constraints) for _ in range(num_workers)])
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=prepared.get_node_type_configs(),
        max_num_nodes=prepared.get_max_num_nodes(), gang_resource_requests=[gang]))
    assert not reply.infeasible_gang_resource_requests
    launched = {}
    for req in reply.to_launch:
        launched[req.instance_type] = launched.get(req.instance_type, 0) + req.count
    return {prepared.get_raw_config_mutable()["available_node_types"][t]["node_config"]["InstanceType"]: n
            for t, n in launched.items()}


def test_autoscaler_puts_an_8_gpu_worker_group_on_one_node(prepared):
    assert _launches(prepared, 8) == {"p5.48xlarge": 1}
    assert _launches(prepared, 8, cpus_per_worker=8) == {"p5.48xlarge": 1}
    for n in (2, 4, 8):  # STRICT_PACK: one node whatever the count (PACK with 2-7 would spread, see cluster.yaml)
        assert _launches(prepared, n, strict_pack=True) == {"p5.48xlarge": 1}


def test_autoscaler_puts_a_single_gpu_run_on_the_small_type(prepared, config):
    small = {t["node_config"]["InstanceType"] for t in worker_types(config).values() if t["resources"]["GPU"] == 1}
    if not small:
        pytest.skip("no single-GPU node type")
    assert _launches(prepared, 1) == {small.pop(): 1}


def test_node_configs_are_valid_run_instances_input(raw):
    """Each node_config, as the launcher passes it to EC2 RunInstances, against botocore's API model
    (offline; skipped where botocore isn't installed, as in a bare CI environment)."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    model = botocore_session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    for name, t in raw["available_node_types"].items():
        report = ParamValidator().validate(dict(t["node_config"], MinCount=1, MaxCount=1), shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
