"""On-disk shard format: tar files of ``KEY.npy`` (uint8 H x W x 3) + ``KEY.cls`` (ASCII class index).

Why ``.npy``: it is lossless, self-describing (shape and dtype in a 128-byte header), readable by any numpy
and decoded natively by ``webdataset``'s ``.decode()``, yet costs nothing to decode: every image of a data set
has the same header, so the fast path compares the header bytes and takes a zero-copy view of the pixels
(PNG would cost ~0.3 ms of zlib per 64x64 image, see benchmarks/results/data.md).

Tars are plain ustar with zeroed metadata, so a shard's bytes (and its sha256) are a pure function of
its samples. The reader below parses tar headers itself (checksums verified) from one in-memory read of the
shard: fast, and every kind of damage (truncation, a corrupt header, a member of the wrong size, a missing or
out-of-range label) is caught per sample rather than ending the shard with an exception.

The reader takes shards of other tools too (``webdataset.ShardWriter``, img2dataset, ...): image and label
members as ``data.decode`` documents, images of any size resized on request, gzipped tars.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import blobfile as bf
import numpy as np

from .decode import IMAGE_KEYS, decode_image, find_label
from .errors import DataError
from .fsio import atomic_write_bytes

FORMAT = "iddpm-shards"
FORMAT_VERSION = 1
MANIFEST_SUFFIX = "-manifest.json"


# ----------------------------------------------------------------------------------------------- encoding
def npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact ``.npy`` header numpy writes for a C-ordered uint8 array of ``shape``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


def encode_image(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> ``.npy`` bytes (header + raw pixels, C order)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    return npy_header(img.shape) + img.tobytes()


def is_url(path: str) -> bool:
    return "://" in path


def tar_bytes(keys: list[str], images: np.ndarray, labels: np.ndarray | None) -> bytes:
    """A deterministic ustar archive of ``KEY.npy`` (+ ``KEY.cls``) members. images: uint8 [N, H, W, 3]."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, key in enumerate(keys):
            members = [(f"{key}.npy", encode_image(images[i]))]
            if labels is not None:
                members.append((f"{key}.cls", str(int(labels[i])).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def write_shard(path: str, keys: list[str], images: np.ndarray, labels: np.ndarray | None) -> dict:
    """Atomically write one shard; returns its manifest entry ``{path, samples, bytes, sha256}``."""
    data = tar_bytes(keys, images, labels)
    atomic_write_bytes(path, data)
    return shard_entry(path, data, len(keys))


def shard_entry(path: str, data: bytes, samples: int) -> dict:
    """The manifest entry of the shard at ``path`` holding ``data``: ``{path (base name), samples, bytes, sha256}``."""
    return {"path": os.path.basename(path), "samples": samples, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def read_bytes(path: str) -> bytes:
    """Whole file through blobfile (local paths, gs://, az://, https:// Azure): streamed into memory,
    never copied to local disk."""
    with bf.BlobFile(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------------------------- tar parse
def _octal(field_: bytes) -> int:
    if field_[:1] and field_[0] & 0x80:  # GNU base-256 for big numbers
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


_ZERO_BLOCK = bytes(512)


def parse_tar(buf: bytes) -> tuple[list[tuple[str, int, int]], str | None]:
    """``(name, data_offset, size)`` of the regular files in a tar held in ``buf``, and a damage message
    (None if intact). On damage (bad header checksum, unparseable header, archive cut short) the members
    before the damage are returned. Header checksums are verified in bulk with numpy (headers sit on
    512-byte blocks), so the Python loop only reads sizes and names.
    """
    n, off, long_name = len(buf), 0, None
    out: list[tuple[str, int, int]] = []
    heads: list[int] = []  # header offsets, to checksum
    stored: list[int] = []
    out_at: list[int] = []  # len(out) when each header was read
    damage = None
    while off + 512 <= n:
        hdr = buf[off:off + 512]
        if hdr == _ZERO_BLOCK:
            break  # end-of-archive block
        try:
            try:  # plain octal text (what tar writers use below 8 GiB); else the general parser
                chk, size = int(hdr[148:156].rstrip(b" \0") or b"0", 8), int(hdr[124:136].rstrip(b" \0") or b"0", 8)
            except ValueError:
                chk, size = _octal(hdr[148:156]), _octal(hdr[124:136])
        except ValueError:
            damage = f"unparseable tar header at byte {off}"
            break
        heads.append(off), stored.append(chk), out_at.append(len(out))
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
        start, end = off + 512, off + 512 + size
        if end > n:
            damage = f"archive cut short inside member {name.decode(errors='replace')}"
            break
        if kind == b"L":  # GNU long name for the next member
            long_name = buf[start:end].split(b"\0", 1)[0]
        elif kind == b"x":  # pax extended header: look for path=
            for rec in buf[start:end].split(b"\n"):
                key, _, val = rec.partition(b" ")[2].partition(b"=")
                if key == b"path":
                    long_name = val
        elif kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name, long_name = long_name, None
            out.append((name.decode("utf-8", errors="replace"), start, size))
        off = start + (size + 511) // 512 * 512
    else:
        if off < n:
            damage = "archive cut short inside a header"
    if heads:  # checksum = sum of header bytes with the checksum field read as 8 spaces
        blocks = np.frombuffer(buf, np.uint8, (n // 512) * 512).reshape(-1, 512)
        h = blocks[np.asarray(heads) // 512]
        calc = h.sum(1, dtype=np.int64) - h[:, 148:156].sum(1, dtype=np.int64) + 256
        bad = np.nonzero(calc != np.asarray(stored))[0]
        if len(bad):
            k = int(bad[0])
            return out[:out_at[k]], f"bad tar header checksum at byte {heads[k]}"
    return out, damage


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/abc.seg.npy`` -> key ``dir/abc``, extension ``seg.npy``."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


# ----------------------------------------------------------------------------------------- shard decode
@dataclass
class ShardData:
    """The good samples of one shard. images: n uint8 [H, W, 3] arrays (zero-copy views of the shard bytes);
    labels int64 [n] (-1 if unlabelled); positions int64 [n]: index of each sample in the shard's member
    order (bad samples keep their slot)."""

    path: str
    images: list[np.ndarray]
    labels: np.ndarray
    positions: np.ndarray
    seen: int = 0  # samples found + samples known missing (good + bad)
    bad: int = 0
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def _group(members: list[tuple[str, int, int]]) -> list[dict[str, tuple[int, int]]]:
    """Tar members -> samples (runs of members sharing a key), each ``{ext: (offset, size)}``."""
    samples: list[dict[str, tuple[int, int]]] = []
    cur_key = None
    for name, off, size in members:
        key, ext = split_key(name)
        if key != cur_key:
            cur_key = key
            samples.append({})
        samples[-1][ext] = (off, size)
    return samples


class MixedSizes(DataError):
    """Images of several sizes in a source read without resizing."""


def _image(buf: bytes, sample: dict[str, tuple[int, int]], shape: tuple[int, int] | None,
           hdr: bytes, resize: str | None, check: bool = True) -> tuple[np.ndarray | None, str | None]:
    """One sample's image, uint8 [H, W, 3], or (None, why not). ``hdr``: the ``.npy`` header of a (*shape, 3)
    image; a member with exactly that header and size is a zero-copy view of ``buf`` (the fast path).
    ``resize``: a ``decode.RESIZERS`` method that brings images of another size to ``shape`` (square);
    ``check``: an image of another size is bad (else the caller decides)."""
    npy = sample.get("npy")
    if npy is not None and shape and npy[1] == len(hdr) + shape[0] * shape[1] * 3 and buf.startswith(hdr, npy[0]):
        return np.frombuffer(buf, np.uint8, npy[1] - len(hdr), npy[0] + len(hdr)).reshape(*shape, 3), None
    ext = next((e for e in IMAGE_KEYS if e in sample), None)
    if ext is None:
        return None, "no image member"
    off, size = sample[ext]
    try:
        arr = decode_image(ext, buf[off:off + size], shape[0] if (resize and shape) else None, resize or "adm")
    except Exception as e:
        return None, f"undecodable {ext} ({str(e)[:80]})"
    if check and shape and arr.shape[:2] != tuple(shape):
        return None, f"image of shape {arr.shape}, expected {(*shape, 3)}"
    return arr, None


def _label(buf: bytes, sample: dict[str, tuple[int, int]], num_classes: int | None) -> tuple[int, str | None]:
    """One sample's class index (``decode.find_label``), or (-1 or the bad label, why it is bad)."""
    cls = sample.get("cls")
    if cls is not None:  # the common case first (our shards, ShardWriter's "cls"): one int() of the member
        try:
            label: int | None
            label, why = int(buf[cls[0]:cls[0] + cls[1]]), None
        except ValueError:
            label, why = None, "unparseable label in .cls"
    else:
        label, why = find_label(buf, sample)
    if label is None:
        return -1, why or "missing label"
    if label < 0 or (num_classes and label >= num_classes):
        return label, f"label {label} out of range [0, {num_classes or 'inf'})"
    return label, None


def _read(path: str, expected: int | None) -> tuple[bytes | None, ShardData | None]:
    """The shard's bytes (gunzipped if gzip), or the ShardData of a shard lost as a whole."""
    try:
        buf = read_bytes(path)
        if buf[:2] == b"\x1f\x8b":  # .tar.gz / .tgz, as webdataset reads them
            buf = gzip.decompress(buf)
        return buf, None
    except Exception as e:  # missing, permission, network, bad gzip: all the same to the reader
        lost = max(expected or 0, 1)
        kind = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__})"
        no_pos = np.zeros(0, np.int64)
        return None, ShardData(path, [], no_pos, no_pos, seen=lost, bad=lost, problems=[f"{path}: {kind}"])


def _mixed(path: str, pos: int, got: tuple[int, ...], shape: tuple[int, int]) -> MixedSizes:
    return MixedSizes(f"{path}: sample {pos} is {got[0]}x{got[1]} but earlier images are {shape[0]}x{shape[1]}; "
                      f"images of several sizes must be resized: give an image size (TrainStream/EvalStream "
                      f"image_size=..., trainer --data-image-size N) or convert once with "
                      f"python -m data.prepare webdataset")


def read_shard(path: str, shape: tuple[int, int] | None, *, labelled: bool | None,
               num_classes: int | None, expected: int | None = None, resize: str | None = None,
               strict_shape: bool = False) -> ShardData:
    """Decode one shard, skipping and counting bad samples instead of raising.

    shape: (H, W) every image must have (None: the first good image decides). labelled: whether every sample
    must carry a label (None: decided by the first good sample). num_classes: labels must lie in [0, num_classes)
    (None or 0 with labelled=True: only >= 0). expected: sample count from the manifest, used to count
    samples lost to truncation or to a missing/unreadable/empty shard. resize: ``decode.RESIZERS`` method for
    images of another size than ``shape`` (square). strict_shape: a decodable image of another size raises
    MixedSizes (a DataError) instead of being counted bad (for sources whose size no manifest records).
    """
    buf, lost = _read(path, expected)
    if buf is None:
        return lost  # type: ignore[return-value]
    problems: list[str] = []
    members, damage = parse_tar(buf)
    if damage:
        problems.append(f"{path}: {damage}")  # an incomplete last sample shows up as missing image or label
    samples = _group(members)
    hdr = npy_header((*shape, 3)) if shape else b""
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    positions: list[int] = []
    bad = 0
    for pos, sample in enumerate(samples):
        img, why = _image(buf, sample, shape, hdr, resize, check=not strict_shape)
        label = -1
        if img is not None:
            if not shape:  # the first good image fixes the shape of the rest
                shape, hdr = img.shape[:2], npy_header(img.shape)
            elif strict_shape and img.shape[:2] != tuple(shape):
                raise _mixed(path, pos, img.shape, shape)
            if labelled is None:
                labelled = find_label(buf, sample) != (None, None)
            if labelled:
                label, why = _label(buf, sample, num_classes)
        if why is not None:
            bad += 1
            if len(problems) < 4:
                problems.append(f"{path}: sample {pos}: {why}")
            continue
        imgs.append(img)
        labels.append(label)
        positions.append(pos)
    found = len(samples)
    if expected is not None and found < expected:
        bad += expected - found
        problems.append(f"{path}: {expected - found} of {expected} samples missing")
    if found == 0 and not expected:
        bad += 1
        problems.append(f"{path}: empty shard")
    return ShardData(path, imgs, np.asarray(labels, np.int64), np.asarray(positions, np.int64),
                     seen=max(found, expected or 0, 1 if found == 0 else 0), bad=bad, problems=problems)


def iter_samples(path: str) -> Iterator[tuple[int | None, np.ndarray | None, int | None, str | None]]:
    """Every sample of a shard as (position, image uint8 [H, W, 3] at its own size or None, label or None, problem
    or None); an unreadable shard, or tar damage, is one (None, None, None, problem). For inspecting a foreign
    data set."""
    buf, lost = _read(path, None)
    if buf is None:
        yield None, None, None, lost.problems[0]  # type: ignore[union-attr]
        return
    members, damage = parse_tar(buf)
    for pos, sample in enumerate(_group(members)):
        img, why = _image(buf, sample, None, b"", None)
        label, label_why = find_label(buf, sample)
        yield pos, img, label, why or label_why
    if damage:
        yield None, None, None, f"{path}: {damage}"


def first_sample(path: str) -> tuple[tuple[int, int], bool] | None:
    """(image size (H, W), has a label) of the first sample of a shard whose image decodes; None if none does.
    Decodes only up to that sample."""
    buf, _ = _read(path, None)
    if buf is None:
        return None
    for sample in _group(parse_tar(buf)[0]):
        img, why = _image(buf, sample, None, b"", None)
        if img is not None:
            return (int(img.shape[0]), int(img.shape[1])), find_label(buf, sample) != (None, None)
    return None


def count_samples(path: str) -> int:
    """Samples (runs of members sharing a key) in a shard, without decoding; 1 for an empty/unreadable one
    (it will be counted as one bad sample)."""
    buf, _ = _read(path, None)
    if buf is None:
        return 1
    members, _ = parse_tar(buf)
    keys = [split_key(name)[0] for name, _, _ in members]
    return max(1, sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]))


# ------------------------------------------------------------------------------------------------ manifest
def load_manifest(path: str) -> dict:
    """Read and sanity-check a manifest (local or blobfile URL). Shard paths become absolute/URLs."""
    try:
        text = read_bytes(path).decode()
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except Exception as e:
        raise DataError(f"cannot read manifest {path}: {e}") from None
    try:
        m = json.loads(text)
    except ValueError:
        m = None
    if not (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("shards"), list)
            and all(isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("samples"), int)
                    for s in m["shards"])):
        raise DataError(f"{path} is not a {FORMAT} manifest (written by python -m data.prepare)")
    base = bf.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))
    for s in m["shards"]:
        p = s["path"]
        s["url"] = p if (is_url(p) or os.path.isabs(p)) else bf.join(base, p)
    return m
