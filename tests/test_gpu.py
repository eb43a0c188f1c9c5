"""GPU tier: runs on the GPU machine (python -m pytest tests/test_gpu.py), skips itself without CUDA."""

import pytest
import torch
import torch.nn.functional as F

from nanoray.data import DataSpec, SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.hardware import compute_dtype, prefer_cudnn_attention
from nanoray.fp8 import check_fp8
from nanoray.kernels import (E5M2_GRAD_SCALE, _fa4_interface, _softcap_ce_reference, flash_attention,
                             linear_softcap_cross_entropy, mix_norm, norm_eps, resolve, window_attention)
from nanoray.model import build_model, window_mask
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("windows", ["L", "SSSL"])
def test_compiled_bf16_forward_matches_eager_fp32(windows):
    """SSSL: the S layers (window 128 of 256) run FlexAttention on the GPU, a dense mask on the CPU."""
    device = torch.device("cuda", 0)
    prefer_cudnn_attention()
    run = plan(4, "tiny", window_pattern=windows)
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


def test_softcap_cross_entropy_writes_e5m2_gradients_as_a_cast_would():
    """fp8 training's loss kernel: the gradient times E5M2_GRAD_SCALE, rounded to e5m2 on the GPU, is the
    PyTorch reference's fp32 gradient cast so, but for rounding-boundary flips of one e5m2 step (the kernel's
    exp2 and the reference's exp differ in the last bits)."""
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    N, padded, vocab = 600, 5056, 5000
    logits = (8 * torch.randn(N, padded, device="cuda", generator=gen)).bfloat16()
    targets = torch.randint(vocab, (N,), device="cuda", generator=gen)
    targets[::7] = -1
    loss, g8 = torch.ops.nanoray.softcap_ce_e5m2(logits, targets, vocab, 15.0)
    ref_loss, ref = _softcap_ce_reference(logits, targets, vocab, 15.0)
    assert g8.dtype == torch.float8_e5m2 and torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-4)
    got, want = g8.float(), (ref * E5M2_GRAD_SCALE).to(torch.float8_e5m2).float()
    differ = got != want
    assert differ.float().mean() < 1e-3 and got.abs().max() <= E5M2_GRAD_SCALE
    assert ((got - want).abs() <= 0.25 * want.abs() + 2**-16)[differ].all()  # one step of 2 mantissa bits
    assert not g8[targets < 0].float().any() and not g8[:, vocab:].float().any()


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


@pytest.mark.parametrize("window, n_kv_head", [(100, 4), (128, 2), (300, 4)])
def test_window_attention_matches_reference(window, n_kv_head):
    """FlexAttention's sliding window (S layers without FA4), compiled inside a compiled function as in training."""
    B, H, T, C = 2, 4, 512, 128
    q = torch.randn(B, H, T, C, device="cuda").bfloat16().requires_grad_()
    k, v = (torch.randn(B, n_kv_head, T, C, device="cuda").bfloat16().requires_grad_() for _ in range(2))
    grad = torch.randn(B, H, T, C, device="cuda").bfloat16()
    resolve()
    out = torch.compile(window_attention, dynamic=False)(q, k, v, window)
    out.backward(grad)
    got = (out, q.grad, k.grad, v.grad)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=window_mask(T, T, 0, window, "cuda"),
                                         enable_gqa=n_kv_head != H)
    ref.backward(grad.double())
    for a, b in zip(got, (ref, qr.grad, kr.grad, vr.grad)):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("mlp", ["modules", "fused"])
