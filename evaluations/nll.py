"""Negative log-likelihood (the variational bound) in bits/dim on held-out shards, on any number of ranks.

    python -m evaluations.nll --model model.safetensors --data SOURCE --out-dir DIR [--respace 100]

Every image of SOURCE (a manifest, shard pattern or list, read by data.stream.EvalStream) is evaluated exactly once
across ranks: total = L_prior + sum_t L_t, where L_0 = -log p(x_0 | x_1) is the discretised decoder term and
L_t (t > 0) = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), each in bits/dim. With --respace the bound of the
shorter process is evaluated (a valid, looser bound). Writes DIR/nll.json (mean, standard error, prior and decoder
terms), DIR/nll.md, DIR/nll_terms.csv and DIR/nll_terms.png (mean L_t against t) and DIR/per_image.npz
(index, total, prior, decoder per image).
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from evaluations import dist
from evaluations.io import UsageError, load_model, atomic_save_npz, atomic_write, atomic_write_json, atomic_write_text, die

PROG = "evaluations.nll"


def run(a: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate this rank's share; rank 0 gathers, checks every image was seen once, and returns the report."""
    from diffusion import create_diffusion
    from data.stream import EvalStream
    from data.errors import DataError

    ranks = dist.setup()
    device = dist.device_for(ranks, a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, dkw, meta = load_model(a.model, device)
    try:
        diffusion = create_diffusion(**{**dkw, "timestep_respacing": a.respace or ""})
    except ValueError as e:
        raise UsageError(f"--respace {a.respace}: {e}") from None
    try:
        stream = EvalStream(a.data, a.batch_size, rank=ranks.rank, world_size=ranks.world)
    except (DataError, ValueError, OSError) as e:
        raise UsageError(f"--data {a.data}: {e}") from None
    size = meta["model"]["image_size"]
    if stream.image_size is not None and tuple(stream.image_size)[-1] != size:
        raise UsageError(f"--data images are {stream.image_size} but the model takes {size}x{size}")
    expected = stream.total if a.num_images is None else min(a.num_images, stream.total)
    conditional = meta["model"].get("num_classes") is not None
    T = diffusion.num_timesteps
    tmap = np.asarray(getattr(diffusion, "timestep_map", np.arange(T)), dtype=np.int64)

    g = torch.Generator(device="cpu").manual_seed(int(np.random.SeedSequence([a.seed, ranks.rank]).generate_state(1)[0]))
    rows, vb_sum = [], torch.zeros(T, dtype=torch.float64)
    bar = None
    if ranks.is_main and not a.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=(expected * (ranks.rank + 1) // ranks.world) - (expected * ranks.rank // ranks.world),
                   desc=f"bits/dim ({ranks.world} rank{'s' if ranks.world > 1 else ''})", unit="img")
    t0 = time.time()
    for x, y, idx in stream:
        keep = idx < expected
        if not bool(keep.any()):
            continue
        x, y, idx = x[keep].to(device), y[keep].to(device), idx[keep]
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=not a.no_clip,
                                      model_kwargs={"y": y} if conditional else None, generator=g)
        vb = out["vb"].double().cpu()
        vb_sum += vb.sum(0)
        rows.append(torch.stack([idx.double(), out["total_bpd"].double().cpu(), out["prior_bpd"].double().cpu(),
                                 vb[:, 0]], dim=1))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    local = torch.cat(rows) if rows else torch.zeros((0, 4), dtype=torch.float64)
    everything = dist.all_gather_rows(local)
    vb_total = dist.all_reduce_sum(vb_sum)
    bad = int(dist.all_reduce_sum(torch.tensor([stream.bad_samples], dtype=torch.int64)).item())
    wall = float(dist.all_gather_rows(torch.tensor([[elapsed]], dtype=torch.float64)).max())
    if not ranks.is_main:
        return None
    idx = everything[:, 0].long().numpy()
    n = len(idx)
    if n == 0:
        raise UsageError(f"--data {a.data}: no images were evaluated")
    if len(np.unique(idx)) != n:
        raise RuntimeError(f"an image was evaluated twice across ranks ({n - len(np.unique(idx))} duplicates)")
    if n + bad < expected:
        raise RuntimeError(f"only {n} of {expected} images were evaluated ({bad} unreadable)")
    order = np.argsort(idx)
    total, prior, decoder = (everything[order, j].numpy() for j in (1, 2, 3))
    terms = (vb_total / n).numpy()
    report = {
        "model": os.path.abspath(a.model), "model_step": meta.get("step"), "model_ema": meta.get("ema"),
        "data": a.data, "images": n, "bad_samples": bad, "ranks": ranks.world, "device": str(device),
        "timesteps": T, "timestep_respacing": a.respace or "", "clip_denoised": not a.no_clip,
        "bpd": float(total.mean()),
        "bpd_stderr": float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "prior_bpd": float(prior.mean()), "decoder_bpd": float(decoder.mean()),
        "vb_terms_bpd": float(terms.sum()), "seconds": round(wall, 3),
        "images_per_second": round(n / wall, 4) if wall > 0 else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_outputs(a.out_dir, report, terms, tmap, idx[order], total, prior, decoder)
    return report


def write_outputs(out_dir: str, report: dict, terms: np.ndarray, tmap: np.ndarray, idx: np.ndarray,
                  total: np.ndarray, prior: np.ndarray, decoder: np.ndarray) -> None:
    """nll.json, nll.md, nll_terms.csv (L_t vs t), nll_terms.png and per_image.npz, all atomically."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "nll.json"), report)
    share = np.cumsum(terms) / (terms.sum() + report["prior_bpd"])
    csv = ["step,t,L_t_bpd,cumulative_fraction_of_bound"]
    csv += [f"{i},{int(t)},{v:.8g},{c:.6f}" for i, (t, v, c) in enumerate(zip(tmap, terms, share))]
    atomic_write_text(os.path.join(out_dir, "nll_terms.csv"), "\n".join(csv) + "\n")
    se = "n/a" if report["bpd_stderr"] is None else f"{report['bpd_stderr']:.4f}"
    first = max(1, len(terms) // 10)
    md = [f"# NLL of `{report['model']}` (step {report['model_step']}, EMA {report['model_ema']})", "",
          f"Data: `{report['data']}`, {report['images']} images ({report['bad_samples']} unreadable), "
          f"T = {report['timesteps']}" + (f" (respaced '{report['timestep_respacing']}')"
                                          if report["timestep_respacing"] else ""), "",
          "| quantity | bits/dim |", "|---|---:|",
          f"| NLL bound (mean ± standard error) | {report['bpd']:.4f} ± {se} |",
          f"| prior term L_T | {report['prior_bpd']:.6f} |",
          f"| decoder term L_0 | {report['decoder_bpd']:.4f} |",
          f"| sum of L_1..L_(T-1) | {report['vb_terms_bpd'] - report['decoder_bpd']:.4f} |",
          f"| first {first} steps' share of the bound | {share[first - 1]:.3f} |", "",
          f"{report['seconds']:.1f} s on {report['ranks']} rank(s), device {report['device']}. "
          f"Every step: nll_terms.csv and nll_terms.png.", "",
          "| step | t | mean L_t (bits/dim) | cumulative share of the bound |", "|---:|---:|---:|---:|"]
    shown = sorted(set(range(min(10, len(terms)))) | set(np.linspace(0, len(terms) - 1, 11).round().astype(int)))
    md += [f"| {i} | {int(tmap[i])} | {terms[i]:.6f} | {share[i]:.4f} |" for i in shown]
    atomic_write_text(os.path.join(out_dir, "nll.md"), "\n".join(md) + "\n")
    atomic_save_npz(os.path.join(out_dir, "per_image.npz"), index=idx.astype(np.int64), total_bpd=total,
                    prior_bpd=prior, decoder_bpd=decoder)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax.semilogy(tmap, np.clip(terms, 1e-12, None), ".-", ms=3)
    ax.set(xlabel="t (original timestep)", ylabel="mean L_t (bits/dim)", title="terms of the variational bound")
    ax2.plot(tmap, share)
    ax2.set(xlabel="t (original timestep)", ylabel="cumulative share of the bound", ylim=(0, 1.02),
            title=f"bound = {report['bpd']:.3f} bits/dim")
    for axis in (ax, ax2):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
    atomic_write(os.path.join(out_dir, "nll_terms.png"), w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="exported weights (model.safetensors with model.json beside it)")
    p.add_argument("--data", required=True, help="held-out shards: manifest, brace pattern or comma-free path list")
    p.add_argument("--out-dir", required=True, help="folder for nll.json, nll.md, nll_terms.csv/.png, per_image.npz")
    p.add_argument("--respace", default=None, help="evaluate the bound of a respaced process, e.g. 100 (default: full T)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch per rank")
    p.add_argument("--num-images", type=int, default=None, help="only the first N images of SOURCE (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the forward-process noise")
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: this rank's GPU, else CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        if a.batch_size < 1 or (a.num_images is not None and a.num_images < 1):
            raise UsageError("--batch-size and --num-images must be positive integers")
        report = run(a)
    except UsageError as e:
        die(str(e), PROG)
    finally:
        dist.shutdown()
    if report is not None:
        se = report["bpd_stderr"]
        print(f"NLL {report['bpd']:.4f}" + (f" ± {se:.4f}" if se is not None else "") +
              f" bits/dim over {report['images']} images (prior {report['prior_bpd']:.5f}, decoder "
              f"{report['decoder_bpd']:.4f}); wrote {os.path.join(a.out_dir, 'nll.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
