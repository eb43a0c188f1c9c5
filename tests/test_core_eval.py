"""CORE eval: the three task types scored by a scripted stand-in model whose answers are known, centered
accuracy, few-shot determinism, truncation, bad input, the bundle cache, and a tiny checkpoint through Ray."""

import json
import random
import zipfile

import pytest
import torch

from nanoray.core_data import bigbench
from nanoray.core_data.bundle import (BUNDLE_URL, BundleUnavailable, cache_dir, ensure_bundle, ensure_core_lite,
                                      read_items, read_specs, resolve_tasks)
from nanoray.core_eval import (centered, core_score, evaluate_core, evaluate_task, fewshot_examples, main,
                               prepare_example, prepare_items, render_prompts, tokenize_prompts, truncate)
from nanoray.tokenizer import Tokenizer


BYTES = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # one token per byte: 265 with specials

MC = [{"query": f"Q{i}: which is {i % 3}?", "choices": ["zero", "one", "two"], "gold": i % 3} for i in range(12)]
SCHEMA = [{"context_options": [f"Ann{i} sat", f"Bob{i} ran"], "continuation": "and then left.", "gold": i % 2}
          for i in range(10)]
LM = [{"context": f"  {i} plus {i} is ", "continuation": str(2 * i)} for i in range(10)]


class Oracle:
    """Stand-in model: after any prefix of a scripted token sequence it puts logit 10 on that sequence's next
    token (0 elsewhere). Scripting the prompt of choice c makes it answer c."""

    def __init__(self, sequences, vocab=BYTES.vocab_size):
        self.vocab = vocab
        self.next = {tuple(s[:i + 1]): s[i + 1] for s in sequences for i in range(len(s) - 1)}
        self.max_rows = 0

    def __call__(self, ids, at=None):
        B, T = ids.shape
        self.max_rows = max(self.max_rows, B)
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = ids[b].tolist()
            for t in range(T):
                token = self.next.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 10.0
        return logits if at is None else logits[at]


def scripted_oracle(spec, items, answer):
    """An Oracle that answers answer(item) (an option index; for LM, a continuation string) on every example."""
    items = prepare_items(items, None)
    sequences = []
    for idx, item in enumerate(items):
        shots = fewshot_examples(items, idx, spec.num_fewshot)
        if spec.task_type == "language_modeling":
            item = dict(item, continuation=answer(item))
            sequences.append(BYTES.encode(render_prompts(item, spec.task_type, spec.delimiter, shots)[1], bos=True))
        else:
            sequences.append(BYTES.encode(render_prompts(item, spec.task_type, spec.delimiter, shots)[answer(item)],
                                          bos=True))
    return Oracle(sequences)


@pytest.fixture
def bundle(tmp_path, write_bundle):
    return write_bundle(tmp_path / "bundle", {"mc": ("multiple_choice", 2, MC), "schema": ("schema", 1, SCHEMA),
                                              "lm": ("language_modeling", 3, LM)},
                        baselines={"mc": 100 / 3, "schema": 50})


def test_each_task_type_scores_a_scripted_model_exactly(bundle):
    specs = {s.label: s for s in read_specs(bundle)}
    # MC: right on items 0 and 1 mod 3 (8 of 12); schema: always option 0 (right on the 5 even items);
    # LM: right except where i % 4 == 0 (7 of 10, the model says "x" there).
    cases = {"mc": (MC, lambda it: it["gold"] if it["gold"] != 2 else 0, 8 / 12),
             "schema": (SCHEMA, lambda it: 0, 5 / 10),
             "lm": (LM, lambda it: "x" if int(it["continuation"]) % 8 == 0 else it["continuation"], 7 / 10)}
    for label, (items, answer, expected) in cases.items():
        spec = specs[label]
        result = evaluate_task(scripted_oracle(spec, items, answer), BYTES, spec, read_items(spec))
        assert result["accuracy"] == pytest.approx(expected), label
        assert result["examples"] == len(items)
        assert result["centered"] == pytest.approx(centered(expected, spec.random_baseline))


