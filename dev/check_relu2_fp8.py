"""Check nanoray.kernels' fp8 MLP backward pass (_relu2_fp8_bwd_kernel) without a GPU, under Triton's CPU
interpreter, against its PyTorch path (the op's CPU branch): shapes with ragged edges in both dimensions, so the
masks and the transposed stores are exercised. The interpreter's fp32 -> fp8 conversion is not the GPU's (nor
torch's) round to nearest even: it may be one fp8 step off, and where rounding carries into the exponent (494.9
-> 512 in e5m2) it drops the carry (-> 256, half). The check allows exactly those two on a small share of the
elements and nothing else; a wrong index, mask or transpose moves whole tiles.

    python -m venv --system-site-packages /tmp/tri && /tmp/tri/bin/pip install triton==3.6.0 "numpy<2.3"
    TRITON_INTERPRET=1 PYTHONPATH=$PWD /tmp/tri/bin/python dev/check_relu2_fp8.py      # seconds
"""

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (module docstring)"

from torchao.float8.float8_utils import amax_to_scale  # noqa: E402

from nanoray import kernels  # noqa: E402


def interpreter_rounding(got: torch.Tensor, want: torch.Tensor, mantissa_bits: int) -> float:
    """The share of elements that differ, each either one fp8 step off (a subnormal's step at the bottom) or half
    of a power of two (a lost carry)."""
    g, w = got.float(), want.float()
    differ = g != w
    g, w = g[differ], w[differ]
    smallest = torch.finfo(got.dtype).smallest_normal * 2.0 ** -mantissa_bits  # the subnormals' step
    one_step = (g - w).abs() <= torch.maximum(w.abs() * 2.0 ** -mantissa_bits * 1.01, torch.tensor(smallest))
    lost_carry = (g == w / 2) & (torch.frexp(w).mantissa.abs() == 0.5)
    assert (one_step | lost_carry).all(), torch.stack([g, w], 1)[~(one_step | lost_carry)][:5]
    return differ.float().mean().item()


for M, N in ((128, 64), (300, 200), (96, 130), (256, 192)):
    gen = torch.Generator().manual_seed(M + N)
    h, grad_r = torch.randn(M, N, generator=gen).bfloat16(), torch.randn(M, N, generator=gen).bfloat16()
    a = torch.relu(h.float())  # the scales as the backward takes them: from the amaxes (values within the range)
    grad_scale = amax_to_scale((grad_r.float() * 2 * a).abs().max(), torch.float8_e5m2)
    r_scale = amax_to_scale((a * a).max(), torch.float8_e4m3fn)
    want = kernels._relu2_fp8_bwd(grad_r, h, grad_scale, r_scale)  # CPU tensors: the PyTorch branch
    got = [torch.empty_like(t) for t in want]
    grid = (-(-M // 128), -(-N // 64))
    kernels._relu2_fp8_bwd_kernel[grid](grad_r, h, grad_scale, r_scale, *got, M, N, BLOCK_M=128, BLOCK_N=64,
                                        TRANSPOSED=True)
    r = torch.empty(M, N, dtype=torch.float8_e4m3fn)  # the other form: both row-major (torch transposes them)
    gh = torch.empty_like(got[0])
    kernels._relu2_fp8_bwd_kernel[grid](grad_r, h, grad_scale, r_scale, gh, gh, r, M, N, BLOCK_M=128, BLOCK_N=64,
                                        TRANSPOSED=False)
    assert torch.equal(gh.float(), got[0].float()) and torch.equal(r.t().float(), got[2].float())
    for name, g, w, bits in zip(("grad_h", "grad_h.T", "relu2.T"), got, want, (2, 2, 3)):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        share = interpreter_rounding(g, w, bits)
        assert share < 0.25, (name, share)
        print(f"M={M} N={N} {name}: {share:.1%} of the elements rounded otherwise")
print("ok")
