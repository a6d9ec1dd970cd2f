"""Trainer overhead: images/s and peak memory of the real trainer vs a bare forward/backward/AdamW loop (issue 5).

    python -m benchmarks.bench_trainer --preset 30M --batch 2 --steps 8 --cases 1:0:fp32,1:0:bf16,2:1:fp32
    python -m benchmarks.bench_trainer --preset tiny16 --steps 4 --ranks 1,2 --zero 0,3 --precision fp32,bf16

Each case (ranks R, ZeRO stage Z, precision P) runs the real trainer, `python -m trainer.main`, as R processes
started with RANK/WORLD_SIZE/MASTER_* in their environment (R = 1: a plain single process with no launcher),
each with micro batch --batch and global batch R x batch (no gradient accumulation), --threads/R OpenMP threads,
checkpoints only at the end, and a 1-image, 1-step sample grid at the end. Its images/s is read back from its
TensorBoard scalars (`perf/images_per_s`, the sum over ranks, logged every step with --log-every 1) for the
steps after --warmup: their harmonic mean, i.e. images / time. The interval behind each scalar covers the whole
step (data, forward, backward, DeepSpeed step, sampler all-gather, EMA update, flag all-reduce) but not the
logging block itself.

The bare loop, in the same run and right before each trainer case (or once per ranks/precision with
--reuse-bare), is the smallest data-parallel training loop: R concurrent processes with the same threads each,
each doing per step: random t, noise and labels, the same model (diffusion.presets preset with the trainer's
overrides) and create_diffusion(...).training_losses on a fixed in-memory batch of --batch images, mean loss,
backward, for R > 1 one gloo all-reduce of all gradients as a single flat buffer (averaged; `--bare-comm none`
leaves it out, so the ranks train separate models), grad-norm clip 1.0 and torch's fused AdamW (the trainer's
optimizer on CPU). bf16 is done as DeepSpeed does it: bf16 weights and activations, fp32 master weights in
AdamW, copied back after each step. Its images/s = steady images / steady time, summed over its processes.
All loops run with the same THP_MEM_ALLOC_ENABLE (--thp; default 1, as the trainer sets it for itself).

A third run per case (unless --no-deepspeed-only), "DeepSpeed only", is the same loop driven by the trainer's
DeepSpeed engine with the trainer's generated DeepSpeed config for that ZeRO stage and precision
(deepspeed.initialize, engine forward / backward / step, gloo, one rank per process), with nothing of the
trainer around it: no data stream, EMA, sampler sync, logging or checkpoints. It splits the overhead into
DeepSpeed's share (DeepSpeed only vs bare) and the trainer's own (trainer vs DeepSpeed only).

overhead = 1 - trainer_img_s / bare_img_s (target < 10%). With --repeats N the whole list of cases is measured N
times, round after round (each round: bare, DeepSpeed only, trainer per case), and each case is judged by the median
of its per-round overheads: on a shared or virtual machine whose speed drifts by tens of percent over minutes, one
round can put the bare loop in a slow minute and the trainer in a fast one, or the reverse.
Peak memory: each process's peak resident set size from os.wait4 (ru_maxrss: the whole life of the process,
including start-up and, for the trainer, the final checkpoint and sample grid), plus the trainer's own
`mem/peak_mb_max_rank` scalar at its last step.
Results: --out (markdown) and the same name with .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _die(msg: str) -> None:
    print(f"bench_trainer: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _int_list(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v:
        raise argparse.ArgumentTypeError("empty list")
    return v


def _str_list(s: str) -> list[str]:
    v = [x.strip() for x in s.split(",") if x.strip()]
    if not v:
        raise argparse.ArgumentTypeError("empty list")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench_trainer", description=__doc__.split("\n\n")[0] + " See the module docstring for the method.")
    p.add_argument("--preset", default="30M", help="diffusion.presets name (default 30M)")
    p.add_argument("--batch", type=int, default=2, help="micro batch per rank (default 2)")
    p.add_argument("--steps", type=int, default=8, help="trainer / bare steps per case, warm-up included (default 8)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of images/s (default 3)")
    p.add_argument("--ranks", type=_int_list, default=[1, 2], help="comma list of rank counts (default 1,2)")
    p.add_argument("--zero", type=_int_list, default=[0, 1, 2, 3], help="comma list of ZeRO stages (default 0,1,2,3)")
    p.add_argument("--precision", type=_str_list, default=["fp32", "bf16"], help="comma list: fp32,bf16 (default both)")
    p.add_argument("--cases", type=_str_list, default=None,
                   help="explicit cases R:Z:P, comma separated (e.g. 1:0:fp32,2:3:fp32); replaces the product of "
                        "--ranks x --zero x --precision")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="OpenMP threads in total, split evenly over the ranks (default: all cores)")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="OpenMP threads per rank for every case (overrides --threads; 1 degrades more gracefully "
                        "than 2 when other processes share the cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds: the whole list of cases is measured this many times, round after round, and each "
                        "case's overhead is reported per round and as the median over rounds (a machine whose speed "
                        "drifts over minutes needs 3 or more)")
    p.add_argument("--reuse-bare", action="store_true",
                   help="measure the bare loop once per (ranks, precision) instead of right before every case "
                        "(faster; worse when the machine's load changes)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per trainer or bare run (default 900)")
    p.add_argument("--work-dir", default=None, help="scratch folder for data and run dirs (default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results/trainer.md", help="markdown result (+ same name .json)")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. whether the machine was idle)")
    p.add_argument("--bare-comm", choices=["allreduce", "none"], default="allreduce",
                   help="bare loop with more than one rank: all-reduce the gradients as data-parallel training must "
                        "(default), or none (independent models, no communication)")
    p.add_argument("--thp", choices=["0", "1"], default="1",
                   help="THP_MEM_ALLOC_ENABLE for all three loops: 1 (the trainer's default) puts torch's CPU tensors "
                        "of 2 MiB and more on transparent huge pages, 0 does not")
    p.add_argument("--compile", action="store_true",
                   help="also run the trainer with --compile in every case (eager and compiled alternate in order "
                        "from round to round; compiled images/s leave out the first --warmup steps, compile included)")
    p.add_argument("--no-deepspeed-only", action="store_true",
                   help="skip the DeepSpeed-only loop (the split of the overhead into DeepSpeed's and the trainer's)")
    p.add_argument("--_bare", action="store_true", help=argparse.SUPPRESS)  # internal: one bare-loop process
    p.add_argument("--_bare-zero", type=int, default=-1, help=argparse.SUPPRESS)  # >= 0: DeepSpeed-only loop
    p.add_argument("--_bare-world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--_bare-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_bare-precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--_bare-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_cases(a: argparse.Namespace) -> list[tuple[int, int, str]]:
    if a.cases:
        out = []
        for c in a.cases:
            parts = c.split(":")
            if len(parts) != 3:
                _die(f"--cases entry {c!r} is not R:Z:P (e.g. 2:1:fp32)")
            try:
                out.append((int(parts[0]), int(parts[1]), parts[2]))
            except ValueError:
                _die(f"--cases entry {c!r}: ranks and ZeRO stage must be integers")
    else:
        out = [(r, z, p) for r in a.ranks for z in a.zero for p in a.precision]
    for r, z, p in out:
        if r < 1:
            _die(f"ranks must be >= 1, got {r}")
        if z not in (0, 1, 2, 3):
            _die(f"ZeRO stage must be 0-3, got {z}")
        if p not in ("fp32", "bf16"):
            _die(f"precision must be fp32 or bf16 on CPU, got {p!r}")
        if a.threads_per_rank is None and a.threads < r:
            _die(f"--threads {a.threads} is fewer than {r} ranks (each rank needs >= 1 thread)")
    return out


def validate(a: argparse.Namespace) -> None:
    from diffusion.presets import PRESETS
    if a.preset not in PRESETS:
        _die(f"unknown --preset {a.preset!r}; choose one of {', '.join(PRESETS)}")
    if a.batch < 1:
        _die(f"--batch must be >= 1, got {a.batch}")
    if a.warmup < 0:
        _die(f"--warmup must be >= 0, got {a.warmup}")
    if a.steps <= a.warmup:
        _die(f"--steps {a.steps} must exceed --warmup {a.warmup} (at least one steady step)")
    if a.threads < 1:
        _die(f"--threads must be >= 1, got {a.threads}")
    if a.threads_per_rank is not None and a.threads_per_rank < 1:
        _die(f"--threads-per-rank must be >= 1, got {a.threads_per_rank}")
    if a.timeout <= 0:
        _die("--timeout must be positive")
    if a.repeats < 1:
        _die(f"--repeats must be >= 1, got {a.repeats}")
    if not a.out.endswith(".md"):
        _die(f"--out must end in .md (the JSON goes next to it), got {a.out!r}")


# ------------------------------------------------------------------------------------------ bare loop


def train_config(preset: str, **optim: Any):
    """The trainer's configuration for --model-size PRESET with default flags (plus optim overrides)."""
    from trainer.config import config_from_dict
    return config_from_dict({"objective": {"iddpm": {"model": {"size": preset}}}, "data": {"source": "x"},
                             "run": {"run_dir": "x"}, "optim": optim})