def test_batching_does_not_change_answers(bundle):
    spec = next(s for s in read_specs(bundle) if s.label == "mc")
    oracle = scripted_oracle(spec, MC, lambda it: (it["gold"] + len(it["query"])) % 3)
    one = evaluate_task(oracle, BYTES, spec, MC, batch_tokens=1)
    assert oracle.max_rows == 3  # one example (3 choices) per forward
    many = evaluate_task(oracle, BYTES, spec, MC, batch_tokens=10**6)
    assert oracle.max_rows == 36 and many["correct"] == one["correct"]


def test_uniform_model_picks_the_first_choice(bundle):
    spec = next(s for s in read_specs(bundle) if s.label == "mc")
    result = evaluate_task(lambda ids, at: torch.zeros(len(at[0]), BYTES.vocab_size), BYTES, spec, MC)
    assert result["accuracy"] == pytest.approx(4 / 12)  # gold == 0 on 4 items; all losses tie -> choice 0
    assert result["centered"] == pytest.approx(0.0)


def test_centered_accuracy_and_core():
    assert centered(0.25, 25) == pytest.approx(0.0)
    assert centered(1.0, 25) == pytest.approx(1.0)
    assert centered(0.625, 25) == pytest.approx(0.5)
    assert centered(0.3, 0) == pytest.approx(0.3)
    assert centered(0.5, 62) == pytest.approx((0.5 - 0.62) / 0.38)  # below chance is negative
    assert core_score({"a": 0.5, "b": 0.1, "c": -0.3}) == pytest.approx(0.1)


def test_shuffle_and_fewshot_are_deterministic():
    items = [{"i": i} for i in range(20)]
    shuffled = prepare_items(items, 7)
    expected = list(items)
    random.Random(1337).shuffle(expected)
    assert shuffled == expected[:7] and prepare_items(items, 7) == shuffled and items[0] == {"i": 0}
    shots = fewshot_examples(shuffled, 3, 4)
    assert shots == fewshot_examples(shuffled, 3, 4)
    assert shots == [shuffled[j] for j in random.Random(1234 + 3).sample([0, 1, 2, 4, 5, 6], 4)]
    assert shuffled[3] not in shots and len({s["i"] for s in shots}) == 4
    with pytest.raises(ValueError, match="too few"):
        fewshot_examples(shuffled, 0, 7)


def test_prompt_rendering():
    shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    assert render_prompts({"query": "Q2", "choices": ["c", "d"], "gold": 0}, "multiple_choice", " ", [shot]) == \
        ["Q1 b\n\nQ2 c", "Q1 b\n\nQ2 d"]
    shot = {"context_options": ["A", "B"], "continuation": "end", "gold": 0}
    assert render_prompts({"context_options": ["C", "D"], "continuation": "fin", "gold": 1}, "schema", "|", [shot]) == \
        ["A|end\n\nC|fin", "A|end\n\nD|fin"]
    shot = {"context": " 1+1= ", "continuation": "2"}
    assert render_prompts({"context": "2+2=\n", "continuation": "4"}, "language_modeling", " ", [shot]) == \
        ["1+1= 2\n\n2+2=", "1+1= 2\n\n2+2= 4"]
    rows, starts, ends = tokenize_prompts(BYTES, "multiple_choice", ["Q: cat", "Q: cow"])
    assert starts == [5, 5] and ends == [7, 7]  # BOS + "Q: c" shared
    rows, starts, ends = tokenize_prompts(BYTES, "schema", ["A sat.", "Bo sat."])
    assert [r[s:e] for r, s, e in zip(rows, starts, ends)] == [list(b" sat."), list(b" sat.")]


