"""fp8 training (nanoray/fp8.py) where it can run without a GPU: torchao's float8 layers on CPU (torch's CPU
_scaled_mm), the bf16 evaluation swap, checkpoints that load without fp8, and the refusals that name --fp8.
The GPU path (torch.compile, the fused kernels, speed) is tests/test_gpu.py's and benchmarks/'."""

import functools

import pytest
import torch

from nanoray.data import DataSpec, SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.fp8 import Float8Linear, Fp8Error, bf16_linears, check_fp8, converts, enable_fp8, is_fp8
from nanoray.kernels import linear_softcap_cross_entropy, relu_square
from nanoray.model import Linear, build_model
from nanoray.optim import apply_schedule, build_optimizers
from nanoray.session import LocalSession
from nanoray.train import TrainConfig, train

float8 = pytest.importorskip("torchao.float8.float8_linear")
ROWS = 8  # rows per batch: at 4, d6 sits at the edge of a loss spike that fp8 rounding can tip it over


@pytest.fixture(scope="module")
def cpu_fp8_matmul():
    """Skips where torch's CPU fp8 matmul is oneDNN's reference loop (CPUs without its fp8 kernels: ~2 s for one
    512x256x768 product, so a 12-step d4 run takes half an hour); CI's and most hosts' take milliseconds."""
    import time
    a = torch.randn(256, 256).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.float32)  # first call: oneDNN builds its primitive
    seconds = []
    for _ in range(3):  # the fastest of three: a busy 2-core CI machine can stall any one call past the limit
        start = time.perf_counter()
        torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.float32)
        seconds.append(time.perf_counter() - start)
    if min(seconds) > 0.05:
        pytest.skip("this CPU's fp8 matmul is oneDNN's reference implementation: too slow to train on")


@functools.cache
def losses(depth: int, fp8: bool, steps: int = 12, mlp: str = "modules") -> list[float]:
    """Training losses of a tiny model on fixed markov batches (deterministic: cached for the tests that compare)."""
    run = plan(depth, "tiny", Horizon(iterations=steps))
    model = build_model(run.model, "cpu", seed=1)
    if fp8:
        enable_fp8(model, mlp=mlp)
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
def test_fp8_training_follows_the_high_precision_loss(depth, cpu_fp8_matmul):
    """Same init, same batches: the fp8 losses stay within 0.2% of the fp32 ones at every step, at two depths
    (measured: 4e-4 at most, q/k/v fused; with CPU _scaled_mm emulated as a dequantized matmul)."""
    exact, fp8 = losses(depth, False), losses(depth, True)
    assert exact[-1] < 0.6 * exact[0]  # it learns
    for step, (a, b) in enumerate(zip(exact, fp8)):
        assert b == pytest.approx(a, rel=2e-3), step
    assert fp8 != exact  # and the matmuls did run in fp8


@pytest.mark.parametrize("depth", [4, 6])
def test_the_fused_fp8_mlp_follows_the_two_modules(depth, cpu_fp8_matmul):
    """Each MLP as one fp8 autograd function (its backward's middle one pass, kernels.relu2_fp8_backward: the
    PyTorch path here) trains exactly as two fp8 Linears with a ReLU² between do, at two depths: the same casts at
    the same scales; with fp32 activations (the CPU's) the same rounding too. (With bf16 activations grad_h is
    rounded to bf16 before its e5m2 cast in the eager two-module path, not in the fused one.)"""
    modules, fused = losses(depth, True), losses(depth, True, mlp="fused")
    assert fused == modules and modules != losses(depth, False)


def test_fp8_relu2_backward_pass_is_the_casts_it_replaces():
    """kernels.relu2_fp8_backward (PyTorch path): grad_h's and relu(h)²'s fp8 casts as torchao makes them, at the
    given scales, in the layouts the GEMMs read."""
    from torchao.float8.float8_utils import amax_to_scale
    from nanoray.kernels import relu2_fp8_backward
    gen = torch.Generator().manual_seed(0)
    h, grad_r = torch.randn(96, 160, generator=gen).bfloat16(), torch.randn(96, 160, generator=gen).bfloat16()
    a = torch.relu(h.float())
    grad_h, r = grad_r.float() * 2 * a, a * a
    s_g, s_r = amax_to_scale(grad_h.abs().max(), torch.float8_e5m2), amax_to_scale(r.max(), torch.float8_e4m3fn)
    gh, gh_t, r_t = relu2_fp8_backward(grad_r, h, s_g, s_r)
    assert gh.dtype == gh_t.dtype == torch.float8_e5m2 and r_t.dtype == torch.float8_e4m3fn
    assert torch.equal(gh.float(), (grad_h * s_g).to(torch.float8_e5m2).float())
    assert torch.equal(gh_t.float(), gh.float().t()) and gh_t.is_contiguous()
    assert torch.equal(r_t.float(), (r * s_r).to(torch.float8_e4m3fn).float().t()) and r_t.is_contiguous()
    assert gh.float().abs().max() == torch.finfo(torch.float8_e5m2).max  # the amax element lands on the top


