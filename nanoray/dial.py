"""The depth dial: one integer in, a whole compute-optimal training run out.

`plan(depth, preset, horizon)` derives width, heads, parameter counts, FLOPs per token, total batch,
grad accumulation, learning rates, weight decay, schedule lengths, the training horizon and an
estimate of GPU-hours and cost. Every other stage reads the RunPlan; nothing re-derives these.
The formulas are nanochat's (reference/nanochat-facts.md §1): with nanochat's SSSL windows the gpt2
preset reproduces its depth table exactly (our gpt2 default is full windows, L, so its FLOPs per token
are higher: 8.87e8 vs 7.60e8 at d12).

    python -m nanoray.dial --depth 12                     # the table
    python -m nanoray.dial --depth 20 --preset gpt2 --json
    python -m nanoray.dial --depth 4 --preset tiny --ratio 4
"""

import argparse
import json
import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nanoray.hardware import peak_flops
from nanoray.model import ModelConfig, padded_vocab, value_embedding_layers

DEFAULT_RATIO = 12.0  # tokens : scaling params of a compute-optimal run (nanochat, Mar 2026)
BATCH_EXPONENT = 0.383  # B_opt ∝ D^0.383 (Power Lines)
WIDTH_REF = 768  # AdamW embedding-like LRs scale as (D / 768)^-0.5
BASE_LR = dict(embedding=0.3, unembedding=0.008, matrix=0.02, scalar=0.5)
BASE_WEIGHT_DECAY = 0.28  # Muon λ at the reference depth
WARMDOWN_RATIO = 0.65
FINAL_LR_FRAC = 0.05
# Training memory per GPU, fitted to peaks measured on an H100 with the fused kernels (d12 at 64 rows 45.8 GB,
# d20 at 16 rows 38.0 GB; d20 at 32 rows ran, unmeasured peak):
# 16 bytes per parameter (fp32 weights, grads, two moments) + per token 29 bytes per layer x width
# (saved activations) + 2.5 bytes per vocab entry (logits and their grad).
STATE_BYTES_PER_PARAM, ACT_BYTES_PER_LAYER_WIDTH, ACT_BYTES_PER_VOCAB = 16, 29, 2.5
MEMORY_HEADROOM = 0.85  # fraction of the GPU's memory the estimate may fill


class PlanError(ValueError):
    """Bad input to the dial; the message names the field and the allowed values."""


