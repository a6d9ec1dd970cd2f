"""Sample quality against sampling steps: a teacher with K-step DDIM (eta 0) and respaced K-step DDPM, and its
progressively distilled students at their own K steps, all from the same noise.

    python -m evaluations.sweep_steps --teacher T.safetensors --distill-dir OUT --reference REF.npz \\
        --ddim 4,8,16,32,64,128,256 --ddpm 16,256 --num-samples 500 --out-dir DIR

The teacher's K-step DDIM visits diffusion.distill.step_grid(T, K) (ending at T-1, pure noise), the very steps a
K-step student takes; respaced DDPM uses space_timesteps(T, "K"). Students are the exports of the rounds listed
in OUT/distill.json (or given by --students). Quality: the Frechet distance between pixel features
(evaluations.features `pixels`: pixels in [0, 1], area-downsampled to <= 32 px) of the samples and of the reference
images (npz arr_0 uint8 [N, H, W, 3]). Writes DIR/sweep_steps.md/.json/.png and every batch of samples as
DIR/samples/<name>.npz (arr_0 uint8 [N, H, W, 3]); batches already there are reused, so a re-run only adds rows.

Class-conditional models sample balanced labels (image i asks for class i mod K, stored as arr_1), the teacher with
classifier-free guidance at --guidance-scale W (0: the plain conditional model); a student distilled at sampled
scales (guidance_embed) takes W as its input, one distilled at a fixed scale carries its own (it gets the labels
only). Unconditional and conditional models cannot be mixed in one sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, flag, run_cli
from data.fsio import atomic_save_npz
from data.seeds import derive_seed
from evaluations.io import check_images, load_npz, save_report
from evaluations.sample import guided


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(model: Any, diffusion: Any, shape: tuple[int, int, int], n: int, *, batch_size: int, seed: int,
                  method: str, device: torch.device, desc: str = "", labels: np.ndarray | None = None) -> np.ndarray:
    """`n` samples uint8 [n, H, W, C]; x_T of image i is the same for every model and sampler (same `seed`), the
    DDPM step noise is drawn per batch from derive_seed(seed, batch). labels: int [n], the y of a conditional
    model (None: unconditional)."""
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    out = []
    for b, i in enumerate(tqdm(range(0, n, batch_size), desc=desc, leave=False)):
        x_T = noise[i:i + batch_size].to(device)
        gb = torch.Generator(device=device).manual_seed(derive_seed(seed, b))
        kwargs = {} if labels is None else {"y": torch.from_numpy(labels[i:i + batch_size]).to(device)}
        with torch.no_grad():
            x = diffusion.sample_loop_progressive(model, tuple(x_T.shape), method=method, noise=x_T, generator=gb,
                                                  model_kwargs=kwargs)
            for step in x:
                last = step["sample"]
        out.append(to_uint8(last))
    return np.concatenate(out)


def pixel_fd(images: np.ndarray, ref_stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Frechet distance of pixel features (evaluations.features `pixels`) to the reference statistics."""
    from evaluations.features import create_extractor, extract
    from evaluations.metrics import frechet_distance
    f = extract(images, create_extractor("pixels"), batch_size=256)
    return float(frechet_distance(f["mu"], f["sigma"], *ref_stats))


def plan(teacher: str, students: list[tuple[str, int]], ddim: list[int], ddpm: list[int]) -> list[dict[str, Any]]:
    """The rows to fill: (sampler, steps, model path, sample file stem)."""
    rows = [{"sampler": "teacher DDIM", "steps": k, "model": teacher, "name": f"teacher_ddim{k}"} for k in ddim]
    rows += [{"sampler": "teacher DDPM", "steps": k, "model": teacher, "name": f"teacher_ddpm{k}"} for k in ddpm]
    rows += [{"sampler": "student", "steps": k, "model": p, "name": f"student{k}"} for p, k in students]
    return rows


def students_of(distill_dir: str) -> list[tuple[str, int]]:
    """(export, steps) of every halving round recorded in DISTILL_DIR/distill.json."""
    path = os.path.join(distill_dir, "distill.json")
    if not os.path.isfile(path):
        raise UsageError(f"--distill-dir {distill_dir}: no distill.json (run python -m trainer.distill first)")
    with open(path) as f:
        rounds = json.load(f)["rounds"]
    return [(os.path.join(r["run_dir"], "model.safetensors"), int(r["student_steps"])) for r in rounds
            if r["substeps"] == 2]


