import copy

import pytest
import torch

from nanoray.dial import Horizon, plan
from nanoray.model import build_model, ModelConfig
from nanoray.optim import (Muon, apply_schedule, build_optimizers, lr_multiplier, muon_momentum,
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
    assert muon_momentum(350, p) == pytest.approx(0.97) and muon_momentum(1000, p) == pytest.approx(0.90)
    # momentum warmup is 400 steps, cut short where the warmdown starts first (here at 350)
    assert muon_momentum(0, p) == 0.85 and muon_momentum(175, p) == pytest.approx(0.91)
    long = plan(12, horizon=Horizon(iterations=2000))
    assert muon_momentum(200, long) == pytest.approx(0.91) and muon_momentum(400, long) == 0.97
    assert muon_weight_decay(0, p) == pytest.approx(p.weight_decay)
    assert muon_weight_decay(500, p) == pytest.approx(p.weight_decay / 2)
    assert muon_weight_decay(1000, p) == pytest.approx(0, abs=1e-12)


def test_param_groups_cover_the_model_and_follow_the_schedule():
    p = plan(3, "tiny", Horizon(iterations=100))
    model = build_model(ModelConfig(**p.model_kwargs()))
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
