"""Errors raised by the data package: one clear line, no traceback needed to understand them."""
from __future__ import annotations


class DataError(RuntimeError):
    """A data set problem the user must fix (missing path, empty pattern, too much bad data).

    The message is a single line that names the offending paths or shards.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
