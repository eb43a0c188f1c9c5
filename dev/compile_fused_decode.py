"""Compile nanoray.fused_decode's attention kernels for Hopper (sm_90a) without a GPU, and print each one's
registers and spills (ptxas -v, from Triton's bundled ptxas): catches what does not compile before a device call,
and shows occupancy (registers per thread x threads per program, against the SM's 65,536).

    /tmp/tri/bin/python dev/compile_fused_decode.py          # triton 3.6 (dev/check_fused_decode.py's venv), no GPU
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nanoray import fused_decode  # noqa: E402

TYPES = {"pos_ptr": "*i64", "idx_ptr": "*i64", "o_ptr": "*fp32", "l_ptr": "*fp32", "count_ptr": "*i32",
         **{n: "*bf16" for n in ("qkv_ptr", "cos_ptr", "sin_ptr", "xn_ptr", "gate_w_ptr", "ve_ptr", "k_cache",
                                 "v_cache", "y_ptr")},
         **{n: "i32" for n in ("stride_cb", "stride_cg", "D", "window", "chunk", "n_split")},
         **{n: "fp32" for n in ("eps", "gain", "scale", "bound")}}
D12 = dict(H=6, KVH=6, C=128, HAS_VE=True, VE_CH=12, BLOCK_VE=16, PDL=True)  # the gpt2 preset at d12


def ptxas_info(kernel, constants: dict, **options) -> str:
    names = kernel.arg_names
    # as a launch specializes them: pointers and the integers that are multiples of 16 marked so (the cache strides,
    # D; window and chunk are too at the gpt2 preset's sizes), which decides what loads vectorize and pipeline
    aligned = [n for n in names if TYPES.get(n, "").startswith("*") or n in ("stride_cb", "stride_cg", "D", "window",
                                                                              "chunk", "n_split")]
    source = ASTSource(fn=kernel, signature={n: TYPES.get(n, "constexpr") for n in names},
                       constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(launch_pdl=True, **options))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    used = next(line.split("Used ")[1].split(",")[0] for line in out.splitlines() if "Used " in line)
    spills = next(line.split("bytes stack frame, ")[1] for line in out.splitlines() if "spill stores" in line)
    return f"{used}, {spills}, smem {compiled.metadata.shared} B"


if __name__ == "__main__":
    for rows, block_s, balanced in (("1 row (chunk 64)", 32, False), ("128 rows (chunk 512)", 4, False),
                                    ("128 rows (2 balanced splits)", 2, True)):
        for block_j, stages, warps in [(64, 3, 4), (64, 3, 8), (128, 2, 8), (64, 4, 8), (64, 5, 8), (32, 4, 4)]:
            one_tile = block_s == 32 and block_j >= 64
            constants = dict(D12, BLOCK_J=block_j, BLOCK_S=block_s, BLOCK_G=16, ONE_TILE=one_tile, BALANCED=balanced)
            print(f"attention {block_j}x{stages}x{warps}, {rows}: "
                  + ptxas_info(fused_decode._attention_kernel, constants, num_warps=warps, num_stages=stages))
