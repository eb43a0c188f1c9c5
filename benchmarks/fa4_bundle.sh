#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4, CuTe DSL) for the GPU machine, which has no package index.
#
# Its CUTLASS-DSL compiler library is ~92 MB as a wheel, over one device call's 64 MiB carry, so it travels
# in two git-ignored folders (.whl/fa4a, .whl/fa4b) over two back-to-back calls (the machine keeps /tmp
# while it stays warm, 30 s after a call):
#
#   bash benchmarks/fa4_bundle.sh build          # here, once: pip download + xz into .whl/fa4a/ and .whl/fa4b/
#   (device, carry .whl/fa4a)  bash benchmarks/fa4_bundle.sh stage-a    # parks the big library in /tmp/fa4
#   (device, carry .whl/fa4b)  bash benchmarks/fa4_bundle.sh stage-b    # installs everything into /tmp/site
#   export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
#
# stage-a also installs pydantic (so bare benchmarks run without .devbundle); a third call carrying .devbundle
# adds Ray on top. Set FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 so later processes reuse the JIT-compiled
# kernels (the first process compiles them, ~1 min, inside the benchmark's excluded warm-up window).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CUTLASS=4.8.1
case "${1:-}" in
build)
  tmp=$(mktemp -d)
  dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
           --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
           --platform manylinux2014_x86_64 -d "$tmp" "$@"; }
  dl flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
     nvidia-cutlass-dsl==$CUTLASS nvidia-cutlass-dsl-libs-base==$CUTLASS nvidia-cutlass-dsl-libs-core==$CUTLASS \
     nvidia-cutlass-dsl-libs-cu13==$CUTLASS
  rm -rf "$ROOT/.whl/fa4a" "$ROOT/.whl/fa4b" && mkdir -p "$ROOT/.whl/fa4a" "$ROOT/.whl/fa4b"
  (cd "$tmp" && mkdir cu13 && cd cu13 && unzip -q ../nvidia_cutlass_dsl_libs_cu13-*.whl)
  ir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
  rt=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
  xz -T0 -9e -c "$tmp/cu13/$ir" > "$ROOT/.whl/fa4a/ir.so.xz"
  xz -T0 -9 -c "$tmp/cu13/$rt" > "$ROOT/.whl/fa4b/rt.so.xz"
  (cd "$tmp/cu13" && rm "$ir" "$rt" && rm -rf nvidia_cutlass_dsl/cu13/lib/stubs && tar -cJf "$ROOT/.whl/fa4b/cu13-rest.tar.xz" .)
  rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl
  cp "$tmp"/*.whl "$ROOT/.whl/fa4b/"
  cp "$ROOT"/.devbundle/whl/{pydantic,pydantic_core,typing_inspection,annotated_types}-*.whl "$ROOT/.whl/fa4a/"
  rm -rf "$tmp"
  du -sh "$ROOT/.whl/fa4a" "$ROOT/.whl/fa4b"
  ;;
stage-a)
  mkdir -p /tmp/fa4 && cp "$ROOT/.whl/fa4a/ir.so.xz" /tmp/fa4/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/fa4a/*.whl
  ;;
stage-b)
  test -f /tmp/fa4/ir.so.xz || { echo "stage-a first (the machine went cold?)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/fa4b/*.whl
  tar -C /tmp/site -xJf "$ROOT/.whl/fa4b/cu13-rest.tar.xz"
  xz -dc /tmp/fa4/ir.so.xz > /tmp/site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
  mkdir -p /tmp/site/nvidia_cutlass_dsl/cu13/lib
  xz -dc "$ROOT/.whl/fa4b/rt.so.xz" > /tmp/site/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
  PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "import flash_attn.cute.interface; print('flash_attn.cute OK')"
  ;;
*) echo "usage: $0 build|stage-a|stage-b"; exit 2 ;;
esac
