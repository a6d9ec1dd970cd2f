"""The one convention every CLI of this project follows (data, trainer, evaluations, cluster helpers).

- Bad input raises `UsageError` (or its subclass `data.errors.DataError`); the CLI's `main` turns it into ONE line
  on stderr, `PROG: error: MESSAGE`, and exit code 2 (`die`).
- `ArgumentParser` reports argparse's own errors the same way (no usage dump), and `flag()` declares booleans as
  `--name/--no-name`.
- Naming: `--out FILE` for one output file, `--out-dir DIR` for a folder, `--batch-size`, `--workers`, `--seed`,
  `--progress/--no-progress` mean the same thing everywhere.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad user input (flags, paths, files, presets): printed as one line, exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def die(message: str, prog: str = "", code: int = EXIT_USAGE) -> NoReturn:
    """Print `prog: error: message` (one line) on stderr and exit with `code` (2: bad input)."""
    line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {line}\n" if prog else line + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad input as ONE line on stderr and exits with code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        die(f"{message} (see --help)", self.prog)


def flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
    """A boolean option spelled `--name` / `--no-name`."""
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)


def exit_without_teardown(main: Callable[[], int]) -> NoReturn:
    """`main()`, then end the process with its exit code WITHOUT the interpreter's teardown (os._exit after flushing
    stdout and stderr), for the CLIs that may run as several ranks. Everything is written and closed when `main`
    returns; destructors of gloo / DeepSpeed background threads run during the teardown can abort a finished rank
    (SIGABRT, "terminate called without an active exception"), which would turn a complete job into a failed one.
    A SystemExit (die: its line already printed) ends the same way with its code; other exceptions propagate.
    Under `mpiexec`, a successful rank finalizes MPI first (`_finalize_mpi`)."""
    try:
        code = main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        _finalize_mpi()
    os._exit(code)


def _finalize_mpi() -> None:
    """MPI_Finalize if mpi4py initialised MPI (launched by `mpiexec`). MPICH's launcher treats a rank that exits
    without finalizing as aborted: it kills the other ranks, and still exits 0, so rank 0 could be killed before it
    wrote its results. A failing rank (code != 0) skips this on purpose, so that the launcher stops the others."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def run_cli(main: Callable[[Sequence[str] | None], int], prog: str,
            argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except UsageError as e:
        die(str(e), prog)