def test_fp8_training_on_gpu_follows_bf16(mlp, monkeypatch):
    """The compiled trainer with --fp8 (torchao float8 block matrices) on the same batches as bf16: both learn,
    their losses stay within 1%, and evaluation ran in bf16 (the modules are swapped back and forth). Both fp8
    MLPs: two Float8Linears, and one autograd function with the Triton backward pass (NANORAY_FP8_MLP)."""
    pytest.importorskip("torchao.float8")
    check_fp8(torch.device("cuda", 0))
    monkeypatch.setattr("nanoray.fp8.MLP", mlp)
    runs = {}
    for fp8 in (False, True):
        session = LocalSession("cuda")
        run = plan(4, "tiny", Horizon(iterations=40), fp8=fp8)
        train(TrainConfig(plan=run, data=DataSpec(kind="markov"), log_every=10, eval_every=20,
                          eval_tokens=2**14, checkpoint_at_end=False), session)
        runs[fp8] = session.history
    bf16, fp8 = runs[False], runs[True]
    # both learn (d4 is at ~5.8 by its first report, step 10, from ln 4096 = 8.3), on the same curve
    assert bf16[0]["train_loss"] > bf16[-1]["train_loss"] + 1 and bf16[-1]["val_loss"] < 3.5
    for a, b in zip(bf16, fp8):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
    assert fp8[-1]["val_loss"] == pytest.approx(bf16[-1]["val_loss"], rel=1e-2)


@pytest.mark.parametrize("transposes", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(3000, 1000), (4096, 3072)])
def test_fp8_relu2_backward_kernel_is_its_pytorch_path(shape, transposes, monkeypatch):
    """The fp8 MLP backward's Triton pass against the op's PyTorch path (the CPU's): bit for bit (both compute in
    fp32 and round to nearest even, saturating), at the scales the backward takes (from the amaxes), on a shape with
    ragged edges and on one of multiples of 16 (where Triton may vectorize the transposed 1-byte stores)."""
    from torchao.float8.float8_utils import amax_to_scale
    from nanoray import kernels
    from nanoray.kernels import _relu2_fp8_bwd
    monkeypatch.setattr(kernels, "RELU2_TRANSPOSES", transposes)
    h, grad_r = (torch.randn(*shape, device="cuda").bfloat16() for _ in range(2))
    a = torch.relu(h.float())
    grad_scale = amax_to_scale((grad_r.float() * 2 * a).abs().max(), torch.float8_e5m2)
    r_scale = amax_to_scale((a * a).max(), torch.float8_e4m3fn)
    got = _relu2_fp8_bwd(grad_r, h, grad_scale, r_scale)
    want = _relu2_fp8_bwd(grad_r.cpu(), h.cpu(), grad_scale.cpu(), r_scale.cpu())
    for name, g, w in zip(("grad_h", "grad_h.T", "relu2.T"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g.cpu().float(), w.float()), name


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
    xnr = F.rms_norm(xr, (D,), eps=norm_eps(torch.bfloat16))  # the model's: F.rms_norm's default for bf16 input
    torch.autograd.backward((xr, xnr), (g_x.double(), g_xn.double()))
    for name, u, v in zip(("x", "xn", "g_prev", "g_x0", "g_lam"), got, (xr, xnr, a.grad, b.grad, lr.grad)):
        assert rel_err(u, v) < 1e-2, name


# ------------------------------------------------------------------------------- serving: decode paths

def _served_model(vocab=512, seq_len=256, n_layer=3, n_embd=128, n_head=4, n_kv_head=2, head_dim=32,
                  window_pattern="SL", seed=0):
    """A small random model whose projections carry signal (the zero-initialized ones perturbed)."""
    from nanoray.model import ModelConfig, build_model

    config = ModelConfig(vocab_size=vocab, seq_len=seq_len, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                         n_kv_head=n_kv_head, head_dim=head_dim, window_pattern=window_pattern)
    model = build_model(config, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, device="cuda", generator=gen))
    return model.eval()


