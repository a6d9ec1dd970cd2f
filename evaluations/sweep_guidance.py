"""The guidance trade-off (Dhariwal & Nichol 2021, fig. 4): sample at several scales of classifier guidance and
classifier-free guidance; FID, precision, recall and the accuracy of a judge classifier that did not guide.

    python -m evaluations.sweep_guidance --model model.safetensors --classifier clf.safetensors \
        --judge judge.safetensors --data VAL --classifier-scales 0,1,2,4 [--guidance-scales 0,1] \
        [--respace 50 | --ddim 50] --num-samples 1000 --out-dir DIR

Every point (classifier scale s, classifier-free scale w; the grid of both lists) samples the same balanced labels
(image i asks for class i mod K) with the same seed, through evaluations.sample (any number of ranks; finished
batches and finished points are reused when re-run). Rank 0 then measures each batch against the reference
(--reference, or the images of --data) with evaluations.evaluate's features (`pixels` suits small images) and
scores the judge's accuracy on the requested labels (clean images, t = 0). Writes DIR/samples/*.npz and
DIR/sweep_guidance.md/.json/.png.
"""
from __future__ import annotations

import argparse
import datetime
import os
from typing import Any, Sequence

import numpy as np

from data.cli import ArgumentParser, UsageError, exit_without_teardown, flag, run_cli
from data.fsio import atomic_write
from evaluations import dist
from evaluations.io import load_npz, save_report

PROG = "evaluations.sweep_guidance"
FEATURES = ("pixels", "standin", "inception")