def test_truncation_keeps_the_last_tokens(bundle):
    rows, starts, ends = truncate([list(range(10)), list(range(6))], [7, 4], [10, 6], max_len=8)
    assert rows == [list(range(2, 10)), list(range(6))] and starts == [5, 4] and ends == [8, 6]
    with pytest.raises(ValueError, match="does not fit"):
        truncate([list(range(10))], [2], [10], max_len=8)
    spec = next(s for s in read_specs(bundle) if s.label == "lm")
    seen = []
    evaluate_task(lambda ids, at: seen.append(ids.shape[1]) or torch.zeros(len(at[0]), BYTES.vocab_size),
                  BYTES, spec, LM, max_len=24)
    assert max(seen) == 24
    rows, starts, ends = prepare_example(BYTES, spec, prepare_items(LM, None), 0, max_len=24)
    full = prepare_example(BYTES, spec, prepare_items(LM, None), 0, max_len=None)
    assert rows[0] == full[0][0][-24:] and ends[0] - starts[0] == full[2][0] - full[1][0]
    with pytest.raises(ValueError, match="task lm, example 0"):
        prepare_example(BYTES, spec, prepare_items(LM, None), 0, max_len=2)


def test_bad_input_is_named(tmp_path, bundle, write_bundle):
    lines = (bundle / "eval_data" / "x" / "mc.jsonl").read_text().splitlines()
    lines[2] = '{"query": "broken"'
    (bundle / "eval_data" / "x" / "mc.jsonl").write_text("\n".join(lines))
    spec = next(s for s in read_specs(bundle) if s.label == "mc")
    with pytest.raises(ValueError, match=r"mc\.jsonl:3: not valid JSON"):
        read_items(spec)
    lines[2] = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5})
    (bundle / "eval_data" / "x" / "mc.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"mc\.jsonl:3: gold must be an index"):
        read_items(spec)
    csv_path = bundle / "eval_meta_data.csv"
    csv_path.write_text(csv_path.read_text().replace("lm,0", "lm,"))
    with pytest.raises(ValueError, match="task 'lm': no numeric 'Random baseline'"):
        read_specs(bundle)
    bad = write_bundle(tmp_path / "bad", {"t": ("ranking", 0, MC)})
    with pytest.raises(ValueError, match="unknown icl_task_type 'ranking'"):
        read_specs(bad)
    with pytest.raises(FileNotFoundError, match="'core', 'core-lite' or a bundle directory"):
        resolve_tasks(str(tmp_path / "nowhere"))


def _offline(url, out):
    raise OSError("network is unreachable")


def test_missing_bundle_says_what_to_download(tmp_path):
    with pytest.raises(BundleUnavailable) as e:
        ensure_bundle(tmp_path / "cache", fetch=_offline, sleep=lambda s: None)
    assert BUNDLE_URL in str(e.value) and str(tmp_path / "cache" / "eval_bundle.zip") in str(e.value)
    assert not (tmp_path / "cache" / "eval_bundle").exists()


def test_bundle_zip_is_verified_and_unpacked_once(tmp_path, bundle):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "eval_bundle.zip").write_bytes(b"<html>an error page</html>")
    with pytest.raises(ValueError, match="not a valid eval bundle"):
        ensure_bundle(cache, fetch=_offline)
    assert not (cache / "eval_bundle.zip").exists()  # removed so the next run downloads again
    with zipfile.ZipFile(cache / "eval_bundle.zip", "w") as z:  # shaped like the real one: a top folder
        for f in bundle.rglob("*"):
            if f.is_file():
                z.write(f, "eval_bundle/" + str(f.relative_to(bundle)))
    root = ensure_bundle(cache, fetch=_offline)
    assert root == cache / "eval_bundle" and [s.label for s in read_specs(root)] == ["mc", "schema", "lm"]
    assert len(json.loads((root / "source.json").read_text())["sha256"]) == 64
    (cache / "eval_bundle.zip").unlink()
    assert ensure_bundle(cache, fetch=_offline) == root  # cached: no download, no zip needed


