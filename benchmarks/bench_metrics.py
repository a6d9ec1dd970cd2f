"""Benchmark: precision/recall (k=3) over 50,000 reference x 10,000 sample features of 2,048 dims, plus FID.

    python -m benchmarks.bench_metrics [--refs 50000] [--samples 10000] [--dim 2048] [--block 1024] [--out PATH]

Measures wall time and the process's peak resident memory (ru_maxrss) before and after the metric, on random
Gaussian features (timing does not depend on the values). Appends a dated section to
benchmarks/results/metrics.md (and writes a JSON next to it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time

import numpy as np
import torch

from data.fsio import atomic_write_json, atomic_write_text
from evaluations.metrics import feature_statistics, frechet_distance, precision_recall


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # ru_maxrss is KiB on Linux


def render(runs: list[dict]) -> str:
    """The results table (markdown) from all recorded runs."""
    lines = ["# Metrics benchmark (`python -m benchmarks.bench_metrics`)", "",
             "Precision/recall (Kynkaanniemi et al., k = 3) in row blocks, plus FID on the same features. Random",
             "Gaussian features. Peak memory is the process's peak RSS (ru_maxrss), which includes the Python/torch",
             "runtime and the features themselves. 'Effective GFLOP/s' = the FLOPs of all three distance passes",
             "(2 * dim * (refs^2 + samples^2 + 2 * refs * samples)) / time; with the block early exit (a query block",
             "stops once all its rows are covered) less work is done, so it overstates the real rate. The",
             "development machine is shared with other engineers' jobs (load average noted where known), so",
             "times are upper bounds.", "",
             "| date (UTC) | machine | device | refs x samples x dim | block | P/R time (s) | effective GFLOP/s | "
             "peak RSS after features / after P/R (GiB) | FID time (s) | note |",
             "|---|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in runs:
        lines.append(f"| {r['date']} | {r['machine']} | {r['device']} | {r['refs']} x {r['samples']} x {r['dim']} | "
                     f"{r['block']} | {r['pr_seconds']} | {r['pr_gflops_per_s']} | "
                     f"{r['peak_rss_gib_after_features']} / {r['peak_rss_gib_after_pr']} | {r['fid_seconds']} | "
                     f"{r.get('note') or ''} |")
    lines += ["", "Features alone: {:.3f} GiB; a full reference x reference distance matrix would need {} GiB "
              "(arithmetic, not run).".format(runs[-1]["features_gib"], runs[-1]["full_distance_matrix_gib_avoided"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_metrics", description=__doc__.split("\n")[0])
    p.add_argument("--refs", type=int, default=50_000)
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--block", type=int, default=1024, help="rows per distance block")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    p.add_argument("--note", default="", help="free text recorded with this run (machine load, code state)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "metrics.md"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((a.refs, a.dim), dtype=np.float32)
    smp = (rng.standard_normal((a.samples, a.dim), dtype=np.float32) * 1.1 + 0.05).astype(np.float32)
    rss_features = peak_rss_gib()

    t0 = time.perf_counter()
    precision, recall = precision_recall(ref, smp, k=3, block=a.block, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_pr = time.perf_counter() - t0
    rss_pr = peak_rss_gib()

    t0 = time.perf_counter()
    fid = frechet_distance(*feature_statistics(smp), *feature_statistics(ref))
    t_fid = time.perf_counter() - t0
    rss_end = peak_rss_gib()

    flops = 2 * a.dim * (a.refs * a.refs + a.samples * a.samples + 2 * a.refs * a.samples)
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs visible, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "device": device, "refs": a.refs, "samples": a.samples, "dim": a.dim, "block": a.block, "k": 3,
        "precision": precision, "recall": recall, "pr_seconds": round(t_pr, 2),
        "pr_gflops_per_s": round(flops / t_pr / 1e9, 1), "fid": fid, "fid_seconds": round(t_fid, 2),
        "peak_rss_gib_after_features": round(rss_features, 3), "peak_rss_gib_after_pr": round(rss_pr, 3),
        "peak_rss_gib_after_fid": round(rss_end, 3),
        "features_gib": round((a.refs + a.samples) * a.dim * 4 / 2 ** 30, 3),
        "full_distance_matrix_gib_avoided": round(a.refs * a.refs * 4 / 2 ** 30, 2),
    }
    res["note"] = a.note
    print(json.dumps(res, indent=2))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    jpath = os.path.splitext(a.out)[0] + ".json"
    runs = []
    if os.path.isfile(jpath):
        with open(jpath) as f:
            runs = json.load(f)
    runs.append(res)
    atomic_write_json(jpath, runs)
    atomic_write_text(a.out, render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
