"""The GPU check behind benchmarks/gpu_check.sh: one results file with every figure the GPU path needs.

    python -m benchmarks.gpu_check [--dry-run] [--out benchmarks/results/gpu_check.md] [--peak-tflops X]

Sections, each timed and recorded on its own (a failure is written down and the next section runs):
  tests      pytest -m gpu (the CUDA tests; on CPU they are collected and skipped)
  mfu        270M (diffusion.presets), bf16 autocast, AdamW, training_losses of the hybrid objective, batch B:
             MFU = forward_flops(cfg, B) x 3 / step time / the card's dense bf16 peak, eager and --compile
  ckpt       gradient checkpointing: peak memory and step time with and without (same model and batch)
  fp16       fp16 autocast with dynamic loss scaling (torch.amp.GradScaler): the scale over the steps, the loss
  sync       the real trainer (python -m trainer.main) on every GPU of the machine, one rank each, loss-aware
             timestep sampler synced by all-gather over NCCL (gloo on CPU), --precision fp16 on CUDA (bf16 on CPU)
  sampling   benchmarks.bench_sampling (evaluations.sample eager / compiled vs diffusers), one round
--dry-run runs the same code on CPU at tiny sizes (tiny16, batch 2, 2-3 steps) in a few minutes; its figures say
that the code path works, not how fast a GPU is.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the cards the project may be lent; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0}


SECTIONS = ("tests", "mfu", "ckpt", "fp16", "sync", "sampling")


def build_parser():
    from data.cli import ArgumentParser
    p = ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the code path end to end")
    p.add_argument("--out", default=None, help="results markdown (+ .json); default benchmarks/results/"
                   "gpu_check.md (gpu_check-dryrun.md with --dry-run)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: table)")
    p.add_argument("--batch", type=int, default=None, help="MFU batch (default 64 on GPU, 2 in a dry run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections (default: all)")
    return p


def device_info() -> dict[str, Any]:
    d: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "host": socket.gethostname(),
                         "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        d.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                 gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return d


def peak_tflops(given: float | None) -> float | None:
    """The card's dense bf16 peak: `given`, else the first PEAK_BF16_TFLOPS key in the device name."""
    if given or not torch.cuda.is_available():
        return given
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sizes(dry: bool, batch: int | None) -> dict[str, Any]:
    return {"preset": "tiny16" if dry else "270M", "batch": batch or (2 if dry else 64), "steps": 3 if dry else 12,
            "warmup": 1 if dry else 3, "device": "cpu" if dry else "cuda"}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_steps(s: dict[str, Any], *, dtype: torch.dtype, checkpoint: bool = False, compile: bool = False,
                scaler: bool = False) -> dict[str, Any]:
    """`steps` training steps of the preset under autocast(dtype): seconds per step after `warmup`, peak memory
    (CUDA), losses, and (scaler) the dynamic loss scale after each step."""
    from diffusion import create_diffusion
    from diffusion.presets import get_config
    dev = torch.device(s["device"])
    cfg = get_config(s["preset"], use_checkpoint=checkpoint)
    torch.manual_seed(0)
    model = cfg.build().to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    from trainer.compile import backend, compile_options
    net = torch.compile(model, backend=backend(), **compile_options()) if compile else model
    diffusion = create_diffusion(steps=1000, noise_schedule="cosine", learn_sigma=True, loss="hybrid")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    gs = torch.amp.GradScaler(dev.type) if scaler else None
    B, size = s["batch"], cfg.image_size
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(B, 3, size, size, generator=g) * 2 - 1).to(dev)
    y = torch.randint(cfg.num_classes, (B,), generator=g).to(dev) if cfg.num_classes else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, scales = [], [], []
    for i in range(s["steps"]):
        _sync(dev)
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (B,), generator=g).to(dev)
        with torch.autocast(dev.type, dtype=dtype):
            loss = diffusion.training_losses(net, x0, t, model_kwargs={"y": y} if y is not None else None)["loss"]
            loss = loss.float().mean()
        opt.zero_grad(set_to_none=True)
        if gs is not None:
            gs.scale(loss).backward()
            gs.step(opt)
            gs.update()
            scales.append(float(gs.get_scale()))
        else:
            loss.backward()
            opt.step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    steady = times[s["warmup"]:] or times
    out = {"seconds_per_step": sum(steady) / len(steady), "first_step_seconds": times[0], "losses": losses,
           "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    if scales:
        out["loss_scales"] = scales
    return out


def section_tests(s: dict[str, Any], work: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    if r.returncode not in (0, 5):  # 5: no test selected (no gpu test collected)
        raise RuntimeError(f"pytest -m gpu exit {r.returncode}: {tail[0]}")
    return {"returncode": r.returncode, "summary": tail[0]}


def section_mfu(s: dict[str, Any], work: Path, peak: float | None) -> dict[str, Any]:
    from diffusion.presets import forward_flops, get_config
    flops = forward_flops(get_config(s["preset"]), s["batch"])
    out: dict[str, Any] = {"preset": s["preset"], "batch": s["batch"], "forward_gflops": flops / 1e9,
                           "peak_tflops": peak}
    for name, compile in (("eager", False), ("compiled", True)):
        r = train_steps(s, dtype=torch.bfloat16, compile=compile)
        tflops = 3 * flops / r["seconds_per_step"] / 1e12
        out[name] = {**r, "achieved_tflops": tflops, "mfu": tflops / peak if peak else None,
                     "images_per_s": s["batch"] / r["seconds_per_step"]}
    return out


def section_ckpt(s: dict[str, Any], work: Path) -> dict[str, Any]:
    dtype = torch.bfloat16
    off, on = train_steps(s, dtype=dtype), train_steps(s, dtype=dtype, checkpoint=True)
    out = {"off": off, "on": on, "time_cost": on["seconds_per_step"] / off["seconds_per_step"] - 1}
    if off["peak_memory_gib"]:
        out["memory_saving"] = 1 - on["peak_memory_gib"] / off["peak_memory_gib"]
    return out


def section_fp16(s: dict[str, Any], work: Path) -> dict[str, Any]:
    r = train_steps({**s, "steps": max(s["steps"], 6)}, dtype=torch.float16, scaler=True)
    r["finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), r["losses"]))
    return r


def section_sync(s: dict[str, Any], work: Path) -> dict[str, Any]:
    """The real trainer on every GPU (torchrun-style env per rank), loss-aware sampler synced every step."""
    data = work / "digits"
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(data), "--size", "16",
                    "--no-progress"], cwd=REPO, check=True, capture_output=True, timeout=300)
    world = torch.cuda.device_count() if torch.cuda.is_available() else 2
    precision = "fp16" if torch.cuda.is_available() else "bf16"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    args = [sys.executable, "-m", "trainer.main", "--recipe", "digits-demo", "--data", str(data / "train-manifest.json"),
            "--run-dir", str(work / "run"), "--total-steps", "6", "--log-every", "1", "--save-every", "100",
            "--global-batch", str(8 * world), "--precision", precision, "--zero-stage", "1"]
    procs, t0 = [], time.perf_counter()
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    return {"ranks": world, "precision": precision, "backend": "nccl" if torch.cuda.is_available() else "gloo",
            "returncodes": codes, "seconds": time.perf_counter() - t0,
            "rank0_tail": outs[0].strip().splitlines()[-3:]}


def section_sampling(s: dict[str, Any], work: Path) -> dict[str, Any]:
    out = work / "sampling.md"
    args = (["--preset", "tiny16", "--batch", "2", "--steps-scale", "0.02", "--variants", "eager,diffusers"]
            if s["device"] == "cpu" else ["--preset", "30M", "--batch", "64", "--steps-scale", "0.2"])
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_sampling", "--rounds", "1", "--out", str(out), *args],
                       cwd=REPO, capture_output=True, text=True, timeout=420)
    if r.returncode:
        raise RuntimeError((r.stdout + r.stderr)[-1500:])
    return {"args": args, "summary": json.loads(out.with_suffix(".json").read_text())["summary"]}


