"""Compiled vs eager training steps in ONE process, alternating, on the same model preset (issue 19).

    python -m benchmarks.bench_compile --preset 30M --batch 2 --rounds 3 --steps 2 --threads 1 \
        --out benchmarks/results/compile-steps.md

Two copies of the preset with the same initial weights: one eager, one torch.compile'd (inductor, static shapes,
trainer.compile.compile_options). Each step is the hybrid loss of diffusion.training_losses on a fixed batch,
backward and torch's fused AdamW (the trainer's CPU optimizer). After one untimed warm-up step each (the compile),
every round times --steps steps of each variant, the order alternating from round to round, so machine load hits
both alike; images/s per round and the per-round ratio compiled / eager (median and range) are reported. The same
step without DeepSpeed or the trainer: the trainer with --compile is measured by bench_trainer --compile.
--channels-last and --bf16 (CPU autocast) apply to both variants alike: they ask whether compile gains more in
another memory order or precision, not what the layout or precision itself gains.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def step_fn(model, diffusion, x0, y, g, bf16: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(model, x0, t, model_kwargs={"y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_compile", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="30M")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels-last", action="store_true",
                   help="both variants: model and batch in channels_last memory order")
    p.add_argument("--bf16", action="store_true", help="both variants: the step under CPU bf16 autocast")
    p.add_argument("--out", default="benchmarks/results/compile-steps.md")
    a = p.parse_args(argv)
    from diffusion import create_diffusion
    from diffusion.presets import get_config
    from trainer.compile import backend, compile_options
    torch.set_num_threads(a.threads)
    cfg = get_config(a.preset)
    diffusion = create_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=True, loss="hybrid")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(a.batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    x0 = x0.contiguous(memory_format=fmt)
    y = torch.randint(cfg.num_classes or 1, (a.batch,), generator=g)
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = cfg.build().to(memory_format=fmt)
    steps = {"eager": step_fn(models["eager"], diffusion, x0, y, torch.Generator().manual_seed(1), a.bf16),
             "compiled": step_fn(torch.compile(models["compiled"], backend=backend(), **compile_options()),
                                 diffusion, x0, y, torch.Generator().manual_seed(1), a.bf16)}
    warm = {}
    for name, fn in steps.items():
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
        print(f"warm-up {name}: {warm[name]:.1f} s", flush=True)
    rows = []
    for r in range(a.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                steps[name]()
            ips = a.steps * a.batch / (time.perf_counter() - t0)
            rows.append({"round": r, "variant": name, "images_per_s": ips})
            print(f"round {r} {name:<9} {ips:.3f} images/s (load {os.getloadavg()[0]:.1f})", flush=True)
    by = {v: [x["images_per_s"] for x in rows if x["variant"] == v] for v in ("eager", "compiled")}
    ratio = [c / e for c, e in zip(by["compiled"], by["eager"])]
    res = {"args": vars(a), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "nproc": os.cpu_count(), "load_end": os.getloadavg(), "warmup_s": warm,
           "rows": rows, "ratio_median": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio)}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    layout = ", channels_last" if a.channels_last else ""
    prec = ", bf16 autocast" if a.bf16 else ", fp32"
    md = [f"# Compiled vs eager training step, {a.preset}, batch {a.batch}{prec}{layout}, {a.threads} thread(s), "
          f"one process", "",
          f"{res['date']}, torch {res['torch']}, {res['nproc']} CPUs, load average at the end {res['load_end']}. "
          f"Command: `python -m benchmarks.bench_compile {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          f"Warm-up step (compile included): eager {warm['eager']:.1f} s, compiled {warm['compiled']:.1f} s.", "",
          "| round | eager images/s | compiled images/s | compiled / eager |", "|---:|---:|---:|---:|"]
    md += [f"| {r} | {e:.3f} | {c:.3f} | {c / e:.3f} |" for r, (e, c) in enumerate(zip(by["eager"], by["compiled"]))]
    md += ["", f"compiled / eager: median {res['ratio_median']:.3f} (range {res['ratio_min']:.3f} to "
               f"{res['ratio_max']:.3f}) over {a.rounds} rounds.", ""]
    out.write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