def test_concurrent_builders_build_once(tmp_path, bundle):
    import shutil
    import threading
    import time

    from nanoray.core_data.bundle import _build_once

    builds = []

    def build(tmp):
        builds.append(tmp)
        time.sleep(0.3)  # the other thread arrives while this one holds the lock
        return shutil.copytree(bundle, tmp / "built")

    results = []
    threads = [threading.Thread(target=lambda: results.append(_build_once(tmp_path / "cache" / "b", build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == [tmp_path / "cache" / "b"] * 2
    assert (tmp_path / "cache" / "b" / "core.yaml").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == ["b"]  # no temp left


def test_checkpoint_of_another_vocab_is_refused(tmp_path):
    from nanoray.checkpoint import save_checkpoint
    from nanoray.dial import plan
    from nanoray.model import build_model

    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(plan(2, "tiny").model), None, {}, tokenizer=BYTES)
    with pytest.raises(ValueError, match="tokenizer has 265 tokens but the model's vocab_size is 4096"):
        evaluate_core(str(ckpt), tasks="core-lite")


BIGBENCH = bigbench.local_data(cache_dir())  # the real tasks on this machine, if any (never downloaded here)
needs_bigbench = pytest.mark.skipif(BIGBENCH is None, reason="BIG-bench's tasks not on this machine (set "
                                    "NANORAY_BIGBENCH_DIR, or let core-lite download them once)")


@needs_bigbench
def test_core_lite_converts(tmp_path):
    root = ensure_core_lite(tmp_path, source=BIGBENCH)
    specs = read_specs(root)
    assert [s.label for s in specs] == list(bigbench.TASKS)
    sizes = {s.label: len(read_items(s)) for s in specs}
    assert sizes["bigbench_cs_algorithms"] == 1320 and sizes["bigbench_repeat_copy_logic"] == 32
    lang = specs[-1]
    assert lang.task_type == "multiple_choice" and lang.random_baseline == pytest.approx(100 / 11, abs=1e-3)
    assert ensure_core_lite(tmp_path) == root  # cached: no source needed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, corpus):
    from nanoray.checkpoint import save_checkpoint
    from nanoray.dial import plan
    from nanoray.model import build_model

    run = plan(2, "tiny")
    model = build_model(run.model)
    with torch.no_grad():  # perturb the zero-initialized projections so the answers depend on the input
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_checkpoint(tmp_path_factory.mktemp("core") / "ckpt", model, None, dict(plan=run.model_dump(), step=0),
                           tokenizer=corpus[1])


def test_tiny_checkpoint_through_ray(ray_cluster, tiny_checkpoint, bundle, capsys):
    from nanoray.checkpoint import load_for_inference

    result = evaluate_core(str(tiny_checkpoint), tasks=str(bundle), num_workers=2, max_per_task=8)
    assert list(result["tasks"]) == ["mc", "schema", "lm"] and result["workers"] == 2
    assert result["examples"] == 8 + 8 + 8 and result["examples_per_s"] > 0
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values()) / 3)
    # the same numbers without Ray
    model, tokenizer, _ = load_for_inference(tiny_checkpoint)
    for spec in read_specs(bundle):
        local = evaluate_task(model, tokenizer, spec, read_items(spec), 8,
                              max_len=model.config.seq_len)
        assert local["accuracy"] == result["tasks"][spec.label]["accuracy"]
    main(["--checkpoint", str(tiny_checkpoint), "--tasks", str(bundle), "--max-per-task", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("task") and json.loads(out[-1])["examples"] == 12


@needs_bigbench
def test_core_lite_end_to_end_through_ray(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("NANORAY_BIGBENCH_DIR", str(BIGBENCH))  # the tasks found above, not a download
    monkeypatch.setenv("NANORAY_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="max_per_task: 5 leaves too few"):
        evaluate_core(str(tiny_checkpoint), tasks="core-lite", max_per_task=5)
    result = evaluate_core(str(tiny_checkpoint), tasks="core-lite", num_workers=2, max_per_task=11)
    assert list(result["tasks"]) == list(bigbench.TASKS) and result["examples"] == 6 * 11
    assert all(0 <= r["accuracy"] <= 1 for r in result["tasks"].values())
