#!/usr/bin/env bash
# Submit the whole ImageNet-64 pipeline as four chained SLURM jobs:
#   prepare_imagenet64.sbatch -> train_imagenet64.sbatch -> sample.sbatch -> evaluate.sbatch
# each waiting for the previous one with --dependency=afterok (a failed stage cancels the rest).
# Configuration travels in the environment (sbatch passes it on): RUN_DIR, DATA, PREPARED_DIR, MODEL_SIZE,
# TRAIN_ARGS, NUM_SAMPLES, SAMPLE_ARGS, REFERENCE, BIGGAN, EVAL_ARGS, ... as documented in each script.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: cluster/pipeline.sh [--skip-prepare] [--after JOBID] [--sbatch-args "ARGS"] [--with-guidance] [--dry-run] [-h]

Submits prepare -> train -> sample -> evaluate, chained with --dependency=afterok; prints one line per
stage: "<stage> <job id>". Run it from the repository root (or set IDDPM_REPO).

  --skip-prepare       the shards exist already (DATA, VAL shards): submit train, sample, evaluate only
  --after JOBID        make the first stage wait for JOBID too (afterok)
  --sbatch-args ARGS   extra sbatch flags for every stage, e.g. "--partition=gpu --account=proj"
  --with-guidance      also train a noise-aware classifier (train_classifier.sbatch, after prepare) and sweep
                       classifier guidance (sweep_guidance.sbatch, after sample and the classifier)
  --dry-run            print the sbatch command lines instead of submitting
  PREPARE_SBATCH_ARGS, TRAIN_SBATCH_ARGS, SAMPLE_SBATCH_ARGS, EVAL_SBATCH_ARGS: per-stage extra sbatch flags
  Defaults tie the stages together: DATA=$PREPARED_DIR/train-manifest.json,
  RUN_DIR=$IDDPM_RUNS_ROOT/imagenet64-$MODEL_SIZE, SAMPLES=$RUN_DIR/samples/samples_$NUM_SAMPLES.npz
USAGE
}
die() { echo "error: $*" >&2; exit 2; }

skip_prepare=0 after="" common_args="" dry_run=0 with_guidance=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --skip-prepare) skip_prepare=1; shift ;;
    --after) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--after needs a numeric job id"; after="$2"; shift 2 ;;
    --sbatch-args) [[ $# -ge 2 ]] || die "--sbatch-args needs a value"; common_args="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --with-guidance) with_guidance=1; shift ;;
    *) die "unknown argument '$1' (see cluster/pipeline.sh --help)" ;;
  esac
done

export IDDPM_REPO="${IDDPM_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=cluster/site_env.sh
source "$IDDPM_REPO/cluster/site_env.sh"
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
cd "$IDDPM_REPO"

# One set of paths for all four stages (each script reads these from the environment).
export MODEL_SIZE="${MODEL_SIZE:-270M}"
export PREPARED_DIR="${PREPARED_DIR:-$IDDPM_DATA_ROOT/imagenet64}"
export DATA="${DATA:-$PREPARED_DIR/train-manifest.json}"
export RUN_DIR="${RUN_DIR:-$IDDPM_RUNS_ROOT/imagenet64-$MODEL_SIZE}"
export NUM_SAMPLES="${NUM_SAMPLES:-50000}"
export OUT="${OUT:-$RUN_DIR/samples/samples_${NUM_SAMPLES}.npz}"
export SAMPLES="${SAMPLES:-$OUT}"
export OUT_DIR="${OUT_DIR:-$RUN_DIR/eval}"
unset MODEL  # sample.sbatch exports the trained run's EMA weights itself

dep="$after"
submit() {  # submit STAGE SCRIPT EXTRA_ARGS: prints "<stage> <job id>", sets dep to the new job id
  local stage="$1" script="$2" extra="$3" id
  local -a cmd=(sbatch --parsable --kill-on-invalid-dep=yes)
  read -r -a more <<< "$common_args $extra"
  cmd+=("${more[@]}")
  [[ -z "$dep" ]] || cmd+=(--dependency="afterok:$dep")
  cmd+=("cluster/$script")
  if [[ $dry_run -eq 1 ]]; then
    echo "$stage: ${cmd[*]}"; dep="<$stage job id>"; return
  fi
  id=$("${cmd[@]}") || die "sbatch for the $stage stage failed"
  id="${id%%;*}"
  echo "$stage $id"
  dep="$id"
}
[[ $skip_prepare -eq 1 ]] || submit prepare prepare_imagenet64.sbatch "${PREPARE_SBATCH_ARGS:-}"
prepared="$dep"
submit train train_imagenet64.sbatch "${TRAIN_SBATCH_ARGS:-}"
submit sample sample.sbatch "${SAMPLE_SBATCH_ARGS:-}"
sampled="$dep"
submit evaluate evaluate.sbatch "${EVAL_SBATCH_ARGS:-}"
if [[ $with_guidance -eq 1 ]]; then  # classifier beside the diffusion model; the sweep after both
  export CLF_RUN_DIR="${CLF_RUN_DIR:-$IDDPM_RUNS_ROOT/classifier-${CLF_SIZE:-adm64}}"
  export CLASSIFIER="${CLASSIFIER:-$CLF_RUN_DIR/export/classifier.safetensors}"
  dep="$prepared"
  submit classifier train_classifier.sbatch "${CLF_SBATCH_ARGS:-}"
  dep="$sampled:$dep"
  submit sweep_guidance sweep_guidance.sbatch "${SWEEP_SBATCH_ARGS:-}"
fi
