"""Fixed-seed 20-step training runs of every built-in objective (iddpm, classifier, vdm, distill) on one rank, and
what they produced: the loss of every step (TensorBoard's train/loss, log every step) and a sha256 of the final
weights. `tests/data/objective_golden.json` holds these figures as recorded BEFORE the trainer learned several
networks per objective (commit f79712a); `tests/test_objective_golden.py` asserts that today's trainer reproduces
them bitwise.

    python tests/objective_golden.py --record      re-record (only when a change is MEANT to move the numbers)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "data", "objective_golden.json")
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_"))},
           OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore::FutureWarning")
STEPS = 20
# 10 diffusion steps: the loss-aware sampler's history (10 losses per timestep) fills within the 20 steps, so its
# synced importance weights take part; micro-batch 4 of 8: two accumulated micro-batches per step.
COMMON = ["--global-batch", "8", "--micro-batch", "4", "--lr", "1e-3", "--ema", "0.9", "--total-steps", str(STEPS),
          "--log-every", "1", "--save-every", str(STEPS), "--seed", "5", "--sample-respacing", "4", "--sample-grid", "4",
          "--no-flip"]
RUNS: dict[str, list[str]] = {
    "iddpm": ["--model-size", "tiny16", "--diffusion-steps", "10", "--timestep-sampler", "loss-second-moment",
              "--label-dropout", "0.2"],
    "classifier": ["--objective", "classifier", "--classifier-size", "tiny16", "--diffusion-steps", "10",
                   "--max-t", "0.5"],
    "vdm": ["--objective", "vdm", "--model-size", "tiny16", "--fourier", "6"],
    "distill": ["--objective", "distill", "--teacher", "{teacher}", "--teacher-steps", "8"],
}


def losses(run_dir: str) -> list[float]:
    """train/loss of every step, from the run's TensorBoard events (float32 as written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def weights_sha256(run_dir: str) -> str:
    """sha256 over the final checkpoint's model weights (sorted names, raw bytes)."""
    from safetensors.torch import load_file
    ck = os.path.join(run_dir, "checkpoints")
    folder = os.path.join(ck, open(os.path.join(ck, "latest")).read().strip())
    state = load_file(os.path.join(folder, "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def train(args: list[str], run_dir: str) -> None:
    r = subprocess.run([sys.executable, "-m", "trainer.main", *args, "--run-dir", run_dir], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"trainer.main failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def golden_runs(workdir: str) -> dict[str, dict]:
    """Train every objective of RUNS for 20 steps in `workdir` (the distill teacher is the iddpm run's EMA)."""
    data = os.path.join(workdir, "digits")
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", data, "--size", "16",
                    "--no-progress"], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    manifest = os.path.join(data, "train-manifest.json")
    teacher = os.path.join(workdir, "teacher.safetensors")
    out: dict[str, dict] = {}
    for name, extra in RUNS.items():
        run_dir = os.path.join(workdir, name)
        train(["--data", manifest, *COMMON, *[a.format(teacher=teacher) for a in extra]], run_dir)
        out[name] = {"loss": losses(run_dir), "weights_sha256": weights_sha256(run_dir)}
        if name == "iddpm":
            subprocess.run([sys.executable, "-m", "trainer.export", run_dir, "--ema", "0.9", "--out", teacher],
                           cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python tests/objective_golden.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help=f"write {GOLDEN}")
    p.add_argument("--workdir", default="/tmp/objective_golden")
    a = p.parse_args()
    got = golden_runs(a.workdir)
    text = json.dumps(got, indent=1)
    if a.record:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
