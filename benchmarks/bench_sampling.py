"""Sampling throughput: images/s of evaluations.sample (eager and --compile) vs diffusers' scheduler loop on the same
weights (trainer.export_diffusers), DDPM 250 and DDIM 50 steps, with and without classifier-free guidance.

    python -m benchmarks.bench_sampling --preset tiny16 --batch 16 --rounds 3 --threads 2 \
        --out benchmarks/results/sampling.md

One process, one thread count (torch.set_num_threads(--threads)) for every variant. Each round runs every case
(sampler x guidance) and, inside a case, every variant once, in an order rotated from round to round, so a change
in machine load hits all variants alike; images/s per variant is reported as the median over rounds with its range,
and the ratios (ours / diffusers, compiled / eager) as the median and range of the per-round ratios.

Variants: `eager` = sample(model, ...) with its timed region (images/s from its report: the sampling loop and the
uint8 conversion, not the model load); `compiled` = the same with compile=True (compilation is done by its warm-up,
before the timer); `diffusers` = UNet2DModel.from_pretrained + DDPMScheduler (learned_range variance) or
DDIMScheduler from the same config, the loop diffusers' pipelines run (`scheduler.step` per timestep, guidance as
one batched forward of [x; x] with labels [y; null], guided epsilon (1 + w) eps_c - w eps_u, the learned variance
from the conditional half), timed from x_T to uint8 images. Weights are random (speed does not depend on them):
the preset is built, every parameter drawn from N(0, 0.02^2), exported, and converted to a diffusers folder
(presets with a fixed head count, e.g. 30M, get 64-channel heads: UNet2DModel has one head width).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CASES = [("ddpm", 250, False), ("ddim", 50, False), ("ddpm", 250, True), ("ddim", 50, True)]
CASE_NAMES = ("ddpm", "ddim", "ddpm+cfg", "ddim+cfg")  # --cases names of CASES, in order
VARIANTS = ("eager", "compiled", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    from data.cli import ArgumentParser
    p = ArgumentParser(prog="python -m benchmarks.bench_sampling", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny16", help="diffusion.presets name (class-conditional; default tiny16)")
    p.add_argument("--batch", type=int, default=16, help="images per sampling call (one batch; default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every case and variant (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale w (default 2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--cases", default=",".join(CASE_NAMES),
                   help=f"comma list of {', '.join(CASE_NAMES)} (default: all four)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply the 250/50 steps (e.g. 0.04 for a quick check: 10 and 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--out", default="benchmarks/results/sampling.md", help="markdown result (+ same name .json)")
    p.add_argument("--note", default="", help="free text recorded with the results")
    return p


def make_weights(preset: str, work: Path, image_size: int | None = None) -> tuple[str, str, dict[str, Any]]:
    """Random weights of `preset` exported to WORK/model.safetensors and converted to WORK/diffusers/."""
    from diffusion.presets import get_config
    from trainer.export import save_exported
    from trainer.export_diffusers import export_diffusers
    cfg = get_config(preset) if image_size is None else get_config(preset, image_size=image_size)
    if cfg.num_classes is None:
        cfg = cfg.replace(num_classes=10)
    if cfg.num_head_channels <= 0:  # UNet2DModel has one head width: the paper's 4 heads become 64-channel heads
        cfg = cfg.replace(num_head_channels=64)
    torch.manual_seed(0)
    m = cfg.build()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    path = str(work / "model.safetensors")
    save_exported(path, m.state_dict(), cfg.to_dict(), {"steps": 1000, "noise_schedule": "cosine",
                                                        "learn_sigma": True}, step=0, ema="random")
    return path, export_diffusers(path, str(work / "diffusers")), cfg.to_dict()


class DiffusersLoop:
    """diffusers' scheduler loop over the exported UNet2DModel (see the module docstring)."""

    def __init__(self, folder: str, device: torch.device) -> None:
        from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
        self.unet = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).eval()
        self.ddpm = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.ddim = DDIMScheduler.from_config(self.ddpm.config)
        self.device = device

    def __call__(self, method: str, steps: int, n: int, shape: tuple[int, ...], num_classes: int, w: float,
                 seed: int) -> float:
        """Sample n images; returns the seconds from x_T to uint8 images."""
        from evaluations.sample import to_uint8
        sched = self.ddpm if method == "ddpm" else self.ddim
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *shape, generator=g).to(self.device)
        y = torch.randint(num_classes, (n,), generator=g).to(self.device)
        labels = torch.cat([y, torch.full_like(y, num_classes)]) if w else y
        c = shape[0]
        t0 = time.perf_counter()
        sched.set_timesteps(steps)
        with torch.no_grad():
            for t in sched.timesteps:
                if w:
                    out = self.unet(torch.cat([x, x]), t, class_labels=labels).sample
                    cond, unc = out[:n], out[n:]
                    out = torch.cat([(1 + w) * cond[:, :c] - w * unc[:, :c], cond[:, c:]], dim=1)
                else:
                    out = self.unet(x, t, class_labels=labels).sample
                if method == "ddim":
                    out = out[:, :c]  # DDIM takes epsilon only
                kw = {"generator": g} if method == "ddpm" else {}
                x = sched.step(out, t, x, **kw).prev_sample
            to_uint8(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def ours(path: str, method: str, steps: int, n: int, w: float, compile: bool, device: str, seed: int) -> float:
    """evaluations.sample's own timed seconds (warm-up and model load excluded)."""
    from evaluations.sample import sample
    kw = {"ddim": steps} if method == "ddim" else {"respace": str(steps)}
    s = sample(path, n, batch_size=n, guidance_scale=w, seed=seed, progress=False, compile=compile,
               device=device, **kw)
    return float(s.report["seconds"])


def run_rounds(a: argparse.Namespace, path: str, folder: str, mcfg: dict[str, Any], variants: list[str]
               ) -> list[dict[str, Any]]:
    """Every round x case x variant (rotated order) -> rows {round, case, variant, seconds, images_per_s}."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loop = DiffusersLoop(folder, device) if "diffusers" in variants else None
    shape, rows = (mcfg.get("in_channels", 3), mcfg["image_size"], mcfg["image_size"]), []
    cases = [c for c, name in zip(CASES, CASE_NAMES) if name in a.cases.split(",")]
    for r in range(a.rounds):
        for ci, (method, steps, guided) in enumerate(cases):
            steps = max(1, round(steps * a.steps_scale))
            w = a.guidance if guided else 0.0
            k = (r + ci) % len(variants)
            for v in variants[k:] + variants[:k]:
                if v == "diffusers":
                    sec = loop(method, steps, a.batch, shape, mcfg["num_classes"], w, seed=r)
                else:
                    sec = ours(path, method, steps, a.batch, w, v == "compiled", str(device), seed=r)
                rows.append({"round": r, "case": f"{method.upper()} {steps}" + (f" + CFG w={w:g}" if w else ""),
                             "variant": v, "seconds": sec, "images_per_s": a.batch / sec})
                print(f"round {r} {rows[-1]['case']:<22} {v:<9} {rows[-1]['images_per_s']:8.2f} images/s",
                      flush=True)
    return rows


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per case: median/min/max images/s per variant and the per-round ratios' median/min/max."""
    out: dict[str, dict[str, Any]] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {v: {r["round"]: r["images_per_s"] for r in rows if r["case"] == case and r["variant"] == v}
              for v in variants}
        s: dict[str, Any] = {v: _stats(list(by[v].values())) for v in variants}
        for num, den in (("eager", "diffusers"), ("compiled", "diffusers"), ("compiled", "eager")):
            if num in by and den in by:
                s[f"{num}/{den}"] = _stats([by[num][k] / by[den][k] for k in by[num] if k in by[den]])
        out[case] = s
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    return {"cpu": model, "nproc": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    a, m = res["args"], res["machine"]
    num = lambda v: f"{v:.2f}" if v >= 1 else f"{v:.3g}"  # noqa: E731  (3 digits for slow presets: 0.0812)
    fmt = lambda s: f"{num(s['median'])} ({num(s['min'])}-{num(s['max'])})"  # noqa: E731  images/s
    rfmt = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731  ratios
    lines = [f"# Sampling throughput: evaluations.sample vs diffusers ({a['preset']}, batch {a['batch']})", "",
             f"{m['date']}; {m['cpu']}, {m['nproc']} CPUs, torch {m['torch']}, {a['threads']} threads, "
             f"{a['rounds']} rounds; load average before {res['load_before']}, after {res['load_after']}.",
             f"Command: `{res['command']}`" + (f". Note: {a['note']}" if a["note"] else ""), "",
             "images/s: median (min-max over rounds); ratios: median (min-max) of the per-round ratios.", "",
             "| case | " + " | ".join(res["variants"]) + " | eager/diffusers | compiled/diffusers | compiled/eager |",
             "|---|" + "---:|" * (len(res["variants"]) + 3)]
    for case, s in res["summary"].items():
        cells = [fmt(s[v]) for v in res["variants"]]
        cells += [rfmt(s[k]) if k in s else "-" for k in ("eager/diffusers", "compiled/diffusers", "compiled/eager")]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", f"Compile (first call, warm-up outside the timed region): {res['compile_seconds']} s." if
              res.get("compile_seconds") is not None else "No compiled variant.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        from data.cli import die
        die(f"--variants {a.variants!r}: choose from {', '.join(VARIANTS)}", "bench_sampling")
    if not a.cases or any(c not in CASE_NAMES for c in a.cases.split(",")):
        from data.cli import die
        die(f"--cases {a.cases!r}: choose from {', '.join(CASE_NAMES)}", "bench_sampling")
    torch.set_num_threads(a.threads)
    res: dict[str, Any] = {"args": vars(a), "variants": variants, "machine": machine(),
                           "command": "python -m benchmarks.bench_sampling " + " ".join(sys.argv[1:] if argv is None
                                                                                        else argv),
                           "load_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        path, folder, mcfg = make_weights(a.preset, Path(tmp))
        if "compiled" in variants:  # the first compile of each shape, timed apart (later calls hit the cache)
            t0 = time.perf_counter()
            ours(path, "ddim", 1, a.batch, 0.0, True, a.device or ("cuda" if torch.cuda.is_available() else "cpu"), 0)
            ours(path, "ddim", 1, a.batch, a.guidance, True,
                 a.device or ("cuda" if torch.cuda.is_available() else "cpu"), 0)
            res["compile_seconds"] = round(time.perf_counter() - t0, 1)
        rows = run_rounds(a, path, folder, mcfg, variants)
    res.update(rows=rows, summary=summarize(rows, variants), load_after=[round(x, 2) for x in os.getloadavg()])
    out = Path(a.out)
    write_markdown(out, res)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
