"""Negative log-likelihood (the variational bound) in bits/dim on held-out shards, on any number of ranks.

    python -m evaluations.nll --model model.safetensors --data SOURCE --out-dir DIR [--respace 100]

Every image of SOURCE (a manifest, shard pattern or list, read by data.stream.EvalStream) is evaluated exactly once
across ranks: total = L_prior + sum_t L_t, where L_0 = -log p(x_0 | x_1) is the discretised decoder term and
L_t (t > 0) = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), each in bits/dim. With --respace the bound of the
shorter process is evaluated (a valid, looser bound). Writes DIR/nll.json (mean, standard error, prior and decoder
terms), DIR/nll.md, DIR/nll_terms.csv and DIR/nll_terms.png (mean L_t against t) and DIR/per_image.npz
(index, total, prior, decoder per image).

A VDM (`--objective vdm`, Kingma et al. 2021) is evaluated in continuous time (--respace T: the T-step loss) with
--t-samples stratified times per image; the per-step rows are then bins of t, the decoder term is -log p(x | z_0),
and DIR/snr.png shows the learned log SNR(t) against cosine and linear.

From Python, `nll(model, data, ...)` returns the per-image numbers, the mean L_t per step and the report (on rank 0)
and writes nothing.
"""
from __future__ import annotations

import datetime
import io
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, exit_without_teardown, run_cli
from data.fsio import atomic_save_npz, atomic_write_bytes, atomic_write_json, atomic_write_text
from data.seeds import derive_seed
from evaluations import dist
from evaluations.io import inference_parser, load_model
from trainer.compile import InferenceNet, add_speed_flags, warm_up
from evaluations.vdm_nll import VDMBound, is_vdm, load_vdm, markdown_lines, snr_png
from trainer.sync import gather_rows

PROG = "evaluations.nll"


@dataclass(frozen=True)
class NLL:
    """What `nll` returns on rank 0. Per-image arrays are sorted by dataset index; all values in bits/dim."""
    index: np.ndarray                   # int64 [n] dataset index of each image
    total_bpd: np.ndarray               # float64 [n] the bound L_prior + sum_t L_t
    prior_bpd: np.ndarray               # float64 [n] L_prior = KL(q(x_T | x_0) || N(0, I))
    decoder_bpd: np.ndarray             # float64 [n] L_0 = -log p(x_0 | x_1)
    terms_bpd: np.ndarray               # float64 [T'] mean L_t over the images, per step of the (respaced) process
    timesteps: np.ndarray               # int64 [T'] original timestep t of each step
    report: dict[str, Any]              # the summary written to nll.json (bpd, bpd_stderr, prior_bpd, ...)


def _open_stream(data: str, batch_size: int, ranks: dist.Ranks, image_size: int, resize: str | None = None):
    """This rank's share of `data` (data.stream.EvalStream), checked against the model's image size; `resize`
    (a data.decode.RESIZERS method): images of another size are resized to the model's when read."""
    from data.errors import DataError
    from data.stream import EvalStream
    try:
        stream = EvalStream(data, batch_size, rank=ranks.rank, world_size=ranks.world,
                            image_size=image_size if resize else None, resize=resize or "adm")
    except (DataError, ValueError, OSError) as e:
        raise UsageError(f"--data {data}: {e}") from None
    if stream.image_size is not None and tuple(stream.image_size)[-1] != image_size:
        raise UsageError(f"--data images are {stream.image_size} but the model takes {image_size}x{image_size}")
    return stream


