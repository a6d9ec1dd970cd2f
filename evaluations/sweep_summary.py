"""Summary of a model-size sweep: FID and NLL against parameters and training compute (the paper's scaling figure).

    python -m evaluations.sweep_summary SWEEP_DIR [RUN_DIR ...] --out-dir DIR

Each argument is a run directory (it has `checkpoints/`) or a folder of run directories (as written by
cluster/sweep_model_size.sbatch: SWEEP_DIR/<preset>/). Per run it reads the newest checkpoint's config.json and
meta.json (model preset, image size, classes, global batch, step), `eval/metrics.json` (FID of the first batch)
and `nll/nll.json` (bits/dim). Parameters are counted and forward FLOPs per image measured on the meta device
(diffusion.presets); training compute = 3 x forward FLOPs x global batch x steps (the backward pass taken as two
forwards). Writes DIR/scaling.md (table), DIR/scaling.json, DIR/scaling.csv and DIR/scaling.png (four panels,
log axes). Runs without FID or NLL appear in the table as n/a and are left out of that panel.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

from data.cli import ArgumentParser, UsageError, die
from data.fsio import atomic_write, atomic_write_json, atomic_write_text

PROG = "evaluations.sweep_summary"
TRAIN_FLOPS_PER_FORWARD = 3


def find_runs(paths: list[str]) -> list[str]:
    """Run directories among `paths` and their direct children (sorted, unique)."""
    runs: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            raise UsageError(f"{p} is not a directory; give a run directory or a sweep directory")
        if os.path.isdir(os.path.join(p, "checkpoints")):
            runs.append(os.path.abspath(p))
            continue
        for name in sorted(os.listdir(p)):
            child = os.path.join(p, name)
            if os.path.isdir(os.path.join(child, "checkpoints")):
                runs.append(os.path.abspath(child))
    runs = sorted(set(runs))
    if not runs:
        raise UsageError(f"no run directories (with checkpoints/) in {', '.join(paths)}")
    return runs


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not readable JSON ({e})") from None
    return d if isinstance(d, dict) else None


def _model_section(cfg: dict[str, Any]) -> dict[str, Any]:
    """The UNet settings of a nested config.json: objective.NAME.model (before 2026-12-08: the top-level model)."""
    if isinstance(cfg.get("model"), dict):
        return cfg["model"]
    obj = cfg.get("objective") or {}
    return ((obj.get(obj.get("name", "iddpm")) or {}).get("model")) or {}


def _model_config(cfg: dict[str, Any], meta: dict[str, Any]):
    """The ModelConfig the run trained (meta.json's model config, else rebuilt from the nested config.json)."""
    from diffusion.presets import ModelConfig, get_config

    model = meta.get("model")
    if isinstance(model, dict):
        return ModelConfig.from_dict(model)
    section = _model_section(cfg)
    overrides: dict[str, Any] = {}
    if section.get("image_size"):
        overrides["image_size"] = int(section["image_size"])
    if section.get("num_classes") is not None:
        overrides["num_classes"] = int(section["num_classes"]) or None
    return get_config(section["size"], **overrides)


def read_run(run_dir: str) -> dict[str, Any]:
    """One table row: preset, params, FLOPs, step, compute, FID, NLL of a run directory."""
    import torch

    from diffusion.presets import count_params, forward_flops

    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        raise UsageError(f"{run_dir}: no checkpoints/latest (has the training run saved a checkpoint?)")
    with open(latest) as f:
        ckpt = os.path.join(run_dir, "checkpoints", f.read().strip())
    cfg = _read_json(os.path.join(ckpt, "config.json"))
    meta = _read_json(os.path.join(ckpt, "meta.json"))
    if cfg is None or meta is None:
        raise UsageError(f"{ckpt}: config.json or meta.json missing")
    mcfg = _model_config(cfg, meta)
    with torch.device("meta"):
        params = count_params(mcfg.build())
    fwd = forward_flops(mcfg)
    step = int(meta["step"])
    batch = int(cfg["optim"]["global_batch"])
    metrics = _read_json(os.path.join(run_dir, "eval", "metrics.json")) or {}
    batches = metrics.get("batches") or [{}]
    nll = _read_json(os.path.join(run_dir, "nll", "nll.json")) or {}
    return {"run": os.path.basename(run_dir), "path": run_dir, "preset": _model_section(cfg).get("size"),
            "model_channels": mcfg.model_channels, "params": params, "forward_flops_per_image": fwd,
            "lr": cfg["optim"].get("lr"), "global_batch": batch, "step": step,
            "train_flops": TRAIN_FLOPS_PER_FORWARD * fwd * batch * step,
            "fid": batches[0].get("fid"), "features": metrics.get("features"), "nll_bpd": nll.get("bpd")}


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep table, smallest model first."""
    feats = {r["features"] for r in rows if r["features"]}
    lines = ["# Model-size sweep", "",
             "Training compute = 3 x forward FLOPs per image x global batch x steps. "
             f"FID features: {', '.join(sorted(feats)) or 'n/a'}" +
             (" (stand-in network: not comparable to published FID)" if "standin" in feats else "") + ".", "",
             "| run | preset | channels | parameters | GFLOPs/image (fwd) | lr | batch | steps | "
             "training PFLOPs | FID | NLL (bits/dim) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['preset']} | {r['model_channels']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['forward_flops_per_image'] / 1e9:.3f} | {_fmt(r['lr'], '.3g')} | {r['global_batch']} | "
                     f"{r['step']} | {r['train_flops'] / 1e15:.4g} | {_fmt(r['fid'], '.2f')} | "
                     f"{_fmt(r['nll_bpd'], '.4f')} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    keys = ["run", "preset", "model_channels", "params", "forward_flops_per_image", "lr", "global_batch", "step",
            "train_flops", "fid", "nll_bpd"]
    out = [",".join(keys)]
    for r in rows:
        out.append(",".join("" if r[k] is None else str(r[k]) for k in keys))
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """2 x 2 panels: FID and NLL (rows) against parameters and training compute (columns), log axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    for i, (metric, label) in enumerate((("fid", "FID"), ("nll_bpd", "NLL (bits/dim)"))):
        for j, (xkey, xlabel) in enumerate((("params", "parameters"), ("train_flops", "training compute (FLOPs)"))):
            ax = axes[i][j]
            pts = [(r[xkey], r[metric], r["preset"]) for r in rows if r[metric] is not None and r[xkey] > 0]
            for x, y, name in pts:
                ax.scatter(x, y, s=30, color="C0")
                ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if len(pts) >= 3 and all(y > 0 for _, y, _ in pts):
                # least-squares power law y = a * x^b, drawn as a line on the log-log axes
                lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
                b, a = np.polyfit(lx, ly, 1)
                xs = np.linspace(lx.min(), lx.max(), 20)
                ax.plot(np.exp(xs), np.exp(a + b * xs), "--", color="C1", label=f"slope {b:.3f}")
                ax.legend(fontsize=8)
            if pts:
                ax.set_xscale("log")
                if all(y > 0 for _, y, _ in pts):
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel=xlabel, ylabel=label)
            ax.grid(alpha=0.3, which="both")
    fig.suptitle("Model-size sweep")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def summarize(paths: list[str], out_dir: str) -> list[dict[str, Any]]:
    """Read every run, write scaling.{md,json,csv,png} into out_dir; returns the rows (sorted by parameters)."""
    rows = sorted((read_run(r) for r in find_runs(paths)), key=lambda r: (r["params"], r["run"]))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "scaling.json"), {"rows": rows})
    atomic_write_text(os.path.join(out_dir, "scaling.csv"), csv_text(rows))
    atomic_write_text(os.path.join(out_dir, "scaling.md"), markdown(rows))
    plot(rows, os.path.join(out_dir, "scaling.png"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run directories and/or sweep directories holding run directories")
    p.add_argument("--out-dir", required=True, help="folder for scaling.md, scaling.json, scaling.csv, scaling.png")
    a = p.parse_args(argv)
    try:
        rows = summarize(a.paths, a.out_dir)
    except (UsageError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        die(msg if not isinstance(e, KeyError) else f"a run's config.json lacks the key {msg}", PROG)
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
