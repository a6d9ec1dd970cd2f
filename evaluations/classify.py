"""Accuracy of an exported noise-aware classifier on clean and noised labelled images.

    python -m evaluations.classify --model clf.safetensors --data VAL [--t-quartiles] [--out report.json]

VAL is held-out shards (a manifest, brace pattern or path list, read by data.stream.EvalStream) or an .npz of
labelled images (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels [N]: a sample batch of evaluations.sample, whose
labels are the requested classes, so that this is the accuracy of a judge on guided samples). Clean means t = 0.
--t-quartiles adds x_t = q_sample(x_0, t) with one t per image drawn uniformly from each quarter of [0, T) of the
classifier's diffusion (noise and t from a CPU generator seeded by --seed, the same for every run).

From Python, `classify(model, data, ...)` returns the report and `accuracy(classifier, images, labels)` scores
arrays.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from data.cli import ArgumentParser, UsageError, run_cli
from data.fsio import atomic_write_json
from evaluations.io import check_images, load_classifier, load_npz

PROG = "evaluations.classify"


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def predict(classifier: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int = 0, batch_size: int = 256
            ) -> torch.Tensor:
    """Predicted classes [N] (int64, CPU) of images x [N, C, H, W] in [-1, 1] at timesteps t ([N] or one int)."""
    p = next(classifier.parameters())
    t = torch.full((len(x),), int(t), dtype=torch.long) if isinstance(t, int) else t
    out = [classifier(x[i:i + batch_size].to(p.device, p.dtype), t[i:i + batch_size].to(p.device)).argmax(-1).cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(classifier: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of clean uint8 images [N, H, W, 3] classified as `labels` [N] (t = 0)."""
    pred = predict(classifier, to_float(images), 0, batch_size)
    return float((pred.numpy() == np.asarray(labels)).mean())


def read_labelled(data: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`data` (.npz with arr_0/arr_1, or shards) -> (uint8 images [N, H, W, 3], int64 labels [N])."""
    if data.endswith(".npz"):
        arrays = load_npz(data)
        if "arr_0" not in arrays or "arr_1" not in arrays:
            raise UsageError(f"--data {data}: needs images arr_0 and labels arr_1 (a labelled sample batch)")
        images, labels = check_images(arrays["arr_0"], f"--data {data} arr_0"), arrays["arr_1"]
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise UsageError(f"--data {data}: arr_1 must hold one integer label per image, got {labels.dtype} "
                             f"{labels.shape}")
    else:
        from evaluations.sweep_ema import _open_data
        xs, ys = [], []
        for x, y, _ in _open_data(data, image_size):
            xs.append(((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
            ys.append(y.numpy())
        if not xs:
            raise UsageError(f"--data {data}: no readable images")
        images, labels = np.concatenate(xs), np.concatenate(ys)
        if (labels < 0).any():
            raise UsageError(f"--data {data}: the images are unlabelled; a classifier needs labelled data")
    if images.shape[1] != image_size:
        raise UsageError(f"--data images are {images.shape[1]}x{images.shape[2]} but the classifier takes "
                         f"{image_size}x{image_size}")
    return images, labels.astype(np.int64)


def classify(model: str, data: str, *, t_quartiles: bool = False, batch_size: int = 256, seed: int = 0,
             device: str | None = None) -> dict[str, Any]:
    """The report: images, classes, accuracy (clean, t = 0) and, with t_quartiles, accuracy_q0..q3 and the
    timestep ranges [lo, hi) of the quarters."""
    from diffusion import create_diffusion
    if batch_size < 1:
        raise UsageError("--batch-size must be a positive integer")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clf, meta = load_classifier(model, dev, what="--model")
    k = meta["model"]["num_classes"]
    images, labels = read_labelled(data, meta["model"]["image_size"])
    if labels.min() < 0 or labels.max() >= k:
        raise UsageError(f"--data labels lie in [{labels.min()}, {labels.max()}]; the classifier has {k} classes")
    x = to_float(images)
    report: dict[str, Any] = {"model": os.path.abspath(model), "data": data, "images": len(x), "classes": k,
                              "accuracy": float((predict(clf, x, 0, batch_size).numpy() == labels).mean())}
    if t_quartiles:
        if not meta.get("diffusion"):
            raise UsageError(f"--model {model}: its JSON names no diffusion, so timesteps mean nothing; drop "
                             f"--t-quartiles")
        diffusion = create_diffusion(**meta["diffusion"])
        T, g = diffusion.num_timesteps, torch.Generator().manual_seed(seed)
        report["quartiles"] = []
        for q in range(4):
            lo, hi = q * T // 4, max(q * T // 4 + 1, (q + 1) * T // 4)
            t = torch.randint(lo, hi, (len(x),), generator=g)
            xt = diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=g))
            acc = float((predict(clf, xt, t, batch_size).numpy() == labels).mean())
            report["quartiles"].append({"t": [lo, hi], "accuracy": acc})
    return report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported classifier (clf.safetensors with clf.json beside it)")
    p.add_argument("--data", required=True, help="labelled shards (manifest, pattern, list) or a labelled .npz")
    p.add_argument("--t-quartiles", action="store_true", help="also the accuracy on x_t in each quarter of [0, T)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the timesteps and noise of --t-quartiles")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--out", default=None, help="also write the report to this .json file")
    return p


def _main(argv: list[str] | None) -> int:
    a = build_parser().parse_args(argv)
    r = classify(a.model, a.data, t_quartiles=a.t_quartiles, batch_size=a.batch_size, seed=a.seed, device=a.device)
    print(f"{r['images']} images, {r['classes']} classes: accuracy {r['accuracy']:.4f} (clean)")
    for q in r.get("quartiles", []):
        print(f"  t in [{q['t'][0]}, {q['t'][1]}): accuracy {q['accuracy']:.4f}")
    if a.out:
        atomic_write_json(a.out, r)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    raise SystemExit(main())
