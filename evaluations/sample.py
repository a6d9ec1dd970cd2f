"""Draw N samples from an exported model on any number of ranks into one npz (guided-diffusion's format).

    python -m evaluations.sample --model model.safetensors --num-samples N --batch-size B --out samples.npz \
        [--respace 250 | --ddim 50 --eta 0] [--guidance-scale W] [--labels LABELS.npy | --class-label K] [--seed S]

Launch with python, torchrun/deepspeed, srun or mpiexec: the N samples are cut into ceil(N / B) global batches and
batch b runs on rank b % world. Batch b draws its labels, x_T and every sampler noise from a CPU generator seeded by
(seed, b), so the result does not depend on the number of ranks or on the device's RNG. Each finished batch is saved
atomically under OUT.parts/; a killed job re-run with the same command keeps them and does the rest. Rank 0 then
writes OUT (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N] for class-conditional models) and OUT.json
(settings, throughput) atomically, and removes OUT.parts/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np
import torch

from evaluations import dist
from evaluations.io import UsageError, load_model, atomic_save_npz, atomic_write_json, die, load_npz

PROG = "evaluations.sample"


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed for global batch `batch`, independent of ranks (SeedSequence mixing, no collisions in practice)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (rounded to the nearest of 256 levels)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_labels(path: str, n: int, num_classes: int) -> np.ndarray:
    """Integer labels [>= n] from .npy/.npz (first array, or arr_1 when the file is a sample batch)."""
    arrays = load_npz(path)
    y = arrays.get("arr_1", next(iter(arrays.values())))
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"--labels {path}: expected a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) < n:
        raise UsageError(f"--labels {path}: holds {len(y)} labels but --num-samples is {n}")
    if y.min() < 0 or y.max() >= num_classes:
        raise UsageError(f"--labels {path}: labels must lie in [0, {num_classes - 1}], got [{y.min()}, {y.max()}]")
    return y[:n].astype(np.int64)


def settings_of(a: argparse.Namespace, meta: dict) -> dict[str, Any]:
    """Everything that determines the samples; parts on disk are only reused when this matches."""
    return {"model": os.path.abspath(a.model), "model_step": meta.get("step"), "model_ema": meta.get("ema"),
            "num_samples": a.num_samples, "batch_size": a.batch_size, "seed": a.seed,
            "sampler": "ddim" if a.ddim else "ddpm", "timestep_respacing": respacing_of(a), "eta": a.eta,
            "guidance_scale": a.guidance_scale, "clip_denoised": not a.no_clip, "class_label": a.class_label,
            "labels": a.labels_digest}


def respacing_of(a: argparse.Namespace) -> str:
    return f"ddim{a.ddim}" if a.ddim else (a.respace or "")


def sample_batch(diffusion, model, shape: tuple[int, ...], seed: int, *, num_classes: int | None,
                 labels: np.ndarray | None, ddim: bool, eta: float, clip: bool, device: torch.device
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch: labels (uniform unless given), x_T and step noise from a CPU generator seeded by `seed`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = {}
    y = None
    if num_classes is not None:
        y = torch.from_numpy(labels) if labels is not None else torch.randint(num_classes, (shape[0],), generator=g)
        kwargs["y"] = y.to(device)
    noise = torch.randn(shape, generator=g).to(device)
    common = dict(noise=noise, clip_denoised=clip, model_kwargs=kwargs, device=device, generator=g)
    with torch.no_grad():
        x = diffusion.ddim_sample_loop(model, shape, eta=eta, **common) if ddim else \
            diffusion.p_sample_loop(model, shape, **common)
    return to_uint8(x), (y.numpy().astype(np.int64) if y is not None else None)


def _part(parts: str, b: int) -> str:
    return os.path.join(parts, f"batch-{b:07d}.npz")


def _read_part(path: str, n: int) -> dict[str, np.ndarray] | None:
    try:
        arr = load_npz(path)
    except UsageError:
        return None
    return arr if "arr_0" in arr and arr["arr_0"].shape[0] == n and arr["arr_0"].dtype == np.uint8 else None


def run(a: argparse.Namespace) -> dict[str, Any] | None:
    """Sample on this rank; rank 0 assembles the output. Returns rank 0's report (None elsewhere)."""
    from diffusion import create_diffusion
    from diffusion.guidance import ClassifierFreeGuidance

    ranks = dist.setup()
    device = dist.device_for(ranks, a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, dkw, meta = load_model(a.model, device)
    num_classes = meta["model"].get("num_classes")
    try:
        diffusion = create_diffusion(**{**dkw, "timestep_respacing": respacing_of(a)})
    except ValueError as e:                     # e.g. a respacing that does not divide the process
        raise UsageError(f"--respace/--ddim: {e}") from None
    labels_all = None
    if a.labels or a.class_label is not None:
        if num_classes is None:
            raise UsageError("--labels/--class-label given but the model is unconditional")
        if a.labels:
            labels_all = load_labels(a.labels, a.num_samples, num_classes)
        else:
            if not 0 <= a.class_label < num_classes:
                raise UsageError(f"--class-label {a.class_label}: must lie in [0, {num_classes - 1}]")
            labels_all = np.full(a.num_samples, a.class_label, dtype=np.int64)
    a.labels_digest = hashlib.sha256(labels_all.tobytes()).hexdigest()[:16] if labels_all is not None else None
    net = model
    if a.guidance_scale:
        if num_classes is None:
            raise UsageError("--guidance-scale needs a class-conditional model (this one is unconditional)")
        net = ClassifierFreeGuidance(model, a.guidance_scale, num_classes)

    settings = settings_of(a, meta)
    parts, jpath = a.out + ".parts", os.path.splitext(a.out)[0] + ".json"
    if os.path.isfile(a.out) and os.path.isfile(jpath) and not os.path.isdir(parts):
        with open(jpath) as f:
            done = json.load(f)
        if done.get("settings") == settings:      # finished earlier with the same settings: nothing to do
            return {**done, "sampled_this_run": 0, "images_per_second": None} if ranks.is_main else None
    problem = None
    if ranks.is_main:
        os.makedirs(parts, exist_ok=True)
        cfg = os.path.join(parts, "settings.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                old = json.load(f)
            if old != settings:
                diff = sorted(k for k in settings if old.get(k) != settings[k])
                problem = (f"{parts} holds batches made with other settings ({', '.join(diff)}); "
                           f"delete it or use another --out")
        else:
            atomic_write_json(cfg, settings)
    # Every rank learns whether rank 0 found a problem, so none is left waiting at a barrier.
    if dist.all_reduce_sum(torch.tensor([problem is not None], dtype=torch.int64)).item():
        raise UsageError(problem or "rank 0 refused the existing parts folder (see its message)")
    hidden = not os.path.isfile(os.path.join(parts, "settings.json"))
    if dist.all_reduce_sum(torch.tensor([hidden], dtype=torch.int64)).item():
        raise UsageError(f"{parts} is not visible from every rank; --out must be on a shared file system")

    n, bs = a.num_samples, a.batch_size
    n_batches = (n + bs - 1) // bs
    mine = [b for b in range(ranks.rank, n_batches, ranks.world)]
    todo = [b for b in mine if _read_part(_part(parts, b), min(bs, n - b * bs)) is None]
    c, h = meta["model"].get("in_channels", 3), meta["model"]["image_size"]
    it = todo
    if ranks.is_main and not a.no_progress:
        from tqdm import tqdm
        it = tqdm(todo, desc=f"sampling ({ranks.world} rank{'s' if ranks.world > 1 else ''})", unit="batch")
    t0, made = time.time(), 0
    for b in it:
        m = min(bs, n - b * bs)
        imgs, ys = sample_batch(diffusion, net, (m, c, h, h), batch_seed(a.seed, b), num_classes=num_classes,
                                labels=None if labels_all is None else labels_all[b * bs:b * bs + m],
                                ddim=bool(a.ddim), eta=a.eta, clip=not a.no_clip, device=device)
        atomic_save_npz(_part(parts, b), arr_0=imgs, **({"arr_1": ys} if ys is not None else {}))
        made += m
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.time() - t0
    stats = dist.all_gather_rows(torch.tensor([[made, len(mine) - len(todo), elapsed]], dtype=torch.float64))
    dist.barrier()
    if not ranks.is_main:
        return None
    xs, ys = [], []
    for b in range(n_batches):
        part = _read_part(_part(parts, b), min(bs, n - b * bs))
        if part is None:
            raise UsageError(f"batch {b} is missing from {parts} after all ranks finished (shared file system?)")
        xs.append(part["arr_0"])
        if "arr_1" in part:
            ys.append(part["arr_1"])
    out = {"arr_0": np.concatenate(xs)}
    if ys:
        out["arr_1"] = np.concatenate(ys)
    atomic_save_npz(a.out, **out)
    made_total, resumed, wall = int(stats[:, 0].sum()), int(stats[:, 1].sum()), float(stats[:, 2].max())
    report = {"settings": settings, "out": os.path.abspath(a.out), "shape": list(out["arr_0"].shape),
              "ranks": ranks.world, "device": str(device), "sampled_this_run": made_total,
              "resumed_batches": resumed, "seconds": round(wall, 3),
              "images_per_second": round(made_total / wall, 3) if wall > 0 and made_total else None,
              "model_steps_per_image": diffusion.num_timesteps * (2 if a.guidance_scale else 1)}
    atomic_write_json(jpath, report)
    shutil.rmtree(parts, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="exported weights (model.safetensors with model.json beside it)")
    p.add_argument("--num-samples", type=int, required=True, help="total number of images N")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (global batches are split over ranks)")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 [N,H,W,3], arr_1 labels)")
    p.add_argument("--respace", default=None, help="respaced DDPM, e.g. 250, 100, 50 or '10,15,20' (default: full T)")
    p.add_argument("--ddim", type=int, default=None, help="DDIM with this many steps (respacing 'ddimN')")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance scale w (0 = off)")
    p.add_argument("--labels", default=None, help=".npy/.npz of N integer labels (default: uniform random)")
    p.add_argument("--class-label", type=int, default=None, help="sample only this class")
    p.add_argument("--seed", type=int, default=0, help="base seed; batch b uses a seed derived from (seed, b)")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: this rank's GPU, else CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        if a.num_samples < 1 or a.batch_size < 1:
            raise UsageError("--num-samples and --batch-size must be positive integers")
        if a.ddim is not None and a.respace:
            raise UsageError("--ddim N already sets the respacing ('ddimN'); drop --respace")
        if a.ddim is not None and a.ddim < 1:
            raise UsageError(f"--ddim {a.ddim}: the number of DDIM steps must be positive")
        if a.eta < 0 or (a.eta and not a.ddim):
            raise UsageError("--eta must be >= 0 and only applies with --ddim")
        if a.guidance_scale < 0:
            raise UsageError("--guidance-scale must be >= 0")
        if a.labels and a.class_label is not None:
            raise UsageError("give either --labels or --class-label, not both")
        if not a.out.endswith(".npz"):
            raise UsageError(f"--out {a.out}: the file name must end in .npz")
        report = run(a)
    except UsageError as e:
        die(str(e), PROG)
    finally:
        dist.shutdown()
    if report is not None:
        ips = report["images_per_second"]
        print(f"wrote {report['out']} {tuple(report['shape'])}: {report['sampled_this_run']} images sampled on "
              f"{report['ranks']} rank(s) in {report['seconds']:.1f} s"
              + (f" ({ips:.2f} images/s)" if ips else "") + (f", {report['resumed_batches']} batches resumed"
                                                            if report["resumed_batches"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
