"""Sample quality of one or more sample batches against one reference batch, side by side.

    python -m evaluations.evaluate --reference REF.npz SAMPLES.npz [OTHER.npz ...] --out-dir DIR \
        [--features {inception,standin}] [--inception-weights PATH]

Inputs are guided-diffusion's npz format: `arr_0` uint8 [N, H, W, 3] (images). A reference batch may also hold
precomputed `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial) statistics, which are used as given (like the
published ImageNet 64x64 reference batch); its images are still needed for precision/recall.
Writes DIR/metrics.json, DIR/metrics.md and DIR/precision_recall.png.

From Python, `evaluate(reference, samples, ...)` returns the metrics dict (what metrics.json holds) and writes
nothing but the feature cache.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, flag, run_cli
from data.fsio import atomic_write
from evaluations.features import INCEPTION_ENV, cached_features, create_extractor
from evaluations.io import check_images, load_npz, save_report
from evaluations.metrics import frechet_distance, inception_score, precision_recall

PROG = "evaluations.evaluate"


def _progress(desc: str, show: bool) -> Callable[[Iterator], Iterator]:
    """A tqdm wrapper, shown only when `show` and stderr is a terminal."""
    def wrap(it: Iterator) -> Iterator:
        from tqdm import tqdm
        return tqdm(it, desc=desc, leave=False, disable=not (show and sys.stderr.isatty()))
    return wrap


def _check_stats(arrays: dict, keys: tuple[str, str], dims: int, path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Precomputed (mu, sigma) from a reference file, validated against the extractor's feature dimension."""
    if not all(k in arrays for k in keys):
        return None
    mu, sigma = arrays[keys[0]].astype(np.float64), arrays[keys[1]].astype(np.float64)
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise UsageError(f"{path}: precomputed {keys[0]}/{keys[1]} have shapes {mu.shape}/{sigma.shape} but the "
                         f"feature extractor gives {dims} dimensions (statistics from a different network?)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: precomputed {keys[0]}/{keys[1]} contain NaN or Inf")
    return mu, sigma


def evaluate(reference: str, samples: list[str], *, features: str = "inception", inception_weights: str | None = None,
             names: list[str] | None = None, batch_size: int = 64, k: int = 3, splits: int = 10,
             cache_dir: str | None = None, device: str | None = None, pr_block: int = 1024,
             progress: bool = True) -> dict[str, Any]:
    """FID, sFID, IS, precision and recall of every sample batch (.npz path) against `reference` (.npz path).

    features: "inception" (needs `inception_weights` or $IDDPM_INCEPTION_WEIGHTS) or "standin" (smoke tests only);
    names: one display name per batch (default: file stems); batch_size: images per extractor batch; k: nearest
    neighbours for precision/recall (computed in blocks of `pr_block` rows); splits: Inception Score splits;
    cache_dir: feature cache keyed by file content (None: no cache); device: default cuda when available.
    Returns the JSON-ready report: features, reference, k, is_splits, date and one row per batch in "batches"
    (name, path, images, cached, fid, sfid, is, is_std, precision, recall, seconds; None where not computable).
    """
    if batch_size < 1 or k < 1 or splits < 1:
        raise UsageError("--batch-size, --k and --splits must be positive integers")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = names or [os.path.splitext(os.path.basename(p))[0] for p in samples]
    if len(names) != len(samples):
        raise UsageError(f"--names gives {len(names)} names for {len(samples)} sample batches")
    extractor = create_extractor(features, inception_weights, device)

    ref = load_npz(reference)
    ref_feats = None
    if "arr_0" in ref:
        ref_images = check_images(ref["arr_0"], f"{reference} arr_0")
        ref_feats, _ = cached_features(reference, ref_images, extractor, cache_dir, batch_size, device,
                                       _progress("reference", progress))
    # Feature dimensions of this extractor, from a 2-image probe when the reference has no images.
    probe = ref_feats or {k2: v.cpu().numpy() for k2, v in extractor(
        torch.zeros(2, 64, 64, 3, dtype=torch.uint8, device=device)).items()}
    d_pool = probe["pool"].shape[1]
    d_spatial = probe["mu_s"].shape[0] if "mu_s" in probe else probe["spatial"].shape[1]
    given = _check_stats(ref, ("mu", "sigma"), d_pool, reference)
    given_s = _check_stats(ref, ("mu_s", "sigma_s"), d_spatial, reference)
    if ref_feats is None and given is None:
        raise UsageError(f"{reference}: needs images (arr_0) or precomputed mu/sigma statistics")
    ref_stats = given or (ref_feats["mu"], ref_feats["sigma"])
    ref_stats_s = given_s or ((ref_feats["mu_s"], ref_feats["sigma_s"]) if ref_feats else None)

    report = {
        "features": extractor.name, "comparable_to_published": bool(extractor.comparable),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "k": k, "is_splits": splits,
        "reference": {"path": os.path.abspath(reference), "images": int(ref_feats["pool"].shape[0]) if ref_feats else 0,
                      "statistics": "precomputed in file" if given else "computed from images"},
        "batches": [],
    }
    for name, path in zip(names, samples):
        t0 = time.time()
        arr = load_npz(path)
        if "arr_0" not in arr:
            raise UsageError(f"{path}: no arr_0 (expected uint8 images [N, H, W, 3])")
        images = check_images(arr["arr_0"], f"{path} arr_0")
        f, hit = cached_features(path, images, extractor, cache_dir, batch_size, device, _progress(name, progress))
        row = {"name": name, "path": os.path.abspath(path), "images": int(images.shape[0]), "cached": hit,
               "fid": frechet_distance(f["mu"], f["sigma"], *ref_stats),
               "sfid": frechet_distance(f["mu_s"], f["sigma_s"], *ref_stats_s) if ref_stats_s else None}
        row["is"], row["is_std"] = inception_score(f["logits"], splits) if len(f["logits"]) >= splits else (None, None)
        if ref_feats is not None:
            row["precision"], row["recall"] = precision_recall(ref_feats["pool"], f["pool"], k=k, block=pr_block,
                                                               device=device)
        else:
            row["precision"] = row["recall"] = None
        row["seconds"] = round(time.time() - t0, 3)
        report["batches"].append(row)
    return report


