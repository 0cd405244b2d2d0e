#!/usr/bin/env bash
# The device check: one run of <= 5 minutes on one H100/H200 (bench/gpu_check.py: our trainer vs
# HF Trainer + DataCollatorWithFlattening per packed-attention kernel, tokens/s, MFU, peak memory;
# then the evaluation measurement, bench/gpu_eval.py, when that file exists). Every measurement is
# capped and lands as JSON in $OUT (the device tool brings $OUT back) as soon as it ends.
#
# The device machine runs its own torch / transformers / accelerate and has no network and no
# pydantic, so carry the few pure-Python wheels (no torch, no transformers; pydantic-core is the one
# compiled wheel, for its CPython) and record every version:
#     make gpu-wheels                                   # -> .cache/gpu-wheels (Python 3.12 wheels)
#     run(command="bash bench/gpu_check.sh", carry=[".cache/gpu-wheels"], timeout_s=330)
# Budget: gpu_check.py <= 220 s, gpu_eval.py <= 70 s (it takes `--out DIR [--dry-run]`), about 5 minutes in all.
# Rerun part of it: bash bench/gpu_check.sh --only ours_flex_attention,peer_flex_attention
# CPU dry run (no GPU, no wheels needed):  bash bench/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-${TMPDIR:-/tmp}/gpu-check}"
mkdir -p "$out"
wheels=.cache/gpu-wheels
site="${TMPDIR:-/tmp}/gpu-check-site"
# liger-kernel without its deps: its torch and triton are the machine's own.
declare -A wheel_sets=([pydantic]="pydantic pydantic-core annotated-types typing-inspection typing-extensions" [liger_kernel]="liger-kernel")
for module in pydantic liger_kernel; do
    python -c "import $module" 2>/dev/null && continue
    [ -d "$wheels" ] || continue
    read -r -a packages <<< "${wheel_sets[$module]}"
    python -m pip install -q --no-index --find-links "$wheels" --target "$site" --no-deps "${packages[@]}" \
        || echo "note: $module not installed from $wheels" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
done
python -c "import pydantic" || { echo "pydantic is missing: run 'make gpu-wheels' and carry .cache/gpu-wheels" >&2; exit 2; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; ls "$wheels" 2>/dev/null || true; } \
    | tee "$out/machine.txt"
dry=""
for arg in "$@"; do [ "$arg" = --dry-run ] && dry=--dry-run; done
timeout 220 python bench/gpu_check.py --out "$out" --budget-s 205 "$@" || echo "gpu_check.py ended with $?" >&2
if [ -f bench/gpu_eval.py ]; then  # the evaluation measurement (issue 21), under its own cap
    timeout 70 python bench/gpu_eval.py --out "$out" $dry || echo "gpu_eval.py ended with $?" >&2
fi
ls -l "$out"
