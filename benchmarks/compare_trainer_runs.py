"""Compare two sets of benchmarks.bench_trainer results, e.g. the trainer before and after a change, measured in
alternating rounds on one machine (one bench_trainer call per tree and round, --repeats 1):

    python -m benchmarks.compare_trainer_runs --before old_round*.json --after new_round*.json \\
        --label-before f79712a --label-after HEAD --out benchmarks/results/trainer-before-after.md

Per case (ranks, ZeRO, precision): the median over rounds of the trainer's own overhead (1 - trainer img/s /
DeepSpeed-only img/s, both from the same bench_trainer call) before and after, and the median over rounds of
after/before trainer img/s (round r's after against round r's before). Writes markdown and the same name .json
(every round's figures).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load(paths: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """{(ranks, zero, precision): [case of each file, in file order]} of the cases that ran."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        for c in res["cases"]:
            if "overhead_own" in c:
                out.setdefault((c["ranks"], c["zero"], c["precision"]), []).append({**c, "machine": res["machine"],
                                                                                 "started": res["started_utc"]})
    return out


def compare(before: dict, after: dict) -> list[dict[str, Any]]:
    rows = []
    for k in sorted(set(before) & set(after)):
        b, a = before[k], after[k]
        n = min(len(a), len(b))
        rows.append({"case": k, "rounds": n,
                     "own_before": [c["overhead_own"] for c in b], "own_after": [c["overhead_own"] for c in a],
                     "img_s_before": [c["trainer"]["img_s"] for c in b], "img_s_after": [c["trainer"]["img_s"] for c in a],
                     "ratio": [a[i]["trainer"]["img_s"] / b[i]["trainer"]["img_s"] for i in range(n)],
                     "ratio_bare": [a[i]["bare"]["img_s"] / b[i]["bare"]["img_s"] for i in range(n)],
                     "ratio_dsonly": [a[i]["deepspeed_only"]["img_s"] / b[i]["deepspeed_only"]["img_s"]
                                      for i in range(n)],
                     "load1": [c["load1"] for c in b + a]})
    return rows


def pct(xs: list[float]) -> str:
    return f"{100 * statistics.median(xs):.1f}% ({100 * min(xs):.1f} to {100 * max(xs):.1f})"


def ratio(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f} to {max(xs):.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_trainer_runs", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", nargs="+", required=True, help="bench_trainer JSON files of the first tree")
    p.add_argument("--after", nargs="+", required=True, help="bench_trainer JSON files of the second tree")
    p.add_argument("--label-before", default="before")
    p.add_argument("--label-after", default="after")
    p.add_argument("--command", default="", help="how the rounds were run (recorded)")
    p.add_argument("--out", required=True, help="markdown result (+ same name .json)")
    a = p.parse_args(argv)
    rows = compare(load(a.before), load(a.after))
    if not rows:
        print("compare_trainer_runs: no case measured in both sets", file=sys.stderr)
        return 2
    first = load(a.before)[rows[0]["case"]][0]
    m = first["machine"]
    L = [f"# The trainer before ({a.label_before}) and after ({a.label_after}), alternating rounds", "",
         f"- Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('logical_cpus'))} logical CPUs, "
         f"{m.get('mem_total_gib', '?')} GiB, no GPU; torch {m['torch']}, deepspeed {m['deepspeed']}.",
         f"- First round started {first['started']} UTC; 1-min load before each case: "
         f"{sorted(x for r in rows for x in r['load1'] if x is not None)}.",
         f"- Rounds: {a.command or 'one bench_trainer call per tree and round, alternating'}.", "",
         f"| ranks | ZeRO | precision | rounds | trainer's own overhead, {a.label_before} | trainer's own overhead, "
         f"{a.label_after} | img/s {a.label_after} / {a.label_before}: trainer | the same for the bare loop | the "
         f"same for the DeepSpeed-only loop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (ranks, zero, prec) = r["case"]
        L.append(f"| {ranks} | {zero} | {prec} | {r['rounds']} | {pct(r['own_before'])} | {pct(r['own_after'])} | "
                 f"{ratio(r['ratio'])} | {ratio(r['ratio_bare'])} | {ratio(r['ratio_dsonly'])} |")
    L += ["", "Medians over rounds, min to max in brackets. The trainer's own overhead = 1 - trainer img/s / "
          "DeepSpeed-only img/s (the same loop through the trainer's DeepSpeed engine, nothing else), from the same "
          "bench_trainer call; see benchmarks/bench_trainer.py for the method. The bare and DeepSpeed-only loops "
          "are the same code in both trees: their after/before ratios show how much the machine's speed moved between "
          "calls, the scale against which the trainer's ratio is to be read.", ""]
    out = Path(a.out)
    out.write_text("\n".join(L))
    out.with_suffix(".json").write_text(json.dumps({"before": a.label_before, "after": a.label_after,
                                                    "rows": [{**r, "case": list(r["case"])} for r in rows]}, indent=1))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
