#!/usr/bin/env bash
# Proves a portable CPU wheel (GGML_CPU_ALL_VARIANTS) runs on older x86-64 levels: under qemu-user CPU models
# ggml loads the libggml-cpu-<variant>.so meant for that level, and greedy tokens equal the native run's.
#
#   bash scripts/check-cpu-variants.sh WHEEL|DIR    (apt-get install qemu-user; qemu >= 7.2 for AVX/AVX2)
#   VENV=/tmp/variants-venv CPUS="qemu64 Nehalem ..." MODEL=x.gguf PROMPT="hello world"
# qemu's TCG has no AVX-512, so the skylakex..zen4 variants are proved only by the native run (Cascadelake-Server
# runs with AVX-512 masked: haswell). numpy is held below 2.4 (2.4 needs x86-64-v2: qemu64 could not import it);
# OPENBLAS_CORETYPE=Prescott, because under qemu-user numpy's OpenBLAS picks Haswell kernels whatever the CPU model.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WHL=${1:?usage: check-cpu-variants.sh WHEEL|DIR}
[ ! -d "$WHL" ] || WHL=$(ls "$WHL"/llamabind-[0-9]*.whl | tail -n 1)
VENV=${VENV:-/tmp/variants-venv}
CPUS=${CPUS:-qemu64 Conroe Nehalem SandyBridge IvyBridge Opteron_G5 Haswell EPYC Cascadelake-Server}
PROMPT=${PROMPT:-hello world}
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 missing: apt-get install qemu-user" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$WHL"
"$VENV/bin/pip" install -q --disable-pip-version-check "$WHL" 'numpy<2.4' gguf
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MODEL=${MODEL:-$WORK/tiny.gguf}
[ -f "$MODEL" ] || PYTHONPATH="$REPO/tests" "$VENV/bin/python" -c \
  "import sys, tinymodels; tinymodels.write_tiny_llama(sys.argv[1])" "$MODEL"
cat > "$WORK/probe.py" <<'EOF'
import json, sys
import llamabind as lb
import re
variant = ",".join(sorted(set(re.findall(r"libggml-cpu-([\w.]+?)\.so", open("/proc/self/maps").read())))) or "NONE"
model = lb.Model(sys.argv[1])
ctx = lb.Context(model, n_ctx=256, n_threads=1)
toks = [ev.token for ev in lb.generate(ctx, sys.argv[2], max_tokens=16, ignore_eog=True)
        if isinstance(ev, lb.TokenEvent) and ev.token is not None]
last = ctx.logits(-1).tolist()
if len(sys.argv) == 3:                      # native: the reference
    print(json.dumps({"variant": variant, "tokens": toks, "logits": last}))
else:
    ref = json.load(open(sys.argv[3]))
    same = toks == ref["tokens"]
    diff = max(abs(a - b) for a, b in zip(last, ref["logits"])) if same else float("nan")
    print(f"{variant}\t{'yes' if same else 'NO'}\t{diff:.2e}")
EOF
export OPENBLAS_CORETYPE=Prescott
"$VENV/bin/python" "$WORK/probe.py" "$MODEL" "$PROMPT" > "$WORK/native.json"
native=$("$VENV/bin/python" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['variant'], d['tokens'])" "$WORK/native.json")
echo "wheel:  $(basename "$WHL")"
echo "native: $native"
[ "${native%% *}" != NONE ] || { echo "no libggml-cpu-<variant>.so loaded natively" >&2; exit 1; }
declare -A want=([qemu64]=x64 [Conroe]=x64 [Nehalem]=sse42 [Westmere]=sse42 [SandyBridge]=sandybridge
  [IvyBridge]=ivybridge [Opteron_G5]=piledriver [Haswell]=haswell [EPYC]=haswell [Cascadelake-Server]=haswell)
printf '%-18s %-12s %-12s %-6s %-14s %s\n' "CPU model" variant expected tokens "max |dlogit|" seconds
rc=0
for cpu in $CPUS; do
  start=$(date +%s)
  out=$(qemu-x86_64 -cpu "$cpu" "$VENV/bin/python" "$WORK/probe.py" "$MODEL" "$PROMPT" "$WORK/native.json" \
        2> "$WORK/$cpu.err" | tail -n 1) || out="FAILED(rc=$?)"
  IFS=$'\t' read -r variant same diff <<< "$out"
  exp=${want[$cpu]:-?}
  printf '%-18s %-12s %-12s %-6s %-14s %s\n' "$cpu" "$variant" "$exp" "${same:--}" "${diff:--}" $(( $(date +%s) - start ))
  if [ "$same" != yes ] || { [ "$exp" != "?" ] && [ "$variant" != "$exp" ]; }; then
    rc=1; grep -v "TCG doesn't support" "$WORK/$cpu.err" | tail -n 5 >&2 || true
  fi
done
exit $rc
