"""`make demo`: digits shards -> 2 DeepSpeed CPU ranks train tiny16 (class-conditional, hybrid loss, loss-aware
sampler, CFG label dropout) -> guided EMA sample grid (one row per digit) and TensorBoard logs in runs/demo.

    python -m trainer.demo [--run-dir runs/demo] [--ranks 2] [--steps N]

Re-running resumes (or, when finished, only reprints where to look).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

from data.cli import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="trainer.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="output folder (data/, checkpoints/, tb/, samples/)")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed CPU ranks")
    p.add_argument("--steps", type=int, default=None, help="override the digits-demo recipe's total steps")
    p.add_argument("--master-port", type=int, default=29517, help="port of the DeepSpeed launcher's rendezvous")
    a = p.parse_args(argv)
    if a.ranks < 1 or (a.steps is not None and a.steps < 1):
        p.error("--ranks and --steps must be positive")
    t0 = time.time()
    py, bindir = sys.executable, os.path.dirname(sys.executable)
    data = os.path.join(a.run_dir, "data")
    manifest = os.path.join(data, "train-manifest.json")
    if not os.path.isfile(manifest):
        subprocess.run([py, "-m", "data.prepare", "digits", "--out-dir", data, "--size", "16", "--no-progress"],
                       check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(a.ranks), "--master_port", str(a.master_port),
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py"),
           "--recipe", "digits-demo", "--data", manifest, "--run-dir", a.run_dir]
    if a.steps:
        cmd += ["--total-steps", str(a.steps)]
    print("demo: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"demo: training exited with code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    out = os.path.join(a.run_dir, "model.safetensors")
    subprocess.run([py, "-m", "trainer.export", a.run_dir, "--out", out], check=True)
    rate = json.load(open(out.replace(".safetensors", ".json")))["ema"]
    grids = sorted(glob.glob(os.path.join(a.run_dir, "samples", f"ema{rate}_step*.png")))
    print(f"\ndemo finished in {time.time() - t0:.0f} s.\n"
          f"  samples (rows = digits 0..9, classifier-free guidance): {grids[-1] if grids else '(none)'}\n"
          f"  TensorBoard:  {os.path.join(bindir, 'tensorboard')} --logdir {os.path.join(a.run_dir, 'tb')}\n"
          f"  exported EMA weights: {out}\n"
          f"  sample more: python -m evaluations.sample --model {out} --num-samples 64 --batch-size 64 "
          f"--out samples.npz --guidance-scale 2", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
