"""Convert image data sets into tar shards + a manifest (resumable, atomic, parallel).

    python -m data.prepare npz-batches --out-dir DIR --name train Imagenet64_train/train_data_batch_*.npz
    python -m data.prepare folder --out-dir DIR --name train /imagenet/train --size 64
    python -m data.prepare npz --out-dir DIR --name ref VIRTUAL_imagenet64_labeled.npz
    python -m data.prepare digits --out-dir DIR --size 16
    python -m data.prepare webdataset 'wds/train-{000000..000099}.tar' --out-dir DIR --size 64  # --resize adm|area

Writes ``DIR/NAME-000000.tar ...`` (``--shard-size`` samples each, keys = global sample index) and
``DIR/NAME-manifest.json`` last, so a manifest means "complete". A shard appears only by an atomic rename, so
re-running after a crash rewrites only the missing shards; a complete data set is never touched without
``--overwrite``.

From Python, call the converters with the same settings as keyword arguments (``prepare_digits("shards/d16",
size=16)``); they check their inputs as the CLI does and raise ``data.cli.UsageError`` / ``DataError``.
"""
from __future__ import annotations

import concurrent.futures as cf
import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .cli import ArgumentParser, UsageError, die, flag, run_cli
from .decode import RESIZERS, _area_weights, area_resize, center_crop_adm, center_crop_area  # noqa: F401
from .errors import DataError
from .fsio import atomic_write_text
from .seeds import derive_rng
from .shards import (FORMAT, FORMAT_VERSION, MANIFEST_SUFFIX, first_sample, parse_tar, read_shard, shard_entry,
                     split_key, write_shard)

PROG = "python -m data.prepare"

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
DIGITS_SIZES = (8, 16, 32, 64)


# ----------------------------------------------------------------------------------------- image helpers
def digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (0..16) -> uint8 [1797, size, size, 3] (bicubic upscale, grey as RGB), labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    small = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im, "L").resize((size, size), Image.BICUBIC)) for im in small])
    return np.repeat(big[..., None], 3, axis=3), d.target.astype(np.int64)


# -------------------------------------------------------------------------------------------- the writer
@dataclass
class Job:
    """One shard to write. Either ``images`` (uint8 [n, H, W, 3]) or ``files`` to decode and resize."""

    index: int
    path: str
    keys: list[str]
    labels: np.ndarray | None
    images: np.ndarray | None = None
    files: list[str] | None = None
    size: int = 0
    resize: str = "area"
    source: str | None = None  # a webdataset shard to decode (labels: ``labelled``, checked against num_classes)
    labelled: bool = False
    num_classes: int = 0


def _from_webdataset(job: Job) -> tuple[dict, list[str], int]:
    """Write the good samples of input shard ``job.source``, resized; key = input shard index - position."""
    sd = read_shard(job.source, (job.size, job.size), labelled=job.labelled, num_classes=job.num_classes or None,
                    resize=job.resize)  # type: ignore[arg-type]
    keys = [f"{job.index:06d}-{p:06d}" for p in sd.positions.tolist()]
    images = np.stack(sd.images) if len(sd) else np.zeros((0, job.size, job.size, 3), np.uint8)
    entry = write_shard(job.path, keys, images, sd.labels if job.labelled else None)
    entry["max_label"] = int(sd.labels.max()) if len(sd) else -1
    return entry, sd.problems, sd.bad


def run_job(job: Job) -> tuple[dict, list[str], int]:
    """Write one shard (in a worker process). Returns its manifest entry, examples of the inputs it had to skip
    and their number."""
    if job.source is not None:
        return _from_webdataset(job)
    keys, labels, images, skipped = job.keys, job.labels, job.images, []
    if job.files is not None:
        imgs, keep = [], []
        for i, f in enumerate(job.files):
            try:
                with Image.open(f) as im:
                    imgs.append(RESIZERS[job.resize](im, job.size))
                keep.append(i)
            except Exception as e:  # one unreadable JPEG must not end a day-long conversion
                skipped.append(f"{f}: {type(e).__name__}: {str(e)[:80]}")
        keys = [keys[i] for i in keep]
        labels = None if labels is None else labels[keep]
        images = np.stack(imgs) if imgs else np.zeros((0, job.size, job.size, 3), np.uint8)
    entry = write_shard(job.path, keys, images, labels)
    return entry, skipped, len(skipped)


