"""Muon for the matrices, AdamW for everything else, and the schedules (nanochat-facts §1.7, §3).

AdamW is PyTorch's own (fused on GPU): nanochat's AdamW is standard decoupled AdamW, so a library
implementation matches. Muon is ours: `torch.optim.Muon` runs Newton-Schulz with one fixed (a, b, c)
triple and plain decay, while nanochat's Muon adds per-iteration Polar Express coefficients,
MuonEq row equilibration, Muon+ renormalization, NorMuon variance reduction and cautious weight
decay — those are what make it match nanochat's curves, so we write them.

Under DDP every rank receives the same averaged gradient and computes the same update, so parameters
and optimizer state stay identical across ranks (rank 0's checkpoint is everyone's).
"""

import math

import torch
from torch import Tensor

from nanoray.dial import RunPlan

# Polar Express coefficients for 5 iterations (arXiv 2505.16932; safety 2e-2, cushion 2).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90
MOMENTUM_WARMUP_STEPS = 400
NORMUON_BETA2 = 0.9
EPS = 1e-7


def polar_express(X: Tensor) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in a (K, m, n) stack."""
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_update(P: Tensor, G: Tensor, M: Tensor, V: Tensor, lr: Tensor, momentum: Tensor, wd: Tensor) -> None:
    """One Muon step on a (K, m, n) stack of same-shape matrices, in place on P, M (momentum), V (NorMuon)."""
    rows, cols = P.shape[-2:]
    M.lerp_(G, 1 - momentum)
    U = G.lerp(M, momentum)  # Nesterov
    if U.is_cuda:
        U = U.bfloat16()
    row_norm = U.norm(dim=-1, keepdim=True)  # MuonEq: every row gets the RMS row norm
    U = U * (U.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows) / (row_norm + EPS))
    U = polar_express(U).float()
    U = U * (math.sqrt(min(rows, cols)) / (U.norm(dim=(-2, -1), keepdim=True) + EPS))  # Muon+
    # NorMuon: factored second moment per row (rows >= cols) or per column, then keep the total norm.
    V.lerp_(U.square().mean(dim=-1 if rows >= cols else -2, keepdim=True), 1 - NORMUON_BETA2)
    scaled = U * V.add(1e-10).rsqrt()
    U = scaled * (U.norm(dim=(-2, -1), keepdim=True) / (scaled.norm(dim=(-2, -1), keepdim=True) + EPS))
    lr_eff = lr * max(1.0, rows / cols) ** 0.5
    cautious = (U * P >= 0).to(P.dtype)  # decay only where the update agrees in sign with the weight
    P.sub_(lr_eff * U + (lr_eff * wd) * cautious * P)


class Muon(torch.optim.Optimizer):
    """Muon over groups of same-shape matrices, stacked so Polar Express runs as batched matmuls.

    Group keys: lr, momentum, weight_decay. The group's buffers live in the state of its first param.
    """

    def __init__(self, params: list[Tensor], lr: float, momentum: float = MOMENTUM_START,
                 weight_decay: float = 0.0, compile: bool = False):
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        groups = [dict(params=ps) for _, ps in sorted(by_shape.items())]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self._update = torch.compile(muon_update, fullgraph=True, dynamic=False) if compile else muon_update

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = group["params"]
            state = self.state[params[0]]
            P = torch.stack(params)
            if not state:
                rows, cols = P.shape[-2:]
                state["momentum"] = torch.zeros_like(P)
                state["second_moment"] = P.new_zeros(len(params), rows, 1) if rows >= cols \
                    else P.new_zeros(len(params), 1, cols)
            G = torch.stack([p.grad for p in params])
            # Hyperparameters as 0-D tensors: the compiled update does not recompile as they change.
            lr, momentum, wd = (torch.tensor(group[k], device=P.device) for k in ("lr", "momentum", "weight_decay"))
            self._update(P, G, state["momentum"], state["second_moment"], lr, momentum, wd)
            torch._foreach_copy_(params, list(P.unbind(0)))


def build_optimizers(model, plan: RunPlan, compile: bool = False) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] with nanochat's parameter groups; every group remembers its `initial_lr`."""
    adam_groups = [  # (params, lr, betas, weight decay)
        ([model.lm_head.weight], plan.unembedding_lr, (0.8, 0.96), 0.01),
        ([model.wte.weight], plan.embedding_lr, (0.8, 0.995), 0.001),
        (list(model.value_embeds.parameters()), plan.embedding_lr * 0.5, (0.8, 0.995), 0.01),
        ([model.resid_lambdas], plan.scalar_lr * 0.01, (0.8, 0.95), 0.05),
        ([model.x0_lambdas], plan.scalar_lr, (0.96, 0.95), 0.0),
        ([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
    ]
    matrices = list(model.blocks.parameters())
    covered = {id(p) for ps, *_ in adam_groups for p in ps} | {id(p) for p in matrices}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not missing, f"parameters without an optimizer: {missing}"
    on_cuda = model.wte.weight.is_cuda
    adamw = torch.optim.AdamW(
        [dict(params=ps, lr=lr, betas=betas, weight_decay=wd) for ps, lr, betas, wd in adam_groups if ps],
        eps=1e-10, fused=on_cuda)
    muon = Muon(matrices, lr=plan.matrix_lr, weight_decay=plan.weight_decay, compile=compile and on_cuda)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, plan: RunPlan) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac at the last step."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if step <= plan.iterations - plan.warmdown_steps or plan.warmdown_steps == 0:
        return 1.0
    progress = (plan.iterations - step) / plan.warmdown_steps
    return progress + (1 - progress) * plan.final_lr_frac


def muon_momentum(step: int, plan: RunPlan) -> float:
    """0.85 -> 0.97 over the first 400 steps; 0.97 -> 0.90 over the warmdown; 0.97 in between."""
    if step < MOMENTUM_WARMUP_STEPS:
        return MOMENTUM_START + (MOMENTUM_PEAK - MOMENTUM_START) * step / MOMENTUM_WARMUP_STEPS
    warmdown_start = plan.iterations - plan.warmdown_steps
    if step >= warmdown_start and plan.warmdown_steps > 0:
        frac = (step - warmdown_start) / plan.warmdown_steps
        return MOMENTUM_PEAK + (MOMENTUM_END - MOMENTUM_PEAK) * frac
    return MOMENTUM_PEAK


def muon_weight_decay(step: int, plan: RunPlan) -> float:
    """Cosine from the plan's weight decay to zero over the run."""
    return plan.weight_decay * 0.5 * (1 + math.cos(math.pi * step / plan.iterations))


def apply_schedule(optimizers: list[torch.optim.Optimizer], step: int, plan: RunPlan) -> float:
    """Set every group's hyperparameters for `step`; returns the LR multiplier."""
    mult = lr_multiplier(step, plan)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step, plan)
                group["weight_decay"] = muon_weight_decay(step, plan)
    return mult
