"""The trainer's step for an objective with two networks: the toy GAN of tests/test_objective_networks.py (generator
and discriminator MLPs, each with its own DeepSpeed engine and AdamW, an R1 penalty through a double backward, both
stepping every run step with --d-every 1) against a bare loop doing the same two updates in plain PyTorch.

    python -m benchmarks.bench_networks --hidden 1024 --batch 32 --steps 30 --cases 1:0,2:1 --repeats 3

Per case (ranks R, ZeRO stage Z) and round: the bare loop, then the trainer. The trainer (`python -m trainer.main
--objective tests/test_objective_networks.py:ToyGAN`, R processes started with RANK/WORLD_SIZE, micro batch --batch,
no accumulation, checkpoint and sample grid only at the end) is read back from its TensorBoard scalars
(`perf/images_per_s`, every step) after --warmup steps: their harmonic mean. The bare loop runs R processes, each on a
fixed in-memory batch of --batch images: D step (fake from G under no_grad, R1 by torch.autograd.grad with
create_graph, softplus losses, backward, gloo all-reduce of D's gradients as one flat buffer when R > 1, clip 1.0,
fused AdamW) then G step (D's parameters without gradients, the same reduce, clip and AdamW); images/s = steady images
/ steady time, summed over its processes. overhead = 1 - trainer / bare: what the trainer adds around two networks
(data stream, two engines, EMA of the generator, the per-step sync, metrics). Results: --out (markdown) + .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_trainer import REPO, _env, _free_port, _wait_all, busy_processes, loadavg, machine, read_scalars

PLUGIN = "tests/test_objective_networks.py:ToyGAN"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_networks", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of both MLPs (default 1024)")
    p.add_argument("--batch", type=int, default=32, help="micro batch per rank (default 32)")
    p.add_argument("--steps", type=int, default=30, help="steps per run, warm-up included (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out (default 5)")
    p.add_argument("--cases", default="1:0,2:1", help="comma list of RANKS:ZERO (default 1:0,2:1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the cases (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in total, split over ranks")
    p.add_argument("--out", default="benchmarks/results/networks.md", help="markdown result (+ same name .json)")
    p.add_argument("--work-dir", default="/tmp/bench_networks", help="scratch folder")
    p.add_argument("--note", default="", help="free text recorded with the results")
    p.add_argument("--_bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--_port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def bare_main(a: argparse.Namespace) -> None:
    """One bare-loop process; prints {rank, step_s, img_s}."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, str(REPO / "tests"))
    from test_objective_networks import D_BETAS, D_LR, G_BETAS, G_LR, SHAPE, make_discriminator, make_generator
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    G, D = make_generator(16, a.hidden), make_discriminator(a.hidden)
    opt_g = torch.optim.AdamW(G.parameters(), lr=G_LR, betas=G_BETAS, eps=1e-8, weight_decay=0.0, fused=True)
    opt_d = torch.optim.AdamW(D.parameters(), lr=D_LR, betas=D_BETAS, eps=1e-8, weight_decay=0.0, fused=True)
    if a._world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a._port}", rank=a._rank, world_size=a._world)
    gen = torch.Generator().manual_seed(a._rank)
    x = torch.rand(a.batch, *SHAPE, generator=gen) * 2 - 1

    def update(net: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        loss.mean().backward()
        grads = [p.grad for p in net.parameters()]
        if a._world > 1:
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(a._world)
            for gr, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                gr.copy_(v)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            fake = G(torch.randn(a.batch, 16, generator=gen))
        real = x.detach().requires_grad_(True)
        d_real = D(real)
        r1 = torch.autograd.grad(d_real.sum(), real, create_graph=True)[0].pow(2).flatten(1).sum(1)
        update(D, opt_d, F.softplus(-d_real) + F.softplus(D(fake)) + 0.5 * r1)
        D.requires_grad_(False)
        update(G, opt_g, F.softplus(-D(G(torch.randn(a.batch, 16, generator=gen)))))
        D.requires_grad_(True)
        times.append(time.perf_counter() - t0)
    steady = times[a.warmup:]
    print(json.dumps({"rank": a._rank, "step_s": times, "img_s": a.batch * len(steady) / sum(steady)}), flush=True)


def run_bare(a: argparse.Namespace, ranks: int, log_dir: Path) -> dict[str, Any]:
    thr, port = max(1, a.threads // ranks), _free_port()
    logs = [open(log_dir / f"bare_r{ranks}_{r}.log", "w+") for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_networks", "--_bare", "--_rank", str(r),
                               "--_world", str(ranks), "--_port", str(port), "--hidden", str(a.hidden), "--batch",
                               str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup)],
                              cwd=REPO, env=_env(thr), stdout=log, stderr=subprocess.STDOUT)
             for r, log in enumerate(logs)]
    waited, outs = _wait_all(procs, 1800), []
    for (code, _), log in zip(waited, logs):
        log.seek(0)
        lines = [ln for ln in log.read().splitlines() if ln.startswith("{")]
        if code or not lines:
            raise RuntimeError(f"bare loop ({ranks} ranks) failed with code {code}; see {log.name}")
        outs.append(json.loads(lines[-1]))
    return {"img_s": sum(o["img_s"] for o in outs), "per_rank": outs}


