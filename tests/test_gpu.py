"""GPU tier: runs on the GPU machine (python -m pytest tests/test_gpu.py), skips itself without CUDA."""

import pytest
import torch

from nanoray.data import DataSpec, SyntheticTokens
from nanoray.dial import Horizon, plan
from nanoray.hardware import compute_dtype, prefer_cudnn_attention
from nanoray.model import ModelConfig, build_model
from nanoray.train import LocalSession, TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_bf16_forward_matches_eager_fp32():
    device = torch.device("cuda", 0)
    prefer_cudnn_attention()
    run = plan(4, "tiny")
    model = build_model(ModelConfig(**run.model_kwargs()), device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, y = SyntheticTokens(run.vocab_size, run.seq_len, kind="markov").batch(0, 8, device)
    assert compute_dtype(device) == torch.bfloat16
    compiled = torch.compile(model, dynamic=False)(x, y)
    reference = build_model(ModelConfig(**run.model_kwargs()), device="cpu")
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    expected = reference(x.cpu(), y.cpu())  # fp32 on CPU
    assert compiled.dtype == torch.float32
    assert compiled.item() == pytest.approx(expected.item(), rel=2e-2)


def test_training_on_gpu_learns():
    session = LocalSession("cuda")
    run = plan(2, "tiny", Horizon(iterations=30))
    last = train(TrainConfig(plan=run, data=DataSpec(kind="markov"), log_every=10, eval_every=0,
                             eval_tokens=2**14, checkpoint_at_end=False), session)
    assert session.history[0]["train_loss"] > 7 and last["val_loss"] < 3.5
    assert last["mfu"] > 0 and last["peak_mem_gb"] > 0