def guidance_of(meta: dict[str, Any], scale: float) -> str:
    """How a model of this export is guided at `scale` (evaluations.sample.guided applies it, and refuses what
    cannot be): "" for an unconditional model, "input w W" for a student distilled at sampled scales
    (guidance_embed), "as distilled" for one distilled at a fixed scale (labels only), "CFG w W" or "conditional"
    (W = 0) for a class-conditional teacher."""
    m = meta["model"]
    if m.get("num_classes") is None:
        return ""
    if m.get("guidance_embed"):
        return f"input w {scale:g}"
    if meta["diffusion"].get("distilled_steps"):
        return "as distilled"
    return f"CFG w {scale:g}" if scale else "conditional"


def row_scale(how: str, scale: float) -> float:
    """The scale a row's model is sampled at: a student distilled at a fixed scale carries its own (0 here)."""
    return 0.0 if how == "as distilled" else scale


def run_row(row: dict[str, Any], out_dir: str, n: int, batch_size: int, seed: int, device: torch.device,
            guidance_scale: float = 0.0) -> np.ndarray:
    """Sample one row (or reuse its npz); fills row['seconds'] and row['samples']. A conditional model's image i
    asks for class i mod K, guided as row['guidance'] (guidance_of) says."""
    from diffusion import create_diffusion
    from evaluations.io import load_model
    path = os.path.join(out_dir, "samples", row["name"] + ".npz")
    row["samples"] = path
    if os.path.isfile(path):
        images = check_images(load_npz(path)["arr_0"], path)
        if images.shape[0] >= n:
            row.setdefault("seconds", None)
            return images[:n]
    model, _, meta = load_model(row["model"], device, what="--teacher/--students")
    k_classes, how = meta["model"].get("num_classes"), row.get("guidance", "")
    labels = None if k_classes is None else np.arange(n, dtype=np.int64) % int(k_classes)
    net = guided(model, meta, row_scale(how, guidance_scale), row["model"])
    dkw = {k: v for k, v in meta["diffusion"].items() if k != "timestep_respacing"}
    k = row["steps"]
    try:
        if row["sampler"] == "teacher DDPM":
            diffusion = create_diffusion(**dkw, timestep_respacing=str(k))
        else:  # DDIM on the K-step grid (a student's own steps)
            diffusion = create_diffusion(**{**dkw, "distilled_steps": k})
    except ValueError as e:
        raise UsageError(f"{row['name']}: {e}") from None
    m = meta["model"]
    t0 = time.perf_counter()
    images = sample_images(net, diffusion, (m.get("in_channels", 3), m["image_size"], m["image_size"]), n,
                           batch_size=batch_size, seed=seed, method="ddpm" if "DDPM" in row["sampler"] else "ddim",
                           device=device, desc=row["name"], labels=labels)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save_npz(path, arr_0=images, **({} if labels is None else {"arr_1": labels}))
    return images


def sweep(teacher: str, reference: str, out_dir: str, *, students: list[tuple[str, int]], ddim: list[int],
          ddpm: list[int], num_samples: int = 500, batch_size: int = 250, seed: int = 0,
          device: str | torch.device = "cpu", scorers: dict[str, Any] | None = None,
          guidance_scale: float = 0.0) -> dict[str, Any]:
    """Fill every row (pixel FD, seconds, plus `scorers[name](images) -> float`; a conditional model's images ask
    for classes i mod K) and write the report."""
    from evaluations.features import create_extractor, extract
    ref = check_images(load_npz(reference)["arr_0"], f"{reference} arr_0")
    rf = extract(ref, create_extractor("pixels"), batch_size=256)
    rows = plan(teacher, students, ddim, ddpm)
    metas = [_meta(r["model"]) for r in rows]
    if len({m["model"].get("num_classes") is None for m in metas}) > 1:
        raise UsageError("the teacher and the students must all be class-conditional or all unconditional")
    for row, meta in zip(rows, metas):
        how = guidance_of(meta, guidance_scale)
        guided(None, meta, row_scale(how, guidance_scale), row["model"])  # refuses what cannot apply, before sampling
        if how:  # conditional: the scale is part of the name, so a re-run at another scale does not reuse samples
            row["guidance"], row["name"] = how, f"{row['name']}_w{guidance_scale:g}"
    for row in rows:
        images = run_row(row, out_dir, num_samples, batch_size, seed, torch.device(device), guidance_scale)
        row["fd_pixels"] = round(pixel_fd(images, (rf["mu"], rf["sigma"])), 3)
        for name, fn in (scorers or {}).items():
            row[name] = fn(images)
        print(f"sweep_steps: {row['name']}: FD(pixels) {row['fd_pixels']}", flush=True)
    report = {"teacher": os.path.abspath(teacher), "reference": os.path.abspath(reference),
              "reference_images": int(ref.shape[0]), "num_samples": num_samples, "seed": seed,
              "guidance_scale": guidance_scale, "rows": rows}
    save_report(out_dir, report, stem="sweep_steps", markdown=markdown, plot=plot, png="sweep_steps.png")
    return report