def parse_scales(text: str, name: str) -> list[float]:
    """'0,1,2.5' -> [0.0, 1.0, 2.5]; each >= 0, no repeats (UsageError naming `name` otherwise)."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} {text!r}: give comma-separated numbers, e.g. 0,1,2,4") from None
    if not vals or any(not v >= 0 for v in vals) or len(set(vals)) != len(vals):
        raise UsageError(f"{name} {text!r}: give distinct scales >= 0, e.g. 0,1,2,4")
    return vals


def _check(model: str, classifier: str | None, judge: str | None, cscales: list[float], gscales: list[float],
           num_samples: int, features: str) -> tuple[dict[str, Any], int]:
    """Inputs checked before any sampling -> (the model's meta, the number of classes K)."""
    from evaluations.io import load_classifier, load_model
    if features not in FEATURES:
        raise UsageError(f"--features {features}: choose one of {', '.join(FEATURES)}")
    if num_samples < 2:
        raise UsageError("--num-samples must be at least 2")
    _, _, meta = load_model(model)
    k = meta["model"].get("num_classes")
    if classifier is None and any(cscales):
        raise UsageError("--classifier-scales above 0 need --classifier")
    if any(gscales) and k is None:
        raise UsageError("--guidance-scales above 0 need a class-conditional model (this one is unconditional)")
    if classifier is not None:
        k = load_classifier(classifier)[1]["model"]["num_classes"] if k is None else k
    if k is None:
        raise UsageError("an unconditional model without --classifier has no classes to sweep over")
    if judge is not None:
        jm = load_classifier(judge, what="--judge")[1]["model"]
        if jm["num_classes"] != k or jm["image_size"] != meta["model"]["image_size"]:
            raise UsageError(f"--judge {judge}: {jm['num_classes']} classes at {jm['image_size']} px, but the sweep "
                             f"has {k} classes at {meta['model']['image_size']} px")
    return meta, k


def sweep_guidance(model: str, *, out_dir: str, classifier: str | None = None, judge: str | None = None,
                   classifier_scales: Sequence[float] = (0.0, 1.0), guidance_scales: Sequence[float] = (0.0,),
                   data: str | None = None, reference: str | None = None, num_samples: int = 1000,
                   batch_size: int = 100, respace: str | None = None, ddim: int | None = None, seed: int = 0,
                   features: str = "pixels", inception_weights: str | None = None, device: str | None = None,
                   progress: bool = True) -> dict[str, Any] | None:
    """Sample and measure every (classifier scale, classifier-free scale) point; see the module docstring.
    Returns (rank 0; None elsewhere) {"settings", "rows": [{classifier_scale, guidance_scale, fid, precision,
    recall, judge_accuracy, samples, images_per_second}], "date"}."""
    from evaluations.sample import sample, save
    from evaluations.sweep_ema import K, make_reference
    meta, k = _check(model, classifier, judge, list(classifier_scales), list(guidance_scales), num_samples, features)
    if reference is None and data is None:
        raise UsageError("give --reference REF.npz or --data VAL (held-out images for the reference)")
    ranks = dist.setup()
    if reference is None:
        reference = os.path.join(out_dir, "reference.npz")
        if ranks.is_main and make_reference(data, reference, meta["model"]["image_size"]) <= K:
            raise UsageError(f"--data {data}: needs at least {K + 1} images for precision/recall")
    dist.barrier()
    labels = np.arange(num_samples, dtype=np.int64) % k
    points = [(s, w) for w in guidance_scales for s in classifier_scales]
    paths, speed = [], []
    for s, w in points:
        out = os.path.join(out_dir, "samples", f"clf{s:g}_cfg{w:g}_{'ddim' if ddim else 'ddpm'}.npz")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        r = sample(model, num_samples, batch_size=batch_size, respace=respace, ddim=ddim, guidance_scale=w,
                   labels=labels, seed=seed, device=device, progress=progress, parts_dir=out + ".parts",
                   reuse=None if os.path.isdir(out + ".parts") else out, classifier=classifier,
                   classifier_scale=s)
        if r is not None and not r.reused:
            save(out, r)
        paths.append(out)
        speed.append(r.report.get("images_per_second") if r is not None else None)
    if not ranks.is_main:
        return None
    return _measure(points, paths, speed, labels, reference=reference, judge=judge, features=features,
                    inception_weights=inception_weights, device=device, progress=progress,
                    settings={"model": os.path.abspath(model), "classifier": classifier and os.path.abspath(classifier),
                              "judge": judge and os.path.abspath(judge), "reference": os.path.abspath(reference),
                              "num_samples": num_samples, "batch_size": batch_size, "seed": seed,
                              "sampler": f"ddim{ddim}" if ddim else f"ddpm{respace or ''}", "features": features,
                              "classes": k})


def _measure(points: list[tuple[float, float]], paths: list[str], speed: list, labels: np.ndarray, *,
             reference: str, judge: str | None, features: str, inception_weights: str | None, device: str | None,
             progress: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """FID / precision / recall of every batch (one evaluate call) and the judge's accuracy -> the report."""
    from evaluations.classify import accuracy
    from evaluations.evaluate import evaluate
    from evaluations.io import load_classifier
    ev = evaluate(reference, paths, features=features, inception_weights=inception_weights, device=device,
                  cache_dir=os.path.join(os.path.dirname(paths[0]), "features"), progress=progress)
    clf = load_classifier(judge, what="--judge")[0] if judge else None
    rows = []
    for (s, w), path, row, ips in zip(points, paths, ev["batches"], speed):
        acc = accuracy(clf, load_npz(path)["arr_0"], labels) if clf is not None else None
        rows.append({"classifier_scale": s, "guidance_scale": w, "fid": row["fid"], "precision": row["precision"],
                     "recall": row["recall"], "judge_accuracy": acc, "samples": path, "images_per_second": ips})
    return {"settings": {**settings, "features_name": ev["features"]}, "rows": rows,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _f(x: Any, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def markdown(report: dict[str, Any]) -> str:
    """sweep_guidance.md: one row per point."""
    st = report["settings"]
    lines = [f"# Guidance sweep of `{st['model']}`", "",
             f"Sampler {st['sampler']}, {st['num_samples']} samples per point (image i asks for class i mod "
             f"{st['classes']}), seed {st['seed']}. Classifier: `{st['classifier']}`. Judge (did not guide): "
             f"`{st['judge']}`. FID / precision / recall against `{st['reference']}` with features "
             f"`{st['features_name']}`" + ("" if st["features"] == "inception" else
                                           " (**not comparable to published FID**)") + ".", "",
             "| classifier scale | CFG scale | FID | precision | recall | judge accuracy |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['classifier_scale']:g} | {r['guidance_scale']:g} | {_f(r['fid'])} | {_f(r['precision'])} "
                     f"| {_f(r['recall'])} | {_f(r['judge_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """sweep_guidance.png: FID, precision / recall and judge accuracy against the classifier scale (one line per
    classifier-free scale), or against the classifier-free scale when only that varies."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    by_clf = len({r["classifier_scale"] for r in rows}) > 1
    x_key, line_key = ("classifier_scale", "guidance_scale") if by_clf else ("guidance_scale", "classifier_scale")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for v in sorted({r[line_key] for r in rows}):
        rs = sorted((r for r in rows if r[line_key] == v), key=lambda r: r[x_key])
        x, tag = [r[x_key] for r in rs], f"{'CFG' if by_clf else 'classifier'} {v:g}"
        axes[0].plot(x, [r["fid"] for r in rs], "o-", label=tag)
        axes[1].plot(x, [r["precision"] for r in rs], "o-", label=f"precision, {tag}")
        axes[1].plot(x, [r["recall"] for r in rs], "s--", label=f"recall, {tag}")
        if rs[0]["judge_accuracy"] is not None:
            axes[2].plot(x, [r["judge_accuracy"] for r in rs], "o-", label=tag)
    axes[2].axhline(1 / report["settings"]["classes"], color="gray", ls=":", label="chance")
    xl = "classifier guidance scale" if by_clf else "classifier-free guidance scale"
    for ax, yl in zip(axes, ("FID (" + report["settings"]["features_name"] + ")", "precision / recall",
                             "judge accuracy")):
        ax.set(xlabel=xl, ylabel=yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Guidance sweep, {report['settings']['sampler']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def save_sweep(out_dir: str, report: dict[str, Any]) -> str:
    """sweep_guidance.json/.md/.png in `out_dir`, atomically. Returns the markdown."""
    return save_report(out_dir, report, stem="sweep_guidance", markdown=markdown, plot=plot, png="sweep_guidance.png")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="exported diffusion model (conditional or unconditional)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier that guides (--objective classifier)")
    p.add_argument("--judge", default=None, help="classifier that did not guide, scoring the requested labels")
    p.add_argument("--classifier-scales", default="0,1,2,4", help="classifier guidance scales (default 0,1,2,4)")
    p.add_argument("--guidance-scales", default="0", help="classifier-free guidance scales (default 0)")
    p.add_argument("--data", default=None, help="held-out shards for the reference batch (or give --reference)")
    p.add_argument("--reference", default=None, help="reference .npz (arr_0 uint8 [N,H,W,3])")
    p.add_argument("--num-samples", type=int, default=1000, help="images per point")
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling batch")
    p.add_argument("--respace", default=None, help="respaced DDPM steps, e.g. 50 (default: all T)")
    p.add_argument("--ddim", type=int, default=None, help="DDIM with this many steps")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same at every point")
    p.add_argument("--features", default="pixels", help="pixels (default), standin or inception (needs weights)")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (--features inception)")
    p.add_argument("--out-dir", required=True, help="folder for samples/ and sweep_guidance.md/.json/.png")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: the GPU when present)")
    flag(p, "--progress", True, "progress bars")
    return p


def _main(argv: Sequence[str] | None) -> int:
    a = build_parser().parse_args(argv)
    cs, gs = parse_scales(a.classifier_scales, "--classifier-scales"), parse_scales(a.guidance_scales, "--guidance-scales")
    try:
        report = sweep_guidance(a.model, out_dir=a.out_dir, classifier=a.classifier, judge=a.judge,
                                classifier_scales=cs, guidance_scales=gs, data=a.data, reference=a.reference,
                                num_samples=a.num_samples, batch_size=a.batch_size, respace=a.respace, ddim=a.ddim,
                                seed=a.seed, features=a.features, inception_weights=a.inception_weights,
                                device=a.device, progress=a.progress)
    finally:
        dist.shutdown()
    if report is not None:
        print(save_sweep(a.out_dir, report), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    exit_without_teardown(main)  # several ranks: no interpreter teardown after the work is saved (data.cli)
