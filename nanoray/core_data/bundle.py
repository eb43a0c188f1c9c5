"""The CORE eval bundle: download, verify, unpack and cache once per machine; parse its tasks.

A bundle is a directory holding core.yaml (`icl_tasks`: label, dataset_uri, num_fewshot, icl_task_type,
optional continuation_delimiter), eval_meta_data.csv (`Eval Task`, `Random baseline` in percent) and
eval_data/<dataset_uri> jsonl files (reference/nanochat-facts.md §5). `resolve_tasks` turns a task-set
name into one: "core" (nanochat's bundle, downloaded), "core-lite" (BIG-bench's six tasks, downloaded once
from PyPI or read from $NANORAY_BIGBENCH_DIR, converted here) or a path. Caches live under $NANORAY_CACHE
(default ~/.cache/nanoray); each is built under a file lock into a temp directory that is renamed into
place, so concurrent processes build it once and never see half.
"""

import csv
import fcntl
import hashlib
import json
import os
import tarfile
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nanoray.core_data import bigbench
from nanoray.corpus import download_file, fetch_url
from nanoray.storage import atomic_dir

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}


class BundleUnavailable(RuntimeError):
    """The eval bundle is not cached and could not be downloaded."""


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task as core.yaml and eval_meta_data.csv describe it."""

    label: str  # the task's name, e.g. hellaswag_zeroshot
    task_type: str  # one of TASK_TYPES
    num_fewshot: int  # solved examples before each prompt
    delimiter: str  # between context and continuation
    random_baseline: float  # percent accuracy of guessing
    path: str  # the task's jsonl file


def cache_dir() -> Path:
    return Path(os.environ.get("NANORAY_CACHE") or Path.home() / ".cache" / "nanoray")


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Return `target`, running build(tmp_dir) -> built dir and renaming it to target if it is missing."""
    if (target / "core.yaml").exists():
        return target
    with _locked(target.with_name(f".{target.name}.lock")):
        if (target / "core.yaml").exists():  # another process built it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as work, \
                atomic_dir(target) as out:  # replaces a leftover without core.yaml
            for child in build(Path(work)).iterdir():
                os.replace(child, out / child.name)
    return target