def _existing_entry(path: str) -> dict | None:
    """Manifest entry for a shard already on disk (a finished earlier run), or None if it cannot be parsed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        members, damage = parse_tar(data)
        keys = {split_key(name)[0] for name, _, _ in members}
        labels = [int(data[o:o + n]) for name, o, n in members if name.endswith(".cls")]
    except Exception:
        return None
    if damage:
        return None
    return {**shard_entry(path, data, len(keys)), "max_label": max(labels, default=-1)}


def _write_json(path: str, obj: dict) -> None:
    """Manifests and progress files: one-space indented JSON, keys in the order written, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


@dataclass
class Dataset:
    """Everything about one output data set except the pixels."""

    out: str
    name: str
    total: int  # input samples (before skipping unreadable files)
    shard_size: int
    image_size: tuple[int, int]
    num_classes: int
    source: str
    settings: dict
    class_names: list[str] | None = None
    extra_files: dict[str, str] = field(default_factory=dict)  # file name -> text, written with the manifest
    shards: int = 0  # number of shards when not total / shard_size (webdataset: one per input shard)
    meta: dict = field(default_factory=dict)  # more manifest fields (webdataset: "conversion")

    def shard_path(self, i: int) -> str:
        return os.path.join(self.out, f"{self.name}-{i:06d}.tar")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.out, self.name + MANIFEST_SUFFIX)

    @property
    def num_shards(self) -> int:
        return self.shards or (self.total + self.shard_size - 1) // self.shard_size


def check_out(ds: Dataset, overwrite: bool) -> None:
    """Refuse to touch a complete data set without --overwrite; with it, delete the old one first."""
    os.makedirs(ds.out, exist_ok=True)
    progress = os.path.join(ds.out, f".{ds.name}-progress.json")
    name, shard = glob.escape(ds.name), "[0-9]" * 6 + ".tar"
    stale = [f".{name}-{shard}.*.tmp", f".{name}{MANIFEST_SUFFIX}.*.tmp",  # data.fsio's temporary names
             f".tmp-{name}-{shard}-*", f".tmp-{name}{MANIFEST_SUFFIX}-*"]  # those of earlier versions
    for p in (p for pat in stale for p in glob.glob(os.path.join(glob.escape(ds.out), pat))):
        os.unlink(p)  # half-written files of a run that crashed (never visible under a real name)
    if overwrite:
        for p in glob.glob(os.path.join(glob.escape(ds.out), f"{name}-{shard}")):
            os.unlink(p)
        for p in (ds.manifest_path, progress):
            if os.path.exists(p):
                os.unlink(p)
    elif os.path.exists(ds.manifest_path):
        raise DataError(f"{ds.manifest_path} already exists (a complete data set): pass --overwrite to rebuild it")
    if os.path.exists(progress):
        with open(progress) as f:
            old = json.load(f)
        if old != ds.settings:
            raise DataError(f"{ds.out} holds a partial '{ds.name}' data set made with other settings "
                            f"({progress}): pass --overwrite to start again")
    else:
        _write_json(progress, ds.settings)


