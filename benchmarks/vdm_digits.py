"""VDM against Improved DDPM on the bundled digits (16 px, tiny16 UNet, unconditional), at equal training images.

    python -m benchmarks.vdm_digits train      # the two runs of this study (the hybrid run is the shared one)
    python -m benchmarks.vdm_digits evaluate   # test bits/dim, the estimator's variance, the figure and the report

Runs (up to 1500 steps x 64 images, lr 1e-3, 100 warm-up steps, EMA 0.995, grad clip 1; compared at STEPS):
- vdm: `--objective vdm` (learned schedule, continuous-time loss, variance-minimising schedule gradient);
- iddpm vlb: `--loss vlb` with the loss-second-moment timestep sampler (cosine, learned sigma, T = 1000);
- iddpm hybrid: /work/shared_models/uncond16 (the digits-demo recipe, the same settings, trained for everyone).
Test bits/dim: `evaluations.nll` on the first N held-out images (VDM: continuous time, 16 stratified t per image;
IDDPM: the full T = 1000 bound), the EMA weights of the checkpoints at STEPS (64,000 and 96,000 images).
Variance: the single-sample estimate of L_diffusion (one t ~ U(0,1), one eps per image) of the trained VDM UNet with
its learned schedule and with cosine and linear schedules of the same endpoints (the UNet sees gamma, so the
expected loss is the same for all three; only the variance differs), over N images x M draws.
Writes benchmarks/results/vdm-digits.md/.json/.png with the machine and date.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.environ.get("VDM_RUNS", "/work/vdm_runs")
SHARED = "/work/shared_models"
DATA = f"{SHARED}/digits16/train-manifest.json"
VAL = f"{SHARED}/digits16/val-manifest.json"
OUT = os.path.join(ROOT, "benchmarks", "results")
VDM_ARGS = ["--objective", "vdm", "--data", DATA, "--model-size", "tiny16", "--image-size", "16", "--num-classes", "0",
            "--global-batch", "64", "--lr", "1e-3", "--warmup-steps", "100", "--ema", "0.995", "--grad-clip", "1.0",
            "--no-flip", "--log-every", "50", "--total-steps", "1500", "--save-every", "500"]
# the shared hybrid run's command (train_uncond.sh) with --loss vlb (the recipe's loss-second-moment sampler kept)
VLB_ARGS = ["--recipe", "digits-demo", "--data", DATA, "--num-classes", "0", "--label-dropout", "0",
            "--sample-guidance", "0", "--total-steps", "1500", "--save-every", "500", "--loss", "vlb"]
TRAIN = {"vdm": VDM_ARGS, "iddpm_vlb": VLB_ARGS}
MODELS = {"vdm": f"{RUNS}/vdm_learned", "iddpm_vlb": f"{RUNS}/iddpm_vlb", "iddpm_hybrid": f"{SHARED}/uncond16"}
STEPS, N_IMAGES, T_SAMPLES, DRAWS = (1000, 1500), 64, 16, 32
EVAL = f"{RUNS}/eval_n{N_IMAGES}"                        # exports, nll reports, variance cache


def train_cmd(name: str) -> list[str]:
    return [sys.executable, "-m", "trainer.main", *TRAIN[name], "--run-dir", MODELS[name]]


def run(cmd: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r.stdout


def export(name: str, step: int) -> str:
    out = f"{EVAL}/{name}_{step}.safetensors"
    if not os.path.isfile(out):
        ckpt = f"{MODELS[name]}/checkpoints/step_{step:08d}"
        run([sys.executable, "-m", "trainer.export", ckpt, "--ema", "0.995", "--out", out])
    return out


def bits_per_dim(name: str, step: int, steps: int = 0) -> dict:
    """nll.json of the model's EMA weights at `step` on the first N_IMAGES held-out images (reused when present);
    steps T > 0: a VDM's T-step bound."""
    out = f"{EVAL}/nll_{name}_{step}" + (f"_T{steps}" if steps else "")
    if not os.path.isfile(f"{out}/nll.json"):
        run([sys.executable, "-m", "evaluations.nll", "--model", export(name, step), "--data", VAL, "--out-dir", out,
             "--num-images", str(N_IMAGES), "--batch-size", "64", "--t-samples", str(T_SAMPLES), "--no-progress",
             *(["--respace", str(steps)] if steps else [])])
    return json.load(open(f"{out}/nll.json"))