def model_cfg(preset: str) -> dict[str, Any]:
    """The model exactly as the trainer builds it for --model-size PRESET with default flags."""
    from trainer.unet_settings import model_config_dict
    o = train_config(preset).objective.options
    return model_config_dict(o.model, o.diffusion.learn_sigma)


def bare_main(a: argparse.Namespace) -> None:
    """One bare-loop process: prints one JSON line {rank, step_s: [...], img_s}."""
    import torch
    from diffusion import create_diffusion
    from diffusion.presets import create_model_from_config
    from trainer.unet_settings import diffusion_kwargs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mc = model_cfg(a.preset)
    tc = train_config(a.preset)
    torch.manual_seed(0)
    model = create_model_from_config(mc)
    diffusion = create_diffusion(**diffusion_kwargs(tc.objective.options.diffusion))
    bf16 = a._bare_precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    world = a._bare_world
    if a._bare_zero >= 0:
        deepspeed_only(a, model, diffusion, dtype)
        return
    if bf16:
        model = model.to(torch.bfloat16)
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    else:
        params = masters = [p for p in model.parameters() if p.requires_grad]
    o = tc.optim
    opt = torch.optim.AdamW(masters, lr=o.lr, betas=o.adam_betas, eps=1e-8, weight_decay=o.weight_decay, fused=True)
    if world > 1:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a._bare_port}", rank=a._bare_rank,
                                world_size=world)
    model.train()

    def update(loss) -> None:
        loss.backward()
        if bf16:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
                p.grad = None
        if world > 1:
            grads = [m.grad for m in masters]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(world)
            for gr, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                gr.copy_(v)
        torch.nn.utils.clip_grad_norm_(masters, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                for m, p in zip(masters, params):
                    p.copy_(m)

    timed_steps(a, model, diffusion, dtype, update)
    if world > 1:
        dist.destroy_process_group()


def timed_steps(a: argparse.Namespace, net_module, diffusion, dtype, update) -> None:
    """The timed loop of both reference loops: per step random t, noise and labels on a fixed in-memory batch,
    the diffusion loss (mean), then update(loss) (backward and optimizer step). Prints {rank, step_s, img_s}."""
    import torch
    mc = model_cfg(a.preset)
    g = torch.Generator().manual_seed(1234 + a._bare_rank)
    size, ncls = mc["image_size"], mc.get("num_classes") or 0
    x = torch.rand(a.batch, mc["in_channels"], size, size, generator=g) * 2 - 1

    def net(xt, t, **kw):
        return net_module(xt.to(dtype), t, **kw).float()

    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        t = torch.randint(0, diffusion.num_timesteps, (a.batch,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        kw = {"y": torch.randint(0, ncls, (a.batch,), generator=g)} if ncls else {}
        update(diffusion.training_losses(net, x, t, model_kwargs=kw, noise=noise)["loss"].mean())
        times.append(time.perf_counter() - t0)
    steady = times[a.warmup:]
    print(json.dumps({"rank": a._bare_rank, "step_s": times, "img_s": a.batch * len(steady) / sum(steady)}), flush=True)


def deepspeed_only(a: argparse.Namespace, model, diffusion, dtype) -> None:
    """The bare loop through the trainer's DeepSpeed engine and config; prints the same JSON line as bare_main."""
    import deepspeed
    from trainer.config import deepspeed_config
    from trainer.dist import skip_shm_comm_op
    world, rank = a._bare_world, a._bare_rank
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(a._bare_port))
    skip_shm_comm_op()  # as the trainer does
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    tc = train_config(a.preset, global_batch=a.batch * world, micro_batch=a.batch, precision=a._bare_precision,
                      zero_stage=a._bare_zero)
    if a._bare_zero == 3:
        from deepspeed.utils import set_z3_leaf_modules
        from diffusion.unet import UNetBlock
        set_z3_leaf_modules(model, [UNetBlock], raise_if_not_found=False)  # as the trainer does
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(tc, world, on_gpu=False))
    if world == 1 and a._bare_zero == 0:
        engine.enable_backward_allreduce = False  # as the trainer does
    engine.train()

    def update(loss) -> None:
        engine.backward(loss)
        engine.step()

    timed_steps(a, engine, diffusion, dtype, update)
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------- process runs


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, float]]:
    """os.wait4 every process -> [(exit code, peak RSS MiB)]; kills all on timeout."""
    deadline = time.monotonic() + timeout
    res: dict[int, tuple[int, float]] = {}
    while len(res) < len(procs):
        for p in procs:
            if p.pid in res:
                continue
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                res[p.pid] = (p.returncode, ru.ru_maxrss / 1024.0)
        if len(res) < len(procs):
            if time.monotonic() > deadline:
                for p in procs:
                    if p.pid not in res:
                        p.kill()
                for p in procs:
                    if p.pid not in res:
                        _, status, ru = os.wait4(p.pid, 0)
                        res[p.pid] = (124, ru.ru_maxrss / 1024.0)
                break
            time.sleep(0.05)
    return [res[p.pid] for p in procs]