def _unpack(zip_path: Path, tmp: Path) -> Path:
    """Verify the zip (CRC of every member, core.yaml present) and unpack it; returns the bundle root."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            bad = z.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"member {bad} fails its CRC check")
            yamls = [n for n in z.namelist() if n.endswith("core.yaml") and n.count("/") <= 1]
            if not yamls:
                raise zipfile.BadZipFile("no core.yaml in it")
            z.extractall(tmp / "unpacked")
    except zipfile.BadZipFile as e:
        zip_path.unlink(missing_ok=True)
        raise ValueError(f"{zip_path}: not a valid eval bundle ({e}); removed it, run again to re-download") from e
    root = (tmp / "unpacked" / yamls[0]).parent
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()
    (root / "source.json").write_text(json.dumps({"url": BUNDLE_URL, "sha256": digest}))
    return root


def ensure_bundle(cache: str | os.PathLike | None = None, fetch=None, sleep=time.sleep) -> Path:
    """nanochat's eval bundle, unpacked at <cache>/eval_bundle: downloaded (or taken from a zip already
    placed at <cache>/eval_bundle.zip), verified and unpacked once per machine."""
    cache = Path(cache) if cache is not None else cache_dir()
    zip_path = cache / "eval_bundle.zip"

    def build(tmp: Path) -> Path:
        if not zip_path.exists():
            try:
                download_file(BUNDLE_URL, zip_path, fetch=fetch or fetch_url, sleep=sleep)
            except OSError as e:
                raise BundleUnavailable(
                    f"CORE eval bundle: no copy at {cache / 'eval_bundle'} and the download failed ({e}). "
                    f"Fetch {BUNDLE_URL} on a machine with network and either put the zip at {zip_path} or "
                    f"unzip it so that {cache / 'eval_bundle' / 'core.yaml'} exists (set NANORAY_CACHE to move "
                    f"{cache}); or pass a bundle directory as the task set; or use the offline 'core-lite'") from e
        return _unpack(zip_path, tmp)
    return _build_once(cache / "eval_bundle", build)


def ensure_core_lite(cache: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                     index_url: str | None = None, sleep=time.sleep) -> Path:
    """The core-lite bundle, converted from BIG-bench's raw data (the folder `source`, else
    bigbench.ensure_raw: $NANORAY_BIGBENCH_DIR, the cache, or a download) and cached under a key of the
    converter version. Raw data that cannot be had raises BundleUnavailable saying why and what to set."""
    cache = Path(cache) if cache is not None else cache_dir()

    def build(tmp: Path) -> Path:
        try:
            raw = source if source is not None else bigbench.ensure_raw(cache, index_url, sleep)
            return bigbench.write_bundle(tmp / "bundle", raw)
        except (OSError, ValueError, LookupError, tarfile.TarError) as e:
            index = index_url or os.environ.get("NANORAY_PYPI_URL") or bigbench.PYPI_URL
            raise BundleUnavailable(
                f"core-lite: BIG-bench's tasks could not be had ({e}). They come from NANORAY_BIGBENCH_DIR (a folder "
                f"holding {bigbench.TARBALL} or the tasks' task.json files), else {cache / bigbench.CACHE_NAME}, else "
                f"the bigbench {bigbench.RELEASE} sdist on {index} (NANORAY_PYPI_URL: an index with PyPI's JSON API "
                f"that has it), downloaded once into that cache") from e
    return _build_once(cache / f"core-lite-v{bigbench.VERSION}", build)


def resolve_tasks(tasks: str | os.PathLike) -> Path:
    """A bundle directory for a task-set name: "core", "core-lite" or a path to a bundle directory."""
    if tasks == "core":
        return ensure_bundle()
    if tasks == "core-lite":
        return ensure_core_lite()
    path = Path(tasks)
    if not (path / "core.yaml").exists():
        raise FileNotFoundError(f"tasks: expected 'core', 'core-lite' or a bundle directory holding core.yaml, "
                                f"got {str(tasks)!r}")
    return path


def read_specs(bundle: str | os.PathLike) -> list[TaskSpec]:
    """The tasks core.yaml lists, with their random baselines from eval_meta_data.csv."""
    import yaml

    bundle = Path(bundle)
    config = yaml.safe_load((bundle / "core.yaml").read_text())
    meta_path = bundle / "eval_meta_data.csv"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: missing (the random baselines of the tasks)")
    with open(meta_path, newline="") as f:
        baselines = {row["Eval Task"]: row["Random baseline"] for row in csv.DictReader(f)}  # other tasks may be blank
    specs = []
    for entry in (config or {}).get("icl_tasks") or []:
        label, task_type = entry.get("label"), entry.get("icl_task_type")
        where = f"{bundle / 'core.yaml'}: task {label!r}"
        if task_type not in TASK_TYPES:
            raise ValueError(f"{where}: unknown icl_task_type {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
        try:
            baseline = float(baselines[label])
        except (KeyError, ValueError):
            raise ValueError(f"{where}: no numeric 'Random baseline' for it in {meta_path}") from None
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) else shots  # a list in core.yaml; its first element is used
        specs.append(TaskSpec(label=label, task_type=task_type, num_fewshot=int(shots),
                              delimiter=entry.get("continuation_delimiter", " "), random_baseline=baseline,
                              path=str(bundle / "eval_data" / entry["dataset_uri"])))
    if not specs:
        raise ValueError(f"{bundle / 'core.yaml'}: no icl_tasks")
    return specs


def _check_item(item, task_type: str) -> str | None:
    """Why `item` is not a valid example of `task_type`, or None."""
    if not isinstance(item, dict):
        return "expected a JSON object"
    missing = [k for k in FIELDS[task_type] if k not in item]
    if missing:
        return f"missing field(s) {', '.join(missing)} for a {task_type} task"
    options = item.get("choices", item.get("context_options"))
    if task_type != "language_modeling":
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            return "expected a list of >= 2 strings as choices/context_options"
        if not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(options):
            return f"gold must be an index into {len(options)} options, got {item['gold']!r}"
    texts = [item[k] for k in ("query", "context", "continuation") if k in item]
    if not all(isinstance(t, str) for t in texts):
        return "query/context/continuation must be strings"
    return None


def read_items(spec: TaskSpec) -> list[dict]:
    """The task's examples in file order; a bad line raises ValueError naming the file and line."""
    path = Path(spec.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (task {spec.label})")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            problem = _check_item(item, spec.task_type)
            if problem:
                raise ValueError(f"{path}:{lineno}: {problem}")
            items.append(item)
    if len(items) <= spec.num_fewshot:
        raise ValueError(f"{path}: {len(items)} examples, too few for {spec.num_fewshot}-shot prompts")
    return items
