"""Validation loss and bits per byte of a model over batches of (inputs, targets), summed across workers.

    loss, bpb = evaluate(model, batches, num_batches, token_bytes)

bpb is independent of the tokenizer: nats summed over the targets that stand for bytes (special tokens
count none), over ln 2 x those bytes, so models with other vocabularies compare.
"""

import itertools
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model, batches, num_batches: int, token_bytes: torch.Tensor | None = None,
             max_logits: int = 2**29) -> tuple[float, float]:
    """(loss, bpb) over the first `num_batches` (inputs, targets) of `batches` on each worker, summed
    across workers, in one forward pass per batch (chunks of rows keep the fp32 logits under
    `max_logits` elements). loss: mean nats per target token (ignored targets count none). bpb: NaN
    without `token_bytes` (int per token id: its byte length, 0 for special tokens).

    Meant for the plain (eager) model: a compiled one would compile another graph for it, which costs
    more than the few evaluations of a run save."""
    sums = None  # nats, target tokens, nats over byte tokens, bytes
    for x, y in itertools.islice(batches, num_batches):
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=x.device)
            if token_bytes is not None:
                token_bytes = token_bytes.to(x.device)
        rows = max(1, max_logits // (x.size(1) * model.config.vocab_size))
        for xc, yc in zip(x.split(rows), y.split(rows)):
            nats = model(xc, yc, loss_reduction="none").double()
            sums[0] += nats[yc >= 0].sum()
            sums[1] += (yc >= 0).sum()
            if token_bytes is not None:
                nbytes = torch.where(yc >= 0, token_bytes[yc.clamp(min=0)], 0)
                sums[2] += nats[nbytes > 0].sum()
                sums[3] += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return loss, (sums[2] / (math.log(2) * sums[3])).item() if token_bytes is not None else float("nan")
