"""The local SLURM cluster itself and the script plumbing that needs no trainer (ranks, master address, venv,
bad input, cleanup of daemons and files also when a test fails)."""
from __future__ import annotations

from pathlib import Path

import pytest

from slurm_cluster import REPO, SlurmCluster, slurm_cluster, slurm_skip_reason  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROBE = r"""#!/bin/bash
#SBATCH --job-name=probe
set -euo pipefail
IDDPM_REPO="${IDDPM_REPO:-$SLURM_SUBMIT_DIR}"
source "$IDDPM_REPO/cluster/common.sh"
export MASTER_ADDR="$(master_addr)"
srun "$IDDPM_REPO/cluster/rank_env.sh" "$PYTHON" -c '
import os, sys
print("task", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
      os.environ["SLURMD_NODENAME"], os.environ["MASTER_ADDR"], sys.executable, flush=True)'
"""


def test_two_node_job_runs_one_rank_per_node_with_the_repo_venv(slurm_cluster: SlurmCluster,
                                                                   tmp_path: Path) -> None:
    script = tmp_path / "probe.sbatch"
    script.write_text(PROBE)
    out = tmp_path / "probe.out"
    job = slurm_cluster.sbatch("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", f"--output={out}",
                               str(script), cwd=REPO)
    rec = slurm_cluster.wait(job, timeout=90)[0]
    assert rec["JobState"] == "COMPLETED", out.read_text()
    tasks = sorted(line.split()[1:] for line in out.read_text().splitlines() if line.startswith("task "))
    venv_python = str(REPO / ".venv" / "bin" / "python")
    assert tasks == [["0", "2", "0", "node1", "127.0.0.1", venv_python],
                     ["1", "2", "0", "node2", "127.0.0.1", venv_python]]


def test_train_script_rejects_missing_data_with_one_line(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "bad.out"
    job = slurm_cluster.sbatch("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                               f"--output={out}",
                               "cluster/train_imagenet64.sbatch", cwd=REPO,
                               env={"DATA": str(tmp_path / "no-such-shards"), "RUN_DIR": str(tmp_path / "run")})
    rec = slurm_cluster.wait(job, timeout=60)[0]
    assert rec["JobState"] == "FAILED"
    assert rec["ExitCode"] == "2:0"
    assert out.read_text().strip().splitlines() == [
        f"error: DATA={tmp_path / 'no-such-shards'} does not exist; set DATA to the training shards "
        "(manifest, brace pattern or URL)"]
    assert not (tmp_path / "run").exists()


def test_cluster_stops_daemons_and_removes_files_when_the_test_body_fails() -> None:
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    with pytest.raises(ZeroDivisionError):
        with SlurmCluster(keep=False) as c:
            root = c.root
            pids = [p.pid for p in c.procs.values()]
            assert len(pids) == 4  # munged, slurmctld, two slurmd
            c.sbatch("--nodes=2", "--wrap", "sleep 300", cwd=root)  # a running job must not survive either
            1 / 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    assert not root.exists()
    leftovers = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _has_conf(d, root)]
    assert leftovers == []


def _has_conf(proc: Path, root: Path) -> bool:
    """True if the process at /proc/PID still carries our slurm.conf in its environment."""
    try:
        return f"SLURM_CONF={root}/slurm.conf".encode() in (proc / "environ").read_bytes()
    except OSError:
        return False
