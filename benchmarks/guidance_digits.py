"""Classifier guidance on the bundled digits: an UNCONDITIONAL 16-px diffusion model steered by a noise-aware
classifier, judged by a classifier that did not guide (trained on clean images, another seed).

    python -m benchmarks.guidance_digits [--model /work/shared_models/uncond16/model.safetensors] \
        [--work /work/clf_study] [--scales 0,1,2,3,5,10] [--num-samples 300] [--steps 25]

Steps (each skipped when its output exists, so a re-run resumes; the two sweeps run side by side): digits shards with a validation split
(data.prepare digits, split seed 0: the unconditional model's training split); two classifiers trained with
`trainer.main --objective classifier` (noise-aware: t uniform in [0, T); judge: --max-t 0.001, i.e. t = 0 only,
seed 1) and exported; their validation accuracy (evaluations.classify, by quarter of [0, T) for the noise-aware
one); one evaluations.sweep_guidance per sampler (respaced DDPM and DDIM, the same number of steps), same labels
(image i asks for digit i mod 10) and seed at every scale. Writes benchmarks/results/guidance-digits.md/.json/.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESULTS = ROOT / "benchmarks" / "results"
TRAIN = ["--objective", "classifier", "--classifier-size", "tiny16", "--diffusion-steps", "1000",
         "--noise-schedule", "cosine", "--global-batch", "64", "--lr", "1e-3", "--warmup-steps", "20",
         "--weight-decay", "0.05", "--ema", "0.99", "--no-flip", "--log-every", "25", "--save-every", "100"]
CLASSIFIERS = {"noisy": ["--total-steps", "500", "--seed", "0"],
               "clean": ["--total-steps", "300", "--seed", "1", "--max-t", "0.001"]}


def run(cmd: list[str], log: str | None = None) -> None:
    """Run a command from the repository root (stdout to `log` when given); raise on failure."""
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    with open(log, "a") if log else open(os.devnull, "w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=f if log else None, stderr=subprocess.STDOUT)


def commands(a: argparse.Namespace) -> dict[str, list[list[str]]]:
    """Every command of the study, in order (also written to the report)."""
    w = a.work
    cmds = {"data": [[PY, "-m", "data.prepare", "digits", "--out-dir", f"{w}/digits16", "--size", "16",
                      "--no-progress"]]}
    for name, extra in CLASSIFIERS.items():
        cmds[name] = [[PY, "-m", "trainer.main", *TRAIN, "--data", a.train_data, "--run-dir",
                       f"{w}/{name}", *extra],
                      [PY, "-m", "trainer.export", f"{w}/{name}", "--out", f"{w}/{name}.safetensors"]]
    cmds["classify"] = [[PY, "-m", "evaluations.classify", "--model", f"{w}/noisy.safetensors", "--data",
                         f"{w}/digits16/val-manifest.json", "--t-quartiles", "--out", f"{w}/noisy-val.json"],
                        [PY, "-m", "evaluations.classify", "--model", f"{w}/clean.safetensors", "--data",
                         f"{w}/digits16/val-manifest.json", "--t-quartiles", "--out", f"{w}/clean-val.json"]]
    for sampler, flags in (("ddpm", ["--respace", str(a.steps)]), ("ddim", ["--ddim", str(a.steps)])):
        cmds[sampler] = [[PY, "-m", "evaluations.sweep_guidance", "--model", a.model, "--classifier",
                          f"{w}/noisy.safetensors", "--judge", f"{w}/clean.safetensors", "--data",
                          f"{w}/digits16/val-manifest.json", "--classifier-scales", a.scales, "--num-samples",
                          str(a.num_samples), "--batch-size", "100", *flags, "--out-dir", sweep_dir(a, sampler),
                          "--no-progress"]]
    return cmds


def sweep_dir(a: argparse.Namespace, sampler: str) -> str:
    return f"{a.work}/sweep-{sampler}-n{a.num_samples}-s{a.steps}-c{a.scales.replace(',', '_')}"


def machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3]
    return {"cpu": cpu, "nproc": nproc, "loadavg_at_report": " ".join(load),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(r: dict) -> str:
    m, nv, cv = r["machine"], r["noisy_val"], r["clean_val"]
    q = ", ".join(f"t in [{x['t'][0]}, {x['t'][1]}): {x['accuracy']:.3f}" for x in nv["quartiles"])
    lines = ["# Classifier guidance on the digits (unconditional tiny16 model)", "",
             f"Measured {m['date']} on {m['cpu']} ({m['nproc']} cores, shared with other jobs; load average "
             f"{m['loadavg_at_report']} when the report was written). Commands: see the end.", "",
             f"Diffusion model: `{r['model']}` (unconditional, 1000-step cosine process). Guiding classifier "
             f"(noise-aware, t uniform in [0, 1000)): validation accuracy {nv['accuracy']:.3f} clean; {q}. "
             f"Judge (clean images only, another seed, never used for guiding): validation accuracy "
             f"{cv['accuracy']:.3f} on {cv['images']} held-out digits.", "",
             f"{r['num_samples']} samples per point, {r['steps']} sampling steps, image i asks for digit i mod 10, "
             "the same seed at every scale (scale 0 is unguided: the judge's accuracy there is chance, 0.1, up to "
             "sampling noise). FID/precision/recall: `pixels` features against the held-out digits "
             "(**not comparable to published FID**).", "",
             "| sampler | classifier scale | judge accuracy | FID (pixels) | precision | recall |",
             "|---|---:|---:|---:|---:|---:|"]
    for sampler in ("ddpm", "ddim"):
        for row in r[sampler]["rows"]:
            lines.append(f"| {sampler.upper()} | {row['classifier_scale']:g} | {row['judge_accuracy']:.3f} | "
                         f"{row['fid']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} |")
    lines += ["", "Figures: `guidance-digits.png` (judge accuracy, FID and precision/recall against the scale) and "
              "`guidance-digits-samples.png` (the first 20 samples of every point: digits 0-9 twice, one row per "
              "scale; DDPM left, DDIM right).", "",
              "Commands (from the repository root):", ""]
    for cmds in r["commands"].values():
        lines += ["    python " + " ".join(c[1:]) for c in cmds]
    lines += ["", "The two classifier trainings ran side by side with OMP_NUM_THREADS=1 (this script runs them one "
              "after the other when their exports are missing); the two sweeps ran side by side, one thread each."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for sampler, style in (("ddpm", "o-"), ("ddim", "s--")):
        rows = r[sampler]["rows"]
        x = [row["classifier_scale"] for row in rows]
        axes[0].plot(x, [row["judge_accuracy"] for row in rows], style, label=sampler.upper())
        axes[1].plot(x, [row["fid"] for row in rows], style, label=sampler.upper())
        axes[2].plot(x, [row["precision"] for row in rows], style, label=f"precision, {sampler.upper()}")
        axes[2].plot(x, [row["recall"] for row in rows], style, alpha=0.5, label=f"recall, {sampler.upper()}")
    axes[0].axhline(0.1, color="gray", ls=":", label="chance")
    for ax, yl in zip(axes, ("judge accuracy (requested digit)", "FID (pixels features)", "precision / recall")):
        ax.set(xlabel="classifier guidance scale", ylabel=yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Unconditional digits model + noise-aware classifier, {r['steps']} steps, "
                 f"{r['num_samples']} samples per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(r: dict, path: str) -> None:
    """One row per scale, the first 20 samples (requested digits 0..9, 0..9); DDPM left, DDIM right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = []
    for i, _ in enumerate(r["ddpm"]["rows"]):
        cells = []
        for sampler in ("ddpm", "ddim"):
            x = np.load(r[sampler]["rows"][i]["samples"])["arr_0"][:20]
            cells.append(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=255).transpose(1, 0, 2, 3)
                         .reshape(x.shape[1] + 2, -1, 3))
        rows.append(np.concatenate([cells[0], np.full((cells[0].shape[0], 8, 3), 255, np.uint8), cells[1]], 1))
    grid = np.concatenate(rows, 0)
    fig, ax = plt.subplots(figsize=(13, 13 * grid.shape[0] / grid.shape[1] + 0.9))
    ax.imshow(grid, interpolation="nearest")
    h = rows[0].shape[0]
    ax.set_yticks([h * i + h / 2 for i in range(len(rows))],
                  [f"scale {row['classifier_scale']:g}" for row in r["ddpm"]["rows"]])
    ax.set_xticks([rows[0].shape[1] / 4, 3 * rows[0].shape[1] / 4], ["DDPM", "DDIM"])
    ax.set_title("requested digits: 0 1 2 ... 9 0 1 ... 9 in every row", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/shared_models/uncond16/model.safetensors")
    p.add_argument("--train-data", default="/work/shared_models/digits16/train-manifest.json",
                   help="digits training shards (the unconditional model's; the same split as data.prepare's)")
    p.add_argument("--work", default="/work/clf_study", help="folder for data, runs, samples (kept for re-runs)")
    p.add_argument("--scales", default="0,1,2,3,5,10")
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each of the two sweeps")
    a = p.parse_args()
    w, cmds = a.work, commands(a)
    os.makedirs(w, exist_ok=True)
    done = {"data": f"{w}/digits16/val-manifest.json", "noisy": f"{w}/noisy.safetensors",
            "clean": f"{w}/clean.safetensors", "classify": f"{w}/clean-val.json",
            "ddpm": f"{sweep_dir(a, 'ddpm')}/sweep_guidance.json", "ddim": f"{sweep_dir(a, 'ddim')}/sweep_guidance.json"}
    for step, cs in cmds.items():
        if not os.path.isfile(done[step]) and step not in ("ddpm", "ddim"):
            for c in cs:
                run(c, f"{w}/{step}.log")
    # The two sweeps are independent: run them side by side (one thread each; see --threads).
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning", OMP_NUM_THREADS=str(a.threads))
    procs = [subprocess.Popen(cmds[s][0], cwd=ROOT, env=env, stdout=open(f"{w}/{s}.log", "a"),
                              stderr=subprocess.STDOUT) for s in ("ddpm", "ddim") if not os.path.isfile(done[s])]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a sweep failed; see {w}/ddpm.log and {w}/ddim.log")
    load = lambda f: json.load(open(f))  # noqa: E731
    report = {"model": a.model, "num_samples": a.num_samples, "steps": a.steps, "scales": a.scales,
              "noisy_val": load(f"{w}/noisy-val.json"), "clean_val": load(f"{w}/clean-val.json"),
              "ddpm": load(done["ddpm"]), "ddim": load(done["ddim"]), "commands": cmds, "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guidance-digits.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "guidance-digits.md").write_text(markdown(report))
    plot(report, str(RESULTS / "guidance-digits.png"))
    sample_grid(report, str(RESULTS / "guidance-digits-samples.png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
