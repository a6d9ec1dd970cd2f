"""Chaos run: kill -9 one rank of a 2-rank CPU training job at random moments (some while a checkpoint is being
written), resume each time, and check that the final weights equal those of an uninterrupted run.

    python benchmarks/chaos.py --data MANIFEST [--kills 10] [--seed 0] [--out benchmarks/results/chaos]

Ranks are started with torchrun-style variables (RANK, WORLD_SIZE, MASTER_*). After each kill the survivor must end
by itself (exit 69, trainer.dist) before the job is started again with the same command. Writes OUT.md and OUT.json
(the table of kills, resume points and lost steps, and the largest difference of the final weights).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--model-size", "tiny16", "--diffusion-steps", "50", "--global-batch", "8", "--lr", "1e-3", "--ema", "0.9",
        "--log-every", "1", "--seed", "5", "--collective-timeout", "30", "--sample-grid", "4",
        "--sample-respacing", "2"]
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: str) -> list[subprocess.Popen]:
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "trainer.main", *args], cwd=ROOT, stdout=open(f"{log}.{r}", "w"),
                             stderr=subprocess.STDOUT, env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(2)]


def last_step(log: str) -> int:
    steps = [int(ln.split()[1].split("/")[0]) for ln in open(log).read().splitlines() if ln.startswith("step ")]
    return steps[-1] if steps else 0


def saving(run_dir: str) -> bool:
    ck = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ck) and any(d.endswith(".tmp") for d in os.listdir(ck))


def final_weights(run_dir: str) -> dict:
    from safetensors.torch import load_file
    ck = os.path.join(run_dir, "checkpoints")
    folder = os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())
    return {f"{f}/{k}": v for f in ("model", "ema_0.9", "objective") for k, v in
            load_file(os.path.join(folder, f"{f}.safetensors")).items()}


def run_to_end(args: list[str], log: str, timeout: float = 900) -> str:
    procs = start(args, log)
    codes = [p.wait(timeout=timeout) for p in procs]
    if codes != [0, 0]:
        raise RuntimeError(f"exit codes {codes}: {open(log + '.0').read()[-2000:]}")
    return open(log + ".0").read()


def one_kill(args: list[str], run_dir: str, log: str, during_save: bool, rng: random.Random, total: int) -> dict:
    """Start (resume) the job, kill -9 a random rank at a random step (or while a save is in progress), wait for the
    survivor to end by itself. Returns the row of the table."""
    procs = start(args, log)
    deadline = time.time() + 900
    text = ""
    while "resuming at step" not in text and "fresh start" not in text:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"did not start: {open(log + '.0').read()[-2000:]}")
        time.sleep(0.02)
        text = open(log + ".0").read()
    resumed = int(text.split("resuming at step ")[1].split()[0]) if "resuming at step" in text else 0
    target = min(resumed + rng.randint(1, 6), total - 1)
    while not (saving(run_dir) if during_save else last_step(log + ".0") >= target):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"ended before the kill: {open(log + '.0').read()[-2000:]}")
        time.sleep(0.002 if during_save else 0.02)
    time.sleep(rng.uniform(0, 0.05))
    victim = rng.randrange(2)
    at, in_save = last_step(log + ".0"), saving(run_dir)
    t0 = time.time()
    procs[victim].send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=300) for p in procs]
    return {"victim_rank": victim, "resumed_from": resumed, "killed_after_step": at, "during_save": in_save,
            "exit_codes": codes, "survivor_ended_s": round(time.time() - t0, 2)}


def chaos(data: str, workdir: str, kills: int, seed: int, total: int = 60, save_every: int = 3,
          in_save: tuple[int, ...] = (1, 4, 7)) -> dict:
    """Reference run, then a run killed `kills` times (kills number `in_save` while saving) and resumed; the table."""
    args = [*ARGS, "--data", data, "--total-steps", str(total), "--save-every", str(save_every)]
    ref, run = os.path.join(workdir, "ref"), os.path.join(workdir, "run")
    t0 = time.time()
    run_to_end([*args, "--run-dir", ref], os.path.join(workdir, "ref.log"))
    ref_s = time.time() - t0
    rng, rows = random.Random(seed), []
    for k in range(kills):
        row = one_kill([*args, "--run-dir", run], run, os.path.join(workdir, f"kill{k}.log"), k in in_save, rng,
                      total)
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = run_to_end([*args, "--run-dir", run], os.path.join(workdir, "final.log"))
    final_from = int(text.split("resuming at step ")[1].split()[0]) if "resuming at step" in text else 0
    for i, row in enumerate(rows):  # lost steps: trained before the kill, trained again after the next resume
        nxt = rows[i + 1]["resumed_from"] if i + 1 < len(rows) else final_from
        row["next_resume"], row["lost_steps"] = nxt, max(0, row["killed_after_step"] - nxt)
    a, b = final_weights(ref), final_weights(run)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    return {"rows": rows, "max_abs_diff": diff, "reference_seconds": round(ref_s, 1), "total_steps": total,
            "save_every": save_every}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/iddpm-chaos")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "chaos"))
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=False)
    t0 = time.time()
    res = chaos(a.data, a.workdir, a.kills, a.seed)
    nproc = subprocess.run(["nproc"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{platform.node()}, {nproc} CPUs usable, "
            f"{platform.processor() or platform.machine()}", "command": " ".join(sys.argv),
            "wall_seconds": round(time.time() - t0, 1)}
    with open(a.out + ".json", "w") as f:
        json.dump({**meta, **res}, f, indent=2)
    ok = res["max_abs_diff"] <= 1e-6
    with open(a.out + ".md", "w") as f:
        f.write(f"# Chaos: {len(res['rows'])} kill -9 of one rank of a 2-rank run, each followed by a resume\n\n"
                f"{meta['date']}; {meta['machine']}; `{meta['command']}` ({meta['wall_seconds']} s). tiny16, fp32, "
                f"ZeRO-0, {res['total_steps']} steps, a checkpoint every {res['save_every']}; ranks started with "
                f"torchrun-style variables. Largest difference of the final weights, EMA and sampler state from an "
                f"uninterrupted run: **{res['max_abs_diff']:.3g}** "
                f"({'<= 1e-6: equal' if ok else 'NOT within 1e-6'}).\n\n"
                "| kill | resumed from | killed after step | during a save | rank killed | exit codes | survivor "
                "ended after s | next resume | lost steps |\n|---|---|---|---|---|---|---|---|---|\n")
        for i, r in enumerate(res["rows"]):
            save = "yes" if r["during_save"] else "no"
            f.write(f"| {i + 1} | {r['resumed_from']} | {r['killed_after_step']} | {save}"
                    f" | {r['victim_rank']} | {r['exit_codes']} | {r['survivor_ended_s']} | {r['next_resume']} | "
                    f"{r['lost_steps']} |\n")
    print(f"max abs diff {res['max_abs_diff']:.3g}; wrote {a.out}.md", flush=True)


if __name__ == "__main__":
    main()
