"""CORE eval of a checkpoint: DCLM's in-context tasks scored as nanochat scores them (nanochat-facts §5).

Three task types. Multiple choice: one prompt per choice, pick the choice with the lowest mean
cross-entropy over its tokens. Schema: one prompt per context option, scored on the shared continuation.
Language modelling: correct iff greedy argmax reproduces the continuation exactly. Per task, examples are
shuffled with Random(1337) and capped at max_per_task; example i draws its few-shot examples from the
other (shuffled, capped) items with Random(1234 + i). Accuracy is centered on the task's random
baseline, (acc - rb) / (1 - rb); CORE is the plain mean of the centered accuracies.

Unlike nanochat's own GPT (never truncated), prompts longer than the model's seq_len keep their last
seq_len tokens. Rows of several examples share one forward, right-padded with BOS (causal attention
makes the padding harmless). Tasks are spread over Ray actors, each loading the checkpoint once.

Task sets: "core" (nanochat's eval bundle, downloaded once per machine), "core-lite" (six BIG-bench
tasks from the bigbench sdist on PyPI, downloaded once, or $NANORAY_BIGBENCH_DIR, converted here; prompts
differ from the bundle's, so numbers compare across our runs only, not with published CORE) or a path to
a bundle-shaped directory. See nanoray/core_data/.

    python -m nanoray.core_eval --checkpoint runs/d4/checkpoint --tasks core-lite --max-per-task 50
    python -m nanoray.core_eval --checkpoint /mnt/cluster/d20/checkpoint --tasks core --workers 8 --gpu
"""

import argparse
import json
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoray.checkpoint import load_for_inference, load_tokenizer
from nanoray.core_data.bundle import TaskSpec, read_items, read_specs, resolve_tasks

SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234
BATCH_TOKENS = 8192  # rows x padded length per forward
GPU_BATCH_TOKENS = 65536


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so guessing scores 0 and perfect scores 1; random_baseline is in percent."""
    rb = 0.01 * random_baseline
    return (accuracy - rb) / (1 - rb)


def core_score(centered_by_task: dict[str, float]) -> float:
    return sum(centered_by_task.values()) / len(centered_by_task)


def prepare_items(items: list[dict], max_per_task: int | None) -> list[dict]:
    """Shuffle with Random(1337), then keep the first max_per_task (all when None)."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:max_per_task] if max_per_task else items


def fewshot_examples(items: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    """num_fewshot distinct items other than items[idx], drawn with Random(1234 + idx)."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(len(items)) if i != idx]
    if len(others) < num_fewshot:
        raise ValueError(f"{len(items)} examples are too few for {num_fewshot}-shot prompts "
                         f"(max_per_task must exceed the shot count)")
    return [items[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)]


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The prompt strings of one example: one per choice (MC), per context option (schema), or
    [prompt without continuation, prompt with it] (LM). Few-shot examples come first, each solved and
    followed by a blank line."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{shots}{item['context'].strip()}{delimiter}"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}")


def _common_length(rows: list[list[int]], from_end: bool = False) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(r[j] != rows[0][j] for r in rows):
            return i
    return n


def tokenize_prompts(tokenizer, task_type: str, prompts: list[str]) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows with BOS, start, end) per row; row[start:end] are the scored continuation tokens."""
    rows = [tokenizer.encode(p, bos=True) for p in prompts]
    if task_type == "multiple_choice":  # the answer starts where the choices' tokens first differ
        start = _common_length(rows)
        ends = [len(r) for r in rows]
        return rows, [min(start, e - 1) for e in ends], ends  # a choice that prefixes another keeps 1 token
    if task_type == "schema":  # the shared continuation: the longest common token suffix
        suffix = _common_length(rows, from_end=True)
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    without, with_ = rows
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError("the prompt without its continuation does not tokenize as a prefix of the prompt with it")
    return [with_], [len(without)], [len(with_)]


def truncate(rows: list[list[int]], starts: list[int], ends: list[int], max_len: int):
    """Keep the last max_len tokens of each row, shifting its span; the span must keep a token before it."""
    out = ([], [], [])
    for row, s, e in zip(rows, starts, ends):
        crop = max(len(row) - max_len, 0)
        if s - crop < 1:
            raise ValueError(f"continuation of {e - s} tokens does not fit a context of {max_len} tokens")
        for dst, value in zip(out, (row[crop:], s - crop, e - crop)):
            dst.append(value)
    return out


def prepare_example(tokenizer, spec: TaskSpec, items: list[dict], idx: int, max_len: int | None):
    """Token rows and scored spans of example idx, ready for the model."""
    try:
        prompts = render_prompts(items[idx], spec.task_type, spec.delimiter,
                                 fewshot_examples(items, idx, spec.num_fewshot))
        rows, starts, ends = tokenize_prompts(tokenizer, spec.task_type, prompts)
        if max_len is not None:
            rows, starts, ends = truncate(rows, starts, ends, max_len)
    except ValueError as e:
        raise ValueError(f"task {spec.label}, example {idx}: {e}") from None
    return rows, starts, ends


@torch.no_grad()
def score_batch(model, examples: list[tuple], task_type: str, bos_id: int, device) -> list[bool]:
    """One forward over the rows of several (rows, starts, ends, gold) examples; whether each is correct.
    Logits are taken only where they are scored: position p of a continuation span predicts token p + 1."""
    rows = [row for ex in examples for row in ex[0]]
    ids = torch.full((len(rows), max(len(r) for r in rows)), bos_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    spans = [(s, e) for ex in examples for s, e in zip(ex[1], ex[2])]  # one per row
    row_idx = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(spans)])
    pos_idx = torch.cat([torch.arange(s - 1, e - 1) for s, e in spans])
    logits = model(ids.to(device), at=(row_idx.to(device), pos_idx.to(device))).float()  # (N, V)
    targets = ids[row_idx, pos_idx + 1]
    losses = F.cross_entropy(logits, targets.to(logits.device), reduction="none").cpu()
    hits = (logits.argmax(dim=-1).cpu() == targets).tolist()
    bounds = [0]
    for s, e in spans:
        bounds.append(bounds[-1] + e - s)
    out, r = [], 0
    for ex_rows, _, _, gold in examples:
        if task_type == "language_modeling":
            out.append(all(hits[bounds[r]:bounds[r + 1]]))
        else:
            mean_losses = [losses[bounds[r + i]:bounds[r + i + 1]].mean().item() for i in range(len(ex_rows))]
            out.append(mean_losses.index(min(mean_losses)) == gold)
        r += len(ex_rows)
    return out


