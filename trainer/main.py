"""Improved-DDPM training entry point (any launcher):

    python -m trainer.main --data 'shards/train-{000000..000009}.tar' --run-dir runs/x --model-size tiny16
    deepspeed --num_gpus 2 trainer/main.py ...   |   srun python -m trainer.main ...   |   mpiexec -n 2 python -m trainer.main ...

Re-running the same command resumes from RUN_DIR/checkpoints/latest. Exit codes: 0 finished, 2 bad input,
3 loss non-finite for --nonfinite-patience steps (last good checkpoint kept), 75 preempted by SIGTERM/SIGUSR1
(state saved at the next step boundary on all ranks; re-run to resume).
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `deepspeed trainer/main.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Transparent huge pages for torch's CPU tensors of 2 MiB and more (read once, at torch's first allocation, so set
# before importing torch). DeepSpeed allocates its flat gradient buffers every step; with 4 KiB pages their page
# faults cost about 10% of a 30M step at ZeRO-1 on one CPU rank and 15% at ZeRO-0 on two (measured 2026-12-01,
# docs/trainer.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch

from trainer import EXIT_NONFINITE, EXIT_PREEMPTED
from trainer.config import FROZEN_ON_RESUME, TrainConfig, batch_layout, deepspeed_config, parse_config
from trainer.errors import UsageError, die


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, step, ...) so that a resumed run draws the same numbers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def model_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from diffusion.presets import PRESETS
    o = cfg.model_overrides()
    if o.get("num_classes") == 0:
        o["num_classes"] = None
    return PRESETS[cfg.model_size].replace(**o).to_dict()


def mark_zero3_leaf_modules(model: torch.nn.Module) -> int:
    """ZeRO-3: make every UNetBlock (a residual or resampling block with its attention, the checkpointing unit)
    one leaf for DeepSpeed's parameter hooks: its parameters are gathered once on entry instead of module by module.
    Returns the number of leaves."""
    from deepspeed.utils import set_z3_leaf_modules
    from diffusion.unet import UNetBlock
    return len(set_z3_leaf_modules(model, [UNetBlock], raise_if_not_found=False))


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop all-reduces it at each step boundary so every rank stops together."""

    def __init__(self) -> None:
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on)

    def _on(self, signum: int, frame) -> None:
        self.signum = signum


