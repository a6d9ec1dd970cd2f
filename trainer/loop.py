"""The training loop shared by every objective: DeepSpeed engine, gradient accumulation, EMA, checkpoints and exact
resume, preemption, non-finite handling, TensorBoard and the console line.

What is trained is the objective's business (`trainer.objective`); this file never looks inside a batch. Per step
there is ONE collective of our own: an all-gather of the objective's synced rows plus a control row (a preemption
signal seen, a non-finite loss), so the objective's state stays identical on every rank and all ranks stop together.
Metrics are reduced with one more all-gather at log time only.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import sys
import time
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from torch.utils.tensorboard import SummaryWriter

from data.cli import UsageError
from data.errors import DataError
from data.fsio import atomic_write_json
from data.seeds import derive_seed
from data.stream import TrainStream
from trainer import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_RANK_LOST, EXIT_SAVE_FAILED
from trainer.checkpoint import Checkpointer, SaveError, is_write_failure, read_json, resume_point, set_aside
from trainer.config import TrainConfig, batch_layout, deepspeed_config, frozen_changes
from trainer.dist import Launch, Watchdog, init
from trainer.ema import EMA, PHEMA_PREFIX, local_master_shards, param_shapes
from trainer.images import save_grid
from trainer.metrics import MetricSums, reduce_metrics
from trainer.networks import DEFAULT, CastNet, Network, check_networks, frozen_mismatch, frozen_record, prepare_frozen
from trainer.objective import Objective, get_objective
from trainer.phema import write_snapshot
from trainer.preemption import Preemption, request_requeue
from trainer.step import Step
from trainer.sync import mpi_all_gather, torch_all_gather

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREVIEW_SEED_OFFSET = 12345  # the preview grid's noise: seed + this, the same at every step and on resume


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Trainer:
    """One training run of one objective on this rank: a DeepSpeed engine and EMAs per trained network of the
    objective (`engines`, `emas`), its frozen networks on the device. `run()` trains to `optim.total_steps` and
    returns the exit code (0 done, 3 non-finite loss, 74 a checkpoint could not be written, 75 preempted)."""

    def __init__(self, cfg: TrainConfig, launch: Launch) -> None:
        self.cfg, self.rank, self.world, self.launcher = cfg, launch.rank, launch.world, launch.launcher
        self.micro, self.accum = batch_layout(cfg, self.world)
        self.ckpt = Checkpointer(cfg.run.run_dir, self.rank, self.world, cfg.checkpoint.keep)
        # the newest intact checkpoint (every rank verifies it: the same files give the same choice everywhere)
        self.resume_from, damaged = resume_point(cfg.run.run_dir, self._say)
        self._check_resume()
        self.stream, self.batches = self._open_data()  # a missing data set: one clear line before any process group
        self.device = init(launch, cfg.run.collective_timeout)
        if self.rank == 0:  # every rank has chosen its resume point by now (init is a rendezvous)
            set_aside(damaged, self._say)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.objective: Objective = get_objective(cfg.objective.name)(cfg)
        self.ds_config = deepspeed_config(cfg, self.world)  # the user's JSON is read once
        self.dtype = DTYPES[cfg.optim.precision]
        self._build_networks(self.objective.networks())
        self.step = self.start_step = self.rollbacks = 0
        self._load(self.resume_from)
        self.start_step = self.step
        self.all_gather = mpi_all_gather() if cfg.objective.sampler_sync == "mpi" else torch_all_gather(self.device)
        self.metrics, self.stop = MetricSums(), Preemption()
        self.writer = self._open_writer() if self.rank == 0 else None
        self.grad_norms = {name: float("nan") for name in self.engines}  # fp32 ZeRO-0 norms taken by the loop
        self.wait = 0.0  # seconds spent waiting for data in this step
        self.watchdog = Watchdog(self.rank, cfg.run.collective_timeout, lambda: self.step, EXIT_RANK_LOST)
        self._reset_timers(time.perf_counter())

    # ------------------------------------------------------------------------------------------ set-up
    def _check_resume(self) -> None:
        """Refuse a resume whose saved run differs; keep its config.json as `saved_config` ({} on a fresh start)."""
        self.saved_config: dict = {}
        if self.cfg.objective.sampler_sync == "mpi":
            from mpi4py import MPI
            if MPI.COMM_WORLD.size != self.world or MPI.COMM_WORLD.rank != self.rank:
                raise UsageError(f"--sampler-sync mpi needs the ranks started by mpiexec (MPI sees "
                                 f"{MPI.COMM_WORLD.size} ranks, the job has {self.world}); use --sampler-sync torch")
        if not self.resume_from:
            return
        saved = self.saved_config = read_json(self.resume_from, "config.json")
        if not isinstance(saved.get("objective"), dict):
            raise UsageError(f"{self.resume_from} was written by an older trainer (flat config.json); start a new "
                             f"--run-dir (its weights export with python -m trainer.export)")
        changed = frozen_changes(saved, self.cfg)
        if changed:
            raise UsageError(f"{self.cfg.run.run_dir} holds a run with other {', '.join(changed)}; use a new "
                             f"--run-dir or the same settings (see {self.resume_from}/config.json)")
        saved_world = read_json(self.resume_from, "meta.json")["world_size"]
        if saved_world != self.world:
            raise UsageError(f"{self.resume_from} was saved by {saved_world} ranks, this job has {self.world}; "
                             f"resume with {saved_world} ranks (the data position is per rank)")

    def _build_networks(self, nets: dict[str, Network]) -> None:
        """An engine per trained network (in declaration order), frozen ones on the device; `nets`: every network as
        a function for the objective. A frozen network's file must be the one the run started with."""
        check_networks(nets, self.cfg.optim.zero_stage)
        self.networks = nets
        self.frozen_files = frozen_record(nets)
        if self.resume_from:
            problem = frozen_mismatch(self.saved_config.get("frozen", {}), self.frozen_files)
            if problem:
                raise UsageError(f"{self.cfg.run.run_dir}: {problem}")
        ema_nets = [k for k, n in nets.items() if n.ema and not n.frozen]
        if self.cfg.phema_sigmas() and len(ema_nets) != 1:
            raise UsageError(f"optim.phema (--phema) tracks the EMAs of one network; objective "
                             f"{self.cfg.objective.name} keeps EMAs of {len(ema_nets)} ({', '.join(ema_nets) or 'none'})"
                             f": leave --phema out")
        self.engines = {k: self._make_engine(n) for k, n in nets.items() if not n.frozen}
        self.primary = DEFAULT if DEFAULT in self.engines else next(iter(self.engines))  # its figures are train/*
        self.engine = self.engines[self.primary]
        self.nets = {k: prepare_frozen(n, self.device, self.dtype) if n.frozen else
                     CastNet(self.engines[k], self.dtype) for k, n in nets.items()}
        self.objective.nets = self.nets

    def _load(self, folder: str | None) -> None:
        """Collective: the engines from `folder` (None: fresh), then the EMA shards, objective state, RNG and step."""
        if folder:
            for name, engine in self.engines.items():
                self.ckpt.load_engine(folder, engine, name)
        # each rank averages the piece of the fp32 masters it owns; shards are taken after the load (DeepSpeed
        # re-links its fragments). A network without EMA gets an EMA object with no profiles: its masters.
        self.emas = {}
        for name, engine in self.engines.items():
            shards, sharded = local_master_shards(engine, self.rank, self.world)
            profiles = self.cfg.ema_profiles() if self.networks[name].ema else []
            self.emas[name] = EMA(profiles, shards, sharded, param_shapes(engine.module), self.device)
            self.emas[name].check_coverage()
        if folder:
            self.step = self.ckpt.load_rest(folder, emas=self.emas, objective=self.objective)
            self.rollbacks = int(read_json(folder, "meta.json").get("rollbacks", 0))

    def _open_data(self) -> tuple[TrainStream, Iterator]:
        d = self.cfg.data
        state = self.ckpt.data_state(self.resume_from) if self.resume_from else None
        try:
            stream = TrainStream(d.source, self.micro, rank=self.rank, world_size=self.world, seed=self.cfg.run.seed,
                                 num_workers=d.workers, flip=d.flip, state=state, max_bad_fraction=d.max_bad_fraction,
                                 image_size=d.image_size, resize=d.resize)
        except DataError as e:
            raise UsageError(f"--data {d.source}: {e}") from None
        get_objective(self.cfg.objective.name).check_data(self.cfg, tuple(stream.spec.shape))
        return stream, iter(stream)

    def _make_engine(self, network: Network):
        cfg, model = self.cfg, network.module
        if cfg.optim.zero_stage == 3 and self.objective.zero3_leaf_modules():
            set_z3_leaf_modules(model, self.objective.zero3_leaf_modules(), raise_if_not_found=False)
        warm = cfg.optim.warmup_steps
        sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))) if warm \
            else None
        ds = copy.deepcopy(self.ds_config)
        own = {"lr": network.lr, "betas": list(network.betas) if network.betas else None,
               "weight_decay": network.weight_decay}
        ds["optimizer"]["params"].update({k: v for k, v in own.items() if v is not None})
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds,
                                               lr_scheduler=sched)
        if cfg.optim.compile:  # in place: parameter names, checkpoints and the EMA's views are unchanged
            from trainer.compile import compile_engine
            compile_engine(engine, cfg.optim.zero_stage)
        if self.world == 1 and cfg.optim.zero_stage == 0:
            engine.enable_backward_allreduce = False  # one rank: DeepSpeed's gradient all-reduce is a flatten + copy
        return engine

    def _open_writer(self) -> SummaryWriter:
        cfg, run_dir = self.cfg, self.cfg.run.run_dir
        os.makedirs(run_dir, exist_ok=True)
        config = self.run_config()
        atomic_write_json(os.path.join(run_dir, "config.json"), config)
        w = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=self.step + 1 if self.step else None)
        w.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", self.step)
        w.add_text("deepspeed_config", "```\n" + json.dumps(self.ds_config, indent=2) + "\n```", self.step)
        sizes = {k: sum(getattr(p, "ds_numel", p.numel()) for p in e.module.parameters())
                 for k, e in self.engines.items()}
        n_params = sum(sizes.values())
        nets = "" if list(self.networks) == [DEFAULT] else " [" + ", ".join(
            f"{k} {sizes[k] / 1e6:.2f}M" if k in sizes else f"{k} frozen" for k in self.networks) + "]"
        start = f"resuming at step {self.step} from {self.resume_from}" if self.resume_from else "fresh start"
        print(f"trainer: {self.launcher} launch, {self.world} rank(s) on {self.device.type}, {cfg.objective.name} "
              f"objective ({n_params / 1e6:.2f}M params){nets}, global batch {cfg.optim.global_batch} = "
              f"{self.micro} x {self.accum} accum x {self.world} ranks, {cfg.optim.precision}, ZeRO-"
              f"{cfg.optim.zero_stage}, {start}; TensorBoard: {os.path.join(cfg.run.run_dir, 'tb')}", flush=True)
        return w

    def _reset_timers(self, now: float) -> None:
        self.t_log, self.steps_since_log, self.wait_since_log, self.step_time_since_log = now, 0, 0.0, 0.0

    def run_config(self) -> dict:
        """config.json: the settings, plus the frozen networks' files and sha256 (a resume refuses other files)."""
        return {**self.cfg.to_dict(), **({"frozen": self.frozen_files} if self.frozen_files else {})}

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> tuple[bool, bool]:
        """One optimizer step over `accum` micro-batches, then the step's one collective and the EMA update.
        Returns (a preemption signal reached some rank, the loss was non-finite on some rank)."""
        seed, log_now = self.cfg.run.seed, self._log_due(self.step + 1)
        torch.manual_seed(derive_seed(seed, self.rank, self.step, 1))  # dropout etc.
        g = torch.Generator(device=self.device).manual_seed(derive_seed(seed, self.rank, self.step, 0))
        step = Step(self, g, log_now)
        self.objective.train_step(step)  # default: accum x (loss -> backward -> step) of the one network
        self.wait += step.wait
        preempted, nonfinite = self._sync(step.finite)
        for ema in self.emas.values():
            ema.update(self.step + 1)  # local: this rank's shards of the fp32 masters, no communication
        self.step += 1
        return preempted, nonfinite

    def _sync(self, finite: bool) -> tuple[bool, bool]:
        """The step's one collective: every rank's synced rows plus a control row (preemption signal seen, loss
        non-finite). A non-finite loss on any rank keeps every rank's objective state unchanged."""
        rows = self.objective.sync_rows()
        k = max(2, rows.shape[1])
        control = torch.zeros(1, k, dtype=torch.float64)
        control[0, 0], control[0, 1] = float(self.stop.signum != 0), float(not finite)
        padded = torch.nn.functional.pad(rows.to(torch.float64), (0, k - rows.shape[1]))
        gathered = self.all_gather(torch.cat([padded, control]), same_size=True).reshape(self.world, -1, k)
        flags = gathered[:, -1].sum(0)
        nonfinite = bool(flags[1] > 0)
        if not nonfinite:
            self.objective.apply_synced(gathered[:, :-1, :rows.shape[1]].reshape(-1, rows.shape[1]))
        return bool(flags[0] > 0), nonfinite

    def fp32_grad_norm(self, name: str) -> None:
        """fp32 ZeRO-0 DeepSpeed does not report the gradient norm: take network `name`'s at the accumulation
        boundary (the gradients are already averaged over ranks there)."""
        e = self.engines[name]
        if e.is_gradient_accumulation_boundary() and e.get_global_grad_norm() is None \
                and self.cfg.optim.zero_stage == 0 and self.cfg.optim.precision == "fp32":
            grads = [p.grad for p in e.module.parameters() if p.grad is not None]
            if grads:
                norms = torch.stack(torch._foreach_norm(grads)).double()
                self.grad_norms[name] = float(torch.linalg.vector_norm(norms))

    def _grad_norm(self, name: str) -> float:
        gn = self.engines[name].get_global_grad_norm()
        return float(gn) if gn is not None else self.grad_norms[name]

    def _log_due(self, step: int) -> bool:
        return step % self.cfg.log.log_every == 0 or step == self.cfg.optim.total_steps

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> int:
        """Train to the last step; the one exit path closes TensorBoard whatever happens."""
        try:
            return self._train()
        finally:
            self.watchdog.stop.set()
            if self.writer is not None:
                self.writer.close()

    def _train(self) -> int:
        cfg, nonfinite_run = self.cfg, 0
        while self.step < cfg.optim.total_steps:
            t0, self.wait = time.perf_counter(), 0.0
            preempted, nonfinite = self.train_step()
            self.watchdog.beat()  # from the first step on: a step, save or preview taking --collective-timeout ends it
            self.steps_since_log += 1
            self.wait_since_log += self.wait
            self.step_time_since_log += time.perf_counter() - t0
            nonfinite_run = nonfinite_run + 1 if nonfinite else 0
            if nonfinite_run >= cfg.optim.nonfinite_patience and self.rollbacks < cfg.optim.rollback \
                    and (good := resume_point(cfg.run.run_dir, self._say)[0]):
                self.rollback(good, nonfinite_run)
                nonfinite_run = 0
                continue
            if nonfinite_run >= cfg.optim.nonfinite_patience:
                self._say(f"loss non-finite for {nonfinite_run} consecutive steps (up to step {self.step}); "
                          f"stopping without saving; last good checkpoint: {self.ckpt.latest()}. Lower --lr, use "
                          f"--precision fp32/bf16 or raise --grad-clip; --nonfinite-patience sets the limit.", True)
                return EXIT_NONFINITE
            if self._log_due(self.step):
                self.log()
            self.watchdog.beat()
            t_aside = time.perf_counter()  # checkpoints and grids are not training throughput
            # The snapshot goes first: when it cannot be written, the run resumes before this step and writes it.
            if self._snapshot_due(preempted) and not self.snapshot_or_fail():
                return EXIT_SAVE_FAILED
            if (self.step % cfg.checkpoint.save_every == 0 or self.step == cfg.optim.total_steps or preempted) \
                    and nonfinite_run == 0 and not self.save_or_fail():
                return EXIT_SAVE_FAILED
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0 and self.step != cfg.optim.total_steps:
                self.preview()
            self.t_log += time.perf_counter() - t_aside
            self.watchdog.beat()
            if preempted:
                self._say(f"preemption signal received; saved step {self.step}; exiting {EXIT_PREEMPTED} "
                          f"(re-run the same command to resume)")
                if self.rank == 0:
                    request_requeue(cfg.checkpoint.slurm_requeue)
                return EXIT_PREEMPTED
        self.watchdog.beat()
        self._final_preview()
        out = cfg.run.run_dir
        self._say(f"done, {self.step} steps. Checkpoints: {os.path.join(out, 'checkpoints')}; samples: "
                  f"{os.path.join(out, 'samples')}; TensorBoard: tensorboard --logdir {os.path.join(out, 'tb')}")
        return 0

    def _say(self, msg: str, error: bool = False) -> None:
        if self.rank == 0:
            print(f"trainer: {msg}", file=sys.stderr if error else sys.stdout, flush=True)

    # ------------------------------------------------------------------------------------------ aside
    def log(self) -> None:
        """Collective: reduce the metrics since the last log; rank 0 writes TensorBoard and the console line."""
        now = time.perf_counter()
        per_rank = {"images_per_s": self.steps_since_log * self.micro * self.accum / max(now - self.t_log, 1e-9),
                    "bad_samples": float(getattr(self.stream, "bad_samples", 0)),
                    "peak_mb": peak_memory_mb(self.device)}
        means, ranks = reduce_metrics(self.metrics, per_rank, self.all_gather, self.world)
        if self.writer is not None:
            e, n = self.engine, self.steps_since_log
            gn = self._grad_norm(self.primary)
            scale = getattr(e.optimizer, "cur_scale", getattr(e.optimizer, "loss_scale", 1.0))
            s = {f"train/{k}": v for k, v in means.items()}
            s.update({"train/grad_norm": gn, "train/lr": e.get_lr()[0], "train/loss_scale": float(scale or 1.0),
                      "perf/images_per_s": sum(ranks["images_per_s"]), "perf/step_time_s": self.step_time_since_log / n,
                      "perf/data_wait_s": self.wait_since_log / n, "data/bad_samples": sum(ranks["bad_samples"]),
                      "mem/peak_mb_max_rank": max(ranks["peak_mb"])})
            s.update({f"perf/images_per_s_rank{r}": v for r, v in enumerate(ranks["images_per_s"])})
            for k in self.engines:  # every other trained network's own figures
                if k != self.primary:
                    s.update({f"train/{k}/grad_norm": self._grad_norm(k), f"train/{k}/lr": self.engines[k].get_lr()[0]})
            for k, v in s.items():
                self.writer.add_scalar(k, float(v), self.step)
            self.writer.flush()
            extra = "".join(f" {k} {s[f'train/{k}']:.4f}" for k in self.objective.console if f"train/{k}" in s)
            print(f"step {self.step}/{self.cfg.optim.total_steps} loss {s.get('train/loss', float('nan')):.4f}{extra}"
                  f" | {s['perf/images_per_s']:.1f} img/s, step {1e3 * s['perf/step_time_s']:.0f} ms, data "
                  f"{1e3 * s['perf/data_wait_s']:.0f} ms | lr {s['train/lr']:.2e} gnorm {gn:.3f} | mem "
                  f"{s['mem/peak_mb_max_rank']:.0f} MB", flush=True)
        self.metrics.reset()
        self._reset_timers(now)

    def save_or_fail(self) -> bool:
        """Collective: `save`; False (after one line naming the path and the free space) when a write failed."""
        try:
            self.save()
            return True
        except SaveError as e:
            free = shutil.disk_usage(self.ckpt.folder).free / 2**20
            self._say(f"{e}; free space on {self.ckpt.folder}: {free:.1f} MiB; the latest checkpoint stays "
                      f"{self.ckpt.latest()}; stopping (exit {EXIT_SAVE_FAILED}): free space or fix the permission, "
                      f"then re-run the same command to resume", True)
            return False

    def rollback(self, folder: str, nonfinite_run: int) -> None:
        """Collective: reload the newest intact checkpoint `folder` (weights, optimizer, EMA, objective, RNG, step)
        but keep the data stream where it is, so the batches that led to the divergence are skipped; scale the
        learning rate (kept in DeepSpeed's optimizer and scheduler states from then on)."""
        cfg, before = self.cfg, self.step
        self._load(folder)
        f = cfg.optim.rollback_lr_factor
        self.rollbacks += 1
        for engine in self.engines.values():
            sched = engine.lr_scheduler
            if sched is not None and hasattr(sched, "base_lrs"):
                sched.base_lrs = [lr * f for lr in sched.base_lrs]
            for g in engine.optimizer.param_groups:
                g["lr"] *= f
        self.metrics.reset()
        self._reset_timers(time.perf_counter())
        lr = self.engine.get_lr()[0]
        self._say(f"loss non-finite for {nonfinite_run} consecutive steps (up to step {before}); rollback "
                  f"{self.rollbacks}/{cfg.optim.rollback}: back to step {self.step} from {folder}, data position kept "
                  f"(the batches of steps {self.step + 1}-{before} are skipped), learning rate x{f} -> {lr:.3g}", True)
        if self.writer is not None:
            self.writer.add_scalar("train/rollbacks", self.rollbacks, before)
            self.writer.add_scalar("train/rollback_lr", lr, before)
            self.writer.flush()

    def save(self) -> str:
        """Collective: a checkpoint of every component at the current step."""
        nets = {k: {"ema": n.ema, "export": n.export} for k, n in self.networks.items() if not n.frozen}
        meta = {"objective": self.cfg.objective.name, "kind": self.objective.kind or self.cfg.objective.name,
                **self.objective.export_config(),
                "ema_rates": self.cfg.ema_profiles(), "rollbacks": self.rollbacks,
                **({"networks": nets} if list(nets) != [DEFAULT] else {})}
        return self.ckpt.save(self.step, engines=self.engines, emas=self.emas, objective=self.objective,
                              stream=self.stream, config=self.run_config(), meta=meta)

    def _snapshot_due(self, preempted: bool) -> bool:
        """Post-hoc EMA snapshots every `phema_every` images (0: with every checkpoint), and at the last step."""
        o = self.cfg.optim
        if not o.phema or preempted:
            return False
        if self.step == o.total_steps:
            return True
        if not o.phema_every:
            return self.step % self.cfg.checkpoint.save_every == 0
        return self.step * o.global_batch // o.phema_every > (self.step - 1) * o.global_batch // o.phema_every

    def snapshot_or_fail(self) -> bool:
        """Collective: the power-function EMAs, assembled on rank 0, written as one fp16/bf16 snapshot file. False
        on every rank (after one line with the path and the free space) when rank 0 could not write it: a missing
        snapshot is a hole in the post-hoc EMA reconstruction, so training stops like on a failed checkpoint."""
        name = next(k for k, n in self.networks.items() if n.ema and not n.frozen)  # the one (see _build_networks)
        buffers = {k: b.cpu() for k, b in self.engines[name].module.named_buffers()}
        states = {s: self.emas[name].full_state_dict(PHEMA_PREFIX + s) for s in self.cfg.phema_sigmas()}
        failed = torch.zeros(1, device=self.device)
        if self.rank == 0:
            try:
                nbytes = write_snapshot(self.cfg.run.run_dir, self.step,
                                        {s: {**w, **buffers} for s, w in states.items()},
                                        DTYPES[self.cfg.optim.phema_dtype], buffers=list(buffers))
                self.writer.add_scalar("phema/snapshot_mb", nbytes / 2**20, self.step)
                print(f"trainer: post-hoc EMA snapshot at step {self.step}: {nbytes / 2**20:.1f} MiB "
                      f"({self.cfg.optim.phema_dtype}, sigma_rel {self.cfg.optim.phema})", flush=True)
            except Exception as e:
                if not is_write_failure(e):
                    raise
                where = os.path.join(self.cfg.run.run_dir, "phema")
                free = shutil.disk_usage(self.cfg.run.run_dir).free / 2**20
                self._say(f"post-hoc EMA snapshot of step {self.step} not written to {where} ({e}); free space on "
                          f"{self.cfg.run.run_dir}: {free:.1f} MiB; the latest checkpoint stays {self.ckpt.latest()};"
                          f" stopping (exit {EXIT_SAVE_FAILED}): free space or fix the permission, then re-run the "
                          f"same command to resume", True)
                failed.fill_(1)
        dist.broadcast(failed, 0)
        return failed.item() == 0

    def preview(self) -> None:
        """Collective: the objective's preview grid from each classic EMA (assembled on rank 0), PNG and
        TensorBoard."""
        name = self.objective.preview_network
        ema = self.emas[name]
        rates = self.cfg.ema_rates() if self.networks[name].ema else []
        weights = {r: ema.full_state_dict(r) for r in rates} if rates else {"model": ema.full_masters()}
        rates = rates or ["model"]
        if self.rank == 0:
            model = self.objective.networks()[name].module.to(self.device).eval()
            buffers = dict(self.engines[name].module.named_buffers())
            for r in rates:
                model.load_state_dict({**weights.pop(r), **buffers}, strict=True)
                out = self.objective.preview(model, self.device, self.cfg.run.seed + PREVIEW_SEED_OFFSET)
                for tag, fig in self.objective.figures(model).items():
                    self.writer.add_figure(f"{tag}/ema_{r}", fig, self.step)  # closes the figure
                if out is None:
                    break
                path = os.path.join(self.cfg.run.run_dir, "samples", f"ema{r}_step{self.step:08d}.png")
                try:
                    grid = save_grid(out[0], path, out[1])
                except OSError as e:  # a preview is not worth stopping for: say so and train on
                    self._say(f"warning: preview grid {path} not written ({e.strerror or e}); training goes on",
                              True)
                    break
                self.writer.add_image(f"samples/ema_{r}", grid, self.step, dataformats="HWC")
            self.writer.flush()
        dist.barrier()

    def _final_preview(self) -> None:
        """The last grid, unless this run resumed at its last step and grids exist (rank 0 decides: a collective)."""
        need = torch.tensor([float(self.step > self.start_step or not self.resume_from or not os.path.exists(
            os.path.join(self.cfg.run.run_dir, "samples")))], device=self.device)
        dist.broadcast(need, 0)
        if need.item() > 0:
            self.preview()
