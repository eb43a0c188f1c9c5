"""Shared fixtures and helpers: one local Ray cluster per test session (with the knobs that keep Train fits
fast on 2 cores), a small prepared corpus and tokenizer, CORE task bundles, and a served family of two tiny
random depths."""

import csv
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from ray import serve

from nanoray.checkpoint import save_checkpoint
from nanoray.corpus import read_source, write_shards
from nanoray.dev.cluster import free_port
from nanoray.dial import plan
from nanoray.model import build_model
from nanoray.stream import prepare_data
from nanoray.tokenizer import Tokenizer
from serve.app import build

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# core-lite's raw BIG-bench data without a network: a copy of the six tasks beside the checkout where there is
# one (set before the session's Ray cluster starts, so its workers see it too). Without it, the tests that
# need the real tasks run only where an earlier download left them in the cache, and skip otherwise.
BIGBENCH_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench-core6"
if BIGBENCH_COPY.is_dir():
    os.environ.setdefault("NANORAY_BIGBENCH_DIR", str(BIGBENCH_COPY))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Logical CPUs are bookkeeping: 4 on a 2-core machine lets drivers, workers and data tasks coexist.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Five train shards of 96 stdlib documents (one row group each) and one val shard, plus a tokenizer
    of the tiny preset's vocabulary, as prepare_data lays them out: (source spec, tokenizer, data dir)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = list(itertools.islice(read_source("stdlib", "train"), 5 * 96))
    write_shards(docs, root / "shards" / "train", docs_per_shard=96)
    write_shards(list(itertools.islice(read_source("stdlib", "val"), 40)), root / "shards" / "val")
    spec, tokenizer_dir = prepare_data("parquet:" + str(root / "shards"), 4096, data_dir=root)
    return spec, Tokenizer.load(tokenizer_dir), root


@pytest.fixture
def write_bundle():
    """write_bundle(root, {label: (type, shots, items)}, baselines) makes a bundle-shaped directory: core.yaml,
    the meta csv and one jsonl file per task."""
    return make_bundle


def make_bundle(root, tasks, baselines=None):
    (root / "eval_data" / "x").mkdir(parents=True, exist_ok=True)
    icl, meta = [], ["Eval Task,Random baseline"]
    for label, (task_type, shots, items) in tasks.items():
        (root / "eval_data" / "x" / f"{label}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
        icl.append(dict(label=label, dataset_uri=f"x/{label}.jsonl", num_fewshot=[shots], icl_task_type=task_type))
        meta.append(f"{label},{(baselines or {}).get(label, 0)}")
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}))
    (root / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return root


def write_family(root, tokenizer, depths=(1, 2)):
    """A run directory: one tiny random checkpoint per depth (with the tokenizer beside it) and a results.csv."""
    rows = []
    for depth in depths:
        run = plan(depth, "tiny")
        model = build_model(run.model)
        with torch.no_grad():  # perturb the zero-initialized projections so the text depends on the prompt
            gen = torch.Generator().manual_seed(depth)
            for p in model.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
        ckpt = save_checkpoint(root / f"d{depth}" / "ckpt", model, None, dict(plan=run.model_dump(), step=0),
                               tokenizer=tokenizer)
        rows.append(dict(trial=f"d{depth}", depth=depth, val_bpb=3.0, checkpoint=str(ckpt), status="done"))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def family(tmp_path_factory, corpus):
    """A run directory with two tiny random depths, d1 and d2 (write_family)."""
    return write_family(tmp_path_factory.mktemp("family"), corpus[1])


@pytest.fixture(scope="module")
def url(ray_cluster, family):
    """The family served by Ray Serve on a free port of 127.0.0.1 (the app as serve/config.yaml builds it): the
    base URL. Serve is shut down after the module."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(run_dir=str(family))), name="nanoray", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
