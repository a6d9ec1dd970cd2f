"""Checkpoints: one folder per save, made complete before it becomes visible, written and read by one
`Checkpointer` for every component that carries state.

    RUN_DIR/checkpoints/step_00001000/
        ds/                        DeepSpeed state (module, optimizer partitions, lr scheduler), every rank
        model.safetensors          consolidated fp32 weights (gathered at any ZeRO stage)
        ema_<rate>.safetensors     fp32 EMA weights, one file per rate
        ds_N/, N.safetensors, N.ema_<rate>.safetensors    the same for each further trained network N of the
                                   objective (trainer.networks; frozen networks are not saved)
        objective.safetensors      the objective's synced state (e.g. the loss-aware sampler; same on all ranks)
        rank_00000.json            per rank: data-stream position
        rng_00000.safetensors      per rank: torch RNG states
        config.json                the full nested TrainConfig
        meta.json                  step, objective, kind, model config, diffusion kwargs, EMA rates, world size,
                                   the trained networks (when not the one "model": their EMA and export flags), and
                                   "files": size and sha256 of every other file of the folder (written last)
    RUN_DIR/checkpoints/latest     text file naming the newest complete folder (atomically replaced)

All ranks write into `step_XXXXXXXX.tmp/`; after a barrier rank 0 hashes every file, writes meta.json, fsyncs and
renames the folder, then replaces `latest` and removes the oldest folders beyond `keep`. A crash at any point leaves
the previous `latest` intact. The run folder must be on storage shared by all nodes.

Resume (`resume_point`) verifies the newest folder against its recorded sizes and hashes (sha256 reads every byte:
about 1 s per GB on each rank) and falls back to the newest intact one, saying why in one line. A write that fails
(full disk, I/O error, permission) on any rank makes `save` raise `SaveError` on every rank; nothing is published.

    python -m trainer.checkpoint verify RUN_DIR     check every checkpoint of a run (exit 0 all intact, 1 not)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from data.cli import ArgumentParser, UsageError, run_cli
from data.fsio import atomic_save_safetensors, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from trainer.networks import DEFAULT, deepspeed_dir, weights_file

STEP_RE = re.compile(r"^step_(\d{8})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder `latest` names when it is complete (has meta.json), else None. Not verified: see resume_point."""
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        path = os.path.join(run_dir, "checkpoints", f.read().strip())
    return path if os.path.isfile(os.path.join(path, "meta.json")) else None


