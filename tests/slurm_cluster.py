"""A real two-node SLURM cluster on localhost for the `slurm`-marked tests.

`SlurmCluster` starts its own munged (private key and socket), one slurmctld and two slurmd (`node1`,
`node2`), all in the foreground as children of the test process, with every state, spool, log and pid file
under one temporary folder and on free TCP ports. `stop()` cancels the jobs, ends the daemons by their
process ids (process groups they were started in) and removes the folder; it runs also when a test fails.

Use it through the `slurm_cluster` fixture (module scope), or as a context manager.
Set `IDDPM_KEEP_SLURM=1` to keep the folder (logs) after the tests for debugging.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
NODES = ("node1", "node2")
CPUS_PER_NODE = 2
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# Pending reasons that mean the request cannot be met by this cluster: fail at once instead of timing out.
NEVER_RUNS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit",
              "DependencyNeverSatisfied", "InvalidAccount", "InvalidQOS"}
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


# A requeued job is released only after pending this long (with no node completing): see SlurmCluster.wait.
REQUEUE_SETTLE_S = 2.0
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


class SlurmUnavailable(RuntimeError):
    """SLURM or munge is missing or would not start (the tests then skip with this reason)."""


def _free_ports(n: int) -> list[int]:
    """Ask the kernel for `n` distinct free TCP ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + two slurmd on localhost; `env` holds SLURM_CONF for client commands."""

    def __init__(self, keep: bool | None = None) -> None:
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            raise SlurmUnavailable(f"SLURM/munge not installed (missing {', '.join(missing)}); "
                                   "install with: apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local SLURM cluster needs root (SlurmUser=root)")
        self.keep = bool(os.environ.get("IDDPM_KEEP_SLURM")) if keep is None else keep
        # Short path: the munge socket path must stay under the 108-byte unix socket limit.
        self.root = Path(tempfile.mkdtemp(prefix="iddpm-slurm-", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # Jobs must see a login-shell-like environment: no launcher variables left by this process or a test.
        self.env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        # A new session per daemon: teardown signals exactly that process group, nothing else.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)
        log.close()

    def _write_conf(self) -> None:
        host = socket.gethostname()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        r = self.root
        lines = [
            "ClusterName=iddpmtest",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge.sock'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` (no accounting DB)
            # Random first job id: the scripts derive MASTER_PORT from the job id, so two clusters started by
            # concurrent test sessions on one machine do not hand out the same ports.
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            "KillWait=5",
            "InactiveLimit=0",
            "SchedulerParameters=sched_interval=2",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MailProg=/bin/true",
        ]
        for name, port in zip(NODES, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={CPUS_PER_NODE} RealMemory=8000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=YES")
        (r / "state").mkdir()
        for name in NODES:
            (r / "spool" / name).mkdir(parents=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and the slurmd of both nodes; wait until both nodes are idle."""
        r = self.root
        key = r / "munge.key"
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={r / 'munge.sock'}", f"--key-file={key}",
                               f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
                               f"--seed-file={r / 'munged.seed'}"])
        self._wait_for(lambda: (r / "munge.sock").exists(), 10, "munged did not create its socket")
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                       "slurmctld did not answer `scontrol ping`")
        for name in NODES:
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
        self._wait_for(self._nodes_idle, timeout, "the nodes did not become idle")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[0::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {p.returncode}: {self.tail(name)}")
            if cond():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self.tail('slurmctld')}")

    def tail(self, name: str, n: int = 15) -> str:
        """Last `n` lines of a daemon's log (for error messages)."""
        text = ""
        for f in (self.root / f"{name}.log", self.root / f"{name}.out"):
            if f.exists():
                text += f.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-n:])

    def stop(self) -> None:
        """Cancel all jobs, end every daemon by its process group, remove the temporary folder."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition=debug"], check=False)
            end = time.monotonic() + 20
            while time.monotonic() < end and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        # slurmd first (their job steps live in the same process groups), then the controller, then munged.
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                if p.poll() is not None:
                    break
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                except subprocess.TimeoutExpired:
                    pass
        self._kill_leftover_steps()
        self.procs_stopped = {n: p.poll() for n, p in self.procs.items()}
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def processes(self) -> str:
        """One line per live process of this cluster's jobs (state, CPU ticks, command), for failure messages."""
        marker = f"SLURM_CONF={self.conf}".encode()
        lines = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                if marker not in (pid_dir / "environ").read_bytes():
                    continue
                stat = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
                wchan = (pid_dir / "wchan").read_text()
            except OSError:
                continue
            lines.append(f"{pid_dir.name} {stat[0]} utime={stat[11]} wchan={wchan} {cmd}")
        return "\n".join(sorted(lines))

    def _kill_leftover_steps(self) -> None:
        """End any slurmstepd started for this cluster (found by our slurm.conf path in /proc/*/environ)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                if (pid_dir / "comm").read_text().strip() != "slurmstepd":
                    continue
                if marker not in (pid_dir / "environ").read_bytes():
                    continue
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    # ------------------------------------------------------------------ client helpers
    def run(self, argv: list[str], check: bool = True, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; returns the completed process (text)."""
        full_env = dict(self.env, **(env or {}))
        p = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit with `sbatch --parsable ARGS...`; returns the job id."""
        full_env = dict(self.env, **(env or {}))
        p = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=full_env,
                           cwd=cwd, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return int(p.stdout.strip().split(";")[0].split("_")[0])

    def nodes_completing(self) -> bool:
        """Whether some node is still cleaning up after a job (state COMPLETING)."""
        p = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return "completing" in p.stdout.lower()

    def job(self, job_id: int | str) -> list[dict[str, str]]:
        """`scontrol show job -o` parsed into one dict per job record (array tasks give several)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        records = []
        for line in p.stdout.strip().splitlines():
            records.append(dict(re.findall(r"(\S+?)=(\S*)", line)))
        return records

    def wait(self, job_id: int | str, timeout: float = 300, states: set[str] = TERMINAL_STATES,
             release_requeued: bool = False) -> list[dict[str, str]]:
        """Poll until every record of the job is in one of `states`; returns the records.

        With `release_requeued`, a job that was requeued and waits on its begin time (about two minutes in
        SLURM) is made eligible with `scontrol update JobId=.. StartTime=now` once it has been pending, with no
        node still completing a job, for `REQUEUE_SETTLE_S`; and a final state counts only once it held for three
        polls (while `scontrol requeue` runs, a job can show a final state for a moment before it returns to
        PENDING). `self.history` records the state changes seen.

        Why not release at once: a requeue revokes the job's credential on its nodes, and slurmd refuses a new
        credential created in the same second as (or before) that revocation (`ctime <= revoked`, whole
        seconds), which fails the relaunch and ends the job FAILED; SLURM's own two-minute delay avoids this.
        CI saw it once when the release came within about a second of the requeue.
        """
        settle = 3 if release_requeued else 1
        end = time.monotonic() + timeout
        start = time.monotonic()
        recs: list[dict[str, str]] = []
        self.history: list[tuple[float, str]] = []
        held = 0
        pending_since: dict[str, float] = {}  # requeued record -> when it was first seen pending
        while time.monotonic() < end:
            recs = self.job(job_id)
            seen = ",".join(f"{r.get('JobState')}/restarts={r.get('Restarts')}" for r in recs)
            if not self.history or self.history[-1][1] != seen:
                self.history.append((round(time.monotonic() - start, 1), seen))
            if recs and all(r.get("JobState") in states for r in recs):
                held += 1
                if held >= settle:
                    return recs
                time.sleep(1.0)
                continue
            held = 0
            stuck = [r for r in recs if r.get("JobState") == "PENDING" and r.get("Reason") in NEVER_RUNS]
            if stuck:
                raise RuntimeError(f"job {stuck[0].get('JobId')} can never run here: Reason={stuck[0]['Reason']}")
            if release_requeued:
                for r in recs:
                    if r.get("JobState") == "PENDING" and int(r.get("Restarts", "0")) > 0 \
                            and r.get("Reason") in ("BeginTime", "JobHeldUser", "None"):
                        if self.nodes_completing():  # the old run's cleanup (after the revocation) goes on
                            pending_since.pop(r["JobId"], None)
                            continue
                        first = pending_since.setdefault(r["JobId"], time.monotonic())
                        if time.monotonic() - first >= REQUEUE_SETTLE_S:
                            self.run(["scontrol", "update", f"JobId={r['JobId']}", "StartTime=now"], check=False)
                    else:
                        pending_since.pop(r.get("JobId", ""), None)
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
                           f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in recs]}; "
                           f"states seen: {self.history}; processes:\n{self.processes()}")


def slurm_skip_reason() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}); "
                "install with: apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (SlurmUser=root)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started two-node cluster for one test module; skips with the reason when SLURM cannot start."""
    reason = slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        pytest.skip(f"could not start a local SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
