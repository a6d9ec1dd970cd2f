"""Study: progressive distillation of the shared 16-px digits model, 256 DDIM steps -> 4, judged by a classifier
that took no part in training and by a pixel-space Frechet distance to the real digits.

    python -m benchmarks.distill_digits --teacher /work/shared_models/uncond16/model.safetensors \\
        --data /work/shared_models/digits16 --out-dir /work/distill_runs/digits [--steps-per-round 250]

1. `python -m trainer.distill` (resumes; finished rounds are skipped): v conversion at 256 steps, then 256 -> 128
   -> ... -> 4, each round --steps-per-round optimizer steps at batch 64.
2. The judge: scikit-learn logistic regression on the real training digits' pixels (one channel, [0, 1]); its
   accuracy on the real validation digits is reported. The models are unconditional, so a sample is judged by the
   judge's confidence: the share of samples whose top class has probability >= 0.9 ("confident"), the mean top
   probability, and the entropy of the predicted-class histogram (log2 10 = 3.32 bits for all classes equally).
3. `evaluations.sweep_steps`: teacher DDIM and respaced DDPM at several step counts, the students at their own
   steps, the same noise for all; FD of pixel features to the real training digits.
4. benchmarks/results/distill_digits.md/.json/.png, with the distillation's cost in images processed next to the
   teacher's training (its checkpoint meta step x global batch).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any

import numpy as np

from data.fsio import atomic_write_json, atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def real_digits(manifest: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of a shard set (uint8 [N, H, W, 3]) and labels [N]."""
    from data.stream import EvalStream
    from evaluations.sweep_steps import to_uint8
    xs, ys = [], []
    for x, y, _ in EvalStream(manifest, 256):
        xs.append(to_uint8(x))
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def judge(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> tuple[Any, float]:
    """Logistic regression on real pixels (channel 0 / 255) -> (classifier, accuracy on the validation digits)."""
    from sklearn.linear_model import LogisticRegression
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(train[0][..., 0].reshape(len(train[0]), -1) / 255.0, train[1])
    acc = float((clf.predict(val[0][..., 0].reshape(len(val[0]), -1) / 255.0) == val[1]).mean())
    return clf, acc


def scorers(clf: Any) -> dict[str, Any]:
    def probs(images: np.ndarray) -> np.ndarray:
        return clf.predict_proba(images[..., 0].reshape(len(images), -1) / 255.0)

    def entropy(images: np.ndarray) -> float:
        h = np.bincount(probs(images).argmax(1), minlength=10) / len(images)
        return round(float(-(h[h > 0] * np.log2(h[h > 0])).sum()), 3)
    return {"confident": lambda im: round(float((probs(im).max(1) >= 0.9).mean()), 4),
            "mean_top_p": lambda im: round(float(probs(im).max(1).mean()), 4),
            "class_entropy_bits": entropy}


def teacher_cost(teacher: str) -> dict[str, Any]:
    """Images the teacher's training processed: its export's step x its run's global batch (config.json beside
    the checkpoints, when the export sits in its run dir)."""
    with open(os.path.splitext(teacher)[0] + ".json") as f:
        step = int(json.load(f)["step"])
    cfg_path = os.path.join(os.path.dirname(teacher), "config.json")
    batch = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            batch = int(json.load(f)["optim"]["global_batch"])
    return {"optimizer_steps": step, "global_batch": batch, "images": step * batch if batch else None}


def run_distill(a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "trainer.distill", "--teacher", a.teacher, "--teacher-steps", str(a.teacher_steps),
           "--final-steps", "4", "--data", os.path.join(a.data, "train-manifest.json"), "--out-dir", a.out_dir,
           "--steps-per-round", str(a.steps_per_round), "--convert" if a.convert else "--no-convert", "--",
           "--global-batch", "64", "--lr", str(a.lr), "--ema", str(a.ema), "--log-every", "10", "--save-every", "50",
           "--no-flip"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(a.out_dir, "distill.json")) as f:
        return {"command": " ".join(cmd), **json.load(f)}


def sample_grid(rows: list[dict[str, Any]], real: np.ndarray, path: str, n: int = 16) -> list[str]:
    """A PNG with one row of the first `n` samples (same noise) per configuration, real digits last; returns the
    row labels top to bottom."""
    from PIL import Image
    strips, labels = [], []
    for r in rows:
        strips.append(np.concatenate(list(np.load(r["samples"])["arr_0"][:n]), axis=1))
        labels.append(f"{r['sampler']} {r['steps']}")
    strips.append(np.concatenate(list(real[:n]), axis=1))
    labels.append("real")
    g = np.concatenate(strips, axis=0)
    Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(path)
    return labels


def summary(sweep: dict[str, Any]) -> str:
    """One paragraph comparing the fewest-step student with the teacher (computed from the rows)."""
    by = {(r["sampler"], r["steps"]): r for r in sweep["rows"]}
    k = min(s for t, s in by if t == "student")
    top = max(s for t, s in by if t == "teacher DDIM")
    st, t_k, t_top = by[("student", k)], by.get(("teacher DDIM", k)), by[("teacher DDIM", top)]
    if t_k is None:
        return ""
    return (f"**Summary.** The {k}-step student: FD(pixels) {st['fd_pixels']:.2f}, confident {st['confident']:.3f}; "
            f"the teacher with {k} DDIM steps: {t_k['fd_pixels']:.2f}, {t_k['confident']:.3f}; with {top} DDIM "
            f"steps: {t_top['fd_pixels']:.2f}, {t_top['confident']:.3f}. The student's samples keep the teacher's "
            f"deterministic map from x_T (same digits in the same columns of the grid below). The student's "
            f"FD is below the teacher's DDIM at any step count already after the first round; that round both "
            f"changes the parameterization (epsilon -> v: an epsilon model's x_0 at the first step, t = T-1 where "
            f"sqrt(abar) ~ 5e-5, is (x_t - sqrt(1-abar) eps) / sqrt(abar), then clipped) and trains on x_t made "
            f"from real digits; this study does not separate the two. The teacher's respaced DDPM (learned "
            f"variances, stochastic) is better than all deterministic samplers here.\n")


def markdown(rep: dict[str, Any], sweep_md: str) -> str:
    d, t = rep["distill"], rep["teacher_cost"]
    conv = ("A first round converts the epsilon teacher to a v-predicting student at the teacher's steps (target: one "
            "teacher DDIM step)." if any(r["substeps"] == 1 for r in d["rounds"]) else
            "There is no separate conversion round: the first halving round's student starts from the epsilon "
            "teacher's weights and learns the v parameterization while it halves the steps.")
    rounds = "\n".join(f"| {r['teacher_steps']} -> {r['student_steps']} | {r['optimizer_steps']} | "
                       f"{r['global_batch']} | {r['images']} |" for r in d["rounds"])
    return f"""# Progressive distillation on the 16-px digits (`benchmarks/distill_digits.py`)

Date {rep['date']}; machine: {rep['machine']} (shared with other engineers' jobs; times are upper bounds).
Command: `{rep['command']}`

Teacher: `{rep['teacher']}` (tiny16, epsilon prediction, learned sigma, cosine, T=1000). Distillation:
`{d['command']}`. {conv} Every round halves the steps (target: two teacher DDIM steps, eta 0, clipped x_0,
truncated-SNR weighting). Rounds were kept small because the CPU is shared (load average above 15 on 2 cores
during the study): {rep['steps_per_round']} optimizer steps each at batch 64, lr {rep['lr']}, EMA {rep['ema']}
(exported).

## Cost in images processed

| round | optimizer steps | batch | images |
|---|---:|---:|---:|
{rounds}
| **distillation, all rounds** | | | **{d['images']}** |
| teacher's training | {t['optimizer_steps']} | {t['global_batch']} | {t['images']} |
| distillation / teacher | | | {d['images'] / t['images'] if t['images'] else float('nan'):.2f} |

Each distillation image goes once through the student (forward and backward) and `substeps` (1 or 2) times
through the teacher (forward only).

## Judge

Logistic regression on the real training digits' pixels; accuracy on the {rep['val_images']} real validation
digits: **{rep['judge_val_accuracy']:.3f}**. On those real validation digits: confident
{rep['real']['confident']}, mean top p {rep['real']['mean_top_p']}, class entropy {rep['real']['class_entropy_bits']}
bits; FD(pixels) of {min(rep['val_images'], rep['sweep']['num_samples'])} real validation digits to the training
digits: {rep['real_val_fd']:.3f} (the floor of FD at about this sample size).

## Quality against steps

{summary(rep['sweep'])}
{sweep_md.split(chr(10), 2)[2]}
![FD against steps](distill_digits.png)

First 16 samples of each configuration (the same x_T in every row), rows top to bottom: {', '.join(rep['grid_rows'])}.

![samples](distill_digits_samples.png)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="/work/shared_models/uncond16/model.safetensors")
    p.add_argument("--data", default="/work/shared_models/digits16", help="folder with train- and val-manifest.json")
    p.add_argument("--out-dir", default="/work/distill_runs/digits")
    p.add_argument("--teacher-steps", type=int, default=128)
    p.add_argument("--steps-per-round", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.95)
    p.add_argument("--convert", action=argparse.BooleanOptionalAction, default=False,
                   help="a separate v-conversion round first (default: the first halving round converts too)")
    p.add_argument("--num-samples", type=int, default=250)
    p.add_argument("--ddim", default="4,8,16,32,64,128")
    p.add_argument("--ddpm", default="16,64")
    p.add_argument("--sweep-dir", default=None, help="sweep_steps folder (default OUT_DIR/sweep; samples there are "
                   "reused, e.g. the teacher's from another study)")
    p.add_argument("--results-name", default="distill_digits", help="stem of the files in benchmarks/results/")
    a = p.parse_args(argv)
    from evaluations.features import create_extractor, extract
    from evaluations.metrics import frechet_distance
    from evaluations.sweep_steps import students_of, sweep, _ints
    distill = run_distill(a)
    train, val = real_digits(os.path.join(a.data, "train-manifest.json")), \
        real_digits(os.path.join(a.data, "val-manifest.json"))
    ref = os.path.join(a.out_dir, "real_train.npz")
    np.savez(ref, arr_0=train[0])
    clf, acc = judge(train, val)
    sc = scorers(clf)
    fr, fv = (extract(x, create_extractor("pixels")) for x in (train[0], val[0][:a.num_samples]))
    rep = sweep(a.teacher, ref, a.sweep_dir or os.path.join(a.out_dir, "sweep"), students=students_of(a.out_dir),
                ddim=_ints(a.ddim, "--ddim"), ddpm=_ints(a.ddpm, "--ddpm"), num_samples=a.num_samples,
                scorers=sc)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{model}, {os.cpu_count()} CPUs (nproc), {platform.platform()}",
           "command": "python -m benchmarks.distill_digits " + " ".join(argv if argv is not None else sys.argv[1:]),
           "teacher": a.teacher, "steps_per_round": a.steps_per_round, "lr": a.lr, "ema": a.ema, "distill": distill,
           "teacher_cost": teacher_cost(a.teacher), "judge_val_accuracy": acc, "val_images": int(len(val[0])),
           "real": {k: f(val[0]) for k, f in sc.items()},
           "real_val_fd": float(frechet_distance(fv["mu"], fv["sigma"], fr["mu"], fr["sigma"])), "sweep": rep}
    from evaluations.sweep_steps import markdown as sweep_markdown, plot
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, a.results_name)
    out["grid_rows"] = sample_grid(rep["rows"], train[0], stem + "_samples.png")
    atomic_write_json(stem + ".json", out)
    atomic_write_text(stem + ".md", markdown(out, sweep_markdown(rep)).replace("](distill_digits", "](" + a.results_name))
    plot(rep, stem + ".png")
    print(markdown(out, sweep_markdown(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
