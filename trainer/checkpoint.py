"""Checkpoints: one folder per save, made complete before it becomes visible.

    RUN_DIR/checkpoints/step_00001000/
        ds/                        DeepSpeed state (module, optimizer partitions, lr scheduler), every rank
        model.safetensors          consolidated fp32 weights (gathered at any ZeRO stage)
        ema_<rate>.safetensors     fp32 EMA weights, one file per rate
        sampler.safetensors        timestep-sampler state (identical on all ranks)
        rank_00000.json            per rank: data-stream position
        rng_00000.safetensors      per rank: torch RNG states
        config.json                the full TrainConfig
        meta.json                  step, model config, diffusion kwargs, EMA rates, world size (written last)
    RUN_DIR/checkpoints/latest     text file naming the newest complete folder (atomically replaced)

All ranks write into `step_XXXXXXXX.tmp/`; after a barrier rank 0 writes meta.json, fsyncs and renames the
folder, then replaces `latest` and removes the oldest folders beyond `keep`. A crash at any point leaves the
previous `latest` intact. The run folder must be on storage shared by all nodes.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from trainer.fsio import atomic_save_safetensors, atomic_write_json, atomic_write_text, fsync_dir


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


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(d)


def begin(run_dir: str, step: int, rank: int) -> str:
    """Collective: create an empty temporary folder for this step; return its path."""
    tmp = os.path.join(run_dir, "checkpoints", step_name(step) + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    return tmp


def commit(run_dir: str, step: int, rank: int, meta: dict, keep: int) -> str:
    """Collective: publish the temporary folder as the latest checkpoint; prune to `keep` folders."""
    ck = os.path.join(run_dir, "checkpoints")
    tmp, final = os.path.join(ck, step_name(step) + ".tmp"), os.path.join(ck, step_name(step))
    dist.barrier()
    if rank == 0:
        atomic_write_json(os.path.join(tmp, "meta.json"), meta)
        _fsync_tree(tmp)
        if os.path.exists(final):  # a re-save of the same step (e.g. exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ck)
        atomic_write_text(os.path.join(ck, "latest"), step_name(step) + "\n")
        done = sorted(d for d in os.listdir(ck) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(os.path.join(ck, old), ignore_errors=True)
    dist.barrier()
    return final


def save_rank_state(folder: str, rank: int, data_state: dict) -> None:
    """Per-rank data position and RNG states."""
    atomic_write_json(os.path.join(folder, f"rank_{rank:05d}.json"), {"data": data_state})
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    atomic_save_safetensors(os.path.join(folder, f"rng_{rank:05d}.safetensors"), rng)


def load_rank_state(folder: str, rank: int) -> dict:
    """Restore RNG states; return the data-stream state of this rank."""
    from safetensors.torch import load_file
    rng = load_file(os.path.join(folder, f"rng_{rank:05d}.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    with open(os.path.join(folder, f"rank_{rank:05d}.json")) as f:
        return json.load(f)["data"]


def read_meta(folder: str) -> dict:
    with open(os.path.join(folder, "meta.json")) as f:
        return json.load(f)
