"""Training-step throughput and peak memory: our UNet vs diffusers' UNet2DModel of the same shape.

    python -m benchmarks.bench_unet --preset 30M --batch 4 --threads 2            # the CPU target
    python -m benchmarks.bench_unet --device cuda --dtype bf16 --preset 270M --batch 64 --checkpoint

One step = zero_grad, forward, MSE loss against a fixed target, backward, AdamW step. Both models are built
in the same process and timed in alternation (repeats x steps each), with the same batch, threads, dtype and
optimiser; the median images/s over repeats is reported. diffusers is configured to the same widths, depth,
attention resolutions, scale-shift norm, class table and output channels (parameter count checked within 2%).
Peak memory: CUDA max_memory_allocated during the timed steps; on CPU the peak resident set size above the
level before the steps (sampled every millisecond by a thread), i.e. activations plus transient buffers.
MFU (CUDA): counted forward FLOPs x 3 (forward + backward) / step time / the card's dense peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks


def diffusers_twin(cfg) -> torch.nn.Module:
    """diffusers UNet2DModel with our preset's widths, depth, attention resolutions and conditioning."""
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers import UNet2DModel

    levels = len(cfg.channel_mult)
    res = [cfg.image_size // 2 ** i for i in range(levels)]
    attn = [r in cfg.attention_resolutions for r in res]
    head_dim = cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.model_channels * cfg.channel_mult[-1] // cfg.num_heads
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        layers_per_block=cfg.num_res_blocks, block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dim, norm_num_groups=cfg.num_groups, attn_norm_num_groups=cfg.num_groups,
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1, dropout=cfg.dropout)


class _Call(torch.nn.Module):
    """Uniform call signature model(x, t, y) -> tensor for both implementations."""

    def __init__(self, m: torch.nn.Module, is_diffusers: bool) -> None:
        super().__init__()
        self.m, self.d = m, is_diffusers

    def forward(self, x, t, y):
        return self.m(x, t, class_labels=y).sample if self.d else self.m(x, t, y)


