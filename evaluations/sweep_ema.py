"""Post-hoc EMA sweep (EDM2): reconstruct a run's weights for several EMA lengths and measure each.

    python -m evaluations.sweep_ema RUN_DIR --sigma-rel 0.02,0.05,0.1 --data VAL_SOURCE --out-dir DIR \
        [--num-samples 1000] [--batch-size 64] [--respace 50] [--features pixels|standin|inception] \
        [--reference REF.npz] [--nll-images N] [--seed 0] [--guidance-scale W] [--at-step N]

RUN_DIR holds the power-EMA snapshots of a run trained with post-hoc EMA tracking (RUN_DIR/phema/) and a
checkpoint (its meta.json gives the model and diffusion config). For every sigma_rel (the averaging profile's
std / age), the weights are reconstructed (trainer.phema.reconstruct) and exported to
DIR/models/phema_{s}.safetensors (+ .json); then

  bits/dim   the NLL bound on the held-out VAL_SOURCE (evaluations.nll, the first --nll-images images),
  samples    --num-samples images (evaluations.sample, DIR/samples/phema_{s}.npz); for a class-conditional model
             the labels are balanced over the classes, and the seed is the same for every length, so every length
             sees the same labels and the same noise,
  quality    FID, precision and recall (evaluations.evaluate) against --reference, or against DIR/reference.npz
             made once from all VAL_SOURCE images (uint8 [N, H, W, 3]).

--respace sets the sampler's steps and the process whose bound is evaluated (a respaced bound is valid, but looser
than the full T). Writes DIR/sweep_ema.md (table; the best length by FID and by NLL), DIR/sweep_ema.json and
DIR/sweep_ema.png (FID and bits/dim against sigma_rel), atomically. Each finished length is kept in
DIR/rows/phema_{s}.json and reused when the sweep is re-run with the same settings.

From Python, `sweep_ema(run_dir, sigma_rels, data=..., out_dir=...)` does the same and returns the report dict.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, exit_without_teardown, flag, run_cli
from data.fsio import atomic_save_npz, atomic_write, atomic_write_json
from evaluations import dist
from evaluations.features import FEATURES
from evaluations.io import save_report

PROG = "evaluations.sweep_ema"
K = 3                                       # nearest neighbours of precision / recall (evaluate's default)


def parse_sigma_rels(sigma_rels: str | Sequence[str | float]) -> list[str]:
    """"0.02,0.05" or a list -> sigma_rels as strings (spelling kept for file names), each checked to lie in
    (0, trainer.phema.SIGMA_REL_MAX]; a repeated value is dropped."""
    from trainer.phema import check_sigma_rel
    items = sigma_rels.split(",") if isinstance(sigma_rels, str) else list(sigma_rels)
    out: list[str] = []
    for item in items:
        s = str(item).strip()
        if not s or "/" in s:
            raise UsageError(f"--sigma-rel {sigma_rels!r}: give comma-separated numbers such as 0.02,0.05,0.1")
        v = check_sigma_rel(s)
        if all(float(o) != v for o in out):
            out.append(s)
    if not out:
        raise UsageError("--sigma-rel: no EMA length given; e.g. --sigma-rel 0.02,0.05,0.1")
    return out


def _open_data(data: str, image_size: int):
    """data.stream.EvalStream over all of `data` (one process), checked against the model's image size."""
    from data.errors import DataError
    from data.stream import EvalStream
    try:
        stream = EvalStream(data, 256)
    except (DataError, ValueError, OSError) as e:
        raise UsageError(f"--data {data}: {e}") from None
    if stream.image_size is not None and tuple(stream.image_size) != (image_size, image_size):
        raise UsageError(f"--data images are {tuple(stream.image_size)} but the model takes {image_size}x{image_size}")
    return stream


