#!/usr/bin/env bash
# Started by `srun` once per task: maps SLURM's task variables to the torch.distributed ones and execs the
# command, so the Python process itself receives the signals SLURM sends to the job step (USR1, TERM).
#   srun cluster/rank_env.sh python -m trainer.main ...
set -euo pipefail
: "${SLURM_PROCID:?rank_env.sh must be started by srun}"
export RANK="$SLURM_PROCID"
export LOCAL_RANK="${SLURM_LOCALID:-0}"
export WORLD_SIZE="${SLURM_NTASKS:-1}"
tasks_here="${SLURM_STEP_TASKS_PER_NODE:-1}"  # e.g. "8(x4)" or "2,1"
export LOCAL_WORLD_SIZE="${tasks_here%%[!0-9]*}"
export NODE_RANK="${SLURM_NODEID:-0}"
[[ "${IDDPM_RANK_LOG:-1}" == 0 ]] || echo "rank_env: rank $RANK/$WORLD_SIZE (local $LOCAL_RANK) on ${SLURMD_NODENAME:-$(hostname)}" >&2
exec "$@"