def run_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = {"ok": True, **fn()}
    except Exception as e:  # recorded, and the next section runs
        r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    r["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name}: {'ok' if r['ok'] else 'FAILED ' + r['error']} ({r['wall_seconds']} s)", flush=True)
    return r


def markdown(res: dict[str, Any]) -> str:
    d, sec = res["device"], res["sections"]
    head = "DRY RUN on CPU (code path only; no GPU figure is measured here)" if res["dry_run"] else \
        f"{d.get('gpu')} x {d.get('gpus')}"
    lines = [f"# GPU check: {head}", "", f"{res['date']}; host {d['host']}, torch {d['torch']}, "
             f"{res['total_seconds']:.0f} s in all. Command: `{res['command']}`", ""]
    m = sec.get("mfu", {})
    if m.get("ok"):
        for k in ("eager", "compiled"):
            v = m[k]
            mfu = "n/a (no peak for this device)" if v["mfu"] is None else f"{100 * v['mfu']:.1f}%"
            lines.append(f"- MFU {m['preset']} bf16 batch {m['batch']} {k}: {v['achieved_tflops']:.2f} TFLOP/s, "
                         f"MFU {mfu}, {v['images_per_s']:.1f} images/s, first step {v['first_step_seconds']:.1f} s")
    c = sec.get("ckpt", {})
    if c.get("ok"):
        mem = f"{100 * c['memory_saving']:.1f}% less peak memory" if "memory_saving" in c else "memory n/a on CPU"
        lines.append(f"- gradient checkpointing: {mem}, {100 * c['time_cost']:+.1f}% step time")
    f = sec.get("fp16", {})
    if f.get("ok"):
        lines.append(f"- fp16 + dynamic loss scaling: finite {f['finite']}, scales {f['loss_scales']}, "
                     f"losses {[round(x, 4) for x in f['losses']]}")
    sy = sec.get("sync", {})
    if sy.get("ok"):
        lines.append(f"- trainer on {sy['ranks']} rank(s), {sy['precision']}, sampler sync over {sy['backend']}: "
                     f"exit codes {sy['returncodes']} in {sy['seconds']:.0f} s")
    sa = sec.get("sampling", {})
    if sa.get("ok"):
        for case, v in sa["summary"].items():
            lines.append(f"- sampling {case}: " + ", ".join(f"{k} {v[k]['median']:.2f}" for k in v if "/" not in k)
                         + " images/s")
    t = sec.get("tests", {})
    if t.get("ok"):
        lines.append(f"- gpu tests: {t['summary']} (exit {t['returncode']})")
    lines += ["", "| section | ok | seconds | error |", "|---|---|---:|---|"]
    lines += [f"| {k} | {v['ok']} | {v['wall_seconds']} | {v.get('error', '')[:150]} |" for k, v in sec.items()]
    return "\n".join(lines) + "\n"


