"""Check a data set against its manifest: every shard present, sha256 and sample count as recorded, and
(unless --quick) every sample decodable with the recorded image size and a label in range.

    python -m data.verify DIR/train-manifest.json      # or DIR (every manifest in it); --quick: no decoding

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
from .shards import MANIFEST_SUFFIX, is_url, load_manifest, read_bytes, read_shard

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


def _main(argv: Sequence[str] | None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a NAME-manifest.json, or a folder (verifies every manifest in it)")
    flag(p, "--quick", False, "check presence, sha256 and totals only; skip decoding")
    args = p.parse_args(argv)
    path = args.path if is_url(args.path) else os.path.abspath(args.path)
    if bf.isdir(path):
        manifests = sorted(bf.glob(bf.join(path, "*" + MANIFEST_SUFFIX)))
        if not manifests:
            raise UsageError(f"no *{MANIFEST_SUFFIX} in {path}")
    elif bf.exists(path):
        manifests = [path]
    else:
        raise UsageError(f"no such file or folder: {path}")
    bad = 0
    for mp in manifests:
        problems = verify(mp, args.quick)
        m = load_manifest(mp)
        if problems:
            bad += 1
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            sys.stderr.write(f"FAILED {mp}: " + "; ".join(problems[:3]) + more + "\n")
        else:
            print(f"ok {mp}: {m['total']} samples in {len(m['shards'])} shards")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 all good, 1 problems found (one line per data set), 2 bad input (one line)."""
    return run_cli(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