def _bound_share(model, diffusion, stream, *, expected: int, conditional: bool, clip: bool, seed: int,
                 device: torch.device, ranks: dist.Ranks, progress: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's images (index < expected) -> (rows [n_r, 4] = index, total, prior, decoder; sum of L_t [T']
    over its images; seconds). The forward-process noise comes from a CPU generator seeded by (seed, rank)."""
    g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, ranks.rank))
    rows, vb_sum = [], torch.zeros(diffusion.num_timesteps, dtype=torch.float64)
    bar = None
    if ranks.is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=(expected * (ranks.rank + 1) // ranks.world) - (expected * ranks.rank // ranks.world),
                   desc=f"bits/dim ({ranks.world} rank{'s' if ranks.world > 1 else ''})", unit="img")
    t0 = time.time()
    for x, y, idx in stream:
        keep = idx < expected
        if not bool(keep.any()):
            continue
        x, y, idx = x[keep].to(device), y[keep].to(device), idx[keep]
        out = diffusion.calc_bpd_loop(model, x, clip_denoised=clip, model_kwargs={"y": y} if conditional else None,
                                      generator=g)
        vb = out["vb"].double().cpu()
        vb_sum += vb.sum(0)
        rows.append(torch.stack([idx.double(), out["total_bpd"].double().cpu(), out["prior_bpd"].double().cpu(),
                                 vb[:, 0]], dim=1))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    local = torch.cat(rows) if rows else torch.zeros((0, 4), dtype=torch.float64)
    return local, vb_sum, time.time() - t0


def nll(model: str, data: str, *, respace: str | None = None, batch_size: int = 32, num_images: int | None = None,
        seed: int = 0, clip: bool = True, device: str | None = None, threads: int | None = None,
        progress: bool = True, resize: str | None = None, t_samples: int = 16, compile: bool | str = False,
        precision: str = "fp32") -> NLL | None:
    """The variational bound in bits/dim of exported weights `model` on every image of `data`, over all ranks.

    data: held-out shards (manifest, brace pattern or path list); respace: the bound of a respaced process
    (e.g. "100"; default all T steps); batch_size: images per batch per rank; num_images: only the first N images;
    seed: forward-process noise of rank r from derive_seed(seed, r); clip: clip predicted x_0 to [-1, 1];
    device: default this rank's GPU, else CPU; threads: torch CPU threads; resize: "adm" or "area" resizes images
    of another size to the model's when read (as training's --data-image-size; default: used as stored).
    A VDM (trainer.vdm) is evaluated by evaluations.vdm_nll: `t_samples` stratified times per image, respace "T"
    the T-step loss instead of the continuous-time one.
    compile: torch.compile the model (warmed up before the timer starts); precision: "fp32" or "bf16" autocast
    where the device supports it (trainer.compile.InferenceNet; Improved-DDPM models only).
    With several ranks a gloo process group is opened and left open (`evaluations.dist.shutdown` closes it).
    Returns `NLL` on rank 0 (after checking that every image was evaluated exactly once) and None elsewhere.
    """
    if batch_size < 1 or (num_images is not None and num_images < 1):
        raise UsageError("--batch-size and --num-images must be positive integers")
    ranks, dev = dist.init(device, threads)
    if is_vdm(model):
        if compile or precision != "fp32":
            raise UsageError("--compile/--precision apply to Improved-DDPM models, not to a VDM")
        if respace and not str(respace).isdigit():
            raise UsageError(f"--respace {respace}: a VDM takes a number of steps T (the T-step loss)")
        net, meta = load_vdm(model, dev)
        diffusion = VDMBound(t_samples, int(respace or 0))
    else:
        net, diffusion, meta = load_model(model, dev, respace or "", what=f"--respace {respace}")
        if meta["model"].get("guidance_embed"):
            raise UsageError(f"--model {model} is guidance-distilled (a few-step student that takes a guidance scale "
                             f"w): it defines no likelihood bound; evaluate its samples (evaluations.sample)")
        net = InferenceNet(net, dev, compile=compile, precision=precision)
        if compile:  # the batch shape compiles here, outside the timed loop
            warm_up(net, [batch_size], (meta["model"].get("in_channels", 3),) + (meta["model"]["image_size"],) * 2,
                    dev, meta["model"].get("num_classes"))
    stream = _open_stream(data, batch_size, ranks, meta["model"]["image_size"], resize)
    expected = stream.total if num_images is None else min(num_images, stream.total)
    local, vb_sum, elapsed = _bound_share(net, diffusion, stream, expected=expected, clip=clip, seed=seed,
                                          conditional=meta["model"].get("num_classes") is not None, device=dev,
                                          ranks=ranks, progress=progress)
    everything = gather_rows(local)
    vb_total = dist.all_reduce_sum(vb_sum)
    bad = int(dist.all_reduce_sum(torch.tensor([stream.bad_samples], dtype=torch.int64)).item())
    wall = float(gather_rows(torch.tensor([[elapsed]], dtype=torch.float64)).max())
    if not ranks.is_main:
        return None
    idx = everything[:, 0].long().numpy()
    n = len(idx)
    if n == 0:
        raise UsageError(f"--data {data}: no images were evaluated")
    if len(np.unique(idx)) != n:
        raise RuntimeError(f"an image was evaluated twice across ranks ({n - len(np.unique(idx))} duplicates)")
    if n + bad < expected:
        raise RuntimeError(f"only {n} of {expected} images were evaluated ({bad} unreadable)")
    order = np.argsort(idx)
    total, prior, decoder = (everything[order, j].numpy() for j in (1, 2, 3))
    terms = (vb_total / n).numpy()
    T = diffusion.num_timesteps
    report = {
        "model": os.path.abspath(model), "model_step": meta.get("step"), "model_ema": meta.get("ema"),
        "data": data, "images": n, "bad_samples": bad, "ranks": ranks.world, "device": str(dev),
        "timesteps": T, "timestep_respacing": respace or "", "clip_denoised": clip,
        "bpd": float(total.mean()),
        "bpd_stderr": float(total.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
        "prior_bpd": float(prior.mean()), "decoder_bpd": float(decoder.mean()),
        "vb_terms_bpd": float(terms.sum()), "seconds": round(wall, 3),
        "images_per_second": round(n / wall, 4) if wall > 0 else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if isinstance(diffusion, VDMBound):
        report.update(diffusion.report())
    tmap = np.asarray(getattr(diffusion, "timestep_map", np.arange(T)), dtype=np.int64)
    return NLL(idx[order], total, prior, decoder, terms, tmap, report)


# ------------------------------------------------------------------------------------------------ outputs

def markdown(r: NLL) -> str:
    """nll.md: the summary table and L_t at the first ten and at eleven evenly spaced steps."""
    rep, terms, tmap = r.report, r.terms_bpd, r.timesteps
    share = np.cumsum(terms) / (terms.sum() + rep["prior_bpd"])
    se = "n/a" if rep["bpd_stderr"] is None else f"{rep['bpd_stderr']:.4f}"
    first = max(1, len(terms) // 10)
    md = [f"# NLL of `{rep['model']}` (step {rep['model_step']}, EMA {rep['model_ema']})", "",
          f"Data: `{rep['data']}`, {rep['images']} images ({rep['bad_samples']} unreadable), "
          f"T = {rep['timesteps']}" + (f" (respaced '{rep['timestep_respacing']}')"
                                       if rep["timestep_respacing"] else ""), "",
          "| quantity | bits/dim |", "|---|---:|",
          f"| NLL bound (mean ± standard error) | {rep['bpd']:.4f} ± {se} |",
          f"| prior term L_T | {rep['prior_bpd']:.6f} |",
          f"| decoder term L_0 | {rep['decoder_bpd']:.4f} |",
          f"| sum of L_1..L_(T-1) | {rep['vb_terms_bpd'] - rep['decoder_bpd']:.4f} |",
          f"| first {first} steps' share of the bound | {share[first - 1]:.3f} |", "",
          f"{rep['seconds']:.1f} s on {rep['ranks']} rank(s), device {rep['device']}. "
          f"Every step: nll_terms.csv and nll_terms.png.", "",
          "| step | t | mean L_t (bits/dim) | cumulative share of the bound |", "|---:|---:|---:|---:|"]
    shown = sorted(set(range(min(10, len(terms)))) | set(np.linspace(0, len(terms) - 1, 11).round().astype(int)))
    md += [f"| {i} | {int(tmap[i])} | {terms[i]:.6f} | {share[i]:.4f} |" for i in shown]
    if rep.get("vdm"):
        md += markdown_lines(rep)
    return "\n".join(md) + "\n"


def plot_terms(r: NLL) -> bytes:
    """nll_terms.png: mean L_t (log scale) and the cumulative share of the bound against t."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    share = np.cumsum(r.terms_bpd) / (r.terms_bpd.sum() + r.report["prior_bpd"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax.semilogy(r.timesteps, np.clip(r.terms_bpd, 1e-12, None), ".-", ms=3)
    ax.set(xlabel="t (original timestep)", ylabel="mean L_t (bits/dim)", title="terms of the variational bound")
    ax2.plot(r.timesteps, share)
    ax2.set(xlabel="t (original timestep)", ylabel="cumulative share of the bound", ylim=(0, 1.02),
            title=f"bound = {r.report['bpd']:.3f} bits/dim")
    for axis in (ax, ax2):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def save(out_dir: str, r: NLL) -> None:
    """nll.json, nll.md, nll_terms.csv (L_t vs t), nll_terms.png and per_image.npz in `out_dir`, all atomically."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "nll.json"), r.report)
    share = np.cumsum(r.terms_bpd) / (r.terms_bpd.sum() + r.report["prior_bpd"])
    csv = ["step,t,L_t_bpd,cumulative_fraction_of_bound"]
    csv += [f"{i},{int(t)},{v:.8g},{c:.6f}" for i, (t, v, c) in enumerate(zip(r.timesteps, r.terms_bpd, share))]
    atomic_write_text(os.path.join(out_dir, "nll_terms.csv"), "\n".join(csv) + "\n")
    atomic_write_text(os.path.join(out_dir, "nll.md"), markdown(r))
    atomic_save_npz(os.path.join(out_dir, "per_image.npz"), index=r.index.astype(np.int64), total_bpd=r.total_bpd,
                    prior_bpd=r.prior_bpd, decoder_bpd=r.decoder_bpd)
    atomic_write_bytes(os.path.join(out_dir, "nll_terms.png"), plot_terms(r))
    if r.report.get("vdm"):
        atomic_write_bytes(os.path.join(out_dir, "snr.png"), snr_png(r.report))


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> ArgumentParser:
    p = inference_parser(PROG, __doc__)
    p.add_argument("--data", required=True, help="held-out shards: manifest, brace pattern or comma-free path list")
    p.add_argument("--out-dir", required=True, help="folder for nll.json, nll.md, nll_terms.csv/.png, per_image.npz")
    p.add_argument("--respace", default=None,
                   help="evaluate the bound of a respaced process, e.g. 100 (default: full T)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch per rank")
    p.add_argument("--num-images", type=int, default=None, help="only the first N images of SOURCE (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the forward-process noise")
    p.add_argument("--t-samples", type=int, default=16,
                   help="VDM models only: stratified times t per image for the diffusion term (default 16)")
    add_speed_flags(p)
    p.add_argument("--resize", choices=("adm", "area"), default=None,
                   help="centre-crop and resize images of another size to the model's side when read, as training's "
                        "--data-image-size (adm: guided-diffusion's center_crop_arr; default: images as stored)")
    return p


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    try:
        r = nll(a.model, a.data, respace=a.respace, batch_size=a.batch_size, num_images=a.num_images, seed=a.seed,
                clip=a.clip, device=a.device, threads=a.threads, progress=a.progress, resize=a.resize,
                t_samples=a.t_samples, compile=a.compile, precision=a.precision)
    finally:
        dist.shutdown()
    if r is not None:
        save(a.out_dir, r)
        se = r.report["bpd_stderr"]
        print(f"NLL {r.report['bpd']:.4f}" + (f" ± {se:.4f}" if se is not None else "") +
              f" bits/dim over {r.report['images']} images (prior {r.report['prior_bpd']:.5f}, decoder "
              f"{r.report['decoder_bpd']:.4f}); wrote {os.path.join(a.out_dir, 'nll.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    exit_without_teardown(main)  # several ranks: no interpreter teardown after the work is saved (data.cli)