def _env(threads: int, rank: int | None = None, world: int = 1, port: int = 0, thp: str = "1") -> dict[str, str]:
    env = dict(os.environ)
    env["THP_MEM_ALLOC_ENABLE"] = thp  # the same for the trainer, the bare and the DeepSpeed-only loops
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(a: argparse.Namespace, ranks: int) -> int:
    return a.threads_per_rank if a.threads_per_rank is not None else a.threads // ranks


def run_bare(a: argparse.Namespace, ranks: int, precision: str, logdir: Path, tag: str = "",
             zero: int = -1) -> dict[str, Any]:
    """The bare loop (zero < 0) or the DeepSpeed-only loop at ZeRO stage `zero`, on `ranks` processes."""
    thr = threads_per_rank(a, ranks)
    procs, logs = [], []
    world = ranks if (a.bare_comm == "allreduce" or zero >= 0) else 1
    port = _free_port()
    kind = "bare" if zero < 0 else "dsonly"
    for r in range(ranks):
        log = open(logdir / f"{kind}_r{ranks}_{precision}{tag}_{r}.log", "w+")
        cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--_bare", "--_bare-precision", precision,
               "--_bare-rank", str(r), "--_bare-world", str(world), "--_bare-port", str(port),
               "--_bare-zero", str(zero), "--preset", a.preset, "--batch", str(a.batch), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--threads", str(thr)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(thr, thp=a.thp), stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    waited = _wait_all(procs, a.timeout)
    outs = []
    for (code, rss), log in zip(waited, logs):
        log.seek(0)
        text = log.read()
        log.close()
        line = [ln for ln in text.splitlines() if ln.startswith("{")]
        if code != 0 or not line:
            raise RuntimeError(f"{kind} loop ({ranks} ranks, {precision}) failed with code {code}: {text.strip()[-400:]}")
        d = json.loads(line[-1])
        d["peak_rss_mib"] = rss
        outs.append(d)
    return {"img_s": sum(o["img_s"] for o in outs), "per_rank": outs, "threads_per_rank": thr,
            "peak_rss_mib_per_rank": [o["peak_rss_mib"] for o in outs]}


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def run_trainer(a: argparse.Namespace, ranks: int, zero: int, precision: str, data: str, work: Path,
                compile: bool = False) -> dict[str, Any]:
    thr = threads_per_rank(a, ranks)
    run_dir = work / f"run_r{ranks}_z{zero}_{precision}{'_compiled' if compile else ''}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "trainer.main", "--model-size", a.preset, "--data", data, "--run-dir", str(run_dir),
           "--total-steps", str(a.steps), "--global-batch", str(a.batch * ranks), "--micro-batch", str(a.batch),
           "--precision", precision, "--zero-stage", str(zero), "--log-every", "1", "--save-every", str(10**9),
           "--sample-grid", "1", "--sample-respacing", "1", "--ema", "0.9999"] + (["--compile"] if compile else [])
    port = _free_port()
    procs, logs = [], []
    t0 = time.perf_counter()
    for r in range(ranks):
        log = open(work / f"trainer_r{ranks}_z{zero}_{precision}{'_compiled' if compile else ''}_{r}.log", "w+")
        env = _env(thr, thp=a.thp) if ranks == 1 else _env(thr, r, ranks, port, thp=a.thp)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    waited = _wait_all(procs, a.timeout)
    wall = time.perf_counter() - t0
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    codes = [c for c, _ in waited]
    if any(codes):
        tail = " | ".join(t.strip().splitlines()[-1] if t.strip() else "" for t in texts)
        raise RuntimeError(f"trainer ({ranks} ranks, ZeRO {zero}, {precision}) exit codes {codes}: {tail[-600:]}")
    sc = read_scalars(run_dir / "tb")
    ips = [v for s, v in sc["perf/images_per_s"] if s > a.warmup]
    step_t = [v for s, v in sc["perf/step_time_s"] if s > a.warmup]
    per_rank = {r: [v for s, v in sc.get(f"perf/images_per_s_rank{r}", []) if s > a.warmup] for r in range(ranks)}
    mem = sc.get("mem/peak_mb_max_rank", [])
    if not ips:
        raise RuntimeError(f"trainer run {run_dir} logged no perf/images_per_s after step {a.warmup}")
    return {
        "img_s": len(ips) / sum(1.0 / v for v in ips),  # harmonic mean = images / time at a fixed batch
        "img_s_median": statistics.median(ips), "img_s_per_step": ips, "step_time_s_per_step": step_t,
        "img_s_per_rank": {str(r): (len(v) / sum(1.0 / x for x in v) if v else None) for r, v in per_rank.items()},
        "peak_rss_mib_per_rank": [m for _, m in waited], "tb_peak_mb_max_rank_last": mem[-1][1] if mem else None,
        "threads_per_rank": thr, "wall_s": wall, "launch": "single process" if ranks == 1 else "RANK/WORLD_SIZE env processes",
    }


