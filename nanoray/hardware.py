"""Accelerator peaks: the denominators of MFU and of the dial's GPU-hour estimate.

Dense bf16 matmul peaks (no sparsity) from the vendors' datasheets, keyed by a substring of
`torch.cuda.get_device_name()`. More specific names come first (an "H100 PCIe" must not match "H100").
"""

import torch

PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200 NVL": 836e12,
    "H200": 989e12,
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "A100": 312e12,
    "L40S": 362e12,
    "4090": 165.2e12,
    "MI300X": 1.3074e15,
}


# Memory of the GPUs Ray names by accelerator type (the `accelerator_type:<name>` resource of a GPU node), in
# GiB as CUDA reports it: the device batch is sized from it where the driver has no GPU of its own.
ACCELERATOR_MEMORY_GIB = {"H200": 139.8, "H100": 79.1, "A100-80G": 79.1, "A100-40G": 39.4, "B200": 178.4,
                          "GB200": 184.0, "L40S": 44.4, "L4": 22.0, "A10G": 22.0}


def peak_flops(name: str) -> float:
    """Peak bf16 FLOP/s of the device called `name`; inf when unknown (so MFU reads 0, never a guess)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return float("inf")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that do it natively (SM >= 80), fp32 everywhere else."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def prefer_cudnn_attention() -> None:
    """Route SDPA to cuDNN's attention: on an H100 its causal fwd+bwd at our shapes runs 1.7x faster than
    the flash backend (benchmarks/attention_backends.py). Must be set before torch.compile traces."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)


def gpu_memory_gib(device: torch.device | int | None = None) -> float:
    """Total memory of a local CUDA GPU, in GiB."""
    return torch.cuda.get_device_properties(device if device is not None else 0).total_memory / 2**30


def cluster_gpu_memory_gib(resources: dict[str, float]) -> tuple[float | None, str]:
    """(memory in GiB, what it is) of the GPUs that will train: this machine's GPU when it has one, else the
    smallest accelerator type of the Ray cluster's resources (`ray.cluster_resources()`) that the table knows;
    (None, why) when neither is known (the preset's assumption then holds)."""
    if torch.cuda.is_available():
        return round(gpu_memory_gib(), 1), torch.cuda.get_device_name(0)
    known = [(ACCELERATOR_MEMORY_GIB[name], name) for key in resources if key.startswith("accelerator_type:")
             for name in [key.split(":", 1)[1]] if name in ACCELERATOR_MEMORY_GIB]
    if known:
        return min(known)
    return None, "no GPU of a known type in the cluster yet"