# rows: GEMV, skinny GEMM, cuBLAS with 256- and 512-position splits (or, narrow, _linear_kernel GEMMs)
@pytest.mark.parametrize("B,variant", [(B, "fused") for B in (1, 3, 40, 70)] + [(40, "narrow"), (70, "narrow")])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_fused_decode_step_matches_the_model(B, n_kv_head, variant):
    """nanoray.fused_decode against the model's per-row cache forward (both bf16): logits, the cache it writes,
    and the greedy pick; rows at different positions, some past the 128-token short window (pattern SL).
    narrow runs every row count through _linear_kernel."""
    from nanoray.engine import decode_step
    from nanoray.fused_decode import FusedDecoder
    from nanoray.model import KVCache

    model = _served_model(n_kv_head=n_kv_head).prepare_inference(torch.bfloat16)
    T, gen = model.config.seq_len, torch.Generator().manual_seed(B)
    caches = [KVCache(model.config, 80, T, "cuda", torch.bfloat16) for _ in range(2)]
    lens = torch.randint(1, 200, (B,), generator=gen).tolist()
    with torch.no_grad():
        for cache in caches:
            for slot, n in enumerate(lens):
                prompt = torch.randint(512, (1, n), generator=torch.Generator().manual_seed(slot)).cuda()
                model(prompt, cache=cache.view(slice(slot, slot + 1), T, 0))
        state = torch.zeros(6, 80, dtype=torch.long, device="cuda")
        state[0, :B] = torch.randint(512, (B,), generator=gen).cuda()
        state[1, :B], state[4], state[5, :B] = torch.tensor(lens).cuda(), 1, 1
        fstate = torch.ones(2, 80, device="cuda")
        fused = FusedDecoder(model, caches[1], state, fstate)
        fused.narrow_rows = B if variant == "narrow" else fused.narrow_rows
        for _ in range(3):
            ref_BV = decode_step(model, caches[0], state[0, :B].clone(), state[1, :B].clone(), T)
            got_BV = fused.forward(B).clone()
            assert rel_err(got_BV, ref_BV) < 2e-2
            out = torch.zeros(B, 2, device="cuda")
            fused.sample(B, 1, out)  # writes the next token and position into the state
            agree = (out[:, 0].long() == ref_BV.argmax(-1)).float().mean().item()
            assert agree >= 0.9, agree
            assert out[:, 1].tolist() == pytest.approx((got_BV.log_softmax(-1).max(-1).values).tolist(), abs=1e-3)
            for name in ("k", "v", "prev_emb"):
                assert rel_err(getattr(caches[1], name), getattr(caches[0], name)) < 2e-2, name


def test_fused_decode_under_pdl_computes_what_it_computes_without():
    """Programmatic dependent launch changes when the kernels start, never what they compute: 8 greedy steps of 3
    rows captured in one CUDA graph (as the engine runs them) give bit-identical tokens, log-probs and cache with
    PDL and without; a kernel reading its input before the previous kernel's write would not (the attention
    reads its keys and values before the wait)."""
    from nanoray.fused_decode import FusedDecoder
    from nanoray.model import KVCache

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs Hopper or later")
    model = _served_model(n_kv_head=2).prepare_inference(torch.bfloat16)
    T, B, steps = model.config.seq_len, 3, 8
    results = []
    for pdl in (False, True):
        cache = KVCache(model.config, 4, T, "cuda", torch.bfloat16)
        with torch.no_grad():
            for slot, n in enumerate((5, 130, 60)):
                prompt = torch.randint(512, (1, n), generator=torch.Generator().manual_seed(slot)).cuda()
                model(prompt, cache=cache.view(slice(slot, slot + 1), T, 0))
            state = torch.zeros(6, 4, dtype=torch.long, device="cuda")
            state[0, :B], state[1, :B], state[4], state[5, :B] = torch.tensor([3, 4, 5]).cuda(), \
                torch.tensor([5, 130, 60]).cuda(), 1, 1
            fused = FusedDecoder(model, cache, state, torch.ones(2, 4, device="cuda"))
            fused.pdl = pdl
            start = [t.clone() for t in (state, cache.k, cache.v, cache.prev_emb)]
            out = torch.zeros(steps, B, 2, device="cuda")
            fused.forward(B), fused.sample(B, 1, out[0])  # compiles the kernels (outside the capture)
            for t, saved in zip((state, cache.k, cache.v, cache.prev_emb), start):
                t.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(steps):
                    fused.forward(B)
                    fused.sample(B, 1, out[i])
            graph.replay()
            torch.cuda.synchronize()
        results.append((out.clone(), cache.k.clone(), cache.v.clone(), state.clone()))
    for plain, pdl in zip(*results):
        assert torch.equal(plain, pdl)
    assert results[1][3][1, :B].tolist() == [5 + steps, 130 + steps, 60 + steps]  # all 8 steps ran


