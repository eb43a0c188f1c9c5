"""Where does the fused fp8 MLP (NANORAY_FP8_MLP=fused) go wrong on a GPU? On an H100 (2026-12-07) the d12
trainer's loss was NaN from its first report with it, while the CPU (eager fp32, eager and compiled bf16, with
optimizer steps) trains bit-identically to the two-module path, and the Triton pass alone matches its PyTorch path
bit for bit on the GPU (tests/test_gpu.py). This runs one MLP, eager then compiled, fused against modules, on the
GPU, with c_proj zero (the model's init: grad_h is exactly zero, its scale 57344 / 1e-12) and random, and prints
each output's and gradient's finiteness and relative difference. The lead (found after that device call): Triton
mis-lowers a transposed, vectorized fp8 store beside min/max (triton-lang/triton#11111); the kernel since has no
min/max, and tests/test_gpu.py's kernel test now runs a shape of multiples of 16, where such stores vectorize.

    python dev/debug_fused_mlp.py          # on the GPU machine, seconds
"""

import torch

import torchao.float8
from nanoray import fp8, kernels

config = fp8._config(torchao.float8)
matmul, mlp = fp8._float8_matmul(config), fp8._float8_mlp(config)


def run(fused: bool, compiled: bool, zero_proj: bool, M=8192, D=768):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, M // 4, D, device="cuda", generator=gen).bfloat16().requires_grad_()
    w_fc = (0.02 * torch.randn(4 * D, D, device="cuda", generator=gen)).requires_grad_()
    w_proj = (torch.zeros(D, 4 * D, device="cuda") if zero_proj else
              0.02 * torch.randn(D, 4 * D, device="cuda", generator=gen)).requires_grad_()

    def forward(x, w_fc, w_proj):
        return mlp(x, w_fc, w_proj) if fused else matmul(torch.relu(matmul(x, w_fc)).square(), w_proj)
    f = torch.compile(forward) if compiled else forward
    y = f(x, w_fc, w_proj)
    y.backward(torch.randn(y.shape, device="cuda", generator=gen).bfloat16())
    return {"y": y, "x.grad": x.grad, "w_fc.grad": w_fc.grad, "w_proj.grad": w_proj.grad}


for transposes in ("triton", "torch"):  # kernels.RELU2_TRANSPOSES: who writes the transposed fp8 operands
    kernels.RELU2_TRANSPOSES = transposes
    for zero_proj in (True, False):
        for compiled in (False, True):
            a, b = run(False, compiled, zero_proj), run(True, compiled, zero_proj)
            for name in a:
                u, v = a[name].float(), b[name].float()
                diff = ((u - v).norm() / u.norm().clamp(min=1e-30)).item()
                print(f"transposes {transposes:6} zero c_proj {zero_proj!s:5} compiled {compiled!s:5} {name:12} "
                      f"modules finite {bool(u.isfinite().all())!s:5} fused finite {bool(v.isfinite().all())!s:5} "
                      f"rel diff {diff:.2e}")

# The whole model: a tiny d4 trained compiled in bf16 on the GPU, fused against modules, loss per step and the
# first parameters whose gradient is not finite.
from nanoray.data import SyntheticTokens  # noqa: E402
from nanoray.dial import Horizon, plan  # noqa: E402
from nanoray.model import build_model  # noqa: E402
from nanoray.optim import apply_schedule, build_optimizers  # noqa: E402

for mode in ("modules", "fused-triton", "fused-torch"):
    kernels.RELU2_TRANSPOSES = mode.split("-")[-1]
    run = plan(4, "tiny", Horizon(iterations=6))
    model = fp8.enable_fp8(build_model(run.model, "cuda", seed=1), mlp=mode.split("-")[0])
    optimizers = build_optimizers(model, run, compile=False)
    forward = torch.compile(model, dynamic=False)
    data = SyntheticTokens(run.model.vocab_size, run.model.seq_len, "markov", seed=3)
    for step in range(6):
        x, y = (t.cuda() for t in data.batch(step, 8))
        loss = forward(x, y)
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        apply_schedule(optimizers, step, run)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        print(f"{mode} step {step} loss {loss.item():.4f} non-finite grads {bad[:4]}")
