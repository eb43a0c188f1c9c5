"""Effect of the fused mix + RMSNorm's epsilon (bf16's 2^-7 against fp32's, kernels.norm_eps) on training losses at
two depths: CPU, the op's PyTorch path forced on, identical batches.

    python dev/norm_eps_effect.py      # ~1.5 min
"""

from unittest import mock

import torch

from nanoray import kernels
from nanoray import model as M
from nanoray.data import SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.model import build_model
from nanoray.optim import apply_schedule, build_optimizers


def losses(depth, eps, steps=40, rows=8):
    run = plan(depth, "tiny", Horizon(iterations=steps))
    model = build_model(run.model, "cpu", seed=1)
    opts = build_optimizers(model, run, compile=False)
    data = SyntheticTokens(run.model.vocab_size, run.model.seq_len, "markov", seed=3)
    out = []
    with mock.patch.object(M, "fused_mix_norm_available", lambda x: True), \
         mock.patch.object(kernels, "norm_eps", lambda dtype: eps):
        for step in range(steps):
            x, y = data.batch(step, rows)
            loss = model(x, y)
            loss.backward()
            apply_schedule(opts, step, run)
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
            out.append(loss.item())
    return out


for depth in (4, 6):
    old, new = losses(depth, 2.0 ** -7), losses(depth, torch.finfo(torch.float32).eps)
    rel = [abs(a - b) / b for a, b in zip(old, new)]
    print(f"d{depth}: final loss eps 2^-7 {old[-1]:.4f}, fp32 eps {new[-1]:.4f}; max rel diff over {len(old)} steps "
          f"{max(rel):.2e}, mean {sum(rel)/len(rel):.2e}")
