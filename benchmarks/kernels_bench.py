"""The Triton kernels of nanoray/kernels.py against what torch.compile makes of the plain PyTorch code, at
the d12 (64 rows) and d20 (16 rows) micro-batch shapes. One JSON line per (kernel, shape): ms and GB/s
(the fewest bytes the op must move: each input read once, each output written once).

    python benchmarks/kernels_bench.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nanoray.kernels import _softcap_ce_, mix_norm  # noqa: E402

SHAPES = {"d12": (64 * 2048, 768), "d20": (16 * 2048, 1280)}
V = 32768


def ce_plain(logits, targets):
    return F.cross_entropy(15 * torch.tanh(logits.float() / 15), targets)


def report(name, shape, ms, nbytes):
    print(json.dumps(dict(kernel=name, shape=shape, ms=round(ms, 3), gb_per_s=round(nbytes / ms / 1e6))), flush=True)


def main() -> None:
    compiled_ce = torch.compile(ce_plain)
    for shape, (N, D) in SHAPES.items():
        logits = torch.randn(N, V, device="cuda").mul_(4).bfloat16()
        targets = torch.randint(V, (N,), device="cuda")
        work = logits.clone()
        report("softcap_ce_fused", shape, do_bench(lambda: _softcap_ce_(work.copy_(logits), targets, V, 15.0))
               - do_bench(lambda: work.copy_(logits)), 4 * N * V)
        leaf = logits.clone().requires_grad_()
        report("softcap_ce_compiled", shape, do_bench(lambda: compiled_ce(leaf, targets).backward(), grad_to_none=[leaf]), 4 * N * V)
        del logits, work, leaf
        x_prev, x0 = (torch.randn(N, D, device="cuda").bfloat16().requires_grad_() for _ in range(2))
        g_x, g_xn = (torch.randn(N, D, device="cuda").bfloat16() for _ in range(2))
        lam = torch.tensor([1.1, 0.2], device="cuda", requires_grad=True)

        def fused():
            x, xn = mix_norm(x_prev, x0, lam)
            torch.autograd.backward((x, xn), (g_x, g_xn))

        @torch.compile
        def plain_fwd(x_prev, x0, lam):
            x = lam[0] * x_prev + lam[1] * x0
            return x, F.rms_norm(x, (x.size(-1),))

        def plain():
            x, xn = plain_fwd(x_prev, x0, lam)
            torch.autograd.backward((x, xn), (g_x, g_xn))
        unit = 2 * N * D  # one bf16 activation
        leaves = [x_prev, x0, lam]
        report("mix_norm_fused", shape, do_bench(fused, grad_to_none=leaves), 10 * unit)  # fwd 2+2, bwd 4+2
        report("mix_norm_compiled", shape, do_bench(plain, grad_to_none=leaves), 10 * unit)


if __name__ == "__main__":
    main()