def request_requeue(mode: str) -> None:
    """Under SLURM: `scontrol requeue $SLURM_JOB_ID` when asked (on) or when the job allows requeue (auto)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or mode == "off":
        return
    try:
        if mode == "auto":
            info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
            if "Requeue=1" not in info:
                return
        subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        print(f"trainer: requested requeue of SLURM job {job}", flush=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"trainer: could not requeue SLURM job {job}: {e}", file=sys.stderr, flush=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def train(cfg: TrainConfig, launch) -> int:
    import torch.distributed as dist
    from diffusion import create_diffusion, create_timestep_sampler
    from diffusion.presets import create_model_from_config
    from trainer import checkpoint as ckpt
    from trainer.ema import EMA, local_master_shards, param_shapes
    from trainer.sync import mpi_all_gather, torch_all_gather

    rank, world = launch.rank, launch.world
    micro, accum = batch_layout(cfg, world)
    ds_config = deepspeed_config(cfg, world)
    if cfg.sampler_sync == "mpi":
        from mpi4py import MPI
        if MPI.COMM_WORLD.size != world or MPI.COMM_WORLD.rank != rank:
            raise UsageError(f"--sampler-sync mpi needs the ranks started by mpiexec (MPI sees "
                             f"{MPI.COMM_WORLD.size} ranks, the job has {world}); use --sampler-sync torch")

    run_dir = cfg.run_dir
    resume_from = ckpt.latest_checkpoint(run_dir)
    if resume_from:
        with open(os.path.join(resume_from, "config.json")) as f:
            saved = TrainConfig.from_dict(json.load(f))
        changed = [k for k in FROZEN_ON_RESUME if getattr(saved, k) != getattr(cfg, k)]
        if changed:
            raise UsageError(f"{run_dir} holds a run with other {', '.join(changed)}; use a new --run-dir "
                             f"or the same settings (see {resume_from}/config.json)")
        meta = ckpt.read_meta(resume_from)
        if meta["world_size"] != world:
            raise UsageError(f"{resume_from} was saved by {meta['world_size']} ranks, this job has {world}; "
                             f"resume with {meta['world_size']} ranks (the data position is per rank)")

    # data first: a missing data set is one clear line before any process group exists
    from data.errors import DataError
    from data.stream import TrainStream
    data_state = None
    if resume_from:
        with open(os.path.join(resume_from, f"rank_{rank:05d}.json")) as f:
            data_state = json.load(f)["data"]
    try:
        stream = TrainStream(cfg.data, micro, rank=rank, world_size=world, seed=cfg.seed,
                             num_workers=cfg.data_workers, flip=cfg.flip, state=data_state,
                             max_bad_fraction=cfg.max_bad_fraction)
        batches = iter(stream)
    except DataError as e:
        raise UsageError(f"--data {cfg.data}: {e}") from None

    import deepspeed
    from trainer.dist import init
    device = init(launch)

    model_cfg = model_config_dict(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model_from_config(model_cfg)
    if cfg.zero_stage == 3:
        mark_zero3_leaf_modules(model)
    num_classes = model_cfg.get("num_classes") or 0
    diffusion_kw = cfg.diffusion_kwargs()
    diffusion = create_diffusion(**diffusion_kw)
    sampler = create_timestep_sampler(cfg.timestep_sampler, diffusion.num_timesteps)
    all_gather = mpi_all_gather() if cfg.sampler_sync == "mpi" else torch_all_gather(device)

    warm = max(cfg.warmup_steps, 0)
    sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))) if warm else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                           lr_scheduler=sched)
    if world == 1 and cfg.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank: DeepSpeed's gradient all-reduce is a flatten + copy
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]

    def net(x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        """The engine as a diffusion model: inputs in the engine's dtype, outputs back in fp32."""
        return engine(x.to(dtype), t, **kw).float()

    step = 0
    if resume_from:
        engine.load_checkpoint(os.path.join(resume_from, "ds"), tag="ds", load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    # each rank averages the piece of the fp32 masters it owns; shards are taken after the load (DeepSpeed re-links)
    shards, sharded = local_master_shards(engine, rank, world)
    ema = EMA(cfg.ema_rates(), shards, sharded, param_shapes(engine.module), device)
    ema.check_coverage()
    if resume_from:
        from safetensors.torch import load_file
        sampler.load_state_dict(load_file(os.path.join(resume_from, "sampler.safetensors")))
        if shards:
            for r in ema.rates:
                ema.load(r, load_file(os.path.join(resume_from, f"ema_{r}.safetensors")))
        ckpt.load_rank_state(resume_from, rank)
        step = int(meta["step"])

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(run_dir, exist_ok=True)
        from trainer.fsio import atomic_write_json
        atomic_write_json(os.path.join(run_dir, "config.json"), cfg.to_dict())
        writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=step + 1 if step else None)
        writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", step)
        writer.add_text("deepspeed_config", "```\n" + json.dumps(ds_config, indent=2) + "\n```", step)
        n_params = sum(p.numel() for p in model.parameters()) if cfg.zero_stage < 3 else \
            sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        print(f"trainer: {launch.launcher} launch, {world} rank(s) on {device.type}, {cfg.model_size} "
              f"({n_params / 1e6:.2f}M params), global batch {cfg.global_batch} = {micro} x {accum} accum x {world} "
              f"ranks, {cfg.precision}, ZeRO-{cfg.zero_stage}, " + (f"resuming at step {step} from {resume_from}"
              if resume_from else "fresh start") + f"; TensorBoard: {os.path.join(run_dir, 'tb')}", flush=True)

    def save(at: int) -> None:
        folder = ckpt.begin(run_dir, at, rank)
        engine.save_checkpoint(os.path.join(folder, "ds"), tag="ds", save_latest=False)
        from trainer.fsio import atomic_save_safetensors, atomic_write_json
        buffers = {k: b.cpu() for k, b in engine.module.named_buffers()}
        masters = ema.full_masters()  # collectives: every rank takes part, rank 0 gets the tensors
        if rank == 0:
            atomic_save_safetensors(os.path.join(folder, "model.safetensors"), {**masters, **buffers})
        del masters
        for r in ema.rates:
            full = ema.full_state_dict(r)
            if rank == 0:
                atomic_save_safetensors(os.path.join(folder, f"ema_{r}.safetensors"), {**full, **buffers})
        if rank == 0:
            atomic_save_safetensors(os.path.join(folder, "sampler.safetensors"), sampler.state_dict())
            atomic_write_json(os.path.join(folder, "config.json"), cfg.to_dict())
        ckpt.save_rank_state(folder, rank, stream.state_dict())
        ckpt.commit(run_dir, at, rank, {"step": at, "model": model_cfg, "diffusion": diffusion_kw,
                                        "ema_rates": cfg.ema_rates(), "world_size": world}, cfg.keep)

    # fixed noise and labels for the EMA sample grid
    if num_classes:
        per = 8 if num_classes <= 10 else 1
        grid_labels = torch.arange(min(num_classes, 10 if num_classes <= 10 else 64)).repeat_interleave(per)
    else:
        grid_labels = None
    n_grid = cfg.sample_grid or (len(grid_labels) if grid_labels is not None else 64)
    if grid_labels is not None:
        grid_labels = grid_labels[:n_grid] if n_grid <= len(grid_labels) else torch.arange(n_grid) % num_classes

    def sample_grid(at: int) -> None:
        """A grid of samples from each EMA at fixed noise and labels (collective: the EMAs are assembled first)."""
        weights = {r: ema.full_state_dict(r) for r in ema.rates}
        if rank != 0:
            return
        from trainer.images import save_grid
        sdiff = create_diffusion(**diffusion_kw, timestep_respacing=cfg.sample_respacing)
        net_s = create_model_from_config(model_cfg).to(device).eval()
        size = model_cfg["image_size"]
        for r in ema.rates:
            net_s.load_state_dict({**weights.pop(r), **dict(engine.module.named_buffers())}, strict=True)
            m = net_s
            if cfg.sample_guidance > 0 and num_classes:
                from diffusion.guidance import ClassifierFreeGuidance
                m = ClassifierFreeGuidance(net_s, cfg.sample_guidance, num_classes)
            g = torch.Generator(device=device).manual_seed(cfg.seed + 12345)
            noise = torch.randn(n_grid, model_cfg.get("in_channels", 3), size, size, generator=g, device=device)
            kw = {"y": grid_labels.to(device)} if grid_labels is not None else {}
            with torch.no_grad():
                x = sdiff.p_sample_loop(m, noise.shape, noise=noise, model_kwargs=kw, device=device, generator=g)
            ncol = 8 if (grid_labels is not None and num_classes <= 10) else int(math.ceil(math.sqrt(n_grid)))
            img = save_grid(x, os.path.join(run_dir, "samples", f"ema{r}_step{at:08d}.png"), ncol)
            writer.add_image(f"samples/ema_{r}", img, at, dataformats="HWC")
        writer.flush()

    stop = Preemption()
    nonfinite_run = 0
    images_done = 0
    t_start = time.perf_counter()
    acc = torch.zeros(12, dtype=torch.float64)  # loss, mse, vb, n, quartile sums[4], quartile counts[4]
    t_log, steps_since_log, wait_since_log, step_time_since_log = time.perf_counter(), 0, 0.0, 0.0
    T = diffusion.num_timesteps
    grad_norm = float("nan")
    engine.train()
    while step < cfg.total_steps:
        t0 = time.perf_counter()
        torch.manual_seed(derived_seed(cfg.seed, rank, step, 1))  # dropout etc.
        g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, rank, step, 0))
        rows, wait = [], 0.0
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps
        for _ in range(accum):
            tw = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - tw
            x, y = x.to(device, non_blocking=True), y.to(device)
            t, w = sampler.sample(x.shape[0], device, generator=g)
            noise = torch.randn(x.shape, generator=g, device=device)
            kw = {}
            if num_classes:
                if cfg.label_dropout > 0:
                    drop = torch.rand(y.shape, generator=g, device=device) < cfg.label_dropout
                    y = torch.where(drop, torch.full_like(y, num_classes), y)
                kw["y"] = y
            losses = diffusion.training_losses(net, x, t, model_kwargs=kw, noise=noise)
            loss = (losses["loss"] * w).mean()
            engine.backward(loss)
            if log_now and engine.is_gradient_accumulation_boundary() and engine.get_global_grad_norm() is None \
                    and cfg.zero_stage == 0 and cfg.precision == "fp32":
                # plain fp32 DeepSpeed does not report the norm; grads are already averaged over ranks here
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double()))
            engine.step()
            lv = losses["loss"].detach().double().cpu()
            tc = t.detach().cpu()
            rows.append(torch.stack([tc.double(), lv], 1))
            q = (tc * 4 // T).clamp(max=3)
            acc[0] += lv.sum(); acc[1] += losses["mse"].detach().double().sum().cpu()
            acc[2] += losses["vb"].detach().double().sum().cpu() if "vb" in losses else 0.0
            acc[3] += lv.numel()
            acc[4:8].index_add_(0, q, lv); acc[8:12].index_add_(0, q, torch.ones_like(lv))
        local = torch.cat(rows)
        finite = bool(torch.isfinite(local[:, 1]).all())
        # the step's one collective of our own: every rank's (t, loss) rows plus a control row (preemption signal
        # seen, loss non-finite); it keeps the loss-aware sampler identical on every rank and all ranks in step
        control = torch.tensor([[float(stop.signum != 0), float(not finite)]], dtype=torch.float64)
        gathered = all_gather(torch.cat([local, control]), same_size=True).reshape(world, -1, 2)
        flags = gathered[:, -1].sum(0)
        if flags[1] == 0:  # a non-finite loss on any rank: no rank records this step's losses
            losses_all = gathered[:, :-1].reshape(-1, 2)
            sampler.update_with_all_losses(losses_all[:, 0].round().long(), losses_all[:, 1])
        ema.update()  # local: this rank's shards of the fp32 masters, no communication
        step += 1
        images_done += cfg.global_batch
        dt = time.perf_counter() - t0
        steps_since_log += 1; wait_since_log += wait; step_time_since_log += dt
        nonfinite_run = nonfinite_run + 1 if flags[1].item() > 0 else 0
        if nonfinite_run >= cfg.nonfinite_patience:
            if rank == 0:
                print(f"trainer: loss non-finite for {nonfinite_run} consecutive steps (up to step {step}); stopping "
                      f"without saving; last good checkpoint: {ckpt.latest_checkpoint(run_dir)}. Lower --lr, use "
                      f"--precision fp32/bf16 or raise --grad-clip; --nonfinite-patience sets the limit.",
                      file=sys.stderr, flush=True)
            if writer is not None:
                writer.close()
            return EXIT_NONFINITE

        if log_now:
            # images/s covers everything since the last log (logging included) except checkpoints and sample grids
            now = time.perf_counter()
            elapsed = now - t_log
            mine = torch.cat([acc, torch.tensor([steps_since_log * micro * accum / max(elapsed, 1e-9),
                                                 float(getattr(stream, "bad_samples", 0)),
                                                 peak_memory_mb(device), 0.0], dtype=torch.float64)])
            allv = all_gather(mine.reshape(-1, 2)).reshape(world, -1)  # [world, 15+1 pad]
            if rank == 0:
                tot = allv[:, :12].sum(0)
                n = max(tot[3].item(), 1.0)
                gn = engine.get_global_grad_norm()
                gn = float(gn) if gn is not None else grad_norm
                lr = engine.get_lr()[0]
                scale = float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0)) or 1.0)
                s = {"train/loss": tot[0] / n, "train/mse": tot[1] / n, "train/vb": tot[2] / n,
                     "train/grad_norm": gn, "train/lr": lr, "train/loss_scale": scale,
                     "perf/images_per_s": allv[:, 12].sum().item(), "perf/step_time_s": step_time_since_log / steps_since_log,
                     "perf/data_wait_s": wait_since_log / steps_since_log, "data/bad_samples": allv[:, 13].sum().item(),
                     "mem/peak_mb_max_rank": allv[:, 14].max().item()}
                for qi in range(4):
                    if tot[8 + qi] > 0:
                        s[f"train/loss_q{qi}"] = tot[4 + qi] / tot[8 + qi]
                for r in range(world):
                    s[f"perf/images_per_s_rank{r}"] = allv[r, 12].item()
                for k, v in s.items():
                    writer.add_scalar(k, float(v), step)
                writer.flush()
                print(f"step {step}/{cfg.total_steps} loss {s['train/loss']:.4f} mse {s['train/mse']:.4f} "
                      f"vb {s['train/vb']:.4f} | {s['perf/images_per_s']:.1f} img/s, step "
                      f"{1e3 * s['perf/step_time_s']:.0f} ms, data {1e3 * s['perf/data_wait_s']:.0f} ms | lr {lr:.2e} "
                      f"gnorm {gn:.3f} | mem {s['mem/peak_mb_max_rank']:.0f} MB", flush=True)
            acc.zero_()
            t_log, steps_since_log, wait_since_log, step_time_since_log = now, 0, 0.0, 0.0

        preempted = flags[0].item() > 0
        t_aside = time.perf_counter()
        if (step % cfg.save_every == 0 or step == cfg.total_steps or preempted) and nonfinite_run == 0:
            save(step)
        if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.total_steps:
            sample_grid(step)
            dist.barrier()
        t_log += time.perf_counter() - t_aside  # checkpoints and grids are not training throughput
        if cfg.debug_hang_after_step and step == cfg.debug_hang_after_step:
            print(f"trainer: debug hang after step {step}", flush=True)
            while True:
                time.sleep(3600)
        if preempted:
            if rank == 0:
                print(f"trainer: preemption signal received; saved step {step}; exiting {EXIT_PREEMPTED} "
                      f"(re-run the same command to resume)", flush=True)
                request_requeue(cfg.slurm_requeue)
            if writer is not None:
                writer.close()
            return EXIT_PREEMPTED

    # the final grid, unless this run resumed at its last step and the grid exists (rank 0 decides: a collective)
    need_grid = torch.tensor([float(resume_from is None or step > int(meta["step"])
                                    or not os.path.exists(os.path.join(run_dir, "samples")))], device=device)
    dist.broadcast(need_grid, 0)
    if need_grid.item() > 0:
        sample_grid(step)
    dist.barrier()
    if rank == 0:
        print(f"trainer: done, {step} steps. Checkpoints: {os.path.join(run_dir, 'checkpoints')}; "
              f"samples: {os.path.join(run_dir, 'samples')}; TensorBoard: tensorboard --logdir "
              f"{os.path.join(run_dir, 'tb')}", flush=True)
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        from trainer.dist import discover
        launch = discover()
        batch_layout(cfg, launch.world)
        code = train(cfg, launch)
    except UsageError as e:
        die(str(e), "trainer.main")
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()  # every rank is done with its files before any tears its connections down
            dist.destroy_process_group()
    except Exception:
        pass
    return code


if __name__ == "__main__":
    exit_code = main()
    # Everything is saved and closed here. Skip the interpreter's teardown: destructors of gloo / DeepSpeed
    # background threads can abort a finished rank (SIGABRT, "terminate called without an active exception";
    # seen once in about 30 two-rank CPU runs), which would turn a complete run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
