"""Training entry point (any launcher):

    python -m trainer.main --data 'shards/train-{000000..000009}.tar' --run-dir runs/x --model-size tiny16
    deepspeed --num_gpus 2 trainer/main.py ...   |   srun python -m trainer.main ...   |   mpiexec -n 2 python -m trainer.main ...

Re-running the same command resumes from the newest intact checkpoint. Rank 0 holds RUN_DIR/lock while it runs
(one writer per run dir; see data.runlock). Exit codes:
  0   finished
  2   bad input (flags, data, a run dir locked by another live trainer, no intact checkpoint): one line
  3   loss non-finite for --nonfinite-patience steps after --rollback rollbacks (last good checkpoint kept)
  69  a rank died, or a collective made no progress for --collective-timeout s: one line; re-run to resume
  74  a checkpoint could not be written (disk full, I/O error, permission); the previous one stays latest
  75  preempted by SIGTERM/SIGUSR1 (state saved at the next step boundary on all ranks; re-run to resume)
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `deepspeed trainer/main.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Transparent huge pages for torch's CPU tensors of 2 MiB and more (read once, at torch's first allocation, so set
# before importing torch). DeepSpeed allocates its flat gradient buffers every step; with 4 KiB pages their page
# faults cost about 10% of a 30M step on one CPU rank (docs/trainer.md). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch.distributed as dist  # noqa: E402  (after the environment variable above)

from data.cli import UsageError, die, exit_without_teardown  # noqa: E402
from data.runlock import RunLock  # noqa: E402
from trainer import EXIT_RANK_LOST  # noqa: E402
from trainer.checkpoint import clean_unfinished  # noqa: E402
from trainer.config import TrainConfig, batch_layout, parse_config  # noqa: E402
from trainer.dist import discover, is_comm_failure, lost_rank_message  # noqa: E402


def say(msg: str) -> None:
    print(f"trainer: {msg}", flush=True)


def take_run_lock(cfg: TrainConfig) -> RunLock:
    """Rank 0: RUN_DIR/lock (one trainer per run dir), then remove the folders of saves a dead run left."""
    lock = RunLock(os.path.join(cfg.run.run_dir, "lock"), what=f"run dir {cfg.run.run_dir}",
                   force=cfg.run.force_unlock).acquire()
    for note in lock.notes:
        say(note)
    clean_unfinished(cfg.run.run_dir, say)
    return lock


def main(argv: list[str] | None = None) -> int:
    """Parse, discover the launch, lock the run dir, train. Bad input anywhere: one line on stderr, exit code 2. A
    failed collective (a rank died or hung): one line, exit 69, no teardown (the peers are gone)."""
    lock, trainer = None, None
    try:
        cfg = parse_config(argv)
        launch = discover()
        batch_layout(cfg, launch.world)
        if launch.rank == 0:
            lock = take_run_lock(cfg)
        from trainer.loop import Trainer  # DeepSpeed's import is slow: not for --help or bad flags
        trainer = Trainer.__new__(Trainer)  # so that the step is known if the constructor's collectives fail
        trainer.__init__(cfg, launch)
        code = trainer.run()
    except UsageError as e:
        if lock:
            lock.release()
        die(str(e), "trainer.main")
    except Exception as e:  # noqa: BLE001  (only failed collectives are handled; anything else is a bug)
        if not (trainer is not None and launch.world > 1 and is_comm_failure(e)):
            raise
        line = lost_rank_message(launch.rank, getattr(trainer, "step", 0), e, cfg.run.collective_timeout)
        print(f"trainer: {line}", file=sys.stderr, flush=True)
        if lock:
            lock.release()
        return EXIT_RANK_LOST
    if dist.is_initialized():
        dist.barrier()  # every rank is done with its files before any tears its connections down
        dist.destroy_process_group()
    if lock:
        lock.release()
    return code


if __name__ == "__main__":
    exit_without_teardown(main)  # everything is saved and closed: no interpreter teardown (see data.cli)
