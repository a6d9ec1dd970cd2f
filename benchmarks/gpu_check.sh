#!/usr/bin/env bash
# The GPU check in one command (issue 19): gpu tests, 270M bf16 training MFU (eager and --compile), gradient
# checkpointing's memory saving and cost, fp16 with dynamic loss scaling, the trainer's NCCL sampler sync on every
# GPU of the machine, sampling images/s; one results file, benchmarks/results/gpu_check.md (+ .json).
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; about 5-8 minutes
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: the same code at tiny sizes (gpu_check-dryrun.md)
#
# A GPU machine without registry access: build the wheels here and carry them in .whl/ (see
# ../shared/ENVIRONMENT.md):  pip wheel --no-deps deepspeed -w .whl;  pip download --no-deps -d .whl
#   webdataset braceexpand blobfile diffusers safetensors scikit-learn tqdm (plus what they need that is missing there).
# They are installed from .whl/ first when the folder exists. Extra arguments go to python -m benchmarks.gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ! "$PY" -c "import deepspeed, webdataset, diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# One compile cache for every section and rerun (inductor's FX graph and autograd caches).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/iddpm-inductor}
# The whole check is cut off after GPU_CHECK_TIMEOUT seconds (default 900); results are written after every section.
exec timeout "${GPU_CHECK_TIMEOUT:-900}" "$PY" -m benchmarks.gpu_check "$@"
