"""Errors raised by the data package: one clear line, no traceback needed to understand them."""
from __future__ import annotations

from .cli import UsageError


class DataError(UsageError):
    """A data set problem the user must fix (missing path, empty pattern, too much bad data).

    The message is a single line that names the offending paths or shards.
    """
