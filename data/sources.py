"""Turn a data source (manifest, folder, brace/glob pattern, list of paths or blobfile URLs) into shards."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Sequence, Union

import blobfile as bf
from braceexpand import braceexpand

from .errors import DataError
from .shards import MANIFEST_SUFFIX, is_url, load_manifest

SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass
class Source:
    """Resolved shards. counts: samples per shard (manifest) or None; shape: (H, W) or None (peek later);
    num_classes: from the manifest (0 = unlabelled) or None when unknown."""

    urls: list[str]
    counts: list[int] | None = None
    shape: tuple[int, int] | None = None
    num_classes: int | None = None
    name: str = ""


def _norm(p: str) -> str:
    return p if is_url(p) else os.path.abspath(os.path.expanduser(p))


def _exists(p: str) -> bool:
    return os.path.exists(p) if not is_url(p) else bf.exists(p)


def _from_manifest(path: str) -> Source:
    m = load_manifest(path)
    if not m["shards"]:
        raise DataError(f"manifest {path} lists no shards")
    return Source([s["url"] for s in m["shards"]], [int(s["samples"]) for s in m["shards"]],
                  tuple(m["image_size"]), int(m.get("num_classes", 0)), str(m.get("name", "")))


def _glob(pattern: str) -> list[str]:
    """Local: the standard glob (``*``, ``?``, ``[...]``); URLs: blobfile's glob (``*`` only)."""
    return sorted(glob.glob(pattern) if not is_url(pattern) else bf.glob(pattern))


def _in_folder(folder: str, pattern: str) -> list[str]:
    """Files in ``folder`` matching ``pattern`` (the folder name itself is taken literally)."""
    return _glob(bf.join(folder if is_url(folder) else glob.escape(folder), pattern))


def _manifests_in(folder: str) -> list[str]:
    return _in_folder(folder, "*" + MANIFEST_SUFFIX)


def _expand(spec: str) -> list[str]:
    """One spec (no manifest) -> shard URLs; DataError for a missing path or a pattern matching nothing."""
    out: list[str] = []
    parts = list(braceexpand(spec))
    for part in parts:
        part = _norm(part)
        if any(c in part for c in "*?["):
            hits = _glob(part)
            if not hits:
                raise DataError(f"pattern {part!r} matches no files")
            out += hits
        else:
            out.append(part)
    braced = len(parts) > 1
    local_missing = [p for p in out if not is_url(p) and not os.path.exists(p)]
    if local_missing:
        if len(local_missing) == len(out) and braced:
            raise DataError(f"pattern {spec!r} matches no files (first: {local_missing[0]})")
        what = f"{len(local_missing)} of {len(out)} shards named by {spec!r} do not exist, first: " if braced else ""
        raise DataError(f"no such file or directory: {what}{local_missing[0]}")
    if out and is_url(out[0]) and not bf.exists(out[0]):  # remote: check the first, count the rest as bad data
        raise DataError(f"no such object: {out[0]}")
    return out


def _split_commas(spec: str) -> list[str]:
    """``a.tar,b/{0..3}.tar`` -> [``a.tar``, ``b/{0..3}.tar``]: commas outside braces separate specs, unless the
    whole string names an existing file (a comma in a file name)."""
    parts, depth, cur = [], 0, ""
    for c in spec:
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    if len(parts) == 1 or _exists(_norm(spec)):
        return [spec]
    return [p.strip() for p in parts if p.strip()]


def resolve(source: SourceLike) -> Source:
    """Resolve ``source`` to shard URLs plus whatever a manifest tells about them.

    Accepted: a manifest JSON; a folder holding one manifest (or only .tar files); a brace pattern
    ``dir/train-{000000..000099}.tar``; a glob ``dir/*.tar``; a local path or blobfile URL; a list of these,
    or a comma-separated string of them (as trainer ``--data`` takes it).
    """
    specs = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    specs = [part for spec in specs for part in _split_commas(spec)]
    if not specs:
        raise DataError("empty data source: give a manifest, a folder, a shard pattern or a list of shards")
    parts: list[Source] = []
    for spec in specs:
        if not spec.strip():
            raise DataError("empty data source string")
        plain = not any(c in spec for c in "{*?[")
        if plain and spec.endswith(".json"):
            parts.append(_from_manifest(_norm(spec)))
        elif plain and not spec.endswith((".tar", ".tar.gz", ".tgz")) and bf.isdir(_norm(spec)):
            folder = _norm(spec)
            found = _manifests_in(folder)
            if len(found) == 1:
                parts.append(_from_manifest(found[0]))
            elif len(found) > 1:
                names = ", ".join(bf.basename(f) for f in found)
                raise DataError(f"folder {folder} holds several data sets ({names}): pass one manifest path")
            else:
                tars = sorted(u for pat in ("*.tar", "*.tar.gz", "*.tgz") for u in _in_folder(folder, pat))
                if not tars:
                    raise DataError(f"folder {folder} holds no manifest and no .tar shards")
                parts.append(Source(tars))
        elif plain and not _exists(_norm(spec)):
            raise DataError(f"no such file or directory: {_norm(spec)}")
        else:
            parts.append(Source(_expand(spec)))
    if len(parts) == 1:
        src = parts[0]
    else:
        src = Source([u for p in parts for u in p.urls])
        if all(p.counts is not None for p in parts):
            src.counts = [c for p in parts for c in p.counts]  # type: ignore[union-attr]
        shapes = {p.shape for p in parts if p.shape}
        classes = {p.num_classes for p in parts if p.num_classes is not None}
        if len(shapes) > 1 or len(classes) > 1:
            raise DataError(f"data sets in {specs} disagree on image size {shapes} or classes {classes}")
        src.shape = shapes.pop() if shapes else None
        src.num_classes = classes.pop() if classes else None
    if src.counts is None:
        _adopt_sibling_manifest(src)
    return src


def _adopt_sibling_manifest(src: Source) -> None:
    """Shards given by pattern: borrow counts/size/classes from a manifest next to them that lists them all."""
    try:
        candidates = _manifests_in(bf.dirname(src.urls[0]))
    except Exception:
        return
    for path in candidates:
        try:
            m = _from_manifest(path)
        except DataError:
            continue
        index = dict(zip(m.urls, m.counts or []))
        if all(u in index for u in src.urls):
            src.counts = [index[u] for u in src.urls]
            src.shape, src.num_classes, src.name = m.shape, m.num_classes, m.name
            return