def evaluate_task(model, tokenizer, spec: TaskSpec, items: list[dict], max_per_task: int | None = None,
                  max_len: int | None = None, device="cpu", batch_tokens: int = BATCH_TOKENS) -> dict:
    """Accuracy of `model` (token ids (B, T) -> logits (B, T, V)) on one task, plus timing."""
    t0 = time.perf_counter()
    items = prepare_items(items, max_per_task)
    results, batch, batch_rows, batch_len = [], [], 0, 0
    for idx in range(len(items)):
        rows, starts, ends = prepare_example(tokenizer, spec, items, idx, max_len)
        longest = max(batch_len, max(len(r) for r in rows))
        if batch and (batch_rows + len(rows)) * longest > batch_tokens:
            results += score_batch(model, batch, spec.task_type, tokenizer.bos_id, device)
            batch, batch_rows, longest = [], 0, max(len(r) for r in rows)
        batch.append((rows, starts, ends, items[idx].get("gold")))
        batch_rows, batch_len = batch_rows + len(rows), longest
    results += score_batch(model, batch, spec.task_type, tokenizer.bos_id, device)
    seconds = time.perf_counter() - t0
    accuracy = sum(results) / len(results)
    return dict(label=spec.label, type=spec.task_type, shots=spec.num_fewshot, examples=len(results),
                accuracy=accuracy, random_baseline=spec.random_baseline,
                centered=centered(accuracy, spec.random_baseline), seconds=seconds,
                examples_per_s=len(results) / seconds, correct=results)


class CoreWorker:
    """A Ray actor holding one model; evaluates whole tasks."""

    def __init__(self, checkpoint_dir: str, device: str):
        self.device = device
        self.model, self.tokenizer, _ = load_for_inference(checkpoint_dir, device)
        if device != "cpu":  # bf16 weights, cast once (the GPU computes in bf16 anyway)
            self.model.prepare_inference(torch.bfloat16)

    def evaluate(self, spec: TaskSpec, items: list[dict], max_per_task: int | None) -> dict:
        result = evaluate_task(self.model, self.tokenizer, spec, items, max_per_task,
                               max_len=self.model.config.seq_len, device=self.device,
                               batch_tokens=BATCH_TOKENS if self.device == "cpu" else GPU_BATCH_TOKENS)
        del result["correct"]
        return result


@dataclass(frozen=True)
class CoreTasks:
    """A task set read into memory: every task's spec and items, checked, longest first. Read once where the
    files are (the driver) and shipped to evaluators on any node through Ray's object store."""

    name: str  # the task set as given: core, core-lite or a bundle directory
    bundle: str  # the bundle directory it was read from
    specs: list[TaskSpec]  # in the bundle's order
    work: list[tuple[TaskSpec, list[dict]]]  # (spec, items), longest task first
    max_per_task: int | None = None  # examples per task after shuffling (None: all)

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.specs]