def write_dataset(ds: Dataset, jobs: Iterator[Job], workers: int, progress: bool = True) -> dict:
    """Write the shards (skipping complete ones), then the manifest. Returns the manifest."""
    from tqdm import tqdm

    entries: dict[int, dict] = {}
    skipped: list[str] = []
    n_skipped = 0
    bar = tqdm(total=ds.total or None, unit="img", desc=f"{ds.name}", disable=not progress, file=sys.stderr)

    def done(entry: dict, skip: list[str], n_skip: int, index: int, n: int) -> None:
        nonlocal n_skipped
        entries[index] = entry
        skipped.extend(skip)
        n_skipped += n_skip
        bar.update(n or entry["samples"] + n_skip)

    pool = cf.ProcessPoolExecutor(workers) if workers > 0 else None
    pending: dict[cf.Future, tuple[int, int]] = {}
    try:
        for job in jobs:
            if pool is None:
                done(*run_job(job), job.index, len(job.keys))
                continue
            pending[pool.submit(run_job, job)] = (job.index, len(job.keys))
            while len(pending) >= 2 * workers:  # bounded: never hold the whole data set in memory
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    done(*fut.result(), *pending.pop(fut))
        for fut in cf.as_completed(list(pending)):
            done(*fut.result(), *pending.pop(fut))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for i in range(ds.num_shards):  # shards finished by an earlier run
        if i not in entries:
            entries[i] = _existing_entry(ds.shard_path(i))  # type: ignore[assignment]
    shards = [entries[i] for i in range(ds.num_shards)]
    max_label = max((s.pop("max_label", -1) for s in shards), default=-1)
    if ds.shards:  # webdataset: a shard whose samples were all bad is left out
        shards = [s for s in shards if s["samples"]]
    if ds.num_classes < 0:  # from the labels: max + 1
        ds.num_classes = max_label + 1
    for name, text in ds.extra_files.items():
        atomic_write_text(os.path.join(ds.out, name), text)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": ds.name, "encoding": "npy",
        "image_size": list(ds.image_size), "channels": 3, "num_classes": ds.num_classes,
        "class_names": ds.class_names, "total": sum(s["samples"] for s in shards), "shard_size": ds.shard_size,
        "source": ds.source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "skipped": n_skipped, "skipped_examples": skipped[:20], **ds.meta, "shards": shards,
    }
    _write_json(ds.manifest_path, manifest)
    progress_file = os.path.join(ds.out, f".{ds.name}-progress.json")
    if os.path.exists(progress_file):
        os.unlink(progress_file)
    return manifest


def _todo(ds: Dataset) -> list[int]:
    """Shards still to write: those not on disk or not parseable."""
    return [i for i in range(ds.num_shards)
            if not os.path.exists(ds.shard_path(i)) or _existing_entry(ds.shard_path(i)) is None]


def array_jobs(ds: Dataset, chunks: Iterator[tuple[int, np.ndarray, np.ndarray | None]]) -> Iterator[Job]:
    """Cut a stream of (first_index, images uint8 [n, H, W, 3], labels [n] | None) into shard jobs.

    Only the samples of a shard still to write are copied (contiguous), so a shard that straddles two
    input files costs one shard of memory, not a second copy of a 1.5 GB batch file.
    """
    todo = set(_todo(ds))
    S = ds.shard_size
    pend: list[tuple[np.ndarray, np.ndarray | None]] = []  # pieces not yet cut into shards
    start, have = 0, 0  # global index of the first pending sample, pending count
    for first, imgs, labels in chunks:
        if first != start + have:
            raise ValueError(f"chunks must be contiguous: chunk starts at {first}, expected {start + have}")
        pend.append((imgs, labels))
        have += len(imgs)
        while have >= S or (have and start + have == ds.total):
            n, need, parts = min(S, have), min(S, have), []
            while need:
                im, lb = pend[0]
                k = min(need, len(im))
                parts.append((im[:k], None if lb is None else lb[:k]))
                pend[0] = (im[k:], None if lb is None else lb[k:])
                if k == len(im):
                    pend.pop(0)
                need -= k
            idx = start // S
            if idx in todo:
                images = np.concatenate([p[0] for p in parts])  # a contiguous copy
                labs = None if parts[0][1] is None else np.concatenate([p[1] for p in parts]).astype(np.int64)
                yield Job(idx, ds.shard_path(idx), [f"{start + k:09d}" for k in range(n)], labs, images=images)
            start, have = start + n, have - n