class Preset(BaseModel):
    """What the dial does not set: the constants of a model family."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(description="preset name")
    vocab_size: int = Field(description="tokenizer vocabulary, special tokens included")
    seq_len: int = Field(description="tokens per training row (context length)")
    aspect_ratio: int = Field(description="width = aspect_ratio x depth, rounded up to head_dim")
    head_dim: int = Field(description="channels per attention head")
    device_batch_size: int = Field(description="largest rows per worker per micro-step")
    gpu_memory_gib: float | None = Field(description="GPU memory a micro-step must fit where the GPU is not known "
                                         "(None: no memory rule)")
    window_pattern: str = Field(description="per-layer attention window, tiled: L = full context, S = quarter")
    ref_depth: int = Field(description="depth at which the total batch is ref_batch_tokens")
    ref_batch_tokens: int = Field(description="total batch (tokens) at ref_depth; LRs scale by sqrt(B / this)")
    warmup_steps: int = Field(description="linear LR warmup steps")
    split_long_docs: bool = Field(False, description="data: cut documents longer than a row into row-sized "
                                  "pieces instead of cropping them (short contexts lose most tokens to crops)")


PRESETS = {
    # nanochat's constants. Window pattern L (not nanochat's SSSL): DESIGN.md, Decisions (windows). Up to 128
    # rows a micro-step where the GPU's memory holds them (an H200 at d12); 80 GB (an H100) when unknown.
    "gpt2": Preset(name="gpt2", vocab_size=32768, seq_len=2048, aspect_ratio=64, head_dim=128,
                   device_batch_size=128, gpu_memory_gib=80, window_pattern="L", ref_depth=12, ref_batch_tokens=2**19,
                   warmup_steps=40),
    # A laptop-sized family: d2-d6 train in minutes on CPU cores.
    "tiny": Preset(name="tiny", vocab_size=4096, seq_len=256, aspect_ratio=32, head_dim=32,
                   device_batch_size=16, gpu_memory_gib=None, window_pattern="L", ref_depth=4, ref_batch_tokens=2**13,
                   warmup_steps=10, split_long_docs=True),
}


class Horizon(BaseModel):
    """How long to train. Precedence: iterations, then flops, then ratio."""

    model_config = ConfigDict(frozen=True)
    ratio: float = Field(DEFAULT_RATIO, description="tokens = ratio x scaling params")
    flops: float | None = Field(None, description="fixed training FLOPs budget (isoFLOP grids)")
    iterations: int | None = Field(None, description="explicit number of optimizer steps")

    @property
    def mode(self) -> str:
        return "iterations" if self.iterations is not None else "flops" if self.flops is not None else "ratio"


class CostModel(BaseModel):
    """Assumptions behind the GPU-hour and dollar estimate."""

    model_config = ConfigDict(frozen=True)
    gpu: str = Field("H100", description="accelerator whose bf16 peak the estimate uses")
    mfu: float = Field(0.5, description="assumed model FLOPs utilization")
    usd_per_gpu_hour: float = Field(2.5, description="price of one GPU-hour")


class RunPlan(BaseModel):
    """Everything a training run needs, derived from (depth, preset, horizon, workers)."""

    model_config = ConfigDict(frozen=True)
    depth: int
    preset: str
    model: ModelConfig = Field(description="the network's shape")
    split_long_docs: bool = Field(False, description="data: documents longer than a row are cut, not cropped")
    # accounting
    total_params: int
    scaling_params: int = Field(description="transformer matrices + lm_head: the N of tokens = r x N")
    matmul_params: int
    flops_per_token: int
    # horizon and batch
    horizon_mode: str
    target_tokens: float = Field(description="ratio x scaling params: the tokens the batch and weight-decay rules assume")
    total_batch_tokens: int
    iterations: int
    tokens: int
    total_flops: float
    tokens_per_param: float
    num_workers: int
    device_batch_size: int
    grad_accum: int
    gpu_memory_gib: float | None = Field(None, description="GPU memory the device batch was sized for")
    memory_gib: float = Field(0.0, description="estimated peak training memory per GPU at the device batch")
    fp8: bool = Field(False, description="block matrices train in fp8 (tensorwise dynamic scaling, torchao)")
    # optimization
    batch_lr_scale: float
    width_lr_scale: float
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float
    warmup_steps: int
    warmdown_steps: int
    final_lr_frac: float
    # cost
    gpu: str
    assumed_mfu: float
    gpu_hours: float
    cost_usd: float

    def table(self) -> str:
        m = self.model
        rows = [
            ("depth / preset", f"d{self.depth} / {self.preset}"),
            ("width, heads, head dim", f"{m.n_embd}, {m.n_head}, {m.head_dim}"),
            ("vocab, seq len, windows", f"{m.vocab_size}, {m.seq_len}, {m.window_pattern}"),
            ("matmul precision", "fp8 (block matrices, tensorwise) + bf16" if self.fp8 else "bf16"),
            ("params total / scaling", f"{self.total_params / 1e6:,.1f}M / {self.scaling_params / 1e6:,.1f}M"),
            ("FLOPs per token", f"{self.flops_per_token:.3e}"),
            ("horizon", f"{self.horizon_mode}: {self.tokens / 1e9:.3f}B tokens ({self.tokens_per_param:.1f} per param)"),
            ("total batch (tokens)", f"{self.total_batch_tokens:,} = 2^{math.log2(self.total_batch_tokens):g}"),
            ("iterations", f"{self.iterations:,}"),
            ("workers x device batch x accum", f"{self.num_workers} x {self.device_batch_size} x {self.grad_accum}"),
            ("GPU memory (est. / sized for)", f"{self.memory_gib:,.1f} GiB / "
             + (f"{self.gpu_memory_gib:,.0f} GiB" if self.gpu_memory_gib else "no limit")),
            ("LR matrix / emb / unemb / scalar",
             f"{self.matrix_lr:.4g} / {self.embedding_lr:.4g} / {self.unembedding_lr:.4g} / {self.scalar_lr:.4g}"),
            ("Muon weight decay", f"{self.weight_decay:.4f}"),
            ("warmup / warmdown steps", f"{self.warmup_steps} / {self.warmdown_steps}"),
            ("training FLOPs", f"{self.total_flops:.3e}"),
            (f"GPU-hours ({self.gpu} @ {self.assumed_mfu:.0%} MFU)", f"{self.gpu_hours:,.2f}"),
            ("cost", f"${self.cost_usd:,.2f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class Defaults(BaseModel):
    """What a job assumes where a flag is not given, by the kind of machine it runs on: one place for the sweep
    jobs (jobs/) and `python -m nanoray.train`. CPU defaults make a family that trains in minutes on a laptop."""

    model_config = ConfigDict(frozen=True)
    preset: str = Field(description="model family")
    depth: int = Field(description="the depth of a single training run")
    depths: list[int] = Field(description="the depths of a miniseries")
    ratio: float = Field(description="tokens per scaling parameter")
    cpu_budgets: list[float] = Field(description="isoFLOP budgets where none are given (GPU: none, ask for them)")
    eval_tokens: int = Field(description="val tokens per evaluation")
    log_every: int = Field(description="steps between reports of a single run")
    tokenizer_actors: int = Field(description="Ray Data tokenizer actors per trial")
    cpus_per_actor: float = Field(description="logical CPUs per tokenizer actor")
    core: str = Field(description="CORE task set scored for each finished trial")
    core_max_per_task: int = Field(description="CORE examples per task")


DEFAULTS = {
    True: Defaults(preset="gpt2", depth=12, depths=[6, 8, 10, 12], ratio=DEFAULT_RATIO, cpu_budgets=[],
                   eval_tokens=2**20, log_every=10, tokenizer_actors=4, cpus_per_actor=1.0, core="core",
                   core_max_per_task=500),
    False: Defaults(preset="tiny", depth=2, depths=[1, 2, 3], ratio=1.0, cpu_budgets=[5e11, 2e12],
                    eval_tokens=2**15, log_every=20, tokenizer_actors=1, cpus_per_actor=0.5, core="core-lite",
                    core_max_per_task=20),
}


def defaults(gpu: bool) -> Defaults:
    """The defaults of a machine with GPUs (`gpu`) or without."""
    return DEFAULTS[bool(gpu)]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PlanError(f"preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def param_counts(n_layer: int, n_embd: int, n_head: int, vocab_size: int) -> dict[str, int]:
    """nanochat's parameter groups (facts §1.2); n_kv_head = n_head."""
    v = padded_vocab(vocab_size)
    n_ve = len(value_embedding_layers(n_layer))
    counts = dict(
        wte=v * n_embd,
        value_embeds=n_ve * v * n_embd,
        lm_head=v * n_embd,
        transformer_matrices=12 * n_layer * n_embd**2 + 12 * n_head * n_ve,
        scalars=2 * n_layer + 26,
    )
    counts["total"] = sum(counts.values())
    return counts