# ----------------------------------------------------------------------------------------- data set


def make_data(a: argparse.Namespace, work: Path, image_size: int, num_classes: int) -> str:
    """Shards at the preset's image size: digits for 16/32 px, random uint8 images via data.prepare npz otherwise."""
    out = work / "data"
    py = sys.executable
    if image_size in (16, 32):
        cmd = [py, "-m", "data.prepare", "digits", "--out-dir", str(out), "--size", str(image_size), "--no-progress",
               "--overwrite"]
        manifest_glob = "train-manifest.json"
    else:
        import numpy as np
        n = max(64, 4 * a.batch * max(a.ranks if not a.cases else [int(c.split(":")[0]) for c in a.cases]) * a.steps)
        rng = np.random.default_rng(0)
        npz = work / "random.npz"
        np.savez(npz, arr_0=rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                 arr_1=rng.integers(0, max(num_classes, 1), n).astype(np.int64))
        cmd = [py, "-m", "data.prepare", "npz", str(npz), "--out-dir", str(out), "--name", "random", "--no-progress",
               "--overwrite"]
        if num_classes:
            cmd += ["--num-classes", str(num_classes)]
        manifest_glob = "random-manifest.json"
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(a.threads))
    if r.returncode != 0:
        raise RuntimeError(f"data preparation failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return str(out / manifest_glob)


# ----------------------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "logical_cpus": os.cpu_count()}
    try:
        for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            k, _, v = ln.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch
    info["torch"] = torch.__version__
    try:
        import deepspeed
        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001
        info["deepspeed"] = f"unavailable ({e})"
    return info


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def busy_processes() -> list[str]:
    """Other processes above 10% CPU right now (ps), to show whether the machine was otherwise idle."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    rows = []
    for ln in out.splitlines()[1:]:
        f = ln.split(None, 3)
        if len(f) == 4 and int(f[0]) != os.getpid() and float(f[1]) >= 10.0:
            rows.append(f"{f[3][:90]} (pid {f[0]}, {f[1]}% avg CPU over its {f[2]} s)")
    return rows


def best_overhead(c: dict[str, Any], a: dict[str, Any]) -> float:
    """1 - (fastest steady trainer step's img/s) / (bare img/s from each process's fastest steady step):
    less sensitive to load spikes from other processes than the means."""
    bare_best = sum(a["batch"] / min(r["step_s"][a["warmup"]:]) for r in c["bare"]["per_rank"])
    return 1.0 - max(c["trainer"]["img_s_per_step"]) / bare_best


def summarize(ok: list[dict[str, Any]], a: dict[str, Any]) -> dict[tuple[int, int, str], dict[str, Any]]:
    """Per (ranks, zero, precision): the medians over rounds of the overhead and of the trainer's own overhead
    (floats), and "median (min to max)" strings, in percent, of those, of DeepSpeed's share and of the fastest-steps
    overhead."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for c in ok:
        groups.setdefault((c["ranks"], c["zero"], c["precision"]), []).append(c)

    def fmt(xs: list[float]) -> str:
        if not xs:
            return "-"
        med = f"{100 * statistics.median(xs):.1f}%"
        return med if len(xs) == 1 else f"{med} ({100 * min(xs):.1f} to {100 * max(xs):.1f})"

    out = {}
    for k, cs in groups.items():
        ov = [c["overhead"] for c in cs]
        own = [c["overhead_own"] for c in cs if "overhead_own" in c]
        out[k] = {"n": len(cs), "median": statistics.median(ov), "overhead": fmt(ov), "own": fmt(own),
                  "own_median": statistics.median(own) if own else None,
                  "deepspeed": fmt([1 - c["deepspeed_only"]["img_s"] / c["bare"]["img_s"] for c in cs
                                    if "deepspeed_only" in c]),
                  "fastest": fmt([best_overhead(c, a) for c in cs])}
    return out


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    m, a = res["machine"], res["args"]
    L = ["# Trainer overhead vs a bare training loop (issue 5)", "",
         f"Produced by `python -m benchmarks.bench_trainer {' '.join(res['argv'])}` (raw figures, every step: "
         f"`{Path(path).with_suffix('.json').name}`). Method: see the module docstring of `benchmarks/bench_trainer.py`.", "",
         f"- Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('logical_cpus'))} logical CPUs "
         f"({m.get('Core(s) per socket', '?')} cores/socket x {m.get('Socket(s)', '?')} sockets, "
         f"{m.get('Thread(s) per core', '?')} threads/core), {m.get('mem_total_gib', '?')} GiB, no GPU used.",
         f"- Software: torch {m['torch']}, deepspeed {m['deepspeed']}, Python {m['python']}.",
         f"- Date: {res['started_utc']} to {res['finished_utc']} UTC.",
         f"- Load average (1, 5, 15 min) at start {res['load_start']}, at end {res['load_end']}; per case below "
         f"(1-min value before the case).",
         f"- Preset {a['preset']} ({res['params_m']:.2f}M parameters, {res['image_size']} px), micro batch {a['batch']} "
         f"per rank (global = batch x ranks, no accumulation), {a['steps']} steps per run of which the first "
         f"{a['warmup']} are left out, " + (f"{a['threads_per_rank']} OpenMP thread(s) per rank in every case."
         if a.get("threads_per_rank") else f"{a['threads']} threads in total split over the ranks."),
         f"- Data: {res['data_kind']}.",
         "- Bare loop with more than one rank: " + ("gradients all-reduced over gloo as one flat buffer each step "
         "(the smallest data-parallel loop)." if a.get("bare_comm", "allreduce") == "allreduce" else
         "no communication (each rank trains its own model)."),
         f"- THP_MEM_ALLOC_ENABLE={a.get('thp', '0 (not set by this version)')} in all three loops (1: torch's CPU "
         "tensors of 2 MiB and more on transparent huge pages, the trainer's default).", ]
    if a.get("note"):
        L.append(f"- Note: {a['note']}")
    L += case_table(res) + compile_table(res)
    busy = sorted({p.split(" (")[0] for c in res["cases"] for p in c.get("other_busy_processes", [])})
    L += ["", "Other processes above 10% CPU (ps) at the start of a case: " + (", ".join(busy) if busy else "none")
          + " (per case, with pids, in the JSON)."]
    L += summary_lines(res) + ["", COLUMNS + ("gradients all-reduced over gloo each step" if a.get(
        "bare_comm", "allreduce") == "allreduce" else "no communication") + COLUMNS_END, ""]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, path)