def test_only_the_block_matrices_convert_and_names_stay():
    run = plan(4, "tiny")
    model = build_model(run.model, "cpu")
    names, params = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    enable_fp8(model)
    assert is_fp8(model) and list(model.state_dict()) == names  # a checkpoint has the same keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters: optimizers see them
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert fp8 == {f"blocks.{i}.{m}" for i in range(4) for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(block.attn.qkv_linear is not None for block in model.blocks)  # q, k, v: one fused fp8 GEMM
    assert all(block.mlp.activation is not relu_square for block in model.blocks)  # a ReLU² fused into the cast
    assert type(model.lm_head) is Linear and type(model.smear_gate) is Linear
    assert model.lm_head_cast is not None  # the fused cross-entropy's GEMMs in fp8
    small = enable_fp8(build_model(plan(2, "tiny").model, "cpu"))  # 64 wide: nothing fits nanochat's rule
    assert not converts(small.blocks[0].mlp.c_fc, "blocks.0.mlp.c_fc") and small.blocks[0].attn.qkv_linear is None
    assert small.lm_head_cast is None and small.blocks[0].mlp.activation is relu_square


def _fp8_mlp_half(function, compile_backend=None):
    """ReLU² then an fp8 GEMM through `function` (an autograd function with torchao's arguments): output and
    gradients of a fixed weighted sum."""
    from nanoray import fp8
    import torchao.float8
    config = fp8._config(torchao.float8)
    mm_config = fp8._mm_config(config)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 64, 512, generator=gen).bfloat16().requires_grad_()
    w = (0.02 * torch.randn(384, 512, generator=gen)).requires_grad_()

    def forward(h, w):
        return function.apply(torch.relu(h).square(), w.t(), mm_config, config)
    if compile_backend is not None:
        forward = torch.compile(forward, backend=compile_backend)
    y = forward(h, w)
    (y.float() * torch.linspace(-1, 1, 384)).sum().backward()
    return y, h.grad, w.grad


def test_fp8_matmul_keeps_the_input_scale_and_torchaos_numbers(cpu_fp8_matmul):
    """nanoray's fp8 autograd function gives torchao's outputs and gradients bit for bit, and its backward takes
    no amax of the input (torchao's takes it again): amaxes by the size of what they scan, input 4 x 64 x 512,
    weight 384 x 512, gradient 4 x 64 x 384."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from nanoray.fp8 import _Float8Matmul
    graphs = {}

    def backend(name):
        def keep_backward(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward),
                            bw_compiler=keep_backward)

    torchao_out = _fp8_mlp_half(float8.matmul_with_hp_or_float8_args, backend("torchao"))
    ours = _fp8_mlp_half(_Float8Matmul, backend("nanoray"))
    assert all(torch.equal(a, b) for a, b in zip(torchao_out, ours))
    assert all(torch.equal(a, b) for a, b in zip(_fp8_mlp_half(_Float8Matmul), ours))  # eager too
    scanned = {name: {node.args[0].meta["val"].numel() for node in gm.graph.nodes
                      if node.target is torch.ops.aten.max.default} for name, gm in graphs.items()}
    assert scanned == {"torchao": {4 * 64 * 512, 384 * 512, 4 * 64 * 384}, "nanoray": {384 * 512, 4 * 64 * 384}}


def test_evaluation_swaps_in_bf16_linears_and_back(cpu_fp8_matmul):
    run = plan(4, "tiny")
    model = enable_fp8(build_model(run.model, "cpu", seed=2))
    plain = build_model(run.model, "cpu", seed=2)
    x, y = SyntheticTokens(run.model.vocab_size, run.model.seq_len, "markov").batch(0, 2)
    with torch.no_grad():
        fp8_loss = model(x, y).item()
        with bf16_linears(model):
            assert type(model.blocks[0].mlp.c_fc) is Linear and model.blocks[0].attn.qkv_linear is None
            assert model.lm_head_cast is None and model.blocks[0].mlp.activation is relu_square
            assert model(x, y).item() == plain(x, y).item()  # exactly the model without fp8
        assert isinstance(model.blocks[0].mlp.c_fc, Float8Linear) and model.blocks[0].attn.qkv_linear
        assert model(x, y).item() == fp8_loss
        with bf16_linears(plain):  # a no-op without fp8
            assert type(plain.blocks[0].mlp.c_fc) is Linear


def test_fp8_lm_head_gemms_follow_the_exact_loss_and_gradients():
    """The fused softcap cross-entropy with its three GEMMs' operands in fp8 (enable_fp8's lm_head_cast): the loss
    and both gradients stay within fp8's rounding of the exact ones (measured: loss 3e-5 relative, gradients'
    cosine 0.9996), and they are not the exact ones."""
    model = enable_fp8(build_model(plan(4, "tiny").model, "cpu"))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 256, generator=gen), 0.05 * torch.randn(512, 256, generator=gen)
    targets = torch.randint(0, 500, (64,), generator=gen)
    targets[3] = -1  # ignored
    out = {}
    for name, cast in (("exact", None), ("fp8", model.lm_head_cast)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_softcap_cross_entropy(xg, wg, targets, 500, 15.0, cast)
        loss.backward()
        out[name] = loss.item(), xg.grad, wg.grad
    (exact, dx, dw), (fp8, dx8, dw8) = out["exact"], out["fp8"]
    assert fp8 == pytest.approx(exact, rel=1e-3) and fp8 != exact
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(dx.flatten(), dx8.flatten(), dim=0) > 0.999 and cosine(dw.flatten(), dw8.flatten(), dim=0) > 0.999
    assert dw8.dtype == w.dtype and not torch.equal(dx, dx8)


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