class PeakRSS:
    """Peak resident memory (bytes) of this process while the context is open, sampled every ~1 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def make_runner(model: torch.nn.Module, args, device: torch.device):
    """A closure running `n` training steps; returns (seconds, peak memory bytes)."""
    dtype = DTYPES[args.dtype]
    fmt = torch.channels_last if model._channels_last else torch.contiguous_format
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    s, B = args.image_size, args.batch
    x = torch.randn(B, 3, s, s, generator=g).to(device).contiguous(memory_format=fmt)
    target = torch.randn(B, args.out_channels, s, s, generator=g).to(device)
    t = torch.randint(0, 4000, (B,), generator=g).to(device)
    y = torch.randint(0, args.num_classes + 1, (B,), generator=g).to(device)
    cuda = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t, y)
        F.mse_loss(out.float(), target).backward()
        opt.step()

    def run(n: int) -> tuple[float, int]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            run.cpu_s = float("nan")
            return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
        with PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                step()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        run.cpu_s = cpu  # CPU seconds of the whole process (all threads), less sensitive to other load
        return dt, mem.peak - mem.base

    return run


def counted_flops(build, args) -> int:
    """Forward FLOPs per image of the model `build()` makes, counted on the meta device (attention through
    SDPA's math path, so that its two matmuls are counted whatever kernel the real device would pick)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
    s = args.image_size
    x = torch.zeros(1, 3, s, s, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y)
    return fc.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_unet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="30M")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (weights stay fp32)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", action="store_true", help="also time our model with gradient checkpointing")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: from device name)")
    ap.add_argument("--out", default="benchmarks/results/unet.json", help="JSON results (appended as a list)")
    args = ap.parse_args(argv)

    from diffusion.presets import PRESETS, count_params, create_model, get_config

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.preset not in PRESETS:
        return fail(f"unknown preset {args.preset!r}; allowed: {', '.join(PRESETS)}")
    if args.batch < 1 or args.steps < 1 or args.repeats < 1 or args.threads < 1:
        return fail("--batch, --steps, --repeats and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda given but CUDA is not available")
    if args.device == "cpu" and args.dtype == "fp16":
        return fail("fp16 autocast is for CUDA; use --dtype fp32 or bf16 on CPU")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = get_config(args.preset)
    args.image_size, args.out_channels, args.num_classes = cfg.image_size, cfg.out_channels, cfg.num_classes or 0

    torch.manual_seed(0)
    cl = True  # channels_last: oneDNN/cuDNN convolutions prefer NHWC; both layouts are timed for diffusers
    models: dict[str, torch.nn.Module] = {}
    ours = create_model(args.preset).to(device)
    models["ours (channels_last)"] = ours
    models["ours (contiguous)"] = create_model(args.preset).to(device)
    if args.checkpoint:
        models["ours + checkpointing"] = create_model(args.preset, use_checkpoint=True).to(device)
    if not args.no_diffusers:
        d = diffusers_twin(cfg).to(device)
        pd, po = count_params(d), count_params(ours)
        if abs(pd / po - 1) > 0.02:
            return fail(f"diffusers twin has {pd} parameters vs ours {po} (more than 2% apart)")
        models["diffusers UNet2DModel"] = d
        d2 = diffusers_twin(cfg).to(device)
        models["diffusers UNet2DModel (channels_last)"] = d2
    wrapped = {}
    for name, m in models.items():
        w = _Call(m, name.startswith("diffusers")).to(device)
        w._channels_last = "contiguous" not in name and ("channels_last" in name or name.startswith("ours"))
        if w._channels_last:
            w.to(memory_format=torch.channels_last)
        wrapped[name] = w
    if args.compile:
        for name in list(wrapped):
            if "checkpoint" not in name:
                c = torch.compile(wrapped[name])
                c._channels_last = wrapped[name]._channels_last
                wrapped[name + " + torch.compile"] = c

    f_ours = counted_flops(lambda: _Call(create_model(args.preset), False), args)
    f_diff = 0 if args.no_diffusers else counted_flops(lambda: _Call(diffusers_twin(cfg), True), args)
    flops = {n: f_diff if n.startswith("diffusers") else f_ours for n in wrapped}
    runners = {n: make_runner(w, args, device) for n, w in wrapped.items()}
    for n, r in runners.items():  # warm-up (allocations, oneDNN primitive caches, compilation)
        r(args.warmup)
        print(f"warmed up: {n}", file=sys.stderr)
    ips: dict[str, list[float]] = {n: [] for n in runners}
    cpu_per_img: dict[str, list[float]] = {n: [] for n in runners}
    mem: dict[str, int] = {n: 0 for n in runners}
    load = []
    for rep in range(args.repeats):
        load.append(os.getloadavg()[0])
        for n, r in runners.items():  # alternate the models in every repeat
            dt, m = r(args.steps)
            ips[n].append(args.batch * args.steps / dt)
            cpu_per_img[n].append(r.cpu_s / (args.batch * args.steps))
            mem[n] = max(mem[n], m)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in ips.items()), file=sys.stderr)

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for n in runners:
        med = statistics.median(ips[n])
        base = n.replace(" + torch.compile", "")
        f = flops.get(base, 0)
        row = {"model": n, "images_per_s_median": med, "images_per_s_all": ips[n], "peak_mem_mib": mem[n] / 2**20,
               "cpu_s_per_image_median": statistics.median(cpu_per_img[n]), "cpu_s_per_image_all": cpu_per_img[n],
               "forward_gflops_per_image": f / 1e9, "params": count_params(models.get(base, ours))}
        if device.type == "cuda" and peak:
            row["mfu"] = 3 * f * med / (peak * 1e12)
        rows.append(row)
    ref = next((r["images_per_s_median"] for r in rows if r["model"] == "diffusers UNet2DModel"), None)
    ref_best = max((r["images_per_s_median"] for r in rows if r["model"].startswith("diffusers")), default=None)
    for r in rows:
        if ref:
            r["speedup_vs_diffusers"] = r["images_per_s_median"] / ref
            r["speedup_vs_best_diffusers"] = r["images_per_s_median"] / ref_best
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "preset": args.preset, "batch": args.batch, "dtype": args.dtype,
        "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "loadavg_1min": load,
        "peak_tflops": peak, "rows": rows,
    }
    print(f"{args.preset} batch {args.batch} {args.dtype} {result['device']} threads {args.threads} "
          f"load {min(load):.1f}-{max(load):.1f}")
    print(f"{'model':<44} {'img/s':>8} {'vs diffusers':>12} {'CPU-s/img':>9} {'peak MiB':>9} {'GFLOPs/img':>10}" + ("  MFU" if peak else ""))
    for r in rows:
        print(f"{r['model']:<44} {r['images_per_s_median']:>8.2f} {r.get('speedup_vs_diffusers', float('nan')):>11.2f}x "
              f"{r['cpu_s_per_image_median']:>9.3f} "
              f"{r['peak_mem_mib']:>9.0f} {r['forward_gflops_per_image']:>10.2f}" + (f"  {r['mfu']:.1%}" if "mfu" in r else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text()) if out.exists() else []
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(prev + [result], f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
