# shellcheck shell=bash
# Sourced (through cluster/common.sh) by every script in cluster/. Variables already set in the environment
# win over the defaults here.
#
# ======================================================================================================
# SITE SET-UP: THE ONE PLACE TO ADAPT TO A CLUSTER (modules, venv, container, storage roots, NCCL).
# Either edit the defaults below or export the variables before `sbatch` (sbatch passes the environment on).
#
#   IDDPM_ENV_SETUP  shell code run once per job before anything else, e.g.
#                    IDDPM_ENV_SETUP='module load cuda/12.4 nccl/2.21; source $HOME/venvs/iddpm/bin/activate'
#   PYTHON           the Python that runs the CLIs (default: the repository's .venv, else python3 on PATH)
#   IDDPM_LAUNCH     a prefix for every task, e.g. a container: IDDPM_LAUNCH='apptainer exec --nv iddpm.sif'
#   IDDPM_DATA_ROOT  where data sets live (shared filesystem path, or a gs://, az://, https:// prefix)
#   IDDPM_RUNS_ROOT  where run directories are created (must be visible to every node)
# ======================================================================================================
if [[ -n "${IDDPM_ENV_SETUP:-}" ]]; then
  eval "$IDDPM_ENV_SETUP"
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$IDDPM_REPO/.venv/bin/python" ]]; then PYTHON="$IDDPM_REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
: "${IDDPM_LAUNCH:=}"
: "${IDDPM_DATA_ROOT:=$IDDPM_REPO/datasets}"
: "${IDDPM_RUNS_ROOT:=$IDDPM_REPO/runs}"
# NCCL: surface asynchronous errors instead of hanging; see docs/cluster.md for interface/IB settings.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
export PYTHON IDDPM_LAUNCH IDDPM_DATA_ROOT IDDPM_RUNS_ROOT TORCH_NCCL_ASYNC_ERROR_HANDLING
# ======================================================================================================