# ---------------------------------------------------------------------------------------------- sources
def _load_npz(path: str) -> np.lib.npyio.NpzFile:
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None


def _npz_header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array ``key`` in an .npz without reading its data (None if absent)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            if key + ".npy" not in zf.namelist():
                return None
            with zf.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                return shape, dtype
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------------- input checking
def _is_int(x: object) -> bool:
    """A Python int (not a bool, not a numpy integer: settings and manifests are JSON)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _raise_first(checks: Iterable[tuple[bool, str]]) -> None:
    """UsageError with the message of the first (bad, message) pair whose ``bad`` is true."""
    for bad, message in checks:
        if bad:
            raise UsageError(message)


@dataclass(frozen=True)
class WriteOptions:
    """The settings every converter shares (the CLI's common flags): where and how the shards are written."""

    out_dir: str
    name: str = "train"  # NAME-000000.tar, NAME-manifest.json
    shard_size: int = 1000  # samples per shard
    workers: int = DEFAULT_WORKERS  # writer processes (0: in this process)
    overwrite: bool = False  # delete and rebuild a complete data set
    progress: bool = True  # progress bar on stderr

    def checked(self, *extra: tuple[bool, str]) -> WriteOptions:
        """These options (``out_dir`` as a str), or UsageError (one line naming the flag) for the first bad
        value in the order: shard size, workers, the converter's own ``extra`` (bad, message) checks, name,
        output folder."""
        size, workers, name, out = self.shard_size, self.workers, self.name, self.out_dir
        _raise_first([
            (not _is_int(size) or size < 1, f"--shard-size must be >= 1, got {size!r}"),
            (not _is_int(workers) or workers < 0, f"--workers must be >= 0, got {workers!r}"),
            *extra,
            (not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name),
             f"--name may hold only letters, digits, '-', '_' and '.', got {name!r}"),
            (not isinstance(out, (str, os.PathLike)), f"--out-dir must be a folder path, got {out!r}"),
        ])
        if os.path.exists(out) and not os.path.isdir(out):
            raise UsageError(f"--out-dir {out} is a file; give a folder")
        return replace(self, out_dir=os.fspath(out))

    def dataset(self, total: int, image_size: tuple[int, int], num_classes: int, source: str, settings: dict,
                class_names: list[str] | None = None) -> Dataset:
        return Dataset(self.out_dir, self.name, total, self.shard_size, image_size, num_classes, source, settings,
                       class_names)


def _size_check(size: object, sizes: tuple[int, ...] | None = None) -> tuple[bool, str]:
    """The --size check of the folder (any positive side) and digits (one of ``sizes``) converters."""
    bad = not _is_int(size) or size < 1 or (sizes is not None and size not in sizes)  # type: ignore[operator]
    return bad, f"--size must be positive (digits: 8, 16, 32 or 64), got {size!r}"


