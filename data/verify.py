"""Check a data set against its manifest: every shard present, sha256 and sample count as recorded, and
(unless --quick) every sample decodable with the recorded image size and a label in range. Shards without a
manifest (any webdataset: a pattern, glob, list or folder of tars) are inspected instead: every sample decoded,
image sizes and labels summarised, with what it takes to train on them.

    python -m data.verify DIR/train-manifest.json      # or DIR (every manifest in it); --quick: no decoding
    python -m data.verify 'wds/train-{000000..000099}.tar'

Exit 0 and one summary line per data set when all is well; otherwise one line naming the first problems
and exit 1 (bad command-line input: exit 2).
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Sequence

import blobfile as bf

from .cli import ArgumentParser, UsageError, flag, run_cli
from .errors import DataError
from .shards import MANIFEST_SUFFIX, is_url, iter_samples, load_manifest, read_bytes, read_shard

PROG = "python -m data.verify"


def verify(manifest_path: str, quick: bool = False) -> list[str]:
    """Problems found in the data set described by ``manifest_path`` (empty list: all good)."""
    m = load_manifest(manifest_path)
    problems: list[str] = []
    shape = tuple(m["image_size"])
    total = 0
    for s in m["shards"]:
        url, want = s["url"], int(s["samples"])
        total += want
        try:
            data = read_bytes(url)
        except FileNotFoundError:
            problems.append(f"{s['path']}: missing")
            continue
        except Exception as e:
            problems.append(f"{s['path']}: unreadable ({type(e).__name__})")
            continue
        if "sha256" in s and hashlib.sha256(data).hexdigest() != s["sha256"]:
            problems.append(f"{s['path']}: sha256 mismatch")
        if not quick:
            sd = read_shard(url, shape, labelled=m["num_classes"] > 0, num_classes=m["num_classes"] or None,
                            expected=want)
            if sd.bad or len(sd) != want:
                first = sd.problems[0] if sd.problems else ""
                problems.append(f"{s['path']}: {sd.bad} bad of {want} samples ({first})")
    if total != int(m["total"]):
        problems.append(f"manifest total {m['total']} != sum of shard counts {total}")
    return problems


def inspect(source: str) -> tuple[str, list[str]]:
    """(summary, problems) of shards without a manifest: samples, image sizes, labels; problems: samples without
    a decodable image, labels missing from some samples only, unreadable shards or tar damage."""
    from collections import Counter

    from .sources import resolve

    urls = resolve(source).urls
    sizes: Counter = Counter()
    labels: list[int] = []
    problems: list[str] = []
    n = 0
    for url in urls:
        for pos, img, label, why in iter_samples(url):
            n += pos is not None
            if img is not None:
                sizes[img.shape[:2]] += 1
                if label is not None:
                    labels.append(label)
            if why is not None:
                problems.append(f"{url}: sample {pos}: {why}" if pos is not None else why)
    good = sum(sizes.values())
    if labels and len(labels) != good:
        problems.append(f"labels in only {len(labels)} of {good} decodable samples")
    area = lambda hw: (hw[0] * hw[1], hw)  # noqa: E731
    (h0, w0), (h1, w1) = min(sizes, key=area, default=(0, 0)), max(sizes, key=area, default=(0, 0))
    size_text = (f"all {h0}x{w0}" if len(sizes) == 1 else
                 f"{len(sizes)} sizes ({h0}x{w0} to {h1}x{w1}): stream them with image_size=S (trainer "
                 f"--data-image-size S) or convert once with python -m data.prepare webdataset --size S")
    label_text = f"labels {min(labels)}..{max(labels)}" if labels else "no labels"
    return (f"{good} decodable of {n} samples in {len(urls)} shards; images {size_text}; {label_text}"), problems


def _verify_manifests(manifests: list[str], quick: bool) -> int:
    bad = 0
    for mp in manifests:
        problems = verify(mp, quick)
        m = load_manifest(mp)
        if problems:
            bad += 1
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            sys.stderr.write(f"FAILED {mp}: " + "; ".join(problems[:3]) + more + "\n")
        else:
            print(f"ok {mp}: {m['total']} samples in {len(m['shards'])} shards")
    return 1 if bad else 0


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a NAME-manifest.json, a folder (verifies every manifest in it), or shards without "
                                "a manifest: a brace pattern, glob, comma list or folder of tars (inspected)")
    flag(p, "--quick", False, "check presence, sha256 and totals only; skip decoding")
    args = p.parse_args(argv)
    path = args.path if is_url(args.path) else os.path.abspath(args.path)
    if bf.isdir(path):
        manifests = sorted(bf.glob(bf.join(path, "*" + MANIFEST_SUFFIX)))
    elif path.endswith(".json"):
        if not bf.exists(path):
            raise UsageError(f"no such file or folder: {path}")
        manifests = [path]
    else:
        manifests = []
    if manifests:
        return _verify_manifests(manifests, args.quick)
    try:  # shards without a manifest
        summary, problems = inspect(args.path)
    except DataError as e:
        raise UsageError(f"{args.path}: {e}") from None
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        sys.stderr.write(f"FAILED {args.path}: {summary}; " + "; ".join(problems[:3]) + more + "\n")
        return 1
    print(f"ok {args.path}: {summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 all good, 1 problems found (one line per data set), 2 bad input (one line)."""
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
