"""Effect of the fused mix + RMSNorm's epsilon (bf16's 2^-7 against fp32's, kernels.norm_eps) on training losses at
two depths: CPU, the op's PyTorch path forced on, identical batches (tests/test_fp8.py's training loop).

    python dev/norm_eps_effect.py      # ~1.5 min
"""

import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_fp8 import losses  # noqa: E402  (tiny preset, fixed markov batches, the plan's optimizers)

from nanoray import kernels  # noqa: E402
from nanoray import model as M  # noqa: E402


def losses_with(depth: int, eps: float, steps: int = 40) -> list[float]:
    with mock.patch.object(M, "fused_mix_norm_available", lambda x: True), \
         mock.patch.object(kernels, "norm_eps", lambda dtype: eps):
        return losses.__wrapped__(depth, fp8=False, steps=steps)  # not the cached losses: the patch changes them


for depth in (4, 6):
    old, new = losses_with(depth, 2.0 ** -7), losses_with(depth, torch.finfo(torch.float32).eps)
    rel = [abs(a - b) / b for a, b in zip(old, new)]
    print(f"d{depth}: final loss eps 2^-7 {old[-1]:.4f}, fp32 eps {new[-1]:.4f}; max rel diff over {len(old)} steps "
          f"{max(rel):.2e}, mean {sum(rel)/len(rel):.2e}")