def run_trainer(a: argparse.Namespace, ranks: int, zero: int, data: str, work: Path) -> dict[str, Any]:
    thr, port, run_dir = max(1, a.threads // ranks), _free_port(), work / f"run_r{ranks}_z{zero}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "trainer.main", "--objective", PLUGIN, "--hidden", str(a.hidden), "--d-every", "1",
           "--data", data, "--run-dir", str(run_dir), "--total-steps", str(a.steps), "--global-batch",
           str(a.batch * ranks), "--micro-batch", str(a.batch), "--zero-stage", str(zero), "--log-every", "1",
           "--save-every", str(10**9), "--ema", "0.999", "--no-flip"]
    logs = [open(work / f"trainer_r{ranks}_z{zero}_{r}.log", "w+") for r in range(ranks)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(thr) if ranks == 1 else _env(thr, r, ranks, port), stdout=log,
                              stderr=subprocess.STDOUT) for r, log in enumerate(logs)]
    codes = [c for c, _ in _wait_all(procs, 1800)]
    if any(codes):
        raise RuntimeError(f"trainer ({ranks} ranks, ZeRO {zero}) exit codes {codes}; see {logs[0].name}")
    sc = read_scalars(run_dir / "tb")
    ips = [v for s, v in sc["perf/images_per_s"] if s > a.warmup]
    steps = [v for s, v in sc["perf/step_time_s"] if s > a.warmup]
    return {"img_s": len(ips) / sum(1.0 / v for v in ips), "step_ms_median": 1e3 * statistics.median(steps)}


def run_rounds(a: argparse.Namespace, cases: list[tuple[int, int]], data: str, work: Path, out: Path) -> dict:
    res: dict[str, Any] = {"argv": sys.argv[1:], "machine": machine(), "load_start": loadavg(), "cases": [],
                           "started_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), "args": vars(a)}
    for rnd in range(1, a.repeats + 1):
        for ranks, zero in cases:
            c: dict[str, Any] = {"round": rnd, "ranks": ranks, "zero": zero, "load1": loadavg()[:1],
                                 "other_busy_processes": busy_processes()}
            print(f"bench_networks: round {rnd}: {ranks} rank(s), ZeRO {zero} ...", file=sys.stderr, flush=True)
            c["bare"], c["trainer"] = run_bare(a, ranks, work), run_trainer(a, ranks, zero, data, work)
            c["overhead"] = 1 - c["trainer"]["img_s"] / c["bare"]["img_s"]
            print(f"  trainer {c['trainer']['img_s']:.1f} img/s, bare {c['bare']['img_s']:.1f} img/s, overhead "
                  f"{100 * c['overhead']:.1f}%", file=sys.stderr, flush=True)
            res["cases"].append(c)
            res["finished_utc"], res["load_end"] = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"), loadavg()
            out.with_suffix(".json").write_text(json.dumps(res, indent=1))
            write_markdown(out, res)
    return res


def write_markdown(out: Path, res: dict[str, Any]) -> None:
    m, a = res["machine"], res["args"]
    L = ["# The trainer with two networks (toy GAN) vs a bare two-network loop", "",
         f"Produced by `python -m benchmarks.bench_networks {' '.join(res['argv'])}`; method: the module docstring "
         f"of `benchmarks/bench_networks.py`; raw figures: `{out.with_suffix('.json').name}`.", "",
         f"- Machine: {m.get('Model name', '?')}, {m.get('CPU(s)', m.get('logical_cpus'))} logical CPUs, "
         f"{m.get('mem_total_gib', '?')} GiB, no GPU; torch {m['torch']}, deepspeed {m['deepspeed']}, Python "
         f"{m['python']}.", f"- Date: {res['started_utc']} to {res.get('finished_utc', '?')} UTC; load average at "
         f"start {res['load_start']}, at end {res.get('load_end')}.",
         f"- Toy GAN: MLPs with {a['hidden']} hidden units, micro batch {a['batch']} per rank, {a['steps']} steps "
         f"of which {a['warmup']} are left out, {a['threads']} threads split over the ranks.", ""]
    if a.get("note"):
        L += [f"- Note: {a['note']}", ""]
    L += ["| round | ranks | ZeRO | trainer img/s | trainer step ms (median) | bare img/s | overhead | load |",
          "|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        L.append(f"| {c['round']} | {c['ranks']} | {c['zero']} | {c['trainer']['img_s']:.1f} | "
                 f"{c['trainer']['step_ms_median']:.1f} | {c['bare']['img_s']:.1f} | {100 * c['overhead']:.1f}% | "
                 f"{c['load1']} |")
    by: dict[tuple[int, int], list[float]] = {}
    for c in res["cases"]:
        by.setdefault((c["ranks"], c["zero"]), []).append(c["overhead"])
    L += ["", "Median overhead per case: " + ", ".join(f"{r} rank(s) ZeRO {z}: {100 * statistics.median(v):.1f}% "
                                                         f"({len(v)} rounds)" for (r, z), v in by.items()) + ".", ""]
    out.write_text("\n".join(L))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a._bare:
        bare_main(a)
        sys.stdout.flush()
        os._exit(0)  # no teardown of gloo's threads (as trainer.main)
    try:
        cases = [(int(r), int(z)) for r, z in (c.split(":") for c in a.cases.split(","))]
    except ValueError:
        print(f"bench_networks: --cases {a.cases!r}: give RANKS:ZERO pairs, e.g. 1:0,2:1", file=sys.stderr)
        return 2
    work, out = Path(a.work_dir), REPO / a.out if not os.path.isabs(a.out) else Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out-dir", str(work / "digits"), "--size", "16",
                    "--no-progress", "--overwrite"], cwd=REPO, check=True, capture_output=True, env=_env(a.threads))
    run_rounds(a, cases, str(work / "digits" / "train-manifest.json"), work, out)
    print(f"bench_networks: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