def _fmt(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """The side-by-side table."""
    lines = [f"# Sample quality against `{report['reference']['path']}`", "",
             f"Features: `{report['features']}`" + ("" if report["comparable_to_published"] else
             " — **stand-in random network: these numbers are NOT comparable to published FID/IS values**"),
             f"Reference statistics: {report['reference']['statistics']}; reference images: "
             f"{report['reference']['images']}; precision/recall k = {report['k']}; "
             f"IS over {report['is_splits']} splits.",
             f"Date: {report['date']}", "",
             "| batch | images | FID | sFID | IS | precision | recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["batches"]:
        is_ = "n/a" if r["is"] is None else f"{r['is']:.2f} ± {r['is_std']:.2f}"
        lines.append(f"| {r['name']} | {r['images']} | {_fmt(r['fid'], 2)} | {_fmt(r['sfid'], 2)} | {is_} | "
                     f"{_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} |")
    return "\n".join(lines) + "\n"


def plot_precision_recall(report: dict, path: str) -> bool:
    """Precision (y) against recall (x), one labelled point per batch. False when no batch has P/R."""
    rows = [r for r in report["batches"] if r["precision"] is not None]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for r in rows:
        ax.scatter(r["recall"], r["precision"], s=40)
        ax.annotate(r["name"], (r["recall"], r["precision"]), textcoords="offset points", xytext=(5, 5))
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision",
           title=f"precision / recall (k={report['k']})"
           + ("" if report["comparable_to_published"] else "\nstand-in features"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return True


def save(out_dir: str, report: dict[str, Any]) -> str:
    """metrics.json, metrics.md and precision_recall.png in `out_dir`, atomically. Returns the markdown."""
    return save_report(out_dir, report, stem="metrics", markdown=markdown, plot=plot_precision_recall,
                       png="precision_recall.png")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("samples", nargs="+", help="sample batches (.npz with arr_0 uint8 [N,H,W,3])")
    p.add_argument("--reference", required=True,
                   help="reference batch (.npz: arr_0 images and/or mu,sigma,mu_s,sigma_s)")
    p.add_argument("--out-dir", required=True, help="folder for metrics.json, metrics.md, precision_recall.png")
    p.add_argument("--features", default="inception", choices=["inception", "standin", "pixels"],
                   help="inception: TF-FID Inception-v3 (needs weights); standin: random net for smoke tests only; "
                        "pixels: the pixels (<= 32x32) for small images such as the 16x16 digits")
    p.add_argument("--inception-weights", default=None, help=f"torch-fidelity Inception weights (or ${INCEPTION_ENV})")
    p.add_argument("--names", default=None, help="comma-separated display names, one per sample batch")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extractor batch")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall (default 3)")
    p.add_argument("--splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--cache-dir",
                   default=os.environ.get("IDDPM_FEATURE_CACHE", os.path.expanduser("~/.cache/iddpm/features")),
                   help="feature cache keyed by file content hash (default ~/.cache/iddpm/features)")
    flag(p, "--cache", True, "read and write the feature cache in --cache-dir")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    flag(p, "--progress", True, "progress bars (on a terminal)")
    return p


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    report = evaluate(a.reference, a.samples, features=a.features, inception_weights=a.inception_weights,
                      names=a.names.split(",") if a.names else None, batch_size=a.batch_size, k=a.k,
                      splits=a.splits, cache_dir=a.cache_dir if a.cache else None, device=a.device,
                      progress=a.progress)
    print(save(a.out_dir, report), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