class LogLinear(torch.nn.Module):
    """gamma linear in t between the endpoints (VDM's fixed baseline schedule)."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, t: torch.Tensor):
        from diffusion.vdm import Gamma
        ends = torch.tensor([self.lo, self.hi], dtype=t.dtype)
        return Gamma(self.lo + (self.hi - self.lo) * t, torch.full_like(t, self.hi - self.lo), ends[:1], ends[1:], ())


@torch.no_grad()
def estimator_variance(model: str) -> dict:
    """Mean and variance (bits/dim) of the one-sample L_diffusion estimate with the learned, cosine, linear and
    log-linear schedules (same endpoints, same UNet), N_IMAGES x DRAWS samples with common random numbers."""
    from data.stream import EvalStream
    from diffusion.losses import NATS_TO_BITS
    from diffusion.vdm import FixedSchedule
    from evaluations.vdm_nll import load_vdm
    net, _ = load_vdm(model)
    x = torch.cat([b[0] for b in EvalStream(VAL, 64)])[:N_IMAGES]
    g = torch.Generator().manual_seed(0)
    t = torch.rand(N_IMAGES * DRAWS, generator=g)
    noise = torch.randn((N_IMAGES * DRAWS, *x.shape[1:]), generator=g)
    xs = x.repeat_interleave(DRAWS, 0)
    learned = net["schedule"]
    ends = learned(torch.zeros(1))
    lo, hi = float(ends.gamma_min), float(ends.gamma_max)
    out, per_t = {}, {}
    for name, sched in (("learned", learned), ("cosine", FixedSchedule("cosine", lo, hi)),
                        ("linear", FixedSchedule("linear", lo, hi)), ("log-linear", LogLinear(lo, hi))):
        net["schedule"] = sched
        vals = torch.cat([net.terms(xs[i:i + 512], t[i:i + 512], noise[i:i + 512])[0][:, 0]
                          for i in range(0, len(t), 512)]) * NATS_TO_BITS / x[0].numel()
        v = vals.double().numpy()
        out[name] = {"mean_bpd": float(v.mean()), "mean_stderr": float(v.std(ddof=1) / np.sqrt(len(v))),
                     "variance_bpd2": float(v.var(ddof=1)), "std_bpd": float(v.std(ddof=1))}
        bins = np.minimum((t.numpy() * 20).astype(int), 19)
        per_t[name] = [float(v[bins == b].mean()) for b in range(20)]
    net["schedule"] = learned
    from diffusion.vdm import snr_curves
    return {"schedules": out, "per_t_bin_mean_bpd": per_t, "gamma_min": lo, "gamma_max": hi,
            "snr": snr_curves(learned, 101), "samples": len(t)}


def paired(rep: dict) -> dict:
    """(other model, step) -> (mean, standard error) of the per-image bits/dim difference vdm - other."""
    out = {}
    for name in MODELS:
        for s in rep["bpd"].get(name, {}):
            if name == "vdm" or s not in rep["bpd"]["vdm"]:
                continue
            a, b = (np.load(f"{EVAL}/nll_{m}_{s}/per_image.npz") for m in ("vdm", name))
            if not np.array_equal(a["index"], b["index"]):
                raise SystemExit(f"vdm and {name} at step {s} were evaluated on different images")
            d = a["total_bpd"] - b["total_bpd"]
            out[(name, s)] = (float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))))
    return out


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    return {"cpu": model, "nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg()}


def plot(rep: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for name, rows in rep["bpd"].items():
        steps = sorted(int(s) for s in rows)
        ax.errorbar([s * 64 / 1000 for s in steps], [rows[str(s)]["bpd"] for s in steps],
                    yerr=[rows[str(s)]["bpd_stderr"] for s in steps], marker="o", capsize=3, label=name)
    ax.set(xlabel="training images (thousands)", ylabel="test bits/dim (lower is better)",
           title=f"digits 16 px, first {N_IMAGES} held-out images")
    ax.legend(fontsize=8)
    v = rep["variance"]
    ax = axes[1]
    s = v["snr"]
    ax.plot(s["t"], s["model"], lw=2, label="VDM learned")
    ax.plot(s["t"], s["cosine"], "--", label="cosine (same endpoints)")
    ax.plot(s["t"], s["linear"], ":", label="linear (same endpoints)")
    ax.set(xlabel="t", ylabel="log SNR(t)", title="noise schedules")
    ax.legend(fontsize=8)
    ax = axes[2]
    names = list(v["schedules"])
    ax.bar(names, [v["schedules"][n]["variance_bpd2"] for n in names], color=["C0", "C1", "C2", "C3"])
    ax.set(ylabel="variance of the 1-sample estimate (bits/dim)^2", yscale="log",
           title="L_diffusion estimator variance (same UNet)")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rep: dict) -> str:
    m = rep["machine"]
    md = ["# VDM vs Improved DDPM on the digits (16 px, tiny16, unconditional)", "",
          f"Measured {m['date']} on {m['cpu']} ({m['nproc']} CPUs, load average {m['load_average'][0]:.1f} "
          f"during evaluation; shared machine), torch {m['torch']}. Script: `python -m benchmarks.vdm_digits train` "
          f"then `evaluate`.", "",
          f"## Test bits/dim at equal training images (first {N_IMAGES} held-out images, EMA 0.995)", "",
          "| model | steps | training images | bits/dim ± s.e. | prior | decoder |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in rep["bpd"].items():
        for s in sorted(rows, key=int):
            r = rows[s]
            md.append(f"| {name} | {s} | {int(s) * 64:,} | {r['bpd']:.4f} ± {r['bpd_stderr']:.4f} | "
                      f"{r['prior_bpd']:.5f} | {r['decoder_bpd']:.4f} |")
    v = rep["variance"]
    md += ["", f"VDM: continuous-time bound, {T_SAMPLES} stratified t per image; IDDPM: the full T = 1000 bound "
               f"(decoder = L_0). The same images for every model; paired per-image differences:", "",
           "| comparison | steps | mean difference (bits/dim) ± s.e. |", "|---|---|---:|"]
    md += [f"| vdm - {o} | {s} | {d[0]:+.4f} ± {d[1]:.4f} |" for (o, s), d in rep["paired"].items()]
    last = max(rep["bpd"]["vdm"], key=int)
    md += ["", f"The same VDM ({last} steps) under the T-step bound (the model was trained in continuous time): " +
           ", ".join(f"T = {T}: {r['bpd']:.4f} ± {r['bpd_stderr']:.4f}" for T, r in rep["vdm_discrete"].items()) +
           f"; continuous time: {rep['bpd']['vdm'][last]['bpd']:.4f} bits/dim."]
    md += ["", "The vlb run was stopped at step 1003 (SIGTERM: checkpoint and exit 75) to free the CPU and later "
               "resumed to 1500 by re-running its command. The hybrid run is the shared one (2 ranks x 32 images).", "",
           f"## Variance of the loss estimate (trained VDM UNet, {v['samples']} samples: {N_IMAGES} images x "
           f"{DRAWS} draws of (t, eps), common random numbers)", "",
           f"Endpoints learned: gamma_min {v['gamma_min']:.3f}, gamma_max {v['gamma_max']:.3f} "
           f"(initial -13.3, 5.0).", "",
           "| schedule (same endpoints) | mean L_diffusion (bits/dim) ± s.e. | variance (bits/dim)^2 | std |",
           "|---|---:|---:|---:|"]
    for n, r in v["schedules"].items():
        md.append(f"| {n} | {r['mean_bpd']:.4f} ± {r['mean_stderr']:.4f} | {r['variance_bpd2']:.4f} | "
                  f"{r['std_bpd']:.4f} |")
    md += ["", "The means agree within their errors (the bound depends on the schedule only through its endpoints); "
               "the variances are what the learned schedule minimises.", "", "## Commands", "",
           "```", *["python " + " ".join(train_cmd(n)[1:]) for n in TRAIN],
           "# iddpm_hybrid: /work/shared_models/train_uncond.sh (recipe digits-demo, --num-classes 0, 1500 steps)",
           f"python -m evaluations.nll --model MODEL --data {VAL} --num-images {N_IMAGES} --batch-size 64 "
           f"--t-samples {T_SAMPLES}", "```", "", "![figure](vdm-digits.png)", ""]
    return "\n".join(md)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "evaluate"):
        print(__doc__)
        return 2
    if argv[0] == "train":
        for name in TRAIN:
            print(run(train_cmd(name))[-500:])
        return 0
    rep = {"machine": machine(), "bpd": {}, "n_images": N_IMAGES}
    for name in MODELS:
        rep["bpd"][name] = {str(s): bits_per_dim(name, s) for s in STEPS
                            if os.path.isdir(f"{MODELS[name]}/checkpoints/step_{s:08d}")}
    rep["paired"] = paired(rep)
    last = max(int(s) for s in rep["bpd"]["vdm"])
    rep["vdm_discrete"] = {str(T): bits_per_dim("vdm", last, T) for T in (10, 100, 1000)}
    cache = f"{EVAL}/variance_{last}.json"                   # reused when present
    rep["variance"] = json.load(open(cache)) if os.path.isfile(cache) else estimator_variance(export("vdm", last))
    rep["variance"]["step"] = last
    from data.fsio import atomic_write_json, atomic_write_text
    os.makedirs(OUT, exist_ok=True)
    atomic_write_json(os.path.join(OUT, "vdm-digits.json"), {**rep, "paired": {f"vdm - {o} @ {s}": v for (o, s), v
                                                                        in rep["paired"].items()}})
    plot(rep, os.path.join(OUT, "vdm-digits.png"))
    atomic_write_text(os.path.join(OUT, "vdm-digits.md"), markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
