# shellcheck shell=bash
# Sourced by every script in cluster/: the site set-up (cluster/site_env.sh), then small helpers.
# Needs IDDPM_REPO (the repository root). No training logic here: only launching, signals and requeue.
# shellcheck source=cluster/site_env.sh
source "$IDDPM_REPO/cluster/site_env.sh"

# The container/launcher prefix as words (IDDPM_LAUNCH is one string so it can travel in the environment).
read -r -a IDDPM_LAUNCH_ARGS <<< "${IDDPM_LAUNCH:-}"

EXIT_PREEMPTED=75  # trainer.EXIT_PREEMPTED: state saved, re-run the same command to resume

# die MESSAGE: one clear line on stderr, exit code 2 (bad input).
die() { echo "error: $*" >&2; exit 2; }

# log MESSAGE: a time-stamped line in the job's output.
log() { echo "[$(date -u +%FT%TZ)] $*"; }

# master_addr: the address of the job's first node, taken from `scontrol show node` (NodeAddr), because
# node names need not resolve from the compute nodes.
master_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  addr=$(scontrol show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  echo "${addr:-$first}"
}

# setup_rendezvous: export MASTER_ADDR and a base port unique per job and restart, so jobs sharing a node,
# successive job steps and a requeued run never meet on one port (MASTER_PORT, if set, is used as it is). Ports lie
# in 20000-31999, below Linux's ephemeral range (32768-60999), where any open connection could already hold one.
setup_rendezvous() {
  MASTER_ADDR="${MASTER_ADDR:-$(master_addr)}"
  _port_base="${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 16 + ${SLURM_RESTART_COUNT:-0} * 4) % 12000 ))}"
  _port_fixed="${MASTER_PORT:+1}"
  _step=0
  MASTER_PORT="$_port_base"
  export MASTER_ADDR MASTER_PORT
}

# srun_ranks ARGS...: one rank per task of the allocation (RANK/LOCAL_RANK/WORLD_SIZE from SLURM), container
# prefix applied, the next rendezvous port; returns the step's exit code.
srun_ranks() {
  local rc=0
  [[ -n "${_port_base:-}" ]] || setup_rendezvous
  [[ -n "$_port_fixed" ]] || MASTER_PORT=$(( _port_base + _step % 4 ))
  _step=$(( _step + 1 ))
  export MASTER_PORT
  srun --kill-on-bad-exit=0 "${IDDPM_LAUNCH_ARGS[@]}" "$IDDPM_REPO/cluster/rank_env.sh" "$@" || rc=$?
  return $rc
}

# train_or_requeue TRAINER_ARGS...: run `python -m trainer.main` on every task. Returns when training is
# finished; when the trainer was preempted (USR1/TERM: saved, exit 75) the job is requeued and this shell
# exits 0; any other failure ends the job with the trainer's exit code.
train_or_requeue() {
  local rc=0
  # The batch shell is not signalled by `--signal=USR1@T` or `scancel --signal=USR1` (only the job step is);
  # the trap only keeps it alive if a site sends the signal to the whole job.
  trap 'log "batch shell: USR1 received; the trainer saves and exits"' USR1
  srun_ranks "$PYTHON" -m trainer.main "$@" --slurm-requeue off || rc=$?
  trap - USR1
  if [[ $rc -eq $EXIT_PREEMPTED ]]; then
    log "trainer saved and exited $EXIT_PREEMPTED (preempted); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  elif [[ $rc -ne 0 ]]; then
    log "trainer failed with exit code $rc"
    exit $rc
  fi
  log "training finished"
}

# py_module MODULE ARGS...: one Python CLI as a single process in the batch shell (container prefix applied).
py_module() { "${IDDPM_LAUNCH_ARGS[@]}" "$PYTHON" -m "$@"; }
