"""Small CLI helpers shared by ``data.prepare`` and ``data.verify``: one-line errors, exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad input as ONE line on stderr and exits with code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{self.prog}: error: {message} (see --help)")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print a single line on stderr and exit with ``code``."""
    sys.stderr.write(" ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(code)
