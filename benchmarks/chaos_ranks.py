"""Time from a rank's death (kill -9) or hang (SIGSTOP) to the end of the whole training job, per launcher.

    python benchmarks/chaos_ranks.py --data MANIFEST [--launchers deepspeed,env,mpi,srun] [--out OUT]

For each launcher (deepspeed = the `deepspeed` launcher; env = one process per rank with torchrun-style RANK/
WORLD_SIZE/MASTER_* variables, no supervisor; mpi = mpiexec of the mpich wheel; srun = a local two-node SLURM
cluster, tests/slurm_cluster.py) and case (1 rank killed; 2 ranks, rank 1 killed; 2 ranks, rank 1 stopped), a
tiny16 run is started, the victim is hit once rank 0 has logged step 3, and the time until every process of the job
has exited is measured, with the launcher's exit code and the trainer's one line. Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ARGS = ["--model-size", "tiny16", "--diffusion-steps", "50", "--global-batch", "8", "--lr", "1e-3", "--ema", "0.9",
        "--log-every", "1", "--seed", "3", "--total-steps", "100000", "--save-every", "1000000"]
RANK_VARS = ("RANK", "PMI_RANK", "SLURM_PROCID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_processes(run_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if run_dir in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except psutil.Error:
            pass
    return out


def others_alive(run_dir: str, victim: int) -> bool:
    for q in job_processes(run_dir):
        try:
            if q.pid != victim and q.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            pass
    return False


def rank_process(run_dir: str, rank: int) -> psutil.Process | None:
    """The trainer process of `rank` (by its launcher's rank variable), not a launcher."""
    for p in job_processes(run_dir):
        try:
            cmd, env = " ".join(p.cmdline()), p.environ()
        except psutil.Error:
            continue
        prog = os.path.basename(p.cmdline()[0]) if p.cmdline() else ""
        if prog.startswith("python") and ("trainer.main" in cmd or "trainer/main.py" in cmd) \
                and "deepspeed.launcher" not in cmd and any(env.get(v) == str(rank) for v in RANK_VARS):
            return p
    return None


def start(launcher: str, world: int, run_dir: str, data: str, log: str, extra: list[str]) -> list[subprocess.Popen]:
    args = [*ARGS, "--data", data, "--run-dir", run_dir, *extra]
    env = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "RANK", "WORLD_SIZE",
                                                                         "LOCAL_RANK", "MASTER_"))},
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    kw = dict(cwd=ROOT, stderr=subprocess.STDOUT, start_new_session=True)
    if launcher == "deepspeed":
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
               os.path.join(ROOT, "trainer", "main.py"), *args]
        return [subprocess.Popen(cmd, env=env, stdout=open(log, "w"), **kw)]
    if launcher == "mpi":
        cmd = [os.path.join(BIN, "mpiexec"), "-n", str(world), sys.executable, "-m", "trainer.main", *args]
        return [subprocess.Popen(cmd, env=env, stdout=open(log, "w"), **kw)]
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "trainer.main", *args],
                             env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                             stdout=open(f"{log}" if r == 0 else f"{log}.{r}", "w"), **kw) for r in range(world)]


class SrunJob:
    """A job of cluster/train_imagenet64.sbatch on the local SLURM cluster, seen as a process (poll/returncode)."""

    def __init__(self, cluster, world: int, run_dir: str, data: str, log: str, extra: list[str]) -> None:
        self.cluster, self.pid, self.returncode = cluster, -1, None
        train_args = " ".join(a for a in ARGS if a != "--model-size" and a != "tiny16") + " " + " ".join(extra)
        self.id = cluster.sbatch(f"--nodes={world}", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                                 "--oversubscribe", "--time=30", f"--output={log}", "cluster/train_imagenet64.sbatch",
                                 cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MODEL_SIZE": "tiny16",
                                                "DATA": data, "RUN_DIR": run_dir, "TRAIN_ARGS": train_args})

    def poll(self) -> int | None:
        recs = self.cluster.job(self.id)
        if recs and recs[0].get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            self.returncode = int(recs[0].get("ExitCode", "0:0").split(":")[0])
        return self.returncode

    def wait(self) -> int | None:
        while self.poll() is None:
            time.sleep(0.2)
        return self.returncode


