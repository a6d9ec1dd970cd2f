"""Where eager sampling time goes, ours vs diffusers, in pieces that a shared CPU can still resolve.

    python -m benchmarks.sampling_overhead --preset tiny16 --batch 16 --threads 1 --reps 40

1. The sampler's own per-step work: our DDIM / DDPM loop (diffusion.sample_loop_progressive, x_T -> uint8) and
   diffusers' scheduler loop (DDIMScheduler / DDPMScheduler.step) around a FREE model, one that returns a fixed
   output tensor [B, 2C, H, W]; milliseconds per loop of 50 / 250 steps.
2. The UNet forward at `--batch` and at twice it (the guided batch): ours as evaluations.sample runs it
   (trainer.compile.InferenceNet, Upsample kernels cached), ours without the caches, and diffusers' UNet2DModel
   on the same weights (benchmarks.bench_sampling.make_weights); milliseconds per forward.

Variants alternate in a rotated order within one process; min, 25th percentile and median over `--reps` calls are
printed (the min is the least disturbed by other jobs). Prints the load average before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each call, `reps` rounds, the order rotated every round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for f in fns.values():
        f()  # warm-up
    for i in range(reps):
        for k, f in items[i % len(items):] + items[:i % len(items)]:
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def report(title: str, res: dict[str, list[float]]) -> None:
    print(title)
    for k, v in res.items():
        v = sorted(v)
        print(f"  {k:<32} min {1e3 * v[0]:9.2f}  p25 {1e3 * v[len(v) // 4]:9.2f}  "
              f"median {1e3 * statistics.median(v):9.2f} ms", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampling_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=40, help="calls per variant (the DDPM loop gets a quarter)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from benchmarks.bench_sampling import DiffusersLoop, make_weights
    from diffusion.unet import set_inference_caches
    from evaluations.io import load_model
    from evaluations.sample import to_uint8
    from trainer.compile import InferenceNet
    cpu = torch.device("cpu")
    print("load average before", [round(x, 2) for x in os.getloadavg()])
    with tempfile.TemporaryDirectory() as tmp:
        path, folder, mcfg = make_weights(a.preset, Path(tmp))
        theirs = DiffusersLoop(folder, cpu)
        B, S, C = a.batch, mcfg["image_size"], mcfg.get("in_channels", 3)
        y = torch.randint(mcfg["num_classes"], (B,))
        fixed = torch.randn(B, 2 * C, S, S) * 0.5

        def ours_loop(method: str, steps: int) -> Callable[[], object]:
            _, diffusion, _ = load_model(path, cpu, f"ddim{steps}" if method == "ddim" else str(steps))
            loop = diffusion.ddim_sample_loop if method == "ddim" else diffusion.p_sample_loop

            def run() -> object:
                g = torch.Generator().manual_seed(0)
                kw = dict(noise=torch.randn(B, C, S, S, generator=g), model_kwargs={"y": y}, device=cpu, generator=g)
                with torch.no_grad():
                    return to_uint8(loop(lambda x, t, **_: fixed, (B, C, S, S), **kw))
            return run

        def their_loop(method: str, steps: int) -> Callable[[], object]:
            sched = theirs.ddim if method == "ddim" else theirs.ddpm

            def run() -> object:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(B, C, S, S, generator=g)
                sched.set_timesteps(steps)
                with torch.no_grad():
                    for t in sched.timesteps:
                        out = fixed[:, :C] if method == "ddim" else fixed
                        x = sched.step(out, t, x, **({"generator": g} if method == "ddpm" else {})).prev_sample
                    return to_uint8(x)
            return run

        for method, steps, reps in (("ddim", 50, a.reps), ("ddpm", 250, max(4, a.reps // 4))):
            report(f"{method.upper()} {steps}, free model, ms per loop (x_T -> uint8)",
                   timed({"ours": ours_loop(method, steps), "diffusers": their_loop(method, steps)}, reps))

        net, _, _ = load_model(path, cpu, "")
        cached = InferenceNet(net, cpu)
        plain, _, _ = load_model(path, cpu, "")
        set_inference_caches(plain, False)
        for b in (B, 2 * B):
            x, t, yy = torch.randn(b, C, S, S), torch.full((b,), 500), torch.randint(mcfg["num_classes"], (b,))
            with torch.no_grad():
                report(f"UNet forward, batch {b}, ms", timed({
                    "ours (InferenceNet, cached)": lambda: cached(x, t, y=yy),
                    "ours (no inference caches)": lambda: plain(x, t, y=yy),
                    "diffusers UNet2DModel": lambda: theirs.unet(x, t, class_labels=yy).sample}, a.reps))
    print("load average after", [round(x, 2) for x in os.getloadavg()])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
