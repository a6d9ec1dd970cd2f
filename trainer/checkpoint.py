"""Checkpoints: one folder per save, made complete before it becomes visible, written and read by one
`Checkpointer` for every component that carries state.

    RUN_DIR/checkpoints/step_00001000/
        ds/                        DeepSpeed state (module, optimizer partitions, lr scheduler), every rank
        model.safetensors          consolidated fp32 weights (gathered at any ZeRO stage)
        ema_<rate>.safetensors     fp32 EMA weights, one file per rate
        objective.safetensors      the objective's synced state (e.g. the loss-aware sampler; same on all ranks)
        rank_00000.json            per rank: data-stream position
        rng_00000.safetensors      per rank: torch RNG states
        config.json                the full nested TrainConfig
        meta.json                  step, objective, model config, diffusion kwargs, EMA rates, world size (last)
    RUN_DIR/checkpoints/latest     text file naming the newest complete folder (atomically replaced)

All ranks write into `step_XXXXXXXX.tmp/`; after a barrier rank 0 writes meta.json, fsyncs and renames the
folder, then replaces `latest` and removes the oldest folders beyond `keep`. A crash at any point leaves the
previous `latest` intact. The run folder must be on storage shared by all nodes.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from data.fsio import atomic_save_safetensors, atomic_write_json, atomic_write_text, fsync_dir


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isfile(os.path.join(path, "meta.json")) else None


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(d)


class Checkpointer:
    """Saves and restores a run's engine, EMA, objective state, data position, RNG states and step.

    `save` and the `load_*` methods that touch DeepSpeed or the EMA are collectives: every rank calls them."""

    def __init__(self, run_dir: str, rank: int, world: int, keep: int) -> None:
        self.run_dir, self.rank, self.world, self.keep = run_dir, rank, world, keep
        self.folder = os.path.join(run_dir, "checkpoints")

    def latest(self) -> str | None:
        return latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, *, engine, ema, objective, stream, config: dict[str, Any], meta: dict[str, Any]) -> str:
        tmp = self._begin(step)
        engine.save_checkpoint(os.path.join(tmp, "ds"), tag="ds", save_latest=False)
        buffers = {k: b.cpu() for k, b in engine.module.named_buffers()}
        masters = ema.full_masters()  # collectives: every rank takes part, rank 0 gets the tensors
        if self.rank == 0:
            atomic_save_safetensors(os.path.join(tmp, "model.safetensors"), {**masters, **buffers})
        del masters
        for r in ema.rates:
            full = ema.full_state_dict(r)
            if self.rank == 0:
                atomic_save_safetensors(os.path.join(tmp, f"ema_{r}.safetensors"), {**full, **buffers})
        if self.rank == 0:
            atomic_save_safetensors(os.path.join(tmp, "objective.safetensors"), objective.state_dict())
            atomic_write_json(os.path.join(tmp, "config.json"), config)
        atomic_write_json(os.path.join(tmp, f"rank_{self.rank:05d}.json"), {"data": stream.state_dict()})
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        atomic_save_safetensors(os.path.join(tmp, f"rng_{self.rank:05d}.safetensors"), rng)
        return self._commit(step, {**meta, "step": step, "world_size": self.world})

    def _begin(self, step: int) -> str:
        """Collective: an empty temporary folder for this step."""
        tmp = os.path.join(self.folder, step_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        return tmp

    def _commit(self, step: int, meta: dict[str, Any]) -> str:
        """Collective: publish the temporary folder as the latest checkpoint; prune to `keep` folders."""
        tmp, final = os.path.join(self.folder, step_name(step) + ".tmp"), os.path.join(self.folder, step_name(step))
        dist.barrier()
        if self.rank == 0:
            atomic_write_json(os.path.join(tmp, "meta.json"), meta)
            _fsync_tree(tmp)
            if os.path.exists(final):  # a re-save of the same step (e.g. exit right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.folder)
            atomic_write_text(os.path.join(self.folder, "latest"), step_name(step) + "\n")
            done = sorted(d for d in os.listdir(self.folder) if d.startswith("step_") and not d.endswith(".tmp"))
            for old in done[:-self.keep]:
                shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)
        dist.barrier()
        return final

    # ------------------------------------------------------------------------------------------ load
    def data_state(self, folder: str) -> dict:
        """This rank's data-stream position (read before the stream is made)."""
        return read_json(folder, f"rank_{self.rank:05d}.json")["data"]

    def load_engine(self, folder: str, engine) -> None:
        """Collective: DeepSpeed's module, optimizer and lr-scheduler states (before the EMA takes its shards)."""
        engine.load_checkpoint(os.path.join(folder, "ds"), tag="ds", load_module_strict=True,
                               load_optimizer_states=True, load_lr_scheduler_states=True)

    def load_rest(self, folder: str, *, ema, objective) -> int:
        """EMA shards, objective state and this rank's RNG states; returns the step to continue from."""
        from safetensors.torch import load_file
        objective.load_state_dict(load_file(os.path.join(folder, "objective.safetensors")))
        if ema.shards:
            for r in ema.rates:
                ema.load(r, load_file(os.path.join(folder, f"ema_{r}.safetensors")))
        rng = load_file(os.path.join(folder, f"rng_{self.rank:05d}.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        return int(read_json(folder, "meta.json")["step"])