def case_table(res: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per case and round."""
    a = res["args"]
    L = ["", "| round | ranks | ZeRO | precision | trainer img/s | bare img/s | overhead | DeepSpeed-only img/s | trainer's own "
          "overhead | trainer peak RSS MiB per rank "
          "| trainer TB mem MB (max rank) | bare peak RSS MiB per rank | trainer img/s per step | bare s/step (rank 0) | load "
          "| overhead, fastest steps |", "|---" * 16 + "|"]
    for c in res["cases"]:
        if "error" in c:
            L.append(f"| {c.get('round', 1)} | {c['ranks']} | {c['zero']} | {c['precision']} | failed: "
                     f"{c['error'][:200]} | | | | | | | | | | {c['load1']} | |")
            continue
        t, b = c["trainer"], c["bare"]
        L.append(f"| {c.get('round', 1)} | {c['ranks']} | {c['zero']} | {c['precision']} | {t['img_s']:.3f} | "
                 f"{b['img_s']:.3f} | "
                 f"**{100 * c['overhead']:.1f}%** | "
                 + (f"{c['deepspeed_only']['img_s']:.3f} | {100 * c['overhead_own']:.1f}% | " if "deepspeed_only" in c
                    else "- | - | ")
                 + f"{' / '.join(f'{x:.0f}' for x in t['peak_rss_mib_per_rank'])} | "
                 f"{t['tb_peak_mb_max_rank_last'] or float('nan'):.0f} | {' / '.join(f'{x:.0f}' for x in b['peak_rss_mib_per_rank'])} | "
                 f"{' '.join(f'{x:.2f}' for x in t['img_s_per_step'])} | "
                 f"{' '.join(f'{x:.2f}' for x in b['per_rank'][0]['step_s'][a['warmup']:])} | {c['load1']} | "
                 f"{100 * best_overhead(c, a):.1f}% |")
    return L


def compile_table(res: dict[str, Any]) -> list[str]:
    """Markdown lines: the compiled trainer against eager, when measured."""
    a, L = res["args"], []
    comp = [c for c in res["cases"] if "compile_speedup" in c]
    if comp:
        L += ["", "Trainer with --compile (inductor) against eager and the bare loop, same case and round (first "
              f"{a['warmup']} steps, which include the compile, left out; whole-process wall times show its cost):", "",
              "| round | ranks | ZeRO | precision | compiled img/s | eager img/s | bare img/s | compiled / eager | "
              "compiled / bare | wall s, compiled / eager run |", "|---" * 10 + "|"]
        for c in comp:
            t = c["trainer_compiled"]
            L.append(f"| {c.get('round', 1)} | {c['ranks']} | {c['zero']} | {c['precision']} | {t['img_s']:.3f} | "
                     f"{c['trainer']['img_s']:.3f} | {c['bare']['img_s']:.3f} | **{c['compile_speedup']:.3f}x** | "
                     f"{t['img_s'] / c['bare']['img_s']:.3f}x | {t['wall_s']:.0f} / {c['trainer']['wall_s']:.0f} |")
    return L


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Markdown lines: per case over the rounds, the 10% target, the trainer's own overhead."""
    a, L = res["args"], []
    ok = [c for c in res["cases"] if "overhead" in c]
    per_case = summarize(ok, a)
    if per_case:
        rounds = max(c.get("round", 1) for c in ok)
        if rounds > 1:
            L += ["", f"Per case over {rounds} rounds (the median of the per-round figures; min to max in brackets):",
                  "", "| ranks | ZeRO | precision | rounds | overhead | trainer's own overhead | overhead, fastest steps |",
                  "|---|---|---|---|---|---|---|"]
            for k, v in per_case.items():
                L.append(f"| {k[0]} | {k[1]} | {k[2]} | {v['n']} | **{v['overhead']}** | {v['own']} | {v['fastest']} |")
        meet = [k for k, v in per_case.items() if v["median"] < 0.10]
        worst_k = max(per_case, key=lambda k: per_case[k]["median"])
        L += ["", f"Target overhead < 10%: {len(meet)} of {len(per_case)} measured cases meet it"
              + (" (median over rounds)" if rounds > 1 else "") + f"; the largest is "
              f"{100 * per_case[worst_k]['median']:.1f}% ({worst_k[0]} rank(s), ZeRO {worst_k[1]}, {worst_k[2]})."]
        own = {k: v for k, v in per_case.items() if v["own_median"] is not None}
        if own:
            worst_k = max(own, key=lambda k: own[k]["own_median"])
            L += ["", f"The trainer's own overhead (trainer vs the DeepSpeed-only loop): under 10% in "
                  f"{sum(v['own_median'] < 0.10 for v in own.values())} of {len(own)} cases, at most "
                  f"{100 * own[worst_k]['own_median']:.1f}% ({worst_k[0]} rank(s), ZeRO {worst_k[1]}, {worst_k[2]}). "
                  f"DeepSpeed's share (1 - DeepSpeed only / bare) per case: "
                  + ", ".join(f"{k[0]}:{k[1]}:{k[2]} {v['deepspeed']}" for k, v in own.items()) + "."]
        if any(c["overhead"] < 0 for c in ok):
            L += ["A negative overhead means the bare loop ran slower than the trainer, which the trainer cannot "
                  "really beat: the machine's load changed between the two runs, and such figures are noise."]
    return L


COLUMNS = ("Columns: trainer img/s = harmonic mean of `perf/images_per_s` (sum over ranks) over the steady steps; "
           "bare img/s = steady images / steady time, summed over its concurrent processes (one per rank, ")
COLUMNS_END = ("); overhead = 1 - trainer / bare; DeepSpeed-only img/s = the same "
               "loop through the trainer's DeepSpeed engine and config, nothing else; trainer's own overhead = 1 - "
               "trainer / DeepSpeed only; peak RSS = ru_maxrss of each process over its whole "
               "life (os.wait4), for the trainer including start-up, the final checkpoint and the sample grid; "
               "TB mem = the trainer's own `mem/peak_mb_max_rank` at its last step (ru_maxrss during training); "
               "overhead, fastest steps = 1 - (the trainer's fastest steady step, img/s) / (the bare loop's fastest "
               "steady step per process, img/s summed), a figure less sensitive to load spikes from other processes.")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a._bare:
        bare_main(a)
        sys.stdout.flush()
        os._exit(0)  # as trainer.main: skip teardown, where gloo/DeepSpeed thread destructors can abort (SIGABRT)
    validate(a)
    cases = parse_cases(a)
    out = Path(a.out)
    if not out.is_absolute():
        out = REPO / out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    work.mkdir(parents=True, exist_ok=True)

    mc = model_cfg(a.preset)
    from diffusion.presets import create_model_from_config
    params_m = sum(p.numel() for p in create_model_from_config(mc).parameters()) / 1e6
    res: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "args": {k: v for k, v in vars(a).items()
                           if not k.startswith("_")}, "machine": machine(),
                           "started_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"),
                           "load_start": loadavg(), "params_m": params_m, "image_size": mc["image_size"], "cases": []}
    try:
        data = make_data(a, work, mc["image_size"], mc.get("num_classes") or 0)
    except RuntimeError as e:
        _die(str(e))
    res["data_kind"] = (f"digits shards ({mc['image_size']} px, data.prepare digits)" if mc["image_size"] in (16, 32)
                        else f"random uint8 {mc['image_size']}x{mc['image_size']} images with random labels, "
                             f"sharded by data.prepare npz")
    bare_cache: dict[tuple[int, int, str], dict[str, Any]] = {}  # (round, ranks, precision)
    for rnd, (ranks, zero, prec) in ((r, c) for r in range(1, a.repeats + 1) for c in cases):
        res["cases"].append(run_case(a, rnd, ranks, zero, prec, work, data, bare_cache))
        res["finished_utc"] = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
        res["load_end"] = loadavg()
        save_results(out, res)  # after every case, so a cut-off run keeps what it measured
    print(f"bench_trainer: wrote {out} and {out.with_suffix('.json')} (work dir {work})", file=sys.stderr)
    return 0 if all("error" not in c for c in res["cases"]) else 1


