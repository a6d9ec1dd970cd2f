"""Any webdataset in: read-time resizing vs converting once, per loader process.

    python -m benchmarks.bench_webdataset [--images 1024] [--size 64] [--repeats 3] \
        [--out benchmarks/results/webdataset.md]

Source: a webdataset written by ``webdataset.ShardWriter``: JPEG (quality 90) images of ImageNet-like sizes
(short side 256-512 px, aspect 3:4 to 4:3; synthetic natural-like content: bicubic-upsampled colour fields plus
sensor-like noise) with ``.cls`` labels, 128 per shard. Every pipeline goes from these local shards (or the
converted ones) to float32 [B, 3, S, S] batches in [-1, 1] with random flips, in ONE process with one torch
thread (a DataLoader worker's view):

- ``TrainStream(wds shards, image_size=S)`` with ``resize="adm"`` and ``resize="area"``: decode + resize every
  image every epoch;
- ``TrainStream(converted)``: the shards ``python -m data.prepare webdataset --size S`` wrote (timed too,
  one writer process: the one-off cost);
- the plain recipe ``wds.WebDataset(urls).decode("pil")`` + guided-diffusion's ``center_crop_arr`` + flip +
  ``.batched(B)`` (what an ADM user runs), for reference.

Timed runs alternate between pipelines (median of ``--repeats``); the machine's load is recorded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
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
from data.stream import TrainStream, to_float

PROG = "python -m benchmarks.bench_webdataset"
PER_SHARD = 128


def natural_like(rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3], short side 256-512, aspect 3:4..4:3: bicubic-upsampled 8x8 colour field + noise (sigma 6)."""
    short, aspect = int(rng.integers(256, 513)), float(rng.uniform(0.75, 4 / 3))
    h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(big + rng.normal(0, 6, big.shape).astype(np.float32), 0, 255).astype(np.uint8)