def make_reference(data: str, path: str, image_size: int) -> int:
    """All images of the held-out `data` -> `path` (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N] when
    labelled, in dataset order) with `path`.json ({"data", "images"}); a file made from the same data is kept.
    Returns N."""
    stream = _open_data(data, image_size)
    side = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(path) and os.path.isfile(side):
        with open(side) as f:
            if json.load(f) == {"data": data, "images": stream.total}:
                return stream.total
    xs, ys, idx = [], [], []
    for x, y, i in stream:                  # x: float32 [B, 3, H, W] in [-1, 1], exactly uint8 / 127.5 - 1
        xs.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
        ys.append(y.numpy())
        idx.append(i.numpy())
    if not xs:
        raise UsageError(f"--data {data}: no readable images")
    order = np.argsort(np.concatenate(idx), kind="stable")
    images, labels = np.concatenate(xs)[order], np.concatenate(ys)[order].astype(np.int64)
    atomic_save_npz(path, arr_0=images, **({"arr_1": labels} if (labels >= 0).all() else {}))
    atomic_write_json(side, {"data": data, "images": stream.total})
    return len(images)


def _check_reference(path: str) -> None:
    from evaluations.io import check_images, load_npz
    arrays = load_npz(path)                 # UsageError for a missing or pickled file
    if "arr_0" not in arrays:
        raise UsageError(f"--reference {path}: needs images (arr_0 uint8 [N, H, W, 3]) for precision/recall")
    check_images(arrays["arr_0"], f"--reference {path} arr_0")
    if len(arrays["arr_0"]) <= K:
        raise UsageError(f"--reference {path}: needs at least {K + 1} images, has {len(arrays['arr_0'])}")


def sweep_ema(run_dir: str, sigma_rels: str | Sequence[str | float], *, data: str, out_dir: str,
              num_samples: int = 1000, batch_size: int = 64, respace: str | None = "50", features: str = "pixels",
              reference: str | None = None, nll_images: int | None = None, seed: int = 0,
              guidance_scale: float = 0.0, device: str | None = None, progress: bool = True,
              at_step: int | None = None, inception_weights: str | None = None) -> dict[str, Any] | None:
    """Reconstruct, export and evaluate the post-hoc EMA of `run_dir` for each sigma_rel; write the reports.

    sigma_rels: "0.02,0.05" or a list, each in (0, 0.3003]; data: held-out shards (manifest, pattern or list) for
    bits/dim and, without `reference`, for the reference batch; out_dir: DIR of the module docstring;
    num_samples / batch_size: images per length and per batch (sampling and NLL); respace: sampler steps and
    respaced bound ("50", "10,15,20"; None or "" = all T); features: "pixels" (default, small images), "standin"
    or "inception" (with `inception_weights`); reference: .npz with arr_0 uint8 [N, H, W, 3]; nll_images: bits/dim
    on the first N held-out images only (default all); seed: the same sampling and NLL seeds for every length;
    guidance_scale: classifier-free guidance w (0 = off); at_step: the step the EMAs end at (default: the last
    snapshot's); device: default the GPU when present.
    Reconstruction holds one fp32 state dict per sigma_rel in memory at once (then exported and dropped).
    Under a multi-rank launch sampling and NLL use every rank; rank 0 writes, and gets the report (others None).
    Returns {"run_dir", "step", "snapshot_steps", "settings", "rows": [{sigma_rel, gamma, bpd, bpd_stderr, fid,
    precision, recall, model, samples, seconds, reused}], "best_fid", "best_nll", "date"}.
    """
    from evaluations.io import file_sha256

    sigmas, meta, snaps, step = _checked_inputs(run_dir, sigma_rels, data=data, num_samples=num_samples,
                                                batch_size=batch_size, nll_images=nll_images, features=features,
                                                reference=reference, at_step=at_step)
    model_cfg = meta["model"]
    ranks = dist.setup()
    main = ranks.is_main
    if reference is None:
        reference = os.path.join(out_dir, "reference.npz")
        if main and make_reference(data, reference, model_cfg["image_size"]) <= K:
            raise UsageError(f"--data {data}: needs at least {K + 1} images for precision/recall")
    settings = {"run_dir": os.path.abspath(run_dir), "step": step, "snapshot_steps": [s.step for s in snaps],
                "data": data, "nll_images": nll_images, "num_samples": num_samples, "batch_size": batch_size,
                "respace": respace or "", "seed": seed, "guidance_scale": guidance_scale, "features": features,
                "inception_weights": inception_weights, "reference": os.path.abspath(reference),
                "reference_sha256": file_sha256(reference) if main else None}
    paths = {s: {k: os.path.join(out_dir, d, f"phema_{s}.{ext}") for k, d, ext in
                 (("model", "models", "safetensors"), ("samples", "samples", "npz"), ("row", "rows", "json"))}
             for s in sigmas}
    rows = {s: r for s in sigmas if main and (r := _cached_row(paths[s]["row"], {**settings, "sigma_rel": s}))}
    # Every rank must agree on the lengths to run (they share sample/nll collectives): rank 0 decides.
    keep = dist.all_reduce_sum(torch.tensor([int(s in rows) for s in sigmas])).tolist()
    todo = [s for s, k in zip(sigmas, keep) if not k]
    if todo and main:
        _export(run_dir, todo, meta, step, at_step, {s: paths[s]["model"] for s in todo})
    dist.barrier()
    num_classes = model_cfg.get("num_classes")
    opts = dict(data=data, reference=reference, out_dir=out_dir, num_samples=num_samples, batch_size=batch_size,
                respace=respace or None, nll_images=nll_images, seed=seed, guidance_scale=guidance_scale,
                features=features, inception_weights=inception_weights, device=device, progress=progress,
                labels=np.arange(num_samples, dtype=np.int64) % num_classes if num_classes else None)
    _measure_lengths(todo, paths, settings, rows, main=main, progress=progress, opts=opts)
    return _report(run_dir, step, settings, rows, sigmas, todo) if main else None


