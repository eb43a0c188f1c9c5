import json
import math
import subprocess
import sys

import pytest

import torch

from nanoray.dial import CostModel, Horizon, PlanError, RunPlan, get_preset, plan, training_memory_gib
from nanoray.hardware import cluster_gpu_memory_gib

# nanochat-facts §1.8 (SSSL windows, r = 12): depth -> (D, H, total M, scaling M, FLOPs/tok, log2 B, iters, λ)
NANOCHAT_TABLE = {
    8: (512, 4, 125.8, 41.9, 2.96e8, 18, 1920, 0.520),
    12: (768, 6, 286.3, 110.1, 7.60e8, 19, 2520, 0.280),
    20: (1280, 10, 896.5, 435.2, 2.89e9, 20, 4980, 0.100),
    24: (1536, 12, 1384, 729.8, 4.78e9, 20, 8352, 0.060),
}
NANOCHAT = get_preset("gpt2").model_copy(update={"window_pattern": "SSSL"})


@pytest.mark.parametrize("depth", sorted(NANOCHAT_TABLE))
def test_reproduces_nanochat_table(depth):
    D, H, total, scaling, flops, log2b, iters, wd = NANOCHAT_TABLE[depth]
    p = plan(depth, NANOCHAT)
    assert (p.model.n_embd, p.model.n_head, p.model.head_dim) == (D, H, 128)
    assert p.total_params / 1e6 == pytest.approx(total, rel=2e-3)
    assert p.scaling_params / 1e6 == pytest.approx(scaling, rel=2e-3)
    assert p.flops_per_token == pytest.approx(flops, rel=5e-3)
    assert p.total_batch_tokens == 2**log2b
    assert p.iterations == iters
    assert p.weight_decay == pytest.approx(wd, abs=6e-4)
    assert p.tokens == iters * 2**log2b


