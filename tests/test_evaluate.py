"""Validation loss and bits per byte (nanoray/evaluate.py)."""

import math

import pytest
import torch

from nanoray.data import SyntheticTokens, WorkerBatches
from nanoray.dial import plan
from nanoray.evaluate import evaluate
from nanoray.model import build_model


def test_evaluate_counts_only_byte_tokens():
    run = plan(2, "tiny")
    model = build_model(run.model)
    source = SyntheticTokens(run.model.vocab_size, run.model.seq_len, kind="markov")
    ones = torch.ones(run.model.vocab_size, dtype=torch.int32)
    x, y = source.batch(0, 2)
    mean_loss = model(x, y).item()
    loss, bpb = evaluate(model, WorkerBatches(source, 2, 0, 1, "cpu"), 1, ones)
    assert loss == pytest.approx(mean_loss, rel=1e-5)
    assert bpb == pytest.approx(mean_loss / math.log(2), rel=1e-5)  # one byte per token: bpb = loss / ln 2
    # tokens with zero bytes (the special tokens) drop out of both sums; rows in chunks change nothing
    lengths = torch.randint(1, 5, (run.model.vocab_size,), dtype=torch.int32)
    lengths[:100] = 0
    per_token = model(x, y, loss_reduction="none")
    counted = lengths[y] > 0
    expected = per_token[counted].sum().item() / (math.log(2) * lengths[y].sum().item())
    one_row = run.model.seq_len * run.model.vocab_size
    for max_logits in (2**29, one_row):
        loss, bpb = evaluate(model, WorkerBatches(source, 2, 0, 1, "cpu"), 1, lengths, max_logits=max_logits)
        assert bpb == pytest.approx(expected, rel=1e-5) and loss == pytest.approx(mean_loss, rel=1e-5)
    assert math.isnan(evaluate(model, WorkerBatches(source, 2, 0, 1, "cpu"), 1)[1])
