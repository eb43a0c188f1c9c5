"""core-lite: six of CORE's BIG-bench tasks converted offline from raw BIG-bench task.json files.

The raw data is shared/data/bigbench-core6/benchmark_tasks-core6.tar.xz (BIG-bench 1.0.0, Apache-2.0;
set NANORAY_BIGBENCH_DIR to its folder, default ../shared/data/bigbench-core6 beside the repo). The
converter writes a bundle-shaped directory (core.yaml, eval_meta_data.csv, eval_data/bigbench/*.jsonl)
that the ordinary CORE loader reads.

Prompts differ from the DCLM eval bundle's: each example is BIG-bench's example_input_prefix + input +
example_output_prefix (its defaults "\\nQ: " / "\\nA: " where a task sets none), without the task_prefix
and without choices appended to the input. core-lite numbers compare across our runs only, never with
published CORE. The task types and shot counts are CORE's: five 10-shot LM tasks (continuation = the
target, or the top-scored choice) and language_identification as 10-shot multiple choice; random
baselines are 0 for LM and the mean of 100/#choices for MC.
"""

import json
import os
import tarfile
from pathlib import Path

VERSION = 1  # bump when the rendering below changes: the cache key includes it
TARBALL = "benchmark_tasks-core6.tar.xz"
DEFAULT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bigbench-core6"

# CORE label -> (task.json paths inside the tarball, CORE task type)
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


def bigbench_dir() -> Path:
    return Path(os.environ.get("NANORAY_BIGBENCH_DIR") or DEFAULT_DIR)


def read_tasks(directory: str | os.PathLike | None = None) -> dict[str, dict]:
    """Every task.json in the tarball (or an unpacked copy of it), keyed by its path inside it."""
    directory = Path(directory) if directory is not None else bigbench_dir()
    tarball = directory / TARBALL
    if tarball.exists():
        with tarfile.open(tarball) as tar:
            return {m.name.removeprefix("./"): json.load(tar.extractfile(m))
                    for m in tar.getmembers() if m.isfile() and m.name.endswith("task.json")}
    found = {str(p.relative_to(directory)): json.loads(p.read_text()) for p in directory.rglob("task.json")}
    if not found:
        raise FileNotFoundError(f"{directory}: no BIG-bench data (expected {TARBALL} or */task.json); "
                                f"set NANORAY_BIGBENCH_DIR to the folder holding {TARBALL}")
    return found


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


def write_bundle(out: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Convert the six tasks into a bundle-shaped directory `out` (written in place: callers rename)."""
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
