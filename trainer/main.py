"""Training entry point (any launcher):

    python -m trainer.main --data 'shards/train-{000000..000009}.tar' --run-dir runs/x --model-size tiny16
    deepspeed --num_gpus 2 trainer/main.py ...   |   srun python -m trainer.main ...   |   mpiexec -n 2 python -m trainer.main ...

Re-running the same command resumes from RUN_DIR/checkpoints/latest. Exit codes: 0 finished, 2 bad input,
3 loss non-finite for --nonfinite-patience steps (last good checkpoint kept), 75 preempted by SIGTERM/SIGUSR1
(state saved at the next step boundary on all ranks; re-run to resume).
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

from data.cli import UsageError, die  # noqa: E402
from trainer.config import batch_layout, parse_config  # noqa: E402
from trainer.dist import discover  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse, discover the launch, train; bad input anywhere is one line on stderr and exit code 2."""
    try:
        cfg = parse_config(argv)
        launch = discover()
        batch_layout(cfg, launch.world)
        from trainer.loop import Trainer  # DeepSpeed's import is slow: not for --help or bad flags
        code = Trainer(cfg, launch).run()
    except UsageError as e:
        die(str(e), "trainer.main")
    if dist.is_initialized():
        dist.barrier()  # every rank is done with its files before any tears its connections down
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    exit_code = main()
    # Everything is saved and closed here. Skip the interpreter's teardown: destructors of gloo / DeepSpeed
    # background threads can abort a finished rank (SIGABRT, "terminate called without an active exception"),
    # which would turn a complete run into a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
