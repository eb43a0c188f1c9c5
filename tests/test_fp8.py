"""fp8 training (nanoray/fp8.py) where it can run without a GPU: torchao's float8 layers on CPU (torch's CPU
_scaled_mm), the bf16 evaluation swap, checkpoints that load without fp8, and the refusals that name --fp8.
The GPU path (torch.compile, the fused kernels, speed) is tests/test_gpu.py's and benchmarks/'."""

import pytest
import torch

from nanoray.data import DataSpec, SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.fp8 import Fp8Error, bf16_linears, check_fp8, converts, enable_fp8, is_fp8
from nanoray.model import Linear, build_model
from nanoray.optim import apply_schedule, build_optimizers
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, train

float8 = pytest.importorskip("torchao.float8.float8_linear")
ROWS = 8  # rows per batch: at 4, d6 sits at the edge of a loss spike that fp8 rounding can tip it over


def losses(depth: int, fp8: bool, steps: int = 12) -> list[float]:
    """Training losses of a tiny model on fixed markov batches."""
    run = plan(depth, "tiny", Horizon(iterations=steps))
    model = build_model(run.model, "cpu", seed=1)
    if fp8:
        enable_fp8(model)
    optimizers = build_optimizers(model, run, compile=False)
    data = SyntheticTokens(run.model.vocab_size, run.model.seq_len, "markov", seed=3)
    out = []
    for step in range(steps):
        x, y = data.batch(step, ROWS)
        loss = model(x, y)
        loss.backward()
        apply_schedule(optimizers, step, run)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("depth", [4, 6])
def test_fp8_training_follows_the_high_precision_loss(depth):
    """Same init, same batches: the fp8 losses stay within 0.2% of the fp32 ones at every step, at two depths
    (measured: 2e-4 at most)."""
    exact, fp8 = losses(depth, False), losses(depth, True)
    assert exact[-1] < 0.6 * exact[0]  # it learns
    for step, (a, b) in enumerate(zip(exact, fp8)):
        assert b == pytest.approx(a, rel=2e-3), step
    assert fp8 != exact  # and the matmuls did run in fp8


def test_only_the_block_matrices_convert_and_names_stay():
    run = plan(4, "tiny")
    model = build_model(run.model, "cpu")
    names, params = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    enable_fp8(model)
    assert is_fp8(model) and list(model.state_dict()) == names  # a checkpoint has the same keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters: optimizers see them
    fp8 = {n for n, m in model.named_modules() if isinstance(m, float8.Float8Linear)}
    assert fp8 == {f"blocks.{i}.{m}" for i in range(4) for m in
                   ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert type(model.lm_head) is Linear and type(model.smear_gate) is Linear
    assert not converts(build_model(plan(2, "tiny").model, "cpu").blocks[0].attn.c_q, "blocks.0.attn.c_q")  # 64 wide


def test_evaluation_swaps_in_bf16_linears_and_back():
    run = plan(4, "tiny")
    model = enable_fp8(build_model(run.model, "cpu", seed=2))
    plain = build_model(run.model, "cpu", seed=2)
    x, y = SyntheticTokens(run.model.vocab_size, run.model.seq_len, "markov").batch(0, 2)
    with torch.no_grad():
        fp8_loss = model(x, y).item()
        with bf16_linears(model):
            assert type(model.blocks[0].attn.c_q) is Linear
            assert model(x, y).item() == plain(x, y).item()  # exactly the model without fp8
        assert isinstance(model.blocks[0].attn.c_q, float8.Float8Linear)
        assert model(x, y).item() == fp8_loss
        with bf16_linears(plain):  # a no-op without fp8
            assert type(plain.blocks[0].attn.c_q) is Linear


def test_an_fp8_checkpoint_loads_into_a_model_without_fp8():
    run = plan(4, "tiny")
    model = enable_fp8(build_model(run.model, "cpu", seed=5))
    plain = build_model(run.model, "cpu", seed=6)
    plain.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_fp8_where_it_cannot_run_stops_before_training_naming_the_flag(tmp_path):
    with pytest.raises(Fp8Error, match=r"^--fp8: .*compute capability >= 8.9.*this worker trains on cpu"):
        check_fp8(torch.device("cpu"))
    session = LocalSession("cpu", out_dir=str(tmp_path))
    run = plan(2, "tiny", Horizon(iterations=3), fp8=True)
    with pytest.raises(Fp8Error, match="^--fp8: "):
        train(TrainConfig(plan=run, data=DataSpec(kind="random"), eval_tokens=2**12), session)
    assert session.history == [] and not list(tmp_path.iterdir())  # nothing trained, nothing written