def test_d12_and_d20_exact_values():
    d12 = plan(12, NANOCHAT)
    assert d12.scaling_params == 12 * 12 * 768**2 + 12 * 6 * 6 + 32768 * 768 == 110_100_912
    windows = 3 * 2048 + 9 * 512  # SSSL over 12 layers: layers 3, 7, 11 are L
    assert d12.flops_per_token == 6 * (110_100_912 + 24) + 12 * 768 * windows
    assert (d12.matrix_lr, d12.embedding_lr, d12.unembedding_lr, d12.scalar_lr) == (0.02, 0.3, 0.008, 0.5)
    assert (d12.warmup_steps, d12.warmdown_steps) == (40, round(0.65 * 2520))
    assert (d12.device_batch_size, d12.grad_accum) == (64, 4)
    d20 = plan(20, NANOCHAT)
    s_b, s_d = math.sqrt(2), (1280 / 768) ** -0.5
    assert d20.matrix_lr == pytest.approx(0.02 * s_b)
    assert d20.embedding_lr == pytest.approx(0.3 * s_b * s_d)
    assert d20.unembedding_lr == pytest.approx(0.008 * s_b * s_d)
    assert d20.weight_decay == pytest.approx(0.28 * s_b * d12.scaling_params / d20.scaling_params)
    assert (d20.device_batch_size, d20.grad_accum) == (32, 2**20 // (32 * 2048))


def test_default_preset_uses_full_windows():
    p = plan(12)
    assert p.model.window_pattern == "L" and set(p.model.windows) == {2048}
    assert p.flops_per_token == 6 * (p.scaling_params + 24) + 12 * 768 * 12 * 2048


def test_odd_depth_width_rounds_up_to_head_dim():
    assert plan(25).model.n_embd == 1664  # 64 * 25 = 1600 -> 1664


def test_horizon_precedence_and_modes():
    ratio = plan(12, horizon=Horizon(ratio=20))
    assert ratio.horizon_mode == "ratio" and ratio.iterations == int(20 * ratio.scaling_params) // ratio.total_batch_tokens
    flops = plan(12, horizon=Horizon(ratio=20, flops=1e18))
    assert flops.horizon_mode == "flops"
    assert flops.iterations == round(1e18 / (flops.flops_per_token * flops.total_batch_tokens))
    iters = plan(12, horizon=Horizon(ratio=20, flops=1e18, iterations=7))
    assert iters.horizon_mode == "iterations" and iters.iterations == 7 and iters.tokens == 7 * 2**19


def test_flops_and_iterations_modes_keep_nanochats_batch_and_weight_decay():
    for depth, flops in [(10, 1e19), (20, 1e18), (12, 2.15e18)]:
        ratio = plan(depth, NANOCHAT)
        budget = plan(depth, NANOCHAT, Horizon(flops=flops))
        assert (budget.total_batch_tokens, budget.weight_decay) == (ratio.total_batch_tokens, ratio.weight_decay)
        assert budget.iterations == round(flops / (budget.flops_per_token * budget.total_batch_tokens))
    assert plan(20, NANOCHAT, Horizon(flops=1e18)).total_batch_tokens == 2**20
    assert plan(10, NANOCHAT, Horizon(flops=1e19)).weight_decay == pytest.approx(0.44, abs=5e-3)
    fixed = plan(20, NANOCHAT, Horizon(iterations=10))
    assert (fixed.total_batch_tokens, fixed.weight_decay) == (2**20, plan(20, NANOCHAT).weight_decay)


def test_grad_accum_over_workers():
    assert [plan(12, num_workers=w).grad_accum for w in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert plan(12, num_workers=8).device_batch_size == 32  # 8 x 64 rows would overshoot 2^19 tokens
    p = plan(8, num_workers=8)
    assert p.device_batch_size * 2048 * 8 * p.grad_accum == p.total_batch_tokens == 2**18


def test_device_batch_fits_gpu_memory():
    assert [plan(d).device_batch_size for d in (12, 14, 20, 26, 32)] == [64, 64, 32, 16, 4]
    # the estimate reproduces the peaks measured on an H100 (benchmarks/RESULTS.md)
    gpt2 = get_preset("gpt2")
    for depth, rows, measured in [(12, 64, 45.8), (20, 16, 38.0)]:  # with the fused kernels
        p = plan(depth)
        assert training_memory_gib(rows, depth, p.model.n_embd, p.total_params, gpt2) == pytest.approx(measured, rel=0.03)
    assert plan(4, "tiny").device_batch_size == 16  # no memory rule on the CPU preset


def test_device_batch_is_sized_to_the_gpu_it_trains_on():
    h100, h200 = plan(12), plan(12, gpu_memory_gib=139.8)
    assert (h100.gpu_memory_gib, h100.device_batch_size, h100.grad_accum) == (80, 64, 4)  # the preset's assumption
    assert (h200.gpu_memory_gib, h200.device_batch_size, h200.grad_accum) == (139.8, 128, 2)
    assert h200.memory_gib <= 0.85 * 139.8 < plan(12, device_batch_size=256).memory_gib
    assert plan(20, gpu_memory_gib=139.8).device_batch_size == 64  # ~114 GiB estimated
    assert plan(20, gpu_memory_gib=120).device_batch_size == 32  # 114 GiB is over its 85% headroom
    assert plan(12, gpu_memory_gib=24).device_batch_size == 16
    assert "46.9 GiB / 80 GiB" in h100.table() and "GiB / 140 GiB" in h200.table()


def test_cluster_gpu_memory_comes_from_the_accelerator_type(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without a GPU of its own
    resources = {"CPU": 64, "GPU": 8, "accelerator_type:H200": 1, "accelerator_type:H100": 1}
    assert cluster_gpu_memory_gib(resources) == (79.1, "H100")  # the smallest of the cluster's GPUs
    assert cluster_gpu_memory_gib({"CPU": 2})[0] is None
    assert cluster_gpu_memory_gib({"accelerator_type:TPU-V4": 1})[0] is None


def test_window_pattern_and_fp8_are_plan_settings():
    p = plan(12, window_pattern="SSSL", fp8=True)
    assert p.model.window_pattern == "SSSL" and p.fp8
    assert p.flops_per_token == plan(12, NANOCHAT).flops_per_token < plan(12).flops_per_token
    assert "fp8" in p.table() and "SSSL" in p.table() and "fp8" not in plan(12).table()
    assert RunPlan.model_validate(p.model_dump()).fp8  # a checkpoint's plan dict keeps it


def test_cost_estimate():
    p = plan(12, cost=CostModel(gpu="H100", mfu=0.5, usd_per_gpu_hour=2.0))
    assert p.gpu_hours == pytest.approx(p.total_flops / (0.5 * 989e12) / 3600)
    assert p.cost_usd == pytest.approx(2.0 * p.gpu_hours)


@pytest.mark.parametrize("kwargs, field", [
    (dict(depth=0), "depth"),
    (dict(depth=-3), "depth"),
    (dict(depth=12, horizon=Horizon(ratio=0)), "horizon.ratio"),
    (dict(depth=12, horizon=Horizon(ratio=-1)), "horizon.ratio"),
    (dict(depth=12, horizon=Horizon(flops=-5)), "horizon.flops"),
    (dict(depth=12, horizon=Horizon(flops=1e3)), "horizon.flops"),
    (dict(depth=12, horizon=Horizon(iterations=0)), "horizon.iterations"),
    (dict(depth=12, preset="gpt3"), "preset"),
    (dict(depth=12, device_batch_size=24), "total_batch_tokens"),
    (dict(depth=12, num_workers=3), "total_batch_tokens"),
    (dict(depth=12, num_workers=0), "num_workers"),
    (dict(depth=12, cost=CostModel(mfu=1.5)), "cost.mfu"),
    (dict(depth=12, gpu_memory_gib=0), "gpu_memory_gib"),
    (dict(depth=12, window_pattern="SXL"), "window_pattern"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(PlanError, match=f"^{field}:"):
        plan(**kwargs)


def test_cli_json_and_errors():
    out = subprocess.run([sys.executable, "-m", "nanoray.dial", "--depth", "12", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    for key in ("depth model scaling_params flops_per_token total_batch_tokens "
                "tokens iterations grad_accum matrix_lr embedding_lr unembedding_lr weight_decay gpu_hours cost_usd").split():
        assert key in data
    for key in "n_layer n_embd n_head vocab_size seq_len".split():
        assert key in data["model"]
    assert data["model"]["n_embd"] == 768
    table = subprocess.run([sys.executable, "-m", "nanoray.dial", "--depth", "4", "--preset", "tiny"],
                           capture_output=True, text=True, check=True).stdout
    assert "GPU-hours" in table and "d4 / tiny" in table
    bad = subprocess.run([sys.executable, "-m", "nanoray.dial", "--depth", "12", "--preset", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "preset: unknown preset 'nope'" in bad.stderr
