"""core-lite: six of CORE's BIG-bench tasks converted offline from raw BIG-bench task.json files.

The raw data is BIG-bench 1.0.0's (Apache-2.0), from the first of these that has it:
  1. $NANORAY_BIGBENCH_DIR: a folder holding benchmark_tasks-core6.tar.xz or the task.json files unpacked
     (paths as below bigbench/benchmark_tasks/); no network.
  2. <cache>/bigbench-1.0.0-core6/: the tasks' task.json files and BIG-bench's LICENSE, kept from an
     earlier download (<cache> is $NANORAY_CACHE, default ~/.cache/nanoray).
  3. The `bigbench` 1.0.0 source distribution on PyPI ($NANORAY_PYPI_URL: another index with PyPI's JSON
     API), downloaded once: looked up in the index, streamed to a temp file, checked against the index's
     sha256, the needed files taken out in one streaming pass into 2., the sdist deleted.

The converter writes a bundle-shaped directory (core.yaml, eval_meta_data.csv, eval_data/bigbench/*.jsonl)
that the ordinary CORE loader reads.

Prompts differ from the DCLM eval bundle's: each example is BIG-bench's example_input_prefix + input +
example_output_prefix (its defaults "\\nQ: " / "\\nA: " where a task sets none), without the task_prefix
and without choices appended to the input. core-lite numbers compare across our runs only, never with
published CORE. The task types and shot counts are CORE's: five 10-shot LM tasks (continuation = the
target, or the top-scored choice) and language_identification as 10-shot multiple choice; random
baselines are 0 for LM and the mean of 100/#choices for MC.
"""

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from nanoray.corpus import with_retries
from nanoray.storage import atomic_dir

VERSION = 1  # bump when the rendering below changes: the cache key includes it
TARBALL = "benchmark_tasks-core6.tar.xz"
RELEASE = "1.0.0"  # the bigbench release on PyPI whose sdist holds the task data
PYPI_URL = "https://pypi.org"
CACHE_NAME = f"bigbench-{RELEASE}-core6"
IN_SDIST = "bigbench/benchmark_tasks/"  # where the tasks sit below the sdist's top folder (bigbench-1.0.0/)
PROGRESS_S = 10  # seconds between the download's progress lines

# CORE label -> (task.json paths below bigbench/benchmark_tasks/, CORE task type)
TASKS = {
    "bigbench_qa_wikidata": (["qa_wikidata/task.json"], "language_modeling"),
    "bigbench_dyck_languages": (["dyck_languages/task.json"], "language_modeling"),
    "bigbench_cs_algorithms": (["cs_algorithms/lcs/task.json", "cs_algorithms/valid_parentheses/task.json"],
                               "language_modeling"),
    "bigbench_operators": (["operators/task.json"], "language_modeling"),
    "bigbench_repeat_copy_logic": (["repeat_copy_logic/task.json"], "language_modeling"),
    "bigbench_language_identification": (["language_identification/task.json"], "multiple_choice"),
}
NUM_FEWSHOT = 10
TASK_FILES = [path for paths, _ in TASKS.values() for path in paths]


# ---------------------------------------------------------------------------------------------------
# Where the raw data comes from


def local_data(cache: str | os.PathLike) -> Path | None:
    """The raw data's folder on this machine (the override, else the cache of an earlier download), or None
    when it would have to be downloaded. Touches no network."""
    override = os.environ.get("NANORAY_BIGBENCH_DIR")
    if override:
        return Path(override)
    cached = Path(cache) / CACHE_NAME
    return cached if cached.is_dir() else None


def ensure_raw(cache: str | os.PathLike, index_url: str | None = None, sleep=time.sleep) -> Path:
    """The raw data's folder: local_data(cache), else downloaded from the index into the cache first."""
    return local_data(cache) or download(cache, index_url, sleep)


class Refused(LookupError):
    """An HTTP answer that asking again would not change (4xx but 408 and 429); with_retries passes it on."""

    def __init__(self, url: str, code: int, reason: str):
        super().__init__(f"{url}: HTTP {code} {reason}")
        self.code = code


def _open(url: str):
    try:
        return urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise Refused(url, e.code, e.reason) from None
        raise


def release_file(index_url: str, sleep=time.sleep) -> tuple[str, str]:
    """(URL, sha256) of bigbench 1.0.0's sdist, as the index's JSON API lists it."""
    api = f"{index_url.rstrip('/')}/pypi/bigbench/{RELEASE}/json"

    def attempt():
        with _open(api) as response:
            return json.load(response)
    try:
        doc = with_retries(api, attempt, sleep=sleep)
    except Refused as e:
        if e.code == 404:
            raise LookupError(f"{api}: 404, bigbench {RELEASE} is not on the index {index_url}") from None
        raise
    for f in doc.get("urls") or []:
        if f.get("packagetype") == "sdist":
            return urllib.parse.urljoin(api, f["url"]), f["digests"]["sha256"]
    raise LookupError(f"{api}: bigbench {RELEASE} has no source distribution (sdist) on the index {index_url}")


def _fetch(url: str, path: Path, sleep) -> str:
    """Stream `url` into `path` (rewritten on each try), a progress line every PROGRESS_S; its sha256."""
    def attempt():
        digest, done, last = hashlib.sha256(), 0, time.monotonic()
        with _open(url) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if time.monotonic() - last >= PROGRESS_S:
                    last = time.monotonic()
                    of = f" of {total / 1e6:.1f}" if total else ""
                    print(f"bigbench sdist: {done / 1e6:.1f}{of} MB", file=sys.stderr, flush=True)
        return digest.hexdigest()
    return with_retries(url, attempt, sleep=sleep)