# -------------------------------------------------------------------------------------------- converters
def prepare_npz_batches(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                        name: str = "train", shard_size: int = 1000, workers: int = DEFAULT_WORKERS,
                        overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Downsampled-ImageNet batches: ``data`` uint8 [N, 3*S*S] channel-planar, ``labels`` 1..1000.

    ``inputs``: the batch files, in sample order. Returns ``[manifest]``.
    """
    files = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    opts = WriteOptions(out_dir, name, shard_size, workers, overwrite, progress).checked(
        (not files, "npz-batches needs at least one input file"))
    sizes, side = [], None
    for f in files:  # headers only: validate all inputs before writing anything
        if not os.path.isfile(f):
            raise DataError(f"no such file: {f}")
        data, labels = _npz_header(f, "data"), _npz_header(f, "labels")
        if data is None or labels is None:
            raise DataError(f"{f} has no 'data' and 'labels' arrays: is it a Downsampled-ImageNet batch?")
        n, d = data[0] if len(data[0]) == 2 else (0, 0)
        s = int(round((d / 3) ** 0.5))
        if data[1] != np.uint8 or 3 * s * s != d or n == 0:
            raise DataError(f"{f}: 'data' must be uint8 [N, 3*S*S], got {data[1]} {data[0]}")
        if side not in (None, s):
            raise DataError(f"{f}: images are {s} px but earlier batches are {side} px")
        side = s
        sizes.append(n)
    ds = opts.dataset(sum(sizes), (side, side), 1000,
                      "npz-batches: " + ", ".join(os.path.basename(f) for f in files),
                      {"kind": "npz-batches", "inputs": [os.path.abspath(f) for f in files], "shard_size": shard_size})
    check_out(ds, opts.overwrite)
    todo = set(_todo(ds))  # after check_out: --overwrite deletes the old shards

    def chunks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        first = 0
        for f, n in zip(files, sizes):
            shards = range(first // ds.shard_size, (first + n - 1) // ds.shard_size + 1)
            if any(i in todo for i in shards):  # skip reading batches whose shards are all done
                z = _load_npz(f)
                labels = np.asarray(z["labels"]).astype(np.int64).reshape(-1) - 1  # 1..1000 -> 0..999
                if len(labels) != n or labels.min() < 0 or labels.max() > 999:
                    raise DataError(f"{f}: labels must be {n} values in 1..1000")
                imgs = z["data"].reshape(n, 3, side, side).transpose(0, 2, 3, 1)  # planar -> HWC
            else:  # placeholders that take no memory: these shards are not rewritten
                imgs = np.broadcast_to(np.zeros((1, side, side, 3), np.uint8), (n, side, side, 3))
                labels = np.broadcast_to(np.zeros(1, np.int64), (n,))
            yield first, imgs, labels
            first += n

    return [write_dataset(ds, array_jobs(ds, chunks()), opts.workers, opts.progress)]


def prepare_npz(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, images_key: str = "arr_0",
                labels_key: str = "arr_1", labels: bool = True, num_classes: int = 0, name: str = "train",
                shard_size: int = 1000, workers: int = DEFAULT_WORKERS, overwrite: bool = False,
                progress: bool = True) -> list[dict]:
    """Any npz of uint8 NHWC images (``images_key``) with optional labels (``labels_key``; ``labels=False``:
    an unlabelled data set). ``num_classes`` 0: max label + 1. Returns ``[manifest]``."""
    opts = WriteOptions(out_dir, name, shard_size, workers, overwrite, progress).checked(
        (not _is_int(num_classes), f"--num-classes must be an integer, got {num_classes!r}"))
    z = _load_npz(path)
    if images_key not in z.files:
        raise DataError(f"{path} has no array {images_key!r} (found {z.files})")
    imgs = z[images_key]
    if imgs.dtype != np.uint8 or imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[3] not in (1, 3)):
        raise DataError(f"{images_key} must be uint8 [N, H, W, 3] (or [N, H, W]), got {imgs.dtype} {imgs.shape}")
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.shape[3] == 1:
        imgs = np.repeat(imgs, 3, axis=3)
    labs, classes = None, 0
    if labels_key in z.files and labels:
        labs = np.asarray(z[labels_key]).reshape(-1)
        if len(labs) != len(imgs) or not np.issubdtype(labs.dtype, np.integer) or (len(labs) and labs.min() < 0):
            raise DataError(f"{labels_key} must hold {len(imgs)} non-negative integers")
        labs = labs.astype(np.int64)
        classes = num_classes or (int(labs.max()) + 1 if len(labs) else 0)
        if len(labs) and labs.max() >= classes:
            raise DataError(f"labels reach {labs.max()} but --num-classes is {classes}")
    ds = opts.dataset(len(imgs), imgs.shape[1:3], classes, f"npz: {os.path.basename(path)}",
                      {"kind": "npz", "input": os.path.abspath(path), "shard_size": shard_size,
                       "labels": labs is not None})
    check_out(ds, opts.overwrite)
    return [write_dataset(ds, array_jobs(ds, iter([(0, imgs, labs)])), opts.workers, opts.progress)]


def _class_files(root: str) -> tuple[list[str], list[str], list[int]]:
    """ROOT/CLASS/**/image -> (sorted class folder names, image files in class then path order, class index)."""
    if not os.path.isdir(root):
        raise DataError(f"no such folder: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ROOT/CLASS/image.jpg)")
    files, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_FILE_EXTS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(c)
    if not files:
        raise DataError(f"no image files under {root}")
    return classes, files, labels


def prepare_folder(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, size: int = 64,
                   resize: str = "area", shuffle_seed: int = 0, name: str = "train", shard_size: int = 1000,
                   workers: int = DEFAULT_WORKERS, overwrite: bool = False, progress: bool = True) -> list[dict]:
    """ImageNet-style tree ROOT/CLASS/*.JPEG -> centre crop + resize (``resize``: "area" or "adm") to ``size``;
    class index = sorted folder order; files shuffled with ``shuffle_seed`` (-1: keep order). Returns
    ``[manifest]``."""
    opts = WriteOptions(out_dir, name, shard_size, workers, overwrite, progress).checked(
        _size_check(size),
        (resize not in RESIZERS, f"--resize must be one of {', '.join(sorted(RESIZERS))}, got {resize!r}"),
        (not _is_int(shuffle_seed), f"--shuffle-seed must be an integer (-1: keep order), got {shuffle_seed!r}"))
    root = os.fspath(root)
    classes, files, labels = _class_files(root)
    order = np.arange(len(files))
    if shuffle_seed >= 0:  # mix classes across shards: a training block of a few shards sees many classes
        order = derive_rng(shuffle_seed).permutation(len(files))
    files = [files[i] for i in order]
    labels_arr = np.asarray(labels, np.int64)[order]
    ds = opts.dataset(len(files), (size, size), len(classes), f"folder: {os.path.abspath(root)} ({resize})",
                      {"kind": "folder", "root": os.path.abspath(root), "shard_size": shard_size, "size": size,
                       "resize": resize, "shuffle_seed": shuffle_seed, "files": len(files)},
                      class_names=classes)
    rel = [os.path.relpath(f, root) for f in files]
    ds.extra_files = {f"{name}-classes.json": json.dumps({n: i for i, n in enumerate(classes)}, indent=1) + "\n",
                      f"{name}-files.txt": "".join(f"{i:09d} {p}\n" for i, p in enumerate(rel))}
    check_out(ds, opts.overwrite)
    S = shard_size
    jobs = (Job(i, ds.shard_path(i), [f"{k:09d}" for k in range(i * S, min((i + 1) * S, len(files)))],
                labels_arr[i * S:(i + 1) * S], files=files[i * S:(i + 1) * S], size=size, resize=resize)
            for i in _todo(ds))
    return [write_dataset(ds, jobs, opts.workers, opts.progress)]


def prepare_digits(out_dir: str | os.PathLike[str], *, size: int = 16, val_fraction: float = 0.2, seed: int = 0,
                   shard_size: int = 1000, workers: int = DEFAULT_WORKERS, overwrite: bool = False,
                   progress: bool = True) -> list[dict]:
    """The bundled demo data: 1,797 real 8x8 digits, upscaled to ``size`` (8, 16, 32 or 64), split with ``seed``
    into ``train`` and ``val`` (``val_fraction`` of them). Returns the manifests written (a split finished by an
    earlier run is skipped)."""
    opts = WriteOptions(out_dir, "train", shard_size, workers, overwrite, progress).checked(
        _size_check(size, DIGITS_SIZES),
        (not isinstance(val_fraction, Real) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1,
         f"--val-fraction must be in (0, 1), got {val_fraction!r}"),
        (not _is_int(seed) or seed < 0, f"--seed must be an integer >= 0, got {seed!r}"))
    imgs, labels = digits_images(size)
    perm = derive_rng(seed).permutation(len(imgs))
    n_val = int(round(val_fraction * len(imgs)))
    splits = {"train": perm[n_val:], "val": perm[:n_val]}
    settings = {"kind": "digits", "size": size, "seed": seed, "val_fraction": val_fraction, "shard_size": shard_size}
    source, class_names = f"scikit-learn digits, bicubic 8->{size} px, split seed {seed}", [str(d) for d in range(10)]
    dss = [replace(opts, name=split).dataset(len(idx), (size, size), 10, source, settings, class_names)
           for split, idx in splits.items()]
    if not opts.overwrite and all(os.path.exists(ds.manifest_path) for ds in dss):
        raise DataError(f"digits data set in {opts.out_dir} is complete: pass --overwrite to rebuild it")
    out = []
    for ds, idx in zip(dss, splits.values()):
        if os.path.exists(ds.manifest_path) and not opts.overwrite:
            continue  # this split finished earlier
        check_out(ds, opts.overwrite)
        out.append(write_dataset(ds, array_jobs(ds, iter([(0, imgs[idx], labels[idx])])), opts.workers, opts.progress))
    return out


def _peek_labelled(urls: list[str]) -> bool:
    """Whether the source is labelled: decided by the first good sample of the first readable shard."""
    for url in urls[:8]:
        first = first_sample(url)
        if first is not None:
            return first[1]
    raise DataError(f"no readable sample in the first {min(len(urls), 8)} shard(s) of {urls[0]}")


def prepare_webdataset(source: str | Sequence[str], out_dir: str | os.PathLike[str], *, size: int = 64,
                       resize: str = "adm", labels: bool = True, num_classes: int = 0, name: str = "train",
                       workers: int = DEFAULT_WORKERS, overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Shards of any webdataset (``source``: a pattern, glob, folder, comma list or list, as the streams take it;
    image and label members as ``data.decode`` documents) -> our shards, every image centre-cropped and resized
    to ``size`` with ``resize`` ("adm" or "area"). One output shard per input shard, keys ``SSSSSS-PPPPPP``
    (input shard, position); bad samples are skipped and counted. ``labels=False``: unlabelled. ``num_classes``
    0: max label + 1. Returns ``[manifest]``."""
    from .sources import resolve

    opts = WriteOptions(out_dir, name, 1, workers, overwrite, progress).checked(
        _size_check(size),
        (resize not in RESIZERS, f"--resize must be one of {', '.join(sorted(RESIZERS))}, got {resize!r}"),
        (not _is_int(num_classes) or num_classes < 0, f"--num-classes must be an integer >= 0, got {num_classes!r}"))
    urls = resolve(source).urls
    labelled = labels and _peek_labelled(urls)
    spec = source if isinstance(source, str) else ",".join(os.fspath(x) for x in source)
    settings = {"kind": "webdataset", "inputs": urls, "size": size, "resize": resize, "labels": labelled,
                "num_classes": num_classes}
    ds = opts.dataset(0, (size, size), (num_classes or -1) if labelled else 0,
                      f"webdataset: {spec} ({len(urls)} shards, {resize} resize to {size})", settings)
    ds.shards, ds.shard_size = len(urls), 0  # manifest shard_size 0: one output shard per input shard
    ds.meta = {"conversion": {"from": "webdataset", "source": spec, "input_shards": len(urls), "size": size,
                              "resize": resize, "labels": labelled}}
    ds.extra_files = {f"{name}-inputs.txt": "".join(f"{i:06d} {u}\n" for i, u in enumerate(urls))}
    check_out(ds, opts.overwrite)
    jobs = (Job(i, ds.shard_path(i), [], None, size=size, resize=resize, source=urls[i], labelled=labelled,
                num_classes=num_classes) for i in _todo(ds))
    return [write_dataset(ds, jobs, opts.workers, opts.progress)]


# --------------------------------------------------------------------------------------------------- CLI
RUNNERS: dict[str, Callable[..., list[dict]]] = {"npz-batches": prepare_npz_batches, "npz": prepare_npz,
                                                 "folder": prepare_folder, "digits": prepare_digits,
                                                 "webdataset": prepare_webdataset}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", metavar="{npz-batches,folder,npz,digits,webdataset}",
                           parser_class=ArgumentParser)
    sub.required = True

    def common(q: ArgumentParser, name: bool = True, shard_size: bool = True) -> None:
        q.add_argument("--out-dir", required=True, help="output folder (created)")
        if name:
            q.add_argument("--name", default="train", help="data set name: NAME-000000.tar, NAME-manifest.json")
        if shard_size:
            q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        q.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                       help="writer processes (0: in this process)")
        flag(q, "--overwrite", False, "delete and rebuild a complete data set")
        flag(q, "--progress", True, "progress bar on stderr")

    q = sub.add_parser("npz-batches", help="Downsampled-ImageNet .npz batches (data N x 3*S*S, labels 1..1000)")
    q.add_argument("inputs", nargs="+", help="batch files, e.g. train_data_batch_{1..10}.npz or val_data.npz")
    common(q)
    q = sub.add_parser("folder", help="ImageNet-style tree ROOT/CLASS/*.JPEG")
    q.add_argument("root")
    q.add_argument("--size", type=int, default=64, help="output side in pixels (default 64)")
    q.add_argument("--resize", choices=sorted(RESIZERS), default="area",
                   help="area: centre crop + box (area) downsample; adm: improved-diffusion loader (box halving, "
                        "bicubic, crop)")
    q.add_argument("--shuffle-seed", type=int, default=0, help="shuffle file order with this seed (-1: keep order)")
    common(q)
    q = sub.add_parser("npz", help="npz of uint8 NHWC images (arr_0) with optional labels (arr_1)")
    q.add_argument("path", metavar="input")
    q.add_argument("--images-key", default="arr_0")
    q.add_argument("--labels-key", default="arr_1")
    flag(q, "--labels", True, "keep the labels array if present (--no-labels: an unlabelled data set)")
    q.add_argument("--num-classes", type=int, default=0, help="number of classes (default: max label + 1)")
    common(q)
    q = sub.add_parser("digits", help="scikit-learn 8x8 digits upscaled; writes 'train' and 'val'")
    q.add_argument("--size", type=int, default=16, help="output side in pixels (8, 16, 32 or 64)")
    q.add_argument("--val-fraction", type=float, default=0.2)
    q.add_argument("--seed", type=int, default=0, help="train/val split seed")
    common(q, name=False)
    q = sub.add_parser("webdataset", help="shards of any webdataset (jpg/png/webp/npy images of any size, labels in "
                                          "cls/label/txt/json): resized once, one output shard per input shard")
    q.add_argument("source", help="shards: 'dir/train-{000000..000099}.tar', a glob, a folder or a comma list")
    q.add_argument("--size", type=int, default=64, help="output side in pixels (default 64)")
    q.add_argument("--resize", choices=sorted(RESIZERS), default="adm",
                   help="adm (default): guided-diffusion's center_crop_arr (box halving, bicubic, centre crop); "
                        "area: centre crop + exact area downsample")
    flag(q, "--labels", True, "keep the labels (--no-labels: an unlabelled data set)")
    q.add_argument("--num-classes", type=int, default=0, help="number of classes (default: max label + 1)")
    common(q, shard_size=False)
    return p


def _main(argv: Sequence[str] | None) -> int:
    options = vars(build_parser().parse_args(argv))  # the flags' dest names are the converters' parameter names
    kind = options.pop("kind")
    try:
        manifests = RUNNERS[kind](**options)  # checks its own inputs (UsageError / DataError)
    except OSError as e:  # disk full, permissions: not a usage error
        die(f"{type(e).__name__}: {e}", PROG, code=1)
    for m in manifests:
        print(f"{os.path.join(options['out_dir'], m['name'] + MANIFEST_SUFFIX)}: {m['total']} samples in "
              f"{len(m['shards'])} shards, {m['image_size'][0]}x{m['image_size'][1]}, {m['num_classes']} classes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: bad input is one line on stderr and exit code 2; an OSError while writing, exit code 1."""
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