def checkpoint_folders(run_dir: str) -> list[str]:
    """Every published checkpoint folder of a run (`step_XXXXXXXX`), newest step first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted((d for d in os.listdir(folder) if STEP_RE.match(d)), reverse=True) if os.path.isdir(folder) else []
    return [os.path.join(folder, d) for d in names]


def _files(folder: str) -> list[str]:
    """Relative paths of every file under `folder` except meta.json (NFS's .nfs* placeholders skipped)."""
    out = []
    for d, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/")
            if rel != "meta.json" and not n.startswith(".nfs"):
                out.append(rel)
    return sorted(out)


def file_table(folder: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size": bytes, "sha256": hex}} of every file of a checkpoint folder but meta.json."""
    return {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_file(os.path.join(folder, rel))}
            for rel in _files(folder)}


def verify(folder: str) -> str | None:
    """What is wrong with a checkpoint folder (one phrase), or None when every recorded file is there with its
    recorded size and sha256 and nothing was added. Folders of older trainers (no "files" table) pass unverified."""
    try:
        meta = read_json(folder, "meta.json")
    except FileNotFoundError:
        return "no meta.json (an unfinished save)"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({type(e).__name__})"
    m = STEP_RE.match(os.path.basename(folder))
    if not isinstance(meta, dict) or (m and meta.get("step") != int(m.group(1))):
        return f"meta.json does not describe step {int(m.group(1)) if m else '?'} (edited by hand?)"
    table = meta.get("files")
    if table is None:
        return None
    if not isinstance(table, dict):
        return "meta.json's file table is not a table (edited by hand?)"
    for rel, want in sorted(table.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{rel} has {size} bytes, {want.get('size') if isinstance(want, dict) else '?'} were written"
        if sha256_file(path) != want.get("sha256"):
            return f"{rel} differs from what was written (sha256 mismatch: damaged or edited)"
    extra = sorted(set(_files(folder)) - set(table))
    if extra:
        return f"{extra[0]} was not written by the trainer (edited by hand?)"
    return None


def resume_point(run_dir: str, say: Callable[[str], None] | None = None) -> tuple[str | None, list[str]]:
    """The newest intact checkpoint folder of a run (None when it has none) and the damaged ones newer than it.
    Each damaged folder is reported through `say` in one line. Published folders but none intact: UsageError."""
    folders, damaged = checkpoint_folders(run_dir), []
    for f in folders:
        problem = verify(f)
        if problem is None:
            return f, damaged
        damaged.append(f)
        if say:
            say(f"checkpoint {f} is damaged: {problem}; trying the one before it")
    if damaged:
        raise UsageError(f"no intact checkpoint in {os.path.join(run_dir, 'checkpoints')} ({len(damaged)} damaged; "
                         f"python -m trainer.checkpoint verify {run_dir} lists them); restore one or start a new "
                         f"--run-dir")
    return None, damaged


def clean_unfinished(run_dir: str, say: Callable[[str], None]) -> list[str]:
    """Remove the `.tmp` folders a dead save left behind (call while holding the run lock); one line each."""
    folder = os.path.join(run_dir, "checkpoints")
    gone = sorted(d for d in os.listdir(folder) if d.endswith(".tmp")) if os.path.isdir(folder) else []
    for d in gone:
        shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
        say(f"removed {os.path.join(folder, d)}, an unfinished save left by a run that died while saving")
    return gone


def set_aside(folders: Sequence[str], say: Callable[[str], None]) -> None:
    """Rename damaged checkpoint folders to `<name>.damaged` (kept for inspection, never resumed or pruned)."""
    for f in folders:
        if os.path.isdir(f):
            if os.path.exists(f + ".damaged"):
                shutil.rmtree(f + ".damaged")
            os.replace(f, f + ".damaged")
            say(f"set the damaged checkpoint aside as {f}.damaged")


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(d)


class SaveError(Exception):
    """A checkpoint write failed on some rank (raised on every rank); the previous checkpoint stays `latest`."""


def is_write_failure(e: BaseException) -> bool:
    """A failed file write: OSError (ENOSPC, EIO, EACCES...), safetensors' error, or torch.save's RuntimeError
    (inline_container: "file write failed"); a failed collective (torch.distributed.DistError) is not one."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, dist.DistError) or "gloo" in str(e).lower() or "nccl" in str(e).lower():
        return False
    return type(e).__name__ == "SafetensorError" or isinstance(e, RuntimeError) and (
        "inline_container" in str(e) or "write" in str(e).lower())


class Checkpointer:
    """Saves and restores a run's engine, EMA, objective state, data position, RNG states and step.

    `save` and the `load_*` methods that touch DeepSpeed or the EMA are collectives: every rank calls them."""

    def __init__(self, run_dir: str, rank: int, world: int, keep: int) -> None:
        self.run_dir, self.rank, self.world, self.keep = run_dir, rank, world, keep
        self.folder = os.path.join(run_dir, "checkpoints")
        self.failure: str | None = None  # this rank's first failed write of the save in progress

    def latest(self) -> str | None:
        return latest_checkpoint(self.run_dir)

    # ------------------------------------------------------------------------------------------ save
    def save(self, step: int, *, engines: dict[str, Any], emas: dict[str, Any], objective, stream,
             config: dict[str, Any], meta: dict[str, Any]) -> str:
        """Collective. `engines`/`emas`: {network name: DeepSpeed engine / its EMA}. A failed write on any rank:
        SaveError on every rank, nothing published, `latest` kept."""
        tmp = self._begin(step, list(engines))
        for name, engine in engines.items():
            self._save_network(tmp, name, engine, emas[name])
        if self.rank == 0:
            self._write(tmp, "objective.safetensors", objective.state_dict())
            self._guard(os.path.join(tmp, "config.json"), lambda: atomic_write_json(os.path.join(tmp, "config.json"),
                                                                                     config))
        rank_json = os.path.join(tmp, f"rank_{self.rank:05d}.json")
        self._guard(rank_json, lambda: atomic_write_json(rank_json, {"data": stream.state_dict()}))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        self._write(tmp, f"rng_{self.rank:05d}.safetensors", rng)
        self._agree(step, tmp)
        return self._commit(step, {**meta, "step": step, "world_size": self.world})

    def _save_network(self, tmp: str, name: str, engine, ema) -> None:
        """Collective: one network's DeepSpeed state, consolidated fp32 weights and EMA weights."""
        ds = os.path.join(tmp, deepspeed_dir(name))
        self._guard(ds, lambda: engine.save_checkpoint(ds, tag="ds", save_latest=False), deepspeed_save=True)
        buffers = {k: b.cpu() for k, b in engine.module.named_buffers()}
        masters = ema.full_masters()  # collectives: every rank takes part, rank 0 gets the tensors
        if self.rank == 0:
            self._write(tmp, weights_file(name), {**masters, **buffers})
        del masters
        for r in ema.rates:
            full = ema.full_state_dict(r)
            if self.rank == 0:
                self._write(tmp, weights_file(name, r), {**full, **buffers})

    def _guard(self, path: str, write: Callable[[], None], deepspeed_save: bool = False) -> None:
        """Run one write unless an earlier one failed on this rank; remember the first failure (path, error)."""
        if self.failure is not None:
            if deepspeed_save:
                dist.barrier()  # DeepSpeed's save ends with a barrier the other ranks reach
            return
        try:
            write()
        except Exception as e:  # noqa: BLE001  (classified below: only write failures are caught)
            if not is_write_failure(e):
                raise
            self.failure = f"rank {self.rank} could not write {getattr(e, 'filename', None) or path}: " \
                           f"{' '.join(str(e).split())[:200]}"
            if deepspeed_save:
                dist.barrier()  # matches the barrier that ends DeepSpeed's save on the ranks that got there

    def _write(self, tmp: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = os.path.join(tmp, name)
        self._guard(path, lambda: atomic_save_safetensors(path, tensors))

    def _agree(self, step: int, tmp: str) -> None:
        """Collective: every rank learns the first write failure of any rank; then all raise SaveError together."""
        failures: list[str | None] = [None] * self.world
        dist.all_gather_object(failures, self.failure)
        first = next((f for f in failures if f is not None), None)
        self.failure = None
        if first is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveError(f"checkpoint of step {step} not saved: {first}")

    def _begin(self, step: int, networks: Sequence[str] = (DEFAULT,)) -> str:
        """Collective: an empty temporary folder for this step (and a DeepSpeed subfolder per network)."""
        tmp = os.path.join(self.folder, step_name(step) + ".tmp")
        self.failure = None
        if self.rank == 0:
            def make() -> None:
                shutil.rmtree(tmp, ignore_errors=True)
                for name in networks:
                    os.makedirs(os.path.join(tmp, deepspeed_dir(name)))
            self._guard(tmp, make)
        self._agree(step, tmp)
        return tmp

    def _commit(self, step: int, meta: dict[str, Any]) -> str:
        """Collective: publish the temporary folder as the latest checkpoint; prune to `keep` folders."""
        tmp, final = os.path.join(self.folder, step_name(step) + ".tmp"), os.path.join(self.folder, step_name(step))
        if self.rank == 0:
            self._guard(tmp, lambda: self._publish(tmp, final, step, meta))
        self._agree(step, tmp)
        return final

    def _publish(self, tmp: str, final: str, step: int, meta: dict[str, Any]) -> None:
        """Rank 0: hash, write meta.json (last), rename, replace `latest`, prune."""
        _fsync_tree(tmp)
        atomic_write_json(os.path.join(tmp, "meta.json"), {**meta, "files": file_table(tmp)})
        if os.path.exists(final):  # a re-save of the same step (e.g. exit right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.folder)
        atomic_write_text(os.path.join(self.folder, "latest"), step_name(step) + "\n")
        done = sorted(d for d in os.listdir(self.folder) if STEP_RE.match(d))
        for old in done[:-self.keep]:
            shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)

    # ------------------------------------------------------------------------------------------ load
    def data_state(self, folder: str) -> dict:
        """This rank's data-stream position (read before the stream is made)."""
        return read_json(folder, f"rank_{self.rank:05d}.json")["data"]

    def load_engine(self, folder: str, engine, name: str = DEFAULT) -> None:
        """Collective: network `name`'s DeepSpeed module, optimizer and lr-scheduler states (before the EMA takes its
        shards)."""
        path = os.path.join(folder, deepspeed_dir(name))
        if not os.path.isdir(path):
            raise UsageError(f"{folder} holds no state of network {name!r} (saved by an objective with other networks);"
                             f" use a new --run-dir")
        engine.load_checkpoint(path, tag="ds", load_module_strict=True, load_optimizer_states=True,
                               load_lr_scheduler_states=True)

    def load_rest(self, folder: str, *, emas: dict[str, Any], objective) -> int:
        """EMA shards of every network, objective state and this rank's RNG states; returns the step to continue
        from."""
        from safetensors.torch import load_file
        objective.load_state_dict(load_file(os.path.join(folder, "objective.safetensors")))
        for name, ema in emas.items():
            if ema.shards:
                for r in ema.rates:
                    ema.load(r, load_file(os.path.join(folder, weights_file(name, r))))
        rng = load_file(os.path.join(folder, f"rng_{self.rank:05d}.safetensors"))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        return int(read_json(folder, "meta.json")["step"])


# ---------------------------------------------------------------------------------------------------------- CLI
def _verify_run(run_dir: str) -> int:
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise UsageError(f"{run_dir} has no checkpoints/ folder; pass a training --run-dir")
    folders, bad = checkpoint_folders(run_dir), 0
    latest = latest_checkpoint(run_dir)
    for f in folders:
        problem = verify(f)
        bad += problem is not None
        size = sum(os.path.getsize(os.path.join(f, r)) for r in _files(f)) / 2**20
        mark = " (latest)" if latest and os.path.samefile(f, latest) else ""
        print(f"{os.path.basename(f)}{mark}: " + (f"DAMAGED: {problem}" if problem else f"ok ({size:.1f} MiB)"))
    for d in sorted(os.listdir(os.path.join(run_dir, "checkpoints"))):
        if d.endswith((".tmp", ".damaged")):
            print(f"{d}: {'unfinished save (removed at the next start)' if d.endswith('.tmp') else 'set aside'}")
    print(f"{len(folders) - bad} of {len(folders)} checkpoint(s) intact in {os.path.join(run_dir, 'checkpoints')}")
    return 1 if bad or not folders else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m trainer.checkpoint", description="Check a run's checkpoints: every file's "
                       "size and sha256 against the table recorded when it was saved. Exit 0: all intact; 1: some "
                       "damaged or none there; 2: bad input.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify every checkpoint of RUN_DIR")
    v.add_argument("run_dir", metavar="RUN_DIR")
    a = p.parse_args(argv)
    return _verify_run(a.run_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main, "trainer.checkpoint"))