def write_source(folder: str, n: int) -> tuple[str, float, float]:
    """ShardWriter shards of n JPEGs -> (brace pattern, mean JPEG bytes, mean pixels per image)."""
    import webdataset as wds

    rng, nbytes, pixels = np.random.default_rng(0), 0, 0
    with wds.ShardWriter(os.path.join(folder, "src-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(n):
            img = natural_like(rng)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            nbytes, pixels = nbytes + buf.tell(), pixels + img.shape[0] * img.shape[1]
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": i % 1000})
    last = (n - 1) // PER_SHARD
    return os.path.join(folder, f"src-{{000000..{last:06d}}}.tar"), nbytes / n, pixels / n


def time_stream(source: str, batch: int, images: int, **kw) -> tuple[float, float]:
    """(img/s, CPU ms/img) of TrainStream over whole blocks (2 shards each, read and decoded when the block
    starts): the clock starts at the first block boundary after the first batch."""
    stream = TrainStream(source, batch, seed=0, flip=True, shards_per_block=2, **kw)
    next(stream)
    for _ in range(10_000):
        if stream.state_dict()["workers"][0]["pos"] == 0:
            break
        next(stream)
    n = max(1, images // batch)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(stream)
    return n * batch / (time.perf_counter() - t), 1e3 * (time.process_time() - c) / (n * batch)


def time_plain(pattern: str, batch: int, images: int, size: int) -> tuple[float, float]:
    """(img/s, CPU ms/img) of the plain webdataset recipe with guided-diffusion's center_crop_arr, after its
    first batch."""
    import webdataset as wds
    from braceexpand import braceexpand
    from guided_diffusion.image_datasets import center_crop_arr

    rng = np.random.default_rng(0)

    def prep(sample):
        img, cls = sample
        arr = center_crop_arr(img.convert("RGB"), size)
        return (arr[:, ::-1] if rng.random() < 0.5 else arr), cls

    urls = list(braceexpand(pattern)) * 8
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("jpg", "cls")
    n, t, c = 0, None, 0.0
    for imgs, cls in ds.map(prep).batched(batch):
        x, _ = to_float(np.ascontiguousarray(imgs)), torch.as_tensor(cls)
        if t is None:
            t, c = time.perf_counter(), time.process_time()
            continue
        n += len(x)
        if n >= images:
            break
    return n / (time.perf_counter() - t), 1e3 * (time.process_time() - c) / n


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    return {"cpu": model, "nproc": os.cpu_count(), "load_at_start": os.getloadavg()[0], "torch": torch.__version__}


def measure(args: argparse.Namespace, tmp: str) -> dict:
    pattern, jpg_bytes, pixels = write_source(tmp, args.images)
    out = os.path.join(tmp, "conv")
    t, c = time.perf_counter(), time.process_time()
    prepare_webdataset(pattern, out, size=args.size, resize="adm", workers=0, progress=False)
    convert, convert_cpu = args.images / (time.perf_counter() - t), 1e3 * (time.process_time() - c) / args.images
    runs: dict[str, list[float]] = {"read_adm": [], "read_area": [], "converted": [], "plain_adm": []}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # alternate, so load changes hit every pipeline alike
        for k, (rate, ms) in {
                "read_adm": time_stream(pattern, args.batch, args.timed_images, image_size=args.size),
                "read_area": time_stream(pattern, args.batch, args.timed_images, image_size=args.size,
                                         resize="area"),
                "converted": time_stream(out, args.batch, 8 * args.timed_images),
                "plain_adm": time_plain(pattern, args.batch, args.timed_images, args.size)}.items():
            runs[k].append(rate)
            cpu[k].append(ms)
    return {"runs": runs, "cpu_ms_per_img": cpu, "convert_img_per_s": convert, "convert_cpu_ms_per_img": convert_cpu,
            "jpg_bytes": jpg_bytes, "pixels": pixels,
            "converted_bytes": os.path.getsize(os.path.join(out, "train-000000.tar")) / PER_SHARD}


def report(args: argparse.Namespace, r: dict, start: str, mach: dict) -> str:
    med = {k: statistics.median(v) for k, v in r["runs"].items()}
    fmt = lambda v: ", ".join(f"{x:,.0f}" for x in v)  # noqa: E731
    names = {"read_adm": f"`TrainStream(wds, image_size={args.size})` (read-time ADM resize)",
             "read_area": f"`TrainStream(wds, image_size={args.size}, resize=\"area\")` (read-time area resize)",
             "converted": "`TrainStream(converted)` (after `data.prepare webdataset`, .npy shards)",
             "plain_adm": "plain `wds.WebDataset(...).decode(\"pil\")` + guided-diffusion `center_crop_arr`"}
    ms = {k: statistics.median(v) for k, v in r["cpu_ms_per_img"].items()}
    rows = [f"| {names[k]} | {fmt(r['runs'][k])} | {med[k]:,.0f} | {ms[k]:.3f} | {ms['read_adm'] / ms[k]:.1f}x |"
            for k in names]
    epochs = r["convert_cpu_ms_per_img"] / (ms["read_adm"] - ms["converted"])
    return "\n".join([
        "# Any webdataset in: read-time resize vs converting once (per loader process)", "",
        f"Measured {start} by `{' '.join([PROG] + (sys.argv[1:] if args.argv is None else list(args.argv)))}` on "
        f"{mach['cpu']}, nproc {mach['nproc']}, load average {mach['load_at_start']:.1f} at start (a shared "
        f"machine: other engineers' jobs ran alongside), torch {mach['torch']}.", "",
        f"Source: {args.images} JPEG images (quality 90, mean {r['pixels'] / 1e3:,.0f} kpixels, "
        f"{r['jpg_bytes'] / 1e3:,.1f} kB each) in webdataset.ShardWriter shards of {PER_SHARD}, target "
        f"{args.size}x{args.size}, batch {args.batch}, random flips, one process, one torch thread; "
        f"{args.repeats} alternating runs, median reported.", "",
        "Wall-clock rates swing with the load of the shared machine; the CPU time per image of the process "
        "(`time.process_time`, one thread) is the steadier figure and the speed-up column uses it.", "",
        "| pipeline | runs (img/s, wall clock) | median img/s | median CPU ms/img | speed-up (CPU) vs read-time ADM |",
        "|---|---|---|---|---|", *rows, "",
        f"Converting once (`data.prepare webdataset --size {args.size} --workers 0`, one process, including "
        f"writing): {r['convert_img_per_s']:,.0f} img/s wall clock, {r['convert_cpu_ms_per_img']:.2f} CPU ms/img; "
        f"the converted shards hold {r['converted_bytes'] / 1e3:,.1f} kB per sample against "
        f"{r['jpg_bytes'] / 1e3:,.1f} kB of JPEG. Conversion pays for itself after {epochs:.2f} epochs "
        "(its CPU time / CPU time saved per epoch).", "",
        "Raw figures (img/s): " + json.dumps({k: [round(x) for x in v] for k, v in r["runs"].items()}),
        "", "Raw figures (CPU ms/img): " + json.dumps({k: [round(x, 3) for x in v]
                                                       for k, v in r["cpu_ms_per_img"].items()}), ""])


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="JPEG images in the source webdataset")
    p.add_argument("--size", type=int, default=64, help="target side in pixels")
    p.add_argument("--batch", type=int, default=64, help="batch size (divide 256 to stay on block boundaries)")
    p.add_argument("--timed-images", type=int, default=1024,
                   help="images per timed read-time run (a multiple of 256, one block, keeps the clock on block "
                        "boundaries; the converted shards run 8x as many)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed runs per pipeline (median reported)")
    p.add_argument("--out", default="benchmarks/results/webdataset.md", help="report (.md; .json next to it)")
    args = p.parse_args(argv)
    args.argv = argv
    for name in ("images", "size", "batch", "timed_images", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    start, mach = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine()
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args, tmp)
    text = report(args, r, start, mach)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, text)
    atomic_write_json(os.path.splitext(args.out)[0] + ".json", {"date": start, "machine": mach, **r,
                                                                 "settings": {k: v for k, v in vars(args).items()
                                                                              if k != "argv"}})
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
