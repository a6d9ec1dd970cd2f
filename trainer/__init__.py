"""trainer: DeepSpeed training loop for Improved DDPM (launch, config, EMA, checkpoints, logging, export).

Importing this package is cheap (no deepspeed import); see `trainer.main` for the entry point.
"""

EXIT_PREEMPTED = 75  # exit code after a SIGTERM/SIGUSR1: state saved, re-run the same command to resume
EXIT_BAD_INPUT = 2  # bad flags, missing data, unknown preset: one line on stderr
EXIT_NONFINITE = 3  # loss stayed non-finite for --nonfinite-patience steps; last good checkpoint kept
EXIT_RANK_LOST = 69  # a rank died or a collective made no progress for --collective-timeout s; re-run to resume
EXIT_SAVE_FAILED = 74  # a checkpoint write failed (disk full, I/O error, permission); the previous one stays latest

__all__ = ["EXIT_PREEMPTED", "EXIT_BAD_INPUT", "EXIT_NONFINITE", "EXIT_RANK_LOST", "EXIT_SAVE_FAILED"]
