import copy
import math

import pytest
import torch

from nanoray.dial import Horizon, plan
from nanoray.model import build_model
from nanoray.optim import (POLAR_EXPRESS, Muon, apply_schedule, build_optimizers, lr_multiplier, muon_momentum,
                           muon_weight_decay, polar_express)


@pytest.mark.parametrize("shape", [(4, 32, 32), (3, 64, 16), (2, 16, 48)])
def test_polar_express_orthogonalizes(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.linalg.svdvals(polar_express(G))
    assert s.max() < 1.2  # Polar Express maps singular values near 1, never far above
    # all of them for rectangular matrices; square ones have a few near-zero singular values it cannot lift
    assert (s > 0.7).float().mean() >= (0.9 if shape[1] == shape[2] else 1.0)


def test_schedules_match_nanochat():
    p = plan(12, horizon=Horizon(iterations=1000))  # warmup 40, warmdown 650 (starts at 350)
    assert lr_multiplier(0, p) == pytest.approx(1 / 40)
    assert lr_multiplier(39, p) == 1.0 and lr_multiplier(350, p) == 1.0
    assert lr_multiplier(999, p) == pytest.approx(1 / 650 + (1 - 1 / 650) * 0.05)
    assert lr_multiplier(1000, p) == pytest.approx(0.05)
    # momentum: the 400-step warmup wins over an early warmdown (here starting at 350), as in nanochat
    assert muon_momentum(0, p) == 0.85 and muon_momentum(175, p) == pytest.approx(0.9025)
    assert muon_momentum(350, p) == pytest.approx(0.955) and muon_momentum(400, p) == pytest.approx(0.97 - 0.07 * 50 / 650)
    assert muon_momentum(1000, p) == pytest.approx(0.90)
    long = plan(12, horizon=Horizon(iterations=2000))
    assert muon_momentum(200, long) == pytest.approx(0.91) and muon_momentum(400, long) == 0.97
    assert muon_weight_decay(0, p) == pytest.approx(p.weight_decay)
    assert muon_weight_decay(500, p) == pytest.approx(p.weight_decay / 2)
    assert muon_weight_decay(1000, p) == pytest.approx(0, abs=1e-12)


def test_param_groups_cover_the_model_and_follow_the_schedule():
    p = plan(3, "tiny", Horizon(iterations=100))
    model = build_model(p.model)
    adamw, muon = build_optimizers(model, p)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    n_adam = sum(x.numel() for g in adamw.param_groups for x in g["params"])
    n_muon = sum(x.numel() for g in muon.param_groups for x in g["params"])
    assert n_adam + n_muon == model.num_params()
    assert all(x.ndim == 2 for g in muon.param_groups for x in g["params"])
    assert len({tuple(g["params"][0].shape) for g in muon.param_groups}) == len(muon.param_groups)
    assert [g["lr"] for g in adamw.param_groups][:2] == [p.unembedding_lr, p.embedding_lr]
    mult = apply_schedule([adamw, muon], 5, p)
    assert mult == pytest.approx(6 / 10)
    assert muon.param_groups[0]["lr"] == pytest.approx(p.matrix_lr * mult)
    assert muon.param_groups[0]["momentum"] == pytest.approx(muon_momentum(5, p))


def test_muon_descends_and_decays_cautiously():
    torch.manual_seed(0)
    target = torch.randn(16, 32)
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.2, momentum=0.9, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = (w - target).square().mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        w.grad = None
    assert losses[-1] < 0.2 * losses[0]
    state = opt.state[w]
    assert state["momentum"].shape == (1, 16, 32) and state["second_moment"].shape == (1, 1, 32)


def test_muon_state_dict_roundtrip():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = Muon([w], lr=0.01)
    w.grad = torch.randn(8, 8)
    opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = Muon([w2], lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared buffers
    g = torch.randn(8, 8)
    w.grad, w2.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(w, w2)


def reference_muon(p, g, buf, v, lr, mu, wd):
    """nanochat-facts §3 Muon steps 1-8, written out for one matrix in float64."""
    rows, cols = p.shape
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf
    u = u * ((u.norm() / math.sqrt(rows)) / u.norm(dim=1, keepdim=True))  # MuonEq
    x = u.T if rows > cols else u
    x = x / (1.01 * x.norm() + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    u = x.T if rows > cols else x
    u = u * math.sqrt(min(rows, cols)) / u.norm()  # Muon+
    v = 0.9 * v + 0.1 * (u**2).mean(dim=1 if rows >= cols else 0, keepdim=True)  # NorMuon
    scaled = u / v.sqrt()
    u = scaled * (u.norm() / scaled.norm())
    lr_eff = lr * max(1.0, rows / cols) ** 0.5
    p = p - lr_eff * u - lr_eff * wd * p * (u * p >= 0)  # cautious weight decay
    return p, buf, v


@pytest.mark.parametrize("shape", [(16, 32), (48, 16)])
def test_muon_matches_reference_steps(shape):
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = Muon([w], lr=0.05, momentum=0.9, weight_decay=0.3)
    p, buf = w.detach().double().clone(), torch.zeros(shape, dtype=torch.float64)
    v = torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]), dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        w.grad = g
        opt.step()
        p, buf, v = reference_muon(p, g.double(), buf, v, 0.05, 0.9, 0.3)
        torch.testing.assert_close(w.detach().double(), p, atol=1e-5, rtol=1e-4)


def test_adamw_groups_match_nanochat_table():
    p = plan(12, "gpt2")
    with torch.device("meta"):
        from nanoray.model import GPT
        model = GPT(p.model)
    adamw, _ = build_optimizers(model, p)
    groups = [(g["params"], g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in adamw.param_groups]
    expected = [
        ([model.lm_head.weight], p.unembedding_lr, (0.8, 0.96), 0.01),
        ([model.wte.weight], p.embedding_lr, (0.8, 0.995), 0.001),
        (list(model.value_embeds.parameters()), p.embedding_lr * 0.5, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], p.scalar_lr * 0.01, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], p.scalar_lr, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    assert len(groups) == len(expected)
    for (params, lr, betas, eps, wd), (want_params, want_lr, want_betas, want_wd) in zip(groups, expected):
        assert [id(x) for x in params] == [id(x) for x in want_params]
        assert (lr, betas, eps, wd) == (pytest.approx(want_lr), want_betas, 1e-10, want_wd)