def run_case(a: argparse.Namespace, rnd: int, ranks: int, zero: int, prec: str, work: Path, data: str,
             bare_cache: dict[tuple[int, int, str], dict[str, Any]]) -> dict[str, Any]:
    """One case of one round: the bare loop (or its cached run), the DeepSpeed-only loop, the trainer (and compiled
    trainer); a failure is recorded in the case's "error"."""
    case: dict[str, Any] = {"round": rnd, "ranks": ranks, "zero": zero, "precision": prec, "load1": loadavg()[:1]}
    case["load1"] = case["load1"][0] if case["load1"] else None
    case["other_busy_processes"] = busy_processes()
    print(f"bench_trainer: round {rnd}/{a.repeats}: {ranks} rank(s), ZeRO {zero}, {prec} ...", file=sys.stderr,
          flush=True)
    try:
        if (rnd, ranks, prec) not in bare_cache or not a.reuse_bare:
            bare_cache[(rnd, ranks, prec)] = run_bare(a, ranks, prec, work, f"_z{zero}")
        case["bare"] = bare_cache[(rnd, ranks, prec)]
        if not a.no_deepspeed_only:
            case["deepspeed_only"] = run_bare(a, ranks, prec, work, f"_z{zero}", zero=zero)
        compiled_first = a.compile and rnd % 2 == 0
        if compiled_first:
            case["trainer_compiled"] = run_trainer(a, ranks, zero, prec, data, work, compile=True)
        case["trainer"] = run_trainer(a, ranks, zero, prec, data, work)
        if a.compile and not compiled_first:
            case["trainer_compiled"] = run_trainer(a, ranks, zero, prec, data, work, compile=True)
        report_case(a, case)
    except RuntimeError as e:
        case["error"] = str(e)
        print(f"  failed: {e}", file=sys.stderr, flush=True)
    return case