def load_tasks(tasks: str, max_per_task: int | None = None) -> CoreTasks:
    """Read and check a task set (core, core-lite or a bundle directory); raises naming the field."""
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task: must be >= 1 (or None for all), got {max_per_task}")
    bundle = resolve_tasks(tasks)
    specs = read_specs(bundle)
    work = []
    for spec in specs:
        items = read_items(spec)
        if max_per_task is not None and min(max_per_task, len(items)) <= spec.num_fewshot:
            raise ValueError(f"max_per_task: {max_per_task} leaves too few examples for the {spec.num_fewshot}-shot "
                             f"task {spec.label}; use at least {spec.num_fewshot + 1}")
        work.append((spec, items))
    work.sort(key=lambda w: -min(len(w[1]), max_per_task or len(w[1])) * (w[0].num_fewshot + 1))  # longest first
    return CoreTasks(name=str(tasks), bundle=str(bundle), specs=specs, work=work, max_per_task=max_per_task)


def evaluate_core(checkpoint_dir: str, tasks: str | CoreTasks = "core-lite", num_workers: int = 1,
                  max_per_task: int | None = None, use_gpu: bool = False, gpu_share: float = 1.0) -> dict:
    """CORE (mean centered accuracy) of a checkpoint over a task set (a name, or one load_tasks read), tasks
    spread over Ray actors. Uses the running Ray cluster when one is initialized. With `use_gpu`, each actor
    asks for `gpu_share` of a GPU (a fraction packs it beside a training run)."""
    import ray
    from ray.util import ActorPool

    if num_workers < 1:
        raise ValueError(f"num_workers: must be >= 1, got {num_workers}")
    # a local directory is made absolute (actors run elsewhere); a URI stays (each actor downloads it)
    checkpoint_dir = str(checkpoint_dir) if "://" in str(checkpoint_dir) else str(Path(checkpoint_dir).resolve())
    load_tokenizer(checkpoint_dir)  # a mismatched or missing tokenizer fails here, before any actor starts
    if isinstance(tasks, str):  # all files are read and checked before any actor starts
        tasks = load_tasks(tasks, max_per_task)
    max_per_task = tasks.max_per_task
    if not ray.is_initialized():
        ray.init()
    t0 = time.perf_counter()
    worker = ray.remote(num_gpus=gpu_share if use_gpu else 0, num_cpus=1)(CoreWorker)
    num_actors = min(num_workers, len(tasks.work))
    if not use_gpu:  # more 1-CPU actors than the cluster has CPUs would wait forever; GPU ones wait for autoscaling
        num_actors = min(num_actors, max(int(ray.cluster_resources().get("CPU", 1)), 1))
    actors = [worker.remote(checkpoint_dir, "cuda" if use_gpu else "cpu") for _ in range(num_actors)]
    try:
        results = list(ActorPool(actors).map_unordered(lambda a, w: a.evaluate.remote(*w, max_per_task), tasks.work))
    finally:
        for actor in actors:
            ray.kill(actor)
    seconds = time.perf_counter() - t0
    order = tasks.labels
    by_task = {r.pop("label"): r for r in sorted(results, key=lambda r: order.index(r["label"]))}
    total = sum(r["examples"] for r in by_task.values())
    return dict(core=core_score({k: r["centered"] for k, r in by_task.items()}), tasks=by_task,
                task_set=tasks.name, bundle=tasks.bundle, checkpoint=checkpoint_dir, workers=len(actors),
                device="cuda" if use_gpu else "cpu", examples=total, seconds=seconds, examples_per_s=total / seconds,
                hostname=socket.gethostname())


def format_table(result: dict) -> str:
    lines = [f"{'task':<36} {'type':<18} {'shots':>5} {'n':>6} {'acc':>7} {'rand%':>6} {'centered':>9} {'ex/s':>8}"]
    for label, r in result["tasks"].items():
        lines.append(f"{label:<36} {r['type']:<18} {r['shots']:>5} {r['examples']:>6} {r['accuracy']:>7.4f} "
                     f"{r['random_baseline']:>6.1f} {r['centered']:>9.4f} {r['examples_per_s']:>8.1f}")
    lines.append(f"{'CORE (' + result['task_set'] + ')':<36} {'':<18} {'':>5} {result['examples']:>6} {'':>7} {'':>6} "
                 f"{result['core']:>9.4f} {result['examples_per_s']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.core_eval", description="CORE eval of a checkpoint on Ray.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (with a tokenizer/ subdirectory)")
    p.add_argument("--tasks", default="core-lite",
                   help="core (the eval bundle), core-lite (BIG-bench's six CORE tasks, downloaded once from PyPI "
                   "or read from $NANORAY_BIGBENCH_DIR) or a bundle directory")
    p.add_argument("--max-per-task", type=int, default=None, help="examples per task after shuffling (default all)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each evaluating whole tasks")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    args = p.parse_args(argv)
    try:
        result = evaluate_core(args.checkpoint, args.tasks, args.workers, args.max_per_task, args.gpu)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
