"""Any webdataset in, on real data: bits/dim of a trained model on the digits validation set read five ways.

    python -m benchmarks.webdataset_digits --model /work/shared_models/uncond16/model.safetensors \
        --val /work/shared_models/digits16/val-manifest.json [--respace 100] \
        [--out benchmarks/results/webdataset-digits.md]

The validation images (16 px, our shards) are rewritten with ``webdataset.ShardWriter`` as 64x64 images (each
pixel repeated 4x4, NEAREST), labels in ``.json`` ``{"label": k}``, and read back by ``evaluations.nll``:

1. our shards (the reference);
2. the 64 px PNG webdataset with ``resize="adm"`` when read: box-halving 64 -> 32 -> 16 averages equal pixels and
   the final bicubic is at scale 1, so the 16 px images, and the bits/dim, must come back exactly;
3. the same with ``resize="area"`` (means of 4x4 blocks of equal pixels): exact too;
4. the PNG webdataset converted once by ``data.prepare webdataset --size 16``: exact;
5. the same images as JPEG (quality 90) with ``resize="adm"``: lossy, the bits/dim move by the JPEG error.

The forward-process noise is the same in every pass (same seed), so per-image differences come from the pixels
alone.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from data.cli import ArgumentParser, UsageError, run_cli
from data.fsio import atomic_write_json, atomic_write_text
from data.prepare import prepare_webdataset
from data.shards import read_shard
from data.sources import resolve

PROG = "python -m benchmarks.webdataset_digits"


def val_images(manifest: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, H, W, 3] and labels [N] of a data set of our shards, in order."""
    src = resolve(manifest)
    imgs, labels = [], []
    for url in src.urls:
        sd = read_shard(url, src.shape, labelled=True, num_classes=src.num_classes)
        imgs += sd.images
        labels.append(sd.labels)
    return np.stack(imgs), np.concatenate(labels)


def write_wds(folder: str, name: str, imgs: np.ndarray, labels: np.ndarray, fmt: str, scale: int) -> str:
    """ShardWriter shards of the images upscaled ``scale`` x (NEAREST) as ``fmt``; returns a glob of them."""
    import webdataset as wds

    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    with wds.ShardWriter(os.path.join(folder, f"{name}-%06d.tar"), maxcount=200, verbose=0) as sink:
        for i, (img, k) in enumerate(zip(imgs, labels)):
            big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            buf = io.BytesIO()
            big.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            sink.write({"__key__": f"v{i:05d}", ext: buf.getvalue(), "json": {"label": int(k)}})
    return os.path.join(folder, f"{name}-*.tar")


def measure(args, tmp: str) -> dict:
    from evaluations.nll import nll

    imgs, labels = val_images(args.val)
    png = write_wds(tmp, "png", imgs, labels, "PNG", args.scale)
    jpg = write_wds(tmp, "jpg", imgs, labels, "JPEG", args.scale)
    conv = os.path.join(tmp, "conv")
    prepare_webdataset(png, conv, size=imgs.shape[1], resize="adm", workers=0, progress=False)
    kw = dict(respace=args.respace, batch_size=args.batch_size, seed=0, threads=args.threads, progress=False)
    passes = {"ours": (args.val, None), "png_adm": (png, "adm"), "png_area": (png, "area"),
              "converted": (conv, None), "jpg_adm": (jpg, "adm")}
    out = {}
    for name, (data, resize) in passes.items():
        t = time.perf_counter()
        r = nll(args.model, data, resize=resize, **kw)
        out[name] = {"data": data, "resize": resize, "bpd": r.report["bpd"], "bpd_stderr": r.report["bpd_stderr"],
                     "images": r.report["images"], "seconds": time.perf_counter() - t, "total_bpd": r.total_bpd}
    ref = out["ours"]["total_bpd"]
    for v in out.values():
        v["max_abs_diff_per_image"] = float(np.abs(v.pop("total_bpd") - ref).max())
    return {"passes": out, "images": len(imgs), "size": int(imgs.shape[1]), "scale": args.scale}


def report(args, r: dict, start: str) -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    names = {"ours": "our val shards (reference)", "png_adm": "ShardWriter PNG 64 px, `--resize adm` when read",
             "png_area": "ShardWriter PNG 64 px, `--resize area` when read",
             "converted": "PNG 64 px converted once (`data.prepare webdataset --size 16`)",
             "jpg_adm": "ShardWriter JPEG q90 64 px, `--resize adm` when read"}
    rows = [f"| {names[k]} | {v['images']} | {v['bpd']:.6f} | {v['bpd_stderr']:.4f} | "
            f"{v['max_abs_diff_per_image']:.3g} | {v['seconds']:.1f} |" for k, v in r["passes"].items()]
    cmd = " ".join([PROG] + (sys.argv[1:] if args.argv is None else list(args.argv)))
    return "\n".join([
        "# Any webdataset in, on real data: digits bits/dim read five ways", "",
        f"Measured {start} by `{cmd}` on {cpu}, nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
        f"(shared machine). Model: `{args.model}`; {r['images']} validation digits of {r['size']} px, upscaled "
        f"{r['scale']}x (NEAREST) into webdataset.ShardWriter shards with `.json` labels; `evaluations.nll` with "
        f"respacing {args.respace}, seed 0 (the same forward noise in every pass).", "",
        "| data | images | bits/dim | stderr | max abs per-image difference vs reference | seconds |",
        "|---|---|---|---|---|---|",
        *rows, "",
        "Rows 2-4 are exact by construction (box averages of equal pixels, bicubic at scale 1), so any difference "
        "there would be a bug; the JPEG row shows what a lossy source does to the bound. The bound of a 10-step "
        "respaced process is far looser than the full-T bits/dim: it is chosen for CPU time, the comparison is "
        "of the pixels each reader delivers.", ""])


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/work/shared_models/uncond16/model.safetensors")
    p.add_argument("--val", default="/work/shared_models/digits16/val-manifest.json", help="our shards (manifest)")
    p.add_argument("--respace", default="100", help="bound of a respaced process (evaluations.nll --respace)")
    p.add_argument("--scale", type=int, default=4, help="NEAREST upscale factor of the webdataset images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/webdataset-digits.md")
    args = p.parse_args(argv)
    args.argv = argv
    if args.scale < 1:
        raise UsageError(f"--scale must be >= 1, got {args.scale}")
    for path, flag_ in ((args.model, "--model"), (args.val, "--val")):
        if not os.path.exists(path):
            raise UsageError(f"{flag_} {path} does not exist")
    torch.set_num_threads(args.threads)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args, tmp)
    text = report(args, r, start)
    atomic_write_text(args.out, text)
    atomic_write_json(os.path.splitext(args.out)[0] + ".json", {"date": start, **r})
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
