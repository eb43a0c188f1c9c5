"""GPU tier: runs on the GPU machine (python -m pytest tests/test_gpu.py), skips itself without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from nanoray.data import DataSpec, SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.hardware import compute_dtype, prefer_cudnn_attention
from nanoray.kernels import _fa4_interface, flash_attention, linear_softcap_cross_entropy, mix_norm
from nanoray.model import build_model
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_bf16_forward_matches_eager_fp32():
    device = torch.device("cuda", 0)
    prefer_cudnn_attention()
    run = plan(4, "tiny")
    model = build_model(run.model, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, y = SyntheticTokens(run.model.vocab_size, run.model.seq_len, kind="markov").batch(0, 8, device)
    assert compute_dtype(device) == torch.bfloat16
    compiled = torch.compile(model, dynamic=False)(x, y)
    reference = build_model(run.model, device="cpu")
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    expected = reference(x.cpu(), y.cpu())  # fp32 on CPU
    assert compiled.dtype == torch.float32
    assert compiled.item() == pytest.approx(expected.item(), rel=2e-2)
    # and the gradients (fused cross-entropy, ReLU², FlashAttention when installed) point the same way
    compiled.backward()
    expected.backward()
    for (name, p), ref in zip(model.named_parameters(), reference.parameters()):
        cos = F.cosine_similarity(p.grad.flatten().cpu(), ref.grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_softcap_cross_entropy_kernel_matches_plain():
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    N, D, padded, vocab = 3000, 256, 5056, 5000
    x = torch.randn(N, D, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (0.2 * torch.randn(padded, D, device="cuda", generator=gen)).bfloat16().requires_grad_()
    targets = torch.randint(vocab, (N,), device="cuda", generator=gen)
    targets[::7] = -1
    loss = linear_softcap_cross_entropy(x, w, targets, vocab, 15.0)
    (loss / 4).backward()
    fused = (loss.detach(), x.grad, w.grad)
    x.grad = w.grad = None
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(15 * torch.tanh((xr @ wr.t())[:, :vocab] / 15), targets, ignore_index=-1)
    (ref / 4).backward()
    assert fused[0].item() == pytest.approx(ref.item(), rel=1e-3)
    assert rel_err(fused[1], xr.grad) < 1e-2 and rel_err(fused[2], wr.grad) < 1e-2
    assert torch.isfinite(fused[1]).all() and torch.isfinite(fused[2]).all()


@pytest.mark.skipif(_fa4_interface() is None, reason="flash_attn.cute (FlashAttention-4) not installed")
@pytest.mark.parametrize("window", [-1, 100])
def test_flash_attention_matches_reference(window):
    B, T, H, C = 2, 512, 4, 128
    q, k, v = (torch.randn(B, T, H, C, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(B, T, H, C, device="cuda").bfloat16()
    out = flash_attention(q, k, v, window)
    out.backward(grad)
    got = (out, q.grad, k.grad, v.grad)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    pos = torch.arange(T, device="cuda")
    mask = pos[None, :] <= pos[:, None]
    if window >= 0:
        mask &= pos[None, :] >= pos[:, None] - window
    ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         attn_mask=mask).transpose(1, 2)
    ref.backward(grad.double())
    for a, b in zip(got, (ref, qr.grad, kr.grad, vr.grad)):
        assert rel_err(a, b) < 2e-2


def test_training_on_gpu_learns():
    session = LocalSession("cuda")
    run = plan(2, "tiny", Horizon(iterations=30))
    last = train(TrainConfig(plan=run, data=DataSpec(kind="markov"), log_every=10, eval_every=0,
                             eval_tokens=2**14, checkpoint_at_end=False), session)
    assert session.history[0]["train_loss"] > 7 and last["val_loss"] < 3.5
    assert last["mfu"] > 0 and last["peak_mem_gb"] > 0


def test_mix_norm_kernel_matches_reference():
    N, D = 3000, 1280
    x_prev, x0, g_x, g_xn = (torch.randn(N, D, device="cuda").bfloat16() for _ in range(4))
    x_prev.requires_grad_(), x0.requires_grad_()
    lam = torch.tensor([1.13, 0.17], device="cuda", requires_grad=True)
    x, xn = mix_norm(x_prev, x0, lam)
    torch.autograd.backward((x, xn), (g_x, g_xn))
    got = (x, xn, x_prev.grad, x0.grad, lam.grad)
    a, b, lr = (t.detach().double().requires_grad_() for t in (x_prev, x0, lam))
    xr = lr[0] * a + lr[1] * b
    xnr = F.rms_norm(xr, (D,), eps=torch.finfo(torch.bfloat16).eps)
    torch.autograd.backward((xr, xnr), (g_x.double(), g_xn.double()))
    for name, u, v in zip(("x", "xn", "g_prev", "g_x0", "g_lam"), got, (xr, xnr, a.grad, b.grad, lr.grad)):
        assert rel_err(u, v) < 1e-2, name
