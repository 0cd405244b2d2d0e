#!/usr/bin/env bash
# GPU check for a session lent a device (one H100/H200): ~1B Llama, bf16 + fp32 masters, packed,
# through the real training script; prints tokens/s, MFU, peak vs planned memory, bf16-master vs
# pure-bf16 weight movement and evaluation on the GPU (bench/gpu_check.py). Budget: < 8 minutes.
#
# The device machine has torch, transformers, accelerate, pyarrow, fsspec, pyyaml, tqdm but no
# pydantic and no network, so prepare the wheels here first and carry them:
#     make gpu-wheels                                   # -> .cache/gpu-wheels (pydantic for py3.12)
#     run(command="bash bench/gpu_check.sh", carry=[".cache/gpu-wheels"], timeout_s=540)
# GPU tests (marker `gpu`) need pytest, which that machine lacks; they skip without CUDA here.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import pydantic" 2>/dev/null; then
    wheels=.cache/gpu-wheels
    [ -d "$wheels" ] || { echo "pydantic is missing and $wheels is absent: run 'make gpu-wheels' and carry it" >&2; exit 2; }
    site="${TMPDIR:-/tmp}/gpu-check-site"
    python -m pip install -q --no-index --find-links "$wheels" --target "$site" pydantic
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
exec timeout 460 python bench/gpu_check.py "$@"
