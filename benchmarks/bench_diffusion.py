"""Benchmark: the diffusion mathematics beside the network, and the loss-aware sampler's update.

Run `python -m benchmarks.bench_diffusion [--reps N] [--threads N] [--out FILE]`; writes a markdown table
(machine, date, figures) to benchmarks/results/diffusion.md by default.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion import create_diffusion, create_timestep_sampler  # noqa: E402


def timed(fn, reps: int, warmup: int = 2) -> list[float]:
    """Wall times of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(ts: list[float], unit: float) -> dict[str, float]:
    return {"median": statistics.median(ts) / unit, "min": min(ts) / unit, "max": max(ts) / unit, "reps": len(ts)}


def bench_training_losses(reps: int) -> dict[str, dict[str, float]]:
    """training_losses (hybrid, learned sigma, T=4000) over [256, 3, 64, 64] float32, forward + backward, with a
    trivial model (one 3x3 conv, 3 -> 6 channels, v squashed by tanh); the model alone is timed as well."""
    D = create_diffusion(steps=4000)
    net = torch.nn.Conv2d(3, 6, 3, padding=1)
    model = lambda x, t, **kw: torch.cat([(o := net(x))[:, :3], torch.tanh(o[:, 3:])], 1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(256, 3, 64, 64, generator=g) * 2 - 1
    t = torch.randint(0, 4000, (256,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def full():
        net.zero_grad(set_to_none=True)
        D.training_losses(model, x0, t, noise=noise)["loss"].mean().backward()

    def model_only():
        net.zero_grad(set_to_none=True)
        x_t = D.q_sample(x0, t, noise=noise)
        model(x_t, t).square().mean().backward()

    def losses_forward():
        with torch.no_grad():
            D.training_losses(model, x0, t, noise=noise)

    return {"training_losses fwd+bwd (ms)": summary(timed(full, reps), 1e-3),
            "model fwd+bwd only (ms)": summary(timed(model_only, reps), 1e-3),
            "training_losses fwd, no grad (ms)": summary(timed(losses_forward, reps), 1e-3)}


def bench_network(name: str, batch: int, reps: int) -> dict[str, dict[str, float]]:
    """The real network for scale: training_losses fwd+bwd with preset `name` (64x64) at a small batch."""
    from diffusion.presets import create_model  # the network lives beside, not inside, the mathematics
    net = create_model(name)
    D = create_diffusion(steps=4000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    size, classes = net_config(net)
    x0 = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    t = torch.randint(0, 4000, (batch,), generator=g)
    kw = {"y": torch.randint(0, classes, (batch,), generator=g)} if classes else {}

    def step():
        net.zero_grad(set_to_none=True)
        D.training_losses(net, x0, t, model_kwargs=kw)["loss"].mean().backward()

    return {f"network {name} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params, {size}x{size}) "
            f"training_losses fwd+bwd, batch {batch} (ms)": summary(timed(step, reps, warmup=1), 1e-3)}


def net_config(net: torch.nn.Module) -> tuple[int, int | None]:
    """(image size, number of classes) of a preset network, read from its attributes when present."""
    size = int(getattr(net, "image_size", 64))
    classes = getattr(net, "num_classes", None)
    return size, classes


def bench_sampler(reps: int) -> dict[str, dict[str, float]]:
    """The loss-second-moment sampler at T=4000 (warmed up) with a global batch of 2048."""
    T, B = 4000, 2048
    s = create_timestep_sampler("loss-second-moment", T)
    g = torch.Generator().manual_seed(0)
    s.update_with_all_losses(torch.arange(T).repeat(10), torch.rand(10 * T, generator=g, dtype=torch.float64))
    ts = torch.randint(0, T, (B,), generator=g)
    losses = torch.rand(B, generator=g, dtype=torch.float64)
    gather = lambda x: x  # one rank holding the whole global batch
    return {"update_with_all_losses, 2048 at T=4000 (us)": summary(timed(lambda: s.update_with_all_losses(ts, losses), reps), 1e-6),
            "update_with_local_losses (stack + gather + update) (us)":
                summary(timed(lambda: s.update_with_local_losses(ts, losses, gather), reps), 1e-6),
            "sample(256) (us)": summary(timed(lambda: s.sample(256, generator=g), reps), 1e-6)}


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit code 2
        print(f"bench_diffusion: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions of the training_losses step")
    ap.add_argument("--sampler-reps", type=int, default=500, help="timed repetitions of the sampler update")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--network", default="30M", help="preset to time for scale ('' to skip)")
    ap.add_argument("--net-batch", type=int, default=4, help="batch for the network timing")
    ap.add_argument("--net-reps", type=int, default=2, help="timed repetitions of the network step")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "diffusion.md"))
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if min(args.reps, args.sampler_reps, args.threads, args.net_batch, args.net_reps) < 1:
        print("error: --reps, --sampler-reps, --threads, --net-batch and --net-reps must be positive integers",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = {**bench_sampler(args.sampler_reps), **bench_training_losses(args.reps)}
    math_ms = (results["training_losses fwd+bwd (ms)"]["median"] - results["model fwd+bwd only (ms)"]["median"]) / 256
    notes = [f"Diffusion mathematics per sample (training_losses fwd+bwd minus the trivial model's, medians / 256): "
             f"{math_ms:.3f} ms."]
    if args.network:
        try:
            net = bench_network(args.network, args.net_batch, args.net_reps)
        except ImportError as e:
            notes.append(f"Network timing skipped: {e}.")
        else:
            results.update(net)
            net_ms = next(iter(net.values()))["median"] / args.net_batch
            notes.append(f"Network {args.network} training step per sample (math included): {net_ms:.1f} ms, "
                         f"so the mathematics is {100 * math_ms / net_ms:.2f}% of it.")
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = ["# Diffusion mathematics benchmark", "",
             f"Measured {date} by `python -m benchmarks.bench_diffusion` (CPU, float32 tensors, float64 tables).", "",
             "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info.items()], "",
             "| what | median | min | max | reps |", "|---|---|---|---|---|",
             *[f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['reps']} |" for k, v in results.items()],
             "", *notes, "",
             "The machine was shared with other jobs while this ran (see the load averages); medians are the figures "
             "to read, maxima show scheduling stalls.", "",
             "```json", json.dumps({"date": date, "machine": info, "results": results, "notes": notes}, indent=1),
             "```", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print("\n".join(lines[: len(lines) - 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