def _meta(path: str) -> dict[str, Any]:
    """An export's model.json (UsageError when it cannot be read)."""
    from trainer.export import json_path_for
    try:
        with open(json_path_for(path)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--teacher/--students {path}: not a readable export (its model.json: {e})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), dict) and isinstance(meta.get("diffusion"), dict)):
        raise UsageError(f"--teacher/--students {path}: its model.json has no model and diffusion sections")
    return meta


def markdown(report: dict[str, Any]) -> str:
    extra = [k for k in report["rows"][0] if k not in ("sampler", "steps", "model", "name", "samples", "seconds",
                                                       "fd_pixels")] if report["rows"] else []
    lines = [f"# Sample quality against sampling steps ({report['num_samples']} samples each, same noise)", "",
             f"Reference: `{report['reference']}` ({report['reference_images']} images). Teacher: "
             f"`{report['teacher']}`.", "",
             "| sampler | steps | FD (pixels) | " + " | ".join(extra) + (" | " if extra else "") + "seconds |",
             "|---|---:|---:|" + "---:|" * len(extra) + "---:|"]
    for r in report["rows"]:
        vals = " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in extra)
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['fd_pixels']:.3f} | " + (vals + " | " if extra else "")
                     + f"{r['seconds'] if r['seconds'] is not None else 'reused'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, marker in (("teacher DDIM", "o"), ("teacher DDPM", "s"), ("student", "*")):
        pts = sorted((r["steps"], r["fd_pixels"]) for r in report["rows"] if r["sampler"] == sampler)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=sampler)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("Frechet distance (pixels)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} {text!r}: give comma-separated step counts, e.g. 4,8,16") from None
    if any(v < 1 for v in vals):
        raise UsageError(f"{name} {text!r}: step counts must be positive")
    return vals


def _main(argv: list[str] | None) -> int:
    doc = __doc__ or ""
    p = ArgumentParser(prog="python -m evaluations.sweep_steps", description=doc.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n", 2)[2])
    p.add_argument("--teacher", required=True, help="exported teacher (model.safetensors)")
    p.add_argument("--distill-dir", default=None, help="trainer.distill output folder (its distill.json)")
    p.add_argument("--students", nargs="*", default=[], help="student exports (their steps read from their JSON)")
    p.add_argument("--reference", required=True, help="real images, npz arr_0 uint8 [N, H, W, 3]")
    p.add_argument("--ddim", default="4,8,16,32,64,128,256", help="teacher DDIM step counts")
    p.add_argument("--ddpm", default="", help="teacher respaced-DDPM step counts (empty: none)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=0.0,
                   help="classifier-free guidance scale w of a class-conditional teacher, and the input w of students "
                        "distilled at sampled scales (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", required=True)
    flag(p, "--progress", True, "progress bars")
    a = p.parse_args(argv)
    if a.num_samples < 2 or a.batch_size < 1:
        raise UsageError("--num-samples must be >= 2 and --batch-size >= 1")
    students = students_of(a.distill_dir) if a.distill_dir else []
    for s in a.students:
        from trainer.export import json_path_for
        if not os.path.isfile(json_path_for(s)):
            raise UsageError(f"--students {s}: no such export (model.json beside it)")
        with open(json_path_for(s)) as f:
            students.append((s, int(json.load(f)["diffusion"].get("distilled_steps") or 0)))
    if any(k == 0 for _, k in students):
        raise UsageError("--students: every student must be a distilled export (diffusion.distilled_steps)")
    if not a.progress:
        os.environ["TQDM_DISABLE"] = "1"
    md = sweep(a.teacher, a.reference, a.out_dir, students=students, ddim=_ints(a.ddim, "--ddim"),
               ddpm=_ints(a.ddpm, "--ddpm"), num_samples=a.num_samples, batch_size=a.batch_size, seed=a.seed,
               device=a.device, guidance_scale=a.guidance_scale)
    print(markdown(md))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, "evaluations.sweep_steps", argv)


if __name__ == "__main__":
    sys.exit(main())
