"""One-line CLI errors: `UsageError` -> message on stderr, exit code 2."""
from __future__ import annotations

import sys
from typing import NoReturn

from trainer import EXIT_BAD_INPUT


class UsageError(Exception):
    """Bad user input (flags, paths, presets). Printed as one line; exit code 2."""


def die(msg: str, prog: str = "trainer") -> NoReturn:
    """Print `prog: error: msg` on stderr (one line) and exit with code 2."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(msg).split())}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_BAD_INPUT)