def _extract(sdist: Path, out: Path, url: str) -> None:
    """The tasks' task.json files (and the LICENSE) of the sdist into `out`, in one pass over the archive."""
    wanted = {IN_SDIST + path: path for path in TASK_FILES} | {"LICENSE": "LICENSE"}
    found = set()
    with tarfile.open(sdist, "r|gz") as tar:  # a stream: members in archive order, each read as it passes
        for member in tar:
            inside = member.name.split("/", 1)[-1]  # below the top folder, bigbench-1.0.0/
            if member.isfile() and inside in wanted:
                dest = out / wanted[inside]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as f:
                    shutil.copyfileobj(src, f)
                found.add(inside)
    missing = sorted(set(wanted) - found - {"LICENSE"})  # the license is kept where the sdist has it
    if missing:
        raise ValueError(f"{url}: not BIG-bench's task data, it lacks {', '.join(missing)}")


def download(cache: str | os.PathLike, index_url: str | None = None, sleep=time.sleep) -> Path:
    """bigbench 1.0.0's sdist from the index (default $NANORAY_PYPI_URL, else PyPI) into <cache>/CACHE_NAME:
    only the tasks' task.json files and the LICENSE are kept. A 404 (or another refusal) is not retried;
    other network errors are, with backoff. A download whose sha256 is not the index's is removed and nothing is cached."""
    cache = Path(cache)
    index_url = index_url or os.environ.get("NANORAY_PYPI_URL") or PYPI_URL
    url, expected = release_file(index_url, sleep)
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".bigbench-", suffix=".tar.gz", dir=cache)
    os.close(fd)
    sdist = Path(name)
    try:
        print(f"core-lite: downloading BIG-bench's tasks once, from {url}", file=sys.stderr, flush=True)
        got = _fetch(url, sdist, sleep)
        if got != expected:
            raise ValueError(f"{url}: the download's sha256 is {got}, the index says {expected}; removed it")
        with atomic_dir(cache / CACHE_NAME, replace=False) as out:  # a concurrent download may have won
            _extract(sdist, out, url)
            (out / "source.json").write_text(json.dumps({"url": url, "sha256": got}) + "\n")
    finally:
        sdist.unlink(missing_ok=True)
    return cache / CACHE_NAME


# ---------------------------------------------------------------------------------------------------
# The conversion


def read_tasks(directory: str | os.PathLike) -> dict[str, dict]:
    """The tasks' task.json files in `directory` (holding the tarball, or the files unpacked), keyed by their
    paths below bigbench/benchmark_tasks/."""
    directory = Path(directory)
    tarball = directory / TARBALL
    if tarball.exists():
        with tarfile.open(tarball) as tar:
            found = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            tasks = {path: json.load(tar.extractfile(found[path])) for path in TASK_FILES if path in found}
    else:
        tasks = {path: json.loads((directory / path).read_text()) for path in TASK_FILES
                 if (directory / path).is_file()}
    missing = [path for path in TASK_FILES if path not in tasks]
    if missing:
        where = tarball if tarball.exists() else directory
        raise FileNotFoundError(f"{where}: not BIG-bench's task data, it lacks {', '.join(missing)} (expected "
                                f"{TARBALL} or the task.json files at their paths below bigbench/benchmark_tasks/)")
    return tasks


def _io(task: dict, example: dict) -> tuple[str, str]:
    """(prompt text, answer text) of one BIG-bench example, in the task's own prefixes."""
    prompt = task.get("example_input_prefix", "\nQ: ") + example["input"] + task.get("example_output_prefix", "\nA: ")
    target = example.get("target")
    if isinstance(target, list):
        target = target[0]
    if target is None:  # a multiple-choice task scored as LM: the answer is its top-scored choice
        scores = example["target_scores"]
        target = max(scores, key=scores.get)
    return prompt.strip(), target.strip()


def convert_task(label: str, tasks: dict[str, dict]) -> tuple[list[dict], str, float]:
    """(jsonl rows, CORE task type, random baseline in percent) of one core-lite task."""
    paths, task_type = TASKS[label]
    rows = []
    for path in paths:
        task = tasks[path]
        for example in task["examples"]:
            prompt, answer = _io(task, example)
            if task_type == "language_modeling":
                rows.append({"context": prompt, "continuation": answer})
            else:
                choices = list(example["target_scores"])
                rows.append({"query": prompt, "choices": choices, "gold": choices.index(answer)})
    baseline = 0.0 if task_type == "language_modeling" else \
        sum(100 / len(r["choices"]) for r in rows) / len(rows)
    return rows, task_type, baseline


def write_bundle(out: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """Convert the six tasks of the raw data in `directory` into a bundle-shaped directory `out` (written in
    place: callers rename)."""
    import yaml

    tasks = read_tasks(directory)
    out = Path(out)
    (out / "eval_data" / "bigbench").mkdir(parents=True, exist_ok=True)
    icl_tasks, meta = [], ["Eval Task,Random baseline"]
    for label in TASKS:
        rows, task_type, baseline = convert_task(label, tasks)
        uri = f"bigbench/{label}.jsonl"
        (out / "eval_data" / uri).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        icl_tasks.append(dict(label=label, dataset_uri=uri, num_fewshot=[NUM_FEWSHOT], icl_task_type=task_type,
                              continuation_delimiter=" "))
        meta.append(f"{label},{baseline:.4f}")
    (out / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False))
    (out / "eval_meta_data.csv").write_text("\n".join(meta) + "\n")
    return out