def report_case(a: argparse.Namespace, case: dict[str, Any]) -> None:
    """The case's overheads (and compile speed-up) into `case`, and one line on stderr."""
    if a.compile:
        tc = case["trainer_compiled"]
        case["compile_speedup"] = tc["img_s"] / case["trainer"]["img_s"]
        print(f"  trainer --compile {tc['img_s']:.3f} img/s = {case['compile_speedup']:.3f}x eager, "
              f"{tc['img_s'] / case['bare']['img_s']:.3f}x bare", file=sys.stderr, flush=True)
    case["overhead"] = 1.0 - case["trainer"]["img_s"] / case["bare"]["img_s"]
    msg = ""
    if "deepspeed_only" in case:
        case["overhead_own"] = 1.0 - case["trainer"]["img_s"] / case["deepspeed_only"]["img_s"]
        msg = (f", DeepSpeed only {case['deepspeed_only']['img_s']:.3f} img/s, the trainer's own "
               f"{100 * case['overhead_own']:.1f}%")
    print(f"  trainer {case['trainer']['img_s']:.3f} img/s, bare {case['bare']['img_s']:.3f} img/s, "
          f"overhead {100 * case['overhead']:.1f}%" + msg, file=sys.stderr, flush=True)


def save_results(out: Path, res: dict[str, Any]) -> None:
    """The JSON and the markdown, each replaced atomically."""
    jtmp = out.with_suffix(".json.tmp")
    jtmp.write_text(json.dumps(res, indent=1))
    os.replace(jtmp, out.with_suffix(".json"))
    write_markdown(out, res)


if __name__ == "__main__":
    sys.exit(main())