def write(out: Path, res: dict[str, Any]) -> None:
    from data.fsio import atomic_write_json, atomic_write_text
    atomic_write_text(str(out), markdown(res))
    atomic_write_json(str(out.with_suffix(".json")), res)


def main(argv: list[str] | None = None) -> int:
    from data.cli import die
    a = build_parser().parse_args(argv)
    names = [x for x in a.sections.split(",") if x]
    if not names or set(names) - set(SECTIONS):
        die(f"--sections {a.sections!r}: choose from {','.join(SECTIONS)}", "gpu_check")
    if not a.dry_run and not torch.cuda.is_available():
        die("no CUDA device: run on a GPU machine, or pass --dry-run to check the code path on CPU", "gpu_check")
    s, peak, t0 = sizes(a.dry_run, a.batch), peak_tflops(a.peak_tflops), time.perf_counter()
    res: dict[str, Any] = {"dry_run": a.dry_run, "device": device_info(), "sizes": s, "sections": {},
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv)}
    out = Path(a.out or f"benchmarks/results/gpu_check{'-dryrun' if a.dry_run else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    fns = {"tests": section_tests, "mfu": lambda s, w: section_mfu(s, w, peak), "ckpt": section_ckpt,
           "fp16": section_fp16, "sync": section_sync, "sampling": section_sampling}
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            (Path(work) / name).mkdir()
            res["sections"][name] = run_section(name, lambda n=name: fns[n](s, Path(work) / n))
            res["total_seconds"] = time.perf_counter() - t0
            write(out, res)  # after every section: a run cut off by the time limit keeps what it measured
    print(out.read_text())
    return 0 if all(v["ok"] for v in res["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