def _measure_lengths(todo: list[str], paths: dict[str, dict[str, str]], settings: dict[str, Any],
                     rows: dict[str, dict], *, main: bool, progress: bool, opts: dict[str, Any]) -> None:
    """Sample and evaluate every length of `todo` (collectives: every rank), each row written as it is done."""
    it: Any = todo
    if progress and main:
        from tqdm import tqdm
        it = tqdm(todo, desc="post-hoc EMA lengths", unit="length")
    for s in it:
        row = _measure(s, paths[s], main=main, **opts)
        if row is not None:
            rows[s] = row
            atomic_write_json(paths[s]["row"], {"settings": {**settings, "sigma_rel": s}, "row": row})


def _report(run_dir: str, step: int, settings: dict[str, Any], rows: dict[str, dict], sigmas: list[str],
            todo: list[str]) -> dict[str, Any]:
    """The sweep's report (see sweep_ema)."""
    ordered = sorted(({**rows[s], "reused": s not in todo} for s in sigmas), key=lambda r: float(r["sigma_rel"]))
    return {"run_dir": os.path.abspath(run_dir), "step": step, "snapshot_steps": settings["snapshot_steps"],
            "settings": settings, "rows": ordered,
            "best_fid": min(ordered, key=lambda r: r["fid"])["sigma_rel"],
            "best_nll": min(ordered, key=lambda r: r["bpd"])["sigma_rel"],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _checked_inputs(run_dir: str, sigma_rels: str | Sequence[str | float], *, data: str, num_samples: int,
                    batch_size: int, nll_images: int | None, features: str, reference: str | None,
                    at_step: int | None) -> tuple[list[str], dict[str, Any], list, int]:
    """Every check before any work or collective: -> (sigma_rels, the run's meta.json, snapshots, target step)."""
    from trainer.phema import read_snapshots, run_meta
    sigmas = parse_sigma_rels(sigma_rels)
    if num_samples <= K or batch_size < 1:
        raise UsageError(f"--num-samples must be > {K} (precision/recall use {K} neighbours) and --batch-size >= 1")
    if nll_images is not None and nll_images < 1:
        raise UsageError("--nll-images must be a positive integer")
    if features not in FEATURES:
        raise UsageError(f"--features {features}: choose one of {', '.join(FEATURES)}")
    meta = run_meta(run_dir)
    snaps = read_snapshots(run_dir)
    if not snaps:
        raise UsageError(f"no post-hoc EMA snapshots in {os.path.join(run_dir, 'phema')}; "
                         f"train with post-hoc EMA tracking (--phema 0.05,0.10)")
    step = snaps[-1].step if at_step is None else int(at_step)
    if not snaps[0].step <= step <= snaps[-1].step:
        raise UsageError(f"--at-step {step} is outside the snapshots' steps {snaps[0].step}..{snaps[-1].step}")
    _open_data(data, meta["model"]["image_size"])      # every rank checks its inputs before any collective
    if reference is not None:
        _check_reference(reference)
    return sigmas, meta, snaps, step


def _cached_row(path: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The row of a length finished earlier with exactly these settings, else None."""
    try:
        with open(path) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    return done["row"] if done.get("settings") == settings else None


def _export(run_dir: str, sigmas: list[str], meta: dict[str, Any], step: int, at_step: int | None,
            paths: dict[str, str]) -> None:
    """Reconstruct every length in one pass over the snapshots and export each (safetensors + JSON)."""
    from trainer.export import export_extra, save_exported
    from trainer.phema import reconstruct
    states = reconstruct(run_dir, sigmas, at_step=at_step)    # {sigma_rel: fp32 state dict}
    for s in sigmas:
        save_exported(paths[s], states.pop(s), meta["model"], meta["diffusion"], step=step, ema=f"phema_{s}",
                      extra=export_extra(meta))


def _measure(s: str, paths: dict[str, str], *, main: bool, data: str, reference: str, out_dir: str,
             num_samples: int, batch_size: int, respace: str | None, nll_images: int | None, seed: int,
             guidance_scale: float, features: str, inception_weights: str | None, device: str | None,
             progress: bool, labels: np.ndarray | None) -> dict[str, Any] | None:
    """Bits/dim, samples and sample quality of one exported length (collective); the row on rank 0."""
    from evaluations.evaluate import evaluate
    from evaluations.nll import nll
    from evaluations.sample import sample, save as save_samples
    from trainer.phema import sigma_rel_to_gamma
    t0 = time.time()
    r = nll(paths["model"], data, respace=respace, batch_size=batch_size, num_images=nll_images, seed=seed,
            device=device, progress=progress)
    smp = sample(paths["model"], num_samples, batch_size=batch_size, respace=respace, labels=labels,
                 guidance_scale=guidance_scale, seed=seed, device=device, progress=progress)
    if not main:
        return None
    save_samples(paths["samples"], smp)
    q = evaluate(reference, [paths["samples"]], features=features, inception_weights=inception_weights,
                 names=[f"phema_{s}"], batch_size=batch_size, k=K, cache_dir=os.path.join(out_dir, "features"),
                 device=device, progress=progress)
    m = q["batches"][0]
    return {"sigma_rel": s, "gamma": sigma_rel_to_gamma(s), "bpd": r.report["bpd"],
            "bpd_stderr": r.report["bpd_stderr"], "nll_images": r.report["images"], "fid": m["fid"],
            "precision": m["precision"], "recall": m["recall"], "features": q["features"],
            "model": os.path.abspath(paths["model"]), "samples": os.path.abspath(paths["samples"]),
            "seconds": round(time.time() - t0, 3)}


# ------------------------------------------------------------------------------------------------ outputs

def markdown(report: dict[str, Any]) -> str:
    """sweep_ema.md: one row per sigma_rel and the best length by FID and by NLL."""
    st, rows = report["settings"], report["rows"]
    by = {r["sigma_rel"]: r for r in rows}
    fid, nll_ = by[report["best_fid"]], by[report["best_nll"]]
    feats = rows[0]["features"]
    lines = [f"# Post-hoc EMA sweep of `{report['run_dir']}` at step {report['step']}", "",
             f"{len(report['snapshot_steps'])} snapshots (steps {report['snapshot_steps'][0]}.."
             f"{report['snapshot_steps'][-1]}). Bits/dim: NLL bound on `{st['data']}` "
             f"({rows[0]['nll_images']} images" + (f", {st['respace']}-step respaced bound" if st["respace"] else "")
             + f"). FID / precision / recall (k = {K}): {st['num_samples']} samples"
             + (f" ({st['respace']} steps" if st["respace"] else " (all steps")
             + (f", guidance {st['guidance_scale']}" if st["guidance_scale"] else "") + f", seed {st['seed']}) "
             f"against `{st['reference']}`, features `{feats}`"
             + ("" if feats.startswith("inception-v3-tf") else " (**not comparable to published FID**)") + ".", "",
             "| sigma_rel | gamma | bits/dim | FID | precision | recall |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sigma_rel']} | {r['gamma']:.3f} | {r['bpd']:.4f} | {r['fid']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    lines += ["", f"Best by FID: sigma_rel {fid['sigma_rel']} (FID {fid['fid']:.3f}); best by NLL: sigma_rel "
              f"{nll_['sigma_rel']} ({nll_['bpd']:.4f} bits/dim)."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """sweep_ema.png: FID (left) and bits/dim (right) against sigma_rel, the best of each marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    x = [float(r["sigma_rel"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label, best in ((axes[0], "fid", "FID", report["best_fid"]),
                                 (axes[1], "bpd", "bits/dim (NLL bound)", report["best_nll"])):
        ax.plot(x, [r[key] for r in rows], "o-")
        b = next(r for r in rows if r["sigma_rel"] == best)
        ax.plot([float(best)], [b[key]], "r*", ms=14, label=f"best: sigma_rel {best}")
        ax.set(xlabel="sigma_rel (EMA std / age)", ylabel=label, title=f"{label} at step {report['step']}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def save(out_dir: str, report: dict[str, Any]) -> str:
    """sweep_ema.json, sweep_ema.md and sweep_ema.png in `out_dir`, atomically. Returns the markdown."""
    return save_report(out_dir, report, stem="sweep_ema", markdown=markdown, plot=plot, png="sweep_ema.png")


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("run_dir", help="training run folder (phema/ snapshots, checkpoints/latest)")
    p.add_argument("--sigma-rel", required=True, help="comma-separated EMA lengths in (0, 0.3003], e.g. 0.02,0.05,0.1")
    p.add_argument("--data", required=True, help="held-out shards (manifest, pattern or list): bits/dim, reference")
    p.add_argument("--out-dir", required=True, help="folder for models/, samples/, sweep_ema.md/.json/.png")
    p.add_argument("--num-samples", type=int, default=1000, help="images sampled per length (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (sampling, NLL, features)")
    p.add_argument("--respace", default="50", help="sampler steps and respaced NLL bound (default 50; 'full': all T)")
    p.add_argument("--features", default="pixels", choices=list(FEATURES),
                   help="pixels (default: small images such as the digits), standin, or inception (needs weights)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (--features inception)")
    p.add_argument("--reference", default=None, help="reference .npz (arr_0 uint8 [N,H,W,3]; default: from --data)")
    p.add_argument("--nll-images", type=int, default=None, help="bits/dim on the first N held-out images (default all)")
    p.add_argument("--seed", type=int, default=0, help="sampling and NLL seed, the same for every length")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance scale w (0 = off)")
    p.add_argument("--at-step", type=int, default=None, help="step the EMAs end at (default: the last snapshot's)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: the GPU when present)")
    flag(p, "--progress", True, "progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    try:
        report = sweep_ema(a.run_dir, a.sigma_rel, data=a.data, out_dir=a.out_dir, num_samples=a.num_samples,
                           batch_size=a.batch_size, respace=None if a.respace == "full" else a.respace,
                           features=a.features, reference=a.reference, nll_images=a.nll_images, seed=a.seed,
                           guidance_scale=a.guidance_scale, device=a.device, progress=a.progress, at_step=a.at_step,
                           inception_weights=a.inception_weights)
    finally:
        dist.shutdown()
    if report is not None:
        print(save(a.out_dir, report), end="")
    return 0


if __name__ == "__main__":
    exit_without_teardown(main)  # several ranks: no interpreter teardown after the work is saved (data.cli)
