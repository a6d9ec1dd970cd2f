#!/usr/bin/env bash
# The GPU check in one command (issue 19): gpu tests, 270M bf16 training MFU (eager and --compile), gradient
# checkpointing's memory saving and cost, fp16 with dynamic loss scaling, the trainer's NCCL sampler sync on every
# GPU of the machine, sampling images/s; one results file, benchmarks/results/gpu_check.md (+ .json).
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; about 5-8 minutes
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU: the same code at tiny sizes (gpu_check-dryrun.md)
#
# A GPU machine without registry access (the device tool's): `make gpu-wheels` here puts exactly what that machine's
# Python lacks into .whl/ (deepspeed, webdataset, blobfile, diffusers and their missing requirements; checked
# against the machine's package list, see benchmarks/gpu_wheels.py); then, in ONE device call,
#   run(command="bash benchmarks/gpu_check.sh --out $OUT/gpu_check.md", carry=[".whl"], timeout_s=600)
# The wheels are installed from .whl/ into $GPU_SITE (default /tmp/iddpm-site), put on PYTHONPATH for every
# process the check starts, when the folder exists and deepspeed is not importable. Extra arguments go to
# python -m benchmarks.gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SITE=""
if [ -d .whl ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  SITE=${GPU_SITE:-/tmp/iddpm-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
# One compile cache for every section and rerun (inductor's FX graph and autograd caches).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/iddpm-inductor}
# The whole check is cut off after GPU_CHECK_TIMEOUT seconds (default 570: inside the device tool's 600 s per
# call); results are written after every section, so a cut-off run still reports the sections it finished.
exec timeout "${GPU_CHECK_TIMEOUT:-570}" "$PY" -m benchmarks.gpu_check "$@"
