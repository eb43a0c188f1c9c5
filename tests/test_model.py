import pytest
import torch

from nanoray.dial import get_preset, plan
from nanoray.kernels import linear_softcap_cross_entropy, mix_norm, relu_square
from nanoray.model import GPT, KVCache, ModelConfig, build_model, window_mask


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**plan(3, "tiny").model.model_dump() | overrides)


def randomized(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialized projections and gates are perturbed, so every path carries signal."""
    model = build_model(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_shapes_and_dtypes():
    config = tiny_config()
    model = build_model(config)
    idx = torch.randint(config.vocab_size, (2, 17))
    logits = model(idx)
    assert logits.shape == (2, 17, config.vocab_size) and logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 on CPU
    assert logits.abs().max() <= 15.0  # softcap
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model(idx, idx, loss_reduction="none").shape == (2, 17)


@pytest.mark.parametrize("depth, preset", [(2, "tiny"), (5, "tiny"), (12, "gpt2"), (20, "gpt2"), (7, "gpt2")])
def test_model_accounting_agrees_with_dial(depth, preset):
    p = plan(depth, preset)
    with torch.device("meta"):
        model = GPT(p.model)
    assert model.num_scaling_params() == p.scaling_params
    assert model.num_matmul_params() == p.matmul_params
    assert model.flops_per_token() == p.flops_per_token
    assert model.num_params() == p.total_params


def test_sliding_window_flops_agree_with_dial():
    sssl = get_preset("gpt2").model_copy(update={"window_pattern": "SSSL"})
    p = plan(12, sssl)
    with torch.device("meta"):
        model = GPT(p.model)
    assert model.config.windows == p.model.windows and model.flops_per_token() == p.flops_per_token


def test_causality():
    config = tiny_config()
    model = randomized(config)
    idx = torch.randint(config.vocab_size, (1, 24))
    changed = idx.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % config.vocab_size
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:], atol=1e-3)


def test_logits_at_chosen_positions():
    config = tiny_config()
    model = randomized(config)
    idx = torch.randint(config.vocab_size, (3, 20))
    rows, positions = torch.tensor([0, 0, 2, 1]), torch.tensor([5, 19, 0, 7])
    with torch.no_grad():
        assert torch.allclose(model(idx, at=(rows, positions)), model(idx)[rows, positions], atol=1e-5)


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_kv_cache_decode_equals_full_forward(pattern):
    config = tiny_config(seq_len=256 if pattern == "L" else 512, window_pattern=pattern)
    model = randomized(config)
    T = 150 if pattern == "SL" else 40  # with SL the short window (128) is exceeded
    idx = torch.randint(config.vocab_size, (2, T))
    full = model(idx)
    cache = KVCache(config, batch_size=2, max_len=T, device="cpu", dtype=torch.float32)
    pieces = [model(idx[:, :11], cache=cache)]  # prefill, then one token at a time
    pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(11, T)]
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_window_mask():
    mask = window_mask(3, 6, offset=3, window=2, device="cpu")
    assert mask.tolist() == [[False, True, True, True, False, False],  # like FA's window_size=(2, 0)
                             [False, False, True, True, True, False],
                             [False, False, False, True, True, True]]


def test_init_is_deterministic_and_nanochat_like():
    config = tiny_config()
    a, b = build_model(config, seed=1), build_model(config, seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert a.blocks[0].attn.c_proj.weight.abs().sum() == 0 and a.blocks[0].mlp.c_proj.weight.abs().sum() == 0
    assert a.wte.weight.std().item() == pytest.approx(0.8, rel=0.05)
    assert a.resid_lambdas[0].item() == pytest.approx(1.15) and a.x0_lambdas[-1].item() == pytest.approx(0.05)
    assert a.backout_lambda.item() == pytest.approx(0.2) and a.smear_lambda.item() == 0
    assert [str(i) for i in (0, 2)] == list(a.value_embeds.keys())  # L=3: every other layer incl. the last


def test_fused_qkv_matches_separate_projections():
    config = tiny_config()
    model = randomized(config)
    attn = model.blocks[1].attn
    x = torch.randn(2, 9, config.n_embd, requires_grad=True)
    q, k, v = attn.c_q(x), attn.c_k(x), attn.c_v(x)
    w = torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight])
    fused = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(fused, torch.cat([q, k, v], dim=-1))
    # and the model's gradients land on the three separate parameters
    model(torch.randint(config.vocab_size, (2, 9)), torch.randint(config.vocab_size, (2, 9))).backward()
    assert all(getattr(attn, n).weight.grad is not None for n in ("c_q", "c_k", "c_v"))


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """nanochat-facts §2, written out plainly (explicit softmax attention, no SDPA), for the fp32 CPU path."""
    cfg = model.config
    B, T = idx.shape
    H, K, C, L = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer

    def rms(x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rope(t):  # rotate-half, by -theta
        angles = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / 100_000 ** (torch.arange(0, C, 2) / C))
        cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
        t1, t2 = t[..., :C // 2], t[..., C // 2:]
        return torch.cat([t1 * cos + t2 * sin, t2 * cos - t1 * sin], dim=-1)

    emb = rms(model.wte.weight[idx])
    gate = model.smear_lambda * torch.sigmoid(emb[..., :24] @ model.smear_gate.weight.T)
    x = emb.clone()
    x[:, 1:] = emb[:, 1:] + gate[:, 1:] * emb[:, :-1]
    x0, cached = x, None
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, block in enumerate(model.blocks):
        a = block.attn
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        h = rms(x)
        q = (h @ a.c_q.weight.T).view(B, T, H, C)
        k = (h @ a.c_k.weight.T).view(B, T, K, C)
        v = (h @ a.c_v.weight.T).view(B, T, K, C)
        if a.ve_gate is not None:
            ve = model.value_embeds[str(i)].weight[idx].view(B, T, K, C)
            v = v + 3 * torch.sigmoid(h[..., :12] @ a.ve_gate.weight.T)[..., None] * ve
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        scores = torch.einsum("bthc,bshc->bhts", q, k) / C**0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshc->bthc", att, v).reshape(B, T, H * C)
        x = x + y @ a.c_proj.weight.T
        x = x + torch.relu(rms(x) @ block.mlp.c_fc.weight.T).square() @ block.mlp.c_proj.weight.T
        if i == L // 2:
            cached = x
    x = rms(x - model.backout_lambda * cached)
    return 15 * torch.tanh((x @ model.lm_head.weight.T)[..., :cfg.vocab_size] / 15)


@pytest.mark.parametrize("depth", [3, 4])
def test_forward_matches_plain_reference(depth):
    config = plan(depth, "tiny").model
    model = randomized(config, seed=depth)
    idx = torch.randint(config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_forward(model, idx), atol=1e-4, rtol=1e-4)


def test_init_scales():
    config = plan(4, "tiny").model
    model = build_model(config, seed=0)
    s = 3**0.5 / config.n_embd**0.5
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight, model.value_embeds["1"].weight):
        assert w.abs().max() <= s and w.std().item() == pytest.approx(1 / config.n_embd**0.5, rel=0.05)
    assert mlp.c_fc.weight.abs().max() <= 0.4 * s and mlp.c_fc.weight.abs().max() > 0.35 * s
    for w in (attn.ve_gate.weight, model.smear_gate.weight):
        assert w.min() >= 0 and w.max() <= 0.02


def test_relu_square_grad_matches_autograd():
    h = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_square, (h,))
    g = torch.randn(64, 32, dtype=torch.float64)
    (torch.relu(h).square() * g).sum().backward()
    expected, h.grad = h.grad, None
    (relu_square(h) * g).sum().backward()
    torch.testing.assert_close(h.grad, expected)


def test_linear_softcap_cross_entropy_matches_plain_path():
    """The fused lm_head + softcap + CE (its PyTorch path here) equals the model's plain path: loss and grads,
    with a padded vocab and ignored targets."""
    gen = torch.Generator().manual_seed(0)
    N, D, padded, vocab = 37, 16, 128, 100
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    w = (3 * torch.randn(padded, D, generator=gen)).requires_grad_()
    targets = torch.randint(vocab, (N,), generator=gen)
    targets[::5] = -1
    loss = linear_softcap_cross_entropy(x, w, targets, vocab, 15.0)
    (2.5 * loss).backward()
    fused = (loss.detach(), x.grad, w.grad)
    x.grad = w.grad = None
    logits = 15 * torch.tanh((x @ w.t())[:, :vocab] / 15)
    ref = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    (2.5 * ref).backward()
    for a, b in zip(fused, (ref.detach(), x.grad, w.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_mix_norm_matches_autograd():
    """The fused residual mix + RMSNorm (its PyTorch path here) against plain autograd, lambda grads included."""
    gen = torch.Generator().manual_seed(0)
    x_prev, x0 = (torch.randn(3, 5, 24, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    lam = torch.tensor([1.1, 0.2], dtype=torch.float64, requires_grad=True)
    g_x, g_xn = torch.randn(3, 5, 24, dtype=torch.float64, generator=gen), torch.randn(3, 5, 24, dtype=torch.float64)
    x, xn = mix_norm(x_prev, x0, lam)
    torch.autograd.backward((x, xn), (g_x, g_xn))
    fused = (x, xn, x_prev.grad, x0.grad, lam.grad)
    x_prev.grad = x0.grad = lam.grad = None
    x = lam[0] * x_prev + lam[1] * x0
    xn = torch.nn.functional.rms_norm(x, (24,))
    torch.autograd.backward((x, xn), (g_x, g_xn))
    for a, b in zip(fused, (x, xn, x_prev.grad, x0.grad, lam.grad)):
        torch.testing.assert_close(a, b)