def shape(depth: int, preset: Preset) -> tuple[int, int]:
    """(width, heads): aspect_ratio x depth rounded up to a multiple of the head dim."""
    width = -(-preset.aspect_ratio * depth // preset.head_dim) * preset.head_dim
    return width, width // preset.head_dim


def training_memory_gib(rows: int, depth: int, n_embd: int, total_params: int, preset: Preset) -> float:
    """Estimated peak GPU memory of training with `rows` rows per micro-step."""
    per_token = ACT_BYTES_PER_LAYER_WIDTH * depth * n_embd + ACT_BYTES_PER_VOCAB * padded_vocab(preset.vocab_size)
    return (STATE_BYTES_PER_PARAM * total_params + rows * preset.seq_len * per_token) / 2**30


def scaling_params(depth: int, preset: Preset) -> int:
    width, heads = shape(depth, preset)
    counts = param_counts(depth, width, heads, preset.vocab_size)
    return counts["transformer_matrices"] + counts["lm_head"]


def training_gpu_hours(flops, cost: CostModel):
    """GPU-hours of `flops` training FLOPs on the cost model's GPU at its assumed MFU (scalar or array)."""
    return flops / (cost.mfu * peak_flops(cost.gpu)) / 3600


def _check_inputs(depth, horizon: Horizon, num_workers: int, cost: CostModel) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise PlanError(f"depth: must be an integer >= 1, got {depth!r}")
    if not horizon.ratio > 0:
        raise PlanError(f"horizon.ratio: must be > 0, got {horizon.ratio}")
    if horizon.flops is not None and not horizon.flops > 0:
        raise PlanError(f"horizon.flops: must be > 0, got {horizon.flops}")
    if horizon.iterations is not None and horizon.iterations < 1:
        raise PlanError(f"horizon.iterations: must be >= 1, got {horizon.iterations}")
    if num_workers < 1:
        raise PlanError(f"num_workers: must be >= 1, got {num_workers}")
    if not 0 < cost.mfu <= 1:
        raise PlanError(f"cost.mfu: must be in (0, 1], got {cost.mfu}")


def default_device_batch(preset: Preset, depth: int, n_embd: int, total_params: int, num_workers: int,
                         total_batch_tokens: int, gpu_memory_gib: float | None) -> int:
    """The preset's largest device batch, halved until a micro-step fits in `gpu_memory_gib` and one micro-step
    across all workers fits in the total batch (bigger micro-steps run faster: +3% at d12, 64 vs 32 rows)."""
    rows = preset.device_batch_size
    while rows > 1 and (rows * preset.seq_len * num_workers > total_batch_tokens
                        or training_memory_gib(rows, depth, n_embd, total_params, preset)
                        > MEMORY_HEADROOM * (gpu_memory_gib or float("inf"))):
        rows //= 2
    return rows


def plan(
    depth: int,
    preset: str | Preset = "gpt2",
    horizon: Horizon | None = None,
    num_workers: int = 1,
    device_batch_size: int | None = None,
    total_batch_tokens: int | None = None,
    cost: CostModel | None = None,
    window_pattern: str | None = None,
    fp8: bool = False,
    gpu_memory_gib: float | None = None,
) -> RunPlan:
    """Derive the whole run from `depth`. `window_pattern` overrides the preset's; `gpu_memory_gib` is the memory
    of the GPUs that will train (None: the preset's assumption) and sets the device batch. Raises PlanError
    naming the offending field."""
    horizon = horizon or Horizon()
    cost = cost or CostModel()
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    _check_inputs(depth, horizon, num_workers, cost)
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise PlanError(f"gpu_memory_gib: must be > 0, got {gpu_memory_gib}")
    gpu_memory_gib = gpu_memory_gib or preset.gpu_memory_gib
    n_embd, n_head = shape(depth, preset)
    try:
        model = ModelConfig(vocab_size=preset.vocab_size, seq_len=preset.seq_len, n_layer=depth, n_embd=n_embd,
                            n_head=n_head, n_kv_head=n_head, head_dim=preset.head_dim,
                            window_pattern=window_pattern or preset.window_pattern)
    except ValidationError as e:  # ModelConfig's own message names the field ("window_pattern: ...")
        raise PlanError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
    counts = param_counts(depth, n_embd, n_head, preset.vocab_size)
    n_scaling = counts["transformer_matrices"] + counts["lm_head"]
    n_matmul = n_scaling + 24  # + the smear gate, a 24 -> 1 linear
    flops_per_token = 6 * n_matmul + 12 * n_embd * sum(model.windows)

    # The batch and weight-decay rules compare r x N with the reference depth's r x N, in every horizon
    # mode (as nanochat does): r cancels, so B and λ depend only on N / N_ref, and a FLOPs budget or a
    # step count changes only the number of iterations.
    n_ref = scaling_params(preset.ref_depth, preset)
    target, ref_target = horizon.ratio * n_scaling, horizon.ratio * n_ref
    if total_batch_tokens is None:
        exponent = math.log2(preset.ref_batch_tokens * (target / ref_target) ** BATCH_EXPONENT)
        total_batch_tokens = 2 ** round(exponent)
    elif total_batch_tokens < 1:
        raise PlanError(f"total_batch_tokens: must be >= 1, got {total_batch_tokens}")

    if horizon.mode == "iterations":
        iterations = horizon.iterations
    elif horizon.mode == "flops":
        iterations = round(horizon.flops / (flops_per_token * total_batch_tokens))
    else:
        iterations = int(target) // total_batch_tokens
    if iterations < 1:
        raise PlanError(f"horizon.{horizon.mode}: gives 0 iterations at depth {depth} "
                        f"(one step is {total_batch_tokens:,} tokens = {flops_per_token * total_batch_tokens:.3e} FLOPs)")

    if device_batch_size is None:
        device_batch_size = default_device_batch(preset, depth, n_embd, counts["total"], num_workers,
                                                 total_batch_tokens, gpu_memory_gib)
    elif device_batch_size < 1:
        raise PlanError(f"device_batch_size: must be >= 1, got {device_batch_size}")
    micro_tokens = device_batch_size * preset.seq_len * num_workers
    if total_batch_tokens % micro_tokens:
        raise PlanError(
            f"total_batch_tokens: {total_batch_tokens:,} is not divisible by device_batch_size x seq_len x "
            f"num_workers = {device_batch_size} x {preset.seq_len} x {num_workers} = {micro_tokens:,}")

    batch_scale = math.sqrt(total_batch_tokens / preset.ref_batch_tokens)
    width_scale = (n_embd / WIDTH_REF) ** -0.5
    tokens = iterations * total_batch_tokens
    total_flops = float(flops_per_token) * tokens
    gpu_hours = training_gpu_hours(total_flops, cost)
    return RunPlan(
        depth=depth, preset=preset.name, model=model, split_long_docs=preset.split_long_docs,
        total_params=counts["total"], scaling_params=n_scaling, matmul_params=n_matmul,
        flops_per_token=flops_per_token, horizon_mode=horizon.mode, target_tokens=target,
        total_batch_tokens=total_batch_tokens, iterations=iterations, tokens=tokens, total_flops=total_flops,
        tokens_per_param=tokens / n_scaling, num_workers=num_workers, device_batch_size=device_batch_size,
        grad_accum=total_batch_tokens // micro_tokens, gpu_memory_gib=gpu_memory_gib,
        memory_gib=training_memory_gib(device_batch_size, depth, n_embd, counts["total"], preset), fp8=fp8,
        batch_lr_scale=batch_scale, width_lr_scale=width_scale,
        matrix_lr=BASE_LR["matrix"] * batch_scale,
        embedding_lr=BASE_LR["embedding"] * batch_scale * width_scale,
        unembedding_lr=BASE_LR["unembedding"] * batch_scale * width_scale,
        scalar_lr=BASE_LR["scalar"] * batch_scale,
        weight_decay=BASE_WEIGHT_DECAY * batch_scale * ref_target / target,
        warmup_steps=preset.warmup_steps, warmdown_steps=round(WARMDOWN_RATIO * iterations),
        final_lr_frac=FINAL_LR_FRAC, gpu=cost.gpu, assumed_mfu=cost.mfu, gpu_hours=gpu_hours,
        cost_usd=gpu_hours * cost.usd_per_gpu_hour,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanoray.dial", description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, required=True, help="number of transformer layers")
    p.add_argument("--preset", default="gpt2", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="tokens : scaling params")
    p.add_argument("--flops", type=float, default=None, help="fixed FLOPs budget (overrides --ratio)")
    p.add_argument("--iterations", type=int, default=None, help="explicit steps (overrides --flops, --ratio)")
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (GPUs)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per worker per micro-step")
    p.add_argument("--gpu", default="H100", help="GPU of the cost estimate")
    p.add_argument("--mfu", type=float, default=0.5, help="assumed MFU of the cost estimate")
    p.add_argument("--usd-per-gpu-hour", type=float, default=2.5, help="price of one GPU-hour")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    try:
        run = plan(args.depth, args.preset, Horizon(ratio=args.ratio, flops=args.flops, iterations=args.iterations),
                   num_workers=args.workers, device_batch_size=args.device_batch_size,
                   cost=CostModel(gpu=args.gpu, mfu=args.mfu, usd_per_gpu_hour=args.usd_per_gpu_hour))
    except PlanError as e:
        p.error(str(e))
    print(json.dumps(run.model_dump()) if args.json else run.table())


if __name__ == "__main__":
    main()