def trial(launcher: str, world: int, how: str, data: str, tmp: str, timeout_s: float, cluster=None) -> dict:
    run_dir = os.path.join(tmp, f"{launcher}-{world}-{how}")
    log = run_dir + ".log"
    extra = ["--collective-timeout", str(timeout_s)]
    procs = [SrunJob(cluster, world, run_dir, data, log, extra)] if launcher == "srun" else \
        start(launcher, world, run_dir, data, log, extra)
    victim_rank = world - 1
    deadline = time.time() + 900
    try:
        while not os.path.exists(log) or "step 3/" not in open(log).read():
            if time.time() > deadline or all(p.poll() is not None for p in procs):
                raise RuntimeError(f"{launcher} job did not reach step 3: {open(log).read()[-1500:]}")
            time.sleep(0.05)
        victim = rank_process(run_dir, victim_rank)
        if victim is None:
            raise RuntimeError(f"rank {victim_rank} process not found")
        t0 = time.time()
        victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        while any(p.poll() is None and p.pid != victim.pid for p in procs) or others_alive(run_dir, victim.pid):
            if time.time() - t0 > 600:
                break
            time.sleep(0.05)
        ended = time.time() - t0
        text = "".join(open(f).read() for f in [log] + [f"{log}.{r}" for r in range(1, world)] if os.path.exists(f))
        lines = [ln for ln in text.splitlines() if "trainer: rank" in ln and "stopping" in ln]
        case = f"rank {victim_rank} {'killed' if how == 'kill' else 'stopped'}"
        return {"launcher": launcher, "ranks": world, "case": case,
                "seconds_to_end": round(ended, 2), "ended": ended < 600,
                "exit_codes": [p.poll() for p in procs], "line": lines[0][:300] if lines else ""}
    finally:
        for q in job_processes(run_dir):
            try:
                q.kill()
            except psutil.Error:
                pass
        for p in procs:
            if isinstance(p, SrunJob):
                cluster.run(["scancel", str(p.id)], check=False)
            elif p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--launchers", default="deepspeed,env,mpi")
    ap.add_argument("--collective-timeout", type=float, default=20.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "chaos-ranks"))
    a = ap.parse_args()
    rows, cluster = [], None
    if "srun" in a.launchers:
        import importlib.util  # tests/ is not a package; some dependency installs a `tests` package of its own
        spec = importlib.util.spec_from_file_location("slurm_cluster", os.path.join(ROOT, "tests", "slurm_cluster.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cluster = mod.SlurmCluster()
        cluster.start()
    try:
        with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as tmp:  # srun jobs: a path both nodes see
            for launcher in a.launchers.split(","):
                for world, how in ((1, "kill"), (2, "kill"), (2, "stop")):
                    if world == 1 and how == "stop":
                        continue
                    row = trial(launcher, world, how, a.data, tmp, a.collective_timeout, cluster)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        if cluster is not None:
            cluster.stop()
    nproc = subprocess.run(["nproc"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}).stdout.strip()
    machine = f"{platform.node()}, {os.cpu_count()} CPUs ({nproc} usable), load {os.getloadavg()[0]:.1f}"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine, "command": " ".join(sys.argv),
            "collective_timeout_s": a.collective_timeout}
    with open(a.out + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(f"# Time from a rank's death or hang to the end of the job\n\n{meta['date']}; {machine}; "
                f"`{meta['command']}`; --collective-timeout {a.collective_timeout:g} s. tiny16 on CPU (gloo); the "
                f"victim is hit after rank 0 logged step 3; the time is until every process of the job has exited "
                f"(the stopped victim itself is not waited for; the script kills whatever is left after the measurement).\n\n"
                "| launcher | ranks | case | s to end | exit code(s) | the trainer's line |\n"
                "|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['launcher']} | {r['ranks']} | {r['case']} | {r['seconds_to_end']} | {r['exit_codes']} | "
                    f"{r['line'].replace('|', '/')} |\n")


if __name__ == "__main__":
    main()