def test_fused_sampler_draws_what_the_pytorch_sampler_draws():
    from nanoray.engine import _hash32, sample
    from nanoray.fused_decode import FusedDecoder

    from nanoray.model import KVCache

    model = _served_model().prepare_inference(torch.bfloat16)
    B = 6
    state = torch.zeros(6, 8, dtype=torch.long, device="cuda")
    fstate = torch.ones(2, 8, device="cuda")
    fused = FusedDecoder(model, KVCache(model.config, 8, 256, "cuda", torch.bfloat16), state, fstate)
    state[0, :B] = torch.arange(B).cuda()
    fused.forward(B)  # the logits (and their per-block stats) of B rows
    top_k = torch.tensor([1, 5, 40, 64, 3, 64], device="cuda")
    state[3, :B] = _hash32(torch.arange(B, device="cuda") + 123)
    state[2, :B] = torch.tensor([0, 1, 2, 5, 8, 13], device="cuda")
    state[4, :B], state[5, :B] = top_k, 1
    fstate[0, :B] = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5, 2.0], device="cuda")
    fstate[1, :B] = torch.tensor([torch.inf, 0.9, 0.5, torch.inf, 0.95, 0.8], device="cuda")
    key = _hash32(state[3, :B] ^ state[2, :B])
    expected = sample(fused.logits[:B], fstate[0, :B], top_k, fstate[1, :B], key, 64)
    out = torch.zeros(B, 2, device="cuda")
    fused.sample(B, 64, out)
    assert out[:, 0].long().tolist() == expected.tolist()
    lp = fused.logits[:B].log_softmax(-1).gather(1, expected[:, None])[:, 0]
    assert out[:, 1].tolist() == pytest.approx(lp.tolist(), abs=1e-4)
    assert state[2, :B].tolist() == [1, 2, 3, 6, 9, 14] and state[0, :B].tolist() == expected.tolist()


def _generate_all(engine, prompts, params):
    import asyncio

    async def one(prompt):
        return [t async for t in engine.stream(prompt, params, stop_ids=set())]

    async def run():
        return await asyncio.gather(*(one(p) for p in prompts))
    try:
        return asyncio.run(run())
    finally:
        engine.close()


@pytest.mark.parametrize("path", ["fused", "compiled"])
def test_engine_fast_decode_path_runs_without_falling_back(path, recwarn):
    """The default fused path (and torch.compile of the model's decode forward, on this GPU's torch) run inside
    the CUDA graphs: the test fails if either falls back (a fallback warns and changes decode_path). Each
    greedy token is the argmax of a full bf16 recompute of its prefix, up to bf16 rounding (a near tie)."""
    from nanoray.engine import Engine, SamplingParams
    from nanoray.tokenizer import Tokenizer

    model = _served_model(window_pattern="L")
    tokenizer = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    prompts = [torch.randint(256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 70, 130)]
    kwargs = dict(fused_decode=True) if path == "fused" else dict(fused_decode=False, compile_decode=True)
    engine = Engine(model, tokenizer, max_batch=4, **kwargs)
    generated = _generate_all(engine, prompts, SamplingParams(max_tokens=24, temperature=0))
    assert engine.decode_path == path and engine.cuda_graphs
    assert not [w for w in recwarn.list if "nanoray.engine" in str(w.message)]
    with torch.no_grad():
        for prompt, tokens in zip(prompts, generated):
            logits = model(torch.tensor([prompt + tokens], device="cuda"))[0, len(prompt) - 1:-1]
            gap = logits.max(-1).values - logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
            assert len(tokens) == 24 and gap.max().item() < 0.1, gap.tolist()
