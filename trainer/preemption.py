"""Preemption: SIGTERM/SIGUSR1 set a flag that the loop shares with every rank at the next step boundary (in its
one per-step all-gather), so all ranks save the same step and exit 75 together; under SLURM the job can then be
requeued."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


class Preemption:
    """Installs SIGTERM/SIGUSR1 handlers that only record the signal (`signum` != 0 once one arrived)."""

    def __init__(self) -> None:
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on)

    def _on(self, signum: int, frame) -> None:
        self.signum = signum


def request_requeue(mode: str) -> None:
    """Under SLURM: `scontrol requeue $SLURM_JOB_ID` when asked (on) or when the job allows requeue (auto)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or mode == "off":
        return
    try:
        if mode == "auto":
            info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
            if "Requeue=1" not in info:
                return
        subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        print(f"trainer: requested requeue of SLURM job {job}", flush=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"trainer: could not requeue SLURM job {job}: {e}", file=sys.stderr, flush=True)
